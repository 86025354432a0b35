//! The running system: its kernel command line and the disk it booted from.

use anyhow::{Context as _, Result, bail};
use slot::Disk;
use slot::booted::{self, BootedFrom};
use slot::choice::Slot;
use std::path::PathBuf;

/// /proc/cmdline, if readable.
pub(crate) fn kernel_cmdline() -> Option<String> {
    std::fs::read_to_string("/proc/cmdline").ok()
}

/// The booted slot on `disk`, if the command line names one of its slot partitions.
pub(crate) fn booted_slot<D: slot::table::BlockDevice>(
    disk: &Disk<D>,
    cmdline: Option<&str>,
) -> Option<Slot> {
    match booted::from_cmdline(cmdline?)? {
        BootedFrom::Slot(s) => Some(s),
        BootedFrom::PartUuid(u) => disk.slot_with_partuuid(u),
        BootedFrom::PartLabel(l) => Slot::BOTH.into_iter().find(|&s| slot::slot_label(s) == l),
    }
}

/// The whole disk that holds the slot partition named on the command line.
pub(crate) fn system_disk(cmdline: Option<&str>) -> Result<PathBuf> {
    let from = cmdline.and_then(booted::from_cmdline);
    let link = match from {
        Some(BootedFrom::PartUuid(u)) => PathBuf::from(format!("/dev/disk/by-partuuid/{u}")),
        Some(BootedFrom::PartLabel(l)) => PathBuf::from(format!("/dev/disk/by-partlabel/{l}")),
        _ => bail!(
            "the kernel command line names no slot partition (usr=PARTUUID=... or usr=PARTLABEL=...); \
             pass --disk with a block device or disk-image file"
        ),
    };
    let part = std::fs::canonicalize(&link).with_context(|| format!("resolve {}", link.display()))?;
    let name = part.file_name().and_then(|n| n.to_str()).context("partition device has no name")?;
    // /sys/class/block/<partition> links into its parent disk's directory.
    let sys = std::fs::canonicalize(format!("/sys/class/block/{name}"))
        .with_context(|| format!("find {name} in sysfs"))?;
    let parent =
        sys.parent().and_then(|p| p.file_name()).and_then(|n| n.to_str()).context("no parent disk")?;
    Ok(PathBuf::from(format!("/dev/{parent}")))
}
