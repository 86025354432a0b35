//! The fuzz targets (see the crate docs). Each property feeds one parser inputs made from its
//! seeds in `corpus/` and checks that it returns (an error or a value), never panics, and that
//! what it accepts is usable without panicking either.

use proptest::prelude::*;
use std::path::{Path, PathBuf};

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

fn seed(name: &str) -> Vec<u8> {
    std::fs::read(corpus().join(name)).unwrap_or_else(|e| panic!("seed {name}: {e}"))
}

fn cases() -> u32 {
    std::env::var("ACL_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

/// One change to a seed.
#[derive(Debug, Clone)]
enum Edit {
    /// Set the byte at (position modulo length).
    Set(usize, u8),
    /// Flip one bit.
    Flip(usize, u8),
    /// Insert bytes.
    Insert(usize, Vec<u8>),
    /// Remove a run of bytes.
    Remove(usize, usize),
    /// Copy a run of the input over another place (splices structure into itself).
    Splice(usize, usize, usize),
    /// Cut the input.
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Edit::Set(p, b)),
        (any::<usize>(), 0u8..8).prop_map(|(p, b)| Edit::Flip(p, b)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(p, v)| Edit::Insert(p, v)),
        (any::<usize>(), 1usize..64).prop_map(|(p, n)| Edit::Remove(p, n)),
        (any::<usize>(), any::<usize>(), 1usize..64).prop_map(|(a, b, n)| Edit::Splice(a, b, n)),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn apply(mut v: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let len = v.len().max(1);
        match e {
            Edit::Set(p, b) if !v.is_empty() => v[p % len] = *b,
            Edit::Flip(p, b) if !v.is_empty() => v[p % len] ^= 1 << b,
            Edit::Insert(p, bytes) => {
                let at = p % (v.len() + 1);
                v.splice(at..at, bytes.iter().copied());
            }
            Edit::Remove(p, n) if !v.is_empty() => {
                let at = p % len;
                let end = (at + n).min(v.len());
                v.drain(at..end);
            }
            Edit::Splice(a, b, n) if !v.is_empty() => {
                let (from, to) = (a % len, b % len);
                let n = (*n).min(v.len() - from).min(v.len() - to);
                let chunk = v[from..from + n].to_vec();
                v[to..to + n].copy_from_slice(&chunk);
            }
            Edit::Truncate(p) => v.truncate(p % (v.len() + 1)),
            _ => {}
        }
    }
    v
}

/// Inputs for a parser: its seeds mutated, or raw random bytes.
fn inputs(seeds: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    let mutated = (0..seeds.len(), prop::collection::vec(edit(), 1..6))
        .prop_map(move |(i, edits)| apply(seed(seeds[i]), &edits));
    prop_oneof![4 => mutated, 1 => prop::collection::vec(any::<u8>(), 0..2048)]
}

fn trusted() -> (signing::TrustedKeys, signing::SecretKey) {
    let key = signing::SecretKey::from_seed([3; 32]);
    (signing::TrustedKeys::new([key.public()]).unwrap(), key)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn manifest(data in inputs(&["manifest.json", "manifest-v2.json"])) {
        if let Ok(m) = manifest::Manifest::from_bytes(&data)
            && m.validate().is_ok()
        {
            for i in 0..m.chunks.len() {
                let r = m.chunk_range(i);
                prop_assert!(r.start <= r.end);
            }
        }
    }

    #[test]
    fn channel_index(data in inputs(&["index.json"])) {
        if let Ok(i) = manifest::ChannelIndex::from_bytes(&data) {
            let _ = i.validate();
            let _ = i.latest("x86_64");
        }
    }

    #[test]
    fn signature_file(data in inputs(&["index.json.sig", "manifest.json.sig"])) {
        let (keys, _) = trusted();
        if let Ok(f) = signing::SignatureFile::from_bytes(&data) {
            let index = seed("index.json");
            let _ = signing::verify(signing::Purpose::ChannelIndex, &index, &f, &keys, 1);
        }
    }

    #[test]
    fn trust_policy_index(data in inputs(&["index.json"]), sig in inputs(&["index.json.sig"])) {
        let (keys, _) = trusted();
        let policy = repo::TrustPolicy::new(keys, 1).unwrap();
        let now = "2026-11-30T12:00:00Z".parse().unwrap();
        let _ = policy.index("stable", &data, &sig, now, None);
    }

    #[test]
    fn slot_trailer(data in inputs(&["trailer.bin"])) {
        // The trailer sits at the end of the partition: the input is the partition's tail.
        let part_len = 1u64 << 20;
        let tail = data.len() as u64;
        let read = |o: u64, buf: &mut [u8]| -> std::io::Result<()> {
            buf.fill(0);
            let start = part_len.saturating_sub(tail);
            for (i, b) in buf.iter_mut().enumerate() {
                let at = o + i as u64;
                if at >= start && at < part_len {
                    *b = data[(at - start) as usize];
                }
            }
            Ok(())
        };
        if let Ok((m, s)) = trailer::read(part_len, read) {
            prop_assert!((m.len() + s.len()) as u64 <= trailer::MAX_BYTES);
        }
    }

    #[test]
    fn gpt(head in inputs(&["gpt-head.bin"]), tail in inputs(&["gpt-tail.bin"])) {
        let dev = Sparse { size: 64 << 20, head, tail };
        if let Ok(d) = slot::Disk::from_device(dev, Path::new("fuzz")) {
            let _ = d.check_layout();
            for s in slot::choice::Slot::BOTH {
                if let Ok((base, len)) = d.slot_extent(s) {
                    prop_assert!(base.checked_add(len).is_some_and(|end| end <= 64 << 20));
                }
            }
        }
    }

    #[test]
    fn node_annotations(pairs in prop::collection::vec((0usize..ANNOTATIONS.len(), inputs(&["annotation-values.txt"])), 0..6)) {
        let map = pairs
            .into_iter()
            .map(|(k, v)| (ANNOTATIONS[k].to_owned(), String::from_utf8_lossy(&v).into_owned()))
            .collect();
        let r = cluster::annotations::requests(&map);
        // A value that is not exactly "true" never allows a downgrade.
        prop_assert!(!r.allow_downgrade || map.get(cluster::annotations::ALLOW_DOWNGRADE).is_some_and(|v| v.trim() == "true"));
        let _ = cluster::annotations::RebootRequest::parse(map.get(cluster::annotations::REBOOT_REQUEST).map(String::as_str));
    }

    #[test]
    fn local_api_request(line in inputs(&["api-requests.txt"])) {
        for l in String::from_utf8_lossy(&line).lines() {
            let _ = serde_json::from_str::<agent::api::RequestLine>(l);
        }
    }
}

const ANNOTATIONS: &[&str] = &[
    cluster::annotations::UPDATE,
    cluster::annotations::ROLLBACK,
    cluster::annotations::PAUSED,
    cluster::annotations::REBOOT,
    cluster::annotations::ALLOW_DOWNGRADE,
    cluster::annotations::REBOOT_REQUEST,
    cluster::annotations::REBOOT_ALLOWED,
    cluster::annotations::LOCK,
];

/// A disk image of `size` bytes that is zero but for its first and last bytes (where the GPT
/// copies are), so each case costs kilobytes, not the whole image.
struct Sparse {
    size: u64,
    head: Vec<u8>,
    tail: Vec<u8>,
}

impl slot::table::BlockDevice for Sparse {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.size)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).ok_or(std::io::ErrorKind::InvalidInput)?;
        if end > self.size {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let tail_start = self.size - self.tail.len() as u64;
        for (i, b) in buf.iter_mut().enumerate() {
            let at = offset + i as u64;
            *b = if (at as usize) < self.head.len() {
                self.head[at as usize]
            } else if at >= tail_start {
                self.tail[(at - tail_start) as usize]
            } else {
                0
            };
        }
        Ok(())
    }
    fn write_at(&mut self, _: &[u8], _: u64) -> std::io::Result<()> {
        Err(std::io::ErrorKind::PermissionDenied.into())
    }
    fn sync(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The manifest seeds are whole documents of both formats, so that mutations start from
/// something every parser stage accepts.
#[test]
fn the_manifest_seeds_parse_and_validate_in_both_formats() {
    for (name, format) in [("manifest.json", 1), ("manifest-v2.json", 2)] {
        let m = manifest::Manifest::from_bytes(&seed(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((m.format, m.validate()), (format, Ok(())), "{name}");
    }
}

/// Regenerates the seeds in `corpus/` (run by hand; the seeds are kept in the repository).
#[test]
#[ignore = "writes the seed corpus"]
fn write_corpus() {
    let out = corpus();
    std::fs::create_dir_all(&out).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (keys, key) = trusted();
    // A small image: a manifest with a few chunks.
    let fs = dir.path().join("fs.img");
    std::fs::write(&fs, (0..256u32 << 10).map(|i| (i / 1000) as u8).collect::<Vec<u8>>()).unwrap();
    let build = dir.path().join("build");
    let opts = payload::BuildOptions {
        version: "2.0.0".parse().unwrap(),
        arch: "x86_64".into(),
        kernel_cmdline: "console=ttyS0".into(),
        chunk_size: 64 << 10,
        level: 1,
        threads: 1,
        salt: None,
        chunk_starts: Vec::new(),
        chunk_hash: manifest::ChunkHash::Blake3,
    };
    payload::build(&fs, &build, &opts, &|_| {}).unwrap();
    repo::local::sign_document(&build.join("manifest.json"), std::slice::from_ref(&key)).unwrap();
    let policy = repo::TrustPolicy::new(keys, 1).unwrap();
    let repo_dir = dir.path().join("repo");
    let req = repo::local::PublishRequest {
        repo: &repo_dir,
        image_dir: &build,
        channel: "stable",
        expires_in: jiff::SignedDuration::from_hours(24 * 365 * 10),
        waves: vec![],
        now: "2026-11-30T00:00:00Z".parse().unwrap(),
        threads: 1,
    };
    repo::local::publish(&req, std::slice::from_ref(&key), &policy, &|_, _| {}).unwrap();
    let copy = |from: &Path, name: &str| std::fs::copy(from, out.join(name)).unwrap();
    copy(&build.join("manifest.json"), "manifest-v2.json");
    // The same image in manifest format 1 (SHA-256 chunk digests), as older publishers wrote it.
    let build1 = dir.path().join("build1");
    let opts1 = payload::BuildOptions { chunk_hash: manifest::ChunkHash::Sha256, ..opts };
    payload::build(&fs, &build1, &opts1, &|_| {}).unwrap();
    copy(&build1.join("manifest.json"), "manifest.json");
    copy(&build.join("manifest.json.sig"), "manifest.json.sig");
    copy(&repo_dir.join("channels/stable/index.json"), "index.json");
    copy(&repo_dir.join("channels/stable/index.json.sig"), "index.json.sig");
    let (m, s) = (
        std::fs::read(build.join("manifest.json")).unwrap(),
        std::fs::read(build.join("manifest.json.sig")).unwrap(),
    );
    std::fs::write(out.join("trailer.bin"), trailer::encode(&m, &s, 1 << 20).1).unwrap();
    // A GPT in Flatcar's layout, made by sgdisk: its first 34 and last 33 sectors.
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
    let sgdisk = Path::new("/usr/sbin/sgdisk");
    let status = std::process::Command::new(sgdisk)
        .args(["-n", "1:0:+4M", "-c", "1:EFI-SYSTEM", "-t", "1:EF00", "-n", "3:0:+16M", "-c", "3:USR-A"])
        .args(["-t", "3:5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6", "-n", "4:0:+16M", "-c", "4:USR-B"])
        .args(["-t", "4:5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6", "-n", "9:0:0", "-c", "9:ROOT"])
        .args(["-A", "3:set:48", "-A", "3:set:56"])
        .arg(&img)
        .status()
        .unwrap();
    assert!(status.success());
    let bytes = std::fs::read(&img).unwrap();
    std::fs::write(out.join("gpt-head.bin"), &bytes[..34 * 512]).unwrap();
    std::fs::write(out.join("gpt-tail.bin"), &bytes[bytes.len() - 33 * 512..]).unwrap();
    std::fs::write(
        out.join("annotation-values.txt"),
        "2.1.0\nlatest\nnow\ntrue\nfalse\n3\n0\n65\nnode-7 2026-11-30T10:00:00Z\n",
    )
    .unwrap();
    std::fs::write(
        out.join("api-requests.txt"),
        concat!(
            "{\"request\":\"status\"}\n",
            "{\"request\":\"check-now\"}\n",
            "{\"request\":{\"rollback\":{\"now\":true}}}\n",
            "{\"request\":{\"update\":{\"version\":\"2.1.0\"}}}\n",
            "{\"request\":{\"update\":{\"version\":null}}}\n",
            "{\"request\":\"pause\"}\n",
        ),
    )
    .unwrap();
}
