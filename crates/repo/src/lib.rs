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
//! images/<version>/<arch>/payload       the compressed chunks
//! ```
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
