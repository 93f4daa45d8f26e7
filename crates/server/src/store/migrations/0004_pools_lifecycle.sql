-- Version 4: warm pools and lifecycle timers. (Version 3 is another change's; each version
-- is applied once, in order.)
-- The last exec, file or shell activity of a sandbox (Unix seconds), for idle timers that
-- survive a restart. NULL: none since it was created.
ALTER TABLE sandboxes ADD COLUMN last_activity_at INTEGER;
-- Ready VMs of a group's warm pool. Not sandboxes (no API object, not listed) until a create
-- takes one: then its row moves to `sandboxes` under the same id, in one transaction. The id
-- is also its run directory's name, so the next daemon re-adopts (or destroys) it.
CREATE TABLE pool_members (
    id         TEXT PRIMARY KEY,
    group_name TEXT NOT NULL REFERENCES sandbox_groups (name) ON DELETE CASCADE,
    image      TEXT NOT NULL,                    -- manifest digest
    tier       TEXT NOT NULL CHECK (tier IN ('xs', 's', 'm', 'l', 'xl')),
    created_at INTEGER NOT NULL
) STRICT;
CREATE INDEX pool_members_group ON pool_members (group_name);
