//! The slot trailer: the image's signed manifest, stored at the end of the slot partition
//! it describes, so that the boot path can open a slot knowing nothing but the disk and the
//! trusted keys. The manifest carries the dm-verity root hash, the image size and the kernel
//! command line; its signature binds them, and the root hash binds every byte of the image (the
//! kernel and initramfs of the next stage included).
//!
//! Layout, at the end of the partition (all integers little-endian):
//!
//! ```text
//! ... image ... | free | manifest ‖ signature, zero-padded to 4 KiB | footer (4 KiB)
//! footer: "ACLTRLR1" | u32 version = 1 | u64 manifest_len | u64 signature_len
//!         | SHA-256(manifest ‖ signature) | zeros
//! ```
//!
//! The installer writes the trailer after the image has been read back and verified and
//! before the slot is activated, so an activated slot always has one; a torn trailer fails its
//! checksum and the boot path treats the slot as unbootable rather than guessing. The checksum
//! only detects damage: trust comes from verifying the signature, which the reader leaves to
//! its caller (the `signing` and `repo` crates).

use sha2::Digest as _;

/// The most manifest and signature bytes a trailer may hold: what a repository may serve as a
/// document (`fetch::FetchOptions::max_document`), so a hostile footer cannot make a reader
/// allocate more (issue 13: it could ask for 1 GiB).
pub const MAX_BYTES: u64 = 64 << 20;

/// The footer's size, and the alignment of everything.
pub const BLOCK: u64 = 4096;
const MAGIC: &[u8; 8] = b"ACLTRLR1";
const VERSION: u32 = 1;

/// A trailer that cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TrailerError {
    /// No footer magic: nothing was ever installed here (or it was wiped).
    #[error("no slot trailer (nothing installed, or the slot was wiped)")]
    Missing,
    /// A footer of a format this code does not know.
    #[error("slot trailer version {0} is not supported")]
    Version(u32),
    /// Lengths that do not fit the partition.
    #[error("slot trailer lengths ({manifest} + {signature} bytes) do not fit a {partition}-byte partition")]
    Lengths {
        /// Manifest length.
        manifest: u64,
        /// Signature length.
        signature: u64,
        /// Partition length.
        partition: u64,
    },
    /// The stored bytes do not match the footer's checksum (a torn or damaged write).
    #[error("slot trailer checksum mismatch (torn or damaged)")]
    Checksum,
    /// Reading failed.
    #[error("read slot trailer: {0}")]
    Io(String),
}

/// Bytes the trailer of this manifest and signature takes at the end of the partition.
pub fn size(manifest_len: usize, signature_len: usize) -> u64 {
    ((manifest_len + signature_len) as u64).div_ceil(BLOCK) * BLOCK + BLOCK
}

/// The trailer for a partition of `partition_len` bytes: its offset within the partition and
/// its bytes (a multiple of [`BLOCK`]).
pub fn encode(manifest: &[u8], signature: &[u8], partition_len: u64) -> (u64, Vec<u8>) {
    let total = size(manifest.len(), signature.len());
    let mut out = Vec::with_capacity(total as usize);
    out.extend_from_slice(manifest);
    out.extend_from_slice(signature);
    out.resize((total - BLOCK) as usize, 0);
    let mut footer = Vec::with_capacity(BLOCK as usize);
    footer.extend_from_slice(MAGIC);
    footer.extend_from_slice(&VERSION.to_le_bytes());
    footer.extend_from_slice(&(manifest.len() as u64).to_le_bytes());
    footer.extend_from_slice(&(signature.len() as u64).to_le_bytes());
    let mut h = sha2::Sha256::new();
    h.update(manifest);
    h.update(signature);
    footer.extend_from_slice(&h.finalize());
    footer.resize(BLOCK as usize, 0);
    out.extend_from_slice(&footer);
    (partition_len.saturating_sub(total), out)
}

/// Reads the trailer of a partition of `partition_len` bytes through `read_at(offset, buf)`
/// (offsets within the partition). Returns the manifest and signature bytes.
pub fn read(
    partition_len: u64,
    mut read_at: impl FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> Result<(Vec<u8>, Vec<u8>), TrailerError> {
    let io = |e: std::io::Error| TrailerError::Io(e.to_string());
    if partition_len < BLOCK {
        return Err(TrailerError::Missing);
    }
    let mut footer = vec![0u8; BLOCK as usize];
    read_at(partition_len - BLOCK, &mut footer).map_err(io)?;
    if &footer[..8] != MAGIC {
        return Err(TrailerError::Missing);
    }
    let u32_at = |o: usize| u32::from_le_bytes(footer[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(footer[o..o + 8].try_into().expect("8 bytes"));
    if u32_at(8) != VERSION {
        return Err(TrailerError::Version(u32_at(8)));
    }
    let (mlen, slen) = (u64_at(12), u64_at(20));
    let fits = mlen.checked_add(slen).is_some_and(|n| n <= MAX_BYTES && size(n as usize, 0) <= partition_len);
    if !fits {
        return Err(TrailerError::Lengths { manifest: mlen, signature: slen, partition: partition_len });
    }
    let total = size(mlen as usize, slen as usize);
    let mut data = vec![0u8; (mlen + slen) as usize];
    read_at(partition_len - total, &mut data).map_err(io)?;
    if sha2::Sha256::digest(&data).as_slice() != &footer[28..60] {
        return Err(TrailerError::Checksum);
    }
    let signature = data.split_off(mlen as usize);
    Ok((data, signature))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(part: &[u8]) -> impl FnMut(u64, &mut [u8]) -> std::io::Result<()> + '_ {
        move |o, buf| {
            let o = o as usize;
            buf.copy_from_slice(part.get(o..o + buf.len()).ok_or(std::io::ErrorKind::UnexpectedEof)?);
            Ok(())
        }
    }

    #[test]
    fn round_trip_at_the_end_of_the_partition() {
        let mut part = vec![0xeeu8; 64 << 10];
        let (at, bytes) = encode(b"{\"manifest\":1}", b"{\"signatures\":[]}", part.len() as u64);
        assert_eq!(at as usize + bytes.len(), part.len());
        assert_eq!(bytes.len() as u64, 2 * BLOCK);
        part[at as usize..].copy_from_slice(&bytes);
        let (m, s) = read(part.len() as u64, reader(&part)).unwrap();
        assert_eq!((m.as_slice(), s.as_slice()), (&b"{\"manifest\":1}"[..], &b"{\"signatures\":[]}"[..]));
    }

    #[test]
    fn missing_torn_and_nonsense_trailers_are_named() {
        let part = vec![0u8; 64 << 10];
        assert_eq!(read(part.len() as u64, reader(&part)), Err(TrailerError::Missing));
        // Every single flipped byte of the data area, and of the checksum, is caught.
        let (at, bytes) = encode(b"manifest", b"sig", part.len() as u64);
        for i in (0..11).chain(4096 + 28..4096 + 60) {
            let mut p = part.clone();
            p[at as usize..].copy_from_slice(&bytes);
            p[at as usize + i] ^= 1;
            assert_eq!(read(p.len() as u64, reader(&p)), Err(TrailerError::Checksum), "byte {i}");
        }
        // Lengths larger than the partition.
        let mut p = part.clone();
        p[at as usize..].copy_from_slice(&bytes);
        let footer = p.len() - BLOCK as usize;
        p[footer + 12..footer + 20].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(read(p.len() as u64, reader(&p)), Err(TrailerError::Lengths { .. })));
        p[footer + 8] = 9;
        assert_eq!(read(p.len() as u64, reader(&p)), Err(TrailerError::Version(9)));
    }
}
