-- Version 11 (PostgreSQL; see ../0011_secrets.sql): group secrets, sealed; the egress audit
-- gains kind 'http'.
CREATE TABLE group_secrets (
    group_name TEXT NOT NULL REFERENCES sandbox_groups (name) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    sealed     BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (group_name, name)
);

ALTER TABLE egress_events
    DROP CONSTRAINT egress_events_kind,
    ADD CONSTRAINT egress_events_kind CHECK (kind IN ('dns', 'tcp', 'udp', 'http'));
