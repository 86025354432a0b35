//! The whole daemon against its policies, with a clock the test moves: maintenance windows,
//! rollout waves, pause, a pinned version, backoff then skip of a failing version, and the
//! operator's "update now" in check-only mode. Each runs on a loop device when the machine has
//! them (CI does), with a signed file:// repository.

mod common;

use agent::machine::{Phase, Request};
use common::{Fixture, everyone, platform, settle, until};
use slot::choice::Slot;

fn v(s: &str) -> semver::Version {
    s.parse().unwrap()
}

fn staged(f: &Fixture, version: &str) -> bool {
    f.state().phase == Phase::Staged { version: v(version) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_update_reboots_only_inside_its_maintenance_window() {
    let Some(sgdisk) = testkit::tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new(&sgdisk, true, &["2.0.0"]);
    f.write_config(
        "[reboot]\nwindows = [{ days = [\"Sat\"], start = \"02:00\", length = \"1h\", time-zone = \"Europe/Berlin\" }]\n",
    );
    let p = platform(); // Tuesday 00:00 UTC
    let r = f.start(Slot::A, &p);
    until("2.0.0 is staged", || staged(&f, "2.0.0")).await;
    // Hours pass on other days, and on Saturday just before the window (01:59 Berlin).
    for t in ["2026-11-10T12:00:00Z", "2026-11-13T23:00:00Z", "2026-11-14T00:59:00Z"] {
        p.set(t);
        settle().await;
        assert_eq!(p.reboots(), 0, "rebooted at {t}, outside the window");
        assert!(staged(&f, "2.0.0"), "{t}: {:?}", f.state());
    }
    p.set("2026-11-14T01:00:30Z"); // Saturday 02:00:30 in Berlin
    until("it reboots in the window", || p.reboots() == 1).await;
    r.stop().await;
    assert_eq!(f.state().phase, Phase::Rebooting { version: v("2.0.0") });
    assert_eq!(f.boot(), Slot::B);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_wave_holds_the_machine_until_its_place_is_reached() {
    let Some(sgdisk) = testkit::tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new(&sgdisk, true, &[]);
    // The first wave stops just below this machine's place for 2.0.0; the second takes all.
    let place = policy::rollout_position("test-machine", &v("2.0.0"));
    let first = place.floor() as u8;
    f.publish(
        "2.0.0",
        vec![
            manifest::Wave { start: "2026-11-11T00:00:00Z".parse().unwrap(), percent: first },
            manifest::Wave { start: "2026-11-12T00:00:00Z".parse().unwrap(), percent: 100 },
        ],
        "2026-11-09T00:00:00Z",
    );
    let p = platform();
    let r = f.start(Slot::A, &p);
    until("the first check", || f.state().last_check.is_some()).await;
    assert!(f.state().note.contains("rollout at 0%"), "{}", f.state().note);
    p.set("2026-11-11T06:00:00Z");
    until("a check in the first wave", || f.state().note.contains(&format!("rollout at {first}%"))).await;
    let note = f.state().note;
    assert!(note.contains(&format!("this machine is at {place:.1}%")), "{note}");
    assert_eq!(f.state().phase, Phase::Idle);
    p.set("2026-11-12T00:30:00Z");
    until("2.0.0 is installed in the second wave", || !matches!(f.state().phase, Phase::Idle)).await;
    until("it reboots", || p.reboots() == 1).await;
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_checks_installs_and_reboots_until_resume() {
    let Some(sgdisk) = testkit::tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new(&sgdisk, true, &[]);
    let p = platform();
    let r = f.start(Slot::A, &p);
    until("up to date", || f.state().note == "up to date").await;
    let paused = r.ask(Request::Pause).await;
    assert!(paused.state.paused);
    let checked = f.state().last_check;
    f.publish("2.0.0", everyone(), "2026-11-10T00:10:00Z");
    p.set("2026-11-10T05:00:00Z");
    settle().await;
    assert_eq!(f.state().last_check, checked, "no periodic check while paused");
    assert_eq!(f.state().phase, Phase::Idle);
    // An explicit check still reports, without installing.
    r.ask(Request::CheckNow).await;
    until("the check reports", || f.state().note == "2.0.0 available; paused").await;
    let s = r.ask(Request::Update { version: None }).await;
    assert!(s.state.note.contains("paused"), "{}", s.state.note);
    settle().await;
    assert_eq!(f.state().phase, Phase::Idle);
    r.ask(Request::Resume).await;
    p.set("2026-11-10T07:00:00Z");
    until("installed and rebooting", || p.reboots() == 1).await;
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_version_is_installed_and_nothing_newer() {
    let Some(sgdisk) = testkit::tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new(&sgdisk, true, &["2.0.0", "3.0.0"]);
    f.write_config("[updates]\npinned-version = \"2.0.0\"\n");
    let p = platform();
    f.run_until(Slot::A, &p, || p.reboots() == 1).await;
    assert_eq!(f.state().phase, Phase::Rebooting { version: v("2.0.0") }, "the pin, not the newest");
    assert_eq!(f.boot(), Slot::B);
    let r = f.start(Slot::B, &p);
    until("2.0.0 confirmed", || f.slots().b.successful()).await;
    for t in ["2026-11-10T03:00:00Z", "2026-11-11T03:00:00Z"] {
        p.set(t);
        until("a check", || f.state().last_check == Some(t.parse().unwrap())).await;
        settle().await;
        assert_eq!(f.state().phase, Phase::Idle, "{t}");
        assert_eq!(f.state().note, "up to date");
    }
    r.stop().await;
    assert_eq!(p.reboots(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_version_backs_off_then_is_skipped_and_a_newer_one_installs() {
    let Some(sgdisk) = testkit::tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new(&sgdisk, true, &["2.0.0"]);
    f.write_config("[updates]\ncheck-interval = \"5m\"\n");
    f.corrupt_payload("2.0.0");
    let p = platform();
    let r = f.start(Slot::A, &p);
    let failures = || f.state().failures.first().map_or(0, |x| x.count);
    until("the first failure", || failures() == 1).await;
    let reason = f.state().failures[0].reason.clone();
    assert!(reason.contains("payload") || reason.contains("chunk"), "{reason}");
    // Backoff 10 min: the check at +5 min waits, the one after +10 min retries (and fails).
    let mut t: jiff::Timestamp = "2026-11-10T00:00:00Z".parse().unwrap();
    let mut step = |mins: i64| {
        t = t.checked_add(jiff::SignedDuration::from_mins(mins)).unwrap();
        p.set(&t.to_string());
    };
    step(6);
    until("a check in the backoff", || f.state().note.contains("next try after backoff")).await;
    assert_eq!(failures(), 1);
    step(6);
    until("the second failure", || failures() == 2).await;
    // 20, then 40 minutes.
    step(21);
    until("the third failure", || failures() == 3).await;
    step(41);
    until("the fourth failure", || failures() == 4).await;
    step(300);
    until("skipped", || f.state().note.starts_with("skipped: 2.0.0 (failed 4 times")).await;
    step(300);
    settle().await;
    assert_eq!(failures(), 4, "not retried forever");
    assert_eq!(f.history().iter().filter(|h| h.starts_with("installing: installing 2.0.0")).count(), 4);
    // A newer release is considered at once.
    f.publish("2.0.1", everyone(), "2026-11-10T09:00:00Z");
    step(10);
    until("2.0.1 installs and reboots", || p.reboots() == 1).await;
    r.stop().await;
    assert_eq!(f.state().phase, Phase::Rebooting { version: v("2.0.1") });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_update_installs_in_check_only_mode() {
    let Some(sgdisk) = testkit::tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new(&sgdisk, true, &["2.0.0", "3.0.0"]);
    f.write_config("[updates]\nmode = \"check\"\n");
    let p = platform();
    let r = f.start(Slot::A, &p);
    until("a check", || f.state().note == "3.0.0 available (check-only mode)").await;
    let s = r.ask(Request::Update { version: Some(v("2.0.0")) }).await;
    assert_eq!(s.state.note, "checking for 2.0.0");
    until("2.0.0 installed and rebooting", || p.reboots() == 1).await;
    r.stop().await;
    assert_eq!(f.state().phase, Phase::Rebooting { version: v("2.0.0") });
}
