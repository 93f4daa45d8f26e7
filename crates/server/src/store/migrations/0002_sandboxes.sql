-- Version 2: sandboxes get their real columns. Version 1 never wrote a row, but rows are
-- copied anyway so the migration is correct on any database. The table is rebuilt (SQLite
-- cannot add CHECK constraints to an existing table).
CREATE TABLE sandboxes_v2 (
    id         TEXT PRIMARY KEY,                 -- sb-<12 hex>; also the run directory's name
    group_name TEXT NOT NULL REFERENCES sandbox_groups (name) ON DELETE RESTRICT,
    state      TEXT NOT NULL CHECK (state IN ('creating', 'running', 'suspending', 'suspended',
                                              'resuming', 'deleting', 'failed')),
    reason     TEXT,                             -- why it failed
    image      TEXT NOT NULL,                    -- manifest digest
    tier       TEXT NOT NULL CHECK (tier IN ('xs', 's', 'm', 'l', 'xl')),
    env        TEXT NOT NULL DEFAULT '{}',       -- JSON object
    labels     TEXT NOT NULL DEFAULT '{}',       -- JSON object
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;
INSERT INTO sandboxes_v2 (id, group_name, state, reason, image, tier, created_at, updated_at)
    SELECT id, group_name, 'failed', 'created by an older moat', '', 'm', created_at, updated_at
    FROM sandboxes;
DROP TABLE sandboxes;
ALTER TABLE sandboxes_v2 RENAME TO sandboxes;
CREATE INDEX sandboxes_group ON sandboxes (group_name);
