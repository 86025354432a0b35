//! Key files and key ids.
//!
//! A key id is the first 8 bytes of SHA-256 of the 32-byte public key, written as 16 hex
//! digits: short enough to read in a log line, long enough that two keys of one repository do
//! not collide by accident (and a deliberate collision gains nothing: the signature is still
//! checked against the full trusted key).
//!
//! Key files are small JSON documents. The secret key file is created with mode 0600 and never
//! overwritten; its key id is recomputed on load, so a damaged or mismatched file is caught
//! before it signs anything.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The id of a public key (first 8 bytes of its SHA-256), shown as 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyId(#[serde(with = "hex::serde")] [u8; 8]);

impl KeyId {
    fn of(public: &ed25519_dalek::VerifyingKey) -> Self {
        let d = Sha256::digest(public.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&d[..8]);
        KeyId(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// Errors reading or writing key files.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read or written.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a key file of the expected kind.
    #[error("key file {path} is not a valid {kind} key: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// "secret" or "public".
        kind: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Two trusted key files hold the same key.
    #[error("trusted key {keyid} is listed twice ({first} and {second})")]
    DuplicateTrustedKey {
        /// The key.
        keyid: KeyId,
        /// Where it was first found.
        first: PathBuf,
        /// Where it was found again.
        second: PathBuf,
    },
    /// No trusted key at all.
    #[error("no trusted keys found in {0}")]
    NoTrustedKeys(String),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretKeyFile {
    #[serde(rename = "type")]
    kind: String,
    keyid: KeyId,
    #[serde(with = "hex::serde")]
    secret: [u8; 32],
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublicKeyFile {
    #[serde(rename = "type")]
    kind: String,
    keyid: KeyId,
    #[serde(with = "hex::serde")]
    public: [u8; 32],
}

const SECRET_TYPE: &str = "acl-ed25519-secret-key";
const PUBLIC_TYPE: &str = "acl-ed25519-public-key";

/// A signing key with its id.
#[derive(Clone)]
pub struct SecretKey {
    key: ed25519_dalek::SigningKey,
    id: KeyId,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        f.debug_struct("SecretKey").field("id", &self.id).finish_non_exhaustive()
    }
}

impl SecretKey {
    /// Generates a new key from the operating system's random source.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)?;
        Ok(Self::from_seed(seed))
    }

    /// The key whose 32-byte seed is `seed` (tests and reproducible fixtures).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        let id = KeyId::of(&key.verifying_key());
        Self { key, id }
    }

    /// The key id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey { key: self.key.verifying_key(), id: self.id }
    }

    pub(crate) fn signing_key(&self) -> &ed25519_dalek::SigningKey {
        &self.key
    }

    /// Writes the key to a new file with mode 0600; refuses to overwrite an existing file.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyFileError> {
        let file = SecretKeyFile { kind: SECRET_TYPE.into(), keyid: self.id, secret: self.key.to_bytes() };
        let mut bytes = serde_json::to_vec_pretty(&file).expect("key serialises");
        bytes.push(b'\n');
        write_new_file(path, &bytes, 0o600)
    }

    /// Reads a secret key file and checks its key id.
    pub fn read(path: &Path) -> Result<Self, KeyFileError> {
        let bytes = read(path)?;
        let invalid =
            |reason: String| KeyFileError::Invalid { path: path.to_owned(), kind: "secret", reason };
        let file: SecretKeyFile = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        if file.kind != SECRET_TYPE {
            return Err(invalid(format!("type is {:?}, expected {SECRET_TYPE:?}", file.kind)));
        }
        let key = Self::from_seed(file.secret);
        if key.id != file.keyid {
            return Err(invalid(format!("keyid {} does not match the key ({})", file.keyid, key.id)));
        }
        Ok(key)
    }
}

/// A public key with its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: ed25519_dalek::VerifyingKey,
    id: KeyId,
}

impl PublicKey {
    /// The key id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    pub(crate) fn verifying_key(&self) -> &ed25519_dalek::VerifyingKey {
        &self.key
    }

    /// Writes the key to a new file (mode 0644); refuses to overwrite an existing file.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyFileError> {
        let file = PublicKeyFile { kind: PUBLIC_TYPE.into(), keyid: self.id, public: self.key.to_bytes() };
        let mut bytes = serde_json::to_vec_pretty(&file).expect("key serialises");
        bytes.push(b'\n');
        write_new_file(path, &bytes, 0o644)
    }

    /// Reads a public key file and checks its key id.
    pub fn read(path: &Path) -> Result<Self, KeyFileError> {
        let bytes = read(path)?;
        let invalid =
            |reason: String| KeyFileError::Invalid { path: path.to_owned(), kind: "public", reason };
        let file: PublicKeyFile = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        if file.kind != PUBLIC_TYPE {
            return Err(invalid(format!("type is {:?}, expected {PUBLIC_TYPE:?}", file.kind)));
        }
        let key =
            ed25519_dalek::VerifyingKey::from_bytes(&file.public).map_err(|e| invalid(e.to_string()))?;
        let id = KeyId::of(&key);
        if id != file.keyid {
            return Err(invalid(format!("keyid {} does not match the key ({id})", file.keyid)));
        }
        Ok(Self { key, id })
    }
}

/// The set of keys a verifier trusts, by id.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: BTreeMap<KeyId, PublicKey>,
}

impl TrustedKeys {
    /// A set from keys; refuses the same key twice.
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> Result<Self, KeyFileError> {
        let mut set = Self::default();
        for k in keys {
            if set.keys.contains_key(&k.id) {
                let p = PathBuf::from("<memory>");
                return Err(KeyFileError::DuplicateTrustedKey { keyid: k.id, first: p.clone(), second: p });
            }
            set.keys.insert(k.id, k);
        }
        Ok(set)
    }

    /// Loads `*.pub` key files from each path, a file or a directory of them.
    ///
    /// The same key found twice is an error (it would let one key count twice toward a
    /// threshold if ids were ever compared loosely, and it is always a packaging mistake).
    pub fn load(paths: &[PathBuf]) -> Result<Self, KeyFileError> {
        let mut found: BTreeMap<KeyId, (PublicKey, PathBuf)> = BTreeMap::new();
        for path in paths {
            let files = if path.is_dir() {
                let mut v: Vec<PathBuf> = std::fs::read_dir(path)
                    .map_err(|source| KeyFileError::Io { path: path.clone(), source })?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "pub"))
                    .collect();
                v.sort();
                v
            } else {
                vec![path.clone()]
            };
            for file in files {
                let key = PublicKey::read(&file)?;
                if let Some((_, first)) = found.get(&key.id) {
                    return Err(KeyFileError::DuplicateTrustedKey {
                        keyid: key.id,
                        first: first.clone(),
                        second: file,
                    });
                }
                found.insert(key.id, (key, file));
            }
        }
        if found.is_empty() {
            let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            return Err(KeyFileError::NoTrustedKeys(names.join(", ")));
        }
        Ok(Self { keys: found.into_values().map(|(k, _)| (k.id, k)).collect() })
    }

    /// The trusted key with this id.
    pub fn get(&self, id: &KeyId) -> Option<&PublicKey> {
        self.keys.get(id)
    }

    /// Number of trusted keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, KeyFileError> {
    std::fs::read(path).map_err(|source| KeyFileError::Io { path: path.to_owned(), source })
}

fn write_new_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyFileError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| KeyFileError::Io { path: path.to_owned(), source };
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}
