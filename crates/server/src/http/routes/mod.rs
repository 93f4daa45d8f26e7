//! One module per API resource: its handlers, its route table (`router`) and its part of the
//! OpenAPI document (`Doc`); `http/mod.rs` merges them.

pub(super) mod audit;
pub(super) mod egress;
pub(super) mod exec;
pub(super) mod files;
pub(super) mod groups;
pub(super) mod identity;
pub(super) mod images;
pub(super) mod internal;
pub(super) mod keys;
pub(super) mod mcp;
pub(super) mod nodes;
pub(super) mod policy;
pub(super) mod ports;
pub(super) mod processes;
pub(super) mod sandboxes;
pub(super) mod secrets;
pub(super) mod shell;
pub(super) mod snapshots;
pub(super) mod system;
pub(super) mod ui;
