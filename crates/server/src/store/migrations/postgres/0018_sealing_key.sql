-- Version 18: rotating the sealing key (docs/FLEET.md, "Rotating the sealing key"). Each node
-- shows the id of its sealing key and of the next one (MOAT_HOME/secrets.key.next) it holds,
-- so that a rotation can check every node will be able to follow it. Ids only: a MAC of a
-- fixed label under the key, which reveals nothing of it.
ALTER TABLE nodes ADD COLUMN sealing_key_id TEXT;
ALTER TABLE nodes ADD COLUMN next_sealing_key_id TEXT;
