//! The agent's state machine: a documented enum and one total `step` function.
//!
//! `step(state, event) -> (state, actions)` does no I/O and reads no clock: events carry the
//! time and the results of I/O, actions ask for I/O. The daemon persists the new state
//! (crash-safely) *before* it carries out the actions, so a kill -9 at any point leaves a state
//! from which [`Event::Started`] resumes correctly: an interrupted install is resumed (its
//! journal knows the chunks), a requested reboot is judged by which slot actually booted, an
//! interrupted health check starts again within its deadline.
//!
//! | phase | on | goes to | actions |
//! |---|---|---|---|
//! | Idle | Tick, check due, not paused, mode not off | Idle | Check |
//! | Idle | Operator Update w, not paused | Idle | Check w (the policy honours w) |
//! | Idle | Checked(Update r), mode automatic or asked by the operator | Installing r | Install r |
//! | Idle | Checked(Wait/UpToDate/Blocked) | Idle (note kept) | - |
//! | Installing v | Installed ok | Staged v | RequestReboot |
//! | Installing v | Installed err | Idle | (failure of v recorded) |
//! | Staged v | RebootAllowed (or Operator AllowReboot naming v), not paused | Rebooting v | Reboot |
//! | Rebooting v | Started, v booted unconfirmed | Verifying v until deadline | RunHealth |
//! | Rebooting v | Started, v did not boot | Idle | (v skipped: its tries ran out) |
//! | Rebooting v | Started, old slot runs, v still boots next | Staged v | RequestReboot |
//! | Verifying v | Health passed | Idle | MarkGood |
//! | Verifying v | Health failed / deadline | Idle | MarkBadAndReboot (failure recorded) |
//! | any | MarkBadFailed (mark-bad refused or failed) | same phase, note says why | - (no reboot) |
//! | any | Started, booted slot unconfirmed | Verifying | RunHealth |
//! | Installing v | Started (after a crash) | Installing v | Install v (resumes) |
//! | Idle | Operator Rollback (now) | Idle | Rollback (and reboot when now) |
//! | Staged v | Operator Rollback | Idle | Unstage (v no longer boots next) |
//! | any | RolledBack from v (the rollback was written) | same phase, v skipped until asked for by version | - |
//!
//! Invalid events in a phase are ignored with a note (`Action::Log`), never a panic: a daemon
//! must not die of a late or duplicated event.
//!
//! `MarkBadAndReboot` reboots only when the slot was marked bad. When marking it bad is refused
//! (the other slot is not bootable, e.g. on a freshly provisioned disk) or fails (the disk), a
//! reboot would only spend the running slot's tries until nothing boots (issue 12): the daemon
//! stays on the running slot and reports [`Event::MarkBadFailed`], whose note (in the history)
//! says why.

use jiff::{SignedDuration, Timestamp};
use policy::{Decision, Failure, Wanted};
use semver::Version;
use slot::choice::Slot;

/// The local API's types, defined with it in crate `localapi` (so that `aclctl` does not link
/// what the agent links) and used by the machine as they are.
pub use localapi::{Phase, Request, State};

/// What the running system looks like at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boot {
    /// The version of the booted slot, if known.
    pub version: Option<Version>,
    /// Whether the booted slot is confirmed good.
    pub confirmed: bool,
    /// Whether the other slot is set to boot next (then a reboot asked for has not happened).
    pub other_boots_next: bool,
}

/// Something that happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The agent (re)started.
    Started {
        /// The booted system.
        boot: Boot,
        /// The time.
        now: Timestamp,
    },
    /// Time passed.
    Tick {
        /// The time.
        now: Timestamp,
    },
    /// A repository check finished.
    Checked {
        /// The policy's decision.
        decision: Result<Decision, String>,
        /// What the operator asked for, when the check was theirs.
        requested: Option<Wanted>,
        /// The time.
        now: Timestamp,
    },
    /// An install finished.
    Installed {
        /// Ok, or why not.
        result: Result<(), String>,
        /// The time.
        now: Timestamp,
    },
    /// A reboot is now allowed (window open, lock held, operator allowed it).
    RebootAllowed,
    /// The health checks finished.
    Health {
        /// Passed, or the failures.
        result: Result<(), String>,
        /// The time.
        now: Timestamp,
    },
    /// Marking the booted slot bad was refused or failed, so the daemon did not reboot.
    MarkBadFailed {
        /// The running slot, which stays.
        slot: Slot,
        /// Why, in words (the disk error or the refused transition).
        reason: String,
    },
    /// The operator's rollback was written: the other slot boots next.
    RolledBack {
        /// The version rolled back from (the booted one), if known.
        from: Option<Version>,
        /// The time.
        now: Timestamp,
    },
    /// An operator asked for something.
    Operator(Request),
}

/// Something the daemon must do, after persisting the new state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Check the repository and decide (policy), for the operator's request if any.
    Check(Option<Wanted>),
    /// Install this version into the other slot: the release whose manifest has this digest,
    /// when known.
    Install(Version, Option<manifest::Sha256Digest>),
    /// Ask for permission to reboot (window, lock, operator); answered by `RebootAllowed`.
    RequestReboot,
    /// Reboot now.
    Reboot,
    /// Run the health checks.
    RunHealth,
    /// Mark the booted slot good.
    MarkGood,
    /// Mark the booted slot bad and reboot into the other one; only when the mark is written.
    /// Otherwise the daemon reboots nothing and answers [`Event::MarkBadFailed`].
    MarkBadAndReboot,
    /// Make the other slot boot next (operator rollback), and reboot if `reboot` and that
    /// worked.
    Rollback {
        /// Reboot into it at once.
        reboot: bool,
    },
    /// Make the staged slot unbootable again (a staged update withdrawn).
    Unstage,
    /// Tell the operator (log and event history).
    Log(String),
}

/// Settings the machine needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Time between repository checks.
    pub check_interval: SignedDuration,
    /// Time a new slot has to pass its health checks.
    pub health_deadline: SignedDuration,
    /// Whether to check the repository at all (mode is not "off").
    pub checks: bool,
    /// Whether to install what a check finds (mode "automatic").
    pub installs: bool,
    /// Paused by the configuration (`updates.paused`), besides the operator's pause.
    pub paused: bool,
}

/// What a step meant, typed, for whoever reports it (Kubernetes mode turns it into an Event's
/// type and reason; nothing matches note text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A failure of this version was recorded: its install failed, its health checks failed or
    /// ran out of time, or it did not boot.
    Failed {
        /// The version that failed.
        version: Version,
        /// Why, as recorded.
        reason: String,
    },
    /// The step needed something the daemon could not do (the bad slot could not be marked
    /// bad): nothing rebooted, the running slot stays.
    Stuck,
    /// A repository check failed (nothing changed; the next check may pass).
    CheckFailed,
    /// Anything else: progress, an operator's request, a decision.
    Progress,
}

/// The [`Outcome`] of the step `before --event--> after`.
pub fn outcome(before: &State, event: &Event, after: &State) -> Outcome {
    match event {
        Event::MarkBadFailed { .. } => return Outcome::Stuck,
        Event::Checked { decision: Err(_), .. } => return Outcome::CheckFailed,
        // The operator's rollback records the version it left, but nothing failed.
        Event::RolledBack { .. } | Event::Operator(_) => return Outcome::Progress,
        _ => {}
    }
    let recorded = after.failures.iter().find(|f| {
        before
            .failures
            .iter()
            .find(|b| b.version == f.version)
            .is_none_or(|b| (b.count, b.last) != (f.count, f.last))
    });
    match recorded {
        Some(f) => Outcome::Failed { version: f.version.clone(), reason: f.reason.clone() },
        None => Outcome::Progress,
    }
}

fn fail(state: &mut State, version: &Version, reason: &str, now: Timestamp) {
    match state.failures.iter_mut().find(|f| &f.version == version) {
        Some(f) => {
            f.count += 1;
            f.last = now;
            f.reason = reason.to_owned();
        }
        None => state.failures.push(Failure {
            version: version.clone(),
            count: 1,
            last: now,
            reason: reason.to_owned(),
        }),
    }
}

/// The transition function (see the module docs for the table).
pub fn step(state: &State, event: &Event, cfg: &Config) -> (State, Vec<Action>) {
    let event = match (event, &state.phase) {
        (Event::Operator(Request::AllowReboot { version: allowed }), Phase::Staged { version })
            if allowed == version =>
        {
            &Event::RebootAllowed
        }
        (Event::Operator(Request::AllowReboot { version }), _) => {
            let note = format!("ignored a reboot permit for {version} in phase {:?}", state.phase);
            return (state.clone(), vec![Action::Log(note)]);
        }
        (e, _) => e,
    };
    let mut s = state.clone();
    let mut actions = Vec::new();
    let ignored = |what: &str| vec![Action::Log(format!("ignored {what} in phase {:?}", state.phase))];
    match (event, &state.phase) {
        (Event::Started { boot, now }, phase) => {
            let unconfirmed_version = (!boot.confirmed).then(|| boot.version.clone()).flatten();
            match (phase, unconfirmed_version) {
                (Phase::Rebooting { version }, Some(booted)) if &booted == version => {
                    s.note = format!("{booted} booted; checking its health");
                    s.phase = Phase::Verifying {
                        version: booted,
                        deadline: now.saturating_add(cfg.health_deadline).unwrap_or(*now),
                    };
                    actions.push(Action::RunHealth);
                }
                (Phase::Verifying { version, deadline }, Some(booted)) if &booted == version => {
                    if now >= deadline {
                        fail(&mut s, version, "health checks did not pass before the deadline", *now);
                        s.phase = Phase::Idle;
                        s.note = format!("{version}: health deadline passed; rolling back");
                        actions.push(Action::MarkBadAndReboot);
                    } else {
                        actions.push(Action::RunHealth);
                    }
                }
                (_, Some(booted)) => {
                    // An unconfirmed slot runs that we did not expect (state lost, a provisioned
                    // disk, or an operator activated it): it still has to prove itself.
                    s.note = format!("{booted} runs unconfirmed; checking its health");
                    s.phase = Phase::Verifying {
                        version: booted,
                        deadline: now.saturating_add(cfg.health_deadline).unwrap_or(*now),
                    };
                    actions.push(Action::RunHealth);
                }
                (Phase::Rebooting { version }, None) if boot.other_boots_next => {
                    // Killed between deciding to reboot and rebooting: the new slot is still the
                    // one to boot next, untried. Ask again.
                    s.phase = Phase::Staged { version: version.clone() };
                    s.note = format!("the reboot into {version} did not happen; asking again");
                    actions.push(Action::RequestReboot);
                }
                (Phase::Rebooting { version }, None) => {
                    // The new slot did not come up (kernel panic, tries ran out) or was rolled
                    // back to: the confirmed one runs.
                    if boot.version.as_ref() != Some(version) {
                        // The boot path spent all its tries: a deterministic failure (a kernel or
                        // init that dies), so the version is skipped at once, not retried.
                        fail(&mut s, version, "did not boot (the boot path fell back)", *now);
                        if let Some(f) = s.failures.iter_mut().find(|f| &f.version == version) {
                            f.count = f.count.max(policy::MAX_FAILURES);
                        }
                        s.note = format!(
                            "{version} did not boot; running {}; {version} is skipped",
                            boot.version.as_ref().map_or("?".into(), |v| v.to_string())
                        );
                        actions.push(Action::Log(s.note.clone()));
                    }
                    s.phase = Phase::Idle;
                }
                (Phase::Installing { version, manifest }, None) => {
                    actions.push(Action::Install(version.clone(), *manifest));
                }
                (Phase::Staged { .. }, None) => actions.push(Action::RequestReboot),
                (Phase::Verifying { .. }, None) => s.phase = Phase::Idle,
                (Phase::Idle, None) => {}
            }
        }
        (Event::Tick { now }, Phase::Idle) => {
            let due = state
                .last_check
                .is_none_or(|t| t.saturating_add(cfg.check_interval).is_ok_and(|d| d <= *now));
            if due && !state.paused && !cfg.paused && cfg.checks && !state.checking {
                s.checking = true;
                actions.push(Action::Check(None));
            }
        }
        (Event::Tick { now }, Phase::Verifying { version, deadline }) if now >= deadline => {
            fail(&mut s, version, "health checks did not pass before the deadline", *now);
            s.phase = Phase::Idle;
            s.note = format!("{version}: health deadline passed; rolling back");
            actions.push(Action::MarkBadAndReboot);
        }
        (Event::Tick { .. }, _) => {}
        (Event::Checked { now, .. }, phase) if !matches!(phase, Phase::Idle) => {
            // A late answer: the agent moved on (an operator request, a restart).
            s.checking = false;
            s.last_check = Some(*now);
        }
        (Event::Checked { decision, now, requested }, Phase::Idle) => {
            s.checking = false;
            s.last_check = Some(*now);
            let paused = state.paused || cfg.paused;
            match decision {
                Ok(Decision::Update(r)) if !paused && (cfg.installs || requested.is_some()) => {
                    s.phase =
                        Phase::Installing { version: r.version.clone(), manifest: Some(r.manifest_sha256) };
                    s.note = format!("installing {}", r.version);
                    actions.push(Action::Install(r.version.clone(), Some(r.manifest_sha256)));
                }
                Ok(Decision::Update(r)) if paused => s.note = format!("{} available; paused", r.version),
                Ok(Decision::Update(r)) => s.note = format!("{} available (check-only mode)", r.version),
                Ok(Decision::UpToDate) => s.note = "up to date".into(),
                Ok(Decision::Wait { reason, .. }) => s.note = reason.clone(),
                Ok(Decision::Blocked { reason }) => s.note = reason.clone(),
                Err(e) => s.note = format!("check failed: {e}"),
            }
        }
        (Event::Installed { result, now }, Phase::Installing { version, .. }) => match result {
            Ok(()) => {
                s.phase = Phase::Staged { version: version.clone() };
                // A pause that arrived during the install holds the reboot; say so.
                s.note = if state.paused || cfg.paused {
                    format!("{version} installed; paused: no reboot until resumed")
                } else {
                    format!("{version} installed; waiting to reboot")
                };
                actions.push(Action::RequestReboot);
            }
            Err(e) => {
                fail(&mut s, version, e, *now);
                s.phase = Phase::Idle;
                s.note = format!("install of {version} failed: {e}");
                actions.push(Action::Log(s.note.clone()));
            }
        },
        (Event::RebootAllowed, Phase::Staged { version }) if !state.paused && !cfg.paused => {
            s.phase = Phase::Rebooting { version: version.clone() };
            s.note = format!("rebooting into {version}");
            actions.push(Action::Reboot);
        }
        (Event::Health { result, now }, Phase::Verifying { version, .. }) => {
            s.phase = Phase::Idle;
            match result {
                Ok(()) => {
                    s.note = format!("{version} is healthy");
                    s.failures.retain(|f| &f.version != version);
                    actions.push(Action::MarkGood);
                }
                Err(why) => {
                    fail(&mut s, version, why, *now);
                    s.note = format!("{version} failed its health checks: {why}; rolling back");
                    actions.push(Action::MarkBadAndReboot);
                }
            }
        }
        (Event::Operator(Request::Status), _) => {}
        (Event::Operator(Request::Pause), _) => {
            s.paused = true;
            s.note = "paused by the operator".into();
        }
        (Event::Operator(Request::Resume), _) => {
            s.paused = false;
            s.note = "resumed".into();
        }
        (Event::Operator(Request::CheckNow), Phase::Idle) if !state.checking => {
            s.checking = true;
            actions.push(Action::Check(None));
        }
        (Event::Operator(Request::Update { .. }), _) if state.paused || cfg.paused => {
            s.note = "update not started: updates are paused (aclctl resume)".into();
        }
        (Event::Operator(Request::Update { .. }), _) if !cfg.checks => {
            s.note = "update not started: updates.mode is \"off\"".into();
        }
        (Event::Operator(Request::Update { version }), Phase::Idle) => {
            // A periodic check may be running too; both answers arrive, and this one carries
            // the request.
            s.checking = true;
            s.note = format!(
                "checking for {}",
                version.as_ref().map_or("the latest release".into(), |v| v.to_string())
            );
            actions.push(Action::Check(Some(version.clone().map_or(Wanted::Latest, Wanted::Version))));
        }
        (Event::Operator(Request::Update { .. }), phase) => {
            s.note = format!("update not started: busy ({})", phase.name());
        }
        (Event::Operator(Request::CheckNow), _) => {}
        (Event::Operator(Request::Rollback { now }), Phase::Idle) => {
            s.note = if *now {
                "rolled back by the operator; rebooting".into()
            } else {
                "rolled back by the operator; the other slot boots at the next reboot".into()
            };
            actions.push(Action::Rollback { reboot: *now });
        }
        (Event::Operator(Request::Rollback { .. }), Phase::Staged { version }) => {
            s.phase = Phase::Idle;
            s.note = format!("staged {version} withdrawn by the operator");
            actions.push(Action::Unstage);
        }
        (Event::RolledBack { from: Some(version), now }, _) => {
            // Rolled back from: not installed again by itself (the slot it came from is still
            // the newest release), only when asked for by version or when a newer one comes.
            fail(&mut s, version, "rolled back by the operator", *now);
            if let Some(f) = s.failures.iter_mut().find(|f| &f.version == version) {
                f.count = f.count.max(policy::MAX_FAILURES);
            }
            s.note = format!(
                "{}; {version} is not installed again unless asked for by version",
                s.note.trim_end_matches('.')
            );
            actions.push(Action::Log(s.note.clone()));
        }
        (Event::RolledBack { from: None, .. }, _) => {}
        (Event::MarkBadFailed { slot, reason }, _) => {
            s.note = format!(
                "not rolling back: could not mark slot {slot} bad ({reason}); not rebooting, slot {slot} keeps running"
            );
            actions.push(Action::Log(s.note.clone()));
        }
        (e, _) => actions = ignored(&format!("{e:?}")),
    }
    (s, actions)
}

#[cfg(test)]
mod tests;
