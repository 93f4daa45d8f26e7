-- Version 14: several daemons on one store, each a node (docs/FLEET.md).
-- The sealing key (MOAT_HOME/secrets.key) is the fleet's one shared secret: the store keeps
-- a value sealed with it, so that a node started with another key refuses to start.
CREATE TABLE seal_check (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    sealed BLOB NOT NULL
) STRICT;

-- The identity signing keys' private halves move from MOAT_HOME/identity/keys into the store,
-- sealed with that key (a database backup alone cannot sign). NULL only until the first start
-- of this version moves an existing key file in.
ALTER TABLE identity_keys ADD COLUMN private_key BLOB;
-- One active and one pending key, even when several nodes start on a new store together.
CREATE UNIQUE INDEX identity_keys_one_per_state ON identity_keys (state)
    WHERE state <> 'retired';

-- The nodes: each daemon on the store holds a lease on its row, renewed on a timer. Times are
-- the database's clock, in milliseconds. `epoch` grows each time a node (re)acquires its
-- lease; every write a node makes about its sandboxes is conditional on its epoch and an
-- unexpired lease (fencing). `holder` is a random id kept in the node's MOAT_HOME, so that a
-- restart of the same node takes its row back at once and another home waits for the lease.
CREATE TABLE nodes (
    name             TEXT PRIMARY KEY,
    holder           TEXT NOT NULL,
    advertise_url    TEXT NOT NULL,
    accelerator      TEXT NOT NULL,
    labels           TEXT NOT NULL DEFAULT '{}',     -- JSON object
    memory_mib       INTEGER NOT NULL,               -- capacity
    millicpus        INTEGER NOT NULL,
    used_memory_mib  INTEGER NOT NULL DEFAULT 0,     -- use, as of the last renewal
    used_millicpus   INTEGER NOT NULL DEFAULT 0,
    sandboxes        INTEGER NOT NULL DEFAULT 0,
    state            TEXT NOT NULL CHECK (state IN ('ready', 'draining', 'lost')),
    draining         INTEGER NOT NULL DEFAULT 0,     -- kept across a loss and a re-acquire
    epoch            INTEGER NOT NULL,
    lease_ms         INTEGER NOT NULL,
    lease_expires_ms INTEGER NOT NULL,
    acquired_ms      INTEGER NOT NULL,
    lost_ms          INTEGER,
    lost_reason      TEXT
) STRICT;

-- The node that runs each sandbox and each warm-pool VM (NULL: made before node mode; the
-- first node to start claims them), and the sandbox state `lost`: its node's lease expired
-- while it ran. SQLite cannot change a CHECK, so the table is rebuilt (the migration runs with
-- foreign keys off, so the rows that refer to sandboxes stay; they are checked before commit).
CREATE TABLE sandboxes_v14 (
    id               TEXT PRIMARY KEY,
    group_name       TEXT NOT NULL REFERENCES sandbox_groups (name) ON DELETE RESTRICT,
    state            TEXT NOT NULL CHECK (state IN ('creating', 'running', 'suspending',
                                                    'suspended', 'resuming', 'deleting',
                                                    'failed', 'lost')),
    reason           TEXT,                       -- why it failed or was lost
    image            TEXT NOT NULL,
    tier             TEXT NOT NULL CHECK (tier IN ('xs', 's', 'm', 'l', 'xl')),
    env              TEXT NOT NULL DEFAULT '{}',
    labels           TEXT NOT NULL DEFAULT '{}',
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    last_activity_at INTEGER,
    node             TEXT
) STRICT;
INSERT INTO sandboxes_v14 (id, group_name, state, reason, image, tier, env, labels, created_at,
                           updated_at, last_activity_at)
    SELECT id, group_name, state, reason, image, tier, env, labels, created_at, updated_at,
           last_activity_at
    FROM sandboxes;
DROP TABLE sandboxes;
ALTER TABLE sandboxes_v14 RENAME TO sandboxes;
CREATE INDEX sandboxes_group ON sandboxes (group_name);
CREATE INDEX sandboxes_node ON sandboxes (node);
ALTER TABLE pool_members ADD COLUMN node TEXT;
-- Snapshots and image imports are files in the MOAT_HOME of the node that made them: a node
-- recovers only its own at start.
ALTER TABLE snapshots ADD COLUMN node TEXT;
ALTER TABLE operations ADD COLUMN node TEXT;
