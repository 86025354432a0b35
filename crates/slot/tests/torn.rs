//! Torn table writes: the write cut after every sector, and with the sectors of each unsynced
//! batch landing in any subset (a disk may reorder writes between two syncs). After every cut
//! the table must read back valid with either the old or the new bits, and repair must leave
//! both copies valid without changing them.

use slot::choice::{self, Slot};
use slot::table::BlockDevice;
use slot::{Disk, Slots, Tries};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use testkit::*;

/// An in-memory disk (a shared base image plus an overlay of written sectors) that logs
/// every write and sync.
#[derive(Clone)]
struct Recorder {
    base: Arc<Vec<u8>>,
    overlay: BTreeMap<u64, Vec<u8>>,
    /// Batches of sector writes between syncs.
    batches: Vec<Vec<(u64, Vec<u8>)>>,
}

impl Recorder {
    fn new(base: Arc<Vec<u8>>) -> Self {
        Recorder { base, overlay: BTreeMap::new(), batches: vec![Vec::new()] }
    }

    fn image(&self) -> Vec<u8> {
        let mut v = self.base.to_vec();
        for (off, s) in &self.overlay {
            v[*off as usize..*off as usize + s.len()].copy_from_slice(s);
        }
        v
    }
}

impl BlockDevice for Recorder {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.base.len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        buf.copy_from_slice(&self.base[offset as usize..offset as usize + buf.len()]);
        let end = offset + buf.len() as u64;
        for (off, s) in self.overlay.range(offset.saturating_sub(511)..end) {
            for (i, b) in s.iter().enumerate() {
                let at = off + i as u64;
                if (offset..end).contains(&at) {
                    buf[(at - offset) as usize] = *b;
                }
            }
        }
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        assert_eq!(offset % 512, 0, "writes are sector-aligned");
        let batch = self.batches.last_mut().expect("open batch");
        // Log sector by sector: a torn write can stop at any sector boundary.
        for (i, s) in buf.chunks(512).enumerate() {
            let off = offset + i as u64 * 512;
            self.overlay.insert(off, s.to_vec());
            batch.push((off, s.to_vec()));
        }
        Ok(())
    }
    fn sync(&mut self) -> std::io::Result<()> {
        self.batches.push(Vec::new());
        Ok(())
    }
}

/// Which sectors of a batch of `n` reach the disk: every subset when there are few; otherwise
/// every in-order prefix (a cut at each sector boundary), every "all but one", and 512
/// pseudo-random subsets.
fn subsets(n: usize) -> Vec<u64> {
    assert!(n < 64);
    if n <= 12 {
        return (0..1u64 << n).collect();
    }
    let all = (1u64 << n) - 1;
    let mut v: Vec<u64> = (0..=n).map(|k| (1u64 << k) - 1).collect();
    v.extend((0..n).map(|j| all & !(1 << j)));
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..512 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(x & all);
    }
    v
}

fn apply(base: &Arc<Vec<u8>>, writes: &[&(u64, Vec<u8>)]) -> Recorder {
    let mut r = Recorder::new(Arc::clone(base));
    for (off, bytes) in writes {
        r.overlay.insert(*off, bytes.clone());
    }
    r
}

/// Runs `transition` on `base`, then checks every torn variant of its writes; returns how many.
fn check_all_cuts(
    base: &Arc<Vec<u8>>,
    transition: impl Fn(&Slots) -> Result<Slots, choice::TransitionError>,
) -> usize {
    let path = Path::new("memory");
    let old = Disk::from_device(apply(base, &[]), path).unwrap().slots();
    let mut disk = Disk::from_device(Recorder::new(Arc::clone(base)), path).unwrap();
    let new = disk.update(transition).unwrap();
    assert_ne!(old, new, "the transition must change something for the test to mean anything");
    let batches: Vec<Vec<(u64, Vec<u8>)>> =
        disk.device().batches.iter().filter(|b| !b.is_empty()).cloned().collect();
    assert_eq!(batches.len(), 2, "primary then backup, each followed by a sync");
    let mut cases = 0;
    for (i, batch) in batches.iter().enumerate() {
        let done: Vec<&(u64, Vec<u8>)> = batches[..i].iter().flatten().collect();
        for mask in subsets(batch.len()) {
            let mut writes = done.clone();
            writes.extend(batch.iter().enumerate().filter(|(j, _)| mask & (1 << j) != 0).map(|(_, w)| w));
            let dev = apply(base, &writes);
            let torn =
                Disk::from_device(dev, path).unwrap_or_else(|e| panic!("batch {i} mask {mask:b}: {e}"));
            let seen = torn.slots();
            assert!(seen == old || seen == new, "batch {i} mask {mask:b}: read {seen:?}");
            if i == 1 || mask == (1u64 << batch.len()) - 1 {
                // Once the primary batch is complete, the new bits must win.
                assert_eq!(seen, new, "batch {i} mask {mask:b}: primary complete but old bits read");
            }
            let mut torn = torn;
            torn.repair().unwrap();
            assert!(torn.health().is_clean());
            assert_eq!(torn.slots(), seen, "repair changed the bits");
            cases += 1;
        }
    }
    cases
}

#[test]
fn every_cut_reads_back_old_or_new() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let dir = tempfile::tempdir().unwrap();
    let img = flatcar_image(&sgdisk, dir.path(), 64, 16);
    let base = Arc::new(std::fs::read(&img).unwrap());
    let activate = |s: &Slots| choice::activate(s, Slot::A, Tries::new(2).unwrap());
    let mut cases = check_all_cuts(&base, activate);

    // A disk with B activated: prepare, a boot attempt and mark-good all change bits.
    let mut staged = Disk::from_device(apply(&base, &[]), Path::new("memory")).unwrap();
    staged.update(activate).unwrap();
    let staged = Arc::new(staged.device().image());
    cases += check_all_cuts(&staged, |s| choice::prepare(s, Slot::A));
    cases += check_all_cuts(&staged, |s| Ok(choice::boot_attempt(s).unwrap().1));
    cases += check_all_cuts(&staged, |s| choice::mark_good(s, Slot::B));

    // The same with the primary header already corrupt: the write rewrites it whole.
    let mut damaged = staged.to_vec();
    damaged[512 + 60] ^= 0x40;
    let damaged = Arc::new(damaged);
    cases += check_all_cuts(&damaged, |s| choice::prepare(s, Slot::A));
    eprintln!("{cases} torn variants checked");
    assert!(cases >= 16);
}
