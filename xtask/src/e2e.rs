//! `cargo xtask e2e`: the whole product on real kernels in qemu (software emulation).
//!
//! Images are built from `image-recipes/` (see `image.rs`), published into a repository served
//! by nginx (reached from the guest at 10.0.2.2:18080, qemu's user network mapping the host's
//! loopback), and a fresh
//! disk-image file is provisioned with 1.0.0 in slot A (`aclctl provision`) and a state file
//! system on partition 9. qemu starts the first stage (kernel and initramfs with dracut/90acl,
//! as a bootloader would load them); it picks the slot by the gptprio bits, spends a try and
//! kexecs the slot's own kernel. `-no-reboot` turns every reboot into qemu exiting, so the
//! harness sees each boot, and can cut the power by killing qemu. Assertions read the serial
//! console and, after power-off, the disk's GPT bits.
//!
//! Scenarios, in order on one disk: (a) fresh disk, 1.0.0 boots and is confirmed; (b) the agent
//! finds 2.0.0 (another kernel build), installs, reboots, confirms; (c) 3.0.0 fails a required
//! health check: rolled back to 2.0.0, reason on the console; (d) 4.0.0's init dies so the
//! kernel panics: tries run out, 2.0.0 boots with no agent involved, 4.0.0 is skipped; (e) the
//! power is cut in the middle of the 5.0.0 download: the old slot boots, the install resumes and
//! completes; (f) `aclctl rollback --now`: the previous slot boots.

use crate::image::{self, ImageArgs};
use crate::nginx::Nginx;
use anyhow::{Context as _, Result, bail};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use xshell::{Shell, cmd};

const E2E_TOOLS: [crate::tools::Tool; 4] = [
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("nginx", "nginx"),
    ("sgdisk", "gdisk"),
    ("mkfs.ext4", "e2fsprogs"),
];

/// The repository's port on the host; the guest reaches the host's loopback as 10.0.2.2
/// (qemu's user network), and `image-recipes/node.toml` names http://10.0.2.2:18080/.
const REPO_PORT: u16 = 18080;

/// How long one step may take under software emulation before the run fails.
const STEP: Duration = Duration::from_secs(240);

pub(crate) fn run(sh: &Shell) -> Result<()> {
    crate::tools::ensure(sh, &E2E_TOOLS)?;
    crate::tools::ensure(sh, &image::IMAGE_TOOLS)?;
    image::build_binaries(sh)?;
    let root = sh.current_dir();
    let dir = root.join("target/e2e");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("trust"))?;
    let aclpub = root.join("target/release/aclpub");
    let aclctl = root.join("target/release/aclctl");
    {
        let _d = sh.push_dir(&dir);
        cmd!(sh, "{aclpub} keygen --out keys e2e").quiet().ignore_stdout().run()?;
    }
    std::fs::copy(dir.join("keys/e2e.pub"), dir.join("trust/e2e.pub"))?;
    let repo = dir.join("repo");
    let recipes = root.join("image-recipes");
    let mut timings = Vec::new();

    // Images: built up front, published scenario by scenario.
    let t = Instant::now();
    let build = |recipe: &str, version: &str, work: &str| {
        image::build(
            sh,
            &ImageArgs {
                recipe: recipes.join(recipe),
                version: version.into(),
                work: dir.join("images").join(work),
                repo: None,
                keys: vec![dir.join("keys/e2e.key")],
                trust: dir.join("trust"),
            },
        )
    };
    let v1 = build("node.toml", "1.0.0", "1.0.0")?;
    let again = build("node.toml", "1.0.0", "1.0.0-again")?;
    let (d1, d2) = (image_sha256(&v1.build)?, image_sha256(&again.build)?);
    if d1 != d2 {
        bail!("not reproducible: the same recipe built twice gave images {d1} and {d2}");
    }
    println!("reproducible: node.toml 1.0.0 built twice, image sha256 {d1} both times");
    let v2 = build("node-kernel-50.toml", "2.0.0", "2.0.0")?;
    let v3 = build("node-bad-health.toml", "3.0.0", "3.0.0")?;
    let v4 = build("node-panic.toml", "4.0.0", "4.0.0")?;
    let v5 = build("node.toml", "5.0.0", "5.0.0")?;
    println!("images built in {:.0} s", t.elapsed().as_secs_f64());
    let publish = |b: &image::Built| -> Result<()> {
        let (out, trust, key) = (&b.build, dir.join("trust"), dir.join("keys/e2e.key"));
        cmd!(sh, "{aclpub} publish {out} --repo {repo} --channel stable --key {key} --trust {trust}")
            .quiet()
            .ignore_stdout()
            .run()?;
        Ok(())
    };
    publish(&v1)?;
    let nginx = Nginx::start_on(&repo, &dir.join("nginx"), REPO_PORT)?;

    // A fresh disk: Flatcar's layout, 1.0.0 provisioned into A, an ext4 state partition.
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)?.set_len(640 << 20)?;
    let usr = "5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6";
    cmd!(
        sh,
        "sgdisk -n 1:0:+4M -c 1:EFI-SYSTEM -t 1:EF00 -n 2:0:+1M -c 2:BIOS-BOOT -t 2:EF02
         -n 3:0:+160M -c 3:USR-A -t 3:{usr} -n 4:0:+160M -c 4:USR-B -t 4:{usr}
         -n 6:0:+2M -c 6:OEM -n 7:0:+1M -c 7:OEM-CONFIG -n 9:0:0 -c 9:ROOT {disk}"
    )
    .quiet()
    .ignore_stdout()
    .run()?;
    let file_repo = format!("file://{}", repo.display());
    let prov_state = dir.join("provision-state");
    cmd!(sh, "{aclctl} provision --disk {disk} --repo {file_repo} --trust {dir}/trust --state-dir {prov_state} --tries 2")
        .run()?;
    let (start, len) = partition_extent(sh, &disk, 9)?;
    let offset = format!("offset={start}");
    let kib = format!("{}k", len / 1024);
    cmd!(sh, "mkfs.ext4 -q -F -L acl-state -E {offset} {disk} {kib}").run()?;
    let vm = Vm {
        disk: disk.clone(),
        vmlinuz: v1.vmlinuz.clone(),
        initrd: v1.initrd.clone(),
        logs: dir.join("console"),
    };
    std::fs::create_dir_all(&vm.logs)?;

    // (a) A fresh disk with 1.0.0 on slot A boots and is marked good.
    println!("\n== (a) fresh disk: 1.0.0 on slot A boots and is marked good");
    let mut b = vm.boot("a1")?;
    let up = b.wait_for("acl: up: slot=A version=1.0.0 kernel=6.1.0-56-amd64")?;
    let healthy = b.wait_for("1.0.0 is healthy")?;
    b.wait_for("mark good: done")?;
    b.power_off();
    let s = bits(&disk)?;
    ensure(s.a.successful() && s.a.priority() == 2, format!("A confirmed: {s:?}"))?;
    timings.push(("a", vec![("boot to userspace", up), ("to healthy", healthy - up)]));

    // (b) The agent finds 2.0.0, installs it into B, reboots; B boots, passes, is confirmed;
    // kernel and OS version changed.
    println!("\n== (b) the agent finds 2.0.0 (kernel 6.1.0-50), installs it into B, reboots into it");
    publish(&v2)?;
    let mut b = vm.boot("b1")?;
    let up1 = b.wait_for("acl: up: slot=A version=1.0.0")?;
    let inst = b.wait_for("installing 2.0.0")?;
    let done = b.wait_for("installed version=2.0.0")?;
    b.wait_for("rebooting into 2.0.0")?;
    let rebooted = b.wait_exit()?;
    let fetch_write = ms(&b.field_after("installed version=2.0.0", "write_ms=")?)?;
    let verify = ms(&b.field_after("installed version=2.0.0", "verify_ms=")?)?;
    let mut b = vm.boot("b2")?;
    let up2 = b.wait_for("acl: up: slot=B version=2.0.0 kernel=6.1.0-50-amd64")?;
    let healthy = b.wait_for("2.0.0 is healthy")?;
    b.wait_for("mark good: done")?;
    b.power_off();
    let s = bits(&disk)?;
    ensure(
        s.b.successful() && s.b.priority() == 2 && s.a.successful(),
        format!("B confirmed, A the way back: {s:?}"),
    )?;
    timings.push((
        "b",
        vec![
            ("boot to userspace", up1),
            ("check to install start", inst - up1),
            ("download+write (streamed together)", fetch_write),
            ("read-back verify", verify),
            ("install in all (manifest, plan, activation)", done - inst),
            ("to reboot", rebooted - done),
            ("reboot to userspace", up2),
            ("to healthy", healthy - up2),
        ],
    ));

    // (c) 3.0.0's required health check fails: rolled back to 2.0.0, reason recorded.
    println!("\n== (c) 3.0.0 fails its required health check: automatic rollback to 2.0.0");
    publish(&v3)?;
    let mut b = vm.boot("c1")?;
    let up1 = b.wait_for("acl: up: slot=B version=2.0.0")?;
    b.wait_for("agent started")?;
    b.type_line("aclctl check")?;
    let inst = b.wait_for("installing 3.0.0")?;
    let done = b.wait_for("installed version=3.0.0")?;
    b.wait_exit()?;
    let mut b = vm.boot("c2")?;
    let up2 = b.wait_for("acl: up: slot=A version=3.0.0")?;
    let failed = b.wait_for("3.0.0 failed its health checks")?;
    b.wait_for("app: not answering on :8080")?;
    b.wait_exit()?;
    let mut b = vm.boot("c3")?;
    let up3 = b.wait_for("acl: up: slot=B version=2.0.0")?;
    b.wait_for("agent started")?;
    b.type_line("aclctl history -n 3")?;
    b.wait_for("3.0.0 failed its health checks")?;
    b.power_off();
    let s = bits(&disk)?;
    ensure(s.a.priority() == 0 && s.b.successful(), format!("A given up, B runs: {s:?}"))?;
    timings.push((
        "c",
        vec![
            ("boot to userspace", up1),
            ("install (download, write, verify)", done - inst),
            ("reboot to userspace", up2),
            ("to health verdict", failed - up2),
            ("rollback reboot to userspace", up3),
        ],
    ));

    // (d) 4.0.0's kernel panics: tries run out, 2.0.0 boots without the agent, 4.0.0 is
    // reported failed and not retried.
    println!("\n== (d) 4.0.0 panics at boot: its tries run out, 2.0.0 comes back by itself");
    publish(&v4)?;
    let mut b = vm.boot("d1")?;
    b.wait_for("acl: up: slot=B version=2.0.0")?;
    b.wait_for("agent started")?;
    b.type_line("aclctl check")?;
    b.wait_for("installed version=4.0.0")?;
    b.wait_exit()?;
    let mut panics = Vec::new();
    for (i, left) in ["1", "0"].iter().enumerate() {
        let mut b = vm.boot(&format!("d{}", i + 2))?;
        b.wait_for(&format!("stage 1: slot A (4.0.0), tries left: {left}"))?;
        b.wait_for("Kernel panic")?;
        panics.push(b.wait_exit()?);
    }
    let mut b = vm.boot("d4")?;
    b.wait_for("stage 1: slot B (2.0.0)")?;
    let up = b.wait_for("acl: up: slot=B version=2.0.0")?;
    b.wait_for("4.0.0 did not boot; running 2.0.0; 4.0.0 is skipped")?;
    // A check now does not pick 4.0.0 again; the agent lists it as failed for good.
    b.wait_for("agent started")?;
    b.type_line("aclctl check")?;
    b.wait_for("4.0.0 failed 4 time(s): did not boot")?;
    b.power_off();
    let s = bits(&disk)?;
    ensure(!s.a.bootable() && s.b.successful(), format!("A out of tries, B runs: {s:?}"))?;
    timings.push((
        "d",
        vec![("panic boot 1", panics[0]), ("panic boot 2", panics[1]), ("fallback boot to userspace", up)],
    ));

    // (e) Power cut in the middle of the 5.0.0 download: the old slot boots, the install
    // resumes and completes.
    println!("\n== (e) power cut in the middle of the 5.0.0 download; it resumes after the reboot");
    publish(&v5)?;
    let payload = manifest_payload_size(&v5.build)?;
    let mut b = vm.boot("e1")?;
    b.wait_for("acl: up: slot=B version=2.0.0")?;
    let sent_before = nginx.bytes_sent(&dir.join("nginx"));
    b.wait_for("agent started")?;
    b.type_line("aclctl check")?;
    b.wait_for("installing into slot A")?;
    let cut = Instant::now();
    while nginx.bytes_sent(&dir.join("nginx")) - sent_before < payload * 6 / 10 {
        if cut.elapsed() > STEP {
            bail!("the 5.0.0 download did not get past 60% in {} s", STEP.as_secs());
        }
        if b.text().contains("installed version=5.0.0") {
            bail!("the install finished before the power cut; the payload is too small to cut it");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let fetched_before_cut = nginx.bytes_sent(&dir.join("nginx")) - sent_before;
    b.power_off();
    let s = bits(&disk)?;
    ensure(!s.a.bootable() && s.b.successful(), format!("half-written A is not bootable: {s:?}"))?;
    let mut b = vm.boot("e2")?;
    let up = b.wait_for("acl: up: slot=B version=2.0.0")?;
    let resumed_at = b.wait_for("installed version=5.0.0")?;
    let resumed = b.field_after("installed version=5.0.0", "resumed=")?;
    b.wait_exit()?;
    let fetched_after = nginx.bytes_sent(&dir.join("nginx")) - sent_before - fetched_before_cut;
    let mut b = vm.boot("e3")?;
    let up3 = b.wait_for("acl: up: slot=A version=5.0.0")?;
    let healthy = b.wait_for("5.0.0 is healthy")?;
    b.wait_for("mark good: done")?;
    b.power_off();
    let s = bits(&disk)?;
    ensure(s.a.successful() && s.a.priority() == 2, format!("A confirmed with 5.0.0: {s:?}"))?;
    let resumed_bytes: u64 = resumed.parse().unwrap_or(0);
    ensure(resumed_bytes > 0, format!("the install resumed with some bytes in place (resumed={resumed})"))?;
    timings.push((
        "e",
        vec![
            ("after the cut: boot to userspace", up),
            ("resumed install done", resumed_at - up),
            ("reboot to userspace", up3),
            ("to healthy", healthy - up3),
        ],
    ));
    println!(
        "power cut after {:.1} MiB of the {:.1} MiB payload; after the reboot {resumed} image bytes were already in place, {:.1} MiB fetched",
        mib(fetched_before_cut),
        mib(payload),
        mib(fetched_after)
    );

    // (f) aclctl rollback: the previous slot boots.
    println!("\n== (f) aclctl rollback --now: the previous slot boots");
    let mut b = vm.boot("f1")?;
    b.wait_for("acl: up: slot=A version=5.0.0")?;
    b.wait_for("agent started")?;
    b.type_line("aclctl rollback --now --disk /dev/vda")?;
    b.wait_for("rolled back by the operator; rebooting")?;
    b.wait_exit()?;
    let mut b = vm.boot("f2")?;
    let up = b.wait_for("acl: up: slot=B version=2.0.0")?;
    b.power_off();
    let s = bits(&disk)?;
    ensure(s.b.priority() == 2 && s.a.successful(), format!("B boots next, A still good: {s:?}"))?;
    timings.push(("f", vec![("rollback reboot to userspace", up)]));
    drop(nginx);

    println!("\n| scenario | phase | seconds |\n|---|---|---|");
    for (name, phases) in &timings {
        for (phase, d) in phases {
            println!("| {name} | {phase} | {:.1} |", d.as_secs_f64());
        }
    }
    println!("\ne2e: all scenarios passed; console logs in {}", vm.logs.display());
    Ok(())
}

fn ensure(ok: bool, what: String) -> Result<()> {
    if ok { Ok(()) } else { bail!("expected {what}") }
}

fn ms(v: &str) -> Result<Duration> {
    Ok(Duration::from_millis(v.parse().with_context(|| format!("{v:?} is not milliseconds"))?))
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

fn bits(disk: &Path) -> Result<slot::Slots> {
    Ok(slot::Disk::open(disk, false)?.slots())
}

fn image_sha256(build: &Path) -> Result<String> {
    let m = manifest::Manifest::from_bytes(&std::fs::read(build.join("manifest.json"))?)?;
    Ok(m.image_sha256.to_string())
}

fn manifest_payload_size(build: &Path) -> Result<u64> {
    let m = manifest::Manifest::from_bytes(&std::fs::read(build.join("manifest.json"))?)?;
    Ok(m.payload.size)
}

/// Byte offset and length of partition `n`.
fn partition_extent(sh: &Shell, disk: &Path, n: u32) -> Result<(u64, u64)> {
    let num = n.to_string();
    let info = cmd!(sh, "sgdisk -i {num} {disk}").read()?;
    let sector = |key: &str| -> Result<u64> {
        info.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("sgdisk -i {n}: no {key}"))
    };
    let (first, last) = (sector("First sector: ")?, sector("Last sector: ")?);
    Ok((first * 512, (last - first + 1) * 512))
}

/// The machine: the disk and the first stage a bootloader would load.
struct Vm {
    disk: PathBuf,
    vmlinuz: PathBuf,
    initrd: PathBuf,
    logs: PathBuf,
}

impl Vm {
    /// Powers on; the serial console goes to `logs/<name>.log`.
    fn boot(&self, name: &str) -> Result<Booted> {
        let log = self.logs.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let net = "user,id=n0".to_owned();
        let drive = format!("file={},format=raw,if=virtio", self.disk.display());
        let child = Command::new("qemu-system-x86_64")
            // The default CPU model: `-cpu max` doubled the boot time under emulation here.
            .args(["-m", "1024", "-smp", "1", "-nographic", "-no-reboot", "-kernel"])
            .arg(&self.vmlinuz)
            .arg("-initrd")
            .arg(&self.initrd)
            .args(["-append", "console=ttyS0 panic=3 acl.disk=/dev/vda", "-drive", &drive])
            .args(["-netdev", &net, "-device", "virtio-net-pci,netdev=n0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .spawn()
            .context("start qemu-system-x86_64")?;
        println!("  power on ({name}), console: {}", log.display());
        Ok(Booted { child, log, started: Instant::now() })
    }
}

/// A running qemu.
struct Booted {
    child: Child,
    log: PathBuf,
    started: Instant,
}

impl Booted {
    fn text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    fn fail(&mut self, what: &str) -> anyhow::Error {
        let text = self.text();
        let tail: Vec<&str> = text.lines().rev().take(25).collect::<Vec<_>>().into_iter().rev().collect();
        let _ = self.child.kill();
        let _ = self.child.wait();
        anyhow::anyhow!("{what} ({}); last console lines:\n{}", self.log.display(), tail.join("\n"))
    }

    /// Waits until `pattern` is on the console; the time since power-on.
    fn wait_for(&mut self, pattern: &str) -> Result<Duration> {
        loop {
            if self.text().contains(pattern) {
                let at = self.started.elapsed();
                println!("  {:6.1} s  {pattern}", at.as_secs_f64());
                return Ok(at);
            }
            if let Some(status) = self.child.try_wait()? {
                return Err(self.fail(&format!("the machine stopped ({status}) before {pattern:?}")));
            }
            if self.started.elapsed() > STEP {
                return Err(self.fail(&format!("no {pattern:?} within {} s", STEP.as_secs())));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for the machine to reboot (qemu exits: -no-reboot); the time since power-on.
    fn wait_exit(&mut self) -> Result<Duration> {
        loop {
            if self.child.try_wait()?.is_some() {
                let at = self.started.elapsed();
                println!("  {:6.1} s  (reboot)", at.as_secs_f64());
                return Ok(at);
            }
            if self.started.elapsed() > STEP {
                return Err(self.fail(&format!("no reboot within {} s", STEP.as_secs())));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Types a line on the serial console's shell.
    fn type_line(&mut self, line: &str) -> Result<()> {
        let stdin = self.child.stdin.as_mut().context("qemu's stdin")?;
        stdin.write_all(format!("{line}\n").as_bytes())?;
        stdin.flush()?;
        println!("  {:6.1} s  # {line}", self.started.elapsed().as_secs_f64());
        Ok(())
    }

    /// The value after `key` on the first console line containing `line`.
    fn field_after(&self, line: &str, key: &str) -> Result<String> {
        let text = self.text();
        let l = text.lines().find(|l| l.contains(line)).with_context(|| format!("no {line:?} line"))?;
        let v = l
            .split(key)
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .with_context(|| format!("no {key} in {l:?}"))?;
        Ok(v.to_owned())
    }

    /// Pulls the plug.
    fn power_off(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        println!("  {:6.1} s  (power off)", self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}
