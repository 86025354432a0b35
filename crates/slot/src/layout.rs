//! Where things lie on the disk, checked before anything is written.
//!
//! The table's CRCs only say that a copy is intact, not that it makes sense: a table whose USR-B
//! entry covers USR-A, the EFI partition or the backup table is perfectly valid by CRC, and the
//! installer would write an image over whatever the entry covers (issue 12). So before any write,
//! to the table or to a slot, [`check`] holds the table to these rules, all in checked
//! arithmetic so that no number in a table can make us panic:
//!
//! - the primary header is at LBA 1 and both copies (header and entry array) lie on the disk,
//!   apart from each other and from the protective MBR;
//! - the header's usable LBAs lie on the disk and cover none of those areas;
//! - every used entry starts no later than it ends, lies on the disk, covers none of the table
//!   areas, lies inside the usable LBAs, and overlaps no other entry.
//!
//! The slot-specific rule (a slot is big enough to hold anything) is in `disk.rs`. A failed check
//! is a [`LayoutError`] that names the partitions, areas and LBAs involved; `aclctl status` shows
//! it as the table's problem.

use std::fmt;

/// A region of the disk that belongs to the partition table itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableArea {
    /// LBA 0.
    ProtectiveMbr,
    /// The primary header (LBA 1).
    PrimaryHeader,
    /// The primary copy of the entry array.
    PrimaryEntries,
    /// The backup copy of the entry array.
    BackupEntries,
    /// The backup header (normally the last LBA).
    BackupHeader,
}

impl fmt::Display for TableArea {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TableArea::ProtectiveMbr => "the protective MBR",
            TableArea::PrimaryHeader => "the primary GPT header",
            TableArea::PrimaryEntries => "the primary partition entry array",
            TableArea::BackupEntries => "the backup partition entry array",
            TableArea::BackupHeader => "the backup GPT header",
        })
    }
}

/// An inclusive range of LBAs, `first..=last`, as GPT entries store them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lbas {
    /// First LBA.
    pub first: u64,
    /// Last LBA (inclusive).
    pub last: u64,
}

impl Lbas {
    fn overlaps(self, other: Lbas) -> bool {
        self.first <= other.last && other.first <= self.last
    }
    fn within(self, outer: Lbas) -> bool {
        outer.first <= self.first && self.last <= outer.last
    }
}

impl fmt::Display for Lbas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "LBA {}", self.first)
        } else {
            write!(f, "LBAs {}-{}", self.first, self.last)
        }
    }
}

/// A used partition entry as errors name it: number, name and extent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// Partition number.
    pub number: u32,
    /// Partition name (PARTLABEL), possibly empty.
    pub name: String,
    /// Its extent as the entry states it (possibly reversed).
    pub lbas: Lbas,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name.is_empty() {
            write!(f, "partition {} ({})", self.number, self.lbas)
        } else {
            write!(f, "partition {} {} ({})", self.number, self.name, self.lbas)
        }
    }
}

/// The table describes a disk that must not be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The primary header is not where every GPT keeps it.
    #[error("the primary GPT header would be at LBA {0}, not LBA 1")]
    PrimaryNotAtLba1(u64),
    /// The backup header leaves no room for its entry array before it.
    #[error("the backup GPT header at LBA {backup_lba} leaves no room for its {sectors}-sector entry array")]
    NoRoomForBackupEntries {
        /// Where the backup header is.
        backup_lba: u64,
        /// Sectors the entry array needs.
        sectors: u64,
    },
    /// A table area that does not fit on the disk.
    #[error("{area} at {lbas} lies beyond the end of the disk (last LBA {disk_last})")]
    AreaBeyondDisk {
        /// Which.
        area: TableArea,
        /// Where.
        lbas: Lbas,
        /// The disk's last LBA.
        disk_last: u64,
    },
    /// Two table areas on the same sectors.
    #[error("{a} at {a_lbas} overlaps {b} at {b_lbas}")]
    AreasOverlap {
        /// One area.
        a: TableArea,
        /// Where.
        a_lbas: Lbas,
        /// The other.
        b: TableArea,
        /// Where.
        b_lbas: Lbas,
    },
    /// The header's usable LBAs leave the disk.
    #[error("the GPT header's usable {usable} run past the end of the disk (last LBA {disk_last})")]
    UsableBeyondDisk {
        /// The usable LBAs.
        usable: Lbas,
        /// The disk's last LBA.
        disk_last: u64,
    },
    /// The header's usable LBAs cover part of the table.
    #[error("the GPT header's usable {usable} cover {area} at {lbas}")]
    UsableOverTable {
        /// The usable LBAs.
        usable: Lbas,
        /// The area covered.
        area: TableArea,
        /// Where.
        lbas: Lbas,
    },
    /// An entry whose last LBA comes before its first.
    #[error("{0} ends before it starts (its last LBA is lower than its first)")]
    Reversed(Part),
    /// An entry past the end of the disk.
    #[error("{part} runs past the end of the disk (last LBA {disk_last})")]
    BeyondDisk {
        /// The entry.
        part: Part,
        /// The disk's last LBA.
        disk_last: u64,
    },
    /// An entry over a table area.
    #[error("{part} overlaps {area} at {lbas}")]
    OverTable {
        /// The entry.
        part: Part,
        /// The area.
        area: TableArea,
        /// Where.
        lbas: Lbas,
    },
    /// An entry outside the usable LBAs.
    #[error("{part} lies outside the usable {usable} the GPT header declares")]
    OutsideUsable {
        /// The entry.
        part: Part,
        /// The usable LBAs.
        usable: Lbas,
    },
    /// Two entries on the same sectors.
    #[error("{a} overlaps {b}")]
    Overlap {
        /// The entry that comes first on the disk.
        a: Part,
        /// The other.
        b: Part,
    },
    /// A slot too small to be one.
    #[error("slot partition {part} holds {bytes} bytes, less than the {min} bytes a slot needs")]
    SlotTooSmall {
        /// The slot's entry.
        part: Part,
        /// Its size.
        bytes: u64,
        /// The minimum.
        min: u64,
    },
}

/// Everything [`check`] needs to know about a table, as plain numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    /// Sectors on the disk.
    pub disk_sectors: u64,
    /// Where the primary header is (must be 1).
    pub primary_lba: u64,
    /// Where the primary entry array starts.
    pub primary_entries_lba: u64,
    /// Where the backup header is.
    pub backup_lba: u64,
    /// Where the backup entry array starts; `None` when it would start before LBA 0.
    pub backup_entries_lba: Option<u64>,
    /// Sectors of one entry array.
    pub entry_sectors: u64,
    /// The header's usable LBAs.
    pub usable: Lbas,
}

/// Checks a table's areas and its used entries (see the module docs). Pure.
pub fn check(g: &Geometry, parts: &[Part]) -> Result<(), LayoutError> {
    let disk_last = g.disk_sectors.saturating_sub(1);
    let areas = areas(g)?;
    let disk = Lbas { first: 0, last: disk_last };
    for &(area, lbas) in &areas {
        if g.disk_sectors == 0 || !lbas.within(disk) {
            return Err(LayoutError::AreaBeyondDisk { area, lbas, disk_last });
        }
    }
    for (i, &(a, a_lbas)) in areas.iter().enumerate() {
        for &(b, b_lbas) in &areas[i + 1..] {
            if a_lbas.overlaps(b_lbas) {
                return Err(LayoutError::AreasOverlap { a, a_lbas, b, b_lbas });
            }
        }
    }
    // An empty usable range (first > last) is harmless in itself: every entry is outside it.
    if g.usable.first <= g.usable.last {
        if !g.usable.within(disk) {
            return Err(LayoutError::UsableBeyondDisk { usable: g.usable, disk_last });
        }
        if let Some(&(area, lbas)) = areas.iter().find(|(_, l)| l.overlaps(g.usable)) {
            return Err(LayoutError::UsableOverTable { usable: g.usable, area, lbas });
        }
    }
    for p in parts {
        if p.lbas.first > p.lbas.last {
            return Err(LayoutError::Reversed(p.clone()));
        }
        if !p.lbas.within(disk) {
            return Err(LayoutError::BeyondDisk { part: p.clone(), disk_last });
        }
        if let Some(&(area, lbas)) = areas.iter().find(|(_, l)| l.overlaps(p.lbas)) {
            return Err(LayoutError::OverTable { part: p.clone(), area, lbas });
        }
        if !p.lbas.within(g.usable) {
            return Err(LayoutError::OutsideUsable { part: p.clone(), usable: g.usable });
        }
    }
    // Sorted by start, an entry overlaps an earlier one exactly when it starts no later than
    // the furthest end seen so far.
    let mut sorted: Vec<&Part> = parts.iter().collect();
    sorted.sort_by_key(|p| (p.lbas.first, p.number));
    let mut furthest: Option<&Part> = None;
    for p in sorted {
        if let Some(f) = furthest
            && p.lbas.first <= f.lbas.last
        {
            return Err(LayoutError::Overlap { a: f.clone(), b: p.clone() });
        }
        if furthest.is_none_or(|f| p.lbas.last > f.lbas.last) {
            furthest = Some(p);
        }
    }
    Ok(())
}

/// The table's own areas, in disk order for a standard table.
fn areas(g: &Geometry) -> Result<[(TableArea, Lbas); 5], LayoutError> {
    if g.primary_lba != 1 {
        return Err(LayoutError::PrimaryNotAtLba1(g.primary_lba));
    }
    let backup_entries = g
        .backup_entries_lba
        .ok_or(LayoutError::NoRoomForBackupEntries { backup_lba: g.backup_lba, sectors: g.entry_sectors })?;
    // An entry array of n sectors at s covers s..=s+n-1; n >= 1 (read_copy refuses empty
    // arrays), and the end is saturated so that an array past u64 is "beyond the disk".
    let span = |first: u64| Lbas { first, last: first.saturating_add(g.entry_sectors.max(1) - 1) };
    Ok([
        (TableArea::ProtectiveMbr, Lbas { first: 0, last: 0 }),
        (TableArea::PrimaryHeader, Lbas { first: g.primary_lba, last: g.primary_lba }),
        (TableArea::PrimaryEntries, span(g.primary_entries_lba)),
        (TableArea::BackupEntries, span(backup_entries)),
        (TableArea::BackupHeader, Lbas { first: g.backup_lba, last: g.backup_lba }),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A standard table on a 1 MiB disk of 512-byte sectors: 2048 sectors, 32-sector arrays.
    fn standard() -> Geometry {
        Geometry {
            disk_sectors: 2048,
            primary_lba: 1,
            primary_entries_lba: 2,
            backup_lba: 2047,
            backup_entries_lba: Some(2015),
            entry_sectors: 32,
            usable: Lbas { first: 34, last: 2014 },
        }
    }

    fn part(number: u32, name: &str, first: u64, last: u64) -> Part {
        Part { number, name: name.into(), lbas: Lbas { first, last } }
    }

    fn good_parts() -> Vec<Part> {
        vec![part(1, "EFI-SYSTEM", 34, 99), part(3, "USR-A", 100, 999), part(4, "USR-B", 1000, 2014)]
    }

    #[test]
    fn a_standard_table_passes() {
        assert_eq!(check(&standard(), &good_parts()), Ok(()));
        assert_eq!(check(&standard(), &[]), Ok(()));
    }

    #[test]
    fn every_rule_names_what_breaks_it() {
        let g = standard();
        let with = |n: usize, p: Part| {
            let mut v = good_parts();
            v[n] = p;
            check(&g, &v).unwrap_err().to_string()
        };
        assert_eq!(
            with(2, part(4, "USR-B", 900, 2014)),
            "partition 3 USR-A (LBAs 100-999) overlaps partition 4 USR-B (LBAs 900-2014)"
        );
        assert_eq!(
            with(2, part(4, "USR-B", 50, 60)),
            "partition 1 EFI-SYSTEM (LBAs 34-99) overlaps partition 4 USR-B (LBAs 50-60)"
        );
        assert_eq!(
            with(2, part(4, "USR-B", 1000, 2030)),
            "partition 4 USR-B (LBAs 1000-2030) overlaps the backup partition entry array at LBAs 2015-2046"
        );
        assert_eq!(
            with(2, part(4, "USR-B", 1000, 5000)),
            "partition 4 USR-B (LBAs 1000-5000) runs past the end of the disk (last LBA 2047)"
        );
        assert_eq!(
            with(2, part(4, "USR-B", 2000, 1000)),
            "partition 4 USR-B (LBAs 2000-1000) ends before it starts (its last LBA is lower than its first)"
        );
        assert_eq!(
            with(0, part(1, "", 10, 40)),
            "partition 1 (LBAs 10-40) overlaps the primary partition entry array at LBAs 2-33"
        );
        assert_eq!(
            with(2, part(4, "USR-B", u64::MAX - 1, u64::MAX)),
            format!(
                "partition 4 USR-B (LBAs {}-{}) runs past the end of the disk (last LBA 2047)",
                u64::MAX - 1,
                u64::MAX
            )
        );
        let narrow = Geometry { usable: Lbas { first: 34, last: 1500 }, ..standard() };
        assert!(matches!(check(&narrow, &good_parts()), Err(LayoutError::OutsideUsable { .. })));
    }

    #[test]
    fn hostile_table_areas_are_refused_without_panic() {
        let cases = [
            Geometry { primary_lba: 5, ..standard() },
            Geometry { backup_entries_lba: None, backup_lba: 3, ..standard() },
            Geometry { backup_lba: 2, backup_entries_lba: Some(0), ..standard() },
            Geometry { backup_lba: 1, ..standard() },
            Geometry { backup_lba: 9000, ..standard() },
            Geometry { primary_entries_lba: u64::MAX, ..standard() },
            Geometry { entry_sectors: u64::MAX, ..standard() },
            Geometry { disk_sectors: 0, ..standard() },
            Geometry { usable: Lbas { first: 2, last: 2014 }, ..standard() },
            Geometry { usable: Lbas { first: 34, last: u64::MAX }, ..standard() },
        ];
        for g in cases {
            let e = check(&g, &good_parts());
            assert!(e.is_err(), "{g:?} passed");
        }
        // An empty usable range is no problem in itself; any partition is then outside it.
        let empty = Geometry { usable: Lbas { first: 2014, last: 34 }, ..standard() };
        assert_eq!(check(&empty, &[]), Ok(()));
        assert!(matches!(check(&empty, &good_parts()), Err(LayoutError::OutsideUsable { .. })));
    }

    #[test]
    fn overlap_is_found_whatever_the_entry_order() {
        // A long partition that covers two later ones is found even when the second starts after
        // the first of them ends.
        let parts = vec![part(9, "ROOT", 1500, 1600), part(1, "BIG", 34, 1999), part(2, "SMALL", 1700, 1800)];
        let e = check(&standard(), &parts).unwrap_err();
        assert_eq!(e, LayoutError::Overlap { a: parts[1].clone(), b: parts[0].clone() });
        let e = check(&standard(), &[parts[1].clone(), parts[2].clone()]).unwrap_err();
        assert_eq!(e, LayoutError::Overlap { a: parts[1].clone(), b: parts[2].clone() });
    }
}
