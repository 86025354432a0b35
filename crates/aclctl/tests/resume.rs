//! Issue 12, item 3, measured with the binary against a real HTTP server of our own that
//! counts every payload byte it sends: `aclctl update` killed with SIGKILL at each 10 % of the
//! download and run again, and a server that cuts every connection after each MiB it sends.
//! Bytes sent twice must stay within 2 % of the image per interruption (kill), and within
//! 2 % in all for a server that cuts every MiB (the fetcher resumes a cut range where it
//! stopped, in the same run).
//!
//! What a kill costs is what was received but not yet written: the requests' unread socket
//! buffers, partial frames, frames being decoded and the writer's queue, about 2 MiB whatever
//! the image size (every chunk written before the kill is found in place by the next run). So
//! the share depends on the image: 1.1 % of this 192 MiB image, 1.6 % of 128 MiB, 3 % of 64.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use testkit::{flatcar_image, run, tool};

/// Serves `root` over HTTP/1.1 with ranges and keep-alive, one thread per connection. Counts
/// payload body bytes written; with `cut_every`, closes the connection in the middle of a
/// body each time that count passes another multiple of it.
struct Server {
    url: String,
    sent: Arc<AtomicU64>,
}

fn serve(root: PathBuf, cut_every: Option<u64>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let sent = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&sent);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let (root, sent) = (root.clone(), Arc::clone(&counter));
            std::thread::spawn(move || {
                let _ = connection(conn, &root, &sent, cut_every);
            });
        }
    });
    Server { url, sent }
}

fn connection(conn: TcpStream, root: &Path, sent: &AtomicU64, cut_every: Option<u64>) -> std::io::Result<()> {
    // A small send buffer, so that a byte counted as sent has left the server (the kernel
    // would otherwise take up to 4 MiB per connection that the client may never read).
    socket2::SockRef::from(&conn).set_send_buffer_size(32 << 10)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            if line == "\r\n" {
                break;
            }
            head.push(line.trim_end().to_owned());
        }
        let path = head.first().and_then(|l| l.split(' ').nth(1)).unwrap_or("/").trim_start_matches('/');
        let Ok(mut file) = std::fs::File::open(root.join(path)) else {
            out.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")?;
            continue;
        };
        let len = file.metadata()?.len();
        let range =
            head.iter().find_map(|l| l.to_lowercase().strip_prefix("range: bytes=").map(str::to_owned));
        let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
            Some((s, e)) => (s.parse::<u64>().unwrap(), e.parse::<u64>().unwrap().min(len - 1) + 1),
            None => (0, len),
        };
        if range.is_some() {
            write!(
                out,
                "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {start}-{}/{len}\r\n\r\n",
                end - start,
                end - 1
            )?;
        } else {
            write!(out, "HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n")?;
        }
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(start))?;
        let payload = path.ends_with("/payload");
        let mut left = end - start;
        let mut buf = vec![0u8; 64 << 10];
        while left > 0 {
            let mut n = left.min(buf.len() as u64) as usize;
            let before = sent.load(Ordering::SeqCst);
            let mut cut = false;
            if let (true, Some(every)) = (payload, cut_every) {
                let boundary = (before / every + 1) * every;
                if before + n as u64 >= boundary {
                    n = (boundary - before) as usize;
                    cut = true;
                }
            }
            file.read_exact(&mut buf[..n])?;
            out.write_all(&buf[..n])?;
            if payload {
                sent.fetch_add(n as u64, Ordering::SeqCst);
            }
            left -= n as u64;
            if cut && left > 0 {
                return Ok(()); // closed in the middle of the body
            }
        }
    }
}

/// A 192 MiB image that compresses about as well as an OS image (text, zeros, noise),
/// published as 2.0.0 into `dir/repo` with its key in `dir/keys`. Returns (payload size,
/// image size, image SHA-256).
fn repository(dir: &Path) -> (u64, u64, manifest::Sha256Digest) {
    let key = signing::SecretKey::from_seed([6; 32]);
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    key.public().write_new(&dir.join("keys/k.pub")).unwrap();
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
    let fs = dir.join("fs.img");
    std::fs::write(&fs, &v).unwrap();
    let opts = payload::BuildOptions {
        version: "2.0.0".parse().unwrap(),
        arch: std::env::consts::ARCH.into(),
        kernel_cmdline: String::new(),
        chunk_size: 256 << 10,
        level: 3,
        threads: 2,
        salt: None,
    };
    payload::build(&fs, &dir.join("build"), &opts, &|_| {}).unwrap();
    repo::local::sign_document(&dir.join("build/manifest.json"), std::slice::from_ref(&key)).unwrap();
    let policy = repo::TrustPolicy::new(signing::TrustedKeys::new([key.public()]).unwrap(), 1).unwrap();
    let req = repo::local::PublishRequest {
        repo: &dir.join("repo"),
        image_dir: &dir.join("build"),
        channel: "stable",
        expires_in: jiff::SignedDuration::from_hours(24),
        waves: vec![],
        now: jiff::Timestamp::now(),
        threads: 2,
    };
    repo::local::publish(&req, std::slice::from_ref(&key), &policy, &|_, _| {}).unwrap();
    let m = manifest::Manifest::from_bytes(&std::fs::read(dir.join("build/manifest.json")).unwrap()).unwrap();
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
    let server = serve(dir.path().join("repo"), None);
    let mut kills = Vec::new();
    for step in 1..=9u64 {
        let at = payload * step / 10;
        if server.sent.load(Ordering::SeqCst) >= at {
            continue; // the previous run passed this mark before it was killed
        }
        let mut child = update(dir.path(), &server.url, &disk).spawn().unwrap();
        let started = Instant::now();
        while server.sent.load(Ordering::SeqCst) < at {
            assert!(child.try_wait().unwrap().is_none(), "the update ended before {step}0 %");
            assert!(started.elapsed() < Duration::from_secs(120), "no progress to {step}0 %");
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().unwrap();
        child.wait().unwrap();
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

    // 2. A server that cuts every connection after each MiB it sends: one run succeeds.
    let work = dir.path().join("cut");
    std::fs::create_dir_all(&work).unwrap();
    let disk = flatcar_image(&sgdisk, &work, 448, 208);
    std::fs::remove_dir_all(dir.path().join("state")).unwrap();
    let server = serve(dir.path().join("repo"), Some(1 << 20));
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
}
