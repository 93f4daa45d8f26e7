-- Version 9: pruning the policy decisions log (`moat serve --policy-decisions-retention`)
-- without losing its verifiability. A group's anchor is its newest pruned entry: its number and
-- hash. The remaining log starts right after it and chains to that hash, so a verifier can
-- tell pruning (the sanctioned path) from entries removed or changed.
CREATE TABLE policy_log_anchors (
    group_name TEXT PRIMARY KEY,
    n          INTEGER NOT NULL CHECK (n >= 1),
    hash       TEXT NOT NULL,
    pruned_at  INTEGER NOT NULL                  -- unix seconds
) STRICT;

-- An anchor names an entry of the log as it is (number and hash), only moves forward and is
-- never removed.
CREATE TRIGGER policy_log_anchor_insert BEFORE INSERT ON policy_log_anchors
WHEN NEW.hash IS NOT (SELECT hash FROM policy_decisions
                      WHERE group_name = NEW.group_name AND n = NEW.n)
BEGIN SELECT RAISE(ABORT, 'a decisions-log anchor must name an entry of the log'); END;
CREATE TRIGGER policy_log_anchor_update BEFORE UPDATE ON policy_log_anchors
WHEN NEW.group_name IS NOT OLD.group_name OR NEW.n <= OLD.n
  OR NEW.hash IS NOT (SELECT hash FROM policy_decisions
                      WHERE group_name = NEW.group_name AND n = NEW.n)
BEGIN SELECT RAISE(ABORT, 'a decisions-log anchor only moves forward, onto an entry of the log'); END;
CREATE TRIGGER policy_log_anchor_no_delete BEFORE DELETE ON policy_log_anchors
BEGIN SELECT RAISE(ABORT, 'decisions-log anchors are never removed'); END;

-- Entries may be deleted only at or before their group's anchor (pruning); the rest of the log
-- stays append-only.
DROP TRIGGER policy_decisions_no_delete;
CREATE TRIGGER policy_decisions_no_delete BEFORE DELETE ON policy_decisions
WHEN OLD.n > COALESCE((SELECT n FROM policy_log_anchors WHERE group_name = OLD.group_name), 0)
BEGIN SELECT RAISE(ABORT, 'the policy decisions log is append-only'); END;
