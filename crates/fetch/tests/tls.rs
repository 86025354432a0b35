//! HTTPS: a server whose certificate chains to a CA we are given is trusted; one for another
//! host name, or from a CA we do not trust, is refused at once (no retries) with the reason.

use fetch::{FetchOptions, Fetcher};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A CA (its PEM) and a server configuration for `names` that it signed.
struct Pki {
    ca_pem: String,
}

/// An HTTPS server on 127.0.0.1 with a certificate for `names`, answering every request with
/// a 206 of the bytes asked for from a fixed body.
async fn server(names: &[&str]) -> (Pki, u16) {
    let (ca_pem, config) = testkit::tls_server(names);
    serve(ca_pem, config, None).await
}

/// Serves with `config`; with `redirect`, every answer is a 302 to it.
async fn serve(ca_pem: String, config: rustls::ServerConfig, redirect: Option<String>) -> (Pki, u16) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else { return };
            let (acceptor, redirect) = (acceptor.clone(), redirect.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(sock).await else { return };
                let mut req = Vec::new();
                let mut b = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&b[..n]),
                    }
                }
                if let Some(to) = redirect {
                    let head = format!("HTTP/1.1 302 Found\r\nlocation: {to}\r\ncontent-length: 0\r\n\r\n");
                    let _ = tls.write_all(head.as_bytes()).await;
                    let _ = tls.shutdown().await;
                    return;
                }
                let body = b"0123456789";
                let head = "HTTP/1.1 206 Partial Content\r\ncontent-length: 4\r\ncontent-range: bytes 2-5/10\r\n\r\n";
                let _ = tls.write_all(head.as_bytes()).await;
                let _ = tls.write_all(&body[2..6]).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (Pki { ca_pem }, port)
}

fn opts(ca: Option<&std::path::Path>) -> FetchOptions {
    FetchOptions {
        attempts: 3,
        stall_timeout: Duration::from_secs(5),
        first_backoff: Duration::from_millis(10),
        ca_file: ca.map(|p| p.to_owned()),
        system_roots: true,
        ..FetchOptions::default()
    }
}

#[tokio::test]
async fn trusted_certificate_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let (pki, port) = server(&["localhost"]).await;
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let f = Fetcher::new(&format!("https://localhost:{port}/repo"), opts(Some(&ca))).unwrap();
    assert_eq!(&f.get_range("f", 2..6).await.unwrap()[..], b"2345");
}

#[tokio::test]
async fn certificate_for_another_name_is_refused_without_retries() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let (pki, port) = server(&["updates.example.com"]).await;
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let f = Fetcher::new(&format!("https://localhost:{port}/repo"), opts(Some(&ca))).unwrap();
    let e = f.get_range("f", 2..6).await.unwrap_err().to_string();
    assert!(e.contains("TLS: invalid peer certificate") && e.contains("not retried"), "{e}");
    assert!(e.contains("certificate is for updates.example.com, not for localhost"), "{e}");
    assert_eq!(f.requests(), 1);
}

#[tokio::test]
async fn untrusted_ca_is_refused() {
    let (_pki, port) = server(&["localhost"]).await;
    let f = Fetcher::new(&format!("https://localhost:{port}/repo"), opts(None)).unwrap();
    let e = f.get_range("f", 2..6).await.unwrap_err().to_string();
    assert!(e.contains("TLS: invalid peer certificate: UnknownIssuer"), "{e}");
}

#[tokio::test]
async fn a_bad_ca_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not a certificate").unwrap();
    let e = Fetcher::new("https://localhost/repo", opts(Some(&ca))).unwrap_err().to_string();
    assert!(e.contains("holds no certificate"), "{e}");
    let e = Fetcher::new("https://localhost/repo", opts(Some(&dir.path().join("missing.pem"))))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.pem"), "{e}");
}

/// A server with `config` (redirecting to `redirect`, if given) and a fetcher that trusts
/// `ca_pem` (kept in the returned directory).
async fn trusting(
    ca_pem: String,
    config: rustls::ServerConfig,
    redirect: Option<String>,
) -> (tempfile::TempDir, Fetcher) {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &ca_pem).unwrap();
    let (_pki, port) = serve(ca_pem, config, redirect).await;
    let f = Fetcher::new(&format!("https://localhost:{port}/repo"), opts(Some(&ca))).unwrap();
    (dir, f)
}

/// A self-signed certificate marked CA:TRUE, given as the trusted CA: refused, in words that say
/// what to do (rustls alone says `Other(OtherError(CaUsedAsEndEntity))`).
#[tokio::test]
async fn a_self_signed_ca_certificate_is_refused_in_words() {
    let (pem, config) = testkit::tls_server_self_signed(&["localhost"]);
    let (_dir, f) = trusting(pem, config, None).await;
    let e = f.get_range("f", 2..6).await.unwrap_err().to_string();
    assert!(e.contains("presents a CA certificate as its own") && e.contains("trust.ca-file"), "{e}");
    assert!(!e.contains("OtherError"), "{e}");
}

/// An https repository that redirects to http is refused: the transport's protection must not
/// be dropped by a redirect (the bytes are signed, but a downgrade would expose the credentials
/// and the node's requests).
#[tokio::test]
async fn a_redirect_from_https_to_http_is_refused() {
    let (ca_pem, config) = testkit::tls_server(&["localhost"]);
    let (_dir, f) = trusting(ca_pem, config, Some("http://127.0.0.1:9/repo/f".into())).await;
    let e = f.get_range("f", 2..6).await.unwrap_err().to_string();
    assert!(e.contains("redirected from https to http://127.0.0.1:9/repo/f: refused"), "{e}");
    assert_eq!(f.requests(), 1, "not retried");
}
