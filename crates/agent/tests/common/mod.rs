//! The whole daemon in process, for the integration tests: a GPT disk (a loop device when the
//! machine has them, else the image file), a file:// repository built and signed by our own
//! tools, a clock the test moves, a reboot the test observes and then plays the boot path for.

#![allow(dead_code, unreachable_pub, missing_docs)]

use agent::daemon::{self, ApiRequest, Env, Platform, Snapshot};
use agent::machine::{Request, State};
use agent::metrics::Metrics;
use jiff::Timestamp;
use repo::local::{PublishRequest, publish, sign_document};
use signing::{SecretKey, TrustedKeys};
use slot::Disk;
use slot::choice::{self, Slot};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The clock and the reboot, under the test's control.
#[derive(Debug)]
pub struct FakePlatform {
    pub now: Mutex<Timestamp>,
    pub reboots: AtomicUsize,
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

impl FakePlatform {
    pub fn set(&self, t: &str) {
        *self.now.lock().unwrap() = t.parse().unwrap();
    }
    pub fn reboots(&self) -> usize {
        self.reboots.load(Ordering::SeqCst)
    }
}

/// Starts at Tuesday 2026-11-10 00:00 UTC.
pub fn platform() -> Arc<FakePlatform> {
    Arc::new(FakePlatform {
        now: Mutex::new("2026-11-10T00:00:00Z".parse().unwrap()),
        reboots: AtomicUsize::new(0),
    })
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    /// The disk the agent works on: the loop device over `image`, or `image`.
    pub disk: PathBuf,
    key: SecretKey,
    _loop: Option<testkit::Loop>,
}

/// Waves that admit everyone.
pub fn everyone() -> Vec<manifest::Wave> {
    vec![manifest::Wave { start: "2026-01-01T00:00:00Z".parse().unwrap(), percent: 100 }]
}

impl Fixture {
    /// A disk whose slot A runs 1.0.0 (published), on a loop device when `on_loop` and the
    /// machine allows it, and `versions` published too with every machine admitted.
    pub fn new(sgdisk: &Path, on_loop: bool, versions: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let image = testkit::flatcar_image(sgdisk, dir.path(), 128, 40);
        let lo = if on_loop && testkit::is_root() { testkit::Loop::attach(&image, 512) } else { None };
        let disk = lo.as_ref().map_or_else(|| image.clone(), |l| l.dev.clone());
        let f = Fixture { dir, image, disk, key: SecretKey::from_seed([3; 32]), _loop: lo };
        std::fs::create_dir_all(f.path("keys")).unwrap();
        f.key.public().write_new(&f.path("keys/k.pub")).unwrap();
        f.publish("1.0.0", everyone(), "2026-11-01T00:00:00Z");
        for v in versions {
            f.publish(v, everyone(), "2026-11-01T00:00:00Z");
        }
        // Slot A was provisioned with 1.0.0: the state directory records it.
        std::fs::create_dir_all(f.path("state")).unwrap();
        std::fs::copy(f.path("build-1.0.0/manifest.json"), f.path("state/slot-A.manifest.json")).unwrap();
        f.write_config("");
        f
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Builds a 6 MiB image for `version` (content differs per version), signs it and adds it
    /// to the channel with `waves`, as published at `now`.
    pub fn publish(&self, version: &str, waves: Vec<manifest::Wave>, now: &str) {
        let seed = version.bytes().fold(7u8, |a, b| a.wrapping_mul(31).wrapping_add(b));
        let fs = self.path(&format!("fs-{version}"));
        let data: Vec<u8> =
            (0..(6u32 << 20)).map(|i| ((i / 4096) as u8).wrapping_mul(seed) ^ (i as u8)).collect();
        std::fs::write(&fs, data).unwrap();
        let out = self.path(&format!("build-{version}"));
        let opts = payload::BuildOptions {
            version: version.parse().unwrap(),
            arch: "x86_64".into(),
            kernel_cmdline: String::new(),
            chunk_size: 256 << 10,
            level: 3,
            threads: 2,
            salt: None,
            chunk_starts: Vec::new(),
            chunk_hash: manifest::ChunkHash::Blake3,
        };
        payload::build(&fs, &out, &opts, &|_| {}).unwrap();
        sign_document(&out.join("manifest.json"), std::slice::from_ref(&self.key)).unwrap();
        let policy = repo::TrustPolicy::new(TrustedKeys::new([self.key.public()]).unwrap(), 1).unwrap();
        let req = PublishRequest {
            repo: &self.path("repo"),
            image_dir: &out,
            channel: "stable",
            expires_in: jiff::SignedDuration::from_hours(24 * 365),
            waves,
            now: now.parse().unwrap(),
            threads: 2,
        };
        publish(&req, std::slice::from_ref(&self.key), &policy, &|_, _| {}).unwrap();
    }

    /// Damages `version`'s payload in the repository (a bad upload): 64 bytes in the middle.
    pub fn corrupt_payload(&self, version: &str) {
        let p = self.path(&format!("repo/images/{version}/x86_64/payload"));
        let mut bytes = std::fs::read(&p).unwrap();
        let mid = bytes.len() / 2;
        for b in &mut bytes[mid..mid + 64] {
            *b ^= 0x5a;
        }
        std::fs::write(&p, bytes).unwrap();
    }

    /// The configuration: the base (repository, keys, health dirs, state) plus `extra` as a
    /// drop-in, as an administrator would write it.
    pub fn write_config(&self, extra: &str) {
        let etc = self.path("root/etc/acl-update");
        std::fs::create_dir_all(etc.join("config.d")).unwrap();
        std::fs::write(
            etc.join("config.toml"),
            format!(
                "[updates]\nrepository = \"file://{}\"\ntries = 2\n[trust]\nkeys = [\"{}\"]\n\
                 [health]\nrequired-dir = \"{}\"\nwanted-dir = \"{}\"\ncheck-timeout = \"5s\"\n\
                 systemd = false\nkubelet = \"off\"\n[agent]\nstate-dir = \"{}\"\n",
                self.path("repo").display(),
                self.path("keys").display(),
                self.path("required.d").display(),
                self.path("wanted.d").display(),
                self.path("state").display()
            ),
        )
        .unwrap();
        std::fs::write(etc.join("config.d/50-test.toml"), extra).unwrap();
    }

    pub fn settings(&self) -> config::Settings {
        config::Settings::from_loaded(&config::load(&config::Sources::under(&self.path("root"))).unwrap())
            .unwrap()
    }

    /// Starts the daemon booted from `booted`.
    pub fn start(&self, booted: Slot, platform: &Arc<FakePlatform>) -> Running {
        let metrics = Arc::new(Metrics::new());
        let env = Env {
            settings: self.settings(),
            disk: self.disk.clone(),
            booted,
            machine_id: "test-machine".into(),
            arch: "x86_64".into(),
            platform: platform.clone(),
            tick: Duration::from_millis(20),
            metrics: Arc::clone(&metrics),
            coordinated: false,
            status: Default::default(),
            probes: Vec::new(),
            transitions: None,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(daemon::run(env, rx, async move {
            let _ = stop_rx.await;
        }));
        Running { tx, stop, task, metrics }
    }

    /// Runs the daemon booted from `booted` until `done` holds (or 60 s pass); then stops it.
    pub async fn run_until(&self, booted: Slot, platform: &Arc<FakePlatform>, done: impl Fn() -> bool) {
        let r = self.start(booted, platform);
        until("the daemon got there", &done).await;
        r.stop().await;
    }

    /// What the boot path does at power-on: choose a slot and spend a try.
    pub fn boot(&self) -> Slot {
        let mut d = Disk::open(&self.disk, true).unwrap();
        let (chosen, _) = choice::boot_attempt(&d.slots()).unwrap();
        d.update(|s| Ok(choice::boot_attempt(s).unwrap().1)).unwrap();
        chosen
    }

    pub fn slots(&self) -> slot::Slots {
        Disk::open(&self.disk, false).unwrap().slots()
    }

    pub fn state(&self) -> State {
        agent::persist::load(&self.path("state")).unwrap()
    }

    /// The history as "phase: message" lines.
    pub fn history(&self) -> Vec<String> {
        agent::history::read(&self.path("state"), 1000)
            .into_iter()
            .map(|e| format!("{}: {}", e.phase, e.message))
            .collect()
    }

    pub fn add_check(&self, dir: &str, name: &str, script: &str) {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::create_dir_all(self.path(dir)).unwrap();
        let check = self.path(&format!("{dir}/{name}"));
        std::fs::write(&check, script).unwrap();
        std::fs::set_permissions(&check, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// A daemon running in this process.
pub struct Running {
    tx: tokio::sync::mpsc::Sender<ApiRequest>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), daemon::AgentError>>,
    pub metrics: Arc<Metrics>,
}

impl Running {
    /// Sends a request as the local API would and returns the answer.
    pub async fn ask(&self, request: Request) -> Snapshot {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx.send((request, tx)).await.expect("daemon running");
        rx.await.expect("daemon answered")
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

/// Polls `done` every 20 ms for up to 60 s.
pub async fn until(what: &str, done: impl Fn() -> bool) {
    for _ in 0..3000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting until {what}");
}

/// Lets the daemon run for a while (many ticks) so that anything it would do, it does.
pub async fn settle() {
    tokio::time::sleep(Duration::from_millis(400)).await;
}
