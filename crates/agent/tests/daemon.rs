//! The whole daemon, in process, on a GPT disk image with a file:// repository built and
//! signed by our tools: it checks, installs, reboots (observed by the test, which then plays
//! the boot path), health-checks the new slot and confirms it, or marks it bad and falls back.

mod common;

use agent::machine::Phase;
use common::{Fixture, platform};
use slot::Disk;
use slot::choice::Slot;
use std::path::Path;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_updates_reboots_and_confirms() {
    let Some(sgdisk) = testkit::tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new(&sgdisk, true, &["2.0.0"]);
    let p = platform();
    f.run_until(Slot::A, &p, || p.reboots() == 1).await;
    assert_eq!(f.state().phase, Phase::Rebooting { version: "2.0.0".parse().unwrap() });
    let s = Disk::open(&f.disk, false).unwrap().slots();
    assert_eq!((s.b.priority(), s.b.tries(), s.b.successful()), (2, 2, false));

    assert_eq!(f.boot(), Slot::B);
    // The state directory loses its record of B (as on a provisioned disk): the agent takes
    // it back from the signed trailer the installer wrote at the end of slot B.
    let record = f.path("state/slot-B.manifest.json");
    let written = std::fs::read(&record).unwrap();
    std::fs::remove_file(&record).unwrap();
    let r = f.start(Slot::B, &p);
    common::until("B is confirmed", || f.slots().b.successful()).await;
    assert_eq!(std::fs::read(&record).unwrap(), written, "record recovered from the trailer");
    let metrics = r.metrics.encode();
    r.stop().await;
    let st = f.state();
    assert_eq!(st.phase, Phase::Idle);
    assert_eq!(st.note, "2.0.0 is healthy");
    assert_eq!(p.reboots(), 1);
    for line in [
        "acl_agent_phase{phase=\"idle\"} 1",
        "acl_agent_info{booted_slot=\"B\",booted_version=\"2.0.0\",target_version=\"\"} 1",
        "acl_agent_phase_duration_seconds_count{phase=\"verifying\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line:?} not in\n{metrics}");
    }
    let history = f.history();
    for expected in [
        "installing: installing 2.0.0",
        "staged: 2.0.0 installed; waiting to reboot",
        "idle: 2.0.0 is healthy",
    ] {
        assert!(history.iter().any(|h| h == expected), "{expected:?} not in {history:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_health_check_marks_the_slot_bad_and_the_old_one_boots() {
    let Some(sgdisk) = testkit::tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new(&sgdisk, true, &["2.0.0"]);
    let p = platform();
    f.run_until(Slot::A, &p, || p.reboots() == 1).await;
    assert_eq!(f.boot(), Slot::B);

    // 2.0.0 comes up but its required check fails.
    f.add_check("required.d", "50-app", "#!/bin/sh\necho app not answering\nexit 1\n");
    let r = f.start(Slot::B, &p);
    common::until("it reboots again", || p.reboots() == 2).await;
    let metrics = r.metrics.encode();
    r.stop().await;
    assert!(metrics.lines().any(|l| l == "acl_agent_failures_total{reason=\"health\"} 1"), "{metrics}");
    let st = f.state();
    assert!(
        st.note.contains("failed its health checks") && st.note.contains("app not answering"),
        "{}",
        st.note
    );
    assert_eq!(st.failures[0].version.to_string(), "2.0.0");
    let s = f.slots();
    assert_eq!(s.b.priority(), 0, "the bad slot must not boot again");
    assert_eq!(f.boot(), Slot::A, "the previous slot boots");
}

/// Issue 12: on a freshly provisioned disk (slot A on trial, B never written) a failing
/// required check cannot mark A bad: there is nothing to fall back to. The daemon must not
/// reboot (each reboot would spend one of A's tries until nothing boots); it says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_12_a_refused_mark_bad_on_a_fresh_disk_does_not_reboot() {
    let Some(sgdisk) = testkit::tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new(&sgdisk, true, &[]);
    {
        let mut d = Disk::open(&f.disk, true).unwrap();
        let tries = slot::Tries::new(3).unwrap();
        d.update(|s| Ok(slot::choice::provisioned(&slot::choice::give_up(s, Slot::B), Slot::A, tries)))
            .unwrap();
    }
    assert_eq!(f.boot(), Slot::A);
    let before = f.slots();
    assert!(!before.a.successful() && !before.b.bootable(), "{before:?}");
    f.add_check("required.d", "50-app", "#!/bin/sh\necho app not answering\nexit 1\n");
    let p = platform();
    let said = |f: &Fixture| f.history().iter().any(|h| h.contains("not rebooting"));
    f.run_until(Slot::A, &p, || said(&f)).await;
    assert_eq!(p.reboots(), 0, "a refused mark-bad rebooted");
    assert_eq!(f.slots(), before, "the slots changed");
    let line = f.history().into_iter().find(|h| h.contains("not rebooting")).unwrap();
    assert!(
        line.contains("could not mark slot A bad")
            && line.contains("marking A bad would leave no slot to boot")
            && line.contains("slot A keeps running"),
        "{line}"
    );
    assert!(
        f.history().iter().any(|h| h.contains("failed its health checks") && h.contains("app not answering")),
        "{:?}",
        f.history()
    );
    assert_eq!(f.state().failures[0].version.to_string(), "1.0.0");
}

/// Issue 12: marking the slot bad fails on the disk itself (here a table whose OEM-CONFIG entry
/// was moved over ROOT, so every write is refused). The daemon must not reboot into the same slot;
/// the history names the disk's problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_12_a_failed_mark_bad_write_does_not_reboot() {
    let Some(sgdisk) = testkit::tool("sgdisk", "gdisk") else { return };
    // An image file (no loop device), so that the test can edit the table under the agent.
    let f = Fixture::new(&sgdisk, false, &["2.0.0"]);
    let p = platform();
    f.run_until(Slot::A, &p, || p.reboots() == 1).await;
    assert_eq!(f.boot(), Slot::B);
    let (root_first, _) = testkit::gpt_edit::extent(&f.image, 512, 9);
    let (oem_first, _) = testkit::gpt_edit::extent(&f.image, 512, 7);
    testkit::gpt_edit::set_extent(&f.image, 512, 7, oem_first, root_first + 10);
    let before = std::fs::read(&f.image).unwrap();
    f.add_check("required.d", "50-app", "#!/bin/sh\necho app not answering\nexit 1\n");
    let said = |f: &Fixture| f.history().iter().any(|h| h.contains("not rebooting"));
    f.run_until(Slot::B, &p, || said(&f)).await;
    assert_eq!(p.reboots(), 1, "a failed mark-bad rebooted");
    assert!(std::fs::read(&f.image).unwrap() == before, "the disk changed");
    let line = f.history().into_iter().find(|h| h.contains("not rebooting")).unwrap();
    assert!(
        line.contains("could not mark slot B bad")
            && line.contains("partition 7 OEM-CONFIG")
            && line.contains("overlaps partition 9 ROOT")
            && line.contains("slot B keeps running"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_api_pauses_resumes_and_reports() {
    use agent::api;
    use agent::machine::Request;
    let Some(sgdisk) = testkit::tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new(&sgdisk, false, &["2.0.0"]);
    let p = platform();
    let env = agent::daemon::Env {
        settings: f.settings(),
        disk: f.disk.clone(),
        booted: Slot::A,
        machine_id: "test-machine".into(),
        arch: "x86_64".into(),
        platform: p.clone(),
        tick: Duration::from_secs(3600),
        metrics: Default::default(),
        coordinated: false,
        status: Default::default(),
        probes: Vec::new(),
        transitions: None,
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let socket = f.path("run/agent.sock");
    let server = tokio::spawn({
        let socket = socket.clone();
        async move { api::serve(&socket, tx).await }
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(agent::daemon::run(env, rx, async move {
        let _ = stop_rx.await;
    }));
    let mut answer = None;
    for _ in 0..100 {
        if let Ok(a) = api::call(&socket, Request::Pause).await {
            answer = Some(a);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a = answer.expect("the API answered");
    assert!(a.ok && a.state.as_ref().unwrap().paused);
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600, "root only");
    // The first check may finish after the pause; either way the note says paused.
    let st = api::call(&socket, Request::Status).await.unwrap().state.unwrap();
    assert!(st.paused && st.note.contains("paused"), "{st:?}");
    let a = api::call(&socket, Request::Resume).await.unwrap();
    assert!(!a.state.unwrap().paused);
    let _ = stop_tx.send(());
    daemon.await.unwrap().unwrap();
    server.abort();
}

/// The real `acl-agentd` binary, killed with SIGKILL again and again while it checks,
/// installs, reboots and health-checks: every restart resumes, and the update completes with
/// the new slot confirmed and the old one still good.
#[test]
fn kill_9_at_any_time_and_the_update_still_completes() {
    let Some(sgdisk) = testkit::tool("sgdisk", "gdisk") else { return };
    if !Path::new("/etc/machine-id").exists() {
        assert!(std::env::var_os("ACL_REQUIRE_TOOLS").is_none(), "/etc/machine-id is required");
        eprintln!("skipped: no /etc/machine-id");
        return;
    }
    let f = Fixture::new(&sgdisk, false, &["2.0.0"]);
    let marker = f.path("reboot-requested");
    let conf = f.path("root/etc/acl-update/config.d");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("50-test.toml"),
        format!(
            "[agent]\nsocket = \"{}\"\nreboot-command = \"touch {}\"\n",
            f.path("run/agent.sock").display(),
            marker.display()
        ),
    )
    .unwrap();
    let run = |booted: &str, kill_after: Option<Duration>| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_acl-agentd"))
            .arg("--config-root")
            .arg(f.path("root"))
            .arg("--disk")
            .arg(&f.disk)
            .args(["--booted", booted])
            .stderr(if kill_after.is_some() {
                std::process::Stdio::null()
            } else {
                std::process::Stdio::inherit()
            })
            .spawn()
            .unwrap();
        if let Some(d) = kill_after {
            std::thread::sleep(d);
            let _ = child.kill(); // SIGKILL
        }
        child
    };
    // Phase 1, booted A: killed at growing delays, then left to finish until it asks to reboot.
    // Short, growing lifetimes: each run gets a little further (start, check, install, journal,
    // activate, ask to reboot) before it dies.
    let mut kills = 0;
    for ms in (1..100u64).map(|i| 3 * i) {
        if marker.exists() {
            break;
        }
        run("A", Some(Duration::from_millis(ms))).wait().unwrap();
        kills += 1;
    }
    let mut child = run("A", None);
    for _ in 0..600 {
        if marker.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait().unwrap();
    assert!(marker.exists(), "never asked to reboot after {kills} kills");
    assert!(kills >= 5, "only {kills} kills: the test did not interrupt much");
    assert_eq!(f.boot(), Slot::B);
    // Phase 2, booted B: killed a few times during the health check, then confirms.
    for ms in [20u64, 40, 80] {
        run("B", Some(Duration::from_millis(ms))).wait().unwrap();
    }
    let disk = f.disk.clone();
    let mut child = run("B", None);
    for _ in 0..600 {
        if Disk::open(&disk, false).unwrap().slots().b.successful() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait().unwrap();
    let s = Disk::open(&f.disk, false).unwrap().slots();
    assert!(s.b.successful() && s.b.priority() == 2, "B confirmed: {s:?}");
    assert!(s.a.successful() && s.a.bootable(), "A still the way back: {s:?}");
    let st = f.state();
    assert_eq!(st.phase, Phase::Idle);
    assert!(st.failures.is_empty(), "{:?}", st.failures);
    eprintln!("killed {kills} times while updating, 3 times while verifying; the update completed");
}

/// The real binary, staged and waiting for a maintenance window that is closed: SIGKILLed
/// while waiting, it restarts still staged (no second install, no reboot); once the window
/// opens it reboots.
#[test]
fn kill_9_while_staged_keeps_waiting_for_the_window() {
    let Some(sgdisk) = testkit::tool("sgdisk", "gdisk") else { return };
    if !Path::new("/etc/machine-id").exists() {
        assert!(std::env::var_os("ACL_REQUIRE_TOOLS").is_none(), "/etc/machine-id is required");
        return;
    }
    let f = Fixture::new(&sgdisk, false, &["2.0.0"]);
    let marker = f.path("reboot-requested");
    let hour = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC).hour();
    let window = |start: i8, length: &str| {
        format!(
            "[agent]\nsocket = \"{}\"\nreboot-command = \"touch {}\"\n[reboot]\nwindows = [{{ days = \
             [\"Mon\", \"Tue\", \"Wed\", \"Thu\", \"Fri\", \"Sat\", \"Sun\"], start = \"{:02}:00\", length = \"{length}\" }}]\n",
            f.path("run/agent.sock").display(),
            marker.display(),
            start.rem_euclid(24),
        )
    };
    // Closed: opens in 12 hours. Then open: opened an hour ago, for three hours.
    f.write_config(&window(hour + 12, "1h"));
    let start = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_acl-agentd"))
            .arg("--config-root")
            .arg(f.path("root"))
            .arg("--disk")
            .arg(&f.disk)
            .args(["--booted", "A"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let staged = || matches!(f.state().phase, Phase::Staged { .. });
    let mut child = start();
    for _ in 0..1200 {
        if staged() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(staged(), "{:?}", f.state());
    child.kill().unwrap();
    child.wait().unwrap();
    for _ in 0..3 {
        let mut child = start();
        std::thread::sleep(Duration::from_millis(400));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(staged(), "{:?}", f.state());
        assert!(!marker.exists(), "rebooted outside the window");
    }
    let installs = f.history().iter().filter(|h| h.starts_with("installing:")).count();
    assert_eq!(installs, 1, "installed once: {:?}", f.history());

    f.write_config(&window(hour - 1, "3h"));
    let mut child = start();
    for _ in 0..600 {
        if marker.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(marker.exists(), "no reboot inside the window: {:?}", f.state());
    assert_eq!(f.state().phase, Phase::Rebooting { version: "2.0.0".parse().unwrap() });
}

/// Issue 13 item 4: the install binds to what the check accepted. A restart in the installing
/// phase installs only the manifest whose digest the check recorded, and only from an index
/// that passes the check's rules (a replayed older index is refused); slot B is not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_13_the_install_takes_only_what_the_check_accepted() {
    use agent::machine::State;
    let Some(sgdisk) = testkit::tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new(&sgdisk, true, &["2.0.0"]);
    let p = platform();
    let m2 = std::fs::read(f.path("repo/images/2.0.0/x86_64/manifest.json")).unwrap();
    let digest = manifest::Sha256Digest::of(&m2);
    let installing = |manifest| State {
        phase: Phase::Installing { version: "2.0.0".parse().unwrap(), manifest },
        ..State::default()
    };
    let untouched = || {
        let s = f.slots();
        (s.b.priority(), s.b.successful()) == (0, false) && f.state().phase == Phase::Idle
    };

    // 1. The repository now names another manifest for 2.0.0 than the one checked.
    agent::persist::save(&f.path("state"), &installing(Some(manifest::Sha256Digest([9; 32])))).unwrap();
    f.run_until(Slot::A, &p, || f.state().note.contains("changed since it was checked")).await;
    assert!(untouched(), "{:?} {:?}", f.slots(), f.state());
    assert!(f.state().note.contains("not installed"), "{}", f.state().note);

    // 2. A replayed index: the node accepted a newer one (3.0.0 published), then the mirror
    //    serves the older index again. The install refuses it like the check would.
    let index = f.path("repo/channels/stable/index.json");
    let old = (
        std::fs::read(&index).unwrap(),
        std::fs::read(f.path("repo/channels/stable/index.json.sig")).unwrap(),
    );
    f.publish("3.0.0", common::everyone(), "2026-11-02T00:00:00Z");
    let policy = repo::TrustPolicy::new(signing::TrustedKeys::load(&[f.path("keys")]).unwrap(), 1).unwrap();
    let (new, new_sig) = (
        std::fs::read(&index).unwrap(),
        std::fs::read(f.path("repo/channels/stable/index.json.sig")).unwrap(),
    );
    let (_, acc) = policy.index("stable", &new, &new_sig, *p.now.lock().unwrap(), None).unwrap();
    repo::state::AcceptedState::commit(&f.path("state/accepted-index.json"), acc).unwrap();
    std::fs::write(&index, &old.0).unwrap();
    std::fs::write(f.path("repo/channels/stable/index.json.sig"), &old.1).unwrap();
    agent::persist::save(&f.path("state"), &installing(Some(digest))).unwrap();
    f.run_until(Slot::A, &p, || f.state().note.starts_with("install of 2.0.0 failed")).await;
    assert!(untouched(), "{:?} {:?}", f.slots(), f.state());
    let note = f.state().note;
    assert!(note.contains("older") || note.contains("replay"), "{note}");

    // 3. The index the check accepted, and the manifest it named: installed.
    std::fs::write(&index, &new).unwrap();
    std::fs::write(f.path("repo/channels/stable/index.json.sig"), &new_sig).unwrap();
    agent::persist::save(&f.path("state"), &installing(Some(digest))).unwrap();
    f.run_until(Slot::A, &p, || p.reboots() == 1).await;
    assert_eq!(f.slots().b.priority(), 2);
}
