//! The decision rules, one by one, and the rollout's spread over many machines.

use super::*;
use manifest::Sha256Digest;

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn release(v: &str, waves: &[(&str, u8)]) -> Release {
    Release {
        version: v.parse().unwrap(),
        arch: "x86_64".into(),
        manifest: format!("images/{v}/x86_64/manifest.json"),
        manifest_sha256: Sha256Digest([1; 32]),
        waves: waves.iter().map(|(t, p)| Wave { start: ts(t), percent: *p }).collect(),
    }
}

fn index(releases: Vec<Release>) -> ChannelIndex {
    let mut i = ChannelIndex::new("stable".into(), ts("2026-11-01T00:00:00Z"), ts("2026-12-01T00:00:00Z"));
    for r in releases {
        i.upsert(r);
    }
    i
}

const ALL: &[(&str, u8)] = &[("2026-11-01T00:00:00Z", 100)];

fn decide_at(
    idx: &ChannelIndex,
    current: &str,
    pinned: Option<&str>,
    failures: &[Failure],
    now: &str,
) -> Decision {
    let current: Version = current.parse().unwrap();
    let pinned: Option<Version> = pinned.map(|p| p.parse().unwrap());
    decide(&Inputs {
        index: idx,
        arch: "x86_64",
        current: Some(&current),
        retry_backoff: FIRST_BACKOFF,
        pinned: pinned.as_ref(),
        failures,
        machine_id: "4f1c2b0e9a7d4e2f8c6b5a3d2e1f0a9b",
        now: ts(now),
        requested: None,
    })
}

fn version_of(d: &Decision) -> String {
    match d {
        Decision::Update(r) => r.version.to_string(),
        other => format!("{other:?}"),
    }
}

#[test]
fn newest_release_no_downgrade_and_pinning() {
    let idx = index(vec![release("1.0.0", ALL), release("1.2.0", ALL), release("1.1.0", ALL)]);
    let now = "2026-11-10T00:00:00Z";
    assert_eq!(version_of(&decide_at(&idx, "1.0.0", None, &[], now)), "1.2.0");
    assert_eq!(decide_at(&idx, "1.2.0", None, &[], now), Decision::UpToDate);
    assert_eq!(decide_at(&idx, "1.3.0", None, &[], now), Decision::UpToDate, "never a downgrade");
    assert_eq!(version_of(&decide_at(&idx, "1.2.0", Some("1.0.0"), &[], now)), "1.0.0", "a pin may go back");
    assert_eq!(decide_at(&idx, "1.1.0", Some("1.1.0"), &[], now), Decision::UpToDate);
    let d = decide_at(&idx, "1.0.0", Some("9.9.9"), &[], now);
    assert!(
        matches!(&d, Decision::Blocked { reason } if reason.contains("pinned version 9.9.9 is not in channel")),
        "{d:?}"
    );
}

#[test]
fn failing_versions_back_off_then_are_skipped() {
    let idx = index(vec![release("1.1.0", ALL), release("1.2.0", ALL)]);
    let fail = |count, last: &str| Failure {
        version: "1.2.0".parse().unwrap(),
        count,
        last: ts(last),
        reason: "health check kubelet failed".into(),
    };
    let f1 = [fail(1, "2026-11-10T00:00:00Z")];
    let d = decide_at(&idx, "1.0.0", None, &f1, "2026-11-10T00:05:00Z");
    assert!(matches!(&d, Decision::Wait { until, .. } if *until == ts("2026-11-10T00:10:00Z")), "{d:?}");
    assert_eq!(version_of(&decide_at(&idx, "1.0.0", None, &f1, "2026-11-10T00:10:00Z")), "1.2.0");
    // The third failure waits 40 minutes.
    let f3 = [fail(3, "2026-11-10T00:00:00Z")];
    let d = decide_at(&idx, "1.0.0", None, &f3, "2026-11-10T00:39:00Z");
    assert!(matches!(&d, Decision::Wait { until, .. } if *until == ts("2026-11-10T00:40:00Z")), "{d:?}");
    // After MAX_FAILURES the version is skipped and the next one down is taken.
    let f4 = [fail(MAX_FAILURES, "2026-11-10T00:00:00Z")];
    assert_eq!(version_of(&decide_at(&idx, "1.0.0", None, &f4, "2026-11-20T00:00:00Z")), "1.1.0");
    let d = decide_at(&idx, "1.1.0", None, &f4, "2026-11-20T00:00:00Z");
    assert!(
        matches!(&d, Decision::Blocked { reason } if reason.contains("skipped: 1.2.0 (failed 4 times: health check kubelet failed)")),
        "{d:?}"
    );
}

#[test]
fn waves_admit_machines_by_their_place() {
    let waves = [("2026-11-10T00:00:00Z", 10), ("2026-11-11T00:00:00Z", 50), ("2026-11-12T00:00:00Z", 100)];
    let idx = index(vec![release("2.0.0", &waves)]);
    let v: Version = "2.0.0".parse().unwrap();
    // Over 10,000 machine ids, each wave admits about its share, and a machine once admitted
    // stays admitted in later waves.
    let ids: Vec<String> = (0..10_000).map(|n| format!("machine-{n:05}")).collect();
    for (now, pct) in
        [("2026-11-10T12:00:00Z", 10.0), ("2026-11-11T12:00:00Z", 50.0), ("2026-11-12T12:00:00Z", 100.0)]
    {
        let admitted = ids
            .iter()
            .filter(|id| {
                let i = Inputs {
                    index: &idx,
                    arch: "x86_64",
                    current: Some(&"1.0.0".parse().unwrap()),
                    retry_backoff: FIRST_BACKOFF,
                    pinned: None,
                    failures: &[],
                    machine_id: id,
                    now: ts(now),
                    requested: None,
                };
                matches!(decide(&i), Decision::Update(_))
            })
            .count();
        let share = admitted as f64 / ids.len() as f64 * 100.0;
        assert!((share - pct).abs() < 1.5, "at {now}: {share:.2}% admitted, wave says {pct}%");
    }
    // Before the first wave: wait until it starts.
    let d = decide_at(&idx, "1.0.0", None, &[], "2026-11-09T00:00:00Z");
    assert!(matches!(&d, Decision::Wait { until, .. } if *until == ts("2026-11-10T00:00:00Z")), "{d:?}");
    // Places differ between versions.
    let a = rollout_position("machine-00001", &v);
    let b = rollout_position("machine-00001", &"2.0.1".parse().unwrap());
    assert!((0.0..100.0).contains(&a) && a != b);
}

#[test]
fn a_rollout_halted_below_this_machine_blocks_with_the_reason() {
    let idx = index(vec![release("3.0.0", &[("2026-11-10T00:00:00Z", 1)])]);
    let v: Version = "3.0.0".parse().unwrap();
    let current: Version = "1.0.0".parse().unwrap();
    let outside = (0..).map(|n| format!("m-{n}")).find(|id| rollout_position(id, &v) >= 1.0).unwrap();
    let inside = (0..).map(|n| format!("m-{n}")).find(|id| rollout_position(id, &v) < 1.0).unwrap();
    let at = |id: &str| {
        decide(&Inputs {
            index: &idx,
            arch: "x86_64",
            current: Some(&current),
            retry_backoff: FIRST_BACKOFF,
            pinned: None,
            failures: &[],
            machine_id: id,
            now: ts("2026-11-20T00:00:00Z"),
            requested: None,
        })
    };
    let d = at(&outside);
    assert!(
        matches!(&d, Decision::Blocked { reason } if reason.contains("rollout of 3.0.0 stops at 1%")),
        "{d:?}"
    );
    assert!(matches!(at(&inside), Decision::Update(_)));
}

#[test]
fn an_operator_request_overrides_waves_backoff_and_for_a_version_everything() {
    let not_yet = &[("2026-12-01T00:00:00Z", 100)];
    let idx = index(vec![release("1.0.0", ALL), release("2.0.0", not_yet), release("3.0.0", ALL)]);
    let current: Version = "2.0.0".parse().unwrap();
    let three: Version = "3.0.0".parse().unwrap();
    let backing_off =
        [Failure { version: three.clone(), count: 1, last: ts("2026-11-10T00:00:00Z"), reason: "x".into() }];
    let skipped = [Failure {
        version: three.clone(),
        count: MAX_FAILURES,
        last: ts("2026-11-01T00:00:00Z"),
        reason: "boot loop".into(),
    }];
    let ask = |failures: &[Failure], pinned: Option<&Version>, w: Option<&Wanted>| {
        decide(&Inputs {
            index: &idx,
            arch: "x86_64",
            current: Some(&current),
            retry_backoff: FIRST_BACKOFF,
            pinned,
            failures,
            machine_id: "m",
            now: ts("2026-11-10T00:01:00Z"),
            requested: w,
        })
    };
    // Backoff: the timer waits, "latest" does not.
    assert!(matches!(ask(&backing_off, None, None), Decision::Wait { .. }));
    assert_eq!(version_of(&ask(&backing_off, None, Some(&Wanted::Latest))), "3.0.0");
    // Skipped for good stays skipped for "latest"; asking for the version installs it.
    assert!(matches!(ask(&skipped, None, Some(&Wanted::Latest)), Decision::Blocked { .. }));
    assert_eq!(version_of(&ask(&skipped, None, Some(&Wanted::Version(three.clone())))), "3.0.0");
    // A pin holds for "latest"; an explicit older version is a deliberate downgrade.
    let one: Version = "1.0.0".parse().unwrap();
    assert_eq!(version_of(&ask(&[], Some(&current), Some(&Wanted::Latest))), "UpToDate");
    assert_eq!(version_of(&ask(&[], None, Some(&Wanted::Version(one)))), "1.0.0");
    assert_eq!(version_of(&ask(&[], None, Some(&Wanted::Version(current.clone())))), "UpToDate");
    let d = ask(&[], None, Some(&Wanted::Version("9.9.9".parse().unwrap())));
    assert!(
        matches!(&d, Decision::Blocked { reason } if reason.contains("requested version 9.9.9")),
        "{d:?}"
    );
    // Waves: 2.0.0's wave has not started, but it runs already; asking installs a newer one.
    let idx2 = index(vec![release("4.0.0", not_yet)]);
    let i = Inputs {
        index: &idx2,
        arch: "x86_64",
        current: Some(&current),
        retry_backoff: FIRST_BACKOFF,
        pinned: None,
        failures: &[],
        machine_id: "m",
        now: ts("2026-11-10T00:00:00Z"),
        requested: None,
    };
    assert!(matches!(decide(&i), Decision::Wait { .. }));
    assert_eq!(version_of(&decide(&Inputs { requested: Some(&Wanted::Latest), ..i })), "4.0.0");
}

/// The backoff is configurable (`updates.retry-backoff`) and doubles after each failure.
#[test]
fn retry_after_a_configured_backoff() {
    let f = |count| Failure {
        version: "1.0.0".parse().unwrap(),
        count,
        last: ts("2026-11-01T00:00:00Z"),
        reason: "x".into(),
    };
    let hour = SignedDuration::from_hours(1);
    assert_eq!(f(1).retry_after(hour), Some(ts("2026-11-01T01:00:00Z")));
    assert_eq!(f(2).retry_after(hour), Some(ts("2026-11-01T02:00:00Z")));
    assert_eq!(f(3).retry_after(hour), Some(ts("2026-11-01T04:00:00Z")));
    assert_eq!(f(MAX_FAILURES).retry_after(hour), None);
    assert_eq!(f(1).retry_at(), Some(ts("2026-11-01T00:10:00Z")));
}
