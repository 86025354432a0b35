//! The crash test of the first-stage update: a power cut at any point of `esp::install` leaves
//! a partition whose first GRUB choice is a complete set (the old one until the switch), and
//! that `fsck.vfat` reads.
//!
//! Every write `install` makes is recorded, with every sync. Crash states are then built from
//! the partition before the update plus:
//! - every prefix of the writes, in order (a disk that writes in order);
//! - the same with the last write torn after its first sector;
//! - random subsets of the sectors dirtied since the last sync, as of several points in that
//!   stretch (a disk, or the page cache, writes back in any order until a sync).
//!
//! Each state is checked the way GRUB will see it: the block's set, then which set is
//! complete; and by `fsck.vfat -n` (Debian's dosfstools), whose findings are counted.

// The test reports its table on standard output (cargo test --nocapture shows it).
#![allow(clippy::print_stdout)]

use esp::{Set, SetState, Storage};
use std::collections::BTreeMap;
use std::io::{self, Cursor, Read, Seek, SeekFrom, Write};
/// A machine with Secure Boot on, nothing known of its last boot.
const SB: esp::Machine = esp::Machine { secure_boot: true, started: None };

use std::path::Path;

const SECTOR: usize = 512;

/// One recorded operation.
#[derive(Debug, Clone)]
enum Op {
    Write { at: u64, data: Vec<u8> },
    Sync,
}

/// An in-memory partition that records what is written to it.
struct Recorder {
    inner: Cursor<Vec<u8>>,
    log: Vec<Op>,
}

impl Read for Recorder {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for Recorder {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let at = self.inner.position();
        let n = self.inner.write(buf)?;
        self.log.push(Op::Write { at, data: buf[..n].to_vec() });
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Recorder {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.inner.seek(to)
    }
}

impl Storage for Recorder {
    fn sync(&mut self) -> io::Result<()> {
        self.log.push(Op::Sync);
        Ok(())
    }
}

/// A fresh FAT file system of `kib` made by mkfs.vfat (`fat` 16 or 32).
fn mkfs(dir: &Path, kib: u64, fat: &str) -> Option<Vec<u8>> {
    let mkfs = testkit::tool("mkfs.vfat", "dosfstools")?;
    let img = dir.join(format!("fat{fat}.img"));
    testkit::run(&mkfs, &["-C", "-F", fat, "-n", "ACL-ESP", img.to_str()?, &kib.to_string()]);
    std::fs::read(img).ok()
}

/// A file of `len` pseudo-random bytes (a kernel gets a signed PE header).
fn file(dir: &Path, name: &str, len: usize, seed: u64, pe: bool) -> std::path::PathBuf {
    let mut x = seed | 1;
    let mut data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    if pe {
        testkit::efi_kernel_header(&mut data, true);
    }
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// A crash state: the partition before the update, and the sectors that differ from it.
type State = BTreeMap<usize, Vec<u8>>;

/// Puts `data` at `at` into `state` (sector by sector, over `base`).
fn apply(base: &[u8], state: &mut State, at: u64, data: &[u8]) {
    let (at, end) = (at as usize, at as usize + data.len());
    for s in at / SECTOR..=(end - 1) / SECTOR {
        let sector = state.entry(s).or_insert_with(|| base[s * SECTOR..(s + 1) * SECTOR].to_vec());
        let (from, to) = (at.max(s * SECTOR), end.min((s + 1) * SECTOR));
        sector[from - s * SECTOR..to - s * SECTOR].copy_from_slice(&data[from - at..to - at]);
    }
}

/// A state read as a partition.
struct Overlay<'a> {
    base: &'a [u8],
    state: &'a State,
    pos: usize,
}

impl Read for Overlay<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.base.len() {
            return Ok(0);
        }
        let s = self.pos / SECTOR;
        let off = self.pos % SECTOR;
        let n = buf.len().min(SECTOR - off);
        match self.state.get(&s) {
            Some(sector) => buf[..n].copy_from_slice(&sector[off..off + n]),
            None => buf[..n].copy_from_slice(&self.base[self.pos..self.pos + n]),
        }
        self.pos += n;
        Ok(n)
    }
}

impl Write for Overlay<'_> {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::other("a crash state is only read"))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Overlay<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = match to {
            SeekFrom::Start(p) => p as usize,
            SeekFrom::End(d) => (self.base.len() as i64 + d) as usize,
            SeekFrom::Current(d) => (self.pos as i64 + d) as usize,
        };
        Ok(self.pos as u64)
    }
}

impl Storage for Overlay<'_> {
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What one crash state shows.
#[derive(Debug, Default)]
struct Tally {
    states: usize,
    first_choice_old: usize,
    first_choice_new: usize,
    fsck_run: usize,
    fsck_clean: usize,
    fsck_findings: BTreeMap<String, usize>,
}

struct Case {
    /// The partition before the update; also in `scratch`, which states are applied to.
    base: Vec<u8>,
    old_kernel: String,
    new_kernel: String,
    fsck: Option<std::path::PathBuf>,
    /// fsck.vfat checks every this many states (and every state once the switch may land).
    fsck_every: usize,
    scratch: std::path::PathBuf,
}

impl Case {
    /// Checks one crash state; `switched` whether the final switch may have landed.
    fn check(&self, state: &State, what: &str, switched: bool, tally: &mut Tally) {
        tally.states += 1;
        let st = esp::status(&mut Overlay { base: &self.base, state, pos: 0 }, SB)
            .unwrap_or_else(|e| panic!("{what}: the partition cannot be read: {e}"));
        let named = st.env.as_ref().ok().copied();
        let first = esp::choice::order(named)[0];
        let SetState::Complete(contents) = st.set(first) else {
            panic!(
                "{what}: GRUB's first choice, set {first}, is not complete: {:?} (block {:?})",
                st.set(first),
                st.env
            )
        };
        if contents.kernel_sha256 == self.old_kernel {
            tally.first_choice_old += 1;
        } else {
            assert!(switched, "{what}: GRUB's first choice is the new set before the switch");
            assert_eq!(contents.kernel_sha256, self.new_kernel, "{what}");
            tally.first_choice_new += 1;
        }
        if let Some(fsck) = self
            .fsck
            .as_ref()
            .filter(|_| tally.states % self.fsck_every == 1 || self.fsck_every == 1 || switched)
        {
            use std::os::unix::fs::FileExt as _;
            let f = std::fs::OpenOptions::new().write(true).open(&self.scratch).unwrap();
            for (s, sector) in state {
                f.write_all_at(sector, (s * SECTOR) as u64).unwrap();
            }
            let out = std::process::Command::new(fsck).arg("-n").arg(&self.scratch).output().unwrap();
            for s in state.keys() {
                f.write_all_at(&self.base[s * SECTOR..(s + 1) * SECTOR], (s * SECTOR) as u64).unwrap();
            }
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            // Exit 0: clean; 1: findings it would repair; anything else: it could not check.
            let code = out.status.code().unwrap_or(-1);
            assert!(code == 0 || code == 1, "{what}: fsck.vfat -n exited {code}:\n{text}");
            tally.fsck_run += 1;
            if code == 0 {
                tally.fsck_clean += 1;
            }
            // What fsck would change never touches GRUB's first choice.
            let first_files = format!("acl-{first}-");
            if let Some(l) = text.lines().find(|l| l.to_lowercase().contains(&first_files)) {
                panic!("{what}: fsck.vfat names a file of GRUB's first choice, set {first}: {l}\n{text}");
            }
            let kinds: std::collections::BTreeSet<String> = text.lines().filter_map(finding).collect();
            for k in kinds {
                *tally.fsck_findings.entry(k).or_default() += 1;
            }
        }
    }
}

/// The kind of finding an `fsck.vfat -n` line reports, if it reports one.
fn finding(line: &str) -> Option<String> {
    let kinds = [
        ("Dirty bit", "the dirty bit is set (cut while mounted)"),
        ("FATs differ", "the two FAT copies differ"),
        ("unused cluster", "lost clusters (allocated, in no file)"),
        ("File size is", "a file's size and its cluster chain disagree"),
        ("Truncating", "a file's size and its cluster chain disagree"),
        ("free cluster", "a cluster chain runs into a free cluster"),
        ("share clusters", "two files share clusters"),
        ("Orphaned long file name", "orphaned long-name entries"),
        ("Long filename fragment", "orphaned long-name entries"),
        ("Wrong checksum for long file", "orphaned long-name entries"),
        ("Free cluster summary", "the free-cluster count is wrong"),
        ("between boot sector and its backup", "the boot sector differs from its backup (the dirty bit)"),
    ];
    kinds.iter().find(|(pat, _)| line.contains(pat)).map(|(_, k)| (*k).to_owned()).or_else(|| {
        let known = [
            "fsck.fat",
            "Leaving filesystem",
            "files,",
            "Auto-",
            "Not auto",
            "(Maybe",
            "Automatically",
            "Using first FAT",
            "Start does point",
            "mostly harmless",
            "  ",
        ];
        let ignorable =
            line.trim().is_empty() || line.starts_with('/') || known.iter().any(|k| line.contains(k));
        (!ignorable).then(|| format!("other: {line}"))
    })
}

/// Small deterministic random numbers (xorshift).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn crash_test(fat: &str, kib: u64, fsck_every: usize) {
    let dir = tempfile::tempdir().unwrap();
    let Some(fresh) = mkfs(dir.path(), kib, fat) else { return };
    let fsck = testkit::tool("fsck.vfat", "dosfstools");
    // Two releases of the first stage; the kernel and initramfs are sized so that each spans
    // many clusters and FAT sectors.
    let (k1, i1) = (file(dir.path(), "k1", 96 << 10, 1, true), file(dir.path(), "i1", 160 << 10, 2, false));
    let (k2, i2) = (file(dir.path(), "k2", 104 << 10, 3, true), file(dir.path(), "i2", 150 << 10, 4, false));
    let (k3, i3) = (file(dir.path(), "k3", 90 << 10, 5, true), file(dir.path(), "i3", 170 << 10, 6, false));

    // Provisioned with 1, then updated to 2: set a holds 1, set b 2, the block names b.
    let mut disk = Recorder { inner: Cursor::new(fresh), log: Vec::new() };
    let first = esp::install(&mut disk, &k1, &i1, SB, &mut |_| {}).unwrap();
    assert_eq!((first.set, first.previous), (Set::A, None));
    let second = esp::install(&mut disk, &k2, &i2, SB, &mut |_| {}).unwrap();
    assert_eq!((second.set, second.previous), (Set::B, Some(Set::A)));

    // The update under test: 3 replaces 1 in set a, then the block names a.
    let before = disk.inner.get_ref().clone();
    disk.log.clear();
    let third = esp::install(&mut disk, &k3, &i3, SB, &mut |_| {}).unwrap();
    assert_eq!((third.set, third.previous), (Set::A, Some(Set::B)));
    let log = disk.log.clone();
    let after = disk.inner.into_inner();
    let st = esp::status(&mut Recorder { inner: Cursor::new(after.clone()), log: Vec::new() }, SB).unwrap();
    assert_eq!((st.env.clone(), st.boots), (Ok(Set::A), Some(Set::A)));
    assert!(st.b.complete(), "the fallback set stays complete: {:?}", st.b);

    let sha = |p: &Path| {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
    };
    let scratch = dir.path().join("state.img");
    std::fs::write(&scratch, &before).unwrap();
    let case = Case {
        base: before.clone(),
        old_kernel: sha(&k2),
        new_kernel: sha(&k3),
        fsck: fsck.clone(),
        fsck_every,
        scratch,
    };
    let writes = log.iter().filter(|o| matches!(o, Op::Write { .. })).count();
    let syncs = log.iter().filter(|o| matches!(o, Op::Sync)).count();
    // The switch may land only in the last stretch (after the second-to-last sync).
    let last_stretch = log.iter().rposition(|o| matches!(o, Op::Sync)).unwrap();
    let switch_from = log[..last_stretch].iter().rposition(|o| matches!(o, Op::Sync)).unwrap_or(0);

    let mut tally = Tally::default();
    // In order, and torn.
    let mut state = State::new();
    case.check(&state, "before any write", false, &mut tally);
    for (i, op) in log.iter().enumerate() {
        let Op::Write { at, data } = op else { continue };
        if data.len() > SECTOR {
            let mut torn = state.clone();
            apply(&before, &mut torn, *at, &data[..SECTOR - (*at as usize % SECTOR)]);
            case.check(&torn, &format!("write {i} torn after one sector"), i > switch_from, &mut tally);
        }
        apply(&before, &mut state, *at, data);
        case.check(&state, &format!("after write {i} of {}", log.len()), i > switch_from, &mut tally);
    }
    let mut replayed = before.clone();
    for (s, sector) in &state {
        replayed[s * SECTOR..(s + 1) * SECTOR].copy_from_slice(sector);
    }
    assert!(replayed == after, "replaying the log gives the partition install left");

    // Out of order within each stretch between syncs.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut base = State::new();
    let mut start = 0;
    for (end, _) in log.iter().enumerate().filter(|(_, o)| matches!(o, Op::Sync)) {
        let stretch = &log[start..end];
        let cuts = 8.min(stretch.len());
        for c in 1..=cuts {
            let upto = stretch.len() * c / cuts;
            // The sectors dirtied so far in this stretch, with their contents as of `upto`.
            let mut now = base.clone();
            let mut dirty = std::collections::BTreeSet::new();
            for op in &stretch[..upto] {
                if let Op::Write { at, data } = op {
                    apply(&before, &mut now, *at, data);
                    let (a, b) = (*at as usize / SECTOR, (*at as usize + data.len() - 1) / SECTOR);
                    dirty.extend(a..=b);
                }
            }
            for _ in 0..6 {
                let mut state = base.clone();
                for &s in &dirty {
                    if rng.next().is_multiple_of(2) {
                        state.insert(s, now[&s].clone());
                    }
                }
                let what = format!(
                    "stretch ending at op {end}, {upto} of its writes, a random subset of {} sectors",
                    dirty.len()
                );
                case.check(&state, &what, start > switch_from, &mut tally);
            }
        }
        for op in stretch {
            if let Op::Write { at, data } = op {
                apply(&before, &mut base, *at, data);
            }
        }
        start = end + 1;
    }

    println!(
        "FAT{fat}, {kib} KiB: {writes} writes, {syncs} syncs; {} crash states: GRUB's first choice complete in all \
         (the old set in {}, the new in {} after the switch); fsck.vfat -n run on {}: clean in {}, never naming a \
         file of GRUB's first choice; what it would repair, in how many states:",
        tally.states, tally.first_choice_old, tally.first_choice_new, tally.fsck_run, tally.fsck_clean
    );
    for (kind, n) in &tally.fsck_findings {
        println!("  {n:5}  {kind}");
    }
    assert!(!tally.fsck_findings.keys().any(|k| k.starts_with("other")), "an unknown fsck.vfat finding");
    assert!(tally.first_choice_new > 0 && tally.first_choice_old > 0);
    if let Some(fsck) = &fsck {
        // The partition install leaves is clean.
        assert!(tally.fsck_clean > 0);
        std::fs::write(&case.scratch, &after).unwrap();
        let out = std::process::Command::new(fsck).arg("-n").arg(&case.scratch).output().unwrap();
        assert!(
            out.status.success(),
            "fsck.vfat -n after the update:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn a_power_cut_anywhere_in_a_fat16_update_leaves_a_complete_first_choice() {
    crash_test("16", 32 << 10, 1);
}

#[test]
fn a_power_cut_anywhere_in_a_fat32_update_leaves_a_complete_first_choice() {
    crash_test("32", 64 << 10, 1);
}
