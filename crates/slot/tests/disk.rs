//! Slots on real GPT tables made by Debian's sgdisk, in image files and on loop devices.
//! After every operation `sgdisk -v` must find no problem and `sgdisk -i` must show our bits.

use slot::choice::{self, Slot};
use slot::{Disk, GptPrio, Tries};
use std::path::Path;
use testkit::*;

/// Everything `sgdisk` prints about the table except the attribute lines.
fn layout_without_attributes(sgdisk: &Path, target: &Path) -> String {
    let t = target.to_str().unwrap();
    let mut s = run(sgdisk, &["-p", t]);
    for n in [1, 2, 3, 4, 6, 7, 9] {
        s.push_str(
            &run(sgdisk, &["-i", &n.to_string(), t])
                .lines()
                .filter(|l| !l.starts_with("Attribute flags"))
                .collect::<Vec<_>>()
                .join("\n"),
        );
    }
    s
}

/// The attribute flags the `gpt` crate reads for the partition named `name`.
fn gpt_crate_attributes(target: &Path, name: &str, sector: u64) -> u64 {
    let lb =
        if sector == 4096 { gpt::disk::LogicalBlockSize::Lb4096 } else { gpt::disk::LogicalBlockSize::Lb512 };
    let disk = gpt::GptConfig::new().writable(false).logical_block_size(lb).open(target).unwrap();
    disk.partitions().values().find(|p| p.name == name).unwrap().flags
}

type Step = dyn Fn(&slot::Slots) -> Result<slot::Slots, choice::TransitionError>;

/// A whole update cycle and a rollback on `target`, checking the table after each step.
fn cycle(sgdisk: &Path, target: &Path) {
    let before = layout_without_attributes(sgdisk, target);
    let mut disk = Disk::open(target, true).unwrap();
    let sector = disk.sector_size();
    assert_eq!((disk.partition(Slot::A).number, disk.partition(Slot::B).number), (3, 4));
    assert_eq!(disk.slots().a, GptPrio::from_parts(1, 0, true).unwrap(), "we read what sgdisk wrote");
    let tries = Tries::new(3).unwrap();
    let steps: Vec<(&str, Box<Step>)> = vec![
        ("prepare", Box::new(|s| choice::prepare(s, Slot::A))),
        ("activate", Box::new(move |s| choice::activate(s, Slot::A, tries))),
        ("boot attempt", Box::new(|s| Ok(choice::boot_attempt(s).unwrap().1))),
        ("mark good", Box::new(|s| choice::mark_good(s, Slot::B))),
        ("rollback", Box::new(|s| choice::rollback(s, Slot::B))),
        ("boot attempt", Box::new(|s| Ok(choice::boot_attempt(s).unwrap().1))),
        ("prepare", Box::new(|s| choice::prepare(s, Slot::A))),
        ("activate", Box::new(move |s| choice::activate(s, Slot::A, tries))),
        ("mark bad", Box::new(|s| choice::mark_bad(s, Slot::B))),
    ];
    for (name, step) in steps {
        let new = disk.update(|s| step(s)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_sgdisk_clean(sgdisk, target);
        for (slot, n, label) in [(Slot::A, 3, "USR-A"), (Slot::B, 4, "USR-B")] {
            assert_eq!(sgdisk_attributes(sgdisk, target, n), new.get(slot).0, "{name}: sgdisk -i {n}");
            assert_eq!(
                gpt_crate_attributes(target, label, sector),
                new.get(slot).0,
                "{name}: gpt crate, {label}"
            );
        }
        assert_eq!(
            layout_without_attributes(sgdisk, target),
            before,
            "{name} changed more than attribute bits"
        );
    }
    // After the last "mark bad" of B, A boots next.
    assert_eq!(choice::choose(&Disk::open(target, false).unwrap().slots()), Some(Slot::A));
}

#[test]
fn update_cycle_on_an_image_file() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let dir = tempfile::tempdir().unwrap();
    cycle(&sgdisk, &flatcar_image(&sgdisk, dir.path(), 64, 16));
}

#[test]
fn update_cycle_on_loop_devices_512_and_4096() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    for sector in [512u32, 4096] {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("disk.img");
        std::fs::File::create(&file).unwrap().set_len(64 << 20).unwrap();
        let Some(lo) = Loop::attach(&file, sector) else { return };
        flatcar_layout(&sgdisk, &lo.dev, 16);
        assert_eq!(Disk::open(&lo.dev, false).unwrap().sector_size(), u64::from(sector));
        cycle(&sgdisk, &lo.dev);
    }
}

fn flip(path: &Path, at: u64) {
    let mut b = std::fs::read(path).unwrap();
    b[at as usize] ^= 0x40;
    std::fs::write(path, b).unwrap();
}

#[test]
fn corrupt_primary_falls_back_to_backup_and_is_repaired() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    for (what, offset) in [("primary header", 512 + 60), ("primary entry array", 1024 + 2 * 128 + 60)] {
        let dir = tempfile::tempdir().unwrap();
        let img = flatcar_image(&sgdisk, dir.path(), 64, 16);
        let want = Disk::open(&img, true).unwrap().update(|s| choice::prepare(s, Slot::A)).unwrap();
        flip(&img, offset);
        let mut disk = Disk::open(&img, true).unwrap();
        let err = disk.health().primary_error.clone().unwrap_or_else(|| panic!("{what}: damage not seen"));
        assert!(err.contains("CRC mismatch"), "{what}: {err}");
        assert_eq!(disk.slots(), want, "{what}: backup read");
        assert!(disk.repair().unwrap());
        assert!(Disk::open(&img, false).unwrap().health().is_clean());
        assert_sgdisk_clean(&sgdisk, &img);
    }
}

#[test]
fn corrupt_backup_is_repaired_and_both_corrupt_is_an_error() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let dir = tempfile::tempdir().unwrap();
    let img = flatcar_image(&sgdisk, dir.path(), 64, 16);
    let len = std::fs::metadata(&img).unwrap().len();
    flip(&img, len - 512 + 60);
    let mut disk = Disk::open(&img, true).unwrap();
    assert!(disk.health().backup_error.is_some());
    assert!(disk.repair().unwrap());
    assert_sgdisk_clean(&sgdisk, &img);
    flip(&img, len - 512 + 60);
    flip(&img, 512 + 60);
    let e = Disk::open(&img, false).unwrap_err().to_string();
    assert!(e.contains("no valid GPT: primary header: header CRC mismatch at LBA 1"), "{e}");
}

#[test]
fn disks_that_are_not_ab_disks_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let blank = dir.path().join("blank.img");
    std::fs::File::create(&blank).unwrap().set_len(8 << 20).unwrap();
    let e = Disk::open(&blank, false).unwrap_err().to_string();
    assert!(e.contains("no valid GPT: primary header: no GPT signature at LBA 1"), "{e}");
    let e = Disk::open(&dir.path().join("missing"), false).unwrap_err().to_string();
    assert!(e.starts_with("open "), "{e}");

    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let one = dir.path().join("one.img");
    std::fs::File::create(&one).unwrap().set_len(64 << 20).unwrap();
    run(
        &sgdisk,
        &[
            "-n",
            "3:0:+8M",
            "-c",
            "3:USR-A",
            "-t",
            "3:5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6",
            one.to_str().unwrap(),
        ],
    );
    let e = Disk::open(&one, false).unwrap_err().to_string();
    assert!(e.contains("has no partition named USR-B"), "{e}");
    run(&sgdisk, &["-n", "4:0:+8M", "-c", "4:USR-B", "-t", "4:8300", one.to_str().unwrap()]);
    let e = Disk::open(&one, false).unwrap_err().to_string();
    assert!(e.contains("partition 4 (USR-B) has type 0fc63daf-8483-4772-8e79-3d69d8477de4"), "{e}");
}

#[test]
fn refused_transitions_write_nothing() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let dir = tempfile::tempdir().unwrap();
    let img = flatcar_image(&sgdisk, dir.path(), 64, 16);
    let before = std::fs::read(&img).unwrap();
    let e = Disk::open(&img, true).unwrap().update(|s| choice::rollback(s, Slot::A)).unwrap_err().to_string();
    assert!(e.contains("slot B cannot be rolled back to: it was never confirmed good"), "{e}");
    assert!(std::fs::read(&img).unwrap() == before);
}

/// ChromeOS's own tool (Debian's cgpt) reads the bits we write, and we read what it writes.
#[test]
fn cgpt_and_we_agree_on_the_bits() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let Some(cgpt) = tool("cgpt", "cgpt") else { return };
    let dir = tempfile::tempdir().unwrap();
    let img = flatcar_image(&sgdisk, dir.path(), 64, 16);
    let d = img.to_str().unwrap();
    let show = |i: &str, what: &str| run(&cgpt, &["show", "-i", i, what, d]).trim().to_owned();

    let new = Disk::open(&img, true)
        .unwrap()
        .update(|s| choice::activate(s, Slot::A, Tries::new(3).unwrap()))
        .unwrap();
    assert_eq!(new.b, GptPrio::from_parts(2, 3, false).unwrap());
    assert_eq!((show("4", "-P"), show("4", "-T"), show("4", "-S")), ("2".into(), "3".into(), "0".into()));
    assert_eq!((show("3", "-P"), show("3", "-T"), show("3", "-S")), ("1".into(), "0".into(), "1".into()));

    run(&cgpt, &["add", "-i", "4", "-P", "7", "-T", "5", "-S", "1", d]);
    let disk = Disk::open(&img, false).unwrap();
    assert_eq!(disk.slots().b, GptPrio::from_parts(7, 5, true).unwrap());
    assert!(disk.health().is_clean());
    assert_eq!(choice::choose(&disk.slots()), Some(Slot::B));
    assert_sgdisk_clean(&sgdisk, &img);
}
