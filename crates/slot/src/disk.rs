//! A disk with A/B slots: finding them by GPT name and type, reading and changing their bits.
//!
//! Opening a disk only reads: a table with a bad layout still opens, so that `aclctl status`
//! can show what is wrong. Everything that would write (a transition, a repair) and everything
//! that needs a slot's byte extent (the installer, the boot path) first checks the layout
//! ([`Disk::check_layout`]) and refuses with [`DiskError::Layout`], naming the partitions and
//! LBAs, before any byte is written.
//!
//! Opening a disk `writable` takes its exclusive lock ([`crate::lock`]) before reading the table,
//! and the `Disk` value holds it until dropped: one writer per disk. [`Disk::update`] reads the
//! table again under the lock and computes the transition from what is on the disk now, so a
//! change made by another tool since the open is neither lost nor mixed into a stale copy.

use crate::choice::{Slot, Slots, TransitionError};
use crate::layout::LayoutError;
use crate::lock::{DiskLock, LockError};
use crate::table::{self, BlockDevice, Entry, Health, Table, TableError};
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// The partition type of a slot: Flatcar's "Container Linux /usr" type GUID.
pub const USR_PARTITION_TYPE: Uuid = uuid::uuid!("5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6");

/// The smallest slot partition we write to: room for a small image and its trailer. Anything
/// smaller is a damaged entry, not a slot.
pub const MIN_SLOT_BYTES: u64 = 1 << 20;

/// The partition type of an EFI system partition (where the first stage lives).
pub const ESP_PARTITION_TYPE: Uuid = uuid::uuid!("c12a7328-f81f-11d2-ba4b-00a0c93ec93b");

/// The GPT partition name of `slot`.
pub fn slot_label(slot: Slot) -> &'static str {
    match slot {
        Slot::A => "USR-A",
        Slot::B => "USR-B",
    }
}

/// Something is wrong with a disk or what was asked of it.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The device could not be opened.
    #[error("open {path}: {source}")]
    Open {
        /// The disk.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Another writer holds the disk's lock.
    #[error("{path}: {holder} is changing this disk; nothing was changed (try again when it is done)")]
    Busy {
        /// The disk.
        path: PathBuf,
        /// Who holds the lock, in words.
        holder: String,
    },
    /// The disk's lock could not be taken.
    #[error("{path}: locking the disk: {source}")]
    Lock {
        /// The disk.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Between the open and a write, another tool changed which partitions are the slots.
    #[error(
        "{path}: the slot partitions changed since the disk was opened (now A is partition {a}, B is {b}); nothing was changed"
    )]
    SlotsMoved {
        /// The disk.
        path: PathBuf,
        /// A's number now.
        a: u32,
        /// B's number now.
        b: u32,
    },
    /// The GPT could not be read or written.
    #[error("{path}: {source}")]
    Table {
        /// The disk.
        path: PathBuf,
        /// The error.
        source: TableError,
    },
    /// No partition with a slot's name.
    #[error(
        "{path} has no partition named {label}: not an A/B disk (expected USR-A and USR-B, Flatcar layout)"
    )]
    NoSlot {
        /// The disk.
        path: PathBuf,
        /// The missing name.
        label: &'static str,
    },
    /// Two partitions with a slot's name.
    #[error("{path} has more than one partition named {label} (numbers {first} and {second})")]
    DuplicateSlot {
        /// The disk.
        path: PathBuf,
        /// The name.
        label: &'static str,
        /// One partition number.
        first: u32,
        /// The other.
        second: u32,
    },
    /// A slot partition of the wrong type.
    #[error("{path}: partition {number} ({label}) has type {found}, expected {USR_PARTITION_TYPE}")]
    WrongType {
        /// The disk.
        path: PathBuf,
        /// The name.
        label: &'static str,
        /// Its number.
        number: u32,
        /// Its type.
        found: Uuid,
    },
    /// No EFI system partition.
    #[error("{path} has no EFI system partition (type {ESP_PARTITION_TYPE})")]
    NoEsp {
        /// The disk.
        path: PathBuf,
    },
    /// More than one EFI system partition: which one the firmware boots is not known here.
    #[error(
        "{path} has more than one EFI system partition (numbers {first} and {second}); which one the firmware boots is not known, so neither is written"
    )]
    DuplicateEsp {
        /// The disk.
        path: PathBuf,
        /// One partition number.
        first: u32,
        /// The other.
        second: u32,
    },
    /// USR-B before USR-A.
    #[error("{path}: USR-A (partition {a}) must come before USR-B (partition {b})")]
    SlotOrder {
        /// The disk.
        path: PathBuf,
        /// A's number.
        a: u32,
        /// B's number.
        b: u32,
    },
    /// The requested transition is not allowed from the current bits.
    #[error("{path}: {source}")]
    Transition {
        /// The disk.
        path: PathBuf,
        /// Why not.
        source: TransitionError,
    },
    /// The table's layout makes writing unsafe (partitions over each other or over the table).
    #[error(
        "{path}: refusing to touch the slots, the partition table is unsafe: {source}; the disk was not changed"
    )]
    Layout {
        /// The disk.
        path: PathBuf,
        /// What is wrong (boxed: it names two partitions, and errors travel by value).
        source: Box<LayoutError>,
    },
    /// Writing the table failed part-way (an I/O error, a device that went away): what the
    /// disk holds afterwards, read again, is in `state`, so that nobody retries a change that
    /// took effect (a retried rollback would toggle back).
    #[error("{source}; {state}")]
    WriteFailed {
        /// What failed.
        source: Box<DiskError>,
        /// The disk's state afterwards, in words.
        state: String,
    },
    /// After a write, a table copy reads back damaged.
    #[error("{path}: after the write, a table copy reads back damaged ({health})")]
    CopyDamaged {
        /// The disk.
        path: PathBuf,
        /// What the read found.
        health: String,
    },
    /// After a write, the table read back does not hold what was written.
    #[error(
        "{path}: after the write the table reads back A [{}] B [{}], not the A [{}] B [{}] written",
        found.a, found.b, expected.a, expected.b
    )]
    ReadBack {
        /// The disk.
        path: PathBuf,
        /// Written.
        expected: Slots,
        /// Read.
        found: Slots,
    },
}

/// A disk with two slots.
#[derive(Debug)]
pub struct Disk<D> {
    dev: D,
    path: PathBuf,
    table: Table,
    a: Entry,
    b: Entry,
    /// Held by a disk opened for writing (see [`crate::lock`]).
    lock: Option<DiskLock>,
}

impl Disk<std::fs::File> {
    /// Opens a block device or image file; `writable` for anything that changes bits, which
    /// takes the disk's exclusive lock first (refused at once while another acl-update process
    /// holds it; another program's lock is waited for as [`crate::lock`] says) and keeps it
    /// as long as the returned value lives.
    pub fn open(path: &Path, writable: bool) -> Result<Self, DiskError> {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|source| DiskError::Open { path: path.to_owned(), source })?;
        let lock = if writable {
            let lock = DiskLock::acquire(&dev, path, crate::lock::DEFAULT_WAIT).map_err(|e| match e {
                LockError::Busy { holder } => DiskError::Busy { path: path.to_owned(), holder },
                LockError::Io(source) => DiskError::Lock { path: path.to_owned(), source },
            })?;
            Some(lock)
        } else {
            None
        };
        let mut disk = Self::from_device(dev, path)?;
        disk.lock = lock;
        Ok(disk)
    }

    /// Whether this value holds the disk's exclusive lock (opened writable).
    pub fn is_locked(&self) -> bool {
        self.lock.is_some()
    }
}

impl<D: BlockDevice> Disk<D> {
    /// Reads the table of `dev` and finds the slots; `path` names it in errors.
    pub fn from_device(dev: D, path: &Path) -> Result<Self, DiskError> {
        let path = path.to_owned();
        let table = table::read(&dev).map_err(|source| DiskError::Table { path: path.clone(), source })?;
        let (a, b) = find_slots(&path, &table)?;
        Ok(Self { dev, path, table, a, b, lock: None })
    }

    /// The path the disk was opened as.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The bits of both slots.
    pub fn slots(&self) -> Slots {
        Slots { a: self.a.attributes, b: self.b.attributes }
    }

    /// The partition entry of `slot`.
    pub fn partition(&self, slot: Slot) -> &Entry {
        match slot {
            Slot::A => &self.a,
            Slot::B => &self.b,
        }
    }

    /// Byte offset and length of `slot`'s partition; refused when the layout is unsafe
    /// ([`Self::check_layout`]), so that nobody writes a slot that covers something else.
    pub fn slot_extent(&self, slot: Slot) -> Result<(u64, u64), DiskError> {
        self.check_layout().map_err(|e| self.layout_error(e))?;
        let e = self.partition(slot);
        // check_layout bounds every slot by the disk, so this is always Some.
        slot_bytes(e, self.table.sector_size()).ok_or_else(|| {
            self.layout_error(LayoutError::SlotTooSmall { part: e.part(), bytes: 0, min: MIN_SLOT_BYTES })
        })
    }

    /// Byte offset and length of the EFI system partition (the one partition of its type);
    /// refused when the layout is unsafe, as for the slots.
    pub fn esp_extent(&self) -> Result<(u64, u64), DiskError> {
        self.check_layout().map_err(|e| self.layout_error(e))?;
        let entries = self.table.entries();
        let mut esps = entries.iter().filter(|e| e.type_guid == ESP_PARTITION_TYPE);
        let e = esps.next().ok_or_else(|| DiskError::NoEsp { path: self.path.clone() })?;
        if let Some(second) = esps.next() {
            return Err(DiskError::DuplicateEsp {
                path: self.path.clone(),
                first: e.number,
                second: second.number,
            });
        }
        // check_layout bounds every partition by the disk.
        slot_bytes(e, self.table.sector_size()).ok_or_else(|| DiskError::NoEsp { path: self.path.clone() })
    }

    /// The refusal for a layout problem of this disk.
    pub fn layout_error(&self, e: LayoutError) -> DiskError {
        DiskError::Layout { path: self.path.clone(), source: Box::new(e) }
    }

    /// Checks the table's layout (see [`crate::layout`]) and that each slot can hold an image
    /// ([`MIN_SLOT_BYTES`]). Pure: reads nothing, writes nothing.
    pub fn check_layout(&self) -> Result<(), LayoutError> {
        self.table.check_layout()?;
        for e in [&self.a, &self.b] {
            let bytes = slot_bytes(e, self.table.sector_size()).map_or(0, |(_, len)| len);
            if bytes < MIN_SLOT_BYTES {
                return Err(LayoutError::SlotTooSmall { part: e.part(), bytes, min: MIN_SLOT_BYTES });
            }
        }
        Ok(())
    }

    /// The table's sector size.
    pub fn sector_size(&self) -> u64 {
        self.table.sector_size()
    }

    /// The state of the two table copies.
    pub fn health(&self) -> &Health {
        self.table.health()
    }

    /// The slot whose partition has this unique GUID (PARTUUID).
    pub fn slot_with_partuuid(&self, uuid: Uuid) -> Option<Slot> {
        Slot::BOTH.into_iter().find(|&s| self.partition(s).unique_guid == uuid)
    }

    /// The underlying device.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// Applies a transition: computes the new bits with `f` (a pure function from `choice`),
    /// writes them crash-safely, reads the table back and checks it. Repairs a damaged table
    /// copy on the way. Returns the new bits.
    pub fn update(
        &mut self,
        f: impl FnOnce(&Slots) -> Result<Slots, TransitionError>,
    ) -> Result<Slots, DiskError> {
        self.reread()?;
        self.check_layout().map_err(|e| self.layout_error(e))?;
        let new =
            f(&self.slots()).map_err(|source| DiskError::Transition { path: self.path.clone(), source })?;
        let mut t = self.table.clone();
        let err = |path: &Path| {
            let path = path.to_owned();
            move |source| DiskError::Table { path, source }
        };
        t.set_attributes(self.a.number, new.a).map_err(err(&self.path))?;
        t.set_attributes(self.b.number, new.b).map_err(err(&self.path))?;
        let old = self.slots();
        if let Err(source) = t.write(&mut self.dev, &self.table) {
            return Err(self.write_failed(DiskError::Table { path: self.path.clone(), source }, old, new));
        }
        let fresh = match Self::from_device_ref(&self.dev, &self.path) {
            Ok(f) => f,
            Err(e) => return Err(self.write_failed(e, old, new)),
        };
        if fresh.0 != new {
            let e = DiskError::ReadBack { path: self.path.clone(), expected: new, found: fresh.0 };
            return Err(self.write_failed(e, old, new));
        }
        if !fresh.1.health().is_clean() {
            let h = fresh.1.health();
            let health = [("primary", &h.primary_error), ("backup", &h.backup_error)]
                .iter()
                .filter_map(|(which, e)| e.as_ref().map(|e| format!("{which}: {e}")))
                .collect::<Vec<_>>()
                .join("; ");
            let e = DiskError::CopyDamaged { path: self.path.clone(), health };
            return Err(self.write_failed(e, old, new));
        }
        self.table = fresh.1;
        self.a.attributes = new.a;
        self.b.attributes = new.b;
        Ok(new)
    }

    /// The error for a table write that failed: reads the table again and says whether the
    /// change took effect.
    fn write_failed(&self, source: DiskError, old: Slots, new: Slots) -> DiskError {
        let state = match Self::from_device_ref(&self.dev, &self.path) {
            Ok((now, t)) => {
                let copies = if t.health().is_clean() {
                    "both table copies are valid"
                } else {
                    "one table copy is damaged (the next change repairs it)"
                };
                if now == new && old != new {
                    format!("the change took effect nevertheless ({copies}): do not repeat it")
                } else if now == old {
                    format!("nothing was changed ({copies}): it is safe to try again")
                } else {
                    format!("the disk now holds A [{}] B [{}] ({copies})", now.a, now.b)
                }
            }
            Err(e) => format!(
                "the table cannot be read back ({e}): check the disk with `aclctl status` before trying again"
            ),
        };
        DiskError::WriteFailed { source: Box::new(source), state }
    }

    /// Rewrites a damaged or out-of-date table copy from the valid one. Returns whether
    /// anything was written.
    pub fn repair(&mut self) -> Result<bool, DiskError> {
        if self.health().is_clean() {
            return Ok(false);
        }
        self.update(|s| Ok(*s))?;
        Ok(true)
    }

    /// Reads the table again (under the lock when writable), keeping the slot partitions.
    fn reread(&mut self) -> Result<(), DiskError> {
        let (_, table) = Self::from_device_ref(&self.dev, &self.path)?;
        let (a, b) = find_slots(&self.path, &table)?;
        let same = |x: &Entry, y: &Entry| {
            (x.number, x.unique_guid, x.first_lba, x.last_lba)
                == (y.number, y.unique_guid, y.first_lba, y.last_lba)
        };
        if !same(&a, &self.a) || !same(&b, &self.b) {
            return Err(DiskError::SlotsMoved { path: self.path.clone(), a: a.number, b: b.number });
        }
        self.table = table;
        self.a = a;
        self.b = b;
        Ok(())
    }

    fn from_device_ref(dev: &D, path: &Path) -> Result<(Slots, Table), DiskError> {
        let table = table::read(dev).map_err(|source| DiskError::Table { path: path.to_owned(), source })?;
        let (a, b) = find_slots(path, &table)?;
        Ok((Slots { a: a.attributes, b: b.attributes }, table))
    }
}

/// Byte offset and length of a partition, if its extent is in order and fits 64-bit offsets.
fn slot_bytes(e: &Entry, sector: u64) -> Option<(u64, u64)> {
    let sectors = e.last_lba.checked_sub(e.first_lba)?.checked_add(1)?;
    Some((e.first_lba.checked_mul(sector)?, sectors.checked_mul(sector)?))
}

fn find_slots(path: &Path, table: &Table) -> Result<(Entry, Entry), DiskError> {
    let entries = table.entries();
    let find = |slot: Slot| -> Result<Entry, DiskError> {
        let label = slot_label(slot);
        let mut found = entries.iter().filter(|e| e.name == label);
        let e = found.next().ok_or(DiskError::NoSlot { path: path.to_owned(), label })?;
        if let Some(second) = found.next() {
            return Err(DiskError::DuplicateSlot {
                path: path.to_owned(),
                label,
                first: e.number,
                second: second.number,
            });
        }
        if e.type_guid != USR_PARTITION_TYPE {
            return Err(DiskError::WrongType {
                path: path.to_owned(),
                label,
                number: e.number,
                found: e.type_guid,
            });
        }
        Ok(e.clone())
    };
    let (a, b) = (find(Slot::A)?, find(Slot::B)?);
    if a.number > b.number {
        return Err(DiskError::SlotOrder { path: path.to_owned(), a: a.number, b: b.number });
    }
    Ok((a, b))
}
