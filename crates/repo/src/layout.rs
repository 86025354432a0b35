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
