//! What to do for each chunk: nothing (already written), copy it from the local image, compute
//! it (the dm-verity tree, [`tree_to_compute`]), or fetch it; and how to group the fetches into
//! few range requests. Pure.
//!
//! A frame is decoded once and checked against the first chunk that uses it, then written for
//! every chunk that uses it; so chunks share one decoded frame only when they are the same
//! chunk content (same frame, size and digest). `Manifest::validate` refuses anything else;
//! the plan does not rely on it: chunks that name one frame but differ are decoded and checked
//! each on its own (issue 12).

use manifest::{ChunkDigest, Manifest};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

/// A chunk taken from the image installed in the other slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalCopy {
    /// Chunk index in the new image.
    pub index: usize,
    /// Byte offset of the same bytes in the source slot.
    pub from: u64,
}

/// One range request: consecutive frames of the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchGroup {
    /// The payload bytes to request.
    pub range: Range<u64>,
    /// Each frame in the range (relative to `range.start`) and the chunks it decodes to.
    pub frames: Vec<(Range<usize>, Vec<usize>)>,
}

/// The plan for one install.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Chunks already in the target.
    pub done: Vec<usize>,
    /// Chunks to copy from the other slot.
    pub local: Vec<LocalCopy>,
    /// Range requests to make.
    pub fetch: Vec<FetchGroup>,
}

/// All of `groups` as one request: from the first group's start to the last one's end, frames
/// relative to that start (the bytes between groups are read past). `None` when empty.
pub fn one_pass(groups: &[FetchGroup]) -> Option<FetchGroup> {
    let start = groups.first()?.range.start;
    let end = groups.last()?.range.end;
    let frames = groups
        .iter()
        .flat_map(|g| {
            let off = (g.range.start - start) as usize;
            g.frames.iter().map(move |(r, i)| (r.start + off..r.end + off, i.clone()))
        })
        .collect();
    Some(FetchGroup { range: start..end, frames })
}

impl Plan {
    /// Compressed bytes the fetches will download.
    pub fn fetch_bytes(&self) -> u64 {
        self.fetch.iter().map(|g| g.range.end - g.range.start).sum()
    }
}

/// Plans the install of `new`, given the chunks already done and the manifest of the image in
/// the other slot (if known). Requests are at most `max_request` bytes unless one frame is
/// bigger.
pub fn plan(new: &Manifest, done: &[bool], local: Option<&Manifest>, max_request: u64) -> Plan {
    let have: HashMap<ChunkDigest, u64> = local
        .map(|m| m.chunks.iter().enumerate().map(|(j, c)| (c.digest, m.chunk_range(j).start)).collect())
        .unwrap_or_default();
    let mut p = Plan::default();
    // Frames to fetch, by payload offset then the content they must decode to: chunk indices.
    let mut frames: BTreeMap<(u64, u32, u32, ChunkDigest), Vec<usize>> = BTreeMap::new();
    for (i, c) in new.chunks.iter().enumerate() {
        if done.get(i).copied().unwrap_or(false) {
            p.done.push(i);
        } else if let Some(&from) = have.get(&c.digest) {
            p.local.push(LocalCopy { index: i, from });
        } else {
            frames.entry((c.offset, c.length, c.size, c.digest)).or_default().push(i);
        }
    }
    let mut group: Option<FetchGroup> = None;
    for ((offset, length, _, _), indices) in frames {
        let end = offset.saturating_add(u64::from(length));
        match &mut group {
            Some(g) if g.range.end == offset && end - g.range.start <= max_request => {
                let rel = (offset - g.range.start) as usize..(end - g.range.start) as usize;
                g.frames.push((rel, indices));
                g.range.end = end;
            }
            _ => {
                p.fetch.extend(group.take());
                group = Some(FetchGroup { range: offset..end, frames: vec![(0..length as usize, indices)] });
            }
        }
    }
    p.fetch.extend(group);
    p
}

/// At least this share of the bytes to fetch (1/20) must be the dm-verity tree for the node to
/// compute it instead: then the read-back hashes every data block a second time (the leaves), a
/// pass that costs about 0.5 core-seconds per GiB. A small update fetches mostly tree (measured:
/// 1.6 of 1.8 MB for one configuration file added to the node image); a whole image fetches
/// about 2 % tree, cheaper to download than to compute.
pub const COMPUTE_TREE_SHARE: u64 = 20;

/// The chunks of the dm-verity tree that the node computes from the data it wrote and verified,
/// instead of fetching them (an empty list means: fetch or copy them as any chunk).
///
/// Only for the layout this project writes and the kernel reads: SHA-256, 4 KiB data and hash
/// blocks, the tree right after the data and exactly as long as dm-verity's, no chunk across
/// the two. Then the tree is a function of data that is checked chunk by chunk, and the root
/// hash the computed tree must end in is in the signed manifest; the computed chunks are also
/// checked against their digests like any other. Chosen when the tree's frames are at least
/// 1/[`COMPUTE_TREE_SHARE`] of the bytes to fetch; then every tree chunk not already in the
/// target is computed, local copies included (the computation rewrites the whole tree anyway).
pub fn tree_to_compute(new: &Manifest, done: &[bool], local: Option<&Manifest>) -> Vec<usize> {
    let v = &new.verity;
    let Ok(params) = v.params() else { return Vec::new() };
    let block = 4096u64;
    let data_blocks = v.data_size / block;
    let layout_ok = v.hash_algorithm == "sha256"
        && v.data_block_size == 4096
        && v.hash_block_size == 4096
        && v.data_size.is_multiple_of(block)
        && data_blocks > 1
        && v.data_size.checked_add(params.tree_size(data_blocks)) == Some(new.image_size)
        && (0..new.chunks.len()).all(|i| {
            let r = new.chunk_range(i);
            r.end <= v.data_size || r.start >= v.data_size
        });
    if !layout_ok {
        return Vec::new();
    }
    let have: std::collections::HashSet<ChunkDigest> =
        local.map(|m| m.chunks.iter().map(|c| c.digest).collect()).unwrap_or_default();
    let mut frames: BTreeMap<u64, (u64, bool)> = BTreeMap::new();
    for (i, c) in new.chunks.iter().enumerate() {
        if !done.get(i).copied().unwrap_or(false) && !have.contains(&c.digest) {
            let tree = c.image_offset >= v.data_size;
            let e = frames.entry(c.offset).or_insert((u64::from(c.length), tree));
            e.1 &= tree;
        }
    }
    let total: u64 = frames.values().map(|f| f.0).sum();
    let tree: u64 = frames.values().filter(|f| f.1).map(|f| f.0).sum();
    if tree == 0 || tree.saturating_mul(COMPUTE_TREE_SHARE) < total {
        return Vec::new();
    }
    (0..new.chunks.len())
        .filter(|&i| new.chunks[i].image_offset >= v.data_size && !done.get(i).copied().unwrap_or(false))
        .collect()
}

/// Payload bytes an install of `new` into an empty target fetches when the other slot holds
/// `old`: the frames the plan requests, the dm-verity tree left out when the node computes it.
pub fn fetch_bytes_for(new: &Manifest, old: Option<&Manifest>) -> u64 {
    let mut done = vec![false; new.chunks.len()];
    for i in tree_to_compute(new, &done, old) {
        done[i] = true;
    }
    plan(new, &done, old, u64::MAX).fetch_bytes()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use manifest::{Chunk, PayloadRef, VerityInfo};

    /// A manifest of 4 KiB chunks with digests `[d; 32]` and the given frames.
    pub(crate) fn manifest(digests: &[u8], frames: &[(u64, u32)]) -> Manifest {
        let chunks = digests
            .iter()
            .zip(frames)
            .enumerate()
            .map(|(i, (&d, &(offset, length)))| Chunk {
                image_offset: i as u64 * 4096,
                size: 4096,
                digest: ChunkDigest { hash: manifest::ChunkHash::Blake3, bytes: [d; 32] },
                offset,
                length,
            })
            .collect();
        Manifest::new(
            "1.0.0".parse().unwrap(),
            "x86_64".into(),
            digests.len() as u64 * 4096,
            manifest::Sha256Digest([0; 32]),
            4096,
            PayloadRef { path: "payload".into(), size: 1 << 20, compression: "zstd".into() },
            VerityInfo {
                data_size: digests.len() as u64 * 4096,
                data_block_size: 4096,
                hash_block_size: 4096,
                hash_algorithm: "sha256".into(),
                salt: vec![],
                root_hash: manifest::Sha256Digest([0; 32]),
            },
            String::new(),
            chunks,
        )
    }

    #[test]
    fn done_local_and_fetched_chunks() {
        // Chunks 1 and 3 share a frame (same digest); chunk 4 is in the old image.
        let new = manifest(&[1, 2, 3, 2, 9], &[(0, 10), (10, 20), (30, 5), (10, 20), (35, 7)]);
        let old = manifest(&[7, 9], &[(0, 1), (1, 1)]);
        let p = plan(&new, &[true, false, false, false, false], Some(&old), 1 << 20);
        assert_eq!(p.done, vec![0]);
        assert_eq!(p.local, vec![LocalCopy { index: 4, from: 4096 }]);
        assert_eq!(
            p.fetch,
            vec![FetchGroup { range: 10..35, frames: vec![(0..20, vec![1, 3]), (20..25, vec![2])] }]
        );
        assert_eq!(p.fetch_bytes(), 25);
    }

    #[test]
    fn issue_12_chunks_that_name_one_frame_but_differ_are_decoded_each_on_its_own() {
        // Chunk 1 has chunk 0's frame but another digest; chunk 2 the same frame and another
        // size; chunk 3 is identical to chunk 0 and shares its decode.
        let mut new = manifest(&[1, 2, 1, 1], &[(0, 10), (0, 10), (0, 10), (0, 10)]);
        new.chunks[2].size = 8192;
        let p = plan(&new, &[], None, 1 << 20);
        let frames: Vec<Vec<usize>> =
            p.fetch.iter().flat_map(|g| g.frames.iter().map(|(_, idx)| idx.clone())).collect();
        assert_eq!(frames.len(), 3, "{p:?}");
        assert!(
            frames.contains(&vec![0, 3]) && frames.contains(&vec![1]) && frames.contains(&vec![2]),
            "{p:?}"
        );
        // Each decode covers exactly the frame's bytes.
        for g in &p.fetch {
            assert_eq!(g.range, 0..10);
        }
    }

    #[test]
    fn requests_are_split_at_gaps_and_at_the_size_limit() {
        let new = manifest(&[1, 2, 3, 4], &[(0, 10), (10, 10), (30, 10), (40, 10)]);
        let p = plan(&new, &[], None, 15);
        let ranges: Vec<_> = p.fetch.iter().map(|g| g.range.clone()).collect();
        assert_eq!(ranges, vec![0..10, 10..20, 30..40, 40..50]);
        let p = plan(&new, &[], None, 20);
        let ranges: Vec<_> = p.fetch.iter().map(|g| g.range.clone()).collect();
        assert_eq!(ranges, vec![0..20, 30..50]);
    }

    /// `data` one-block data chunks (digest byte, frame length) and one tree chunk (the whole
    /// tree of up to 128 blocks is one hash block) with the given frame length.
    fn with_tree(data: &[(u8, u32)], tree_frame: u32) -> Manifest {
        let mut digests: Vec<u8> = data.iter().map(|d| d.0).collect();
        // The tree changes with any data block.
        digests.push(data.iter().fold(0x55, |a, d| a ^ d.0.rotate_left(3)));
        let mut frames = Vec::new();
        let mut at = 0u64;
        for len in data.iter().map(|d| d.1).chain([tree_frame]) {
            frames.push((at, len));
            at += u64::from(len);
        }
        let mut m = manifest(&digests, &frames);
        m.verity.data_size = data.len() as u64 * 4096;
        m
    }

    #[test]
    fn the_tree_is_computed_when_it_is_a_large_share_of_the_download() {
        let old = with_tree(&[(1, 100), (2, 100), (3, 100)], 4000);
        // One data chunk changed: the tree's 4000 bytes are most of the download.
        let new = with_tree(&[(1, 100), (9, 100), (3, 100)], 4000);
        assert_eq!(tree_to_compute(&new, &[], Some(&old)), vec![3]);
        // Already in the target: nothing to compute.
        assert!(tree_to_compute(&new, &[false, false, false, true], Some(&old)).is_empty());
        // A whole install where the tree is under 1/20 of the bytes: fetched like the rest.
        let big = with_tree(&[(1, 30_000), (2, 30_000), (3, 30_000)], 4000);
        assert!(tree_to_compute(&big, &[], None).is_empty());
        // At exactly 1/20 it is computed.
        let edge = with_tree(&[(1, 38_000), (2, 38_000)], 4000);
        assert_eq!(tree_to_compute(&edge, &[], None), vec![2]);
    }

    #[test]
    fn a_tree_in_another_layout_is_never_computed() {
        let old = with_tree(&[(1, 100), (2, 100)], 4000);
        let new = with_tree(&[(1, 100), (9, 100)], 4000);
        assert_eq!(tree_to_compute(&new, &[], Some(&old)), vec![2]);
        let mut m = new.clone();
        m.verity.hash_block_size = 512;
        assert!(tree_to_compute(&m, &[], Some(&old)).is_empty(), "other hash blocks");
        let mut m = new.clone();
        m.verity.hash_algorithm = "sha1".into();
        assert!(tree_to_compute(&m, &[], Some(&old)).is_empty(), "another hash");
        let mut m = new.clone();
        m.image_size += 4096;
        assert!(tree_to_compute(&m, &[], Some(&old)).is_empty(), "a tree of another length");
        let mut m = new.clone();
        m.verity.data_size = 4096 + 2048;
        assert!(tree_to_compute(&m, &[], Some(&old)).is_empty(), "a chunk across data and tree");
        let m = with_tree(&[(9, 100)], 4000);
        assert!(tree_to_compute(&m, &[], None).is_empty(), "one data block: no tree at all");
    }
}
