//! Issue 12, item 3, measured with the binary against a real HTTP server of our own that
//! counts every payload byte it sends: `aclctl update` killed with SIGKILL at each 10 % of the
//! download and run again, and a server that cuts every connection after each MiB it sends.
//! Bytes sent twice must stay within 2 % of the image per interruption (kill), and within
//! 2 % in all for a server that cuts every MiB (the fetcher resumes a cut range where it
//! stopped, in the same run).
//!
//! What a kill costs is what was received but not yet written: the kernel's receive buffers
//! (capped at 256 KiB per connection), and the frames being read, decoded or queued for the
//! writer (a budget of 1 MiB of fetched bytes); every chunk written before the kill is found in
//! place by the next run. Measured: 0.7 MiB per kill quiet, 0.9 MiB with both cores loaded
//! (0.4 % of this 192 MiB image); without the budget and the cap, 2.5 MiB quiet and 4.3 MiB on
//! a loaded CI machine (2.2 %, over the limit).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use testkit::http::{Behaviour, serve};
use testkit::{flatcar_image, run, tool};

/// A 192 MiB image that compresses about as well as an OS image (text, zeros, noise),
/// published as 2.0.0 into `dir/repo` with its key in `dir/keys`. Returns (payload size,
/// image size, image SHA-256).
fn repository(dir: &Path) -> (u64, u64, manifest::Sha256Digest) {
    let size = 192usize << 20;
    let mut v = Vec::with_capacity(size);
    let mut x: u32 = 7;
    while v.len() < size {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        match (x >> 16) % 3 {
            0 => v.extend_from_slice(format!("file {} line {x}\n", v.len()).as_bytes()),
            1 => v.extend(std::iter::repeat_n(0u8, (x % 20000) as usize)),
            _ => {
                let mut r = u64::from(x) | 1;
                v.extend((0..x % 9000).map(|_| {
                    r ^= r << 13;
                    r ^= r >> 7;
                    r ^= r << 17;
                    r as u8
                }))
            }
        }
    }
    v.truncate(size);
    let m = common::publish(dir, &dir.join("repo"), "2.0.0", &v, 6);
    (m.payload.size, m.image_size, m.image_sha256)
}

fn update(dir: &Path, url: &str, disk: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_aclctl"));
    c.args(["update", "--repo", url, "--booted", "A", "--socket", "/nonexistent/agent.sock"])
        .arg("--trust")
        .arg(dir.join("keys"))
        .arg("--disk")
        .arg(disk)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn slot_b_digest(disk: &Path, len: u64) -> manifest::Sha256Digest {
    use std::os::unix::fs::FileExt as _;
    let (base, _) = slot::Disk::open(disk, false).unwrap().slot_extent(slot::choice::Slot::B).unwrap();
    let mut buf = vec![0u8; len as usize];
    std::fs::File::open(disk).unwrap().read_exact_at(&mut buf, base).unwrap();
    manifest::Sha256Digest::of(&buf)
}

#[test]
fn issue_12_killed_and_cut_downloads_fetch_little_twice() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let dir = tempfile::tempdir().unwrap();
    let (payload, image, sha) = repository(dir.path());
    let mib = |b: u64| b as f64 / 1048576.0;

    // 1. SIGKILL at every 10 % of the payload sent, then a run to the end.
    let work = dir.path().join("kill");
    std::fs::create_dir_all(&work).unwrap();
    let disk = flatcar_image(&sgdisk, &work, 448, 208);
    let server = serve(dir.path().join("repo"), Behaviour::default());
    let mut kills = Vec::new();
    for step in 1..=9u64 {
        let at = payload * step / 10;
        if server.sent.load(Ordering::SeqCst) >= at {
            continue; // the previous run passed this mark before it was killed
        }
        let mut child = update(dir.path(), &server.url, &disk).spawn().unwrap();
        // The server kills the child as its count passes the mark (a test thread polling the
        // count and then killing let up to 3.6 MiB more through on a loaded machine).
        server.kill_when_sent(child.id(), at);
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(started.elapsed() < Duration::from_secs(120), "no progress to {step}0 %");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "the update ended before {step}0 %: {status}"
        );
        kills.push(server.sent.load(Ordering::SeqCst));
    }
    let out = update(dir.path(), &server.url, &disk).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(slot_b_digest(&disk, image), sha);
    assert!(run(&sgdisk, &["-v", disk.to_str().unwrap()]).contains("No problems found"));
    let twice = server.sent.load(Ordering::SeqCst).saturating_sub(payload);
    let per_kill = twice as f64 / kills.len().max(1) as f64;
    eprintln!(
        "kill -9 at 10 % steps: {} kills; payload {:.1} MiB, image {:.1} MiB; sent twice {:.2} MiB in all, \
         {:.2} MiB per kill = {:.2} % of the image per kill",
        kills.len(),
        mib(payload),
        mib(image),
        mib(twice),
        mib(per_kill as u64),
        100.0 * per_kill / image as f64
    );
    assert!(kills.len() >= 5, "too few kills landed: {kills:?}");
    assert!(per_kill <= image as f64 * 0.02, "{:.2} MiB sent twice per kill", mib(per_kill as u64));
    // The budget and the receive-buffer cap hold it near 0.4 %; without them it was 1.3 % quiet
    // and 2.2 % loaded, so this catches their loss before the 2 % limit does.
    assert!(
        per_kill <= image as f64 * 0.01,
        "{:.2} MiB sent twice per kill: is the in-flight budget still bounding it?",
        mib(per_kill as u64)
    );

    // 2. A server that cuts every connection after each MiB it sends: one run succeeds.
    let work = dir.path().join("cut");
    std::fs::create_dir_all(&work).unwrap();
    let disk = flatcar_image(&sgdisk, &work, 448, 208);
    std::fs::remove_dir_all(dir.path().join("state")).unwrap();
    let server =
        serve(dir.path().join("repo"), Behaviour { cut_every: Some(1 << 20), ..Behaviour::default() });
    let out = update(dir.path(), &server.url, &disk).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(slot_b_digest(&disk, image), sha);
    let twice = server.sent.load(Ordering::SeqCst).saturating_sub(payload);
    eprintln!(
        "server cutting every 1 MiB: {} cuts; sent twice {:.2} MiB = {:.2} % of the image",
        payload >> 20,
        mib(twice),
        100.0 * twice as f64 / image as f64
    );
    assert!(twice as f64 <= image as f64 * 0.02, "{:.2} MiB sent twice", mib(twice));

    // 3. A server that ignores Range (answers every request with the whole file): the install
    //    reads the payload in one pass, verifying every chunk, and says so.
    let work = dir.path().join("norange");
    std::fs::create_dir_all(&work).unwrap();
    let disk = flatcar_image(&sgdisk, &work, 448, 208);
    std::fs::remove_dir_all(dir.path().join("state")).unwrap();
    let server = serve(dir.path().join("repo"), Behaviour { ignore_range: true, ..Behaviour::default() });
    let out = update(dir.path(), &server.url, &disk).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("ignores Range requests: the payload was read in one pass"), "{stdout}");
    assert_eq!(slot_b_digest(&disk, image), sha);
    let sent = server.sent.load(Ordering::SeqCst);
    eprintln!(
        "server ignoring Range: sent {:.2} MiB for a {:.2} MiB payload ({:.2}x)",
        mib(sent),
        mib(payload),
        sent as f64 / payload as f64
    );
    // One pass, plus what the refused first answers pushed before they were closed.
    assert!(sent >= payload && (sent as f64) < payload as f64 * 1.1, "{} MiB sent", mib(sent));
}
