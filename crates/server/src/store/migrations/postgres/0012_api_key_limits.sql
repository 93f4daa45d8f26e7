-- Version 12 (PostgreSQL; see ../0012_api_key_limits.sql): API keys that expire, record their
-- last use and last rotation, and may carry a rate limit of their own.
ALTER TABLE api_keys ADD COLUMN expires_at BIGINT;
ALTER TABLE api_keys ADD COLUMN last_used_at BIGINT;
ALTER TABLE api_keys ADD COLUMN rotated_at BIGINT;
ALTER TABLE api_keys ADD COLUMN rate_per_s BIGINT;
ALTER TABLE api_keys ADD COLUMN rate_burst BIGINT;
