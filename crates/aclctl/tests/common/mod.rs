//! Shared by the aclctl tests: signed repositories built with our own tools.
#![allow(dead_code, unreachable_pub)]

use std::path::Path;

/// Builds `image` as `version`, signs its manifest with the key of `key_seed`, and publishes it
/// into the channel "stable" of `repo`. The key's public half goes to `dir/keys/k.pub` (the
/// directory to pass to `--trust`) unless it is there. Returns the manifest.
pub fn publish(dir: &Path, repo: &Path, version: &str, image: &[u8], key_seed: u8) -> manifest::Manifest {
    let key = signing::SecretKey::from_seed([key_seed; 32]);
    if !dir.join("keys/k.pub").exists() {
        std::fs::create_dir_all(dir.join("keys")).unwrap();
        key.public().write_new(&dir.join("keys/k.pub")).unwrap();
    }
    let fs = dir.join(format!("fs-{version}.img"));
    std::fs::write(&fs, image).unwrap();
    let out = dir.join(format!("build-{version}"));
    let opts = payload::BuildOptions {
        version: version.parse().unwrap(),
        arch: std::env::consts::ARCH.into(),
        kernel_cmdline: String::new(),
        chunk_size: 256 << 10,
        level: 3,
        threads: 2,
        salt: None,
        chunk_starts: Vec::new(),
        chunk_hash: manifest::ChunkHash::Blake3,
    };
    payload::build(&fs, &out, &opts, &|_| {}).unwrap();
    repo::local::sign_document(&out.join("manifest.json"), std::slice::from_ref(&key)).unwrap();
    let policy = repo::TrustPolicy::new(signing::TrustedKeys::new([key.public()]).unwrap(), 1).unwrap();
    let req = repo::local::PublishRequest {
        repo,
        image_dir: &out,
        channel: "stable",
        expires_in: jiff::SignedDuration::from_hours(24),
        waves: vec![],
        now: jiff::Timestamp::now(),
        threads: 2,
    };
    repo::local::publish(&req, std::slice::from_ref(&key), &policy, &|_, _| {}).unwrap();
    manifest::Manifest::from_bytes(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap()
}
