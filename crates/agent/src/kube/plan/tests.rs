//! Every combination of what the Node says and what the daemon is doing.

use super::*;
use crate::machine::State;

fn v(s: &str) -> semver::Version {
    s.parse().unwrap()
}

fn phases() -> Vec<Phase> {
    vec![
        Phase::Idle,
        Phase::Installing { version: v("2.0.0"), manifest: None },
        Phase::Staged { version: v("2.0.0") },
        Phase::Staged { version: v("3.0.0") },
        Phase::Rebooting { version: v("2.0.0") },
        Phase::Verifying { version: v("2.0.0"), deadline: "2026-11-30T00:00:00Z".parse().unwrap() },
    ]
}

fn snap(phase: &Phase, wanted: bool, paused: bool) -> Snapshot {
    Snapshot {
        state: State { phase: phase.clone(), paused, ..State::default() },
        reboot_wanted: wanted,
        booted_version: Some("1.5.0".into()),
        ..Snapshot::default()
    }
}

/// Every subset of `options` (each key absent or one of its values).
fn combinations(options: &[(&'static str, &[&str])]) -> Vec<BTreeMap<String, String>> {
    let mut out = vec![BTreeMap::new()];
    for (key, values) in options {
        let mut next = Vec::new();
        for m in &out {
            next.push(m.clone());
            for value in *values {
                let mut m = m.clone();
                m.insert((*key).to_owned(), (*value).to_owned());
                next.push(m);
            }
        }
        out = next;
    }
    out
}

#[test]
fn a_reboot_needs_the_staged_version_allowed_with_a_slot() {
    let nodes = combinations(&[
        (ann::REBOOT_ALLOWED, &["2.0.0", "3.0.0", "garbage"]),
        (ann::LOCK, &["acl-reboot-0"]),
        (ann::REBOOT, &["allowed", "lock"]),
        (ann::UPDATE, &["latest"]),
        (ann::PAUSED, &["true", "false"]),
    ]);
    let mut allowed = 0;
    let mut cases = 0;
    for phase in phases() {
        for wanted in [false, true] {
            for paused in [false, true] {
                let s = snap(&phase, wanted, paused);
                for a in &nodes {
                    cases += 1;
                    let permit = reboot_permit(a, &s);
                    let expect = match &phase {
                        Phase::Staged { version } => {
                            wanted
                                && a.get(ann::REBOOT_ALLOWED) == Some(&version.to_string())
                                && (a.contains_key(ann::LOCK)
                                    || a.get(ann::REBOOT).map(String::as_str) == Some("allowed"))
                        }
                        _ => false,
                    };
                    assert_eq!(permit.is_some(), expect, "{phase:?} wanted={wanted} {a:?}");
                    let rebooting =
                        decide(a, &s, &Memory::default()).iter().any(|x| matches!(x, Action::Reboot { .. }));
                    assert_eq!(rebooting, expect, "{phase:?} wanted={wanted} {a:?}");
                    allowed += usize::from(expect);
                    if let Some((version, how)) = permit {
                        assert_eq!(Some(&version), a.get(ann::REBOOT_ALLOWED));
                        assert_eq!(how.starts_with("holding "), a.contains_key(ann::LOCK), "{how}");
                    }
                }
            }
        }
    }
    assert!(allowed > 0 && cases > 1000, "{allowed} of {cases}");
}

#[test]
fn requests_are_taken_before_they_are_acted_on_and_never_while_a_removal_is_unresolved() {
    let nodes = combinations(&[
        (ann::UPDATE, &["latest", "2.0.0", "nonsense"]),
        (ann::ROLLBACK, &["now", "next-boot", "sideways"]),
        (ann::PAUSED, &["true", "false", "maybe"]),
    ]);
    let pending = Memory {
        pending: Some(Pending {
            marker: "m".into(),
            requests: Requests::default(),
            keys: vec![ann::UPDATE],
            resource_version: "7".into(),
        }),
        ..Memory::default()
    };
    for a in &nodes {
        for paused in [false, true] {
            let s = snap(&Phase::Idle, false, paused);
            let keys: Vec<&str> =
                [ann::UPDATE, ann::ROLLBACK].into_iter().filter(|k| a.contains_key(*k)).collect();
            let d = decide(a, &s, &Memory::default());
            let take = d.iter().find_map(|x| match x {
                Action::Take(k) => Some(k.clone()),
                _ => None,
            });
            assert_eq!(take.unwrap_or_default(), keys, "{a:?}");
            assert!(!d.contains(&Action::Reread));
            // The pause follows the Node only when it reads as true or false.
            let tell = match a.get(ann::PAUSED).map(String::as_str) {
                Some("true") if !paused => Some(Action::Tell(Request::Pause)),
                Some("false") if paused => Some(Action::Tell(Request::Resume)),
                _ => None,
            };
            assert_eq!(
                d.iter().find(|x| matches!(x, Action::Tell(_))),
                tell.as_ref(),
                "{a:?} paused={paused}"
            );
            // A removal whose answer was lost is resolved first; nothing is taken meanwhile.
            let d = decide(a, &s, &pending);
            assert!(d.contains(&Action::Reread), "{a:?}");
            assert!(!d.iter().any(|x| matches!(x, Action::Take(_))), "{a:?}");
        }
    }
}

#[test]
fn commands_follow_what_was_removed_and_refuse_downgrades_without_the_allow() {
    let nodes = combinations(&[
        (ann::UPDATE, &["latest", "1.0.0", "1.5.0", "2.0.0", "nonsense"]),
        (ann::ROLLBACK, &["now", "next-boot", "sideways"]),
        (ann::ALLOW_DOWNGRADE, &["true", "false"]),
    ]);
    let removals: [&[&str]; 4] = [&[], &[ann::UPDATE], &[ann::ROLLBACK], &[ann::UPDATE, ann::ROLLBACK]];
    for a in &nodes {
        let r = ann::requests(a);
        for removed in removals {
            for booted in [None, Some("1.5.0")] {
                let c = commands(&r, removed, booted);
                let expected = removed.iter().filter(|k| a.contains_key(**k)).count();
                assert_eq!(c.len(), expected, "only what was removed is acted on: {a:?} {removed:?}");
                for cmd in &c {
                    match cmd {
                        Command::Ask { request: Request::Update { version: Some(want) }, .. } => {
                            let older = booted.is_some_and(|b| *want < v(b));
                            assert!(
                                !older || r.allow_downgrade,
                                "a downgrade asked for without the allow: {a:?}"
                            );
                        }
                        Command::Refuse(why) if why.contains("refused, older than the booted") => {
                            assert!(!r.allow_downgrade && booted.is_some());
                            assert!(why.contains(ann::ALLOW_DOWNGRADE), "{why}");
                        }
                        Command::Refuse(why) => {
                            assert!(why.contains("nonsense") || why.contains("sideways"), "{why}")
                        }
                        Command::Ask { request, .. } => {
                            assert!(matches!(
                                request,
                                Request::Update { version: None } | Request::Rollback { .. }
                            ))
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn a_removal_is_recognised_by_its_marker_only() {
    let p = Pending {
        marker: marker(&[ann::ROLLBACK], "41"),
        requests: Requests::default(),
        keys: vec![ann::ROLLBACK],
        resource_version: "41".into(),
    };
    let mut a = BTreeMap::new();
    assert!(!stored(&p, &a), "nothing written");
    a.insert(ann::REQUEST_RESULT.to_owned(), marker(&[ann::ROLLBACK], "40"));
    assert!(!stored(&p, &a), "an earlier removal's marker");
    a.insert(ann::REQUEST_RESULT.to_owned(), "rollback: rolled back".into());
    assert!(!stored(&p, &a));
    assert_eq!(resolution(&p, &a, "41"), Resolution::Unknown, "still at its version: may still land");
    assert_eq!(resolution(&p, &a, "42"), Resolution::NotStored, "moved on without it: can never land");
    a.insert(ann::REQUEST_RESULT.to_owned(), p.marker.clone());
    assert!(stored(&p, &a));
    assert_eq!(resolution(&p, &a, "42"), Resolution::Stored);
    assert!(is_marker(&p.marker) && !is_marker("rollback: rolled back") && !is_marker("taking a break"));
    assert!(!writes_status(&Memory { pending: Some(p), ..Memory::default() }));
    assert!(writes_status(&Memory::default()));
}

#[test]
fn the_status_says_what_the_daemon_does() {
    for phase in phases() {
        for wanted in [false, true] {
            for paused in [false, true] {
                let s = snap(&phase, wanted, paused);
                let m = Memory { request_result: Some("rollback: done".into()), ..Memory::default() };
                let st = status(&s, &m);
                let state = if paused { "paused" } else { phase.name() };
                assert_eq!(st[ann::STATE], state);
                assert_eq!(st[ann::REQUEST_RESULT], "rollback: done");
                assert_eq!(st.get(ann::TARGET), phase.version().map(ToString::to_string).as_ref());
                let request = st.get(ann::REBOOT_REQUEST).map(String::as_str);
                let expect = match phase {
                    Phase::Staged { .. } if wanted => Some("wanted"),
                    Phase::Rebooting { .. } | Phase::Verifying { .. } => Some("holding"),
                    _ => None,
                };
                assert_eq!(request, expect, "{phase:?} wanted={wanted}");
                assert!(st.keys().all(|k| ann::AGENT_KEYS.contains(k)), "{st:?}");
            }
        }
    }
}

#[test]
fn events_follow_the_typed_outcome() {
    let failed = Outcome::Failed { version: v("2.0.0"), reason: "x".into() };
    let outcomes = [failed, Outcome::Stuck, Outcome::CheckFailed, Outcome::Progress];
    let names = ["idle", "installing", "staged", "rebooting", "verifying"];
    for o in &outcomes {
        for from in names {
            for to in names {
                let e = event(from, to, o);
                match o {
                    Outcome::Progress => {
                        assert_eq!(e.is_none(), to == "rebooting");
                        assert!(e.is_none_or(|(t, _)| t == Type::Normal));
                    }
                    _ => assert_eq!(e.map(|(t, _)| t), Some(Type::Warning), "{o:?} {from}->{to}"),
                }
            }
        }
    }
    assert_eq!(event("verifying", "idle", &Outcome::Progress), Some((Type::Normal, "UpdateSucceeded")));
    let failed = Outcome::Failed { version: v("2.0.0"), reason: "x".into() };
    assert_eq!(event("verifying", "idle", &failed), Some((Type::Warning, "UpdateFailed")));
}
