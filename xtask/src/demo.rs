//! The main job, end to end on this machine: keys, two OS images, a repository, verification,
//! then a node's disk (a GPT disk-image file in Flatcar's layout) updated twice with `aclctl`:
//! a full install of 1.0.0 and an adaptive one of 1.1.0 that fetches only the chunks it lacks.
//!
//! It uses the real tools: mkfs.erofs for the filesystems, sgdisk for the disk, nginx to serve
//! the repository over HTTP, aclpub, aclctl and the agent daemon acl-agentd for the rest. The
//! second update goes through the agent: it checks (in check-only mode, so it only reports),
//! `aclctl update --follow` asks it to install and shows the progress, it "reboots" (its reboot
//! command here only leaves a mark; the demo then plays the boot path with `aclctl boot`),
//! health-checks the new slot after the boot and confirms it.

use crate::tools;
use anyhow::{Context as _, Result};
use manifest::Manifest;
use std::collections::HashSet;
use std::path::Path;
use xshell::{Shell, cmd};

/// Packages of the demo OS: name, number of files, lines per file.
const PACKAGES: &[(&str, usize, usize)] = &[
    ("coreutils", 40, 2000),
    ("systemd", 60, 3000),
    ("kubelet", 8, 40_000),
    ("containerd", 10, 20_000),
    ("openssl", 12, 6000),
    ("kernel-modules", 80, 2500),
];

pub(crate) fn run(sh: &Shell) -> Result<()> {
    tools::ensure(sh, &tools::DEMO_TOOLS)?;
    cmd!(sh, "cargo build --quiet --locked -p publish -p aclctl -p agent").run()?;
    let root = sh.current_dir();
    let aclpub = root.join("target/debug/aclpub");
    let aclctl = root.join("target/debug/aclctl");
    let agentd = root.join("target/debug/acl-agentd");
    let demo = root.join("target/demo");
    if demo.exists() {
        std::fs::remove_dir_all(&demo).with_context(|| format!("remove {}", demo.display()))?;
    }
    std::fs::create_dir_all(demo.join("trust"))?;
    sh.change_dir(&demo);

    println!("\n== 1. three signing keys; nodes trust all three and require two signatures");
    for k in ["release-1", "release-2", "release-3"] {
        cmd!(sh, "{aclpub} keygen --out keys {k}").run()?;
        std::fs::copy(demo.join(format!("keys/{k}.pub")), demo.join(format!("trust/{k}.pub")))?;
    }

    println!("\n== 2. two OS filesystems (erofs); 1.1.0 upgrades one package");
    make_rootfs(&demo.join("rootfs-1.0.0"), "1.0.0", None)?;
    make_rootfs(&demo.join("rootfs-1.1.0"), "1.1.0", Some("openssl"))?;
    for v in ["1.0.0", "1.1.0"] {
        cmd!(sh, "mkfs.erofs --quiet -T0 -U 6c8e0a54-7a1d-4d2b-9a53-0c1c3f0b5e11 --all-root fs-{v}.erofs rootfs-{v}")
            .run()?;
    }

    println!("\n== 3. build, sign (2 of 3 keys), publish to channel stable");
    for v in ["1.0.0", "1.1.0"] {
        let cmdline = "console=ttyS0 quiet";
        cmd!(sh, "{aclpub} build fs-{v}.erofs --out build-{v} --version {v} --cmdline {cmdline}").run()?;
        cmd!(sh, "{aclpub} sign --key keys/release-1.key --key keys/release-2.key build-{v}/manifest.json")
            .run()?;
        cmd!(
            sh,
            "{aclpub} publish build-{v} --repo repo --channel stable --key keys/release-2.key --key keys/release-3.key --trust trust --threshold 2 --expires-in 30d"
        )
        .run()?;
    }

    println!("\n== 4. verify the whole repository offline, as a node would, remembering the index");
    cmd!(sh, "{aclpub} verify --repo repo --trust trust --threshold 2 --state accepted.json").run()?;
    cmd!(sh, "{aclpub} show repo").run()?;
    cmd!(sh, "{aclpub} show repo/images/1.1.0/x86_64").run()?;

    println!("\n== 5. what a node on 1.0.0 must download for 1.1.0 (chunks it lacks)");
    report_reuse(&demo.join("build-1.0.0"), &demo.join("build-1.1.0"))?;

    println!("\n== 6. a node's disk: GPT disk-image file, Flatcar layout, slot A booted");
    let disk = "node-disk.img";
    std::fs::File::create(demo.join(disk))?.set_len(256 << 20)?;
    let usr = "5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6";
    cmd!(
        sh,
        "sgdisk -n 1:0:+16M -c 1:EFI-SYSTEM -t 1:EF00 -n 2:0:+1M -c 2:BIOS-BOOT -t 2:EF02
         -n 3:0:+80M -c 3:USR-A -t 3:{usr} -n 4:0:+80M -c 4:USR-B -t 4:{usr}
         -n 6:0:+16M -c 6:OEM -n 7:0:+1M -c 7:OEM-CONFIG -n 9:0:0 -c 9:ROOT
         -A 3:set:48 -A 3:set:56 {disk}"
    )
    .quiet()
    .ignore_stdout()
    .run()?;
    cmd!(sh, "{aclctl} status --disk {disk} --state-dir state").run()?;

    println!("\n== 7. serve the repository with nginx and install 1.0.0 into slot B");
    let server = crate::nginx::Nginx::start(&demo.join("repo"), &demo.join("nginx"))?;
    let url = server.url();
    let trust = ["--trust", "trust", "--threshold", "2"];
    cmd!(
        sh,
        "{aclctl} update --disk {disk} --state-dir state --booted A --repo {url} {trust...} --version 1.0.0"
    )
    .run()?;

    println!("\n== 8. boot into B (the boot path spends a try); it is healthy: mark B good");
    cmd!(sh, "{aclctl} boot --disk {disk}").run()?;
    cmd!(sh, "{aclctl} mark-good --disk {disk} --state-dir state --booted B").run()?;

    println!(
        "\n== 9. the agent takes over: it finds 1.1.0; `aclctl update --follow` has it install 1.1.0 into A\n\
         (copying what B has) and shows the progress; then the agent reboots"
    );
    let agent_root = demo.join("agent-root");
    std::fs::create_dir_all(agent_root.join("etc/acl-update"))?;
    std::fs::create_dir_all(demo.join("health/required.d"))?;
    let check = demo.join("health/required.d/50-os-release");
    std::fs::write(
        &check,
        "#!/bin/sh\n# A real check would look at the booted system; this one passes.\nexit 0\n",
    )?;
    std::fs::set_permissions(&check, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let marker = demo.join("reboot-requested");
    std::fs::write(
        agent_root.join("etc/acl-update/config.toml"),
        format!(
            "[updates]\nrepository = \"{url}\"\n[trust]\nkeys = [\"{d}/trust\"]\nthreshold = 2\n\
             [health]\nrequired-dir = \"{d}/health/required.d\"\nwanted-dir = \"{d}/health/wanted.d\"\n\
             [agent]\nstate-dir = \"{d}/state\"\nsocket = \"{d}/run/agent.sock\"\nreboot-command = \"touch {m}\"\n",
            d = demo.display(),
            m = marker.display()
        ),
    )?;
    // Check-only: the agent reports what it finds; the operator says when to install.
    std::fs::create_dir_all(agent_root.join("etc/acl-update/config.d"))?;
    std::fs::write(agent_root.join("etc/acl-update/config.d/50-demo.toml"), "[updates]\nmode = \"check\"\n")?;
    cmd!(sh, "{aclctl} config --root {agent_root}").run()?;
    let disk_path = demo.join(disk);
    let socket = demo.join("run/agent.sock");
    let agent = Agent::start(&agentd, &agent_root, &disk_path, "B")?;
    agent.wait_for("the agent's first check", || {
        std::fs::read_to_string(demo.join("state/agent-state.json")).is_ok_and(|s| s.contains("available"))
    })?;
    cmd!(sh, "{aclctl} status --disk {disk} --state-dir state --socket {socket}").run()?;
    cmd!(sh, "{aclctl} update --socket {socket} --follow").run()?;
    agent.wait_for("the reboot request", || marker.exists())?;
    agent.stop();
    cmd!(sh, "{aclctl} status --disk {disk} --state-dir state").run()?;

    println!("\n== 10. power-on: the boot path picks A; the agent health-checks 1.1.0 and confirms it");
    cmd!(sh, "{aclctl} boot --disk {disk}").run()?;
    let agent = Agent::start(&agentd, &agent_root, &disk_path, "A")?;
    agent.wait_for("slot A confirmed", || slot_a_confirmed(&disk_path))?;
    agent.stop();
    drop(server);
    cmd!(sh, "{aclctl} status --disk {disk} --state-dir state").run()?;
    cmd!(sh, "{aclctl} history --state-dir state").run()?;
    cmd!(sh, "sgdisk -v {disk}").quiet().ignore_stdout().run()?;
    println!("\nsgdisk -v {disk}: no problems found");
    println!(
        "\ndemo finished: repository in {}, disk {}",
        demo.join("repo").display(),
        demo.join(disk).display()
    );
    Ok(())
}

/// acl-agentd running in the background on the demo's disk.
struct Agent(std::cell::RefCell<std::process::Child>);

impl Agent {
    fn start(agentd: &Path, root: &Path, disk: &Path, booted: &str) -> Result<Self> {
        println!(
            "$ {} --config-root {} --disk {} --booted {booted} &",
            agentd.display(),
            root.display(),
            disk.display()
        );
        let child = std::process::Command::new(agentd)
            .arg("--config-root")
            .arg(root)
            .arg("--disk")
            .arg(disk)
            .args(["--booted", booted])
            .spawn()
            .context("start acl-agentd")?;
        Ok(Self(std::cell::RefCell::new(child)))
    }

    /// Waits until `done` holds (at most 120 s) while the agent runs.
    fn wait_for(&self, what: &str, done: impl Fn() -> bool) -> Result<()> {
        let started = std::time::Instant::now();
        loop {
            if done() {
                return Ok(());
            }
            if let Some(status) = self.0.borrow_mut().try_wait()? {
                anyhow::bail!("acl-agentd exited early ({status}) waiting for {what}");
            }
            if started.elapsed() > std::time::Duration::from_secs(120) {
                anyhow::bail!("acl-agentd: no {what} in 120 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// SIGTERM, as systemd stops it.
    fn stop(self) {
        let mut child = self.0.borrow_mut();
        let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let _ = child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.get_mut().kill();
    }
}

/// Whether slot A (partition 3) has its successful bit, as sgdisk reads it.
fn slot_a_confirmed(disk: &Path) -> bool {
    std::process::Command::new("sgdisk")
        .args(["-i", "3"])
        .arg(disk)
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let flags = text.lines().find_map(|l| l.strip_prefix("Attribute flags: "))?.trim().to_owned();
            u64::from_str_radix(&flags, 16).ok()
        })
        .is_some_and(|bits| bits & (1 << 56) != 0)
}

/// A deterministic root filesystem; `upgraded` names a package whose files change.
fn make_rootfs(dir: &Path, version: &str, upgraded: Option<&str>) -> Result<()> {
    std::fs::create_dir_all(dir.join("etc"))?;
    std::fs::write(
        dir.join("etc/os-release"),
        format!("NAME=\"ACL demo\"\nID=acl\nVERSION_ID={version}\nPRETTY_NAME=\"ACL demo {version}\"\n"),
    )?;
    for &(pkg, files, lines) in PACKAGES {
        let pdir = dir.join("usr/lib").join(pkg);
        std::fs::create_dir_all(&pdir)?;
        let pkg_version = if upgraded == Some(pkg) { "2" } else { "1" };
        for f in 0..files {
            let mut x = ((f as u64 + 1) * 0x9E37_79B9) ^ pkg.len() as u64;
            let mut text = String::with_capacity(lines * 40);
            for l in 0..lines {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                text.push_str(&format!("{pkg}-{pkg_version} {f}:{l} {:016x} {}\n", x, x % 977));
            }
            std::fs::write(pdir.join(format!("file{f:03}")), text)?;
        }
    }
    Ok(())
}

fn report_reuse(old: &Path, new: &Path) -> Result<()> {
    let read = |d: &Path| -> Result<Manifest> {
        Ok(Manifest::from_bytes(&std::fs::read(d.join(payload::MANIFEST_FILE))?)?)
    };
    let (a, b) = (read(old)?, read(new)?);
    let have: HashSet<_> = a.chunks.iter().map(|c| c.digest).collect();
    let mut seen = HashSet::new();
    let (mut need, mut need_bytes, mut total_bytes) = (0, 0u64, 0u64);
    for c in &b.chunks {
        if seen.insert(c.offset) {
            total_bytes += u64::from(c.length);
            if !have.contains(&c.digest) {
                need += 1;
                need_bytes += u64::from(c.length);
            }
        }
    }
    println!(
        "1.1.0 has {} chunks; {} are not in 1.0.0: {:.2} MiB of {:.2} MiB payload ({:.1}%) to download",
        b.chunks.len(),
        need,
        need_bytes as f64 / 1048576.0,
        total_bytes as f64 / 1048576.0,
        100.0 * need_bytes as f64 / total_bytes as f64
    );
    Ok(())
}
