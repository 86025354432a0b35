//! Installs from a real repository (built, signed and published with our tools) into real GPT
//! disk images, through file:// and through Debian's nginx: full, adaptive, resumed, and
//! refused. After each, the slot is read back independently and its digest compared.

mod common;

use common::*;
use fetch::{FetchOptions, Fetcher};
use slot::Disk;
use slot::choice::{self, Slot};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_then_adaptive_install_from_file_repository() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new();
    let disk = disk(&sgdisk, f.dir.path());
    let v1 = f.release("1.0.0", 0);
    let v2 = f.release("1.1.0", 1);
    let fetcher = f.file_fetcher();

    // Full install of v1 into B: nothing local to reuse.
    let r = f.install(&disk, Slot::A, &v1, &fetcher).await.unwrap();
    assert_eq!(r.reused_bytes, 0);
    assert_eq!(slot_digest(&disk, Slot::B, v1.0.image_size), v1.0.image_sha256);
    let s = Disk::open(&disk, false).unwrap().slots();
    assert_eq!((s.b.priority(), s.b.tries(), s.b.successful()), (2, 3, false));
    assert!(s.a.successful() && s.a.priority() == 1, "the booted slot stays the way back");
    assert!(!f.path("state/install-journal.json").exists());
    // The slot carries its signed manifest at its end, for the boot path.
    let (m, sig) = read_trailer(&disk, Slot::B).unwrap();
    assert_eq!((m, sig), (v1.1.clone(), b"{\"test\":\"signature\"}".to_vec()));
    boot_and_confirm(&disk, Slot::B);

    // v2 into A, booted from B: most chunks come from B.
    let (r, fetched) = update_from_b(&f, &disk, &v1, &v2, &fetcher).await;
    let payload = v2.0.payload.size;
    eprintln!(
        "adaptive: fetched {fetched} of {payload} payload bytes ({:.1}%), reused {} of {} image bytes",
        100.0 * fetched as f64 / payload as f64,
        r.reused_bytes,
        r.image_bytes
    );
    assert!(r.reused_bytes > r.image_bytes / 2, "{r:?}");
    assert!(fetched * 5 < payload, "fetched {fetched} of {payload}");
    // The dm-verity tree was computed on the node, not fetched, and is right (the slot's digest
    // above covers it; it is the tree of the data).
    let computed = install::plan::tree_to_compute(&v2.0, &vec![false; v2.0.chunks.len()], Some(&v1.0));
    let tree_bytes: u64 = computed.iter().map(|&i| u64::from(v2.0.chunks[i].size)).sum();
    eprintln!("adaptive: {} tree bytes computed ({} chunks)", r.computed_bytes, computed.len());
    assert!(!computed.is_empty() && r.computed_bytes == tree_bytes, "{r:?}");
    assert_eq!(
        fetched,
        install::plan::fetch_bytes_for(&v2.0, Some(&v1.0)),
        "fetched exactly the planned frames"
    );
    assert_eq!(choice::choose(&Disk::open(&disk, false).unwrap().slots()), Some(Slot::A));
    assert_eq!(read_trailer(&disk, Slot::A).unwrap().0, v2.1);
}

/// The first update after the publisher moved from manifest format 1 (SHA-256 chunk digests)
/// to format 2 (BLAKE3): no digest of the booted image's record matches, so the installer hashes
/// the booted slot's chunks the new way, and the update still reuses what it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_across_the_chunk_hash_switch_still_reuses_the_booted_image() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new();
    let disk = disk(&sgdisk, f.dir.path());
    let v1 = f.release_with("1.0.0", 0, manifest::ChunkHash::Sha256);
    let v2 = f.release_with("1.1.0", 1, manifest::ChunkHash::Blake3);
    assert_eq!((v1.0.format, v2.0.format), (1, 2));
    assert!(String::from_utf8_lossy(&v1.1).contains("\"sha256\""));
    assert!(String::from_utf8_lossy(&v2.1).contains("\"blake3\""));
    let fetcher = f.file_fetcher();
    f.install(&disk, Slot::A, &v1, &fetcher).await.unwrap();
    assert_eq!(slot_digest(&disk, Slot::B, v1.0.image_size), v1.0.image_sha256);
    boot_and_confirm(&disk, Slot::B);

    let (r, fetched) = update_from_b(&f, &disk, &v1, &v2, &fetcher).await;
    let payload = v2.0.payload.size;
    eprintln!("across the switch: fetched {fetched} of {payload} payload bytes, reused {}", r.reused_bytes);
    assert!(r.reused_bytes > r.image_bytes / 2, "{r:?}");
    assert!(fetched * 5 < payload, "fetched {fetched} of {payload}");
}

/// Installs `v2` into A with B (holding `v1`) booted; checks that A holds `v2` and B is
/// untouched. The report and the payload bytes fetched.
async fn update_from_b(
    f: &Fixture,
    disk: &Path,
    v1: &(manifest::Manifest, Vec<u8>),
    v2: &(manifest::Manifest, Vec<u8>),
    fetcher: &Fetcher,
) -> (install::Report, u64) {
    let before = fetcher.bytes_fetched();
    let r = f.install(disk, Slot::B, v2, fetcher).await.unwrap();
    let fetched = fetcher.bytes_fetched() - before;
    assert_eq!(slot_digest(disk, Slot::A, v2.0.image_size), v2.0.image_sha256);
    assert_eq!(slot_digest(disk, Slot::B, v1.0.image_size), v1.0.image_sha256, "booted slot untouched");
    (r, fetched)
}

fn read_trailer(disk: &Path, slot: Slot) -> Result<(Vec<u8>, Vec<u8>), trailer::TrailerError> {
    use std::os::unix::fs::FileExt as _;
    let (base, len) = Disk::open(disk, false).unwrap().slot_extent(slot).unwrap();
    let file = std::fs::File::open(disk).unwrap();
    trailer::read(len, |o, buf| file.read_exact_at(buf, base + o))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_install_resumes_where_it_stopped() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new();
    let disk = disk(&sgdisk, f.dir.path());
    let v1 = f.release("1.0.0", 0);
    let payload = f.path("repo/images/1.0.0/x86_64/payload");
    let full = std::fs::read(&payload).unwrap();
    // The repository loses the second half of the payload mid-install.
    std::fs::write(&payload, &full[..full.len() / 2]).unwrap();
    let quick = FetchOptions { attempts: 1, first_backoff: Duration::ZERO, ..FetchOptions::default() };
    let fetcher = Fetcher::new(&format!("file://{}", f.path("repo").display()), quick).unwrap();
    let e = f.install_with(&disk, Slot::A, &v1, &fetcher, 64 << 10).await.unwrap_err();
    assert!(e.to_string().contains("shorter than the range"), "{e}");
    let s = Disk::open(&disk, false).unwrap().slots();
    assert!(!s.b.bootable(), "a half-written slot must stay unbootable");
    assert!(f.path("state/install-journal.json").exists());

    std::fs::write(&payload, &full).unwrap();
    let fetcher = f.file_fetcher();
    let r = f.install_with(&disk, Slot::A, &v1, &fetcher, 64 << 10).await.unwrap();
    eprintln!("resume: {} of {} image bytes were already written", r.resumed_bytes, r.image_bytes);
    assert!(r.resumed_bytes > 0, "{r:?}");
    assert!(fetcher.bytes_fetched() < full.len() as u64, "fetched everything again");
    assert_eq!(slot_digest(&disk, Slot::B, v1.0.image_size), v1.0.image_sha256);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_chunk_and_small_target_are_refused_and_leave_the_target_unbootable() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let f = Fixture::new();
    let disk = disk(&sgdisk, f.dir.path());
    let v1 = f.release("1.0.0", 0);
    let booted_before = slot_digest(&disk, Slot::A, 8 << 20);
    let payload = f.path("repo/images/1.0.0/x86_64/payload");
    let mut bytes = std::fs::read(&payload).unwrap();
    let c = v1.0.chunks[5];
    bytes[(c.offset + u64::from(c.length) / 2) as usize] ^= 0x10;
    std::fs::write(&payload, &bytes).unwrap();
    let e = f.install(&disk, Slot::A, &v1, &f.file_fetcher()).await.unwrap_err().to_string();
    assert!(e.contains("payload: chunk 5"), "{e}");
    let s = Disk::open(&disk, false).unwrap().slots();
    assert_eq!(s.b.priority(), 0);
    assert_eq!(slot_digest(&disk, Slot::A, 8 << 20), booted_before);

    let mut big = v1.clone();
    big.0.image_size = 57 << 20;
    let e = f.install(&disk, Slot::A, &big, &f.file_fetcher()).await.unwrap_err().to_string();
    assert!(e.contains("does not fit slot B"), "{e}");
}

/// nginx from Debian serving the repository on loopback; stopped on drop.
struct Nginx {
    child: std::process::Child,
    port: u16,
}

impl Nginx {
    fn start(nginx: &Path, root: &Path, dir: &Path) -> Nginx {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off; master_process off; worker_processes 1; pid {pid}; error_log stderr;\n\
                 events {{ worker_connections 64; }}\n\
                 http {{ access_log off; gzip_static on; client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp}; uwsgi_temp_path {tmp}; scgi_temp_path {tmp};\n\
                   server {{ listen 127.0.0.1:{port}; root {root}; }} }}\n",
                pid = dir.join("nginx.pid").display(),
                tmp = dir.display(),
                root = root.display()
            ),
        )
        .unwrap();
        let server = Nginx {
            child: Command::new(nginx).arg("-c").arg(&conf).arg("-e").arg("stderr").spawn().unwrap(),
            port,
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("nginx did not start");
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_over_http_from_nginx() {
    let Some(sgdisk) = tool("sgdisk", "gdisk") else { return };
    let Some(nginx) = tool("nginx", "nginx") else { return };
    let f = Fixture::new();
    let disk = disk(&sgdisk, f.dir.path());
    let v1 = f.release("1.0.0", 0);
    let server = Nginx::start(&nginx, &f.path("repo"), f.dir.path());
    let fetcher =
        Fetcher::new(&format!("http://127.0.0.1:{}", server.port), FetchOptions::default()).unwrap();
    let r = f.install(&disk, Slot::A, &v1, &fetcher).await.unwrap();
    assert_eq!(slot_digest(&disk, Slot::B, v1.0.image_size), v1.0.image_sha256);
    assert_eq!(fetcher.bytes_fetched(), r.fetch_bytes);
    eprintln!("nginx: {} requests for {} payload bytes", fetcher.requests(), r.fetch_bytes);
    // The manifest comes gzip-encoded (the copy publish wrote, sent by gzip_static) and is
    // decoded to the very bytes that were signed.
    let before = fetcher.bytes_fetched();
    let got = fetcher.get("images/1.0.0/x86_64/manifest.json").await.unwrap();
    assert_eq!(got, v1.1, "the decoded manifest is the published one");
    let gz = std::fs::metadata(f.path("repo/images/1.0.0/x86_64/manifest.json.gz")).unwrap().len();
    assert_eq!(fetcher.bytes_fetched() - before, gz, "what crossed the wire is the gzip copy");
    assert!(gz * 2 < v1.1.len() as u64, "{gz} bytes compressed of {}", v1.1.len());
    let e = fetcher.get("images/9.9.9/x86_64/manifest.json").await.unwrap_err().to_string();
    assert!(e.contains("HTTP 404 (not retried)"), "{e}");
}
