//! Threshold, tamper and key-file tests.

use super::*;

fn keys() -> [SecretKey; 4] {
    [1u8, 2, 3, 4].map(|i| SecretKey::from_seed([i; 32]))
}

fn trusted(k: &[SecretKey]) -> TrustedKeys {
    TrustedKeys::new(k.iter().map(|k| k.public())).unwrap()
}

fn signed_by(doc: &[u8], k: &[&SecretKey]) -> SignatureFile {
    let mut f = SignatureFile::default();
    for k in k {
        f.add(Purpose::Manifest, doc, k).unwrap();
    }
    f
}

#[test]
fn two_of_three_passes() {
    let k = keys();
    let t = trusted(&k[..3]);
    let f = signed_by(b"doc", &[&k[0], &k[2]]);
    let v = verify(Purpose::Manifest, b"doc", &f, &t, 2).unwrap();
    assert_eq!(v.signers, vec![k[0].id(), k[2].id()]);
}

#[test]
fn below_threshold_is_refused() {
    let k = keys();
    let f = signed_by(b"doc", &[&k[0]]);
    let e = verify(Purpose::Manifest, b"doc", &f, &trusted(&k[..3]), 2).unwrap_err();
    assert_eq!(e.to_string(), "manifest has 1 valid signature(s) from trusted keys, 2 required");
    assert!(matches!(e, SignatureError::BelowThreshold { valid: 1, threshold: 2, .. }));
}

/// Issue 13: a document with enough trusted signatures plus one by a key the node does not
/// know was rejected, which broke key rotation and let anyone who could append a signature
/// block a release. Extra signatures are now ignored (TUF's rule).
#[test]
fn signatures_by_unknown_keys_are_ignored() {
    let k = keys();
    let f = signed_by(b"doc", &[&k[0], &k[3]]);
    let v = verify(Purpose::Manifest, b"doc", &f, &trusted(&k[..3]), 1).unwrap();
    assert_eq!(v.signers, vec![k[0].id()]);
    // Only unknown keys: below the threshold, and the refusal says why.
    let f = signed_by(b"doc", &[&k[3]]);
    let e = verify(Purpose::Manifest, b"doc", &f, &trusted(&k[..3]), 1).unwrap_err().to_string();
    assert!(e.contains("0 valid signature(s)") && e.contains("which this node does not trust"), "{e}");
}

/// Key rotation: the publisher signs with the old and the new key while nodes move from
/// trusting the old key to trusting the new one; every node accepts throughout.
#[test]
fn key_rotation_old_and_new_then_new_only() {
    let k = keys();
    let (old, new) = (&k[0], &k[1]);
    let both = signed_by(b"doc", &[old, new]);
    for trust in [trusted(std::slice::from_ref(old)), trusted(&k[..2]), trusted(std::slice::from_ref(new))] {
        verify(Purpose::Manifest, b"doc", &both, &trust, 1).unwrap();
    }
    // After the move, documents signed by the new key alone pass on nodes that trust it.
    let new_only = signed_by(b"doc", &[new]);
    verify(Purpose::Manifest, b"doc", &new_only, &trusted(std::slice::from_ref(new)), 1).unwrap();
    assert!(verify(Purpose::Manifest, b"doc", &new_only, &trusted(std::slice::from_ref(old)), 1).is_err());
}

/// A second signature by one key counts once; a threshold of 2 is not met by one key twice.
#[test]
fn a_key_counts_once() {
    let k = keys();
    let mut f = signed_by(b"doc", &[&k[0]]);
    f.signatures.push(f.signatures[0].clone());
    let e = verify(Purpose::Manifest, b"doc", &f, &trusted(&k[..3]), 2).unwrap_err().to_string();
    assert!(e.contains("1 valid signature(s)") && e.contains("a second signature by key"), "{e}");
    verify(Purpose::Manifest, b"doc", &f, &trusted(&k[..3]), 1).unwrap();
    assert!(matches!(f.add(Purpose::Manifest, b"doc", &k[0]), Err(SignatureError::AlreadySigned(_))));
}

#[test]
fn altered_document_or_signature_does_not_count() {
    let k = keys();
    let t = trusted(&k[..3]);
    let f = signed_by(b"document", &[&k[0], &k[1]]);
    let e = verify(Purpose::Manifest, b"documenT", &f, &t, 2).unwrap_err().to_string();
    assert!(e.contains("0 valid") && e.contains("does not match the manifest"), "{e}");
    let mut g = f.clone();
    g.signatures[1].sig[5] ^= 0x10;
    let e = verify(Purpose::Manifest, b"document", &g, &t, 2).unwrap_err().to_string();
    assert!(
        e.contains("1 valid") && e.contains(&format!("the signature by key {} does not match", k[1].id())),
        "{e}"
    );
    // A mangled extra signature does not block a document that has enough good ones.
    verify(Purpose::Manifest, b"document", &g, &t, 1).unwrap();
    // Too many signatures: refused before any is checked.
    let mut h = f.clone();
    h.signatures = vec![f.signatures[0].clone(); MAX_SIGNATURES + 1];
    assert_eq!(verify(Purpose::Manifest, b"document", &h, &t, 1), Err(SignatureError::TooMany(65)));
}

#[test]
fn purposes_do_not_cross() {
    let k = keys();
    let f = signed_by(b"doc", &[&k[0]]);
    assert!(verify(Purpose::ChannelIndex, b"doc", &f, &trusted(&k[..1]), 1).is_err());
}

#[test]
fn zero_threshold_is_refused() {
    let k = keys();
    let e = verify(Purpose::Manifest, b"doc", &SignatureFile::default(), &trusted(&k[..1]), 0).unwrap_err();
    assert_eq!(e, SignatureError::ZeroThreshold);
}

#[test]
fn signature_file_round_trips_and_rejects_junk() {
    let k = keys();
    let f = signed_by(b"doc", &[&k[0], &k[1]]);
    assert_eq!(SignatureFile::from_bytes(&f.to_bytes()).unwrap(), f);
    assert!(matches!(SignatureFile::from_bytes(b"{\"signatures\": 3}"), Err(SignatureError::Malformed(_))));
}

#[test]
fn key_files_round_trip_and_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let k = SecretKey::generate().unwrap();
    let sk = dir.path().join("a.key");
    let pk = dir.path().join("a.pub");
    k.write_new(&sk).unwrap();
    k.public().write_new(&pk).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&sk).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(k.write_new(&sk).is_err(), "an existing key file must not be overwritten");
    assert_eq!(SecretKey::read(&sk).unwrap().id(), k.id());
    assert_eq!(PublicKey::read(&pk).unwrap(), k.public());

    // A public key file whose key was swapped but whose id was not.
    let other = SecretKey::from_seed([9; 32]).public();
    let text = std::fs::read_to_string(&pk).unwrap().replace(&k.id().to_string(), &other.id().to_string());
    std::fs::write(&pk, text).unwrap();
    let e = PublicKey::read(&pk).unwrap_err().to_string();
    assert!(e.contains("does not match the key"), "{e}");

    // The same key twice in a trusted directory.
    let d2 = dir.path().join("trust");
    std::fs::create_dir(&d2).unwrap();
    k.public().write_new(&d2.join("x.pub")).unwrap();
    k.public().write_new(&d2.join("y.pub")).unwrap();
    let e = TrustedKeys::load(&[d2]).unwrap_err();
    assert!(matches!(e, KeyFileError::DuplicateTrustedKey { .. }), "{e}");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(matches!(TrustedKeys::load(&[empty]), Err(KeyFileError::NoTrustedKeys(_))));
}
