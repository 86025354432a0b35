//! Kubernetes mode: the agent's own Node steers it and shows its state, and reboots go through
//! the cluster-wide lock and a drain.
//!
//! One task follows two things and reconciles them: the daemon's published [`Snapshot`] and
//! the agent's Node (a kube-rs watcher on `metadata.name=<node>`: it lists, watches from the
//! list's `resourceVersion`, follows bookmarks, and lists again after `410 Gone` or a broken
//! connection, with backoff). From the Node it takes the operator's requests (the annotation
//! contract of [`cluster::annotations`]) and passes them to the daemon as [`Request`]s; onto
//! the Node it writes the status annotations, and an Event for every transition.
//!
//! Reboots: the daemon, when coordinated, does not reboot when its window opens but says
//! `reboot_wanted`. This task then takes a slot of the reboot lock (unless the operator set
//! `reboot=allowed`), cordons, drains, lengthens the lock's lease to cover the reboot and the
//! health checks, and only then sends [`Request::AllowReboot`]. The lock is held while the
//! update is staged and wanted, rebooting or being verified; once the agent is back to idle on
//! a Ready node (healthy, or rolled back), it uncordons (only a node it cordoned) and releases
//! the lock. Everything it needs to know after a restart or reboot is in the cluster: which
//! Lease names it as holder, and the `cordoned` mark on the Node.
//!
//! A drain that cannot finish in `drain-timeout` (a PodDisruptionBudget that never allows the
//! eviction) is put off: the node is uncordoned, the lock released for others, the blocking pod
//! named in `drain` and `last-error` and a Warning Event, and the whole attempt repeated after
//! as long again.

use crate::daemon::{ApiRequest, Snapshot, Transition};
use crate::machine::{Phase, Request};
use cluster::annotations::{self as ann, Requests};
use cluster::drain::{Drainer, Outcome};
use cluster::events::{Recorder, Type};
use cluster::k8s_openapi::api::core::v1::Node;
use cluster::kube::api::{Api, Patch, PatchParams};
use cluster::kube::runtime::{WatchStreamExt as _, watcher};
use cluster::lock::RebootLock;
use futures_util::StreamExt as _;
use jiff::Timestamp;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// What Kubernetes mode runs with.
#[derive(Debug, Clone)]
pub struct Options {
    /// This machine's Node.
    pub node: String,
    /// The lock's namespace.
    pub lock_namespace: String,
    /// The lock's renewal period.
    pub lease_duration: Duration,
    /// How long the lease is held across a reboot (reboot + health deadline + margin).
    pub reboot_hold: Duration,
    /// The drain's deadline.
    pub drain_timeout: Duration,
    /// Where Events go.
    pub events_namespace: String,
    /// How often to retry the lock and poll an install's progress.
    pub retry: Duration,
    /// Time between eviction rounds.
    pub drain_poll: Duration,
    /// When this machine booted: a Ready condition counts only if the kubelet reported it
    /// after this (a restart of the agent alone does not wait for a new report).
    pub booted_at: Timestamp,
}

/// The boot time, from `/proc/uptime` (now, if it cannot be read).
pub fn boot_time() -> Timestamp {
    let now = Timestamp::now();
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .and_then(|up| jiff::SignedDuration::try_from_secs_f64(up).ok())
        .and_then(|up| now.checked_sub(up).ok())
        .unwrap_or(now)
}

impl Options {
    /// From the configuration; `node` is the Node's name.
    pub fn new(k: &config::KubeSettings, health_deadline: Duration, node: String) -> Self {
        Self {
            node,
            lock_namespace: k.lock_namespace.clone(),
            lease_duration: k.lease_duration,
            reboot_hold: health_deadline + k.lease_duration + Duration::from_secs(300),
            drain_timeout: k.drain_timeout,
            events_namespace: k.events_namespace.clone(),
            retry: (k.lease_duration / 4).clamp(Duration::from_millis(100), Duration::from_secs(10)),
            drain_poll: Duration::from_secs(5).min(k.lease_duration / 4),
            booted_at: boot_time(),
        }
    }
}

/// The Node's Ready condition, as one of the health checks: Ready, reported by a kubelet after
/// this boot (a Ready left over from before the reboot does not count).
#[derive(Debug)]
pub struct NodeReady {
    ready: watch::Receiver<bool>,
}

/// Whether a Node is Ready with a heartbeat at or after `since`.
pub fn node_ready(node: &Node, since: Timestamp) -> bool {
    let conditions = node.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions.into_iter().flatten().any(|c| {
        c.type_ == "Ready"
            && c.status == "True"
            && c.last_heartbeat_time.as_ref().is_some_and(|t| t.0.as_second() >= since.as_second())
    })
}

impl health::Probe for NodeReady {
    fn check(
        &self,
        wait: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = health::Check> + Send + '_>> {
        Box::pin(async move {
            let started = std::time::Instant::now();
            let mut rx = self.ready.clone();
            let passed = tokio::time::timeout(wait, rx.wait_for(|r| *r)).await.is_ok_and(|r| r.is_ok());
            health::Check {
                name: "node-ready".into(),
                required: true,
                outcome: if passed {
                    health::Outcome::Passed
                } else {
                    health::Outcome::TimedOut { after: wait }
                },
                took: started.elapsed(),
            }
        })
    }
}

/// The Ready check and its feed (the feed goes to [`run`]).
pub fn node_ready_probe() -> (Arc<NodeReady>, watch::Sender<bool>) {
    let (tx, rx) = watch::channel(false);
    (Arc::new(NodeReady { ready: rx }), tx)
}

/// The in-memory side of the reconciliation (the rest is in the cluster).
struct Controller {
    opts: Options,
    nodes: Api<Node>,
    lock: RebootLock,
    drainer: Drainer,
    events: Recorder,
    daemon: mpsc::Sender<ApiRequest>,
    ready_tx: watch::Sender<bool>,
    node: Option<Node>,
    snap: Snapshot,
    held: Option<String>,
    drained: bool,
    draining: Option<tokio::task::JoinHandle<Result<Outcome, cluster::ClusterError>>>,
    drain_status: Arc<std::sync::Mutex<Option<String>>>,
    not_before: Instant,
    renewed: Instant,
    last_error: Option<String>,
    request_result: Option<String>,
    /// A one-shot request's removal failed: retried on the tick.
    retry_requests: bool,
}

/// Runs Kubernetes mode until the daemon stops.
pub async fn run(
    client: cluster::Client,
    opts: Options,
    daemon: mpsc::Sender<ApiRequest>,
    mut status: watch::Receiver<Snapshot>,
    mut transitions: mpsc::UnboundedReceiver<Transition>,
    ready_tx: watch::Sender<bool>,
) {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut drainer = Drainer::new(client.clone(), &opts.node);
    drainer.poll = opts.drain_poll;
    let mut c = Controller {
        nodes: nodes.clone(),
        lock: RebootLock::new(client.clone(), &opts.lock_namespace, &opts.node, opts.lease_duration),
        drainer,
        events: Recorder::new(client, &opts.events_namespace, &opts.node),
        daemon,
        ready_tx,
        node: None,
        snap: status.borrow_and_update().clone(),
        held: None,
        drained: false,
        draining: None,
        drain_status: Arc::default(),
        not_before: Instant::now(),
        renewed: Instant::now(),
        last_error: None,
        request_result: None,
        retry_requests: false,
        opts,
    };
    // The daemon publishes its first state as its loop starts.
    if c.snap == Snapshot::default() {
        let _ = tokio::time::timeout(Duration::from_secs(5), status.changed()).await;
        c.snap = status.borrow_and_update().clone();
    }
    let booted = c.snap.booted_version.clone().unwrap_or_else(|| "an unknown version".into());
    let (phase, note) = (c.snap.state.phase.name(), c.snap.state.note.clone());
    c.events.publish(Type::Normal, "AgentStarted", &format!("running {booted}; {phase}: {note}")).await;
    match c.lock.held().await {
        Ok(h) => c.held = h,
        Err(e) => tracing::warn!("{e}"),
    }
    let cfg = watcher::Config::default().fields(&format!("metadata.name={}", c.opts.node));
    let stream = watcher(nodes, cfg).default_backoff();
    tokio::pin!(stream);
    // Timed work (renewing the lease, retrying the lock, polling an install's progress) only
    // exists while something is under way: an idle agent wakes for nothing here.
    let mut next_tick = Instant::now() + c.opts.retry;
    loop {
        tokio::select! {
            ev = stream.next() => match ev {
                Some(Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n))) => {
                    c.node_changed(n).await;
                }
                Some(Ok(watcher::Event::Delete(_))) => c.node = None,
                Some(Ok(_)) => {}
                Some(Err(e)) => tracing::warn!("watching node {}: {e}", c.opts.node),
                None => return,
            },
            changed = status.changed() => {
                if changed.is_err() {
                    return;
                }
                c.snap = status.borrow_and_update().clone();
            }
            Some(t) = transitions.recv() => c.report_transition(t).await,
            done = async { c.draining.as_mut().expect("guarded").await }, if c.draining.is_some() => {
                c.draining = None;
                c.drain_done(done).await;
            }
            _ = tokio::time::sleep_until(next_tick), if c.busy() => {
                next_tick = Instant::now() + c.opts.retry;
                c.tick().await;
            }
        }
        c.reconcile().await;
        c.write_status().await;
    }
}

impl Controller {
    fn annotations(&self) -> BTreeMap<String, String> {
        self.node.as_ref().and_then(|n| n.metadata.annotations.clone()).unwrap_or_default()
    }

    fn requests(&self) -> Requests {
        ann::requests(&self.annotations())
    }

    fn ready(&self) -> bool {
        self.node.as_ref().is_some_and(|n| node_ready(n, self.opts.booted_at))
    }

    async fn ask(&self, request: Request) -> Option<Snapshot> {
        let (tx, rx) = oneshot::channel();
        self.daemon.send((request, tx)).await.ok()?;
        rx.await.ok()
    }

    async fn node_changed(&mut self, node: Node) {
        self.events.set_uid(node.metadata.uid.clone());
        self.node = Some(node);
        self.ready_tx.send_replace(self.ready());
        let r = self.requests();
        if let Some(Ok(p)) = r.paused
            && p != self.snap.state.paused
        {
            let req = if p { Request::Pause } else { Request::Resume };
            if let Some(s) = self.ask(req).await {
                self.snap = s;
            }
        }
        self.one_shot_requests().await;
    }

    /// One-shot requests (`update`, `rollback`) are removed from the Node first and acted on
    /// only once their removal is stored: at most once, never twice. Acting first and removing
    /// after lost the removal when the action was a reboot (or the PATCH failed), and the
    /// request came back after the reboot it caused: an endless A/B reboot loop (issue 14). A
    /// removal that fails leaves the request in place for the next pass (the next Node event,
    /// or the retry tick).
    async fn one_shot_requests(&mut self) {
        let r = self.requests();
        let mut keys = Vec::new();
        if r.update.is_some() {
            keys.push(ann::UPDATE);
        }
        if r.rollback.is_some() {
            keys.push(ann::ROLLBACK);
        }
        if keys.is_empty() {
            self.retry_requests = false;
            return;
        }
        let Some(removed) = self.take_requests(&keys).await else {
            self.retry_requests = true;
            return;
        };
        self.retry_requests = false;
        if let (true, Some(u)) = (removed.contains(&ann::UPDATE), &r.update) {
            self.request_result = Some(match u {
                Ok(version) => {
                    let what = version.as_ref().map_or("latest".into(), ToString::to_string);
                    match self.ask(Request::Update { version: version.clone() }).await {
                        Some(s) => format!("update {what}: {}", s.state.note),
                        None => format!("update {what}: the agent is stopping"),
                    }
                }
                Err(e) => e.clone(),
            });
        }
        if let (true, Some(rb)) = (removed.contains(&ann::ROLLBACK), &r.rollback) {
            self.request_result = Some(match rb {
                Ok(now) => match self.ask(Request::Rollback { now: *now }).await {
                    Some(s) => format!("rollback: {}", s.state.note),
                    None => "rollback: the agent is stopping".into(),
                },
                Err(e) => e.clone(),
            });
        }
    }

    /// Removes one-shot requests, conditioned on the Node version they were read from; on a
    /// conflict, removes only those still holding the value read. Returns the keys whose
    /// removal is stored (those to act on), or `None` when the removal failed (try again).
    async fn take_requests(&mut self, keys: &[&'static str]) -> Option<Vec<&'static str>> {
        let mut node = self.node.clone()?;
        let acted: BTreeMap<&'static str, Option<String>> = keys
            .iter()
            .map(|k| (*k, node.metadata.annotations.as_ref().and_then(|a| a.get(*k).cloned())))
            .collect();
        for _ in 0..5 {
            let current = node.metadata.annotations.clone().unwrap_or_default();
            let mut remove = serde_json::Map::new();
            let mut removing = Vec::new();
            for (k, v) in &acted {
                if current.get(*k) == v.as_ref() && v.is_some() {
                    remove.insert((*k).to_owned(), serde_json::Value::Null);
                    removing.push(*k);
                }
            }
            if remove.is_empty() {
                return Some(Vec::new());
            }
            let patch = serde_json::json!({"metadata": {
                "resourceVersion": node.metadata.resource_version, "annotations": remove}});
            match self.nodes.patch(&self.opts.node, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(n) => {
                    // What we act on next must not see the requests again before the watch
                    // delivers this version.
                    self.node = Some(n);
                    return Some(removing);
                }
                Err(cluster::kube::Error::Api(s)) if s.is_conflict() => {
                    match self.nodes.get(&self.opts.node).await {
                        Ok(n) => node = n,
                        Err(e) => {
                            tracing::warn!("re-reading node {}: {e}", self.opts.node);
                            return None;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        "removing the requests from node {} before acting on them: {e}",
                        self.opts.node
                    );
                    return None;
                }
            }
        }
        None
    }

    async fn report_transition(&mut self, t: Transition) {
        let note = t.note;
        let failed =
            note.contains("failed") || note.contains("rolling back") || note.contains("did not boot");
        let reason = match (t.from, t.to) {
            (_, "installing") => "UpdateInstalling",
            (_, "staged") => "UpdateStaged",
            // Announced by `prepare_reboot` before it allowed the reboot.
            (_, "rebooting") => return,
            (_, "verifying") => "VerifyingBoot",
            ("verifying", "idle") if !failed => "UpdateSucceeded",
            (_, "idle") if failed => "UpdateFailed",
            _ => "Status",
        };
        if failed {
            self.last_error = Some(note.clone());
        }
        let kind = if failed { Type::Warning } else { Type::Normal };
        self.events.publish(kind, reason, &note).await;
    }

    /// Whether timed work is due at all.
    fn busy(&self) -> bool {
        self.retry_requests
            || self.held.is_some()
            || self.snap.reboot_wanted
            || !matches!(self.snap.state.phase, Phase::Idle)
    }

    async fn tick(&mut self) {
        if self.retry_requests {
            self.one_shot_requests().await;
        }
        if let Some(name) = self.held.clone()
            && self.renewed.elapsed() >= self.opts.lease_duration / 3
            && !matches!(self.snap.state.phase, Phase::Rebooting { .. })
        {
            match self.lock.renew(&name).await {
                Ok(true) => self.renewed = Instant::now(),
                Ok(false) => {
                    self.held = None;
                    self.events
                        .publish(Type::Warning, "LockLost", &format!("lease {name} was taken over"))
                        .await;
                }
                Err(e) => tracing::warn!("{e}"),
            }
        }
        if matches!(self.snap.state.phase, Phase::Installing { .. }) {
            // The daemon publishes the progress with its answer.
            let _ = self.ask(Request::Status).await;
        }
    }

    fn wants_lock(&self) -> bool {
        match &self.snap.state.phase {
            Phase::Staged { .. } => self.snap.reboot_wanted || self.drained || self.draining.is_some(),
            Phase::Rebooting { .. } | Phase::Verifying { .. } => true,
            Phase::Idle | Phase::Installing { .. } => false,
        }
    }

    async fn reconcile(&mut self) {
        if self.wants_lock() {
            if self.snap.reboot_wanted && Instant::now() >= self.not_before {
                self.prepare_reboot().await;
            }
            return;
        }
        // Idle again (healthy, rolled back, withdrawn) on a Ready node: give back what we hold.
        let ours = self.annotations().get(ann::CORDONED).is_some_and(|v| v == "true");
        if (self.held.is_some() || ours) && self.ready() {
            self.finish().await;
        }
    }

    async fn prepare_reboot(&mut self) {
        let r = self.requests();
        if self.held.is_none() && !r.reboot_without_lock {
            match self.lock.acquire(r.slots).await {
                Ok(Some(a)) => {
                    let how = a.taken_over.map_or(String::new(), |h| format!(" (recovered from {h})"));
                    self.events
                        .publish(Type::Normal, "RebootLockAcquired", &format!("holding {}{how}", a.name))
                        .await;
                    self.held = Some(a.name);
                    self.renewed = Instant::now();
                }
                Ok(None) => {
                    self.set_drain(format!("waiting for the reboot lock ({} slots, all held)", r.slots));
                    self.not_before = Instant::now() + self.opts.retry;
                    return;
                }
                Err(e) => {
                    self.last_error = Some(e.to_string());
                    self.not_before = Instant::now() + self.opts.retry;
                    return;
                }
            }
        }
        if self.drained {
            if let Some(name) = &self.held {
                match self.lock.extend(name, self.opts.reboot_hold).await {
                    Ok(true) => {}
                    Ok(false) => {
                        self.held = None;
                        self.drained = false;
                        return;
                    }
                    Err(e) => {
                        self.last_error = Some(e.to_string());
                        return;
                    }
                }
            }
            self.drained = false;
            self.set_drain("done".into());
            self.write_status().await;
            // Said before the reboot is allowed: once allowed, the machine may go down before
            // this task hears of the transition.
            let target = self.snap.state.phase.version().map_or("?".into(), ToString::to_string);
            let how = self
                .held
                .as_ref()
                .map_or("without the lock (reboot=allowed)".into(), |l| format!("holding {l}"));
            self.events.publish(Type::Normal, "Rebooting", &format!("rebooting into {target}, {how}")).await;
            if let Some(s) = self.ask(Request::AllowReboot).await {
                self.snap = s;
            }
            return;
        }
        if self.draining.is_none() {
            let (drainer, timeout, status) =
                (self.drainer.clone(), self.opts.drain_timeout, Arc::clone(&self.drain_status));
            self.set_drain("cordoning".into());
            self.events
                .publish(Type::Normal, "Draining", "cordoning and evicting pods before the reboot")
                .await;
            self.draining = Some(tokio::spawn(async move {
                drainer.cordon().await?;
                let report = move |m: String| {
                    *status.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(m)
                };
                drainer.drain(timeout, &report).await
            }));
        }
    }

    fn set_drain(&self, s: String) {
        *self.drain_status.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(s);
    }

    async fn drain_done(
        &mut self,
        done: Result<Result<Outcome, cluster::ClusterError>, tokio::task::JoinError>,
    ) {
        match done {
            Ok(Ok(Outcome::Done { evicted })) => {
                self.drained = true;
                self.set_drain(format!("drained ({evicted} pods evicted)"));
                self.events.publish(Type::Normal, "Drained", &format!("{evicted} pods evicted")).await;
            }
            Ok(Ok(Outcome::TimedOut { blocking })) => {
                let why = format!(
                    "drain did not finish in {}s, reboot put off: {}",
                    self.opts.drain_timeout.as_secs(),
                    blocking.join("; ")
                );
                self.set_drain(format!("blocked: {}", blocking.join("; ")));
                self.last_error = Some(why.clone());
                self.events.publish(Type::Warning, "DrainBlocked", &why).await;
                self.finish().await;
                self.not_before = Instant::now() + self.opts.drain_timeout;
            }
            Ok(Err(e)) => {
                self.last_error = Some(e.to_string());
                self.not_before = Instant::now() + self.opts.retry;
            }
            Err(e) => self.last_error = Some(format!("drain task: {e}")),
        }
    }

    /// Uncordons (if we cordoned) and releases the lock.
    async fn finish(&mut self) {
        match self.drainer.uncordon_if_ours().await {
            Ok(true) => self.events.publish(Type::Normal, "Uncordoned", "the node takes pods again").await,
            Ok(false) => {}
            Err(e) => return self.last_error = Some(e.to_string()),
        }
        if let Some(name) = self.held.clone() {
            match self.lock.release(&name).await {
                Ok(()) => {
                    self.held = None;
                    self.events
                        .publish(Type::Normal, "RebootLockReleased", &format!("released {name}"))
                        .await;
                }
                Err(e) => self.last_error = Some(e.to_string()),
            }
        }
        if matches!(self.snap.state.phase, Phase::Idle) {
            *self.drain_status.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        }
    }

    /// Writes the status annotations (and the version label) that changed.
    async fn write_status(&mut self) {
        let Some(node) = &self.node else { return };
        let s = &self.snap;
        let mut want: BTreeMap<&'static str, String> = BTreeMap::new();
        want.insert(ann::STATE, if s.state.paused { "paused".into() } else { s.state.phase.name().into() });
        if let (Phase::Installing { .. }, Some(p)) = (&s.state.phase, &s.progress)
            && p.total > 0
        {
            want.insert(ann::PROGRESS, format!("{}%", p.done.saturating_mul(100) / p.total));
        }
        if let Some(v) = &s.booted_version {
            want.insert(ann::BOOTED, v.clone());
        }
        if let Some(v) = s.state.phase.version() {
            want.insert(ann::TARGET, v.to_string());
        }
        if let Some(t) = s.state.last_check {
            want.insert(ann::LAST_CHECK, t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string());
        }
        if !s.state.note.is_empty() {
            want.insert(ann::NOTE, s.state.note.clone());
        }
        let latest_failure =
            s.state.failures.iter().max_by_key(|f| f.last).map(|f| format!("{}: {}", f.version, f.reason));
        if let Some(e) = self.last_error.clone().or(latest_failure) {
            want.insert(ann::LAST_ERROR, e);
        }
        if let Some(r) = &self.request_result {
            want.insert(ann::REQUEST_RESULT, r.clone());
        }
        if let Some(l) = &self.held {
            want.insert(ann::LOCK, l.clone());
        }
        if let Some(d) = self.drain_status.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone() {
            want.insert(ann::DRAIN, d);
        }
        let current = node.metadata.annotations.clone().unwrap_or_default();
        let patch = ann::status_patch(&current, &want, ann::STATUS_KEYS);
        let label = s.booted_version.as_deref().map(ann::label_value);
        let labels = node.metadata.labels.clone().unwrap_or_default();
        let label_changed = label.is_some() && labels.get(ann::VERSION_LABEL) != label.as_ref();
        // The annotations and the label in separate patches: a label value the API server
        // refuses (422) must not take the whole status with it.
        let mut bodies = Vec::new();
        if !patch.is_empty() {
            bodies.push(("status", serde_json::json!({"metadata": {"annotations": patch}})));
        }
        if label_changed {
            bodies.push((
                "version label",
                serde_json::json!({"metadata": {"labels": {ann::VERSION_LABEL: label}}}),
            ));
        }
        for (what, body) in bodies {
            match self.nodes.patch(&self.opts.node, &PatchParams::default(), &Patch::Merge(&body)).await {
                // Keep our copy current so the next diff is against what we wrote.
                Ok(n) => self.node = Some(n),
                Err(e) => tracing::warn!("writing the {what} of node {}: {e}", self.opts.node),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(status: &str, heartbeat: &str) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n"},
            "status": {"conditions": [
                {"type": "MemoryPressure", "status": "False", "lastHeartbeatTime": heartbeat},
                {"type": "Ready", "status": status, "lastHeartbeatTime": heartbeat},
            ]},
        }))
        .unwrap()
    }

    #[test]
    fn ready_counts_only_a_heartbeat_after_the_agent_started() {
        let started: Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        assert!(node_ready(&node("True", "2026-11-23T10:00:05Z"), started));
        assert!(node_ready(&node("True", "2026-11-23T10:00:00Z"), started));
        // Left over from before the reboot: the kubelet has not reported since.
        assert!(!node_ready(&node("True", "2026-11-23T09:59:00Z"), started));
        assert!(!node_ready(&node("False", "2026-11-23T10:00:05Z"), started));
        assert!(!node_ready(&node("Unknown", "2026-11-23T10:00:05Z"), started));
        let no_status: Node = serde_json::from_value(serde_json::json!({"metadata": {"name": "n"}})).unwrap();
        assert!(!node_ready(&no_status, started));
    }

    #[tokio::test]
    async fn the_ready_probe_waits_for_ready() {
        let (probe, feed) = node_ready_probe();
        let c = health::Probe::check(&*probe, Duration::from_millis(50)).await;
        assert_eq!(c.outcome, health::Outcome::TimedOut { after: Duration::from_millis(50) });
        let waiting =
            tokio::spawn(async move { health::Probe::check(&*probe, Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        feed.send_replace(true);
        let c = waiting.await.unwrap();
        assert_eq!((c.name.as_str(), c.required, c.outcome), ("node-ready", true, health::Outcome::Passed));
    }
}
