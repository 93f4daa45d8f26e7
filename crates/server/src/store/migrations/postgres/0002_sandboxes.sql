-- Version 2 (PostgreSQL; see ../0002_sandboxes.sql): sandboxes get their real columns.
-- PostgreSQL alters the table in place where SQLite rebuilds it.
UPDATE sandboxes SET state = 'failed';
ALTER TABLE sandboxes
    DROP COLUMN spec,
    ADD COLUMN reason TEXT,
    ADD COLUMN image  TEXT NOT NULL DEFAULT '',
    ADD COLUMN tier   TEXT NOT NULL DEFAULT 'm' CHECK (tier IN ('xs', 's', 'm', 'l', 'xl')),
    ADD COLUMN env    TEXT NOT NULL DEFAULT '{}',
    ADD COLUMN labels TEXT NOT NULL DEFAULT '{}',
    ADD CONSTRAINT sandboxes_state_check
        CHECK (state IN ('creating', 'running', 'suspending', 'suspended', 'resuming',
                         'deleting', 'failed'));
UPDATE sandboxes SET reason = 'created by an older moat';
ALTER TABLE sandboxes ALTER COLUMN image DROP DEFAULT, ALTER COLUMN tier DROP DEFAULT;
