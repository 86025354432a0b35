//! `aclctl` on disk-image files and loop devices partitioned by Debian's sgdisk.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;
use testkit::{flatcar_layout, run, tool};

fn aclctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_aclctl")).args(args).output().unwrap()
}

fn json(args: &[&str]) -> serde_json::Value {
    let out = aclctl(args);
    assert!(out.status.success(), "aclctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Flatcar layout after a completed update: B (priority 2) confirmed, A (priority 1) the way back.
fn updated_disk(sgdisk: &Path, target: &Path) {
    flatcar_layout(sgdisk, target, 8);
    run(sgdisk, &["-A", "4:set:49", "-A", "4:set:56", target.to_str().unwrap()]);
}

fn attributes(sgdisk: &Path, target: &Path, n: u32) -> String {
    let out = run(sgdisk, &["-i", &n.to_string(), target.to_str().unwrap()]);
    out.lines().find_map(|l| l.strip_prefix("Attribute flags: ")).unwrap().trim().to_owned()
}

fn rollback_round_trip(sgdisk: &Path, disk: &Path) {
    let d = disk.to_str().unwrap();
    let s = json(&["status", "--disk", d, "--json"]);
    assert_eq!(s["next_boot"], "B");
    assert_eq!(s["slots"][1]["priority"], 2);

    let started = Instant::now();
    let out = aclctl(&["rollback", "--disk", d]);
    let took = started.elapsed();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("rollback: slot A boots next (was B)"), "{text}");
    eprintln!("aclctl rollback on {d}: {:.1} ms (process start to exit)", took.as_secs_f64() * 1e3);

    assert!(run(sgdisk, &["-v", d]).contains("No problems found"));
    assert_eq!(attributes(sgdisk, disk, 3), "0102000000000000");
    assert_eq!(attributes(sgdisk, disk, 4), "0101000000000000");
    assert_eq!(json(&["status", "--disk", d, "--json"])["next_boot"], "A");
}

#[test]
fn rollback_on_an_image_file_and_a_loop_device() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(48 << 20).unwrap();
    updated_disk(&sgdisk, &img);
    rollback_round_trip(&sgdisk, &img);

    let Some(losetup) = tool("losetup", "mount") else { return };
    let img2 = dir.path().join("disk2.img");
    std::fs::File::create(&img2).unwrap().set_len(48 << 20).unwrap();
    let out = Command::new(&losetup).args(["--find", "--show"]).arg(&img2).output().unwrap();
    if !out.status.success() {
        assert!(std::env::var_os("ACL_REQUIRE_LOOP").is_none(), "no loop device");
        eprintln!("skipped: no loop device");
        return;
    }
    let dev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    updated_disk(&sgdisk, &dev);
    let result = std::panic::catch_unwind(|| rollback_round_trip(&sgdisk, &dev));
    run(&losetup, &["-d", dev.to_str().unwrap()]);
    result.unwrap();
}

#[test]
fn mark_good_and_refusals() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(48 << 20).unwrap();
    updated_disk(&sgdisk, &img);
    let d = img.to_str().unwrap();
    // B on trial: priority 2, 1 try left, not yet successful.
    run(&sgdisk, &["-A", "4:clear:56", "-A", "4:set:52", d]);
    let s = json(&["status", "--disk", d, "--booted", "B", "--json"]);
    assert_eq!(s["booted"], "B");
    assert!(s["slots"][1]["role"].as_str().unwrap().contains("on trial (1 tries left)"), "{s}");
    let s = json(&["mark-good", "--disk", d, "--booted", "B", "--json"]);
    assert_eq!(s["slots"][1]["successful"], true);
    assert_eq!(s["slots"][1]["tries"], 0);
    assert_eq!(attributes(&sgdisk, &img, 4), "0102000000000000");

    // Nothing to roll back to: A marked unbootable.
    run(&sgdisk, &["-A", "3:clear:48", "-A", "3:clear:56", d]);
    let out = aclctl(&["rollback", "--disk", d, "--booted", "B"]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("slot A cannot be rolled back to: it was never confirmed good"), "{err}");

    // Not a GPT disk at all.
    let blank = dir.path().join("blank.img");
    std::fs::File::create(&blank).unwrap().set_len(1 << 20).unwrap();
    let out = aclctl(&["status", "--disk", blank.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no valid GPT"));
    // A slot name that is not A or B is a usage error.
    assert_eq!(aclctl(&["status", "--disk", d, "--booted", "C"]).status.code(), Some(2));
}

#[test]
fn config_is_merged_annotated_and_refused_when_invalid() {
    let root = tempfile::tempdir().unwrap();
    let etc = root.path().join("etc/acl-update");
    std::fs::create_dir_all(etc.join("config.d")).unwrap();
    std::fs::write(etc.join("config.toml"), "[updates]\nrepository = \"https://u.example/acl\"\n").unwrap();
    std::fs::write(etc.join("config.d/10-beta.toml"), "[updates]\nchannel = \"beta\"\n").unwrap();
    let r = root.path().to_str().unwrap();
    let out = aclctl(&["config", "--root", r]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let channel = text.lines().find(|l| l.starts_with("channel = ")).unwrap();
    assert!(channel.contains("\"beta\"") && channel.ends_with("config.d/10-beta.toml:2"), "{channel}");
    assert!(text.lines().any(|l| l.starts_with("tries = 3") && l.ends_with("# default")), "{text}");

    std::fs::write(etc.join("config.d/20-typo.toml"), "[updates]\n\nchanel = \"x\"\n").unwrap();
    let out = aclctl(&["config", "--root", r]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("20-typo.toml:3: unknown field `chanel`"), "{err}");

    let defaults = aclctl(&["config", "--defaults"]);
    assert!(String::from_utf8_lossy(&defaults.stdout).contains("check-interval = \"1h\""));
}

/// Issue 12: USR-B's entry moved over USR-A (CRCs valid). `status` names the problem instead of
/// `null`; every change is refused with exit code 3, naming the partitions, and writes nothing.
#[test]
fn issue_12_status_names_an_unsafe_layout_and_changes_are_refused() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(48 << 20).unwrap();
    updated_disk(&sgdisk, &img);
    let d = img.to_str().unwrap();
    assert_eq!(json(&["status", "--disk", d, "--json"])["table"]["layout_ok"], true);
    let (a_first, a_last) = testkit::gpt_edit::extent(&img, 512, 3);
    let (_, b_last) = testkit::gpt_edit::extent(&img, 512, 4);
    testkit::gpt_edit::set_extent(&img, 512, 4, a_last - 7, b_last);
    let before = std::fs::read(&img).unwrap();
    let named = format!(
        "partition 3 USR-A (LBAs {a_first}-{a_last}) overlaps partition 4 USR-B (LBAs {}-{b_last})",
        a_last - 7
    );

    let s = json(&["status", "--disk", d, "--json"]);
    assert_eq!(s["table"]["layout_ok"], false, "{s}");
    assert_eq!(s["table"]["problem"], format!("unsafe layout: {named}"), "{s}");
    let out = aclctl(&["status", "--disk", d]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("UNSAFE") && text.contains(&named), "{text}");

    for args in
        [&["rollback", "--disk", d][..], &["mark-good", "--disk", d, "--booted", "B"], &["boot", "--disk", d]]
    {
        let out = aclctl(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {err}");
        assert!(err.contains(&named) && err.contains("the disk was not changed"), "{args:?}: {err}");
        assert!(std::fs::read(&img).unwrap() == before, "{args:?} wrote to the disk");
    }
}

/// Builds, signs and publishes a 2 MiB image as 2.0.0 into `dir/repo`, trusted by `dir/keys`;
/// served by a server that never answers for the payload, so that an install waits on its
/// first request, holding the disk's lock, until the test kills it.
fn stalling_repository(dir: &Path) -> testkit::http::Server {
    let image: Vec<u8> = (0..2u32 << 20).map(|i| (i / 4096) as u8 ^ i as u8).collect();
    common::publish(dir, &dir.join("repo"), "2.0.0", &image, 4);
    let stall = testkit::http::Behaviour { stall_payload: true, ..Default::default() };
    testkit::http::serve(dir.join("repo"), stall)
}

/// Issue 12, item 2, with two real processes: `aclctl update --repo` holds the disk's lock for
/// its whole install (here stuck reading its payload); `aclctl rollback` and `mark-good` on the
/// same disk are refused at once, naming it, and write nothing. Once it is killed, the lock is
/// free (its leftover record names a dead process and is ignored).
#[test]
fn issue_12_a_second_aclctl_is_refused_while_an_update_holds_the_disk() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = stalling_repository(dir.path());
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(48 << 20).unwrap();
    updated_disk(&sgdisk, &img);
    let d = img.to_str().unwrap();
    let state = dir.path().join("state");
    let repo_url = server.url.clone();
    let keys = dir.path().join("keys");
    let mut update = Command::new(env!("CARGO_BIN_EXE_aclctl"))
        .args(["update", "--repo", &repo_url, "--trust", keys.to_str().unwrap(), "--disk", d])
        .args(["--booted", "B", "--socket", "/nonexistent/agent.sock", "--state-dir"])
        .arg(&state)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The install has begun (journal written, so the disk is open and locked).
    let journal = state.join("install-journal.json");
    let started = Instant::now();
    while !journal.exists() {
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "the update never started");
        assert!(update.try_wait().unwrap().is_none(), "the update ended early");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let before = std::fs::read(&img).unwrap();
    for args in [&["rollback", "--disk", d][..], &["mark-good", "--disk", d, "--booted", "B"]] {
        let started = Instant::now();
        let out = aclctl(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(3), "{args:?} waited");
        assert!(err.contains(&format!("pid {} (", update.id())) && err.contains("aclctl update"), "{err}");
        assert!(err.contains("nothing was changed"), "{err}");
        assert!(std::fs::read(&img).unwrap() == before, "{args:?} wrote to the disk");
    }
    // status never waits. The update has written nothing yet (its payload never came), so A
    // is still the way back.
    assert_eq!(
        json(&["status", "--disk", d, "--json"])["slots"][0]["priority"],
        1,
        "A changed before a write"
    );
    update.kill().unwrap();
    update.wait().unwrap();
    let s = json(&["mark-good", "--disk", d, "--booted", "B", "--json"]);
    assert_eq!(s["slots"][1]["successful"], true);
    assert!(run(&sgdisk, &["-v", d]).contains("No problems found"));
}

/// `aclctl boot-deadline` (acl-boot-deadline.service) on a disk image: the booted slot B is on
/// trial and this machine has been up longer than the configured deadline.
fn boot_deadline(img: &Path, dir: &Path) -> (Output, PathBuf) {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("etc/acl-update")).unwrap();
    let rebooted = dir.join("rebooted");
    std::fs::write(
        root.join("etc/acl-update/config.toml"),
        format!(
            "[health]\ndeadline = \"10s\"\nfallback-grace = \"0s\"\n[agent]\nstate-dir = \"{}\"\nreboot-command = \"touch {}\"\n",
            dir.join("state").display(),
            rebooted.display()
        ),
    )
    .unwrap();
    let out = aclctl(&[
        "boot-deadline",
        "--disk",
        img.to_str().unwrap(),
        "--booted",
        "B",
        "--config-root",
        root.to_str().unwrap(),
    ]);
    (out, rebooted)
}

#[test]
fn boot_deadline_gives_up_an_unconfirmed_boot_only_when_the_other_slot_can_boot() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let uptime: f64 =
        std::fs::read_to_string("/proc/uptime").unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!(uptime > 10.0, "this test needs a machine up for more than the 10 s deadline");

    // B on trial (priority 2, one try left), A confirmed: B is given up, A boots next, the
    // reboot command runs, the history says why.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(48 << 20).unwrap();
    flatcar_layout(&sgdisk, &img, 8);
    run(&sgdisk, &["-A", "4:set:49", "-A", "4:set:52", img.to_str().unwrap()]);
    let (out, rebooted) = boot_deadline(&img, dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("slot B was not confirmed within 10 s"));
    assert!(rebooted.exists(), "the reboot command did not run");
    assert_eq!(attributes(&sgdisk, &img, 4), "0000000000000000");
    assert_eq!(json(&["status", "--disk", img.to_str().unwrap(), "--json"])["next_boot"], "A");
    assert!(run(&sgdisk, &["-v", img.to_str().unwrap()]).contains("No problems found"));
    let history = std::fs::read_to_string(dir.path().join("state/history.jsonl")).unwrap();
    assert!(history.contains("slot B was not confirmed"), "{history}");

    // A cannot boot: B stays, nothing is written, no reboot.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(48 << 20).unwrap();
    flatcar_layout(&sgdisk, &img, 8);
    run(&sgdisk, &["-A", "3:clear:48", "-A", "4:set:49", "-A", "4:set:52", img.to_str().unwrap()]);
    let before = std::fs::read(&img).unwrap();
    let (out, rebooted) = boot_deadline(&img, dir.path());
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("but it stays"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!rebooted.exists(), "rebooted with nowhere to go");
    assert_eq!(std::fs::read(&img).unwrap(), before, "the disk changed");

    // B confirmed: nothing to watch, at once.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(48 << 20).unwrap();
    updated_disk(&sgdisk, &img);
    let (out, rebooted) = boot_deadline(&img, dir.path());
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to watch"));
    assert!(!rebooted.exists());
}
