//! `cargo xtask e2e`: sets up what the end-to-end scenarios of `integration/e2e` need and runs
//! them: the test OS images built from `image-recipes/` (and one built twice, to show the build
//! is reproducible), a repository served by nginx on the port the images' configuration names,
//! and a fresh disk in Flatcar's layout with 1.0.0 provisioned into slot A. The Secure Boot
//! machine gets the same, each its own: a disk (with an EFI system partition), a repository,
//! and an nginx serving it on the same port inside a network namespace (`ip netns`) where that
//! machine's qemu runs, so both machines run their scenarios at the same time.

use crate::image::{self, ImageArgs};
use crate::nginx::{Netns, Nginx};
use anyhow::{Context as _, Result, bail};
use e2e::{Image, Images, Lab, Run};
use std::path::{Path, PathBuf};
use std::time::Instant;
use xshell::{Shell, cmd};

const E2E_TOOLS: [crate::tools::Tool; 7] = [
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("nginx", "nginx"),
    ("sgdisk", "gdisk"),
    ("mkfs.ext4", "e2fsprogs"),
    // The EFI system partition of the Secure Boot machine.
    ("mkfs.vfat", "dosfstools"),
    ("mcopy", "mtools"),
    // The Secure Boot machine's network namespace.
    ("ip", "iproute2"),
];

/// Debian's packages for the Secure Boot machine: the firmware (OVMF with Microsoft's keys
/// enrolled), shim signed by Microsoft, GRUB signed by Debian.
const SECURE_BOOT_DEBS: [&str; 3] = ["ovmf", "shim-signed", "grub-efi-amd64-signed"];

/// The Secure Boot disk's EFI system partition: shim, GRUB, the first stage's kernel and
/// initramfs (about 22 MiB), with room for a second set.
const ESP_MIB: u64 = 64;

/// The repository's port on the host; the guest reaches the host's loopback as 10.0.2.2
/// (qemu's user network), and `image-recipes/node.toml` names http://10.0.2.2:18080/.
const REPO_PORT: u16 = 18080;

/// The binaries `cargo xtask test` has already built (the dev profile, dependencies optimised):
/// a release build of the whole dependency tree would add minutes to every run.
const PROFILE: image::Profile = image::Profile::Dev;

/// Slot size: the systemd node image is about 190 MiB with its verity tree.
const SLOT_MIB: u64 = 256;

/// Images from xtask's builder, published with `aclpub` into `repo`, served by nginx. One per
/// machine: each machine has its repository.
struct XtaskLab {
    dir: PathBuf,
    repo: PathBuf,
    aclpub: PathBuf,
    /// Dropped before `netns`, the namespace it may run in.
    nginx: Option<Nginx>,
    netns: Option<Netns>,
}

impl Lab for XtaskLab {
    fn build(&self, recipe: &str, version: &str) -> Result<Image> {
        let sh = Shell::new()?;
        let root = crate::project_root();
        sh.change_dir(&root);
        let b = image::build(
            &sh,
            &ImageArgs {
                profile: PROFILE,
                recipe: root.join("image-recipes").join(recipe),
                version: version.into(),
                work: self.dir.join("images").join(format!("{version}-{recipe}")),
                repo: None,
                keys: vec![self.dir.join("keys/e2e.key")],
                trust: self.dir.join("trust"),
            },
        )?;
        Ok(Image { version: version.into(), build: b.build, vmlinuz: b.vmlinuz, initrd: b.initrd })
    }

    fn publish(&self, i: &Image) -> Result<()> {
        let out = std::process::Command::new(&self.aclpub)
            .arg("publish")
            .arg(&i.build)
            .arg("--repo")
            .arg(&self.repo)
            .args(["--channel", "stable", "--key"])
            .arg(self.dir.join("keys/e2e.key"))
            .arg("--trust")
            .arg(self.dir.join("trust"))
            .output()
            .context("run aclpub publish")?;
        if !out.status.success() {
            bail!(
                "aclpub publish {} into {} failed ({}): {}",
                i.version,
                self.repo.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    fn bytes_sent(&self) -> u64 {
        let work = if self.netns.is_some() { "nginx-secure-boot" } else { "nginx" };
        self.nginx.as_ref().map_or(0, |n| n.bytes_sent(&self.dir.join(work)))
    }
}

pub(crate) fn run(sh: &Shell) -> Result<()> {
    let started = Instant::now();
    crate::tools::ensure(sh, &E2E_TOOLS)?;
    crate::tools::ensure(sh, &image::IMAGE_TOOLS)?;
    image::build_binaries(sh, PROFILE)?;
    let root = sh.current_dir();
    let dir = root.join("target/e2e");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("trust"))?;
    let aclpub = PROFILE.bin(&root, "aclpub");
    let aclctl = PROFILE.bin(&root, "aclctl");
    {
        let _d = sh.push_dir(&dir);
        cmd!(sh, "{aclpub} keygen --out keys e2e").quiet().ignore_stdout().run()?;
    }
    std::fs::copy(dir.join("keys/e2e.pub"), dir.join("trust/e2e.pub"))?;
    let mut lab = XtaskLab {
        dir: dir.clone(),
        repo: dir.join("repo"),
        aclpub: aclpub.clone(),
        nginx: None,
        netns: None,
    };

    // Images: 1.0.0 and 2.0.0 before the first boot; the others in a background process at
    // low priority while the first scenarios boot (software emulation leaves the CPU idle
    // for much of a boot), with the reproducibility build last. Published scenario by scenario.
    let t = Instant::now();
    let v1 = lab.build("node.toml", "1.0.0")?;
    let v2 = lab.build("node-kernel-50.toml", "2.0.0")?;
    println!("images 1.0.0 and 2.0.0 built in {:.0} s", t.elapsed().as_secs_f64());
    let later = {
        let (dir, v1_digest) = (dir.clone(), e2e::image_sha256(&v1.build)?);
        let later = [
            ("node-bad-health.toml", "3.0.0"),
            ("node-panic.toml", "4.0.0"),
            ("node.toml", "5.0.0"),
            ("node-failed-unit.toml", "6.0.0"),
            ("node.toml", "7.0.0"),
            ("node-agent-broken.toml", "8.0.0"),
        ];
        std::thread::spawn(move || -> Result<Vec<e2e::Image>> {
            let t = Instant::now();
            let mut out = Vec::new();
            for (recipe, version) in later {
                out.push(build_niced(&dir, recipe, version, &format!("{version}-{recipe}"))?);
            }
            let again = build_niced(&dir, "node.toml", "1.0.0", "1.0.0-again")?;
            let d2 = e2e::image_sha256(&again.build)?;
            if v1_digest != d2 {
                bail!("not reproducible: the same recipe built twice gave images {v1_digest} and {d2}");
            }
            println!(
                "  (background) images 3.0.0 to 8.0.0 built, and node.toml 1.0.0 again with the same image sha256 {d2}, in {:.0} s",
                t.elapsed().as_secs_f64()
            );
            Ok(out)
        })
    };
    let images = Images::new(v1, v2, later);
    lab.publish(&images.v1)?;
    // Scenario e cuts the power half-way through the 5.0.0 download: on loopback a whole
    // adaptive download takes well under a second, less than the installer's one-second
    // journaling interval, so 5.0.0's payload comes at 512 KiB/s per request (its 4 requests in
    // flight: about 2 MiB/s, some 9 s for the ~17 MiB the update fetches).
    let slow = r"location ~ ^/images/5\.0\.0/[^/]+/payload$ { limit_rate 512k; }";
    lab.nginx = Some(Nginx::start_on(&dir.join("repo"), &dir.join("nginx"), REPO_PORT, slow)?);

    // A fresh disk: Flatcar's layout, 1.0.0 provisioned into A, an ext4 state partition.
    let disk = dir.join("disk.img");
    fresh_disk(sh, &dir, &aclctl, &disk, 4)?;
    state_partition(sh, &disk)?;
    let logs = dir.join("console");
    std::fs::create_dir_all(&logs)?;
    let vm = e2e::vm::Vm {
        disk,
        vmlinuz: images.v1.vmlinuz.clone(),
        initrd: images.v1.initrd.clone(),
        logs: logs.clone(),
        firmware: e2e::vm::Firmware::Direct,
        netns: None,
    };
    let unit_files: Vec<(String, PathBuf)> = ["acl-agentd.service", "acl-boot-deadline.service"]
        .iter()
        .map(|u| (format!("/lib/systemd/system/{u}"), root.join("systemd").join(u)))
        .collect();

    // The Secure Boot machine: its own disk, and its own repository served at the same address
    // in a network namespace of its own, where its qemu runs.
    let netns = Netns::new(&format!("acl-e2e-sb-{}", std::process::id()))?;
    let sb_vm = secure_boot_machine(sh, &dir, &aclctl, &images.v1, &logs, &netns.name)?;
    let sb_repo = dir.join("repo-secure-boot");
    let mut sb_lab = XtaskLab { dir: dir.clone(), repo: sb_repo.clone(), aclpub, nginx: None, netns: None };
    sb_lab.publish(&images.v1)?;
    sb_lab.nginx = Some(Nginx::start_in(&netns, &sb_repo, &dir.join("nginx-secure-boot"), REPO_PORT)?);
    sb_lab.netns = Some(netns);

    let sb = Run {
        lab: &sb_lab,
        aclctl: aclctl.clone(),
        images: images.clone(),
        vm: sb_vm,
        unit_files: unit_files.clone(),
        timings: Vec::new(),
        failures: Vec::new(),
    };
    let mut r = Run { lab: &lab, aclctl, images, vm, unit_files, timings: Vec::new(), failures: Vec::new() };
    e2e::run(&mut r, Some(sb))?;
    println!("e2e: {:.1} min in all", started.elapsed().as_secs_f64() / 60.0);
    Ok(())
}

/// A disk in Flatcar's layout with an EFI system partition of `esp_mib`, 1.0.0 (the newest
/// release published) provisioned into slot A.
fn fresh_disk(sh: &Shell, dir: &Path, aclctl: &Path, disk: &Path, esp_mib: u64) -> Result<()> {
    std::fs::File::create(disk)?.set_len((2 * SLOT_MIB + esp_mib + 508) << 20)?;
    let usr = "5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6";
    let (slot, esp) = (format!("+{SLOT_MIB}M"), format!("+{esp_mib}M"));
    cmd!(
        sh,
        "sgdisk -n 1:0:{esp} -c 1:EFI-SYSTEM -t 1:EF00 -n 2:0:+1M -c 2:BIOS-BOOT -t 2:EF02
         -n 3:0:{slot} -c 3:USR-A -t 3:{usr} -n 4:0:{slot} -c 4:USR-B -t 4:{usr}
         -n 6:0:+2M -c 6:OEM -n 7:0:+1M -c 7:OEM-CONFIG -n 9:0:0 -c 9:ROOT {disk}"
    )
    .quiet()
    .ignore_stdout()
    .run()?;
    let file_repo = format!("file://{}", dir.join("repo").display());
    let prov_state = dir.join(format!("provision-state-{}", stem_of(disk)));
    cmd!(sh, "{aclctl} provision --disk {disk} --repo {file_repo} --trust {dir}/trust --state-dir {prov_state} --tries 2")
        .run()?;
    Ok(())
}

fn stem_of(p: &Path) -> String {
    p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The ext4 state file system on partition 9.
fn state_partition(sh: &Shell, disk: &Path) -> Result<()> {
    let (start, len) = partition_extent(sh, disk, 9)?;
    let offset = format!("offset={start}");
    let kib = format!("{}k", len / 1024);
    cmd!(sh, "mkfs.ext4 -q -F -L acl-state -E {offset} {disk} {kib}").run()?;
    Ok(())
}

/// The Secure Boot machine: OVMF (Secure Boot on, Microsoft's keys), and a fresh disk whose EFI
/// system partition holds what a Debian-style installer puts there: shim as the removable-media
/// loader `EFI/BOOT/BOOTX64.EFI`, Debian's signed GRUB beside it, `dracut/esp/grub.cfg`, and
/// the first stage (1.0.0's signed kernel and its initramfs) as set a, written by
/// `aclctl first-stage install`. Everything signed
/// comes from Debian's packages, as they are.
fn secure_boot_machine(
    sh: &Shell,
    dir: &Path,
    aclctl: &Path,
    v1: &e2e::Image,
    logs: &Path,
    netns: &str,
) -> Result<e2e::vm::Vm> {
    let root = crate::project_root();
    let cache = root.join("target/image-cache");
    std::fs::create_dir_all(&cache)?;
    let sb = dir.join("secure-boot");
    let pkgs = sb.join("pkgs");
    std::fs::create_dir_all(&pkgs)?;
    for name in SECURE_BOOT_DEBS {
        let deb = crate::debs::fetch(sh, &cache, name)?;
        cmd!(sh, "dpkg-deb -x {deb} {pkgs}").run()?;
    }
    let ovmf = pkgs.join("usr/share/OVMF");
    let vars = sb.join("OVMF_VARS.fd");
    std::fs::copy(ovmf.join("OVMF_VARS_4M.ms.fd"), &vars)?;
    let disk = dir.join("secure-boot-disk.img");
    fresh_disk(sh, dir, aclctl, &disk, ESP_MIB)?;
    state_partition(sh, &disk)?;
    let (start, len) = partition_extent(sh, &disk, 1)?;
    let esp = sb.join("esp.img");
    let _ = std::fs::remove_file(&esp);
    let kib = (len / 1024).to_string();
    cmd!(sh, "mkfs.vfat -C -n ACL-ESP {esp} {kib}").quiet().ignore_stdout().run()?;
    let shim = pkgs.join("usr/lib/shim/shimx64.efi.signed");
    let grub = pkgs.join("usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed");
    let cfg = root.join("dracut/esp/grub.cfg");
    let (vmlinuz, initrd) = (&v1.vmlinuz, &v1.initrd);
    {
        let _env = sh.push_env("MTOOLS_SKIP_CHECK", "1");
        cmd!(sh, "mmd -i {esp} ::/EFI ::/EFI/BOOT ::/EFI/debian").run()?;
        cmd!(sh, "mcopy -i {esp} {shim} ::/EFI/BOOT/BOOTX64.EFI").run()?;
        cmd!(sh, "mcopy -i {esp} {grub} ::/EFI/BOOT/grubx64.efi").run()?;
        // Debian's GRUB looks for its configuration in EFI/debian; started from EFI/BOOT
        // (removable media), beside itself.
        cmd!(sh, "mcopy -i {esp} {cfg} ::/EFI/BOOT/grub.cfg").run()?;
        cmd!(sh, "mcopy -i {esp} {cfg} ::/EFI/debian/grub.cfg").run()?;
    }
    let seek = (start / 512).to_string();
    cmd!(sh, "dd if={esp} of={disk} bs=512 seek={seek} conv=notrunc,fsync status=none").run()?;
    // The first stage, as set a, written the way a node replaces it.
    cmd!(
        sh,
        "{aclctl} first-stage install --disk {disk} --kernel {vmlinuz} --initrd {initrd} --secure-boot on"
    )
    .run()?;
    println!(
        "Secure Boot machine: OVMF with Microsoft's keys, shim, Debian's signed GRUB, ESP of {ESP_MIB} MiB"
    );
    Ok(e2e::vm::Vm {
        disk,
        vmlinuz: v1.vmlinuz.clone(),
        initrd: v1.initrd.clone(),
        logs: logs.to_path_buf(),
        firmware: e2e::vm::Firmware::SecureBoot { code: ovmf.join("OVMF_CODE_4M.secboot.fd"), vars },
        netns: Some(netns.to_owned()),
    })
}

/// Builds `recipe` as `version` into `images/<work>` with `cargo xtask image` in a process at
/// low priority (its children inherit it): the booting machine keeps the CPU it needs.
fn build_niced(dir: &Path, recipe: &str, version: &str, work: &str) -> Result<e2e::Image> {
    let root = crate::project_root();
    let work = dir.join("images").join(work);
    let status = std::process::Command::new("nice")
        .args(["-n", "15"])
        .arg(std::env::current_exe()?)
        .arg("image")
        .arg(root.join("image-recipes").join(recipe))
        .args(["--version", version, "--work"])
        .arg(&work)
        .arg("--key")
        .arg(dir.join("keys/e2e.key"))
        .arg("--trust")
        .arg(dir.join("trust"))
        .args(["--profile", PROFILE.name()])
        .current_dir(&root)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("build-{version}-{recipe}.log")))?)
        .status()
        .context("start the image build")?;
    if !status.success() {
        bail!(
            "building {recipe} as {version} failed ({status}); see {}/build-{version}-{recipe}.log",
            dir.display()
        );
    }
    Ok(e2e::Image {
        version: version.into(),
        build: work.join("build"),
        vmlinuz: work.join("vmlinuz"),
        initrd: work.join("initrd.img"),
    })
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
