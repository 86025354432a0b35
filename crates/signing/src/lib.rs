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
//! Verification ([`verify`]) is strict: it accepts a document only when at least `threshold`
//! distinct trusted keys signed it, and it rejects outright a signature file that names a key
//! twice or names a key that is not trusted. The last rule is the requirement, and it
//! has a cost for key rotation: ship a new key in the image first, sign with it only after every
//! node trusts it (see ARCHITECTURE.md, "Key rotation").
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
    /// A signature names a key that is not in the trusted set.
    #[error("signature by untrusted key {0}")]
    UntrustedKey(KeyId),
    /// Two signatures name the same key.
    #[error("key {0} signed more than once")]
    DuplicateKey(KeyId),
    /// A signature by a trusted key does not match the document.
    #[error("signature by key {keyid} does not match the {purpose} (document or signature altered)")]
    BadSignature {
        /// The key that supposedly signed.
        keyid: KeyId,
        /// What was being verified.
        purpose: Purpose,
    },
    /// Fewer valid signatures than the threshold.
    #[error("{purpose} has {valid} valid signature(s) from trusted keys, {threshold} required")]
    BelowThreshold {
        /// What was being verified.
        purpose: Purpose,
        /// Valid signatures found.
        valid: usize,
        /// Required.
        threshold: usize,
    },
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

/// Checks `signatures` of `document` against `trusted` keys, requiring `threshold` of them.
///
/// Every signature must be by a distinct trusted key and must be valid; a document passes when
/// the number of such signatures reaches `threshold`. Signatures are checked with
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
    let message = purpose.message(document);
    let mut signers: Vec<KeyId> = Vec::new();
    for s in &signatures.signatures {
        if signers.contains(&s.keyid) {
            return Err(SignatureError::DuplicateKey(s.keyid));
        }
        let key = trusted.get(&s.keyid).ok_or(SignatureError::UntrustedKey(s.keyid))?;
        let sig = ed25519_dalek::Signature::from_bytes(&s.sig);
        key.verifying_key()
            .verify_strict(&message, &sig)
            .map_err(|_| SignatureError::BadSignature { keyid: s.keyid, purpose })?;
        signers.push(s.keyid);
    }
    if signers.len() < threshold {
        return Err(SignatureError::BelowThreshold { purpose, valid: signers.len(), threshold });
    }
    Ok(Verified { signers })
}

#[cfg(test)]
mod tests;
