//! The cluster-wide reboot lock: a counting semaphore of `coordination.k8s.io/v1` Leases.
//!
//! Slot `i` of the semaphore is the Lease `acl-reboot-<i>` in the lock namespace; a node may
//! take any of slots `0..N`, where N is its `max-rebooting` annotation (so N nodes reboot at
//! once at most, for the largest N any node was given). The holder is the Node's name. A taker
//! reads the Lease and writes it back with the `resourceVersion` it read: of two nodes racing
//! for one slot, one gets `409 Conflict` and tries the next slot. Like kube-scheduler's leader
//! election, this relies on the API server's optimistic concurrency, not on clocks agreeing.
//!
//! A slot is free when it has no holder; it is *recovered* when its holder stopped renewing
//! for longer than the Lease's `leaseDurationSeconds` (a node that died), or when the holder's
//! Node object no longer exists (a node removed from the cluster while rebooting). A holder
//! about to reboot writes a longer duration first ([`RebootLock::extend`]): a reboot and its
//! health checks take minutes, with nobody renewing.

use crate::{ClusterError, api};
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use std::time::Duration;

/// The Lease name of slot `i`.
pub fn lease_name(i: u32) -> String {
    format!("acl-reboot-{i}")
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

/// Judges a Lease at `now` (pure; whether the holder's Node exists is the caller's question).
pub fn availability(lease: &Lease, me: &str, now: Timestamp) -> Availability {
    let spec = lease.spec.clone().unwrap_or_default();
    let Some(holder) = spec.holder_identity.filter(|h| !h.is_empty()) else { return Availability::Free };
    if holder == me {
        return Availability::Ours;
    }
    let renewed = spec.renew_time.or(spec.acquire_time).map(|t| t.0);
    let duration = jiff::SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(0).into());
    match renewed {
        Some(t) if t.saturating_add(duration).is_ok_and(|end| end > now) => Availability::Held { holder },
        _ => Availability::Expired { holder },
    }
}

/// The lock, as one node sees it.
#[derive(Debug, Clone)]
pub struct RebootLock {
    leases: Api<Lease>,
    nodes: Api<Node>,
    me: String,
    duration: Duration,
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
                l.metadata.name.as_deref().is_some_and(|n| n.starts_with("acl-reboot-"))
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
        let now = Timestamp::now();
        for i in 0..slots {
            let name = lease_name(i);
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
            let taken_over = match availability(&lease, &self.me, now) {
                Availability::Free | Availability::Ours => None,
                Availability::Expired { holder } => Some(holder),
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
            spec.renew_time = Some(MicroTime(Timestamp::now()));
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
