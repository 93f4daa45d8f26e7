//! moat-agent: PID 1 of every sandbox VM. It boots the guest (drivers, root disk, mounts),
//! reaps orphans, and serves the host's requests on the virtio-serial port named `agent`.

mod boot;
mod control;
mod exec;
mod files;
mod net;
mod port;
mod procs;
mod pty;
mod reaper;
mod sys;
mod trust;
mod users;

use std::sync::Arc;

use moat_protocol::{ErrorKind, Incoming, Message, Mux, Request, Role, Stream};
use tokio::sync::mpsc;

use crate::exec::Execs;
use crate::files::Failure;
use crate::port::{FrameSink, Port};
use crate::reaper::Reaper;

fn main() {
    if std::process::id() != 1 {
        eprintln!("moat-agent is the init (PID 1) of a moat sandbox VM; it does not run elsewhere");
        std::process::exit(2);
    }
    let port = boot::boot().unwrap_or_else(|e| sys::fatal(&e));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| sys::fatal(&format!("starting the runtime: {e}")));
    let err = runtime.block_on(serve(port));
    sys::fatal(&err)
}

/// Serves sessions until something unrecoverable happens; returns what it was.
async fn serve(file: std::fs::File) -> String {
    let reaper = match Reaper::start() {
        Ok(r) => r,
        Err(e) => return format!("installing the SIGCHLD handler: {e}"),
    };
    let execs = Execs::new(reaper);
    let (port, mut sessions, sink) = match Port::start(file) {
        Ok(p) => p,
        Err(e) => return format!("starting the port threads: {e}"),
    };
    while let Some(session) = sessions.recv().await {
        // The previous session's mux ends by itself: the reader dropped its frame sender.
        let ctx = Ctx {
            port: port.clone(),
            generation: session.generation,
            execs: execs.clone(),
        };
        run_session(ctx, session.frames, sink.clone());
    }
    "the port reader stopped".into()
}

#[derive(Clone)]
struct Ctx {
    port: Arc<Port>,
    generation: u64,
    execs: Execs,
}

fn run_session(ctx: Ctx, frames: mpsc::Receiver<moat_protocol::Frame>, sink: FrameSink) {
    let (out_tx, mut out_rx) = mpsc::channel(64);
    let (mux, mut incoming) = Mux::new(Role::Guest, frames, out_tx);
    let generation = ctx.generation;
    tokio::spawn(async move {
        while let Some(frame) = out_rx.recv().await {
            if sink.send((generation, frame)).is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        // Kept for the session's lifetime: guest-opened streams will go through it.
        let _mux = mux;
        while let Some(req) = incoming.recv().await {
            tokio::spawn(handle(ctx.clone(), req));
        }
    });
}

async fn handle(
    ctx: Ctx,
    Incoming {
        mut stream,
        request,
    }: Incoming,
) {
    let request = match serde_json::from_slice::<Request>(&request) {
        Ok(r) => r,
        Err(e) => {
            let failure = Failure(ErrorKind::InvalidInput, format!("bad request: {e}"));
            return finish(stream, Err(failure)).await;
        }
    };
    let result = match request {
        Request::Exec(req) => return ctx.execs.run(req, stream).await,
        Request::Quiesce => return control::quiesce(&ctx.port, ctx.generation, stream).await,
        Request::Shutdown => control::shutdown(stream).await,
        Request::ReadFile { path } => match files::validate(&path) {
            Ok(p) => files::read_file(p, &stream).await.map(|()| Message::Done),
            Err(e) => Err(e),
        },
        Request::WriteFile {
            path,
            mode,
            make_parents,
        } => match files::validate(&path) {
            Ok(p) => files::write_file(p, mode, make_parents, &mut stream)
                .await
                .map(|()| Message::Done),
            Err(e) => Err(e),
        },
        Request::List { path } => match files::validate(&path) {
            Ok(p) => files::list(p, &stream).await.map(|()| Message::Done),
            Err(e) => Err(e),
        },
        Request::Stat { path } => {
            files::blocking(move || files::stat(&files::validate(&path)?).map(Message::Stat)).await
        }
        Request::Mkdir {
            path,
            parents,
            mode,
        } => files::blocking(move || files::mkdir(&files::validate(&path)?, parents, mode))
            .await
            .map(|()| Message::Done),
        Request::Remove { path, recursive } => {
            files::blocking(move || files::remove(&files::validate(&path)?, recursive))
                .await
                .map(|()| Message::Done)
        }
        Request::Refresh(r) => files::blocking(move || control::refresh(&r))
            .await
            .map(|()| Message::Done),
        Request::ProcStart(req) => ctx.execs.proc_start(req),
        Request::ProcList => ctx.execs.proc_list(&stream.sender()).await,
        Request::ProcKill { id, signal } => ctx.execs.proc_kill(&id, signal),
        Request::ProcWait { id, timeout_ms } => {
            match ctx.execs.proc_wait(&id, timeout_ms, &mut stream).await {
                Some(r) => r,
                // The host is gone: nobody to answer.
                None => return stream.close(),
            }
        }
        Request::ProcLogs { id } => ctx.execs.proc_logs(&id, &stream.sender()).await,
        Request::Network(c) => files::blocking(move || net::configure(&c))
            .await
            .map(|()| Message::Done),
    };
    finish(stream, result).await
}

/// Sends the final reply of a request and closes its stream.
async fn finish(stream: Stream, result: Result<Message, Failure>) {
    let msg = result.unwrap_or_else(Failure::message);
    let _ = stream.sender().msg(&msg).await;
    stream.close();
}
