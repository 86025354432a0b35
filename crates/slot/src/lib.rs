//! A/B slots on a GPT disk: the gptprio bits, the boot choice, and every transition.
//!
//! Layers, from pure to I/O:
//!
//! - [`GptPrio`]: the 64-bit attribute field with named access to priority (bits 48-51), tries
//!   (52-55) and successful (56), the ChromeOS / Flatcar layout.
//! - [`choice`]: the boot choice rule and one pure function per transition (prepare, activate,
//!   boot attempt, mark good, mark bad, rollback) over [`Slots`]. The first-stage initramfs
//!   will run the same [`choice::boot_attempt`].
//! - [`table`]: the GPT read with fallback to the backup copy and written crash-safely.
//! - [`layout`]: the check that partitions and table copies lie apart and on the disk, made
//!   before anything is written (a hostile table is refused, never written over).
//! - [`Disk`]: finds USR-A and USR-B by name and type GUID and applies a transition with one
//!   table write, read back and checked, under the disk's exclusive lock ([`lock`]): one
//!   writer per disk.
//! - [`booted`]: which slot is running, from the kernel command line.

pub mod booted;
pub mod choice;
mod disk;
mod gptprio;
pub mod layout;
pub mod lock;
pub mod system;
pub mod table;

pub use choice::{Slot, Slots, Tries};
pub use disk::{Disk, DiskError, ESP_PARTITION_TYPE, MIN_SLOT_BYTES, USR_PARTITION_TYPE, slot_label};
pub use gptprio::{GptPrio, Nibble};
pub use layout::LayoutError;
