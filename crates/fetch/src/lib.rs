//! Fetching from a repository: whole small files (indexes, manifests, signatures) and byte
//! ranges of payloads, over HTTP or from a `file://` directory (air-gapped sites).
//!
//! Failure policy, in one place so every caller gets it:
//! - a stall (no byte for `stall_timeout`) fails the attempt, and so does a transfer slower
//!   than `min_rate` over a `rate_window` (a server that dribbles a byte every 20 s never
//!   stalls, issue 13); total time is not limited otherwise, so a slow but moving download is
//!   never cut;
//! - connection errors, stalls, 5xx answers and short bodies are retried, with exponential
//!   backoff, up to `attempts` times; 4xx answers are not (the file is not there);
//! - every error names the URL and what went wrong, and says how many attempts were made.
//!
//! Whole documents are asked for with `Accept-Encoding: gzip`, and a gzip answer is decoded
//! here, its decoded size held to `max_document` like a plain one: a manifest lists a digest
//! for every chunk, and over the wire its hex digits and field names compress to a third
//! (issue 16: the manifest was 0.34 MB of every update). A repository published by `aclpub`
//! holds `manifest.json.gz` beside each manifest, which nginx serves with `gzip_static on`.
//! Ranges of payloads are never asked for compressed (the frames are zstd already, and a
//! compressed answer to a range would not be the range); an encoding that was not asked for is
//! an error.
//!
//! HTTPS uses rustls (ring) with the system's trusted roots plus an optional CA file; a
//! certificate that does not verify is an error that is not retried.
//!
//! Proxies come from the usual environment variables (`HTTPS_PROXY`, `HTTP_PROXY`,
//! `ALL_PROXY`, `NO_PROXY`, upper or lower case) or from [`Proxy::Explicit`]. Requests go
//! through the proxy as an HTTP CONNECT tunnel, for http:// and https:// repositories alike, so
//! TLS stays end to end; the proxy must allow CONNECT to the repository's port.

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How hard to try.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Attempts per request, at least 1.
    pub attempts: u32,
    /// Give up an attempt when no byte arrives for this long.
    pub stall_timeout: Duration,
    /// Wait before the first retry; doubles for each further one.
    pub first_backoff: Duration,
    /// Fail an attempt that brings fewer than `min_rate` bytes per second, measured over each
    /// `rate_window` of it.
    pub min_rate: u64,
    /// See `min_rate`.
    pub rate_window: Duration,
    /// The largest whole file [`Fetcher::get`] accepts (documents are small; a bigger answer is
    /// an attack or a mistake).
    pub max_document: u64,
    /// A PEM file of CA certificates to trust for HTTPS, besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Whether to trust the system's CA certificates for HTTPS (on by default).
    pub system_roots: bool,
    /// Which proxy to use.
    pub proxy: Proxy,
    /// The receive buffer of each connection (`SO_RCVBUF`), or the kernel's autotuning when
    /// `None`. What the kernel has received and the installer not yet written is lost to a
    /// kill or a power cut and fetched again; autotuned, it grows to megabytes per connection
    /// (up to `net.ipv4.tcp_rmem`'s maximum, 32 MiB on Debian's kernels). The default, 256 KiB,
    /// holds a connection to 256 KiB per round trip: 100 MiB/s over four connections at 10 ms.
    pub receive_buffer: Option<usize>,
}

/// Where the proxy setting comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Proxy {
    /// The environment variables (the default).
    #[default]
    FromEnv,
    /// No proxy, whatever the environment says.
    Off,
    /// This proxy URL for every host not in the comma-separated `no_proxy` list.
    Explicit {
        /// `http://[user:pass@]host:port`.
        url: String,
        /// Hosts, domains or networks to reach directly.
        no_proxy: String,
    },
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            attempts: 5,
            stall_timeout: Duration::from_secs(30),
            first_backoff: Duration::from_millis(500),
            min_rate: 4 << 10,
            rate_window: Duration::from_secs(60),
            max_document: 64 << 20,
            ca_file: None,
            system_roots: true,
            proxy: Proxy::FromEnv,
            receive_buffer: Some(256 << 10),
        }
    }
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The repository URL is not one we can use.
    #[error("repository URL {url:?}: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The server says the file is not there (or refuses it): not retried.
    #[error("{url}: HTTP {status} (not retried)")]
    Rejected {
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
    },
    /// The file does not exist (file:// repository).
    #[error("{url}: no such file")]
    NotFound {
        /// The URL.
        url: String,
    },
    /// Retries are used up; the last attempt's error.
    #[error("{url}: {last} (gave up after {attempts} attempts)")]
    GaveUp {
        /// The URL.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// What the last attempt ran into.
        last: String,
    },
    /// The TLS connection failed (certificate not trusted or not for this host): not retried.
    #[error("{url}: TLS: {reason} (not retried)")]
    Tls {
        /// The URL.
        url: String,
        /// What rustls said.
        reason: String,
    },
    /// The server answered a range request with the whole file (HTTP 200 instead of 206). Not
    /// retried as such: a caller that can read the file in one pass asks again with
    /// [`RangeStream::whole_file_ok`].
    #[error("{url}: the server ignored the Range header (HTTP 200 instead of 206)")]
    RangeIgnored {
        /// The URL.
        url: String,
    },
    /// The server sent a content encoding that was not asked for (or that this code does not
    /// decode): not retried.
    #[error("{url}: the server sent Content-Encoding {encoding:?}, which was not asked for (not retried)")]
    Encoding {
        /// The URL.
        url: String,
        /// The encoding the server named.
        encoding: String,
    },
    /// A document larger than allowed.
    #[error("{url}: {size} bytes is more than the {limit} allowed for a document")]
    TooLarge {
        /// The URL.
        url: String,
        /// Size announced or received.
        size: u64,
        /// The limit.
        limit: u64,
    },
}

impl FetchError {
    /// The URL concerned.
    pub fn url(&self) -> &str {
        match self {
            FetchError::BadUrl { url, .. }
            | FetchError::Rejected { url, .. }
            | FetchError::NotFound { url }
            | FetchError::GaveUp { url, .. }
            | FetchError::Tls { url, .. }
            | FetchError::RangeIgnored { url }
            | FetchError::Encoding { url, .. }
            | FetchError::TooLarge { url, .. } => url,
        }
    }
}

type HttpConnector = hyper_util::client::legacy::connect::HttpConnector;
type Tunnel = hyper_util::client::legacy::connect::proxy::Tunnel<HttpConnector>;
type Client<C> =
    hyper_util::client::legacy::Client<hyper_rustls::HttpsConnector<C>, http_body_util::Empty<Bytes>>;

#[derive(Debug, Clone)]
enum Kind {
    File(PathBuf),
    Http { base: String, client: Client<HttpConnector> },
    Proxied { base: String, client: Box<Client<Tunnel>>, proxy: String },
}

/// A repository to fetch from; cheap to clone (clones share connections and counters).
#[derive(Debug, Clone)]
pub struct Fetcher {
    kind: Kind,
    opts: FetchOptions,
    /// `Authorization` for the repository's own host, from credentials in its URL.
    auth: Option<(String, hyper::header::HeaderValue)>,
    fetched: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
}

/// One attempt's failure: retry or not.
enum Attempt {
    Retry(String),
    Fatal(FetchError),
}

impl Fetcher {
    /// A fetcher for the repository at `url`: `http://host[:port]/path` or `file:///path`
    /// (a bare path is taken as a directory).
    ///
    /// Credentials in the URL (`https://user:password@host/`) are sent as HTTP basic
    /// authentication to that host only, and never appear in a URL this fetcher reports.
    pub fn new(url: &str, opts: FetchOptions) -> Result<Self, FetchError> {
        let (url, auth) = split_credentials(url);
        let url = url.as_str();
        let bad = |reason: &str| FetchError::BadUrl { url: url.to_owned(), reason: reason.to_owned() };
        if opts.attempts == 0 {
            return Err(bad("attempts must be at least 1"));
        }
        let kind = if let Some(path) = url.strip_prefix("file://") {
            Kind::File(PathBuf::from(path))
        } else if url.starts_with("http://") || url.starts_with("https://") {
            let uri = url.parse::<hyper::Uri>().map_err(|e| bad(&e.to_string()))?;
            let mut http = HttpConnector::new();
            http.set_nodelay(true);
            http.set_recv_buffer_size(opts.receive_buffer);
            http.set_connect_timeout(Some(opts.stall_timeout));
            http.enforce_http(false);
            let tls = tls_config(&opts).map_err(|reason| bad(&reason))?;
            let base = url.trim_end_matches('/').to_owned();
            let matcher = match &opts.proxy {
                Proxy::FromEnv => Some(hyper_util::client::proxy::matcher::Matcher::from_env()),
                Proxy::Off => None,
                Proxy::Explicit { url, no_proxy } => Some(
                    hyper_util::client::proxy::matcher::Matcher::builder()
                        .all(url.clone())
                        .no(no_proxy.clone())
                        .build(),
                ),
            };
            match matcher.and_then(|m| m.intercept(&uri)) {
                None => Kind::Http { base, client: client(http, tls) },
                Some(via) => {
                    let mut tunnel = Tunnel::new(via.uri().clone(), http);
                    if let Some(auth) = via.basic_auth() {
                        tunnel = tunnel.with_auth(auth.clone());
                    }
                    let proxy = format!("{}", via.uri());
                    Kind::Proxied { base, client: Box::new(client(tunnel, tls)), proxy }
                }
            }
        } else if url.contains("://") {
            return Err(bad("only http://, https:// and file:// repositories are supported"));
        } else {
            Kind::File(PathBuf::from(url))
        };
        let auth = match (auth, &kind) {
            (Some(a), Kind::Http { base, .. } | Kind::Proxied { base, .. }) => {
                let value = hyper::header::HeaderValue::from_str(&a).map_err(|e| bad(&e.to_string()))?;
                Some((origin(base).to_owned(), value))
            }
            _ => None,
        };
        Ok(Self { kind, opts, auth, fetched: Arc::default(), requests: Arc::default() })
    }

    /// The full URL of `path` in the repository.
    pub fn url(&self, path: &str) -> String {
        match &self.kind {
            Kind::File(dir) => format!("file://{}", dir.join(path).display()),
            Kind::Http { base, .. } | Kind::Proxied { base, .. } => format!("{base}/{path}"),
        }
    }

    /// The proxy requests go through, if any.
    pub fn proxy(&self) -> Option<&str> {
        match &self.kind {
            Kind::Proxied { proxy, .. } => Some(proxy),
            _ => None,
        }
    }

    /// Payload and document bytes received so far, over all requests.
    pub fn bytes_fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// Requests made so far (each attempt counts).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// A whole (small) file.
    pub async fn get(&self, path: &str) -> Result<Bytes, FetchError> {
        self.with_retries(path).await
    }

    /// A document and its detached signature file (`<path>.sig`), accepted by `check`.
    ///
    /// A publisher replaces the two files one after the other, so a reader can get one old
    /// and one new (issue 13). When `check` refuses the pair, both are fetched again, up to
    /// twice, before its refusal is returned: a pair that stays refused is refused for what it
    /// is. The outer error is the fetch's, the inner one the check's.
    pub async fn get_signed<T, E>(
        &self,
        path: &str,
        check: impl Fn(&[u8], &[u8]) -> Result<T, E>,
    ) -> Result<Result<T, E>, FetchError> {
        let sig_path = format!("{path}.sig");
        let mut tries = 0;
        loop {
            let doc = self.get(path).await?;
            let sig = self.get(&sig_path).await?;
            match check(&doc, &sig) {
                Err(_) if tries < 2 => {
                    tries += 1;
                    tokio::time::sleep(self.opts.first_backoff).await;
                }
                result => return Ok(result),
            }
        }
    }

    /// Bytes `range` of a file; the answer has exactly that length or it is an error. An
    /// interrupted answer is resumed where it stopped (see [`RangeStream`]).
    pub async fn get_range(&self, path: &str, range: Range<u64>) -> Result<Bytes, FetchError> {
        let mut stream = self.range_stream(path, range.clone());
        let mut buf = BytesMut::with_capacity((range.end.saturating_sub(range.start)).min(64 << 20) as usize);
        while let Some(b) = stream.next().await? {
            buf.extend_from_slice(&b);
        }
        Ok(buf.freeze())
    }

    /// Bytes `range` of a file, delivered as they arrive (see [`RangeStream`]).
    pub fn range_stream(&self, path: &str, range: Range<u64>) -> RangeStream<'_> {
        RangeStream {
            fetcher: self,
            path: path.to_owned(),
            url: self.url(path),
            start: range.start,
            pos: range.start,
            end: range.end,
            body: None,
            failures: 0,
            slow: 0,
            rate: Rate::new(),
            backoff: self.opts.first_backoff,
            whole_ok: false,
            skip: 0,
        }
    }

    async fn with_retries(&self, path: &str) -> Result<Bytes, FetchError> {
        let url = self.url(path);
        let mut backoff = self.opts.first_backoff;
        let mut last = String::new();
        for attempt in 1..=self.opts.attempts {
            self.requests.fetch_add(1, Ordering::Relaxed);
            match self.attempt(path, &url).await {
                Ok(b) => return Ok(b),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(why)) => last = why,
            }
            if attempt < self.opts.attempts {
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2);
            }
        }
        Err(FetchError::GaveUp { url, attempts: self.opts.attempts, last })
    }

    async fn attempt(&self, path: &str, url: &str) -> Result<Bytes, Attempt> {
        match &self.kind {
            Kind::File(dir) => {
                let b = self.read_file(&dir.join(path), url, None).await?;
                self.fetched.fetch_add(b.len() as u64, Ordering::Relaxed);
                Ok(b)
            }
            Kind::Http { client, .. } => self.attempt_http(client, url).await,
            Kind::Proxied { client, proxy, .. } => {
                self.attempt_http(client, url).await.map_err(|e| match e {
                    Attempt::Retry(why) => Attempt::Retry(format!("{why} (via proxy {proxy})")),
                    fatal => fatal,
                })
            }
        }
    }

    /// Reads `range` of a file, or the whole (document-sized) file; not counted as fetched.
    async fn read_file(
        &self,
        file: &std::path::Path,
        url: &str,
        range: Option<Range<u64>>,
    ) -> Result<Bytes, Attempt> {
        let (file, url_owned, limit) = (file.to_owned(), url.to_owned(), self.opts.max_document);
        tokio::task::spawn_blocking(move || -> Result<Bytes, Attempt> {
            use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
            // O_NONBLOCK: opening a FIFO must not wait for a writer (issue 13: a FIFO named
            // index.json hung the agent for good). It does nothing to a regular file's reads.
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
                .open(&file)
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => {
                        Attempt::Fatal(FetchError::NotFound { url: url_owned.clone() })
                    }
                    _ => Attempt::Retry(e.to_string()),
                })?;
            let meta = f.metadata().map_err(|e| Attempt::Retry(e.to_string()))?;
            if !meta.is_file() {
                return Err(Attempt::Fatal(FetchError::BadUrl {
                    url: url_owned,
                    reason: "not a regular file (a FIFO, a device or a directory is never a repository file)"
                        .into(),
                }));
            }
            let len = meta.len();
            let range = match range {
                Some(r) => r,
                None if len > limit => {
                    return Err(Attempt::Fatal(FetchError::TooLarge { url: url_owned, size: len, limit }));
                }
                None => 0..len,
            };
            let mut buf = vec![0u8; (range.end - range.start) as usize];
            f.read_exact_at(&mut buf, range.start).map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    Attempt::Retry(format!("file is {len} bytes, shorter than the range {range:?}"))
                }
                _ => Attempt::Retry(e.to_string()),
            })?;
            Ok(Bytes::from(buf))
        })
        .await
        .map_err(|e| Attempt::Retry(e.to_string()))?
    }

    /// Sends one GET (for `range`, when given) and checks the answer's status and headers; the
    /// body is left to the caller. Returns the body, how many of its first bytes come before
    /// the range (0, unless the server sent the whole file and `whole_ok` accepts that), and
    /// whether the body is gzip-encoded (only ever for a whole document, which asks for it).
    async fn open_http<C>(
        &self,
        client: &Client<C>,
        url: &str,
        range: Option<Range<u64>>,
        whole_ok: bool,
    ) -> Result<(hyper::body::Incoming, u64, bool), Attempt>
    where
        hyper_rustls::HttpsConnector<C>:
            hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
    {
        // Redirects are followed (mirrors and CDNs send them, issue 13), a few hops at most and
        // never from https to http; errors keep naming the URL asked for.
        let mut at = url.to_owned();
        let mut hops = 0;
        let resp = loop {
            let mut req = hyper::Request::get(at.as_str());
            if let Some((host, value)) = &self.auth
                && origin(&at) == host
            {
                req = req.header(hyper::header::AUTHORIZATION, value.clone());
            }
            match &range {
                Some(r) => req = req.header(hyper::header::RANGE, format!("bytes={}-{}", r.start, r.end - 1)),
                None => req = req.header(hyper::header::ACCEPT_ENCODING, "gzip"),
            }
            let req = req.body(http_body_util::Empty::new()).map_err(|e| {
                Attempt::Fatal(FetchError::BadUrl { url: url.to_owned(), reason: format!("{at}: {e}") })
            })?;
            let stall = self.opts.stall_timeout;
            let resp = match tokio::time::timeout(stall, client.request(req)).await {
                Err(_) => {
                    return Err(Attempt::Retry(format!("no response for {:.1} s", stall.as_secs_f64())));
                }
                Ok(Err(e)) => {
                    if let Some(tls) = tls_error(&e) {
                        return Err(Attempt::Fatal(FetchError::Tls { url: url.to_owned(), reason: tls }));
                    }
                    return Err(Attempt::Retry(error_text(&e)));
                }
                Ok(Ok(r)) => r,
            };
            if !matches!(resp.status().as_u16(), 301 | 302 | 303 | 307 | 308) {
                break resp;
            }
            let bad = |reason: String| Attempt::Fatal(FetchError::BadUrl { url: url.to_owned(), reason });
            hops += 1;
            if hops > MAX_REDIRECTS {
                return Err(bad(format!("more than {MAX_REDIRECTS} redirects")));
            }
            let location = resp
                .headers()
                .get(hyper::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| bad(format!("HTTP {} without a Location", resp.status().as_u16())))?;
            let next = redirect_target(&at, location);
            if at.starts_with("https://") && !next.starts_with("https://") {
                return Err(bad(format!("redirected from https to {next}: refused")));
            }
            at = next;
        };
        let status = resp.status().as_u16();
        let gzip = match resp.headers().get(hyper::header::CONTENT_ENCODING).map(|v| v.to_str()) {
            None => false,
            Some(Ok(e)) if e.trim().eq_ignore_ascii_case("identity") => false,
            Some(Ok(e)) if e.trim().eq_ignore_ascii_case("gzip") && range.is_none() => true,
            // Only a successful answer's body is read; an error page may come compressed.
            Some(_) if !(200..300).contains(&status) => false,
            Some(e) => {
                let encoding = e.map_or_else(|_| "(not text)".to_owned(), str::to_owned);
                return Err(Attempt::Fatal(FetchError::Encoding { url: url.to_owned(), encoding }));
            }
        };
        let (expected, skip) = match (&range, status) {
            (Some(r), 206) => {
                check_content_range(resp.headers(), r)?;
                (Some(r.end - r.start), 0)
            }
            // The whole file: the caller reads past what comes before the range.
            (Some(r), 200) if whole_ok => (None, r.start),
            (Some(_), 200) => return Err(Attempt::Fatal(FetchError::RangeIgnored { url: url.to_owned() })),
            (None, 200) => (None, 0),
            (_, 500..=599) => return Err(Attempt::Retry(format!("HTTP {status}"))),
            _ => return Err(Attempt::Fatal(FetchError::Rejected { url: url.to_owned(), status })),
        };
        let limit = match (expected, &range) {
            (Some(e), _) => e,
            // A whole file read for a range: it must at least reach the range's end.
            (None, Some(_)) => u64::MAX,
            (None, None) => self.opts.max_document,
        };
        if let Some(len) = resp
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        {
            if expected.is_some_and(|e| e != len) {
                return Err(Attempt::Retry(format!("Content-Length {len}, expected {limit}")));
            }
            if len > limit {
                return Err(Attempt::Fatal(FetchError::TooLarge { url: url.to_owned(), size: len, limit }));
            }
            if let Some(r) = range.as_ref().filter(|_| expected.is_none())
                && len < r.end
            {
                return Err(Attempt::Retry(format!(
                    "the whole file is {len} bytes, shorter than the range {r:?}"
                )));
            }
        }
        Ok((resp.into_body(), skip, gzip))
    }

    /// One attempt at a whole document over HTTP.
    async fn attempt_http<C>(&self, client: &Client<C>, url: &str) -> Result<Bytes, Attempt>
    where
        hyper_rustls::HttpsConnector<C>:
            hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
    {
        let (mut body, _, gzip) = self.open_http(client, url, None, false).await?;
        let (stall, limit) = (self.opts.stall_timeout, self.opts.max_document);
        let mut buf = BytesMut::with_capacity(64 << 10);
        let mut rate = Rate::new();
        loop {
            let frame = match tokio::time::timeout(stall, body.frame()).await {
                Err(_) => {
                    return Err(Attempt::Retry(format!("stalled: no data for {:.1} s", stall.as_secs_f64())));
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(Attempt::Retry(error_text(&e))),
                Ok(Some(Ok(f))) => f,
            };
            if let Ok(data) = frame.into_data() {
                self.fetched.fetch_add(data.len() as u64, Ordering::Relaxed);
                rate.add(data.len() as u64, &self.opts).map_err(Attempt::Retry)?;
                buf.extend_from_slice(&data);
                if buf.len() as u64 > limit {
                    return Err(Attempt::Fatal(FetchError::TooLarge {
                        url: url.to_owned(),
                        size: buf.len() as u64,
                        limit,
                    }));
                }
            }
        }
        if gzip {
            return gunzip(&buf, limit).map_err(|e| match e {
                Gunzip::TooLarge(size) => {
                    Attempt::Fatal(FetchError::TooLarge { url: url.to_owned(), size, limit })
                }
                Gunzip::Corrupt(why) => {
                    Attempt::Retry(format!("the gzip-encoded answer does not decode: {why}"))
                }
            });
        }
        Ok(buf.freeze())
    }
}

enum Gunzip {
    /// Decodes to more than the limit (at least this many bytes).
    TooLarge(u64),
    Corrupt(String),
}

/// Decodes a gzip body (one or more members), refusing to produce more than `limit` bytes: a
/// small answer must not become a huge document (a "gzip bomb").
fn gunzip(data: &[u8], limit: u64) -> Result<Bytes, Gunzip> {
    use std::io::Read as _;
    let mut out = Vec::with_capacity(data.len().saturating_mul(3).min(limit as usize));
    flate2::read::MultiGzDecoder::new(data)
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| Gunzip::Corrupt(e.to_string()))?;
    if out.len() as u64 > limit {
        return Err(Gunzip::TooLarge(out.len() as u64));
    }
    Ok(Bytes::from(out))
}

/// The minimum-rate rule for one attempt.
#[derive(Debug)]
struct Rate {
    since: tokio::time::Instant,
    bytes: u64,
}

impl Rate {
    fn new() -> Self {
        Self { since: tokio::time::Instant::now(), bytes: 0 }
    }

    /// Counts `n` bytes; an error once a whole window brought less than the minimum.
    fn add(&mut self, n: u64, opts: &FetchOptions) -> Result<(), String> {
        self.bytes += n;
        let elapsed = self.since.elapsed();
        if elapsed < opts.rate_window {
            return Ok(());
        }
        let rate = self.bytes as f64 / elapsed.as_secs_f64();
        if rate < opts.min_rate as f64 {
            return Err(format!(
                "too slow: {} bytes in {:.0} s, less than the {} bytes/s required",
                self.bytes,
                elapsed.as_secs_f64(),
                opts.min_rate
            ));
        }
        *self = Self::new();
        Ok(())
    }
}

/// Bytes of a range as they arrive, from [`Fetcher::range_stream`].
///
/// A connection that resets, stalls or ends early is not a lost request: the next attempt asks
/// only for the bytes not yet delivered (issue 12: against a server that reset every few MiB,
/// whole 4 MiB requests were fetched again and again, and three reruns made no progress). An
/// attempt that delivered anything counts as progress: `attempts` limits the attempts in a row
/// that deliver nothing, so a flaky but moving download is never cut; attempts that fail the
/// minimum rate count on their own, whatever they delivered, so a dribbling server is given up.
#[derive(Debug)]
pub struct RangeStream<'a> {
    fetcher: &'a Fetcher,
    path: String,
    url: String,
    start: u64,
    pos: u64,
    end: u64,
    body: Option<hyper::body::Incoming>,
    failures: u32,
    slow: u32,
    rate: Rate,
    backoff: Duration,
    whole_ok: bool,
    /// Bytes of the current body still to be read past (a whole-file answer).
    skip: u64,
}

impl RangeStream<'_> {
    /// Accepts a server that ignores `Range` and sends the whole file: the bytes before the
    /// range are read and dropped (after a cut, again from the file's start). For a caller that
    /// reads the file in one pass; without it such an answer is [`FetchError::RangeIgnored`].
    #[must_use]
    pub fn whole_file_ok(mut self) -> Self {
        self.whole_ok = true;
        self
    }

    /// Offset of the next byte to deliver.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The next bytes of the range, in order; `None` once all were delivered.
    pub async fn next(&mut self) -> Result<Option<Bytes>, FetchError> {
        let stall = self.fetcher.opts.stall_timeout;
        loop {
            if self.pos >= self.end {
                self.body = None;
                return Ok(None);
            }
            let Some(body) = self.body.as_mut() else {
                if self.failures > 0 {
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = self.backoff.saturating_mul(2);
                }
                self.fetcher.requests.fetch_add(1, Ordering::Relaxed);
                self.rate = Rate::new();
                match self.open().await {
                    Ok(Opened::Body(b, skip)) => {
                        self.body = Some(b);
                        self.skip = skip;
                    }
                    Ok(Opened::Whole(bytes)) => return Ok(Some(self.deliver(bytes))),
                    Err(Attempt::Fatal(e)) => return Err(e),
                    Err(Attempt::Retry(why)) => self.failed(why)?,
                }
                continue;
            };
            match tokio::time::timeout(stall, body.frame()).await {
                Err(_) => self.failed(format!("stalled: no data for {:.1} s", stall.as_secs_f64()))?,
                Ok(None) => self.failed(format!(
                    "truncated body: {} of {} bytes",
                    self.pos - self.start,
                    self.end - self.start
                ))?,
                Ok(Some(Err(e))) => self.failed(error_text(&e))?,
                Ok(Some(Ok(frame))) => {
                    if let Ok(mut data) = frame.into_data()
                        && !data.is_empty()
                    {
                        if self.skip > 0 {
                            // Before the range, in a whole-file answer: read past it. It
                            // counts towards the rate, not as delivered.
                            let n = self.skip.min(data.len() as u64);
                            self.skip -= n;
                            bytes::Buf::advance(&mut data, n as usize);
                            if let Err(why) = self.rate.add(n, &self.fetcher.opts) {
                                self.slow += 1;
                                self.failed(why)?;
                                continue;
                            }
                            if data.is_empty() {
                                continue;
                            }
                        }
                        self.failures = 0;
                        self.backoff = self.fetcher.opts.first_backoff;
                        if let Err(why) = self.rate.add(data.len() as u64, &self.fetcher.opts) {
                            // What came is kept; the attempt ends and counts as slow.
                            let data = self.deliver(data);
                            self.slow += 1;
                            self.failed(why)?;
                            return Ok(Some(data));
                        }
                        return Ok(Some(self.deliver(data)));
                    }
                }
            }
        }
    }

    /// Counts and hands out bytes (never more than the range asked for).
    fn deliver(&mut self, mut data: Bytes) -> Bytes {
        data.truncate((self.end - self.pos).min(data.len() as u64) as usize);
        self.fetcher.fetched.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.pos += data.len() as u64;
        data
    }

    /// An attempt failed; an error once `attempts` in a row brought nothing.
    fn failed(&mut self, why: String) -> Result<(), FetchError> {
        self.body = None;
        self.failures += 1;
        if self.failures.max(self.slow) >= self.fetcher.opts.attempts {
            let (s, e) = (self.start, self.end);
            let at = if self.pos > s {
                format!(" at byte {} of the range {s}..{e}", self.pos)
            } else {
                String::new()
            };
            return Err(FetchError::GaveUp {
                url: self.url.clone(),
                attempts: self.failures.max(self.slow),
                last: format!("{why}{at}"),
            });
        }
        Ok(())
    }

    async fn open(&self) -> Result<Opened, Attempt> {
        let rest = self.pos..self.end;
        let f = self.fetcher;
        match &f.kind {
            Kind::File(dir) => {
                let bytes = f.read_file(&dir.join(&self.path), &self.url, Some(rest)).await?;
                Ok(Opened::Whole(bytes))
            }
            Kind::Http { client, .. } => {
                let (b, skip, _) = f.open_http(client, &self.url, Some(rest), self.whole_ok).await?;
                Ok(Opened::Body(b, skip))
            }
            Kind::Proxied { client, proxy, .. } => {
                match f.open_http(client, &self.url, Some(rest), self.whole_ok).await {
                    Ok((b, skip, _)) => Ok(Opened::Body(b, skip)),
                    Err(Attempt::Retry(why)) => Err(Attempt::Retry(format!("{why} (via proxy {proxy})"))),
                    Err(fatal) => Err(fatal),
                }
            }
        }
    }
}

enum Opened {
    /// A body, and how many of its first bytes come before the range.
    Body(hyper::body::Incoming, u64),
    Whole(Bytes),
}

/// `url` without credentials, and the basic-authentication header value they make, if any.
fn split_credentials(url: &str) -> (String, Option<String>) {
    use base64::Engine as _;
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else { return (url.to_owned(), None) };
    let authority_end = url[scheme_end..].find('/').map_or(url.len(), |i| scheme_end + i);
    let Some(at) = url[scheme_end..authority_end].rfind('@').map(|i| scheme_end + i) else {
        return (url.to_owned(), None);
    };
    let userinfo = &url[scheme_end..at];
    let header = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(userinfo));
    (format!("{}{}", &url[..scheme_end], &url[at + 1..]), Some(header))
}

/// `scheme://authority` of an http(s) URL.
fn origin(url: &str) -> &str {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    &url[..url[scheme_end..].find('/').map_or(url.len(), |i| scheme_end + i)]
}

/// Redirects followed per request at most.
const MAX_REDIRECTS: u32 = 5;

/// Where a `Location` answer to a request for `from` points: absolute, absolute-path or
/// relative to `from`'s directory.
fn redirect_target(from: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.to_owned();
    }
    let scheme_end = from.find("://").map_or(0, |i| i + 3);
    let authority_end = from[scheme_end..].find('/').map_or(from.len(), |i| scheme_end + i);
    if location.starts_with('/') {
        return format!("{}{location}", &from[..authority_end]);
    }
    let dir_end = from.rfind('/').filter(|&i| i >= authority_end).map_or(from.len(), |i| i + 1);
    let base = &from[..dir_end];
    if dir_end == from.len() && !base.ends_with('/') {
        return format!("{base}/{location}");
    }
    format!("{base}{location}")
}

fn check_content_range(headers: &hyper::HeaderMap, r: &Range<u64>) -> Result<(), Attempt> {
    let want = format!("bytes {}-{}/", r.start, r.end - 1);
    match headers.get(hyper::header::CONTENT_RANGE).and_then(|v| v.to_str().ok()) {
        Some(v) if v.starts_with(&want) => Ok(()),
        other => Err(Attempt::Retry(format!(
            "Content-Range {other:?} does not match the range asked for ({want}...)"
        ))),
    }
}

/// The largest read of an HTTP connection (see [`client`]).
const READ_BUFFER: usize = 64 << 10;

fn client<C>(connector: C, tls: rustls::ClientConfig) -> Client<C>
where
    hyper_rustls::HttpsConnector<C>:
        hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        // Reads of at most 64 KiB: hyper's default grows its read buffer to ~400 KiB, and
        // with the binaries' mmap threshold of 128 KiB every such buffer is a fresh mapping,
        // faulted in page by page (75k page faults per GiB installed); smaller ones are reused
        // by malloc. Costs a few more recv calls (measured in `cargo xtask bench install`).
        .http1_max_buf_size(READ_BUFFER)
        .build(https)
}

/// The rustls client configuration: ring only (one crypto provider, so rustls never has to
/// guess), the system's roots and/or the CA file.
fn tls_config(opts: &FetchOptions) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    if opts.system_roots {
        // Unreadable system certificates are skipped; an empty store is caught below.
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
    }
    if let Some(path) = &opts.ca_file {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;
        let certs =
            CertificateDer::pem_file_iter(path).map_err(|e| format!("CA file {}: {e}", path.display()))?;
        let mut n = 0;
        for cert in certs {
            let cert = cert.map_err(|e| format!("CA file {}: {e}", path.display()))?;
            roots.add(cert).map_err(|e| format!("CA file {}: {e}", path.display()))?;
            n += 1;
        }
        if n == 0 {
            return Err(format!("CA file {} holds no certificate", path.display()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The rustls error somewhere in `e`'s causes, if any. tokio-rustls wraps it in an io::Error,
/// whose `source()` skips the wrapped error, so look inside with `get_ref` too.
fn tls_error(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    if let Some(t) = e.downcast_ref::<rustls::Error>() {
        return Some(tls_words(t));
    }
    let wrapped =
        e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).and_then(|inner| tls_error(inner));
    wrapped.or_else(|| e.source().and_then(tls_error))
}

/// What a TLS refusal means, in words, after rustls's own terse text (with the names and times
/// it carries).
fn tls_words(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    let rustls::Error::InvalidCertificate(c) = e else { return e.to_string() };
    let unix = |t: &rustls::pki_types::UnixTime| {
        jiff::Timestamp::from_second(i64::try_from(t.as_secs()).unwrap_or(i64::MAX))
            .map_or_else(|_| format!("{} s after 1970", t.as_secs()), |t| t.to_string())
    };
    let (code, words) = match c {
        C::UnknownIssuer => (
            "UnknownIssuer",
            "the server's certificate is not signed by a CA this node trusts (trust.ca-file, or the system's CAs)"
                .to_owned(),
        ),
        C::NotValidForName => ("NotValidForName", "the server's certificate is for another host name".to_owned()),
        C::NotValidForNameContext { expected, presented } => (
            "NotValidForName",
            format!(
                "the server's certificate is for {}, not for {}",
                // rustls renders each as `DnsName("...")` or `IpAddress(...)`.
                presented
                    .iter()
                    .map(|p| p
                        .trim_start_matches("DnsName(\"")
                        .trim_start_matches("IpAddress(")
                        .trim_end_matches(')')
                        .trim_end_matches('"'))
                    .collect::<Vec<_>>()
                    .join(", "),
                expected.to_str()
            ),
        ),
        C::Expired => ("Expired", "the server's certificate has expired".to_owned()),
        C::ExpiredContext { time, not_after } => (
            "Expired",
            format!("the server's certificate expired at {} (now {})", unix(not_after), unix(time)),
        ),
        C::NotValidYet => {
            ("NotValidYet", "the server's certificate is not valid yet (or this node's clock is behind)".to_owned())
        }
        C::NotValidYetContext { time, not_before } => (
            "NotValidYet",
            format!(
                "the server's certificate is valid from {} only (now {}: or this node's clock is behind)",
                unix(not_before),
                unix(time)
            ),
        ),
        C::Revoked => ("Revoked", "the server's certificate was revoked".to_owned()),
        C::BadSignature => ("BadSignature", "the server's certificate has a bad signature".to_owned()),
        C::Other(o) if format!("{o:?}").contains("CaUsedAsEndEntity") => (
            "CaUsedAsEndEntity",
            "the server presents a CA certificate as its own (a self-signed certificate with CA:TRUE, as \
             `openssl req -x509` makes by default); serve a certificate issued by that CA, and give the CA to \
             trust.ca-file"
                .to_owned(),
        ),
        _ => return format!("invalid peer certificate: {c:?}"),
    };
    format!("invalid peer certificate: {code}: {words}")
}

/// An error and its causes on one line (hyper's own messages are terse).
fn error_text(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::redirect_target;

    #[test]
    fn credentials_leave_the_url() {
        use super::{origin, split_credentials};
        let (url, auth) = split_credentials("https://me:s3cret@repo.example:8443/os/");
        assert_eq!(url, "https://repo.example:8443/os/");
        assert_eq!(auth.as_deref(), Some("Basic bWU6czNjcmV0"));
        assert_eq!(split_credentials("http://h/a@b").1, None, "an @ in the path is not userinfo");
        assert_eq!(origin("https://repo.example:8443/os/x"), "https://repo.example:8443");
        // Errors name the URL without the password.
        let e = super::Fetcher::new("ftp://me:s3cret@h/", super::FetchOptions::default())
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn redirect_targets() {
        let from = "https://repo.example/channels/stable/index.json";
        assert_eq!(redirect_target(from, "https://cdn.example/x"), "https://cdn.example/x");
        assert_eq!(redirect_target(from, "/mirror/index.json"), "https://repo.example/mirror/index.json");
        assert_eq!(redirect_target(from, "v2.json"), "https://repo.example/channels/stable/v2.json");
        assert_eq!(redirect_target("http://h:8080", "a"), "http://h:8080/a");
        assert_eq!(redirect_target("http://h:8080", "/a"), "http://h:8080/a");
    }
}
