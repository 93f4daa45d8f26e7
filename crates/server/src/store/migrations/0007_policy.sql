-- Version 7: governance (docs/POLICY.md). Every version of a group's policy is kept (decisions
-- name the version that made them); `group_policy` points at the one in force. Deleting a group
-- deletes its pointer (a group created again under that name starts with no policy: off) but
-- keeps its versions and its decisions.
CREATE TABLE policies (
    group_name TEXT NOT NULL,
    version    INTEGER NOT NULL CHECK (version >= 1),
    body       TEXT NOT NULL,                    -- the policy object, JSON
    sha256     TEXT NOT NULL,                    -- of body
    author     TEXT NOT NULL,                    -- id of the API key that applied it
    created_at INTEGER NOT NULL,
    PRIMARY KEY (group_name, version)
) STRICT;

CREATE TABLE group_policy (
    group_name TEXT PRIMARY KEY REFERENCES sandbox_groups (name) ON DELETE CASCADE,
    version    INTEGER NOT NULL,
    FOREIGN KEY (group_name, version) REFERENCES policies (group_name, version)
) STRICT;

-- The decisions log: one hash-chained entry per decision (moat_policy::log), numbered from 1
-- per group. `entry` is the whole entry as JSON; the other columns index it.
CREATE TABLE policy_decisions (
    group_name TEXT NOT NULL,
    n          INTEGER NOT NULL CHECK (n >= 1),
    at         INTEGER NOT NULL,                 -- unix seconds
    verdict    TEXT NOT NULL CHECK (verdict IN ('allow', 'deny', 'audit')),
    hash       TEXT NOT NULL,
    entry      TEXT NOT NULL,
    PRIMARY KEY (group_name, n)
) STRICT;
CREATE INDEX policy_decisions_at ON policy_decisions (group_name, at);

-- Append-only: the daemon never changes or removes an entry, and neither may a bug in it.
-- (Someone with write access to this file can drop these; the hash chain then shows the edit.)
CREATE TRIGGER policy_decisions_no_update BEFORE UPDATE ON policy_decisions
BEGIN SELECT RAISE(ABORT, 'the policy decisions log is append-only'); END;
CREATE TRIGGER policy_decisions_no_delete BEFORE DELETE ON policy_decisions
BEGIN SELECT RAISE(ABORT, 'the policy decisions log is append-only'); END;
