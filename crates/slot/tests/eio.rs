//! Issue 12: a table write that fails with an I/O error part-way said only "failed", although
//! in 60 of 320 injected errors the change had taken effect, and a retried `rollback` then
//! toggled back. Now the error reads the table again and says which: every single failing
//! read, write or sync during a transition, injected one at a time, ends in an error whose
//! words match what the disk holds afterwards.

use slot::choice::{self, Slot};
use slot::table::BlockDevice;
use slot::{Disk, DiskError, Slots, Tries};
use std::cell::Cell;
use std::path::Path;
use testkit::*;

/// An in-memory disk whose `fail_at`-th I/O call (reads, writes and syncs, counted from 0)
/// fails with EIO; a failed write has written its first half (a torn write).
struct Faulty {
    image: Vec<u8>,
    calls: Cell<u32>,
    fail_at: Cell<u32>,
}

impl Faulty {
    fn fails(&self) -> bool {
        let n = self.calls.get();
        self.calls.set(n + 1);
        n == self.fail_at.get()
    }
}

fn eio() -> std::io::Error {
    std::io::Error::from_raw_os_error(5)
}

impl BlockDevice for Faulty {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.image.len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if self.fails() {
            return Err(eio());
        }
        buf.copy_from_slice(&self.image[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let at = offset as usize;
        if self.fails() {
            let half = buf.len() / 2 / 512 * 512;
            self.image[at..at + half].copy_from_slice(&buf[..half]);
            return Err(eio());
        }
        self.image[at..at + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn sync(&mut self) -> std::io::Result<()> {
        if self.fails() { Err(eio()) } else { Ok(()) }
    }
}

/// Runs transition `t` on `base` once per I/O call it makes, failing that call. Returns how
/// many failures left the change in effect and how many left the disk unchanged (a failure the
/// table survives, a bad read of one copy, ends in success and counts in neither).
fn check(base: &[u8], t: impl Fn(&Slots) -> Result<Slots, choice::TransitionError>) -> (u32, u32) {
    let path = Path::new("memory");
    let (mut took, mut unchanged) = (0, 0);
    let calls = {
        let dev = Faulty { image: base.to_vec(), calls: Cell::new(0), fail_at: Cell::new(u32::MAX) };
        let mut disk = Disk::from_device(dev, path).unwrap();
        disk.device().calls.set(0);
        disk.update(&t).unwrap();
        disk.device().calls.get()
    };
    for fail_at in 0..calls {
        let dev = Faulty { image: base.to_vec(), calls: Cell::new(0), fail_at: Cell::new(u32::MAX) };
        let mut disk = Disk::from_device(dev, path).unwrap();
        let old = disk.slots();
        let new = t(&old).unwrap();
        disk.device().calls.set(0);
        disk.device().fail_at.set(fail_at);
        let result = disk.update(&t);
        // What the disk really holds, read without faults.
        let after = Disk::from_device(
            Faulty { image: disk.device().image.clone(), calls: Cell::new(0), fail_at: Cell::new(u32::MAX) },
            path,
        )
        .unwrap_or_else(|e| panic!("call {fail_at}: the disk no longer opens: {e}"))
        .slots();
        let Err(e) = result else {
            assert_eq!(after, new, "call {fail_at}: succeeded but the disk holds other bits");
            continue;
        };
        let msg = e.to_string();
        assert!(msg.contains("Input/output error") || msg.contains("reads back"), "call {fail_at}: {msg}");
        match &e {
            DiskError::WriteFailed { .. } if msg.contains("the change took effect") => {
                assert_eq!(after, new, "call {fail_at}: {msg}");
                took += 1;
            }
            DiskError::WriteFailed { .. } => {
                assert!(msg.contains("nothing was changed"), "call {fail_at}: {msg}");
                assert_eq!(after, old, "call {fail_at}: {msg}");
                unchanged += 1;
            }
            // Failed while reading, before anything was written.
            _ => {
                assert_eq!(after, old, "call {fail_at}: {msg}");
                unchanged += 1;
            }
        }
    }
    (took, unchanged)
}

#[test]
fn an_io_error_says_whether_the_change_took_effect() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let dir = tempfile::tempdir().unwrap();
    let img = flatcar_image(&sgdisk, dir.path(), 32, 8);
    let base = std::fs::read(&img).unwrap();
    let (a, b) = check(&base, |s| choice::activate(s, Slot::A, Tries::new(2).unwrap()));
    // B activated, then rolled back to A: the command whose retry used to toggle.
    let mut staged = Disk::from_device(
        Faulty { image: base.clone(), calls: Cell::new(0), fail_at: Cell::new(u32::MAX) },
        Path::new("memory"),
    )
    .unwrap();
    staged.update(|s| choice::activate(s, Slot::A, Tries::new(2).unwrap())).unwrap();
    staged.update(|s| Ok(choice::boot_attempt(s).unwrap().1)).unwrap();
    staged.update(|s| choice::mark_good(s, Slot::B)).unwrap();
    let (c, d) = check(&staged.device().image, |s| choice::rollback(s, Slot::B));
    eprintln!("{} failures left the change in effect, {} left the disk unchanged", a + c, b + d);
    assert!(a + c > 0 && b + d > 0, "both outcomes must occur for the test to mean anything");
}
