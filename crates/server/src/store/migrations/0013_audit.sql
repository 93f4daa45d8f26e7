-- Version 13: the audit log of mutating API calls (`GET /v1/audit`). No request body is ever
-- stored: bodies may hold secrets.
CREATE TABLE audit_log (
    n          INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms      INTEGER NOT NULL,            -- unix milliseconds
    key_id     TEXT,                        -- NULL: no valid key (a refused attempt)
    action     TEXT NOT NULL,               -- "METHOD /route/{template}"
    target     TEXT NOT NULL,               -- the path called, without its query
    group_name TEXT,
    status     INTEGER NOT NULL,
    request_id TEXT NOT NULL
) STRICT;
CREATE INDEX audit_log_at ON audit_log (at_ms);
CREATE INDEX audit_log_key ON audit_log (key_id, n);
CREATE INDEX audit_log_group ON audit_log (group_name, n);
