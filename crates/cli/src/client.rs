//! The CLI verbs that talk to a running daemon (`MOAT_URL`, `MOAT_API_KEY`): `moat group …`
//! and `moat api-key …`. Tables for people, `--json` for scripts. Input is validated by the
//! daemon; its error messages are shown as they are.

use std::io::Read;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use reqwest::{Method, StatusCode};
use serde_json::{json, Map, Value};

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// URL of the moat daemon.
    #[arg(
        long,
        env = "MOAT_URL",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    url: String,
    /// API key (moat_…).
    #[arg(long, env = "MOAT_API_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub(crate) json: bool,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Create or replace a sandbox group (the whole spec: what is not given takes its default).
    Apply(ApplyArgs),
    /// List the groups this key may see.
    Ls,
    /// Show one group.
    Show { name: String },
    /// Delete a group.
    Rm {
        name: String,
        /// Also delete the group's sandboxes.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// JSON file with the spec, optionally with a "name" field ("-" reads stdin). Flags given
    /// too override the file's fields.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: Option<String>,
    /// Group name (default: the file's "name").
    #[arg(long)]
    name: Option<String>,
    /// Default image of the group's sandboxes.
    #[arg(long)]
    image: Option<String>,
    /// Tier: xs, s, m, l, xl.
    #[arg(long)]
    tier: Option<String>,
    /// Warm sandboxes kept ready (0–64).
    #[arg(long, value_name = "N")]
    pool_size: Option<u32>,
    /// Seconds without activity before on-idle applies, or "never".
    #[arg(long, value_name = "SECS|never")]
    idle_timeout: Option<String>,
    /// suspend or delete.
    #[arg(long)]
    on_idle: Option<String>,
    /// Seconds a suspended sandbox is kept, or "never".
    #[arg(long, value_name = "SECS|never")]
    suspended_ttl: Option<String>,
    /// Maximum lifetime of a sandbox in seconds, or "never".
    #[arg(long, value_name = "SECS|never")]
    max_lifetime: Option<String>,
    /// Egress when no rule matches: deny or allow.
    #[arg(long)]
    egress_default: Option<String>,
    /// Allow egress to HOST or *.SUFFIX, optionally on ports (HOST:443,8443); repeatable.
    /// Rules are tried in this order: every --deny, --deny-cidr, --allow, then --allow-cidr,
    /// each in the order given (a file's rules are replaced by any of these flags).
    #[arg(long = "allow", value_name = "HOST[:PORTS]")]
    allow: Vec<String>,
    /// Allow egress to raw addresses in an IPv4 CIDR, optionally on ports
    /// (203.0.113.0/24:5432); repeatable.
    #[arg(long = "allow-cidr", value_name = "CIDR[:PORTS]")]
    allow_cidr: Vec<String>,
    /// Deny egress to HOST or *.SUFFIX (before any allow rule), optionally on ports; repeatable.
    #[arg(long = "deny", value_name = "HOST[:PORTS]")]
    deny: Vec<String>,
    /// Deny egress to raw addresses in an IPv4 CIDR (before any allow rule), optionally on
    /// ports; repeatable.
    #[arg(long = "deny-cidr", value_name = "CIDR[:PORTS]")]
    deny_cidr: Vec<String>,
    /// Concurrent flows per sandbox (1–1024).
    #[arg(long, value_name = "N")]
    max_flows: Option<u64>,
    /// New flows per second per sandbox (1–10000).
    #[arg(long, value_name = "N")]
    new_flows_per_s: Option<u64>,
    /// DNS queries per second per sandbox (1–10000).
    #[arg(long, value_name = "N")]
    dns_qps: Option<u64>,
    /// Bytes per second across a sandbox's TCP flows (16384 or more).
    #[arg(long, value_name = "BYTES_PER_S")]
    bandwidth: Option<u64>,
    /// A label KEY=VALUE; repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Workload identity: let the group's sandboxes get signed tokens (true or false).
    #[arg(long, value_name = "BOOL")]
    identity: Option<bool>,
    /// An audience tokens may be asked for (replaces the list); repeatable.
    #[arg(long = "identity-audience", value_name = "AUD")]
    identity_audiences: Vec<String>,
    /// Token lifetime in seconds (60–3600).
    #[arg(long, value_name = "SECS")]
    identity_ttl: Option<u64>,
    /// What a token's subject names: group or sandbox.
    #[arg(long, value_name = "group|sandbox")]
    identity_subject: Option<String>,
    /// Whether code in the guest may fetch tokens itself (true or false).
    #[arg(long, value_name = "BOOL")]
    identity_in_guest: Option<bool>,
    /// Run the group's sandboxes only on nodes with this label (`moat serve --node-label`);
    /// repeatable, every one must match (replaces the list).
    #[arg(long = "node-label", value_name = "KEY=VALUE")]
    node_labels: Vec<String>,
    /// How a create picks among the nodes that fit: spread (least used) or pack (most used).
    #[arg(long, value_name = "spread|pack")]
    placement: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create an API key; its secret is printed once.
    Create {
        /// A name for people.
        #[arg(long)]
        name: String,
        /// admin, owner, user or reader.
        #[arg(long)]
        role: String,
        /// A group the key may see; repeatable (none for admin).
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
        /// The key stops working after this long, e.g. 90d, 12h, 30m (default: never).
        #[arg(long, value_name = "DURATION", value_parser = crate::serve::duration)]
        expires_in: Option<std::time::Duration>,
        /// This key's own rate limit, requests a second (default: the daemon's --rate-limit).
        #[arg(long, value_name = "PER_S", requires = "rate_burst")]
        rate_limit: Option<u32>,
        /// With --rate-limit: the requests it may make at once after a quiet while.
        #[arg(long, value_name = "N", requires = "rate_limit")]
        rate_burst: Option<u32>,
    },
    /// List API keys (never their secrets): role, groups, expiry and last use.
    Ls,
    /// Show one API key (never its secret).
    Show { id: String },
    /// Give an API key a new secret, printed once; the old secret stops working at once. The
    /// key keeps its id, role, groups and rate limit.
    Rotate {
        id: String,
        /// The new secret expires after this long (default: the key's expiry stays; needed
        /// when it has passed).
        #[arg(long, value_name = "DURATION", value_parser = crate::serve::duration)]
        expires_in: Option<std::time::Duration>,
    },
    /// Delete an API key by id.
    Rm { id: String },
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only calls in the last DURATION, e.g. 1h, 7d.
    #[arg(long, value_name = "DURATION", value_parser = crate::serve::duration)]
    since: Option<std::time::Duration>,
    /// Only calls made with this API key id.
    #[arg(long, value_name = "KEY_ID")]
    key: Option<String>,
    /// Only calls on this sandbox group.
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// At most this many entries (1–1000).
    #[arg(long, default_value_t = 100)]
    limit: u32,
}

/// The CAs of MOAT_CA_FILE (PEM), trusted besides the public roots for an https:// MOAT_URL: a
/// daemon whose certificate a private CA signed. Every https certificate is verified;
/// there is no way to turn that off.
pub(crate) fn with_ca_file(b: reqwest::ClientBuilder) -> Result<reqwest::ClientBuilder> {
    let Some(path) = std::env::var_os("MOAT_CA_FILE").filter(|p| !p.is_empty()) else {
        return Ok(b);
    };
    let pem = std::fs::read(&path)
        .with_context(|| format!("reading MOAT_CA_FILE {}", path.to_string_lossy()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).with_context(|| {
        format!(
            "MOAT_CA_FILE {} is not a PEM certificate bundle",
            path.to_string_lossy()
        )
    })?;
    if certs.is_empty() {
        bail!(
            "MOAT_CA_FILE {} holds no certificate",
            path.to_string_lossy()
        );
    }
    Ok(certs.into_iter().fold(b, |b, c| b.add_root_certificate(c)))
}

#[derive(Clone)]
pub(crate) struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl ClientArgs {
    /// Whether the environment names a daemon (MOAT_URL or MOAT_API_KEY set and not empty):
    /// then `moat image` goes through it instead of the local store.
    pub(crate) fn daemon_from_env() -> Option<ClientArgs> {
        let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.is_empty());
        (set("MOAT_URL") || set("MOAT_API_KEY")).then(ClientArgs::from_env)
    }

    /// The daemon that MOAT_URL (default http://127.0.0.1:7070) and MOAT_API_KEY name.
    pub(crate) fn from_env() -> ClientArgs {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        ClientArgs {
            url: var("MOAT_URL").unwrap_or_else(|| "http://127.0.0.1:7070".to_string()),
            api_key: var("MOAT_API_KEY"),
            json: false,
        }
    }
}

impl Client {
    pub(crate) fn new(args: &ClientArgs) -> Result<Client> {
        // No overall timeout on the client: streamed execs and file transfers take as long as
        // they take. Plain calls get one each (see `call`).
        let http = with_ca_file(
            reqwest::Client::builder().connect_timeout(std::time::Duration::from_secs(10)),
        )?
        .build()
        .context("building the HTTP client")?;
        Ok(Client {
            http,
            base: args.url.trim_end_matches('/').to_string(),
            key: args.api_key.clone().filter(|k| !k.is_empty()),
        })
    }

    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    pub(crate) fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The WebSocket URL of `path` under the daemon's URL (ws:// for http://).
    pub(crate) fn ws_url(&self, path: &str) -> Result<String> {
        match self.base.strip_prefix("http://") {
            Some(rest) => Ok(format!("ws://{rest}{path}")),
            None => bail!(
                "the shell needs an http:// MOAT_URL (this CLI has no TLS WebSocket), got {}",
                self.base
            ),
        }
    }

    /// A request to `path` (under the daemon's URL) with the key set.
    pub(crate) fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(k) => req.bearer_auth(k),
            None => req,
        }
    }

    /// Sends a request built by [`Client::request`]; a non-2xx answer becomes an error carrying
    /// the daemon's message.
    pub(crate) async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let resp = self.reach(req).await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(self.failure(resp).await)
    }

    /// Sends an HTTP upgrade to `protocol` built by [`Client::request`]; the upgraded
    /// connection, or an error carrying the daemon's message.
    pub(crate) async fn upgrade(
        &self,
        req: reqwest::RequestBuilder,
        protocol: &str,
    ) -> Result<reqwest::Upgraded> {
        let req = req
            .header(reqwest::header::CONNECTION, "upgrade")
            .header(reqwest::header::UPGRADE, protocol);
        let resp = self.reach(req).await?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(self.failure(resp).await);
        }
        resp.upgrade()
            .await
            .context("the daemon's upgraded connection")
    }

    async fn reach(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        req.send().await.with_context(|| {
            format!(
                "cannot reach the moat daemon at {} (is `moat serve` running? set MOAT_URL)",
                self.base
            )
        })
    }

    /// The daemon's error answer as an error: its message and status.
    async fn failure(&self, resp: reqwest::Response) -> anyhow::Error {
        let status = resp.status();
        let bytes = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => return anyhow!("reading the daemon's answer: {e}"),
        };
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let message = value["error"]["message"].as_str().unwrap_or("no message");
        let hint = if status == StatusCode::UNAUTHORIZED && self.key.is_none() {
            " (set MOAT_API_KEY)"
        } else {
            ""
        };
        anyhow!("{message}{hint} (HTTP {})", status.as_u16())
    }

    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value)> {
        let mut req = self
            .request(method, path)
            .timeout(std::time::Duration::from_secs(600));
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = self.send(req).await?;
        let status = resp.status();
        let bytes = resp.bytes().await.context("reading the daemon's answer")?;
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).with_context(|| {
                format!("the daemon answered HTTP {status} with a body that is not JSON")
            })?
        };
        Ok((status, value))
    }
}

pub async fn group(args: ClientArgs, cmd: GroupCommand) -> Result<u8> {
    let c = Client::new(&args)?;
    match cmd {
        GroupCommand::Apply(a) => {
            let (name, body) = apply_body(&a)?;
            let (status, g) = c
                .call(
                    Method::PUT,
                    &format!("/v1/sandbox-groups/{name}"),
                    Some(&body),
                )
                .await?;
            if args.json {
                print_json(&g)?;
            } else {
                let what = if status == StatusCode::CREATED {
                    "created"
                } else {
                    "updated"
                };
                println!("group {name} {what}");
            }
        }
        GroupCommand::Ls => {
            let (_, v) = c.call(Method::GET, "/v1/sandbox-groups", None).await?;
            if args.json {
                print_json(&v)?;
            } else {
                let rows = v["groups"]
                    .as_array()
                    .map(|gs| gs.iter().map(group_row).collect())
                    .unwrap_or_default();
                print_table(
                    &[
                        "NAME", "IMAGE", "TIER", "POOL", "EGRESS", "LABELS", "UPDATED",
                    ],
                    rows,
                );
            }
        }
        GroupCommand::Show { name } => {
            let (_, g) = c
                .call(
                    Method::GET,
                    &format!("/v1/sandbox-groups/{}", path_segment(&name)?),
                    None,
                )
                .await?;
            if args.json {
                print_json(&g)?;
            } else {
                print_group(&g);
            }
        }
        GroupCommand::Rm { name, force } => {
            let q = if force { "?force=true" } else { "" };
            c.call(
                Method::DELETE,
                &format!("/v1/sandbox-groups/{}{q}", path_segment(&name)?),
                None,
            )
            .await?;
            if !args.json {
                println!("group {name} deleted");
            }
        }
    }
    Ok(0)
}

pub async fn api_key(args: ClientArgs, cmd: ApiKeyCommand) -> Result<u8> {
    let c = Client::new(&args)?;
    match cmd {
        ApiKeyCommand::Create {
            name,
            role,
            groups,
            expires_in,
            rate_limit,
            rate_burst,
        } => {
            let mut body = json!({"name": name, "role": role, "groups": groups});
            if let Some(d) = expires_in {
                body["expires_in_s"] = json!(d.as_secs());
            }
            if let (Some(per_s), Some(burst)) = (rate_limit, rate_burst) {
                body["rate_limit"] = json!({"per_s": per_s, "burst": burst});
            }
            let (_, k) = c.call(Method::POST, "/v1/api-keys", Some(&body)).await?;
            print_secret(&args, &k)?;
        }
        ApiKeyCommand::Show { id } => {
            let (_, k) = c
                .call(
                    Method::GET,
                    &format!("/v1/api-keys/{}", path_segment(&id)?),
                    None,
                )
                .await?;
            if args.json {
                print_json(&k)?;
            } else {
                for (label, field) in [
                    ("id", "id"),
                    ("name", "name"),
                    ("role", "role"),
                    ("prefix", "prefix"),
                    ("created", "created_at"),
                    ("expires", "expires_at"),
                    ("last used", "last_used_at"),
                    ("rotated", "rotated_at"),
                ] {
                    println!("{:<11}{}", format!("{label}:"), or_never(&k[field]));
                }
                println!("{:<11}{}", "groups:", list(&k["groups"]));
                println!("{:<11}{}", "rate limit:", rate(&k["rate_limit"]));
            }
        }
        ApiKeyCommand::Rotate { id, expires_in } => {
            let body = match expires_in {
                Some(d) => json!({"expires_in_s": d.as_secs()}),
                None => json!({}),
            };
            let (_, k) = c
                .call(
                    Method::POST,
                    &format!("/v1/api-keys/{}/rotate", path_segment(&id)?),
                    Some(&body),
                )
                .await?;
            print_secret(&args, &k)?;
        }
        ApiKeyCommand::Ls => {
            let (_, v) = c.call(Method::GET, "/v1/api-keys", None).await?;
            if args.json {
                print_json(&v)?;
            } else {
                let rows = v["api_keys"]
                    .as_array()
                    .map(|ks| {
                        ks.iter()
                            .map(|k| {
                                vec![
                                    s(&k["id"]),
                                    s(&k["name"]),
                                    s(&k["role"]),
                                    list(&k["groups"]),
                                    format!("{}…", s(&k["prefix"])),
                                    s(&k["created_at"]),
                                    or_never(&k["expires_at"]),
                                    or_never(&k["last_used_at"]),
                                ]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                print_table(
                    &[
                        "ID",
                        "NAME",
                        "ROLE",
                        "GROUPS",
                        "PREFIX",
                        "CREATED",
                        "EXPIRES",
                        "LAST USED",
                    ],
                    rows,
                );
            }
        }
        ApiKeyCommand::Rm { id } => {
            c.call(
                Method::DELETE,
                &format!("/v1/api-keys/{}", path_segment(&id)?),
                None,
            )
            .await?;
            if !args.json {
                println!("API key {id} deleted");
            }
        }
    }
    Ok(0)
}

pub async fn audit(args: ClientArgs, a: AuditArgs) -> Result<u8> {
    let c = Client::new(&args)?;
    let mut q = vec![format!("limit={}", a.limit)];
    if let Some(d) = a.since {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .context("the clock is before 1970")?;
        q.push(format!("since={}", now.saturating_sub(d).as_secs()));
    }
    if let Some(k) = &a.key {
        q.push(format!("key={}", path_segment(k)?));
    }
    if let Some(g) = &a.group {
        q.push(format!("group={}", path_segment(g)?));
    }
    let (_, v) = c
        .call(Method::GET, &format!("/v1/audit?{}", q.join("&")), None)
        .await?;
    if args.json {
        print_json(&v)?;
        return Ok(0);
    }
    let rows = v["events"]
        .as_array()
        .map(|es| {
            es.iter()
                .map(|e| {
                    vec![
                        s(&e["at"]),
                        if e["key_id"].is_null() {
                            "-".to_string()
                        } else {
                            s(&e["key_id"])
                        },
                        e["status"].to_string(),
                        s(&e["action"]).split(' ').next().unwrap_or("").to_string(),
                        s(&e["target"]),
                        s(&e["request_id"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    print_table(
        &["TIME", "KEY", "STATUS", "METHOD", "PATH", "REQUEST ID"],
        rows,
    );
    Ok(0)
}

/// A created or rotated key: its secret, the only time it is shown.
fn print_secret(args: &ClientArgs, k: &Value) -> Result<()> {
    if args.json {
        return print_json(k);
    }
    println!("id:      {}", s(&k["id"]));
    println!("role:    {}", s(&k["role"]));
    println!("groups:  {}", list(&k["groups"]));
    println!("expires: {}", or_never(&k["expires_at"]));
    println!("key:     {}", s(&k["key"]));
    eprintln!("The key is shown only this once: store it now.");
    Ok(())
}

/// A time, or "never" for null.
fn or_never(v: &Value) -> String {
    if v.is_null() {
        "never".to_string()
    } else {
        s(v)
    }
}

fn rate(v: &Value) -> String {
    if v.is_null() {
        "the daemon's".to_string()
    } else {
        format!("{}/s, bursts of {}", v["per_s"], v["burst"])
    }
}

/// The group name and the PUT body from a file and flags.
fn apply_body(a: &ApplyArgs) -> Result<(String, Value)> {
    let mut spec = match &a.file {
        Some(f) => {
            let text = if f == "-" {
                let mut t = String::new();
                std::io::stdin()
                    .read_to_string(&mut t)
                    .context("reading stdin")?;
                t
            } else {
                std::fs::read_to_string(f).with_context(|| format!("reading {f}"))?
            };
            match serde_json::from_str(&text).with_context(|| format!("{f} is not valid JSON"))? {
                Value::Object(m) => m,
                _ => bail!("{f} must hold a JSON object (the group spec)"),
            }
        }
        None => Map::new(),
    };
    let file_name = match spec.remove("name") {
        Some(Value::String(n)) => Some(n),
        Some(_) => bail!("\"name\" in the file must be a string"),
        None => None,
    };
    let name = a
        .name
        .clone()
        .or(file_name)
        .context("give the group's name with --name or as \"name\" in the file")?;
    let mut set = |path: &[&str], v: Value| {
        let mut m = &mut spec;
        for p in &path[..path.len() - 1] {
            let e = m.entry(p.to_string()).or_insert_with(|| json!({}));
            if !e.is_object() {
                *e = json!({});
            }
            // Just made sure it is an object.
            m = match e {
                Value::Object(o) => o,
                _ => unreachable!(),
            };
        }
        m.insert(path[path.len() - 1].to_string(), v);
    };
    if let Some(v) = &a.image {
        set(&["image"], json!(v));
    }
    if let Some(v) = &a.tier {
        set(&["tier"], json!(v));
    }
    if let Some(v) = a.pool_size {
        set(&["pool", "size"], json!(v));
    }
    if let Some(v) = &a.idle_timeout {
        set(
            &["lifecycle", "idle_timeout_s"],
            secs_or_never("--idle-timeout", v)?,
        );
    }
    if let Some(v) = &a.on_idle {
        set(&["lifecycle", "on_idle"], json!(v));
    }
    if let Some(v) = &a.suspended_ttl {
        set(
            &["lifecycle", "suspended_ttl_s"],
            secs_or_never("--suspended-ttl", v)?,
        );
    }
    if let Some(v) = &a.max_lifetime {
        set(
            &["lifecycle", "max_lifetime_s"],
            secs_or_never("--max-lifetime", v)?,
        );
    }
    if let Some(v) = &a.egress_default {
        set(&["egress", "default"], json!(v));
    }
    let flags = [
        ("--deny", "host", &a.deny),
        ("--deny-cidr", "cidr", &a.deny_cidr),
        ("--allow", "host", &a.allow),
        ("--allow-cidr", "cidr", &a.allow_cidr),
    ];
    if flags.iter().any(|(_, _, v)| !v.is_empty()) {
        let mut rules = Vec::new();
        for (flag, key, values) in flags {
            for r in values {
                rules.push(parse_rule(flag, key, r)?);
            }
        }
        set(&["egress", "rules"], Value::Array(rules));
    }
    for (field, v) in [
        ("max_flows", a.max_flows),
        ("new_flows_per_s", a.new_flows_per_s),
        ("dns_qps", a.dns_qps),
        ("bandwidth", a.bandwidth),
    ] {
        if let Some(v) = v {
            set(&["network_limits", field], json!(v));
        }
    }
    for (flag, values, path) in [
        ("--label", &a.labels, &["labels"][..]),
        (
            "--node-label",
            &a.node_labels,
            &["placement", "node_labels"][..],
        ),
    ] {
        if values.is_empty() {
            continue;
        }
        let mut labels = Map::new();
        for l in values {
            let (k, v) = l
                .split_once('=')
                .with_context(|| format!("invalid {flag} {l:?}: expected KEY=VALUE"))?;
            labels.insert(k.to_string(), json!(v));
        }
        set(path, Value::Object(labels));
    }
    if let Some(v) = &a.placement {
        set(&["placement", "strategy"], json!(v));
    }
    if let Some(v) = a.identity {
        set(&["identity", "enabled"], json!(v));
    }
    if !a.identity_audiences.is_empty() {
        set(&["identity", "audiences"], json!(a.identity_audiences));
    }
    if let Some(v) = a.identity_ttl {
        set(&["identity", "ttl_s"], json!(v));
    }
    if let Some(v) = &a.identity_subject {
        set(&["identity", "subject"], json!(v));
    }
    if let Some(v) = a.identity_in_guest {
        set(&["identity", "in_guest"], json!(v));
    }
    Ok((path_segment(&name)?, Value::Object(spec)))
}

fn secs_or_never(flag: &str, v: &str) -> Result<Value> {
    if v == "never" {
        return Ok(Value::Null);
    }
    v.parse::<u64>()
        .map(|n| json!(n))
        .map_err(|_| anyhow!("invalid {flag} {v:?}: expected whole seconds or \"never\""))
}

/// The rule of one `--allow`, `--deny`, `--allow-cidr` or `--deny-cidr`: `TARGET` or
/// `TARGET:PORT,PORT`, where `key` (`host` or `cidr`) says what TARGET is. The daemon checks
/// the target itself.
fn parse_rule(flag: &str, key: &str, r: &str) -> Result<Value> {
    let (target, ports) = match r.rsplit_once(':') {
        Some((t, p)) => {
            let ports = p
                .split(',')
                .map(|x| x.parse::<u16>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| {
                    anyhow!(
                        "invalid {flag} {r:?}: ports must be numbers 1–65535, like \
                         {}:443,8443",
                        if key == "host" {
                            "host"
                        } else {
                            "203.0.113.0/24"
                        }
                    )
                })?;
            (t, ports)
        }
        None => (r, Vec::new()),
    };
    let mut rule = json!({key: target, "ports": ports});
    if flag.starts_with("--deny") {
        rule["action"] = json!("deny");
    }
    Ok(rule)
}

/// Percent-encodes what would change a URL's structure; the daemon validates the name itself.
pub(crate) fn path_segment(s: &str) -> Result<String> {
    // URL parsers resolve "." and ".." segments (even percent-encoded), which would send the
    // request to another endpoint.
    if s.is_empty() || s == "." || s == ".." {
        bail!("invalid name {s:?}");
    }
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Ok(out)
}

pub(crate) fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

fn list(v: &Value) -> String {
    let items: Vec<String> = v
        .as_array()
        .map(|a| a.iter().map(s).collect())
        .unwrap_or_default();
    if items.is_empty() {
        "-".to_string()
    } else {
        items.join(",")
    }
}

pub(crate) fn labels(v: &Value) -> String {
    let items: Vec<String> = v
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k}={}", s(v))).collect())
        .unwrap_or_default();
    if items.is_empty() {
        "-".to_string()
    } else {
        items.join(",")
    }
}

fn egress(e: &Value) -> String {
    let rules = e["rules"].as_array().map_or(0, Vec::len);
    format!("{} +{rules}", s(&e["default"]))
}

/// One rule as `allow *.pypi.org:443`, `deny 203.0.113.0/24 udp`.
fn egress_rule(r: &Value) -> String {
    let target = if r["host"].is_string() {
        s(&r["host"])
    } else {
        s(&r["cidr"])
    };
    let ports = list(&r["ports"]);
    let mut out = format!("{} {target}", s(&r["action"]));
    if ports != "-" {
        out.push_str(&format!(":{ports}"));
    }
    if r["protocol"] == "udp" {
        out.push_str(" udp");
    }
    out
}

fn group_row(g: &Value) -> Vec<String> {
    let sp = &g["spec"];
    vec![
        s(&g["name"]),
        s(&sp["image"]),
        s(&sp["tier"]),
        s(&sp["pool"]["size"]),
        egress(&sp["egress"]),
        labels(&sp["labels"]),
        s(&g["updated_at"]),
    ]
}

fn print_group(g: &Value) {
    let sp = &g["spec"];
    let l = &sp["lifecycle"];
    let secs = |v: &Value| match v {
        Value::Null => "never".to_string(),
        v => format!("{}s", s(v)),
    };
    let rules: Vec<String> = sp["egress"]["rules"]
        .as_array()
        .map(|rs| rs.iter().map(egress_rule).collect())
        .unwrap_or_default();
    println!("name:       {}", s(&g["name"]));
    println!("image:      {}", s(&sp["image"]));
    println!("tier:       {}", s(&sp["tier"]));
    println!(
        "pool:       {} ({} ready)",
        s(&sp["pool"]["size"]),
        s(&g["status"]["pool_ready"])
    );
    println!(
        "lifecycle:  idle {} then {}, suspended ttl {}, max lifetime {}",
        secs(&l["idle_timeout_s"]),
        s(&l["on_idle"]),
        secs(&l["suspended_ttl_s"]),
        secs(&l["max_lifetime_s"])
    );
    println!(
        "egress:     {} by default{}",
        s(&sp["egress"]["default"]),
        if rules.is_empty() {
            String::new()
        } else {
            format!("; rules: {}", rules.join(", "))
        }
    );
    println!("labels:     {}", labels(&sp["labels"]));
    println!(
        "placement:  {} on nodes with {}",
        s(&sp["placement"]["strategy"]),
        match labels(&sp["placement"]["node_labels"]).as_str() {
            "-" => "any labels".to_string(),
            l => l.to_string(),
        }
    );
    let id = &sp["identity"];
    if id["enabled"] == json!(true) {
        let auds: Vec<String> = id["audiences"]
            .as_array()
            .map(|a| a.iter().map(s).collect())
            .unwrap_or_default();
        println!(
            "identity:   subject {}, ttl {}s, in guest {}, audiences {}",
            s(&id["subject"]),
            s(&id["ttl_s"]),
            s(&id["in_guest"]),
            auds.join(", ")
        );
    } else {
        println!("identity:   off");
    }
    println!("created:    {}", s(&g["created_at"]));
    println!("updated:    {}", s(&g["updated_at"]));
}

pub(crate) fn print_json(v: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub(crate) fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_rules() {
        assert_eq!(
            parse_rule("--allow", "host", "a.com").unwrap(),
            json!({"host": "a.com", "ports": []})
        );
        assert_eq!(
            parse_rule("--allow", "host", "*.a.com:443,80").unwrap(),
            json!({"host": "*.a.com", "ports": [443, 80]})
        );
        assert_eq!(
            parse_rule("--deny-cidr", "cidr", "203.0.113.0/24:5432").unwrap(),
            json!({"cidr": "203.0.113.0/24", "ports": [5432], "action": "deny"})
        );
        assert_eq!(
            parse_rule("--deny", "host", "x.a.com").unwrap(),
            json!({"host": "x.a.com", "ports": [], "action": "deny"})
        );
        let e = parse_rule("--allow", "host", "a.com:https").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid --allow \"a.com:https\": ports must be numbers 1–65535, like host:443,8443"
        );
        assert!(parse_rule("--allow", "host", "a.com:70000").is_err());
        let e = parse_rule("--allow-cidr", "cidr", "203.0.113.0/24:x").unwrap_err();
        assert!(
            e.to_string().contains("like 203.0.113.0/24:443,8443"),
            "{e}"
        );
    }

    #[test]
    fn never_is_null() {
        assert_eq!(secs_or_never("--x", "never").unwrap(), Value::Null);
        assert_eq!(secs_or_never("--x", "30").unwrap(), json!(30));
        assert!(secs_or_never("--x", "-1").is_err());
    }

    #[test]
    fn segments_are_escaped() {
        assert_eq!(path_segment("a-b").unwrap(), "a-b");
        assert_eq!(path_segment("../x").unwrap(), "..%2Fx");
        assert!(path_segment("..").is_err());
    }
}
