//! Issue 12, item 1: hostile partition tables. Each table here is valid by CRC (sgdisk made the
//! disk, then bytes were edited and the CRCs recomputed) but wrong in its layout: USR-B over
//! USR-A, over the EFI partition, over the primary or backup table, past the disk, reversed, or
//! a header whose alternate LBA or entry count is hostile. Every one must open without a panic,
//! show its problem, and refuse every write with a message naming the partitions and LBAs,
//! leaving every byte of the disk as it was.

use slot::choice::{self, Slot};
use slot::layout::{LayoutError, TableArea};
use slot::{Disk, DiskError};
use std::path::Path;
use testkit::gpt_edit;
use testkit::*;

const DISK_MIB: u64 = 64;
const SECTORS: u64 = (DISK_MIB << 20) / 512;

/// Tries every kind of write on `path` and checks that each is refused with a layout error and
/// that the disk's bytes did not change. Returns the layout error.
fn assert_refused(path: &Path) -> LayoutError {
    let before = std::fs::read(path).unwrap();
    let mut disk = Disk::open(path, true).expect("a table with a bad layout still opens (for status)");
    let problem = disk.check_layout().expect_err("the layout check must fail");
    let expect_layout = |what: &str, r: Result<(), DiskError>| match r {
        Err(DiskError::Layout { source, .. }) => assert_eq!(*source, problem, "{what}"),
        other => panic!("{what}: expected a layout refusal, got {other:?}"),
    };
    expect_layout("prepare", disk.update(|s| choice::prepare(s, Slot::A)).map(drop));
    expect_layout("mark good", disk.update(|s| choice::mark_good(s, Slot::A)).map(drop));
    expect_layout("boot attempt", disk.update(|s| Ok(choice::boot_attempt(s).unwrap().1)).map(drop));
    // Repair writes only when a copy is damaged; then it too is refused.
    if !disk.health().is_clean() {
        expect_layout("repair", disk.repair().map(drop));
    } else {
        assert!(!disk.repair().unwrap(), "repair of clean copies wrote");
    }
    expect_layout("slot extent of B", disk.slot_extent(Slot::B).map(drop));
    let message = disk.update(|s| Ok(*s)).unwrap_err().to_string();
    assert!(message.contains("the disk was not changed"), "{message}");
    assert!(!message.contains('{'), "a Rust struct in the message: {message}");
    drop(disk);
    assert!(std::fs::read(path).unwrap() == before, "a refused write changed the disk");
    problem
}

fn fresh(sgdisk: &Path, dir: &Path) -> std::path::PathBuf {
    let path = flatcar_image(sgdisk, dir, DISK_MIB, 16);
    assert_sgdisk_clean(sgdisk, &path);
    assert_eq!(Disk::open(&path, false).unwrap().check_layout(), Ok(()), "a good table passes");
    path
}

fn sgdisk_finds_a_problem(sgdisk: &Path, path: &Path) {
    let out = std::process::Command::new(sgdisk).arg("-v").arg(path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("No problems found"), "sgdisk -v saw nothing wrong:\n{text}");
}

#[test]
fn issue_12_overlapping_and_misplaced_slots_are_refused_and_named() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = fresh(&sgdisk, dir.path());
    let (efi_first, _) = gpt_edit::extent(&path, 512, 1);
    let (a_first, a_last) = gpt_edit::extent(&path, 512, 3);
    let (b_first, b_last) = gpt_edit::extent(&path, 512, 4);
    let good = std::fs::read(&path).unwrap();

    // (USR-B's new extent, the problem's message.)
    let cases: [(u64, u64, String); 6] = [
        (
            a_first + 100,
            b_last,
            format!(
                "partition 3 USR-A (LBAs {a_first}-{a_last}) overlaps partition 4 USR-B (LBAs {}-{b_last})",
                a_first + 100
            ),
        ),
        (
            efi_first,
            efi_first + 4095,
            format!(
                "partition 1 EFI-SYSTEM (LBAs {efi_first}-{}) overlaps partition 4 USR-B (LBAs {efi_first}-{})",
                efi_first + 8191,
                efi_first + 4095
            ),
        ),
        (
            b_first,
            SECTORS - 2,
            format!(
                "partition 4 USR-B (LBAs {b_first}-{}) overlaps the backup partition entry array at LBAs {}-{}",
                SECTORS - 2,
                SECTORS - 33,
                SECTORS - 2
            ),
        ),
        (
            10,
            b_last,
            format!(
                "partition 4 USR-B (LBAs 10-{b_last}) overlaps the primary partition entry array at LBAs 2-33"
            ),
        ),
        (
            b_first,
            SECTORS + 1000,
            format!(
                "partition 4 USR-B (LBAs {b_first}-{}) runs past the end of the disk (last LBA {})",
                SECTORS + 1000,
                SECTORS - 1
            ),
        ),
        (
            b_last,
            b_first,
            format!(
                "partition 4 USR-B (LBAs {b_last}-{b_first}) ends before it starts (its last LBA is lower than its first)"
            ),
        ),
    ];
    for (first, last, message) in cases {
        std::fs::write(&path, &good).unwrap();
        gpt_edit::set_extent(&path, 512, 4, first, last);
        sgdisk_finds_a_problem(&sgdisk, &path);
        let problem = assert_refused(&path);
        assert_eq!(problem.to_string(), message);
    }

    // Extents at the very top of the 64-bit range: no overflow anywhere.
    std::fs::write(&path, &good).unwrap();
    gpt_edit::set_extent(&path, 512, 4, u64::MAX - 10, u64::MAX);
    assert!(matches!(assert_refused(&path), LayoutError::BeyondDisk { .. }));
    std::fs::write(&path, &good).unwrap();
    gpt_edit::set_extent(&path, 512, 3, u64::MAX, 0);
    assert!(matches!(assert_refused(&path), LayoutError::Reversed(_)));

    // A slot too small to hold anything (1 sector).
    std::fs::write(&path, &good).unwrap();
    gpt_edit::set_extent(&path, 512, 4, b_first, b_first);
    assert!(matches!(assert_refused(&path), LayoutError::SlotTooSmall { bytes: 512, .. }));

    // The good table still works and still passes sgdisk.
    std::fs::write(&path, &good).unwrap();
    Disk::open(&path, true).unwrap().update(|s| choice::prepare(s, Slot::A)).unwrap();
    assert_sgdisk_clean(&sgdisk, &path);
}

#[test]
fn issue_12_hostile_headers_do_not_panic_and_are_refused() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = fresh(&sgdisk, dir.path());
    let good = std::fs::read(&path).unwrap();

    // The primary's alternate LBA points into its own entry array: no room for a backup array
    // before it (this underflowed in table.rs).
    gpt_edit::set_header_u64(&path, 512, 32, 2, false);
    assert!(matches!(assert_refused(&path), LayoutError::NoRoomForBackupEntries { backup_lba: 2, .. }));

    // ... into the gap after it: the backup would be written over the primary's entries.
    std::fs::write(&path, &good).unwrap();
    gpt_edit::set_header_u64(&path, 512, 32, 40, false);
    assert!(matches!(
        assert_refused(&path),
        LayoutError::AreasOverlap { a: TableArea::PrimaryEntries, b: TableArea::BackupEntries, .. }
    ));

    // ... at itself: one copy would stand for both.
    std::fs::write(&path, &good).unwrap();
    gpt_edit::set_header_u64(&path, 512, 32, 1, false);
    assert!(matches!(assert_refused(&path), LayoutError::AreasOverlap { .. }));

    // ... into the middle of USR-A: a valid backup is not there, and writing one would destroy
    // USR-A's data.
    std::fs::write(&path, &good).unwrap();
    let (a_first, _) = gpt_edit::extent(&path, 512, 3);
    gpt_edit::set_header_u64(&path, 512, 32, a_first + 100, false);
    assert!(matches!(
        assert_refused(&path),
        LayoutError::UsableOverTable { area: TableArea::BackupEntries, .. }
    ));

    // ... past the end of any disk.
    std::fs::write(&path, &good).unwrap();
    gpt_edit::set_header_u64(&path, 512, 32, u64::MAX, false);
    assert!(matches!(assert_refused(&path), LayoutError::AreaBeyondDisk { .. }));

    // Usable LBAs that cover the backup table (last usable = the last LBA), on both headers.
    std::fs::write(&path, &good).unwrap();
    gpt_edit::set_header_u64(&path, 512, 48, SECTORS - 1, true);
    assert!(matches!(
        assert_refused(&path),
        LayoutError::UsableOverTable { area: TableArea::BackupEntries, .. }
    ));

    // A primary entry count whose (resealed) array reaches into the usable area: 2048 entries
    // of 128 bytes are LBAs 2-513, and a backup array of that size would run past the disk.
    std::fs::write(&path, &good).unwrap();
    gpt_edit::set_header_u32(&path, 512, 80, 2048, false);
    let e = assert_refused(&path);
    assert!(matches!(e, LayoutError::UsableOverTable { .. } | LayoutError::AreaBeyondDisk { .. }), "{e}");

    // Entry counts and sizes that no reader should follow, on both copies: no table at all,
    // said in words, no panic.
    for (offset, value) in [(80, u32::MAX), (84, 1 << 31), (84, 100), (80, 0)] {
        std::fs::write(&path, &good).unwrap();
        gpt_edit::set_header_u32(&path, 512, offset, value, true);
        let e = Disk::open(&path, true).unwrap_err();
        assert!(matches!(e, DiskError::Table { .. }), "{e}");
        assert!(e.to_string().contains("no valid GPT"), "{e}");
        assert!(std::fs::read(&path).unwrap() != good, "the edit took");
    }
}
