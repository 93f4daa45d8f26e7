-- Version 1: API keys, sandbox groups, and the (still empty) sandboxes table whose foreign key
-- makes "a group with sandboxes cannot be deleted" a property of the database.
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

CREATE TABLE api_keys (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    prefix     TEXT NOT NULL,            -- first 8 characters after "moat_", shown in listings
    hash       BLOB NOT NULL UNIQUE,     -- sha256 of the whole key; the key itself is never stored
    role       TEXT NOT NULL CHECK (role IN ('admin', 'owner', 'user', 'reader')),
    groups     TEXT NOT NULL,            -- JSON array of group names
    created_at INTEGER NOT NULL          -- unix seconds
) STRICT;
CREATE INDEX api_keys_prefix ON api_keys (prefix);

CREATE TABLE sandbox_groups (
    name       TEXT PRIMARY KEY,
    spec       TEXT NOT NULL,            -- JSON GroupSpec with every default filled in
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;

CREATE TABLE sandboxes (
    id         TEXT PRIMARY KEY,
    group_name TEXT NOT NULL REFERENCES sandbox_groups (name) ON DELETE RESTRICT,
    state      TEXT NOT NULL,
    spec       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;
CREATE INDEX sandboxes_group ON sandboxes (group_name);
