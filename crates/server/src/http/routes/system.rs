//! `/healthz` and `/metrics` (the OpenAPI document itself is served by `http/mod.rs`, which
//! assembles it).

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use utoipa::OpenApi;

use crate::api::{Health, SandboxState, SandboxesHealth, SandboxesState};
use crate::error::Result;
use crate::http::state::AppState;
use crate::prepare::Step;

pub(in crate::http) fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
}

#[derive(OpenApi)]
#[openapi(
    paths(healthz, metrics),
    components(schemas(Health, SandboxesHealth, SandboxesState, Step))
)]
pub(in crate::http) struct Doc;

#[utoipa::path(get, path = "/healthz", tag = "system",
    responses((status = 200, description = "The daemon answers; `sandboxes` says whether \
        sandboxes can run yet", body = Health)))]
async fn healthz(State(state): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok".to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        sandboxes: state.sandboxes.health(),
        jail: state.sandboxes.ready().map(|m| m.jail()),
    })
}

#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, description = "Prometheus text exposition format", body = String,
        content_type = "text/plain; version=0.0.4")))]
async fn metrics(State(state): State<AppState>) -> Result<Response> {
    let counts = state.store.counts().await?;
    let (groups, keys, by_state) = (counts.groups, counts.api_keys, counts.sandboxes_by_state);
    let one = |v: i64| vec![(vec![], v as f64)];
    // Every state, zero included, so that a dashboard's series exist from the start.
    let states = SandboxState::ALL
        .iter()
        .map(|s| {
            let n = by_state
                .iter()
                .find(|(name, _)| name == s.as_str())
                .map_or(0, |(_, n)| *n);
            (vec![("state", s.as_str().to_string())], n as f64)
        })
        .collect();
    let mut gauges: Vec<crate::metrics::Gauge<'_>> = vec![
        (
            "moat_sandbox_groups",
            "Sandbox groups in the store.",
            one(groups),
        ),
        ("moat_api_keys", "API keys in the store.", one(keys)),
        ("moat_sandboxes", "Sandboxes by state.", states),
    ];
    if let Some(mgr) = state.sandboxes.ready() {
        let pools = mgr
            .pool_ready()
            .into_iter()
            .map(|(g, n)| (vec![("group", g)], n as f64))
            .collect();
        gauges.push((
            "moat_pool_ready",
            "Ready VMs in each group's warm pool.",
            pools,
        ));
        let u = mgr.usage();
        let pss = mgr.memory_pss().await;
        let available = crate::capacity::host_available_mib()?;
        let mib = |k: &str, v: f64| (vec![("kind", k.to_string())], v);
        gauges.push((
            "moat_memory_mib",
            "Memory of running, starting and pooled VMs: the sum of their tiers (used) and its \
             limit (limit, overcommitted), what they really hold (pss: shared template memory \
             counted once), the host's available memory (host_available) and the part of it \
             new VMs may not take (reserve).",
            vec![
                mib("used", u.memory_mib as f64),
                mib("limit", u.limits.memory_mib as f64),
                mib("pss", pss as f64 / (1024.0 * 1024.0)),
                mib("host_available", available as f64),
                mib("reserve", u.limits.reserve_mib as f64),
            ],
        ));
        gauges.push((
            "moat_vcpus",
            "vCPUs held by running, starting and pooled VMs (used; a parked VM holds none), and \
             the daemon's limit (host CPUs × the overcommit ratio).",
            vec![
                (
                    vec![("kind", "used".to_string())],
                    u.millicpus as f64 / 1000.0,
                ),
                (
                    vec![("kind", "limit".to_string())],
                    u.limits.millicpus as f64 / 1000.0,
                ),
            ],
        ));
        gauges.push((
            "moat_vms_parked",
            "Sandboxes and warm-pool VMs parked now: idle, vCPUs stopped, continued on the next \
             request.",
            vec![(vec![], u.parked as f64)],
        ));
    }
    let text = state.metrics.render(&gauges);
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
