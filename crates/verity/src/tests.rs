//! Tests of the tree against its definition and against Debian's `veritysetup`.

use super::*;
use std::process::Command;

fn params(salt: &[u8]) -> Params {
    Params::new(4096, 4096, salt.to_vec()).unwrap()
}

/// Deterministic, not very compressible test data.
fn data(blocks: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..blocks * 4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn level_sizes_follow_cryptsetup() {
    let p = params(b"");
    assert_eq!(p.level_sizes(1), Vec::<u64>::new());
    assert_eq!(p.level_sizes(2), vec![1]);
    assert_eq!(p.level_sizes(128), vec![1]);
    assert_eq!(p.level_sizes(129), vec![2, 1]);
    assert_eq!(p.level_sizes(128 * 128), vec![128, 1]);
    assert_eq!(p.level_sizes(128 * 128 + 1), vec![129, 2, 1]);
    assert_eq!(p.tree_size(129), 3 * 4096);
}

#[test]
fn tree_bytes_have_the_predicted_size() {
    let p = params(b"salt");
    for blocks in [1, 2, 127, 128, 129, 300] {
        let t = HashTree::of_data(&p, &data(blocks)).unwrap();
        assert_eq!(t.bytes().len() as u64, p.tree_size(blocks as u64), "{blocks} blocks");
    }
}

#[test]
fn one_block_root_is_its_digest() {
    let p = params(b"s");
    let d = data(1);
    let t = HashTree::of_data(&p, &d).unwrap();
    let mut h = Sha256::new();
    h.update(b"s");
    h.update(&d);
    assert_eq!(t.root_hash(), &<[u8; 32]>::from(h.finalize()));
}

#[test]
fn bad_inputs_are_named() {
    assert_eq!(
        Params::new(4000, 4096, vec![]).unwrap_err().to_string(),
        "verity data block size 4000 is not a power of two between 512 and 65536"
    );
    assert!(matches!(Params::new(4096, 4096, vec![0; 257]), Err(VerityError::SaltTooLong(257))));
    assert!(matches!(leaf_digests(&params(b""), &[0; 100]), Err(VerityError::PartialBlock { .. })));
    assert_eq!(HashTree::from_leaves(&params(b""), &[]), Err(VerityError::Empty));
}

#[test]
fn changing_one_byte_changes_the_root() {
    let p = params(b"salt");
    let mut d = data(200);
    let before = *HashTree::of_data(&p, &d).unwrap().root_hash();
    d[150 * 4096 + 7] ^= 1;
    assert_ne!(before, *HashTree::of_data(&p, &d).unwrap().root_hash());
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs `veritysetup format --no-superblock` and compares the hash file and the root hash.
///
/// Skips with a message when veritysetup is missing, unless `ACL_REQUIRE_TOOLS` is set (as
/// `cargo xtask test` and CI do), where a missing tool is a failure.
#[test]
fn matches_veritysetup() {
    let tool =
        ["/usr/sbin/veritysetup", "/sbin/veritysetup"].into_iter().find(|p| std::path::Path::new(p).exists());
    let Some(tool) = tool else {
        assert!(std::env::var_os("ACL_REQUIRE_TOOLS").is_none(), "veritysetup (cryptsetup-bin) is required");
        eprintln!("skipped: veritysetup not installed (apt-get install cryptsetup-bin)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // 1 block (no tree), one level, two levels, three levels; several salts and block sizes.
    let cases: &[(usize, u32, u32, &[u8])] = &[
        (1, 4096, 4096, b"\x01\x02"),
        (77, 4096, 4096, b""),
        (128, 4096, 4096, &[0xab; 32]),
        (1000, 4096, 4096, &[0x5a; 32]),
        (16_385, 4096, 4096, b"salt"),
        (300, 4096, 1024, &[7; 256]),
    ];
    for &(blocks, dbs, hbs, salt) in cases {
        let p = Params::new(dbs, hbs, salt.to_vec()).unwrap();
        let d = data(blocks * 4096 / dbs as usize);
        let ours = HashTree::of_data(&p, &d).unwrap();
        let data_path = dir.path().join("data");
        let hash_path = dir.path().join("hash");
        std::fs::write(&data_path, &d).unwrap();
        std::fs::write(&hash_path, b"").unwrap();
        let salt_arg = if salt.is_empty() { "-".to_string() } else { hex(salt) };
        let out = Command::new(tool)
            .args(["format", "--no-superblock", "--hash=sha256", "--format=1"])
            .arg(format!("--data-block-size={dbs}"))
            .arg(format!("--hash-block-size={hbs}"))
            .arg(format!("--salt={salt_arg}"))
            .arg(&data_path)
            .arg(&hash_path)
            .output()
            .unwrap();
        assert!(out.status.success(), "veritysetup failed: {}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8(out.stdout).unwrap();
        let root = stdout
            .lines()
            .find_map(|l| l.strip_prefix("Root hash:"))
            .expect("veritysetup printed no root hash")
            .trim()
            .to_string();
        assert_eq!(root, hex(ours.root_hash()), "root hash, {blocks} blocks");
        let theirs = std::fs::read(&hash_path).unwrap();
        assert_eq!(theirs.len(), ours.bytes().len(), "tree size, {blocks} blocks");
        assert!(theirs == ours.bytes(), "tree bytes differ, {blocks} blocks");
    }
}

/// The streamed tree is the tree: same bytes at the same offsets, same root, for every size up
/// to four levels of small hash blocks, each block handed out once.
#[test]
fn streamed_tree_matches_the_whole_tree() {
    for hbs in [512u32, 4096] {
        let p = Params::new(4096, hbs, b"salt".to_vec()).unwrap();
        let sizes: Vec<u64> =
            if hbs == 512 { (1..=600).collect() } else { vec![1, 2, 127, 128, 129, 16_385] };
        for blocks in sizes {
            let leaves: Vec<Digest32> = (0..blocks).map(|i| Sha256::digest(i.to_le_bytes()).into()).collect();
            let whole = HashTree::from_leaves(&p, &leaves).unwrap();
            let mut got = vec![0xEEu8; whole.bytes().len()];
            let mut handed = 0u64;
            let mut emit = |at: u64, b: &[u8]| {
                got[at as usize..at as usize + b.len()].copy_from_slice(b);
                handed += b.len() as u64;
                Ok(())
            };
            let mut s = TreeStream::new(&p, blocks).unwrap();
            for l in &leaves {
                s.push(l, &mut emit).unwrap();
            }
            let root = s.finish(&mut emit).unwrap();
            assert_eq!(&root, whole.root_hash(), "{blocks} blocks of {hbs}");
            assert_eq!(handed, whole.bytes().len() as u64, "{blocks} blocks of {hbs}: each block once");
            assert!(got == whole.bytes(), "{blocks} blocks of {hbs}");
        }
    }
}

#[test]
fn a_stream_given_too_few_or_too_many_leaves_says_so() {
    let p = params(b"s");
    let mut none = |_: u64, _: &[u8]| Ok(());
    assert_eq!(TreeStream::new(&p, 0).unwrap_err(), VerityError::Empty);
    let mut s = TreeStream::new(&p, 3).unwrap();
    s.push(&[1; 32], &mut none).unwrap();
    assert!(s.finish(&mut none).unwrap_err().to_string().contains("1 of the 3 leaves"));
    let mut s = TreeStream::new(&p, 1).unwrap();
    s.push(&[1; 32], &mut none).unwrap();
    assert!(s.push(&[2; 32], &mut none).is_err());
    assert_eq!(s.finish(&mut none).unwrap(), [1; 32]);
}
