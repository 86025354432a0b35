//! Every way the repository side can fail during an install: each ends in an error that names
//! the URL and the problem, with the booted slot untouched and the target left unbootable once
//! written to (and as it was when the failure came before the first write: `safety.rs`).

mod common;

use common::*;
use fetch::{FetchOptions, Fetcher};
use slot::Disk;
use slot::choice::Slot;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[derive(Clone, Copy, Debug)]
enum Mode {
    NotFound,
    ServerError,
    Reset,
    Stall,
    Truncate,
    WrongLength,
}

/// Serves files under `root` with Range support, misbehaving as `mode` says for every
/// request after the first `good` ones.
async fn server(root: PathBuf, mode: Mode, good: usize) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let (root, count) = (root.clone(), count.clone());
            tokio::spawn(async move {
                loop {
                    let mut req = Vec::new();
                    let mut b = [0u8; 2048];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&b[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&req).into_owned();
                    let path =
                        text.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/').to_owned();
                    let data = std::fs::read(root.join(&path)).unwrap_or_default();
                    let lower = text.to_lowercase();
                    let (s, e) = lower
                        .lines()
                        .find_map(|l| l.strip_prefix("range: bytes="))
                        .and_then(|r| r.trim().split_once('-'))
                        .map(|(s, e)| (s.parse::<usize>().unwrap(), e.parse::<usize>().unwrap()))
                        .unwrap_or((0, data.len().saturating_sub(1)));
                    let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let body = data.get(s..=e).unwrap_or_default().to_vec();
                    let head = |len: usize| {
                        format!(
                            "HTTP/1.1 206 Partial Content\r\ncontent-length: {len}\r\ncontent-range: bytes {s}-{e}/{}\r\n\r\n",
                            data.len()
                        )
                    };
                    let mode = if n < good { None } else { Some(mode) };
                    match mode {
                        None => {
                            let _ = sock.write_all(head(body.len()).as_bytes()).await;
                            let _ = sock.write_all(&body).await;
                        }
                        Some(Mode::NotFound) => {
                            let _ =
                                sock.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").await;
                        }
                        Some(Mode::ServerError) => {
                            let _ = sock.write_all(b"HTTP/1.1 500 Oops\r\ncontent-length: 0\r\n\r\n").await;
                        }
                        Some(Mode::Reset) => {
                            #[allow(deprecated)]
                            let _ = sock.set_linger(Some(Duration::ZERO));
                            return;
                        }
                        Some(Mode::Stall) => {
                            let _ = sock.write_all(head(body.len()).as_bytes()).await;
                            let _ = sock.write_all(&body[..body.len() / 2]).await;
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                        }
                        Some(Mode::Truncate) => {
                            let _ = sock.write_all(head(body.len()).as_bytes()).await;
                            let _ = sock.write_all(&body[..body.len() / 2]).await;
                            return;
                        }
                        Some(Mode::WrongLength) => {
                            let _ = sock.write_all(head(body.len() - 1).as_bytes()).await;
                            let _ = sock.write_all(&body[..body.len() - 1]).await;
                        }
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

fn quick() -> FetchOptions {
    FetchOptions {
        attempts: 2,
        stall_timeout: Duration::from_millis(300),
        first_backoff: Duration::from_millis(10),
        ..FetchOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_failures_leave_the_target_unbootable() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new();
    let v1 = f.release("1.0.0", 0);
    for (mode, expect) in [
        (Mode::NotFound, "HTTP 404 (not retried)"),
        (Mode::ServerError, "HTTP 500 (gave up after 2 attempts)"),
        (Mode::Reset, "(gave up after 2 attempts)"),
        // The first attempt stalls after half its bytes; the second, for the rest, gets no
        // answer from the stalled connection's server.
        (Mode::Stall, "0.3 s at byte "),
        (Mode::Truncate, "(gave up after 2 attempts)"),
        (Mode::WrongLength, "Content-Length"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let disk = disk(&sgdisk, dir.path());
        let booted = slot_digest(&disk, Slot::A, 4 << 20);
        // A few requests succeed first, so the failure comes mid-install.
        let url = server(f.path("repo"), mode, 3).await;
        let fetcher = Fetcher::new(&url, quick()).unwrap();
        let _ = std::fs::remove_dir_all(f.path("state"));
        let e = f.install_with(&disk, Slot::A, &v1, &fetcher, 128 << 10).await.unwrap_err().to_string();
        assert!(e.contains(&url) && e.contains("/payload") && e.contains(expect), "{mode:?}: {e}");
        let s = Disk::open(&disk, false).unwrap().slots();
        assert_eq!(s.b.priority(), 0, "{mode:?}: target must stay unbootable");
        assert!(s.a.bootable() && s.a.successful(), "{mode:?}: booted slot bits changed");
        assert_eq!(slot_digest(&disk, Slot::A, 4 << 20), booted, "{mode:?}: booted slot written");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_from_another_image_is_refused() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new();
    let v1 = f.release("1.0.0", 0);
    let _v2 = f.release("1.1.0", 1);
    let disk = disk(&sgdisk, f.dir.path());
    // The repository serves 1.1.0's payload under 1.0.0's name.
    let p1 = f.path("repo/images/1.0.0/x86_64/payload");
    std::fs::copy(f.path("repo/images/1.1.0/x86_64/payload"), &p1).unwrap();
    let e = f.install(&disk, Slot::A, &v1, &f.file_fetcher()).await.unwrap_err().to_string();
    assert!(e.contains("1.0.0/x86_64/payload: chunk"), "{e}");
    assert_eq!(Disk::open(&disk, false).unwrap().slots().b.priority(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fails_writes_is_reported() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let Some(mount) = tool("mount", "mount") else { return };
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let f = Fixture::new();
    let v1 = f.release("1.0.0", 0);
    // A 160 MiB sparse disk image on a 12 MiB tmpfs: writes fail with ENOSPC mid-install.
    let mnt = f.path("small");
    std::fs::create_dir(&mnt).unwrap();
    run(&mount, &["-t", "tmpfs", "-o", "size=12m", "tmpfs", mnt.to_str().unwrap()]);
    let _unmount = Unmount(mnt.clone());
    let disk = disk(&sgdisk, &mnt);
    let e = f.install(&disk, Slot::A, &v1, &f.file_fetcher()).await.unwrap_err().to_string();
    assert!(e.contains("No space left on device"), "{e}");
    assert_eq!(Disk::open(&disk, false).unwrap().slots().b.priority(), 0);
}

/// Unmounts on drop, also when the test fails.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A TLS server whose certificate is for another host name (signed by a CA we trust).
async fn tls_server_for_another_name(ca_file: &std::path::Path) -> u16 {
    let (ca_pem, config) = testkit::tls_server(&["updates.example.com"]);
    std::fs::write(ca_file, ca_pem).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(sock).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_does_not_match_is_refused() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new();
    let v1 = f.release("1.0.0", 0);
    let disk = disk(&sgdisk, f.dir.path());
    let booted = slot_digest(&disk, Slot::A, 4 << 20);
    let ca = f.path("ca.pem");
    let port = tls_server_for_another_name(&ca).await;
    let opts = FetchOptions { ca_file: Some(ca), ..quick() };
    let fetcher = Fetcher::new(&format!("https://localhost:{port}"), opts).unwrap();
    let e = f.install(&disk, Slot::A, &v1, &fetcher).await.unwrap_err().to_string();
    assert!(
        e.contains("/payload: TLS: invalid peer certificate") && e.contains("updates.example.com"),
        "{e}"
    );
    assert_eq!(Disk::open(&disk, false).unwrap().slots().b.priority(), 0);
    assert_eq!(slot_digest(&disk, Slot::A, 4 << 20), booted);
}

/// Issue 12: a USR-B entry that covers USR-A or the EFI partition (valid by CRC) must not be
/// written: the install is refused before anything is written, naming both partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_12_install_refuses_a_target_over_another_partition() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new();
    let v1 = f.release("1.0.0", 0);
    for (over, number) in [("USR-A", 3), ("EFI-SYSTEM", 1)] {
        let dir = tempfile::tempdir().unwrap();
        let disk = disk(&sgdisk, dir.path());
        let (first, last) = testkit::gpt_edit::extent(&disk, 512, number);
        let (_, b_last) = testkit::gpt_edit::extent(&disk, 512, 4);
        let b_first = first + (last - first) / 2;
        testkit::gpt_edit::set_extent(&disk, 512, 4, b_first, if number == 3 { b_last } else { last });
        let before = std::fs::read(&disk).unwrap();
        let _ = std::fs::remove_dir_all(f.path("state"));
        let e = f.install(&disk, Slot::A, &v1, &f.file_fetcher()).await.unwrap_err();
        assert!(matches!(e, install::InstallError::Disk(slot::DiskError::Layout { .. })), "{over}: {e}");
        let msg = e.to_string();
        assert!(msg.contains(&format!("overlaps partition 4 USR-B (LBAs {b_first}-")), "{msg}");
        assert!(msg.contains(over) && msg.contains("the disk was not changed"), "{msg}");
        assert!(std::fs::read(&disk).unwrap() == before, "{over}: the refused install wrote to the disk");
        assert!(!f.path("state").join(install::JOURNAL_FILE).exists(), "{over}: a journal was started");
    }
}

/// Issue 12, item 2: the installer holds the disk's lock for the whole install, so nothing else
/// (a `rollback`, `mark-good`, a second install) can change the table while the slot is being
/// written; once it stops, the lock is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_12_the_installer_holds_the_disk_lock_for_the_whole_install() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new();
    let v1 = f.release("1.0.0", 0);
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(&sgdisk, dir.path());
    // The payload stalls after a few requests: the install is under way for a while.
    let url = server(f.path("repo"), Mode::Stall, 3).await;
    let opts = FetchOptions { attempts: 1, stall_timeout: Duration::from_secs(3), ..FetchOptions::default() };
    let fetcher = Fetcher::new(&url, opts).unwrap();
    let _ = std::fs::remove_dir_all(f.path("state"));
    let journal = f.path("state").join(install::JOURNAL_FILE);
    let run = async { f.install_with(&disk, Slot::A, &v1, &fetcher, 128 << 10).await };
    let probe = async {
        common_until(|| journal.exists()).await;
        let e = Disk::open(&disk, true).unwrap_err();
        assert!(matches!(&e, slot::DiskError::Busy { .. }), "{e}");
        assert!(e.to_string().contains(&format!("pid {} (", std::process::id())), "{e}");
        // Readers still work (status during an install).
        assert_eq!(Disk::open(&disk, false).unwrap().slots().b.priority(), 0);
    };
    let (result, ()) = tokio::join!(run, probe);
    assert!(result.is_err(), "the stalled install failed");
    let d = Disk::open(&disk, true).expect("the lock is free once the install stopped");
    assert!(d.is_locked());
}

async fn common_until(done: impl Fn() -> bool) {
    for _ in 0..1500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out");
}
