//! Test support shared by the crates' integration tests (a dev-dependency only).
//!
//! Tests use the real tools a user has (Debian's sgdisk, losetup, nginx, veritysetup). When a
//! tool is missing a test skips with a message, unless `ACL_REQUIRE_TOOLS` is set (as
//! `cargo xtask test` and CI do), where a missing tool fails it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Flatcar's "Container Linux /usr" partition type, the type of both slots.
pub const USR_TYPE: &str = "5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6";

/// The path of `name`, or `None` after printing why the test is skipped (see the crate docs).
pub fn tool(name: &str, package: &str) -> Option<PathBuf> {
    let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists());
    if found.is_none() {
        assert!(std::env::var_os("ACL_REQUIRE_TOOLS").is_none(), "{name} ({package}) is required");
        eprintln!("skipped: {name} not installed (apt-get install {package})");
    }
    found
}

/// Writes over the start of `data` the PE header of an EFI kernel image (PE32+) whose
/// certificate table is present (`signed`) or empty: what tells a signed kernel from an
/// unsigned one before shim checks the signature itself.
pub fn efi_kernel_header(data: &mut [u8], signed: bool) {
    data[..2].copy_from_slice(b"MZ");
    data[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
    data[0x80..0x84].copy_from_slice(b"PE\0\0");
    data[0x98..0x9a].copy_from_slice(&0x20bu16.to_le_bytes());
    let dirs = 0x98 + 112;
    data[dirs - 4..dirs].copy_from_slice(&16u32.to_le_bytes());
    data[dirs + 36..dirs + 40].copy_from_slice(&(if signed { 0x800u32 } else { 0 }).to_le_bytes());
}

/// Runs a command, panicking with its output if it fails; returns its stdout.
pub fn run(cmd: &Path, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("run {}: {e}", cmd.display()));
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}{}",
        cmd.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether the tests run as root (loop devices, mounts).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// Partitions `target` (an image file or a block device) in Flatcar's layout, with its gaps
/// in the numbering: 1 EFI-SYSTEM, 2 BIOS-BOOT, 3 USR-A, 4 USR-B (each `usr_mib` MiB), 6 OEM,
/// 7 OEM-CONFIG, 9 ROOT (the rest). Slot A is booted and good (priority 1, successful); B is
/// all zero.
pub fn flatcar_layout(sgdisk: &Path, target: &Path, usr_mib: u64) {
    let a = format!("3:0:+{usr_mib}M");
    let b = format!("4:0:+{usr_mib}M");
    let (ta, tb) = (format!("3:{USR_TYPE}"), format!("4:{USR_TYPE}"));
    let args = [
        "-n",
        "1:0:+4M",
        "-c",
        "1:EFI-SYSTEM",
        "-t",
        "1:EF00",
        "-n",
        "2:0:+1M",
        "-c",
        "2:BIOS-BOOT",
        "-t",
        "2:EF02",
        "-n",
        &a,
        "-c",
        "3:USR-A",
        "-t",
        &ta,
        "-n",
        &b,
        "-c",
        "4:USR-B",
        "-t",
        &tb,
        "-n",
        "6:0:+2M",
        "-c",
        "6:OEM",
        "-n",
        "7:0:+1M",
        "-c",
        "7:OEM-CONFIG",
        "-n",
        "9:0:0",
        "-c",
        "9:ROOT",
        "-A",
        "3:set:48",
        "-A",
        "3:set:56",
    ];
    let mut all: Vec<&str> = args.to_vec();
    all.push(target.to_str().expect("utf-8 path"));
    run(sgdisk, &all);
}

/// A new disk-image file of `disk_mib` MiB in `dir` with [`flatcar_layout`].
pub fn flatcar_image(sgdisk: &Path, dir: &Path, disk_mib: u64, usr_mib: u64) -> PathBuf {
    let path = dir.join("disk.img");
    std::fs::File::create(&path)
        .expect("create disk image")
        .set_len(disk_mib << 20)
        .expect("size disk image");
    flatcar_layout(sgdisk, &path, usr_mib);
    path
}

/// `sgdisk -v` finds no problem.
pub fn assert_sgdisk_clean(sgdisk: &Path, target: &Path) {
    let out = run(sgdisk, &["-v", target.to_str().expect("utf-8 path")]);
    assert!(out.contains("No problems found"), "sgdisk -v {}: {out}", target.display());
}

/// The attribute flags of partition `n` as `sgdisk -i` prints them (16 hex digits).
pub fn sgdisk_attributes(sgdisk: &Path, target: &Path, n: u32) -> u64 {
    let out = run(sgdisk, &["-i", &n.to_string(), target.to_str().expect("utf-8 path")]);
    let hex = out
        .lines()
        .find_map(|l| l.strip_prefix("Attribute flags: "))
        .unwrap_or_else(|| panic!("no attribute flags in: {out}"));
    u64::from_str_radix(hex.trim(), 16).expect("hex attribute flags")
}

pub mod http;

/// Hostile GPTs for the tests: edits the table of an image file in place, byte by byte, and
/// recomputes every CRC, so that the result is valid by checksum and wrong in its layout (as a
/// bug in another tool, a bad image or an attacker would leave it).
pub mod gpt_edit {
    use std::path::Path;

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
    }

    /// Recomputes the entry-array CRC and the header CRC of the copy whose header is at `lba`.
    fn reseal(img: &mut [u8], sector: usize, lba: usize) {
        let h = lba * sector;
        let size = u32_at(img, h + 12) as usize;
        let entries = u64_at(img, h + 72) as usize * sector;
        let bytes = u32_at(img, h + 80) as usize * u32_at(img, h + 84) as usize;
        let crc = crc32fast::hash(&img[entries..entries + bytes]);
        img[h + 88..h + 92].copy_from_slice(&crc.to_le_bytes());
        img[h + 16..h + 20].fill(0);
        let crc = crc32fast::hash(&img[h..h + size]);
        img[h + 16..h + 20].copy_from_slice(&crc.to_le_bytes());
    }

    /// The LBAs of the primary and backup headers.
    fn copies(img: &[u8], sector: usize) -> [usize; 2] {
        [1, u64_at(img, sector + 32) as usize]
    }

    /// Sets the first and last LBA of partition `number` in both copies of the table.
    pub fn set_extent(path: &Path, sector: usize, number: u32, first: u64, last: u64) {
        let mut img = std::fs::read(path).expect("read disk image");
        for lba in copies(&img, sector) {
            let h = lba * sector;
            let at = u64_at(&img, h + 72) as usize * sector
                + (number as usize - 1) * u32_at(&img, h + 84) as usize;
            img[at + 32..at + 40].copy_from_slice(&first.to_le_bytes());
            img[at + 40..at + 48].copy_from_slice(&last.to_le_bytes());
            reseal(&mut img, sector, lba);
        }
        std::fs::write(path, img).expect("write disk image");
    }

    /// The first and last LBA of partition `number`, from the primary table.
    pub fn extent(path: &Path, sector: usize, number: u32) -> (u64, u64) {
        let img = std::fs::read(path).expect("read disk image");
        let at = u64_at(&img, sector + 72) as usize * sector
            + (number as usize - 1) * u32_at(&img, sector + 84) as usize;
        (u64_at(&img, at + 32), u64_at(&img, at + 40))
    }

    /// Sets the 8-byte header field at `offset` (e.g. 32, the alternate LBA) of the primary
    /// header, or of both headers, and reseals them.
    pub fn set_header_u64(path: &Path, sector: usize, offset: usize, value: u64, both: bool) {
        let mut img = std::fs::read(path).expect("read disk image");
        let lbas = copies(&img, sector);
        for &lba in if both { &lbas[..] } else { &lbas[..1] } {
            let h = lba * sector;
            img[h + offset..h + offset + 8].copy_from_slice(&value.to_le_bytes());
            let size = u32_at(&img, h + 12) as usize;
            img[h + 16..h + 20].fill(0);
            let crc = crc32fast::hash(&img[h..h + size]);
            img[h + 16..h + 20].copy_from_slice(&crc.to_le_bytes());
        }
        std::fs::write(path, img).expect("write disk image");
    }

    /// Sets the 4-byte header field at `offset` (80 the entry count, 84 the entry size) of
    /// the primary header, or of both, and reseals them: the entry-array CRC is recomputed
    /// over the array the new numbers describe when it lies on the disk.
    pub fn set_header_u32(path: &Path, sector: usize, offset: usize, value: u32, both: bool) {
        let mut img = std::fs::read(path).expect("read disk image");
        let lbas = copies(&img, sector);
        for &lba in if both { &lbas[..] } else { &lbas[..1] } {
            let h = lba * sector;
            img[h + offset..h + offset + 4].copy_from_slice(&value.to_le_bytes());
            let entries = u64_at(&img, h + 72) as usize * sector;
            let bytes = u32_at(&img, h + 80) as usize * u32_at(&img, h + 84) as usize;
            if let Some(array) = img.get(entries..entries.saturating_add(bytes)) {
                let crc = crc32fast::hash(array);
                img[h + 88..h + 92].copy_from_slice(&crc.to_le_bytes());
            }
            let size = u32_at(&img, h + 12) as usize;
            img[h + 16..h + 20].fill(0);
            let crc = crc32fast::hash(&img[h..h + size]);
            img[h + 16..h + 20].copy_from_slice(&crc.to_le_bytes());
        }
        std::fs::write(path, img).expect("write disk image");
    }
}

/// A loop device over a file; detached on drop.
#[derive(Debug)]
pub struct Loop {
    /// The device, e.g. /dev/loop3.
    pub dev: PathBuf,
    losetup: PathBuf,
}

impl Loop {
    /// Attaches `file` with the given logical sector size, or `None` (with a message) when loop
    /// devices are not available; with `ACL_REQUIRE_LOOP` set that is a failure.
    pub fn attach(file: &Path, sector: u32) -> Option<Loop> {
        let losetup = tool("losetup", "mount")?;
        let out = Command::new(&losetup)
            .args(["--find", "--show", "--sector-size", &sector.to_string()])
            .arg(file)
            .output()
            .expect("run losetup");
        if !out.status.success() {
            let msg = String::from_utf8_lossy(&out.stderr);
            assert!(std::env::var_os("ACL_REQUIRE_LOOP").is_none(), "loop devices required: {msg}");
            eprintln!("skipped: no loop device ({msg})");
            return None;
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Some(Loop { dev, losetup })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new(&self.losetup).arg("-d").arg(&self.dev).status();
    }
}

/// A server configuration with one self-signed certificate for `names` marked CA:TRUE (what
/// `openssl req -x509` makes by default). Returns that certificate as PEM and the configuration.
pub fn tls_server_self_signed(names: &[&str]) -> (String, rustls::ServerConfig) {
    let mut params = rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("self-signed certificate");
    (cert.pem(), server_config(&cert, &key))
}

/// A rustls server configuration (ring provider) serving `cert`.
fn server_config(cert: &rcgen::Certificate, key: &rcgen::KeyPair) -> rustls::ServerConfig {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server certificate")
}

/// A test CA and a server configuration whose certificate, for `names`, it signed.
/// Returns the CA certificate as PEM and the rustls server configuration (ring provider).
pub fn tls_server(names: &[&str]) -> (String, rustls::ServerConfig) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "acl test CA");
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let ca_pem = ca_params.self_signed(&ca_key).expect("CA certificate").pem();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("server key");
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let cert =
        rcgen::CertificateParams::new(names).expect("server params").signed_by(&key, &issuer).expect("sign");
    (ca_pem, server_config(&cert, &key))
}
