-- Version 6: the egress audit. One row per decision a sandbox's network stack reported (a DNS
-- answer, a connection when it ends). Rows outlive their sandbox and group (it is a record of
-- what happened); the daemon keeps the newest N (`moat serve --egress-audit-retention`).
CREATE TABLE egress_events (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    time           TEXT NOT NULL,                 -- RFC 3339, UTC, milliseconds (the stack's)
    time_ms        INTEGER NOT NULL,              -- the same, Unix milliseconds (for `since`)
    group_name     TEXT NOT NULL,
    sandbox        TEXT NOT NULL,
    kind           TEXT NOT NULL CHECK (kind IN ('dns', 'tcp', 'udp')),
    name           TEXT,
    address        TEXT,
    port           INTEGER,
    verdict        TEXT NOT NULL CHECK (verdict IN ('allow', 'deny')),
    rule           INTEGER,                       -- index into the group's egress.rules
    reason         TEXT NOT NULL,
    bytes_sent     INTEGER NOT NULL,
    bytes_received INTEGER NOT NULL,
    duration_ms    INTEGER NOT NULL
) STRICT;
CREATE INDEX egress_events_group ON egress_events (group_name, id);
CREATE INDEX egress_events_sandbox ON egress_events (sandbox, id);
