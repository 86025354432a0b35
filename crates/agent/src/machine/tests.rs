//! The state machine through whole update cycles, failures, restarts in every phase, and
//! operator requests.

use super::*;
use manifest::{Release, Sha256Digest, Wave};

fn t(min: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + min * 60).unwrap()
}

fn v(s: &str) -> Version {
    s.parse().unwrap()
}

fn cfg() -> Config {
    Config {
        check_interval: SignedDuration::from_hours(1),
        health_deadline: SignedDuration::from_mins(10),
        checks: true,
        installs: true,
        paused: false,
    }
}

fn release(version: &str) -> Release {
    Release {
        version: v(version),
        arch: "x86_64".into(),
        manifest: String::new(),
        manifest_sha256: Sha256Digest([0; 32]),
        waves: vec![Wave { start: t(0), percent: 100 }],
    }
}

/// Runs events in order from `s`, returning the final state and every action.
fn run(s: &State, events: &[Event]) -> (State, Vec<Action>) {
    let mut s = s.clone();
    let mut all = Vec::new();
    for e in events {
        let (n, a) = step(&s, e, &cfg());
        // What the daemon does: persist, then act. Round-trip through JSON as it would.
        s = serde_json::from_str(&serde_json::to_string(&n).unwrap()).unwrap();
        all.extend(a);
    }
    (s, all)
}

fn booted(version: &str, confirmed: bool, now: Timestamp) -> Event {
    Event::Started { boot: Boot { version: Some(v(version)), confirmed, other_boots_next: false }, now }
}

/// The events of a full, successful update from 1.0.0 to 2.0.0.
fn happy_path() -> Vec<Event> {
    vec![
        booted("1.0.0", true, t(0)),
        Event::Tick { now: t(1) },
        Event::Checked { decision: Ok(Decision::Update(release("2.0.0"))), requested: None, now: t(2) },
        Event::Installed { result: Ok(()), now: t(5) },
        Event::RebootAllowed,
        booted("2.0.0", false, t(7)),
        Event::Health { result: Ok(()), now: t(9) },
    ]
}

#[test]
fn a_full_update_cycle() {
    let (s, actions) = run(&State::default(), &happy_path());
    assert_eq!(s.phase, Phase::Idle);
    assert_eq!(
        actions,
        vec![
            Action::Check(None),
            Action::Install(v("2.0.0"), Some(Sha256Digest([0; 32]))),
            Action::RequestReboot,
            Action::Reboot,
            Action::RunHealth,
            Action::MarkGood
        ]
    );
    assert_eq!(s.note, "2.0.0 is healthy");
}

#[test]
fn killed_in_every_phase_the_restart_resumes() {
    // Stop after each prefix of the happy path; restart with what is actually booted then.
    let events = happy_path();
    for cut in 1..events.len() {
        let (s, _) = run(&State::default(), &events[..cut]);
        let boot = match &s.phase {
            Phase::Rebooting { .. } | Phase::Verifying { .. } => booted("2.0.0", false, t(8)),
            _ => booted("1.0.0", true, t(8)),
        };
        let (after, actions) = step(&s, &boot, &cfg());
        let expect = match &s.phase {
            Phase::Idle => vec![],
            // The restart installs exactly the manifest the check accepted.
            Phase::Installing { version, manifest } => {
                assert_eq!(*manifest, Some(Sha256Digest([0; 32])));
                vec![Action::Install(version.clone(), *manifest)]
            }
            Phase::Staged { .. } => vec![Action::RequestReboot],
            Phase::Rebooting { .. } | Phase::Verifying { .. } => vec![Action::RunHealth],
        };
        assert_eq!(actions, expect, "killed after {cut} events in {:?}", s.phase);
        if let Phase::Rebooting { .. } = s.phase {
            assert!(matches!(after.phase, Phase::Verifying { .. }));
        }
    }
}

#[test]
fn failed_health_rolls_back_and_records_why() {
    let mut events = happy_path();
    events[6] =
        Event::Health { result: Err("required check 50-kubelet failed (exit status 1)".into()), now: t(9) };
    let (s, actions) = run(&State::default(), &events);
    assert_eq!(actions.last(), Some(&Action::MarkBadAndReboot));
    assert_eq!(s.failures.len(), 1);
    assert_eq!(s.failures[0].count, 1);
    assert!(s.note.contains("50-kubelet failed"), "{}", s.note);
}

/// Issue 12: a mark-bad that did not happen leaves the phase alone, says why and asks for no
/// reboot.
#[test]
fn issue_12_a_failed_mark_bad_says_why_and_does_not_reboot() {
    let mut events = happy_path();
    events[6] = Event::Health { result: Err("required check failed".into()), now: t(9) };
    let (s, _) = run(&State::default(), &events);
    let reason = "slot B is not bootable: marking A bad would leave no slot to boot".to_owned();
    let (s2, a) = step(&s, &Event::MarkBadFailed { slot: Slot::A, reason: reason.clone() }, &cfg());
    assert_eq!(s2.phase, s.phase);
    assert_eq!(s2.failures, s.failures, "the health failure stays recorded");
    assert!(s2.note.contains(&reason) && s2.note.contains("not rebooting"), "{}", s2.note);
    assert_eq!(a, vec![Action::Log(s2.note.clone())]);
    assert!(!a.iter().any(|a| matches!(a, Action::Reboot | Action::MarkBadAndReboot)));
}

#[test]
fn health_deadline_rolls_back() {
    let events = &happy_path()[..6];
    let (s, _) = run(&State::default(), events);
    assert!(matches!(s.phase, Phase::Verifying { .. }));
    let (s2, a) = step(&s, &Event::Tick { now: t(16) }, &cfg());
    assert!(a.is_empty(), "before the deadline nothing happens");
    assert_eq!(s2, s);
    let (s3, a) = step(&s, &Event::Tick { now: t(17) }, &cfg());
    assert_eq!(a, vec![Action::MarkBadAndReboot]);
    assert_eq!(s3.phase, Phase::Idle);
    // Restarting after the deadline has the same effect.
    let (_, a) = step(&s, &booted("2.0.0", false, t(30)), &cfg());
    assert_eq!(a, vec![Action::MarkBadAndReboot]);
}

#[test]
fn a_slot_that_never_boots_is_recorded_as_failed() {
    let events = &happy_path()[..5];
    let (s, _) = run(&State::default(), events);
    assert!(matches!(s.phase, Phase::Rebooting { .. }));
    // The kernel panicked until tries ran out; 1.0.0 came back.
    let (s, a) = step(&s, &booted("1.0.0", true, t(20)), &cfg());
    assert_eq!(s.phase, Phase::Idle);
    assert!(matches!(&a[..], [Action::Log(m)] if m.contains("2.0.0 did not boot")), "{a:?}");
    assert_eq!(s.failures[0].reason, "did not boot (the boot path fell back)");
    // Skipped at once: a slot that spent all its tries is not retried after a backoff.
    assert_eq!(s.failures[0].count, policy::MAX_FAILURES);
    assert_eq!(s.failures[0].retry_at(), None);
}

#[test]
fn a_failed_install_is_recorded_and_the_agent_returns_to_idle() {
    let (s, _) = run(&State::default(), &happy_path()[..3]);
    let (s, a) = step(&s, &Event::Installed { result: Err("HTTP 404".into()), now: t(4) }, &cfg());
    assert_eq!(s.phase, Phase::Idle);
    assert_eq!(s.failures[0].reason, "HTTP 404");
    assert!(matches!(&a[..], [Action::Log(_)]));
}

#[test]
fn checks_follow_the_interval_and_pause() {
    let up_to_date = |now| Event::Checked { decision: Ok(Decision::UpToDate), requested: None, now };
    let s = State::default();
    let (s, a) = step(&s, &Event::Tick { now: t(0) }, &cfg());
    assert_eq!(a, vec![Action::Check(None)]);
    let (s, a) = step(&s, &Event::Tick { now: t(0) }, &cfg());
    assert!(a.is_empty(), "no second check while one runs");
    let (s, _) = step(&s, &up_to_date(t(0)), &cfg());
    let (s, a) = step(&s, &Event::Tick { now: t(59) }, &cfg());
    assert!(a.is_empty(), "no check before the interval");
    let (s, a) = step(&s, &Event::Tick { now: t(60) }, &cfg());
    assert_eq!(a, vec![Action::Check(None)]);
    let (s, _) = step(&s, &up_to_date(t(60)), &cfg());
    let (s, _) = step(&s, &Event::Operator(Request::Pause), &cfg());
    let (s, a) = step(&s, &Event::Tick { now: t(200) }, &cfg());
    assert!(a.is_empty(), "paused");
    let (s, a) = step(
        &s,
        &Event::Checked { decision: Ok(Decision::Update(release("3.0.0"))), requested: None, now: t(201) },
        &cfg(),
    );
    assert!(a.is_empty() && s.phase == Phase::Idle && s.note.contains("paused"));
    let (s, _) = step(&s, &Event::Operator(Request::Resume), &cfg());
    let (_, a) = step(&s, &Event::Tick { now: t(400) }, &cfg());
    assert_eq!(a, vec![Action::Check(None)]);
}

#[test]
fn a_check_cut_short_by_a_crash_is_redone_at_once() {
    let (s, a) = step(&State::default(), &Event::Tick { now: t(0) }, &cfg());
    assert_eq!(a, vec![Action::Check(None)]);
    // The agent dies before the answer; what was persisted comes back.
    let back: State = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    let (_, a) = step(&back, &Event::Tick { now: t(1) }, &cfg());
    assert_eq!(a, vec![Action::Check(None)], "a lost check must not wait a whole interval");
}

#[test]
fn operator_rollback_and_withdrawal() {
    let (idle, _) = run(&State::default(), &happy_path());
    let (_, a) = step(&idle, &Event::Operator(Request::Rollback { now: true }), &cfg());
    assert_eq!(a, vec![Action::Rollback { reboot: true }]);
    let (_, a) = step(&idle, &Event::Operator(Request::Rollback { now: false }), &cfg());
    assert_eq!(a, vec![Action::Rollback { reboot: false }]);
    let (staged, _) = run(&State::default(), &happy_path()[..4]);
    let (s, a) = step(&staged, &Event::Operator(Request::Rollback { now: true }), &cfg());
    assert_eq!(a, vec![Action::Unstage]);
    assert_eq!(s.phase, Phase::Idle);
}

#[test]
fn late_or_duplicate_events_are_ignored_not_fatal() {
    let s = State::default();
    for e in [
        Event::Installed { result: Ok(()), now: t(1) },
        Event::RebootAllowed,
        Event::Health { result: Ok(()), now: t(1) },
    ] {
        let (n, a) = step(&s, &e, &cfg());
        assert_eq!(n, s);
        assert!(matches!(&a[..], [Action::Log(m)] if m.starts_with("ignored")), "{a:?}");
    }
}

#[test]
fn state_survives_the_file() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(crate::persist::load(dir.path()).unwrap(), State::default());
    let (s, _) = run(&State::default(), &happy_path()[..4]);
    crate::persist::save(dir.path(), &s).unwrap();
    assert_eq!(crate::persist::load(dir.path()).unwrap(), s);
    std::fs::write(dir.path().join(crate::persist::STATE_FILE), b"{not json").unwrap();
    let e = crate::persist::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("agent-state.json"), "{e}");
}

#[test]
fn modes_off_and_check_only() {
    let off = Config { checks: false, installs: false, ..cfg() };
    let (_, a) = step(&State::default(), &Event::Tick { now: t(0) }, &off);
    assert!(a.is_empty(), "mode off: no check");
    let check_only = Config { installs: false, ..cfg() };
    let (s, a) = step(&State::default(), &Event::Tick { now: t(0) }, &check_only);
    assert_eq!(a, vec![Action::Check(None)]);
    let (s, a) = step(
        &s,
        &Event::Checked { decision: Ok(Decision::Update(release("2.0.0"))), requested: None, now: t(1) },
        &check_only,
    );
    assert!(a.is_empty() && s.phase == Phase::Idle && s.note == "2.0.0 available (check-only mode)", "{s:?}");
    // Health checks after a boot run whatever the mode: an unconfirmed slot must prove itself.
    let (_, a) = step(&State::default(), &booted("2.0.0", false, t(2)), &off);
    assert_eq!(a, vec![Action::RunHealth]);
}

#[test]
fn killed_before_the_reboot_happened_asks_again() {
    let (s, _) = run(&State::default(), &happy_path()[..5]);
    assert!(matches!(s.phase, Phase::Rebooting { .. }));
    let same_boot = Event::Started {
        boot: Boot { version: Some(v("1.0.0")), confirmed: true, other_boots_next: true },
        now: t(6),
    };
    let (s, a) = step(&s, &same_boot, &cfg());
    assert_eq!(a, vec![Action::RequestReboot]);
    assert_eq!(s.phase, Phase::Staged { version: v("2.0.0") });
    assert!(s.failures.is_empty(), "not a failure of 2.0.0");
}

#[test]
fn an_operator_update_installs_even_in_check_only_mode_but_not_while_paused() {
    let check_only = Config { installs: false, ..cfg() };
    let ask = Event::Operator(Request::Update { version: Some(v("2.0.0")) });
    let (s, a) = step(&State::default(), &ask, &check_only);
    assert_eq!(a, vec![Action::Check(Some(Wanted::Version(v("2.0.0"))))]);
    assert!(s.checking);
    let answer =
        |requested| Event::Checked { decision: Ok(Decision::Update(release("2.0.0"))), requested, now: t(1) };
    let (s2, a) = step(&s, &answer(Some(Wanted::Version(v("2.0.0")))), &check_only);
    assert_eq!(a, vec![Action::Install(v("2.0.0"), Some(Sha256Digest([0; 32])))]);
    assert_eq!(s2.phase, Phase::Installing { version: v("2.0.0"), manifest: Some(Sha256Digest([0; 32])) });
    // The periodic check's answer alone would not install in check-only mode.
    let (s3, a) = step(&s, &answer(None), &check_only);
    assert!(a.is_empty() && s3.phase == Phase::Idle);
    // Paused (by the operator or the configuration): refused with a note saying why.
    let paused = State { paused: true, ..State::default() };
    let (s, a) = step(&paused, &ask, &cfg());
    assert!(a.is_empty() && s.note.contains("paused"), "{s:?}");
    let (s, a) = step(&State::default(), &ask, &Config { paused: true, ..cfg() });
    assert!(a.is_empty() && s.note.contains("paused"), "{s:?}");
    let (_, a) = step(&State::default(), &Event::Tick { now: t(0) }, &Config { paused: true, ..cfg() });
    assert!(a.is_empty(), "configured pause: no periodic check");
    // Busy: said so.
    let installing =
        State { phase: Phase::Installing { version: v("3.0.0"), manifest: None }, ..State::default() };
    let (s, a) = step(&installing, &ask, &cfg());
    assert!(a.is_empty() && s.note == "update not started: busy (installing)", "{s:?}");
}

/// Found by the e2e run on the systemd node: after `aclctl rollback --now` from 5.0.0 to 2.0.0
/// the agent on 2.0.0 found 5.0.0, still the newest release, installed it and rebooted into it
/// within seconds. The version rolled back from is skipped until asked for by version.
#[test]
fn an_operator_rollback_sticks() {
    let (s, _) = run(&State::default(), &happy_path());
    let (s, a) = step(&s, &Event::Operator(Request::Rollback { now: true }), &cfg());
    assert_eq!(a, vec![Action::Rollback { reboot: true }]);
    let (s, a) = step(&s, &Event::RolledBack { from: Some(v("2.0.0")), now: t(30) }, &cfg());
    assert!(matches!(&a[..], [Action::Log(m)] if m.contains("2.0.0 is not installed again")), "{a:?}");
    assert_eq!(s.failures[0].version, v("2.0.0"));
    assert_eq!(s.failures[0].retry_at(), None);
    // Skipped for good, as a version that did not boot (the policy's tests show such a
    // version passed by and a newer one taken); it survives the reboot into 1.0.0.
    assert_eq!(s.failures[0].count, policy::MAX_FAILURES);
    let (s, _) = run(&s, &[booted("1.0.0", true, t(32))]);
    assert_eq!(s.failures[0].reason, "rolled back by the operator");
}

/// A state file written before the manifest digest was recorded still loads (the install then
/// takes the accepted index's manifest); one written now carries the digest.
#[test]
fn the_installing_phase_carries_the_checked_manifest() {
    let old: Phase = serde_json::from_str(r#"{"phase":"installing","version":"2.0.0"}"#).unwrap();
    assert_eq!(old, Phase::Installing { version: v("2.0.0"), manifest: None });
    let now = Phase::Installing { version: v("2.0.0"), manifest: Some(Sha256Digest([7; 32])) };
    let text = serde_json::to_string(&now).unwrap();
    assert!(text.contains(&"07".repeat(32)), "{text}");
    assert_eq!(serde_json::from_str::<Phase>(&text).unwrap(), now);
}

/// A pause that arrives while an install runs: the install finishes, the note says the reboot
/// is held, and no reboot happens until resume. A pause from the configuration holds it too.
#[test]
fn a_pause_during_the_install_holds_the_reboot_and_says_so() {
    let events = &happy_path()[..3];
    let (s, _) = run(&State::default(), events);
    assert!(matches!(s.phase, Phase::Installing { .. }));
    let (s, _) = step(&s, &Event::Operator(Request::Pause), &cfg());
    let (s, _) = step(&s, &Event::Installed { result: Ok(()), now: t(5) }, &cfg());
    assert_eq!(s.phase, Phase::Staged { version: v("2.0.0") });
    assert!(s.paused && s.note.contains("paused"), "{}", s.note);
    let (s, a) = step(&s, &Event::RebootAllowed, &cfg());
    assert!(!a.contains(&Action::Reboot) && s.phase == Phase::Staged { version: v("2.0.0") }, "{a:?}");
    let (s, _) = step(&s, &Event::Operator(Request::Resume), &cfg());
    let paused_cfg = Config { paused: true, ..cfg() };
    let (s, a) = step(&s, &Event::RebootAllowed, &paused_cfg);
    assert!(!a.contains(&Action::Reboot), "updates.paused holds the reboot: {a:?}");
    let (s, a) = step(&s, &Event::RebootAllowed, &cfg());
    assert_eq!(a, vec![Action::Reboot]);
    assert_eq!(s.phase, Phase::Rebooting { version: v("2.0.0") });
}

/// Every step's outcome is typed: failures by what was recorded, never by the note's words.
#[test]
fn outcomes_are_typed() {
    let outcomes = |events: &[Event]| {
        let mut s = State::default();
        let mut out = Vec::new();
        for e in events {
            let (n, _) = step(&s, e, &cfg());
            out.push(outcome(&s, e, &n));
            s = n;
        }
        out
    };
    let happy = outcomes(&happy_path());
    assert!(happy.iter().all(|o| *o == Outcome::Progress), "{happy:?}");
    let mut events = happy_path();
    events[6] = Event::Health { result: Err("kubelet not ready".into()), now: t(9) };
    let o = outcomes(&events);
    assert_eq!(o[6], Outcome::Failed { version: v("2.0.0"), reason: "kubelet not ready".into() });
    events.push(Event::MarkBadFailed { slot: Slot::A, reason: "the other slot is not bootable".into() });
    assert_eq!(outcomes(&events)[7], Outcome::Stuck);
    // A failed install, a slot that never booted, a deadline that passed.
    let mut install = happy_path()[..4].to_vec();
    install[3] = Event::Installed { result: Err("disk full".into()), now: t(5) };
    assert!(matches!(&outcomes(&install)[3], Outcome::Failed { reason, .. } if reason == "disk full"));
    let mut never = happy_path()[..6].to_vec();
    never[5] = booted("1.0.0", true, t(7));
    assert!(matches!(&outcomes(&never)[5], Outcome::Failed { version, .. } if *version == v("2.0.0")));
    let mut late = happy_path()[..6].to_vec();
    late.push(Event::Tick { now: t(30) });
    assert!(matches!(&outcomes(&late)[6], Outcome::Failed { .. }), "{:?}", outcomes(&late));
    // A failed check is not an update failure; neither is the operator's rollback.
    let check = vec![
        booted("1.0.0", true, t(0)),
        Event::Tick { now: t(1) },
        Event::Checked { decision: Err("connection refused".into()), requested: None, now: t(2) },
        Event::RolledBack { from: Some(v("1.0.0")), now: t(3) },
    ];
    assert_eq!(outcomes(&check)[2..], [Outcome::CheckFailed, Outcome::Progress]);
}

/// A reboot permit names its version: one for another version (a leftover, or the daemon moved
/// on since it was given) reboots nothing.
#[test]
fn a_reboot_permit_counts_for_its_version_only() {
    let (staged, _) = run(&State::default(), &happy_path()[..4]);
    assert_eq!(staged.phase, Phase::Staged { version: v("2.0.0") });
    let other = Event::Operator(Request::AllowReboot { version: v("3.0.0") });
    let (s, a) = step(&staged, &other, &cfg());
    assert_eq!(s, staged);
    assert!(
        matches!(a.as_slice(), [Action::Log(l)] if l.contains("ignored a reboot permit for 3.0.0")),
        "{a:?}"
    );
    let idle = State::default();
    let (s, a) = step(&idle, &Event::Operator(Request::AllowReboot { version: v("2.0.0") }), &cfg());
    assert_eq!((s, a.contains(&Action::Reboot)), (idle, false));
    let (s, a) = step(&staged, &Event::Operator(Request::AllowReboot { version: v("2.0.0") }), &cfg());
    assert_eq!((s.phase, a), (Phase::Rebooting { version: v("2.0.0") }, vec![Action::Reboot]));
}
