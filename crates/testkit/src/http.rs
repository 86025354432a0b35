//! A small HTTP/1.1 file server for tests that need a misbehaving one: ranges, keep-alive, a
//! count of payload bytes sent, and optional cuts or stalls, or a SIGKILL sent to the client
//! the moment a given count is passed. Threads, no async runtime.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// How the server treats payloads (paths ending in `/payload`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Behaviour {
    /// Close the connection in the middle of a body each time the payload bytes sent pass
    /// another multiple of this.
    pub cut_every: Option<u64>,
    /// Never answer a payload request (hold the connection open).
    pub stall_payload: bool,
    /// Answer every request with the whole file (HTTP 200), whatever its Range header says.
    pub ignore_range: bool,
}

/// A running server (it runs until the process ends).
#[derive(Debug)]
pub struct Server {
    /// `http://127.0.0.1:port`.
    pub url: String,
    /// Payload body bytes written so far.
    pub sent: Arc<AtomicU64>,
    mark: Arc<Mark>,
}

/// A client process to kill with SIGKILL once the payload bytes sent reach a count.
#[derive(Debug, Default)]
struct Mark {
    at: AtomicU64,
    pid: AtomicU32,
}

impl Server {
    /// Kills process `pid` with SIGKILL from the server thread whose write takes the payload
    /// bytes sent to `at` or past it, before that thread writes again: the kill lands within
    /// one write (64 KiB) per connection of the mark, however busy the machine is, where a
    /// test that polls the count and then kills may let megabytes more through.
    pub fn kill_when_sent(&self, pid: u32, at: u64) {
        self.mark.pid.store(pid, Ordering::SeqCst);
        self.mark.at.store(at, Ordering::SeqCst);
    }
}

/// Serves the files under `root`, one thread per connection. A small send buffer makes a byte
/// counted as sent one that left the server (the kernel would otherwise take up to 4 MiB per
/// connection that the client may never read).
pub fn serve(root: PathBuf, behaviour: Behaviour) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a test server");
    let url = format!("http://{}", listener.local_addr().expect("local address"));
    let sent = Arc::new(AtomicU64::new(0));
    let mark = Arc::new(Mark { at: AtomicU64::new(u64::MAX), pid: AtomicU32::new(0) });
    let (counter, marked) = (Arc::clone(&sent), Arc::clone(&mark));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let (root, sent, mark) = (root.clone(), Arc::clone(&counter), Arc::clone(&marked));
            std::thread::spawn(move || {
                let _ = connection(conn, &root, &sent, &mark, behaviour);
            });
        }
    });
    Server { url, sent, mark }
}

fn connection(
    conn: TcpStream,
    root: &Path,
    sent: &AtomicU64,
    mark: &Mark,
    b: Behaviour,
) -> std::io::Result<()> {
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
        let payload = path.ends_with("/payload");
        if payload && b.stall_payload {
            std::thread::sleep(Duration::from_secs(3600));
            return Ok(());
        }
        let Ok(mut file) = std::fs::File::open(root.join(path)) else {
            out.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")?;
            continue;
        };
        let len = file.metadata()?.len();
        let range = head
            .iter()
            .find_map(|l| l.to_lowercase().strip_prefix("range: bytes=").map(str::to_owned))
            .filter(|_| !b.ignore_range);
        let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
            Some((s, e)) => {
                (s.parse::<u64>().unwrap_or(0), e.parse::<u64>().unwrap_or(0).min(len.saturating_sub(1)) + 1)
            }
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
        let mut left = end - start;
        let mut buf = vec![0u8; 64 << 10];
        while left > 0 {
            let mut n = left.min(buf.len() as u64) as usize;
            let before = sent.load(Ordering::SeqCst);
            let mut cut = false;
            if let (true, Some(every)) = (payload, b.cut_every) {
                let boundary = (before / every + 1) * every;
                if before + n as u64 >= boundary {
                    n = (boundary - before) as usize;
                    cut = true;
                }
            }
            file.read_exact(&mut buf[..n])?;
            out.write_all(&buf[..n])?;
            if payload {
                let before = sent.fetch_add(n as u64, Ordering::SeqCst);
                let at = mark.at.load(Ordering::SeqCst);
                if before < at && before + n as u64 >= at {
                    mark.at.store(u64::MAX, Ordering::SeqCst);
                    let pid = nix::unistd::Pid::from_raw(mark.pid.load(Ordering::SeqCst) as i32);
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                }
            }
            left -= n as u64;
            if cut && left > 0 {
                return Ok(()); // closed in the middle of the body
            }
        }
    }
}
