//! The MCP tools and resources: what an agent sees. Each tool is one or a few REST calls on
//! the session's API key; a failure comes back as a tool result with `isError: true` and the
//! daemon's message (what was wrong, what is allowed), which the model can act on.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    InitializeRequestParams, ListResourceTemplatesResult, ListResourcesResult,
    PaginatedRequestParams, ProtocolVersion, ReadResourceRequestParams, ReadResourceResponse,
    ReadResourceResult, Resource, ResourceContents, ResourceTemplate, ServerCapabilities,
    ServerConfig,
};
use rmcp::schemars::{self, JsonSchema};
use rmcp::service::RequestContext;
use rmcp::{tool, tool_router, ErrorData, RoleServer, ServerHandler};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::daemon::encode;
use crate::error::{Error, Result};
use crate::session::{check_name, Session, Target};

/// The working directory of `run_code`, whose new and changed files it reports.
pub const WORKSPACE: &str = "/workspace";
/// File contents returned by `read_file` and resource reads, at most.
pub const MAX_READ: usize = 1024 * 1024;
/// Output of a command returned to the model, per stream, at most (its start and its end).
const MAX_OUTPUT_CHARS: usize = 50_000;

const INSTRUCTIONS: &str = "moat runs code in hardware-isolated microVM sandboxes. Each MCP \
session has its own sandbox: create it with create_sandbox (or it is created on first use when \
the server has a default group); tools act on it unless you pass `sandbox` (an id) and `group`. \
run_code runs Python or shell in /workspace and reports new files; exec runs any command; \
read_file/write_file/list_files move files; start_process runs a server in the background \
(read its output with process_logs); snapshot_sandbox and fork_sandbox save a state and start \
copies of it; suspend_sandbox stops the VM keeping its state (the next call resumes it); \
expose_port makes a server in the sandbox reachable over HTTP; egress_log shows the network \
connections the sandbox tried and why each was allowed or denied; check_policy asks the \
group's policy whether code would be allowed, and policy_decisions shows its log. \
Sandboxes this session created are deleted when it ends unless created with keep: true. \
There is no network access unless the group's egress rules allow it.";

/// Which sandbox a tool acts on; both optional.
#[derive(Debug, Default, Deserialize, JsonSchema)]
pub struct Where {
    /// Sandbox id (`sb-…`). Default: this session's sandbox.
    #[serde(default)]
    pub sandbox: Option<String>,
    /// Group of the sandbox. Needed only for a sandbox this session did not create.
    #[serde(default)]
    pub group: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct CreateArgs {
    /// The sandbox group (its image, tier, egress rules and lifecycle apply). Default: the
    /// server's default group.
    #[serde(default)]
    pub group: Option<String>,
    /// Image name or digest; default the group's.
    #[serde(default)]
    pub image: Option<String>,
    /// Size: xs, s, m, l or xl; default the group's.
    #[serde(default)]
    pub tier: Option<String>,
    /// Environment variables given to every command in the sandbox.
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    /// Labels (Kubernetes-style keys and values).
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    /// Keep the sandbox when this MCP session ends (default false: it is deleted).
    #[serde(default)]
    pub keep: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Python,
    Shell,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct RunCodeArgs {
    /// `python` (python3) or `shell` (/bin/sh).
    pub language: Language,
    /// The program text.
    pub code: String,
    /// Seconds before the whole process tree is killed (default 120, at most 3600).
    #[serde(default)]
    pub timeout_s: Option<f64>,
    #[serde(flatten)]
    pub at: Where,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ExecArgs {
    /// A shell command line, run as /bin/sh -c COMMAND. Give this or `argv`.
    #[serde(default)]
    pub command: Option<String>,
    /// The program and its arguments, run without a shell. Give this or `command`.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// Working directory (absolute); default the image's.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    /// Text given to the command as standard input.
    #[serde(default)]
    pub stdin: Option<String>,
    /// User name or uid; default the image's user.
    #[serde(default)]
    pub user: Option<String>,
    /// Seconds before the whole process tree is killed (default 120, at most 3600).
    #[serde(default)]
    pub timeout_s: Option<f64>,
    #[serde(flatten)]
    pub at: Where,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct PathArgs {
    /// An absolute path in the sandbox.
    pub path: String,
    #[serde(flatten)]
    pub at: Where,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Utf8,
    Base64,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct WriteArgs {
    /// An absolute path in the sandbox; missing directories are created.
    pub path: String,
    /// The file's content.
    pub content: String,
    /// How `content` is encoded: `utf8` (default) or `base64` for binary data.
    #[serde(default)]
    pub encoding: Option<Encoding>,
    /// Octal permission bits, e.g. "0755"; default 0644 (or those of the file replaced).
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(flatten)]
    pub at: Where,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct StartProcessArgs {
    /// A shell command line. Give this or `argv`.
    #[serde(default)]
    pub command: Option<String>,
    /// The program and its arguments. Give this or `command`.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// Working directory (absolute); default the image's.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    pub at: Where,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ProcessArgs {
    /// The process id that start_process returned (`p1`, `p2`, …).
    pub process_id: String,
    #[serde(flatten)]
    pub at: Where,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct SnapshotArgs {
    /// A name for the snapshot, unique in the group: lowercase letters, digits and '-'.
    pub name: String,
    #[serde(flatten)]
    pub at: Where,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ForkArgs {
    /// The snapshot to start from (taken with snapshot_sandbox).
    pub snapshot: String,
    /// How many sandboxes to start (1-16, default 1).
    #[serde(default)]
    pub count: Option<u32>,
    /// The snapshot's group; default that of this session's sandbox.
    #[serde(default)]
    pub group: Option<String>,
    /// Keep the new sandboxes when this MCP session ends (default false).
    #[serde(default)]
    pub keep: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct EgressArgs {
    /// `allow` or `deny`: only those events. Default: both.
    #[serde(default)]
    pub verdict: Option<String>,
    /// How many of the newest events, 1-1000 (default 50).
    #[serde(default)]
    pub limit: Option<u32>,
    #[serde(flatten)]
    pub at: Where,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct CheckArgs {
    /// With `code`: `python` or `shell`. Give `code`, `command` or `argv`.
    #[serde(default)]
    pub language: Option<Language>,
    /// A program, checked as the language says.
    #[serde(default)]
    pub code: Option<String>,
    /// A shell command line, as exec would run it.
    #[serde(default)]
    pub command: Option<String>,
    /// A program and its arguments, as exec would run them.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// The group whose policy decides; default that of this session's sandbox.
    #[serde(default)]
    pub group: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct DecisionsArgs {
    /// `allow`, `deny` or `audit`: only those decisions. Default: all.
    #[serde(default)]
    pub verdict: Option<String>,
    /// How many of the newest decisions (default 20).
    #[serde(default)]
    pub limit: Option<u32>,
    /// The group; default that of this session's sandbox.
    #[serde(default)]
    pub group: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct PortArgs {
    /// The TCP port a server in the sandbox listens on (1-65535).
    pub port: u16,
    #[serde(flatten)]
    pub at: Where,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
pub struct TargetArgs {
    #[serde(flatten)]
    pub at: Where,
}

/// The MCP server of one session.
#[derive(Clone)]
pub struct MoatMcp {
    session: Arc<Session>,
    tool_router: ToolRouter<MoatMcp>,
    cells: Arc<AtomicU64>,
}

/// A tool's answer: structured JSON, also given as its text.
fn ok(v: Value) -> CallToolResult {
    CallToolResult::structured(v)
}

/// A failure the model should see: the message, as a tool error.
fn failed(e: Error) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(e.to_string())])
}

fn answer(r: Result<Value>) -> Result<CallToolResult, ErrorData> {
    Ok(r.map_or_else(failed, ok))
}

/// Keeps the start and the end of a long output, saying how much was cut.
fn clip(s: &str) -> String {
    let n = s.chars().count();
    if n <= MAX_OUTPUT_CHARS {
        return s.to_string();
    }
    let head: String = s.chars().take(MAX_OUTPUT_CHARS * 2 / 5).collect();
    let tail: String = s.chars().skip(n - MAX_OUTPUT_CHARS * 3 / 5).collect();
    format!(
        "{head}\n… [{} characters cut] …\n{tail}",
        n - MAX_OUTPUT_CHARS
    )
}

fn exec_result(v: &Value) -> Value {
    json!({
        "exit_code": v["exit_code"],
        "signal": v["signal"],
        "timed_out": v["timed_out"],
        "stdout": clip(v["stdout"].as_str().unwrap_or_default()),
        "stderr": clip(v["stderr"].as_str().unwrap_or_default()),
    })
}

fn timeout(t: Option<f64>) -> Result<f64> {
    let t = t.unwrap_or(120.0);
    if t > 0.0 && t <= 3600.0 {
        Ok(t)
    } else {
        Err(Error::BadArgument(format!(
            "timeout_s {t} is out of range: more than 0, at most 3600"
        )))
    }
}

fn command_body(
    command: Option<String>,
    argv: Option<Vec<String>>,
    cwd: Option<String>,
    env: Option<BTreeMap<String, String>>,
) -> Result<Map<String, Value>> {
    let mut body = Map::new();
    match (command, argv) {
        (Some(c), None) => body.insert("command".into(), json!(c)),
        (None, Some(a)) => body.insert("argv".into(), json!(a)),
        _ => {
            return Err(Error::BadArgument(
                "give exactly one of `command` (a shell command line) and `argv` (a list)".into(),
            ))
        }
    };
    if let Some(c) = cwd {
        body.insert("cwd".into(), json!(c));
    }
    if let Some(e) = env {
        body.insert("env".into(), json!(e));
    }
    Ok(body)
}

/// `?k=v&…` of the values given, percent-encoded.
fn query(pairs: &[(&str, Option<String>)]) -> String {
    let q: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
    if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    }
}

/// Files under the workspace as `path → (mtime, size)`, from GNU find; None if it is missing.
async fn workspace_files(
    d: &crate::daemon::Daemon,
    t: &Target,
) -> Result<Option<BTreeMap<String, String>>> {
    let r = d
        .post(
            &format!("{}/exec", t.path()),
            &json!({"command": format!(
                "mkdir -p {WORKSPACE} && find {WORKSPACE} -xdev -type f -printf '%T@ %s %p\\n' | head -n 20000"
            ), "timeout_s": 60}),
        )
        .await?;
    if r["exit_code"] != 0 {
        return Ok(None);
    }
    let mut files = BTreeMap::new();
    for line in r["stdout"].as_str().unwrap_or_default().lines() {
        let mut parts = line.splitn(3, ' ');
        if let (Some(mtime), Some(size), Some(path)) = (parts.next(), parts.next(), parts.next()) {
            files.insert(path.to_string(), format!("{mtime} {size}"));
        }
    }
    Ok(Some(files))
}

#[tool_router]
impl MoatMcp {
    pub fn new(session: Arc<Session>) -> MoatMcp {
        MoatMcp {
            session,
            tool_router: Self::tool_router(),
            cells: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    /// The group named, else the session's.
    fn group_for(&self, group: Option<String>) -> Result<String> {
        let g = group.or_else(|| self.session.group()).ok_or_else(|| {
            Error::BadArgument(
                "this session has no group yet: pass `group` (or create_sandbox first)".into(),
            )
        })?;
        check_name("group", &g)?;
        Ok(g)
    }

    #[tool(
        description = "Create a sandbox (a microVM) in a group and make it this session's \
        current sandbox. It is deleted when the MCP session ends unless `keep` is true. Returns \
        the sandbox: id, group, state, image, tier."
    )]
    async fn create_sandbox(
        &self,
        Parameters(a): Parameters<CreateArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        answer(
            async {
                let group = a
                    .group
                    .or_else(|| self.session.default_group())
                    .ok_or_else(|| {
                        Error::BadArgument(
                            "no group given and the server has no default group: pass `group`"
                                .into(),
                        )
                    })?;
                let mut body = Map::new();
                for (k, v) in [("image", a.image), ("tier", a.tier)] {
                    if let Some(v) = v {
                        body.insert(k.into(), json!(v));
                    }
                }
                if let Some(e) = a.env {
                    body.insert("env".into(), json!(e));
                }
                if let Some(l) = a.labels {
                    body.insert("labels".into(), json!(l));
                }
                self.session
                    .create(&group, Value::Object(body), a.keep)
                    .await
            }
            .await,
        )
    }

    #[tool(
        description = "List the sandboxes this MCP session created, with their state \
        (running, suspended, …) and whether they are kept after the session."
    )]
    async fn list_sandboxes(&self) -> Result<CallToolResult, ErrorData> {
        answer(
            async {
                let d = self.session.daemon()?;
                let mut out = Vec::new();
                for o in self.session.owned() {
                    let t = Target {
                        group: o.group.clone(),
                        id: o.id.clone(),
                    };
                    let state = match d.get(&t.path()).await {
                        Ok(sb) => sb["state"].clone(),
                        Err(Error::Api { status: 404, .. }) => json!("deleted"),
                        Err(e) => return Err(e),
                    };
                    out.push(json!({"id": o.id, "group": o.group, "state": state, "keep": o.keep}));
                }
                Ok(json!({"sandboxes": out}))
            }
            .await,
        )
    }

    #[tool(
        description = "Run a Python or shell program in the sandbox, in /workspace. Returns \
        exit_code, stdout, stderr, timed_out and files_produced: the files under /workspace \
        that the program created or changed (path and size; read them with read_file)."
    )]
    async fn run_code(
        &self,
        Parameters(a): Parameters<RunCodeArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        answer(
            async {
                let t_s = timeout(a.timeout_s)?;
                let t = self
                    .session
                    .target(a.at.group.as_deref(), a.at.sandbox.as_deref())
                    .await?;
                let d = self.session.daemon()?;
                let before = workspace_files(&d, &t).await?;
                let body = match a.language {
                    Language::Shell => {
                        json!({"command": a.code, "cwd": WORKSPACE, "timeout_s": t_s})
                    }
                    Language::Python => {
                        let n = self.cells.fetch_add(1, Ordering::Relaxed) + 1;
                        let file = format!("/tmp/moat-mcp/cell-{n}.py");
                        d.write_file(&t.path(), &file, Bytes::from(a.code), None)
                            .await?;
                        json!({"argv": ["python3", file], "cwd": WORKSPACE, "timeout_s": t_s})
                    }
                };
                let r = d.post(&format!("{}/exec", t.path()), &body).await?;
                let after = workspace_files(&d, &t).await?;
                let mut out = exec_result(&r);
                out["files_produced"] = match (before, after) {
                    (Some(b), Some(a)) => Value::Array(
                        a.iter()
                            .filter(|(p, stamp)| b.get(*p) != Some(stamp))
                            .map(|(p, stamp)| {
                                let size = stamp.split(' ').nth(1).unwrap_or("0");
                                json!({"path": p, "size": size.parse::<u64>().unwrap_or(0)})
                            })
                            .collect(),
                    ),
                    _ => Value::Null,
                };
                out["sandbox"] = json!(t.id);
                Ok(out)
            }
            .await,
        )
    }

    #[tool(
        description = "Run a command in the sandbox and wait for it: `command` (a shell \
        command line) or `argv`. Returns exit_code (124 after the timeout, 127 when the command \
        does not exist), signal, timed_out, stdout and stderr."
    )]
    async fn exec(&self, Parameters(a): Parameters<ExecArgs>) -> Result<CallToolResult, ErrorData> {
        answer(
            async {
                let mut body = command_body(a.command, a.argv, a.cwd, a.env)?;
                body.insert("timeout_s".into(), json!(timeout(a.timeout_s)?));
                if let Some(s) = a.stdin {
                    body.insert("stdin".into(), json!(s));
                }
                if let Some(u) = a.user {
                    body.insert("user".into(), json!(u));
                }
                let t = self
                    .session
                    .target(a.at.group.as_deref(), a.at.sandbox.as_deref())
                    .await?;
                let r = self
                    .session
                    .daemon()?
                    .post(&format!("{}/exec", t.path()), &Value::Object(body))
                    .await?;
                Ok(exec_result(&r))
            }
            .await,
        )
    }

    #[tool(
        description = "Read a file from the sandbox (at most 1 MiB). Text comes back as it is \
        (encoding utf8); other bytes as base64 (encoding base64)."
    )]
    async fn read_file(
        &self,
        Parameters(a): Parameters<PathArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let r = async {
            let t = self
                .session
                .target(a.at.group.as_deref(), a.at.sandbox.as_deref())
                .await?;
            let bytes = self
                .session
                .daemon()?
                .read_file(&t.path(), &a.path, MAX_READ)
                .await
                .map_err(|e| match e {
                    Error::TooLarge(n) => Error::BadArgument(format!(
                        "{} is larger than {n} bytes: read a part with exec (head, tail, dd)",
                        a.path
                    )),
                    e => e,
                })?;
            Ok(file_json(&a.path, &bytes))
        }
        .await;
        Ok(match r {
            Ok(v) => {
                let mut res = ok(v.clone());
                if v["encoding"] == "utf8" {
                    // The model reads the text itself, not the text inside JSON.
                    res.content = vec![ContentBlock::text(
                        v["content"].as_str().unwrap_or_default(),
                    )];
                }
                res
            }
            Err(e) => failed(e),
        })
    }

    #[tool(
        description = "Write a file in the sandbox (replacing it atomically; missing \
        directories are created). `content` is text, or base64 with encoding: base64."
    )]
    async fn write_file(
        &self,
        Parameters(a): Parameters<WriteArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        answer(
            async {
                let data = match a.encoding {
                    None | Some(Encoding::Utf8) => Bytes::from(a.content),
                    Some(Encoding::Base64) => base64::engine::general_purpose::STANDARD
                        .decode(a.content.trim())
                        .map(Bytes::from)
                        .map_err(|e| Error::BadArgument(format!("content is not base64: {e}")))?,
                };
                let t = self
                    .session
                    .target(a.at.group.as_deref(), a.at.sandbox.as_deref())
                    .await?;
                self.session
                    .daemon()?
                    .write_file(&t.path(), &a.path, data, a.mode.as_deref())
                    .await
            }
            .await,
        )
    }

    #[tool(
        description = "List a directory in the sandbox: name, kind (file, dir, symlink, other), \
        size, mode and mtime of each entry."
    )]
    async fn list_files(
        &self,
        Parameters(a): Parameters<PathArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        answer(
            async {
                let t = self
                    .session
                    .target(a.at.group.as_deref(), a.at.sandbox.as_deref())
                    .await?;
                self.session
                    .daemon()?
                    .get(&format!("{}/files/list?path={}", t.path(), encode(&a.path)))
                    .await
            }
            .await,
        )
    }

    #[tool(
        description = "Start a background process (a server, a long job) in the sandbox and \
        return at once with its id; read its output with process_logs."
    )]
    async fn start_process(
        &self,
        Parameters(a): Parameters<StartProcessArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        answer(
            async {
                let body = command_body(a.command, a.argv, a.cwd, a.env)?;
                let t = self
                    .session
                    .target(a.at.group.as_deref(), a.at.sandbox.as_deref())
                    .await?;
                self.session
                    .daemon()?
                    .post(&format!("{}/processes", t.path()), &Value::Object(body))
                    .await
            }
            .await,
        )
    }

    #[tool(
        description = "Read a background process's output (the newest 1 MiB of stdout and \
        stderr) and whether it still runs (running, and exit once it ended)."
    )]
    async fn process_logs(
        &self,
        Parameters(a): Parameters<ProcessArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        answer(
            async {
                check_name("process id", &a.process_id)?;
                let t = self
                    .session
                    .target(a.at.group.as_deref(), a.at.sandbox.as_deref())
                    .await?;
                let d = self.session.daemon()?;
                let base = format!("{}/processes", t.path());
                let logs = d.get(&format!("{base}/{}/logs", a.process_id)).await?;
                let list = d.get(&base).await?;
                let info = list["processes"]
                    .as_array()
                    .and_then(|ps| ps.iter().find(|p| p["id"] == a.process_id.as_str()))
                    .cloned()
                    .unwrap_or(Value::Null);
                Ok(json!({
                    "id": a.process_id,
                    "running": info["running"],
                    "exit": info["exit"],
                    "stdout": clip(logs["stdout"].as_str().unwrap_or_default()),
                    "stderr": clip(logs["stderr"].as_str().unwrap_or_default()),
                }))
            }
            .await,
        )
    }

    #[tool(
        description = "Take a named snapshot of the sandbox (memory, processes and files); \
        start copies of it with fork_sandbox. The sandbox runs on."
    )]
    async fn snapshot_sandbox(
        &self,
        Parameters(a): Parameters<SnapshotArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        answer(
            async {
                let t = self
                    .session
                    .target(a.at.group.as_deref(), a.at.sandbox.as_deref())
                    .await?;
                self.session
                    .daemon()?
                    .post(&format!("{}/snapshots", t.path()), &json!({"name": a.name}))
                    .await
            }
            .await,
        )
    }

    #[tool(
        description = "Start `count` new sandboxes from a snapshot, each with the snapshot's \
        processes, memory and files (and fresh randomness and clock). The last one becomes \
        this session's current sandbox; all are deleted when the session ends unless `keep`."
    )]
    async fn fork_sandbox(
        &self,
        Parameters(a): Parameters<ForkArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        answer(
            async {
                let group = match a.group {
                    Some(g) => g,
                    None => self.session.target(None, None).await?.group,
                };
                check_name("group", &group)?;
                let count = a.count.unwrap_or(1);
                let r = self
                    .session
                    .daemon()?
                    .post(
                        &format!("/v1/sandbox-groups/{group}/sandboxes"),
                        &json!({"from_snapshot": a.snapshot, "count": count,
                                "labels": {"created-by": "moat-mcp"}}),
                    )
                    .await?;
                for sb in r["sandboxes"].as_array().into_iter().flatten() {
                    self.session
                        .adopt(&group, sb["id"].as_str().unwrap_or_default(), a.keep);
                }
                Ok(r)
            }
            .await,
        )
    }

    #[tool(
        description = "Suspend the sandbox: its memory and disk are saved and the VM stops \
        (no CPU or memory used). Any later call on it resumes it where it was."
    )]
    async fn suspend_sandbox(
        &self,
        Parameters(a): Parameters<TargetArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        answer(
            async {
                let t = self
                    .session
                    .target(a.at.group.as_deref(), a.at.sandbox.as_deref())
                    .await?;
                self.session
                    .daemon()?
                    .post(&format!("{}/suspend", t.path()), &json!({}))
                    .await
            }
            .await,
        )
    }

    #[tool(
        description = "The sandbox's network log, newest last: every DNS answer and \
        connection its network stack decided (name, address, port, verdict allow/deny, the \
        reason, bytes). Use it to see why a download or an API call failed: egress is denied \
        unless the group's rules allow the host."
    )]
    async fn egress_log(
        &self,
        Parameters(a): Parameters<EgressArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        answer(
            async {
                let t = self
                    .session
                    .target(a.at.group.as_deref(), a.at.sandbox.as_deref())
                    .await?;
                let q = query(&[
                    ("verdict", a.verdict),
                    ("limit", Some(a.limit.unwrap_or(50).to_string())),
                ]);
                self.session
                    .daemon()?
                    .get(&format!("{}/egress{q}", t.path()))
                    .await
            }
            .await,
        )
    }

    #[tool(
        description = "Ask the group's policy, without running anything, whether a program \
        or command would be allowed: `allowed`, the `mode` (enforce, audit, off) and the \
        `findings` (rule, message, line) that would refuse it. Give `language` and `code`, \
        or `command`, or `argv`."
    )]
    async fn check_policy(
        &self,
        Parameters(a): Parameters<CheckArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        answer(
            async {
                let group = self.group_for(a.group)?;
                let body = match (a.language, a.code, a.command, a.argv) {
                    (Some(Language::Python), Some(c), None, None) => json!({"python": c}),
                    (Some(Language::Shell), Some(c), None, None) => json!({"shell": c}),
                    (None, None, Some(c), None) => json!({"command": c}),
                    (None, None, None, Some(a)) => json!({"argv": a}),
                    _ => {
                        return Err(Error::BadArgument(
                            "give exactly one of `code` (with `language`: python or shell), \
                             `command` (a shell command line) and `argv` (a list)"
                                .into(),
                        ))
                    }
                };
                self.session
                    .daemon()?
                    .post(&format!("/v1/sandbox-groups/{group}/policy/check"), &body)
                    .await
            }
            .await,
        )
    }

    #[tool(
        description = "The group's policy decisions log, newest last: each exec, process and \
        shell the daemon checked, with its verdict and findings. Needs an owner or admin key."
    )]
    async fn policy_decisions(
        &self,
        Parameters(a): Parameters<DecisionsArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        answer(
            async {
                let group = self.group_for(a.group)?;
                let q = query(&[
                    ("verdict", a.verdict),
                    ("limit", Some(a.limit.unwrap_or(20).to_string())),
                ]);
                self.session
                    .daemon()?
                    .get(&format!("/v1/sandbox-groups/{group}/policy/decisions{q}"))
                    .await
            }
            .await,
        )
    }

    #[tool(
        description = "Make a port of the sandbox reachable over HTTP (and WebSocket) through \
        the daemon: requests to `url` (a path on the daemon's address, with the same API key) \
        go to that port in the sandbox. Start the server first (start_process)."
    )]
    async fn expose_port(
        &self,
        Parameters(a): Parameters<PortArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        answer(
            async {
                let t = self
                    .session
                    .target(a.at.group.as_deref(), a.at.sandbox.as_deref())
                    .await?;
                self.session
                    .daemon()?
                    .post(&format!("{}/ports", t.path()), &json!({"port": a.port}))
                    .await
            }
            .await,
        )
    }

    #[tool(description = "Delete the sandbox now: its VM and everything in it are gone.")]
    async fn delete_sandbox(
        &self,
        Parameters(a): Parameters<TargetArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        answer(
            async {
                let t = self
                    .session
                    .target(a.at.group.as_deref(), a.at.sandbox.as_deref())
                    .await?;
                self.session.daemon()?.delete(&t.path()).await?;
                self.session.forget(&t);
                Ok(json!({"deleted": t.id, "group": t.group}))
            }
            .await,
        )
    }
}

/// A file's bytes as the tools and resources give them: text when it is UTF-8, else base64.
fn file_json(path: &str, bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => json!({"path": path, "size": bytes.len(), "encoding": "utf8", "content": text}),
        Err(_) => json!({"path": path, "size": bytes.len(), "encoding": "base64",
            "content": base64::engine::general_purpose::STANDARD.encode(bytes)}),
    }
}

/// `moat://sandbox/{group}/{id}` and `moat://sandbox/{group}/{id}/files/{path}`.
const SCHEME: &str = "moat://sandbox/";

enum ResourceUri {
    State(Target),
    File(Target, String),
}

fn parse_uri(uri: &str) -> Result<ResourceUri> {
    let bad = || {
        Error::BadArgument(format!(
            "unknown resource {uri:?}: moat://sandbox/GROUP/ID or moat://sandbox/GROUP/ID/files/PATH"
        ))
    };
    let rest = uri.strip_prefix(SCHEME).ok_or_else(bad)?;
    let mut parts = rest.splitn(3, '/');
    let (group, id) = (parts.next().ok_or_else(bad)?, parts.next().ok_or_else(bad)?);
    check_name("group", group)?;
    check_name("sandbox id", id)?;
    let t = Target {
        group: group.into(),
        id: id.into(),
    };
    match parts.next() {
        None | Some("") => Ok(ResourceUri::State(t)),
        Some(p) => {
            let path = p.strip_prefix("files").ok_or_else(bad)?;
            let path = if path.is_empty() { "/" } else { path };
            if !path.starts_with('/') {
                return Err(bad());
            }
            Ok(ResourceUri::File(t, path.to_string()))
        }
    }
}

impl MoatMcp {
    fn authorize(&self, ctx: &RequestContext<RoleServer>) -> Result<(), ErrorData> {
        self.session
            .authorize(ctx.extensions.get::<http::request::Parts>())
            .map_err(|e| ErrorData::invalid_request(e.to_string(), None))
    }

    async fn read(&self, uri: &str) -> Result<ResourceContents> {
        let d = self.session.daemon()?;
        match parse_uri(uri)? {
            ResourceUri::State(t) => {
                let sb = d.get(&t.path()).await?;
                Ok(ResourceContents::text(
                    serde_json::to_string_pretty(&sb).unwrap_or_default(),
                    uri,
                )
                .with_mime_type("application/json"))
            }
            ResourceUri::File(t, path) => {
                match d.read_file(&t.path(), &path, MAX_READ).await {
                    Ok(bytes) => Ok(match std::str::from_utf8(&bytes) {
                        Ok(text) => ResourceContents::text(text, uri).with_mime_type("text/plain"),
                        Err(_) => ResourceContents::blob(
                            base64::engine::general_purpose::STANDARD.encode(&bytes),
                            uri,
                        )
                        .with_mime_type("application/octet-stream"),
                    }),
                    // A directory is read as its listing.
                    Err(Error::Api {
                        status: 400,
                        message,
                        ..
                    }) if message.contains("is a directory") => {
                        let list = d
                            .get(&format!("{}/files/list?path={}", t.path(), encode(&path)))
                            .await?;
                        Ok(ResourceContents::text(
                            serde_json::to_string_pretty(&list).unwrap_or_default(),
                            uri,
                        )
                        .with_mime_type("application/json"))
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }
}

impl ServerHandler for MoatMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_resources()
                .build(),
        )
        .with_server_info(Implementation::new("moat", env!("CARGO_PKG_VERSION")))
        .with_instructions(INSTRUCTIONS)
    }

    /// Versions with sessions only: a sandbox belongs to a session, and 2026-07-28 removed
    /// sessions from the protocol (clients then fall back to the `initialize` handshake).
    fn supported_protocol_versions(&self) -> Cow<'static, [ProtocolVersion]> {
        Cow::Owned(vec![
            ProtocolVersion::V_2025_11_25,
            ProtocolVersion::V_2025_06_18,
            ProtocolVersion::V_2025_03_26,
            ProtocolVersion::V_2024_11_05,
        ])
    }

    /// The request that opens a session fixes its API key (and default group).
    async fn initialize(
        &self,
        request: InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ServerConfig, ErrorData> {
        self.authorize(&context)?;
        context.peer.set_peer_info(request.clone());
        self.negotiate_initialize(&request)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        self.authorize(&context)?;
        let tcc = ToolCallContext::new(self, request, context);
        self.tool_router.call(tcc).await
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::ListToolsResult, ErrorData> {
        Ok(rmcp::model::ListToolsResult::with_all_items(
            self.tool_router.list_all(),
        ))
    }

    fn get_tool(&self, name: &str) -> Option<rmcp::model::Tool> {
        self.tool_router.get(name).cloned()
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        self.authorize(&context)?;
        let resources = self
            .session
            .owned()
            .into_iter()
            .map(|o| {
                Resource::new(
                    format!("{SCHEME}{}/{}", o.group, o.id),
                    format!("sandbox {}", o.id),
                )
                .with_description(format!(
                    "State of sandbox {} in group {} (JSON)",
                    o.id, o.group
                ))
                .with_mime_type("application/json")
            })
            .collect();
        Ok(ListResourcesResult::with_all_items(resources))
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        self.authorize(&context)?;
        let templates = vec![
            ResourceTemplate::new(format!("{SCHEME}{{group}}/{{id}}"), "sandbox state")
                .with_description("A sandbox: id, group, state, image, tier, labels (JSON)")
                .with_mime_type("application/json"),
            ResourceTemplate::new(
                format!("{SCHEME}{{group}}/{{id}}/files{{+path}}"),
                "sandbox file",
            )
            .with_description(
                "A file in a sandbox (text, or base64 for binary; at most 1 MiB), or a \
                 directory's listing (JSON); path is absolute, e.g. …/files/root/out.txt",
            ),
        ];
        Ok(ListResourceTemplatesResult::with_all_items(templates))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        self.authorize(&context)?;
        match self.read(&request.uri).await {
            Ok(c) => Ok(ReadResourceResult::new(vec![c]).into()),
            Err(Error::Api {
                status: 404,
                message,
                ..
            }) => Err(ErrorData::resource_not_found(message, None)),
            Err(e) => Err(ErrorData::invalid_params(e.to_string(), None)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_uris_parse_and_refuse_what_could_change_a_path() {
        match parse_uri("moat://sandbox/web/sb-0123456789ab").unwrap() {
            ResourceUri::State(t) => {
                assert_eq!(t.path(), "/v1/sandbox-groups/web/sandboxes/sb-0123456789ab")
            }
            _ => panic!("not a state"),
        }
        match parse_uri("moat://sandbox/web/sb-1/files/root/a b.txt").unwrap() {
            ResourceUri::File(_, p) => assert_eq!(p, "/root/a b.txt"),
            _ => panic!("not a file"),
        }
        for bad in [
            "moat://sandbox/web",
            "moat://sandbox/../x/files/etc",
            "moat://sandbox/web/sb-1/other",
            "file:///etc/passwd",
        ] {
            assert!(parse_uri(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn long_output_keeps_its_start_and_end() {
        let s = format!("START{}END", "x".repeat(200_000));
        let c = clip(&s);
        assert!(c.starts_with("START") && c.ends_with("END"), "{}", &c[..20]);
        assert!(c.contains("characters cut"));
        assert!(c.chars().count() < MAX_OUTPUT_CHARS + 100);
        assert_eq!(clip("short"), "short");
    }

    #[test]
    fn exactly_one_of_command_and_argv() {
        assert!(command_body(None, None, None, None).is_err());
        assert!(command_body(Some("x".into()), Some(vec![]), None, None).is_err());
        let b = command_body(None, Some(vec!["ls".into()]), Some("/".into()), None).unwrap();
        assert_eq!(Value::Object(b), json!({"argv": ["ls"], "cwd": "/"}));
    }

    #[test]
    fn binary_files_come_back_as_base64() {
        assert_eq!(file_json("/a", b"hi")["encoding"], "utf8");
        let v = file_json("/b", &[0xff, 0x00]);
        assert_eq!(
            (v["encoding"].as_str(), v["content"].as_str()),
            (Some("base64"), Some("/wA="))
        );
    }
}
