//! `/healthz`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// Always "ok" when the daemon answers.
    pub status: String,
    pub version: String,
}
