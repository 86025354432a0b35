//! The agent's Kubernetes side as pure functions, as [`crate::machine::step`] is for the
//! daemon: given the Node's annotations, the daemon's [`Snapshot`] and what this task
//! remembers, what to do. No I/O and no clock, so every combination can be tested; the
//! controller in the parent module only carries the answers out.
//!
//! | input | gives |
//! |---|---|
//! | `paused` differs from the daemon's | [`Action::Tell`] pause or resume |
//! | `update` or `rollback` present | [`Action::Take`]: remove them first, conditioned on the version read; act only on what the removal stored ([`commands`]) |
//! | a removal whose answer was lost | [`Action::Reread`]: the Node says whether it was stored ([`stored`]) |
//! | staged, reboot wanted, `reboot-allowed` = the staged version, with `lock` (or `reboot=allowed`) | [`Action::Reboot`] |
//! | always | the status annotations ([`status`]) |
//!
//! A one-shot request is acted on at most once: only after its removal is stored. The patch
//! that removes it also writes a marker into `request-result` naming the Node version it was
//! conditioned on; when the answer to that patch is lost (a reset connection), a fresh read
//! shows whether the marker (so the removal) was stored: then the request is acted on, once;
//! otherwise it is taken again, or was withdrawn by someone else meanwhile.

use crate::daemon::Snapshot;
use crate::machine::{Outcome, Phase, Request};
use cluster::annotations::{self as ann, RebootRequest, Requests};
use cluster::events::Type;
use std::collections::BTreeMap;

/// What the task remembers between passes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Memory {
    /// The latest failure reported (a Warning), for `last-error`.
    pub last_error: Option<String>,
    /// The answer to the latest one-shot request, for `request-result`.
    pub request_result: Option<String>,
    /// A removal sent whose answer never came.
    pub pending: Option<Pending>,
}

/// A removal of one-shot requests whose answer was lost.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    /// What the removal wrote into `request-result`.
    pub marker: String,
    /// The requests as read when they were removed.
    pub requests: Requests,
    /// The keys removed.
    pub keys: Vec<&'static str>,
    /// The Node version the removal was conditioned on.
    pub resource_version: String,
}

impl Eq for Pending {}

/// Something to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Pass the operator's pause or resume to the daemon.
    Tell(Request),
    /// Read the Node afresh: a removal's answer was lost.
    Reread,
    /// Remove these one-shot requests (with [`marker`]); act on them once that is stored.
    Take(Vec<&'static str>),
    /// The coordinator allowed a reboot into `version`: say so, then let the daemon reboot.
    Reboot {
        /// The staged version.
        version: String,
        /// How it is allowed, in words.
        how: String,
    },
}

/// What to do for this Node and daemon state, in order.
pub fn decide(annotations: &BTreeMap<String, String>, snap: &Snapshot, memory: &Memory) -> Vec<Action> {
    let r = ann::requests(annotations);
    let mut actions = Vec::new();
    if let Some(Ok(p)) = r.paused
        && p != snap.state.paused
    {
        actions.push(Action::Tell(if p { Request::Pause } else { Request::Resume }));
    }
    if memory.pending.is_some() {
        actions.push(Action::Reread);
    } else {
        let keys = one_shot_keys(&r);
        if !keys.is_empty() {
            actions.push(Action::Take(keys));
        }
    }
    if let Some((version, how)) = reboot_permit(annotations, snap) {
        actions.push(Action::Reboot { version, how });
    }
    actions
}

/// The one-shot requests present.
pub fn one_shot_keys(r: &Requests) -> Vec<&'static str> {
    let mut keys = Vec::new();
    if r.update.is_some() {
        keys.push(ann::UPDATE);
    }
    if r.rollback.is_some() {
        keys.push(ann::ROLLBACK);
    }
    keys
}

/// What the removal of `keys` writes into `request-result`: unique, since only one write
/// conditioned on `resource_version` can be stored.
pub fn marker(keys: &[&str], resource_version: &str) -> String {
    format!("taking {} (node version {resource_version})", keys.join(" and "))
}

/// Whether the Node shows that `pending`'s removal was stored.
pub fn stored(pending: &Pending, annotations: &BTreeMap<String, String>) -> bool {
    annotations.get(ann::REQUEST_RESULT) == Some(&pending.marker)
}

/// What a fresh read of the Node says about a removal whose answer was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Its marker is there: it was stored; act on its requests, once.
    Stored,
    /// The Node moved past the version it was conditioned on without it: it can never be
    /// stored now; take whatever is still there again.
    NotStored,
    /// The Node is still at that version: the removal may still be on its way (a reset
    /// connection does not mean the server dropped the request). Send the same removal again,
    /// conditioned on the same version: at most one of the two can be stored.
    Unknown,
}

/// Judges `pending` against a fresh read of the Node (`annotations` at `resource_version`).
pub fn resolution(
    pending: &Pending,
    annotations: &BTreeMap<String, String>,
    resource_version: &str,
) -> Resolution {
    if stored(pending, annotations) {
        Resolution::Stored
    } else if resource_version == pending.resource_version {
        Resolution::Unknown
    } else {
        Resolution::NotStored
    }
}

/// Whether `request-result` holds a removal's marker (left by an agent that stopped between a
/// removal and its report).
pub fn is_marker(text: &str) -> bool {
    text.starts_with("taking ") && text.ends_with(')') && text.contains("(node version ")
}

/// The reboot the coordinator allowed: the staged version, wanted, `reboot-allowed` naming
/// it, and the slot it was given with (`lock`) or the operator's `reboot=allowed`. A leftover
/// answer for another version, or for a request withdrawn meanwhile, allows nothing.
pub fn reboot_permit(annotations: &BTreeMap<String, String>, snap: &Snapshot) -> Option<(String, String)> {
    let Phase::Staged { version } = &snap.state.phase else { return None };
    if !snap.reboot_wanted {
        return None;
    }
    let target = version.to_string();
    let slot = annotations.contains_key(ann::LOCK) || ann::requests(annotations).reboot_without_lock;
    if annotations.get(ann::REBOOT_ALLOWED) != Some(&target) || !slot {
        return None;
    }
    let how = annotations
        .get(ann::LOCK)
        .map_or("without the lock (reboot=allowed)".into(), |l| format!("holding {l}"));
    Some((target, how))
}

/// What to do with one-shot requests whose removal is stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Ask the daemon; the result is `"{label}: {the daemon's note}"`.
    Ask {
        /// The request.
        request: Request,
        /// What it was, in words.
        label: String,
    },
    /// Refused here; the result is this.
    Refuse(String),
}

/// The commands for the requests `r` whose removal of `removed` is stored. An `update` to a
/// version older than the booted one needs `allow-downgrade=true` as well.
pub fn commands(r: &Requests, removed: &[&str], booted: Option<&str>) -> Vec<Command> {
    let mut out = Vec::new();
    if let (true, Some(u)) = (removed.contains(&ann::UPDATE), &r.update) {
        let booted = booted.and_then(|b| b.parse::<semver::Version>().ok());
        out.push(match u {
            Ok(Some(v)) if booted.as_ref().is_some_and(|b| v < b) && !r.allow_downgrade => {
                Command::Refuse(format!(
                    "update {v}: refused, older than the booted {}; a downgrade needs {}=true as well",
                    booted.as_ref().map_or(String::new(), ToString::to_string),
                    ann::ALLOW_DOWNGRADE
                ))
            }
            Ok(version) => Command::Ask {
                request: Request::Update { version: version.clone() },
                label: format!("update {}", version.as_ref().map_or("latest".into(), ToString::to_string)),
            },
            Err(e) => Command::Refuse(e.clone()),
        });
    }
    if let (true, Some(rb)) = (removed.contains(&ann::ROLLBACK), &r.rollback) {
        out.push(match rb {
            Ok(now) => Command::Ask { request: Request::Rollback { now: *now }, label: "rollback".into() },
            Err(e) => Command::Refuse(e.clone()),
        });
    }
    out
}

/// Whether to write the status now: not while a removal's answer is lost (the status patch
/// would write over, or remove, the marker that tells whether it was stored).
pub fn writes_status(memory: &Memory) -> bool {
    memory.pending.is_none()
}

/// What `reboot-request` says.
pub fn reboot_request(snap: &Snapshot) -> Option<RebootRequest> {
    match &snap.state.phase {
        Phase::Staged { .. } if snap.reboot_wanted => Some(RebootRequest::Wanted),
        Phase::Rebooting { .. } | Phase::Verifying { .. } => Some(RebootRequest::Holding),
        _ => None,
    }
}

/// The status annotations the Node should carry (the agent's keys not named here are
/// removed). While a removal's answer is lost, [`writes_status`] is false: `request-result`
/// may hold the marker that tells whether the removal was stored.
pub fn status(snap: &Snapshot, memory: &Memory) -> BTreeMap<&'static str, String> {
    let s = snap;
    let mut want = BTreeMap::new();
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
    if let Some(e) = memory.last_error.clone().or(latest_failure) {
        want.insert(ann::LAST_ERROR, e);
    }
    if let Some(r) = &memory.request_result {
        want.insert(ann::REQUEST_RESULT, r.clone());
    }
    if let Some(r) = reboot_request(s) {
        want.insert(ann::REBOOT_REQUEST, r.as_str().to_owned());
    }
    want
}

/// The Event for a daemon transition `from -> to` with `outcome`: its type and reason, or
/// none (the reboot is announced before it is allowed).
pub fn event(from: &str, to: &str, outcome: &Outcome) -> Option<(Type, &'static str)> {
    Some(match (outcome, from, to) {
        (Outcome::Failed { .. }, _, _) => (Type::Warning, "UpdateFailed"),
        (Outcome::Stuck, _, _) => (Type::Warning, "RollbackBlocked"),
        (Outcome::CheckFailed, _, _) => (Type::Warning, "CheckFailed"),
        (Outcome::Progress, _, "rebooting") => return None,
        (Outcome::Progress, _, "installing") => (Type::Normal, "UpdateInstalling"),
        (Outcome::Progress, _, "staged") => (Type::Normal, "UpdateStaged"),
        (Outcome::Progress, _, "verifying") => (Type::Normal, "VerifyingBoot"),
        (Outcome::Progress, "verifying", "idle") => (Type::Normal, "UpdateSucceeded"),
        (Outcome::Progress, _, _) => (Type::Normal, "Status"),
    })
}

#[cfg(test)]
mod tests;
