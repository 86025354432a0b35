//! Issue 12, item 2: one writer per disk. A second process holds the disk's lock (this test
//! binary run again as a child, or util-linux `flock` for a program that is not ours) while the
//! test tries to write: it is refused at once naming the holder, or waits for a holder that left
//! no record, and a refused write changes nothing. A table changed by another tool between the
//! open and the write is read again under the lock, not overwritten from a stale copy.

use slot::choice::{self, Slot};
use slot::{Disk, DiskError};
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testkit::*;

const CHILD_ENV: &str = "ACL_TEST_LOCK_HOLDER_DISK";

/// Run by the child: opens the disk for writing, says "locked", and holds it until its
/// standard input closes.
#[test]
#[ignore = "run as a child process by the tests below"]
fn child_holds_the_lock() {
    let Some(disk) = std::env::var_os(CHILD_ENV) else { return };
    let d = Disk::open(Path::new(&disk), true).unwrap();
    assert!(d.is_locked());
    let mut out = std::io::stdout().lock();
    writeln!(out, "locked").unwrap();
    out.flush().unwrap();
    drop(out);
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

/// The child holding the lock, and its standard output (kept open until it exits).
struct Holder {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

/// Starts the child holding the lock on `disk` and waits until it holds it.
fn holder(disk: &Path) -> Holder {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_holds_the_lock", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, disk)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("locked") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the child exited without the lock");
    }
    Holder { child, out }
}

fn release(mut h: Holder) {
    drop(h.child.stdin.take());
    std::io::copy(&mut h.out, &mut std::io::sink()).unwrap();
    assert!(h.child.wait().unwrap().success());
}

#[test]
fn issue_12_a_second_writer_is_refused_at_once_naming_the_holder() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let dir = tempfile::tempdir().unwrap();
    let disk = flatcar_image(&sgdisk, dir.path(), 64, 16);
    let child = holder(&disk);
    let before = std::fs::read(&disk).unwrap();

    // The forced interleaving that corrupted tables: a second writer while the first holds the
    // table. It is refused at once, with the holder's pid and command, and writes nothing.
    let started = Instant::now();
    let e = Disk::open(&disk, true).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2), "refused at once, not after a wait");
    let DiskError::Busy { holder, .. } = &e else { panic!("expected busy, got {e}") };
    assert!(holder.starts_with(&format!("pid {} (", child.child.id())), "{holder}");
    assert!(holder.contains("child_holds_the_lock"), "the command line is named: {holder}");
    let msg = e.to_string();
    assert!(msg.contains("is changing this disk; nothing was changed"), "{msg}");
    // Readers are not blocked: status works while an install holds the lock.
    let reader = Disk::open(&disk, false).unwrap();
    assert!(!reader.is_locked());
    assert_eq!(reader.check_layout(), Ok(()));
    drop(reader);
    assert!(std::fs::read(&disk).unwrap() == before, "a refused writer changed the disk");

    // Once the holder is done, the next writer gets the lock and its record is gone with it.
    release(child);
    let mut d = Disk::open(&disk, true).unwrap();
    d.update(|s| choice::prepare(s, Slot::A)).unwrap();
    drop(d);
    assert_sgdisk_clean(&sgdisk, &disk);
    let left: Vec<_> = std::fs::read_dir(slot::lock::LOCK_DIR)
        .map(|r| r.flatten().map(|e| std::fs::read_to_string(e.path()).unwrap_or_default()).collect())
        .unwrap_or_default();
    assert!(
        !left.iter().any(|r: &String| r.contains(disk.to_str().unwrap())),
        "a holder record outlived its lock: {left:?}"
    );
}

#[test]
fn issue_12_a_lock_held_by_another_program_is_waited_for_then_refused_shared_longer() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let Some(flock) = tool("flock", "util-linux") else { return };
    let dir = tempfile::tempdir().unwrap();
    let disk = flatcar_image(&sgdisk, dir.path(), 64, 16);
    let hold_as = |mode: &str, secs: &str| {
        // A group of its own: killing it must also end the `sleep`, which holds the lock too.
        let child =
            Command::new(&flock).arg(mode).arg(&disk).args(["sleep", secs]).process_group(0).spawn().unwrap();
        // Until it holds the lock: a non-blocking flock of our own fails.
        let f = std::fs::File::open(&disk).unwrap();
        for _ in 0..200 {
            match nix::fcntl::Flock::lock(f.try_clone().unwrap(), nix::fcntl::FlockArg::LockExclusiveNonblock)
            {
                Ok(l) => drop(l),
                Err(_) => return child,
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("flock never took the lock");
    };
    let hold = |secs: &str| hold_as("--exclusive", secs);
    // Released within the wait (as udev's probe is): the writer waits and goes ahead.
    let mut short = hold("1.5");
    let started = Instant::now();
    let mut d = Disk::open(&disk, true).unwrap();
    assert!(started.elapsed() >= Duration::from_millis(800), "it waited: {:?}", started.elapsed());
    d.update(|s| choice::prepare(s, Slot::A)).unwrap();
    drop(d);
    short.wait().unwrap();
    // Held past the wait: refused, naming "another program", nothing written.
    let mut long = hold("30");
    let before = std::fs::read(&disk).unwrap();
    let started = Instant::now();
    let e = Disk::open(&disk, true).unwrap_err();
    assert!(started.elapsed() >= slot::lock::DEFAULT_WAIT, "{:?}", started.elapsed());
    assert!(e.to_string().contains("another program"), "{e}");
    assert!(std::fs::read(&disk).unwrap() == before);
    let group = nix::unistd::Pid::from_raw(i32::try_from(long.id()).unwrap());
    nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL).unwrap();
    long.wait().unwrap();
    // A shared lock (what udev holds while it probes the disk and its partitions, for seconds
    // on a loaded node) is waited for past the exclusive wait: the writer goes ahead.
    let mut probe = hold_as("--shared", &format!("{}", slot::lock::DEFAULT_WAIT.as_secs() + 3));
    let started = Instant::now();
    let mut d = Disk::open(&disk, true).unwrap();
    assert!(started.elapsed() > slot::lock::DEFAULT_WAIT, "it waited: {:?}", started.elapsed());
    d.update(|s| choice::prepare(s, Slot::A)).unwrap();
    drop(d);
    probe.wait().unwrap();
}

/// Issue 12, item 5: another tool (sgdisk, which takes no lock) changes a different entry
/// sector between our open and our write. The write reads the table again under the lock: the
/// other change is kept, and both copies stay valid.
#[test]
fn issue_12_a_change_made_after_the_open_is_kept() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let dir = tempfile::tempdir().unwrap();
    let disk = flatcar_image(&sgdisk, dir.path(), 64, 16);
    let mut d = Disk::open(&disk, true).unwrap();
    // Entry 6 (OEM) lies in the second entry sector; USR-A and USR-B in the first.
    run(&sgdisk, &["-A", "6:set:60", disk.to_str().unwrap()]);
    let after = d.update(|s| choice::prepare(s, Slot::A)).unwrap();
    drop(d);
    assert_sgdisk_clean(&sgdisk, &disk);
    assert_eq!(sgdisk_attributes(&sgdisk, &disk, 6), 1 << 60, "the other tool's change was lost");
    assert_eq!(sgdisk_attributes(&sgdisk, &disk, 4), after.b.0);
    assert!(Disk::open(&disk, false).unwrap().health().is_clean());
}
