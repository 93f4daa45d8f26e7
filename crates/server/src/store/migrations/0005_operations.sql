-- Version 5: long-running operations (image imports). A row is written when the operation
-- starts and updated when it ends; one still `running` when a daemon starts was interrupted
-- and is marked failed then.
CREATE TABLE operations (
    id          TEXT PRIMARY KEY,                -- op-<16 hex>
    kind        TEXT NOT NULL CHECK (kind IN ('image-import')),
    state       TEXT NOT NULL CHECK (state IN ('running', 'succeeded', 'failed')),
    target      TEXT NOT NULL,                   -- the image name being imported
    request     TEXT NOT NULL,                   -- the request, JSON
    phase       TEXT NOT NULL,
    bytes_done  INTEGER NOT NULL DEFAULT 0,
    bytes_total INTEGER,
    error       TEXT,                            -- JSON {code, message} once failed
    result      TEXT,                            -- JSON Image once succeeded
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
) STRICT;
CREATE INDEX operations_running ON operations (state) WHERE state = 'running';
