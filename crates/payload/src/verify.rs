//! Offline verification of a payload against its manifest.

use crate::decode::{ChunkDecoder, ChunkError};
use crate::pipeline::{WorkerState, ordered};
use manifest::{Manifest, ManifestError, Sha256Digest};
use sha2::Digest as _;
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

/// Why a payload does not match its manifest.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// The manifest itself is inconsistent.
    #[error("manifest: {0}")]
    Manifest(#[from] ManifestError),
    /// Reading the payload failed.
    #[error("read {path}: {source}")]
    Io {
        /// The payload file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The payload file has the wrong size.
    #[error("payload {path} is {found} bytes, the manifest says {expected} (truncated or wrong file)")]
    Size {
        /// The payload file.
        path: PathBuf,
        /// Size in the manifest.
        expected: u64,
        /// Size on disk.
        found: u64,
    },
    /// A chunk does not decode to what the manifest lists.
    #[error("payload {path}: {source}")]
    Chunk {
        /// The payload file.
        path: PathBuf,
        /// What is wrong with the chunk.
        source: ChunkError,
    },
    /// All chunks are right but together they are not the image the manifest names.
    #[error("image SHA-256 is {found}, the manifest says {expected}")]
    ImageDigest {
        /// Listed digest.
        expected: Sha256Digest,
        /// Actual digest.
        found: Sha256Digest,
    },
    /// The image's data does not hash to the manifest's verity root hash.
    #[error("dm-verity root hash of the image data is {found}, the manifest says {expected}")]
    VerityRoot {
        /// Listed root hash.
        expected: Sha256Digest,
        /// Computed root hash.
        found: Sha256Digest,
    },
    /// The hash tree stored in the image is not the tree of its data.
    #[error("the dm-verity hash tree stored in the image differs from the tree of its data")]
    VerityTree,
    /// The verity parameters are unusable.
    #[error("verity: {0}")]
    Verity(#[from] verity::VerityError),
}

/// Checks every chunk of `payload` against `manifest`, then the image digest and the verity tree.
///
/// `progress` is called with the number of image bytes checked so far. Uses `threads` workers;
/// memory stays at a few chunks per worker plus the hash tree.
pub fn verify(
    manifest: &Manifest,
    payload: &Path,
    threads: usize,
    progress: &dyn Fn(u64),
) -> Result<(), PayloadError> {
    manifest.validate()?;
    let io = |source| PayloadError::Io { path: payload.to_owned(), source };
    let file = File::open(payload).map_err(io)?;
    let found = file.metadata().map_err(io)?.len();
    if found != manifest.payload.size {
        return Err(PayloadError::Size { path: payload.to_owned(), expected: manifest.payload.size, found });
    }
    let v = &manifest.verity;
    let params = v.params()?;
    // Chunks wholly inside the data area (validate() put a boundary where the tree starts).
    let data_chunks = manifest.chunks.iter().take_while(|c| c.image_offset < v.data_size).count();
    let mut leaves: Vec<verity::Digest32> =
        Vec::with_capacity((v.data_size / u64::from(v.data_block_size)) as usize);
    let mut tree_bytes: Vec<u8> = Vec::with_capacity((manifest.image_size - v.data_size) as usize);
    let mut hasher = sha2::Sha256::new();

    ordered::<_, _, _, PayloadError>(
        threads,
        |push| {
            for (index, c) in manifest.chunks.iter().enumerate() {
                let mut frame = vec![0u8; c.length as usize];
                file.read_exact_at(&mut frame, c.offset).map_err(io)?;
                if !push((index, frame)) {
                    break;
                }
            }
            Ok(())
        },
        |state: &mut WorkerState, (index, frame): (usize, Vec<u8>)| {
            let decoder = match &mut state.decoder {
                Some(d) => d,
                slot => slot.insert(ChunkDecoder::new().map_err(io)?),
            };
            let mut data = Vec::new();
            decoder
                .decode_into(manifest, index, &frame, &mut data)
                .map_err(|source| PayloadError::Chunk { path: payload.to_owned(), source })?;
            let chunk_leaves =
                if index < data_chunks { verity::leaf_digests(&params, &data)? } else { Vec::new() };
            Ok((data, chunk_leaves))
        },
        |i, (data, chunk_leaves)| {
            hasher.update(&data);
            if (i as usize) < data_chunks {
                leaves.extend_from_slice(&chunk_leaves);
            } else {
                tree_bytes.extend_from_slice(&data);
            }
            progress(manifest.chunk_range(i as usize).end);
            Ok(())
        },
    )?;

    let found = Sha256Digest(hasher.finalize().into());
    if found != manifest.image_sha256 {
        return Err(PayloadError::ImageDigest { expected: manifest.image_sha256, found });
    }
    let tree = verity::HashTree::from_leaves(&params, &leaves)?;
    let root = Sha256Digest(*tree.root_hash());
    if root != v.root_hash {
        return Err(PayloadError::VerityRoot { expected: v.root_hash, found: root });
    }
    if tree.bytes() != tree_bytes.as_slice() {
        return Err(PayloadError::VerityTree);
    }
    Ok(())
}
