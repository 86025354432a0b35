//! Installing an image into the inactive slot: fetched or copied chunk by chunk, each verified
//! before it is written, the whole slot read back and verified before it is activated.
//!
//! The order of one install ([`install`]), each step durable before the next:
//!
//! 1. refuse a target that is the booted slot, is in use, or is too small;
//! 2. mark the target unbootable (`slot::choice::prepare`) and start a [`Journal`], unless a
//!    journal for the same image and target shows an install to resume;
//! 3. [`plan()`]: chunks already written, chunks to copy from the image in the other slot (its
//!    manifest is recorded in the state directory), chunks to fetch in coalesced range requests;
//! 4. fetch (several requests in flight) and copy; every chunk is decompressed and its SHA-256
//!    checked before any byte of it is written; a writer thread writes, syncs and journals;
//! 5. read every chunk back from the device and check it again;
//! 6. write the slot trailer (the signed manifest, for the boot path; crate `trailer`) and sync
//!    it, record the manifest as the target's, then activate the target (`choice::activate`,
//!    or `choice::provisioned` when provisioning a fresh disk).
//!
//! Memory is bounded by the number of requests in flight and the writer's queue, whatever the
//! image size.

mod engine;
mod journal;
pub mod plan;
mod slotio;

pub use engine::{
    Counters, InstallError, InstallRequest, Report, install, record_manifest, recorded_manifest,
    slot_trailer, target_in_use,
};
pub use journal::{JOURNAL_FILE, Journal};
pub use plan::plan;
pub use slotio::AlignedBuf;
