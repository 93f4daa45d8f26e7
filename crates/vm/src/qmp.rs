//! A small async QMP (QEMU Machine Protocol) client.
//!
//! QMP is newline-delimited JSON over a stream socket: a greeting, then `qmp_capabilities`,
//! then commands tagged with an `id` whose responses may be interleaved with asynchronous
//! events. Events read while waiting for a response are queued, so a later
//! [`Qmp::wait_event`] still sees them. All reads keep partial data in an internal buffer,
//! so a read cancelled by a timeout loses nothing; a response whose command was abandoned is
//! recognised by its unknown `id` and dropped.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

use crate::{Error, Result};

/// Upper bound for one QMP message; QEMU's largest answers (query-qmp-schema) are ~200 KiB.
const MAX_MESSAGE: usize = 16 << 20;

/// A QMP session in command mode.
#[derive(Debug)]
pub struct Qmp {
    stream: UnixStream,
    buf: Vec<u8>,
    next_id: u64,
    events: VecDeque<Value>,
    greeting: Value,
}

impl Qmp {
    /// Reads the greeting and negotiates capabilities (none requested).
    pub async fn connect(stream: UnixStream) -> Result<Qmp> {
        let mut q = Qmp {
            stream,
            buf: Vec::with_capacity(4096),
            next_id: 1,
            events: VecDeque::new(),
            greeting: Value::Null,
        };
        let greeting = q.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(Error::QmpProtocol(format!(
                "expected a QMP greeting, got {greeting}"
            )));
        }
        q.greeting = greeting;
        q.execute("qmp_capabilities", None).await?;
        Ok(q)
    }

    /// The greeting QEMU sent (contains its version).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Runs `command` with optional `arguments` and returns its `return` value; a QMP error
    /// becomes [`Error::QmpCommand`] carrying QEMU's `desc`.
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let (id, line) = self.encode(command, arguments);
        self.stream
            .write_all(&line)
            .await
            .map_err(|e| closed_or(e, "writing a QMP command"))?;
        self.response(command, id).await
    }

    /// Passes `fd` to QEMU under `name` (QMP `getfd`, the descriptor travels as SCM_RIGHTS
    /// ancillary data on the command itself). Use it as e.g. `fd:<name>` in `migrate`.
    pub async fn getfd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<()> {
        let (id, line) = self.encode("getfd", Some(json!({ "fdname": name })));
        let raw = self.stream.as_raw_fd();
        let sent = loop {
            self.stream
                .writable()
                .await
                .map_err(|e| closed_or(e, "waiting to send getfd"))?;
            let res = self.stream.try_io(Interest::WRITABLE, || {
                let fds = [fd.as_raw_fd()];
                let cmsg = [ControlMessage::ScmRights(&fds)];
                sendmsg::<()>(
                    raw,
                    &[IoSlice::new(&line)],
                    &cmsg,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match res {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(closed_or(e, "sending getfd")),
            }
        };
        // The descriptor went with the first byte; the rest of the line is plain data.
        self.stream
            .write_all(&line[sent..])
            .await
            .map_err(|e| closed_or(e, "writing getfd"))?;
        self.response("getfd", id).await.map(|_| ())
    }

    /// Waits for the next event named `name` (e.g. `STOP`, `MIGRATION`, `SHUTDOWN`),
    /// including one that already arrived while a command was running. Returns the whole
    /// event object (`event`, `data`, `timestamp`). Wrap it in a timeout: it waits forever.
    pub async fn wait_event(&mut self, name: &str) -> Result<Value> {
        if let Some(pos) = self.events.iter().position(|e| e["event"] == name) {
            if let Some(e) = self.events.remove(pos) {
                return Ok(e);
            }
        }
        loop {
            let msg = self.read_message().await?;
            if msg["event"] == name {
                return Ok(msg);
            }
            self.queue(msg);
        }
    }

    /// Removes and returns the events received so far that nobody waited for.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    fn encode(&mut self, command: &str, arguments: Option<Value>) -> (u64, Vec<u8>) {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        (id, line)
    }

    async fn response(&mut self, command: &str, id: u64) -> Result<Value> {
        loop {
            let msg = self.read_message().await?;
            if msg.get("event").is_some() {
                self.queue(msg);
                continue;
            }
            if msg["id"] != id {
                // The answer to a command whose caller gave up (timeout/cancel).
                tracing::debug!(%msg, "dropping QMP response with a stale id");
                continue;
            }
            if let Some(err) = msg.get("error") {
                return Err(Error::QmpCommand {
                    command: command.to_string(),
                    class: err["class"].as_str().unwrap_or("GenericError").to_string(),
                    desc: err["desc"]
                        .as_str()
                        .unwrap_or("(no description)")
                        .to_string(),
                });
            }
            return match msg.get("return") {
                Some(v) => Ok(v.clone()),
                None => Err(Error::QmpProtocol(format!(
                    "response to `{command}` has neither return nor error: {msg}"
                ))),
            };
        }
    }

    fn queue(&mut self, event: Value) {
        tracing::debug!(event = %event["event"], "QMP event");
        // Bound the queue: nobody may be consuming events of a long-running VM.
        if self.events.len() >= 1024 {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    async fn read_message(&mut self) -> Result<Value> {
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                return serde_json::from_slice(line).map_err(|e| {
                    Error::QmpProtocol(format!(
                        "invalid JSON from QEMU ({e}): {}",
                        String::from_utf8_lossy(line)
                    ))
                });
            }
            if self.buf.len() > MAX_MESSAGE {
                return Err(Error::QmpProtocol("message larger than 16 MiB".into()));
            }
            self.buf.reserve(4096);
            let n = self
                .stream
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| closed_or(e, "reading from QMP"))?;
            if n == 0 {
                return Err(Error::QmpClosed);
            }
        }
    }
}

fn closed_or(e: std::io::Error, what: &str) -> Error {
    use std::io::ErrorKind::*;
    match e.kind() {
        BrokenPipe | ConnectionReset | UnexpectedEof => Error::QmpClosed,
        _ => Error::io(what, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};
    use std::os::unix::net::UnixStream as StdStream;

    /// A scripted fake QEMU on the other end of a socketpair.
    fn fake(
        script: impl FnOnce(&mut BufReader<StdStream>, &mut StdStream) + Send + 'static,
    ) -> (UnixStream, std::thread::JoinHandle<()>) {
        let (a, b) = StdStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let t = std::thread::spawn(move || {
            let mut w = b.try_clone().unwrap();
            let mut r = BufReader::new(b);
            w.write_all(
                b"{\"QMP\": {\"version\": {\"qemu\": {\"major\": 7}}, \"capabilities\": []}}\n",
            )
            .unwrap();
            let cmd = read_cmd(&mut r);
            assert_eq!(cmd["execute"], "qmp_capabilities");
            reply(&mut w, &cmd, json!({}));
            script(&mut r, &mut w);
        });
        (UnixStream::from_std(a).unwrap(), t)
    }

    fn read_cmd(r: &mut BufReader<StdStream>) -> Value {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap()
    }

    fn reply(w: &mut StdStream, cmd: &Value, ret: Value) {
        let m = json!({"return": ret, "id": cmd["id"]});
        w.write_all(format!("{m}\r\n").as_bytes()).unwrap();
    }

    #[tokio::test]
    async fn greeting_and_execute() {
        let (s, t) = fake(|r, w| {
            let c = read_cmd(r);
            assert_eq!(c["execute"], "query-status");
            assert!(c.get("arguments").is_none());
            // Split a response over two writes to exercise buffering.
            w.write_all(br#"{"return": {"status": "run"#).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            w.write_all(format!("ning\"}}, \"id\": {}}}\n", c["id"]).as_bytes())
                .unwrap();
        });
        let mut q = Qmp::connect(s).await.unwrap();
        assert_eq!(q.greeting()["QMP"]["version"]["qemu"]["major"], 7);
        let st = q.execute("query-status", None).await.unwrap();
        assert_eq!(st["status"], "running");
        t.join().unwrap();
        // The fake hung up: that's a closed connection, not a protocol error.
        assert!(matches!(
            q.execute("cont", None).await,
            Err(Error::QmpClosed)
        ));
    }

    #[tokio::test]
    async fn error_carries_desc() {
        let (s, t) = fake(|r, w| {
            let c = read_cmd(r);
            assert_eq!(c["arguments"]["uri"], "fd:nope");
            let m = json!({"error": {"class": "GenericError", "desc": "File descriptor named 'nope' not found"}, "id": c["id"]});
            w.write_all(format!("{m}\n").as_bytes()).unwrap();
        });
        let mut q = Qmp::connect(s).await.unwrap();
        let e = q
            .execute("migrate", Some(json!({"uri": "fd:nope"})))
            .await
            .unwrap_err();
        match &e {
            Error::QmpCommand {
                command,
                class,
                desc,
            } => {
                assert_eq!(command, "migrate");
                assert_eq!(class, "GenericError");
                assert!(desc.contains("'nope' not found"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(e.to_string().contains("not found"));
        t.join().unwrap();
    }

    #[tokio::test]
    async fn events_interleave_with_responses() {
        let (s, t) = fake(|r, w| {
            let c = read_cmd(r);
            w.write_all(
                b"{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\n",
            )
            .unwrap();
            // A stale response (unknown id) must be skipped.
            w.write_all(b"{\"return\": {}, \"id\": 999}\n").unwrap();
            w.write_all(b"{\"event\": \"MIGRATION\", \"data\": {\"status\": \"active\"}}\n")
                .unwrap();
            reply(w, &c, json!({}));
            std::thread::sleep(std::time::Duration::from_millis(20));
            w.write_all(b"{\"event\": \"RESUME\"}\n{\"event\": \"MIGRATION\", \"data\": {\"status\": \"completed\"}}\n").unwrap();
        });
        let mut q = Qmp::connect(s).await.unwrap();
        q.execute("stop", None).await.unwrap();
        // Already queued while `stop` ran.
        let stop = q.wait_event("STOP").await.unwrap();
        assert_eq!(stop["timestamp"]["seconds"], 1);
        let m = q.wait_event("MIGRATION").await.unwrap();
        assert_eq!(m["data"]["status"], "active");
        let m = q.wait_event("MIGRATION").await.unwrap();
        assert_eq!(m["data"]["status"], "completed");
        let rest = q.take_events();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0]["event"], "RESUME");
        t.join().unwrap();
        assert!(matches!(
            q.wait_event("SHUTDOWN").await,
            Err(Error::QmpClosed)
        ));
    }

    #[tokio::test]
    async fn getfd_passes_a_descriptor() {
        let (a, b) = StdStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let t = std::thread::spawn(move || {
            use nix::sys::socket::{recvmsg, ControlMessageOwned};
            let mut w = b.try_clone().unwrap();
            w.write_all(b"{\"QMP\": {}}\n").unwrap();
            let mut r = BufReader::new(b.try_clone().unwrap());
            let c = read_cmd(&mut r);
            reply(&mut w, &c, json!({}));
            // Read the getfd line with recvmsg to collect the descriptor.
            let mut data = vec![0u8; 4096];
            let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
            let mut iov = [std::io::IoSliceMut::new(&mut data)];
            let msg =
                recvmsg::<()>(b.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty()).unwrap();
            let mut fd = None;
            for c in msg.cmsgs().unwrap() {
                if let ControlMessageOwned::ScmRights(f) = c {
                    fd = f.first().copied();
                }
            }
            let n = msg.bytes;
            let line: Value = serde_json::from_slice(&data[..n]).unwrap();
            assert_eq!(line["execute"], "getfd");
            assert_eq!(line["arguments"]["fdname"], "snap");
            // SAFETY: the descriptor was just received via SCM_RIGHTS and is owned by nobody else.
            let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd.unwrap()) });
            let mut s = String::new();
            f.read_to_string(&mut s).unwrap();
            assert_eq!(s, "through the socket");
            reply(&mut w, &line, json!({}));
        });
        let mut q = Qmp::connect(UnixStream::from_std(a).unwrap())
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "through the socket").unwrap();
        let f = std::fs::File::open(&p).unwrap();
        q.getfd("snap", f.as_fd()).await.unwrap();
        t.join().unwrap();
    }

    #[tokio::test]
    async fn garbage_is_a_protocol_error() {
        let (a, mut b) = StdStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.write_all(b"{\"hello\": 1}\n").unwrap();
        let e = Qmp::connect(UnixStream::from_std(a).unwrap())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("greeting"), "{e}");
    }
}
