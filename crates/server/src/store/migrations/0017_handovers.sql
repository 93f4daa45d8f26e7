-- Version 17: live migration between nodes (docs/FLEET.md, "Live migration between nodes").
-- A hand-over in progress: the source node records it (fenced by its lease) before it sends
-- the sandbox; the destination moves the sandbox's row to itself only while this row is
-- there, in the transaction that deletes it; either side that gives up deletes it first, so
-- the hand-over and a fallback to the source can never both happen. `from_epoch` is the
-- source's lease epoch: a source that restarted (a new epoch) cannot be handed over from.
CREATE TABLE handovers (
    sandbox_id TEXT PRIMARY KEY,
    from_node  TEXT NOT NULL,
    from_epoch INTEGER NOT NULL,
    to_node    TEXT NOT NULL,
    created_ms INTEGER NOT NULL
) STRICT;

-- What a draining node reports of moving its sandboxes away (JSON, `drain` of the node in
-- the API); NULL when it is not draining.
ALTER TABLE nodes ADD COLUMN drain_progress TEXT;
