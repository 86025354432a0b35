//! The image manifest: what a slot image is, chunk by chunk.
//!
//! A slot image is the raw filesystem, zero-padded to a whole 4 KiB block, followed by its
//! dm-verity hash tree. The image is cut into chunks of whole 4 KiB blocks, contiguous and in
//! order, each at most `max_chunk_size` bytes; a chunk boundary falls where the data ends and the
//! tree begins, so every chunk is pure data or pure tree. Where the builder cuts is its choice
//! (content-defined, so that an inserted block moves no boundary but its neighbours'); the
//! manifest lists each chunk's image offset and size. Each chunk is one zstd frame at
//! `offset .. offset + length` of the payload file; identical chunks share one frame, and
//! frames of different chunks never overlap.
//!
//! A manifest is signed, but a signature says who made it, not that it is sane: [`Manifest::validate`]
//! does all its arithmetic checked, so that a hostile number (a frame offset near 2^64, a
//! frame shared by chunks of different sizes) is a typed error, never a panic or a chunk written
//! with another chunk's bytes (issue 12).

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
    /// The largest chunk (uncompressed); readers size their buffers by it.
    pub max_chunk_size: u32,
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

/// One chunk: where it lies in the image, the digest of its bytes, and where its frame lies in
/// the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chunk {
    /// Offset of the chunk in the image.
    pub image_offset: u64,
    /// Uncompressed size, a whole number of 4 KiB blocks.
    pub size: u32,
    /// SHA-256 of the uncompressed chunk.
    pub sha256: Sha256Digest,
    /// Offset of the compressed frame in the payload.
    pub offset: u64,
    /// Length of the compressed frame.
    pub length: u32,
}

impl Chunk {
    /// The frame's byte range in the payload (its end saturated at `u64::MAX`; a validated
    /// manifest has no frame that gets there).
    pub fn payload_range(&self) -> Range<u64> {
        self.offset..self.offset.saturating_add(u64::from(self.length))
    }
}

/// A manifest that parses but does not describe a consistent image.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// A format version this code does not know.
    #[error("manifest format {0} is not supported (this agent reads format {FORMAT_VERSION})")]
    UnsupportedFormat(u32),
    /// A maximum chunk size out of range.
    #[error("max chunk size {0} is not a multiple of {MIN_CHUNK_SIZE} up to {MAX_CHUNK_SIZE}")]
    BadChunkSize(u32),
    /// A chunk that does not start where the previous one ended, or is not whole blocks.
    #[error(
        "chunk {index} covers image bytes {start}..{end}; expected to start at {expected_start}, \
         in whole 4 KiB blocks of at most {max} bytes"
    )]
    BadChunk {
        /// Chunk index.
        index: usize,
        /// Its start.
        start: u64,
        /// Its end.
        end: u64,
        /// Where it should start.
        expected_start: u64,
        /// The maximum size.
        max: u32,
    },
    /// The chunk list does not cover the image exactly.
    #[error(
        "chunk list does not cover the image: {chunks} chunks cover {covered} bytes, the image is {image_size} bytes"
    )]
    ChunksDoNotCoverImage {
        /// Chunks listed.
        chunks: usize,
        /// Bytes covered.
        covered: u64,
        /// Image size.
        image_size: u64,
    },
    /// No chunk starts where the verity tree starts.
    #[error("no chunk boundary at the start of the verity tree (image byte {0})")]
    TreeNotOnBoundary(u64),
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
    /// A chunk whose frame would end past the largest 64-bit offset.
    #[error(
        "chunk {index}'s frame at payload byte {offset} ({length} bytes) ends past the largest possible offset"
    )]
    FrameOffsetOverflow {
        /// Chunk index.
        index: usize,
        /// Frame start.
        offset: u64,
        /// Frame length.
        length: u32,
    },
    /// Two chunks name the same frame but are not the same chunk content (a frame decodes to one
    /// chunk; sharing is only for identical chunks).
    #[error("chunks {first} and {second} share the frame at payload byte {offset} but differ in {what}")]
    SharedFrameMismatch {
        /// The first chunk using the frame.
        first: usize,
        /// The other.
        second: usize,
        /// Frame start.
        offset: u64,
        /// "size", "frame length" or "digest".
        what: &'static str,
    },
    /// Frames of two chunks overlap without being the same frame.
    #[error(
        "chunk {second}'s frame at payload bytes {second_start}..{second_end} overlaps chunk {first}'s at {first_start}..{first_end}"
    )]
    OverlappingFrames {
        /// The chunk whose frame starts first.
        first: usize,
        /// Its frame start.
        first_start: u64,
        /// Its frame end.
        first_end: u64,
        /// The other chunk.
        second: usize,
        /// Its frame start.
        second_start: u64,
        /// Its frame end.
        second_end: u64,
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
         != image {image_size} bytes"
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
    /// The command line cannot be passed on safely: the boot path appends its own
    /// parameters after it (issue 13: a `"` swallowed them).
    #[error("kernel command line {cmdline:?}: {why}")]
    BadCmdline {
        /// The command line.
        cmdline: String,
        /// What is wrong.
        why: &'static str,
    },
}

/// The rules for a signed kernel command line: printable ASCII without quotes (a `"` opens a
/// quoted value that swallows what the boot path appends), and none of the parameters the boot
/// path sets itself (`acl.*`, `root=`, `rootfstype=`), which the image must not override.
fn check_cmdline(c: &str) -> Result<(), &'static str> {
    if c.len() > 4096 {
        return Err("longer than 4096 bytes");
    }
    if !c.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return Err("only printable ASCII is allowed (no newline, NUL or other control character)");
    }
    if c.contains('"') {
        return Err("a double quote would swallow the parameters the boot path appends");
    }
    for p in c.split(' ') {
        let key = p.split('=').next().unwrap_or("");
        if key.starts_with("acl.") || key == "root" || key == "rootfstype" {
            return Err("acl.*, root= and rootfstype= are set by the boot path, not by the image");
        }
    }
    Ok(())
}

impl Manifest {
    /// A new manifest of the current format (the builder fills it in, then calls [`Self::validate`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        version: semver::Version,
        arch: String,
        image_size: u64,
        image_sha256: Sha256Digest,
        max_chunk_size: u32,
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
            max_chunk_size,
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

    /// The byte range of chunk `index` in the image (its end saturated at `u64::MAX`; a
    /// validated manifest has no chunk that gets there).
    pub fn chunk_range(&self, index: usize) -> Range<u64> {
        let c = &self.chunks[index];
        c.image_offset..c.image_offset.saturating_add(u64::from(c.size))
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
        check_cmdline(&self.kernel_cmdline)
            .map_err(|why| ManifestError::BadCmdline { cmdline: self.kernel_cmdline.clone(), why })?;
        let max = self.max_chunk_size;
        if max == 0 || !max.is_multiple_of(MIN_CHUNK_SIZE) || max > MAX_CHUNK_SIZE {
            return Err(ManifestError::BadChunkSize(max));
        }
        if self.image_size == 0 {
            return Err(ManifestError::EmptyImage);
        }
        let mut at = 0u64;
        for (index, c) in self.chunks.iter().enumerate() {
            let whole = c.size > 0 && c.size.is_multiple_of(MIN_CHUNK_SIZE) && c.size <= max;
            if c.image_offset != at || !whole {
                return Err(ManifestError::BadChunk {
                    index,
                    start: c.image_offset,
                    end: c.image_offset.saturating_add(u64::from(c.size)),
                    expected_start: at,
                    max,
                });
            }
            // Cannot overflow in practice (it would take 2^38 chunks), but stays checked.
            at = at.checked_add(u64::from(c.size)).ok_or(ManifestError::ChunksDoNotCoverImage {
                chunks: self.chunks.len(),
                covered: u64::MAX,
                image_size: self.image_size,
            })?;
        }
        if at != self.image_size {
            return Err(ManifestError::ChunksDoNotCoverImage {
                chunks: self.chunks.len(),
                covered: at,
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
            let Some(end) = c.offset.checked_add(u64::from(c.length)) else {
                return Err(ManifestError::FrameOffsetOverflow { index, offset: c.offset, length: c.length });
            };
            if end > self.payload.size {
                return Err(ManifestError::ChunkOutsidePayload {
                    index,
                    start: c.offset,
                    end,
                    payload_size: self.payload.size,
                });
            }
        }
        self.check_frames()?;
        let v = &self.verity;
        if v.hash_algorithm != "sha256" {
            return Err(ManifestError::UnsupportedHash(v.hash_algorithm.clone()));
        }
        let params = v.params()?;
        let tree_size = params.tree_size(v.data_size / u64::from(v.data_block_size));
        let fits = v.data_size > 0
            && v.data_size.is_multiple_of(u64::from(v.data_block_size))
            && v.data_size.checked_add(tree_size) == Some(self.image_size);
        if !fits {
            return Err(ManifestError::VerityLayout {
                data_size: v.data_size,
                tree_size,
                image_size: self.image_size,
            });
        }
        if v.data_size < self.image_size && !self.chunks.iter().any(|c| c.image_offset == v.data_size) {
            return Err(ManifestError::TreeNotOnBoundary(v.data_size));
        }
        Ok(())
    }

    /// Frames are shared only by identical chunks (same size, frame length and digest), and
    /// distinct frames do not overlap. Needs every frame end checked already.
    fn check_frames(&self) -> Result<(), ManifestError> {
        let mut order: Vec<usize> = (0..self.chunks.len()).collect();
        order.sort_by_key(|&i| (self.chunks[i].offset, i));
        let mut prev: Option<usize> = None;
        for i in order {
            let c = &self.chunks[i];
            if let Some(p) = prev {
                let pc = &self.chunks[p];
                if pc.offset == c.offset {
                    let what = if pc.size != c.size {
                        Some("size")
                    } else if pc.length != c.length {
                        Some("frame length")
                    } else if pc.sha256 != c.sha256 {
                        Some("digest")
                    } else {
                        None
                    };
                    if let Some(what) = what {
                        return Err(ManifestError::SharedFrameMismatch {
                            first: p,
                            second: i,
                            offset: c.offset,
                            what,
                        });
                    }
                    continue;
                }
                let (pr, r) = (pc.payload_range(), c.payload_range());
                if r.start < pr.end {
                    return Err(ManifestError::OverlappingFrames {
                        first: p,
                        first_start: pr.start,
                        first_end: pr.end,
                        second: i,
                        second_start: r.start,
                        second_end: r.end,
                    });
                }
            }
            prev = Some(i);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest of 4 KiB chunks at the given frames (offset, length, digest byte), valid
    /// when the frames are; the payload is 1 MiB.
    fn manifest(chunks: &[(u64, u32, u8)]) -> Manifest {
        let chunks: Vec<Chunk> = chunks
            .iter()
            .enumerate()
            .map(|(i, &(offset, length, digest))| Chunk {
                image_offset: i as u64 * 4096,
                size: 4096,
                sha256: Sha256Digest([digest; 32]),
                offset,
                length,
            })
            .collect();
        let size = chunks.len() as u64 * 4096;
        // The data area whose hash tree fills the rest of the image (when there is one).
        let params = verity::Params::new(4096, 4096, vec![]).unwrap();
        let data_size = (0..=size / 4096)
            .map(|k| size - k * 4096)
            .find(|&d| d + params.tree_size(d / 4096) == size)
            .unwrap_or(size);
        Manifest::new(
            "1.0.0".parse().unwrap(),
            "x86_64".into(),
            size,
            Sha256Digest([0; 32]),
            8192,
            PayloadRef { path: "payload".into(), size: 1 << 20, compression: "zstd".into() },
            VerityInfo {
                data_size,
                data_block_size: 4096,
                hash_block_size: 4096,
                hash_algorithm: "sha256".into(),
                salt: vec![],
                root_hash: Sha256Digest([0; 32]),
            },
            String::new(),
            chunks,
        )
    }

    #[test]
    fn issue_13_kernel_command_lines_are_checked() {
        for ok in ["", "console=ttyS0 quiet", "panic=3 loglevel=4 systemd.unit=multi-user.target"] {
            assert_eq!(check_cmdline(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("quiet \"", "double quote"),
            ("console=\"ttyS0 x\"", "double quote"),
            ("a\nb", "printable ASCII"),
            ("a\0b", "printable ASCII"),
            ("acl.roothash=00", "set by the boot path"),
            ("quiet root=/dev/sda1", "set by the boot path"),
            ("rootfstype=ext4", "set by the boot path"),
        ] {
            let e = check_cmdline(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        let mut m = manifest(&[(0, 10, 1)]);
        m.kernel_cmdline = "quiet \"".into();
        let e = m.validate().unwrap_err().to_string();
        assert!(e.starts_with("kernel command line \"quiet \\\"\": a double quote"), "{e}");
    }

    #[test]
    fn issue_12_a_frame_offset_near_2_64_is_an_error_not_a_panic() {
        assert_eq!(manifest(&[(0, 100, 1)]).validate(), Ok(()));
        for offset in [u64::MAX, u64::MAX - 50, u64::MAX - 99] {
            let m = manifest(&[(offset, 100, 1)]);
            assert_eq!(
                m.validate(),
                Err(ManifestError::FrameOffsetOverflow { index: 0, offset, length: 100 })
            );
            assert_eq!(m.chunks[0].payload_range().end, u64::MAX, "saturated, no panic");
        }
        // Exactly at the end of the 64-bit range: no overflow, but outside the payload.
        let m = manifest(&[(u64::MAX - 100, 100, 1)]);
        assert!(matches!(m.validate(), Err(ManifestError::ChunkOutsidePayload { .. })));
        // An image offset near 2^64: named, no panic in the message either.
        let mut m = manifest(&[(0, 100, 1)]);
        m.chunks[0].image_offset = u64::MAX - 10;
        let e = m.validate().unwrap_err();
        assert!(matches!(e, ManifestError::BadChunk { start, end: u64::MAX, .. } if start == u64::MAX - 10));
        assert_eq!(m.chunk_range(0).end, u64::MAX);
    }

    #[test]
    fn issue_12_a_frame_shared_by_different_chunks_is_refused() {
        // Identical chunks may share a frame.
        assert_eq!(manifest(&[(0, 100, 1), (100, 50, 2), (0, 100, 1)]).validate(), Ok(()));
        // Different sizes behind one frame.
        let mut m = manifest(&[(0, 100, 1), (100, 50, 2), (0, 100, 1)]);
        m.chunks[2].size = 8192;
        m.chunks[2].image_offset = 8192;
        m.image_size = 16384;
        m.verity.data_size = 16384;
        assert_eq!(
            m.validate(),
            Err(ManifestError::SharedFrameMismatch { first: 0, second: 2, offset: 0, what: "size" })
        );
        // Different digests, or lengths, behind one frame.
        assert!(matches!(
            manifest(&[(0, 100, 1), (0, 100, 3)]).validate(),
            Err(ManifestError::SharedFrameMismatch { what: "digest", .. })
        ));
        assert!(matches!(
            manifest(&[(0, 100, 1), (0, 90, 1)]).validate(),
            Err(ManifestError::SharedFrameMismatch { what: "frame length", .. })
        ));
        // Overlapping but not the same frame.
        assert_eq!(
            manifest(&[(0, 100, 1), (50, 100, 2)]).validate().unwrap_err().to_string(),
            "chunk 1's frame at payload bytes 50..150 overlaps chunk 0's at 0..100"
        );
    }
}
