//! `aclpub` as a release engineer runs it: the whole flow, and the exit codes of failures.

use std::path::Path;
use std::process::{Command, Output};

fn aclpub(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_aclpub")).current_dir(dir).args(args).output().expect("run aclpub")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = aclpub(dir, args);
    assert!(out.status.success(), "aclpub {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn fails(dir: &Path, args: &[&str], code: i32) -> String {
    let out = aclpub(dir, args);
    assert_eq!(out.status.code(), Some(code), "aclpub {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn release_flow_and_exit_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for k in ["a", "b", "c"] {
        ok(d, &["keygen", "--out", "keys", k]);
    }
    std::fs::create_dir(d.join("trust")).unwrap();
    for k in ["a", "b", "c"] {
        std::fs::copy(d.join(format!("keys/{k}.pub")), d.join(format!("trust/{k}.pub"))).unwrap();
    }
    let fs: Vec<u8> = (0..3_000_000u32).map(|i| (i / 7 % 251) as u8).collect();
    std::fs::write(d.join("fs.img"), fs).unwrap();

    let out = ok(
        d,
        &["build", "fs.img", "--out", "img", "--version", "2.0.0", "--chunk-size", "256K", "--level", "3"],
    );
    assert!(out.contains("built 2.0.0"), "{out}");
    ok(d, &["sign", "--key", "keys/a.key", "--key", "keys/c.key", "img/manifest.json"]);
    let trust = ["--trust", "trust", "--threshold", "2"];
    ok(d, &[&["verify-image", "img"][..], &trust].concat());
    let out = ok(
        d,
        &[
            &[
                "publish",
                "img",
                "--repo",
                "repo",
                "--channel",
                "beta",
                "--key",
                "keys/b.key",
                "--key",
                "keys/c.key",
            ][..],
            &trust,
        ]
        .concat(),
    );
    assert!(out.contains("index version 1"), "{out}");
    let out = ok(d, &[&["verify", "--repo", "repo", "--state", "state.json"][..], &trust].concat());
    assert!(out.contains("channel beta: index version 1"), "{out}");
    assert!(ok(d, &["show", "repo"]).contains("2.0.0"));

    // Usage errors: clap's 2.
    fails(d, &["build", "fs.img"], 2);
    // Rejections: 3, with the reason.
    let err =
        fails(d, &[&["verify", "--repo", "repo", "--threshold", "3"][..], &["--trust", "trust"]].concat(), 3);
    assert!(err.contains("2 valid signature(s) from trusted keys, 3 required"), "{err}");
    let payload = d.join("repo/images/2.0.0/x86_64/payload");
    let mut bytes = std::fs::read(&payload).unwrap();
    bytes[40] ^= 0x20;
    std::fs::write(&payload, bytes).unwrap();
    let err = fails(d, &[&["verify", "--repo", "repo"][..], &trust].concat(), 3);
    assert!(err.contains("chunk 0"), "{err}");
    // Other failures: 1.
    let err = fails(d, &[&["verify", "--repo", "nowhere"][..], &trust].concat(), 1);
    assert!(err.contains("not a repository"), "{err}");
    let err = fails(d, &["sign", "--key", "keys/a.pub", "img/manifest.json"], 1);
    assert!(err.contains("is not a valid secret key"), "{err}");
}
