//! The main job, end to end on this machine: keys, two OS images, a repository, verification.
//!
//! Later issues extend it to a full update of a disk-image file through the agent; for now it
//! exercises everything a release engineer does, with the real tools (mkfs.erofs for the
//! filesystems, aclpub for the rest), and reports how much of v2 an installed v1 already has.

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
    cmd!(sh, "cargo build --quiet --locked -p publish").run()?;
    let root = sh.current_dir();
    let aclpub = root.join("target/debug/aclpub");
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
        let cmdline = format!("console=ttyS0 acl.version={v}");
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
    println!("\ndemo finished: repository in {}", demo.join("repo").display());
    Ok(())
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
    let have: HashSet<_> = a.chunks.iter().map(|c| c.sha256).collect();
    let mut seen = HashSet::new();
    let (mut need, mut need_bytes, mut total_bytes) = (0, 0u64, 0u64);
    for c in &b.chunks {
        if seen.insert(c.offset) {
            total_bytes += u64::from(c.length);
            if !have.contains(&c.sha256) {
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
