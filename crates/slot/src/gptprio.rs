//! The gptprio attribute bits of a GPT partition entry (ChromeOS / Flatcar layout).
//!
//! Bits 48-51 hold the priority (0-15), bits 52-55 the remaining tries (0-15), bit 56 the
//! successful flag. The other bits of the 64-bit attribute field belong to someone else
//! (bit 0 "required", bit 2 "legacy BIOS bootable", ...) and are kept as they are.

use serde::Serialize;
use std::fmt;

const PRIORITY_SHIFT: u32 = 48;
const TRIES_SHIFT: u32 = 52;
const SUCCESSFUL_BIT: u64 = 1 << 56;
const NIBBLE: u64 = 0xf;

/// The full 64-bit attribute field of a partition entry, with named access to the gptprio bits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct GptPrio(pub u64);

/// A 4-bit gptprio field value (priority or tries), 0-15.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize)]
pub struct Nibble(u8);

impl Nibble {
    /// Zero.
    pub const ZERO: Nibble = Nibble(0);
    /// Fifteen, the largest value.
    pub const MAX: Nibble = Nibble(15);

    /// The value, if it fits in 4 bits.
    pub const fn new(v: u8) -> Option<Self> {
        if v <= 15 { Some(Nibble(v)) } else { None }
    }

    /// The value.
    pub const fn get(self) -> u8 {
        self.0
    }
}

impl GptPrio {
    /// Priority, 0-15; 0 means never boot.
    pub fn priority(self) -> u8 {
        ((self.0 >> PRIORITY_SHIFT) & NIBBLE) as u8
    }

    /// Boot attempts left before an unconfirmed slot is given up, 0-15.
    pub fn tries(self) -> u8 {
        ((self.0 >> TRIES_SHIFT) & NIBBLE) as u8
    }

    /// Whether this slot has booted and passed its health checks.
    pub fn successful(self) -> bool {
        self.0 & SUCCESSFUL_BIT != 0
    }

    /// Whether the boot path may choose this slot: priority > 0 and (successful or tries > 0).
    pub fn bootable(self) -> bool {
        self.priority() > 0 && (self.successful() || self.tries() > 0)
    }

    /// The same attributes with another priority.
    #[must_use]
    pub fn with_priority(self, p: Nibble) -> Self {
        GptPrio((self.0 & !(NIBBLE << PRIORITY_SHIFT)) | (u64::from(p.0) << PRIORITY_SHIFT))
    }

    /// The same attributes with another tries count.
    #[must_use]
    pub fn with_tries(self, t: Nibble) -> Self {
        GptPrio((self.0 & !(NIBBLE << TRIES_SHIFT)) | (u64::from(t.0) << TRIES_SHIFT))
    }

    /// The same attributes with the successful bit set or cleared.
    #[must_use]
    pub fn with_successful(self, s: bool) -> Self {
        GptPrio(if s { self.0 | SUCCESSFUL_BIT } else { self.0 & !SUCCESSFUL_BIT })
    }

    /// Priority, tries and successful all zero: never boots. Other bits are kept.
    #[must_use]
    pub fn unbootable(self) -> Self {
        self.with_priority(Nibble::ZERO).with_tries(Nibble::ZERO).with_successful(false)
    }

    /// Builds the gptprio bits from values (other bits zero); `None` if a value exceeds 15.
    pub fn from_parts(priority: u8, tries: u8, successful: bool) -> Option<Self> {
        Some(
            GptPrio(0)
                .with_priority(Nibble::new(priority)?)
                .with_tries(Nibble::new(tries)?)
                .with_successful(successful),
        )
    }
}

impl fmt::Display for GptPrio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "priority={} tries={} successful={}",
            self.priority(),
            self.tries(),
            u8::from(self.successful())
        )
    }
}

impl fmt::Debug for GptPrio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GptPrio({self}, raw={:#018x})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_positions_match_chromeos() {
        // cgpt add -P 1 -T 2 -S 1 sets attribute bytes 6..8 to 0x21 0x01: priority in the
        // low nibble of byte 6, tries in its high nibble, successful in bit 0 of byte 7.
        let p = GptPrio::from_parts(1, 2, true).unwrap();
        assert_eq!(p.0, 0x0121_0000_0000_0000);
        assert_eq!((p.priority(), p.tries(), p.successful()), (1, 2, true));
        assert_eq!(GptPrio::from_parts(15, 15, false).unwrap().0, 0x00ff_0000_0000_0000);
    }

    #[test]
    fn other_bits_are_kept() {
        let p = GptPrio(0x8000_0000_0000_0005); // required + legacy-bootable + a type-specific bit
        let q = p
            .with_priority(Nibble::new(3).unwrap())
            .with_tries(Nibble::new(7).unwrap())
            .with_successful(true);
        assert_eq!(q.0 & !0x01ff_0000_0000_0000, p.0);
        assert_eq!(q.unbootable().0, p.0);
    }

    #[test]
    fn bootable_rule() {
        for pr in 0..16 {
            for t in 0..16 {
                for s in [false, true] {
                    let p = GptPrio::from_parts(pr, t, s).unwrap();
                    assert_eq!(p.bootable(), pr > 0 && (s || t > 0));
                }
            }
        }
        assert!(Nibble::new(16).is_none());
    }
}
