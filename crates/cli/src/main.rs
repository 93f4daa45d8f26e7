//! `moat`: the command-line interface. A thin layer over `moat-image` and `moat-vm`: it parses
//! and validates arguments, wires progress to the terminal and maps results to exit codes.

mod client;
mod home;
mod identity_cmd;
mod image_cmd;
mod mcp_cmd;
mod node_cmd;
mod policy_cmd;
mod port_forward;
mod progress;
mod run;
mod sandbox_cmd;
mod secret_cmd;
mod serve;
mod setup;
mod shell_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code when moat itself fails (bad input, missing image, broken VM), as docker and
/// podman do, so that it is never confused with the exit code of the command in the sandbox.
pub const EXIT_MOAT_ERROR: u8 = 125;

#[derive(Debug, Parser)]
#[command(
    name = "moat",
    version,
    about = "Run untrusted code in hardware-isolated microVMs"
)]
struct Cli {
    /// Where moat keeps images, templates, kernels and running sandboxes.
    #[arg(long, env = "MOAT_HOME", global = true)]
    home: Option<std::path::PathBuf>,
    /// Force the accelerator: kvm or tcg (default: detect).
    #[arg(long, env = "MOAT_ACCEL", global = true)]
    accel: Option<String>,
    /// Log more (repeat for debug logs). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Run QEMU and the network stacks UNJAILED (as this user, no namespaces, seccomp filter
    /// or cgroup limits): for development only, warned at every start. Same as MOAT_NO_JAIL=1.
    #[arg(long, global = true)]
    no_jail: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what moat needs under MOAT_HOME: the guest kernel, the initramfs, the base image.
    Setup(setup::SetupArgs),
    /// Manage images: in the local store, or through the daemon when MOAT_URL or MOAT_API_KEY
    /// is set.
    #[command(subcommand)]
    Image(image_cmd::ImageCommand),
    /// Run a command in a fresh sandbox and remove the sandbox afterwards.
    Run(run::RunArgs),
    /// Run the moat daemon: the REST API on TCP and on MOAT_HOME/moatd.sock.
    Serve(serve::ServeArgs),
    /// Manage sandbox groups on a moat daemon (MOAT_URL, MOAT_API_KEY).
    Group {
        #[command(flatten)]
        client: client::ClientArgs,
        /// Boxed: `group apply`'s flags (egress, limits, identity) dwarf every other command.
        #[command(subcommand)]
        command: Box<client::GroupCommand>,
    },
    /// Manage sandboxes on a moat daemon: create, exec, cp, suspend, resume (MOAT_URL,
    /// MOAT_API_KEY).
    Sandbox {
        #[command(flatten)]
        client: client::ClientArgs,
        #[command(subcommand)]
        command: sandbox_cmd::SandboxCommand,
    },
    /// List, show and delete the snapshots of a group on a moat daemon (take one with
    /// `moat sandbox snapshot`, fork one with `moat sandbox create --from-snapshot`).
    Snapshot {
        #[command(flatten)]
        client: client::ClientArgs,
        #[command(subcommand)]
        command: sandbox_cmd::SnapshotCommand,
    },
    /// One sandbox's network stack (started by moat beside each VM, never by hand).
    #[command(hide = true)]
    NetStack(NetStackArgs),
    /// A group's policy on a moat daemon (show, apply, check, decisions, verify-log), and the
    /// offline checker (`moat policy check --policy FILE`).
    Policy {
        #[command(flatten)]
        client: client::ClientArgs,
        #[command(subcommand)]
        command: policy_cmd::PolicyCommand,
    },
    /// Serve MCP on stdin/stdout: sandboxes as tools for an agent (MOAT_URL, MOAT_API_KEY).
    Mcp(mcp_cmd::McpArgs),
    /// Workload identity on a moat daemon: a token for a sandbox (debugging), the signing
    /// keys (list, rotate), and static copies of the issuer documents (publish).
    Identity {
        #[command(flatten)]
        client: client::ClientArgs,
        #[command(subcommand)]
        command: identity_cmd::IdentityCommand,
    },
    /// A group's secrets on a moat daemon, the values egress transforms inject (set from
    /// stdin, list names, delete).
    Secret {
        #[command(flatten)]
        client: client::ClientArgs,
        #[command(subcommand)]
        command: secret_cmd::SecretCommand,
    },
    /// The nodes sharing a daemon's store (docs/FLEET.md): list, show, drain, undrain.
    Node {
        #[command(flatten)]
        client: client::ClientArgs,
        #[command(subcommand)]
        command: node_cmd::NodeCommand,
    },
    /// The fleet's sealing key (MOAT_HOME/secrets.key, docs/FLEET.md): make the next one
    /// here (new), then re-seal the store with it through a daemon (rotate).
    SealingKey {
        #[command(subcommand)]
        command: node_cmd::SealingKeyCommand,
    },
    /// Manage API keys on a moat daemon (admin only).
    ApiKey {
        #[command(flatten)]
        client: client::ClientArgs,
        #[command(subcommand)]
        command: client::ApiKeyCommand,
    },
    /// The audit log of mutating API calls on a moat daemon (admin only): who, what, on which
    /// group, the status and when; oldest first.
    Audit {
        #[command(flatten)]
        client: client::ClientArgs,
        #[command(flatten)]
        args: client::AuditArgs,
    },
}

#[derive(Debug, clap::Args)]
struct NetStackArgs {
    /// Inherited stream socket to QEMU's `-netdev stream` (the guest NIC's link).
    #[arg(long)]
    guest_fd: i32,
    /// Inherited listening Unix socket for the control channel.
    #[arg(long)]
    control_fd: i32,
    /// Inherited listening Unix socket for connections to the guest's ports.
    #[arg(long)]
    ports_fd: i32,
}

/// `moat net-stack`: runs `moat_net::run` on the three descriptors moat-vm handed down. A
/// process of its own because it parses hostile frames.
fn net_stack(args: &NetStackArgs) -> ExitCode {
    let take = |fd: i32, what: &str| -> Option<std::os::fd::OwnedFd> {
        use std::os::fd::FromRawFd;
        // Only inherited sockets are taken: a wrong number must not adopt some other file.
        if fd < 3 || nix::sys::socket::getsockname::<nix::sys::socket::UnixAddr>(fd).is_err() {
            eprintln!("moat net-stack: --{what} {fd} is not an inherited Unix socket");
            return None;
        }
        // SAFETY: the descriptor was inherited for this purpose (moat-vm's netstack.rs) and
        // nothing else in this process owns it.
        Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    };
    let (Some(guest), Some(control), Some(ports)) = (
        take(args.guest_fd, "guest-fd"),
        take(args.control_fd, "control-fd"),
        take(args.ports_fd, "ports-fd"),
    ) else {
        return ExitCode::from(EXIT_MOAT_ERROR);
    };
    match moat_net::run(guest, control, ports) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moat net-stack: {e}");
            ExitCode::from(EXIT_MOAT_ERROR)
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = match (e.use_stderr(), policy_invocation(std::env::args().skip(1))) {
                (false, _) => 0,
                // `moat policy check` is a CI tool: 2 is bad input there, as usage errors are.
                (true, true) => policy_cmd::EXIT_BAD_INPUT,
                (true, false) => EXIT_MOAT_ERROR,
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_logging(cli.verbose);
    if cli.no_jail {
        // The jail is decided where each runtime is made, from MOAT_NO_JAIL: setting it here,
        // before any thread exists, makes the flag and the variable one switch (and the
        // network stacks this process starts inherit it).
        std::env::set_var("MOAT_NO_JAIL", "1");
    }
    // The stack runs its own single-threaded runtime and needs nothing else of moat's.
    if let Command::NetStack(args) = &cli.command {
        return net_stack(args);
    }
    // One analysis per process, started for every check: no async runtime to build.
    if let Command::Policy {
        command: policy_cmd::PolicyCommand::Worker,
        ..
    } = &cli.command
    {
        return ExitCode::from(policy_cmd::worker());
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("moat: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_MOAT_ERROR);
        }
    };
    let result = runtime.block_on(async {
        // The client verbs only talk to a daemon: they need no MOAT_HOME.
        let command = match cli.command {
            Command::Group { client, command } => return client::group(client, *command).await,
            Command::ApiKey { client, command } => return client::api_key(client, command).await,
            Command::Audit { client, args } => return client::audit(client, args).await,
            Command::Identity { client, command } => {
                return identity_cmd::run(client, command).await
            }
            Command::Secret { client, command } => return secret_cmd::run(client, command).await,
            Command::Node { client, command } => return node_cmd::run(client, command).await,
            Command::SealingKey {
                command: node_cmd::SealingKeyCommand::Rotate { client },
            } => return node_cmd::rotate(client).await,
            Command::Policy { client, command } => return policy_cmd::run(client, command).await,
            Command::Mcp(args) => return mcp_cmd::run(args).await,
            Command::Sandbox { client, command } => return sandbox_cmd::run(client, command).await,
            Command::Snapshot { client, command } => {
                return sandbox_cmd::snapshot(client, command).await
            }
            Command::Run(args) if args.group.is_some() => {
                return sandbox_cmd::run_in_group(client::ClientArgs::from_env(), &args).await
            }
            Command::Image(cmd) => match client::ClientArgs::daemon_from_env() {
                Some(args) => return image_cmd::remote(args, cmd).await,
                None => Command::Image(cmd),
            },
            other => other,
        };
        let home = home::Home::resolve(cli.home.as_deref())?;
        match command {
            Command::Setup(args) => setup::run(&home, cli.accel.as_deref(), args).await,
            Command::Image(cmd) => image_cmd::run(&home, cmd).await,
            Command::Run(args) => run::run(&home, cli.accel.as_deref(), args).await,
            Command::Serve(args) => serve::run(&home, cli.accel.as_deref(), args).await,
            Command::SealingKey { .. } => node_cmd::new_key(&home.root),
            Command::Group { .. }
            | Command::NetStack(_)
            | Command::ApiKey { .. }
            | Command::Audit { .. }
            | Command::Identity { .. }
            | Command::Secret { .. }
            | Command::Node { .. }
            | Command::Sandbox { .. }
            | Command::Snapshot { .. }
            | Command::Mcp(_)
            | Command::Policy { .. } => {
                unreachable!("handled above")
            }
        }
    });
    // Everything the command owned (sandboxes, temporary files) is gone once block_on returns.
    drop(runtime);
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("moat: {}", error_chain(&e));
            ExitCode::from(EXIT_MOAT_ERROR)
        }
    }
}

/// Whether the command line is a `moat policy …` one: its first word that is neither a global
/// option nor an option's value is `policy`.
fn policy_invocation(args: impl Iterator<Item = String>) -> bool {
    let mut args = args;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--home" | "--accel" => {
                args.next();
            }
            a if a.starts_with('-') => {}
            a => return a == "policy",
        }
    }
    false
}

/// The whole error chain on one line, each cause once.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_command_lines_are_recognised_past_global_options() {
        let is = |line: &str| policy_invocation(line.split(' ').map(str::to_string));
        assert!(is("policy check"));
        assert!(is("--home /h -v policy show g"));
        assert!(is("--accel=tcg policy"));
        assert!(!is("--home policy run"));
        assert!(!is("run -- policy"));
        assert!(!is("-v"));
    }
}
