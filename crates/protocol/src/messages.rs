//! The JSON messages carried in HELLO, OPEN and MSG frames. Messages and fields are only ever
//! added; a peer rejects what it does not know rather than guess (`deny_unknown_fields`), and the
//! version in the handshake tells both sides what the other understands.

use serde::{Deserialize, Serialize};

use crate::frame::{Frame, Kind, SYNC_MAGIC};
use crate::Error;

/// Version of this protocol. Bumped whenever a message or field is added.
pub const PROTOCOL_VERSION: u32 = 3;
/// Length of the session nonce in HELLO and HELLO_ACK.
pub const NONCE_LEN: usize = 16;

/// Channel numbers inside a stream.
pub mod channel {
    /// Host → guest: an exec's stdin, or the bytes of a file being written.
    pub const STDIN: u8 = 0;
    /// Guest → host: an exec's stdout, or the bytes of a file being read.
    pub const STDOUT: u8 = 1;
    /// Guest → host: an exec's stderr.
    pub const STDERR: u8 = 2;
}

/// Host → guest, in HELLO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub version: u32,
}

/// Guest → host, in HELLO_ACK. Only `version` matters to the host; the rest is for logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelloAck {
    pub version: u32,
    pub agent_version: String,
}

/// The request that opens a stream (OPEN payload), host → guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Run a process. Replies: `Started`, then DATA on stdout/stderr, then `Exited`; or `Error`.
    Exec(ExecRequest),
    /// Stream a file out: `Stat`, DATA on [`channel::STDOUT`], EOF, `Done`; or `Error`.
    ReadFile { path: String },
    /// Stream a file in on [`channel::STDIN`] until EOF; replaced atomically; then `Done`.
    WriteFile {
        path: String,
        mode: Option<u32>,
        make_parents: bool,
    },
    /// `Stat` or `Error`. Does not follow a final symlink.
    Stat { path: String },
    /// `Entries` (possibly several messages), then `Done`; or `Error`.
    List { path: String },
    /// `Done` or `Error`.
    Mkdir {
        path: String,
        parents: bool,
        mode: Option<u32>,
    },
    /// `Done` or `Error`.
    Remove { path: String, recursive: bool },
    /// Set the wall clock, reseed the kernel RNG, optionally set the hostname. `Done`.
    Refresh(Refresh),
    /// Stop sending anything until the host sends EOF on this stream or a new session starts:
    /// `Quiesced` is the last frame the guest writes. Used before a snapshot.
    Quiesce,
    /// Sync filesystems, end all processes, power off. `Done` just before.
    Shutdown,
    /// Since version 2. Start a background process that outlives the stream and the session:
    /// `ProcStarted`, then the stream ends; or `Error`. No stdin and no PTY; its stdout and
    /// stderr go to bounded rings in the agent ([`PROC_LOG_RING`] bytes each).
    ProcStart(ExecRequest),
    /// Since version 2. `Procs` (possibly several messages), then `Done`.
    ProcList,
    /// Since version 2. Signal a background process's group (signal 9 kills its whole tree);
    /// `Done`, or `Error` (`NotFound` for an unknown id).
    ProcKill { id: String, signal: i32 },
    /// Since version 2. `Exited` once the process has ended (at once if it already has), or
    /// `Error` of kind `Timeout` after `timeout_ms`.
    ProcWait { id: String, timeout_ms: u64 },
    /// Since version 2. What the output rings hold: DATA on stdout and stderr, EOF on both,
    /// then `Done`.
    ProcLogs { id: String },
    /// Since version 3. Configure the guest's network interface: address, default route,
    /// MTU, resolver, IPv6 off. Idempotent; the host sends it at boot and after every
    /// restore. `Done` or `Error`.
    Network(NetworkConfig),
}

/// Bytes of stdout (and of stderr) the agent keeps of each background process: the newest.
pub const PROC_LOG_RING: usize = 1024 * 1024;
/// Finished background processes the agent remembers; older ones are forgotten.
pub const PROC_KEEP_FINISHED: usize = 256;

/// What to run and how.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in the `PATH` of `env` when it has no '/'.
    pub argv: Vec<String>,
    /// The whole environment, as `KEY=VALUE`.
    pub env: Vec<String>,
    /// Working directory; the user's home (or `/`) when absent.
    pub cwd: Option<String>,
    /// User name or numeric uid, optionally `:group`; root when absent.
    pub user: Option<String>,
    /// Whether the host will send stdin; when false the process gets `/dev/null`.
    pub stdin: bool,
    /// Kill the whole process tree after this long.
    pub timeout_ms: Option<u64>,
    /// Since version 2: run on a new pseudo-terminal of this size instead of pipes. Input goes
    /// to [`channel::STDIN`] (whatever `stdin` says), stdout and stderr merge into
    /// [`channel::STDOUT`]. Left out of the JSON when absent, so the version-1 form is unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<PtySize>,
}

impl ExecRequest {
    /// `argv` with the whole environment `env`; everything else as by default: root in its home
    /// directory, stdin `/dev/null`, no timeout, pipes.
    pub fn new(argv: &[&str], env: &[&str]) -> ExecRequest {
        ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|s| s.to_string()).collect(),
            ..ExecRequest::default()
        }
    }
}

/// Size of a pseudo-terminal, in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PtySize {
    pub rows: u16,
    pub cols: u16,
}

/// One background process (in `Procs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcInfo {
    /// Agent-assigned (`p1`, `p2`, …), never reused within a boot.
    pub id: String,
    pub pid: u32,
    /// The request's argv, possibly shortened by the agent to keep messages small.
    pub argv: Vec<String>,
    pub running: bool,
    pub exit: Option<ProcExit>,
    pub started_unix_ms: u64,
}

/// How a background process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// Killed because its `timeout_ms` ran out.
    pub timed_out: bool,
}

/// Whether `user` has the form [`ExecRequest::user`] takes: a name or uid, optionally
/// `:group`. Hosts check the form before sending; the guest resolves it against the image.
pub fn valid_user_spec(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 64
        && user.split(':').count() <= 2
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c))
}

/// The guest's link to the host's network stack (crates/net). Addresses are dotted IPv4.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// The interface; `None` means the first one that is not loopback.
    pub interface: Option<String>,
    pub address: String,
    pub prefix_len: u8,
    pub gateway: String,
    pub mtu: u16,
    /// Written to `/etc/resolv.conf` (1–3).
    pub nameservers: Vec<String>,
    /// The group's egress CA (PEM), added to the guest's trust store: the host-side stack
    /// presents certificates of it for the hosts whose requests it transforms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_ca_pem: Option<String>,
    /// The in-guest identity endpoint (the group's `identity.in_guest`): execs get
    /// `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` from it. Absent: they get neither.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<GuestIdentity>,
}

/// Where guest code asks for identity tokens (ACA's managed-identity protocol), and the
/// header value that proves a request came from code that could read the environment. A new
/// header every boot, restore and fork: one of an earlier incarnation stops working.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestIdentity {
    pub endpoint: String,
    pub header: String,
}

/// Fresh facts the guest cannot know by itself after a restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refresh {
    /// Host wall-clock time, nanoseconds since the Unix epoch.
    pub unix_time_ns: u64,
    /// Random bytes from the host, hex-encoded (at least 32 bytes).
    pub entropy_hex: String,
    pub hostname: Option<String>,
}

/// A message on an open stream (MSG payload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    /// The exec's process started.
    Started { pid: u32 },
    /// The exec's process ended: `code` when it exited, `signal` when a signal killed it.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
    },
    /// Host → guest: deliver this signal to the exec's process.
    Signal { signal: i32 },
    /// The request failed.
    Error { kind: ErrorKind, message: String },
    /// Metadata of one path.
    Stat(FileStat),
    /// Some entries of a directory listing.
    Entries { entries: Vec<DirEntry> },
    /// The request completed.
    Done,
    /// Reply to `Quiesce`.
    Quiesced,
    /// Since version 2. Host → guest during a PTY exec: the terminal's new size (the process
    /// group in the foreground gets SIGWINCH).
    Resize { rows: u16, cols: u16 },
    /// Since version 2. Reply to `ProcStart`.
    ProcStarted { id: String, pid: u32 },
    /// Since version 2. Some entries of the background process table, oldest first.
    Procs { procs: Vec<ProcInfo> },
}

/// Why a request failed, for mapping to the user's error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    NotFound,
    PermissionDenied,
    IsADirectory,
    NotADirectory,
    AlreadyExists,
    DirectoryNotEmpty,
    NoSpace,
    InvalidInput,
    /// Exec: the program does not exist or is not executable.
    CommandNotFound,
    /// Exec: the user does not exist in the image.
    UnknownUser,
    /// Since version 2: `ProcWait` gave up waiting.
    Timeout,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileStat {
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    pub link_target: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirEntry {
    pub name: String,
    pub stat: FileStat,
}

fn sync_payload<T: Serialize>(nonce: &[u8; NONCE_LEN], body: &T) -> Vec<u8> {
    let mut payload = SYNC_MAGIC.to_vec();
    payload.extend_from_slice(nonce);
    payload.extend_from_slice(&serde_json::to_vec(body).expect("handshake types serialize"));
    payload
}

fn parse_sync<T: for<'de> Deserialize<'de>>(
    frame: &Frame,
    kind: Kind,
) -> Result<([u8; NONCE_LEN], T), Error> {
    let p = &frame.payload;
    let head = SYNC_MAGIC.len() + NONCE_LEN;
    if frame.kind != kind || frame.stream != 0 || p.len() < head || &p[..8] != SYNC_MAGIC {
        return Err(Error::Protocol(format!("expected a {kind:?} frame")));
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&p[8..head]);
    Ok((nonce, serde_json::from_slice(&p[head..])?))
}

impl Hello {
    pub fn to_frame(&self, nonce: &[u8; NONCE_LEN]) -> Frame {
        Frame::new(0, Kind::Hello, sync_payload(nonce, self))
    }

    pub fn from_frame(frame: &Frame) -> Result<([u8; NONCE_LEN], Hello), Error> {
        parse_sync(frame, Kind::Hello)
    }
}

impl HelloAck {
    pub fn to_frame(&self, nonce: &[u8; NONCE_LEN]) -> Frame {
        Frame::new(0, Kind::HelloAck, sync_payload(nonce, self))
    }

    pub fn from_frame(frame: &Frame) -> Result<([u8; NONCE_LEN], HelloAck), Error> {
        parse_sync(frame, Kind::HelloAck)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Freezes the wire form: a change here breaks agents already inside templates.
    #[test]
    fn wire_form_is_stable() {
        let req = Request::Exec(ExecRequest {
            argv: vec!["true".into()],
            env: vec!["PATH=/bin".into()],
            cwd: None,
            user: Some("1000".into()),
            stdin: false,
            timeout_ms: Some(5),
            pty: None,
        });
        let v1 = r#"{"op":"exec","argv":["true"],"env":["PATH=/bin"],"cwd":null,"user":"1000","stdin":false,"timeout_ms":5}"#;
        assert_eq!(serde_json::to_string(&req).unwrap(), v1);
        // A version-1 request still parses.
        assert_eq!(serde_json::from_str::<Request>(v1).unwrap(), req);
        let msg = Message::Exited {
            code: None,
            signal: Some(9),
            timed_out: true,
        };
        assert_eq!(
            serde_json::to_string(&msg).unwrap(),
            r#"{"type":"exited","code":null,"signal":9,"timed_out":true}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Quiesce).unwrap(),
            r#"{"op":"quiesce"}"#
        );
    }

    /// Freezes the wire form of what version 2 added.
    #[test]
    fn wire_form_v2_is_stable() {
        let exec = ExecRequest {
            argv: vec!["sh".into()],
            env: vec![],
            cwd: None,
            user: None,
            stdin: true,
            timeout_ms: None,
            pty: Some(PtySize { rows: 24, cols: 80 }),
        };
        let cases: Vec<(String, &str)> = vec![
            (
                serde_json::to_string(&Request::Exec(exec.clone())).unwrap(),
                r#"{"op":"exec","argv":["sh"],"env":[],"cwd":null,"user":null,"stdin":true,"timeout_ms":null,"pty":{"rows":24,"cols":80}}"#,
            ),
            (
                serde_json::to_string(&Request::ProcStart(ExecRequest { pty: None, ..exec }))
                    .unwrap(),
                r#"{"op":"proc_start","argv":["sh"],"env":[],"cwd":null,"user":null,"stdin":true,"timeout_ms":null}"#,
            ),
            (
                serde_json::to_string(&Request::ProcList).unwrap(),
                r#"{"op":"proc_list"}"#,
            ),
            (
                serde_json::to_string(&Request::ProcKill {
                    id: "p1".into(),
                    signal: 15,
                })
                .unwrap(),
                r#"{"op":"proc_kill","id":"p1","signal":15}"#,
            ),
            (
                serde_json::to_string(&Request::ProcWait {
                    id: "p1".into(),
                    timeout_ms: 5,
                })
                .unwrap(),
                r#"{"op":"proc_wait","id":"p1","timeout_ms":5}"#,
            ),
            (
                serde_json::to_string(&Request::ProcLogs { id: "p1".into() }).unwrap(),
                r#"{"op":"proc_logs","id":"p1"}"#,
            ),
            (
                serde_json::to_string(&Message::Resize { rows: 1, cols: 2 }).unwrap(),
                r#"{"type":"resize","rows":1,"cols":2}"#,
            ),
            (
                serde_json::to_string(&Message::ProcStarted {
                    id: "p1".into(),
                    pid: 7,
                })
                .unwrap(),
                r#"{"type":"proc_started","id":"p1","pid":7}"#,
            ),
            (
                serde_json::to_string(&Message::Procs {
                    procs: vec![ProcInfo {
                        id: "p1".into(),
                        pid: 7,
                        argv: vec!["sleep".into()],
                        running: false,
                        exit: Some(ProcExit {
                            code: None,
                            signal: Some(15),
                            timed_out: false,
                        }),
                        started_unix_ms: 9,
                    }],
                })
                .unwrap(),
                r#"{"type":"procs","procs":[{"id":"p1","pid":7,"argv":["sleep"],"running":false,"exit":{"code":null,"signal":15,"timed_out":false},"started_unix_ms":9}]}"#,
            ),
            (
                serde_json::to_string(&Message::Error {
                    kind: ErrorKind::Timeout,
                    message: String::new(),
                })
                .unwrap(),
                r#"{"type":"error","kind":"timeout","message":""}"#,
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
    }

    /// Freezes the wire form of what version 3 added.
    #[test]
    fn wire_form_v3_is_stable() {
        let net = Request::Network(NetworkConfig {
            interface: None,
            address: "100.127.255.2".into(),
            prefix_len: 30,
            gateway: "100.127.255.1".into(),
            mtu: 1500,
            nameservers: vec!["100.127.255.1".into()],
            trust_ca_pem: None,
            identity: None,
        });
        let want = r#"{"op":"network","interface":null,"address":"100.127.255.2","prefix_len":30,"gateway":"100.127.255.1","mtu":1500,"nameservers":["100.127.255.1"]}"#;
        assert_eq!(serde_json::to_string(&net).unwrap(), want);
        assert_eq!(serde_json::from_str::<Request>(want).unwrap(), net);
        // The egress CA is additive: absent above, carried when given.
        let mut with_ca = net.clone();
        if let Request::Network(c) = &mut with_ca {
            c.trust_ca_pem = Some("-----BEGIN CERTIFICATE-----".into());
        }
        let text = serde_json::to_string(&with_ca).unwrap();
        assert!(
            text.ends_with(r#","trust_ca_pem":"-----BEGIN CERTIFICATE-----"}"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), with_ca);
        let mut with_identity = net.clone();
        if let Request::Network(c) = &mut with_identity {
            c.identity = Some(GuestIdentity {
                endpoint: "http://169.254.169.254/msi/token".into(),
                header: "h".into(),
            });
        }
        let text = serde_json::to_string(&with_identity).unwrap();
        assert!(
            text.ends_with(
                r#","identity":{"endpoint":"http://169.254.169.254/msi/token","header":"h"}}"#
            ),
            "{text}"
        );
        assert_eq!(
            serde_json::from_str::<Request>(&text).unwrap(),
            with_identity
        );
    }

    #[test]
    fn unknown_fields_and_types_are_rejected() {
        assert!(serde_json::from_str::<Message>(r#"{"type":"started","pid":1,"x":1}"#).is_err());
        assert!(serde_json::from_str::<Message>(r#"{"type":"launch_missiles"}"#).is_err());
        assert!(
            serde_json::from_str::<Request>(r#"{"op":"stat","path":"/","extra":true}"#).is_err()
        );
    }

    #[test]
    fn hello_roundtrip_and_wrong_kind() {
        let nonce = [7u8; NONCE_LEN];
        let f = Hello { version: 1 }.to_frame(&nonce);
        assert_eq!(
            Hello::from_frame(&f).unwrap(),
            (nonce, Hello { version: 1 })
        );
        assert!(HelloAck::from_frame(&f).is_err());
    }
}
