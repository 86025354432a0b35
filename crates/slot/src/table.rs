//! The GPT itself: reading with fallback to the backup copy, and crash-safe in-place writes.
//!
//! We read and write the table ourselves instead of through the `gpt` crate, for three reasons
//! measured on gpt 4.1 (see ARCHITECTURE.md): it renumbers entries when the table has gaps
//! (Flatcar's layout has gaps), its write is not crash-safe, and it refuses a disk whose primary
//! header is corrupt instead of reading the backup. The `gpt` crate still checks our work in the
//! tests, as an independent reader.
//!
//! A write changes only entry attribute fields, so every entry keeps its position, GUIDs, name
//! and bounds. It goes in two phases: the primary entry sectors that changed, then the primary
//! header; sync; the same for the backup; sync. Each copy's header carries the CRC of its entry
//! array, so a copy torn anywhere (or with its sectors reordered before the sync) fails its CRC
//! check and the reader takes the other copy, which holds either the old table (torn primary)
//! or, when both are valid, the primary, which is the newer one (torn backup). [`read`] reports
//! a copy that needs repair and [`write`] repairs it.
//!
//! Nothing in a table is trusted to be sane: every number read is used in checked arithmetic,
//! and [`Table::write`] refuses a table whose layout fails [`crate::layout::check`] (partitions
//! over each other or over the table copies), so a hostile or corrupt table is reported, never
//! written over and never a panic.

use crate::GptPrio;
use crate::layout::{self, Geometry, LayoutError, Lbas, Part};
use std::io;
use uuid::Uuid;

const SIGNATURE: &[u8; 8] = b"EFI PART";
const MIN_HEADER_SIZE: usize = 92;
const MAX_ENTRIES_BYTES: u64 = 1 << 20;

/// Random-access storage holding a GPT: a block device, an image file, or a test double.
pub trait BlockDevice {
    /// Size in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every write so far durable.
    fn sync(&mut self) -> io::Result<()>;
}

impl BlockDevice for std::fs::File {
    fn size(&self) -> io::Result<u64> {
        // metadata().len() is 0 for block devices; seeking to the end works for both.
        use std::io::Seek as _;
        let mut f: &std::fs::File = self;
        f.seek(io::SeekFrom::End(0))
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, buf, offset)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.sync_all()
    }
}

/// No usable GPT, or the device failed.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// Reading or writing the device failed.
    #[error("{op} at byte {offset}: {source}")]
    Io {
        /// "read", "write" or "sync".
        op: &'static str,
        /// Where.
        offset: u64,
        /// The error.
        source: io::Error,
    },
    /// Neither header is valid.
    #[error("no valid GPT: primary header: {primary}; backup header: {backup}")]
    NoValidTable {
        /// Why the primary was refused.
        primary: String,
        /// Why the backup was refused.
        backup: String,
    },
    /// A partition index past the table.
    #[error("partition entry {0} does not exist")]
    NoSuchEntry(u32),
    /// The table's layout is unsafe to write (see [`crate::layout`]); nothing was written.
    #[error("nothing was written: {0}")]
    Layout(Box<LayoutError>),
    /// An offset past what a 64-bit byte offset holds (only a hostile table gets here).
    #[error("LBA {lba} is past any byte offset at {sector}-byte sectors")]
    OffsetOverflow {
        /// The LBA.
        lba: u64,
        /// The sector size.
        sector: u64,
    },
}

fn io_err(op: &'static str, offset: u64) -> impl FnOnce(io::Error) -> TableError {
    move |source| TableError::Io { op, offset, source }
}

/// The state of the two copies of the table found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Why the primary copy was refused, if it was.
    pub primary_error: Option<String>,
    /// Why the backup copy was refused, if it was; also set when it is valid but out of date.
    pub backup_error: Option<String>,
}

impl Health {
    /// Whether both copies are valid and equal.
    pub fn is_clean(&self) -> bool {
        self.primary_error.is_none() && self.backup_error.is_none()
    }
}

/// One used partition entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Partition number (1-based position in the entry array).
    pub number: u32,
    /// Partition type GUID.
    pub type_guid: Uuid,
    /// Unique partition GUID (PARTUUID).
    pub unique_guid: Uuid,
    /// First sector.
    pub first_lba: u64,
    /// Last sector (inclusive).
    pub last_lba: u64,
    /// The attribute field.
    pub attributes: GptPrio,
    /// Partition name (PARTLABEL).
    pub name: String,
}

#[derive(Debug, Clone)]
struct Header {
    /// The header bytes (header_size of them), as read or as to be written.
    raw: Vec<u8>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Header {
    fn my_lba(&self) -> u64 {
        u64_at(&self.raw, 24)
    }
    fn alternate_lba(&self) -> u64 {
        u64_at(&self.raw, 32)
    }
    fn entries_lba(&self) -> u64 {
        u64_at(&self.raw, 72)
    }
    fn first_usable(&self) -> u64 {
        u64_at(&self.raw, 40)
    }
    fn last_usable(&self) -> u64 {
        u64_at(&self.raw, 48)
    }
    fn num_entries(&self) -> u32 {
        u32_at(&self.raw, 80)
    }
    fn entry_size(&self) -> u32 {
        u32_at(&self.raw, 84)
    }
    fn entries_crc(&self) -> u32 {
        u32_at(&self.raw, 88)
    }
    fn entries_bytes(&self) -> u64 {
        u64::from(self.num_entries()) * u64::from(self.entry_size())
    }

    /// A copy of this header placed at `my_lba`, pointing at `alternate` and `entries_lba`,
    /// for an entry array with CRC `entries_crc`; both CRCs recomputed.
    fn placed(&self, my_lba: u64, alternate: u64, entries_lba: u64, entries_crc: u32) -> Header {
        let mut raw = self.raw.clone();
        raw[24..32].copy_from_slice(&my_lba.to_le_bytes());
        raw[32..40].copy_from_slice(&alternate.to_le_bytes());
        raw[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        raw[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        raw[16..20].copy_from_slice(&[0; 4]);
        let crc = crc32fast::hash(&raw);
        raw[16..20].copy_from_slice(&crc.to_le_bytes());
        Header { raw }
    }
}

/// Reads and checks one header copy at `lba` and its entry array.
fn read_copy(
    dev: &dyn BlockDevice,
    sector: u64,
    lba: u64,
    disk_sectors: u64,
) -> Result<(Header, Vec<u8>), String> {
    if lba == 0 || lba >= disk_sectors {
        return Err(format!("LBA {lba} is outside the disk"));
    }
    let mut buf = vec![0u8; sector as usize];
    let at = lba.checked_mul(sector).ok_or(format!("LBA {lba} is past any byte offset"))?;
    dev.read_at(&mut buf, at).map_err(|e| format!("read LBA {lba}: {e}"))?;
    if &buf[..8] != SIGNATURE {
        return Err(format!("no GPT signature at LBA {lba}"));
    }
    let size = u32_at(&buf, 12) as usize;
    if !(MIN_HEADER_SIZE..=sector as usize).contains(&size) {
        return Err(format!("header size {size} out of range"));
    }
    let mut raw = buf[..size].to_vec();
    let stored = u32_at(&raw, 16);
    raw[16..20].copy_from_slice(&[0; 4]);
    if crc32fast::hash(&raw) != stored {
        return Err(format!("header CRC mismatch at LBA {lba}"));
    }
    raw[16..20].copy_from_slice(&stored.to_le_bytes());
    let h = Header { raw };
    if h.my_lba() != lba {
        return Err(format!("header at LBA {lba} says it is at LBA {}", h.my_lba()));
    }
    let es = h.entry_size();
    if es < 128 || !es.is_power_of_two() {
        return Err(format!("entry size {es} is not a power of two of at least 128"));
    }
    let bytes = h.entries_bytes();
    if bytes == 0 || bytes > MAX_ENTRIES_BYTES {
        return Err(format!("entry array of {bytes} bytes out of range"));
    }
    let entry_sectors = bytes.div_ceil(sector);
    let start = h.entries_lba();
    let end = start.checked_add(entry_sectors).filter(|&e| e <= disk_sectors);
    if start == 0 || end.is_none_or(|end| (start..end).contains(&lba)) {
        return Err(format!("entry array at LBA {start} overlaps the header or leaves the disk"));
    }
    let mut entries = vec![0u8; bytes as usize];
    let at = start.checked_mul(sector).ok_or(format!("entry array LBA {start} is past any byte offset"))?;
    dev.read_at(&mut entries, at).map_err(|e| format!("read entries at LBA {start}: {e}"))?;
    if crc32fast::hash(&entries) != h.entries_crc() {
        return Err(format!("entry array CRC mismatch (array at LBA {start})"));
    }
    Ok((h, entries))
}

/// A GPT as read from a device: the newest valid copy, and where both copies belong.
#[derive(Debug, Clone)]
pub struct Table {
    sector: u64,
    disk_sectors: u64,
    /// The valid header the table was taken from (primary if valid, else backup).
    header: Header,
    entries: Vec<u8>,
    primary_lba: u64,
    primary_entries_lba: u64,
    backup_lba: u64,
    /// `None` when the backup header is too close to the disk's start for its entry array
    /// (a hostile alternate LBA); the layout check refuses such a table.
    backup_entries_lba: Option<u64>,
    health: Health,
}

/// Reads the GPT of `dev`, falling back to the backup copy when the primary is invalid.
///
/// Tries 512-byte and 4096-byte logical sectors, in that order, and takes the first size at
/// which a valid header is found.
pub fn read(dev: &dyn BlockDevice) -> Result<Table, TableError> {
    let size = dev.size().map_err(io_err("size", 0))?;
    let mut reasons = (String::new(), String::new());
    for sector in [512u64, 4096] {
        let disk_sectors = size / sector;
        if disk_sectors < 3 {
            continue;
        }
        let primary = read_copy(dev, sector, 1, disk_sectors);
        let backup_lba = match &primary {
            Ok((h, _)) => h.alternate_lba(),
            Err(_) => disk_sectors.saturating_sub(1),
        };
        let backup = read_copy(dev, sector, backup_lba, disk_sectors);
        let table = match (primary, backup) {
            (Ok((p, pe)), Ok((b, be))) => {
                let backup_error = if pe != be || b.alternate_lba() != 1 || !same_geometry(&p, &b) {
                    Some("backup copy differs from the primary (an interrupted write)".to_owned())
                } else {
                    None
                };
                Table::new(
                    (sector, disk_sectors),
                    p,
                    pe,
                    1,
                    backup_lba,
                    Some(b.entries_lba()),
                    Health { primary_error: None, backup_error },
                )
            }
            (Ok((p, pe)), Err(e)) => Table::new(
                (sector, disk_sectors),
                p,
                pe,
                1,
                backup_lba,
                None,
                Health { primary_error: None, backup_error: Some(e) },
            ),
            (Err(e), Ok((b, be))) => {
                // The primary's own entry-array location is lost with it; 2 is the standard one.
                let primary_lba = b.alternate_lba();
                let entries_lba = b.entries_lba();
                Table::new(
                    (sector, disk_sectors),
                    b,
                    be,
                    primary_lba,
                    backup_lba,
                    Some(entries_lba),
                    Health { primary_error: Some(e), backup_error: None },
                )
            }
            (Err(p), Err(b)) => {
                if sector == 512 {
                    reasons = (p, b);
                }
                continue;
            }
        };
        return Ok(table);
    }
    Err(TableError::NoValidTable { primary: reasons.0, backup: reasons.1 })
}

fn same_geometry(p: &Header, b: &Header) -> bool {
    // Everything but the placement fields (my/alternate LBA, entries LBA) and the CRC.
    let strip = |h: &Header| {
        let mut r = h.raw.clone();
        for range in [16..20, 24..40, 72..80] {
            r[range].fill(0);
        }
        r
    };
    strip(p) == strip(b)
}

impl Table {
    fn new(
        (sector, disk_sectors): (u64, u64),
        header: Header,
        entries: Vec<u8>,
        primary_lba: u64,
        backup_lba: u64,
        backup_entries_lba: Option<u64>,
        health: Health,
    ) -> Self {
        let entry_sectors = header.entries_bytes().div_ceil(sector);
        let primary_entries_lba = if header.my_lba() == primary_lba { header.entries_lba() } else { 2 };
        Table {
            sector,
            disk_sectors,
            primary_lba,
            primary_entries_lba,
            backup_lba,
            backup_entries_lba: backup_entries_lba.or_else(|| backup_lba.checked_sub(entry_sectors)),
            header,
            entries,
            health,
        }
    }

    /// The logical sector size the table was found at.
    pub fn sector_size(&self) -> u64 {
        self.sector
    }

    /// The state of the two copies.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Where the table's copies and usable area lie, for [`crate::layout::check`].
    pub fn geometry(&self) -> Geometry {
        Geometry {
            disk_sectors: self.disk_sectors,
            primary_lba: self.primary_lba,
            primary_entries_lba: self.primary_entries_lba,
            backup_lba: self.backup_lba,
            backup_entries_lba: self.backup_entries_lba,
            entry_sectors: self.header.entries_bytes().div_ceil(self.sector),
            usable: Lbas { first: self.header.first_usable(), last: self.header.last_usable() },
        }
    }

    /// Checks that the partitions and the table copies lie apart and on the disk (see
    /// [`crate::layout`]). Does not read or write the disk.
    pub fn check_layout(&self) -> Result<(), LayoutError> {
        let parts: Vec<Part> = self.entries().iter().map(Entry::part).collect();
        layout::check(&self.geometry(), &parts)
    }

    /// The used entries, in array order.
    pub fn entries(&self) -> Vec<Entry> {
        let es = self.header.entry_size() as usize;
        self.entries
            .chunks_exact(es)
            .enumerate()
            .filter(|(_, e)| e[..16] != [0; 16])
            .map(|(i, e)| {
                let name16: Vec<u16> = e[56..128]
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .take_while(|&c| c != 0)
                    .collect();
                Entry {
                    number: i as u32 + 1,
                    type_guid: Uuid::from_bytes_le(e[0..16].try_into().expect("16 bytes")),
                    unique_guid: Uuid::from_bytes_le(e[16..32].try_into().expect("16 bytes")),
                    first_lba: u64_at(e, 32),
                    last_lba: u64_at(e, 40),
                    attributes: GptPrio(u64_at(e, 48)),
                    name: String::from_utf16_lossy(&name16),
                }
            })
            .collect()
    }

    /// Sets the attribute field of partition `number` in memory (nothing is written).
    pub fn set_attributes(&mut self, number: u32, attributes: GptPrio) -> Result<(), TableError> {
        let es = self.header.entry_size() as usize;
        let at = (number as usize)
            .checked_sub(1)
            .and_then(|i| i.checked_mul(es))
            .filter(|&at| at.checked_add(es).is_some_and(|end| end <= self.entries.len()));
        let at = at.ok_or(TableError::NoSuchEntry(number))?;
        self.entries[at + 48..at + 56].copy_from_slice(&attributes.0.to_le_bytes());
        Ok(())
    }

    /// Writes this table's entries to both copies, crash-safely (see the module docs).
    ///
    /// `on_disk` is the table as read before the change; only entry sectors that differ from
    /// it are written, except that an invalid copy is rewritten whole (repair). A table whose
    /// layout fails [`Table::check_layout`] is refused before anything is written.
    pub fn write(&self, dev: &mut dyn BlockDevice, on_disk: &Table) -> Result<(), TableError> {
        self.check_layout().map_err(|e| TableError::Layout(Box::new(e)))?;
        let backup_entries_lba = self.backup_entries_lba.ok_or_else(|| {
            TableError::Layout(Box::new(LayoutError::NoRoomForBackupEntries {
                backup_lba: self.backup_lba,
                sectors: self.header.entries_bytes().div_ceil(self.sector),
            }))
        })?;
        let crc = crc32fast::hash(&self.entries);
        let primary = self.header.placed(self.primary_lba, self.backup_lba, self.primary_entries_lba, crc);
        let backup = self.header.placed(self.backup_lba, self.primary_lba, backup_entries_lba, crc);
        let primary_whole = on_disk.health.primary_error.is_some();
        let backup_whole = on_disk.health.backup_error.is_some();
        self.write_copy(dev, &primary, self.primary_entries_lba, &on_disk.entries, primary_whole)?;
        self.write_copy(dev, &backup, backup_entries_lba, &on_disk.entries, backup_whole)?;
        Ok(())
    }

    fn write_copy(
        &self,
        dev: &mut dyn BlockDevice,
        header: &Header,
        entries_lba: u64,
        old_entries: &[u8],
        whole: bool,
    ) -> Result<(), TableError> {
        let ss = self.sector as usize;
        for (i, (new, old)) in self.entries.chunks(ss).zip(old_entries.chunks(ss)).enumerate() {
            if whole || new != old {
                let off = self.byte_offset(entries_lba.saturating_add(i as u64))?;
                dev.write_at(new, off).map_err(io_err("write", off))?;
            }
        }
        let mut sector = vec![0u8; ss];
        sector[..header.raw.len()].copy_from_slice(&header.raw);
        let off = self.byte_offset(header.my_lba())?;
        dev.write_at(&sector, off).map_err(io_err("write", off))?;
        dev.sync().map_err(io_err("sync", off))
    }

    fn byte_offset(&self, lba: u64) -> Result<u64, TableError> {
        lba.checked_mul(self.sector).ok_or(TableError::OffsetOverflow { lba, sector: self.sector })
    }
}

impl Entry {
    /// This entry as layout errors name it.
    pub fn part(&self) -> Part {
        Part {
            number: self.number,
            name: self.name.clone(),
            lbas: Lbas { first: self.first_lba, last: self.last_lba },
        }
    }
}
