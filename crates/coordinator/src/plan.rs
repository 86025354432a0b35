//! What the coordinator does next for one Node, as a pure function of what it sees: the
//! node's own request, the lock slot held for it, the cordon mark, whether a drain runs or
//! finished. No I/O and no clock, so every combination is tested.
//!
//! | node says | lock slot | drain | goes to |
//! |---|---|---|---|
//! | `wanted`, `reboot-allowed` names its target | held | - | [`Step::Renew`] (it is about to reboot) |
//! | `wanted`, no slot, lock needed | none | - | [`Step::Acquire`] (unless put off after a blocked drain) |
//! | `wanted` | held, or `reboot=allowed` | running | [`Step::Renew`] short |
//! | `wanted` | held, or `reboot=allowed` | finished | [`Step::Allow`] |
//! | `wanted` | held, or `reboot=allowed` | not started | [`Step::Drain`] |
//! | `holding` | held | - | [`Step::Renew`] held across the reboot, but not while the node is down (`rebooting`) |
//! | nothing | anything of ours left (slot, cordon, one of our keys) | - | [`Step::Finish`] once the Node is Ready |
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
    /// It says `rebooting` (down, or about to be).
    pub rebooting: bool,
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
    Renew {
        /// Across a reboot and its health checks.
        hold: bool,
    },
    /// Lengthen its slot to the reboot's hold and write `reboot-allowed`.
    Allow,
    /// Uncordon (if we cordoned), release its slot, remove our annotations.
    Finish,
}

/// The next step for one node.
pub fn decide(v: &View) -> Step {
    let granted = v.lease.is_some() || v.without_lock;
    match v.request {
        Some(RebootRequest::Wanted) => {
            if v.allowed.is_some() && v.allowed == v.target {
                if v.lease.is_some() { Step::Renew { hold: true } } else { Step::Wait }
            } else if !granted {
                if v.put_off { Step::Wait } else { Step::Acquire }
            } else if v.draining {
                if v.lease.is_some() { Step::Renew { hold: false } } else { Step::Wait }
            } else if v.drained {
                Step::Allow
            } else if v.put_off {
                Step::Wait
            } else {
                Step::Drain
            }
        }
        Some(RebootRequest::Holding) => {
            if v.lease.is_some() && !v.rebooting {
                Step::Renew { hold: true }
            } else {
                Step::Wait
            }
        }
        None => {
            let ours = v.lease.is_some() || v.cordoned_by_us || v.allowed.is_some() || v.marked;
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
                for bits in 0u32..(1 << 9) {
                    let b = |i: u32| bits & (1 << i) != 0;
                    out.push(View {
                        request,
                        target: Some("2.0.0".into()),
                        allowed: allowed.clone(),
                        lease: b(0).then(|| "acl-reboot-0".into()),
                        cordoned_by_us: b(1),
                        ready: b(2),
                        rebooting: b(3),
                        without_lock: b(4),
                        draining: b(5),
                        drained: b(6),
                        put_off: b(7),
                        marked: b(8),
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
            // A reboot is allowed only for a node that asks, holds a slot (or may skip it) and
            // whose drain finished.
            if s == Step::Allow {
                assert!(v.request == Some(RebootRequest::Wanted) && granted && v.drained, "{v:?}");
            }
            // A node is drained only when it asks and holds a slot (or may skip it).
            if s == Step::Drain {
                assert!(v.request == Some(RebootRequest::Wanted) && granted && !v.put_off, "{v:?}");
            }
            // Nothing is taken back from a node that still needs it, nor while it is not Ready.
            if s == Step::Finish {
                assert!(v.request.is_none() && v.ready, "{v:?}");
            }
            // A slot is taken only for a node that asks, has none, and needs one.
            if s == Step::Acquire {
                assert!(v.request == Some(RebootRequest::Wanted) && !granted && !v.put_off, "{v:?}");
            }
            // Renewing needs a slot; a node that is down is not renewed (its hold covers it).
            if let Step::Renew { .. } = s {
                assert!(
                    v.lease.is_some() && !(v.request == Some(RebootRequest::Holding) && v.rebooting),
                    "{v:?}"
                );
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
        assert_eq!(decide(&v), Step::Renew { hold: false });
        v.draining = false;
        v.drained = true;
        assert_eq!(decide(&v), Step::Allow);
        v.allowed = Some("2.0.0".into());
        v.drained = false;
        assert_eq!(decide(&v), Step::Renew { hold: true });
        v.request = Some(RebootRequest::Holding);
        v.rebooting = true;
        v.ready = false;
        assert_eq!(decide(&v), Step::Wait, "down: nobody renews, the hold covers the reboot");
        v.rebooting = false;
        assert_eq!(decide(&v), Step::Renew { hold: true }, "verifying");
        v.request = None;
        assert_eq!(decide(&v), Step::Wait, "not Ready yet");
        v.ready = true;
        assert_eq!(decide(&v), Step::Finish);
    }

    #[test]
    fn a_stale_allow_for_another_version_is_not_a_reboot_permit() {
        let v = View {
            request: Some(RebootRequest::Wanted),
            target: Some("3.0.0".into()),
            allowed: Some("2.0.0".into()),
            ..View::default()
        };
        assert_eq!(decide(&v), Step::Acquire, "drained again for the new version");
        let v = View { lease: Some("acl-reboot-0".into()), ..v };
        assert_eq!(decide(&v), Step::Drain);
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
        assert_eq!(decide(&View { draining: true, ..v }), Step::Wait);
    }

    #[test]
    fn a_blocked_drain_puts_the_node_off() {
        let v = View { request: Some(RebootRequest::Wanted), put_off: true, ..View::default() };
        assert_eq!(decide(&v), Step::Wait);
    }
}
