//! The install pipeline (see the crate docs for the order of steps).

use crate::journal::Journal;
use crate::plan::{self, Plan};
use crate::slotio::{AlignedBuf, BufPool, SlotIo};
use bytes::Buf as _;
use durable::replace_file;
use fetch::{FetchError, Fetcher};
use manifest::{Manifest, Sha256Digest};
use payload::{ChunkDecoder, ChunkError};
use slot::choice::{self, Slot};
use slot::{Disk, DiskError, Tries};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Sync and journal after this many bytes written. A resume finds chunks that were written but
/// not journaled by reading them (a kill -9 loses none), so this bounds what a power cut can
/// make it fetch again (what the disk's volatile cache dropped, 6% of a 1 GiB image at most)
/// and what it reads and hashes, for one fdatasync per 64 MiB. The syncs run beside the
/// writes; with one per 16 MiB a 1 GiB install took 5% longer on the bench's loop device.
const SYNC_EVERY: u64 = 64 << 20;
/// ... or after this long with anything unsynced: on a slow disk or a slow network 64 MiB can
/// take minutes, and a power cut then would lose all of it (the e2e power cut on the systemd
/// node image, 0.7 s into the download, found nothing journaled).
const SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// Chunks queued for the writers at most. Each holds a buffer of the largest chunk (1 MiB with
/// the default chunking), as does each of the [`WRITERS`] chunks being written, so these two
/// bound most of the installer's memory.
const WRITER_QUEUE: usize = 4;
/// Writes in flight at once. One synchronous writer gives the device one request at a time;
/// a disk completes several at once. Measured on this project's bench machine with the slot on
/// a loop device in direct-I/O mode (its writes go to the host's disk): 1 GiB in 256 KiB
/// writes took 4.05 s from one writer, 2.32 s from two, 1.91 s from four.
const WRITERS: usize = 4;
/// Fetched bytes allowed between the socket and the disk at once (a frame holds its share from
/// before its first byte is read until its chunk is written): what a kill -9 throws away, and
/// so what a resume fetches twice, whatever the number of requests or the speed of the disk
/// (issue 12: 4.3 MiB per kill when unbounded on a loaded machine, 2.2 % of a 192 MiB image).
/// At least two of the largest frames fit, so a frame arrives while the previous one is written.
const IN_FLIGHT: usize = 1 << 20;

/// What to install where.
#[derive(Debug, Clone)]
pub struct InstallRequest<'a> {
    /// The disk (block device or image file).
    pub disk: &'a Path,
    /// The running slot; the other one is written.
    pub booted: Slot,
    /// The verified manifest of the image.
    pub manifest: &'a Manifest,
    /// Its bytes (recorded for the next adaptive install, and in the slot's trailer).
    pub manifest_bytes: &'a [u8],
    /// Its detached signatures (kept with it in the slot's trailer for the boot path).
    pub manifest_sig: &'a [u8],
    /// Path of the payload in the repository.
    pub payload_path: String,
    /// The agent's state directory (journal, recorded manifests).
    pub state_dir: &'a Path,
    /// Tries given to the new slot.
    pub tries: Tries,
    /// Range requests in flight at once.
    pub parallel: usize,
    /// Largest range request, in bytes.
    pub max_request: u64,
    /// Provisioning a fresh disk: `booted` is only "the other slot", nothing runs from it, so
    /// it need not be confirmed good; the target boots next either way.
    pub provision: bool,
}

/// Live progress counters, readable from another task while the install runs.
#[derive(Debug, Default)]
pub struct Counters {
    /// Image bytes in the target (including resumed ones).
    pub done: AtomicU64,
    /// Image bytes taken from the other slot.
    pub reused: AtomicU64,
    /// Image bytes found already written (resume).
    pub resumed: AtomicU64,
    /// Image bytes verified by the read-back.
    pub read_back: AtomicU64,
    /// Nanoseconds during which at least one write was in flight (the rest of the write phase
    /// the writers waited for verified chunks).
    pub writer_busy_ns: AtomicU64,
}

/// What an install did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Image size.
    pub image_bytes: u64,
    /// Compressed bytes planned to fetch.
    pub fetch_bytes: u64,
    /// Image bytes copied from the other slot.
    pub reused_bytes: u64,
    /// Image bytes found already in place in the target (an interrupted or repeated install),
    /// neither fetched nor written.
    pub resumed_bytes: u64,
    /// Bytes of the dm-verity tree computed from the written data instead of fetched
    /// ([`plan::tree_to_compute`]).
    pub computed_bytes: u64,
    /// Whether the target was opened with O_DIRECT.
    pub direct_io: bool,
    /// Time to fetch, copy and write.
    pub write_time: Duration,
    /// Time to read back and verify.
    pub verify_time: Duration,
    /// Of `write_time`, the time with at least one write in flight; the rest the writers waited
    /// for the fetch and the decoders (where to look when an install is slow).
    pub writer_busy: Duration,
    /// The slot installed.
    pub target: Option<Slot>,
    /// The target already held this image, verified, and boots next: nothing was done.
    pub already_next: bool,
    /// The server ignored Range requests: the payload was read in one pass.
    pub one_pass: bool,
}

/// Why an install stopped. The target is left unbootable if anything was written to it, and
/// untouched (still bootable, if it was, with its record) otherwise.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The disk or its slot bits.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The image does not fit the target slot.
    #[error("image of {need} bytes (with its trailer) does not fit slot {slot} ({have} bytes)")]
    TargetTooSmall {
        /// The target.
        slot: Slot,
        /// Image size.
        need: u64,
        /// Slot size.
        have: u64,
    },
    /// The target slot is in use.
    #[error("slot {slot} is in use ({why}); refusing to write it")]
    TargetInUse {
        /// The target.
        slot: Slot,
        /// By what.
        why: String,
    },
    /// Local I/O failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or device.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The repository could not deliver.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// A fetched chunk is not what the manifest says.
    #[error("{url}: {source}")]
    BadChunk {
        /// The payload URL.
        url: String,
        /// What is wrong.
        source: ChunkError,
    },
    /// The read-back found chunks that differ from the manifest (a disk that lost writes).
    #[error(
        "read-back of slot {slot} found {count} chunk(s) that differ from the manifest (first: chunk {first}); they will be fetched again"
    )]
    ReadBack {
        /// The target.
        slot: Slot,
        /// How many.
        count: usize,
        /// The first.
        first: usize,
    },
    /// The dm-verity tree computed from the verified data does not end in the manifest's root
    /// hash: the image would not open at boot.
    #[error(
        "the dm-verity tree of the data written to slot {slot} has root hash {computed}, but the signed manifest says {expected}: the image is inconsistent and would not boot (aclpub verify checks this)"
    )]
    TreeRoot {
        /// The target.
        slot: Slot,
        /// The root of the computed tree.
        computed: String,
        /// The manifest's.
        expected: String,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> InstallError {
    let path = path.to_owned();
    move |source| InstallError::Io { what, path, source }
}

/// `local` (the image in `slot`) with its chunk digests in `hash`, from the slot's bytes as they
/// are: a chunk that changed since gets a digest no new chunk has, or one that it has and is
/// then copied; copies are checked against the new manifest before they are written either
/// way. `None` if the slot cannot be read.
fn rehash(mut local: Manifest, disk: &Path, slot: Slot, hash: manifest::ChunkHash) -> Option<Manifest> {
    let (base, len) = Disk::open(disk, false).ok()?.slot_extent(slot).ok()?;
    let src = SlotIo::open(disk, base, len, false).ok()?;
    let largest = local.chunks.iter().map(|c| c.size as usize).max().unwrap_or(0);
    let mut buf = AlignedBuf::zeroed(largest);
    for i in 0..local.chunks.len() {
        let r = local.chunk_range(i);
        buf.set_len((r.end - r.start) as usize);
        src.read_into(r.start, &mut buf).ok()?;
        local.chunks[i].digest = manifest::ChunkDigest::of(hash, buf.as_slice());
    }
    local.format = hash.format();
    Some(local)
}

/// The manifest recorded for the image in `slot`, if any (written after each install).
pub fn recorded_manifest(state_dir: &Path, slot: Slot) -> Option<(Manifest, Vec<u8>)> {
    let bytes = std::fs::read(record_path(state_dir, slot)).ok()?;
    let m = Manifest::from_bytes(&bytes).ok()?;
    m.validate().ok()?;
    Some((m, bytes))
}

/// Records `bytes` as the manifest of the image in `slot` (when the state directory lost it,
/// or never had it on a provisioned disk; the caller verified it, e.g. from [`slot_trailer`]).
pub fn record_manifest(state_dir: &Path, slot: Slot, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(state_dir)?;
    replace_file(&record_path(state_dir, slot), bytes)
}

/// The manifest and signature bytes kept in `slot`'s trailer (see the `trailer` crate); not
/// verified here.
pub fn slot_trailer(disk: &Path, slot: Slot) -> Result<(Vec<u8>, Vec<u8>), String> {
    use std::os::unix::fs::FileExt as _;
    let d = Disk::open(disk, false).map_err(|e| e.to_string())?;
    let (base, len) = d.slot_extent(slot).map_err(|e| e.to_string())?;
    let file = std::fs::File::open(disk).map_err(|e| format!("{}: {e}", disk.display()))?;
    trailer::read(len, |o, buf| {
        file.read_exact_at(buf, base.checked_add(o).ok_or(std::io::ErrorKind::InvalidInput)?)
    })
    .map_err(|e| e.to_string())
}

/// Where [`running_manifest`] found what the booted slot runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunningSource {
    /// The slot's own signed trailer, verified.
    Trailer,
    /// Only the state directory's record (the trailer is missing or does not verify).
    Record,
}

/// What `slot` (the booted one) runs: from its signed trailer, verified by `verify` (bytes and
/// signatures to a manifest), which is the downgrade floor; the state directory's record is a
/// cache of it, rewritten when it differs, and used alone only when the slot has no trailer
/// that verifies (issue 13: with the record lost, garbage or a fresh state directory, a
/// repository listing only an older release installed it).
pub fn running_manifest(
    disk: &Path,
    state_dir: &Path,
    slot: Slot,
    verify: impl Fn(&[u8], &[u8]) -> Result<Manifest, String>,
) -> Result<(Manifest, RunningSource), String> {
    let from_trailer = slot_trailer(disk, slot).and_then(|(m, sig)| verify(&m, &sig).map(|man| (man, m)));
    match from_trailer {
        Ok((m, bytes)) => {
            if recorded_manifest(state_dir, slot).is_none_or(|(_, recorded)| recorded != bytes) {
                // A cache: failing to write it changes nothing of the answer.
                let _ = record_manifest(state_dir, slot, &bytes);
            }
            Ok((m, RunningSource::Trailer))
        }
        Err(trailer) => match recorded_manifest(state_dir, slot) {
            Some((m, _)) => Ok((m, RunningSource::Record)),
            None => Err(format!("slot {slot}: {trailer}, and the state directory has no record of it")),
        },
    }
}

fn record_path(state_dir: &Path, slot: Slot) -> PathBuf {
    state_dir.join(format!("slot-{slot}.manifest.json"))
}

/// Why the partition `number` of block device `disk` must not be written, if it is in use:
/// mounted, or held by another device (dm-verity). `None` for image files.
pub fn target_in_use(disk: &Path, number: u32) -> Option<String> {
    use std::os::unix::fs::FileTypeExt as _;
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(disk).ok()?;
    if !meta.file_type().is_block_device() {
        return None;
    }
    let rdev = meta.rdev();
    let (maj, min) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let sys = std::fs::canonicalize(format!("/sys/dev/block/{maj}:{min}")).ok()?;
    for entry in std::fs::read_dir(&sys).ok()?.flatten() {
        let p = entry.path();
        let is_it =
            std::fs::read_to_string(p.join("partition")).ok().is_some_and(|n| n.trim() == number.to_string());
        if !is_it {
            continue;
        }
        if let Some(holder) = std::fs::read_dir(p.join("holders")).ok()?.flatten().next() {
            return Some(format!("held by {}", holder.file_name().to_string_lossy()));
        }
        let dev = std::fs::read_to_string(p.join("dev")).ok()?;
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        if let Some(line) = mountinfo.lines().find(|l| l.split(' ').nth(2) == Some(dev.trim())) {
            return Some(format!("mounted at {}", line.split(' ').nth(4).unwrap_or("?")));
        }
    }
    None
}

/// A message to the writers: verified bytes for one or more chunks.
struct Verified {
    indices: Vec<usize>,
    data: AlignedBuf,
    /// The read-back checksum of `data`, taken where it was verified (on the decoder threads,
    /// off the writers' path).
    sum: u128,
    local: bool,
    /// The fetched frame's share of [`IN_FLIGHT`], given back once the chunk is written.
    share: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Installs `req.manifest` into the slot that is not booted. See the crate docs.
pub async fn install(
    req: &InstallRequest<'_>,
    fetcher: &Fetcher,
    counters: &Arc<Counters>,
) -> Result<Report, InstallError> {
    let m = req.manifest;
    let target = req.booted.other();
    let disk = Disk::open(req.disk, true)?;
    let (base, len) = disk.slot_extent(target)?;
    let (trailer_at, trailer_bytes) = trailer::encode(req.manifest_bytes, req.manifest_sig, len);
    // Checked: the sizes come from a signed but not necessarily sane manifest.
    let need = m
        .image_size
        .div_ceil(trailer::BLOCK)
        .checked_mul(trailer::BLOCK)
        .and_then(|n| n.checked_add(trailer_bytes.len() as u64))
        .unwrap_or(u64::MAX);
    if need > len {
        return Err(InstallError::TargetTooSmall { slot: target, need, have: len });
    }
    if let Some(why) = target_in_use(req.disk, disk.partition(target).number) {
        return Err(InstallError::TargetInUse { slot: target, why });
    }
    // Refuse now what the first write would refuse (the booted slot not confirmed): nothing
    // is fetched or changed for an install that cannot happen.
    if !req.provision {
        choice::prepare(&disk.slots(), req.booted)
            .map_err(|source| DiskError::Transition { path: req.disk.to_owned(), source })?;
    }
    std::fs::create_dir_all(req.state_dir).map_err(io("create", req.state_dir))?;
    let manifest_sha256 = Sha256Digest::of(req.manifest_bytes);
    let partuuid = disk.partition(target).unique_guid.to_string();

    // A repeated install: the target's trailer holds this very manifest, so the image was
    // written and verified once (the trailer is written after the read-back).
    let staged = slot_trailer(req.disk, target).is_ok_and(|(bytes, _)| bytes == req.manifest_bytes);
    if staged && choice::choose(&disk.slots()) == Some(target) {
        Journal::remove(req.state_dir).map_err(io("remove journal in", req.state_dir))?;
        return Ok(Report {
            image_bytes: m.image_size,
            resumed_bytes: m.image_size,
            target: Some(target),
            already_next: true,
            ..Report::default()
        });
    }

    // The journal of an interrupted install of the same image into the same target. Its done
    // bits are trusted only while the target stayed unbootable since (nothing booted or
    // rewrote it); the chunks it does not vouch for are looked for on the disk below.
    let same = Journal::load(req.state_dir).filter(|j| {
        j.manifest_sha256 == manifest_sha256
            && j.target_partuuid == partuuid
            && j.chunk_count == m.chunks.len()
    });
    let look_in_target = staged || same.is_some();
    let mut journal = match same {
        Some(j) if disk.slots().get(target).priority() == 0 => j,
        _ => {
            let j = Journal::new(manifest_sha256, partuuid, m.chunks.len());
            j.save(req.state_dir).map_err(io("write journal in", req.state_dir))?;
            j
        }
    };
    let target_io = Arc::new(SlotIo::open(req.disk, base, len, true).map_err(io("open", req.disk))?);
    // The xxh3-128 of each chunk this run wrote, taken from the verified buffer it wrote: the
    // read-back compares against it (see `ReadBackSums`).
    let mut sums = ReadBackSums::new(m.chunks.len());
    let mut done = journal.done();
    // Whether this run hashed every chunk on the device (then nothing needs reading back when
    // nothing is written); chunks the journal vouches for were not hashed here.
    let scanned_all = look_in_target && !done.iter().any(|&d| d);
    if look_in_target {
        // Chunks already in place: written by a run that was killed before it journaled them
        // (kill -9 loses no written chunk), or all of them after a finished install.
        target_io.drop_cache().map_err(io("drop cache of", req.disk))?;
        let todo: Vec<usize> = (0..m.chunks.len()).filter(|&i| !done[i]).collect();
        let (bad, _) = check_chunks(m, &target_io, todo.clone(), None, None, None)
            .await
            .map_err(io("read", req.disk))?;
        let mut bad = bad.into_iter().peekable();
        for i in todo {
            if bad.peek() == Some(&i) {
                bad.next();
            } else {
                done[i] = true;
            }
        }
    }
    let verified_in_place = scanned_all && done.iter().all(|&d| d);

    // The target is made unbootable (and its old record dropped) right before the first byte
    // is written to it, not before: an install that fails before writing anything (the
    // repository answers 404, the network is down) leaves the fallback as it was.
    let disk = Arc::new(std::sync::Mutex::new(disk));
    let mut before_first_write: Option<FirstWrite> = {
        let (disk, record, provision, booted) =
            (Arc::clone(&disk), record_path(req.state_dir, target), req.provision, req.booted);
        Some(Box::new(move || {
            match std::fs::remove_file(&record) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io("remove", &record)(e)),
                _ => {}
            }
            let mut d = disk.lock().expect("disk lock poisoned");
            if provision {
                d.update(|s| Ok(choice::give_up(s, target)))?;
            } else {
                d.update(|s| choice::prepare(s, booted))?;
            }
            Ok(())
        }))
    };

    let mut local = recorded_manifest(req.state_dir, req.booted).map(|(lm, _)| lm);
    let all_done = done.iter().all(|&d| d);
    if let Some(lm) = local.take_if(|lm| !all_done && lm.chunk_hash() != m.chunk_hash()) {
        // The first install after the publisher switched hashes (manifest format 1 -> 2): no
        // digest would match, so the booted image's chunks are hashed the new way first.
        let (disk, booted, hash) = (req.disk.to_owned(), req.booted, m.chunk_hash());
        local = tokio::task::spawn_blocking(move || rehash(lm, &disk, booted, hash))
            .await
            .expect("rehash task panicked");
    }
    // The tree chunks computed after the data is in place are left out of the plan.
    let compute = plan::tree_to_compute(m, &done, local.as_ref());
    let skip_computed = |done: &[bool]| {
        let mut d = done.to_vec();
        for &i in &compute {
            d[i] = true;
        }
        d
    };
    let plan = plan::plan(m, &skip_computed(&done), local.as_ref(), req.max_request);
    let chunk_len = |i: usize| {
        let r = m.chunk_range(i);
        r.end - r.start
    };
    let resumed: u64 = (0..m.chunks.len()).filter(|&i| done[i]).map(chunk_len).sum();
    counters.resumed.store(resumed, Ordering::Relaxed);
    counters.done.store(resumed, Ordering::Relaxed);
    let mut report = Report {
        image_bytes: m.image_size,
        fetch_bytes: plan.fetch_bytes(),
        resumed_bytes: resumed,
        target: Some(target),
        ..Report::default()
    };

    report.direct_io = target_io.is_direct();
    let started = Instant::now();
    journal.set_done(&done);
    // Ranged requests first; when the server answers them with whole files, the payload is
    // read in one pass instead. Usually nothing was written by then; if a server answered some
    // ranges and not others, what was written is verified data and is simply written again.
    let mut sequential = false;
    let failed_local = loop {
        let r = write_all(
            req,
            fetcher,
            counters,
            &plan,
            &target_io,
            local.as_ref(),
            &mut journal,
            &mut before_first_write,
            &mut sums,
            sequential,
        )
        .await;
        match r {
            Err(InstallError::Fetch(FetchError::RangeIgnored { .. })) if !sequential => {
                sequential = true;
                report.one_pass = true;
            }
            r => break r?,
        }
    };
    if !failed_local.is_empty() {
        // The other slot did not hold what its record says: fetch those chunks instead.
        let mut done = journal.done();
        for &i in &failed_local {
            done[i] = false;
        }
        let retry = plan::plan(m, &skip_computed(&done), None, req.max_request);
        report.fetch_bytes += retry.fetch_bytes();
        write_all(
            req,
            fetcher,
            counters,
            &retry,
            &target_io,
            None,
            &mut journal,
            &mut before_first_write,
            &mut sums,
            sequential,
        )
        .await?;
    }
    report.reused_bytes = counters.reused.load(Ordering::Relaxed);
    report.write_time = started.elapsed();
    report.writer_busy = Duration::from_nanos(counters.writer_busy_ns.load(Ordering::Relaxed));

    // Read back everything from the device and check it; done already when nothing was written
    // and this run hashed every chunk in place on the device. A journal alone never spares the
    // read-back: it may claim chunks a disk lost.
    let started = Instant::now();
    let bad = if verified_in_place && before_first_write.is_some() {
        counters.read_back.store(m.image_size, Ordering::Relaxed);
        Vec::new()
    } else {
        target_io.drop_cache().map_err(io("drop cache of", req.disk))?;
        let sums = Arc::new(std::mem::take(&mut sums));
        let mut rest: Vec<usize> = (0..m.chunks.len()).collect();
        let mut bad = Vec::new();
        if !compute.is_empty() {
            // The data is read back and checked while its tree is computed and written after
            // it; then the tree's chunks are read back and checked like any other. When all
            // the data was in place already, the tree is the first write.
            if let Some(first) = before_first_write.take() {
                first()?;
            }
            let data_size = m.verity.data_size;
            let (data, tree): (Vec<usize>, Vec<usize>) =
                rest.into_iter().partition(|&i| m.chunks[i].image_offset < data_size);
            let job = TreeJob {
                params: m
                    .verity
                    .params()
                    .map_err(std::io::Error::other)
                    .map_err(io("compute the tree of", req.disk))?,
                data_size,
            };
            let (bad_data, root) = check_chunks(m, &target_io, data, Some(counters), Some(&sums), Some(job))
                .await
                .map_err(io("read back", req.disk))?;
            target_io.sync().map_err(io("sync", req.disk))?;
            // The tree's read-back below must come from the device, not from the pages just
            // written (buffered targets).
            target_io.drop_cache().map_err(io("drop cache of", req.disk))?;
            let tree_bytes: u64 = compute.iter().map(|&i| chunk_len(i)).sum();
            counters.done.fetch_add(tree_bytes, Ordering::Relaxed);
            report.computed_bytes = tree_bytes;
            if let Some(root) = root
                && bad_data.is_empty()
                && root != m.verity.root_hash.0
            {
                return Err(InstallError::TreeRoot {
                    slot: target,
                    computed: Sha256Digest(root).to_string(),
                    expected: m.verity.root_hash.to_string(),
                });
            }
            bad = bad_data;
            rest = tree;
        }
        let (more, _) = check_chunks(m, &target_io, rest, Some(counters), Some(&sums), None)
            .await
            .map_err(io("read back", req.disk))?;
        bad.extend(more);
        bad.sort_unstable();
        bad
    };
    report.verify_time = started.elapsed();
    if let Some(&first) = bad.first() {
        let mut done = journal.done();
        for &i in &bad {
            done[i] = false;
        }
        journal.set_done(&done);
        journal.save(req.state_dir).map_err(io("write journal in", req.state_dir))?;
        return Err(InstallError::ReadBack { slot: target, count: bad.len(), first });
    }

    // The trailer (signed manifest for the boot path), durable before activation; already
    // there when the image was staged before.
    if !staged {
        if let Some(first) = before_first_write.take() {
            first()?;
        }
        let mut buf = AlignedBuf::zeroed(trailer_bytes.len());
        buf.as_mut_slice().copy_from_slice(&trailer_bytes);
        target_io.write(trailer_at, &buf).map_err(io("write the slot trailer to", req.disk))?;
        target_io.sync().map_err(io("sync", req.disk))?;
    }

    // Record, then activate, then forget the journal.
    let record = record_path(req.state_dir, target);
    replace_file(&record, req.manifest_bytes).map_err(io("write", &record))?;
    let mut disk = disk.lock().expect("disk lock poisoned");
    if req.provision {
        disk.update(|s| Ok(choice::provisioned(s, target, req.tries)))?;
    } else {
        disk.update(|s| choice::activate(s, req.booted, req.tries))?;
    }
    Journal::remove(req.state_dir).map_err(io("remove journal in", req.state_dir))?;
    Ok(report)
}

/// Run once, right before the first byte is written to the target.
type FirstWrite = Box<dyn FnOnce() -> Result<(), InstallError> + Send>;

/// Fetches and copies the planned chunks into the target through [`WRITERS`] writer threads. Returns
/// the local copies that failed verification. `first_write` runs before the first write, if
/// there is one (it is left in place otherwise).
#[allow(clippy::too_many_arguments)]
async fn write_all(
    req: &InstallRequest<'_>,
    fetcher: &Fetcher,
    counters: &Arc<Counters>,
    plan: &Plan,
    target_io: &Arc<SlotIo>,
    local: Option<&Manifest>,
    journal: &mut Journal,
    first_write: &mut Option<FirstWrite>,
    sums: &mut ReadBackSums,
    sequential: bool,
) -> Result<Vec<usize>, InstallError> {
    let m = Arc::new(req.manifest.clone());
    let (tx, rx) = std::sync::mpsc::sync_channel::<Verified>(WRITER_QUEUE);
    // One byte of room past the chunk size lets the decoder see an over-long frame.
    let pool = Arc::new(BufPool::new(pool_capacity(&m)));

    // The writers: write, sync every SYNC_EVERY bytes and journal what is durable.
    let writer = {
        let (m, io_, counters, pool) =
            (Arc::clone(&m), Arc::clone(target_io), Arc::clone(counters), Arc::clone(&pool));
        let (mut journal, state_dir, disk) = (journal.clone(), req.state_dir.to_owned(), req.disk.to_owned());
        let first_write = Mutex::new(first_write.take());
        let sums = Mutex::new(std::mem::take(sums));
        std::thread::spawn(move || -> (Result<Journal, InstallError>, Option<FirstWrite>, ReadBackSums) {
            let done = Mutex::new(journal.done());
            // Periodic syncs run beside the writes: a writer hands the syncer the chunks
            // written so far and goes on; those chunks are journaled once an fdatasync that
            // started after their writes returns. A sync asked for while one runs waits for the
            // next chunk (a rendezvous channel: the hand-over succeeds only when the syncer is
            // idle).
            let (sync_tx, sync_rx) = std::sync::mpsc::sync_channel::<Vec<bool>>(0);
            let rx = Mutex::new(rx);
            let (io_r, disk_r, state_r) = (&io_, &disk, &state_dir);
            // Set by a writer that failed, so that the others stop writing too.
            let failed = AtomicBool::new(false);
            let progress = Mutex::new((0u64, Instant::now())); // (unsynced bytes, last sync)
            let busy = Mutex::new((0usize, Instant::now())); // (writes in flight, since when)
            std::thread::scope(|scope| {
                let syncer = scope.spawn(move || -> Result<Journal, InstallError> {
                    for written in sync_rx {
                        io_r.sync().map_err(io("sync", disk_r))?;
                        journal.set_done(&written);
                        journal.save(state_r).map_err(io("write journal in", state_r))?;
                    }
                    Ok(journal)
                });
                let write = || -> Result<(), InstallError> {
                    let mut first_checked = false;
                    loop {
                        if failed.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        let Ok(v) = rx.lock().expect("writer queue poisoned").recv() else { return Ok(()) };
                        if failed.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        if !first_checked {
                            // Held while it runs: no writer writes before it has returned, and
                            // none at all if it failed.
                            let mut first = first_write.lock().expect("first write poisoned");
                            if let Some(f) = first.take()
                                && let Err(e) = f()
                            {
                                failed.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                            if failed.load(Ordering::Relaxed) {
                                return Ok(());
                            }
                            first_checked = true;
                        }
                        {
                            let mut b = busy.lock().expect("busy poisoned");
                            if b.0 == 0 {
                                b.1 = Instant::now();
                            }
                            b.0 += 1;
                        }
                        let n = v.data.as_slice().len() as u64;
                        let wrote =
                            v.indices.iter().try_for_each(|&i| io_.write(m.chunk_range(i).start, &v.data));
                        {
                            let mut b = busy.lock().expect("busy poisoned");
                            b.0 -= 1;
                            if b.0 == 0 {
                                counters
                                    .writer_busy_ns
                                    .fetch_add(b.1.elapsed().as_nanos() as u64, Ordering::Relaxed);
                            }
                        }
                        wrote.map_err(io("write", &disk))?;
                        {
                            let mut d = done.lock().expect("done bits poisoned");
                            let mut s = sums.lock().expect("sums poisoned");
                            for &i in &v.indices {
                                d[i] = true;
                                s.set(i, v.sum);
                            }
                        }
                        let written = n * v.indices.len() as u64;
                        counters.done.fetch_add(written, Ordering::Relaxed);
                        if v.local {
                            counters.reused.fetch_add(written, Ordering::Relaxed);
                        }
                        pool.put(v.data);
                        drop(v.share);
                        let mut p = progress.lock().expect("sync progress poisoned");
                        p.0 += written;
                        if p.0 >= SYNC_EVERY || p.1.elapsed() >= SYNC_INTERVAL {
                            let snapshot = done.lock().expect("done bits poisoned").clone();
                            match sync_tx.try_send(snapshot) {
                                Ok(()) => *p = (0, Instant::now()),
                                Err(std::sync::mpsc::TrySendError::Full(_)) => {}
                                // The syncer failed; its error is returned below.
                                Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                                    failed.store(true, Ordering::Relaxed);
                                    return Ok(());
                                }
                            }
                        }
                    }
                };
                // A writer that panics stops the others too.
                struct StopOnPanic<'a>(&'a AtomicBool);
                impl Drop for StopOnPanic<'_> {
                    fn drop(&mut self) {
                        if std::thread::panicking() {
                            self.0.store(true, Ordering::Relaxed);
                        }
                    }
                }
                let writer = || {
                    let _stop = StopOnPanic(&failed);
                    let r = write();
                    if r.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    r
                };
                let written = std::thread::scope(|w| {
                    let others: Vec<_> = (1..WRITERS).map(|_| w.spawn(writer)).collect();
                    let mine = writer();
                    let others = others.into_iter().map(|t| t.join().expect("writer thread panicked"));
                    others.fold(mine, |a, b| a.and(b))
                });
                // The queue closes (the decoders stop on a failure), and so does the syncer's.
                drop(rx);
                drop(sync_tx);
                let synced = syncer.join().expect("syncer thread panicked");
                let done = done.into_inner().expect("done bits poisoned");
                let result = written.and(synced).and_then(|mut journal| {
                    io_.sync().map_err(io("sync", &disk))?;
                    journal.set_done(&done);
                    journal.save(&state_dir).map_err(io("write journal in", &state_dir))?;
                    Ok(journal)
                });
                let first_write = first_write.into_inner().expect("first write poisoned");
                (result, first_write, sums.into_inner().expect("sums poisoned"))
            })
        })
    };

    // Local copies wait until the repository has delivered a verified chunk (or there is
    // nothing to fetch): a repository that fails at once must not cost the fallback slot.
    let gate = Arc::new(Gate::default());
    if plan.fetch.is_empty() {
        gate.set(true);
    }
    // Local copies, on a blocking thread.
    let local_task = {
        let (m, tx, copies, pool) = (Arc::clone(&m), tx.clone(), plan.local.clone(), Arc::clone(&pool));
        let gate = Arc::clone(&gate);
        let disk = req.disk.to_owned();
        let booted = req.booted;
        let have_local = local.is_some();
        tokio::task::spawn_blocking(move || -> Result<Vec<usize>, InstallError> {
            if copies.is_empty() || !have_local || !gate.wait() {
                return Ok(Vec::new());
            }
            let d = Disk::open(&disk, false)?;
            let (base, len) = d.slot_extent(booted)?;
            let src = SlotIo::open(&disk, base, len, false).map_err(io("open", &disk))?;
            let mut failed = Vec::new();
            for c in copies {
                let r = m.chunk_range(c.index);
                let mut data = pool.get((r.end - r.start) as usize);
                src.read_into(c.from, &mut data).map_err(io("read", &disk))?;
                if !m.chunks[c.index].digest.matches(data.as_slice()) {
                    failed.push(c.index);
                    pool.put(data);
                    continue;
                }
                let sum = ReadBackSums::of(data.as_slice());
                if tx.send(Verified { indices: vec![c.index], data, sum, local: true, share: None }).is_err()
                {
                    break;
                }
            }
            Ok(failed)
        })
    };

    // Network fetches, `parallel` requests in flight.
    let url = fetcher.url(&req.payload_path);
    let sem = Arc::new(tokio::sync::Semaphore::new(req.parallel.max(1)));
    let largest_frame = m.chunks.iter().map(|c| c.length as usize).max().unwrap_or(0);
    let budget_size = IN_FLIGHT.max(2 * largest_frame);
    let budget = Arc::new(tokio::sync::Semaphore::new(budget_size));
    // Compressed frames on their way to a decoder, in reused buffers: with the binaries' mmap
    // threshold fixed at 128 KiB (`cliutil::fix_malloc_threshold`) a fresh buffer per frame is
    // mapped, faulted in page by page and unmapped again (81k page faults per GiB installed).
    // At most three per request are in use (filling, queued, decoding), so the pool stays small.
    let frame_pool = Arc::new(BufPool::new(largest_frame));
    // A frame's share of the budget: its length, at most the whole budget.
    let share = move |r: &std::ops::Range<usize>| (r.end - r.start).clamp(1, budget_size) as u32;
    let mut tasks = tokio::task::JoinSet::new();
    let mut first_error = None;
    // A server that ignores Range is read in one pass: one request for everything to fetch,
    // the bytes between the wanted frames read past, every frame still verified.
    let groups =
        if sequential { plan::one_pass(&plan.fetch).into_iter().collect() } else { plan.fetch.clone() };
    for group in groups {
        if first_error.is_some() {
            break;
        }
        let permit = Arc::clone(&sem).acquire_owned().await.expect("semaphore open");
        let (fetcher, path, m, tx, url) =
            (fetcher.clone(), req.payload_path.clone(), Arc::clone(&m), tx.clone(), url.clone());
        let (pool, gate, budget) = (Arc::clone(&pool), Arc::clone(&gate), Arc::clone(&budget));
        let frame_pool = Arc::clone(&frame_pool);
        tasks.spawn(async move {
            let _permit = permit;
            // Frames are decoded, checked and queued for the writer as soon as their bytes are
            // in, so a request cut part-way keeps every whole frame it brought (issue 12).
            type Frame = (AlignedBuf, Vec<usize>, tokio::sync::OwnedSemaphorePermit);
            let (frames_tx, mut frames_rx) = tokio::sync::mpsc::channel::<Frame>(1);
            let decode = {
                let frame_pool = Arc::clone(&frame_pool);
                tokio::task::spawn_blocking(move || -> Result<(), InstallError> {
                    let mut decoder = ChunkDecoder::new().map_err(io("zstd", Path::new(&url)))?;
                    while let Some((frame, indices, share)) = frames_rx.blocking_recv() {
                        let mut data = pool.get(pool_capacity(&m));
                        let n = decoder
                            .decode_to(&m, indices[0], frame.as_slice(), data.as_mut_slice())
                            .map_err(|source| InstallError::BadChunk { url: url.clone(), source })?;
                        data.set_len(n);
                        frame_pool.put(frame);
                        let sum = ReadBackSums::of(data.as_slice());
                        if tx.send(Verified { indices, data, sum, local: false, share: Some(share) }).is_err()
                        {
                            break;
                        }
                        gate.set(true);
                    }
                    Ok(())
                })
            };
            let fetched = async {
                let mut stream = fetcher.range_stream(&path, group.range.clone());
                if sequential {
                    stream = stream.whole_file_ok();
                }
                // Relative offset in the group of the next byte the stream gives.
                let mut at = 0usize;
                let mut frames = group.frames.into_iter().peekable();
                // The frame being filled, and how many of its bytes are in.
                let mut filling: Option<(AlignedBuf, usize)> = None;
                let take = |r: &std::ops::Range<usize>| Arc::clone(&budget).acquire_many_owned(share(r));
                // The next frame's share is held before its bytes are read: a stream waiting
                // for the writer stops reading instead of piling up bytes a kill would lose.
                let mut held = None;
                loop {
                    if held.is_none()
                        && let Some((r, _)) = frames.peek()
                    {
                        held = Some(take(r).await.expect("budget open"));
                    }
                    let Some(mut bytes) = stream.next().await? else { break };
                    while !bytes.is_empty() {
                        let Some((r, _)) = frames.peek() else { break };
                        // Bytes before the next frame (chunks held already, in a one-pass read)
                        // are dropped as they come: only one frame is ever buffered.
                        if filling.is_none() && at < r.start {
                            let gap = (r.start - at).min(bytes.len());
                            bytes.advance(gap);
                            at += gap;
                            continue;
                        }
                        let len = r.end - r.start;
                        let (buf, filled) = filling.get_or_insert_with(|| (frame_pool.get(len), 0));
                        let n = (len - *filled).min(bytes.len());
                        buf.as_mut_slice()[*filled..*filled + n].copy_from_slice(&bytes[..n]);
                        *filled += n;
                        bytes.advance(n);
                        at += n;
                        if *filled < len {
                            continue;
                        }
                        let (r, indices) = frames.next().expect("peeked");
                        let (frame, _) = filling.take().expect("filled");
                        let share = match held.take() {
                            Some(p) => p,
                            None => take(&r).await.expect("budget open"),
                        };
                        if frames_tx.send((frame, indices, share)).await.is_err() {
                            return Ok(()); // the decoder stopped; its error says why
                        }
                    }
                }
                Ok::<(), InstallError>(())
            }
            .await;
            drop(frames_tx);
            let decoded = decode.await.expect("decode task panicked");
            // A chunk that does not verify matters more than a fetch that gave up.
            decoded.and(fetched)
        });
        // Notice a failure early rather than after every request was issued.
        while let Some(r) = tasks.try_join_next() {
            if let Err(e) = r.expect("fetch task panicked") {
                first_error.get_or_insert(e);
            }
        }
    }
    drop(tx);
    if first_error.is_some() {
        gate.set(false);
    }
    // Requests already in flight finish (each is bounded by the stall timeout): what they
    // bring is written and journaled, so a resume has less to fetch.
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(j) => std::panic::resume_unwind(j.into_panic()),
        }
    }
    // Nothing was fetched: the copies go ahead only if nothing failed either.
    gate.set(first_error.is_none());
    let failed_local = local_task.await.expect("copy task panicked");
    let (written, unused, written_sums) =
        tokio::task::spawn_blocking(move || writer.join().expect("writer thread panicked"))
            .await
            .expect("join task panicked");
    *first_write = unused;
    *sums = written_sums;
    // The writer's journal is the truth about what is durable, even when something failed.
    match written {
        Ok(j) => *journal = j,
        Err(e) => return Err(first_error.unwrap_or(e)),
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    failed_local
}

/// A one-time decision, waited for on a blocking thread: the first [`Gate::set`] wins.
#[derive(Default)]
struct Gate {
    open: std::sync::Mutex<Option<bool>>,
    changed: std::sync::Condvar,
}

impl Gate {
    fn set(&self, open: bool) {
        let mut o = self.open.lock().expect("gate poisoned");
        if o.is_none() {
            *o = Some(open);
            self.changed.notify_all();
        }
    }

    fn wait(&self) -> bool {
        let mut o = self.open.lock().expect("gate poisoned");
        loop {
            match *o {
                Some(open) => return open,
                None => o = self.changed.wait(o).expect("gate poisoned"),
            }
        }
    }
}

fn pool_capacity(m: &Manifest) -> usize {
    m.max_chunk_size as usize + crate::slotio::ALIGN
}

/// What the read-back compares a chunk against when this run wrote it: the xxh3-128 of the
/// buffer that was written, which had been checked against the manifest's digest just before.
///
/// The read-back is there to catch a disk that lost, misplaced or corrupted writes, not an
/// attacker: one who can write the device can change it after the read-back as well, and
/// dm-verity's signed root hash catches that at boot. A 128-bit checksum of what was written
/// detects such faults as surely as a cryptographic hash and costs a tenth of SHA-256, which
/// was a third of a full install's CPU (issue 16). Chunks this run did not write (resumed, or
/// claimed by a journal) have no entry and are checked against the manifest's digest.
#[derive(Debug, Default)]
struct ReadBackSums(Vec<Option<u128>>);

impl ReadBackSums {
    fn new(chunks: usize) -> Self {
        Self(vec![None; chunks])
    }

    fn of(bytes: &[u8]) -> u128 {
        xxhash_rust::xxh3::xxh3_128(bytes)
    }

    fn set(&mut self, chunk: usize, sum: u128) {
        if let Some(s) = self.0.get_mut(chunk) {
            *s = Some(sum);
        }
    }

    /// Whether `bytes`, read back as chunk `i`, are what the manifest says.
    fn matches(&self, m: &Manifest, i: usize, bytes: &[u8]) -> bool {
        match self.0.get(i).copied().flatten() {
            Some(sum) => Self::of(bytes) == sum,
            None => m.chunks[i].digest.matches(bytes),
        }
    }
}

/// The dm-verity tree to compute during a read-back of the data (see [`check_chunks`]).
struct TreeJob {
    params: verity::Params,
    /// Where the data ends and the tree begins, in the slot.
    data_size: u64,
}

/// The leaves of the batches read so far, handed to the tree in batch order.
struct TreeFeed {
    stream: verity::TreeStream,
    next: usize,
    waiting: std::collections::BTreeMap<usize, Vec<verity::Digest32>>,
    block: AlignedBuf,
}

/// Reads `chunks` (ascending indices) from the target and returns those that do not match the
/// manifest (or, for chunks this run wrote, the checksum in `sums`); counts what it read in
/// `counters.read_back` when given.
///
/// Two threads take batches of consecutive chunks (about 4 MiB each) in turn and read each
/// batch with one large read, so the device sees big sequential reads while the other thread
/// hashes.
///
/// With a `tree`, `chunks` are all the data chunks, in order: each batch's leaf digests are
/// computed too, fed to a [`verity::TreeStream`] in batch order, and every finished hash block
/// is written to the slot after the data; the root hash is returned. Memory stays one hash
/// block per level plus the leaves of batches read ahead of a slower one.
async fn check_chunks(
    m: &Manifest,
    io_: &Arc<SlotIo>,
    chunks: Vec<usize>,
    counters: Option<&Arc<Counters>>,
    sums: Option<&Arc<ReadBackSums>>,
    tree: Option<TreeJob>,
) -> std::io::Result<(Vec<usize>, Option<verity::Digest32>)> {
    const BATCH_BYTES: u64 = 4 << 20;
    let (m, io_, counters) = (Arc::new(m.clone()), Arc::clone(io_), counters.cloned());
    let sums = sums.cloned().unwrap_or_default();
    tokio::task::spawn_blocking(move || {
        // Batches: runs of consecutive chunks, until a batch reaches BATCH_BYTES.
        let mut batches: Vec<std::ops::Range<usize>> = Vec::new();
        for i in chunks {
            match batches.last_mut() {
                Some(b)
                    if b.end == i && m.chunk_range(i).end - m.chunk_range(b.start).start <= BATCH_BYTES =>
                {
                    b.end = i + 1
                }
                _ => batches.push(i..i + 1),
            }
        }
        let largest = batches
            .iter()
            .map(|b| m.chunk_range(b.end - 1).end - m.chunk_range(b.start).start)
            .max()
            .unwrap_or(0);
        let feed = match &tree {
            Some(t) => {
                let blocks = t.data_size / u64::from(t.params.data_block_size());
                let stream = verity::TreeStream::new(&t.params, blocks).map_err(std::io::Error::other)?;
                let block = AlignedBuf::zeroed(t.params.hash_block_size() as usize);
                Some(std::sync::Mutex::new(TreeFeed { stream, next: 0, waiting: Default::default(), block }))
            }
            None => None,
        };
        let emit_into = |io_: &SlotIo, block: &mut AlignedBuf, at: u64, bytes: &[u8]| {
            block.as_mut_slice().copy_from_slice(bytes);
            io_.write(at, block)
        };
        let next = std::sync::atomic::AtomicUsize::new(0);
        // Set by a worker that failed, so that the other stops too (and the tree's waiting
        // leaves stop growing behind a batch that will never come).
        let failed = std::sync::atomic::AtomicBool::new(false);
        let work = || -> std::io::Result<Vec<usize>> {
            let mut bad = Vec::new();
            let mut data = AlignedBuf::zeroed(largest as usize);
            loop {
                if failed.load(Ordering::Relaxed) {
                    return Ok(bad);
                }
                let b = next.fetch_add(1, Ordering::Relaxed);
                let Some(chunks) = batches.get(b).cloned() else { return Ok(bad) };
                let start = m.chunk_range(chunks.start).start;
                let end = m.chunk_range(chunks.end - 1).end;
                data.set_len((end - start) as usize);
                io_.read_into(start, &mut data)?;
                for i in chunks {
                    let r = m.chunk_range(i);
                    let bytes = &data.as_slice()[(r.start - start) as usize..(r.end - start) as usize];
                    if !sums.matches(&m, i, bytes) {
                        bad.push(i);
                    }
                    if let Some(c) = &counters {
                        c.read_back.fetch_add(r.end - r.start, Ordering::Relaxed);
                    }
                }
                if let (Some(t), Some(feed)) = (&tree, &feed) {
                    let leaves =
                        verity::leaf_digests(&t.params, data.as_slice()).map_err(std::io::Error::other)?;
                    let mut f = feed.lock().expect("tree feed poisoned");
                    f.waiting.insert(b, leaves);
                    let TreeFeed { stream, next, waiting, block } = &mut *f;
                    while let Some(leaves) = waiting.remove(next) {
                        for leaf in &leaves {
                            stream.push(leaf, &mut |at, bytes| {
                                emit_into(&io_, block, t.data_size + at, bytes)
                            })?;
                        }
                        *next += 1;
                    }
                }
            }
        };
        let worker = || {
            let r = work();
            if r.is_err() {
                failed.store(true, Ordering::Relaxed);
            }
            r
        };
        let (a, b) = std::thread::scope(|s| {
            let t = s.spawn(worker);
            let mine = worker();
            (mine, t.join().expect("read-back thread panicked"))
        });
        let mut bad = a?;
        bad.extend(b?);
        bad.sort_unstable();
        let root = match (tree, feed) {
            (Some(t), Some(feed)) => {
                let TreeFeed { stream, mut block, waiting, .. } =
                    feed.into_inner().expect("tree feed poisoned");
                if !waiting.is_empty() {
                    return Err(std::io::Error::other("read-back batches missing from the tree"));
                }
                Some(stream.finish(&mut |at, bytes| emit_into(&io_, &mut block, t.data_size + at, bytes))?)
            }
            _ => None,
        };
        Ok((bad, root))
    })
    .await
    .expect("read-back task panicked")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_read_back_compares_chunks_it_wrote_with_their_checksum_and_others_with_the_manifest() {
        let (a, b) = (vec![7u8; 4096], vec![9u8; 4096]);
        let mut m = crate::plan::tests::manifest(&[0, 0], &[(0, 10), (10, 10)]);
        m.chunks[0].digest = manifest::ChunkDigest::of(m.chunk_hash(), &a);
        m.chunks[1].digest = manifest::ChunkDigest::of(m.chunk_hash(), &b);
        let mut sums = ReadBackSums::new(2);
        sums.set(0, ReadBackSums::of(&a));
        let mut lost = a.clone();
        lost[4095] ^= 1;
        // Chunk 0 was written by this run: its checksum decides.
        assert!(sums.matches(&m, 0, &a));
        assert!(!sums.matches(&m, 0, &lost));
        assert!(!sums.matches(&m, 0, &b), "another chunk's bytes (a misplaced write)");
        assert!(!sums.matches(&m, 0, &[0u8; 4096]), "a write that never reached the disk");
        // Chunk 1 was not: the manifest's digest decides.
        assert!(sums.matches(&m, 1, &b));
        assert!(!sums.matches(&m, 1, &a));
        // Out of range or empty: never a panic, the manifest decides.
        sums.set(5, 0);
        assert!(ReadBackSums::default().matches(&m, 1, &b));
    }
}
