//! Live migration between nodes (docs/FLEET.md, "Live migration between nodes"): a running
//! sandbox moves from this node (the source) to another (the destination) with its
//! processes, files, network policy and id; its clients see a pause.
//!
//! The protocol, over the destination's advertised URL with the forwarding client (so https
//! and `--ca-file` apply), on routes under `/internal/v1/migrations/{id}` that take only a
//! node credential ([`mint`], [`Arrivals::check`]), never an API key:
//!
//! 1. the source records the hand-over in the store (`handovers`, fenced by its lease);
//! 2. `POST …` with the offer (the runtime's manifest and the sandbox's identity: group,
//!    image, the group's CA the guest trusts, its `IDENTITY_HEADER`);
//! 3. two `POST …/memory` and `…/disk` upgraded to raw byte streams, each spliced to a socket
//!    pair whose other end goes to QEMU: the runtime's two migration streams;
//! 4. the source runs `migrate_out`, the destination `migrate_in`, `verify`, starts the
//!    network stack with the group's policy and pauses the VM;
//! 5. `POST …/commit`: the destination hands the row over to itself in one transaction
//!    checked against both nodes' leases (`Store::complete_handover`), continues the VM and
//!    answers 200; the source then ends its VM. Any other outcome: whichever side gives up
//!    deletes the hand-over record first (`Store::cancel_handover`), so the source continues
//!    its VM only once the hand-over can no longer happen.
//!
//! The draining node's loop ([`drain`]) moves its running sandboxes one at a time.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use moat_vm::{MigrateParams, MigrationManifest, MigrationStreams};
use ring::hmac;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::sync::{mpsc, oneshot};

use crate::api::{quote, DiskSync, DrainFailure, DrainMove, Node, NodeState, SandboxState};
use crate::error::{Error, Result};
use crate::http::AppState;
use crate::sandboxes::Identity;

/// The header that carries a node credential.
pub const CREDENTIAL: &str = "x-moat-node-credential";
/// The `Upgrade` protocol of the migration streams.
pub const UPGRADE: &str = "moat-migration";
/// How long a credential is accepted after it was made (either way: the nodes' clocks may
/// differ a little; run NTP).
pub const VALIDITY_MS: i64 = 30_000;
/// How long the destination holds a received sandbox for the source's commit.
const COMMIT_WAIT: Duration = Duration::from_secs(60);
/// How long an offer waits for its two streams.
const STREAMS_WAIT: Duration = Duration::from_secs(30);
/// Attempts per sandbox in one drain: a destination that fails its check (about 1 % of
/// migrations under TCG here, docs/SNAPSHOTS.md) costs a retry, not the sandbox's move.
const ATTEMPTS: u32 = 3;

/// What the source sends first.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Offer {
    pub manifest: MigrationManifest,
    pub identity: Identity,
    /// SHA-256 of the overlay's backing file when it is a template's, snapshot's or
    /// suspend's disk (qcow2, a few MB): a destination whose file differs receives the whole
    /// disk. `None` for an image's rootfs (raw), which is named by its digest, and for an
    /// overlay without a backing file.
    pub backing_sha256: Option<String>,
}

/// The destination's answer to an offer: how the disk travels.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Accepted {
    /// `top`: the destination has the overlay's backing file, only the overlay is mirrored.
    /// `full`: it has not (or its file differs), the whole chain is mirrored into a disk
    /// with no backing file.
    pub disk: DiskSync,
    /// Why, in words (for the log and the drain's progress).
    pub reason: String,
}

/// What [`Offer::backing_sha256`] says of `manifest` on this host.
async fn backing_sha256(manifest: &MigrationManifest) -> Result<Option<String>> {
    if manifest.standalone || manifest.backing.format != "qcow2" {
        return Ok(None);
    }
    let path = manifest.backing.path.clone();
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let mut h = sha2::Sha256::new();
        std::io::copy(&mut f, &mut h)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        Ok(Some(hex::encode(h.finalize())))
    })
    .await
    .map_err(Error::task("hashing a disk"))?
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What a credential's MAC covers: every field, and the request body's SHA-256 (hex).
fn signed(fields: &[&str], body_sha256: &str) -> Vec<u8> {
    let mut msg = b"moat node credential v1".to_vec();
    for f in fields {
        msg.push(b'\n');
        msg.extend_from_slice(f.as_bytes());
    }
    msg.push(b'\n');
    msg.extend_from_slice(body_sha256.as_bytes());
    msg
}

/// The SHA-256 of `body`, in hex.
pub(crate) fn sha256_hex(body: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(body))
}

/// A credential of node `from` for one request to node `to` about sandbox `sandbox`:
/// `purpose` is the step (`offer`, `memory`, `disk`, `commit`, `abort`), `body` the request's
/// body. `v1 FROM TO SANDBOX PURPOSE ISSUED_MS NONCE MAC`, the MAC an HMAC-SHA256 under the
/// key derived from the fleet's `secrets.key`. Valid for [`VALIDITY_MS`], once.
pub fn mint(
    key: &hmac::Key,
    from: &str,
    to: &str,
    sandbox: &str,
    purpose: &str,
    body: &[u8],
) -> String {
    mint_for_digest(key, from, to, sandbox, purpose, &sha256_hex(body))
}

/// [`mint`] for a body given by its SHA-256 (hex): a file streamed from disk, hashed first.
pub fn mint_for_digest(
    key: &hmac::Key,
    from: &str,
    to: &str,
    sandbox: &str,
    purpose: &str,
    body_sha256: &str,
) -> String {
    let issued = now_ms().to_string();
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    let fields = [from, to, sandbox, purpose, &issued, &nonce];
    let mac = hmac::sign(key, &signed(&fields, body_sha256));
    format!(
        "v1 {from} {to} {sandbox} {purpose} {issued} {nonce} {}",
        hex::encode(mac.as_ref())
    )
}

/// The destination's side: credentials seen (against replays) and the migrations arriving.
#[derive(Default)]
pub struct Arrivals {
    /// Nonces of accepted credentials, with when they were issued; kept until they expire.
    seen: Mutex<HashMap<String, i64>>,
    arriving: Mutex<HashMap<String, Arriving>>,
}

/// A migration offered and not yet running (waiting for its streams), or running (`asks`).
struct Arriving {
    from: String,
    offered: Instant,
    offer: Option<Offer>,
    whole_disk: bool,
    memory: Option<Upgraded>,
    disk: Option<Upgraded>,
    asks: mpsc::Sender<Ask>,
    asked: Option<mpsc::Receiver<Ask>>,
}

/// The source's last word: commit (the destination hands the row over to itself) or abort.
struct Ask {
    commit: bool,
    /// On a commit: how long the received guest was held paused, in ms.
    reply: oneshot::Sender<Result<u64>>,
}

fn refused(why: String) -> Error {
    Error::Unauthorized(format!(
        "node-to-node route: {why}. These routes take only a credential another node of this \
         fleet made with the shared secrets.key (header {CREDENTIAL}), never an API key"
    ))
}

impl Arrivals {
    /// Checks the credential of a request to this node (`me`) about `sandbox` for step
    /// `purpose` with `body`; the sending node's name. Refused (401, saying why): no or a
    /// malformed credential, another node, sandbox or step, too old or from the future, a MAC
    /// that does not verify with this fleet's key, a nonce seen before.
    pub fn check(
        &self,
        key: &hmac::Key,
        header: Option<&str>,
        me: &str,
        sandbox: &str,
        purpose: &str,
        body: &[u8],
    ) -> Result<String> {
        self.check_digest(key, header, me, sandbox, purpose, &sha256_hex(body))
    }

    /// [`Arrivals::check`] of a request whose body is given by its SHA-256 (hex): a streamed
    /// file, which the receiver hashes as it writes and refuses if it differs.
    pub fn check_digest(
        &self,
        key: &hmac::Key,
        header: Option<&str>,
        me: &str,
        sandbox: &str,
        purpose: &str,
        body_sha256: &str,
    ) -> Result<String> {
        let Some(header) = header else {
            return Err(refused("no credential".into()));
        };
        let f: Vec<&str> = header.split(' ').collect();
        let [v, from, to, sb, step, issued, nonce, mac] = f[..] else {
            return Err(refused("a malformed credential".into()));
        };
        if v != "v1" {
            return Err(refused(format!(
                "credential version {}: this node reads v1",
                quote(v)
            )));
        }
        let issued_ms: i64 = issued
            .parse()
            .map_err(|_| refused("a malformed credential (its time)".into()))?;
        let mac =
            hex::decode(mac).map_err(|_| refused("a malformed credential (its MAC)".into()))?;
        hmac::verify(
            key,
            &signed(&[from, to, sb, step, issued, nonce], body_sha256),
            &mac,
        )
        .map_err(|_| {
            refused(
                "a credential that does not verify with this fleet's key (forged, altered, \
                     or made with another secrets.key)"
                    .into(),
            )
        })?;
        if to != me {
            return Err(refused(format!(
                "a credential for node {}, not this node {}",
                quote(to),
                quote(me)
            )));
        }
        if sb != sandbox || step != purpose {
            return Err(refused(format!(
                "a credential for {step} of sandbox {sb}, not {purpose} of {sandbox}"
            )));
        }
        let age = now_ms() - issued_ms;
        if age.abs() > VALIDITY_MS {
            return Err(refused(format!(
                "an expired credential (made {age} ms ago; one is valid for {VALIDITY_MS} ms)"
            )));
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let horizon = now_ms() - 2 * VALIDITY_MS;
        seen.retain(|_, at| *at > horizon);
        if seen.insert(nonce.to_string(), issued_ms).is_some() {
            return Err(refused(
                "a credential that was used before (a replay)".into(),
            ));
        }
        Ok(from.to_string())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arriving>> {
        self.arriving.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How the disk of `offer` must travel to this node: only the overlay when the overlay's
/// backing file is one of this node's own files with the source's content, else the whole
/// disk (a node on another host has none of the source's template, snapshot or suspend
/// files, or other ones under the same names).
async fn plan_disk(state: &AppState, offer: &Offer) -> Result<Accepted> {
    let m = &offer.manifest;
    let path = m.backing.path.display();
    let full = |reason: String| {
        Ok(Accepted {
            disk: DiskSync::Full,
            reason,
        })
    };
    if m.standalone {
        return full("its disk has no backing file".into());
    }
    if !m.backing.path.is_file() {
        return full(format!(
            "its disk's backing file {path} is not on this node"
        ));
    }
    if !state.manager()?.holds_file(&m.backing.path) {
        return full(format!(
            "its disk's backing file {path} is not one of this node's files"
        ));
    }
    if offer.backing_sha256.is_some() && backing_sha256(m).await? != offer.backing_sha256 {
        return full(format!(
            "its disk's backing file {path} differs on this node"
        ));
    }
    Ok(Accepted {
        disk: DiskSync::Top,
        reason: format!("this node has its disk's backing file {path}"),
    })
}

/// The destination takes an offer from node `from` (checked by the caller) and says how the
/// disk must travel.
pub(crate) async fn offered(
    state: &AppState,
    from: &str,
    id: &str,
    body: &[u8],
) -> Result<Accepted> {
    let offer: Offer = serde_json::from_slice(body)
        .map_err(|e| Error::BadRequest(format!("a migration offer that does not parse: {e}")))?;
    if offer.manifest.id != id {
        return Err(Error::BadRequest(format!(
            "the offer is for sandbox {}, the path names {id}",
            offer.manifest.id
        )));
    }
    let accepted = plan_disk(state, &offer).await?;
    if state.store.draining().await? {
        return Err(Error::Conflict(format!(
            "node {} is draining: it takes no sandboxes",
            quote(&state.store.node_name().unwrap_or_default())
        )));
    }
    let arrivals = &state.migrations;
    let mut arriving = arrivals.lock();
    arriving.retain(|_, a| a.asked.is_none() || a.offered.elapsed() < STREAMS_WAIT);
    if arriving.contains_key(id) {
        return Err(Error::Conflict(format!(
            "a migration of sandbox {id} is already arriving"
        )));
    }
    let (asks, asked) = mpsc::channel(1);
    arriving.insert(
        id.to_string(),
        Arriving {
            from: from.to_string(),
            offered: Instant::now(),
            offer: Some(offer),
            whole_disk: accepted.disk == DiskSync::Full,
            memory: None,
            disk: None,
            asks,
            asked: Some(asked),
        },
    );
    tracing::info!(id, from, disk = accepted.disk.as_str(), reason = %accepted.reason, "a live migration offered");
    Ok(accepted)
}

/// One of the two streams of an offered migration arrived (`memory` or `disk`); once both
/// are here the destination starts receiving.
pub(crate) fn stream_arrived(state: &AppState, from: &str, id: &str, which: &str, io: Upgraded) {
    let started = {
        let mut arriving = state.migrations.lock();
        let Some(a) = arriving.get_mut(id).filter(|a| a.from == from) else {
            return;
        };
        match which {
            "memory" => a.memory = Some(io),
            _ => a.disk = Some(io),
        }
        match (a.memory.is_some() && a.disk.is_some(), a.asked.is_some()) {
            (true, true) => Some((
                a.whole_disk,
                a.offer.take(),
                a.memory.take(),
                a.disk.take(),
                a.asked.take(),
            )),
            _ => None,
        }
    };
    if let Some((whole_disk, Some(offer), Some(memory), Some(disk), Some(asked))) = started {
        let (state, from, id) = (state.clone(), from.to_string(), id.to_string());
        let streams = (memory, disk);
        tokio::spawn(
            async move { receive(state, from, id, offer, whole_disk, streams, asked).await },
        );
    }
}

/// Whether an offer from `from` for `id` waits for its streams.
pub(crate) fn expects_streams(state: &AppState, from: &str, id: &str) -> bool {
    state
        .migrations
        .lock()
        .get(id)
        .is_some_and(|a| a.from == from && a.asked.is_some())
}

/// The source's commit or abort, answered once the destination has decided.
pub(crate) async fn asked(state: &AppState, from: &str, id: &str, commit: bool) -> Result<u64> {
    let asks = {
        let mut arriving = state.migrations.lock();
        match arriving.get(id).filter(|a| a.from == from) {
            None => {
                return Err(Error::Conflict(format!(
                    "no migration of sandbox {id} from node {} is arriving here",
                    quote(from)
                )))
            }
            // Its streams never both came: nothing runs here to decide about.
            Some(a) if a.asked.is_some() => {
                arriving.remove(id);
                return if commit {
                    Err(Error::Conflict(format!(
                        "the migration of sandbox {id} never started here (its streams did \
                         not arrive)"
                    )))
                } else {
                    Ok(0)
                };
            }
            Some(a) => a.asks.clone(),
        }
    };
    let (reply, answer) = oneshot::channel();
    asks.send(Ask { commit, reply }).await.map_err(|_| {
        Error::Conflict(format!("the migration of sandbox {id} already ended here"))
    })?;
    answer
        .await
        .map_err(|_| Error::Internal(format!("the migration of sandbox {id} ended unanswered")))?
}

/// The destination's side of one migration: receive, check, wait for the source's word, and
/// hand the row over (or give up and end the received VM).
async fn receive(
    state: AppState,
    from: String,
    id: String,
    offer: Offer,
    whole_disk: bool,
    (memory, disk): (Upgraded, Upgraded),
    mut asked: mpsc::Receiver<Ask>,
) {
    let received = async {
        let mgr = state.manager()?;
        let streams = MigrationStreams {
            memory: relay(memory)?,
            disk: relay(disk)?,
        };
        mgr.receive(&offer.manifest, &offer.identity, streams, whole_disk)
            .await
    }
    .await;
    if let Err(e) = &received {
        tracing::warn!(id, from, error = %e, "a live migration did not arrive");
    }
    let parked = Instant::now();
    let wait = if received.is_ok() {
        COMMIT_WAIT
    } else {
        STREAMS_WAIT
    };
    let ask = tokio::time::timeout(wait, asked.recv())
        .await
        .ok()
        .flatten();
    let mgr = state.manager();
    let (ask, answer) = match (ask, received, mgr) {
        (Some(ask), Ok(sb), Ok(mgr)) if ask.commit => {
            match state.store.complete_handover(&id, &from).await {
                Ok(row) => {
                    mgr.arrive(&row, sb).await;
                    let parked_ms = parked.elapsed().as_millis() as u64;
                    tracing::info!(
                        id,
                        from,
                        parked_ms,
                        "sandbox handed over to this node by live migration"
                    );
                    (Some(ask), Ok(parked_ms))
                }
                Err(e) => {
                    mgr.discard(sb).await;
                    tracing::warn!(id, from, error = %e, "the hand-over failed; the received VM ended");
                    (Some(ask), Err(e))
                }
            }
        }
        (ask, Ok(sb), Ok(mgr)) => {
            // Aborted, or no word in time: give the hand-over up first, so that it cannot
            // happen after the source continued. (Only this node completes a hand-over, so
            // ending the VM is safe even if giving up fails.)
            if let Err(e) = state.store.cancel_handover(&id).await {
                tracing::warn!(id, error = %e, "giving up a hand-over");
            }
            mgr.discard(sb).await;
            tracing::warn!(
                id,
                from,
                "migration aborted or never committed; the received VM ended"
            );
            (ask, Ok(0))
        }
        (ask, Err(e), _) | (ask, Ok(_), Err(e)) => {
            let commit = ask.as_ref().is_some_and(|a| a.commit);
            (ask, if commit { Err(e) } else { Ok(0) })
        }
    };
    // Gone before the source hears of it, so that its next attempt may offer again.
    state.migrations.lock().remove(&id);
    if let Some(ask) = ask {
        let _ = ask.reply.send(answer);
    }
}

/// Splices `io` (a node-to-node connection upgraded to raw bytes) to one end of a socket pair
/// and returns the other end, for QEMU.
fn relay(io: Upgraded) -> Result<OwnedFd> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| Error::io("making a socket pair for a migration stream", e))?;
    ours.set_nonblocking(true)
        .map_err(|e| Error::io("a migration stream", e))?;
    let mut ours =
        tokio::net::UnixStream::from_std(ours).map_err(|e| Error::io("a migration stream", e))?;
    tokio::spawn(async move {
        let mut io = TokioIo::new(io);
        let _ = tokio::io::copy_bidirectional_with_sizes(&mut io, &mut ours, 256 << 10, 256 << 10)
            .await;
    });
    Ok(theirs.into())
}

/// What one move measured.
#[derive(Debug, Clone)]
pub struct Moved {
    pub node: String,
    /// QEMU's downtime on the source (stopped for the last pass), then until the hand-over
    /// was answered (the destination's last load and `cont`, its check, which runs the guest,
    /// and the commit, during which it is paused).
    pub pause_ms: u64,
    /// Of that, how long the destination held the checked guest paused for the commit.
    pub held_ms: u64,
    /// From taking the sandbox to the hand-over's answer.
    pub total_ms: u64,
    pub ram_bytes: u64,
    /// How the disk travelled, and why.
    pub disk: DiskSync,
    pub disk_reason: String,
    pub disk_bytes: u64,
}

/// What every node-to-node request this node sends needs: its name and the key of its node
/// credentials.
pub(crate) fn sender(store: &crate::store::Store) -> Result<(String, hmac::Key)> {
    let me = store
        .node_name()
        .ok_or_else(|| Error::Unavailable("this daemon is not a node".into()))?;
    Ok((me, store.node_key()?))
}

/// The URL of node `to`'s internal route `/internal/v1/{kind}/{id}` (`migrations`,
/// `suspended`), under which each step has its own path.
pub(crate) fn internal_url(to: &Node, kind: &str, id: &str) -> String {
    format!(
        "{}/internal/v1/{kind}/{id}",
        to.advertise_url.trim_end_matches('/')
    )
}

/// Moves running sandbox `id` of this node to node `to` by live migration. On any failure
/// before the hand-over the sandbox runs on here, as it was, and the error says why.
pub async fn move_sandbox(state: &AppState, id: &str, to: &Node) -> Result<Moved> {
    let t0 = Instant::now();
    let store = &state.store;
    let mgr = state.manager()?;
    let (me, key) = sender(store)?;
    let row = store
        .get_sandbox(id)
        .await?
        .ok_or_else(|| Error::SandboxGone(id.to_string()))?;
    let (leaving, vm, manifest, identity) = mgr.leave(&row).await?;
    let base = internal_url(to, "migrations", id);
    let cred = |purpose: &str, body: &[u8]| mint(&key, &me, &to.name, id, purpose, body);
    let fw = &state.forwarder;
    let prepared = async {
        store.begin_handover(id, &to.name).await?;
        let backing_sha256 = backing_sha256(&manifest).await?;
        let offer = serde_json::to_vec(&Offer {
            manifest,
            identity,
            backing_sha256,
        })
        .map_err(|e| Error::Internal(format!("the migration offer: {e}")))?;
        let answer = fw
            .node_call(&to.name, &base, &cred("offer", &offer), offer.clone())
            .await?;
        let accepted: Accepted = serde_json::from_slice(&answer).map_err(|e| {
            Error::Internal(format!(
                "node {} answered the migration offer with what this node cannot read: {e}",
                to.name
            ))
        })?;
        tracing::info!(id, to = %to.name, disk = accepted.disk.as_str(), reason = %accepted.reason, "live migration: how the disk travels");
        let memory = fw
            .node_upgrade(&to.name, &format!("{base}/memory"), &cred("memory", b""))
            .await?;
        let disk = fw
            .node_upgrade(&to.name, &format!("{base}/disk"), &cred("disk", b""))
            .await?;
        let streams = MigrationStreams {
            memory: relay(memory)?,
            disk: relay(disk)?,
        };
        Ok::<_, Error>((streams, accepted))
    }
    .await;
    let abort = || async {
        // Best effort: the destination also gives up by itself when its streams break or
        // never come; this only saves it the wait.
        let _ = fw
            .node_call(
                &to.name,
                &format!("{base}/abort"),
                &cred("abort", b""),
                Vec::new(),
            )
            .await;
    };
    let (streams, accepted) = match prepared {
        Ok(s) => s,
        Err(e) => {
            let _ = store.cancel_handover(id).await;
            mgr.stay(leaving, vm);
            abort().await;
            return Err(e);
        }
    };
    let params = MigrateParams {
        whole_disk: accepted.disk == DiskSync::Full,
        ..MigrateParams::default()
    };
    let departed = match vm.migrate_out(streams, &params).await {
        Ok(d) => d,
        Err(stayed) => {
            let _ = store.cancel_handover(id).await;
            mgr.stay(leaving, stayed.sandbox);
            abort().await;
            return Err(Error::vm("sending the live migration")(stayed.error));
        }
    };
    let stats = *departed.stats();
    let departed_at = Instant::now();
    let committed = fw
        .node_call(
            &to.name,
            &format!("{base}/commit"),
            &cred("commit", b""),
            Vec::new(),
        )
        .await;
    let handed_over = match &committed {
        Ok(_) => true,
        // No answer, or a refusal: the store decides. Giving the hand-over up first makes the
        // answer final; if it was gone, the row says whether it happened.
        Err(_) => match store.cancel_handover(id).await {
            Ok(true) => false,
            Ok(false) => store
                .get_sandbox(id)
                .await
                .ok()
                .flatten()
                .is_some_and(|r| r.node.as_deref() == Some(to.name.as_str())),
            Err(e) => {
                // Undecidable now: keep the source paused and let go of it; the next start of
                // this node ends it (`departed.json`) unless the row is still ours.
                tracing::error!(id, error = %e, "cannot tell whether the hand-over happened");
                mgr.left(id, leaving);
                let _ = departed.detach();
                return Err(e);
            }
        },
    };
    if handed_over {
        let out_of_reach = departed_at.elapsed().as_millis() as u64;
        mgr.left(id, leaving);
        departed.complete().await;
        let held_ms = committed
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["parked_ms"].as_u64())
            .unwrap_or(0);
        let moved = Moved {
            node: to.name.clone(),
            pause_ms: stats.downtime_ms + out_of_reach,
            held_ms,
            total_ms: t0.elapsed().as_millis() as u64,
            ram_bytes: stats.ram_transferred_bytes,
            disk: accepted.disk,
            disk_reason: accepted.reason,
            disk_bytes: stats.disk_bytes,
        };
        tracing::info!(id, to = %to.name, ?moved, "sandbox moved by live migration");
        return Ok(moved);
    }
    let why = committed.err().map_or_else(String::new, |e| e.to_string());
    // The hand-over can no longer happen; a destination that still holds its paused copy
    // ends it now instead of when its wait runs out.
    abort().await;
    match departed.abort().await {
        Ok(sb) => {
            mgr.stay(leaving, sb);
            Err(Error::Conflict(format!(
                "sandbox {id} was not handed over to node {} ({why}); it runs on here",
                quote(&to.name)
            )))
        }
        Err(e) => {
            let reason = format!("its live migration to node {} failed ({why}) and it could not be continued here: {e}", to.name);
            mgr.left_failed(id, leaving, &reason).await;
            Err(Error::Internal(reason))
        }
    }
}

/// While this node is draining, moves its running sandboxes to other ready nodes one at a
/// time, recording the progress on its row (`drain` in `GET /v1/nodes/{node}`), which is
/// also where the next round reads it from (an undrain clears it). A sandbox that could not
/// be moved in [`ATTEMPTS`] runs on here, with the reason in the progress; an undrain and a
/// new drain try again.
pub async fn drain(state: AppState) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if state.manager().is_err() {
            continue;
        }
        if let Err(e) = drain_step(&state).await {
            tracing::warn!(error = %e, "draining");
        }
    }
}

async fn drain_step(state: &AppState) -> Result<()> {
    let store = &state.store;
    let Some(me) = store.node_name() else {
        return Ok(());
    };
    let nodes = store.list_nodes().await?;
    let Some(mine) = nodes.iter().find(|n| n.name == me) else {
        return Ok(());
    };
    if mine.state != NodeState::Draining {
        return Ok(());
    }
    let running: Vec<String> = store
        .list_sandboxes(None)
        .await?
        .into_iter()
        .filter(|r| r.node.as_deref() == Some(me.as_str()) && r.state == SandboxState::Running)
        .map(|r| r.id)
        .collect();
    // Then the suspended ones whose files are on this node's disk, sent with their files
    // (`crate::transfer`); those on shared storage are handed over by the manager.
    let suspended = store.suspended_local().await?;
    let before = mine.drain.clone();
    let mut p = before.clone().unwrap_or_default();
    let untried = |ids: &[String]| {
        ids.iter()
            .find(|id| !p.failed.iter().any(|f| &f.sandbox == *id))
            .cloned()
    };
    let (todo, is_running) = match untried(&running) {
        Some(id) => (Some(id), true),
        None => (untried(&suspended), false),
    };
    p.running_left = running.len() as u64;
    p.done = todo.is_none();
    p.moving = todo.clone();
    if before.as_ref() != Some(&p) {
        store.set_drain_progress(Some(&p)).await?;
    }
    let Some(id) = todo else {
        return Ok(());
    };
    let dest = match store.get_sandbox(&id).await? {
        Some(sb) => {
            store
                .destination(&sb, &me, |n| n.accelerator == mine.accelerator)
                .await
        }
        None => return Ok(()),
    };
    let outcome = match dest {
        Err(e) => Err(e),
        Ok(dest) if !is_running => crate::transfer::send_suspended(state, &id, &dest)
            .await
            .map(|s| Moved {
                node: s.node,
                pause_ms: 0,
                held_ms: 0,
                total_ms: s.total_ms,
                ram_bytes: 0,
                disk: DiskSync::Full,
                disk_reason: "a suspended sandbox's files, standalone".into(),
                disk_bytes: s.bytes,
            }),
        Ok(dest) => {
            let mut last = Err(Error::Internal("not tried".into()));
            for attempt in 1..=ATTEMPTS {
                last = move_sandbox(state, &id, &dest).await;
                match &last {
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(id, to = %dest.name, attempt, error = %e, "moving a sandbox failed")
                    }
                }
                // Gone or no longer running here: nothing to retry.
                match store.get_sandbox(&id).await? {
                    Some(r)
                        if r.state == SandboxState::Running
                            && r.node.as_deref() == Some(me.as_str()) => {}
                    _ => break,
                }
            }
            last
        }
    };
    match outcome {
        Ok(m) => p.moved.push(DrainMove {
            sandbox: id,
            node: m.node,
            pause_ms: m.pause_ms,
            total_ms: m.total_ms,
            disk: Some(m.disk),
        }),
        Err(e) => {
            tracing::warn!(id, error = %e, "a sandbox could not be moved off this draining node; it runs on here");
            p.failed.push(DrainFailure {
                sandbox: id,
                reason: e.to_string(),
            });
        }
    }
    p.moving = None;
    p.running_left = store
        .list_sandboxes(None)
        .await?
        .iter()
        .filter(|r| r.node.as_deref() == Some(me.as_str()) && r.state == SandboxState::Running)
        .count() as u64;
    store.set_drain_progress(Some(&p)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: &[u8]) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, seed)
    }

    #[test]
    fn only_a_fresh_unaltered_credential_of_this_fleet_passes_once() {
        let (k, other) = (key(b"fleet"), key(b"another fleet"));
        let arrivals = Arrivals::default();
        let check = |cred: &str, body: &[u8]| {
            arrivals
                .check(&k, Some(cred), "b", "sb-1", "offer", body)
                .map_err(|e| e.to_string())
        };
        let good = mint(&k, "a", "b", "sb-1", "offer", b"{}");
        assert_eq!(check(&good, b"{}").unwrap(), "a");
        // Replayed.
        let e = check(&good, b"{}").unwrap_err();
        assert!(e.contains("used before"), "{e}");
        // Another body, another key, an altered field, another node, step or sandbox.
        let e = check(&mint(&k, "a", "b", "sb-1", "offer", b"{}"), b"{ }").unwrap_err();
        assert!(e.contains("does not verify"), "{e}");
        let e = check(&mint(&other, "a", "b", "sb-1", "offer", b""), b"").unwrap_err();
        assert!(e.contains("does not verify"), "{e}");
        let forged = mint(&k, "a", "b", "sb-1", "offer", b"").replacen(" a ", " c ", 1);
        let e = check(&forged, b"").unwrap_err();
        assert!(e.contains("does not verify"), "{e}");
        let e = check(&mint(&k, "a", "c", "sb-1", "offer", b""), b"").unwrap_err();
        assert!(e.contains("for node \"c\""), "{e}");
        let e = check(&mint(&k, "a", "b", "sb-1", "commit", b""), b"").unwrap_err();
        assert!(e.contains("not offer"), "{e}");
        let e = check(&mint(&k, "a", "b", "sb-2", "offer", b""), b"").unwrap_err();
        assert!(e.contains("not offer of sb-1"), "{e}");
        // Expired (or from the future), though well signed.
        for skew in [-(VALIDITY_MS + 1000), VALIDITY_MS + 1000] {
            let issued = (now_ms() + skew).to_string();
            let nonce = hex::encode(rand::random::<[u8; 16]>());
            let fields = ["a", "b", "sb-1", "offer", issued.as_str(), nonce.as_str()];
            let mac = hex::encode(hmac::sign(&k, &signed(&fields, &sha256_hex(b""))).as_ref());
            let cred = format!("v1 a b sb-1 offer {issued} {nonce} {mac}");
            let e = check(&cred, b"").unwrap_err();
            assert!(e.contains("expired"), "{e}");
        }
        // A streamed file's credential binds its hash: another file's hash does not verify.
        let (one, other) = (sha256_hex(b"one"), sha256_hex(b"other"));
        let cred = mint_for_digest(&k, "a", "b", "sb-1", "file-memory.bin", &one);
        let e = arrivals
            .check_digest(&k, Some(&cred), "b", "sb-1", "file-memory.bin", &other)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not verify"), "{e}");
        let from = arrivals
            .check_digest(&k, Some(&cred), "b", "sb-1", "file-memory.bin", &one)
            .unwrap();
        assert_eq!(from, "a");
        // Missing, malformed, an API key in its place: refused, saying what the route takes.
        let e = arrivals
            .check(&k, None, "b", "sb-1", "offer", b"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no credential") && e.contains("never an API key"),
            "{e}"
        );
        for bad in ["Bearer moat_admin", "v2 a b sb-1 offer 1 2 3", ""] {
            let e = check(bad, b"").unwrap_err();
            assert!(e.contains("credential"), "{bad}: {e}");
        }
    }
}
