-- Version 4 (PostgreSQL; see ../0004_pools_lifecycle.sql): warm pools and lifecycle timers.
ALTER TABLE sandboxes ADD COLUMN last_activity_at BIGINT;
CREATE TABLE pool_members (
    id         TEXT PRIMARY KEY,
    group_name TEXT NOT NULL REFERENCES sandbox_groups (name) ON DELETE CASCADE,
    image      TEXT NOT NULL,
    tier       TEXT NOT NULL CHECK (tier IN ('xs', 's', 'm', 'l', 'xl')),
    created_at BIGINT NOT NULL
);
CREATE INDEX pool_members_group ON pool_members (group_name);
