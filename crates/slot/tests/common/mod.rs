//! Shared helpers: Flatcar-layout disks made by Debian's sgdisk, loop devices, tool checks.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The path of `tool`, or `None` after printing why the test is skipped. With
/// `ACL_REQUIRE_TOOLS` set (cargo xtask test, CI) a missing tool fails the test instead.
pub fn tool(name: &str, package: &str) -> Option<PathBuf> {
    let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists());
    if found.is_none() {
        assert!(std::env::var_os("ACL_REQUIRE_TOOLS").is_none(), "{name} ({package}) is required");
        eprintln!("skipped: {name} not installed (apt-get install {package})");
    }
    found
}

/// Runs a command, panicking with its stderr if it fails; returns stdout.
pub fn run(cmd: &Path, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("run {}: {e}", cmd.display()));
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}{}",
        cmd.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Partitions `target` (an image file or a block device) in Flatcar's layout, with gaps in the
/// numbering: 1 EFI-SYSTEM, 2 BIOS-BOOT, 3 USR-A, 4 USR-B, 6 OEM, 7 OEM-CONFIG, 9 ROOT.
/// Slot A is booted and good (priority 1, successful); B is empty (all zero).
pub fn flatcar_layout(sgdisk: &Path, target: &Path) {
    let usr = "5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6";
    let args = [
        "-n",
        "1:0:+8M",
        "-c",
        "1:EFI-SYSTEM",
        "-t",
        "1:EF00",
        "-n",
        "2:0:+1M",
        "-c",
        "2:BIOS-BOOT",
        "-t",
        "2:EF02",
        "-n",
        "3:0:+16M",
        "-c",
        "3:USR-A",
        "-t",
        &format!("3:{usr}"),
        "-n",
        "4:0:+16M",
        "-c",
        "4:USR-B",
        "-t",
        &format!("4:{usr}"),
        "-n",
        "6:0:+4M",
        "-c",
        "6:OEM",
        "-n",
        "7:0:+1M",
        "-c",
        "7:OEM-CONFIG",
        "-n",
        "9:0:0",
        "-c",
        "9:ROOT",
        "-A",
        "3:set:48",
        "-A",
        "3:set:56",
    ];
    let mut all: Vec<&str> = args.to_vec();
    all.push(target.to_str().unwrap());
    run(sgdisk, &all);
}

/// A 64 MiB Flatcar-layout image file in `dir`.
pub fn flatcar_image(sgdisk: &Path, dir: &Path) -> PathBuf {
    let path = dir.join("disk.img");
    std::fs::File::create(&path).unwrap().set_len(64 << 20).unwrap();
    flatcar_layout(sgdisk, &path);
    path
}

/// `sgdisk -v` finds no problem.
pub fn assert_sgdisk_clean(sgdisk: &Path, target: &Path) {
    let out = run(sgdisk, &["-v", target.to_str().unwrap()]);
    assert!(out.contains("No problems found"), "sgdisk -v {}: {out}", target.display());
}

/// The attribute flags of partition `n` as `sgdisk -i` prints them (16 hex digits).
pub fn sgdisk_attributes(sgdisk: &Path, target: &Path, n: u32) -> u64 {
    let out = run(sgdisk, &["-i", &n.to_string(), target.to_str().unwrap()]);
    let hex = out
        .lines()
        .find_map(|l| l.strip_prefix("Attribute flags: "))
        .unwrap_or_else(|| panic!("no attribute flags in: {out}"));
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

/// A loop device over a file; detached on drop.
pub struct Loop {
    pub dev: PathBuf,
    losetup: PathBuf,
}

impl Loop {
    /// Attaches `file` with the given logical sector size, or `None` (with a message) when loop
    /// devices are not available here.
    pub fn attach(file: &Path, sector: u32) -> Option<Loop> {
        let losetup = tool("losetup", "mount")?;
        let out = Command::new(&losetup)
            .args(["--find", "--show", "--sector-size", &sector.to_string()])
            .arg(file)
            .output()
            .unwrap();
        if !out.status.success() {
            let msg = String::from_utf8_lossy(&out.stderr);
            assert!(std::env::var_os("ACL_REQUIRE_LOOP").is_none(), "loop devices required: {msg}");
            eprintln!("skipped: no loop device ({msg})");
            return None;
        }
        let dev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        Some(Loop { dev, losetup })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new(&self.losetup).arg("-d").arg(&self.dev).status();
    }
}
