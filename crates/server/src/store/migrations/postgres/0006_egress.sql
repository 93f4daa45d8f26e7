-- Version 6 (PostgreSQL; see ../0006_egress.sql): the egress audit. An identity column
-- numbers the rows as SQLite's AUTOINCREMENT does: increasing, never reused.
CREATE TABLE egress_events (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time           TEXT NOT NULL,
    time_ms        BIGINT NOT NULL,
    group_name     TEXT NOT NULL,
    sandbox        TEXT NOT NULL,
    kind           TEXT NOT NULL CONSTRAINT egress_events_kind CHECK (kind IN ('dns', 'tcp', 'udp')),
    name           TEXT,
    address        TEXT,
    port           BIGINT,
    verdict        TEXT NOT NULL CHECK (verdict IN ('allow', 'deny')),
    rule           BIGINT,
    reason         TEXT NOT NULL,
    bytes_sent     BIGINT NOT NULL,
    bytes_received BIGINT NOT NULL,
    duration_ms    BIGINT NOT NULL
);
CREATE INDEX egress_events_group ON egress_events (group_name, id);
CREATE INDEX egress_events_sandbox ON egress_events (sandbox, id);
