//! Building a payload and manifest from a raw filesystem image.

use crate::chunker::{BLOCK, Chunker};
use crate::pipeline::{WorkerState, ordered};
use crate::{MANIFEST_FILE, PAYLOAD_FILE};
use manifest::{Chunk, ChunkDigest, ChunkHash, Manifest, PayloadRef, Sha256Digest, VerityInfo};
use sha2::Digest as _;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Default average chunk size: 256 KiB (see ARCHITECTURE.md, "Chunk size", for the
/// measurement); chunks are content-defined, between a quarter and four times this.
pub const DEFAULT_CHUNK_SIZE: u32 = 256 << 10;
/// Default zstd level (see ARCHITECTURE.md, "Compression level").
pub const DEFAULT_LEVEL: i32 = 9;
const VERITY_BLOCK: u32 = 4096;

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// OS version of the image.
    pub version: semver::Version,
    /// CPU architecture.
    pub arch: String,
    /// Kernel command line.
    pub kernel_cmdline: String,
    /// Average chunk size in bytes, a power of two from 16 KiB to 16 MiB; chunks are
    /// content-defined (see `chunker`), between a quarter and four times this.
    pub chunk_size: u32,
    /// zstd compression level (1-22).
    pub level: i32,
    /// Compression threads.
    pub threads: usize,
    /// dm-verity salt; [`default_salt`] when `None`.
    pub salt: Option<Vec<u8>>,
    /// 4 KiB blocks of the file system where a chunk must start, besides the content-defined
    /// boundaries (sorted; others are ignored): what the file system's layout says, so that a
    /// small metadata change costs a small chunk (`erofs_stable::chunk_starts` for erofs).
    pub chunk_starts: Vec<u64>,
    /// The chunk digests' hash, and so the manifest's format: SHA-256 (format 1), which every
    /// agent and first stage reads, or BLAKE3 (format 2), for fleets whose agents and first
    /// stages read it (see `manifest::MANIFEST_FORMAT`).
    pub chunk_hash: ChunkHash,
}

/// Why an image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Reading the input or writing the output failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The input file is empty.
    #[error("filesystem image {0} is empty")]
    EmptyInput(PathBuf),
    /// The output directory already holds an image.
    #[error("{0} already exists; refusing to overwrite a built image")]
    OutputExists(PathBuf),
    /// Options out of range.
    #[error("invalid build option: {0}")]
    Options(String),
    /// The input file changed size while it was being read.
    #[error("filesystem image {path} changed while being read: {read} bytes read, {expected} expected")]
    InputChanged {
        /// The input.
        path: PathBuf,
        /// Size when the build started.
        expected: u64,
        /// Bytes actually read.
        read: u64,
    },
    /// The image came out inconsistent (a bug, reported rather than published).
    #[error("built manifest is inconsistent: {0}")]
    Manifest(#[from] manifest::ManifestError),
    /// The verity tree could not be built.
    #[error("verity: {0}")]
    Verity(#[from] verity::VerityError),
}

/// The salt used when none is given: derived from version and architecture, so that the same
/// inputs give the same bytes (reproducible images) while every release gets its own salt.
pub fn default_salt(version: &semver::Version, arch: &str) -> Vec<u8> {
    let mut h = sha2::Sha256::new();
    h.update(b"acl-verity-salt-v1\0");
    h.update(version.to_string().as_bytes());
    h.update(b"\0");
    h.update(arch.as_bytes());
    h.finalize().to_vec()
}

struct Encoded {
    digest: ChunkDigest,
    leaves: Vec<verity::Digest32>,
    frame: Vec<u8>,
}

fn encode(
    state: &mut WorkerState,
    hash: ChunkHash,
    level: i32,
    params: &verity::Params,
    data: &[u8],
) -> std::io::Result<Encoded> {
    let compressor = match &mut state.compressor {
        Some(c) => c,
        slot => slot.insert(zstd::bulk::Compressor::new(level)?),
    };
    let frame = compressor.compress(data)?;
    let leaves = verity::leaf_digests(params, data).expect("chunks are whole verity blocks");
    Ok(Encoded { digest: ChunkDigest::of(hash, data), leaves, frame })
}

/// Appends frames to the payload, sharing one frame among identical chunks.
struct PayloadWriter {
    out: BufWriter<File>,
    path: PathBuf,
    size: u64,
    seen: HashMap<ChunkDigest, (u64, u32)>,
    chunks: Vec<Chunk>,
}

impl PayloadWriter {
    /// Records the chunk at `image_offset` (`size` bytes, digest `digest`), writing its frame
    /// unless an identical chunk's frame is already in the payload.
    fn push(
        &mut self,
        image_offset: u64,
        size: usize,
        digest: ChunkDigest,
        frame: &[u8],
    ) -> Result<(), BuildError> {
        let (offset, length) = match self.seen.get(&digest) {
            Some(&(offset, length)) => (offset, length),
            None => {
                self.out.write_all(frame).map_err(|source| BuildError::Io {
                    op: "write",
                    path: self.path.clone(),
                    source,
                })?;
                let at = (self.size, frame.len() as u32);
                self.size += frame.len() as u64;
                self.seen.insert(digest, at);
                at
            }
        };
        self.chunks.push(Chunk { image_offset, size: size as u32, digest, offset, length });
        Ok(())
    }
}

/// Builds `out_dir/payload` and `out_dir/manifest.json` (unsigned) from `fs_image`.
///
/// `progress` is called with the number of input bytes processed so far. `out_dir` is created
/// if needed and must not already hold a manifest or payload.
pub fn build(
    fs_image: &Path,
    out_dir: &Path,
    opts: &BuildOptions,
    progress: &dyn Fn(u64),
) -> Result<Manifest, BuildError> {
    let chunker = Chunker::new(opts.chunk_size).map_err(BuildError::Options)?;
    if !(1..=22).contains(&opts.level) {
        return Err(BuildError::Options(format!("zstd level {} is not in 1..=22", opts.level)));
    }
    let io = |op: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| BuildError::Io { op, path, source }
    };
    let mut input = File::open(fs_image).map_err(io("open", fs_image))?;
    let fs_size = input.metadata().map_err(io("stat", fs_image))?.len();
    if fs_size == 0 {
        return Err(BuildError::EmptyInput(fs_image.to_owned()));
    }
    std::fs::create_dir_all(out_dir).map_err(io("create directory", out_dir))?;
    let payload_path = out_dir.join(PAYLOAD_FILE);
    let manifest_path = out_dir.join(MANIFEST_FILE);
    for p in [&payload_path, &manifest_path] {
        if p.exists() {
            return Err(BuildError::OutputExists(p.clone()));
        }
    }
    let salt = opts.salt.clone().unwrap_or_else(|| default_salt(&opts.version, &opts.arch));
    let params = verity::Params::new(VERITY_BLOCK, VERITY_BLOCK, salt)?;
    let data_size = fs_size.div_ceil(BLOCK as u64) * BLOCK as u64;
    let data_blocks = data_size / u64::from(VERITY_BLOCK);

    let file = File::create_new(&payload_path).map_err(io("create", &payload_path))?;
    let mut writer = PayloadWriter {
        out: BufWriter::with_capacity(1 << 20, file),
        path: payload_path.clone(),
        size: 0,
        seen: HashMap::new(),
        chunks: Vec::new(),
    };
    let mut leaves: Vec<verity::Digest32> = Vec::with_capacity(data_blocks as usize);

    // Data chunks: read in order (hashing the image and finding boundaries as we go), encode
    // in parallel.
    let image_hasher = ordered(
        opts.threads,
        |push| {
            let mut hasher = sha2::Sha256::new();
            let mut read_total = 0u64;
            let mut at = 0u64;
            let mut chunk: Vec<u8> = Vec::with_capacity(chunker.max_size() as usize);
            let mut buf = vec![0u8; 1 << 20];
            let mut blocks = 0u32;
            let mut starts = opts.chunk_starts.iter().peekable();
            while at + (chunk.len() as u64) < data_size {
                let n = read_full(&mut input, &mut buf).map_err(io("read", fs_image))?;
                read_total += n;
                // The last block is zero-padded; past the end there is nothing more to read.
                let usable = (n as usize).div_ceil(BLOCK) * BLOCK;
                buf[n as usize..usable].fill(0);
                if usable == 0 {
                    break;
                }
                for block in buf[..usable].chunks(BLOCK) {
                    chunk.extend_from_slice(block);
                    blocks += 1;
                    let end = at + chunk.len() as u64;
                    // Whether the next block must start a chunk (the file system's layout).
                    let next = end / BLOCK as u64;
                    while starts.peek().is_some_and(|&&s| s < next) {
                        starts.next();
                    }
                    let forced = starts.peek() == Some(&&next);
                    if forced || chunker.cut_after(block, blocks) || end == data_size {
                        hasher.update(&chunk);
                        let full =
                            std::mem::replace(&mut chunk, Vec::with_capacity(chunker.max_size() as usize));
                        if !push((at, full)) {
                            return Ok(hasher);
                        }
                        at = end;
                        blocks = 0;
                    }
                }
            }
            if read_total != fs_size {
                return Err(BuildError::InputChanged {
                    path: fs_image.to_owned(),
                    expected: fs_size,
                    read: read_total,
                });
            }
            Ok(hasher)
        },
        |state, (at, buf): (u64, Vec<u8>)| {
            encode(state, opts.chunk_hash, opts.level, &params, &buf)
                .map(|e| (at, buf.len(), e))
                .map_err(io("compress", fs_image))
        },
        |_, (at, size, enc)| {
            writer.push(at, size, enc.digest, &enc.frame)?;
            leaves.extend_from_slice(&enc.leaves);
            progress((at + size as u64).min(fs_size));
            Ok(())
        },
    )?;

    // The hash tree follows the data, cut into chunks the same way.
    let tree = verity::HashTree::from_leaves(&params, &leaves)?;
    drop(leaves);
    let mut hasher = image_hasher;
    let mut state = WorkerState::default();
    let mut at = data_size;
    for piece in tree.bytes().chunks(opts.chunk_size as usize) {
        hasher.update(piece);
        let mut compressor = state.compressor.take();
        let c = match &mut compressor {
            Some(c) => c,
            slot => slot.insert(zstd::bulk::Compressor::new(opts.level).map_err(io("compress", fs_image))?),
        };
        let frame = c.compress(piece).map_err(io("compress", fs_image))?;
        state.compressor = compressor;
        writer.push(at, piece.len(), ChunkDigest::of(opts.chunk_hash, piece), &frame)?;
        at += piece.len() as u64;
    }
    let image_size = data_size + tree.bytes().len() as u64;

    let PayloadWriter { out, size: payload_size, chunks, .. } = writer;
    let file = out.into_inner().map_err(|e| BuildError::Io {
        op: "write",
        path: payload_path.clone(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io("sync", &payload_path))?;

    let manifest = Manifest::new(
        opts.version.clone(),
        opts.arch.clone(),
        image_size,
        Sha256Digest(hasher.finalize().into()),
        chunker.max_size(),
        PayloadRef { path: PAYLOAD_FILE.into(), size: payload_size, compression: "zstd".into() },
        VerityInfo {
            data_size,
            data_block_size: VERITY_BLOCK,
            hash_block_size: VERITY_BLOCK,
            hash_algorithm: "sha256".into(),
            salt: params.salt().to_vec(),
            root_hash: Sha256Digest(*tree.root_hash()),
        },
        opts.kernel_cmdline.clone(),
        chunks,
    );
    manifest.validate()?;
    write_file_synced(&manifest_path, &manifest.to_bytes()).map_err(io("write", &manifest_path))?;
    Ok(manifest)
}

/// Reads as much of `buf` as the file has; leaves the rest (zero padding) as it is. Returns
/// the number of bytes read.
fn read_full(input: &mut File, buf: &mut [u8]) -> std::io::Result<u64> {
    let mut at = 0;
    while at < buf.len() {
        match input.read(&mut buf[at..]) {
            Ok(0) => break,
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(at as u64)
}

/// Writes a new file and syncs it (data and metadata) before returning.
pub(crate) fn write_file_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = File::create_new(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}
