//! One writer per disk: an exclusive lock held for a whole read-modify-write of the table, and
//! by the installer for a whole install.
//!
//! Without it, two writers interleave (issue 12): `mark-good` and `rollback` at once left both
//! table copies with a bad entry CRC; a `rollback` that read the table before an `update` began
//! wrote it back after, making the slot being overwritten the next boot; two updates wrote one
//! slot with mixed bytes and both succeeded.
//!
//! The lock is a BSD `flock(LOCK_EX)` on the disk itself (block device or image file), the
//! convention systemd documents for programs that change a disk's partition table
//! (<https://systemd.io/BLOCK_DEVICE_LOCKING/>): udev does not probe a disk while it is held,
//! and partitioning tools that follow the convention wait for it. [`crate::Disk::open`] with
//! `writable` takes it before reading the table, so every write (the agent, `aclctl` on the disk,
//! `aclctl provision`, `acl-boot`, the installer) works on a table no other writer of ours can
//! change until it is done; the lock goes with the `Disk` value.
//!
//! A flock does not say who holds it, so the holder also writes a record (its pid and command
//! line) into [`LOCK_DIR`], keyed by the device, and removes it on release. A second writer:
//!
//! - is refused at once, naming the holder, when the record names a live process (one of ours:
//!   an install may take minutes, and the user should hear why rather than wait blindly);
//! - waits when there is no live record, then is refused. How long depends on the kind of lock
//!   held. udev holds a *shared* lock on the whole disk while it probes the disk or any of its
//!   partitions, which it does after every close of the disk opened for writing: on a slow or
//!   loaded node that is seconds per partition (a CI run measured more than 5 s in qemu after a
//!   mark-good), and udev kills a worker only after its event timeout, 180 s by default. A
//!   shared-only holder is therefore waited for up to [`SHARED_WAIT`]. An *exclusive* holder
//!   without a record is a partitioning tool (or `udevadm lock`), waited for up to the given
//!   time ([`DEFAULT_WAIT`]). The kind is told by taking a shared lock through a second open
//!   file: it is granted only when no exclusive lock is held.
//!
//! Readers (`writable = false`) take no lock: a table read is a snapshot whose CRCs tell a torn
//! copy, and status must work while an install runs.

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where holders of a disk lock write who they are (`/run`: gone at reboot, like the locks).
pub const LOCK_DIR: &str = "/run/acl-update/locks";

/// How long a writer waits for an exclusive lock whose holder left no record (a partitioning
/// tool, `udevadm lock`).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(10);

/// How long a writer waits while only shared locks are held (udev probing the disk and its
/// partitions): udev's default event timeout, after which it kills the probing worker.
pub const SHARED_WAIT: Duration = Duration::from_secs(180);

/// After this long waiting, the writer says once what it waits for (see [`set_wait_notice`]).
const NOTICE_AFTER: Duration = Duration::from_secs(2);

static WAIT_NOTICE: std::sync::OnceLock<fn(&str)> = std::sync::OnceLock::new();

/// Sets how a writer that waits for the lock says so (once per wait, after 2 s): `aclctl`
/// prints to stderr, the agent logs. Without it, waits are silent. The first call wins.
pub fn set_wait_notice(notice: fn(&str)) {
    let _ = WAIT_NOTICE.set(notice);
}

/// An exclusive lock on a disk, released when dropped.
#[derive(Debug)]
pub struct DiskLock {
    _flock: Flock<File>,
    record: Option<PathBuf>,
}

/// The lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another writer holds it.
    #[error("{holder} is changing it")]
    Busy {
        /// Who, in words: "pid 1234 (aclctl rollback --disk /dev/vda)" or "another program".
        holder: String,
    },
    /// The lock call failed.
    #[error("locking: {0}")]
    Io(#[from] io::Error),
}

impl DiskLock {
    /// Takes the exclusive lock on `file` (the disk opened at `path`): at once, or after waiting
    /// for a holder that left no record: up to `wait` for an exclusive holder, up to
    /// [`SHARED_WAIT`] while only shared locks are held (see the module docs).
    pub fn acquire(file: &File, path: &Path, wait: Duration) -> Result<DiskLock, LockError> {
        let record = record_path(file);
        let started = Instant::now();
        // Each kind of holder is timed from when it was first seen as that kind, so that an
        // exclusive holder that follows a long udev probe still gets its own wait; the whole
        // wait is capped at the sum of both.
        let mut kind: Option<(bool, Instant)> = None;
        let mut noticed = false;
        loop {
            match Flock::lock(file.try_clone()?, FlockArg::LockExclusiveNonblock) {
                Ok(flock) => {
                    let record = record.and_then(|r| write_record(&r, path).then_some(r));
                    return Ok(DiskLock { _flock: flock, record });
                }
                Err((_, Errno::EWOULDBLOCK)) => {
                    if let Some(holder) = record.as_deref().and_then(live_holder) {
                        return Err(LockError::Busy { holder });
                    }
                    let shared = only_shared(path);
                    let since = match kind {
                        Some((k, t)) if k == shared => t,
                        _ => {
                            let now = Instant::now();
                            kind = Some((shared, now));
                            now
                        }
                    };
                    let elapsed = since.elapsed();
                    let limit = if shared { SHARED_WAIT.max(wait) } else { wait };
                    if elapsed >= limit || started.elapsed() >= SHARED_WAIT.max(wait) + wait {
                        let holder = if shared {
                            format!(
                                "another program holding a shared lock for more than {} s (no acl-update \
                                 process; udev probing the disk, or a reader that follows systemd's convention)",
                                elapsed.as_secs()
                            )
                        } else {
                            format!(
                                "another program holding an exclusive lock for more than {} s (no acl-update \
                                 process; a partitioning tool, or udevadm lock)",
                                elapsed.as_secs()
                            )
                        };
                        return Err(LockError::Busy { holder });
                    }
                    if !noticed && started.elapsed() >= NOTICE_AFTER {
                        noticed = true;
                        if let Some(notice) = WAIT_NOTICE.get() {
                            notice(&if shared {
                                format!(
                                    "{}: waiting for another program (udev probing the disk?) to release its \
                                     shared lock; up to {} s",
                                    path.display(),
                                    SHARED_WAIT.as_secs()
                                )
                            } else {
                                format!(
                                    "{}: waiting for another program (a partitioning tool?) to release its \
                                     exclusive lock; up to {} s",
                                    path.display(),
                                    wait.as_secs()
                                )
                            });
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err((_, e)) => return Err(LockError::Io(e.into())),
            }
        }
    }
}

impl Drop for DiskLock {
    fn drop(&mut self) {
        // Remove the record only while it is still ours; the flock goes with the file.
        if let Some(r) = &self.record
            && read_pid(r) == Some(std::process::id())
        {
            let _ = std::fs::remove_file(r);
        }
    }
}

/// The record file of the disk `file` is: keyed by the block device number, or by the image
/// file's filesystem and inode.
fn record_path(file: &File) -> Option<PathBuf> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let meta = file.metadata().ok()?;
    let key = if meta.file_type().is_block_device() {
        let rdev = meta.rdev();
        format!("block-{}-{}", nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev))
    } else {
        format!("file-{}-{}", meta.dev(), meta.ino())
    };
    Some(Path::new(LOCK_DIR).join(format!("{key}.holder")))
}

/// Writes "<pid> <command line>"; whether it worked (the record only informs).
fn write_record(record: &Path, disk: &Path) -> bool {
    let cmdline = std::fs::read("/proc/self/cmdline").unwrap_or_default();
    let mut command: String = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    command.truncate(300);
    let text = format!("{} {command}\n{}\n", std::process::id(), disk.display());
    let dir = Path::new(LOCK_DIR);
    let made = std::fs::create_dir_all(dir).and_then(|()| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
    });
    made.and_then(|()| std::fs::write(record, text)).is_ok()
}

fn read_pid(record: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(record).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Whether the locks held on the disk at `path` are all shared: a shared lock taken through a
/// second open file (a lock of its own) is granted only then. Opened read-only, so its close
/// starts no udev probe.
fn only_shared(path: &Path) -> bool {
    let Ok(f) = File::open(path) else { return false };
    Flock::lock(f, FlockArg::LockSharedNonblock).is_ok()
}

/// "pid N (command)" from a record whose process still runs.
fn live_holder(record: &Path) -> Option<String> {
    let text = std::fs::read_to_string(record).ok()?;
    let first = text.lines().next()?;
    let (pid, command) = first.split_once(' ').unwrap_or((first, ""));
    let pid: u32 = pid.parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then(|| format!("pid {pid} ({command})"))
}
