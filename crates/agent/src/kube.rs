//! Kubernetes mode: the agent's own Node steers it and shows its state; reboots wait for the
//! coordinator, which holds the cluster-wide lock and drains the node.
//!
//! The agent runs with its node's own credentials (the kubelet's kubeconfig), which the API
//! server confines to this Node and to Events: it reads and writes nothing else. Everything
//! cluster-wide (the reboot lock, cordon, eviction) is the coordinator's (crate
//! `coordinator`), so root on this machine cannot reach another node (docs/kubernetes.md).
//!
//! One task follows two things and reconciles them: the daemon's published [`Snapshot`] and
//! the agent's Node (a kube-rs watcher on `metadata.name=<node>`: it lists, watches from the
//! list's `resourceVersion`, follows bookmarks, and lists again after `410 Gone` or a broken
//! connection, with backoff). From the Node it takes the operator's requests (the annotation
//! contract of [`cluster::annotations`]) and passes them to the daemon as [`Request`]s; onto
//! the Node it writes the status annotations, and an Event for every transition.
//!
//! Reboots: the daemon, when coordinated, does not reboot when its window opens but says
//! `reboot_wanted`. This task writes `reboot-request=wanted`; the coordinator takes a lock slot
//! for the node, drains it and answers `reboot-allowed=<version>`; only an answer naming the
//! staged version lets the daemon reboot ([`Request::AllowReboot`]). While rebooting and
//! verifying, the request says `holding`; back to idle, it is withdrawn, and the coordinator
//! uncordons and releases.

use crate::daemon::{ApiRequest, Snapshot, Transition};
use crate::machine::{Phase, Request};
use cluster::annotations::{self as ann, RebootRequest, Requests};
use cluster::events::{Recorder, Type};
use cluster::k8s_openapi::api::core::v1::Node;
use cluster::kube::api::{Api, Patch, PatchParams};
use cluster::kube::runtime::{WatchStreamExt as _, watcher};
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
    /// Where Events go.
    pub events_namespace: String,
    /// How often to retry a request's removal and poll an install's progress.
    pub retry: Duration,
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
    pub fn new(k: &config::KubeSettings, node: String) -> Self {
        Self {
            node,
            events_namespace: k.events_namespace.clone(),
            retry: Duration::from_secs(5),
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
    events: Recorder,
    daemon: mpsc::Sender<ApiRequest>,
    ready_tx: watch::Sender<bool>,
    node: Option<Node>,
    snap: Snapshot,
    last_error: Option<String>,
    request_result: Option<String>,
    /// A one-shot request's removal failed: retried on the tick.
    retry_requests: bool,
    /// A status write failed in a way that may pass (5xx, 429, the connection): retried on
    /// the tick, or the Node would show a stale state until something else changed.
    retry_status: bool,
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
    let mut c = Controller {
        nodes: nodes.clone(),
        events: Recorder::new(client, &opts.events_namespace, &opts.node),
        daemon,
        ready_tx,
        node: None,
        snap: status.borrow_and_update().clone(),
        last_error: None,
        request_result: None,
        retry_requests: false,
        retry_status: false,
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
    let cfg = watcher::Config::default().fields(&format!("metadata.name={}", c.opts.node));
    let stream = watcher(nodes, cfg).default_backoff();
    tokio::pin!(stream);
    // Timed work (retrying a request's removal, polling an install's progress) only exists
    // while something is under way: an idle agent wakes for nothing here.
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
            let booted = self.snap.booted_version.as_deref().and_then(|b| b.parse::<semver::Version>().ok());
            self.request_result = Some(match u {
                Ok(Some(v)) if booted.as_ref().is_some_and(|b| v < b) && !r.allow_downgrade => format!(
                    "update {v}: refused, older than the booted {}; a downgrade needs {}=true as well",
                    booted.as_ref().map_or(String::new(), ToString::to_string),
                    ann::ALLOW_DOWNGRADE
                ),
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
        self.retry_requests || self.retry_status || matches!(self.snap.state.phase, Phase::Installing { .. })
    }

    async fn tick(&mut self) {
        if self.retry_requests {
            self.one_shot_requests().await;
        }
        if matches!(self.snap.state.phase, Phase::Installing { .. }) {
            // The daemon publishes the progress with its answer.
            let _ = self.ask(Request::Status).await;
        }
    }

    /// What to say in `reboot-request`.
    fn reboot_request(&self) -> Option<RebootRequest> {
        match &self.snap.state.phase {
            Phase::Staged { .. } if self.snap.reboot_wanted => Some(RebootRequest::Wanted),
            Phase::Rebooting { .. } | Phase::Verifying { .. } => Some(RebootRequest::Holding),
            _ => None,
        }
    }

    /// Reboots once the coordinator allowed this very version (a leftover answer for another
    /// version, or for a request withdrawn meanwhile, allows nothing).
    async fn reconcile(&mut self) {
        let Phase::Staged { version } = &self.snap.state.phase else { return };
        if !self.snap.reboot_wanted {
            return;
        }
        let target = version.to_string();
        let a = self.annotations();
        let allowed = a.get(ann::REBOOT_ALLOWED);
        // The permit counts with the slot it was given with (or the operator's reboot=allowed).
        let slot = a.contains_key(ann::LOCK) || self.requests().reboot_without_lock;
        if allowed != Some(&target) || !slot {
            return;
        }
        let how =
            a.get(ann::LOCK).map_or("without the lock (reboot=allowed)".into(), |l| format!("holding {l}"));
        // Said before the reboot is allowed: once allowed, the machine may go down before this
        // task hears of the transition.
        self.write_status().await;
        self.events.publish(Type::Normal, "Rebooting", &format!("rebooting into {target}, {how}")).await;
        if let Some(s) = self.ask(Request::AllowReboot).await {
            self.snap = s;
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
        if let Some(r) = self.reboot_request() {
            want.insert(ann::REBOOT_REQUEST, r.as_str().to_owned());
        }
        let current = node.metadata.annotations.clone().unwrap_or_default();
        let patch = ann::status_patch(&current, &want, ann::AGENT_KEYS);
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
        self.retry_status = false;
        for (what, body) in bodies {
            match self.nodes.patch(&self.opts.node, &PatchParams::default(), &Patch::Merge(&body)).await {
                // Keep our copy current so the next diff is against what we wrote.
                Ok(n) => self.node = Some(n),
                Err(e) => {
                    // A refusal (4xx, e.g. a label value the server will never take) is not
                    // retried; what may pass is.
                    let refused = matches!(&e, cluster::kube::Error::Api(s) if (400..500).contains(&s.code) && s.code != 429);
                    self.retry_status |= !refused;
                    tracing::warn!("writing the {what} of node {}: {e}", self.opts.node);
                }
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
