-- Version 5 (PostgreSQL; see ../0005_operations.sql): long-running operations.
CREATE TABLE operations (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('image-import')),
    state       TEXT NOT NULL CHECK (state IN ('running', 'succeeded', 'failed')),
    target      TEXT NOT NULL,
    request     TEXT NOT NULL,
    phase       TEXT NOT NULL,
    bytes_done  BIGINT NOT NULL DEFAULT 0,
    bytes_total BIGINT,
    error       TEXT,
    result      TEXT,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
CREATE INDEX operations_running ON operations (state) WHERE state = 'running';
