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

/// The path of `document`'s gzip copy (`<document>.gz`), which a web server with
/// `gzip_static on` sends to a client that accepts gzip.
pub fn gzip_path(document: &Path) -> PathBuf {
    let mut s = document.as_os_str().to_owned();
    s.push(".gz");
    PathBuf::from(s)
}

/// `document` gzip-compressed, the same bytes for the same input (no file name, time 0): the
/// copy served for [`gzip_path`]. Manifests are immutable once published, so the copy cannot
/// go stale; channel indexes, which change, get none.
pub fn gzip_document(document: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut enc = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::best());
    enc.write_all(document).expect("writing to memory");
    enc.finish().expect("writing to memory")
}

/// Decodes a [`gzip_document`] copy (at most `limit` bytes); `None` if it does not decode.
pub fn gunzip_document(gz: &[u8], limit: usize) -> Option<Vec<u8>> {
    use std::io::Read as _;
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(gz).take(limit as u64 + 1).read_to_end(&mut out).ok()?;
    (out.len() <= limit).then_some(out)
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
    fn gzip_copies_are_stable_and_decode() {
        let doc = br#"{"chunks":[{"sha256":"00ff"}]}"#.repeat(50);
        let gz = super::gzip_document(&doc);
        assert_eq!(gz, super::gzip_document(&doc), "same bytes each time");
        assert!(gz.len() < doc.len() / 4, "{} of {}", gz.len(), doc.len());
        assert_eq!(super::gunzip_document(&gz, doc.len()).as_deref(), Some(&doc[..]));
        assert_eq!(super::gunzip_document(&gz, doc.len() - 1), None, "over the limit");
        assert_eq!(super::gunzip_document(&gz[..gz.len() - 4], doc.len()), None, "cut short");
        assert_eq!(super::gunzip_document(b"not gzip", 100), None);
    }

    #[test]
    fn payload_sits_next_to_its_manifest() {
        assert_eq!(
            super::payload_path("images/1.0.0/x86_64/manifest.json", "payload"),
            "images/1.0.0/x86_64/payload"
        );
        assert_eq!(super::payload_path("manifest.json", "payload"), "payload");
    }
}
