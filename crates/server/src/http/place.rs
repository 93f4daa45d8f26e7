//! Placement of a create (docs/FLEET.md, "Placement"): the node that receives it ranks the
//! nodes that may take it from the store ([`Store::placement`]) and tries them in order,
//! itself directly and the others by forwarding the request, until one creates the sandbox.
//! The chosen node checks its room again in the transaction that inserts the row, and with
//! its own host check (`capacity.rs`); a refusal (429 or 503) or an unreachable node (502)
//! moves on to the next. Nothing is reserved before that insert, so nothing leaks when a
//! node refuses or vanishes.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use super::forward::FORWARDED_BY;
use super::state::AppState;
use crate::api::{quote, CreateSandbox, Group, Node};
use crate::error::{Error, Result};
use crate::store::Placing;

/// Where to try a create, best first (`None` is this node), and the first one counted as
/// placing until the guard is dropped.
pub(super) async fn targets(
    state: &AppState,
    group: &Group,
    req: &CreateSandbox,
    me: &str,
) -> Result<(Vec<Option<Node>>, Placing)> {
    let spec = &group.spec;
    let tier = req.tier.unwrap_or(spec.tier);
    // Pool VMs run the group's image and tier; only such a create can take one.
    let pooled = spec.pool.size > 0
        && tier == spec.tier
        && req.image.as_deref().is_none_or(|i| i == spec.image);
    let (ranked, placing) = state
        .store
        .placement(&group.name, &spec.placement, tier, pooled, me)
        .await?;
    let targets = ranked
        .into_iter()
        .map(|c| (c.node.name != me).then_some(c.node))
        .collect();
    Ok((targets, placing))
}

/// Whether a node's answer to a create means "not here, try another": it had no room (429),
/// could not take sandboxes (503: draining, not ready, its lease or the store gone), or could
/// not be reached (502). Any other answer, a success or the caller's own mistake, is final.
pub(super) fn refusal(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE | StatusCode::BAD_GATEWAY
    )
}

/// Sends the create `req` (as received at `uri`, with the caller's `headers`) to `node`,
/// which creates it there without placing it again, and gives back its answer.
pub(super) async fn forward(
    state: &AppState,
    me: &str,
    node: &Node,
    group: &str,
    uri: &Uri,
    headers: &HeaderMap,
    req: &CreateSandbox,
) -> Response {
    let body = match serde_json::to_vec(req) {
        Ok(b) => b,
        Err(e) => return Error::Internal(format!("the create request: {e}")).into_response(),
    };
    let mut fwd = Request::new(Body::from(body));
    *fwd.method_mut() = Method::POST;
    *fwd.uri_mut() = uri.clone();
    *fwd.headers_mut() = headers.clone();
    // The body is the request as parsed here, of its own length.
    fwd.headers_mut().remove(header::CONTENT_LENGTH);
    fwd.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    fwd.headers_mut().remove(FORWARDED_BY);
    let what = format!("a create in group {} was placed on", quote(group));
    match state
        .forwarder
        .send(&state.store, node, me, &what, fwd)
        .await
    {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}
