-- Version 3: named snapshots of sandboxes, scoped to a group. A row is `creating` while its
-- directory MOAT_HOME/snapshots/<group>/<name>/ is being written (it holds the name against a
-- second create) and `ready` once the directory is complete; the daemon's start removes
-- `creating` rows (a crash mid-way) and directories without a `ready` row.
CREATE TABLE snapshots (
    group_name TEXT NOT NULL REFERENCES sandbox_groups (name) ON DELETE RESTRICT,
    name       TEXT NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ('creating', 'ready')),
    sandbox    TEXT NOT NULL,                    -- the source sandbox's id (it may be gone)
    image      TEXT NOT NULL,                    -- manifest digest
    tier       TEXT NOT NULL CHECK (tier IN ('xs', 's', 'm', 'l', 'xl')),
    size_bytes INTEGER NOT NULL DEFAULT 0,       -- memory image + disk layer, on the host
    created_at INTEGER NOT NULL,
    PRIMARY KEY (group_name, name)
) STRICT;
