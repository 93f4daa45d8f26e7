-- Version 11: workload identity (docs/IDENTITY.md). The signing keys' states (the private keys
-- are files under MOAT_HOME/identity/keys), the random uids that make a group's and a
-- sandbox's identity never reused (a group or sandbox deleted and re-created under the same
-- name gets a new one: the rows go with their group or sandbox), and the audit of every mint
-- and refusal (never a token).
CREATE TABLE identity_keys (
    kid          TEXT PRIMARY KEY,
    state        TEXT NOT NULL CHECK (state IN ('pending', 'active', 'retired')),
    created_at   INTEGER NOT NULL,
    activated_at INTEGER,
    retired_at   INTEGER
) STRICT;

CREATE TABLE identity_groups (
    group_name TEXT PRIMARY KEY REFERENCES sandbox_groups (name) ON DELETE CASCADE,
    uid        TEXT NOT NULL UNIQUE
) STRICT;

CREATE TABLE identity_sandboxes (
    sandbox     TEXT PRIMARY KEY REFERENCES sandboxes (id) ON DELETE CASCADE,
    uid         TEXT NOT NULL UNIQUE,
    incarnation INTEGER NOT NULL DEFAULT 0
) STRICT;

CREATE TABLE identity_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    time        TEXT NOT NULL,
    time_ms     INTEGER NOT NULL,
    group_name  TEXT NOT NULL,
    sandbox     TEXT NOT NULL,
    outcome     TEXT NOT NULL CHECK (outcome IN ('minted', 'refused')),
    delivery    TEXT NOT NULL CHECK (delivery IN ('api', 'endpoint', 'egress')),
    audience    TEXT NOT NULL,
    subject     TEXT,
    jti         TEXT,
    kid         TEXT,
    expires_on  INTEGER,
    reason      TEXT,
    key_id      TEXT
) STRICT;
CREATE INDEX identity_events_group ON identity_events (group_name, id);
