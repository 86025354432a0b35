//! Validation and freshness rules of the channel index.

use super::*;

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn release(v: &str) -> Release {
    Release {
        version: v.parse().unwrap(),
        arch: "x86_64".into(),
        manifest: format!("images/{v}/x86_64/manifest.json"),
        manifest_sha256: Sha256Digest([7; 32]),
        waves: vec![Wave { start: ts("2026-11-01T00:00:00Z"), percent: 100 }],
    }
}

fn index() -> ChannelIndex {
    let mut i = ChannelIndex::new("stable".into(), ts("2026-11-01T00:00:00Z"), ts("2026-12-01T00:00:00Z"));
    i.index_version = 5;
    i.upsert(release("1.2.0"));
    i.upsert(release("1.10.0"));
    i.upsert(release("1.9.0"));
    i
}

#[test]
fn round_trips_canonically_and_orders_by_semver() {
    let i = index();
    i.validate().unwrap();
    assert_eq!(ChannelIndex::from_bytes(&i.to_bytes()).unwrap(), i);
    assert_eq!(i.latest("x86_64").unwrap().version.to_string(), "1.10.0");
    assert!(i.latest("aarch64").is_none());
}

#[test]
fn non_canonical_bytes_are_refused() {
    let bytes = index().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let compact = serde_json::to_vec(&v).unwrap();
    let e = ChannelIndex::from_bytes(&compact).unwrap_err();
    assert!(matches!(e, DocumentError::NotCanonical { .. }), "{e}");
    let text = String::from_utf8(bytes).unwrap().replace("\"channel\"", "\"extra\": 1,\n  \"channel\"");
    assert!(matches!(ChannelIndex::from_bytes(text.as_bytes()), Err(DocumentError::Malformed { .. })));
}

#[test]
fn freshness_rules() {
    let i = index();
    let d = Sha256Digest::of(&i.to_bytes());
    let now = ts("2026-11-10T00:00:00Z");
    let acc = i.check_fresh("stable", d, now, None).unwrap();
    assert_eq!(acc.index_version, 5);
    // Same index again is fine (no new publication yet).
    i.check_fresh("stable", d, now, Some(&acc)).unwrap();

    let expired = i.check_fresh("stable", d, ts("2026-12-01T00:00:00Z"), None).unwrap_err();
    assert!(expired.to_string().contains("expired at 2026-12-01T00:00:00Z"), "{expired}");

    let newer = Accepted { index_version: 6, ..acc.clone() };
    let e = i.check_fresh("stable", d, now, Some(&newer)).unwrap_err();
    assert_eq!(e, FreshnessError::Older { channel: "stable".into(), offered: 5, accepted: 6 });
    assert!(e.to_string().contains("older than version 6 already accepted"), "{e}");

    let forked = Accepted { sha256: Sha256Digest([0; 32]), ..acc.clone() };
    assert!(matches!(i.check_fresh("stable", d, now, Some(&forked)), Err(FreshnessError::Forked { .. })));

    assert!(matches!(i.check_fresh("beta", d, now, None), Err(FreshnessError::WrongChannel { .. })));
    // What was accepted on another channel does not constrain this one.
    let other = Accepted { channel: "beta".into(), ..newer };
    i.check_fresh("stable", d, now, Some(&other)).unwrap();
}

#[test]
fn inconsistent_indexes_are_refused() {
    let mut i = index();
    i.channel = "Stable!".into();
    assert!(matches!(i.validate(), Err(IndexError::BadChannelName(_))));

    let mut i = index();
    i.expires = i.issued;
    assert!(matches!(i.validate(), Err(IndexError::ExpiresBeforeIssued { .. })));

    let mut i = index();
    i.releases.swap(0, 1);
    assert!(matches!(i.validate(), Err(IndexError::ReleaseOrder { .. })));

    for bad in ["/etc/passwd", "images/../../x", "", "a//b"] {
        let mut i = index();
        i.releases[0].manifest = bad.into();
        assert!(matches!(i.validate(), Err(IndexError::BadManifestPath { .. })), "{bad:?}");
    }

    let mut i = index();
    i.releases[0].waves = vec![
        Wave { start: ts("2026-11-02T00:00:00Z"), percent: 50 },
        Wave { start: ts("2026-11-01T00:00:00Z"), percent: 100 },
    ];
    assert!(matches!(i.validate(), Err(IndexError::BadWaves { .. })));
    i.releases[0].waves.clear();
    assert!(matches!(i.validate(), Err(IndexError::BadWaves { .. })));
}
