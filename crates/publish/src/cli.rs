//! Command-line arguments.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Build, sign, publish and verify signed OS images in a static update repository.
#[derive(Debug, Parser)]
#[command(
    name = "aclpub",
    version,
    after_help = "\
Exit codes: 0 success; 1 failure (I/O, arguments); 2 usage error; \
3 verification rejected the input (signature, digest, expiry, replay)."
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Generate an Ed25519 signing key: NAME.key (secret, mode 0600) and NAME.pub.
    Keygen {
        /// Directory to write the key files into.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Base name of the key files.
        name: String,
    },
    /// Make an erofs image update-friendly in place: every inode's i_ino becomes its nid, so
    /// that adding a file does not renumber every inode after it (run after mkfs.erofs, before
    /// build; `cargo xtask image` does).
    StableInodes {
        /// The erofs image file, rewritten in place.
        image: PathBuf,
    },
    /// Build an image (payload and unsigned manifest) from a raw filesystem image.
    Build(BuildArgs),
    /// Add signatures to a manifest or channel index (writes DOCUMENT.sig).
    Sign {
        /// Secret key file; repeat to sign with several keys.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// The manifest.json or index.json to sign.
        document: PathBuf,
    },
    /// Verify an image and add it to a channel of a repository (new signed channel index).
    Publish(PublishArgs),
    /// Verify a whole repository offline: every channel index, manifest and chunk.
    Verify {
        /// Repository root directory.
        #[arg(long)]
        repo: PathBuf,
        #[command(flatten)]
        trust: TrustArgs,
        /// File remembering the newest channel index accepted; an older one is refused, and
        /// after success the file is updated.
        #[arg(long)]
        state: Option<PathBuf>,
        /// Check as of this time (RFC 3339) instead of now.
        #[arg(long)]
        at: Option<jiff::Timestamp>,
        #[command(flatten)]
        threads: ThreadArgs,
    },
    /// Verify one image directory offline: manifest signatures and every chunk.
    VerifyImage {
        /// The image directory (manifest.json, manifest.json.sig, payload).
        dir: PathBuf,
        #[command(flatten)]
        trust: TrustArgs,
        #[command(flatten)]
        threads: ThreadArgs,
    },
    /// Show what is in a repository or an image directory (no verification).
    Show {
        /// A repository root or an image directory.
        path: PathBuf,
    },
}

#[derive(Debug, Args)]
pub(crate) struct BuildArgs {
    /// The raw filesystem image (erofs, squashfs, ext4...) that becomes the slot's content.
    pub(crate) fs_image: PathBuf,
    /// Output directory for manifest.json and payload (created; must not hold an image).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// OS version (semver, e.g. 4012.1.0).
    #[arg(long)]
    pub(crate) version: semver::Version,
    /// CPU architecture of the image.
    #[arg(long, default_value = std::env::consts::ARCH)]
    pub(crate) arch: String,
    /// Kernel command line of the image.
    #[arg(long, default_value = "")]
    pub(crate) cmdline: String,
    /// Average chunk size: a power of two from 16K to 16M (suffixes K, M); chunk boundaries are
    /// content-defined, chunks between a quarter and four times this.
    #[arg(long, default_value = "256K", value_parser = parse_size)]
    pub(crate) chunk_size: u32,
    /// zstd compression level, 1 to 22.
    #[arg(long, default_value_t = payload::DEFAULT_LEVEL)]
    pub(crate) level: i32,
    /// dm-verity salt in hex (default: derived from version and arch, for reproducible builds).
    #[arg(long)]
    pub(crate) salt: Option<String>,
    /// For an erofs image, chunks also start where its layout changes between metadata and
    /// file data, and metadata is cut into chunks of at most this many 4 KiB blocks, so that a
    /// small change to the file tree costs small chunks; 0 turns this off.
    #[arg(long, default_value_t = 4)]
    pub(crate) erofs_metadata_chunk: u64,
    /// Manifest format: 1 (SHA-256 chunk digests; every agent and first stage reads it) or 2
    /// (BLAKE3 chunk digests: a quarter of SHA-256's CPU time in every node's install). Agents
    /// and first stages (`aclctl first-stage install`) from before format 2 refuse it, and a
    /// first stage gives up a slot it cannot read: use 2 only once the whole fleet runs both
    /// from this release or later.
    #[arg(long, default_value_t = manifest::MANIFEST_FORMAT, value_parser = clap::value_parser!(u32).range(1..=2))]
    pub(crate) manifest_format: u32,
    #[command(flatten)]
    pub(crate) threads: ThreadArgs,
}

#[derive(Debug, Args)]
pub(crate) struct PublishArgs {
    /// The built and signed image directory.
    pub(crate) image: PathBuf,
    /// Repository root directory (created if missing).
    #[arg(long)]
    pub(crate) repo: PathBuf,
    /// Channel to publish into.
    #[arg(long)]
    pub(crate) channel: String,
    /// Secret key(s) to sign the new channel index with.
    #[arg(long = "key", required = true)]
    pub(crate) keys: Vec<PathBuf>,
    #[command(flatten)]
    pub(crate) trust: TrustArgs,
    /// How long the new channel index stays valid (e.g. 30d, 12h).
    #[arg(long, default_value = "30d")]
    pub(crate) expires_in: jiff::Span,
    /// A rollout wave, START=PERCENT, START as RFC 3339 or +SPAN from now (e.g. +0h=10,
    /// +24h=50, +48h=100). Default: 100% now.
    #[arg(long = "wave")]
    pub(crate) waves: Vec<String>,
    #[command(flatten)]
    pub(crate) threads: ThreadArgs,
}

#[derive(Debug, Args)]
pub(crate) struct TrustArgs {
    /// Trusted public key file or directory of *.pub files; repeatable.
    #[arg(long = "trust", required = true)]
    pub(crate) trust: Vec<PathBuf>,
    /// How many distinct trusted keys must have signed each document.
    #[arg(long, default_value_t = 1)]
    pub(crate) threshold: usize,
}

#[derive(Debug, Args)]
pub(crate) struct ThreadArgs {
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
}

impl ThreadArgs {
    pub(crate) fn get(&self) -> usize {
        self.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

fn parse_size(s: &str) -> Result<u32, String> {
    let (num, mult) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size like 1M or 262144"))?;
    u32::try_from(n * mult).map_err(|_| format!("{s} is too large"))
}
