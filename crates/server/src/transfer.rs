//! Moving a suspended sandbox whose files are on this node's own disk to another node
//! (docs/FLEET.md, "Moving suspended sandboxes' files"): a draining node sends a standalone
//! form of its suspend directory over the node-to-node transport of live migration, and
//! the row moves with a hand-over like a live migration's.
//!
//! 1. The source makes the directory standalone (`Manager::standalone_suspend`), holds the
//!    sandbox (no resume of it here meanwhile) and records the hand-over (`handovers`,
//!    fenced by its lease, the sandbox suspended).
//! 2. Each file, `POST /internal/v1/suspended/{id}/files/{name}`, its body streamed from
//!    disk; the credential covers the file's SHA-256 (sent in [`BODY_SHA256`]), hashed
//!    first. The destination streams it into `<name>.part` under its incoming directory
//!    while hashing, fsyncs it, refuses it if the hash differs, renames it and fsyncs the
//!    directory. Never more than a chunk in memory on either side.
//! 3. `POST …/land`: the destination checks the files (all there, standalone, resumable by
//!    its QEMU, kernel and agent), moves them into place as its suspend directory, and moves
//!    the row to itself in one transaction fenced by both nodes' leases
//!    (`Store::complete_file_handover`, which also deletes the hand-over record).
//! 4. Only after that answer does the source delete its copy. Anything else: the source
//!    deletes the hand-over record first, and then the row says whether the destination
//!    took it; the destination removes what arrived (`…/abort`, or on a failed `land`).

use std::path::Path;
use std::time::Instant;

use axum::body::{Body, Bytes};
use futures_util::StreamExt;
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::api::{quote, Node, SandboxState};
use crate::error::{Error, Result};
use crate::http::AppState;
use crate::migrate::mint_for_digest;
use crate::sandboxes::TRANSFER_FILES;

/// The header that carries a streamed file's SHA-256 (hex), which its credential covers.
pub const BODY_SHA256: &str = "x-moat-body-sha256";
/// How much of a file is read or written at once.
const CHUNK: usize = 256 << 10;

/// The credential step of file `name`.
pub(crate) fn file_step(name: &str) -> String {
    format!("file-{name}")
}

async fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let mut h = sha2::Sha256::new();
        let n = std::io::copy(&mut f, &mut h)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        Ok((hex::encode(h.finalize()), n))
    })
    .await
    .map_err(Error::task("hashing a file"))?
}

/// `path` as a request body read a chunk at a time.
async fn file_body(path: &Path) -> Result<Body> {
    let f = tokio::fs::File::open(path)
        .await
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let stream = futures_util::stream::unfold(f, |mut f| async move {
        let mut buf = vec![0u8; CHUNK];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    Ok(Body::from_stream(stream))
}

/// What one transfer measured.
#[derive(Debug, Clone)]
pub struct Sent {
    pub node: String,
    pub total_ms: u64,
    pub bytes: u64,
}

/// Sends suspended sandbox `id` of this node, with its files, to node `to`. On any failure
/// before the hand-over it stays here, suspended (its directory, made standalone, resumes
/// here as well), and the error says why.
pub async fn send_suspended(state: &AppState, id: &str, to: &Node) -> Result<Sent> {
    let t0 = Instant::now();
    let store = &state.store;
    let mgr = state.manager()?;
    let (me, key) = crate::migrate::sender(store)?;
    let dir = mgr.standalone_suspend(id).await?;
    let held = mgr.hold_suspended(id).await?;
    let base = crate::migrate::internal_url(to, "suspended", id);
    let fw = &state.forwarder;
    let sent = async {
        store.begin_file_handover(id, &to.name).await?;
        let mut bytes = 0;
        for name in TRANSFER_FILES {
            let path = dir.join(name);
            let (sha, n) = sha256_file(&path).await?;
            bytes += n;
            let cred = mint_for_digest(&key, &me, &to.name, id, &file_step(name), &sha);
            fw.node_send_file(
                &to.name,
                &format!("{base}/files/{name}"),
                &cred,
                &sha,
                file_body(&path).await?,
            )
            .await?;
        }
        let cred = crate::migrate::mint(&key, &me, &to.name, id, "land", b"");
        fw.node_call(&to.name, &format!("{base}/land"), &cred, Vec::new())
            .await?;
        Ok::<_, Error>(bytes)
    }
    .await;
    let handed_over = match &sent {
        Ok(_) => true,
        // The store decides, as for a live migration: giving the hand-over up first makes
        // the answer final; if it was gone, the row says whether the other node took it.
        Err(_) => match store.cancel_handover(id).await {
            Ok(true) => false,
            Ok(false) => store
                .get_sandbox(id)
                .await?
                .is_some_and(|r| r.node.as_deref() == Some(to.name.as_str())),
            Err(e) => {
                tracing::error!(id, error = %e, "cannot tell whether the hand-over happened");
                return Err(e);
            }
        },
    };
    if handed_over {
        drop(held);
        mgr.sent_away(id).await;
        let sent = Sent {
            node: to.name.clone(),
            total_ms: t0.elapsed().as_millis() as u64,
            bytes: sent.unwrap_or(0),
        };
        tracing::info!(id, to = %to.name, ?sent, "suspended sandbox sent with its files");
        return Ok(sent);
    }
    // Saves the other node keeping a partial copy until its next start.
    let cred = crate::migrate::mint(&key, &me, &to.name, id, "abort", b"");
    let _ = fw
        .node_call(&to.name, &format!("{base}/abort"), &cred, Vec::new())
        .await;
    Err(sent
        .err()
        .unwrap_or_else(|| Error::Internal(format!("sandbox {id} was not handed over"))))
}

/// The destination's check that file `name` of sandbox `id` may arrive from node `from`:
/// a file of a transfer, the sandbox suspended on `from` with a hand-over to this node
/// recorded, and this node not draining.
async fn may_arrive(state: &AppState, from: &str, id: &str, name: &str) -> Result<()> {
    if !TRANSFER_FILES.contains(&name) {
        return Err(Error::NotFound(format!(
            "no file {} in a transfer: {}",
            quote(name),
            TRANSFER_FILES.join(", ")
        )));
    }
    if state.store.draining().await? {
        return Err(Error::Conflict(format!(
            "node {} is draining: it takes no sandboxes",
            quote(&state.store.node_name().unwrap_or_default())
        )));
    }
    let me = state.store.node_name().unwrap_or_default();
    match state.store.get_sandbox(id).await? {
        Some(r) if r.node.as_deref() == Some(from) && r.state == SandboxState::Suspended => {}
        _ => {
            return Err(Error::Conflict(format!(
                "sandbox {id} is not a suspended sandbox of node {}",
                quote(from)
            )))
        }
    }
    if !state.store.handover_pending(id, from, &me).await? {
        return Err(Error::Conflict(format!(
            "no hand-over of sandbox {id} from node {} to node {} is pending",
            quote(from),
            quote(&me)
        )));
    }
    Ok(())
}

/// The destination receives file `name` of sandbox `id` from node `from` (its credential
/// checked for `sha256` by the caller): streamed to disk, hashed as it is written, fsynced,
/// and renamed into the incoming directory only if its hash is `sha256`.
pub(crate) async fn receive_file(
    state: &AppState,
    from: &str,
    id: &str,
    name: &str,
    sha256: &str,
    body: Body,
) -> Result<()> {
    may_arrive(state, from, id, name).await?;
    let mgr = state.manager()?;
    let dir = mgr.incoming_dir(id);
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let (part, dest) = (dir.join(format!("{name}.part")), dir.join(name));
    let written = async {
        let mut f = tokio::fs::File::create(&part)
            .await
            .map_err(|e| Error::io(format!("creating {}", part.display()), e))?;
        let mut h = sha2::Sha256::new();
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                Error::BadRequest(format!("file {name} of sandbox {id} broke off: {e}"))
            })?;
            h.update(&chunk);
            f.write_all(&chunk)
                .await
                .map_err(|e| Error::io(format!("writing {}", part.display()), e))?;
        }
        f.sync_all()
            .await
            .map_err(|e| Error::io(format!("syncing {}", part.display()), e))?;
        let got = hex::encode(h.finalize());
        if got != sha256 {
            return Err(Error::BadRequest(format!(
                "file {name} of sandbox {id} arrived with SHA-256 {got}, not the {sha256} its \
                 credential names"
            )));
        }
        tokio::fs::rename(&part, &dest)
            .await
            .map_err(|e| Error::io(format!("moving {}", part.display()), e))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(format!("syncing {}", dir.display()), e))
    }
    .await;
    if written.is_err() {
        let _ = tokio::fs::remove_file(&part).await;
    }
    written
}

/// The source's last word: `land` (the files become this node's and so does the row) or
/// `abort` (what arrived is removed).
pub(crate) async fn finish(state: &AppState, from: &str, id: &str, land: bool) -> Result<()> {
    let mgr = state.manager()?;
    if !land {
        // Never the files of a sandbox that is this node's already (a land that happened).
        let mine = state.store.get_sandbox(id).await?.and_then(|r| r.node);
        if mine != state.store.node_name() {
            mgr.drop_incoming(id);
        }
        return Ok(());
    }
    let me = state.store.node_name().unwrap_or_default();
    if !state.store.handover_pending(id, from, &me).await? {
        mgr.drop_incoming(id);
        return Err(Error::Conflict(format!(
            "no hand-over of sandbox {id} from node {} to node {} is pending",
            quote(from),
            quote(&me)
        )));
    }
    let row = mgr.land(id, from).await?;
    tracing::info!(id, from, node = ?row.node, "suspended sandbox received with its files");
    Ok(())
}
