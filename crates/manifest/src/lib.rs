//! The documents of a repository: the image [`Manifest`] and the [`ChannelIndex`].
//!
//! These are wire types shared by the publishing tool and the agent. They are plain data with
//! validation; nothing here does I/O or checks signatures (that is `signing`, and `repo` ties the
//! two together).
//!
//! Both documents have exactly one byte representation: pretty JSON in field declaration order
//! with a final newline ([`Manifest::to_bytes`]). Parsing re-serialises and refuses a document
//! whose bytes differ ([`DocumentError::NotCanonical`]), and unknown or duplicate fields are
//! refused too. So the bytes a key signed are the only bytes that parse to a given value: no
//! second encoding can carry the same signature with a different meaning.

mod digest;
mod image;
mod index;

pub use digest::{ChunkDigest, ChunkHash, Sha256Digest};
pub use image::{Chunk, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, Manifest, ManifestError, PayloadRef, VerityInfo};
pub use index::{Accepted, ChannelIndex, FreshnessError, IndexError, Release, Wave};
pub use semver::Version;

/// The channel index format this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest formats this code reads: 1 (SHA-256 chunk digests) and 2 (BLAKE3 chunk
/// digests; otherwise the same).
pub const MANIFEST_FORMATS: std::ops::RangeInclusive<u32> = 1..=2;
/// The manifest format a publisher writes unless asked otherwise: 1, which every agent and
/// every first stage (the boot selector on the EFI system partition, which slot updates do not
/// replace) reads. A first stage from before format 2 gives up a slot whose manifest it cannot
/// read, so format 2 is for fleets whose agents and first stages are all of this release or
/// later (`aclpub build --manifest-format 2`).
pub const MANIFEST_FORMAT: u32 = 1;

/// Errors parsing a document.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    /// Not JSON of the document's shape.
    #[error("{what} is malformed: {reason}")]
    Malformed {
        /// "manifest" or "channel index".
        what: &'static str,
        /// The parser's message (line and column).
        reason: String,
    },
    /// Valid JSON, but not in the one canonical form that is signed.
    #[error("{what} is not in canonical form (re-encoded, reformatted or edited by hand)")]
    NotCanonical {
        /// "manifest" or "channel index".
        what: &'static str,
    },
}

fn to_canonical<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let mut v = serde_json::to_vec_pretty(value).expect("documents serialise");
    v.push(b'\n');
    v
}

fn from_canonical<T>(what: &'static str, bytes: &[u8]) -> Result<T, DocumentError>
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let value: T = serde_json::from_slice(bytes)
        .map_err(|e| DocumentError::Malformed { what, reason: e.to_string() })?;
    if to_canonical(&value) != bytes {
        return Err(DocumentError::NotCanonical { what });
    }
    Ok(value)
}
