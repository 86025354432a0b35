//! What the coordinator does next for one Node, as a pure function of what it sees: the
//! node's own request, the lock slot held for it, the cordon mark, whether a drain runs or
//! finished. No I/O and no clock, so every combination is tested.
//!
//! | node says | lock slot | drain | goes to |
//! |---|---|---|---|
//! | `wanted`, `reboot-allowed` names its target | held (or `reboot=allowed`) | - | [`Step::Wait`]: it is about to reboot |
//! | `wanted`, `reboot-allowed` names its target | gone (the hold ran out) | - | [`Step::Revoke`] |
//! | `wanted`, `reboot-allowed` names another version | - | - | [`Step::Revoke`] |
//! | `wanted`, no slot, lock needed | none | - | [`Step::Acquire`] (unless put off after a blocked drain) |
//! | `wanted` | held, or `reboot=allowed` | running | [`Step::Renew`] |
//! | `wanted` | held, or `reboot=allowed` | finished | [`Step::Allow`] |
//! | `wanted` | held, or `reboot=allowed` | not started | [`Step::Drain`] |
//! | `holding` or nothing, with a `reboot-allowed` | - | - | [`Step::Revoke`]: spent or withdrawn |
//! | `holding` | - | - | [`Step::Wait`] |
//! | nothing | anything of ours left (slot, cordon, one of our keys) | - | [`Step::Finish`] once the Node is Ready |
//!
//! A slot is renewed only while its node is drained (at most `--drain-timeout`). [`Step::Allow`]
//! lengthens it once, to `--reboot-hold`, and nothing renews it after that: however a node
//! behaves, it holds a slot for at most a drain plus the hold. A permit is taken back as soon
//! as it is spent, withdrawn, or outlived its slot, so a permit never outlives the slot it was
//! given with.
//!
//! A node can write only its own Node, so what it says there is trusted only for itself: it
//! can ask to be drained and rebooted, and skip the lock for itself (`reboot=allowed`). How
//! many slots exist is the coordinator's setting, not the node's.

use cluster::annotations::RebootRequest;

/// What the coordinator sees of one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// The node's `reboot-request`.
    pub request: Option<RebootRequest>,
    /// The node's `target-version`.
    pub target: Option<String>,
    /// Our `reboot-allowed` on it.
    pub allowed: Option<String>,
    /// The lock slot held for it (a Lease whose holder is the node).
    pub lease: Option<String>,
    /// It carries our cordon mark.
    pub cordoned_by_us: bool,
    /// It carries any of our keys (`lock`, `drain`, `reboot-allowed`).
    pub marked: bool,
    /// Its Ready condition is True.
    pub ready: bool,
    /// `reboot=allowed`: no lock slot for it.
    pub without_lock: bool,
    /// A drain of it runs now.
    pub draining: bool,
    /// A drain of it finished with every pod gone.
    pub drained: bool,
    /// A blocked drain put it off: no new slot or drain yet.
    pub put_off: bool,
}

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing now.
    Wait,
    /// Take a lock slot for it.
    Acquire,
    /// Cordon it and evict its pods.
    Drain,
    /// Keep its slot alive: `hold` for the reboot's length, else the ordinary duration.
    Renew,
    /// Lengthen its slot to the reboot's hold and write `reboot-allowed`.
    Allow,
    /// Remove `reboot-allowed`.
    Revoke,
    /// Uncordon (if we cordoned), release its slot, remove our annotations.
    Finish,
}

/// The next step for one node.
pub fn decide(v: &View) -> Step {
    let granted = v.lease.is_some() || v.without_lock;
    match v.request {
        Some(RebootRequest::Wanted) => {
            if v.allowed.is_some() {
                let current = v.allowed == v.target;
                if current && granted { Step::Wait } else { Step::Revoke }
            } else if !granted {
                if v.put_off { Step::Wait } else { Step::Acquire }
            } else if v.draining {
                if v.lease.is_some() { Step::Renew } else { Step::Wait }
            } else if v.drained {
                Step::Allow
            } else if v.put_off {
                Step::Wait
            } else {
                Step::Drain
            }
        }
        Some(RebootRequest::Holding) | None if v.allowed.is_some() => Step::Revoke,
        Some(RebootRequest::Holding) => Step::Wait,
        None => {
            let ours = v.lease.is_some() || v.cordoned_by_us || v.marked;
            if ours && v.ready { Step::Finish } else { Step::Wait }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every combination of the view's inputs.
    fn all_views() -> Vec<View> {
        let mut out = Vec::new();
        let requests = [None, Some(RebootRequest::Wanted), Some(RebootRequest::Holding)];
        let versions = [None, Some("2.0.0".to_owned()), Some("3.0.0".to_owned())];
        for request in requests {
            for allowed in &versions {
                for bits in 0u32..(1 << 8) {
                    let b = |i: u32| bits & (1 << i) != 0;
                    out.push(View {
                        request,
                        target: Some("2.0.0".into()),
                        allowed: allowed.clone(),
                        lease: b(0).then(|| "acl-reboot-0".into()),
                        cordoned_by_us: b(1),
                        ready: b(2),
                        without_lock: b(3),
                        draining: b(4),
                        drained: b(5),
                        put_off: b(6),
                        marked: b(7),
                    });
                }
            }
        }
        out
    }

    #[test]
    fn safety_over_every_combination() {
        for v in all_views() {
            let s = decide(&v);
            let granted = v.lease.is_some() || v.without_lock;
            let wanted = v.request == Some(RebootRequest::Wanted);
            // A reboot is allowed only for a node that asks, holds a slot (or may skip it),
            // whose drain finished, and that has no permit yet.
            if s == Step::Allow {
                assert!(wanted && granted && v.drained && v.allowed.is_none(), "{v:?}");
            }
            // A node is drained only when it asks and holds a slot (or may skip it).
            if s == Step::Drain {
                assert!(wanted && granted && !v.put_off && v.allowed.is_none(), "{v:?}");
            }
            // Nothing is taken back from a node that still needs it, nor while it is not Ready.
            if s == Step::Finish {
                assert!(v.request.is_none() && v.ready && v.allowed.is_none(), "{v:?}");
            }
            // A slot is taken only for a node that asks, has none, and needs one.
            if s == Step::Acquire {
                assert!(wanted && !granted && !v.put_off && v.allowed.is_none(), "{v:?}");
            }
            // Only a drain keeps a slot alive: a reboot's hold is written once, by Allow.
            if s == Step::Renew {
                assert!(wanted && v.lease.is_some() && v.draining, "{v:?}");
            }
            // A permit stands only while its node asks for that version and holds its slot.
            let permit_stands = wanted && v.allowed.is_some() && v.allowed == v.target && granted;
            if v.allowed.is_some() && !permit_stands {
                assert_eq!(s, Step::Revoke, "{v:?}");
            }
        }
    }

    #[test]
    fn liveness_a_wanting_node_moves_on() {
        // From "wants" with nothing, the steps lead to Allow when each succeeds.
        let mut v = View {
            request: Some(RebootRequest::Wanted),
            target: Some("2.0.0".into()),
            ready: true,
            ..View::default()
        };
        assert_eq!(decide(&v), Step::Acquire);
        v.lease = Some("acl-reboot-0".into());
        assert_eq!(decide(&v), Step::Drain);
        v.draining = true;
        assert_eq!(decide(&v), Step::Renew);
        v.draining = false;
        v.drained = true;
        assert_eq!(decide(&v), Step::Allow);
        v.allowed = Some("2.0.0".into());
        v.drained = false;
        assert_eq!(decide(&v), Step::Wait, "about to reboot: the hold covers it, nobody renews");
        v.request = Some(RebootRequest::Holding);
        v.ready = false;
        assert_eq!(decide(&v), Step::Revoke, "the permit is spent");
        v.allowed = None;
        assert_eq!(decide(&v), Step::Wait);
        assert_eq!(decide(&v), Step::Wait, "verifying: still the hold");
        v.request = None;
        assert_eq!(decide(&v), Step::Wait, "not Ready yet");
        v.ready = true;
        assert_eq!(decide(&v), Step::Finish);
    }

    #[test]
    fn a_permit_never_outlives_its_slot_or_its_request() {
        let v = View {
            request: Some(RebootRequest::Wanted),
            target: Some("2.0.0".into()),
            allowed: Some("2.0.0".into()),
            ..View::default()
        };
        assert_eq!(decide(&v), Step::Revoke, "the hold ran out before the node rebooted");
        let v = View { target: Some("3.0.0".into()), lease: Some("acl-reboot-0".into()), ..v };
        assert_eq!(decide(&v), Step::Revoke, "a permit for another version");
        let v = View { request: None, ready: false, ..v };
        assert_eq!(decide(&v), Step::Revoke, "withdrawn: taken back even while the node is not Ready");
    }

    #[test]
    fn reboot_allowed_skips_the_lock_but_not_the_drain() {
        let v = View {
            request: Some(RebootRequest::Wanted),
            target: Some("2.0.0".into()),
            without_lock: true,
            ..View::default()
        };
        assert_eq!(decide(&v), Step::Drain);
        assert_eq!(decide(&View { drained: true, ..v.clone() }), Step::Allow);
        assert_eq!(decide(&View { draining: true, ..v.clone() }), Step::Wait);
        assert_eq!(decide(&View { allowed: Some("2.0.0".into()), ..v }), Step::Wait);
    }

    #[test]
    fn a_blocked_drain_puts_the_node_off() {
        let v = View { request: Some(RebootRequest::Wanted), put_off: true, ..View::default() };
        assert_eq!(decide(&v), Step::Wait);
    }
}
