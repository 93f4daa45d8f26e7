-- Version 12: API keys that expire, record when they were last used and when their secret was
-- last rotated, and may carry a rate limit of their own.
ALTER TABLE api_keys ADD COLUMN expires_at INTEGER;    -- unix seconds; NULL: never
ALTER TABLE api_keys ADD COLUMN last_used_at INTEGER;  -- unix seconds, written at most once a minute
ALTER TABLE api_keys ADD COLUMN rotated_at INTEGER;    -- unix seconds; NULL: never rotated
ALTER TABLE api_keys ADD COLUMN rate_per_s INTEGER;    -- NULL (with rate_burst): the daemon's limit
ALTER TABLE api_keys ADD COLUMN rate_burst INTEGER;
