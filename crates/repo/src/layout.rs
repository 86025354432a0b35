//! Where each file of a repository lies, relative to its root.

use std::path::{Path, PathBuf};

/// File name of a channel index.
pub const INDEX_FILE: &str = "index.json";

/// The path of `document`'s detached signature file (`<document>.sig`).
pub fn signature_path(document: &Path) -> PathBuf {
    let mut s = document.as_os_str().to_owned();
    s.push(".sig");
    PathBuf::from(s)
}

/// The channel index of `channel`, relative to the repository root.
pub fn index_path(channel: &str) -> String {
    format!("channels/{channel}/{INDEX_FILE}")
}

/// The directory of an image, relative to the repository root.
pub fn image_dir(version: &semver::Version, arch: &str) -> String {
    format!("images/{version}/{arch}")
}

/// The manifest of an image, relative to the repository root (as the index records it).
pub fn manifest_path(version: &semver::Version, arch: &str) -> String {
    format!("{}/{}", image_dir(version, arch), payload::MANIFEST_FILE)
}

/// The payload's path relative to the repository root, for a manifest at `manifest_path`
/// (relative to the root) naming `payload_file` (relative to the manifest).
pub fn payload_path(manifest_path: &str, payload_file: &str) -> String {
    match manifest_path.rsplit_once('/') {
        Some((dir, _)) => format!("{dir}/{payload_file}"),
        None => payload_file.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn payload_sits_next_to_its_manifest() {
        assert_eq!(
            super::payload_path("images/1.0.0/x86_64/manifest.json", "payload"),
            "images/1.0.0/x86_64/payload"
        );
        assert_eq!(super::payload_path("manifest.json", "payload"), "payload");
    }
}
