//! Installs from a real repository (built, signed and published with our tools) into real GPT
//! disk images, through file:// and through Debian's nginx: full, adaptive, resumed, and
//! refused. After each, the slot is read back independently and its digest compared.

use fetch::{FetchOptions, Fetcher};
use install::{Counters, InstallError, InstallRequest, Report};
use manifest::{Manifest, Sha256Digest};
use repo::local::{PublishRequest, publish, sign_document};
use signing::{SecretKey, TrustedKeys};
use slot::choice::{self, Slot};
use slot::{Disk, Tries};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

fn tool(name: &str, package: &str) -> Option<PathBuf> {
    let found =
        ["/usr/sbin", "/usr/bin", "/sbin"].iter().map(|d| Path::new(d).join(name)).find(|p| p.exists());
    if found.is_none() {
        assert!(std::env::var_os("ACL_REQUIRE_TOOLS").is_none(), "{name} ({package}) is required");
        eprintln!("skipped: {name} not installed (apt-get install {package})");
    }
    found
}

fn run(cmd: &Path, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{} {args:?}: {}", cmd.display(), String::from_utf8_lossy(&out.stderr));
}

/// A 160 MiB disk, Flatcar-style names, 56 MiB slots; A good and booted, B empty.
fn disk(sgdisk: &Path, dir: &Path) -> PathBuf {
    let path = dir.join("disk.img");
    std::fs::File::create(&path).unwrap().set_len(160 << 20).unwrap();
    let usr = "5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6";
    run(
        sgdisk,
        &[
            "-n",
            "1:0:+4M",
            "-c",
            "1:EFI-SYSTEM",
            "-t",
            "1:EF00",
            "-n",
            "3:0:+56M",
            "-c",
            "3:USR-A",
            "-t",
            &format!("3:{usr}"),
            "-n",
            "4:0:+56M",
            "-c",
            "4:USR-B",
            "-t",
            &format!("4:{usr}"),
            "-n",
            "9:0:0",
            "-c",
            "9:ROOT",
            "-A",
            "3:set:48",
            "-A",
            "3:set:56",
            path.to_str().unwrap(),
        ],
    );
    path
}

/// A filesystem-like image: text, zeros and noise; `variant` rewrites 1 MiB in the middle.
fn fs_image(path: &Path, variant: u8) {
    let size = 24 << 20;
    let mut v = Vec::with_capacity(size);
    let mut x: u32 = 99;
    while v.len() < size {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        match (x >> 16) % 3 {
            0 => v.extend_from_slice(format!("file {} line {x}\n", v.len()).as_bytes()),
            1 => v.extend(std::iter::repeat_n(0u8, (x % 20000) as usize)),
            _ => v.extend((0..(x % 5000)).map(|i| (x.wrapping_mul(i + 3) >> 11) as u8)),
        }
    }
    v.truncate(size);
    for b in &mut v[12 << 20..13 << 20] {
        *b = b.wrapping_add(variant);
    }
    std::fs::write(path, v).unwrap();
}

struct Fixture {
    dir: tempfile::TempDir,
    key: SecretKey,
}

impl Fixture {
    fn new() -> Self {
        Self { dir: tempfile::tempdir().unwrap(), key: SecretKey::from_seed([5; 32]) }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Builds, signs and publishes `version` (content `variant`); returns its manifest.
    fn release(&self, version: &str, variant: u8) -> (Manifest, Vec<u8>) {
        let fs = self.path(&format!("fs-{version}"));
        fs_image(&fs, variant);
        let out = self.path(&format!("build-{version}"));
        let opts = payload::BuildOptions {
            version: version.parse().unwrap(),
            arch: "x86_64".into(),
            kernel_cmdline: String::new(),
            chunk_size: 256 << 10,
            level: 3,
            threads: 2,
            salt: None,
        };
        payload::build(&fs, &out, &opts, &|_| {}).unwrap();
        sign_document(&out.join("manifest.json"), std::slice::from_ref(&self.key)).unwrap();
        let policy = repo::TrustPolicy::new(TrustedKeys::new([self.key.public()]).unwrap(), 1).unwrap();
        let req = PublishRequest {
            repo: &self.path("repo"),
            image_dir: &out,
            channel: "stable",
            expires_in: jiff::SignedDuration::from_hours(24),
            waves: vec![],
            now: jiff::Timestamp::now(),
            threads: 2,
        };
        publish(&req, std::slice::from_ref(&self.key), &policy, &|_, _| {}).unwrap();
        let bytes = std::fs::read(out.join("manifest.json")).unwrap();
        (Manifest::from_bytes(&bytes).unwrap(), bytes)
    }

    fn file_fetcher(&self) -> Fetcher {
        Fetcher::new(&format!("file://{}", self.path("repo").display()), FetchOptions::default()).unwrap()
    }

    async fn install(
        &self,
        disk: &Path,
        booted: Slot,
        rel: &(Manifest, Vec<u8>),
        f: &Fetcher,
    ) -> Result<Report, InstallError> {
        self.install_with(disk, booted, rel, f, 1 << 20).await
    }

    async fn install_with(
        &self,
        disk: &Path,
        booted: Slot,
        rel: &(Manifest, Vec<u8>),
        f: &Fetcher,
        max_request: u64,
    ) -> Result<Report, InstallError> {
        let (m, bytes) = rel;
        let req = InstallRequest {
            disk,
            booted,
            manifest: m,
            manifest_bytes: bytes,
            payload_path: format!("images/{}/x86_64/payload", m.version),
            state_dir: &self.path("state"),
            tries: Tries::new(3).unwrap(),
            parallel: 4,
            max_request,
        };
        install::install(&req, f, &Arc::new(Counters::default())).await
    }
}

/// SHA-256 of the first `len` bytes of `slot`, read independently of the installer.
fn slot_digest(disk: &Path, slot: Slot, len: u64) -> Sha256Digest {
    use std::os::unix::fs::FileExt as _;
    let (base, _) = Disk::open(disk, false).unwrap().slot_extent(slot);
    let mut buf = vec![0u8; len as usize];
    std::fs::File::open(disk).unwrap().read_exact_at(&mut buf, base).unwrap();
    Sha256Digest::of(&buf)
}

fn boot_and_confirm(disk: &Path, expect: Slot) {
    let mut d = Disk::open(disk, true).unwrap();
    let s = d.slots();
    let (chosen, _) = choice::boot_attempt(&s).unwrap();
    assert_eq!(chosen, expect);
    d.update(|s| Ok(choice::boot_attempt(s).unwrap().1)).unwrap();
    d.update(|s| choice::mark_good(s, chosen)).unwrap();
}

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
    boot_and_confirm(&disk, Slot::B);

    // v2 into A, booted from B: most chunks come from B.
    let before = fetcher.bytes_fetched();
    let r = f.install(&disk, Slot::B, &v2, &fetcher).await.unwrap();
    let fetched = fetcher.bytes_fetched() - before;
    assert_eq!(slot_digest(&disk, Slot::A, v2.0.image_size), v2.0.image_sha256);
    assert_eq!(slot_digest(&disk, Slot::B, v1.0.image_size), v1.0.image_sha256, "booted slot untouched");
    let payload = v2.0.payload.size;
    eprintln!(
        "adaptive: fetched {fetched} of {payload} payload bytes ({:.1}%), reused {} of {} image bytes",
        100.0 * fetched as f64 / payload as f64,
        r.reused_bytes,
        r.image_bytes
    );
    assert!(r.reused_bytes > r.image_bytes / 2, "{r:?}");
    assert!(fetched * 5 < payload, "fetched {fetched} of {payload}");
    assert_eq!(choice::choose(&Disk::open(&disk, false).unwrap().slots()), Some(Slot::A));
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
                 http {{ access_log off; client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp}; uwsgi_temp_path {tmp}; scgi_temp_path {tmp};\n\
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
    let e = fetcher.get("images/9.9.9/x86_64/manifest.json").await.unwrap_err().to_string();
    assert!(e.contains("HTTP 404 (not retried)"), "{e}");
}
