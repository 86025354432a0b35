//! The payload of an image: building it from a raw filesystem image, and checking it.
//!
//! [`build`] turns a filesystem image into a slot image (data padded to a whole block, then the
//! dm-verity tree), cuts it into content-defined chunks ([`chunker`]; chunks also start at the
//! blocks [`BuildOptions::chunk_starts`] names, where the file system's layout changes), compresses each chunk as
//! its own zstd frame on several threads, and writes the payload file and the (unsigned)
//! manifest. [`verify`] does the reverse
//! offline: every frame decodes to its digest, the chunks make up the image digest, and the tree
//! in the image is the tree of its data with the manifest's root hash. [`ChunkDecoder`] is the
//! one-chunk primitive that the installer will use before writing a chunk to a slot.
//!
//! Both directions run the same shape of pipeline (`pipeline::ordered`): one thread reads in
//! order, workers hash and (de)compress, the caller consumes results in order. At most a fixed
//! number of chunks are in flight, so memory does not grow with the image.

mod build;
pub mod chunker;
mod decode;
mod pipeline;
mod verify;

pub use build::{BuildError, BuildOptions, DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL, build, default_salt};
pub use decode::{ChunkDecoder, ChunkError};
pub use verify::{PayloadError, verify};

/// Name of the payload file next to the manifest.
pub const PAYLOAD_FILE: &str = "payload";
/// Name of the manifest file.
pub const MANIFEST_FILE: &str = "manifest.json";

#[cfg(test)]
mod tests;
