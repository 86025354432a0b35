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
//! its own disk and follows the same releases (scenarios s1 to s4), booted while the first one
//! idles. Assertions read the serial console (journald forwards the journal
//! there) and, after power-off, the disk's GPT bits. Every boot's console log is kept.

// A test runner reports to its user on standard output.
#![allow(clippy::print_stdout)]

pub mod scenarios;
pub mod vm;

use anyhow::{Result, bail};
use std::path::{Path, PathBuf};
use std::time::Duration;

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
/// (possibly) still being built in the background while the first scenarios run.
#[derive(Debug)]
pub struct Images {
    /// 1.0.0, provisioned (a).
    pub v1: Image,
    /// 2.0.0 on another kernel build (b).
    pub v2: Image,
    /// The builds of the later images, until they are first needed.
    pending: Option<std::thread::JoinHandle<Result<Vec<Image>>>>,
    /// The later images: 3.0.0 whose required health check fails (c), 4.0.0 whose init dies
    /// (d), 5.0.0 cut by a power loss (e), 6.0.0 with a failing unit (g), 7.0.0 installed while
    /// the agent is frozen (h), 8.0.0 whose agent cannot run (j).
    later: Vec<Image>,
}

impl Images {
    /// The first two images, and a thread building the others.
    pub fn new(v1: Image, v2: Image, later: std::thread::JoinHandle<Result<Vec<Image>>>) -> Self {
        Self { v1, v2, pending: Some(later), later: Vec::new() }
    }

    /// The image of `version`; waits for the background builds the first time.
    pub fn get(&mut self, version: &str) -> Result<Image> {
        if let Some(h) = self.pending.take() {
            let t = std::time::Instant::now();
            self.later = h.join().map_err(|_| anyhow::anyhow!("the image builds panicked"))??;
            if t.elapsed() > Duration::from_secs(1) {
                println!("  waited {:.0} s for the background image builds", t.elapsed().as_secs_f64());
            }
        }
        self.later
            .iter()
            .find(|i| i.version == version)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no image {version} was built"))
    }
}

/// One run of the scenarios.
#[derive(Debug)]
pub struct Run<'a, L: Lab> {
    /// Images and repository.
    pub lab: &'a L,
    /// The images.
    pub images: Images,
    /// The machine.
    pub vm: vm::Vm,
    /// The Secure Boot machine (its own disk), for the scenarios `s1` to `s4`; none: skipped.
    pub secure_boot: Option<vm::Vm>,
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
            println!("  FAILED: expected {what}");
            self.failures.push(format!("expected {what}"));
        }
    }

    /// The slot bits of the disk (after power-off).
    pub fn bits(&self) -> Result<slot::Slots> {
        Ok(slot::Disk::open(&self.vm.disk, false)?.slots())
    }

    /// The slot bits of the Secure Boot machine's disk.
    pub fn secure_boot_bits(&self) -> Result<slot::Slots> {
        let vm = self.secure_boot.as_ref().ok_or_else(|| anyhow::anyhow!("no Secure Boot machine"))?;
        Ok(slot::Disk::open(&vm.disk, false)?.slots())
    }
}

/// Runs every scenario in order, then prints the timing table. With
/// `ACL_E2E_ONLY=secure-boot`, only the Secure Boot machine's scenarios (for work on the boot
/// path; CI runs them all).
pub fn run<L: Lab>(run: &mut Run<'_, L>) -> Result<()> {
    if std::env::var("ACL_E2E_ONLY").is_ok_and(|v| v == "secure-boot") {
        let v2 = run.images.v2.clone();
        run.lab.publish(&v2)?;
        let sb = scenarios::s1_secure_boot_fresh_disk_and_unsigned_kernel(run)?;
        run.lab.publish(&run.images.get("3.0.0")?)?;
        let sb = scenarios::s2_secure_boot_health_rollback(run, sb)?;
        run.lab.publish(&run.images.get("4.0.0")?)?;
        let sb = scenarios::s3_secure_boot_kernel_panic(run, sb)?;
        run.lab.publish(&run.images.get("5.0.0")?)?;
        scenarios::s4_secure_boot_update(run, sb)?;
        return report(run);
    }
    let b = scenarios::a_fresh_disk(run)?;
    let b = scenarios::i_sandbox(run, b)?;
    let b = scenarios::b_update(run, b)?;
    // The Secure Boot machine follows the same releases, booted while the other one idles: a
    // fresh disk and a kernel it refuses (2.0.0, unsigned), a failed health check (3.0.0), a
    // kernel panic (4.0.0), an update that is confirmed (5.0.0). Paused in between, so that it
    // installs nothing on its own meanwhile.
    let secure_boot = run.secure_boot.is_some();
    let sb =
        if secure_boot { Some(scenarios::s1_secure_boot_fresh_disk_and_unsigned_kernel(run)?) } else { None };
    let b = scenarios::c_health_rollback(run, b)?;
    let sb = match sb {
        Some(sb) => Some(scenarios::s2_secure_boot_health_rollback(run, sb)?),
        None => None,
    };
    let b = scenarios::d_kernel_panic(run, b)?;
    let sb = match sb {
        Some(sb) => Some(scenarios::s3_secure_boot_kernel_panic(run, sb)?),
        None => None,
    };
    let b = scenarios::e_power_cut(run, b)?;
    if let Some(sb) = sb {
        scenarios::s4_secure_boot_update(run, sb)?;
    }
    let b = scenarios::f_operator_rollback(run, b)?;
    let b = scenarios::g_failed_unit(run, b)?;
    let b = scenarios::h_frozen_agent(run, b)?;
    scenarios::j_agent_cannot_run(run, b)?;
    scenarios::k_edited_boot_entry(run)?;
    report(run)
}

/// The timing table, and the checks that failed without stopping the run.
fn report<L: Lab>(run: &Run<'_, L>) -> Result<()> {
    println!("\n| scenario | phase | seconds |\n|---|---|---|");
    for (name, phases) in &run.timings {
        for (phase, d) in phases {
            println!("| {name} | {phase} | {:.1} |", d.as_secs_f64());
        }
    }
    if !run.failures.is_empty() {
        bail!("e2e: {} check(s) failed:\n{}", run.failures.len(), run.failures.join("\n"));
    }
    println!("\ne2e: all scenarios passed; console logs in {}", run.vm.logs.display());
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

/// The image digest of a built image (reproducibility).
pub fn image_sha256(build: &Path) -> Result<String> {
    Ok(manifest_of(build)?.image_sha256.to_string())
}
