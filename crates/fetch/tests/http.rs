//! The fetch policy against a scripted HTTP server that misbehaves on purpose: each failure
//! mode must end in an error naming the URL and the problem, or in a retry that succeeds.

use fetch::{FetchError, FetchOptions, Fetcher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// What the server does with request number `n` (from 0) for a range `start..=end`.
#[derive(Clone, Copy, Debug)]
enum Reply {
    Ok,
    Status(u16),
    Reset,
    Stall,
    Truncate,
    WrongLength,
    IgnoreRange,
    /// One byte every 100 ms: never a stall.
    Dribble,
    /// 302 to another path on the same server.
    Redirect,
}

const DATA: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// Serves DATA at /f, replying to request n with script[min(n, len-1)]. Returns the base URL
/// and the request counter.
async fn server(script: Vec<Reply>) -> (String, Arc<AtomicUsize>) {
    let (url, count, _) = recording_server(script).await;
    (url, count)
}

/// [`server`], also returning the ranges asked for, in order.
async fn recording_server(script: Vec<Reply>) -> (String, Arc<AtomicUsize>, Arc<Mutex<Vec<(usize, usize)>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let asked = Arc::new(Mutex::new(Vec::new()));
    let (c, a) = (Arc::clone(&count), Arc::clone(&asked));
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let script = script.clone();
            let (c, a) = (Arc::clone(&c), Arc::clone(&a));
            tokio::spawn(async move {
                loop {
                    let Some(text) = read_head(&mut sock).await else { return };
                    let (s, e) = text
                        .lines()
                        .find_map(|l| l.strip_prefix("range: bytes="))
                        .and_then(|r| r.trim().split_once('-'))
                        .map(|(s, e)| (s.parse::<usize>().unwrap(), e.parse::<usize>().unwrap()))
                        .unwrap_or((0, DATA.len() - 1));
                    a.lock().unwrap().push((s, e));
                    let n = c.fetch_add(1, Ordering::SeqCst);
                    let reply = script[n.min(script.len() - 1)];
                    let body = &DATA[s..=e];
                    let head = |status: &str, len: usize| {
                        format!(
                            "HTTP/1.1 {status}\r\ncontent-length: {len}\r\ncontent-range: bytes {s}-{e}/{}\r\n\r\n",
                            DATA.len()
                        )
                    };
                    match reply {
                        Reply::Ok => {
                            let _ = sock.write_all(head("206 Partial Content", body.len()).as_bytes()).await;
                            let _ = sock.write_all(body).await;
                        }
                        Reply::IgnoreRange => {
                            let h = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", DATA.len());
                            let _ = sock.write_all(h.as_bytes()).await;
                            let _ = sock.write_all(DATA).await;
                        }
                        Reply::Status(code) => {
                            let h = format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\n\r\n");
                            let _ = sock.write_all(h.as_bytes()).await;
                        }
                        Reply::Reset => {
                            // Linger 0 makes the close send a TCP RST (and cannot block).
                            #[allow(deprecated)]
                            let _ = sock.set_linger(Some(Duration::ZERO));
                            return;
                        }
                        Reply::Stall => {
                            let _ = sock.write_all(head("206 Partial Content", body.len()).as_bytes()).await;
                            let _ = sock.write_all(&body[..body.len() / 2]).await;
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                        }
                        Reply::Truncate => {
                            let _ = sock.write_all(head("206 Partial Content", body.len()).as_bytes()).await;
                            let _ = sock.write_all(&body[..body.len() / 2]).await;
                            return;
                        }
                        Reply::Redirect => {
                            let h = "HTTP/1.1 302 Found\r\nlocation: /mirror/f\r\ncontent-length: 0\r\n\r\n";
                            let _ = sock.write_all(h.as_bytes()).await;
                        }
                        Reply::Dribble => {
                            let _ = sock.write_all(head("206 Partial Content", body.len()).as_bytes()).await;
                            for b in body {
                                if sock.write_all(std::slice::from_ref(b)).await.is_err() {
                                    return;
                                }
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                        Reply::WrongLength => {
                            let _ =
                                sock.write_all(head("206 Partial Content", body.len() - 3).as_bytes()).await;
                            let _ = sock.write_all(&body[..body.len() - 3]).await;
                        }
                    }
                }
            });
        }
    });
    (format!("http://{addr}"), count, asked)
}

/// Reads one request's head, lower-cased; `None` when the client closed.
async fn read_head(sock: &mut tokio::net::TcpStream) -> Option<String> {
    let mut req = Vec::new();
    let mut b = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut b).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => req.extend_from_slice(&b[..n]),
        }
    }
    Some(String::from_utf8_lossy(&req).to_lowercase())
}

fn fast() -> FetchOptions {
    FetchOptions {
        attempts: 3,
        stall_timeout: Duration::from_millis(300),
        first_backoff: Duration::from_millis(10),
        ..FetchOptions::default()
    }
}

async fn range(script: Vec<Reply>) -> (Result<bytes::Bytes, FetchError>, usize) {
    let (url, count) = server(script).await;
    let f = Fetcher::new(&url, fast()).unwrap();
    let r = f.get_range("f", 10..20).await;
    (r, count.load(Ordering::SeqCst))
}

#[tokio::test]
async fn a_good_range() {
    let (r, n) = range(vec![Reply::Ok]).await;
    assert_eq!(&r.unwrap()[..], &DATA[10..20]);
    assert_eq!(n, 1);
}

#[tokio::test]
async fn not_found_is_not_retried() {
    let (r, n) = range(vec![Reply::Status(404)]).await;
    let e = r.unwrap_err().to_string();
    assert!(e.contains("/f: HTTP 404 (not retried)"), "{e}");
    assert_eq!(n, 1);
}

#[tokio::test]
async fn server_errors_are_retried_then_reported() {
    let (r, n) = range(vec![Reply::Status(500), Reply::Ok]).await;
    assert_eq!(&r.unwrap()[..], &DATA[10..20]);
    assert_eq!(n, 2);
    let (r, n) = range(vec![Reply::Status(503)]).await;
    let e = r.unwrap_err().to_string();
    assert!(e.contains("HTTP 503 (gave up after 3 attempts)"), "{e}");
    assert_eq!(n, 3);
}

#[tokio::test]
async fn reset_stall_truncation_and_wrong_length_are_named() {
    for (reply, expect) in
        [(Reply::Reset, "gave up after 3 attempts"), (Reply::WrongLength, "Content-Length 7, expected 10")]
    {
        let (r, n) = range(vec![reply]).await;
        let e = r.unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(expect) && e.url().ends_with("/f"), "{reply:?}: {msg}");
        assert_eq!(n, 3, "{reply:?} must be retried");
    }
    // Each attempt of these delivers half of what is left, then one byte is left and they
    // deliver nothing: 3 attempts in a row without progress.
    for (reply, expect) in [
        (Reply::Stall, "stalled: no data for 0.3 s at byte 19 of the range 10..20"),
        (Reply::Truncate, "end of file before message length reached at byte 19 of the range 10..20"),
    ] {
        let (r, n) = range(vec![reply]).await;
        let e = r.unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(expect) && msg.contains("gave up after 3 attempts"), "{reply:?}: {msg}");
        // 10 -> 5 -> 3 -> 2 -> 1 left: four attempts that bring something (the failure of
        // the fourth is the first in a row), then two that bring nothing.
        assert_eq!(n, 4 + 2, "{reply:?}");
    }
    // A flaky connection that recovers.
    let (r, _) = range(vec![Reply::Reset, Reply::Truncate, Reply::Ok]).await;
    assert_eq!(&r.unwrap()[..], &DATA[10..20]);
}

/// Issue 12: a range cut part-way was asked for again from its start, so a server that
/// resets every few MiB made no progress. The next attempt asks only for what is missing,
/// and the bytes already received are kept.
#[tokio::test]
async fn an_interrupted_range_resumes_from_the_first_missing_byte() {
    for cut in [Reply::Truncate, Reply::Stall] {
        let (url, count, asked) = recording_server(vec![cut, cut, Reply::Ok]).await;
        let f = Fetcher::new(&url, fast()).unwrap();
        let r = f.get_range("f", 10..30).await.unwrap();
        assert_eq!(&r[..], &DATA[10..30], "{cut:?}");
        assert_eq!(count.load(Ordering::SeqCst), 3);
        // 20 bytes asked, 10 came; then 10 asked, 5 came; then the last 5.
        assert_eq!(*asked.lock().unwrap(), vec![(10, 29), (20, 29), (25, 29)], "{cut:?}");
        assert_eq!(f.bytes_fetched(), 20, "{cut:?}: no byte fetched twice");
    }
    // Streamed: the bytes come out in order as they arrive, across the cut.
    let (url, _, _) = recording_server(vec![Reply::Truncate, Reply::Ok]).await;
    let f = Fetcher::new(&url, fast()).unwrap();
    let mut s = f.range_stream("f", 0..16);
    let mut got = Vec::new();
    while let Some(b) = s.next().await.unwrap() {
        got.extend_from_slice(&b);
        assert_eq!(s.position(), got.len() as u64);
    }
    assert_eq!(got, &DATA[..16]);
}

/// Issue 13: a server sending a byte every 20 s never hit the 30 s stall timeout, and an
/// update ran on for ever. Each attempt must now bring `min_rate` bytes/s over a window; a
/// dribbling server fails every attempt and is given up.
#[tokio::test]
async fn a_dribbling_server_is_given_up() {
    let (url, count) = server(vec![Reply::Dribble]).await;
    let opts = FetchOptions { min_rate: 100, rate_window: Duration::from_millis(350), ..fast() };
    let f = Fetcher::new(&url, opts).unwrap();
    let started = std::time::Instant::now();
    let e = f.get_range("f", 0..60).await.unwrap_err().to_string();
    assert!(e.contains("too slow") && e.contains("bytes/s required") && e.contains("gave up after 3"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert_eq!(count.load(Ordering::SeqCst), 3);
    // What each slow attempt brought was kept: the next asked for the rest.
    assert!(f.bytes_fetched() >= 9, "{}", f.bytes_fetched());
    // Fast enough passes, however long it takes.
    let (url, _) = server(vec![Reply::Dribble]).await;
    let opts = FetchOptions { min_rate: 5, rate_window: Duration::from_millis(350), ..fast() };
    let f = Fetcher::new(&url, opts).unwrap();
    assert_eq!(&f.get_range("f", 0..12).await.unwrap()[..], &DATA[..12]);
}

/// Issue 13: a FIFO named index.json in a directory repository hung the reader for good
/// (opening a FIFO waits for a writer). It is now refused at once, like a device or a
/// directory.
#[tokio::test]
async fn a_fifo_is_not_a_repository_file() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("index.json");
    let status = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let f = Fetcher::new(&format!("file://{}", dir.path().display()), fast()).unwrap();
    for r in [f.get("index.json").await, f.get_range("index.json", 0..4).await, f.get("sub").await] {
        let e = r.unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }
}

/// Issue 13: any redirect was refused, although mirrors and CDNs redirect. Redirects are now
/// followed, five hops at most.
#[tokio::test]
async fn redirects_are_followed_a_few_times() {
    let (url, count, asked) = recording_server(vec![Reply::Redirect, Reply::Redirect, Reply::Ok]).await;
    let f = Fetcher::new(&url, fast()).unwrap();
    assert_eq!(&f.get_range("f", 10..20).await.unwrap()[..], &DATA[10..20]);
    assert_eq!(count.load(Ordering::SeqCst), 3);
    assert_eq!(*asked.lock().unwrap(), vec![(10, 19); 3], "the range goes with every hop");
    let (r, _) = range(vec![Reply::Redirect]).await;
    let e = r.unwrap_err().to_string();
    assert!(e.contains("more than 5 redirects") && e.contains("/f"), "{e}");
}

/// A whole-file answer to a range request is a typed refusal (the installer then reads the
/// payload in one pass), unless the stream accepts whole files: then the bytes before the range
/// are read past, also after a cut (the next answer starts from the file's start again).
#[tokio::test]
async fn a_server_that_ignores_ranges() {
    let (r, n) = range(vec![Reply::IgnoreRange]).await;
    let e = r.unwrap_err();
    assert!(matches!(e, FetchError::RangeIgnored { .. }), "{e:?}");
    assert!(e.to_string().contains("ignored the Range header"), "{e}");
    assert_eq!(n, 1);

    // Whole files accepted; then a cut mid-body followed by whole files: the resumed attempt
    // skips to where the cut left off. The bytes read past are not counted as fetched.
    for (script, requests) in [(vec![Reply::IgnoreRange], 1), (vec![Reply::Truncate, Reply::IgnoreRange], 2)]
    {
        let (url, count) = server(script).await;
        let f = Fetcher::new(&url, fast()).unwrap();
        let mut s = f.range_stream("f", 10..40).whole_file_ok();
        let mut got = Vec::new();
        while let Some(b) = s.next().await.unwrap() {
            got.extend_from_slice(&b);
        }
        assert_eq!(got, &DATA[10..40]);
        assert_eq!(count.load(Ordering::SeqCst), requests);
        assert_eq!(f.bytes_fetched(), 30);
    }
}

#[tokio::test]
async fn file_repositories() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), DATA).unwrap();
    let f = Fetcher::new(&format!("file://{}", dir.path().display()), fast()).unwrap();
    assert_eq!(&f.get_range("f", 3..6).await.unwrap()[..], b"345");
    assert_eq!(&f.get("f").await.unwrap()[..], DATA);
    let e = f.get("missing").await.unwrap_err().to_string();
    assert!(e.ends_with("/missing: no such file"), "{e}");
    let e = f.get_range("f", 60..70).await.unwrap_err().to_string();
    assert!(e.contains("shorter than the range"), "{e}");
    let e = Fetcher::new("ftp://example.invalid", fast()).unwrap_err().to_string();
    assert!(e.contains("only http://, https:// and file://"), "{e}");
}

/// Issue 13: a password in a `--repo` URL was echoed in errors. Credentials now leave the URL:
/// they go as basic authentication to the repository's host, and errors name the URL without
/// them.
#[tokio::test]
async fn credentials_are_sent_but_never_shown() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let Some(text) = read_head(&mut sock).await else { return };
                let reply = if text.contains("authorization: basic bwu6cznjcmv0\r\n") {
                    "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
                } else {
                    "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n"
                };
                let _ = sock.write_all(reply.as_bytes()).await;
            });
        }
    });
    let f = Fetcher::new(&format!("http://me:s3cret@127.0.0.1:{port}/repo"), fast()).unwrap();
    let e = f.get("index.json").await.unwrap_err().to_string();
    // 404, not 401: the credentials were sent; and they are not in the message.
    assert!(e.contains("HTTP 404") && !e.contains("s3cret") && !e.contains("me:"), "{e}");
    assert_eq!(f.url("x"), format!("http://127.0.0.1:{port}/repo/x"));
}

/// Serves `body` for every request with `encoding` as its Content-Encoding (and a
/// Content-Range when asked for a range), recording each request's head.
async fn doc_server(body: Vec<u8>, encoding: &'static str) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let h = Arc::clone(&heads);
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let (body, h) = (body.clone(), Arc::clone(&h));
            tokio::spawn(async move {
                while let Some(text) = read_head(&mut sock).await {
                    let ranged = text.contains("\r\nrange: ");
                    h.lock().unwrap().push(text);
                    let (status, extra) = if ranged {
                        (
                            "206 Partial Content",
                            format!("content-range: bytes 0-{}/{}\r\n", body.len() - 1, body.len()),
                        )
                    } else {
                        ("200 OK", String::new())
                    };
                    let head = format!(
                        "HTTP/1.1 {status}\r\ncontent-encoding: {encoding}\r\n{extra}content-length: {}\r\n\r\n",
                        body.len()
                    );
                    let _ = sock.write_all(head.as_bytes()).await;
                    let _ = sock.write_all(&body).await;
                }
            });
        }
    });
    (format!("http://{addr}"), heads)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[tokio::test]
async fn documents_are_asked_for_gzip_and_decoded() {
    let doc = br#"{"sha256":"0123456789abcdef"}"#.repeat(200);
    let gz = gzip(&doc);
    let (url, heads) = doc_server(gz.clone(), "gzip").await;
    let f = Fetcher::new(&url, fast()).unwrap();
    assert_eq!(f.get("manifest.json").await.unwrap(), doc);
    assert_eq!(f.bytes_fetched(), gz.len() as u64, "the wire bytes are counted, not the decoded ones");
    assert!(heads.lock().unwrap()[0].contains("\r\naccept-encoding: gzip\r\n"));
}

#[tokio::test]
async fn a_small_gzip_answer_that_decodes_past_the_limit_is_refused() {
    let gz = gzip(&vec![0u8; 4 << 20]);
    assert!(gz.len() < 8 << 10);
    let (url, _) = doc_server(gz, "gzip").await;
    let f = Fetcher::new(&url, FetchOptions { max_document: 1 << 20, ..fast() }).unwrap();
    match f.get("manifest.json").await {
        Err(FetchError::TooLarge { limit, size, .. }) => assert!(limit == 1 << 20 && size > limit),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_gzip_answer_that_does_not_decode_is_retried_then_named() {
    let mut gz = gzip(&b"x".repeat(1000));
    let n = gz.len();
    gz[n - 6] ^= 0xff; // the CRC
    let (url, heads) = doc_server(gz, "gzip").await;
    let e = Fetcher::new(&url, fast()).unwrap().get("manifest.json").await.unwrap_err();
    assert!(matches!(e, FetchError::GaveUp { attempts: 3, .. }), "{e:?}");
    assert!(e.to_string().contains("does not decode"), "{e}");
    assert_eq!(heads.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn an_encoding_not_asked_for_is_refused() {
    // A document in an encoding this code does not decode.
    let (url, _) = doc_server(b"whatever".to_vec(), "br").await;
    let e = Fetcher::new(&url, fast()).unwrap().get("manifest.json").await.unwrap_err();
    assert!(matches!(&e, FetchError::Encoding { encoding, .. } if encoding == "br"), "{e:?}");
    assert!(e.to_string().contains("Content-Encoding \"br\""), "{e}");
    // A range is never asked for compressed, so a compressed answer to one is refused.
    let (url, heads) = doc_server(gzip(DATA), "gzip").await;
    let f = Fetcher::new(&url, fast()).unwrap();
    let e = f.get_range("payload", 0..10).await.unwrap_err();
    assert!(matches!(e, FetchError::Encoding { .. }), "{e:?}");
    assert!(!heads.lock().unwrap()[0].contains("accept-encoding"), "{:?}", heads.lock().unwrap()[0]);
}
