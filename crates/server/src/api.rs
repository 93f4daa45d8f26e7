//! The types of the HTTP API (requests and responses) and their validation. The OpenAPI
//! document is generated from these, so they are the single description of the wire format.
//! Requests reject unknown fields: a typo must fail loudly, not be silently ignored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{Error, Result};

/// `{"error": {"code", "message"}}`: the body of every error response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorDetail {
    /// Stable and machine-readable: bad_request, unauthorized, forbidden, not_found,
    /// method_not_allowed, conflict, payload_too_large, too_many_requests, unavailable,
    /// no_space, internal.
    pub code: String,
    /// For people: what was wrong and, for bad input, what is allowed.
    pub message: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// Always "ok" when the daemon answers.
    pub status: String,
    pub version: String,
    /// Whether sandboxes can run yet: a daemon on a fresh MOAT_HOME prepares them first.
    pub sandboxes: crate::readiness::SandboxesHealth,
}

pub use moat_vm::Tier;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnIdle {
    #[default]
    Suspend,
    Delete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EgressDefault {
    #[default]
    Deny,
    Allow,
}

/// A sandbox group's settings. Every field is optional in a request; the stored and returned
/// spec has every default filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct GroupSpec {
    /// Default image (name or sha256 digest) of the group's sandboxes.
    #[schema(example = "base")]
    pub image: String,
    pub tier: Tier,
    pub pool: PoolSpec,
    pub lifecycle: LifecycleSpec,
    pub egress: EgressSpec,
    /// Kubernetes-style labels (at most 64).
    pub labels: BTreeMap<String, String>,
}

impl Default for GroupSpec {
    fn default() -> Self {
        GroupSpec {
            image: "base".to_string(),
            tier: Tier::default(),
            pool: PoolSpec::default(),
            lifecycle: LifecycleSpec::default(),
            egress: EgressSpec::default(),
            labels: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSpec {
    /// Ready sandboxes kept warm for this group, 0–64.
    #[schema(maximum = 64)]
    pub size: u32,
}

/// Timers of a group's sandboxes. `null` means "never".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleSpec {
    /// Seconds without exec, file or shell activity and without a running background
    /// process before `on_idle` applies (1 s – 7 days; default 300).
    pub idle_timeout_s: Option<u64>,
    pub on_idle: OnIdle,
    /// Seconds a suspended sandbox is kept before it is deleted (1 s – 90 days; default 7 days).
    pub suspended_ttl_s: Option<u64>,
    /// Upper bound on a sandbox's whole life, after which it is deleted (1 s – 365 days;
    /// default none).
    pub max_lifetime_s: Option<u64>,
}

impl Default for LifecycleSpec {
    fn default() -> Self {
        LifecycleSpec {
            idle_timeout_s: Some(300),
            on_idle: OnIdle::Suspend,
            suspended_ttl_s: Some(7 * DAY),
            max_lifetime_s: None,
        }
    }
}

const DAY: u64 = 86_400;

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct EgressSpec {
    /// What happens to a connection no rule allows.
    pub default: EgressDefault,
    /// Allowed destinations (at most 256 rules).
    pub rules: Vec<EgressRule>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressRule {
    /// An exact host name (`api.example.com`) or a suffix pattern (`*.example.com`, which
    /// matches sub-domains, not `example.com` itself). Lowercase.
    #[schema(example = "*.pypi.org")]
    pub host: String,
    /// Allowed ports, 1–65535 (at most 64); empty means every port.
    #[serde(default)]
    pub ports: Vec<u16>,
}

/// A sandbox group as the API returns it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub name: String,
    pub spec: GroupSpec,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub updated_at: String,
    #[serde(default)]
    pub status: GroupStatus,
}

/// What the group has right now: read from the daemon when it answers, not stored.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupStatus {
    /// Ready VMs in the group's warm pool: `spec.pool.size` once it is full, fewer while it
    /// refills after hand-overs.
    pub pool_ready: u32,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupList {
    pub groups: Vec<Group>,
}

/// `admin` manages everything, including API keys; `owner` manages its groups; `user` uses
/// sandboxes in its groups; `reader` reads its groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Reader,
    User,
    Owner,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::User => "user",
            Role::Owner => "owner",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "reader" => Some(Role::Reader),
            "user" => Some(Role::User),
            "owner" => Some(Role::Owner),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    /// For people: 1–64 printable characters.
    pub name: String,
    pub role: Role,
    /// Groups the key may see; required (non-empty) unless the role is admin, which sees all
    /// groups and takes none.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// An API key as listed: never the secret itself.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub groups: Vec<String>,
    /// The first characters of the key (`moat_` + 8), to recognise it.
    pub prefix: String,
    pub created_at: String,
}

/// The answer to a create: the only time the secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatedApiKey {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub groups: Vec<String>,
    pub prefix: String,
    pub created_at: String,
    /// The secret, `moat_` + 43 base62 characters. Shown once; store it now.
    pub key: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyList {
    pub api_keys: Vec<ApiKey>,
}

// ---- sandboxes ----

/// Where a sandbox is in its life. `failed` comes with a `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Creating,
    Running,
    Suspending,
    Suspended,
    Resuming,
    Deleting,
    Failed,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Suspending => "suspending",
            SandboxState::Suspended => "suspended",
            SandboxState::Resuming => "resuming",
            SandboxState::Deleting => "deleting",
            SandboxState::Failed => "failed",
        }
    }

    pub const ALL: [SandboxState; 7] = [
        SandboxState::Creating,
        SandboxState::Running,
        SandboxState::Suspending,
        SandboxState::Suspended,
        SandboxState::Resuming,
        SandboxState::Deleting,
        SandboxState::Failed,
    ];

    pub fn parse(s: &str) -> Option<SandboxState> {
        SandboxState::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// `POST /v1/sandbox-groups/{group}/sandboxes`. Every field is optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CreateSandbox {
    /// Image name or digest; default: the group's image.
    pub image: Option<String>,
    /// Default: the group's tier.
    pub tier: Option<Tier>,
    /// Environment of every exec in the sandbox, over the image's (an exec's own `env` wins).
    pub env: BTreeMap<String, String>,
    /// Kubernetes-style labels, for `?labels=` selectors.
    pub labels: BTreeMap<String, String>,
    /// Fork a snapshot of this group instead of starting the image: processes, memory and
    /// files as they were, with fresh entropy, clock and hostname. Excludes `image` and
    /// `tier` (the snapshot's are used).
    pub from_snapshot: Option<String>,
    /// With `from_snapshot`: how many forks, 1–16; the answer is then `{"sandboxes": […]}`.
    /// Either all of them are created or none.
    #[schema(minimum = 1, maximum = 16)]
    pub count: Option<u32>,
}

/// The most forks one create makes. Restores share the host's CPUs (each fork's QEMU loads a
/// ~100 MiB memory image; on a 2-core TCG host about 0.3 s of CPU each), so a larger burst
/// belongs in several requests or a warm pool.
pub const MAX_FORKS: u32 = 16;

/// A sandbox as the API returns it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Sandbox {
    /// `sb-` and 12 hex digits.
    pub id: String,
    pub group: String,
    pub state: SandboxState,
    /// Why the sandbox is `failed`; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Manifest digest of the image it runs.
    pub image: String,
    pub tier: Tier,
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub updated_at: String,
    /// The end of the last exec, file or shell request (RFC 3339, UTC; recorded within a
    /// second or so); absent if there was none yet. The idle timer counts from this, or from
    /// the last resume or the creation if later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity_at: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxList {
    pub sandboxes: Vec<Sandbox>,
}

/// `POST …/sandboxes/{id}/exec`: exactly one of `argv` and `command`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ExecRequest {
    /// Program and arguments, run as given (no image entrypoint, as `docker exec`); `argv[0]`
    /// is looked up in PATH when it has no '/'.
    pub argv: Option<Vec<String>>,
    /// A shell command line, run as `/bin/sh -c COMMAND`.
    pub command: Option<String>,
    /// Over the image's and the sandbox's environment.
    pub env: BTreeMap<String, String>,
    /// Absolute working directory; default: the image's, else the user's home.
    pub cwd: Option<String>,
    /// Name or uid, optionally `:group`; default: the image's user, else root.
    pub user: Option<String>,
    /// Given to the process as its standard input (then closed); without it stdin is empty.
    pub stdin: Option<String>,
    /// Kill the process and everything it started after this many seconds (0 < t ≤ 604800).
    pub timeout_s: Option<f64>,
}

/// How an exec ended, with its whole output.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecResult {
    /// As a shell reports it: the code, 128+N after signal N, 124 after the timeout, 127 when
    /// the command does not exist.
    pub exit_code: i32,
    /// The signal that ended the process, if one did.
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// Decoded as UTF-8; invalid bytes become U+FFFD.
    pub stdout: String,
    pub stderr: String,
}

/// The end of a streamed exec: `{"exit": ExecExit}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecExit {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub timed_out: bool,
}

/// One line of a streamed exec (`Accept: application/x-ndjson`): `{"stdout": "…"}`,
/// `{"stderr": "…"}` as output is produced, then one `{"exit": {…}}`; `{"error": {…}}` if the
/// exec broke off.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExecEvent {
    Stdout(String),
    Stderr(String),
    Exit(ExecExit),
    Error(ErrorDetail),
}

pub const MAX_ENV: usize = 256;
pub const MAX_ARGV: usize = 4096;

impl CreateSandbox {
    pub fn validate(&self) -> Result<()> {
        if let Some(img) = &self.image {
            validate_image(img)?;
        }
        match (&self.from_snapshot, self.count) {
            (Some(name), count) => {
                validate_name("snapshot name", name)?;
                if self.image.is_some() || self.tier.is_some() {
                    return Err(Error::BadRequest(
                        "from_snapshot excludes image and tier: a fork runs the snapshot's \
                         image and tier"
                            .to_string(),
                    ));
                }
                if let Some(n) = count {
                    if !(1..=MAX_FORKS).contains(&n) {
                        return Err(Error::BadRequest(format!(
                            "count must be 1–{MAX_FORKS}, got {n}"
                        )));
                    }
                }
            }
            (None, Some(_)) => {
                return Err(Error::BadRequest(
                    "count is only allowed with from_snapshot (an N-way fork)".to_string(),
                ))
            }
            (None, None) => {}
        }
        validate_env("env", &self.env)?;
        validate_labels(&self.labels)
    }
}

impl ExecRequest {
    /// The argv to run. Validates everything else too.
    pub fn validate(&self) -> Result<Vec<String>> {
        let argv = match (&self.argv, &self.command) {
            (Some(_), Some(_)) | (None, None) => {
                return bad(
                    "give exactly one of \"argv\" (a list) and \"command\" (a shell \
                            command line)"
                        .to_string(),
                )
            }
            (Some(argv), None) => {
                if argv.is_empty() || argv.len() > MAX_ARGV {
                    return bad(format!(
                        "invalid argv: expected 1–{MAX_ARGV} strings, got {}",
                        argv.len()
                    ));
                }
                if argv[0].is_empty() {
                    return bad("invalid argv: argv[0] is empty".to_string());
                }
                argv.clone()
            }
            (None, Some(c)) => {
                if c.trim().is_empty() {
                    return bad("invalid command: it is empty".to_string());
                }
                vec!["/bin/sh".into(), "-c".into(), c.clone()]
            }
        };
        if let Some(i) = argv.iter().position(|a| a.contains('\0')) {
            return bad(format!("invalid argv[{i}]: it contains a NUL byte"));
        }
        validate_env("env", &self.env)?;
        if let Some(w) = &self.cwd {
            if !w.starts_with('/') || w.contains('\0') {
                return bad(format!(
                    "invalid cwd {}: it must be an absolute path inside the sandbox",
                    quote(w)
                ));
            }
        }
        if let Some(u) = &self.user {
            if !moat_protocol::valid_user_spec(u) {
                return bad(format!(
                    "invalid user {}: use a name or uid, optionally followed by :group",
                    quote(u)
                ));
            }
        }
        if let Some(t) = self.timeout_s {
            if !(t.is_finite() && t > 0.0 && t <= 7.0 * DAY as f64) {
                return bad(format!(
                    "invalid timeout_s {t}: give a number of seconds above 0, at most {}",
                    7 * DAY
                ));
            }
        }
        Ok(argv)
    }

    pub fn timeout_ms(&self) -> Option<u64> {
        self.timeout_s.map(|t| (t * 1000.0).ceil() as u64)
    }
}

/// Parses a label selector `k=v,k2=v2` (every pair must match; `k=` matches an empty value).
pub fn parse_selector(s: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            return bad(format!(
                "invalid label selector {}: expected key=value[,key=value…]",
                quote(s)
            ));
        };
        validate_label_key(k)
            .map_err(|m| Error::BadRequest(format!("invalid selector key {}: {m}", quote(k))))?;
        validate_label_value(v)
            .map_err(|m| Error::BadRequest(format!("invalid selector value {}: {m}", quote(v))))?;
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

fn validate_image(img: &str) -> Result<()> {
    if img.is_empty()
        || img.len() > MAX_IMAGE_LEN
        || img.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return bad(format!(
            "invalid image {}: expected an image name or digest of 1–{MAX_IMAGE_LEN} \
             characters without spaces",
            quote(img)
        ));
    }
    Ok(())
}

/// Environment keys as a shell allows them; values without NUL.
fn validate_env(field: &str, env: &BTreeMap<String, String>) -> Result<()> {
    if env.len() > MAX_ENV {
        return bad(format!(
            "too many {field} variables ({}): at most {MAX_ENV}",
            env.len()
        ));
    }
    for (k, v) in env {
        let key_ok = !k.is_empty()
            && k.len() <= 256
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !key_ok {
            return bad(format!(
                "invalid {field} key {}: letters, digits and '_', not starting with a digit",
                quote(k)
            ));
        }
        if v.contains('\0') {
            return bad(format!(
                "invalid {field} value of {k}: it contains a NUL byte"
            ));
        }
    }
    Ok(())
}

fn validate_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    if labels.len() > MAX_LABELS {
        return bad(format!(
            "too many labels ({}): at most {MAX_LABELS}",
            labels.len()
        ));
    }
    for (k, v) in labels {
        validate_label_key(k)
            .map_err(|m| Error::BadRequest(format!("invalid label key {}: {m}", quote(k))))?;
        validate_label_value(v).map_err(|m| {
            Error::BadRequest(format!(
                "invalid value {} of label {}: {m}",
                quote(v),
                quote(k)
            ))
        })?;
    }
    Ok(())
}

// ---- validation ----

pub const MAX_LABELS: usize = 64;
pub const MAX_EGRESS_RULES: usize = 256;
pub const MAX_PORTS: usize = 64;
pub const MAX_POOL: u32 = 64;
pub const MAX_IMAGE_LEN: usize = 512;

/// Group names: lowercase letters, digits and '-', 1–63 chars, not starting or ending with '-'
/// (a DNS label, so a name can later appear in host names and paths without escaping).
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "invalid {what} {}: allowed are 1–63 lowercase letters, digits and '-', not \
             starting or ending with '-'",
            quote(name)
        )))
    }
}

impl GroupSpec {
    pub fn validate(&self) -> Result<()> {
        validate_image(&self.image)?;
        if self.pool.size > MAX_POOL {
            return bad(format!(
                "invalid pool.size {}: allowed is 0–{MAX_POOL}",
                self.pool.size
            ));
        }
        let l = &self.lifecycle;
        // From 1 s: timers are honoured to within a second, and short ones are how tests and
        // throw-away sandboxes use them.
        check_range("lifecycle.idle_timeout_s", l.idle_timeout_s, 1, 7 * DAY)?;
        check_range("lifecycle.suspended_ttl_s", l.suspended_ttl_s, 1, 90 * DAY)?;
        check_range("lifecycle.max_lifetime_s", l.max_lifetime_s, 1, 365 * DAY)?;
        if self.egress.rules.len() > MAX_EGRESS_RULES {
            return bad(format!(
                "too many egress.rules ({}): at most {MAX_EGRESS_RULES}",
                self.egress.rules.len()
            ));
        }
        for (i, rule) in self.egress.rules.iter().enumerate() {
            validate_host_pattern(&rule.host)
                .map_err(|m| Error::BadRequest(format!("invalid egress.rules[{i}].host: {m}")))?;
            if rule.ports.len() > MAX_PORTS {
                return bad(format!(
                    "too many egress.rules[{i}].ports ({}): at most {MAX_PORTS}",
                    rule.ports.len()
                ));
            }
            if rule.ports.contains(&0) {
                return bad(format!(
                    "invalid egress.rules[{i}].ports: port 0; allowed are 1–65535 (an empty \
                     list allows every port)"
                ));
            }
        }
        validate_labels(&self.labels)?;
        Ok(())
    }
}

impl CreateApiKey {
    pub fn validate(&self) -> Result<()> {
        let n = self.name.trim();
        if n.is_empty() || self.name.chars().count() > 64 || self.name.chars().any(char::is_control)
        {
            return bad(format!(
                "invalid name {}: expected 1–64 printable characters",
                quote(&self.name)
            ));
        }
        match self.role {
            Role::Admin if !self.groups.is_empty() => {
                return bad("an admin key sees every group: give it no groups".to_string())
            }
            Role::Admin => {}
            _ if self.groups.is_empty() => {
                return bad(format!(
                    "a {} key needs at least one group in \"groups\"",
                    self.role.as_str()
                ))
            }
            _ => {}
        }
        if self.groups.len() > 64 {
            return bad(format!(
                "too many groups ({}): at most 64",
                self.groups.len()
            ));
        }
        for g in &self.groups {
            validate_name("group name", g)?;
        }
        Ok(())
    }
}

fn bad<T>(m: String) -> Result<T> {
    Err(Error::BadRequest(m))
}

/// A user-supplied string shown in an error message, quoted and cut so that a huge or
/// multi-line value cannot flood the message.
pub fn quote(s: &str) -> String {
    const MAX: usize = 80;
    if s.chars().count() > MAX {
        let cut: String = s.chars().take(MAX).collect();
        format!("{:?}…", cut)
    } else {
        format!("{s:?}")
    }
}

fn check_range(field: &str, v: Option<u64>, min: u64, max: u64) -> Result<()> {
    match v {
        Some(x) if x < min || x > max => bad(format!(
            "invalid {field} {x}: allowed is {min}–{max} seconds, or null for never"
        )),
        _ => Ok(()),
    }
}

/// `exact.host.name` or `*.suffix`: lowercase DNS labels, ≤ 253 characters in all.
pub fn validate_host_pattern(p: &str) -> std::result::Result<(), String> {
    let allowed = "expected an exact host name (\"api.example.com\") or \"*.\" and a domain \
                   (\"*.example.com\"): lowercase letters, digits, '-' and '.'";
    let name = p.strip_prefix("*.").unwrap_or(p);
    if name.is_empty() || name.len() > 253 {
        return Err(format!("{}: {allowed}", quote(p)));
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!("{}: {allowed}", quote(p)));
        }
    }
    Ok(())
}

/// Kubernetes label keys: an optional DNS-subdomain prefix and '/', then a name of ≤ 63
/// characters, alphanumeric at both ends, with '-', '_' and '.' inside.
pub fn validate_label_key(k: &str) -> std::result::Result<(), String> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !ok {
            return Err(
                "the prefix before '/' must be a lowercase DNS subdomain of at most 253 \
                        characters"
                    .to_string(),
            );
        }
    }
    if name.is_empty() || !label_name_ok(name) {
        return Err(
            "expected [prefix/]name, name 1–63 characters of letters, digits, '-', '_' \
                    and '.', starting and ending with a letter or digit"
                .to_string(),
        );
    }
    Ok(())
}

pub fn validate_label_value(v: &str) -> std::result::Result<(), String> {
    if v.is_empty() || label_name_ok(v) {
        Ok(())
    } else {
        Err(
            "expected at most 63 characters of letters, digits, '-', '_' and '.', starting and \
             ending with a letter or digit (or empty)"
                .to_string(),
        )
    }
}

fn label_name_ok(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() <= 63
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "team-a", "a1", &"x".repeat(63)] {
            validate_name("group name", ok).unwrap();
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "é", &"x".repeat(64)] {
            let e = validate_name("group name", bad).unwrap_err().to_string();
            assert!(e.contains("lowercase letters"), "{e}");
        }
    }

    #[test]
    fn host_patterns() {
        for ok in [
            "example.com",
            "*.example.com",
            "localhost",
            "a-1.b2.io",
            "*.io",
        ] {
            validate_host_pattern(ok).unwrap();
        }
        for bad in [
            "",
            "*",
            "*.",
            "**.a.com",
            "a.*.com",
            "*a.com",
            "Example.com",
            "a..b",
            "-a.com",
            "a.com.",
            "a b.com",
            "a.com:443",
            "http://a.com",
        ] {
            assert!(validate_host_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn labels() {
        for ok in ["app", "app.kubernetes.io/name", "a_b-c.d", "x/Y"] {
            validate_label_key(ok).unwrap();
        }
        for bad in ["", "/a", "a/", "-a", "a-", "A/b", "a/b/c", &"x".repeat(64)] {
            assert!(validate_label_key(bad).is_err(), "{bad}");
        }
        for ok in ["", "v1", "a.b_c-d"] {
            validate_label_value(ok).unwrap();
        }
        for bad in ["-v", "v ", "ü", &"x".repeat(64)] {
            assert!(validate_label_value(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn spec_defaults_and_bounds() {
        let s: GroupSpec = serde_json::from_str("{}").unwrap();
        assert_eq!(s, GroupSpec::default());
        s.validate().unwrap();
        // explicit null means "never"
        let s: GroupSpec =
            serde_json::from_str(r#"{"lifecycle": {"idle_timeout_s": null}}"#).unwrap();
        assert_eq!(s.lifecycle.idle_timeout_s, None);
        assert_eq!(s.lifecycle.suspended_ttl_s, Some(7 * DAY));
        s.validate().unwrap();

        let e = serde_json::from_str::<GroupSpec>(r#"{"imgae": "x"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown field `imgae`") && e.contains("`image`"),
            "{e}"
        );
        let e = serde_json::from_str::<GroupSpec>(r#"{"tier": "huge"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`xs`") && e.contains("`xl`"), "{e}");

        let mut s = GroupSpec::default();
        s.pool.size = 65;
        assert!(s.validate().unwrap_err().to_string().contains("0–64"));
        let mut s = GroupSpec::default();
        s.lifecycle.idle_timeout_s = Some(0);
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("idle_timeout_s"));
        let mut s = GroupSpec::default();
        s.egress.rules.push(EgressRule {
            host: "x.com".into(),
            ports: vec![0],
        });
        assert!(s.validate().unwrap_err().to_string().contains("port 0"));
        let mut s = GroupSpec::default();
        s.labels.insert("ok".into(), "bad value".into());
        assert!(s.validate().unwrap_err().to_string().contains("label"));
        let s = GroupSpec {
            image: "a b".into(),
            ..Default::default()
        };
        assert!(s.validate().is_err());
    }

    #[test]
    fn api_key_requests() {
        let k = |role, groups: &[&str]| CreateApiKey {
            name: "ci".into(),
            role,
            groups: groups.iter().map(|s| s.to_string()).collect(),
        };
        k(Role::Admin, &[]).validate().unwrap();
        k(Role::User, &["a"]).validate().unwrap();
        assert!(k(Role::Admin, &["a"]).validate().is_err());
        assert!(k(Role::Reader, &[]).validate().is_err());
        assert!(k(Role::Owner, &["Bad"]).validate().is_err());
        let mut x = k(Role::User, &["a"]);
        x.name = "".into();
        assert!(x.validate().is_err());
    }

    #[test]
    fn quoting_is_bounded() {
        let q = quote(&"x".repeat(10_000));
        assert!(q.len() < 100);
    }
}

/// `POST …/sandboxes/{id}/snapshots`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// Unique in the group: 1–63 of [a-z0-9-], not starting or ending with '-'.
    #[schema(example = "after-setup")]
    pub name: String,
}

/// A named snapshot of a sandbox (memory and disk), scoped to a group. It does not depend on
/// its source sandbox: deleting that leaves the snapshot intact.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub name: String,
    pub group: String,
    /// Id of the sandbox it was taken from (which may since have been deleted).
    pub sandbox: String,
    /// Manifest digest of the image.
    pub image: String,
    pub tier: Tier,
    /// Bytes it takes on the host (memory image and disk layer).
    pub size_bytes: u64,
    /// RFC 3339, UTC.
    pub created_at: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotList {
    pub snapshots: Vec<Snapshot>,
}

/// The answer to a create: one sandbox, or (with `count`) the list of forks.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Created {
    One(Sandbox),
    Many(SandboxList),
}
