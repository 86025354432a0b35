//! The running system: its kernel command line, the disk it booted from and the booted slot.
//! (Reads /proc and /sys; the parsing itself is in [`crate::booted`].)

use crate::Disk;
use crate::booted::{self, BootedFrom};
use crate::choice::Slot;
use std::path::{Path, PathBuf};

/// /proc/cmdline, if readable.
pub fn kernel_cmdline() -> Option<String> {
    std::fs::read_to_string("/proc/cmdline").ok()
}

/// The booted slot on `disk`, if the command line names one of its slot partitions.
pub fn booted_slot<D: crate::table::BlockDevice>(disk: &Disk<D>, cmdline: Option<&str>) -> Option<Slot> {
    match booted::from_cmdline(cmdline?)? {
        BootedFrom::Slot(s) => Some(s),
        BootedFrom::PartUuid(u) => disk.slot_with_partuuid(u),
        BootedFrom::PartLabel(l) => Slot::BOTH.into_iter().find(|&s| crate::slot_label(s) == l),
    }
}

/// The whole disk that holds the slot partition named on the command line.
pub fn system_disk(cmdline: Option<&str>) -> Result<PathBuf, String> {
    let from = cmdline.and_then(booted::from_cmdline);
    let link = match from {
        Some(BootedFrom::PartUuid(u)) => PathBuf::from(format!("/dev/disk/by-partuuid/{u}")),
        Some(BootedFrom::PartLabel(l)) => PathBuf::from(format!("/dev/disk/by-partlabel/{l}")),
        _ => {
            return Err("the kernel command line names no slot partition (usr=PARTUUID=... or \
                        usr=PARTLABEL=...); give the disk explicitly"
                .into());
        }
    };
    let part = std::fs::canonicalize(&link).map_err(|e| format!("resolve {}: {e}", link.display()))?;
    let name = part.file_name().and_then(|n| n.to_str()).ok_or("partition device has no name")?;
    // /sys/class/block/<partition> links into its parent disk's directory.
    let sys = std::fs::canonicalize(format!("/sys/class/block/{name}"))
        .map_err(|e| format!("find {name} in sysfs: {e}"))?;
    let parent = sys.parent().and_then(|p| p.file_name()).and_then(|n| n.to_str()).ok_or("no parent disk")?;
    Ok(PathBuf::from(format!("/dev/{parent}")))
}

/// The disk a boot parameter names (`acl.disk=`): a device path as it is, or `PARTUUID=<uuid>`
/// of any of its partitions (the EFI system partition GRUB loaded from, say), found among the
/// whole disks the kernel lists under `sys` (normally `/sys`) by reading their GPTs, with
/// device nodes under `dev` (normally `/dev`). Device names are not stable (an Azure VM's OS
/// disk may be `sda` or `sdb`, NVMe names follow probe order), a partition's GUID is; and this
/// needs no udev rules in the initramfs.
pub fn resolve_disk(spec: &str, sys: &Path, dev: &Path) -> Result<PathBuf, String> {
    let Some(uuid) = spec.strip_prefix("PARTUUID=").or_else(|| spec.strip_prefix("partuuid=")) else {
        return Ok(PathBuf::from(spec));
    };
    let uuid = uuid::Uuid::parse_str(uuid).map_err(|e| format!("{spec}: not a partition UUID: {e}"))?;
    let entries =
        std::fs::read_dir(sys.join("class/block")).map_err(|e| format!("list {}: {e}", sys.display()))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| !e.path().join("partition").exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    let holds = |name: &String| {
        let file = std::fs::File::open(dev.join(name)).ok()?;
        let table = crate::table::read(&file).ok()?;
        table.entries().iter().any(|e| e.unique_guid == uuid).then(|| dev.join(name))
    };
    // A copy of the disk attached beside it holds the same GUIDs: naming one of the two would
    // boot whichever sorts first, so the ambiguity is refused.
    match names.iter().filter_map(holds).collect::<Vec<_>>()[..] {
        [ref one] => Ok(one.clone()),
        [] => Err(format!("no disk holds a GPT partition with PARTUUID {uuid} (yet)")),
        ref many => Err(format!(
            "PARTUUID {uuid} is on more than one disk ({}); name the disk by path",
            many.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GPT of one partition whose unique GUID is `uuid`, in an image file.
    fn disk_with(sgdisk: &Path, path: &Path, uuid: &str) {
        std::fs::File::create(path).unwrap().set_len(8 << 20).unwrap();
        let out = std::process::Command::new(sgdisk)
            .args(["-n", "1:2048:+1M", "-u", &format!("1:{uuid}")])
            .arg(path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    #[test]
    fn a_partuuid_names_the_disk_that_holds_it_whatever_its_name() {
        let Some(sgdisk) = testkit::tool("sgdisk", "gdisk") else { return };
        let t = tempfile::tempdir().unwrap();
        let (sys, dev) = (t.path().join("sys"), t.path().join("dev"));
        std::fs::create_dir_all(&dev).unwrap();
        for d in ["sda", "sdb", "sdb1", "sr0"] {
            std::fs::create_dir_all(sys.join("class/block").join(d)).unwrap();
        }
        // sdb1 is a partition (it has a `partition` file), never a candidate; sr0 has no GPT.
        std::fs::write(sys.join("class/block/sdb1/partition"), "1\n").unwrap();
        std::fs::write(dev.join("sr0"), vec![0u8; 1 << 20]).unwrap();
        disk_with(&sgdisk, &dev.join("sda"), "0fc63daf-8483-4772-8e79-3d69d8477de4");
        disk_with(&sgdisk, &dev.join("sdb"), "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
        let find = |spec: &str| resolve_disk(spec, &sys, &dev);
        assert_eq!(find("PARTUUID=C12A7328-F81F-11D2-BA4B-00A0C93EC93B"), Ok(dev.join("sdb")));
        assert_eq!(find("PARTUUID=0fc63daf-8483-4772-8e79-3d69d8477de4"), Ok(dev.join("sda")));
        assert_eq!(find("/dev/vda"), Ok(PathBuf::from("/dev/vda")), "a path is taken as it is");
        let missing = find("PARTUUID=11111111-2222-3333-4444-555555555555").unwrap_err();
        assert!(missing.contains("11111111-2222-3333-4444-555555555555"), "{missing}");
        let bad = find("PARTUUID=not-a-uuid").unwrap_err();
        assert!(bad.contains("not a partition UUID"), "{bad}");
        // A copy of sdb attached as sdc: the GUID no longer names one disk.
        std::fs::create_dir_all(sys.join("class/block/sdc")).unwrap();
        std::fs::copy(dev.join("sdb"), dev.join("sdc")).unwrap();
        let twice = find("PARTUUID=c12a7328-f81f-11d2-ba4b-00a0c93ec93b").unwrap_err();
        assert!(twice.contains("more than one disk") && twice.contains("sdc"), "{twice}");
        assert_eq!(find("PARTUUID=0fc63daf-8483-4772-8e79-3d69d8477de4"), Ok(dev.join("sda")));
    }
}
