-- Version 8 (PostgreSQL; see ../0008_ports.sql): the ports a sandbox exposes.
CREATE TABLE sandbox_ports (
    sandbox    TEXT NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
    port       BIGINT NOT NULL CHECK (port BETWEEN 1 AND 65535),
    created_at BIGINT NOT NULL,
    PRIMARY KEY (sandbox, port)
);
