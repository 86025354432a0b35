//! `aclctl first-stage` on a GPT disk image whose EFI system partition mkfs.vfat made: install,
//! status, refusals (an unsigned kernel, a mounted partition), exit codes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn aclctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_aclctl")).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// A Flatcar-layout disk whose 4 MiB EFI system partition (at 1 MiB) holds an empty FAT.
fn disk(dir: &Path) -> Option<PathBuf> {
    let sgdisk = testkit::tool("sgdisk", "gdisk")?;
    let mkfs = testkit::tool("mkfs.vfat", "dosfstools")?;
    let img = testkit::flatcar_image(&sgdisk, dir, 64, 8);
    testkit::run(&mkfs, &["--offset", "2048", img.to_str()?, "4096"]);
    Some(img)
}

fn kernel(dir: &Path, name: &str, signed: bool) -> PathBuf {
    let mut d = vec![0x11u8; 300_000];
    testkit::efi_kernel_header(&mut d, signed);
    let p = dir.join(name);
    std::fs::write(&p, d).unwrap();
    p
}

#[test]
fn install_status_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let Some(img) = disk(dir.path()) else { return };
    let (signed, unsigned) = (kernel(dir.path(), "k", true), kernel(dir.path(), "k-unsigned", false));
    let initrd = dir.path().join("initrd");
    std::fs::write(&initrd, vec![7u8; 500_000]).unwrap();
    let d = img.to_str().unwrap();
    let (k, ku, i) = (signed.to_str().unwrap(), unsigned.to_str().unwrap(), initrd.to_str().unwrap());

    let o =
        aclctl(&["first-stage", "install", "--disk", d, "--kernel", k, "--initrd", i, "--secure-boot", "on"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("GRUB starts set a from the next boot"), "{}", text(&o));

    let o = aclctl(&["first-stage", "status", "--disk", d, "--secure-boot", "on", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["grub_starts"], "a", "{v}");
    assert_eq!(v["a"]["state"], "complete");
    assert_eq!(v["a"]["kernel_signed"], true);
    assert_eq!(v["b"]["state"], "absent");
    assert_eq!(v["esp_offset"], 1 << 20);

    // An unsigned kernel: refused (exit 3), nothing written.
    let before = std::fs::read(&img).unwrap();
    let o = aclctl(&[
        "first-stage",
        "install",
        "--disk",
        d,
        "--kernel",
        ku,
        "--initrd",
        i,
        "--secure-boot",
        "on",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("carries no signature"), "{}", text(&o));
    assert!(std::fs::read(&img).unwrap() == before, "nothing written");

    // A set that does not fit beside the one GRUB starts: refused (exit 3), nothing written.
    let big = dir.path().join("big");
    std::fs::write(&big, vec![1u8; 3 << 20]).unwrap();
    let o =
        aclctl(&["first-stage", "install", "--disk", d, "--kernel", k, "--initrd", big.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("bytes free"), "{}", text(&o));
    assert!(std::fs::read(&img).unwrap() == before, "nothing written");

    // A disk without an EFI system partition is named.
    let sgdisk = testkit::tool("sgdisk", "gdisk").unwrap();
    let plain = dir.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    let no_esp = testkit::flatcar_image(&sgdisk, &plain, 64, 8);
    testkit::run(&sgdisk, &["-t", "1:8300", no_esp.to_str().unwrap()]);
    let o = aclctl(&["first-stage", "status", "--disk", no_esp.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("has no EFI system partition"), "{}", text(&o));
}

#[test]
fn a_mounted_partition_is_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let Some(img) = disk(dir.path()) else { return };
    if !testkit::is_root() {
        return;
    }
    let Some(losetup) = testkit::tool("losetup", "mount") else { return };
    let out = Command::new(&losetup)
        .args(["--find", "--show", "--offset", "1048576", "--sizelimit", "4194304"])
        .arg(&img)
        .output()
        .unwrap();
    if !out.status.success() {
        assert!(std::env::var_os("ACL_REQUIRE_LOOP").is_none(), "loop devices required: {}", text(&out));
        return;
    }
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // Mounted as vfat where the kernel has it; else made ext4 and mounted (the check looks at
    // what is mounted where, before reading any file system).
    let mut mounted = Command::new("mount").args(["-t", "vfat", &dev]).arg(&mnt).status().unwrap().success();
    if !mounted && let Some(mkfs) = testkit::tool("mkfs.ext4", "e2fsprogs") {
        testkit::run(&mkfs, &["-q", "-F", &dev]);
        mounted = Command::new("mount").arg(&dev).arg(&mnt).status().unwrap().success();
    }
    let k = kernel(dir.path(), "k", true);
    let o = aclctl(&[
        "first-stage",
        "install",
        "--disk",
        img.to_str().unwrap(),
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        k.to_str().unwrap(),
        "--secure-boot",
        "on",
    ]);
    if mounted {
        let _ = Command::new("umount").arg(&mnt).status();
    }
    let _ = Command::new(&losetup).args(["-d", &dev]).status();
    assert!(mounted, "mount the partition");
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("is mounted at"), "{}", text(&o));
}
