//! The whole daemon, in process, on a GPT disk image with a file:// repository built and
//! signed by our tools: it checks, installs, reboots (observed by the test, which then plays
//! the boot path), health-checks the new slot and confirms it, or marks it bad and falls back.

use agent::daemon::{self, Env, Platform};
use agent::machine::Phase;
use jiff::Timestamp;
use repo::local::{PublishRequest, publish, sign_document};
use signing::{SecretKey, TrustedKeys};
use slot::Disk;
use slot::choice::{self, Slot};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

#[derive(Debug)]
struct FakePlatform {
    now: Mutex<Timestamp>,
    reboots: AtomicUsize,
}

impl Platform for FakePlatform {
    fn now(&self) -> Timestamp {
        *self.now.lock().unwrap()
    }
    fn reboot(&self) -> Result<(), String> {
        self.reboots.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    disk: PathBuf,
}

impl Fixture {
    fn new(sgdisk: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let disk = testkit::flatcar_image(sgdisk, dir.path(), 128, 40);
        let f = Fixture { dir, disk };
        let key = SecretKey::from_seed([3; 32]);
        std::fs::create_dir_all(f.path("keys")).unwrap();
        key.public().write_new(&f.path("keys/k.pub")).unwrap();
        let policy = repo::TrustPolicy::new(TrustedKeys::new([key.public()]).unwrap(), 1).unwrap();
        for (v, seed) in [("1.0.0", 1u8), ("2.0.0", 2)] {
            let fs = f.path(&format!("fs-{v}"));
            let data: Vec<u8> =
                (0..(6u32 << 20)).map(|i| ((i / 4096) as u8).wrapping_mul(seed) ^ (i as u8)).collect();
            std::fs::write(&fs, data).unwrap();
            let out = f.path(&format!("build-{v}"));
            let opts = payload::BuildOptions {
                version: v.parse().unwrap(),
                arch: "x86_64".into(),
                kernel_cmdline: String::new(),
                chunk_size: 256 << 10,
                level: 3,
                threads: 2,
                salt: None,
            };
            payload::build(&fs, &out, &opts, &|_| {}).unwrap();
            sign_document(&out.join("manifest.json"), std::slice::from_ref(&key)).unwrap();
            let req = PublishRequest {
                repo: &f.path("repo"),
                image_dir: &out,
                channel: "stable",
                expires_in: jiff::SignedDuration::from_hours(24 * 30),
                waves: vec![manifest::Wave { start: "2026-01-01T00:00:00Z".parse().unwrap(), percent: 100 }],
                now: "2026-11-01T00:00:00Z".parse().unwrap(),
                threads: 2,
            };
            publish(&req, std::slice::from_ref(&key), &policy, &|_, _| {}).unwrap();
        }
        // Slot A was provisioned with 1.0.0: the state directory records it.
        std::fs::create_dir_all(f.path("state")).unwrap();
        std::fs::copy(f.path("build-1.0.0/manifest.json"), f.path("state/slot-A.manifest.json")).unwrap();
        f
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn settings(&self) -> config::Settings {
        let root = self.path("root");
        let etc = root.join("etc/acl-update");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            etc.join("config.toml"),
            format!(
                "[updates]\nrepository = \"file://{}\"\ntries = 2\n[trust]\nkeys = [\"{}\"]\n\
                 [health]\nrequired-dir = \"{}\"\nwanted-dir = \"{}\"\ncheck-timeout = \"5s\"\n\
                 [agent]\nstate-dir = \"{}\"\n",
                self.path("repo").display(),
                self.path("keys").display(),
                self.path("required.d").display(),
                self.path("wanted.d").display(),
                self.path("state").display()
            ),
        )
        .unwrap();
        config::Settings::from_loaded(&config::load(&config::Sources::under(&root)).unwrap()).unwrap()
    }

    /// Runs the daemon booted from `booted` until `done` holds (or 60 s pass); then stops it.
    async fn run_until(
        &self,
        booted: Slot,
        platform: &std::sync::Arc<FakePlatform>,
        done: impl Fn() -> bool,
    ) {
        let env = Env {
            settings: self.settings(),
            disk: self.disk.clone(),
            booted,
            machine_id: "test-machine".into(),
            arch: "x86_64".into(),
            platform: platform.clone(),
            tick: Duration::from_millis(20),
        };
        let (_tx, rx) = tokio::sync::mpsc::channel(1);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(daemon::run(env, rx, async move {
            let _ = stop_rx.await;
        }));
        for _ in 0..3000 {
            if done() || task.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = stop_tx.send(());
        task.await.unwrap().unwrap();
        assert!(done(), "the daemon did not get there in time");
    }

    /// What the boot path does at power-on: choose a slot and spend a try.
    fn boot(&self) -> Slot {
        let mut d = Disk::open(&self.disk, true).unwrap();
        let (chosen, _) = choice::boot_attempt(&d.slots()).unwrap();
        d.update(|s| Ok(choice::boot_attempt(s).unwrap().1)).unwrap();
        chosen
    }

    fn state(&self) -> agent::machine::State {
        agent::persist::load(&self.path("state")).unwrap()
    }
}

fn platform() -> std::sync::Arc<FakePlatform> {
    std::sync::Arc::new(FakePlatform {
        now: Mutex::new("2026-11-10T00:00:00Z".parse().unwrap()),
        reboots: AtomicUsize::new(0),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_updates_reboots_and_confirms() {
    let Some(sgdisk) = testkit::tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new(&sgdisk);
    let p = platform();
    f.run_until(Slot::A, &p, || p.reboots.load(Ordering::SeqCst) == 1).await;
    assert_eq!(f.state().phase, Phase::Rebooting { version: "2.0.0".parse().unwrap() });
    let s = Disk::open(&f.disk, false).unwrap().slots();
    assert_eq!((s.b.priority(), s.b.tries(), s.b.successful()), (2, 2, false));

    assert_eq!(f.boot(), Slot::B);
    let disk = f.disk.clone();
    f.run_until(Slot::B, &p, || Disk::open(&disk, false).unwrap().slots().b.successful()).await;
    let st = f.state();
    assert_eq!(st.phase, Phase::Idle);
    assert_eq!(st.note, "2.0.0 is healthy");
    assert_eq!(p.reboots.load(Ordering::SeqCst), 1);
    let history: Vec<String> = agent::history::read(&f.path("state"), 100)
        .into_iter()
        .map(|e| format!("{}: {}", e.phase, e.message))
        .collect();
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
    let f = Fixture::new(&sgdisk);
    let p = platform();
    f.run_until(Slot::A, &p, || p.reboots.load(Ordering::SeqCst) == 1).await;
    assert_eq!(f.boot(), Slot::B);

    // 2.0.0 comes up but its required check fails.
    std::fs::create_dir_all(f.path("required.d")).unwrap();
    let check = f.path("required.d/50-app");
    std::fs::write(&check, "#!/bin/sh\necho app not answering\nexit 1\n").unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&check, std::fs::Permissions::from_mode(0o755)).unwrap();
    f.run_until(Slot::B, &p, || p.reboots.load(Ordering::SeqCst) == 2).await;
    let st = f.state();
    assert!(
        st.note.contains("failed its health checks") && st.note.contains("app not answering"),
        "{}",
        st.note
    );
    assert_eq!(st.failures[0].version.to_string(), "2.0.0");
    let s = Disk::open(&f.disk, false).unwrap().slots();
    assert_eq!(s.b.priority(), 0, "the bad slot must not boot again");
    assert_eq!(f.boot(), Slot::A, "the previous slot boots");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_api_pauses_resumes_and_reports() {
    use agent::api;
    use agent::machine::Request;
    let Some(sgdisk) = testkit::tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new(&sgdisk);
    let p = platform();
    let env = Env {
        settings: f.settings(),
        disk: f.disk.clone(),
        booted: Slot::A,
        machine_id: "test-machine".into(),
        arch: "x86_64".into(),
        platform: p.clone(),
        tick: Duration::from_secs(3600),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let socket = f.path("run/agent.sock");
    let server = tokio::spawn({
        let socket = socket.clone();
        async move { api::serve(&socket, tx).await }
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(daemon::run(env, rx, async move {
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
    let a = api::call(&socket, Request::Status).await.unwrap();
    assert_eq!(a.state.unwrap().note, "paused by the operator");
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
    let f = Fixture::new(&sgdisk);
    let _ = f.settings();
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
