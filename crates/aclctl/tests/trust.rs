//! Issue 13 with the binary: what the booted slot runs comes from its signed trailer, so a lost
//! or damaged state directory does not lower the downgrade floor.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use testkit::{flatcar_layout, tool};

fn aclctl(args: &[&str], extra: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_aclctl")).args(args).args(extra).output().unwrap()
}

/// Publishes a 2 MiB image as `version` into `repo`, signed by the key of seed 8 (trusted by
/// `dir/keys`).
fn publish(dir: &Path, repo: &Path, version: &str) {
    let seed = version.bytes().fold(0u8, |a, b| a.wrapping_add(b));
    let image: Vec<u8> = (0..2u32 << 20).map(|i| (i / 4096) as u8 ^ seed).collect();
    common::publish(dir, repo, version, &image, 8);
}

/// Before: with `slot-B.manifest.json` missing, garbage or a fresh `--state-dir`, a repository
/// listing only older releases installed one over the fallback. Now the booted slot's trailer
/// says 3.0.0 runs, and 2.0.1 is refused as a downgrade in each case (unless asked for by
/// version, which stays the operator's explicit way back).
#[test]
fn issue_13_the_downgrade_floor_survives_a_lost_state_directory() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (new_repo, old_repo) = (d.join("repo-3"), d.join("repo-2"));
    publish(d, &new_repo, "3.0.0");
    // Two releases, so that its index (version 2) is newer than the one accepted from repo-3.
    publish(d, &old_repo, "2.0.0");
    publish(d, &old_repo, "2.0.1");
    let img = d.join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(48 << 20).unwrap();
    flatcar_layout(&sgdisk, &img, 8);
    let (keys, state) = (d.join("keys"), d.join("state"));
    let update = |repo: &Path, booted: &str, state: &Path, extra: &[&str]| {
        let mut args = vec!["update", "--booted", booted, "--socket", "/nonexistent/agent.sock"];
        args.extend_from_slice(extra);
        let repo = format!("file://{}", repo.display());
        args.extend_from_slice(&["--repo", &repo, "--disk", img.to_str().unwrap()]);
        let out = Command::new(env!("CARGO_BIN_EXE_aclctl"))
            .args(&args)
            .arg("--trust")
            .arg(&keys)
            .arg("--state-dir")
            .arg(state)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    // 3.0.0 into B, booted and confirmed.
    let (code, out) = update(&new_repo, "A", &state, &[]);
    assert_eq!(code, Some(0), "{out}");
    let out = aclctl(&["mark-good", "--booted", "B", "--disk", img.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let record = state.join("slot-B.manifest.json");
    for case in ["record missing", "record garbage", "fresh state directory"] {
        let state_dir = match case {
            "record missing" => {
                let _ = std::fs::remove_file(&record);
                state.clone()
            }
            "record garbage" => {
                std::fs::write(&record, b"{garbage").unwrap();
                state.clone()
            }
            _ => d.join(format!("state-{}", case.len())),
        };
        let before = std::fs::read(&img).unwrap();
        let (code, out) = update(&old_repo, "B", &state_dir, &[]);
        assert_eq!(code, Some(0), "{case}: {out}");
        assert!(out.contains("up to date: slot B runs 3.0.0"), "{case}: {out}");
        assert!(std::fs::read(&img).unwrap() == before, "{case}: the disk changed");
        // The record is rebuilt from the trailer.
        assert!(std::fs::read_to_string(state_dir.join("slot-B.manifest.json")).unwrap().contains("3.0.0"));
    }
    // Asked for by version: the operator's way back, still possible.
    let (code, out) = update(&old_repo, "B", &state, &["--version", "2.0.0"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("installed 2.0.0 into slot A"), "{out}");
}

/// Issue 13: exit codes as documented. 2 for a usage error (`--tries 0`, `--threshold 0` used
/// to exit 1), 3 for anything the trust rules refuse: a payload that does not match its
/// signed manifest exited 1 while a manifest mismatch exited 3.
#[test]
fn issue_13_exit_codes_follow_one_rule() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for args in [
        &["update", "--repo", "file:///x", "--tries", "0"][..],
        &["update", "--repo", "file:///x", "--threshold", "0"],
    ] {
        let out = aclctl(args, &[]);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let repo = d.join("repo");
    publish(d, &repo, "3.0.0");
    let payload = repo.join(format!("images/3.0.0/{}/payload", std::env::consts::ARCH));
    let mut bytes = std::fs::read(&payload).unwrap();
    // Inside the first frame, the first data chunk's: always fetched (a frame of the dm-verity
    // tree may be computed on the node instead).
    bytes[100] ^= 0x55;
    std::fs::write(&payload, bytes).unwrap();
    let img = d.join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(48 << 20).unwrap();
    flatcar_layout(&sgdisk, &img, 8);
    let url = format!("file://{}", repo.display());
    let args = [
        "update",
        "--booted",
        "A",
        "--socket",
        "/nonexistent/agent.sock",
        "--repo",
        &url,
        "--disk",
        img.to_str().unwrap(),
    ];
    let out =
        aclctl(&args, &[Path::new("--trust"), &d.join("keys"), Path::new("--state-dir"), &d.join("state")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("payload") && err.contains("chunk"), "{err}");
}
