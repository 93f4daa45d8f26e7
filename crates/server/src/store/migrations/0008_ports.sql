-- Version 8: the ports a sandbox exposes through the daemon's proxy. A row goes with its
-- sandbox; exposing a port declares it reachable, whether or not anything listens yet.
CREATE TABLE sandbox_ports (
    sandbox    TEXT NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
    port       INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
    created_at INTEGER NOT NULL,
    PRIMARY KEY (sandbox, port)
) STRICT;
