//! The network of the daemon's sandboxes: every sandbox's stack (`moat net-stack`, one per VM,
//! see `moat_vm::netstack`) gets its group's egress policy from here, keeps getting it when the
//! group changes, and reports every decision back here for the audit store and the metrics.
//!
//! One *link* per running sandbox: a task holding the control connection to its stack. It is
//! made wherever a VM becomes a running sandbox (create, pool hand-over, fork, resume,
//! adoption after a restart) before the sandbox is reported running, so an answer of
//! `running` means the policy is in force. A stack that an earlier daemon started gets a
//! `policy` instead of a `start` (its `hello` says which).
//!
//! The stack ends only when its VM does (QEMU closes the link) or when it dies. The daemon
//! *releases* a link before it ends a VM itself (delete, suspend, a graceful stop); a link that
//! ends unreleased means the stack died under a live VM, which QEMU 7.2 cannot reconnect, so
//! the sandbox is marked failed with the reason and its VM destroyed: never silently offline.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moat_net::audit::{Event, Kind, Verdict};
use moat_net::control::{Client, Delivery, Incoming, LimitsSpec, Reply, Request, Token};
use moat_net::transform::Placeholder;
use moat_net::{EgressSpec, Secret};
use tokio::sync::{mpsc, oneshot};

use super::Manager;
use crate::api;
use crate::error::{Error, Result};
use crate::metrics;

/// How long a live policy update waits for each stack to take it.
const UPDATE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a stack may take to answer its first policy (it is a local process that answers
/// at once; this bounds a wedged one).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Audit events waiting for the store; beyond that they are dropped (and logged).
const AUDIT_QUEUE: usize = 16_384;
/// Events written to the store in one transaction at most.
const AUDIT_BATCH: usize = 512;

/// The daemon's egress settings (`moat serve --egress-hosts`, `--egress-resolver`,
/// `--egress-audit-retention`).
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// hosts(5) text: names answered from it instead of DNS, and reachable past the floor.
    pub hosts: Option<String>,
    /// The upstream resolver the stacks ask; `None`: the host's own (/etc/resolv.conf).
    pub resolver: Option<SocketAddr>,
    /// Audit events kept in the store; the oldest go first.
    pub audit_retention: u64,
    /// PEM certificates the stacks trust upstream of intercepted hosts besides Mozilla's
    /// roots (`--upstream-ca`).
    pub upstream_ca: Option<String>,
}

/// The default of [`NetConfig::audit_retention`].
pub const DEFAULT_AUDIT_RETENTION: u64 = 100_000;

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            hosts: None,
            resolver: None,
            audit_retention: DEFAULT_AUDIT_RETENTION,
            upstream_ca: None,
        }
    }
}

/// A running sandbox's link to its stack, as the manager holds it.
pub(super) struct Link {
    group: String,
    /// Set before the daemon ends the VM itself: the stack's end is then expected.
    released: Arc<AtomicBool>,
    /// Asks the link to send the group's current policy; answered once the stack took it.
    refresh: mpsc::Sender<oneshot::Sender<()>>,
}

/// One audit event on its way to the store.
pub struct AuditRecord {
    pub group: String,
    pub sandbox: String,
    pub event: Event,
}

impl Manager {
    fn lock_links(&self) -> std::sync::MutexGuard<'_, HashMap<String, Link>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives the running sandbox `id` of `group` its network (see the module header). An
    /// error means the sandbox has none: the caller must not report it running.
    pub(super) async fn connect_network(
        self: &Arc<Self>,
        id: &str,
        group: &str,
        sb: &moat_vm::Sandbox,
    ) -> Result<()> {
        self.connect_network_with(id, group, sb, None).await
    }

    /// [`Manager::connect_network`], with the CA a new stack signs with when it is not this
    /// node's CA of the group: a sandbox that arrived by live migration trusts the CA of the
    /// node it came from.
    pub(super) async fn connect_network_with(
        self: &Arc<Self>,
        id: &str,
        group: &str,
        sb: &moat_vm::Sandbox,
        ca: Option<moat_net::intercept::CaSpec>,
    ) -> Result<()> {
        let (refresh, requests) = mpsc::channel(8);
        let released = Arc::new(AtomicBool::new(false));
        // Registered before the policy is read, so a group update that lands meanwhile reaches
        // this link too (it re-reads the store when asked).
        let old = self.lock_links().insert(
            id.to_string(),
            Link {
                group: group.to_string(),
                released: released.clone(),
                refresh,
            },
        );
        if let Some(old) = old {
            old.released.store(true, Ordering::SeqCst);
        }
        let ca = match ca {
            Some(ca) => Ok(ca),
            None => self.group_ca(group).await,
        };
        let ca = match ca {
            Ok(ca) => ca,
            Err(e) => {
                self.release_network_if(id, &released);
                return Err(e);
            }
        };
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let (mut client, hello) = Client::connect(&sb.net_control_path()).await?;
            let (egress, limits) = self.current_network(group).await;
            let secrets = self.secrets_for(group, &egress).await;
            let started = matches!(hello, Reply::Hello { started: true, .. });
            let req = if started {
                Request::Policy { egress, secrets }
            } else {
                Request::Start {
                    egress,
                    hosts: self.net.hosts.clone(),
                    resolver: self.net.resolver,
                    limits: limits.clone(),
                    secrets,
                    ca: Some(Box::new(ca)),
                    upstream_ca: self.net.upstream_ca.clone(),
                    identity_header: sb.identity_header().map(str::to_string),
                }
            };
            client
                .request(&req, |e| self.record_audit(group, id, e))
                .await?;
            if started {
                // Adopted: the group's limits may have changed while no daemon ran.
                self.send_limits(&mut client, group, id, limits).await;
            }
            Ok::<_, moat_net::Error>(client)
        })
        .await
        .unwrap_or_else(|_| {
            Err(moat_net::Error::Control(format!(
                "no answer within {} s",
                CONNECT_TIMEOUT.as_secs()
            )))
        });
        let client = match connected {
            Ok(c) => c,
            Err(e) => {
                self.release_network_if(id, &released);
                return Err(Error::Internal(format!(
                    "starting sandbox {id}'s network: {e}"
                )));
            }
        };
        let mgr = self.clone();
        let (id, group) = (id.to_string(), group.to_string());
        tokio::spawn(async move {
            let ended = mgr.serve_link(client, requests, &group, &id).await;
            if released.load(Ordering::SeqCst) {
                return;
            }
            mgr.network_lost(&id, &released, ended).await;
        });
        Ok(())
    }

    /// The link's loop: audit events in, policy updates out, until the stack ends. Returns
    /// how it ended.
    async fn serve_link(
        &self,
        mut client: Client,
        mut requests: mpsc::Receiver<oneshot::Sender<()>>,
        group: &str,
        id: &str,
    ) -> String {
        let mut asking = true;
        loop {
            tokio::select! {
                ask = requests.recv(), if asking => {
                    let Some(done) = ask else {
                        // Released: read what the stack still says until it ends.
                        asking = false;
                        continue;
                    };
                    let (egress, limits) = self.current_network(group).await;
                    let secrets = self.secrets_for(group, &egress).await;
                    let req = Request::Policy { egress, secrets };
                    if let Err(e) = client.request(&req, |e| self.record_audit(group, id, e)).await {
                        return format!("its network stack failed a policy update: {e}");
                    }
                    self.send_limits(&mut client, group, id, limits).await;
                    let _ = done.send(());
                }
                incoming = client.next_incoming() => match incoming {
                    Ok(Some(Incoming::Audit(e))) => self.record_audit(group, id, e),
                    Ok(Some(Incoming::Mint { id: ask, audience, delivery })) => {
                        let minted = self.mint_for_stack(group, id, audience, delivery).await;
                        if let Err(e) = client.answer_mint(ask, minted).await {
                            return format!("its network stack broke the control channel: {e}");
                        }
                    }
                    Ok(Some(Incoming::IdentityRefused { audience, reason })) => {
                        self.identity.refused_in_guest(group, id, audience, reason).await;
                    }
                    Ok(None) => return "its network stack exited".to_string(),
                    Err(e) => return format!("its network stack broke the control channel: {e}"),
                }
            }
        }
    }

    /// A token asked for by the stack of sandbox `id` of `group`: the sandbox is the one this
    /// link serves, whatever the guest did; the issuer decides and audits (an `endpoint` mint
    /// only while the group's `identity.in_guest` is on). The answer to the stack carries the
    /// refusal's message, never more.
    async fn mint_for_stack(
        &self,
        group: &str,
        id: &str,
        audience: String,
        delivery: Delivery,
    ) -> std::result::Result<Token, String> {
        let req = crate::identity::MintRequest {
            group: group.to_string(),
            sandbox: id.to_string(),
            audience,
            ttl_s: None,
            delivery: match delivery {
                Delivery::Egress => api::IdentityDelivery::Egress,
                Delivery::Endpoint => api::IdentityDelivery::Endpoint,
            },
            key_id: None,
        };
        self.identity
            .mint(req)
            .await
            .map(|t| Token {
                token: t.token,
                expires_on: t.expires_on,
            })
            .map_err(|e| e.to_string())
    }

    /// The daemon is about to end `id`'s VM (or has lost it): its stack's end is expected.
    pub(super) fn release_network(&self, id: &str) {
        if let Some(link) = self.lock_links().remove(id) {
            link.released.store(true, Ordering::SeqCst);
        }
    }

    /// [`Manager::release_network`], only if the link is still the one `released` belongs to.
    fn release_network_if(&self, id: &str, released: &Arc<AtomicBool>) {
        let mut links = self.lock_links();
        released.store(true, Ordering::SeqCst);
        if links
            .get(id)
            .is_some_and(|l| Arc::ptr_eq(&l.released, released))
        {
            links.remove(id);
        }
    }

    /// The stack of running sandbox `id` ended on its own: the sandbox is failed with `why`
    /// (in the store at once), requests holding it are told to let go, and its VM destroyed.
    async fn network_lost(self: &Arc<Self>, id: &str, released: &Arc<AtomicBool>, why: String) {
        self.release_network_if(id, released);
        let Some(entry) = self.entry(id) else {
            return;
        };
        // A suspend or delete that took the VM meanwhile released us first; anything else
        // holding the lock now (an exec) is told to let go.
        entry.deleted.send_replace(true);
        let vm = entry.vm.write().await.take();
        let Some(vm) = vm else {
            return;
        };
        let reason = format!("{why} (a VM cannot get a new one: its network is gone)");
        if let Err(e) = self.fail(id, &reason).await {
            tracing::warn!(id, error = %e, "marking a sandbox failed");
        }
        vm.destroy().await;
        self.cap.release(id);
        self.lock_live().remove(id);
    }

    /// The values of the secrets `egress`'s transforms use (only those; one the group no
    /// longer has is left out, and the stacks refuse the requests that need it).
    async fn secrets_for(&self, group: &str, egress: &EgressSpec) -> BTreeMap<String, Secret> {
        let names: Vec<String> = match moat_net::Policy::new(egress.clone()) {
            Ok(p) => p
                .placeholders()
                .into_iter()
                .filter_map(|(_, p)| match p {
                    Placeholder::Secret(n) => Some(n),
                    Placeholder::Identity(_) => None,
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        if names.is_empty() {
            return BTreeMap::new();
        }
        match self.store.secret_values(group, names).await {
            Ok(v) => v,
            Err(e) => {
                // Without its values a transform cannot inject: its requests are refused.
                tracing::error!(group, error = %e, "reading the group's secrets");
                BTreeMap::new()
            }
        }
    }

    /// The egress policy of `group` now, as the stacks get it: a group that is gone, or whose
    /// stored policy no longer validates (a rule a newer moat refuses), denies everything.
    async fn current_network(&self, group: &str) -> (EgressSpec, LimitsSpec) {
        match self.store.get_group(group).await {
            Ok(Some(g)) => {
                let egress = match api::validate_egress(&g.spec.egress) {
                    Ok(()) => g.spec.egress,
                    Err(e) => {
                        tracing::error!(group, error = %e, "the group's stored egress policy \
                            is invalid; its sandboxes reach nothing until it is fixed (PUT the \
                            group)");
                        EgressSpec::default()
                    }
                };
                let limits = match api::validate_network_limits(&g.spec.network_limits) {
                    Ok(()) => g.spec.network_limits,
                    Err(e) => {
                        tracing::error!(group, error = %e, "the group's stored network limits \
                            are invalid; its sandboxes get the defaults until they are fixed");
                        LimitsSpec::default()
                    }
                };
                (egress, limits)
            }
            Ok(None) => (EgressSpec::default(), LimitsSpec::default()),
            Err(e) => {
                tracing::error!(group, error = %e, "reading the group's egress policy");
                (EgressSpec::default(), LimitsSpec::default())
            }
        }
    }

    /// Sends a started stack `limits`. Not fatal when refused (a stack from before limits
    /// could change answers an unknown request with an error): it keeps the ones it has, and
    /// a stack that is gone ends its link anyway.
    async fn send_limits(&self, client: &mut Client, group: &str, id: &str, limits: LimitsSpec) {
        let req = Request::Limits { limits };
        if let Err(e) = client
            .request(&req, |e| self.record_audit(group, id, e))
            .await
        {
            tracing::warn!(group, sandbox = id, error = %e, "the sandbox's network stack did \
                not take the group's network limits; it keeps its earlier ones");
        }
    }

    /// Sends `group`'s current policy to each of its running sandboxes' stacks and waits (at
    /// most [`UPDATE_TIMEOUT`] each) until they took it: flows the new policy denies are
    /// closed by then. Stacks that did not answer are logged; their links fail the sandbox if
    /// the stack is gone.
    pub async fn update_egress(&self, group: &str) {
        let asks: Vec<(String, mpsc::Sender<oneshot::Sender<()>>)> = self
            .lock_links()
            .iter()
            .filter(|(_, l)| l.group == group)
            .map(|(id, l)| (id.clone(), l.refresh.clone()))
            .collect();
        let waits = asks.into_iter().map(|(id, ask)| async move {
            let asked = async {
                let (done, taken) = oneshot::channel();
                ask.send(done).await.is_ok() && taken.await.is_ok()
            };
            let ok = tokio::time::timeout(UPDATE_TIMEOUT, asked)
                .await
                .unwrap_or(false);
            if !ok {
                tracing::warn!(
                    id,
                    group,
                    "a sandbox's network stack did not take the new policy"
                );
            }
        });
        futures_util::future::join_all(waits).await;
    }

    /// Counts an event and queues it for the store.
    fn record_audit(&self, group: &str, id: &str, event: Event) {
        let g = group;
        let verdict = match event.verdict {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        };
        let family = match event.kind {
            Kind::Dns => metrics::EGRESS_DNS,
            Kind::Tcp | Kind::Udp => metrics::EGRESS_CONNECTIONS,
            Kind::Http => metrics::EGRESS_REQUESTS,
        };
        self.metrics
            .count(family, &[("group", g), ("verdict", verdict)]);
        if event.bytes_sent > 0 {
            self.metrics.add(
                metrics::EGRESS_BYTES_SENT,
                &[("group", g)],
                event.bytes_sent,
            );
        }
        if event.bytes_received > 0 {
            self.metrics.add(
                metrics::EGRESS_BYTES_RECEIVED,
                &[("group", g)],
                event.bytes_received,
            );
        }
        let record = AuditRecord {
            group: group.to_string(),
            sandbox: id.to_string(),
            event,
        };
        if self.audit.try_send(record).is_err() {
            tracing::warn!(id, "the egress audit queue is full; an event was dropped");
        }
    }
}

/// The audit queue and the task that writes it to the store in batches, pruning it to
/// `retention` events.
pub(super) fn audit_writer(
    store: crate::store::Store,
    retention: u64,
) -> mpsc::Sender<AuditRecord> {
    let (tx, mut rx) = mpsc::channel::<AuditRecord>(AUDIT_QUEUE);
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < AUDIT_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            if let Err(e) = store.insert_egress_events(batch, retention).await {
                tracing::error!(error = %e, "storing egress audit events");
            }
        }
    });
    tx
}
