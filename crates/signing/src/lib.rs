//! Detached Ed25519 signatures over exact bytes, and the threshold rule that accepts them.
//!
//! Every signed document of a repository (channel index, image manifest) is a file next to a
//! detached signature file `<name>.sig`. A signature covers the document's exact bytes, prefixed
//! with a domain tag naming the document's [`Purpose`], so a signature made for a manifest can
//! never be replayed as a signature of an index. We sign bytes, not parsed values, so there is no
//! canonicalisation step that a verifier could do differently from the signer; the `manifest`
//! crate in turn refuses any document whose bytes are not the canonical serialisation of what
//! they parse to.
//!
//! Verification ([`verify`]) follows TUF's rule: a document is accepted when valid signatures
//! by at least `threshold` distinct trusted keys are among its signatures. Anything else in the
//! signature file is ignored and named in the refusal when the threshold is not met: signatures
//! by keys the node does not trust, signatures that do not match, a second signature by a key.
//! Rejecting a document for an extra signature (what this crate did before, issue 13) broke key
//! rotation, since a document signed by an old and a new key failed on every node that knew
//! only one, and let anyone able to append a signature to a mirror's file block a valid
//! release. Ignoring is safe because only the trusted signatures count.
//!
//! Principal types: [`SecretKey`], [`PublicKey`], [`KeyId`], [`TrustedKeys`],
//! [`SignatureFile`].

mod keys;

pub use keys::{KeyFileError, KeyId, PublicKey, SecretKey, TrustedKeys};

use serde::{Deserialize, Serialize};

/// What a signed document is; part of the signed message, so signatures cannot cross over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// An image manifest.
    Manifest,
    /// A channel index.
    ChannelIndex,
}

impl Purpose {
    fn tag(self) -> &'static [u8] {
        match self {
            Purpose::Manifest => b"acl-signature-v1\0manifest\0",
            Purpose::ChannelIndex => b"acl-signature-v1\0channel-index\0",
        }
    }

    fn message(self, document: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(self.tag().len() + document.len());
        m.extend_from_slice(self.tag());
        m.extend_from_slice(document);
        m
    }
}

impl std::fmt::Display for Purpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Purpose::Manifest => "manifest",
            Purpose::ChannelIndex => "channel index",
        })
    }
}

/// One signature: the signing key's id and the 64 signature bytes (hex on disk).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// The id of the key that made it.
    pub keyid: KeyId,
    /// The Ed25519 signature, hex.
    #[serde(with = "hex::serde")]
    pub sig: [u8; 64],
}

/// The content of a detached signature file: one or more signatures of one document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureFile {
    /// The signatures, in the order they were added.
    pub signatures: Vec<Signature>,
}

/// Why a signature file was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    /// The signature file is not valid JSON of the expected shape.
    #[error("signature file is malformed: {0}")]
    Malformed(String),
    /// Fewer valid signatures by distinct trusted keys than the threshold.
    #[error(
        "{purpose} has {valid} valid signature(s) from trusted keys, {threshold} required{}",
        if ignored.is_empty() { String::new() } else { format!(" (ignored: {})", ignored.join("; ")) }
    )]
    BelowThreshold {
        /// What was being verified.
        purpose: Purpose,
        /// Valid signatures found.
        valid: usize,
        /// Required.
        threshold: usize,
        /// The signatures that did not count, and why, in words.
        ignored: Vec<String>,
    },
    /// More signatures than any repository needs: refused before checking any (each check
    /// costs time).
    #[error("signature file has {0} signatures, more than the {MAX_SIGNATURES} allowed")]
    TooMany(usize),
    /// A threshold of zero would accept unsigned documents.
    #[error("signature threshold must be at least 1")]
    ZeroThreshold,
    /// Asked to add a signature by a key that already signed.
    #[error("key {0} has already signed this document")]
    AlreadySigned(KeyId),
}

impl SignatureFile {
    /// Parses a signature file.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SignatureError> {
        serde_json::from_slice(bytes).map_err(|e| SignatureError::Malformed(e.to_string()))
    }

    /// The bytes to store, pretty JSON with a final newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("signature file serialises");
        v.push(b'\n');
        v
    }

    /// Adds `key`'s signature of `document`; refuses a key that already signed.
    pub fn add(&mut self, purpose: Purpose, document: &[u8], key: &SecretKey) -> Result<(), SignatureError> {
        if self.signatures.iter().any(|s| s.keyid == key.id()) {
            return Err(SignatureError::AlreadySigned(key.id()));
        }
        self.signatures.push(sign(purpose, document, key));
        Ok(())
    }
}

/// Signs `document` for `purpose` with `key`.
pub fn sign(purpose: Purpose, document: &[u8], key: &SecretKey) -> Signature {
    use ed25519_dalek::Signer as _;
    let sig = key.signing_key().sign(&purpose.message(document));
    Signature { keyid: key.id(), sig: sig.to_bytes() }
}

/// The keys that signed an accepted document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The ids of the trusted keys whose signatures were checked, in file order.
    pub signers: Vec<KeyId>,
}

/// The most signatures a signature file may hold.
pub const MAX_SIGNATURES: usize = 64;

/// Checks `signatures` of `document` against `trusted` keys, requiring `threshold` of them.
///
/// A document passes when valid signatures by `threshold` distinct trusted keys are among its
/// signatures; the others are ignored (see the crate docs). Signatures are checked with
/// `verify_strict`, which also refuses malleable (non-canonical) signature encodings.
pub fn verify(
    purpose: Purpose,
    document: &[u8],
    signatures: &SignatureFile,
    trusted: &TrustedKeys,
    threshold: usize,
) -> Result<Verified, SignatureError> {
    if threshold == 0 {
        return Err(SignatureError::ZeroThreshold);
    }
    if signatures.signatures.len() > MAX_SIGNATURES {
        return Err(SignatureError::TooMany(signatures.signatures.len()));
    }
    let message = purpose.message(document);
    let mut signers: Vec<KeyId> = Vec::new();
    let mut ignored = Vec::new();
    for s in &signatures.signatures {
        if signers.contains(&s.keyid) {
            ignored.push(format!("a second signature by key {}", s.keyid));
            continue;
        }
        let Some(key) = trusted.get(&s.keyid) else {
            ignored.push(format!("a signature by key {}, which this node does not trust", s.keyid));
            continue;
        };
        let sig = ed25519_dalek::Signature::from_bytes(&s.sig);
        if key.verifying_key().verify_strict(&message, &sig).is_err() {
            ignored.push(format!(
                "the signature by key {} does not match the {purpose} (document or signature altered)",
                s.keyid
            ));
            continue;
        }
        signers.push(s.keyid);
    }
    if signers.len() < threshold {
        return Err(SignatureError::BelowThreshold { purpose, valid: signers.len(), threshold, ignored });
    }
    Ok(Verified { signers })
}

#[cfg(test)]
mod tests;
