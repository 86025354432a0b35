//! Decoding one chunk: decompress within a size limit, then check its digest.

use manifest::{ChunkDigest, Manifest};

/// A chunk that must not be written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    /// The frame is not valid zstd, or decompresses to more than the chunk's size.
    #[error("chunk {index}: compressed frame is corrupt: {reason}")]
    Decompress {
        /// Chunk index.
        index: usize,
        /// zstd's message.
        reason: String,
    },
    /// The frame decompresses to the wrong number of bytes.
    #[error("chunk {index}: decompressed to {found} bytes, expected {expected}")]
    Length {
        /// Chunk index.
        index: usize,
        /// Expected length.
        expected: u64,
        /// Found length.
        found: u64,
    },
    /// The chunk's bytes do not have the digest the manifest lists.
    #[error(
        "chunk {index} (image bytes {start}..{end}): its digest is {found}, the manifest says {expected}"
    )]
    Digest {
        /// Chunk index.
        index: usize,
        /// First image byte.
        start: u64,
        /// End of the chunk in the image.
        end: u64,
        /// Listed digest.
        expected: ChunkDigest,
        /// Actual digest.
        found: ChunkDigest,
    },
    /// A chunk index past the end of the manifest's list.
    #[error("chunk {index} does not exist (the image has {count} chunks)")]
    NoSuchChunk {
        /// Chunk index.
        index: usize,
        /// Chunk count.
        count: usize,
    },
}

/// Decompresses and checks chunks; keeps one zstd context for reuse.
pub struct ChunkDecoder {
    zstd: zstd::bulk::Decompressor<'static>,
}

impl std::fmt::Debug for ChunkDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkDecoder").finish_non_exhaustive()
    }
}

impl ChunkDecoder {
    /// A decoder.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self { zstd: zstd::bulk::Decompressor::new()? })
    }

    /// Decodes the frame of chunk `index` into `out` (cleared first) and checks it.
    ///
    /// On success `out` holds exactly the chunk's bytes, whose digest is the manifest's. The
    /// output is never larger than the chunk, whatever the frame claims.
    pub fn decode_into(
        &mut self,
        manifest: &Manifest,
        index: usize,
        frame: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), ChunkError> {
        let expected = Self::expected_len(manifest, index)?;
        out.clear();
        out.resize(expected as usize + 1, 0);
        let n = self.decode_to(manifest, index, frame, out)?;
        out.truncate(n);
        Ok(())
    }

    /// Like [`Self::decode_into`], into a caller's buffer (for example a pooled, aligned one)
    /// of at least the chunk's length plus one byte; returns the chunk's length.
    pub fn decode_to(
        &mut self,
        manifest: &Manifest,
        index: usize,
        frame: &[u8],
        out: &mut [u8],
    ) -> Result<usize, ChunkError> {
        let chunk = manifest
            .chunks
            .get(index)
            .ok_or(ChunkError::NoSuchChunk { index, count: manifest.chunks.len() })?;
        let range = manifest.chunk_range(index);
        let expected = range.end - range.start;
        // One byte more than expected, so that an over-long frame is a length error.
        let room = out.len().min(expected as usize + 1);
        let n = self
            .zstd
            .decompress_to_buffer(frame, &mut out[..room])
            .map_err(|e| ChunkError::Decompress { index, reason: e.to_string() })?;
        if n as u64 != expected {
            return Err(ChunkError::Length { index, expected, found: n as u64 });
        }
        let found = ChunkDigest::of(chunk.digest.hash, &out[..n]);
        if found != chunk.digest {
            return Err(ChunkError::Digest {
                index,
                start: range.start,
                end: range.end,
                expected: chunk.digest,
                found,
            });
        }
        Ok(n)
    }

    fn expected_len(manifest: &Manifest, index: usize) -> Result<u64, ChunkError> {
        if index >= manifest.chunks.len() {
            return Err(ChunkError::NoSuchChunk { index, count: manifest.chunks.len() });
        }
        let r = manifest.chunk_range(index);
        Ok(r.end - r.start)
    }
}
