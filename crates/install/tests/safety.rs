//! Issue 12, items 3 and 6: an install changes the fallback slot only once it has something to
//! write to it, keeps every chunk it wrote whatever stops it, and recognises an image that is
//! already in place, so that a rerun fetches nothing.

mod common;

use common::*;
use install::Journal;
use slot::Disk;
use slot::choice::{self, Slot};

/// Before: a payload answering 404 before any byte was written still made the good fallback
/// slot unbootable and deleted its record; so did a refused update (booted slot not
/// confirmed). Now both leave slot, bits and record as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_before_the_first_write_leaves_the_fallback_as_it_was() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new();
    let disk = disk(&sgdisk, f.dir.path());
    let v1 = f.release("1.0.0", 0);
    let v2 = f.release("1.1.0", 1);
    let fetcher = f.file_fetcher();
    // 1.0.0 into B, booted and confirmed: A is now the fallback, with its record.
    f.install(&disk, Slot::A, &v1, &fetcher).await.unwrap();
    boot_and_confirm(&disk, Slot::B);
    install::record_manifest(&f.path("state"), Slot::A, &v1.1).unwrap();
    let record = f.path("state/slot-A.manifest.json");
    let before = (Disk::open(&disk, false).unwrap().slots(), slot_digest(&disk, Slot::A, 32 << 20));

    // The payload is gone from the repository.
    let payload = f.path("repo/images/1.1.0/x86_64/payload");
    let kept = f.path("payload.kept");
    std::fs::rename(&payload, &kept).unwrap();
    let e = f.install(&disk, Slot::B, &v2, &fetcher).await.unwrap_err().to_string();
    assert!(e.contains("payload: no such file"), "{e}");
    let after = (Disk::open(&disk, false).unwrap().slots(), slot_digest(&disk, Slot::A, 32 << 20));
    assert_eq!(after, before, "the fallback changed though nothing was written to it");
    assert!(record.exists(), "the fallback's record was deleted");
    assert_eq!(choice::rollback(&after.0, Slot::B).map(|_| ()), Ok(()), "no way back any more");

    // A refusal (the booted slot not confirmed) changes nothing either.
    std::fs::rename(&kept, &payload).unwrap();
    let mut d = Disk::open(&disk, true).unwrap();
    d.update(|s| Ok(s.with(Slot::B, s.get(Slot::B).with_successful(false)))).unwrap();
    drop(d);
    let before = Disk::open(&disk, false).unwrap().slots();
    let e = f.install(&disk, Slot::B, &v2, &fetcher).await.unwrap_err().to_string();
    assert!(e.contains("not confirmed"), "{e}");
    assert_eq!(Disk::open(&disk, false).unwrap().slots(), before);
    assert!(record.exists(), "a refused update deleted the fallback's record");
    assert_eq!(slot_digest(&disk, Slot::A, 32 << 20), after.1);
}

/// Before: a repeat of a finished update, or a rerun after the target was staged, downloaded
/// everything again. Now a rerun of a finished update does nothing and says so; a staged
/// image that is no longer set to boot (unstaged, or rolled back from) is verified in place
/// and activated again, with nothing fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_install_fetches_nothing() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new();
    let disk = disk(&sgdisk, f.dir.path());
    let v1 = f.release("1.0.0", 0);
    let fetcher = f.file_fetcher();
    let r = f.install(&disk, Slot::A, &v1, &fetcher).await.unwrap();
    assert!(!r.already_next);
    let fetched = fetcher.bytes_fetched();
    let image = std::fs::read(&disk).unwrap();

    let r = f.install(&disk, Slot::A, &v1, &fetcher).await.unwrap();
    assert!(r.already_next, "{r:?}");
    assert_eq!(fetcher.bytes_fetched(), fetched, "a finished install was fetched again");
    assert!(std::fs::read(&disk).unwrap() == image, "the disk changed");

    // Unstaged (as the agent does when a release is withdrawn): verified and activated again.
    let mut d = Disk::open(&disk, true).unwrap();
    d.update(|s| choice::prepare(s, Slot::A)).unwrap();
    drop(d);
    let r = f.install(&disk, Slot::A, &v1, &fetcher).await.unwrap();
    assert!(!r.already_next);
    assert_eq!(fetcher.bytes_fetched(), fetched, "a staged image was fetched again");
    assert_eq!((r.resumed_bytes, r.reused_bytes), (r.image_bytes, 0), "{r:?}");
    assert_eq!(choice::choose(&Disk::open(&disk, false).unwrap().slots()), Some(Slot::B));
    assert_eq!(slot_digest(&disk, Slot::B, v1.0.image_size), v1.0.image_sha256);
}

/// Slot B (installed) made unbootable and zeroed from the middle chunk on, as after a kill
/// half-way or a disk that dropped writes: the offset of that chunk and B's PARTUUID.
fn lose_second_half_of_b(disk: &std::path::Path, m: &manifest::Manifest) -> (u64, String) {
    let half = m.chunk_range(m.chunks.len() / 2).start;
    (half, lose_part_of_b(disk, half, None))
}

/// Slot B made unbootable and zeroed from byte `from` of the slot up to `to` (its end when
/// `None`); B's PARTUUID.
fn lose_part_of_b(disk: &std::path::Path, from: u64, to: Option<u64>) -> String {
    use std::os::unix::fs::FileExt as _;
    let mut d = Disk::open(disk, true).unwrap();
    d.update(|s| choice::prepare(s, Slot::A)).unwrap();
    let (base, len) = d.slot_extent(Slot::B).unwrap();
    let partuuid = d.partition(Slot::B).unique_guid.to_string();
    drop(d);
    let to = to.unwrap_or(len);
    let file = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    file.write_all_at(&vec![0u8; (to - from) as usize], base + from).unwrap();
    partuuid
}

/// Before: a killed install kept only what its journal listed (synced every 16 MiB), so
/// kill -9 a few seconds in kept nothing. Now every chunk found in place on the disk counts:
/// here the journal lists nothing (as after a kill right after it was started) while half the
/// image is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_install_keeps_every_chunk_it_wrote() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new();
    let disk = disk(&sgdisk, f.dir.path());
    let v1 = f.release("1.0.0", 0);
    let fetcher = f.file_fetcher();
    f.install(&disk, Slot::A, &v1, &fetcher).await.unwrap();
    // Back to the state of a kill half-way: B unbootable, its second half and trailer not
    // written yet, a journal with nothing done.
    let (half, partuuid) = lose_second_half_of_b(&disk, &v1.0);
    let state = f.path("state");
    let manifest_sha = manifest::Sha256Digest::of(&v1.1);
    Journal::new(manifest_sha, partuuid, v1.0.chunks.len()).save(&state).unwrap();

    let before = fetcher.bytes_fetched();
    let r = f.install(&disk, Slot::A, &v1, &fetcher).await.unwrap();
    let fetched = fetcher.bytes_fetched() - before;
    let payload = v1.0.payload.size;
    eprintln!("resumed {} of {} image bytes; fetched {fetched} of {payload}", r.resumed_bytes, r.image_bytes);
    assert_eq!(r.resumed_bytes, half, "{r:?}");
    assert!(fetched < payload * 3 / 4, "fetched {fetched} of {payload}");
    assert_eq!(slot_digest(&disk, Slot::B, v1.0.image_size), v1.0.image_sha256);
    assert_eq!(choice::choose(&Disk::open(&disk, false).unwrap().slots()), Some(Slot::B));
}

/// A journal that claims every chunk of a slot the disk lost half of (a disk that dropped
/// writes) must not spare the read-back: the install refuses to activate, says which chunks
/// differ, and the slot stays unbootable. (A first version of the in-place scan skipped the
/// read-back whenever nothing was left to write, trusting the journal's claims.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_that_lies_does_not_spare_the_read_back() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new();
    let disk = disk(&sgdisk, f.dir.path());
    let v1 = f.release("1.0.0", 0);
    let fetcher = f.file_fetcher();
    f.install(&disk, Slot::A, &v1, &fetcher).await.unwrap();
    let (_, partuuid) = lose_second_half_of_b(&disk, &v1.0);
    let mut j = Journal::new(manifest::Sha256Digest::of(&v1.1), partuuid, v1.0.chunks.len());
    j.set_done(&vec![true; v1.0.chunks.len()]);
    j.save(&f.path("state")).unwrap();

    let e = f.install(&disk, Slot::A, &v1, &fetcher).await.unwrap_err().to_string();
    assert!(e.contains("read-back of slot B found"), "{e}");
    assert_eq!(Disk::open(&disk, false).unwrap().slots().b.priority(), 0, "activated a damaged slot");
    // The read-back unmarked the bad chunks: the next run fetches them and succeeds.
    f.install(&disk, Slot::A, &v1, &fetcher).await.unwrap();
    assert_eq!(slot_digest(&disk, Slot::B, v1.0.image_size), v1.0.image_sha256);
}

/// A kill after the data and before the tree (or a disk that lost the tree): the data is found
/// in place, and the tree is computed from it, not fetched; computing it is then the first
/// write, made only after the slot is marked unbootable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_tree_is_computed_from_the_data_in_place_and_nothing_is_fetched() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new();
    let disk = disk(&sgdisk, f.dir.path());
    let v1 = f.release("1.0.0", 0);
    let fetcher = f.file_fetcher();
    f.install(&disk, Slot::A, &v1, &fetcher).await.unwrap();
    // The tree lost, the trailer (this manifest, so the data is looked for in place) kept.
    let m = &v1.0;
    let tree_len = m.image_size - m.verity.data_size;
    lose_part_of_b(&disk, m.verity.data_size, Some(m.image_size));

    let before = fetcher.bytes_fetched();
    let r = f.install(&disk, Slot::A, &v1, &fetcher).await.unwrap();
    assert_eq!(fetcher.bytes_fetched(), before, "nothing fetched: {r:?}");
    assert_eq!(r.computed_bytes, tree_len, "{r:?}");
    assert_eq!(r.resumed_bytes, m.verity.data_size, "{r:?}");
    assert_eq!(slot_digest(&disk, Slot::B, m.image_size), m.image_sha256);
    assert_eq!(choice::choose(&Disk::open(&disk, false).unwrap().slots()), Some(Slot::B));
}

/// A signed manifest whose dm-verity root is not the root of its own data (a broken build or
/// publisher): the tree the node computes from the verified data ends in another root, so the
/// slot would never open at boot. The install says so and leaves the slot unbootable, the
/// booted slot still the one that boots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_whose_tree_root_is_not_its_datas_is_refused_before_activation() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new();
    let disk = disk(&sgdisk, f.dir.path());
    let v1 = f.release("1.0.0", 0);
    let v2 = f.release("1.1.0", 1);
    let fetcher = f.file_fetcher();
    f.install(&disk, Slot::A, &v1, &fetcher).await.unwrap();
    boot_and_confirm(&disk, Slot::B);
    let mut m = v2.0.clone();
    m.verity.root_hash.0[0] ^= 1;
    let bad = (m.clone(), m.to_bytes());
    let computed = install::plan::tree_to_compute(&m, &vec![false; m.chunks.len()], Some(&v1.0));
    assert!(!computed.is_empty(), "the adaptive install computes the tree");

    let e = f.install(&disk, Slot::B, &bad, &fetcher).await.unwrap_err();
    assert!(matches!(e, install::InstallError::TreeRoot { slot: Slot::A, .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains(&v2.0.verity.root_hash.to_string()) && text.contains(&m.verity.root_hash.to_string()),
        "{text}"
    );
    let s = Disk::open(&disk, false).unwrap().slots();
    assert_eq!(s.a.priority(), 0, "A, holding an image that would not open, is not bootable");
    assert_eq!(choice::choose(&s), Some(Slot::B));
    // The good manifest then installs, the data already in place.
    let r = f.install(&disk, Slot::B, &v2, &fetcher).await.unwrap();
    assert_eq!(slot_digest(&disk, Slot::A, v2.0.image_size), v2.0.image_sha256, "{r:?}");
}
