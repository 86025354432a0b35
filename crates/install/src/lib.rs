//! Installing an image into the inactive slot: fetched or copied chunk by chunk, each verified
//! before it is written, the whole slot read back and verified before it is activated.
//!
//! The order of one install ([`install`]), each step durable before the next:
//!
//! 1. refuse a target that is the booted slot, is in use or is too small, and an install the
//!    slot bits refuse (the booted slot not confirmed good), before anything is fetched;
//! 2. recognise a repeat: when the target's trailer holds this very manifest and the target
//!    already boots next, there is nothing to do ([`Report::already_next`]);
//! 3. start or continue the [`Journal`]; when it belongs to this image and target, or the
//!    target was staged with it before, read the target and count every chunk already in
//!    place (a killed install keeps every chunk it wrote, journaled or not);
//! 4. [`plan()`]: chunks in place, chunks to copy from the image in the other slot (its
//!    manifest is recorded in the state directory), tree chunks to compute, chunks to fetch in
//!    coalesced range requests;
//! 5. fetch (several requests in flight) and copy. A range is decoded frame by frame as its
//!    bytes arrive, and a range cut part-way is asked for again from its first missing byte
//!    ([`fetch::RangeStream`]). Every chunk is decompressed and its digest checked before any
//!    byte of it is written; writer threads (several writes in flight, for a disk's queue) write,
//!    a syncer thread beside them syncs and journals. Right before the
//!    first byte is written, and not earlier, the target is marked unbootable
//!    (`slot::choice::prepare`) and its old record dropped: an install that fails before
//!    that (a 404, a network that is down) leaves the fallback slot as it was. Local copies
//!    wait for the repository's first verified chunk for the same reason;
//! 6. read every chunk back from the device and check it again (done by step 3 already when
//!    every chunk was found in place and nothing was written). When the plan computes the
//!    dm-verity tree instead of fetching it ([`plan::tree_to_compute`]), this read-back of
//!    the data also hashes its blocks into the tree, which is written after the data, then
//!    read back and checked like the rest, and its root against the signed manifest's;
//! 7. write the slot trailer (the signed manifest, for the boot path; crate `trailer`) and sync
//!    it, record the manifest as the target's, then activate the target (`choice::activate`,
//!    or `choice::provisioned` when provisioning a fresh disk).
//!
//! Memory is bounded by the number of requests in flight and the writer's queue, whatever the
//! image size. Fetched bytes not yet written are bounded more tightly, by a budget each frame
//! takes before its first byte is read and gives back once written: they are what a kill
//! loses and a resume fetches again.

mod engine;
mod journal;
pub mod plan;
mod slotio;

pub use engine::{
    Counters, InstallError, InstallRequest, Report, RunningSource, install, record_manifest,
    recorded_manifest, running_manifest, slot_trailer, target_in_use,
};
pub use journal::{JOURNAL_FILE, Journal};
pub use plan::plan;
pub use slotio::AlignedBuf;
