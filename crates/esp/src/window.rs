//! A byte range of a disk as a seekable file: the EFI system partition by its offset, so no
//! partition device is needed (and none is opened behind the disk's lock).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt as _;

/// What the file system is written through: bytes, and a barrier.
pub trait Storage: Read + Write + Seek {
    /// Makes everything written so far durable (fsync).
    fn sync(&mut self) -> io::Result<()>;

    /// Called before each use of the file system: a storage that bounds its reads starts a
    /// new allowance.
    fn new_budget(&mut self) {}
}

/// `len` bytes of `file` from `start`.
#[derive(Debug)]
pub struct Window {
    file: File,
    start: u64,
    len: u64,
    pos: u64,
    /// Bytes that may still be read in this use of the file system: a damaged FAT whose
    /// cluster chain loops would otherwise keep the FAT library reading for ever (with the
    /// disk's lock held).
    budget: u64,
}

impl Window {
    /// The range; nothing is read or written outside it.
    pub fn new(file: File, start: u64, len: u64) -> Self {
        let mut w = Self { file, start, len, pos: 0, budget: 0 };
        w.new_budget();
        w
    }
}

impl Read for Window {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.budget == 0 {
            return Err(io::Error::other(
                "read far more than the partition holds: a cluster chain of the FAT loops",
            ));
        }
        let left = self.len.saturating_sub(self.pos);
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut buf[..n], self.start + self.pos)?;
        self.pos += got as u64;
        // Each read costs at least a sector: a loop of small reads (directory entries) ends as
        // soon as one of large reads would.
        self.budget = self.budget.saturating_sub((got as u64).max(512));
        Ok(got)
    }
}

impl Write for Window {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let end = self.pos.checked_add(buf.len() as u64).filter(|&e| e <= self.len);
        if end.is_none() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "write past the end of the partition"));
        }
        let n = self.file.write_at(buf, self.start + self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Window {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let pos = pos.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek out of range"))?;
        self.pos = pos;
        Ok(pos)
    }
}

impl Storage for Window {
    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Four times the partition plus 64 MiB per use, each read counted as at least a sector:
    /// no use reads more than both sets and the FAT (the whole partition at most, in reads of
    /// a cluster or a FAT entry), so only a loop runs out.
    fn new_budget(&mut self) {
        self.budget = self.len.saturating_mul(4).saturating_add(64 << 20);
    }
}
