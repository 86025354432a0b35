//! Cordon, drain through the Eviction API, uncordon.
//!
//! As `kubectl drain` does: pods are evicted (never deleted), so PodDisruptionBudgets are
//! honoured: the API server answers `429` while evicting a pod would break its budget (or while
//! the disruption controller has not yet processed the budget's latest spec, then with
//! `Retry-After`), and we ask again, no sooner than the server asked, until the drain's
//! deadline. An evicted pod is waited for until it is gone: through its grace period, and for
//! ever if a finalizer never clears (the drain then times out naming it). DaemonSet pods (their controller would put them back
//! at once, and they tolerate the cordon) and mirror pods (static pods the kubelet owns) are
//! left alone, as are pods that have finished.
//!
//! The coordinator marks the Node when it cordons it ([`CORDONED`]) in the same patch, and
//! uncordons only a Node carrying that mark: a node an operator cordoned stays cordoned.

use crate::annotations::CORDONED;
use crate::{ClusterError, api};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, EvictParams, ListParams, Patch, PatchParams};
use serde_json::json;
use std::time::Duration;
use tokio::time::Instant;

/// Why a pod is not evicted, if it is not.
pub fn skip_reason(pod: &Pod) -> Option<&'static str> {
    let m = &pod.metadata;
    if m.annotations.as_ref().is_some_and(|a| a.contains_key("kubernetes.io/config.mirror")) {
        return Some("mirror pod");
    }
    if m.owner_references
        .as_ref()
        .is_some_and(|o| o.iter().any(|r| r.kind == "DaemonSet" && r.controller == Some(true)))
    {
        return Some("DaemonSet pod");
    }
    match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Succeeded" | "Failed") => Some("finished"),
        _ => None,
    }
}

/// Why a pod being deleted is still there.
fn terminating(p: &Pod) -> String {
    match p.metadata.finalizers.as_deref() {
        Some(f) if !f.is_empty() => format!("terminating, held by finalizer {}", f.join(", ")),
        _ => match p.metadata.deletion_grace_period_seconds {
            Some(g) if g > 0 => format!("terminating (grace period {g}s)"),
            _ => "terminating".into(),
        },
    }
}

/// How a drain ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every pod to evict is gone.
    Done {
        /// Pods evicted.
        evicted: usize,
    },
    /// The deadline passed; what still blocks it.
    TimedOut {
        /// `namespace/name: reason` of each pod left.
        blocking: Vec<String>,
    },
}

/// Drains one Node.
#[derive(Clone)]
pub struct Drainer {
    nodes: Api<Node>,
    client: kube::Client,
    node: String,
    /// Time between eviction rounds.
    pub poll: Duration,
}

impl std::fmt::Debug for Drainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drainer").field("node", &self.node).field("poll", &self.poll).finish_non_exhaustive()
    }
}

fn pod_name(p: &Pod) -> String {
    format!("{}/{}", p.metadata.namespace.as_deref().unwrap_or(""), p.metadata.name.as_deref().unwrap_or(""))
}

impl Drainer {
    /// Drains `node`.
    pub fn new(client: kube::Client, node: &str) -> Self {
        Self { nodes: Api::all(client.clone()), client, node: node.to_owned(), poll: Duration::from_secs(5) }
    }

    /// Marks the Node unschedulable. `true` when this call cordoned it (or an earlier one of
    /// ours had); `false` when someone else had already cordoned it (then it is not ours to
    /// uncordon).
    pub async fn cordon(&self) -> Result<bool, ClusterError> {
        let node = self.nodes.get(&self.node).await.map_err(api(format!("read node {}", self.node)))?;
        let ours =
            node.metadata.annotations.as_ref().is_some_and(|a| a.get(CORDONED).is_some_and(|v| v == "true"));
        let cordoned = node.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false);
        if cordoned {
            return Ok(ours);
        }
        // Not cordoned, though perhaps marked ours (an operator uncordoned it meanwhile, and
        // the drain is taken up again): cordoned now, with our mark.
        // Conditioned on the version read: an operator's cordon in between is not claimed.
        let patch = json!({
            "metadata": {"resourceVersion": node.metadata.resource_version, "annotations": {CORDONED: "true"}},
            "spec": {"unschedulable": true},
        });
        match self.nodes.patch(&self.node, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.is_conflict() => Box::pin(self.cordon()).await,
            Err(e) => Err(api(format!("cordon node {}", self.node))(e)),
        }
    }

    /// Makes the Node schedulable again if we cordoned it. `true` when it did.
    pub async fn uncordon_if_ours(&self) -> Result<bool, ClusterError> {
        let Some(node) =
            self.nodes.get_opt(&self.node).await.map_err(api(format!("read node {}", self.node)))?
        else {
            return Ok(false);
        };
        let ours =
            node.metadata.annotations.as_ref().is_some_and(|a| a.get(CORDONED).is_some_and(|v| v == "true"));
        if !ours {
            return Ok(false);
        }
        // Conditioned on the version read, as the cordon is: a change in between (an operator
        // taking the node over) is read again before anything is undone.
        let patch = json!({
            "metadata": {"resourceVersion": node.metadata.resource_version, "annotations": {CORDONED: null}},
            "spec": {"unschedulable": null},
        });
        match self.nodes.patch(&self.node, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.is_conflict() => Box::pin(self.uncordon_if_ours()).await,
            Err(e) => Err(api(format!("uncordon node {}", self.node))(e)),
        }
    }

    /// The pods on the Node that a drain must evict.
    pub async fn pods_to_evict(&self) -> Result<Vec<Pod>, ClusterError> {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let lp = ListParams::default().fields(&format!("spec.nodeName={}", self.node));
        let list = pods.list(&lp).await.map_err(api(format!("list the pods on {}", self.node)))?;
        Ok(list.items.into_iter().filter(|p| skip_reason(p).is_none()).collect())
    }

    /// Evicts every pod to evict, asking again while budgets refuse, until they are all gone
    /// or `timeout` passes. `progress` hears a one-line status after each round.
    pub async fn drain(
        &self,
        timeout: Duration,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<Outcome, ClusterError> {
        let deadline = Instant::now() + timeout;
        let mut evicted = 0;
        loop {
            let pods = self.pods_to_evict().await?;
            if pods.is_empty() {
                return Ok(Outcome::Done { evicted });
            }
            let mut blocking = Vec::new();
            // The longest any refusal asked us to wait (`Retry-After`).
            let mut retry_after = Duration::ZERO;
            for p in &pods {
                let name = pod_name(p);
                if p.metadata.deletion_timestamp.is_some() {
                    blocking.push(format!("{name}: {}", terminating(p)));
                    continue;
                }
                let ns = p.metadata.namespace.as_deref().unwrap_or("default");
                let api_ns: Api<Pod> = Api::namespaced(self.client.clone(), ns);
                match api_ns.evict(p.metadata.name.as_deref().unwrap_or(""), &EvictParams::default()).await {
                    // A refusal the API server sends as the created object (HTTP 201 carrying a
                    // Failure Status, e.g. a pod covered by two budgets); client-go reads it as
                    // an error, kube-rs as success.
                    Ok(status) if status.is_failure() => {
                        blocking.push(format!("{name}: {} (code {})", status.message, status.code));
                    }
                    Ok(_) => evicted += 1,
                    Err(kube::Error::Api(s)) if s.is_not_found() => {}
                    Err(kube::Error::Api(s)) if s.code == 429 => {
                        let details = s.details.as_ref();
                        let cause = details.and_then(|d| d.causes.first()).map(|c| c.message.as_str());
                        retry_after = retry_after.max(Duration::from_secs(
                            details.map_or(0, |d| u64::from(d.retry_after_seconds)),
                        ));
                        blocking.push(match cause {
                            Some(c) => format!("{name}: {} ({c})", s.message.trim_end_matches('.')),
                            None => format!("{name}: {}", s.message),
                        });
                    }
                    Err(e) => blocking.push(format!("{name}: {e}")),
                }
            }
            if !blocking.is_empty() {
                progress(format!(
                    "draining: {} of {} pods left; {}",
                    blocking.len(),
                    pods.len(),
                    blocking[0]
                ));
            }
            if Instant::now() >= deadline {
                return Ok(Outcome::TimedOut { blocking });
            }
            if !blocking.is_empty() {
                let wait = self.poll.max(retry_after);
                tokio::time::sleep(wait.min(deadline.saturating_duration_since(Instant::now()))).await;
            }
        }
    }
}
