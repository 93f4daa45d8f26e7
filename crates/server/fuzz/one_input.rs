//! What one fuzz input must satisfy, shared by the libFuzzer target (`fuzz_targets/api_json.rs`,
//! run by scripts/fuzz-server.sh) and the bounded smoke run in `cargo test -p moat-server
//! --test fuzz_smoke`: the bytes as the body of every API request that has one, parsed as the
//! daemon's `ApiJson` extractor does and checked by the body's own validation. Each gives a
//! value or an error (a 400 to the client), never a panic.

use moat_server::api;

pub fn api_json(data: &[u8]) -> Result<(), String> {
    if let Ok(b) = serde_json::from_slice::<api::CreateSandbox>(data) {
        let _ = b.validate();
    }
    if let Ok(b) = serde_json::from_slice::<api::ExecRequest>(data) {
        let _ = b.validate();
    }
    if let Ok(b) = serde_json::from_slice::<api::GroupSpec>(data) {
        let _ = b.validate();
    }
    if let Ok(b) = serde_json::from_slice::<api::CreateApiKey>(data) {
        let _ = b.validate();
    }
    if let Ok(b) = serde_json::from_slice::<api::ImportImage>(data) {
        let _ = b.validate();
    }
    if let Ok(b) = serde_json::from_slice::<api::SetSecret>(data) {
        let _ = b.into_secret();
    }
    if let Ok(b) = serde_json::from_slice::<moat_policy::CheckRequest>(data) {
        let _ = b.validate();
    }
    if let Ok(p) = serde_json::from_slice::<moat_policy::Policy>(data) {
        // What parses must serialise back to what parses the same (the daemon stores it).
        let text = serde_json::to_vec(&p).map_err(|e| format!("{p:?}: {e}"))?;
        serde_json::from_slice::<moat_policy::Policy>(&text)
            .map_err(|e| format!("{p:?} does not parse back: {e}"))?;
    }
    let _ = serde_json::from_slice::<api::StartProcess>(data);
    let _ = serde_json::from_slice::<api::CreateSnapshot>(data);
    let _ = serde_json::from_slice::<api::ExposePort>(data);
    let _ = serde_json::from_slice::<api::TokenRequest>(data);
    let _ = serde_json::from_slice::<api::ReplayRequest>(data).map(|r| r.limit());
    let _ = serde_json::from_slice::<api::RollbackRequest>(data);
    Ok(())
}
