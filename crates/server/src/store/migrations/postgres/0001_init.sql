-- Version 1 (PostgreSQL; see ../0001_init.sql for the why of each column): API keys, sandbox
-- groups, and the sandboxes table whose foreign key makes "a group with sandboxes cannot be
-- deleted" a property of the database. Integers are BIGINT throughout (the store binds and
-- reads every integer as a 64-bit one, as SQLite stores them).
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE api_keys (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    prefix     TEXT NOT NULL,
    hash       BYTEA NOT NULL UNIQUE,
    role       TEXT NOT NULL CHECK (role IN ('admin', 'owner', 'user', 'reader')),
    groups     TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX api_keys_prefix ON api_keys (prefix);

CREATE TABLE sandbox_groups (
    name       TEXT PRIMARY KEY,
    spec       TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE sandboxes (
    id         TEXT PRIMARY KEY,
    group_name TEXT NOT NULL REFERENCES sandbox_groups (name) ON DELETE RESTRICT,
    state      TEXT NOT NULL,
    spec       TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX sandboxes_group ON sandboxes (group_name);
