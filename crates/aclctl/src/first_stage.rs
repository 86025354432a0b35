//! `aclctl first-stage`: the first stage on the EFI system partition of a Secure Boot machine
//! (shim, GRUB, then a signed kernel and our initramfs, which choose the slot). Its two sets and
//! the crash-safe switch between them are crate `esp`'s; this is the command line: the disk's
//! lock, the partition's place from the GPT, words and exit codes.

use anyhow::{Context as _, Result};
use esp::{SetState, Window};
use slot::{Disk, system};
use std::io::Read as _;
use std::path::{Path, PathBuf};

/// A request refused before anything was written (exit code 3).
#[derive(Debug, thiserror::Error)]
#[error("{0}; nothing was written")]
pub(crate) struct Refused(pub(crate) String);

/// The disk given or the running system's, opened (with its lock when `writable`), and its ESP.
fn open(disk: Option<&Path>, writable: bool) -> Result<(Disk<std::fs::File>, Window, u64, u64)> {
    let path = match disk {
        Some(p) => p.to_owned(),
        None => system::system_disk(system::kernel_cmdline().as_deref())
            .map_err(anyhow::Error::msg)
            .context("no --disk given")?,
    };
    let disk = Disk::open(&path, writable)?;
    let (start, len) = disk.esp_extent()?;
    if writable && let Some(at) = mounted_at(disk.device(), &path, start) {
        return Err(Refused(format!(
            "the EFI system partition of {} is mounted at {at}: writing it behind the mounted file system would \
             corrupt both; unmount it first",
            path.display()
        ))
        .into());
    }
    let file = disk.device().try_clone().with_context(|| format!("open {} again", path.display()))?;
    Ok((disk, Window::new(file, start, len), start, len))
}

/// The EFI variable that says whether the firmware enforces Secure Boot (one byte after the
/// four bytes of attributes).
const SECURE_BOOT_VAR: &str = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d0-aa0d-00a0c901c3ee";

/// The kernel's lockdown state; Debian's kernels lock down when the firmware enforces Secure
/// Boot, and a kernel started by `kexec` may not see the firmware's variables.
const LOCKDOWN: &str = "/sys/kernel/security/lockdown";

/// Whether GRUB runs under Secure Boot: as given, or as this machine says: its firmware's
/// variable, else a locked-down kernel (neither: no).
pub(crate) fn secure_boot(given: Option<bool>) -> bool {
    given.unwrap_or_else(|| {
        let var = std::fs::read(SECURE_BOOT_VAR).is_ok_and(|v| v.get(4) == Some(&1));
        let locked = std::fs::read_to_string(LOCKDOWN)
            .is_ok_and(|l| l.contains("[integrity]") || l.contains("[confidentiality]"));
        var || locked
    })
}

/// Where the partition of `disk` (opened from `path`) that starts at byte `start` is mounted,
/// if it is: as a partition device of that block device, or as a loop device over `path` at
/// that offset (from /proc/self/mountinfo and sysfs).
fn mounted_at(disk: &std::fs::File, path: &Path, start: u64) -> Option<String> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let meta = disk.metadata().ok()?;
    let disk_dev = meta
        .file_type()
        .is_block_device()
        .then(|| format!("{}:{}", nix::sys::stat::major(meta.rdev()), nix::sys::stat::minor(meta.rdev())));
    let canonical = std::fs::canonicalize(path).ok();
    let read = |p: PathBuf| std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let (dev, point) = (*f.get(2)?, *f.get(4)?);
        let sys = Path::new("/sys/dev/block").join(dev);
        let partition = read(sys.join("start"))
            .and_then(|s| s.parse::<u64>().ok())
            .is_some_and(|s| s * 512 == start && disk_dev.is_some() && read(sys.join("../dev")) == disk_dev);
        let looped = read(sys.join("loop/backing_file")).is_some_and(|b| {
            Some(PathBuf::from(b)) == canonical
                && read(sys.join("loop/offset")).and_then(|o| o.parse::<u64>().ok()) == Some(start)
        });
        (partition || looped).then(|| point.to_owned())
    })
}

/// The first-stage set GRUB started this boot, when `disk` (given, or none: the system's) is
/// the running system's: `esp/grub.cfg` puts `acl.first_stage=` on the first stage's command
/// line and stage 1 passes it on to the slot's kernel.
fn started(disk: Option<&Path>) -> Option<esp::Set> {
    let cmdline = system::kernel_cmdline()?;
    let arg = |key: &str| cmdline.split_whitespace().find_map(|w| w.strip_prefix(key).map(str::to_owned));
    let set = esp::Set::from_name(&arg("acl.first_stage=")?)?;
    let ours = match (disk, arg("acl.disk=")) {
        (None, _) => true,
        (Some(given), Some(booted)) => {
            // acl.disk= is a path or PARTUUID= of one of its partitions (esp/grub.cfg).
            let booted = system::resolve_disk(&booted, Path::new("/sys"), Path::new("/dev")).ok();
            std::fs::canonicalize(given)
                .ok()
                .is_some_and(|g| booted.and_then(|b| std::fs::canonicalize(b).ok()) == Some(g))
        }
        (Some(_), None) => false,
    };
    ours.then_some(set)
}

fn machine(disk: Option<&Path>, secure: Option<bool>) -> esp::Machine {
    esp::Machine { secure_boot: secure_boot(secure), started: started(disk) }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20))
}

fn describe(s: &SetState) -> String {
    match s {
        SetState::Absent => "absent".into(),
        SetState::Incomplete(why) => format!("incomplete ({why})"),
        SetState::Complete(c) => format!(
            "complete: kernel {} sha256 {} ({}), initramfs {} sha256 {}",
            mib(c.kernel_bytes),
            &c.kernel_sha256[..16],
            if c.kernel_signed { "signed" } else { "NOT signed" },
            mib(c.initrd_bytes),
            &c.initrd_sha256[..16]
        ),
    }
}

/// `aclctl first-stage status`.
pub(crate) fn status(disk: Option<&Path>, secure: Option<bool>, json: bool) -> Result<()> {
    let m = machine(disk, secure);
    let (disk, mut esp, start, len) = open(disk, false)?;
    let st = esp::status(&mut esp, m)
        .with_context(|| format!("{}: the EFI system partition", disk.path().display()))?;
    if json {
        let set = |s: &SetState| match s {
            SetState::Absent => serde_json::json!({ "state": "absent" }),
            SetState::Incomplete(why) => serde_json::json!({ "state": "incomplete", "why": why }),
            SetState::Complete(c) => serde_json::json!({
                "state": "complete",
                "kernel_sha256": c.kernel_sha256, "kernel_bytes": c.kernel_bytes, "kernel_signed": c.kernel_signed,
                "initrd_sha256": c.initrd_sha256, "initrd_bytes": c.initrd_bytes,
            }),
        };
        let v = serde_json::json!({
            "disk": disk.path(), "esp_offset": start, "esp_bytes": len,
            "grubenv": match &st.env { Ok(s) => serde_json::json!({ "acl_set": s.name() }), Err(why) => serde_json::json!({ "invalid": why }) },
            "a": set(&st.a), "b": set(&st.b),
            "grub_starts": st.boots.map(|s| s.name()), "secure_boot": st.machine.secure_boot,
            "started_this_boot": st.machine.started.map(|s| s.name()),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "EFI system partition of {}: {} at byte {start}; Secure Boot {}",
        disk.path().display(),
        mib(len),
        if st.machine.secure_boot { "on (a set whose kernel is unsigned is skipped)" } else { "off" }
    );
    let first = esp::choice::order(st.env.as_ref().ok().copied())[0];
    match &st.env {
        Ok(s) => println!("{}: acl_set={s} (GRUB tries set {s} first, then {})", esp::ENV_FILE, s.other()),
        Err(why) => println!("{}: {why} (GRUB tries a, then b)", esp::ENV_FILE),
    }
    for s in esp::Set::BOTH {
        let mut marks = Vec::new();
        if s == first {
            marks.push("GRUB tries it first");
        }
        if st.machine.started == Some(s) {
            marks.push("this boot came through it");
        }
        let marks = if marks.is_empty() { String::new() } else { format!("  <- {}", marks.join("; ")) };
        println!("set {s}: {}{marks}", describe(st.set(s)));
    }
    if let Some(s) = st.machine.started {
        println!("this boot came through set {s} (acl.first_stage={s})");
    }
    match st.boots {
        Some(k) => println!("an update writes set {}, keeping set {k} (which GRUB starts)", k.other()),
        None => println!("no set is known to start: an update writes set a"),
    }
    Ok(())
}

/// `aclctl first-stage install`.
pub(crate) fn install(
    disk: Option<&Path>,
    kernel: &Path,
    initrd: &Path,
    secure: Option<bool>,
    allow_unsigned: bool,
) -> Result<()> {
    let mut head = Vec::new();
    std::fs::File::open(kernel)
        .and_then(|f| f.take(4096).read_to_end(&mut head))
        .with_context(|| format!("read {}", kernel.display()))?;
    if !allow_unsigned {
        match esp::pe::signed(&head) {
            Some(true) => {}
            Some(false) => {
                return Err(Refused(format!(
                    "{} carries no signature: under Secure Boot shim refuses it, and GRUB would start the other set \
                     (--allow-unsigned writes it anyway)",
                    kernel.display()
                ))
                .into());
            }
            None => {
                return Err(Refused(format!(
                    "{} is not an EFI kernel image (no PE header): GRUB cannot start it under Secure Boot \
                     (--allow-unsigned writes it anyway)",
                    kernel.display()
                ))
                .into());
            }
        }
    }
    let m = machine(disk, secure);
    let (disk, mut esp, _, _) = open(disk, true)?;
    let path: PathBuf = disk.path().to_owned();
    let done = esp::install(&mut esp, kernel, initrd, m, &mut |line| println!("{line}"))
        .with_context(|| format!("{}: the first stage on the EFI system partition", path.display()))?;
    println!(
        "first stage set {}: kernel sha256 {}, initramfs sha256 {}",
        done.set, done.contents.kernel_sha256, done.contents.initrd_sha256
    );
    Ok(())
}
