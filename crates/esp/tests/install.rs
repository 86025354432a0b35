//! `esp::install` and `esp::status` on real FAT file systems (mkfs.vfat): which set is written,
//! refusals, and damaged partitions.

use esp::{Error, Set, SetState, Window};
/// A machine with Secure Boot on, nothing known of its last boot.
const SB: esp::Machine = esp::Machine { secure_boot: true, started: None };

use std::path::{Path, PathBuf};

fn fat(dir: &Path, kib: u64) -> Option<PathBuf> {
    let mkfs = testkit::tool("mkfs.vfat", "dosfstools")?;
    let img = dir.join("esp.img");
    let _ = std::fs::remove_file(&img);
    testkit::run(&mkfs, &["-C", "-n", "ACL-ESP", img.to_str()?, &kib.to_string()]);
    Some(img)
}

fn window(img: &Path) -> Window {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(img).unwrap();
    let len = f.metadata().unwrap().len();
    Window::new(f, 0, len)
}

/// A kernel of `len` bytes with a PE header, signed or not.
fn kernel(dir: &Path, name: &str, len: usize, signed: bool) -> PathBuf {
    let mut d = vec![0x5au8; len];
    testkit::efi_kernel_header(&mut d, signed);
    d[len - 1] = name.len() as u8;
    let p = dir.join(name);
    std::fs::write(&p, d).unwrap();
    p
}

fn initrd(dir: &Path, name: &str, len: usize) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, vec![name.len() as u8; len]).unwrap();
    p
}

#[test]
fn a_set_shim_refuses_is_the_one_written_under_secure_boot() {
    let dir = tempfile::tempdir().unwrap();
    let Some(img) = fat(dir.path(), 8 << 10) else { return };
    let (signed, unsigned) =
        (kernel(dir.path(), "k-signed", 20_000, true), kernel(dir.path(), "k-un", 21_000, false));
    let i = initrd(dir.path(), "initrd", 30_000);
    let mut w = window(&img);
    assert_eq!(esp::install(&mut w, &signed, &i, SB, &mut |_| {}).unwrap().set, Set::A);
    // An unsigned kernel written as b and switched to: under Secure Boot GRUB skips it.
    let done = esp::install(&mut w, &unsigned, &i, SB, &mut |_| {}).unwrap();
    assert_eq!((done.set, done.contents.kernel_signed), (Set::B, false));
    let st = esp::status(&mut w, SB).unwrap();
    assert_eq!((st.env.clone(), st.boots), (Ok(Set::B), Some(Set::A)), "{st:?}");
    // So the next update replaces b, not the a that GRUB really starts.
    let again = esp::install(&mut w, &signed, &i, SB, &mut |_| {}).unwrap();
    assert_eq!((again.set, again.previous), (Set::B, Some(Set::A)));
    // Without Secure Boot the unsigned set would have been started, and a written instead.
    let st = esp::status(&mut w, esp::Machine::default()).unwrap();
    assert_eq!(st.boots, Some(Set::B));
}

/// A FAT with two signed sets, b named; the image, the first kernel and the initramfs.
fn two_sets(dir: &Path) -> Option<(PathBuf, PathBuf, PathBuf)> {
    let img = fat(dir, 8 << 10)?;
    let (k1, k2) = (kernel(dir, "k1", 20_000, true), kernel(dir, "k22", 20_000, true));
    let i = initrd(dir, "initrd", 30_000);
    let mut w = window(&img);
    esp::install(&mut w, &k1, &i, SB, &mut |_| {}).unwrap();
    esp::install(&mut w, &k2, &i, SB, &mut |_| {}).unwrap();
    Some((img, k1, i))
}

#[test]
fn what_grub_started_this_boot_overrides_the_guess() {
    let dir = tempfile::tempdir().unwrap();
    let Some((img, k1, i)) = two_sets(dir.path()) else { return };
    let mut w = window(&img);
    // Both sets signed and complete, b named: the guess is that GRUB starts b. But this boot
    // came through a (say b's kernel was revoked): a is what starts, and b is what is written,
    // after the block is made to name a.
    let machine = esp::Machine { secure_boot: true, started: Some(Set::A) };
    assert_eq!(esp::status(&mut w, SB).unwrap().boots, Some(Set::B));
    assert_eq!(esp::status(&mut w, machine).unwrap().boots, Some(Set::A));
    let mut said = Vec::new();
    let done = esp::install(&mut w, &k1, &i, machine, &mut |l| said.push(l.to_owned())).unwrap();
    assert_eq!((done.set, done.previous), (Set::B, Some(Set::A)), "{said:?}");
    assert!(said[0].contains("naming it"), "{said:?}");
}

#[test]
fn a_damaged_block_is_first_made_to_name_the_set_grub_starts() {
    let dir = tempfile::tempdir().unwrap();
    let Some((img, k1, i)) = two_sets(dir.path()) else { return };
    // Set b named; now damage a's kernel and the block: GRUB tries a (no block), which is
    // damaged, then b.
    let img_bytes = std::fs::read(&img).unwrap();
    let env_at = find(&img_bytes, b"# GRUB Environment Block").expect("the block is on the partition");
    let mut broken = img_bytes.clone();
    broken[env_at] = b'X';
    std::fs::write(&img, &broken).unwrap();
    let mut w = window(&img);
    let st = esp::status(&mut w, SB).unwrap();
    assert!(st.env.is_err());
    assert_eq!(st.boots, Some(Set::A));
    let mut said = Vec::new();
    let done = esp::install(&mut w, &k1, &i, SB, &mut |l| said.push(l.to_owned())).unwrap();
    // GRUB started a (the first without a block): the block was made to name a, then b written.
    assert_eq!((done.set, done.previous), (Set::B, Some(Set::A)), "{said:?}");
    assert!(said[0].contains("naming it"), "{said:?}");
    assert_eq!(esp::status(&mut w, SB).unwrap().env, Ok(Set::B));
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn a_set_that_does_not_fit_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let Some(img) = fat(dir.path(), 2 << 10) else { return };
    let k = kernel(dir.path(), "k", 600_000, true);
    let i = initrd(dir.path(), "initrd", 600_000);
    let mut w = window(&img);
    esp::install(&mut w, &k, &i, SB, &mut |_| {}).unwrap();
    let before = std::fs::read(&img).unwrap();
    let big = initrd(dir.path(), "big", 900_000);
    let mut w = window(&img);
    match esp::install(&mut w, &k, &big, SB, &mut |_| {}) {
        Err(Error::NoSpace { free, needed }) => assert!(free < needed),
        other => panic!("expected NoSpace, got {other:?}"),
    }
    assert!(std::fs::read(&img).unwrap() == before, "nothing written");
}

#[test]
fn what_is_not_fat_is_named_and_damage_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let zeros = dir.path().join("zeros");
    std::fs::write(&zeros, vec![0u8; 1 << 20]).unwrap();
    let mut w = window(&zeros);
    let e = esp::status(&mut w, SB).unwrap_err();
    assert!(matches!(e, Error::NotFat(_)), "{e}");
    assert!(e.to_string().contains("no FAT file system"), "{e}");

    let Some(img) = fat(dir.path(), 16 << 10) else { return };
    let k = kernel(dir.path(), "k", 20_000, true);
    let i = initrd(dir.path(), "initrd", 30_000);
    esp::install(&mut window(&img), &k, &i, SB, &mut |_| {}).unwrap();
    let good = std::fs::read(&img).unwrap();
    let good_status = esp::status(&mut window(&img), SB).unwrap();
    // Random bytes over the boot sector, the FATs and the root directory (the first 48 KiB):
    // status answers or errs; an install either completes or errs. Never a panic.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut same, mut changed, mut err) = (0, 0, 0);
    for _ in 0..300 {
        let mut bad = good.clone();
        for _ in 0..1 + rnd() % 64 {
            let at = (rnd() % 49_152) as usize;
            bad[at] = rnd() as u8;
        }
        std::fs::write(&img, &bad).unwrap();
        let mut w = window(&img);
        match esp::status(&mut w, SB) {
            Ok(st) => {
                if st == good_status {
                    same += 1
                } else {
                    changed += 1
                }
                if let Ok(done) = esp::install(&mut w, &k, &i, SB, &mut |_| {}) {
                    assert!(matches!(esp::status(&mut w, SB).unwrap().set(done.set), SetState::Complete(_)));
                }
                let _ = st;
            }
            Err(_) => err += 1,
        }
    }
    // The damage was seen (a set or the block read differently, or an error), and survived.
    assert!(changed + err > 0, "unchanged {same}, changed {changed}, errors {err}");
}

#[test]
fn a_looping_cluster_chain_ends_in_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mkfs) = testkit::tool("mkfs.vfat", "dosfstools") else { return };
    let img = dir.path().join("fat32.img");
    testkit::run(&mkfs, &["-C", "-F", "32", img.to_str().unwrap(), "40000"]);
    // The root directory is cluster 2 (in FAT32 a chain like any other): fill it with deleted
    // entries (a reader goes on past them) and make its FAT entry point to itself in both
    // FATs, so the directory never ends.
    let mut b = std::fs::read(&img).unwrap();
    let reserved = u64::from(u16::from_le_bytes([b[14], b[15]])) * 512;
    let fat_bytes = u64::from(u32::from_le_bytes([b[36], b[37], b[38], b[39]])) * 512;
    let cluster = u64::from(b[13]) * 512;
    for fat in 0..2 {
        let at = (reserved + fat * fat_bytes + 2 * 4) as usize;
        b[at..at + 4].copy_from_slice(&2u32.to_le_bytes());
    }
    let root = (reserved + 2 * fat_bytes) as usize;
    for entry in (root..root + cluster as usize).step_by(32) {
        b[entry] = 0xe5;
        b[entry + 1..entry + 11].copy_from_slice(b"DELETED   ");
    }
    std::fs::write(&img, &b).unwrap();
    let t = std::time::Instant::now();
    // The directory is read for each file looked up: each lookup fails, naming the loop.
    let said = match esp::status(&mut window(&img), SB) {
        Ok(st) => format!("{st:?}"),
        Err(e) => e.to_string(),
    };
    assert!(said.contains("loops"), "{said}");
    assert!(t.elapsed() < std::time::Duration::from_secs(60), "{:?}", t.elapsed());
}
