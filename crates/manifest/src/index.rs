//! The channel index: which releases a channel offers, until when, and in which rollout waves.
//!
//! The index is the one document an agent fetches on every check, so it carries what protects
//! against a repository that lies by omission: a version number that only grows
//! (`index_version`) and an expiry time. An agent remembers the newest index it accepted
//! ([`Accepted`]) and refuses an older one (a replay) or a different one with the same number (a
//! fork); it refuses an expired one (a freeze). [`ChannelIndex::check_fresh`] is that rule as
//! a pure function.

use crate::{DocumentError, FORMAT_VERSION, Sha256Digest, from_canonical, to_canonical};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum IndexType {
    #[serde(rename = "acl-channel-index")]
    Index,
}

/// A signed channel index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelIndex {
    #[serde(rename = "type")]
    kind: IndexType,
    /// Document format version ([`FORMAT_VERSION`]).
    pub format: u32,
    /// The channel's name, for example `stable`.
    pub channel: String,
    /// Grows by at least one with every publication.
    pub index_version: u64,
    /// When this index was made.
    pub issued: Timestamp,
    /// After this instant the index must not be used.
    pub expires: Timestamp,
    /// Releases, in ascending version order.
    pub releases: Vec<Release>,
}

/// One release offered by a channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    /// The OS version.
    pub version: semver::Version,
    /// The architecture of the image.
    pub arch: String,
    /// Path of the manifest relative to the repository root.
    pub manifest: String,
    /// SHA-256 of the manifest's bytes; binds the index to exactly one manifest.
    pub manifest_sha256: Sha256Digest,
    /// The rollout: from each wave's start, that percentage of machines may update.
    pub waves: Vec<Wave>,
}

/// One rollout wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wave {
    /// From when the wave applies.
    pub start: Timestamp,
    /// Percentage of machines (1 to 100) allowed from then on.
    pub percent: u8,
}

/// What an agent remembers of the newest index it accepted on a channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Accepted {
    /// The channel.
    pub channel: String,
    /// Its `index_version`.
    pub index_version: u64,
    /// SHA-256 of its bytes.
    pub sha256: Sha256Digest,
}

/// An index that parses but is not consistent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    /// A format version this code does not know.
    #[error("channel index format {0} is not supported (this agent reads format {FORMAT_VERSION})")]
    UnsupportedFormat(u32),
    /// A channel name with characters outside `[a-z0-9._-]`.
    #[error("channel name {0:?} must be 1-64 characters of a-z, 0-9, '.', '_', '-'")]
    BadChannelName(String),
    /// Expiry not after issue time.
    #[error("channel index expires ({expires}) before it was issued ({issued})")]
    ExpiresBeforeIssued {
        /// Issue time.
        issued: Timestamp,
        /// Expiry.
        expires: Timestamp,
    },
    /// Two releases with the same version and architecture, or out of order.
    #[error("releases are not in strictly ascending version order at {version} ({arch})")]
    ReleaseOrder {
        /// The offending version.
        version: semver::Version,
        /// Its architecture.
        arch: String,
    },
    /// A manifest path that is absolute or climbs out of the repository.
    #[error("release {version}: manifest path {path:?} must be relative and stay inside the repository")]
    BadManifestPath {
        /// The release.
        version: semver::Version,
        /// The path.
        path: String,
    },
    /// Waves that are empty, out of order or out of range.
    #[error(
        "release {version}: rollout waves must be non-empty, with increasing start times and percentages in 1..=100"
    )]
    BadWaves {
        /// The release.
        version: semver::Version,
    },
}

/// Why an authentic index must still not be used now.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FreshnessError {
    /// Past its expiry time.
    #[error(
        "channel index for {channel:?} expired at {expires} (now {now}); the repository is stale or frozen"
    )]
    Expired {
        /// The channel.
        channel: String,
        /// Expiry.
        expires: Timestamp,
        /// The time of the check.
        now: Timestamp,
    },
    /// Older than the newest accepted index.
    #[error(
        "channel index for {channel:?} has version {offered}, older than version {accepted} already \
         accepted (replayed or rolled-back repository)"
    )]
    Older {
        /// The channel.
        channel: String,
        /// The version offered now.
        offered: u64,
        /// The newest version accepted before.
        accepted: u64,
    },
    /// Same version number as the accepted index, different content.
    #[error(
        "channel index for {channel:?} version {version} differs from the one already accepted with that version"
    )]
    Forked {
        /// The channel.
        channel: String,
        /// The version.
        version: u64,
    },
    /// The index is for another channel than the one asked for.
    #[error("channel index is for channel {found:?}, expected {expected:?}")]
    WrongChannel {
        /// Asked for.
        expected: String,
        /// Found.
        found: String,
    },
}

fn valid_channel_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && !name.starts_with('.')
}

impl ChannelIndex {
    /// An empty index for `channel` (version 0; publishing bumps it before signing).
    pub fn new(channel: String, issued: Timestamp, expires: Timestamp) -> Self {
        Self {
            kind: IndexType::Index,
            format: FORMAT_VERSION,
            channel,
            index_version: 0,
            issued,
            expires,
            releases: Vec::new(),
        }
    }

    /// The canonical bytes, which are what is signed and stored.
    pub fn to_bytes(&self) -> Vec<u8> {
        to_canonical(self)
    }

    /// Parses canonical bytes. Call [`Self::validate`] and [`Self::check_fresh`] before use.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DocumentError> {
        from_canonical("channel index", bytes)
    }

    /// Checks the index's internal consistency.
    pub fn validate(&self) -> Result<(), IndexError> {
        if self.format != FORMAT_VERSION {
            return Err(IndexError::UnsupportedFormat(self.format));
        }
        if !valid_channel_name(&self.channel) {
            return Err(IndexError::BadChannelName(self.channel.clone()));
        }
        if self.expires <= self.issued {
            return Err(IndexError::ExpiresBeforeIssued { issued: self.issued, expires: self.expires });
        }
        for (i, r) in self.releases.iter().enumerate() {
            if let Some(prev) = i.checked_sub(1).map(|p| &self.releases[p]) {
                let ordered = (&prev.version, &prev.arch) < (&r.version, &r.arch);
                if !ordered {
                    return Err(IndexError::ReleaseOrder {
                        version: r.version.clone(),
                        arch: r.arch.clone(),
                    });
                }
            }
            let path_ok = !r.manifest.is_empty()
                && !r.manifest.starts_with('/')
                && r.manifest.split('/').all(|c| !c.is_empty() && c != "." && c != "..");
            if !path_ok {
                return Err(IndexError::BadManifestPath {
                    version: r.version.clone(),
                    path: r.manifest.clone(),
                });
            }
            let waves_ok = !r.waves.is_empty()
                && r.waves.iter().all(|w| (1..=100).contains(&w.percent))
                && r.waves.windows(2).all(|w| w[0].start < w[1].start && w[0].percent < w[1].percent);
            if !waves_ok {
                return Err(IndexError::BadWaves { version: r.version.clone() });
            }
        }
        Ok(())
    }

    /// Whether this index, with bytes of digest `sha256`, may be used at `now` on `channel`,
    /// given the newest index accepted before. Pure: the caller persists the new [`Accepted`].
    pub fn check_fresh(
        &self,
        channel: &str,
        sha256: Sha256Digest,
        now: Timestamp,
        last: Option<&Accepted>,
    ) -> Result<Accepted, FreshnessError> {
        if self.channel != channel {
            return Err(FreshnessError::WrongChannel {
                expected: channel.into(),
                found: self.channel.clone(),
            });
        }
        if now >= self.expires {
            return Err(FreshnessError::Expired {
                channel: self.channel.clone(),
                expires: self.expires,
                now,
            });
        }
        if let Some(last) = last.filter(|l| l.channel == self.channel) {
            if self.index_version < last.index_version {
                return Err(FreshnessError::Older {
                    channel: self.channel.clone(),
                    offered: self.index_version,
                    accepted: last.index_version,
                });
            }
            if self.index_version == last.index_version && sha256 != last.sha256 {
                return Err(FreshnessError::Forked {
                    channel: self.channel.clone(),
                    version: self.index_version,
                });
            }
        }
        Ok(Accepted { channel: self.channel.clone(), index_version: self.index_version, sha256 })
    }

    /// The newest release for `arch`.
    pub fn latest(&self, arch: &str) -> Option<&Release> {
        self.releases.iter().filter(|r| r.arch == arch).max_by(|a, b| a.version.cmp(&b.version))
    }

    /// Adds or replaces (same version and arch) a release, keeping the order.
    pub fn upsert(&mut self, release: Release) {
        self.releases.retain(|r| !(r.version == release.version && r.arch == release.arch));
        self.releases.push(release);
        self.releases.sort_by(|a, b| (&a.version, &a.arch).cmp(&(&b.version, &b.arch)));
    }
}

#[cfg(test)]
mod tests;
