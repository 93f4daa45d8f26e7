-- Version 15 (PostgreSQL; see ../0015_shared_storage.sql): suspended sandboxes on shared
-- storage. Where a sandbox's suspend files are ('local' or 'shared'), and whether a node was
-- started with --shared-dir.
ALTER TABLE sandboxes ADD COLUMN files TEXT NOT NULL DEFAULT 'local'
    CHECK (files IN ('local', 'shared'));
ALTER TABLE nodes ADD COLUMN shared_storage BIGINT NOT NULL DEFAULT 0;
ALTER TABLE snapshots ADD COLUMN files TEXT NOT NULL DEFAULT 'local'
    CHECK (files IN ('local', 'shared'));
