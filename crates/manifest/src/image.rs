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

use crate::{
    ChunkDigest, ChunkHash, DocumentError, MANIFEST_FORMAT, MANIFEST_FORMATS, Sha256Digest, from_canonical,
    to_canonical,
};
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
    /// Document format version: 1 or 2 ([`MANIFEST_FORMATS`]); it names the chunks' hash
    /// ([`Manifest::chunk_hash`]).
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
#[serde(try_from = "WireChunk", into = "WireChunk")]
pub struct Chunk {
    /// Offset of the chunk in the image.
    pub image_offset: u64,
    /// Uncompressed size, a whole number of 4 KiB blocks.
    pub size: u32,
    /// Digest of the uncompressed chunk: SHA-256 in a format-1 manifest (the field `sha256`),
    /// BLAKE3 in a format-2 one (`blake3`).
    pub digest: ChunkDigest,
    /// Offset of the compressed frame in the payload.
    pub offset: u64,
    /// Length of the compressed frame.
    pub length: u32,
}

/// A chunk as written in the document: exactly one of the digest fields.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireChunk {
    image_offset: u64,
    size: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha256: Option<Sha256Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    blake3: Option<Sha256Digest>,
    offset: u64,
    length: u32,
}

impl TryFrom<WireChunk> for Chunk {
    type Error = &'static str;
    fn try_from(w: WireChunk) -> Result<Self, Self::Error> {
        let digest = match (w.sha256, w.blake3) {
            (Some(d), None) => ChunkDigest { hash: ChunkHash::Sha256, bytes: d.0 },
            (None, Some(d)) => ChunkDigest { hash: ChunkHash::Blake3, bytes: d.0 },
            _ => return Err("a chunk needs exactly one digest, `sha256` or `blake3`"),
        };
        Ok(Self { image_offset: w.image_offset, size: w.size, digest, offset: w.offset, length: w.length })
    }
}

impl From<Chunk> for WireChunk {
    fn from(c: Chunk) -> Self {
        let d = Some(Sha256Digest(c.digest.bytes));
        let (sha256, blake3) = match c.digest.hash {
            ChunkHash::Sha256 => (d, None),
            ChunkHash::Blake3 => (None, d),
        };
        Self {
            image_offset: c.image_offset,
            size: c.size,
            sha256,
            blake3,
            offset: c.offset,
            length: c.length,
        }
    }
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
    #[error(
        "manifest format {format} is not supported (this agent reads formats {} to {})",
        MANIFEST_FORMATS.start(),
        MANIFEST_FORMATS.end(),
        format = .0
    )]
    UnsupportedFormat(u32),
    /// A chunk digest of another hash than the format's.
    #[error("chunk {index} has a {found} digest; a format-{format} manifest has {expected} chunk digests")]
    ChunkHashMismatch {
        /// Chunk index.
        index: usize,
        /// The manifest's format.
        format: u32,
        /// The format's hash.
        expected: &'static str,
        /// The chunk's.
        found: &'static str,
    },
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
    /// A new manifest (the builder fills it in, then calls [`Self::validate`]). Its format
    /// follows the chunks' digests: 1 for SHA-256, 2 for BLAKE3 (and [`MANIFEST_FORMAT`] when
    /// there are no chunks).
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
            format: chunks.first().map_or(MANIFEST_FORMAT, |c| c.digest.hash.format()),
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

    /// The hash of the chunk digests, by the format (BLAKE3 from format 2 on).
    pub fn chunk_hash(&self) -> ChunkHash {
        if self.format <= 1 { ChunkHash::Sha256 } else { ChunkHash::Blake3 }
    }

    /// The byte range of chunk `index` in the image (its end saturated at `u64::MAX`; a
    /// validated manifest has no chunk that gets there).
    pub fn chunk_range(&self, index: usize) -> Range<u64> {
        let c = &self.chunks[index];
        c.image_offset..c.image_offset.saturating_add(u64::from(c.size))
    }

    /// Checks that the manifest describes one consistent image and payload.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if !MANIFEST_FORMATS.contains(&self.format) {
            return Err(ManifestError::UnsupportedFormat(self.format));
        }
        let hash = self.chunk_hash();
        if let Some((index, c)) = self.chunks.iter().enumerate().find(|(_, c)| c.digest.hash != hash) {
            return Err(ManifestError::ChunkHashMismatch {
                index,
                format: self.format,
                expected: hash.name(),
                found: c.digest.hash.name(),
            });
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
                    } else if pc.digest != c.digest {
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
                digest: ChunkDigest { hash: ChunkHash::Blake3, bytes: [digest; 32] },
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
    fn the_format_names_the_chunk_hash_and_both_formats_round_trip() {
        let m2 = manifest(&[(0, 10, 1), (10, 10, 2), (20, 10, 3)]);
        assert_eq!((m2.format, m2.chunk_hash()), (2, ChunkHash::Blake3));
        assert_eq!(m2.validate(), Ok(()));
        let text = String::from_utf8(m2.to_bytes()).unwrap();
        assert!(text.contains("\"blake3\": \"0101") && !text.contains("\"sha256\": \"01"), "{text}");
        assert_eq!(Manifest::from_bytes(&m2.to_bytes()).unwrap(), m2);

        // Format 1, as agents before format 2 wrote and read it: the same bytes come back.
        let mut m1 = m2.clone();
        for c in &mut m1.chunks {
            c.digest.hash = ChunkHash::Sha256;
        }
        m1.format = 1;
        assert_eq!((m1.chunk_hash(), m1.validate()), (ChunkHash::Sha256, Ok(())));
        let text = String::from_utf8(m1.to_bytes()).unwrap();
        assert!(text.contains("\"sha256\": \"0101") && !text.contains("blake3"), "{text}");
        assert_eq!(Manifest::from_bytes(&m1.to_bytes()).unwrap(), m1);
        // Manifest::new picks the format from the chunks.
        let again = Manifest::new(
            m1.version.clone(),
            m1.arch.clone(),
            m1.image_size,
            m1.image_sha256,
            m1.max_chunk_size,
            m1.payload.clone(),
            m1.verity.clone(),
            m1.kernel_cmdline.clone(),
            m1.chunks.clone(),
        );
        assert_eq!(again.format, 1);

        // A digest of the other hash than the format's, in either direction.
        let mut mixed = m2.clone();
        mixed.chunks[1].digest.hash = ChunkHash::Sha256;
        assert_eq!(
            mixed.validate(),
            Err(ManifestError::ChunkHashMismatch {
                index: 1,
                format: 2,
                expected: "blake3",
                found: "sha256"
            })
        );
        let mut relabelled = m1.clone();
        relabelled.format = 2;
        assert!(matches!(relabelled.validate(), Err(ManifestError::ChunkHashMismatch { index: 0, .. })));
        // Formats this code does not know.
        for format in [0, 3, u32::MAX] {
            let mut m = m2.clone();
            m.format = format;
            let e = m.validate().unwrap_err();
            assert_eq!(e, ManifestError::UnsupportedFormat(format));
            assert!(e.to_string().contains("reads formats 1 to 2"), "{e}");
        }
        // A chunk with both digests, or none: malformed, not a panic. (The first chunk's
        // digest line is the first one indented as a chunk field.)
        let line = format!("      \"sha256\": \"{}\",\n", "01".repeat(32));
        assert!(text.contains(&line), "{text}");
        let both = text.replacen(&line, &format!("{line}      \"blake3\": \"{}\",\n", "02".repeat(32)), 1);
        let none = text.replacen(&line, "", 1);
        for doc in [both, none] {
            match Manifest::from_bytes(doc.as_bytes()) {
                Err(DocumentError::Malformed { reason, .. }) => {
                    assert!(reason.contains("exactly one digest"), "{reason}")
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_chunk_digest_matches_only_its_own_hash_of_the_bytes() {
        let data = vec![7u8; 8192];
        let (s, b) = (ChunkDigest::of(ChunkHash::Sha256, &data), ChunkDigest::of(ChunkHash::Blake3, &data));
        assert!(s.matches(&data) && b.matches(&data));
        assert_ne!(s, b);
        assert_eq!(s.bytes, Sha256Digest::of(&data).0);
        assert_eq!(b.bytes, *blake3::hash(&data).as_bytes());
        // The same 32 bytes labelled with the other hash match nothing.
        assert!(!ChunkDigest { hash: ChunkHash::Blake3, bytes: s.bytes }.matches(&data));
        assert!(!b.matches(&data[1..]));
        assert!(b.to_string().starts_with("blake3:") && s.to_string().starts_with("sha256:"));
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
