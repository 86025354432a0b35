//! The first stage on the EFI system partition (ESP), and a crash-safe way to replace it.
//!
//! Under Secure Boot the firmware starts shim, shim starts Debian's signed GRUB, and GRUB loads
//! the first stage: a signed kernel and our initramfs, which reads the gptprio bits and starts
//! the chosen slot's kernel with `kexec_file_load` (dracut/README.md). That first stage does not
//! depend on the slots (both boot through it), but it must be replaced now and then: a kernel
//! fix, an SBAT revocation that makes the old shim or kernel unbootable. Replacing files in
//! place on FAT is not crash-safe: a power cut mid-copy leaves a kernel that is half old, half
//! new, and nothing boots.
//!
//! So the partition holds two sets, a and b, each a kernel (`acl-a-vmlinuz`), an initramfs
//! (`acl-a-initrd.img`) and sums naming both (`acl-a-SHA256SUMS`), and a GRUB environment
//! block, `acl-grubenv`, whose `acl_set` names the set GRUB tries first
//! (`dracut/esp/grub.cfg`; the other set is tried when the first cannot be loaded, e.g. shim
//! refuses its signature). All in the partition's root directory: `fatfs` 0.3 writes the `.`
//! and `..` entries of a directory it creates with long-name entries before them, which
//! `fsck.vfat` then "repairs" by renaming and deleting them; files alone it writes cleanly.
//! [`install`]:
//!
//! 1. finds the set GRUB boots now ([`choice::boots`]: the named set if it can be loaded, else
//!    the other; under Secure Boot a set whose kernel is unsigned cannot), and writes the
//!    *other* one: `SHA256SUMS` removed first, then both files, then
//!    `SHA256SUMS` last, so a set is complete exactly when its sums match;
//! 2. syncs, and reads the new set back against what was written;
//! 3. rewrites the 1024-byte environment block in place (its variables lie in its first
//!    sector, so the switch is one sector write), and syncs.
//!
//! A power cut before step 3 leaves GRUB naming the old set, which nothing touched: the new
//! set's clusters were free, and the FAT and directory sectors it shares with the old set are
//! rewritten with the old set's entries unchanged. After step 3 the new set is complete. The
//! crash test (tests/crash.rs) replays every prefix of the writes, and random subsets of each
//! stretch between two syncs (a disk may reorder those), and checks that the set GRUB would
//! boot is complete and `fsck.vfat` finds the file system usable.
//!
//! The GPT bits say which slot boots; the ESP says only how the first stage is started, the
//! same for both slots. So the table and the ESP can never disagree about what boots, and an
//! update of a slot never writes the ESP.
//!
//! The file system is written with the `fatfs` crate through [`Window`], a byte range of the
//! disk (partitions are addressed by offset: no partition device is needed). Every `fatfs`
//! call runs under `catch_unwind`, so a damaged file system is an error, not a panic.

pub mod choice;
pub mod env;
pub mod pe;
mod window;

pub use choice::Set;
pub use window::{Storage, Window};

use sha2::{Digest as _, Sha256};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The environment block GRUB reads (`load_env`), beside the sets.
pub const ENV_FILE: &str = "acl-grubenv";
/// A set's kernel.
pub const KERNEL: &str = "vmlinuz";
/// A set's initramfs.
pub const INITRD: &str = "initrd.img";
/// A set's sums: written last, removed first.
pub const SUMS: &str = "SHA256SUMS";

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The partition holds no FAT file system.
    #[error("the EFI system partition holds no FAT file system that can be read: {0}")]
    NotFat(io::Error),
    /// Reading or writing the file system failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// A source file could not be read.
    #[error("{}: {source}", path.display())]
    Source {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Not enough free space for a set beside the one that boots.
    #[error(
        "the EFI system partition has {free} bytes free, and the new set needs {needed} (the set GRUB boots now stays until the switch); nothing was switched"
    )]
    NoSpace {
        /// Free bytes (after removing the old contents of the set being written).
        free: u64,
        /// Bytes the new set needs.
        needed: u64,
    },
    /// The written set does not read back as written.
    #[error("set {set} does not read back as written ({why}); GRUB still starts set {kept}")]
    ReadBack {
        /// The set written.
        set: Set,
        /// The set GRUB starts.
        kept: String,
        /// What differs.
        why: String,
    },
    /// After the switch, the environment block does not name the new set.
    #[error("after the switch, acl-grubenv reads back as {found}, not acl_set={set}")]
    Switch {
        /// The set switched to.
        set: Set,
        /// What the block says.
        found: String,
    },
    /// The FAT library panicked on this file system (a damaged one).
    #[error("the FAT file system is damaged ({0}); stopped there")]
    Damaged(String),
}

/// One set's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetState {
    /// None of the set's files.
    Absent,
    /// Files exist but are not a complete set (why).
    Incomplete(String),
    /// Both files match the sums.
    Complete(Contents),
}

impl SetState {
    /// Whether the set is complete.
    pub fn complete(&self) -> bool {
        matches!(self, SetState::Complete(_))
    }

    /// Whether GRUB can start it: complete, and under Secure Boot its kernel signed (an
    /// unsigned one is refused by shim, and GRUB goes on to the other set).
    pub fn loadable(&self, secure_boot: bool) -> bool {
        matches!(self, SetState::Complete(c) if c.kernel_signed || !secure_boot)
    }
}

/// What a complete set holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents {
    /// The kernel's SHA-256, hex.
    pub kernel_sha256: String,
    /// Its size.
    pub kernel_bytes: u64,
    /// Whether the kernel carries an Authenticode signature (not verified here: shim does).
    pub kernel_signed: bool,
    /// The initramfs's SHA-256, hex.
    pub initrd_sha256: String,
    /// Its size.
    pub initrd_bytes: u64,
}

/// The partition's state as GRUB will see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The environment block: the set it names, or why it names none.
    pub env: Result<Set, String>,
    /// Set a.
    pub a: SetState,
    /// Set b.
    pub b: SetState,
    /// The set GRUB starts (the first one in its order it can load), if any.
    pub boots: Option<Set>,
    /// What was known about the machine.
    pub machine: Machine,
}

impl Status {
    /// The state of `set`.
    pub fn set(&self, set: Set) -> &SetState {
        match set {
            Set::A => &self.a,
            Set::B => &self.b,
        }
    }
}

/// What is known about the machine the partition boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Machine {
    /// Whether it enforces Secure Boot: then a set whose kernel is unsigned cannot be loaded.
    pub secure_boot: bool,
    /// The set GRUB started this boot (`acl.first_stage=` on the command line, passed on by
    /// stage 1), when the partition is the running machine's: ground truth over the guess.
    pub started: Option<Set>,
}

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The set written and switched to.
    pub set: Set,
    /// The set GRUB started before (kept as the fallback), if any.
    pub previous: Option<Set>,
    /// What the new set holds.
    pub contents: Contents,
}

fn fs_options() -> fatfs::FsOptions {
    // No access dates: reads write nothing. Without the chrono feature, times are fixed
    // (1980-01-01), so the same input writes the same bytes.
    fatfs::FsOptions::new().update_accessed_date(false)
}

/// Runs `f` on the file system of `storage`, then unmounts it; a panic inside `fatfs` becomes
/// [`Error::Damaged`].
fn with_fs<S: Storage, T>(
    storage: &mut S,
    f: impl FnOnce(&fatfs::FileSystem<&mut S>) -> Result<T, Error>,
) -> Result<T, Error> {
    storage.new_budget();
    let run = std::panic::AssertUnwindSafe(|| -> Result<T, Error> {
        storage.seek(SeekFrom::Start(0)).map_err(|source| Error::Io { what: "seek".into(), source })?;
        let fs = fatfs::FileSystem::new(&mut *storage, fs_options()).map_err(Error::NotFat)?;
        let out = f(&fs)?;
        fs.unmount().map_err(|source| Error::Io { what: "unmount the file system".into(), source })?;
        Ok(out)
    });
    match std::panic::catch_unwind(run) {
        Ok(r) => r,
        Err(p) => {
            let why = p
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic in the FAT library".into());
            Err(Error::Damaged(why))
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Reads the partition: the environment block, both sets, what GRUB will start on a machine
/// that does or does not enforce Secure Boot. Writes nothing: what `fatfs` would write on the
/// way (on FAT32 it updates the free-cluster count when it unmounts) is dropped.
pub fn status<S: Storage>(storage: &mut S, machine: Machine) -> Result<Status, Error> {
    with_fs(&mut ReadOnly(storage), |fs| {
        let root = fs.root_dir();
        let env = match root.open_file(ENV_FILE) {
            Ok(f) => {
                // At most one byte more than a block: a longer file is not ours anyway.
                let mut block = Vec::new();
                match f.take(env::BLOCK as u64 + 1).read_to_end(&mut block) {
                    Ok(_) => env::parse(&block),
                    Err(e) => Err(format!("unreadable: {e}")),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err("missing".to_owned()),
            Err(e) => Err(format!("unreadable: {e}")),
        };
        let a = set_state(fs, Set::A)?;
        let b = set_state(fs, Set::B)?;
        let mut st = Status { env, a, b, boots: None, machine };
        let (la, lb) = loadability(&st);
        st.boots = choice::boots(st.env.as_ref().ok().copied(), la, lb);
        Ok(st)
    })
}

/// Whether GRUB can load set a and set b: the guess from each set's state and Secure Boot,
/// corrected by the set GRUB started this boot while that set is still complete.
fn loadability(st: &Status) -> (bool, bool) {
    let sb = st.machine.secure_boot;
    let started = st.machine.started.filter(|&s| st.set(s).complete());
    choice::observed(st.env.as_ref().ok().copied(), st.a.loadable(sb), st.b.loadable(sb), started)
}

/// Free bytes in the file system, and its cluster size (FAT32 keeps the count in its FSInfo
/// sector, trusted unless the volume is marked dirty; FAT12/16 count by reading the FAT).
pub fn free_bytes<S: Storage>(storage: &mut S) -> Result<(u64, u64), Error> {
    with_fs(&mut ReadOnly(storage), |fs| {
        let stats = fs.stats().map_err(io_err("count the free clusters"))?;
        let cluster = u64::from(stats.cluster_size());
        Ok((u64::from(stats.free_clusters()) * cluster, cluster))
    })
}

/// A storage whose writes are dropped (the reads see what is on the disk).
struct ReadOnly<'a, S>(&'a mut S);

impl<S: Storage> Read for ReadOnly<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<S: Storage> Write for ReadOnly<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let len = i64::try_from(buf.len()).map_err(io::Error::other)?;
        self.0.seek(SeekFrom::Current(len))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<S: Storage> Seek for ReadOnly<'_, S> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.0.seek(to)
    }
}

impl<S: Storage> Storage for ReadOnly<'_, S> {
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn new_budget(&mut self) {
        self.0.new_budget();
    }
}

/// The name of `set`'s `file` (in the root directory).
pub fn path(set: Set, file: &str) -> String {
    format!("acl-{}-{file}", set.name())
}

fn set_state<S: Storage>(fs: &fatfs::FileSystem<&mut S>, set: Set) -> Result<SetState, Error> {
    let root = fs.root_dir();
    let open = |file: &str| match root.open_file(&path(set, file)) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    };
    let (sums, kernel, initrd) = match (open(SUMS), open(KERNEL), open(INITRD)) {
        (Ok(s), Ok(k), Ok(i)) => (s, k, i),
        (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => {
            return Ok(SetState::Incomplete(format!("a file cannot be opened: {e}")));
        }
    };
    let (mut sums, mut kernel, mut initrd) = match (sums, kernel, initrd) {
        (None, None, None) => return Ok(SetState::Absent),
        (None, ..) => return Ok(SetState::Incomplete(format!("no {SUMS} (written last)"))),
        (Some(s), Some(k), Some(i)) => (s, k, i),
        (Some(_), k, _) => {
            let missing = if k.is_none() { KERNEL } else { INITRD };
            return Ok(SetState::Incomplete(format!("no {missing}")));
        }
    };
    let mut text = String::new();
    if let Err(e) = Read::by_ref(&mut sums).take(4096).read_to_string(&mut text) {
        return Ok(SetState::Incomplete(format!("{SUMS} cannot be read: {e}")));
    }
    let listed = |name: &str| -> Option<String> {
        text.lines().find_map(|l| {
            let (sum, file) = l.split_once("  ")?;
            (file == name && sum.len() == 64 && sum.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| sum.to_owned())
        })
    };
    let (Some(want_k), Some(want_i)) = (listed(KERNEL), listed(INITRD)) else {
        return Ok(SetState::Incomplete(format!("{SUMS} does not list both files")));
    };
    let (k_sha, k_bytes, head) = match hash(&mut kernel) {
        Ok(h) => h,
        Err(e) => return Ok(SetState::Incomplete(format!("{KERNEL} cannot be read: {e}"))),
    };
    let (i_sha, i_bytes, _) = match hash(&mut initrd) {
        Ok(h) => h,
        Err(e) => return Ok(SetState::Incomplete(format!("{INITRD} cannot be read: {e}"))),
    };
    if k_sha != want_k {
        return Ok(SetState::Incomplete(format!("{KERNEL} does not match {SUMS}")));
    }
    if i_sha != want_i {
        return Ok(SetState::Incomplete(format!("{INITRD} does not match {SUMS}")));
    }
    Ok(SetState::Complete(Contents {
        kernel_sha256: k_sha,
        kernel_bytes: k_bytes,
        kernel_signed: pe::signed(&head) == Some(true),
        initrd_sha256: i_sha,
        initrd_bytes: i_bytes,
    }))
}

/// SHA-256 (hex), length, and the first 4 KiB of what `r` holds.
fn hash(r: &mut impl Read) -> io::Result<(String, u64, Vec<u8>)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let (mut n, mut head) = (0u64, Vec::new());
    loop {
        let got = r.read(&mut buf)?;
        if got == 0 {
            break;
        }
        if head.len() < 4096 {
            let more = (4096 - head.len()).min(got);
            head.extend_from_slice(&buf[..more]);
        }
        h.update(&buf[..got]);
        n += got as u64;
    }
    Ok((hex::encode(h.finalize()), n, head))
}

/// Copies `src` into a new file `dst` on the file system; its SHA-256 and length.
fn copy_in<S: Storage>(
    fs: &fatfs::FileSystem<&mut S>,
    src: &Path,
    dst: &str,
) -> Result<(String, u64), Error> {
    let mut input =
        std::fs::File::open(src).map_err(|source| Error::Source { path: src.to_owned(), source })?;
    let mut out = fs.root_dir().create_file(dst).map_err(io_err(format!("create {dst}")))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let got = input.read(&mut buf).map_err(|source| Error::Source { path: src.to_owned(), source })?;
        if got == 0 {
            break;
        }
        h.update(&buf[..got]);
        out.write_all(&buf[..got]).map_err(io_err(format!("write {dst}")))?;
        n += got as u64;
    }
    out.flush().map_err(io_err(format!("write {dst}")))?;
    Ok((hex::encode(h.finalize()), n))
}

fn remove_if_there<S: Storage>(fs: &fatfs::FileSystem<&mut S>, p: &str) -> Result<(), Error> {
    match fs.root_dir().remove(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Io { what: format!("remove {p}"), source: e }),
    }
}

/// Bytes a file of `len` takes in clusters of `cluster`.
fn on_disk(len: u64, cluster: u64) -> u64 {
    len.div_ceil(cluster.max(1)) * cluster
}

/// Writes `kernel` and `initrd` as a new set beside the one GRUB starts, then switches GRUB to
/// it (see the module docs for the order and why it is crash-safe). `machine`: what decides
/// which set GRUB starts now. `say` hears each step.
pub fn install<S: Storage>(
    storage: &mut S,
    kernel: &Path,
    initrd: &Path,
    machine: Machine,
    say: &mut dyn FnMut(&str),
) -> Result<Installed, Error> {
    let mut before = status(storage, machine)?;
    let (la, lb) = loadability(&before);
    let plan = choice::plan(before.env.as_ref().ok().copied(), la, lb);
    let target = plan.write;
    // Inputs and space first: a refusal changes nothing, not even the block.
    let size = |p: &Path| -> Result<u64, Error> {
        let m = std::fs::metadata(p).map_err(|source| Error::Source { path: p.to_owned(), source })?;
        if !m.is_file() {
            let source = io::Error::new(io::ErrorKind::InvalidInput, "not a regular file");
            return Err(Error::Source { path: p.to_owned(), source });
        }
        Ok(m.len())
    };
    let (k_len, i_len) = (size(kernel)?, size(initrd)?);
    let (free, cluster) = free_bytes(storage)?;
    // The target's old files are removed first: count what they take as free, complete or not
    // (a set cut short by a crash must not block the retry).
    let old = with_fs(&mut ReadOnly(storage), |fs| {
        let mut n = 0;
        for file in [KERNEL, INITRD, SUMS] {
            if let Ok(mut f) = fs.root_dir().open_file(&path(target, file)) {
                n += on_disk(file_len(&mut f).unwrap_or(0), cluster);
            }
        }
        Ok(n)
    })?;
    let needed = on_disk(k_len, cluster) + on_disk(i_len, cluster) + 2 * cluster;
    if free + old < needed {
        return Err(Error::NoSpace { free: free + old, needed });
    }
    if let Some(first) = plan.name_first {
        // GRUB would try another set first (no valid block, or one naming a damaged set):
        // name the set it starts, so that the set written next is never its first choice.
        say(&format!(
            "acl-grubenv ({}) does not name set {first}, which GRUB starts: naming it",
            env_words(&before.env)
        ));
        switch(storage, first)?;
        before = status(storage, machine)?;
    }
    let kept = before.boots.map_or_else(|| "nothing (no complete set)".to_owned(), |s| format!("set {s}"));

    // 1. The new set, where nothing GRUB starts lives.
    say(&format!("writing set {target} (GRUB starts {kept} until the switch)"));
    with_fs(storage, |fs| {
        // The sums go first: from here on the set is incomplete until they are written again.
        remove_if_there(fs, &path(target, SUMS))?;
        remove_if_there(fs, &path(target, KERNEL))?;
        remove_if_there(fs, &path(target, INITRD))?;
        Ok(())
    })?;
    let (k_sha, k_bytes) = with_fs(storage, |fs| copy_in(fs, kernel, &path(target, KERNEL)))?;
    let (i_sha, i_bytes) = with_fs(storage, |fs| copy_in(fs, initrd, &path(target, INITRD)))?;
    if (k_bytes, i_bytes) != (k_len, i_len) {
        let source = io::Error::other(format!(
            "changed while it was copied ({k_len} and {i_len} bytes before, {k_bytes} and {i_bytes} copied)"
        ));
        return Err(Error::Source { path: kernel.to_owned(), source });
    }
    with_fs(storage, |fs| {
        let text = format!("{k_sha}  {KERNEL}\n{i_sha}  {INITRD}\n");
        let p = path(target, SUMS);
        let mut f = fs.root_dir().create_file(&p).map_err(io_err(format!("create {p}")))?;
        f.write_all(text.as_bytes()).map_err(io_err(format!("write {p}")))?;
        f.flush().map_err(io_err(format!("write {p}")))
    })?;
    storage.sync().map_err(io_err("sync the EFI system partition"))?;

    // 2. Read back through the file system.
    let written = status(storage, machine)?;
    let contents = match written.set(target) {
        SetState::Complete(c) if c.kernel_sha256 == k_sha && c.initrd_sha256 == i_sha => c.clone(),
        SetState::Complete(_) => {
            return Err(Error::ReadBack { set: target, kept, why: "other contents than written".into() });
        }
        other => return Err(Error::ReadBack { set: target, kept, why: format!("{other:?}") }),
    };
    if (k_bytes, i_bytes) != (contents.kernel_bytes, contents.initrd_bytes) {
        return Err(Error::ReadBack { set: target, kept, why: "other sizes than written".into() });
    }

    // 3. The switch: one sector of the environment block.
    say(&format!("set {target} written and read back; switching GRUB to it"));
    switch(storage, target)?;
    say(&format!("GRUB starts set {target} from the next boot; {kept} stays as the fallback"));
    Ok(Installed { set: target, previous: before.boots, contents })
}

/// The block's state in words.
fn env_words(env: &Result<Set, String>) -> String {
    match env {
        Ok(s) => format!("acl_set={s}"),
        Err(why) => why.clone(),
    }
}

/// Makes the environment block name `set`, syncs, and reads it back.
fn switch<S: Storage>(storage: &mut S, set: Set) -> Result<(), Error> {
    with_fs(storage, |fs| {
        let block = env::render(set);
        let root = fs.root_dir();
        let existing = root.open_file(ENV_FILE).ok().and_then(|mut f| {
            let n = file_len(&mut f).ok()?;
            (n == env::BLOCK as u64).then_some(f)
        });
        match existing {
            Some(mut f) => {
                f.seek(SeekFrom::Start(0)).map_err(io_err(format!("seek {ENV_FILE}")))?;
                f.write_all(&block).map_err(io_err(format!("write {ENV_FILE}")))?;
                f.flush().map_err(io_err(format!("write {ENV_FILE}")))
            }
            None => {
                // Missing or of another size: made anew. Until it is complete GRUB reads no
                // valid block and tries a, then b, as before this step. Only a fresh partition
                // or one damaged by something else gets here; this step is crash-safe only on a
                // disk that writes in order (the file's entry could land before its data).
                remove_if_there(fs, ENV_FILE)?;
                let mut f = root.create_file(ENV_FILE).map_err(io_err(format!("create {ENV_FILE}")))?;
                f.write_all(&block).map_err(io_err(format!("write {ENV_FILE}")))?;
                f.flush().map_err(io_err(format!("write {ENV_FILE}")))
            }
        }
    })?;
    storage.sync().map_err(io_err("sync the EFI system partition"))?;
    let after = status(storage, Machine::default())?;
    match &after.env {
        Ok(s) if *s == set => Ok(()),
        other => Err(Error::Switch { set, found: env_words(other) }),
    }
}

fn file_len(f: &mut impl Seek) -> io::Result<u64> {
    let n = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(n)
}
