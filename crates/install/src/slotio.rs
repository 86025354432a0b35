//! Reading and writing one slot of a disk: bounds-checked, with O_DIRECT where the target
//! supports it.
//!
//! O_DIRECT keeps a 1 GiB install from pushing the node's working set out of the page cache and
//! makes the read-back read the device, not the cache. It needs buffers, offsets and lengths
//! aligned to the logical block size; every chunk (256 KiB by default, the last one a multiple
//! of 4 KiB) and every slot offset is, and buffers come from [`AlignedBuf`]. Where the open
//! with O_DIRECT fails (tmpfs, some filesystems) we fall back to buffered I/O, and before the
//! read-back drop the slot's cached pages with `posix_fadvise(DONTNEED)` after an fdatasync.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::Path;

/// Alignment of every direct I/O buffer and transfer.
pub(crate) const ALIGN: usize = 4096;

/// A heap buffer whose contents start on a 4096-byte boundary (safe code: over-allocate
/// and start at the first aligned byte). Its length can change within its capacity, so that
/// buffers are reused for chunks of any size.
#[derive(Debug)]
pub struct AlignedBuf {
    v: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes (capacity `len`).
    pub fn zeroed(len: usize) -> Self {
        let v = vec![0u8; len + ALIGN];
        let off = v.as_ptr().align_offset(ALIGN);
        Self { v, off, len }
    }

    /// The most bytes it can hold.
    pub fn capacity(&self) -> usize {
        self.v.len() - ALIGN
    }

    /// Sets the length (contents up to it are whatever was there); at most the capacity.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity(), "AlignedBuf::set_len past capacity");
        self.len = len;
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.v[self.off..self.off + self.len]
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.v[self.off..self.off + self.len]
    }
}

/// Reusable buffers, for chunks and for the compressed frames they come from. Allocating and
/// freeing a quarter-megabyte buffer per chunk makes glibc's heap grow with the image (its mmap
/// threshold adapts upward and freed blocks stay in per-thread arenas), and with the threshold
/// fixed costs a mapping and its page faults per buffer; a pool keeps the number of buffers,
/// and so memory, fixed.
#[derive(Debug)]
pub(crate) struct BufPool {
    free: std::sync::Mutex<Vec<AlignedBuf>>,
    capacity: usize,
}

impl BufPool {
    /// A pool of buffers that hold `capacity` bytes each.
    pub(crate) fn new(capacity: usize) -> Self {
        Self { free: std::sync::Mutex::new(Vec::new()), capacity }
    }

    /// A buffer of `len` bytes (at most the pool's capacity).
    pub(crate) fn get(&self, len: usize) -> AlignedBuf {
        let reused = self.free.lock().ok().and_then(|mut f| f.pop());
        let mut b = reused.unwrap_or_else(|| AlignedBuf::zeroed(self.capacity));
        b.set_len(len);
        b
    }

    /// Returns a buffer for reuse.
    pub(crate) fn put(&self, b: AlignedBuf) {
        if b.capacity() != self.capacity {
            return;
        }
        if let Ok(mut f) = self.free.lock() {
            f.push(b);
        }
    }
}

/// One slot's byte range on a disk.
#[derive(Debug)]
pub(crate) struct SlotIo {
    file: File,
    direct: bool,
    base: u64,
    len: u64,
}

impl SlotIo {
    /// Opens the slot at `base..base + len` of `disk`.
    pub(crate) fn open(disk: &Path, base: u64, len: u64, writable: bool) -> io::Result<Self> {
        let direct = nix::fcntl::OFlag::O_DIRECT.bits();
        let open = |flags: i32| {
            std::fs::OpenOptions::new().read(true).write(writable).custom_flags(flags).open(disk)
        };
        let (file, direct) = match open(direct) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => (open(0)?, false),
            Err(e) => return Err(e),
        };
        Ok(Self { file, direct, base, len })
    }

    /// Whether I/O bypasses the page cache.
    pub(crate) fn is_direct(&self) -> bool {
        self.direct
    }

    fn check(&self, offset: u64, len: usize) -> io::Result<u64> {
        let end = offset.checked_add(len as u64).filter(|&e| e <= self.len);
        let at = end.and_then(|_| self.base.checked_add(offset));
        at.ok_or_else(|| {
            io::Error::other(format!(
                "refusing I/O of {len} bytes at slot byte {offset}, outside the slot's {} bytes",
                self.len
            ))
        })
    }

    /// Writes `data` at `offset` within the slot.
    pub(crate) fn write(&self, offset: u64, data: &AlignedBuf) -> io::Result<()> {
        let at = self.check(offset, data.len)?;
        self.file.write_all_at(data.as_slice(), at)
    }

    /// Fills `buf` (its whole length) from `offset` within the slot.
    pub(crate) fn read_into(&self, offset: u64, buf: &mut AlignedBuf) -> io::Result<()> {
        let at = self.check(offset, buf.as_slice().len())?;
        self.file.read_exact_at(buf.as_mut_slice(), at)
    }

    /// Makes every write durable (fdatasync).
    pub(crate) fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// After a sync, drops the slot's pages from the page cache so that reads come from the
    /// device (needed only without O_DIRECT).
    pub(crate) fn drop_cache(&self) -> io::Result<()> {
        if self.direct {
            return Ok(());
        }
        let (Ok(base), Ok(len)) = (i64::try_from(self.base), i64::try_from(self.len)) else {
            return Err(io::Error::other("slot extent past the largest file offset"));
        };
        nix::fcntl::posix_fadvise(&self.file, base, len, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED)
            .map_err(io::Error::from)
    }
}
