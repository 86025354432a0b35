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
//! the Node it writes the status annotations, and an Event for every transition. What to do
//! is decided by the pure functions of [`plan`]; this module carries it out.
//!
//! Reboots: the daemon, when coordinated, does not reboot when its window opens but says
//! `reboot_wanted`. This task writes `reboot-request=wanted`; the coordinator takes a lock slot
//! for the node, drains it and answers `reboot-allowed=<version>`; only an answer naming the
//! staged version lets the daemon reboot ([`Request::AllowReboot`]). While rebooting and
//! verifying, the request says `holding`; back to idle, it is withdrawn, and the coordinator
//! uncordons and releases.

pub mod plan;

use crate::daemon::{ApiRequest, Snapshot, Transition};
use crate::machine::{Phase, Request};
use cluster::annotations::{self as ann, Requests};
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
    memory: plan::Memory,
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
        memory: plan::Memory::default(),
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
        if self.node.is_none() && self.memory.request_result.is_none() {
            // The answer to the last request survives a restart of the agent (and the reboot
            // a rollback request causes). A removal's marker left there means the agent stopped
            // between taking a request and saying what became of it: it is not acted on again
            // (at most once: a rollback=now acted on and replayed after its reboot would roll
            // back for ever), and says so.
            self.memory.request_result =
                node.metadata.annotations.as_ref().and_then(|a| a.get(ann::REQUEST_RESULT).cloned()).map(
                    |r| {
                        if plan::is_marker(&r) {
                            format!("{r}: the agent restarted before it could report what became of it")
                        } else {
                            r
                        }
                    },
                );
        }
        self.node = Some(node);
        self.ready_tx.send_replace(self.ready());
    }

    /// Carries out what [`plan::decide`] says for the Node and the daemon as they are now.
    async fn reconcile(&mut self) {
        self.retry_requests = false;
        for action in plan::decide(&self.annotations(), &self.snap, &self.memory) {
            match action {
                plan::Action::Tell(req) => {
                    if let Some(s) = self.ask(req).await {
                        self.snap = s;
                    }
                }
                plan::Action::Reread => self.resolve_pending().await,
                plan::Action::Take(keys) => {
                    let r = ann::requests(&self.annotations());
                    match self.take_requests(&r, &keys).await {
                        Some(removed) => self.act_on(&r, &removed).await,
                        None => self.retry_requests = true,
                    }
                }
                plan::Action::Reboot { version, how } => {
                    // Judged again on a fresh read: the daemon's state may have moved while
                    // requests were carried out, and our copy of the Node may be an older watch
                    // event delivered after a newer answer (a permit the coordinator has
                    // revoked since).
                    match self.nodes.get(&self.opts.node).await {
                        Ok(n) => self.node = Some(n),
                        Err(e) => {
                            tracing::warn!("re-reading node {} before rebooting: {e}", self.opts.node);
                            self.retry_requests = true;
                            continue;
                        }
                    }
                    if plan::reboot_permit(&self.annotations(), &self.snap).is_none() {
                        continue;
                    }
                    // Said before the reboot is allowed: once allowed, the machine may go
                    // down before this task hears of the transition.
                    self.write_status().await;
                    self.events
                        .publish(Type::Normal, "Rebooting", &format!("rebooting into {version}, {how}"))
                        .await;
                    let Ok(version) = version.parse() else { continue };
                    if let Some(s) = self.ask(Request::AllowReboot { version }).await {
                        self.snap = s;
                    }
                }
            }
        }
    }

    /// A removal whose answer was lost: a fresh read of the Node shows whether it was stored
    /// (then its requests are acted on, once), can no longer be (then whatever is still there
    /// is taken again), or may still land (then the same removal is sent again, conditioned on
    /// the same version, so that at most one of them is stored).
    async fn resolve_pending(&mut self) {
        let Some(p) = self.memory.pending.clone() else { return };
        let fresh = match self.nodes.get(&self.opts.node).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("re-reading node {} after a lost answer: {e}", self.opts.node);
                self.retry_requests = true;
                return;
            }
        };
        let rv = fresh.metadata.resource_version.clone().unwrap_or_default();
        self.node = Some(fresh);
        match plan::resolution(&p, &self.annotations(), &rv) {
            plan::Resolution::Stored => {
                self.memory.pending = None;
                self.act_on(&p.requests, &p.keys).await;
            }
            plan::Resolution::NotStored => {
                self.memory.pending = None;
                self.retry_requests = true;
            }
            plan::Resolution::Unknown => {
                let mut remove: serde_json::Map<String, serde_json::Value> =
                    p.keys.iter().map(|k| ((*k).to_owned(), serde_json::Value::Null)).collect();
                remove.insert(ann::REQUEST_RESULT.to_owned(), p.marker.clone().into());
                let patch = serde_json::json!({"metadata": {"resourceVersion": p.resource_version, "annotations": remove}});
                match self.nodes.patch(&self.opts.node, &PatchParams::default(), &Patch::Merge(&patch)).await
                {
                    Ok(n) => {
                        self.node = Some(n);
                        self.memory.pending = None;
                        self.act_on(&p.requests, &p.keys).await;
                    }
                    Err(cluster::kube::Error::Api(s))
                        if (400..500).contains(&s.code) && s.code != 429 && !s.is_conflict() =>
                    {
                        // Refused: the first one, the same patch, was refused as well.
                        self.memory.pending = None;
                        self.retry_requests = true;
                    }
                    Err(e) => {
                        // A conflict: something was stored meanwhile (ours, or another
                        // change); the next read tells. Anything else: try again.
                        tracing::warn!("sending the removal from node {} again: {e}", self.opts.node);
                        self.retry_requests = true;
                    }
                }
            }
        }
    }

    /// Acts on requests whose removal is stored.
    async fn act_on(&mut self, r: &Requests, removed: &[&'static str]) {
        for c in plan::commands(r, removed, self.snap.booted_version.as_deref()) {
            let result = match c {
                plan::Command::Refuse(why) => why,
                plan::Command::Ask { request, label } => match self.ask(request).await {
                    Some(s) => {
                        let note = s.state.note.clone();
                        self.snap = s;
                        format!("{label}: {note}")
                    }
                    None => format!("{label}: the agent is stopping"),
                },
            };
            self.memory.request_result = Some(result);
        }
    }

    /// Removes one-shot requests, conditioned on the Node version they were read from, with
    /// the [`plan::marker`] in `request-result`; on a conflict, removes only those still
    /// holding the value read. Returns the keys whose removal is stored (those to act on), or
    /// `None` when the removal failed or its answer was lost (see [`plan::Pending`]).
    async fn take_requests(&mut self, r: &Requests, keys: &[&'static str]) -> Option<Vec<&'static str>> {
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
            let rv = node.metadata.resource_version.clone().unwrap_or_default();
            let marker = plan::marker(&removing, &rv);
            remove.insert(ann::REQUEST_RESULT.to_owned(), marker.clone().into());
            let patch = serde_json::json!({"metadata": {"resourceVersion": rv, "annotations": remove}});
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
                    // Refused (4xx other than 429): not stored. Otherwise the write may have
                    // been made and only its answer lost: a fresh read will tell.
                    let refused = matches!(&e, cluster::kube::Error::Api(s) if (400..500).contains(&s.code) && s.code != 429);
                    if !refused {
                        self.memory.pending = Some(plan::Pending {
                            marker,
                            requests: r.clone(),
                            keys: removing,
                            resource_version: rv,
                        });
                    }
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
        let Some((kind, reason)) = plan::event(t.from, t.to, &t.outcome) else { return };
        if kind == Type::Warning {
            self.memory.last_error = Some(t.note.clone());
        }
        self.events.publish(kind, reason, &t.note).await;
    }

    /// Whether timed work is due at all.
    fn busy(&self) -> bool {
        self.retry_requests
            || self.retry_status
            || self.memory.pending.is_some()
            || matches!(self.snap.state.phase, Phase::Installing { .. })
    }

    async fn tick(&mut self) {
        if matches!(self.snap.state.phase, Phase::Installing { .. }) {
            // The daemon publishes the progress with its answer.
            let _ = self.ask(Request::Status).await;
        }
    }

    /// Writes the status annotations (and the version label) that changed.
    async fn write_status(&mut self) {
        let Some(node) = &self.node else { return };
        if !plan::writes_status(&self.memory) {
            return;
        }
        let s = &self.snap;
        let want = plan::status(s, &self.memory);
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
