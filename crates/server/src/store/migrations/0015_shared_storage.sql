-- Version 15: suspended sandboxes on shared storage (`moat serve --shared-dir`, docs/FLEET.md).
-- Where a sandbox's suspend files are: 'local' (its node's MOAT_HOME: only that node can
-- resume it) or 'shared' (the fleet's shared directory: any node with one can). Set by the
-- suspend that wrote them.
ALTER TABLE sandboxes ADD COLUMN files TEXT NOT NULL DEFAULT 'local'
    CHECK (files IN ('local', 'shared'));
-- Whether a node was started with --shared-dir (set at its start): a drain hands suspended
-- sandboxes only to nodes that can read their files.
ALTER TABLE nodes ADD COLUMN shared_storage INTEGER NOT NULL DEFAULT 0;
-- Where a snapshot's files are, as for sandboxes.
ALTER TABLE snapshots ADD COLUMN files TEXT NOT NULL DEFAULT 'local'
    CHECK (files IN ('local', 'shared'));
