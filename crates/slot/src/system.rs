//! The running system: its kernel command line, the disk it booted from and the booted slot.
//! (Reads /proc and /sys; the parsing itself is in [`crate::booted`].)

use crate::Disk;
use crate::booted::{self, BootedFrom};
use crate::choice::Slot;
use std::path::PathBuf;

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
