-- Version 7 (PostgreSQL; see ../0007_policy.sql): governance. Every version of a group's
-- policy, the one in force, and the hash-chained decisions log.
CREATE TABLE policies (
    group_name TEXT NOT NULL,
    version    BIGINT NOT NULL CHECK (version >= 1),
    body       TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    author     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (group_name, version)
);

CREATE TABLE group_policy (
    group_name TEXT PRIMARY KEY REFERENCES sandbox_groups (name) ON DELETE CASCADE,
    version    BIGINT NOT NULL,
    FOREIGN KEY (group_name, version) REFERENCES policies (group_name, version)
);

CREATE TABLE policy_decisions (
    group_name TEXT NOT NULL,
    n          BIGINT NOT NULL CHECK (n >= 1),
    at         BIGINT NOT NULL,
    verdict    TEXT NOT NULL CHECK (verdict IN ('allow', 'deny', 'audit')),
    hash       TEXT NOT NULL,
    entry      TEXT NOT NULL,
    PRIMARY KEY (group_name, n)
);
CREATE INDEX policy_decisions_at ON policy_decisions (group_name, at);

-- Append-only: the daemon never changes or removes an entry, and neither may a bug in it.
-- (A role that owns the table can drop these; the hash chain then shows the edit.)
CREATE FUNCTION policy_decisions_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the policy decisions log is append-only';
END $$;
CREATE TRIGGER policy_decisions_no_update BEFORE UPDATE ON policy_decisions
    FOR EACH ROW EXECUTE FUNCTION policy_decisions_append_only();
CREATE TRIGGER policy_decisions_no_delete BEFORE DELETE ON policy_decisions
    FOR EACH ROW EXECUTE FUNCTION policy_decisions_append_only();
