-- Version 12: group secrets, sealed (store/seal.rs: ChaCha20-Poly1305 under MOAT_HOME's
-- secrets.key); the value is never stored in the clear. Rows go with their group.
CREATE TABLE group_secrets (
    group_name TEXT NOT NULL REFERENCES sandbox_groups (name) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    sealed     BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (group_name, name)
) STRICT;
