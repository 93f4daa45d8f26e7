-- Version 12: group secrets, sealed (store/seal.rs: ChaCha20-Poly1305 under MOAT_HOME's
-- secrets.key); the value is never stored in the clear. Rows go with their group.
CREATE TABLE group_secrets (
    group_name TEXT NOT NULL REFERENCES sandbox_groups (name) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    sealed     BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (group_name, name)
) STRICT;

-- The egress audit gains kind 'http': a request of an intercepted flow (a transform's
-- injection or a refusal). SQLite cannot change a CHECK, so the table is rebuilt.
CREATE TABLE egress_events_v12 (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    time           TEXT NOT NULL,
    time_ms        INTEGER NOT NULL,
    group_name     TEXT NOT NULL,
    sandbox        TEXT NOT NULL,
    kind           TEXT NOT NULL CHECK (kind IN ('dns', 'tcp', 'udp', 'http')),
    name           TEXT,
    address        TEXT,
    port           INTEGER,
    verdict        TEXT NOT NULL CHECK (verdict IN ('allow', 'deny')),
    rule           INTEGER,
    reason         TEXT NOT NULL,
    bytes_sent     INTEGER NOT NULL,
    bytes_received INTEGER NOT NULL,
    duration_ms    INTEGER NOT NULL
) STRICT;
INSERT INTO egress_events_v12 SELECT * FROM egress_events;
DROP TABLE egress_events;
ALTER TABLE egress_events_v12 RENAME TO egress_events;
CREATE INDEX egress_events_group ON egress_events (group_name, id);
CREATE INDEX egress_events_sandbox ON egress_events (sandbox, id);
