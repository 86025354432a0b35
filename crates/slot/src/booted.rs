//! Which slot is running, from the kernel command line.
//!
//! Flatcar's boot path names the /usr partition on the command line (`usr=PARTUUID=...`,
//! `mount.usr=...`, `verity.usr=...`); our first-stage initramfs adds `acl.slot=A|B`. The last
//! occurrence wins, as with the kernel's own parameters.

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

#[cfg(test)]
mod tests {
    use super::*;

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
