//! The boot path's decisions, as the initramfs runs them (dracut module `90acl`). Stage 1
//! ([`select`]):
//! choose the slot by the same rule as everything else ([`slot::choice::boot_attempt`]), spend
//! one of its tries in a crash-safe table write *before* trying it, read the signed manifest
//! from the slot's trailer and check its signatures against the keys built into the
//! initramfs, and describe how to open the slot (dm-verity parameters, the slot's kernel
//! command line).
//!
//! A chosen slot that cannot be opened (no trailer, torn trailer, bad signature) is marked bad
//! and the choice is made again, so a damaged slot costs one boot step, not the machine. When
//! nothing is left, the error says so and the initramfs stops there (a machine that boots
//! nothing verified is safer than one that boots anything).
//!
//! Stage 2 ([`verify_chosen`]), in the slot's own initramfs after the kexec: the command line
//! names the slot, the bits must show that the rule chose it, and its manifest is verified
//! again; nothing else is taken from the command line, and the disk is only read.

use repo::TrustPolicy;
use slot::Disk;
use slot::choice::{self, Slot};
use std::path::Path;

/// How to open the chosen slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// The slot.
    pub slot: Slot,
    /// Its partition number (the device is the disk's partition with this number).
    pub partition: u32,
    /// Its PARTUUID.
    pub partuuid: String,
    /// The image's version.
    pub version: String,
    /// The slot's manifest (verified).
    pub verity: manifest::VerityInfo,
    /// The image's kernel command line.
    pub cmdline: String,
    /// Tries left after this attempt, or `None` when the slot is confirmed.
    pub tries_left: Option<u8>,
    /// Slots given up on the way, and why.
    pub skipped: Vec<(Slot, String)>,
}

/// Why nothing can boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The disk or its table.
    #[error(transparent)]
    Disk(#[from] slot::DiskError),
    /// No slot is bootable (any more).
    #[error("no bootable slot{}", skipped(.0))]
    NothingBootable(Vec<(Slot, String)>),
    /// The second stage was told to open a slot the boot rule did not choose.
    #[error(
        "slot {slot} is not the slot the boot rule chose ({bits}); the kernel command line names another"
    )]
    NotChosen {
        /// The slot named.
        slot: Slot,
        /// Its bits.
        bits: String,
    },
    /// The second stage's slot has no valid signed manifest.
    #[error("slot {slot}: {why}")]
    Unverified {
        /// The slot.
        slot: Slot,
        /// Why.
        why: String,
    },
}

fn skipped(s: &[(Slot, String)]) -> String {
    if s.is_empty() {
        return String::new();
    }
    let list: Vec<String> = s.iter().map(|(slot, why)| format!("slot {slot}: {why}")).collect();
    format!(" (given up: {})", list.join("; "))
}

/// Reads and verifies the signed manifest in `slot`'s trailer.
pub fn slot_manifest(
    disk: &Disk<std::fs::File>,
    path: &Path,
    slot: Slot,
    policy: &TrustPolicy,
) -> Result<manifest::Manifest, String> {
    use std::os::unix::fs::FileExt as _;
    let (base, len) = disk.slot_extent(slot).map_err(|e| e.to_string())?;
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (m, sig) = trailer::read(len, |o, buf| {
        file.read_exact_at(buf, base.checked_add(o).ok_or(std::io::ErrorKind::InvalidInput)?)
    })
    .map_err(|e| e.to_string())?;
    let manifest = policy.manifest(&format!("slot {slot} trailer"), &m, &sig).map_err(|e| e.to_string())?;
    if manifest.image_size > len {
        return Err(format!("image of {} bytes is larger than the slot ({len} bytes)", manifest.image_size));
    }
    Ok(manifest)
}

/// Chooses, spends a try, verifies; see the module docs.
pub fn select(path: &Path, policy: &TrustPolicy) -> Result<Selection, BootError> {
    let mut disk = Disk::open(path, true)?;
    // A table whose partitions overlap is refused before any slot is read or given up.
    disk.check_layout().map_err(|e| disk.layout_error(e))?;
    let mut given_up = Vec::new();
    loop {
        let Some((chosen, _)) = choice::boot_attempt(&disk.slots()) else {
            return Err(BootError::NothingBootable(given_up));
        };
        match slot_manifest(&disk, path, chosen, policy) {
            Ok(m) => {
                // Spend the try first: if this boot dies, the next one knows.
                let after = disk.update(|s| Ok(choice::boot_attempt(s).map_or(*s, |(_, next)| next)))?;
                return Ok(Selection::new(&disk, chosen, after.get(chosen), m, given_up));
            }
            Err(why) => {
                // Unusable: never choose it again until an install replaces it.
                disk.update(|s| Ok(choice::give_up(s, chosen)))?;
                given_up.push((chosen, why));
            }
        }
    }
}

/// The second stage's check: `slot` is the one the gptprio rule chose (the bits show a boot
/// attempt that chose it, [`choice::chosen_by_rule`]) and its signed manifest verifies. The
/// disk is only read. Everything the second stage uses to open its root comes from the returned
/// manifest, never from the kernel command line: an edited boot entry can name a slot, but it
/// can neither supply a root hash nor pick a slot the rule would not boot.
pub fn verify_chosen(path: &Path, slot: Slot, policy: &TrustPolicy) -> Result<Selection, BootError> {
    let disk = Disk::open(path, false)?;
    disk.check_layout().map_err(|e| disk.layout_error(e))?;
    let slots = disk.slots();
    let bits = slots.get(slot);
    if !choice::chosen_by_rule(&slots, slot) {
        return Err(BootError::NotChosen { slot, bits: bits.to_string() });
    }
    let m = slot_manifest(&disk, path, slot, policy).map_err(|why| BootError::Unverified { slot, why })?;
    Ok(Selection::new(&disk, slot, bits, m, Vec::new()))
}

impl Selection {
    fn new(
        disk: &Disk<std::fs::File>,
        slot: Slot,
        bits: slot::GptPrio,
        m: manifest::Manifest,
        skipped: Vec<(Slot, String)>,
    ) -> Self {
        let e = disk.partition(slot);
        Selection {
            slot,
            partition: e.number,
            partuuid: e.unique_guid.to_string(),
            version: m.version.to_string(),
            cmdline: m.kernel_cmdline,
            verity: m.verity,
            tries_left: (!bits.successful()).then(|| bits.tries()),
            skipped,
        }
    }

    /// Shell assignments for the initramfs hook (`. /run/acl/boot.env`), values single-quoted.
    pub fn to_env(&self, disk: &str) -> String {
        let v = &self.verity;
        let part = partition_device(disk, self.partition);
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let salt = if v.salt.is_empty() { "-".to_owned() } else { hex(&v.salt) };
        let vars = [
            ("ACL_SLOT", self.slot.to_string()),
            ("ACL_PART", part),
            ("ACL_PARTUUID", self.partuuid.clone()),
            ("ACL_VERSION", self.version.clone()),
            ("ACL_ROOTHASH", v.root_hash.to_string()),
            ("ACL_HASH_OFFSET", v.data_size.to_string()),
            ("ACL_DATA_BLOCKS", (v.data_size / u64::from(v.data_block_size)).to_string()),
            ("ACL_DATA_BLOCK_SIZE", v.data_block_size.to_string()),
            ("ACL_HASH_BLOCK_SIZE", v.hash_block_size.to_string()),
            ("ACL_HASH", v.hash_algorithm.clone()),
            ("ACL_SALT", salt),
            ("ACL_CMDLINE", self.cmdline.clone()),
            ("ACL_TRIES_LEFT", self.tries_left.map_or("confirmed".into(), |t| t.to_string())),
        ];
        vars.iter().map(|(k, v)| format!("{k}='{}'\n", v.replace('\'', "'\\''"))).collect()
    }
}

/// `/dev/vda` + 3 = `/dev/vda3`; `/dev/nvme0n1` + 3 = `/dev/nvme0n1p3`.
pub fn partition_device(disk: &str, n: u32) -> String {
    if disk.ends_with(|c: char| c.is_ascii_digit()) { format!("{disk}p{n}") } else { format!("{disk}{n}") }
}
