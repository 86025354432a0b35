//! Shared by the install tests: a signed repository built with our tools, GPT disk images.
#![allow(dead_code, unreachable_pub, unused_imports)]

use fetch::{FetchOptions, Fetcher};
use install::{Counters, InstallError, InstallRequest, Report};
use manifest::{Manifest, Sha256Digest};
use repo::local::{PublishRequest, publish, sign_document};
use signing::{SecretKey, TrustedKeys};
use slot::choice::Slot;
use slot::{Disk, Tries};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use testkit::{is_root, run, tool};

/// A 160 MiB disk in Flatcar's layout with 56 MiB slots; A good and booted, B empty.
pub fn disk(sgdisk: &Path, dir: &Path) -> PathBuf {
    testkit::flatcar_image(sgdisk, dir, 160, 56)
}

/// A filesystem-like image: text, zeros and noise; `variant` rewrites 1 MiB in the middle.
pub fn fs_image(path: &Path, variant: u8) {
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

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub key: SecretKey,
}

impl Fixture {
    pub fn new() -> Self {
        Self { dir: tempfile::tempdir().unwrap(), key: SecretKey::from_seed([5; 32]) }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Builds, signs and publishes `version` (content `variant`); returns its manifest.
    pub fn release(&self, version: &str, variant: u8) -> (Manifest, Vec<u8>) {
        self.release_with(version, variant, manifest::ChunkHash::Blake3)
    }

    /// [`Self::release`] with chunk digests in `hash` (manifest format 1 for SHA-256).
    pub fn release_with(&self, version: &str, variant: u8, hash: manifest::ChunkHash) -> (Manifest, Vec<u8>) {
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
            chunk_starts: Vec::new(),
            chunk_hash: hash,
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

    pub fn file_fetcher(&self) -> Fetcher {
        Fetcher::new(&format!("file://{}", self.path("repo").display()), FetchOptions::default()).unwrap()
    }

    pub async fn install(
        &self,
        disk: &Path,
        booted: Slot,
        rel: &(Manifest, Vec<u8>),
        f: &Fetcher,
    ) -> Result<Report, InstallError> {
        self.install_with(disk, booted, rel, f, 1 << 20).await
    }

    pub async fn install_with(
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
            manifest_sig: b"{\"test\":\"signature\"}",
            payload_path: format!("images/{}/x86_64/payload", m.version),
            state_dir: &self.path("state"),
            tries: Tries::new(3).unwrap(),
            parallel: 4,
            max_request,
            provision: false,
        };
        install::install(&req, f, &Arc::new(Counters::default())).await
    }
}

/// Boots the disk as the boot path would (it must choose `expect`) and confirms that slot.
pub fn boot_and_confirm(disk: &Path, expect: Slot) {
    let mut d = Disk::open(disk, true).unwrap();
    let (chosen, _) = slot::choice::boot_attempt(&d.slots()).unwrap();
    assert_eq!(chosen, expect);
    d.update(|s| Ok(slot::choice::boot_attempt(s).unwrap().1)).unwrap();
    d.update(|s| slot::choice::mark_good(s, chosen)).unwrap();
}

/// SHA-256 of the first `len` bytes of `slot`, read independently of the installer.
pub fn slot_digest(disk: &Path, slot: Slot, len: u64) -> Sha256Digest {
    use std::os::unix::fs::FileExt as _;
    let (base, _) = Disk::open(disk, false).unwrap().slot_extent(slot).unwrap();
    let mut buf = vec![0u8; len as usize];
    std::fs::File::open(disk).unwrap().read_exact_at(&mut buf, base).unwrap();
    Sha256Digest::of(&buf)
}
