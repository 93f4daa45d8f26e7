//! `moat sandbox shell`: an interactive terminal in a sandbox over the daemon's WebSocket
//! shell route. On a terminal, ours goes raw (restored on every way out: the guard's `Drop`
//! runs on return, error and unwinding; SIGTERM, SIGHUP and SIGQUIT end the session through
//! the same path) and SIGWINCH becomes a resize. Without a terminal, stdin's bytes are piped
//! to the remote terminal and its end is sent as end-of-file (Ctrl-D).

use std::io::{IsTerminal, Read};
use std::os::fd::AsFd;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use nix::sys::termios::{self, SetArg, Termios};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{signal, SignalKind};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
use tokio_tungstenite::tungstenite::Message;

use crate::client::Client;
use crate::run::{check_user, check_workdir};

#[derive(Debug, Args)]
pub struct ShellArgs {
    group: String,
    id: String,
    /// User to run as: a name or uid, optionally with `:group`.
    #[arg(short = 'u', long = "user")]
    user: Option<String>,
    /// Working directory inside the sandbox (absolute).
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    workdir: Option<String>,
    /// The command to run on the terminal instead of the login shell (bash, else sh).
    #[arg(last = true, value_name = "CMD")]
    cmd: Vec<String>,
}

/// The terminal size used when stdout is not a terminal.
const DEFAULT_SIZE: (u16, u16) = (80, 24);

/// Quotes argv for `sh -c` (the route takes a command line).
fn shell_join(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            let safe = !a.is_empty()
                && a.bytes().all(|b| {
                    b.is_ascii_alphanumeric()
                        || matches!(
                            b,
                            b'-' | b'_' | b'.' | b'/' | b'=' | b':' | b',' | b'+' | b'@' | b'%'
                        )
                });
            if safe {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The size of our terminal, (cols, rows), if stdout is one.
fn term_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into the struct we pass; fd 1 may be anything,
    // and the call then fails without writing.
    let r = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_col > 0 && ws.ws_row > 0).then(|| (ws.ws_col.min(1000), ws.ws_row.min(1000)))
}

/// Our terminal in raw mode for as long as this lives.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enter() -> Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).context("reading the terminal's mode")?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)
            .context("putting the terminal in raw mode")?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// Reads stdin on a thread of its own (a blocking read must not keep the runtime from
/// shutting down); `None` marks its end.
fn stdin_reader() -> tokio::sync::mpsc::Receiver<Option<Vec<u8>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        let mut input = std::io::stdin().lock();
        loop {
            match input.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.blocking_send(None);
                    return;
                }
                Ok(n) => {
                    if tx.blocking_send(Some(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

pub async fn shell(c: &Client, a: &ShellArgs) -> Result<u8> {
    if let Some(w) = &a.workdir {
        check_workdir(w)?;
    }
    if let Some(u) = &a.user {
        check_user(u)?;
    }
    let interactive = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let (cols, rows) = term_size().unwrap_or(DEFAULT_SIZE);
    let mut query = vec![format!("cols={cols}"), format!("rows={rows}")];
    if !a.cmd.is_empty() {
        query.push(format!(
            "command={}",
            crate::sandbox_cmd::query_value(&shell_join(&a.cmd))
        ));
    }
    if let Some(u) = &a.user {
        query.push(format!("user={}", crate::sandbox_cmd::query_value(u)));
    }
    if let Some(w) = &a.workdir {
        query.push(format!("cwd={}", crate::sandbox_cmd::query_value(w)));
    }
    if let Ok(t) = std::env::var("TERM") {
        if interactive && !t.is_empty() {
            query.push(format!("term={}", crate::sandbox_cmd::query_value(&t)));
        }
    }
    let path = format!(
        "{}/shell?{}",
        crate::sandbox_cmd::sandbox_path(&a.group, &a.id)?,
        query.join("&")
    );
    let url = c.ws_url(&path)?;
    let mut request = url
        .as_str()
        .into_client_request()
        .context("building the WebSocket request")?;
    if let Some(k) = c.key() {
        request.headers_mut().insert(
            AUTHORIZATION,
            format!("Bearer {k}")
                .parse()
                .context("the API key is not a valid header value")?,
        );
    }
    let (mut socket, _) = match tokio_tungstenite::connect_async(request).await {
        Ok(s) => s,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let status = resp.status();
            let body: Value = resp
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            let message = body["error"]["message"].as_str().unwrap_or("no message");
            bail!("{message} (HTTP {})", status.as_u16());
        }
        Err(e) => {
            return Err(anyhow!(e)).with_context(|| {
                format!(
                    "cannot open a shell through the moat daemon at {} (is `moat serve` running? \
                     set MOAT_URL)",
                    c.base()
                )
            })
        }
    };

    let _raw = if interactive {
        Some(RawMode::enter()?)
    } else {
        None
    };
    let mut winch = signal(SignalKind::window_change()).context("watching SIGWINCH")?;
    let mut term = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut hup = signal(SignalKind::hangup()).context("watching SIGHUP")?;
    let mut input = stdin_reader();
    let mut input_open = true;
    let mut last_byte = b'\n';
    let mut out = tokio::io::stdout();
    loop {
        tokio::select! {
            msg = socket.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    // A closed stdout must not end the remote command early.
                    let _ = out.write_all(&b).await;
                    let _ = out.flush().await;
                }
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t)
                        .with_context(|| format!("the daemon sent a control message that is not JSON: {t:?}"))?;
                    if v["type"] == "exit" {
                        let code = v["exit_code"].as_i64().context("the exit message has no exit_code")?;
                        let _ = socket.close(None).await;
                        return Ok(u8::try_from(code).unwrap_or(255));
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let why = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                    bail!("the shell ended without an exit status{}", if why.is_empty() { String::new() } else { format!(": {why}") });
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(anyhow!(e)).context("the shell connection broke off"),
                None => bail!("the shell connection closed without an exit status"),
            },
            chunk = input.recv(), if input_open => match chunk.flatten() {
                Some(data) => {
                    last_byte = *data.last().unwrap_or(&last_byte);
                    socket.send(Message::Binary(data.into())).await.context("sending input")?;
                }
                None => {
                    input_open = false;
                    if !interactive {
                        // The terminal's end-of-file: one Ctrl-D at the start of a line, two
                        // after a partial line (the first only hands the line over).
                        let eof: &[u8] = if last_byte == b'\n' { b"\x04" } else { b"\x04\x04" };
                        socket.send(Message::Binary(eof.to_vec().into())).await.context("sending input")?;
                    }
                }
            },
            _ = winch.recv() => {
                if let Some((cols, rows)) = term_size() {
                    let m = json!({"type": "resize", "cols": cols, "rows": rows}).to_string();
                    socket.send(Message::Text(m.into())).await.context("sending a resize")?;
                }
            },
            _ = term.recv() => {
                let _ = socket.close(None).await;
                return Ok(128 + libc::SIGTERM as u8);
            },
            _ = hup.recv() => {
                let _ = socket.close(None).await;
                return Ok(128 + libc::SIGHUP as u8);
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_is_quoted_for_sh() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(shell_join(&v(&["ls", "-la", "/tmp"])), "ls -la /tmp");
        assert_eq!(
            shell_join(&v(&["echo", "a b", "it's"])),
            r"echo 'a b' 'it'\''s'"
        );
        assert_eq!(shell_join(&v(&["echo", ""])), "echo ''");
    }
}
