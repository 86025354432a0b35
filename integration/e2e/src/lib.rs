//! The end-to-end scenarios: the whole product on real kernels in qemu (software emulation),
//! on the test node OS of `image-recipes/node.toml`: systemd as PID 1, journald, udev, D-Bus,
//! networkd, containerd running a container workload, and `acl-agentd` started by the
//! repository's own unit file.
//!
//! `cargo xtask e2e` builds the images (xtask's image builder, behind [`Lab`]), publishes them
//! into a repository served by nginx (the guest reaches it at 10.0.2.2:18080, qemu's user
//! network mapping the host's loopback), provisions a fresh disk-image file with 1.0.0 in slot
//! A and a state file system on partition 9, and calls [`run`].
//!
//! The scenarios run in order on that one disk, each a function in [`scenarios`]. A boot that
//! ends one scenario starts the next where it can (the next release is published and checked
//! while the node is up), so sixteen boots cover eleven scenarios: software emulation makes every
//! boot cost a minute. A second machine with UEFI Secure Boot enforced ([`vm::Firmware`]) has
//! its own disk and its own repository (scenarios s1 to s4), and runs at the same time on a
//! thread of its own: its repository is served in a network namespace of its own, so that the
//! same address in the guest (10.0.2.2:18080) reaches another server, and the two machines
//! publish independently. Lines each machine prints start with its label. Assertions read the
//! serial console (journald forwards the journal there) and, after power-off, the disk's GPT
//! bits. Every boot's console log is kept.

// A test runner reports to its user on standard output.
#![allow(clippy::print_stdout)]

use anyhow::{Context as _, Result, bail};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

thread_local! {
    /// What starts every line this thread prints (the machine it drives), if anything.
    static LABEL: std::cell::Cell<&'static str> = const { std::cell::Cell::new("") };
}

/// Prints a line (or several) to the run's output, each starting with this thread's label.
#[macro_export]
macro_rules! say {
    ($($t:tt)*) => { $crate::say_lines(&format!($($t)*)) };
}

/// See [`say!`].
pub fn say_lines(text: &str) {
    let label = LABEL.get();
    for line in text.split('\n') {
        if line.is_empty() { println!() } else { println!("{label}{line}") }
    }
}

// After `say!`, which they use.
pub mod scenarios;
pub mod vm;

/// A built image.
#[derive(Debug, Clone)]
pub struct Image {
    /// The version.
    pub version: String,
    /// `aclpub build` output (manifest.json, payload).
    pub build: PathBuf,
    /// Its kernel and initramfs (also inside the image), for a first stage.
    pub vmlinuz: PathBuf,
    /// See `vmlinuz`.
    pub initrd: PathBuf,
}

/// What the scenarios need from the machine that runs them: images and a repository.
pub trait Lab {
    /// Builds `recipe` (a file name in `image-recipes/`) as `version`.
    fn build(&self, recipe: &str, version: &str) -> Result<Image>;
    /// Publishes a built image into the channel the node follows.
    fn publish(&self, image: &Image) -> Result<()>;
    /// Bytes the repository's web server has sent so far.
    fn bytes_sent(&self) -> u64;
}

/// The images of the scenarios: 1.0.0 and 2.0.0 built before the first boot, the others
/// (possibly) still being built in the background while the first scenarios run. Cloned, it
/// shares the background builds: both machines wait for the same ones.
#[derive(Debug, Clone)]
pub struct Images {
    /// 1.0.0, provisioned (a).
    pub v1: Image,
    /// 2.0.0 on another kernel build (b).
    pub v2: Image,
    /// The later images: 3.0.0 whose required health check fails (c), 4.0.0 whose init dies
    /// (d), 5.0.0 cut by a power loss (e), 6.0.0 with a failing unit (g), 7.0.0 installed while
    /// the agent is frozen (h), 8.0.0 whose agent cannot run (j); built by a thread until they
    /// are first needed.
    later: Arc<Mutex<Later>>,
}

/// The background builds, then their outcome.
#[derive(Debug)]
enum Later {
    Building(std::thread::JoinHandle<Result<Vec<Image>>>),
    Built(Vec<Image>),
    Failed(String),
}

impl Images {
    /// The first two images, and a thread building the others.
    pub fn new(v1: Image, v2: Image, later: std::thread::JoinHandle<Result<Vec<Image>>>) -> Self {
        Self { v1, v2, later: Arc::new(Mutex::new(Later::Building(later))) }
    }

    /// The image of `version`; waits for the background builds the first time.
    pub fn get(&self, version: &str) -> Result<Image> {
        let mut later = self.later.lock().map_err(|_| anyhow::anyhow!("an image wait panicked"))?;
        if matches!(*later, Later::Building(_)) {
            let t = std::time::Instant::now();
            let Later::Building(h) = std::mem::replace(&mut *later, Later::Failed(String::new())) else {
                unreachable!("matched above")
            };
            *later = match h.join() {
                Ok(Ok(images)) => Later::Built(images),
                Ok(Err(e)) => Later::Failed(format!("{e:#}")),
                Err(_) => Later::Failed("the image builds panicked".into()),
            };
            if t.elapsed() > Duration::from_secs(1) {
                say!("  waited {:.0} s for the background image builds", t.elapsed().as_secs_f64());
            }
        }
        match &*later {
            Later::Built(images) => images
                .iter()
                .find(|i| i.version == version)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("no image {version} was built")),
            Later::Failed(e) => bail!("the background image builds failed: {e}"),
            Later::Building(_) => unreachable!("joined above"),
        }
    }
}

/// One run of the scenarios.
#[derive(Debug)]
pub struct Run<'a, L: Lab> {
    /// Images and repository.
    pub lab: &'a L,
    /// `aclctl` on this machine (the host), for disk images while their machine is off.
    pub aclctl: PathBuf,
    /// The images.
    pub images: Images,
    /// The machine.
    pub vm: vm::Vm,
    /// Repository files the image must hold byte for byte: (path in the guest, file here).
    pub unit_files: Vec<(String, PathBuf)>,
    /// Per scenario, its phases and how long each took.
    pub timings: Vec<(&'static str, Vec<(&'static str, Duration)>)>,
    /// Failed checks that did not stop the run (measurements whose failure leaves the node as
    /// the next scenario needs it); the run fails at its end if there are any.
    pub failures: Vec<String>,
}

impl<L: Lab> Run<'_, L> {
    /// Records a scenario's phase timings for the closing table.
    pub fn time(&mut self, scenario: &'static str, phases: Vec<(&'static str, Duration)>) {
        self.timings.push((scenario, phases));
    }

    /// A check that does not stop the run: recorded, and reported at its end.
    pub fn check(&mut self, ok: bool, what: impl std::fmt::Display) {
        if !ok {
            say!("  FAILED: expected {what}");
            self.failures.push(format!("expected {what}"));
        }
    }

    /// The slot bits of the disk (after power-off).
    pub fn bits(&self) -> Result<slot::Slots> {
        Ok(slot::Disk::open(&self.vm.disk, false)?.slots())
    }
}

/// Runs every scenario, then prints the timing table: the first machine's in order on this
/// thread and, if `secure_boot` is given, the Secure Boot machine's at the same time on another.
/// With `ACL_E2E_ONLY=secure-boot`, only the Secure Boot machine's (for work on the boot path;
/// CI runs them all).
pub fn run<L: Lab + Sync>(first: &mut Run<'_, L>, secure_boot: Option<Run<'_, L>>) -> Result<()> {
    if std::env::var("ACL_E2E_ONLY").is_ok_and(|v| v == "secure-boot") {
        let mut sb = secure_boot.context("ACL_E2E_ONLY=secure-boot: no Secure Boot machine")?;
        let r = secure_boot_scenarios(&mut sb);
        return report(&[(&sb, r)]);
    }
    let (r, sb) = std::thread::scope(|s| {
        let sb = secure_boot.map(|mut sb| {
            s.spawn(move || {
                LABEL.set("[secure boot] ");
                let r = secure_boot_scenarios(&mut sb);
                (sb, r)
            })
        });
        let r = first_machine(first);
        if let Err(e) = &r {
            say!("first machine: {e:#}");
        }
        (r, sb.map(|h| h.join()))
    });
    match sb {
        None => report(&[(first, r)]),
        Some(Ok((sb, sb_r))) => report(&[(first, r), (&sb, sb_r)]),
        Some(Err(_)) => {
            report(&[(first, r)])?;
            bail!("the Secure Boot machine's thread panicked")
        }
    }
}

/// The first machine (no firmware): scenarios a to k, in order.
fn first_machine<L: Lab>(run: &mut Run<'_, L>) -> Result<()> {
    let b = scenarios::a_fresh_disk(run)?;
    let b = scenarios::i_sandbox(run, b)?;
    let b = scenarios::b_update(run, b)?;
    let b = scenarios::c_health_rollback(run, b)?;
    let b = scenarios::d_kernel_panic(run, b)?;
    let b = scenarios::e_power_cut(run, b)?;
    let b = scenarios::f_operator_rollback(run, b)?;
    let b = scenarios::g_failed_unit(run, b)?;
    let b = scenarios::h_frozen_agent(run, b)?;
    scenarios::j_agent_cannot_run(run, b)?;
    scenarios::k_edited_boot_entry(run)
}

/// The Secure Boot machine, with a repository of its own: a fresh disk and a kernel it refuses
/// (2.0.0, unsigned), a failed health check (3.0.0), a kernel panic (4.0.0), an update that is
/// confirmed (5.0.0). Paused between scenarios, so that it installs nothing before its
/// scenario asks.
fn secure_boot_scenarios<L: Lab>(run: &mut Run<'_, L>) -> Result<()> {
    let v2 = run.images.v2.clone();
    run.lab.publish(&v2)?;
    let sb = scenarios::s1_secure_boot_fresh_disk_and_unsigned_kernel(run)?;
    run.lab.publish(&run.images.get("3.0.0")?)?;
    let sb = scenarios::s2_secure_boot_health_rollback(run, sb)?;
    run.lab.publish(&run.images.get("4.0.0")?)?;
    let sb = scenarios::s3_secure_boot_kernel_panic(run, sb)?;
    run.lab.publish(&run.images.get("5.0.0")?)?;
    scenarios::s4_secure_boot_update(run, sb)
}

/// The timing tables, and the checks that failed without stopping the runs; fails if a run
/// failed.
fn report<L: Lab>(runs: &[(&Run<'_, L>, Result<()>)]) -> Result<()> {
    let mut failed = Vec::new();
    for (run, outcome) in runs {
        println!("\n| scenario | phase | seconds |\n|---|---|---|");
        for (name, phases) in &run.timings {
            for (phase, d) in phases {
                println!("| {name} | {phase} | {:.1} |", d.as_secs_f64());
            }
        }
        failed.extend(run.failures.iter().cloned());
        if let Err(e) = outcome {
            failed.push(format!("{e:#}"));
        }
    }
    if !failed.is_empty() {
        bail!("e2e: {} failure(s):\n{}", failed.len(), failed.join("\n"));
    }
    let logs = runs.first().map(|(r, _)| r.vm.logs.display().to_string()).unwrap_or_default();
    println!("\ne2e: all scenarios passed; console logs in {logs}");
    Ok(())
}

/// Fails with `what` unless `ok`.
pub fn ensure(ok: bool, what: impl std::fmt::Display) -> Result<()> {
    if ok { Ok(()) } else { bail!("expected {what}") }
}

/// The signed manifest of a built image.
pub fn manifest_of(build: &Path) -> Result<manifest::Manifest> {
    Ok(manifest::Manifest::from_bytes(&std::fs::read(build.join("manifest.json"))?)?)
}

/// Payload bytes an install of `new` fetches when the other slot holds `old`: every frame of
/// a chunk whose digest `old` does not list, except the dm-verity tree chunks the node computes
/// (what the installer's plan requests).
pub fn fetched_bytes(old: &manifest::Manifest, new: &manifest::Manifest) -> u64 {
    install::plan::fetch_bytes_for(new, Some(old))
}

/// The image digest of a built image (reproducibility).
pub fn image_sha256(build: &Path) -> Result<String> {
    Ok(manifest_of(build)?.image_sha256.to_string())
}
