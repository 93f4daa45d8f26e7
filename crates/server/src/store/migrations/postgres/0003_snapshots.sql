-- Version 3 (PostgreSQL; see ../0003_snapshots.sql): named snapshots of sandboxes.
CREATE TABLE snapshots (
    group_name TEXT NOT NULL REFERENCES sandbox_groups (name) ON DELETE RESTRICT,
    name       TEXT NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ('creating', 'ready')),
    sandbox    TEXT NOT NULL,
    image      TEXT NOT NULL,
    tier       TEXT NOT NULL CHECK (tier IN ('xs', 's', 'm', 'l', 'xl')),
    size_bytes BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (group_name, name)
);
