//! A small HTTP/1.1 file server for tests that need a misbehaving one: ranges, keep-alive, a
//! count of payload bytes sent, and optional cuts or stalls. Threads, no async runtime.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
}

/// Serves the files under `root`, one thread per connection. A small send buffer makes a byte
/// counted as sent one that left the server (the kernel would otherwise take up to 4 MiB per
/// connection that the client may never read).
pub fn serve(root: PathBuf, behaviour: Behaviour) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a test server");
    let url = format!("http://{}", listener.local_addr().expect("local address"));
    let sent = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&sent);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let (root, sent) = (root.clone(), Arc::clone(&counter));
            std::thread::spawn(move || {
                let _ = connection(conn, &root, &sent, behaviour);
            });
        }
    });
    Server { url, sent }
}

fn connection(conn: TcpStream, root: &Path, sent: &AtomicU64, b: Behaviour) -> std::io::Result<()> {
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
                sent.fetch_add(n as u64, Ordering::SeqCst);
            }
            left -= n as u64;
            if cut && left > 0 {
                return Ok(()); // closed in the middle of the body
            }
        }
    }
}
