//! Operations on a repository directory: sign, publish, verify.
//!
//! Publishing verifies the image completely (signatures and every chunk) before anything is
//! copied, copies it under a temporary name and renames it into place, then replaces the channel
//! index atomically. A crash leaves either the old index or the new one, each with a matching
//! release directory; at worst an unreferenced temporary directory remains.

use crate::layout;
use crate::state::{AcceptedState, StateError};
use crate::trust::{TrustError, TrustPolicy};
use durable::replace_file;
use jiff::{SignedDuration, Timestamp};
use manifest::{ChannelIndex, Manifest, Release, Sha256Digest, Wave};
use signing::{Purpose, SecretKey, SignatureError, SignatureFile};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// A repository operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// A file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A document was not accepted.
    #[error(transparent)]
    Trust(Box<TrustError>),
    /// An image's payload does not match its manifest.
    #[error("image {dir}: {source}")]
    Payload {
        /// The image directory.
        dir: PathBuf,
        /// What is wrong.
        source: Box<payload::PayloadError>,
    },
    /// A signature could not be added.
    #[error("{path}: {source}")]
    Sign {
        /// The document.
        path: PathBuf,
        /// Why.
        source: SignatureError,
    },
    /// The file to sign is neither a manifest nor a channel index.
    #[error("{path} is neither an image manifest ({manifest}) nor a channel index ({index})")]
    UnknownDocument {
        /// The file.
        path: PathBuf,
        /// Why it is not a manifest.
        manifest: String,
        /// Why it is not an index.
        index: String,
    },
    /// Another image with the same version and architecture is already published.
    #[error("{path} already holds a different image {version} ({arch}); publish a new version instead")]
    AlreadyPublished {
        /// Version.
        version: semver::Version,
        /// Architecture.
        arch: String,
        /// Where.
        path: PathBuf,
    },
    /// A manifest's gzip copy (served to clients that accept gzip) is not that manifest.
    #[error("{path} does not decode to the manifest beside it; remove it or publish again")]
    StaleGzip {
        /// The gzip copy.
        path: PathBuf,
    },
    /// The repository has no channel.
    #[error("{0} has no channels/<name>/index.json: not a repository, or nothing published yet")]
    NoChannels(PathBuf),
    /// The accepted-index state file failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// Options that cannot work.
    #[error("{0}")]
    Options(String),
}

impl From<TrustError> for RepoError {
    fn from(e: TrustError) -> Self {
        RepoError::Trust(Box::new(e))
    }
}

impl RepoError {
    /// Whether this is a verification failure (bad, untrusted or stale content), as opposed to
    /// an I/O or usage problem. The CLI maps it to its own exit code.
    pub fn is_rejection(&self) -> bool {
        matches!(
            self,
            RepoError::Trust(_)
                | RepoError::Payload { .. }
                | RepoError::AlreadyPublished { .. }
                | RepoError::StaleGzip { .. }
        )
    }
}

fn read(path: &Path) -> Result<Vec<u8>, RepoError> {
    std::fs::read(path).map_err(|source| RepoError::Io { op: "read", path: path.to_owned(), source })
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RepoError {
    let path = path.to_owned();
    move |source| RepoError::Io { op, path, source }
}

/// Adds signatures by `keys` to `document`'s detached signature file, creating it if needed.
///
/// The document must be a canonical manifest or channel index; its kind decides the signature's
/// purpose. Returns that purpose.
pub fn sign_document(document: &Path, keys: &[SecretKey]) -> Result<Purpose, RepoError> {
    let bytes = read(document)?;
    let purpose = match (Manifest::from_bytes(&bytes), ChannelIndex::from_bytes(&bytes)) {
        (Ok(_), _) => Purpose::Manifest,
        (_, Ok(_)) => Purpose::ChannelIndex,
        (Err(m), Err(i)) => {
            return Err(RepoError::UnknownDocument {
                path: document.to_owned(),
                manifest: m.to_string(),
                index: i.to_string(),
            });
        }
    };
    let sig_path = layout::signature_path(document);
    let mut sigs = match std::fs::read(&sig_path) {
        Ok(b) => SignatureFile::from_bytes(&b)
            .map_err(|source| RepoError::Sign { path: sig_path.clone(), source })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => SignatureFile::default(),
        Err(e) => return Err(io("read", &sig_path)(e)),
    };
    for k in keys {
        sigs.add(purpose, &bytes, k)
            .map_err(|source| RepoError::Sign { path: document.to_owned(), source })?;
    }
    replace_file(&sig_path, &sigs.to_bytes()).map_err(io("write", &sig_path))?;
    Ok(purpose)
}

/// Verifies an image directory (manifest, signatures, every chunk of the payload).
pub fn verify_image_dir(
    dir: &Path,
    policy: &TrustPolicy,
    threads: usize,
    progress: &dyn Fn(u64, u64),
) -> Result<Manifest, RepoError> {
    let mpath = dir.join(payload::MANIFEST_FILE);
    let doc = read(&mpath)?;
    let sig = read(&layout::signature_path(&mpath))?;
    let m = policy.manifest(&mpath.display().to_string(), &doc, &sig)?;
    verify_payload(dir, &m, threads, progress)?;
    Ok(m)
}

fn verify_payload(
    dir: &Path,
    m: &Manifest,
    threads: usize,
    progress: &dyn Fn(u64, u64),
) -> Result<(), RepoError> {
    let total = m.image_size;
    payload::verify(m, &dir.join(&m.payload.path), threads, &|done| progress(done, total))
        .map_err(|source| RepoError::Payload { dir: dir.to_owned(), source: Box::new(source) })
}

/// What to publish where.
#[derive(Debug, Clone)]
pub struct PublishRequest<'a> {
    /// Repository root.
    pub repo: &'a Path,
    /// The built and signed image directory.
    pub image_dir: &'a Path,
    /// Channel to add the release to.
    pub channel: &'a str,
    /// How long the new index stays valid.
    pub expires_in: SignedDuration,
    /// Rollout waves; empty means 100% from now.
    pub waves: Vec<Wave>,
    /// The current time.
    pub now: Timestamp,
    /// Verification threads.
    pub threads: usize,
}

/// What publishing did.
#[derive(Debug, Clone)]
pub struct Published {
    /// The release as added to the index.
    pub release: Release,
    /// The new index's version.
    pub index_version: u64,
    /// Whether the image files were copied (false: already there, identical).
    pub copied: bool,
}

/// Publishes an image into a channel, signing the new channel index with `keys`.
///
/// The image must pass `policy` (so nothing the agents would refuse gets published), and the
/// new index is checked against `policy` before it replaces the old one.
pub fn publish(
    req: &PublishRequest<'_>,
    keys: &[SecretKey],
    policy: &TrustPolicy,
    progress: &dyn Fn(u64, u64),
) -> Result<Published, RepoError> {
    if req.expires_in <= SignedDuration::ZERO {
        return Err(RepoError::Options(format!("expiry {} must be positive", req.expires_in)));
    }
    let m = verify_image_dir(req.image_dir, policy, req.threads, progress)?;
    let manifest_src = req.image_dir.join(payload::MANIFEST_FILE);
    let manifest_bytes = read(&manifest_src)?;

    // Copy the image into place (or find it there already).
    let rel_dir = layout::image_dir(&m.version, &m.arch);
    let dest = req.repo.join(&rel_dir);
    let dest_manifest = dest.join(payload::MANIFEST_FILE);
    let copied = if dest_manifest.exists() {
        if read(&dest_manifest)? != manifest_bytes {
            return Err(RepoError::AlreadyPublished { version: m.version, arch: m.arch, path: dest });
        }
        // Same manifest: make sure the payload there is whole before pointing an index at it.
        verify_payload(&dest, &m, req.threads, progress)?;
        let sig = layout::signature_path(&dest_manifest);
        replace_file(&sig, &read(&layout::signature_path(&manifest_src))?).map_err(io("write", &sig))?;
        // A repository published before the gzip copies existed gets one now.
        let gz = layout::gzip_path(&dest_manifest);
        if check_gzip(&dest_manifest, &manifest_bytes).is_err() || !gz.exists() {
            replace_file(&gz, &layout::gzip_document(&manifest_bytes)).map_err(io("write", &gz))?;
        }
        false
    } else {
        copy_image(req.image_dir, &dest, &m)?;
        true
    };

    // The new index.
    let index_rel = layout::index_path(req.channel);
    let index_path = req.repo.join(&index_rel);
    let index_sig_path = layout::signature_path(&index_path);
    let mut index = if index_path.exists() {
        policy.index_ignoring_freshness(req.channel, &read(&index_path)?, &read(&index_sig_path)?)?
    } else {
        ChannelIndex::new(req.channel.to_owned(), req.now, req.now)
    };
    index.index_version += 1;
    index.issued = req.now;
    index.expires = req.now + req.expires_in;
    let waves =
        if req.waves.is_empty() { vec![Wave { start: req.now, percent: 100 }] } else { req.waves.clone() };
    let release = Release {
        version: m.version.clone(),
        arch: m.arch.clone(),
        manifest: layout::manifest_path(&m.version, &m.arch),
        manifest_sha256: Sha256Digest::of(&manifest_bytes),
        waves,
    };
    index.upsert(release.clone());
    index.validate().map_err(|source| TrustError::Index {
        what: format!("new channel index {:?}", req.channel),
        source,
    })?;
    let bytes = index.to_bytes();
    let mut sigs = SignatureFile::default();
    for k in keys {
        sigs.add(Purpose::ChannelIndex, &bytes, k)
            .map_err(|source| RepoError::Sign { path: index_path.clone(), source })?;
    }
    let sig_bytes = sigs.to_bytes();
    // Refuse to publish what the agents would refuse (too few or untrusted signing keys).
    policy.index(req.channel, &bytes, &sig_bytes, req.now, None)?;

    let channel_dir = index_path.parent().expect("index path has a parent");
    std::fs::create_dir_all(channel_dir).map_err(io("create directory", channel_dir))?;
    // The new index becomes visible without a moment where the two files disagree (issue 13:
    // the signature file was replaced first, so a reader in between, or after a crash between
    // the two, got the old index with the new signatures and refused it). Readers count only
    // signatures that match their document (signing's TUF rule), so: 1. the signature file
    // holds the old index's signatures and the new one's; 2. the new index replaces the old;
    // 3. the signature file keeps the new signatures only. Each step is one atomic rename, and
    // after a crash at any point every reader accepts the pair it reads.
    if let Some(mut both) = old_sigs(&index_path, &index_sig_path) {
        let room = signing::MAX_SIGNATURES.saturating_sub(sigs.signatures.len());
        both.signatures.truncate(room);
        both.signatures.extend(sigs.signatures.iter().cloned());
        replace_file(&index_sig_path, &both.to_bytes()).map_err(io("write", &index_sig_path))?;
    }
    replace_file(&index_path, &bytes).map_err(io("write", &index_path))?;
    replace_file(&index_sig_path, &sig_bytes).map_err(io("write", &index_sig_path))?;
    Ok(Published { release, index_version: index.index_version, copied })
}

/// The signatures of the index in place, if there is one with a readable signature file.
fn old_sigs(index: &Path, sig: &Path) -> Option<SignatureFile> {
    if !index.exists() {
        return None;
    }
    SignatureFile::from_bytes(&std::fs::read(sig).ok()?).ok()
}

fn copy_image(src: &Path, dest: &Path, m: &Manifest) -> Result<(), RepoError> {
    let parent = dest.parent().expect("image dir has a parent");
    std::fs::create_dir_all(parent).map_err(io("create directory", parent))?;
    let tmp = parent.join(format!(".{}.tmp{}", m.arch, std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io("remove", &tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(io("create directory", &tmp))?;
    let manifest = src.join(payload::MANIFEST_FILE);
    for from in [src.join(&m.payload.path), layout::signature_path(&manifest), manifest.clone()] {
        let to = tmp.join(from.file_name().expect("file name"));
        std::fs::copy(&from, &to).map_err(io("copy", &from))?;
        std::fs::File::open(&to).and_then(|f| f.sync_all()).map_err(io("sync", &to))?;
    }
    let gz = layout::gzip_path(&tmp.join(payload::MANIFEST_FILE));
    replace_file(&gz, &layout::gzip_document(&read(&manifest)?)).map_err(io("write", &gz))?;
    std::fs::rename(&tmp, dest).map_err(io("rename", &tmp))?;
    std::fs::File::open(parent).and_then(|f| f.sync_all()).map_err(io("sync", parent))?;
    Ok(())
}

/// A manifest's gzip copy, if there is one, must decode to the manifest: a web server with
/// `gzip_static on` sends the copy instead, and a stale one would be refused by every agent.
fn check_gzip(manifest: &Path, doc: &[u8]) -> Result<(), RepoError> {
    let gz = layout::gzip_path(manifest);
    match std::fs::read(&gz) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("read", &gz)(e)),
        Ok(bytes) if layout::gunzip_document(&bytes, doc.len()).as_deref() == Some(doc) => Ok(()),
        Ok(_) => Err(RepoError::StaleGzip { path: gz }),
    }
}

/// What a repository verification covered.
#[derive(Debug, Clone, Default)]
pub struct RepoReport {
    /// Per channel: name, index version, expiry, release count.
    pub channels: Vec<(String, u64, Timestamp, usize)>,
    /// Images whose every chunk was checked.
    pub images: usize,
    /// Their total size in bytes.
    pub image_bytes: u64,
}

/// Verifies every channel of a repository and every image they reference, offline.
///
/// With `state`, an index older than the one recorded there is refused, and on success the
/// newly accepted indexes are recorded (the caller saves the state).
pub fn verify_repository(
    repo: &Path,
    policy: &TrustPolicy,
    now: Timestamp,
    state: Option<&mut AcceptedState>,
    threads: usize,
    progress: &dyn Fn(&str, u64, u64),
) -> Result<RepoReport, RepoError> {
    let channels_dir = repo.join("channels");
    let mut channels: Vec<String> = match std::fs::read_dir(&channels_dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join(layout::INDEX_FILE).exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io("read directory", &channels_dir)(e)),
    };
    channels.sort();
    if channels.is_empty() {
        return Err(RepoError::NoChannels(repo.to_owned()));
    }
    let mut report = RepoReport::default();
    let mut accepted = Vec::new();
    let mut checked: BTreeSet<String> = BTreeSet::new();
    for channel in &channels {
        let path = repo.join(layout::index_path(channel));
        let last = state.as_deref().and_then(|s| s.get(channel));
        let (index, acc) =
            policy.index(channel, &read(&path)?, &read(&layout::signature_path(&path))?, now, last)?;
        for release in &index.releases {
            let mpath = repo.join(&release.manifest);
            let doc = read(&mpath)?;
            let m = policy.release_manifest(release, &doc, &read(&layout::signature_path(&mpath))?)?;
            if checked.insert(release.manifest.clone()) {
                check_gzip(&mpath, &doc)?;
                let label = format!("{} {}", m.version, m.arch);
                let dir = mpath.parent().expect("manifest path has a parent");
                verify_payload(dir, &m, threads, &|d, t| progress(&label, d, t))?;
                report.images += 1;
                report.image_bytes += m.image_size;
            }
        }
        report.channels.push((channel.clone(), index.index_version, index.expires, index.releases.len()));
        accepted.push(acc);
    }
    if let Some(state) = state {
        for a in accepted {
            state.record(a);
        }
    }
    Ok(report)
}
