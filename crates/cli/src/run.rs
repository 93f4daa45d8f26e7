//! `moat run`: a command in a fresh sandbox, its output streamed, its exit code returned, and
//! the sandbox gone afterwards, whatever happens (Ctrl-C and SIGTERM included).

use anyhow::{bail, Context, Result};
use clap::Args;
use moat_image::{Image, ImageStore};
use moat_net::{Action, EgressRule, EgressSpec, Policy, Protocol};
use moat_protocol::{ErrorKind, ExecRequest};
use moat_vm::agent::ExecEvent;
use moat_vm::{Sandbox, Tier};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{signal, SignalKind};

use crate::home::Home;
use crate::progress::Bars;
use moat_server::prepare::BASE_IMAGE;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Image name or digest (default: the base image; with --group, the group's).
    pub(crate) image: Option<String>,
    /// Set an environment variable (KEY=VALUE); repeatable.
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub(crate) env: Vec<String>,
    /// Working directory inside the sandbox (absolute).
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub(crate) workdir: Option<String>,
    /// User to run as: a name or uid from the image, optionally with `:group`.
    #[arg(short = 'u', long = "user")]
    pub(crate) user: Option<String>,
    /// Forward this process's stdin to the command (with --group: read whole first, as
    /// `moat sandbox exec -i`).
    #[arg(short = 'i', long = "interactive")]
    pub(crate) interactive: bool,
    /// Kill the command and everything it started after this many seconds (exit code 124).
    #[arg(long, value_name = "SECS", allow_negative_numbers = true)]
    pub(crate) timeout: Option<f64>,
    /// Resource tier: xs, s, m, l, xl (default m; with --group, the group's).
    #[arg(long)]
    pub(crate) tier: Option<String>,
    /// Run through the moat daemon (MOAT_URL, MOAT_API_KEY) in a sandbox of this group,
    /// created for the command and deleted after it. CMD is then required.
    #[arg(long, value_name = "GROUP")]
    pub(crate) group: Option<String>,
    /// Let the sandbox reach HOST (an exact name, or `*.suffix` for the names under it), on
    /// PORT or on every port; repeatable. Without any --allow or --allow-cidr the sandbox
    /// reaches nothing (its DNS answers every name with NXDOMAIN).
    #[arg(long, value_name = "HOST[:PORT]")]
    pub(crate) allow: Vec<String>,
    /// Let the sandbox reach raw addresses in CIDR (IPv4), on PORT or on every port;
    /// repeatable. Private, loopback and link-local ranges stay closed whatever is allowed.
    #[arg(long, value_name = "CIDR[:PORT]")]
    pub(crate) allow_cidr: Vec<String>,
    /// A hosts(5) file: its names are answered from it instead of DNS, and its addresses are
    /// reachable for those names even in private ranges (how a local service is reached).
    /// The names must still be allowed with --allow.
    #[arg(long, value_name = "FILE")]
    pub(crate) egress_hosts: Option<std::path::PathBuf>,
    /// The DNS resolver the host asks for allowed names (default: the host's own).
    #[arg(long, value_name = "ADDR:PORT")]
    pub(crate) egress_resolver: Option<std::net::SocketAddr>,
    /// The command and its arguments (default: the image's entrypoint and command).
    #[arg(last = true)]
    pub(crate) cmd: Vec<String>,
}

/// Validated form of [`RunArgs`].
#[derive(Debug)]
struct RunPlan {
    tier: Tier,
    env: Vec<(String, String)>,
    workdir: Option<String>,
    user: Option<String>,
    timeout_ms: Option<u64>,
    net: NetPlan,
}

/// The sandbox's egress, from the flags: what the network stack's `start` carries.
#[derive(Debug)]
struct NetPlan {
    egress: EgressSpec,
    hosts: Option<String>,
    resolver: Option<std::net::SocketAddr>,
}

impl RunArgs {
    /// Whether any egress flag was given.
    pub(crate) fn has_egress_flags(&self) -> bool {
        !self.allow.is_empty()
            || !self.allow_cidr.is_empty()
            || self.egress_hosts.is_some()
            || self.egress_resolver.is_some()
    }

    /// The egress policy of the flags, in their order (--allow first), validated as a group
    /// policy is; an error names the flag.
    fn net_plan(&self) -> Result<NetPlan> {
        let mut rules = Vec::new();
        let mut flags = Vec::new();
        for a in &self.allow {
            let (host, ports) = split_port(a, "--allow", "HOST[:PORT]")?;
            rules.push(rule(Some(host), None, ports));
            flags.push(format!("--allow {a}"));
        }
        for a in &self.allow_cidr {
            let (cidr, ports) = split_port(a, "--allow-cidr", "CIDR[:PORT]")?;
            rules.push(rule(None, Some(cidr), ports));
            flags.push(format!("--allow-cidr {a}"));
        }
        let egress = EgressSpec {
            default: Action::Deny,
            rules,
        };
        if let Err(e) = Policy::new(egress.clone()) {
            match e {
                moat_net::Error::Invalid { field, message } => {
                    // `egress.rules[N].…`: the N-th rule came from the N-th flag.
                    let flag = field
                        .split_once("rules[")
                        .and_then(|(_, f)| f.split(']').next()?.parse::<usize>().ok())
                        .and_then(|i| flags.get(i));
                    match flag {
                        Some(flag) => bail!("invalid {flag}: {message}"),
                        None => bail!("invalid egress policy ({field}): {message}"),
                    }
                }
                e => return Err(e.into()),
            }
        }
        let hosts = match &self.egress_hosts {
            Some(path) => {
                // Parsed here for a clear error; the stack parses the text again.
                moat_net::HostsFile::load(path)?;
                Some(std::fs::read_to_string(path)?)
            }
            None => None,
        };
        Ok(NetPlan {
            egress,
            hosts,
            resolver: self.egress_resolver,
        })
    }

    fn plan(&self) -> Result<RunPlan> {
        let tier: Tier = self.tier.as_deref().unwrap_or("m").parse()?;
        let env = self
            .env
            .iter()
            .map(|e| parse_env(e))
            .collect::<Result<Vec<_>>>()?;
        if let Some(w) = &self.workdir {
            check_workdir(w)?;
        }
        if let Some(u) = &self.user {
            check_user(u)?;
        }
        let timeout_ms = self.timeout.map(timeout_ms).transpose()?;
        Ok(RunPlan {
            tier,
            env,
            workdir: self.workdir.clone(),
            user: self.user.clone(),
            timeout_ms,
            net: self.net_plan()?,
        })
    }
}

/// `X` or `X:PORT` (the last colon: IPv4 and names have none of their own).
fn split_port(a: &str, flag: &str, form: &str) -> Result<(String, Vec<u16>)> {
    match a.rsplit_once(':') {
        None => Ok((a.to_string(), Vec::new())),
        Some((x, p)) => match p.parse::<u16>() {
            Ok(port) if port > 0 && !x.is_empty() => Ok((x.to_string(), vec![port])),
            _ => bail!("invalid {flag} {a:?}: expected {form} with PORT 1–65535"),
        },
    }
}

fn rule(host: Option<String>, cidr: Option<String>, ports: Vec<u16>) -> EgressRule {
    EgressRule {
        host,
        cidr,
        ports,
        protocol: Protocol::Tcp,
        action: Action::Allow,
        transform: None,
    }
}

/// A working directory inside the sandbox: absolute, without NUL.
pub(crate) fn check_workdir(w: &str) -> Result<()> {
    if !w.starts_with('/') || w.contains('\0') {
        bail!("invalid workdir {w:?}: it must be an absolute path inside the sandbox");
    }
    Ok(())
}

/// A user spec: a name or uid, optionally `:group`.
pub(crate) fn check_user(u: &str) -> Result<()> {
    if !moat_protocol::valid_user_spec(u) {
        bail!("invalid user {u:?}: use a name or uid, optionally followed by :group");
    }
    Ok(())
}

/// A `--timeout` in seconds, as milliseconds (0 < t ≤ 7 days).
pub(crate) fn timeout_ms(t: f64) -> Result<u64> {
    if t.is_finite() && t > 0.0 && t <= 7.0 * 86400.0 {
        Ok((t * 1000.0).ceil() as u64)
    } else {
        bail!("invalid timeout {t}: give a number of seconds above 0, at most 604800")
    }
}

/// A `-e KEY=VALUE`.
pub(crate) fn parse_env(e: &str) -> Result<(String, String)> {
    let Some((k, v)) = e.split_once('=') else {
        bail!("invalid env {e:?}: expected KEY=VALUE");
    };
    let key_ok = !k.is_empty()
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !key_ok || v.contains('\0') {
        bail!(
            "invalid env {e:?}: KEY must be letters, digits and '_' (not starting with a digit) \
             and VALUE must not contain NUL"
        );
    }
    Ok((k.to_string(), v.to_string()))
}

/// The argv: the image's entrypoint followed by the given command, or by the image's command
/// when none is given (as `docker run` does).
fn argv(image: &Image, cmd: &[String]) -> Result<Vec<String>> {
    match image.config.run_argv(cmd) {
        Some(argv) => Ok(argv),
        None => {
            bail!("no command given and the image defines none: use `moat run IMAGE -- CMD [ARG…]`")
        }
    }
}

pub async fn run(home: &Home, accel: Option<&str>, args: RunArgs) -> Result<u8> {
    let plan = args.plan()?;
    // Signal handlers first, so a Ctrl-C at any point below reaches the cleanup path.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let work = run_inner(home, accel, &args, &plan);
    tokio::select! {
        r = work => r,
        _ = sigint.recv() => {
            eprintln!("moat: interrupted; sandbox removed");
            Ok(130)
        }
        _ = sigterm.recv() => Ok(143),
    }
    // Returning drops `work`, and with it the sandbox: QEMU is killed and its directory removed.
}

async fn run_inner(home: &Home, accel: Option<&str>, args: &RunArgs, plan: &RunPlan) -> Result<u8> {
    let store = ImageStore::open(&home.images())?;
    let name = args.image.as_deref().unwrap_or(BASE_IMAGE);
    let image = match store.resolve(name) {
        Ok(i) => i,
        Err(e) if e.is_not_found() && args.image.is_none() => {
            bail!("the base image is not installed: run `moat setup` first")
        }
        Err(e) => return Err(e.into()),
    };
    let argv = argv(&image, &args.cmd)?;
    let rt = home.runtime(accel)?;

    let bars = Bars::new();
    let template_ready = moat_vm::template::exists(&rt, &image.digest, plan.tier);
    if !template_ready {
        bars.spinner("first run of this image: booting it once to make a template");
    }
    let template = moat_vm::template::ensure(&rt, &image.digest, &image.rootfs, plan.tier).await;
    bars.finish();
    let template = template?;
    let id = format!("run-{}-{:08x}", std::process::id(), rand::random::<u32>());
    let sandbox = Sandbox::restore(&rt, &id, &template.dir).await?;
    start_network(&sandbox, &plan.net).await?;

    let request = ExecRequest {
        argv: argv.clone(),
        env: image.config.merged_env([&plan.env[..]]),
        cwd: plan
            .workdir
            .clone()
            .or_else(|| image.config.working_dir.clone()),
        user: plan.user.clone().or_else(|| image.config.user.clone()),
        stdin: args.interactive,
        timeout_ms: plan.timeout_ms,
        pty: None,
    };
    let code = stream_exec(&sandbox, request).await;
    tracing::debug!("command finished");
    sandbox.destroy().await;
    tracing::debug!("sandbox destroyed");
    match code {
        Ok(c) => Ok(c),
        Err(moat_vm::Error::Guest {
            kind: ErrorKind::CommandNotFound,
            message,
        }) => {
            eprintln!("moat: {message}");
            Ok(127)
        }
        Err(e) => Err(e.into()),
    }
}

/// Gives the sandbox's network stack its policy. Its decisions are logged (`-v` shows them)
/// for as long as the sandbox lives.
async fn start_network(sandbox: &Sandbox, net: &NetPlan) -> Result<()> {
    let (mut control, _hello) = moat_net::control::Client::connect(&sandbox.net_control_path())
        .await
        .context("connecting to the sandbox's network stack")?;
    let start = moat_net::control::Request::Start {
        egress: net.egress.clone(),
        hosts: net.hosts.clone(),
        resolver: net.resolver,
        limits: Default::default(),
        secrets: Default::default(),
        ca: None,
        upstream_ca: None,
        identity_header: None,
    };
    control
        .request(&start, log_egress)
        .await
        .context("starting the sandbox's network")?;
    // Ends when the stack does, with the sandbox.
    tokio::spawn(async move {
        while let Ok(Some(incoming)) = control.next_incoming().await {
            match incoming {
                moat_net::control::Incoming::Audit(event) => log_egress(event),
                // Workload identity is the daemon's (groups, an issuer): `moat run` has none.
                moat_net::control::Incoming::Mint { id, .. } => {
                    let no = "workload identity needs the daemon (moat serve) and a group with \
                              identity enabled"
                        .to_string();
                    if control.answer_mint(id, Err(no)).await.is_err() {
                        break;
                    }
                }
                // No identity header was given: the stack serves no endpoint to refuse in.
                moat_net::control::Incoming::IdentityRefused { .. } => {}
            }
        }
    });
    Ok(())
}

fn log_egress(e: moat_net::audit::Event) {
    tracing::info!(
        target: "moat::egress",
        kind = ?e.kind,
        name = e.name.as_deref().unwrap_or(""),
        address = e.address.as_deref().unwrap_or(""),
        port = e.port.unwrap_or(0),
        verdict = ?e.verdict,
        reason = %e.reason,
        "egress"
    );
}

/// Runs the exec, copying output to our stdout/stderr as it comes and stdin to the process.
async fn stream_exec(sandbox: &Sandbox, request: ExecRequest) -> Result<u8, moat_vm::Error> {
    let forward_stdin = request.stdin;
    let mut exec = sandbox.agent().exec(request).await?;
    let stdin_task = match exec.take_stdin() {
        Some(stdin) if forward_stdin => Some(tokio::spawn(async move {
            let mut input = tokio::io::stdin();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match input.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stdin.write(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = stdin.close().await;
        })),
        _ => None,
    };
    let mut out = tokio::io::stdout();
    let mut err = tokio::io::stderr();
    let status = loop {
        match exec.next().await? {
            ExecEvent::Stdout(d) => {
                // A closed stdout (say, `| head`) must not stop the command's accounting.
                let _ = out.write_all(&d).await;
                let _ = out.flush().await;
            }
            ExecEvent::Stderr(d) => {
                let _ = err.write_all(&d).await;
                let _ = err.flush().await;
            }
            ExecEvent::Exit(status) => break status,
        }
    };
    if let Some(t) = stdin_task {
        t.abort();
    }
    if status.timed_out {
        eprintln!("moat: command timed out; killed it and everything it started");
    }
    Ok(u8::try_from(status.shell_code()).unwrap_or(255))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> RunArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct W {
            #[command(flatten)]
            a: RunArgs,
        }
        let mut v = vec!["moat"];
        v.extend_from_slice(extra);
        W::try_parse_from(v).unwrap().a
    }

    #[test]
    fn parses_image_and_command() {
        let a = args(&["img", "-e", "A=1", "--", "ls", "-l"]);
        assert_eq!(a.image.as_deref(), Some("img"));
        assert_eq!(a.cmd, vec!["ls", "-l"]);
        let a = args(&["--", "true"]);
        assert_eq!(a.image, None);
        assert_eq!(a.cmd, vec!["true"]);
    }

    #[test]
    fn validates_inputs() {
        let err = |extra: &[&str]| args(extra).plan().unwrap_err().to_string();
        assert!(err(&["--tier", "huge", "--", "true"]).contains("invalid tier"));
        assert!(err(&["-e", "NOVALUE", "--", "true"]).contains("KEY=VALUE"));
        assert!(err(&["-e", "1A=x", "--", "true"]).contains("KEY must be"));
        assert!(err(&["-w", "rel/dir", "--", "true"]).contains("absolute"));
        assert!(err(&["-u", "a b", "--", "true"]).contains("invalid user"));
        assert!(err(&["--timeout", "0", "--", "true"]).contains("invalid timeout"));
        assert!(err(&["--timeout", "NaN", "--", "true"]).contains("invalid timeout"));
        let p = args(&["-e", "A=b=c", "--timeout", "1.5", "--tier", "xs", "--", "x"])
            .plan()
            .unwrap();
        assert_eq!(p.env, vec![("A".into(), "b=c".into())]);
        assert_eq!(p.timeout_ms, Some(1500));
        assert_eq!(p.tier, Tier::Xs);
    }

    #[test]
    fn egress_flags_become_a_validated_policy() {
        let p = args(&[
            "--allow",
            "pypi.org:443",
            "--allow",
            "*.example.com",
            "--allow-cidr",
            "203.0.113.0/24:5432",
            "--",
            "true",
        ])
        .plan()
        .unwrap();
        let rules: Vec<_> = p
            .net
            .egress
            .rules
            .iter()
            .map(|r| (r.host.as_deref(), r.cidr.as_deref(), r.ports.clone()))
            .collect();
        assert_eq!(
            rules,
            [
                (Some("pypi.org"), None, vec![443]),
                (Some("*.example.com"), None, vec![]),
                (None, Some("203.0.113.0/24"), vec![5432]),
            ]
        );
        assert_eq!(p.net.egress.default, Action::Deny);
        let none = args(&["--", "true"]).plan().unwrap();
        assert!(none.net.egress.rules.is_empty());

        let err = |extra: &[&str]| args(extra).plan().unwrap_err().to_string();
        let e = err(&["--allow", "ok.test", "--allow", "*", "--", "true"]);
        assert!(e.starts_with("invalid --allow *:"), "{e}");
        let e = err(&["--allow", "*.com", "--", "true"]);
        assert!(
            e.contains("--allow *.com") && e.contains("public suffix"),
            "{e}"
        );
        for (flag, value, says) in [
            ("--allow", "Upper.Test", "--allow Upper.Test"),
            ("--allow", "a.test:0", "PORT 1–65535"),
            ("--allow", "a.test:http", "HOST[:PORT]"),
            ("--allow-cidr", "10.0.0.0/8", "--allow-cidr 10.0.0.0/8"),
            (
                "--allow-cidr",
                "203.0.113.1/24",
                "--allow-cidr 203.0.113.1/24",
            ),
            ("--egress-hosts", "/nonexistent/hosts", "/nonexistent/hosts"),
        ] {
            let e = err(&[flag, value, "--", "true"]);
            assert!(e.contains(says), "{flag} {value}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 ok.test\nnot-an-address x.test\n").unwrap();
        let e = err(&["--egress-hosts", hosts.to_str().unwrap(), "--", "true"]);
        assert!(e.contains(":2:"), "{e}");
        std::fs::write(&hosts, "127.0.0.1 ok.test\n").unwrap();
        let p = args(&["--egress-hosts", hosts.to_str().unwrap(), "--", "true"])
            .plan()
            .unwrap();
        assert_eq!(p.net.hosts.as_deref(), Some("127.0.0.1 ok.test\n"));
    }

    #[test]
    fn env_merge_and_argv() {
        let image = Image {
            name: Some("x".into()),
            digest: "sha256:00".into(),
            size: 0,
            created: std::time::SystemTime::now(),
            config: moat_image::ImageConfig {
                env: vec!["A=1".into(), "B=2".into()],
                working_dir: None,
                user: None,
                entrypoint: vec!["/entry".into()],
                cmd: vec!["default".into()],
            },
            rootfs: "/nonexistent".into(),
        };
        let env = image
            .config
            .merged_env([&[("B".to_string(), "3".to_string())][..]]);
        assert_eq!(env[..2], ["A=1".to_string(), "B=3".to_string()]);
        assert!(env.iter().any(|e| e.starts_with("PATH=")));
        assert_eq!(argv(&image, &[]).unwrap(), vec!["/entry", "default"]);
        assert_eq!(argv(&image, &["x".into()]).unwrap(), vec!["/entry", "x"]);
    }
}
