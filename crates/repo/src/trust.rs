//! Accepting documents: signatures first, then parsing, then consistency and freshness.
//!
//! The order matters: nothing of a document is parsed until enough trusted keys have signed its
//! exact bytes, so a parser bug cannot be reached by an unsigned document. These functions take
//! bytes and return values; fetching the bytes and persisting [`manifest::Accepted`] is the
//! caller's job.

use jiff::Timestamp;
use manifest::{
    Accepted, ChannelIndex, DocumentError, FreshnessError, IndexError, Manifest, ManifestError, Release,
    Sha256Digest,
};
use signing::{Purpose, SignatureError, SignatureFile, TrustedKeys};

/// The keys a verifier trusts and how many of them must sign.
#[derive(Debug, Clone)]
pub struct TrustPolicy {
    keys: TrustedKeys,
    threshold: usize,
}

/// Why a document is not accepted.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// Its signatures do not satisfy the policy.
    #[error("{what}: {source}")]
    Signature {
        /// Which document.
        what: String,
        /// What is wrong with its signatures.
        source: SignatureError,
    },
    /// It does not parse.
    #[error("{what}: {source}")]
    Document {
        /// Which document.
        what: String,
        /// The parse error.
        source: DocumentError,
    },
    /// The manifest is inconsistent.
    #[error("{what}: {source}")]
    Manifest {
        /// Which document.
        what: String,
        /// The inconsistency.
        source: ManifestError,
    },
    /// The channel index is inconsistent.
    #[error("{what}: {source}")]
    Index {
        /// Which document.
        what: String,
        /// The inconsistency.
        source: IndexError,
    },
    /// The channel index is authentic but must not be used now.
    #[error("{what}: {source}")]
    Freshness {
        /// Which document.
        what: String,
        /// Why.
        source: FreshnessError,
    },
    /// The manifest's bytes are not the ones the index names.
    #[error("manifest of release {release}: SHA-256 is {found}, the channel index says {expected}")]
    ManifestDigest {
        /// The release (version).
        release: String,
        /// Digest in the index.
        expected: Sha256Digest,
        /// Digest of the bytes.
        found: Sha256Digest,
    },
    /// The manifest describes another version or architecture than its release entry.
    #[error("manifest for release {release} describes {found}")]
    ManifestMismatch {
        /// Release version and arch.
        release: String,
        /// Manifest version and arch.
        found: String,
    },
}

impl TrustPolicy {
    /// A policy; refuses a threshold of 0 or above the number of keys.
    pub fn new(keys: TrustedKeys, threshold: usize) -> Result<Self, String> {
        if threshold == 0 || threshold > keys.len() {
            return Err(format!(
                "signature threshold {threshold} must be between 1 and the {} trusted keys",
                keys.len()
            ));
        }
        Ok(Self { keys, threshold })
    }

    /// The number of signatures required.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    fn check(&self, purpose: Purpose, what: &str, document: &[u8], sig: &[u8]) -> Result<(), TrustError> {
        let err = |source| TrustError::Signature { what: what.to_owned(), source };
        let sigs = SignatureFile::from_bytes(sig).map_err(err)?;
        signing::verify(purpose, document, &sigs, &self.keys, self.threshold).map_err(err)?;
        Ok(())
    }

    /// Accepts a manifest: signatures, canonical form, consistency.
    pub fn manifest(&self, what: &str, document: &[u8], sig: &[u8]) -> Result<Manifest, TrustError> {
        self.check(Purpose::Manifest, what, document, sig)?;
        let m = Manifest::from_bytes(document)
            .map_err(|source| TrustError::Document { what: what.to_owned(), source })?;
        m.validate().map_err(|source| TrustError::Manifest { what: what.to_owned(), source })?;
        Ok(m)
    }

    /// Accepts the manifest of `release` from an index already accepted: its bytes must be the
    /// ones the index names, and it must describe that release.
    pub fn release_manifest(
        &self,
        release: &Release,
        document: &[u8],
        sig: &[u8],
    ) -> Result<Manifest, TrustError> {
        let found = Sha256Digest::of(document);
        if found != release.manifest_sha256 {
            return Err(TrustError::ManifestDigest {
                release: release.version.to_string(),
                expected: release.manifest_sha256,
                found,
            });
        }
        let m = self.manifest(&release.manifest, document, sig)?;
        if m.version != release.version || m.arch != release.arch {
            return Err(TrustError::ManifestMismatch {
                release: format!("{} ({})", release.version, release.arch),
                found: format!("{} ({})", m.version, m.arch),
            });
        }
        Ok(m)
    }

    /// Accepts a channel index for use at `now`, given the newest accepted before on this
    /// channel. Returns the index and what to remember as accepted.
    pub fn index(
        &self,
        channel: &str,
        document: &[u8],
        sig: &[u8],
        now: Timestamp,
        last: Option<&Accepted>,
    ) -> Result<(ChannelIndex, Accepted), TrustError> {
        let index = self.index_ignoring_freshness(channel, document, sig)?;
        let what = format!("channel index {channel:?}");
        let accepted = index
            .check_fresh(channel, Sha256Digest::of(document), now, last)
            .map_err(|source| TrustError::Freshness { what, source })?;
        Ok((index, accepted))
    }

    /// Accepts a channel index's signatures and content without the expiry and replay checks.
    /// Only for the publisher, which must read an expired index to replace it.
    pub fn index_ignoring_freshness(
        &self,
        channel: &str,
        document: &[u8],
        sig: &[u8],
    ) -> Result<ChannelIndex, TrustError> {
        let what = format!("channel index {channel:?}");
        self.check(Purpose::ChannelIndex, &what, document, sig)?;
        let index = ChannelIndex::from_bytes(document)
            .map_err(|source| TrustError::Document { what: what.clone(), source })?;
        index.validate().map_err(|source| TrustError::Index { what, source })?;
        Ok(index)
    }
}
