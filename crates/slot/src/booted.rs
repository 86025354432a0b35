//! Which slot is running, from the kernel command line.
//!
//! Flatcar's boot path names the /usr partition on the command line (`usr=PARTUUID=...`,
//! `mount.usr=...`, `verity.usr=...`); our first-stage initramfs adds `acl.slot=A|B`. The last
//! occurrence wins, as with the kernel's own parameters. Where the command line says nothing,
//! the device mounted at /usr tells: [`mounted_device`] reads it from mountinfo and
//! [`partition_of`] follows it through device-mapper (dm-verity) to the partition in sysfs.

use crate::choice::Slot;
use uuid::Uuid;

/// How the command line names the running slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootedFrom {
    /// `acl.slot=A` or `acl.slot=B`.
    Slot(Slot),
    /// `usr=PARTUUID=<guid>` and the like.
    PartUuid(Uuid),
    /// `usr=PARTLABEL=USR-A` and the like.
    PartLabel(String),
}

/// Parses a kernel command line (the content of /proc/cmdline).
pub fn from_cmdline(cmdline: &str) -> Option<BootedFrom> {
    let mut found = None;
    for word in cmdline.split_ascii_whitespace() {
        let Some((key, value)) = word.split_once('=') else { continue };
        match key {
            "acl.slot" => match value {
                "A" | "a" => found = Some(BootedFrom::Slot(Slot::A)),
                "B" | "b" => found = Some(BootedFrom::Slot(Slot::B)),
                _ => {}
            },
            "usr" | "mount.usr" | "verity.usr" => {
                if let Some(u) = value.strip_prefix("PARTUUID=").and_then(|u| Uuid::parse_str(u).ok()) {
                    found = Some(BootedFrom::PartUuid(u));
                } else if let Some(l) = value.strip_prefix("PARTLABEL=") {
                    found = Some(BootedFrom::PartLabel(l.to_owned()));
                }
            }
            _ => {}
        }
    }
    found
}

/// The device number (major, minor) of the filesystem mounted at `mount_point`, from the text
/// of /proc/self/mountinfo. The last mount on that point wins (it hides the earlier ones).
pub fn mounted_device(mountinfo: &str, mount_point: &str) -> Option<(u32, u32)> {
    mountinfo.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let (maj, min) = f.get(2)?.split_once(':')?;
        (*f.get(4)? == mount_point).then_some((maj.parse().ok()?, min.parse().ok()?))
    })
}

/// A partition as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysPartition {
    /// Kernel name of the whole disk (`vda`, `nvme0n1`).
    pub disk: String,
    /// Partition number on that disk.
    pub number: u32,
}

/// The partition behind block device `dev`, following device-mapper layers (dm-verity, dm-crypt)
/// down through `slaves/`, in the sysfs tree at `sys` (normally `/sys`).
pub fn partition_of(sys: &std::path::Path, dev: (u32, u32)) -> Option<SysPartition> {
    let mut node = std::fs::canonicalize(sys.join(format!("dev/block/{}:{}", dev.0, dev.1))).ok()?;
    for _ in 0..8 {
        if let Ok(n) = std::fs::read_to_string(node.join("partition")) {
            let disk = node.parent()?.file_name()?.to_str()?.to_owned();
            return Some(SysPartition { disk, number: n.trim().parse().ok()? });
        }
        // A mapped device: exactly one lower device, or we cannot tell.
        let mut slaves = std::fs::read_dir(node.join("slaves")).ok()?.filter_map(|e| e.ok());
        let lower = slaves.next()?;
        if slaves.next().is_some() {
            return None;
        }
        node = std::fs::canonicalize(lower.path()).ok()?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounted_usr_from_mountinfo() {
        let mi = "\
22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda9 rw
25 22 253:0 / /usr ro,relatime shared:2 - erofs /dev/mapper/usr ro
31 22 0:26 / /tmp rw shared:9 - tmpfs tmpfs rw
40 25 0:40 / /usr ro shared:12 - overlay overlay ro
";
        assert_eq!(mounted_device(mi, "/usr"), Some((0, 40)), "the last mount on /usr wins");
        assert_eq!(
            mounted_device(&mi.replace("40 25 0:40 / /usr", "40 25 0:40 / /opt"), "/usr"),
            Some((253, 0))
        );
        assert_eq!(mounted_device(mi, "/var"), None);
    }

    #[test]
    fn partition_through_dm_verity_in_a_fake_sysfs() {
        let sys = tempfile::tempdir().unwrap();
        let s = sys.path();
        // devices/.../vda/vda3 is partition 3 of vda; dm-0 (verity) sits on it.
        let vda3 = s.join("devices/pci0/virtio1/block/vda/vda3");
        let dm0 = s.join("devices/virtual/block/dm-0");
        std::fs::create_dir_all(&vda3).unwrap();
        std::fs::create_dir_all(dm0.join("slaves")).unwrap();
        std::fs::write(vda3.join("partition"), "3\n").unwrap();
        std::os::unix::fs::symlink(&vda3, dm0.join("slaves/vda3")).unwrap();
        std::fs::create_dir_all(s.join("dev/block")).unwrap();
        std::os::unix::fs::symlink(&dm0, s.join("dev/block/253:0")).unwrap();
        std::os::unix::fs::symlink(&vda3, s.join("dev/block/252:3")).unwrap();
        let want = Some(SysPartition { disk: "vda".into(), number: 3 });
        assert_eq!(partition_of(s, (253, 0)), want);
        assert_eq!(partition_of(s, (252, 3)), want);
        assert_eq!(partition_of(s, (9, 9)), None);
    }

    #[test]
    fn flatcar_and_our_own_forms() {
        let flatcar = "BOOT_IMAGE=/flatcar/vmlinuz-a mount.usr=/dev/mapper/usr verity.usr=PARTUUID=7130c94a-213a-4e5a-8e26-6cce9662f132 rootflags=rw console=ttyS0";
        assert_eq!(
            from_cmdline(flatcar),
            Some(BootedFrom::PartUuid(Uuid::parse_str("7130c94a-213a-4e5a-8e26-6cce9662f132").unwrap()))
        );
        assert_eq!(from_cmdline("usr=PARTLABEL=USR-B quiet"), Some(BootedFrom::PartLabel("USR-B".into())));
        assert_eq!(from_cmdline("usr=PARTLABEL=USR-B acl.slot=A"), Some(BootedFrom::Slot(Slot::A)));
        assert_eq!(from_cmdline("root=/dev/vda1 console=ttyS0"), None);
        assert_eq!(from_cmdline("usr=PARTUUID=not-a-guid"), None);
    }
}
