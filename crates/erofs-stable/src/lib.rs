//! Update-friendly erofs images: inode numbers that stay put when a file is added.
//!
//! Why: `mkfs.erofs` (erofs-utils 1.5, Debian's) numbers inodes in the order it creates them
//! and writes that number into every inode (`i_ino`). Adding one file renumbers every inode
//! created after it, and inodes sit all over an uncompressed image (each next to its file's
//! data). Measured on the node image (`cargo xtask bench delta`): a 33-byte configuration file
//! changed 529 blocks of 4 KiB, spread over 108 of the 764 update chunks, 360 of them by one
//! byte, the low byte of `i_ino`; the update fetched 11 MB of file-system chunks for it.
//!
//! The Linux kernel never reads `i_ino`: an inode's number (`st_ino`) is its nid, its position
//! in the metadata area, which does not move when unrelated files are added (checked on the
//! same images: `stat` on a mounted image gives the nid). The field is kept for 32-bit user
//! space tools. So [`stabilize`] sets every reachable inode's `i_ino` to its nid (the low 32
//! bits, as erofs-utils truncates), which is unique, what the kernel reports anyway, and
//! changes only where the layout itself changes.
//!
//! It walks the directory tree from the root with positioned reads and writes 4 bytes per
//! inode, so memory is one directory block plus the set of inodes seen. It handles what
//! uncompressed images hold (compact and extended inodes, plain and inline directories) and
//! refuses, naming it, what it does not know (compressed directories, 48-bit layouts, directory
//! blocks of another size); it never panics on a damaged image. The superblock's checksum
//! (CRC-32C of the superblock's block from byte 1024) also covers the inodes that share that
//! block, the root's among them, so it is checked before anything is written and computed again
//! after: the kernel refuses to mount an image whose checksum does not match.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;

const SUPERBLOCK_OFFSET: u64 = 1024;
const MAGIC: u32 = 0xE0F5_E1E2;
/// Incompatible features that change nothing this walk reads: compression, chunk-based files,
/// extra devices, tail packing, fragments (all about regular files' data).
const KNOWN_INCOMPAT: u32 = 0x7f;
const DIRENT_SIZE: usize = 12;
const S_IFMT: u16 = 0o170_000;
const S_IFDIR: u16 = 0o040_000;
const S_IFREG: u16 = 0o100_000;
const I_INO_OFFSET: u64 = 20;
/// `feature_compat`: the superblock carries a checksum.
const COMPAT_SB_CHKSUM: u32 = 1;

/// Why an image could not be stabilized.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the image failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being read or written.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// No erofs superblock.
    #[error("not an erofs image (no erofs superblock at byte 1024)")]
    NotErofs,
    /// A layout this walk does not handle.
    #[error("unsupported erofs image: {0}")]
    Unsupported(String),
    /// The image contradicts itself.
    #[error("damaged erofs image: {0}")]
    Damaged(String),
}

/// What [`stabilize`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Inodes reached from the root (each counted once, hard links too).
    pub inodes: u64,
    /// Inodes whose `i_ino` was rewritten.
    pub changed: u64,
}

struct Image<'a> {
    file: &'a File,
    len: u64,
    block: u64,
    meta: u64,
}

struct Inode {
    offset: u64,
    size: u64,
    mode: u16,
    layout: u16,
    /// Bytes of the inode itself plus its inline extended attributes.
    header: u64,
    raw_blkaddr: u64,
    ino: u32,
}

impl Image<'_> {
    fn read(&self, offset: u64, buf: &mut [u8], what: &str) -> Result<(), Error> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(Error::Damaged(format!(
                "{what} at byte {offset} lies past the image's end ({})",
                self.len
            )));
        }
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| Error::Io { what: format!("reading {what}"), source })
    }

    fn inode(&self, nid: u64) -> Result<Inode, Error> {
        let offset = nid
            .checked_mul(32)
            .and_then(|o| o.checked_add(self.meta))
            .ok_or_else(|| Error::Damaged(format!("inode {nid} lies outside any image")))?;
        let mut b = [0u8; 32];
        self.read(offset, &mut b, &format!("inode {nid}"))?;
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let format = u16_at(0);
        // Bit 0 the inode's form, bits 1-3 its data layout (0-4 exist); nothing else is
        // defined in the formats handled here. Anything else is not an inode: a damaged entry
        // pointing into file data, which must not be written.
        if format > 0xF || (format >> 1) & 7 > 4 {
            return Err(Error::Damaged(format!("inode {nid} has format bits {format:#x}")));
        }
        let extended = format & 1 == 1;
        let (base, size) = if extended {
            let mut e = [0u8; 8];
            self.read(offset + 8, &mut e, &format!("inode {nid}"))?;
            (64, u64::from_le_bytes(e))
        } else {
            (32, u64::from(u32_at(8)))
        };
        let icount = u64::from(u16_at(2));
        let xattrs = if icount == 0 { 0 } else { 12 + (icount - 1) * 4 };
        Ok(Inode {
            offset,
            size,
            mode: u16_at(4),
            layout: (format >> 1) & 7,
            header: base + xattrs,
            raw_blkaddr: u64::from(u32_at(16)),
            ino: u32_at(20),
        })
    }

    /// Calls `each` with every directory block of `dir` (the last one may be short).
    fn dir_blocks(
        &self,
        nid: u64,
        dir: &Inode,
        mut each: impl FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let full = dir.size / self.block;
        let tail = dir.size % self.block;
        let (full, tail_at) = match dir.layout {
            0 => (full + u64::from(tail != 0), None),
            2 => (full, (tail != 0).then_some(dir.offset + dir.header)),
            other => {
                return Err(Error::Unsupported(format!(
                    "directory inode {nid} has data layout {other} (only flat plain and flat inline directories are handled)"
                )));
            }
        };
        if dir.size > self.len {
            return Err(Error::Damaged(format!(
                "directory inode {nid} is {} bytes, more than the image",
                dir.size
            )));
        }
        let mut buf = vec![0u8; usize::try_from(self.block).unwrap_or(4096)];
        for i in 0..full {
            let len = if i + 1 == full && dir.layout == 0 && tail != 0 { tail } else { self.block };
            let at = (dir.raw_blkaddr + i)
                .checked_mul(self.block)
                .ok_or_else(|| Error::Damaged(format!("directory inode {nid}'s block address overflows")))?;
            let b = &mut buf[..len as usize];
            self.read(at, b, &format!("a block of directory inode {nid}"))?;
            each(b)?;
        }
        if let Some(at) = tail_at {
            let b = &mut buf[..tail as usize];
            self.read(at, b, &format!("the inline tail of directory inode {nid}"))?;
            each(b)?;
        }
        Ok(())
    }
}

/// The entries (nid, name) of one directory block.
fn dirents(nid: u64, block: &[u8], out: &mut Vec<(u64, Vec<u8>)>) -> Result<(), Error> {
    let damaged = |what: &str| Error::Damaged(format!("directory inode {nid}: {what}"));
    if block.len() < DIRENT_SIZE {
        return Err(damaged("a directory block shorter than one entry"));
    }
    let nameoff =
        |i: usize| usize::from(u16::from_le_bytes([block[i * DIRENT_SIZE + 8], block[i * DIRENT_SIZE + 9]]));
    let first = nameoff(0);
    if first < DIRENT_SIZE || !first.is_multiple_of(DIRENT_SIZE) || first > block.len() {
        return Err(damaged("a directory block whose first name offset is not after its entries"));
    }
    let count = first / DIRENT_SIZE;
    for i in 0..count {
        let at = i * DIRENT_SIZE;
        let mut n = [0u8; 8];
        n.copy_from_slice(&block[at..at + 8]);
        let start = nameoff(i);
        let end = if i + 1 < count { nameoff(i + 1) } else { block.len() };
        if start > end || end > block.len() {
            return Err(damaged("entry names out of order"));
        }
        let mut name = &block[start..end];
        if i + 1 == count {
            name = name.split(|&c| c == 0).next().unwrap_or_default();
        }
        out.push((u64::from_le_bytes(n), name.to_vec()));
    }
    Ok(())
}

/// An opened image: the superblock checked (and its checksum, when it has one).
struct Opened<'a> {
    image: Image<'a>,
    root: u64,
    checksummed: bool,
}

fn open(file: &File) -> Result<Opened<'_>, Error> {
    let len = file
        .metadata()
        .map_err(|source| Error::Io { what: "reading the image's size".into(), source })?
        .len();
    let mut sb = [0u8; 128];
    if len < SUPERBLOCK_OFFSET + 128 {
        return Err(Error::NotErofs);
    }
    file.read_exact_at(&mut sb, SUPERBLOCK_OFFSET)
        .map_err(|source| Error::Io { what: "reading the superblock".into(), source })?;
    let u32_at = |i: usize| u32::from_le_bytes([sb[i], sb[i + 1], sb[i + 2], sb[i + 3]]);
    if u32_at(0) != MAGIC {
        return Err(Error::NotErofs);
    }
    let blkszbits = sb[12];
    if !(9..=16).contains(&blkszbits) {
        return Err(Error::Damaged(format!("block size 2^{blkszbits}")));
    }
    let incompat = u32_at(80);
    if incompat & !KNOWN_INCOMPAT != 0 {
        return Err(Error::Unsupported(format!(
            "incompatible feature bits {:#x}",
            incompat & !KNOWN_INCOMPAT
        )));
    }
    if sb[90] != 0 {
        return Err(Error::Unsupported(format!("directory blocks of 2^{} file-system blocks", sb[90])));
    }
    let block = 1u64 << blkszbits;
    let checksummed = u32_at(8) & COMPAT_SB_CHKSUM != 0;
    if checksummed {
        if block <= SUPERBLOCK_OFFSET || len < block {
            return Err(Error::Unsupported(format!("a superblock checksum with {block}-byte blocks")));
        }
        let (stored, computed) = superblock_checksum(file, block)?;
        if stored != computed {
            return Err(Error::Damaged(format!(
                "superblock checksum {stored:#010x}, but its block sums to {computed:#010x}"
            )));
        }
    }
    let image = Image { file, len, block, meta: u64::from(u32_at(40)) * block };
    let root = u64::from(u16::from_le_bytes([sb[14], sb[15]]));
    Ok(Opened { image, root, checksummed })
}

/// Calls `each` once for every inode reachable from the root (hard links once).
fn walk(o: &Opened<'_>, mut each: impl FnMut(u64, &Inode) -> Result<(), Error>) -> Result<(), Error> {
    let mut seen = HashSet::from([o.root]);
    let mut todo = vec![o.root];
    let mut entries = Vec::new();
    while let Some(nid) = todo.pop() {
        let inode = o.image.inode(nid)?;
        each(nid, &inode)?;
        if inode.mode & S_IFMT != S_IFDIR {
            continue;
        }
        entries.clear();
        o.image.dir_blocks(nid, &inode, |b| dirents(nid, b, &mut entries))?;
        for (child, name) in entries.drain(..) {
            if name == b"." || name == b".." {
                continue;
            }
            if seen.insert(child) {
                todo.push(child);
            }
        }
    }
    Ok(())
}

/// Sets `i_ino` of every inode reachable from the root to its nid (see the module docs). The
/// file must be an erofs image with uncompressed directories, opened for reading and writing;
/// nothing is written before the superblock (and its checksum) is checked, and a damaged
/// directory stops the walk with an error (inodes already visited keep their new numbers, which
/// the kernel ignores anyway; the checksum is then not rewritten, so such an image will not
/// mount until `stabilize` succeeds).
pub fn stabilize(file: &File) -> Result<Stats, Error> {
    let o = open(file)?;
    let mut stats = Stats::default();
    walk(&o, |nid, inode| {
        stats.inodes += 1;
        let want = (nid & u64::from(u32::MAX)) as u32;
        if inode.ino != want {
            file.write_all_at(&want.to_le_bytes(), inode.offset + I_INO_OFFSET)
                .map_err(|source| Error::Io { what: format!("writing inode {nid}"), source })?;
            stats.changed += 1;
        }
        Ok(())
    })?;
    if o.checksummed && stats.changed > 0 {
        let (_, computed) = superblock_checksum(file, o.image.block)?;
        file.write_all_at(&computed.to_le_bytes(), SUPERBLOCK_OFFSET + 4)
            .map_err(|source| Error::Io { what: "writing the superblock checksum".into(), source })?;
    }
    Ok(stats)
}

/// Where regular files keep whole blocks of their data, as (first block, blocks), sorted by
/// first block, and the block size. Everything else in the image is metadata: the superblock,
/// inodes with the inline tails of files and directories, directory blocks. Files whose data is
/// not stored flat (compressed, chunk-based) are left out, so their blocks count as metadata.
pub fn file_extents(file: &File) -> Result<(Vec<(u64, u64)>, u64), Error> {
    let o = open(file)?;
    let block = o.image.block;
    let mut out = Vec::new();
    walk(&o, |_, inode| {
        if inode.mode & S_IFMT == S_IFREG {
            let blocks = match inode.layout {
                0 => inode.size.div_ceil(block),
                2 => inode.size / block,
                _ => 0,
            };
            if blocks > 0 {
                out.push((inode.raw_blkaddr, blocks));
            }
        }
        Ok(())
    })?;
    out.sort_unstable();
    out.dedup();
    Ok((out, block))
}

/// The stored superblock checksum and the one its block sums to: CRC-32C seeded with all ones
/// and not inverted at the end (the kernel's `crc32c(~0, ...)`), over the superblock's block
/// from byte 1024 with the checksum field taken as zero.
fn superblock_checksum(file: &File, block: u64) -> Result<(u32, u32), Error> {
    let mut b = vec![0u8; usize::try_from(block - SUPERBLOCK_OFFSET).unwrap_or(0)];
    file.read_exact_at(&mut b, SUPERBLOCK_OFFSET)
        .map_err(|source| Error::Io { what: "reading the superblock's block".into(), source })?;
    let stored = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    b[4..8].fill(0);
    // crc32c() inverts at both ends; the kernel's form inverts only at the start.
    Ok((stored, !crc32c::crc32c(&b)))
}

/// Blocks where an update chunk should start so that metadata changes stay small (see the
/// crate docs): the first block of every run of metadata and of every file's data, and every
/// `meta_group` blocks within a run of metadata. `extents` are [`file_extents`];
/// `blocks` is the image's length in blocks. Sorted, without block 0.
pub fn chunk_starts(extents: &[(u64, u64)], blocks: u64, meta_group: u64) -> Vec<u64> {
    let meta_group = meta_group.max(1);
    let mut out = Vec::new();
    let mut at = 0u64;
    let meta_run = |from: u64, to: u64, out: &mut Vec<u64>| {
        let mut b = from;
        while b < to {
            out.push(b);
            match b.checked_add(meta_group) {
                Some(n) => b = n,
                None => break,
            }
        }
    };
    for &(start, len) in extents {
        let start = start.min(blocks);
        let end = start.saturating_add(len).min(blocks);
        if start > at {
            meta_run(at, start, &mut out);
        }
        if end > at {
            out.push(start.max(at));
            at = end;
        }
    }
    meta_run(at, blocks, &mut out);
    out.sort_unstable();
    out.dedup();
    out.retain(|&b| b != 0 && b < blocks);
    out
}
