//! The image manifest: what a slot image is, chunk by chunk.
//!
//! A slot image is the raw filesystem, zero-padded to a whole number of chunks, followed by its
//! dm-verity hash tree. Aligning the tree to a chunk boundary keeps every chunk either pure data
//! or pure tree, so the builder can stream the data in one pass and append the tree afterwards.
//! The image is cut into chunks of `chunk_size` bytes (the last may be shorter); chunk `i`
//! covers bytes `i * chunk_size ..` of the image, so the list needs no image offsets. Each chunk
//! is one zstd frame at `offset .. offset + length` of the payload file; identical chunks (zero
//! padding, most often) share one frame.

use crate::{DocumentError, FORMAT_VERSION, Sha256Digest, from_canonical, to_canonical};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// The smallest chunk size: one page and one dm-verity data block.
pub const MIN_CHUNK_SIZE: u32 = 4096;
/// The largest chunk size; larger chunks would make the agent's buffers large.
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum ManifestType {
    #[serde(rename = "acl-image-manifest")]
    Manifest,
}

/// A signed image manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(rename = "type")]
    kind: ManifestType,
    /// Document format version ([`FORMAT_VERSION`]).
    pub format: u32,
    /// The OS version; releases are ordered by semver precedence.
    pub version: semver::Version,
    /// The CPU architecture, as `uname -m` prints it (`x86_64`, `aarch64`).
    pub arch: String,
    /// Size of the slot image in bytes (data, padding and hash tree).
    pub image_size: u64,
    /// SHA-256 of the whole slot image.
    pub image_sha256: Sha256Digest,
    /// Uncompressed size of every chunk but possibly the last.
    pub chunk_size: u32,
    /// The payload file that holds the compressed chunks.
    pub payload: PayloadRef,
    /// The dm-verity parameters and root hash of the image.
    pub verity: VerityInfo,
    /// The kernel command line of this image.
    pub kernel_cmdline: String,
    /// The chunks, in image order.
    pub chunks: Vec<Chunk>,
}

/// Where the payload is and what it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadRef {
    /// Path of the payload file relative to the manifest.
    pub path: String,
    /// Size of the payload file in bytes.
    pub size: u64,
    /// Compression of each chunk; always "zstd".
    pub compression: String,
}

/// dm-verity parameters of the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerityInfo {
    /// Bytes of data covered by the tree; the tree starts at this offset (`--hash-offset`).
    pub data_size: u64,
    /// dm-verity data block size.
    pub data_block_size: u32,
    /// dm-verity hash block size.
    pub hash_block_size: u32,
    /// Always "sha256".
    pub hash_algorithm: String,
    /// The salt, hex.
    #[serde(with = "hex::serde")]
    pub salt: Vec<u8>,
    /// The root hash.
    pub root_hash: Sha256Digest,
}

impl VerityInfo {
    /// The tree parameters, checked.
    pub fn params(&self) -> Result<verity::Params, verity::VerityError> {
        verity::Params::new(self.data_block_size, self.hash_block_size, self.salt.clone())
    }
}

/// One chunk: the digest of its uncompressed bytes and where its frame lies in the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chunk {
    /// SHA-256 of the uncompressed chunk.
    pub sha256: Sha256Digest,
    /// Offset of the compressed frame in the payload.
    pub offset: u64,
    /// Length of the compressed frame.
    pub length: u32,
}

impl Chunk {
    /// The frame's byte range in the payload.
    pub fn payload_range(&self) -> Range<u64> {
        self.offset..self.offset + u64::from(self.length)
    }
}

/// A manifest that parses but does not describe a consistent image.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// A format version this code does not know.
    #[error("manifest format {0} is not supported (this agent reads format {FORMAT_VERSION})")]
    UnsupportedFormat(u32),
    /// A chunk size that is not a power of two in range.
    #[error("chunk size {0} is not a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}")]
    BadChunkSize(u32),
    /// The chunk list does not cover the image exactly.
    #[error(
        "chunk list does not cover the image: {found} chunks of {chunk_size} bytes listed, \
         {expected} needed for {image_size} bytes"
    )]
    ChunksDoNotCoverImage {
        /// Chunks listed.
        found: usize,
        /// Chunks needed.
        expected: u64,
        /// Chunk size.
        chunk_size: u32,
        /// Image size.
        image_size: u64,
    },
    /// An empty image.
    #[error("image size is 0")]
    EmptyImage,
    /// A chunk whose frame lies outside the payload or is empty.
    #[error(
        "chunk {index} lies at payload bytes {start}..{end}, outside the payload of {payload_size} bytes"
    )]
    ChunkOutsidePayload {
        /// Chunk index.
        index: usize,
        /// Frame start.
        start: u64,
        /// Frame end.
        end: u64,
        /// Payload size.
        payload_size: u64,
    },
    /// A chunk with an empty frame.
    #[error("chunk {0} has an empty compressed frame")]
    EmptyFrame(usize),
    /// Compression other than zstd.
    #[error("payload compression {0:?} is not supported (only \"zstd\")")]
    UnsupportedCompression(String),
    /// A payload path that could escape the image's directory.
    #[error("payload path {0:?} must be a plain file name")]
    BadPayloadPath(String),
    /// Bad verity parameters.
    #[error("verity parameters: {0}")]
    Verity(#[from] verity::VerityError),
    /// A hash algorithm other than sha256.
    #[error("verity hash algorithm {0:?} is not supported (only \"sha256\")")]
    UnsupportedHash(String),
    /// The verity data area does not fit the image layout.
    #[error(
        "verity layout does not fit the image: data {data_size} bytes + tree {tree_size} bytes \
         != image {image_size} bytes (data must be a whole number of chunks)"
    )]
    VerityLayout {
        /// Data area size.
        data_size: u64,
        /// Tree size implied by the parameters.
        tree_size: u64,
        /// Image size.
        image_size: u64,
    },
    /// The architecture is empty or not a plain word.
    #[error("architecture {0:?} is not a plain name like x86_64")]
    BadArch(String),
    /// The command line has a character that cannot be passed to a kernel.
    #[error("kernel command line contains a newline or NUL")]
    BadCmdline,
}

impl Manifest {
    /// A new manifest of the current format (the builder fills it in, then calls [`Self::validate`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        version: semver::Version,
        arch: String,
        image_size: u64,
        image_sha256: Sha256Digest,
        chunk_size: u32,
        payload: PayloadRef,
        verity: VerityInfo,
        kernel_cmdline: String,
        chunks: Vec<Chunk>,
    ) -> Self {
        Self {
            kind: ManifestType::Manifest,
            format: FORMAT_VERSION,
            version,
            arch,
            image_size,
            image_sha256,
            chunk_size,
            payload,
            verity,
            kernel_cmdline,
            chunks,
        }
    }

    /// The canonical bytes, which are what is signed and stored.
    pub fn to_bytes(&self) -> Vec<u8> {
        to_canonical(self)
    }

    /// Parses canonical bytes. Call [`Self::validate`] before trusting the layout.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DocumentError> {
        from_canonical("manifest", bytes)
    }

    /// The byte range of chunk `index` in the image.
    pub fn chunk_range(&self, index: usize) -> Range<u64> {
        let start = index as u64 * u64::from(self.chunk_size);
        start..(start + u64::from(self.chunk_size)).min(self.image_size)
    }

    /// Number of chunks an image of `image_size` bytes has with `chunk_size`-byte chunks.
    pub fn chunk_count(image_size: u64, chunk_size: u32) -> u64 {
        image_size.div_ceil(u64::from(chunk_size))
    }

    /// Checks that the manifest describes one consistent image and payload.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.format != FORMAT_VERSION {
            return Err(ManifestError::UnsupportedFormat(self.format));
        }
        let arch_ok = !self.arch.is_empty()
            && self.arch.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !arch_ok {
            return Err(ManifestError::BadArch(self.arch.clone()));
        }
        if self.kernel_cmdline.contains(['\n', '\0']) {
            return Err(ManifestError::BadCmdline);
        }
        let cs = self.chunk_size;
        if !cs.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
            return Err(ManifestError::BadChunkSize(cs));
        }
        if self.image_size == 0 {
            return Err(ManifestError::EmptyImage);
        }
        let expected = Self::chunk_count(self.image_size, cs);
        if self.chunks.len() as u64 != expected {
            return Err(ManifestError::ChunksDoNotCoverImage {
                found: self.chunks.len(),
                expected,
                chunk_size: cs,
                image_size: self.image_size,
            });
        }
        if self.payload.compression != "zstd" {
            return Err(ManifestError::UnsupportedCompression(self.payload.compression.clone()));
        }
        let p = &self.payload.path;
        if p.is_empty() || p.contains('/') || p == "." || p == ".." {
            return Err(ManifestError::BadPayloadPath(p.clone()));
        }
        for (index, c) in self.chunks.iter().enumerate() {
            if c.length == 0 {
                return Err(ManifestError::EmptyFrame(index));
            }
            let r = c.payload_range();
            if r.end > self.payload.size || r.end < r.start {
                return Err(ManifestError::ChunkOutsidePayload {
                    index,
                    start: r.start,
                    end: r.end,
                    payload_size: self.payload.size,
                });
            }
        }
        let v = &self.verity;
        if v.hash_algorithm != "sha256" {
            return Err(ManifestError::UnsupportedHash(v.hash_algorithm.clone()));
        }
        let params = v.params()?;
        let tree_size = params.tree_size(v.data_size / u64::from(v.data_block_size));
        let fits = v.data_size > 0
            && v.data_size.is_multiple_of(u64::from(cs))
            && v.data_size.is_multiple_of(u64::from(v.data_block_size))
            && v.data_size.checked_add(tree_size) == Some(self.image_size);
        if !fits {
            return Err(ManifestError::VerityLayout {
                data_size: v.data_size,
                tree_size,
                image_size: self.image_size,
            });
        }
        Ok(())
    }
}
