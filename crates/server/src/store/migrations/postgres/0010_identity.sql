-- Version 10 (PostgreSQL; see ../0010_identity.sql): workload identity. Signing-key states,
-- the never-reused uids of groups and sandboxes, and the audit of every mint and refusal.
CREATE TABLE identity_keys (
    kid          TEXT PRIMARY KEY,
    state        TEXT NOT NULL CHECK (state IN ('pending', 'active', 'retired')),
    created_at   BIGINT NOT NULL,
    activated_at BIGINT,
    retired_at   BIGINT
);

CREATE TABLE identity_groups (
    group_name TEXT PRIMARY KEY REFERENCES sandbox_groups (name) ON DELETE CASCADE,
    uid        TEXT NOT NULL UNIQUE
);

CREATE TABLE identity_sandboxes (
    sandbox     TEXT PRIMARY KEY REFERENCES sandboxes (id) ON DELETE CASCADE,
    uid         TEXT NOT NULL UNIQUE,
    incarnation BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE identity_events (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time        TEXT NOT NULL,
    time_ms     BIGINT NOT NULL,
    group_name  TEXT NOT NULL,
    sandbox     TEXT NOT NULL,
    outcome     TEXT NOT NULL CHECK (outcome IN ('minted', 'refused')),
    delivery    TEXT NOT NULL CHECK (delivery IN ('api', 'endpoint', 'egress')),
    audience    TEXT NOT NULL,
    subject     TEXT,
    jti         TEXT,
    kid         TEXT,
    expires_on  BIGINT,
    reason      TEXT,
    key_id      TEXT
);
CREATE INDEX identity_events_group ON identity_events (group_name, id);
