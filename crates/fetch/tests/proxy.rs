//! Fetching through an HTTP CONNECT proxy: the tunnel is used unless NO_PROXY says otherwise,
//! and a proxy that refuses is named in the error.

use fetch::{FetchOptions, Fetcher, Proxy};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

async fn read_head(sock: &mut tokio::net::TcpStream) -> Option<String> {
    let mut req = Vec::new();
    let mut b = [0u8; 1];
    while !req.ends_with(b"\r\n\r\n") {
        match sock.read(&mut b).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => req.push(b[0]),
        }
    }
    Some(String::from_utf8_lossy(&req).into_owned())
}

/// An origin server answering every request with bytes 2..6 of "0123456789".
async fn origin() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                while read_head(&mut sock).await.is_some() {
                    let head = "HTTP/1.1 206 Partial Content\r\ncontent-length: 4\r\ncontent-range: bytes 2-5/10\r\n\r\n2345";
                    if sock.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// A CONNECT proxy; counts tunnels; answers 403 when `refuse`.
async fn proxy(refuse: bool) -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tunnels = Arc::new(AtomicUsize::new(0));
    let t = Arc::clone(&tunnels);
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let t = Arc::clone(&t);
            tokio::spawn(async move {
                let Some(head) = read_head(&mut sock).await else { return };
                let target =
                    head.strip_prefix("CONNECT ").and_then(|r| r.split_whitespace().next()).unwrap_or("");
                if refuse || target.is_empty() {
                    let _ = sock.write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n").await;
                    return;
                }
                let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await else { return };
                t.fetch_add(1, Ordering::SeqCst);
                let _ = sock.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await;
                let _ = tokio::io::copy_bidirectional(&mut sock, &mut upstream).await;
            });
        }
    });
    (port, tunnels)
}

fn opts(proxy: Proxy) -> FetchOptions {
    FetchOptions {
        attempts: 2,
        stall_timeout: Duration::from_secs(2),
        first_backoff: Duration::from_millis(10),
        proxy,
        ..FetchOptions::default()
    }
}

#[tokio::test]
async fn requests_go_through_the_tunnel() {
    let origin = origin().await;
    let (pport, tunnels) = proxy(false).await;
    let explicit = Proxy::Explicit { url: format!("http://127.0.0.1:{pport}"), no_proxy: String::new() };
    let f = Fetcher::new(&format!("http://127.0.0.1:{origin}/repo"), opts(explicit)).unwrap();
    assert!(f.proxy().is_some());
    assert_eq!(&f.get_range("f", 2..6).await.unwrap()[..], b"2345");
    assert_eq!(tunnels.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn no_proxy_and_off_go_direct() {
    let origin = origin().await;
    let (pport, tunnels) = proxy(false).await;
    let bypass = Proxy::Explicit { url: format!("http://127.0.0.1:{pport}"), no_proxy: "127.0.0.1".into() };
    for p in [bypass, Proxy::Off] {
        let f = Fetcher::new(&format!("http://127.0.0.1:{origin}/repo"), opts(p)).unwrap();
        assert!(f.proxy().is_none());
        assert_eq!(&f.get_range("f", 2..6).await.unwrap()[..], b"2345");
    }
    assert_eq!(tunnels.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_refusing_proxy_is_named() {
    let origin = origin().await;
    let (pport, _) = proxy(true).await;
    let explicit = Proxy::Explicit { url: format!("http://127.0.0.1:{pport}"), no_proxy: String::new() };
    let f = Fetcher::new(&format!("http://127.0.0.1:{origin}/repo"), opts(explicit)).unwrap();
    let e = f.get_range("f", 2..6).await.unwrap_err().to_string();
    assert!(e.contains(&format!("via proxy http://127.0.0.1:{pport}")), "{e}");
    eprintln!("{e}");
}
