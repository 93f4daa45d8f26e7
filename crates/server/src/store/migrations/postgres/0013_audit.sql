-- Version 13 (PostgreSQL; see ../0013_audit.sql): the audit log of mutating API calls. No
-- request body is ever stored: bodies may hold secrets.
CREATE TABLE audit_log (
    n          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_ms      BIGINT NOT NULL,
    key_id     TEXT,
    action     TEXT NOT NULL,
    target     TEXT NOT NULL,
    group_name TEXT,
    status     BIGINT NOT NULL,
    request_id TEXT NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at_ms);
CREATE INDEX audit_log_key ON audit_log (key_id, n);
CREATE INDEX audit_log_group ON audit_log (group_name, n);
