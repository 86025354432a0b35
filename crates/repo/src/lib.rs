//! Static update repositories: what is trusted, where files lie, how releases are published.
//!
//! A repository is nothing but files, so it can be served by any web server, object store or
//! CDN, or copied to an air-gapped site:
//!
//! ```text
//! channels/<channel>/index.json         channel index (signed)
//! channels/<channel>/index.json.sig     its detached signatures
//! images/<version>/<arch>/manifest.json image manifest (signed)
//! images/<version>/<arch>/manifest.json.sig
//! images/<version>/<arch>/manifest.json.gz  the same manifest, gzip (optional)
//! images/<version>/<arch>/payload       the compressed chunks
//! ```
//!
//! The gzip copy is for web servers that send it to clients accepting gzip (nginx's
//! `gzip_static on`): a manifest lists a digest per chunk, and compressed it is about a third of
//! its size, which is most of what a small update costs besides the changed chunks. Agents verify
//! the decoded manifest, so the copy adds nothing to trust; `aclpub verify` checks that it
//! decodes to the manifest beside it.
//!
//! [`trust`] is the rule, shared with the agent, for accepting a channel index or a manifest
//! from bytes and signatures; it does no I/O. [`local`] works on a repository directory: it
//! signs documents, publishes an image into a channel, and verifies a whole repository offline.
//! [`state`] keeps what a verifier accepted before, so that an older index is refused.

pub mod layout;
pub mod local;
pub mod state;
pub mod trust;

pub use local::RepoError;
pub use trust::{TrustError, TrustPolicy};
