//! `moat-bench-identity`: how long the workload-identity issuer takes, printed as JSON: opening
//! a fresh issuer (it generates two RSA-2048 keys), and a whole mint as every delivery does it
//! (the sandbox and group read from the store, the checks, an RS256 signature, the audit row
//! written with `synchronous=FULL`), the median and the 99th percentile.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moat_server::api::{GroupSpec, IdentityDelivery, IdentitySpec, Sandbox, SandboxState, Tier};
use moat_server::identity::{Issuer, MintRequest};
use moat_server::store::{Location, Store};
use serde_json::json;

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let home = tempfile::tempdir()?;
    let store = Store::open(&Location::Sqlite(home.path().join("moatd.db")), home.path())?;
    let spec = GroupSpec {
        identity: IdentitySpec {
            enabled: true,
            audiences: vec!["sts.amazonaws.com".into()],
            ..Default::default()
        },
        ..Default::default()
    };
    store.put_group("bench", &spec).await?;
    store
        .insert_sandbox(&Sandbox {
            id: "sb-000000000001".into(),
            group: "bench".into(),
            state: SandboxState::Running,
            reason: None,
            image: "sha256:00".into(),
            tier: Tier::S,
            env: Default::default(),
            labels: [("team".to_string(), "bench".to_string())].into(),
            created_at: String::new(),
            updated_at: String::new(),
            last_activity_at: None,
            health: None,
            node: None,
        })
        .await?;
    let start = Instant::now();
    let issuer = Issuer::open(
        home.path(),
        "https://id.example.com".into(),
        store,
        Arc::default(),
    )?;
    let open = start.elapsed();
    let ask = MintRequest {
        group: "bench".into(),
        sandbox: "sb-000000000001".into(),
        audience: "sts.amazonaws.com".into(),
        ttl_s: None,
        delivery: IdentityDelivery::Api,
        key_id: None,
    };
    issuer.mint(ask.clone()).await?; // warm the store's caches
    let rounds = 200;
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        issuer.mint(ask.clone()).await?;
        samples.push(t.elapsed());
    }
    samples.sort();
    let out = json!({
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "issuer_first_open_ms": ms(open),
        "mint_rounds": rounds,
        "mint_median_ms": ms(samples[rounds / 2]),
        "mint_p99_ms": ms(samples[rounds * 99 / 100]),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
