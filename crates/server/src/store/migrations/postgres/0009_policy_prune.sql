-- Version 9 (PostgreSQL; see ../0009_policy_prune.sql): pruning the policy decisions log
-- behind an anchor (its newest pruned entry: number and hash) without losing verifiability.
CREATE TABLE policy_log_anchors (
    group_name TEXT PRIMARY KEY,
    n          BIGINT NOT NULL CHECK (n >= 1),
    hash       TEXT NOT NULL,
    pruned_at  BIGINT NOT NULL
);

-- An anchor names an entry of the log as it is (number and hash), only moves forward and is
-- never removed.
CREATE FUNCTION policy_log_anchor_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'decisions-log anchors are never removed';
    END IF;
    IF NEW.hash IS DISTINCT FROM (SELECT hash FROM policy_decisions
                                  WHERE group_name = NEW.group_name AND n = NEW.n) THEN
        IF TG_OP = 'INSERT' THEN
            RAISE EXCEPTION 'a decisions-log anchor must name an entry of the log';
        END IF;
        RAISE EXCEPTION 'a decisions-log anchor only moves forward, onto an entry of the log';
    END IF;
    IF TG_OP = 'UPDATE' AND (NEW.group_name IS DISTINCT FROM OLD.group_name OR NEW.n <= OLD.n) THEN
        RAISE EXCEPTION 'a decisions-log anchor only moves forward, onto an entry of the log';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER policy_log_anchor_guard BEFORE INSERT OR UPDATE OR DELETE ON policy_log_anchors
    FOR EACH ROW EXECUTE FUNCTION policy_log_anchor_guard();

-- Entries may be deleted only at or before their group's anchor (pruning); the rest of the log
-- stays append-only.
DROP TRIGGER policy_decisions_no_delete ON policy_decisions;
CREATE FUNCTION policy_decisions_prune_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.n > COALESCE((SELECT n FROM policy_log_anchors WHERE group_name = OLD.group_name), 0) THEN
        RAISE EXCEPTION 'the policy decisions log is append-only';
    END IF;
    RETURN OLD;
END $$;
CREATE TRIGGER policy_decisions_no_delete BEFORE DELETE ON policy_decisions
    FOR EACH ROW EXECUTE FUNCTION policy_decisions_prune_only();
