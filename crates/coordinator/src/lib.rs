//! The cluster side of Kubernetes mode: a small leader-elected Deployment that holds the reboot
//! lock, cordons, drains and uncordons on the nodes' behalf.
//!
//! Why it exists: the host agent runs with its node's own credentials (`system:node:<name>`),
//! which the API server's Node authorizer and NodeRestriction admission plugin confine to that
//! node's own Node object and Events. Everything that touches other objects (the lock's
//! Leases, other nodes' pods, the cordon) is done here, under this Deployment's own
//! ServiceAccount. Root on a node can then change its own Node and nothing else
//! (docs/kubernetes.md, "Least privilege").
//!
//! The protocol is the Node object (keys in [`cluster::annotations`]):
//! 1. the agent stages an update and, inside its reboot window, writes `reboot-request=wanted`;
//! 2. the coordinator takes a lock slot for it (a Lease whose holder is the node's name), writes
//!    `lock`, cordons and drains, then lengthens the slot to cover the reboot and writes
//!    `reboot-allowed=<target version>`;
//! 3. the agent reboots; after the boot it says `holding` while it checks its health;
//! 4. back to idle (healthy, or rolled back) on a Ready node, it withdraws the request, and the
//!    coordinator uncordons (only a node it cordoned), releases the slot and removes its keys.
//!
//! A slot is renewed only while its node is drained; the permit lengthens it once, to
//! `--reboot-hold`, and nothing renews it after that, so no node holds a slot longer than a
//! drain plus the hold, whatever it writes on its Node. A permit is removed as soon as it is
//! spent (`holding`), withdrawn, or outlived its slot ([`plan`]).
//!
//! Everything the coordinator knows is in the cluster: which Lease names which node, the
//! cordon mark, `reboot-allowed`. A new leader picks up where a dead one stopped: it judges
//! expiry by its own observations, which start when it starts, so no slot looks expired to it
//! before a whole duration has passed; within one pass it renews the slots of nodes being
//! drained before it takes any slot for another; it drains again a node whose drain was cut
//! off (evicting what is left), and finishes the others.
//!
//! Leader election is one slot of the same Lease semaphore ([`cluster::lock`]) under the name
//! `acl-coordinator-0`, renewed every third of its duration. A leader that cannot renew within
//! two thirds of the duration stops acting before anyone else may take over. On shutdown it
//! releases the Lease, so the next pod takes over at once.
//!
//! What each node needs next is a pure function, [`plan::decide`], tested over every input.

pub mod plan;

use cluster::annotations::{self as ann, RebootRequest};
use cluster::drain::{Drainer, Outcome};
use cluster::events::{Recorder, Type};
use cluster::k8s_openapi::api::coordination::v1::Lease;
use cluster::k8s_openapi::api::core::v1::Node;
use cluster::kube::api::{Api, ListParams, Patch, PatchParams};
use cluster::kube::runtime::{WatchStreamExt as _, reflector, watcher};
use cluster::lock::{REBOOT_PREFIX, RebootLock};
use cluster::{Client, ClusterError};
use futures_util::StreamExt as _;
use plan::{Step, View};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The leader-election Lease's name prefix (slot 0 is the only one).
pub const LEADER_PREFIX: &str = "acl-coordinator-";

/// What the coordinator runs with.
#[derive(Debug, Clone)]
pub struct Options {
    /// This replica's name (its pod), the leader Lease's holder.
    pub identity: String,
    /// Where the Leases live (lock slots and the leader's).
    pub namespace: String,
    /// Lock slots: at most this many nodes drain or reboot at once.
    pub max_rebooting: u32,
    /// A slot or leadership not renewed for this long is presumed gone.
    pub lease_duration: Duration,
    /// How long a slot is held across a reboot and its health checks.
    pub reboot_hold: Duration,
    /// The longest a drain may take before the node is put off (and retried after as long).
    pub drain_timeout: Duration,
    /// Time between eviction rounds.
    pub drain_poll: Duration,
    /// Where Events about Nodes go (`default` or `kube-system`).
    pub events_namespace: String,
    /// Time between passes while something is under way.
    pub retry: Duration,
}

impl Options {
    /// Defaults for `identity`: a 60 s lease, 10 min drains, a 30 min hold over a reboot.
    pub fn new(identity: &str) -> Self {
        Self {
            identity: identity.to_owned(),
            namespace: "acl-update".into(),
            max_rebooting: 1,
            lease_duration: Duration::from_secs(60),
            reboot_hold: Duration::from_secs(30 * 60),
            drain_timeout: Duration::from_secs(600),
            drain_poll: Duration::from_secs(5),
            events_namespace: "default".into(),
            retry: Duration::from_secs(5),
        }
    }
}

/// Runs until `shutdown`: campaigns for leadership, leads while it holds it, campaigns again
/// when it loses it.
pub async fn run(client: Client, opts: Options, shutdown: impl Future<Output = ()>) {
    let leader = RebootLock::leader_election(
        client.clone(),
        &opts.namespace,
        LEADER_PREFIX,
        &opts.identity,
        opts.lease_duration,
    );
    tokio::pin!(shutdown);
    loop {
        let won = tokio::select! {
            () = &mut shutdown => return,
            a = leader.acquire(1) => a,
        };
        match won {
            Ok(Some(a)) => {
                // A real write before leading: `acquire` returns a Lease this replica still
                // names without writing it, and the other replica may be about to take it.
                if !matches!(leader.renew(&a.name).await, Ok(true)) {
                    continue;
                }
                tracing::info!(
                    "leading as {} ({}{})",
                    opts.identity,
                    a.name,
                    a.taken_over.map_or(String::new(), |h| format!(", taken over from {h}"))
                );
                let mut l = Leader::new(client.clone(), opts.clone(), leader.clone(), a.name.clone());
                let stepped_down = l.lead(&mut shutdown).await;
                l.stop();
                if !stepped_down {
                    if let Err(e) = leader.release(&a.name).await {
                        tracing::warn!("releasing leadership: {e}");
                    }
                    return;
                }
                tracing::warn!("no longer leading");
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("campaigning: {e}"),
        }
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(opts.retry.min(opts.lease_duration / 3)) => {}
        }
    }
}

/// A task that ends with its owner.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the leader keeps in memory about one node (all of it can be lost: see the crate docs).
#[derive(Debug, Default)]
struct Track {
    draining: Option<JoinHandle<Result<Outcome, ClusterError>>>,
    drained: bool,
    put_off_until: Option<Instant>,
    renewed: Option<Instant>,
    /// The drain's progress line, written into `drain` when it changes.
    progress: Arc<Mutex<Option<String>>>,
}

/// A drain dies with the leader that started it (a stepped-down or killed leader leaves no
/// eviction running behind the next one's back).
impl Drop for Track {
    fn drop(&mut self) {
        if let Some(d) = &self.draining {
            d.abort();
        }
    }
}

struct Leader {
    client: Client,
    opts: Options,
    nodes: Api<Node>,
    leases: Api<Lease>,
    lock: RebootLock,
    leader: RebootLock,
    leader_lease: String,
    tracks: BTreeMap<String, Track>,
}

fn annotations(n: &Node) -> BTreeMap<String, String> {
    n.metadata.annotations.clone().unwrap_or_default()
}

fn ready(n: &Node) -> bool {
    let conditions = n.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions.into_iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True")
}

impl Leader {
    fn new(client: Client, opts: Options, leader: RebootLock, leader_lease: String) -> Self {
        Self {
            nodes: Api::all(client.clone()),
            leases: Api::namespaced(client.clone(), &opts.namespace),
            lock: RebootLock::new(client.clone(), &opts.namespace, "", opts.lease_duration),
            client,
            leader,
            leader_lease,
            tracks: BTreeMap::new(),
            opts,
        }
    }

    fn stop(&mut self) {
        self.tracks.clear();
    }

    /// Leads until shutdown (`false`) or until leadership is lost (`true`).
    async fn lead(&mut self, shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>) -> bool {
        let (store, writer) = reflector::store::<Node>();
        let stream =
            reflector(writer, watcher(self.nodes.clone(), watcher::Config::default())).default_backoff();
        tokio::pin!(stream);
        // The store is complete once the first list is (and after every relist, it is again).
        let mut listed = false;
        // Leadership is renewed by a task of its own, so that a long pass never delays it.
        let renew_every = self.opts.lease_duration / 3;
        let (renewed_tx, renewed_rx) = tokio::sync::watch::channel(Some(Instant::now()));
        let renewer = {
            let (leader, name) = (self.leader.clone(), self.leader_lease.clone());
            AbortOnDrop(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(renew_every).await;
                    match leader.renew(&name).await {
                        Ok(true) => renewed_tx.send_replace(Some(Instant::now())),
                        Ok(false) => {
                            renewed_tx.send_replace(None);
                            return;
                        }
                        Err(e) => {
                            tracing::warn!("renewing leadership: {e}");
                            continue;
                        }
                    };
                }
            }))
        };
        let _renewer = renewer;
        let gap = self.opts.retry.min(Duration::from_secs(1));
        let mut pass_due = Instant::now() + self.opts.retry;
        let mut last_pass = Instant::now();
        let mut dirty = false;
        loop {
            // Wake for a due pass, and to check the leadership's freshness as often as it is
            // renewed.
            let mut wake = Instant::now() + renew_every;
            if listed {
                wake = wake.min(pass_due);
            }
            if dirty {
                wake = wake.min(last_pass + gap);
            }
            tokio::select! {
                () = shutdown.as_mut() => return false,
                ev = stream.next() => match ev {
                    Some(Ok(watcher::Event::InitDone)) => {
                        listed = true;
                        dirty = true;
                    }
                    Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => {}
                    Some(Ok(_)) => dirty = true,
                    Some(Err(e)) => tracing::warn!("watching nodes: {e}"),
                    None => return true,
                },
                () = tokio::time::sleep_until(wake) => {}
            }
            // A leader acts only while its Lease is surely its own: within two thirds of the
            // duration since it last renewed (another replica waits the whole of it).
            let Some(renewed) = *renewed_rx.borrow() else { return true };
            let act_until = renewed + self.opts.lease_duration * 2 / 3;
            if Instant::now() >= act_until {
                return true;
            }
            // Node events come in bursts (every agent writes its status); one pass covers all
            // that came since the last, and passes are at least `gap` apart.
            if listed && ((dirty && last_pass.elapsed() >= gap) || Instant::now() >= pass_due) {
                dirty = false;
                last_pass = Instant::now();
                let busy = self.pass(&store.state(), act_until).await;
                pass_due = Instant::now() + if busy { self.opts.retry } else { self.opts.lease_duration };
            }
        }
    }

    /// One reconciliation of every node, acting only until `act_until`. `true` while something
    /// is under way.
    async fn pass(&mut self, nodes: &[Arc<Node>], act_until: Instant) -> bool {
        let holders = match self.lock_holders().await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!("{e}");
                return true;
            }
        };
        // Forget nodes that are gone (their slots are recovered by the lock itself).
        let names: Vec<String> = nodes.iter().filter_map(|n| n.metadata.name.clone()).collect();
        self.tracks.retain(|name, _| names.contains(name));
        let mut steps = Vec::new();
        for n in nodes {
            let Some(name) = n.metadata.name.clone() else { continue };
            self.collect_drain(&name, n).await;
            let v = self.view(&name, n, &holders);
            let step = plan::decide(&v);
            steps.push((name, Arc::clone(n), v, step));
        }
        let busy = steps.iter().any(|(_, _, v, s)| {
            *s != Step::Wait || v.request.is_some() || v.lease.is_some() || v.cordoned_by_us || v.draining
        });
        // Slots of nodes under way are renewed before any slot is taken (see the crate docs).
        steps.sort_by_key(|(_, _, _, s)| matches!(s, Step::Acquire));
        let mut slots_left = true;
        for (name, node, v, step) in steps {
            if Instant::now() >= act_until {
                // The rest waits for the next pass, after the leader renewed.
                return true;
            }
            if step == Step::Acquire && !slots_left {
                self.set_progress(
                    &name,
                    format!("waiting for the reboot lock ({} slots, all held)", self.opts.max_rebooting),
                );
            } else {
                slots_left &= self.act(&name, &node, &v, step).await;
            }
            self.write_progress(&name, &node).await;
        }
        busy
    }

    /// Node name -> the slot its holds.
    async fn lock_holders(&self) -> Result<BTreeMap<String, String>, ClusterError> {
        let list = self
            .leases
            .list(&ListParams::default())
            .await
            .map_err(|source| ClusterError::Api { what: "list the reboot lock's leases".into(), source })?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|l| {
                let name = l.metadata.name.filter(|n| n.starts_with(REBOOT_PREFIX))?;
                let holder = l.spec?.holder_identity.filter(|h| !h.is_empty())?;
                Some((holder, name))
            })
            .collect())
    }

    fn view(&mut self, name: &str, n: &Node, holders: &BTreeMap<String, String>) -> View {
        let a = annotations(n);
        let t = self.tracks.entry(name.to_owned()).or_default();
        let requests = ann::requests(&a);
        View {
            request: RebootRequest::parse(a.get(ann::REBOOT_REQUEST).map(String::as_str)),
            target: a.get(ann::TARGET).cloned(),
            allowed: a.get(ann::REBOOT_ALLOWED).cloned(),
            lease: holders.get(name).cloned(),
            cordoned_by_us: a.get(ann::CORDONED).is_some_and(|v| v == "true"),
            marked: ann::COORDINATOR_KEYS.iter().any(|k| a.contains_key(*k)),
            ready: ready(n),
            without_lock: requests.reboot_without_lock,
            draining: t.draining.is_some(),
            drained: t.drained,
            put_off: t.put_off_until.is_some_and(|u| Instant::now() < u),
        }
    }

    fn events(&self, name: &str, n: &Node) -> Recorder {
        let mut r = Recorder::new(self.client.clone(), &self.opts.events_namespace, name)
            .by_coordinator(&self.opts.identity);
        r.set_uid(n.metadata.uid.clone());
        r
    }

    async fn patch(&self, name: &str, annotations: serde_json::Value) {
        let body = serde_json::json!({"metadata": {"annotations": annotations}});
        if let Err(e) = self.nodes.patch(name, &PatchParams::default(), &Patch::Merge(&body)).await {
            tracing::warn!("annotating node {name}: {e}");
        }
    }

    fn set_progress(&mut self, name: &str, s: String) {
        let t = self.tracks.entry(name.to_owned()).or_default();
        *t.progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(s);
    }

    /// Writes `drain` when the progress line changed.
    async fn write_progress(&mut self, name: &str, n: &Node) {
        let Some(t) = self.tracks.get(name) else { return };
        let now = t.progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        if let Some(p) = now
            && annotations(n).get(ann::DRAIN) != Some(&p)
        {
            self.patch(name, serde_json::json!({ann::DRAIN: p})).await;
        }
    }

    /// Takes the result of a drain that finished.
    async fn collect_drain(&mut self, name: &str, n: &Node) {
        let Some(t) = self.tracks.get_mut(name) else { return };
        if !t.draining.as_ref().is_some_and(JoinHandle::is_finished) {
            return;
        }
        let Some(handle) = t.draining.take() else { return };
        let events = self.events(name, n);
        let result = handle.await;
        let t = self.tracks.entry(name.to_owned()).or_default();
        match result {
            Ok(Ok(Outcome::Done { evicted })) => {
                t.drained = true;
                events.publish(Type::Normal, "Drained", &format!("{evicted} pods evicted")).await;
                self.set_progress(name, format!("drained ({evicted} pods evicted)"));
            }
            Ok(Ok(Outcome::TimedOut { blocking })) => {
                let why = format!(
                    "drain did not finish in {}s, reboot put off: {}",
                    self.opts.drain_timeout.as_secs(),
                    blocking.join("; ")
                );
                t.put_off_until = Some(Instant::now() + self.opts.drain_timeout);
                events.publish(Type::Warning, "DrainBlocked", &why).await;
                self.set_progress(name, format!("blocked: {}", blocking.join("; ")));
                // Others may go meanwhile: give the slot back and the node its pods.
                self.give_back(name, n, false).await;
            }
            Ok(Err(e)) => {
                t.put_off_until = Some(Instant::now() + self.opts.retry);
                self.set_progress(name, format!("drain failed: {e}"));
            }
            Err(e) => tracing::warn!("drain task of {name}: {e}"),
        }
    }

    /// Carries out `step`; `false` when it found every lock slot held.
    async fn act(&mut self, name: &str, n: &Node, v: &View, step: Step) -> bool {
        match step {
            Step::Wait => {}
            Step::Acquire => return self.acquire(name, n).await,
            Step::Drain => self.drain(name, n),
            Step::Renew => self.renew(name, n, v).await,
            Step::Allow => self.allow(name, n, v).await,
            Step::Revoke => self.patch(name, serde_json::json!({ann::REBOOT_ALLOWED: null})).await,
            Step::Finish => {
                self.give_back(name, n, true).await;
                self.tracks.remove(name);
            }
        }
        true
    }

    /// Takes a slot for `name` and starts its drain; `false` when all slots are held.
    async fn acquire(&mut self, name: &str, n: &Node) -> bool {
        match self.lock.for_holder(name).acquire(self.opts.max_rebooting).await {
            Ok(Some(a)) => {
                let how = a.taken_over.as_ref().map_or(String::new(), |h| format!(" (recovered from {h})"));
                self.events(name, n)
                    .publish(Type::Normal, "RebootLockAcquired", &format!("holding {}{how}", a.name))
                    .await;
                self.patch(name, serde_json::json!({ann::LOCK: a.name})).await;
                let t = self.tracks.entry(name.to_owned()).or_default();
                t.renewed = Some(Instant::now());
                self.drain(name, n);
            }
            Ok(None) => {
                self.set_progress(
                    name,
                    format!("waiting for the reboot lock ({} slots, all held)", self.opts.max_rebooting),
                );
                return false;
            }
            Err(e) => self.set_progress(name, format!("taking the reboot lock: {e}")),
        }
        true
    }

    fn drain(&mut self, name: &str, n: &Node) {
        let mut drainer = Drainer::new(self.client.clone(), name);
        drainer.poll = self.opts.drain_poll;
        let events = self.events(name, n);
        let timeout = self.opts.drain_timeout;
        let t = self.tracks.entry(name.to_owned()).or_default();
        t.drained = false;
        let progress = Arc::clone(&t.progress);
        *progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some("cordoning".into());
        t.draining = Some(tokio::spawn(async move {
            events.publish(Type::Normal, "Draining", "cordoning and evicting pods before the reboot").await;
            drainer.cordon().await?;
            let report = move |m: String| {
                *progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(m)
            };
            drainer.drain(timeout, &report).await
        }));
    }

    async fn renew(&mut self, name: &str, n: &Node, v: &View) {
        let Some(lease) = &v.lease else { return };
        let every = self.opts.lease_duration / 3;
        let t = self.tracks.entry(name.to_owned()).or_default();
        if t.renewed.is_some_and(|r| r.elapsed() < every) {
            return;
        }
        match self.lock.for_holder(name).extend(lease, self.opts.lease_duration).await {
            Ok(true) => t.renewed = Some(Instant::now()),
            Ok(false) => {
                self.events(name, n)
                    .publish(Type::Warning, "LockLost", &format!("lease {lease} was taken over"))
                    .await;
                self.tracks.remove(name);
            }
            Err(e) => tracing::warn!("{e}"),
        }
    }

    async fn allow(&mut self, name: &str, n: &Node, v: &View) {
        let Some(target) = &v.target else { return };
        if let Some(lease) = &v.lease {
            match self.lock.for_holder(name).extend(lease, self.opts.reboot_hold).await {
                Ok(true) => {}
                Ok(false) => {
                    self.tracks.remove(name);
                    return;
                }
                Err(e) => {
                    tracing::warn!("{e}");
                    return;
                }
            }
        }
        self.set_progress(name, "done".into());
        self.patch(name, serde_json::json!({ann::REBOOT_ALLOWED: target, ann::DRAIN: "done"})).await;
        let t = self.tracks.entry(name.to_owned()).or_default();
        t.drained = false;
        t.renewed = Some(Instant::now());
        let how =
            v.lease.as_ref().map_or("without the lock (reboot=allowed)".into(), |l| format!("holding {l}"));
        let msg = format!("may reboot into {target}, {how}");
        self.events(name, n).publish(Type::Normal, "RebootAllowed", &msg).await;
    }

    /// Uncordons (if we cordoned), releases the node's slot, removes our keys (all of them when
    /// `all`; after a blocked drain, `drain` stays to say why).
    async fn give_back(&mut self, name: &str, n: &Node, all: bool) {
        let events = self.events(name, n);
        match Drainer::new(self.client.clone(), name).uncordon_if_ours().await {
            Ok(true) => events.publish(Type::Normal, "Uncordoned", "the node takes pods again").await,
            Ok(false) => {}
            Err(e) => return tracing::warn!("{e}"),
        }
        let lock = self.lock.for_holder(name);
        match lock.held().await {
            Ok(Some(lease)) => match lock.release(&lease).await {
                Ok(()) => {
                    events.publish(Type::Normal, "RebootLockReleased", &format!("released {lease}")).await
                }
                Err(e) => return tracing::warn!("{e}"),
            },
            Ok(None) => {}
            Err(e) => return tracing::warn!("{e}"),
        }
        let a = annotations(n);
        let mut remove = serde_json::Map::new();
        for k in ann::COORDINATOR_KEYS {
            if a.contains_key(*k) && (all || *k != ann::DRAIN) {
                remove.insert((*k).to_owned(), serde_json::Value::Null);
            }
        }
        if !remove.is_empty() {
            self.patch(name, serde_json::Value::Object(remove)).await;
        }
        if all && let Some(t) = self.tracks.get(name) {
            *t.progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        }
    }
}
