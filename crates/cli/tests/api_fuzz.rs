//! The OpenAPI document drives a property-based API fuzzer (schemathesis, from PyPI, in a
//! virtualenv under the target directory) against a real `moat serve`, for a bounded time:
//! no 5xx but a documented 503; every status, content type and body as documented; no
//! request the document allows is refused with 400, and none it forbids is accepted.
//!
//! The daemon runs without a VM runtime (`--no-setup`): every operation is fuzzed, and the
//! sandbox operations answer their documented 503 once their input has been checked (input
//! is validated before the sandbox manager is asked), so a run costs no VM. A daemon with a
//! template would boot a VM for each generated create (seconds each under TCG: hours for a
//! run, and its timing would decide which cases meet a running sandbox, so no run would be
//! repeatable); the document's promise about input is the same either way, and what a VM
//! adds (exec, files, processes) is covered by the daemon_* tests.
//!
//! The suite runs a bounded smoke (12 examples per operation, one worker, seed 1: about two
//! minutes on two cores, the same cases every run); `scripts/api-fuzz.sh` runs the same
//! checks with many more examples.

mod common;

use std::process::Command;
use std::time::Duration;

use common::daemon::{Daemon, ADMIN, G};
use common::python::{self, run, text};

/// What is installed; pinned so that a run is reproducible. Hypothesis too: its newer
/// releases renamed an internal that hypothesis-jsonschema (under schemathesis) calls, and
/// every body generation then fails with "'many' object has no attribute 'more'".
pub const SCHEMATHESIS: &[&str] = &["schemathesis==4.3.18", "hypothesis==6.140.3"];

/// Examples per operation in the suite (`MOAT_API_FUZZ_EXAMPLES` overrides, as the script
/// does).
const EXAMPLES: u32 = 12;

/// The suite's bound on a whole run; the script's longer runs get an hour.
const SMOKE_LIMIT: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_is_as_strict_as_its_openapi_document() {
    let python = tokio::task::spawn_blocking(|| {
        let pins: Vec<String> = SCHEMATHESIS.iter().map(|s| s.to_string()).collect();
        python::venv("schemathesis-venv", &pins, &[])
    })
    .await
    .unwrap();
    let d = Daemon::start(Some(ADMIN)).await;
    // A group for the generated cases to find, besides the ones they make.
    d.put_group("g", serde_json::json!({}), 201).await;
    let examples = std::env::var("MOAT_API_FUZZ_EXAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(EXAMPLES);
    let limit = if examples > EXAMPLES {
        Duration::from_secs(3600)
    } else {
        SMOKE_LIMIT
    };
    let dir = tempfile::tempdir().unwrap();
    let mut c = Command::new(python.parent().unwrap().join("schemathesis"));
    c.current_dir(dir.path())
        .args(fuzz_args(&d.url(), examples))
        .env("SCHEMATHESIS_CONFIG", config(dir.path()));
    let o = run(c, "schemathesis", limit);
    let out = text(&o);
    assert!(o.status.success(), "schemathesis found failures:\n{out}");
    // It ran cases (a filter that matched nothing would pass vacuously): the summary says
    // "N generated, N passed, M skipped".
    let generated: u64 = out
        .lines()
        .find_map(|l| l.trim().split_once(" generated, "))
        .and_then(|(n, _)| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        generated >= 1000 && out.contains("No issues found"),
        "{out}"
    );
    eprintln!("schemathesis: {generated} cases, no issues");
    // The daemon is still there and its groups intact.
    let (st, _) = d.call(Some(ADMIN), "GET", &format!("{G}/g"), None).await;
    assert_eq!(st, 200);
}

/// The arguments of `schemathesis run` for the daemon at `url`, shared with
/// scripts/api-fuzz.sh (which passes its own `--max-examples`).
fn fuzz_args(url: &str, examples: u32) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "--config-file".into(),
        "schemathesis.toml".into(),
        "run".into(),
        format!("{url}/openapi.json"),
        "--checks".into(),
        "all".into(),
        // Statelessly generated ids and names rarely exist; the checks that need a resource
        // created first (use_after_free, ensure_resource_availability) need links the
        // document does not have.
        "--phases".into(),
        "examples,coverage,fuzzing".into(),
        "--header".into(),
        format!("Authorization: Bearer {ADMIN}"),
        "--max-examples".into(),
        examples.to_string(),
        // One worker: with two, which operation sees the groups another one made depends on
        // timing, and the same seed would not give the same run.
        "--workers".into(),
        "1".into(),
        "--seed".into(),
        std::env::var("MOAT_API_FUZZ_SEED").unwrap_or_else(|_| "1".into()),
        "--no-color".into(),
        "--generation-database".into(),
        "none".into(),
        "--request-timeout".into(),
        "30".into(),
        // The port proxy passes any method, path and body to the guest's server: the document
        // cannot describe a sandbox's own application. The shell and port-forward are
        // WebSocket and raw upgrades, and the MCP endpoint is JSON-RPC; none is REST.
        "--exclude-path-regex".into(),
        "/ports/\\{port\\}/|/shell$|/port-forward/".into(),
    ];
    a.push("--suppress-health-check".into());
    a.push("too_slow,filter_too_much".into());
    a
}

/// The checks' settings. A request the document allows may still meet a state it cannot
/// change (409: the group has sandboxes; 503: this daemon has no VM runtime), a missing
/// resource (404), or a rule the document cannot state (422: one field excludes another, an
/// egress rule that can never match, a policy that does not compile; each operation
/// documents its 422 and the message names the rule). One the document forbids is refused
/// with 400, 401, 404 or 413, never 422: the schema is checked first.
///
/// 503 is the one 5xx taken as an answer, because this daemon has no VM runtime on purpose
/// (see the top of this file): "run `moat setup`" is the documented answer of every
/// operation that needs one, and `status_code_conformance` fails any operation that gives a
/// 503 it does not document. Any other 5xx fails the run.
fn config(dir: &std::path::Path) -> String {
    let path = dir.join("schemathesis.toml");
    std::fs::write(
        &path,
        r#"
[checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx", "503"]

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "401", "403", "404", "409", "422", "429", "503"]

[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "413"]
"#,
    )
    .unwrap();
    path.display().to_string()
}
