//! The update decision as a pure function: given the accepted channel index, what runs now,
//! the operator's settings, the history of failed versions and the time, which release (if
//! any) this node should install, or why not yet.
//!
//! Rules, in order:
//! 1. a pinned version is the only candidate (and may be older: pinning is the operator
//!    asking for exactly one version); otherwise the newest release for the architecture;
//! 2. never a downgrade, and nothing when the candidate is what runs;
//! 3. a version that failed is retried after an exponential backoff, and skipped (said so)
//!    after [`MAX_FAILURES`] failures; the next newer release is then considered;
//! 4. rollout waves: each machine has a stable place in `[0, 100)` derived from its machine id
//!    and the version ([`rollout_position`]); it may update once the current wave's
//!    percentage is above its place. Different versions shuffle machines differently, so the
//!    same machines are not always first.
//!
//! An operator's explicit request ([`Wanted`], from `aclctl update` or a Kubernetes annotation)
//! changes three rules: a requested version is installed whatever its direction, pin, waves or
//! failures (the operator asked for exactly it); "the latest" skips the waves and the backoff
//! wait but not the no-downgrade rule, a pin, or a version skipped for good.
//!
//! Nothing here reads a clock or a file: the caller passes `now` and the history in.

use jiff::{SignedDuration, Timestamp};
use manifest::{ChannelIndex, Release, Wave};
use semver::Version;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// Failures after which a version is skipped for good.
pub const MAX_FAILURES: u32 = 4;
/// Wait after the first failure; doubles with each further one.
pub const FIRST_BACKOFF: SignedDuration = SignedDuration::from_mins(10);

/// What the node knows about a version that failed (install error, health checks, boot loop).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The version.
    pub version: Version,
    /// How many times it failed.
    pub count: u32,
    /// When it last failed.
    pub last: Timestamp,
    /// Why, the last time.
    pub reason: String,
}

impl Failure {
    /// When it may be tried again with the default backoff, or `None` if it is skipped for good.
    pub fn retry_at(&self) -> Option<Timestamp> {
        self.retry_after(FIRST_BACKOFF)
    }

    /// When it may be tried again, `backoff` after the first failure and twice as long after
    /// each further one, or `None` if it is skipped for good.
    pub fn retry_after(&self, backoff: SignedDuration) -> Option<Timestamp> {
        if self.count >= MAX_FAILURES {
            return None;
        }
        let factor = 1i32 << self.count.saturating_sub(1).min(20);
        let wait = backoff.checked_mul(factor).unwrap_or(SignedDuration::MAX);
        Some(self.last.saturating_add(wait).unwrap_or(Timestamp::MAX))
    }
}

/// The node's situation.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// The accepted channel index.
    pub index: &'a ChannelIndex,
    /// The node's architecture.
    pub arch: &'a str,
    /// The version that runs now, if known.
    pub current: Option<&'a Version>,
    /// Wait before a failed version is tried again (doubling after each failure).
    pub retry_backoff: SignedDuration,
    /// A version the operator pinned.
    pub pinned: Option<&'a Version>,
    /// Versions that failed here.
    pub failures: &'a [Failure],
    /// A stable machine id (for example /etc/machine-id).
    pub machine_id: &'a str,
    /// The time of the decision.
    pub now: Timestamp,
    /// What an operator asked for just now, if anything.
    pub requested: Option<&'a Wanted>,
}

/// What an operator asks to be installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Wanted {
    /// The newest release the channel offers (after the pin and the skipped versions).
    Latest,
    /// Exactly this version, even an older one.
    Version(Version),
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Install this release now.
    Update(Release),
    /// Nothing newer (or the pinned version already runs).
    UpToDate,
    /// A release is there, but not for this node yet.
    Wait {
        /// The release.
        version: Version,
        /// When to look again.
        until: Timestamp,
        /// Why, for the operator.
        reason: String,
    },
    /// Nothing to install, and something the operator should know.
    Blocked {
        /// What is wrong.
        reason: String,
    },
}

/// This machine's place in `[0, 100)` for `version`'s rollout.
pub fn rollout_position(machine_id: &str, version: &Version) -> f64 {
    let d = sha2::Sha256::digest(format!("acl-rollout-v1\0{machine_id}\0{version}").as_bytes());
    let x = u64::from_be_bytes(d[..8].try_into().expect("8 bytes"));
    (x >> 11) as f64 / (1u64 << 53) as f64 * 100.0
}

/// The percentage of machines a release's waves allow at `now`, and when the next wave starts.
pub fn allowed_percent(waves: &[Wave], now: Timestamp) -> (u8, Option<Timestamp>) {
    let current = waves.iter().filter(|w| w.start <= now).map(|w| w.percent).max().unwrap_or(0);
    let next = waves.iter().filter(|w| w.start > now).map(|w| w.start).min();
    (current, next)
}

/// The decision for `i` (see the crate docs for the rules).
pub fn decide(i: &Inputs<'_>) -> Decision {
    let failure_of = |v: &Version| i.failures.iter().find(|f| &f.version == v);
    if let Some(Wanted::Version(v)) = i.requested {
        return match i.index.releases.iter().find(|r| &r.version == v && r.arch == i.arch) {
            _ if i.current == Some(v) => Decision::UpToDate,
            Some(r) => Decision::Update(r.clone()),
            None => Decision::Blocked {
                reason: format!(
                    "requested version {v} is not in channel {:?} for {}",
                    i.index.channel, i.arch
                ),
            },
        };
    }
    let asked = i.requested.is_some();
    let candidates: Vec<&Release> = match i.pinned {
        Some(p) => match i.index.releases.iter().find(|r| &r.version == p && r.arch == i.arch) {
            Some(r) => vec![r],
            None if i.current == Some(p) => return Decision::UpToDate,
            None => {
                return Decision::Blocked {
                    reason: format!(
                        "pinned version {p} is not in channel {:?} for {}",
                        i.index.channel, i.arch
                    ),
                };
            }
        },
        None => {
            let mut v: Vec<&Release> = i
                .index
                .releases
                .iter()
                .filter(|r| r.arch == i.arch && i.current.is_none_or(|c| r.version > *c))
                .collect();
            v.sort_by(|a, b| b.version.cmp(&a.version));
            v
        }
    };
    let mut skipped = Vec::new();
    for r in candidates {
        if i.current == Some(&r.version) {
            return Decision::UpToDate;
        }
        if let Some(f) = failure_of(&r.version) {
            match f.retry_after(i.retry_backoff) {
                None => {
                    skipped.push(format!("{} (failed {} times: {})", r.version, f.count, f.reason));
                    continue;
                }
                Some(at) if at > i.now && !asked => {
                    return Decision::Wait {
                        version: r.version.clone(),
                        until: at,
                        reason: format!(
                            "{} failed {} time(s) ({}); next try after backoff",
                            r.version, f.count, f.reason
                        ),
                    };
                }
                Some(_) => {}
            }
        }
        let place = rollout_position(i.machine_id, &r.version);
        let (percent, next) = allowed_percent(&r.waves, i.now);
        if place >= f64::from(percent) && !asked {
            return match next {
                Some(until) => Decision::Wait {
                    version: r.version.clone(),
                    until,
                    reason: format!(
                        "rollout at {percent}%, this machine is at {place:.1}%; next wave at {until}"
                    ),
                },
                None => Decision::Blocked {
                    reason: format!(
                        "rollout of {} stops at {percent}%, this machine is at {place:.1}%",
                        r.version
                    ),
                },
            };
        }
        return Decision::Update(r.clone());
    }
    if skipped.is_empty() {
        Decision::UpToDate
    } else {
        Decision::Blocked { reason: format!("skipped: {}", skipped.join("; ")) }
    }
}

#[cfg(test)]
mod tests;
