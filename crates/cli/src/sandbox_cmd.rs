//! `moat sandbox …`: sandboxes on a running daemon (`MOAT_URL`, `MOAT_API_KEY`). Exec output
//! is streamed as it is produced (the NDJSON form of the exec route) and the command's exit
//! code becomes ours; `cp` streams files both ways without holding them in memory.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use futures_util::StreamExt;
use moat_vm::Tier;
use reqwest::Method;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::{labels, path_segment, print_json, print_table, s, Client, ClientArgs};
use crate::run::{check_user, check_workdir, parse_env, timeout_ms};

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Create a sandbox in GROUP and print its id (a fork of a snapshot with --from-snapshot;
    /// with --count, N forks and one id per line).
    Create {
        group: String,
        /// Image name or digest (default: the group's).
        #[arg(long, conflicts_with = "from_snapshot")]
        image: Option<String>,
        /// Tier: xs, s, m, l, xl (default: the group's).
        #[arg(long, conflicts_with = "from_snapshot")]
        tier: Option<String>,
        /// Fork this snapshot of GROUP: processes, memory and files as they were.
        #[arg(long, value_name = "NAME")]
        from_snapshot: Option<String>,
        /// How many forks (1–16); all are created or none.
        #[arg(long, value_name = "N", requires = "from_snapshot")]
        count: Option<u32>,
        /// An environment variable given to every exec (KEY=VALUE); repeatable.
        #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// A label (KEY=VALUE); repeatable.
        #[arg(short = 'l', long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    /// List the sandboxes of GROUP.
    Ls {
        group: String,
        /// Only sandboxes with this label (KEY=VALUE); repeatable, all must match.
        #[arg(short = 'l', long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    /// Show one sandbox.
    Show { group: String, id: String },
    /// Delete a sandbox (its VM and its suspended state).
    Rm { group: String, id: String },
    /// Run a command in a sandbox, streaming its output; exits with the command's exit code.
    Exec(ExecArgs),
    /// Copy a file into or out of a sandbox: one side is GROUP/ID:/PATH, the other a local
    /// path ("-" for stdin or stdout).
    Cp {
        #[arg(value_name = "SRC")]
        src: String,
        #[arg(value_name = "DST")]
        dst: String,
    },
    /// Suspend a sandbox: its memory and disk go to disk and its VM ends.
    Suspend { group: String, id: String },
    /// Resume a suspended sandbox (any exec or file request also does).
    Resume { group: String, id: String },
    /// An interactive terminal in a sandbox (the login shell, or CMD); exits with its exit
    /// code. Without a terminal on stdin, stdin's bytes are typed into it.
    Shell(crate::shell_cmd::ShellArgs),
    /// Forward a local TCP port to PORT in a sandbox (any port; it need not be exposed),
    /// through the daemon, until interrupted.
    PortForward(crate::port_forward::PortForwardArgs),
    /// Take snapshot NAME of a sandbox (memory and disk; the sandbox runs on). Fork it with
    /// `moat sandbox create GROUP --from-snapshot NAME`; list it with `moat snapshot ls`.
    Snapshot {
        group: String,
        id: String,
        name: String,
    },
    /// The egress audit of a sandbox: every DNS answer and connection its network stack
    /// decided, oldest first (with --json, one JSON object per line).
    Egress {
        group: String,
        id: String,
        /// Only allowed or only denied events.
        #[arg(long, value_parser = ["allow", "deny"])]
        verdict: Option<String>,
        /// The newest N events (1–1000; default 100).
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// Keep printing new events as they come, until interrupted.
        #[arg(short = 'f', long)]
        follow: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// List the snapshots of GROUP.
    Ls { group: String },
    /// Show one snapshot.
    Show { group: String, name: String },
    /// Delete a snapshot (sandboxes forked from it are not affected).
    Rm { group: String, name: String },
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    group: String,
    id: String,
    /// Set an environment variable (KEY=VALUE); repeatable.
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory inside the sandbox (absolute).
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    workdir: Option<String>,
    /// User to run as: a name or uid, optionally with `:group`.
    #[arg(short = 'u', long = "user")]
    user: Option<String>,
    /// Kill the command and everything it started after this many seconds (exit code 124).
    #[arg(long, value_name = "SECS", allow_negative_numbers = true)]
    timeout: Option<f64>,
    /// Send this process's stdin to the command: read to its end first (UTF-8 text, at most
    /// 512 KiB), then the command runs. For a live, unbounded stream use `moat sandbox shell`.
    #[arg(short = 'i', long = "interactive")]
    interactive: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<String>,
}

impl ExecArgs {
    /// The exec route's request body, validated as `moat run` validates its flags.
    fn body(&self) -> Result<Value> {
        let env = env_map(&self.env)?;
        if let Some(w) = &self.workdir {
            check_workdir(w)?;
        }
        if let Some(u) = &self.user {
            check_user(u)?;
        }
        if let Some(t) = self.timeout {
            timeout_ms(t)?;
        }
        let mut body = json!({"argv": self.cmd, "env": env});
        if let Some(w) = &self.workdir {
            body["cwd"] = json!(w);
        }
        if let Some(u) = &self.user {
            body["user"] = json!(u);
        }
        if let Some(t) = self.timeout {
            body["timeout_s"] = json!(t);
        }
        if self.interactive {
            body["stdin"] = json!(read_stdin()?);
        }
        Ok(body)
    }
}

/// The most `exec -i` reads from stdin: the exec request carries it in its JSON body, which
/// the daemon caps at 1 MiB.
const MAX_EXEC_STDIN: u64 = 512 * 1024;

fn read_stdin() -> Result<String> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::io::stdin()
        .take(MAX_EXEC_STDIN + 1)
        .read_to_end(&mut buf)
        .context("reading stdin")?;
    if buf.len() as u64 > MAX_EXEC_STDIN {
        bail!(
            "stdin is larger than {} KiB, the most `exec -i` sends; pipe it through `moat \
             sandbox shell` or copy it in with `moat sandbox cp`",
            MAX_EXEC_STDIN / 1024
        );
    }
    String::from_utf8(buf).map_err(|_| {
        anyhow!("stdin is not UTF-8 text, which `exec -i` needs; copy binary input in with `moat sandbox cp`")
    })
}

fn env_map(env: &[String]) -> Result<Map<String, Value>> {
    env.iter()
        .map(|e| parse_env(e).map(|(k, v)| (k, Value::String(v))))
        .collect()
}

fn label_pairs(flag_values: &[String]) -> Result<Vec<(String, String)>> {
    flag_values
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("invalid --label {l:?}: expected KEY=VALUE"))
        })
        .collect()
}

pub(crate) fn sandbox_path(group: &str, id: &str) -> Result<String> {
    Ok(format!(
        "/v1/sandbox-groups/{}/sandboxes/{}",
        path_segment(group)?,
        path_segment(id)?
    ))
}

pub async fn run(args: ClientArgs, cmd: SandboxCommand) -> Result<u8> {
    let c = Client::new(&args)?;
    let json_out = args.json;
    match cmd {
        SandboxCommand::Create {
            group,
            image,
            tier,
            from_snapshot,
            count,
            env,
            labels,
        } => {
            let mut body = json!({
                "env": env_map(&env)?,
                "labels": label_pairs(&labels)?.into_iter().map(|(k, v)| (k, Value::String(v))).collect::<Map<_, _>>(),
            });
            if let Some(i) = image {
                body["image"] = json!(i);
            }
            if let Some(t) = tier {
                // The same tier names as `moat run --tier`.
                t.parse::<Tier>()?;
                body["tier"] = json!(t);
            }
            if let Some(f) = from_snapshot {
                body["from_snapshot"] = json!(f);
            }
            if let Some(n) = count {
                body["count"] = json!(n);
            }
            let path = format!("/v1/sandbox-groups/{}/sandboxes", path_segment(&group)?);
            let (_, sb) = c.call(Method::POST, &path, Some(&body)).await?;
            if json_out {
                print_json(&sb)?;
            } else if let Some(forks) = sb["sandboxes"].as_array() {
                for f in forks {
                    println!("{}", s(&f["id"]));
                }
            } else {
                println!("{}", s(&sb["id"]));
            }
        }
        SandboxCommand::Ls { group, labels } => {
            let mut path = format!("/v1/sandbox-groups/{}/sandboxes", path_segment(&group)?);
            let pairs = label_pairs(&labels)?;
            if !pairs.is_empty() {
                let sel: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
                path.push_str(&format!("?labels={}", query_value(&sel.join(","))));
            }
            let (_, v) = c.call(Method::GET, &path, None).await?;
            if json_out {
                print_json(&v)?;
            } else {
                let rows = v["sandboxes"]
                    .as_array()
                    .map(|sbs| {
                        sbs.iter()
                            .map(|sb| {
                                vec![
                                    s(&sb["id"]),
                                    s(&sb["state"]),
                                    short_digest(&s(&sb["image"])),
                                    s(&sb["tier"]),
                                    s(&sb["created_at"]),
                                ]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                print_table(&["ID", "STATE", "IMAGE", "TIER", "CREATED"], rows);
            }
        }
        SandboxCommand::Show { group, id } => {
            let (_, sb) = c
                .call(Method::GET, &sandbox_path(&group, &id)?, None)
                .await?;
            if json_out {
                print_json(&sb)?;
            } else {
                print_sandbox(&sb);
            }
        }
        SandboxCommand::Rm { group, id } => {
            c.call(Method::DELETE, &sandbox_path(&group, &id)?, None)
                .await?;
            if !json_out {
                println!("sandbox {id} deleted");
            }
        }
        SandboxCommand::Suspend { group, id } => {
            return state_change(&c, json_out, &group, &id, "suspend").await;
        }
        SandboxCommand::Resume { group, id } => {
            return state_change(&c, json_out, &group, &id, "resume").await;
        }
        SandboxCommand::Snapshot { group, id, name } => {
            let path = format!("{}/snapshots", sandbox_path(&group, &id)?);
            let (_, snap) = c
                .call(Method::POST, &path, Some(&json!({ "name": name })))
                .await?;
            if json_out {
                print_json(&snap)?;
            } else {
                println!(
                    "snapshot {name} of {id} taken ({})",
                    human_bytes(snap["size_bytes"].as_u64().unwrap_or(0))
                );
            }
        }
        SandboxCommand::Egress {
            group,
            id,
            verdict,
            limit,
            follow,
        } => return egress(&c, json_out, &group, &id, verdict, limit, follow).await,
        SandboxCommand::Exec(a) => return exec(&c, &a).await,
        SandboxCommand::Shell(a) => return crate::shell_cmd::shell(&c, &a).await,
        SandboxCommand::PortForward(a) => return crate::port_forward::port_forward(&c, &a).await,
        SandboxCommand::Cp { src, dst } => return cp(&c, json_out, &src, &dst).await,
    }
    Ok(0)
}

/// How often `moat sandbox egress --follow` asks for new events.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

async fn egress(
    c: &Client,
    json_out: bool,
    group: &str,
    id: &str,
    verdict: Option<String>,
    limit: Option<u32>,
    follow: bool,
) -> Result<u8> {
    let base = format!("{}/egress", sandbox_path(group, id)?);
    let mut filter = String::new();
    if let Some(v) = &verdict {
        filter.push_str(&format!("&verdict={v}"));
    }
    let mut query = format!("?limit={}{filter}", limit.unwrap_or(100));
    let mut last = 0;
    loop {
        let (_, v) = c.call(Method::GET, &format!("{base}{query}"), None).await?;
        let items = v["items"].as_array().cloned().unwrap_or_default();
        for e in &items {
            if json_out {
                println!("{e}");
            } else {
                println!("{}", egress_line(e));
            }
        }
        if let Some(id) = items.last().and_then(|e| e["id"].as_u64()) {
            last = id;
        }
        if !follow {
            return Ok(0);
        }
        // From now on: everything after the newest event seen, oldest first.
        query = format!("?limit=1000{filter}&after={last}");
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
}

/// `2026-11-30T15:04:05.123Z deny dns evil.test - rule=- no rule allows this name (…)`.
fn egress_line(e: &Value) -> String {
    let address = match (&e["address"], &e["port"]) {
        (Value::String(a), Value::Number(p)) => format!("{a}:{p}"),
        (Value::String(a), _) => a.clone(),
        (_, Value::Number(p)) => format!(":{p}"),
        _ => "-".to_string(),
    };
    let mut line = format!(
        "{} {:<5} {:<3} {} {address} rule={} {}",
        s(&e["time"]),
        s(&e["verdict"]),
        s(&e["kind"]),
        s(&e["name"]),
        s(&e["rule"]),
        s(&e["reason"]),
    );
    let (sent, received) = (e["bytes_sent"].as_u64(), e["bytes_received"].as_u64());
    if sent.unwrap_or(0) + received.unwrap_or(0) > 0 {
        line.push_str(&format!(
            " (sent {}, received {})",
            human_bytes(sent.unwrap_or(0)),
            human_bytes(received.unwrap_or(0))
        ));
    }
    line
}

async fn state_change(c: &Client, json_out: bool, group: &str, id: &str, verb: &str) -> Result<u8> {
    let path = format!("{}/{verb}", sandbox_path(group, id)?);
    let (_, sb) = c.call(Method::POST, &path, None).await?;
    if json_out {
        print_json(&sb)?;
    } else {
        println!("sandbox {id} {}", s(&sb["state"]));
    }
    Ok(0)
}

/// `moat run --group G`: a sandbox of G created for the command and deleted after it, also
/// after a failure, Ctrl-C or SIGTERM (a signal during the create is handled once it is done,
/// so the sandbox is still deleted).
pub async fn run_in_group(args: ClientArgs, run: &crate::run::RunArgs) -> Result<u8> {
    let group = run.group.clone().context("no --group")?;
    if run.cmd.is_empty() {
        bail!("give the command: moat run --group GROUP [IMAGE] -- CMD [ARG…]");
    }
    if run.has_egress_flags() {
        bail!(
            "--allow, --allow-cidr, --egress-hosts and --egress-resolver are for a local \
             sandbox; with --group the group's egress policy applies"
        );
    }
    let mut exec_args = ExecArgs {
        group: group.clone(),
        id: String::new(),
        env: run.env.clone(),
        workdir: run.workdir.clone(),
        user: run.user.clone(),
        timeout: run.timeout,
        interactive: run.interactive,
        cmd: run.cmd.clone(),
    };
    // Everything is checked (and stdin read) before a sandbox exists.
    let body = exec_args.body()?;
    let mut create = json!({});
    if let Some(i) = &run.image {
        create["image"] = json!(i);
    }
    if let Some(t) = &run.tier {
        t.parse::<Tier>()?;
        create["tier"] = json!(t);
    }
    let c = Client::new(&args)?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let path = format!("/v1/sandbox-groups/{}/sandboxes", path_segment(&group)?);
    let (_, sb) = c.call(Method::POST, &path, Some(&create)).await?;
    exec_args.id = sb["id"]
        .as_str()
        .context("the daemon's sandbox has no id")?
        .to_string();
    let code = tokio::select! {
        r = stream_exec(&c, &exec_args, &body) => r,
        _ = sigint.recv() => Ok(130),
        _ = sigterm.recv() => Ok(143),
    };
    let deleted = c
        .call(Method::DELETE, &sandbox_path(&group, &exec_args.id)?, None)
        .await;
    if let Err(e) = deleted {
        eprintln!("moat: deleting sandbox {}: {e}", exec_args.id);
    }
    code
}

async fn exec(c: &Client, a: &ExecArgs) -> Result<u8> {
    let body = a.body()?;
    stream_exec(c, a, &body).await
}

/// Streams the exec's NDJSON events to our stdout and stderr; the command's exit code is ours.
async fn stream_exec(c: &Client, a: &ExecArgs, body: &Value) -> Result<u8> {
    let path = format!("{}/exec", sandbox_path(&a.group, &a.id)?);
    let req = c
        .request(Method::POST, &path)
        .header(reqwest::header::ACCEPT, "application/x-ndjson")
        .json(body);
    let resp = c.send(req).await?;
    let mut stream = resp.bytes_stream();
    let mut out = tokio::io::stdout();
    let mut err = tokio::io::stderr();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("the exec stream broke off")?;
        buf.extend_from_slice(&chunk);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line = &line[..line.len() - 1];
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let event: Value = serde_json::from_slice(line).with_context(|| {
                format!(
                    "the daemon sent an exec event that is not JSON: {:?}",
                    String::from_utf8_lossy(line)
                )
            })?;
            if let Some(d) = event["stdout"].as_str() {
                // A closed stdout (say, `| head`) must not stop the command's accounting.
                let _ = out.write_all(d.as_bytes()).await;
                let _ = out.flush().await;
            } else if let Some(d) = event["stderr"].as_str() {
                let _ = err.write_all(d.as_bytes()).await;
                let _ = err.flush().await;
            } else if event["exit"].is_object() {
                let exit = &event["exit"];
                if exit["timed_out"].as_bool() == Some(true) {
                    eprintln!("moat: command timed out; killed it and everything it started");
                }
                let code = exit["exit_code"]
                    .as_i64()
                    .context("the exec's exit event has no exit_code")?;
                return Ok(u8::try_from(code).unwrap_or(255));
            } else if event["error"].is_object() {
                let message = event["error"]["message"].as_str().unwrap_or("no message");
                bail!("the exec broke off: {message}");
            }
        }
    }
    bail!("the exec stream ended without the command's exit status")
}

/// One side of `moat sandbox cp`.
#[derive(Debug, PartialEq)]
enum Place {
    Local(String),
    Remote {
        group: String,
        id: String,
        path: String,
    },
}

/// `GROUP/ID:/PATH` is in a sandbox; anything else is local (write `./a/b:/c` for a local file
/// whose name looks like that).
fn place(arg: &str) -> Place {
    if let Some((head, path)) = arg.split_once(':') {
        if let Some((group, id)) = head.split_once('/') {
            if path.starts_with('/') && !group.is_empty() && !id.is_empty() && !id.contains('/') {
                return Place::Remote {
                    group: group.to_string(),
                    id: id.to_string(),
                    path: path.to_string(),
                };
            }
        }
    }
    Place::Local(arg.to_string())
}

fn files_url(group: &str, id: &str, path: &str, extra: &str) -> Result<String> {
    Ok(format!(
        "{}/files?path={}{extra}",
        sandbox_path(group, id)?,
        query_value(path)
    ))
}

async fn cp(c: &Client, json_out: bool, src: &str, dst: &str) -> Result<u8> {
    match (place(src), place(dst)) {
        (Place::Local(local), Place::Remote { group, id, path }) => {
            upload(c, json_out, &local, &group, &id, &path).await
        }
        (Place::Remote { group, id, path }, Place::Local(local)) => {
            download(c, json_out, &group, &id, &path, &local).await
        }
        (Place::Local(_), Place::Local(_)) => {
            bail!("neither {src:?} nor {dst:?} is in a sandbox: write one side as GROUP/ID:/PATH")
        }
        (Place::Remote { .. }, Place::Remote { .. }) => {
            bail!("both sides are in sandboxes: copy through a local file")
        }
    }
}

/// The base name of `path`, for a destination that is a directory.
fn base_name(path: &str) -> Result<String> {
    Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .with_context(|| format!("{path:?} names no file"))
}

async fn upload(
    c: &Client,
    json_out: bool,
    local: &str,
    group: &str,
    id: &str,
    path: &str,
) -> Result<u8> {
    let (reader, mode, name): (Box<dyn tokio::io::AsyncRead + Send + Sync + Unpin>, _, _) =
        if local == "-" {
            (Box::new(tokio::io::stdin()), None, None)
        } else {
            let file = tokio::fs::File::open(local)
                .await
                .with_context(|| format!("cannot open {local}"))?;
            let meta = file.metadata().await?;
            if meta.is_dir() {
                bail!("{local} is a directory: cp copies one file");
            }
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o7777;
            (Box::new(file), Some(mode), Some(base_name(local)?))
        };
    let mut path = path.to_string();
    if path.ends_with('/') {
        match name {
            Some(n) => path.push_str(&n),
            None => bail!("give the file's name in the sandbox: {path} ends with '/'"),
        }
    }
    let extra = mode.map(|m| format!("&mode={m:o}")).unwrap_or_default();
    let body =
        reqwest::Body::wrap_stream(futures_util::stream::unfold(reader, |mut r| async move {
            let mut buf = vec![0u8; 256 * 1024];
            match r.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(buf), r))
                }
                Err(e) => Some((Err(e), r)),
            }
        }));
    let req = c
        .request(Method::PUT, &files_url(group, id, &path, &extra)?)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .body(body);
    let resp = c.send(req).await?;
    let v: Value = resp.json().await.context("reading the daemon's answer")?;
    if json_out {
        print_json(&v)?;
    } else {
        println!(
            "copied {} bytes to {group}/{id}:{}",
            s(&v["size"]),
            s(&v["path"])
        );
    }
    Ok(0)
}

async fn download(
    c: &Client,
    json_out: bool,
    group: &str,
    id: &str,
    path: &str,
    local: &str,
) -> Result<u8> {
    let req = c.request(Method::GET, &files_url(group, id, path, "")?);
    let resp = c.send(req).await?;
    let mut stream = resp.bytes_stream();
    if local == "-" {
        let mut out = tokio::io::stdout();
        while let Some(chunk) = stream.next().await {
            out.write_all(&chunk.context("the download broke off")?)
                .await?;
        }
        out.flush().await?;
        return Ok(0);
    }
    let mut target = PathBuf::from(local);
    if target.is_dir() {
        target.push(base_name(path)?);
    }
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Written next to the target and renamed once complete: a transfer that breaks off leaves
    // no partial file behind.
    let tmp = tempfile::Builder::new()
        .prefix(".moat-cp-")
        .tempfile_in(&dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    let mut file = tokio::fs::File::from_std(tmp.as_file().try_clone()?);
    let mut size: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("the download broke off")?;
        size += chunk.len() as u64;
        file.write_all(&chunk)
            .await
            .with_context(|| format!("writing {}", target.display()))?;
    }
    file.flush().await?;
    drop(file);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.persist(&target)
        .map_err(|e| anyhow!("cannot write {}: {}", target.display(), e.error))?;
    if json_out {
        print_json(&json!({"path": target.display().to_string(), "size": size}))?;
    } else {
        println!("copied {size} bytes to {}", target.display());
    }
    Ok(0)
}

/// Percent-encodes a query value.
pub(crate) fn query_value(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn short_digest(d: &str) -> String {
    match d.strip_prefix("sha256:") {
        Some(hex) if hex.len() > 12 => format!("sha256:{}", &hex[..12]),
        _ => d.to_string(),
    }
}

fn snapshot_path(group: &str, name: Option<&str>) -> Result<String> {
    let mut p = format!("/v1/sandbox-groups/{}/snapshots", path_segment(group)?);
    if let Some(n) = name {
        p.push('/');
        p.push_str(&path_segment(n)?);
    }
    Ok(p)
}

fn human_bytes(n: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    format!("{:.1} MiB", n as f64 / MIB)
}

/// `moat snapshot ls|show|rm`.
pub async fn snapshot(args: ClientArgs, cmd: SnapshotCommand) -> Result<u8> {
    let c = Client::new(&args)?;
    let json_out = args.json;
    match cmd {
        SnapshotCommand::Ls { group } => {
            let (_, v) = c
                .call(Method::GET, &snapshot_path(&group, None)?, None)
                .await?;
            if json_out {
                print_json(&v)?;
            } else {
                let rows = v["snapshots"]
                    .as_array()
                    .map(|list| {
                        list.iter()
                            .map(|sn| {
                                vec![
                                    s(&sn["name"]),
                                    s(&sn["sandbox"]),
                                    short_digest(&s(&sn["image"])),
                                    s(&sn["tier"]),
                                    human_bytes(sn["size_bytes"].as_u64().unwrap_or(0)),
                                    s(&sn["created_at"]),
                                ]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                print_table(
                    &["NAME", "SANDBOX", "IMAGE", "TIER", "SIZE", "CREATED"],
                    rows,
                );
            }
        }
        SnapshotCommand::Show { group, name } => {
            let (_, sn) = c
                .call(Method::GET, &snapshot_path(&group, Some(&name))?, None)
                .await?;
            if json_out {
                print_json(&sn)?;
            } else {
                println!("name:     {}", s(&sn["name"]));
                println!("group:    {}", s(&sn["group"]));
                println!("sandbox:  {}", s(&sn["sandbox"]));
                println!("image:    {}", s(&sn["image"]));
                println!("tier:     {}", s(&sn["tier"]));
                println!(
                    "size:     {}",
                    human_bytes(sn["size_bytes"].as_u64().unwrap_or(0))
                );
                println!("created:  {}", s(&sn["created_at"]));
            }
        }
        SnapshotCommand::Rm { group, name } => {
            c.call(Method::DELETE, &snapshot_path(&group, Some(&name))?, None)
                .await?;
            if !json_out {
                println!("snapshot {name} deleted");
            }
        }
    }
    Ok(0)
}

fn print_sandbox(sb: &Value) {
    println!("id:       {}", s(&sb["id"]));
    println!("group:    {}", s(&sb["group"]));
    println!("state:    {}", s(&sb["state"]));
    if !sb["reason"].is_null() {
        println!("reason:   {}", s(&sb["reason"]));
    }
    println!("image:    {}", s(&sb["image"]));
    println!("tier:     {}", s(&sb["tier"]));
    println!("env:      {}", labels(&sb["env"]));
    println!("labels:   {}", labels(&sb["labels"]));
    println!("created:  {}", s(&sb["created_at"]));
    println!("updated:  {}", s(&sb["updated_at"]));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places() {
        assert_eq!(
            place("web/sb-1:/root/a"),
            Place::Remote {
                group: "web".into(),
                id: "sb-1".into(),
                path: "/root/a".into()
            }
        );
        assert_eq!(place("./web/sb-1:/x"), Place::Local("./web/sb-1:/x".into()));
        assert_eq!(place("web/sb-1:rel"), Place::Local("web/sb-1:rel".into()));
        assert_eq!(place("file.txt"), Place::Local("file.txt".into()));
    }

    #[test]
    fn query_values_are_escaped() {
        assert_eq!(query_value("/a b&c=d"), "/a%20b%26c%3Dd");
    }
}
