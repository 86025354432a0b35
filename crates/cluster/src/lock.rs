//! The cluster-wide reboot lock: a counting semaphore of `coordination.k8s.io/v1` Leases.
//!
//! Slot `i` of the semaphore is the Lease `acl-reboot-<i>` in the lock namespace; a slot is
//! taken from `0..N`, where N is the coordinator's `--max-rebooting` (so N nodes reboot at once
//! at most). The holder is the Node's name: the coordinator takes slots on the nodes' behalf. A taker
//! reads the Lease and writes it back with the `resourceVersion` it read: of two nodes racing
//! for one slot, one gets `409 Conflict` and tries the next slot. Like kube-scheduler's leader
//! election, this relies on the API server's optimistic concurrency, not on clocks agreeing.
//!
//! A slot is free when it has no holder; it is *recovered* when its holder stopped renewing
//! for longer than the Lease's `leaseDurationSeconds` (a node that died), or when the holder's
//! Node object no longer exists (a node removed from the cluster while rebooting). A holder
//! about to reboot writes a longer duration first ([`RebootLock::extend`]): a reboot and its
//! health checks take minutes, with nobody renewing.
//!
//! "Stopped renewing" is judged as client-go's leader election judges it: by the observer's own
//! monotonic clock, from when it last saw the Lease's record change, never by comparing the
//! holder's `renewTime` with the observer's wall clock. Node clocks disagree (issue 14: a node
//! whose clock ran 90 s ahead took a live lock, and two nodes went down where one was allowed).
//! The price is the one client-go pays: an observer that just started waits a whole duration
//! before it may recover a slot. The times written into the Lease are for people.

use crate::{ClusterError, api};
use jiff::SignedDuration;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The name prefix of the reboot lock's Leases.
pub const REBOOT_PREFIX: &str = "acl-reboot-";

/// The Lease name of slot `i`.
pub fn lease_name(i: u32) -> String {
    format!("{REBOOT_PREFIX}{i}")
}

/// Why a slot can or cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    /// Nobody holds it.
    Free,
    /// We hold it already.
    Ours,
    /// Its holder stopped renewing: taken over.
    Expired {
        /// The former holder.
        holder: String,
    },
    /// Held and renewed.
    Held {
        /// The holder.
        holder: String,
    },
}

/// Judges a Lease whose record this observer has seen unchanged for `unchanged_for` (pure;
/// whether the holder's Node exists is the caller's question). A record first seen now has
/// been unchanged for zero: held.
pub fn availability(lease: &Lease, me: &str, unchanged_for: Duration) -> Availability {
    let spec = lease.spec.clone().unwrap_or_default();
    let Some(holder) = spec.holder_identity.filter(|h| !h.is_empty()) else { return Availability::Free };
    if holder == me {
        return Availability::Ours;
    }
    let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0).unsigned_abs().into());
    if unchanged_for > duration { Availability::Expired { holder } } else { Availability::Held { holder } }
}

/// Each Lease's record as last seen, and when (this process's monotonic clock) it was first
/// seen so.
type Observed = std::sync::Arc<std::sync::Mutex<HashMap<String, (Option<LeaseSpec>, Instant)>>>;

/// The lock, as one node sees it.
#[derive(Debug, Clone)]
pub struct RebootLock {
    leases: Api<Lease>,
    nodes: Api<Node>,
    me: String,
    duration: Duration,
    observed: Observed,
    /// The Leases' name prefix: [`REBOOT_PREFIX`], or another semaphore's (leader election).
    prefix: String,
    /// Holders are Nodes: a holder whose Node is gone is recovered at once.
    holders_are_nodes: bool,
    /// How far this node's wall clock is off (tests of skewed clocks); used only for the
    /// times written into Leases.
    clock_offset: SignedDuration,
}

fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

impl RebootLock {
    /// The lock in `namespace` for the node `me`, renewed within `duration`.
    pub fn new(client: kube::Client, namespace: &str, me: &str, duration: Duration) -> Self {
        Self {
            leases: Api::namespaced(client.clone(), namespace),
            nodes: Api::all(client),
            me: me.to_owned(),
            duration,
            observed: Observed::default(),
            clock_offset: SignedDuration::ZERO,
            prefix: REBOOT_PREFIX.to_owned(),
            holders_are_nodes: true,
        }
    }

    /// Leader election among replicas named `me`: one slot, the Lease `<prefix>0`, whose
    /// holders are pods, not Nodes (only expiry recovers it).
    pub fn leader_election(
        client: kube::Client,
        namespace: &str,
        prefix: &str,
        me: &str,
        duration: Duration,
    ) -> Self {
        Self {
            prefix: prefix.to_owned(),
            holders_are_nodes: false,
            ..Self::new(client, namespace, me, duration)
        }
    }

    /// The same lock for another holder, sharing what this one has observed of the Leases:
    /// the coordinator holds slots on behalf of nodes, and judges expiry with one memory.
    #[must_use]
    pub fn for_holder(&self, holder: &str) -> Self {
        Self { me: holder.to_owned(), ..self.clone() }
    }

    /// This lock as seen by a node whose wall clock is `offset` off (tests of skewed clocks).
    #[must_use]
    pub fn with_clock_offset(mut self, offset: SignedDuration) -> Self {
        self.clock_offset = offset;
        self
    }

    fn now(&self) -> Timestamp {
        Timestamp::now().saturating_add(self.clock_offset).unwrap_or_else(|_| Timestamp::now())
    }

    /// How long `name`'s record has looked exactly like `spec` to this observer.
    fn unchanged_for(&self, name: &str, spec: &Option<LeaseSpec>) -> Duration {
        let mut seen = self.observed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match seen.get(name) {
            Some((s, since)) if s == spec => since.elapsed(),
            _ => {
                seen.insert(name.to_owned(), (spec.clone(), Instant::now()));
                Duration::ZERO
            }
        }
    }

    /// The slot this node holds, if any (after a restart or reboot).
    pub async fn held(&self) -> Result<Option<String>, ClusterError> {
        let list =
            self.leases.list(&Default::default()).await.map_err(api("list the reboot lock's leases"))?;
        Ok(list
            .items
            .into_iter()
            .find(|l| {
                l.metadata.name.as_deref().is_some_and(|n| n.starts_with(&self.prefix))
                    && l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(&self.me)
            })
            .and_then(|l| l.metadata.name))
    }

    /// Takes one of slots `0..slots`: the slot's name, or `None` while all are held. Returns
    /// the held slot when this node has one already. `taken_over` names a former holder whose
    /// slot was recovered.
    pub async fn acquire(&self, slots: u32) -> Result<Option<Acquired>, ClusterError> {
        if let Some(name) = self.held().await? {
            return Ok(Some(Acquired { name, taken_over: None }));
        }
        let now = self.now();
        for i in 0..slots {
            let name = format!("{}{i}", self.prefix);
            let existing = self.leases.get_opt(&name).await.map_err(api(format!("read lease {name}")))?;
            let Some(mut lease) = existing else {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(name.clone()), ..ObjectMeta::default() },
                    spec: Some(self.spec(now, 0)),
                };
                match self.leases.create(&PostParams::default(), &lease).await {
                    Ok(_) => return Ok(Some(Acquired { name, taken_over: None })),
                    Err(kube::Error::Api(s)) if s.is_already_exists() => continue,
                    Err(e) => return Err(api(format!("create lease {name}"))(e)),
                }
            };
            let unchanged_for = self.unchanged_for(&name, &lease.spec);
            let taken_over = match availability(&lease, &self.me, unchanged_for) {
                Availability::Free | Availability::Ours => None,
                Availability::Expired { holder } => Some(holder),
                Availability::Held { .. } if !self.holders_are_nodes => continue,
                Availability::Held { holder } => {
                    // A holder whose Node is gone will never release it.
                    match self.nodes.get_opt(&holder).await.map_err(api(format!("read node {holder}")))? {
                        Some(_) => continue,
                        None => Some(holder),
                    }
                }
            };
            let transitions = lease.spec.as_ref().and_then(|s| s.lease_transitions).unwrap_or(0);
            lease.spec = Some(self.spec(now, transitions + 1));
            // The lease carries the resourceVersion read: a racing taker gets 409.
            match self.leases.replace(&name, &PostParams::default(), &lease).await {
                Ok(_) => return Ok(Some(Acquired { name, taken_over })),
                Err(kube::Error::Api(s)) if s.is_conflict() => continue,
                Err(e) => return Err(api(format!("take lease {name}"))(e)),
            }
        }
        Ok(None)
    }

    fn spec(&self, now: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.me.clone()),
            lease_duration_seconds: Some(secs(self.duration)),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Renews the slot for another `duration` (or `hold`, before a reboot). `false` when it is
    /// no longer ours (recovered by another node after we failed to renew in time).
    async fn renew_for(&self, name: &str, hold: Duration) -> Result<bool, ClusterError> {
        loop {
            let Some(mut lease) =
                self.leases.get_opt(name).await.map_err(api(format!("read lease {name}")))?
            else {
                return Ok(false);
            };
            let Some(spec) = lease.spec.as_mut().filter(|s| s.holder_identity.as_deref() == Some(&self.me))
            else {
                return Ok(false);
            };
            spec.renew_time = Some(MicroTime(self.now()));
            spec.lease_duration_seconds = Some(secs(hold));
            match self.leases.replace(name, &PostParams::default(), &lease).await {
                Ok(_) => return Ok(true),
                Err(kube::Error::Api(s)) if s.is_conflict() => continue,
                Err(e) => return Err(api(format!("renew lease {name}"))(e)),
            }
        }
    }

    /// Renews the slot; `false` when it is no longer ours.
    pub async fn renew(&self, name: &str) -> Result<bool, ClusterError> {
        self.renew_for(name, self.duration).await
    }

    /// Renews the slot for `hold` (the time a reboot and its health checks may take).
    pub async fn extend(&self, name: &str, hold: Duration) -> Result<bool, ClusterError> {
        self.renew_for(name, hold).await
    }

    /// Gives the slot back (if still ours).
    pub async fn release(&self, name: &str) -> Result<(), ClusterError> {
        loop {
            let Some(mut lease) =
                self.leases.get_opt(name).await.map_err(api(format!("read lease {name}")))?
            else {
                return Ok(());
            };
            let Some(spec) = lease.spec.as_mut().filter(|s| s.holder_identity.as_deref() == Some(&self.me))
            else {
                return Ok(());
            };
            spec.holder_identity = None;
            spec.renew_time = None;
            match self.leases.replace(name, &PostParams::default(), &lease).await {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(s)) if s.is_conflict() => continue,
                Err(e) => return Err(api(format!("release lease {name}"))(e)),
            }
        }
    }
}

/// A slot taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquired {
    /// The Lease's name.
    pub name: String,
    /// The node it was recovered from, if it was.
    pub taken_over: Option<String>,
}
