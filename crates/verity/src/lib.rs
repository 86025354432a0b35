//! The dm-verity hash tree of a slot image, computed in process.
//!
//! A slot holds a read-only filesystem followed by its dm-verity hash tree; the kernel (or the
//! first-stage initramfs) opens the filesystem through dm-verity with the root hash that the
//! signed manifest carries, so every block read at run time is checked against the signature.
//! We compute the tree ourselves, rather than calling `veritysetup format`, because the image
//! builder already streams every data block once (for chunk digests and compression): hashing
//! the leaves there costs one more SHA-256 pass and no extra read of the image.
//!
//! The layout is dm-verity format version 1 without a superblock, which is what
//! `veritysetup format --no-superblock` writes and what Flatcar's `/usr` uses:
//!
//! - every data block `b` gets the digest `SHA-256(salt || b)` (format 1 puts the salt first);
//! - digests are packed into hash blocks (`hash_block_size / 32` per block, zero-padded);
//! - each level is hashed again into the level above until one level has one block;
//! - on disk the levels are stored from the top (smallest) level down to the leaves;
//! - the root hash is `SHA-256(salt || top hash block)`.
//!
//! With a single data block there are no levels at all and the root hash is the digest of that
//! block, as in cryptsetup. The test `matches_veritysetup` checks all of this byte for byte
//! against Debian's `veritysetup`.
//!
//! The principal types are [`Params`] (block sizes and salt), [`leaf_digests`] (the parallel,
//! per-chunk part), [`HashTree`] (the levels and the root hash) and [`TreeStream`] (the same
//! tree from leaves given in order, block by block, in memory of one hash block per level: how
//! a node computes the tree of a slot it has written instead of downloading it).

use sha2::{Digest, Sha256};

/// Size in bytes of a SHA-256 digest, the only hash algorithm we use.
pub const DIGEST_SIZE: usize = 32;

/// The largest salt that the dm-verity kernel target accepts.
pub const MAX_SALT_SIZE: usize = 256;

/// A SHA-256 digest as stored in the tree.
pub type Digest32 = [u8; DIGEST_SIZE];

/// Errors in verity parameters or input sizes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerityError {
    /// A block size that dm-verity does not accept.
    #[error("verity {which} block size {size} is not a power of two between 512 and 65536")]
    BadBlockSize {
        /// "data" or "hash".
        which: &'static str,
        /// The size given.
        size: u32,
    },
    /// The salt is longer than the kernel accepts.
    #[error("verity salt is {0} bytes, more than the {MAX_SALT_SIZE} the kernel accepts")]
    SaltTooLong(usize),
    /// A data buffer that is not a whole number of data blocks.
    #[error("verity data of {len} bytes is not a multiple of the {block} byte data block size")]
    PartialBlock {
        /// Length of the buffer.
        len: usize,
        /// Data block size.
        block: u32,
    },
    /// There is no data block at all.
    #[error("verity data is empty: at least one data block is needed")]
    Empty,
}

/// The parameters of a hash tree: block sizes and salt; the hash algorithm is always SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    data_block_size: u32,
    hash_block_size: u32,
    salt: Vec<u8>,
}

impl Params {
    /// Checks and builds parameters.
    pub fn new(data_block_size: u32, hash_block_size: u32, salt: Vec<u8>) -> Result<Self, VerityError> {
        for (which, size) in [("data", data_block_size), ("hash", hash_block_size)] {
            if !size.is_power_of_two() || !(512..=65536).contains(&size) {
                return Err(VerityError::BadBlockSize { which, size });
            }
        }
        if salt.len() > MAX_SALT_SIZE {
            return Err(VerityError::SaltTooLong(salt.len()));
        }
        Ok(Self { data_block_size, hash_block_size, salt })
    }

    /// The data block size in bytes.
    pub fn data_block_size(&self) -> u32 {
        self.data_block_size
    }

    /// The hash block size in bytes.
    pub fn hash_block_size(&self) -> u32 {
        self.hash_block_size
    }

    /// The salt.
    pub fn salt(&self) -> &[u8] {
        &self.salt
    }

    fn digests_per_block(&self) -> u64 {
        // Block sizes are powers of two of at least 512, so this is a power of two of at least 16.
        u64::from(self.hash_block_size) / DIGEST_SIZE as u64
    }

    fn digest(&self, block: &[u8]) -> Digest32 {
        let mut h = Sha256::new();
        h.update(&self.salt);
        h.update(block);
        h.finalize().into()
    }

    /// The number of hash blocks in each level, from the leaves (level 0) up, for
    /// `data_blocks` data blocks. Empty when there is one data block (no tree).
    pub fn level_sizes(&self, data_blocks: u64) -> Vec<u64> {
        let per = self.digests_per_block();
        let mut sizes = Vec::new();
        let mut n = data_blocks;
        // Same rule as cryptsetup: add levels while more than one block would be left over.
        while n > 1 {
            n = n.div_ceil(per);
            sizes.push(n);
        }
        sizes
    }

    /// Size in bytes of the hash tree for `data_blocks` data blocks.
    pub fn tree_size(&self, data_blocks: u64) -> u64 {
        self.level_sizes(data_blocks).iter().sum::<u64>() * u64::from(self.hash_block_size)
    }
}

/// Computes the leaf digests of `data`, a whole number of data blocks.
///
/// This is the expensive part of building a tree, and it is independent per block, so callers
/// run it on many chunks in parallel and hand the results, in order, to [`HashTree::from_leaves`].
pub fn leaf_digests(params: &Params, data: &[u8]) -> Result<Vec<Digest32>, VerityError> {
    let block = params.data_block_size as usize;
    if !data.len().is_multiple_of(block) {
        return Err(VerityError::PartialBlock { len: data.len(), block: params.data_block_size });
    }
    Ok(data.chunks_exact(block).map(|b| params.digest(b)).collect())
}

/// A complete hash tree: the bytes to store after the data, and the root hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashTree {
    /// The levels as stored on disk: top level first, leaves last.
    bytes: Vec<u8>,
    root: Digest32,
}

impl HashTree {
    /// Builds the tree from the leaf digests of all data blocks, in order.
    pub fn from_leaves(params: &Params, leaves: &[Digest32]) -> Result<Self, VerityError> {
        if leaves.is_empty() {
            return Err(VerityError::Empty);
        }
        if leaves.len() == 1 {
            return Ok(Self { bytes: Vec::new(), root: leaves[0] });
        }
        let hbs = params.hash_block_size as usize;
        let per = hbs / DIGEST_SIZE;
        // levels[0] holds the packed leaves, levels[i] the packed digests of levels[i-1]'s blocks.
        let mut levels: Vec<Vec<u8>> = Vec::new();
        let mut digests: Vec<Digest32> = leaves.to_vec();
        loop {
            let blocks = digests.len().div_ceil(per);
            let mut level = vec![0u8; blocks * hbs];
            for (i, d) in digests.iter().enumerate() {
                let at = (i / per) * hbs + (i % per) * DIGEST_SIZE;
                level[at..at + DIGEST_SIZE].copy_from_slice(d);
            }
            digests = level.chunks_exact(hbs).map(|b| params.digest(b)).collect();
            levels.push(level);
            if blocks == 1 {
                break;
            }
        }
        let root = digests[0];
        let bytes = levels.into_iter().rev().flatten().collect();
        Ok(Self { bytes, root })
    }

    /// Builds the tree of `data`, a whole number of data blocks, in one call.
    pub fn of_data(params: &Params, data: &[u8]) -> Result<Self, VerityError> {
        Self::from_leaves(params, &leaf_digests(params, data)?)
    }

    /// The tree as stored on disk after the data (top level first).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The root hash, which the signed manifest carries.
    pub fn root_hash(&self) -> &Digest32 {
        &self.root
    }
}

/// Builds the tree from the leaf digests given in order and hands out every hash block as soon
/// as it is complete, with its byte offset in the stored tree (top level first, as
/// [`HashTree::bytes`]). Memory is one hash block per level, whatever the data size.
#[derive(Debug)]
pub struct TreeStream {
    params: Params,
    /// Per level, from the leaves up: its byte offset in the stored tree, the hash block being
    /// filled, the digests in it, and the blocks of the level handed out so far.
    levels: Vec<Level>,
    leaves: u64,
    pushed: u64,
    root: Option<Digest32>,
}

#[derive(Debug)]
struct Level {
    offset: u64,
    block: Vec<u8>,
    filled: usize,
    emitted: u64,
}

impl TreeStream {
    /// A tree over `data_blocks` data blocks.
    pub fn new(params: &Params, data_blocks: u64) -> Result<Self, VerityError> {
        if data_blocks == 0 {
            return Err(VerityError::Empty);
        }
        let sizes = params.level_sizes(data_blocks);
        let hbs = u64::from(params.hash_block_size);
        let levels = (0..sizes.len())
            .map(|i| Level {
                offset: sizes[i + 1..].iter().sum::<u64>() * hbs,
                block: vec![0u8; params.hash_block_size as usize],
                filled: 0,
                emitted: 0,
            })
            .collect();
        Ok(Self { params: params.clone(), levels, leaves: data_blocks, pushed: 0, root: None })
    }

    /// Adds the digest of the next data block; `emit` gets each hash block completed by it.
    pub fn push(
        &mut self,
        leaf: &Digest32,
        emit: &mut impl FnMut(u64, &[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        if self.pushed == self.leaves {
            return Err(std::io::Error::other(format!("more than the {} leaves of this tree", self.leaves)));
        }
        self.pushed += 1;
        self.add(0, *leaf, emit)
    }

    fn add(
        &mut self,
        at: usize,
        digest: Digest32,
        emit: &mut impl FnMut(u64, &[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let Some(level) = self.levels.get_mut(at) else {
            self.root = Some(digest);
            return Ok(());
        };
        let o = level.filled * DIGEST_SIZE;
        level.block[o..o + DIGEST_SIZE].copy_from_slice(&digest);
        level.filled += 1;
        if level.filled * DIGEST_SIZE == level.block.len() {
            self.close(at, emit)?;
        }
        Ok(())
    }

    /// Hands out level `at`'s block (zero-padded) and adds its digest to the level above.
    fn close(
        &mut self,
        at: usize,
        emit: &mut impl FnMut(u64, &[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let level = &mut self.levels[at];
        let offset = level.offset + level.emitted * level.block.len() as u64;
        emit(offset, &level.block)?;
        let digest = self.params.digest(&level.block);
        level.block.fill(0);
        level.filled = 0;
        level.emitted += 1;
        self.add(at + 1, digest, emit)
    }

    /// Hands out the partly filled blocks and returns the root hash; every leaf must have been
    /// given.
    pub fn finish(
        mut self,
        emit: &mut impl FnMut(u64, &[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<Digest32> {
        if self.pushed != self.leaves {
            return Err(std::io::Error::other(format!(
                "{} of the {} leaves given",
                self.pushed, self.leaves
            )));
        }
        for at in 0..self.levels.len() {
            if self.levels[at].filled > 0 {
                self.close(at, emit)?;
            }
        }
        self.root.ok_or_else(|| std::io::Error::other("no root hash"))
    }
}

#[cfg(test)]
mod tests;
