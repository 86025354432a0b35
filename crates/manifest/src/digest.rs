//! Digests as they appear in documents (lowercase hex): SHA-256 for documents, images and the
//! chunks of format-1 manifests; BLAKE3 for the chunks of format-2 manifests.
//!
//! Why two chunk hashes: an install hashes every chunk before it writes it, and with SHA-256
//! that was a third of the installer's CPU time (0.6-0.8 core-seconds per GiB even with the
//! CPU's SHA instructions). BLAKE3 takes a quarter of that. Both are 256-bit cryptographic
//! hashes; a manifest names one for all its chunks (by its format), so a digest never matches a
//! digest of the other kind.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A SHA-256 digest; shown and stored as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Sha256Digest(#[serde(with = "hex::serde")] pub [u8; 32]);

impl Sha256Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::Digest as _;
        Self(sha2::Sha256::digest(bytes).into())
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{self}")
    }
}

/// The hash of a manifest's chunk digests.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum ChunkHash {
    /// SHA-256 (manifest format 1).
    Sha256,
    /// BLAKE3 (manifest format 2).
    Blake3,
}

impl ChunkHash {
    /// The manifest format whose chunk digests use it.
    pub fn format(self) -> u32 {
        match self {
            Self::Sha256 => 1,
            Self::Blake3 => 2,
        }
    }

    /// Its name, as in documents and messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sha256 => "sha256",
            Self::Blake3 => "blake3",
        }
    }
}

/// The digest of one chunk's uncompressed bytes, with the hash that made it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkDigest {
    /// The hash.
    pub hash: ChunkHash,
    /// Its 32 bytes.
    pub bytes: [u8; 32],
}

impl ChunkDigest {
    /// The `hash` digest of `data`.
    pub fn of(hash: ChunkHash, data: &[u8]) -> Self {
        let bytes = match hash {
            ChunkHash::Sha256 => Sha256Digest::of(data).0,
            ChunkHash::Blake3 => *blake3::hash(data).as_bytes(),
        };
        Self { hash, bytes }
    }

    /// Whether `data` has this digest.
    pub fn matches(&self, data: &[u8]) -> bool {
        Self::of(self.hash, data) == *self
    }
}

impl fmt::Display for ChunkDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.hash.name(), hex::encode(self.bytes))
    }
}

impl fmt::Debug for ChunkDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
