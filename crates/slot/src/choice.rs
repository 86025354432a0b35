//! The boot choice and every transition of the slot bits, as pure functions.
//!
//! Each function takes the two slots' attribute fields and returns new ones; none of them
//! touches a disk. The caller writes the result with one crash-safe table write (`table`), so
//! every transition is atomic on disk, and `tests/model.rs` can check every sequence of
//! transitions, boots and crashes against the invariants of DESIGN.md.
//!
//! | transition | target | effect |
//! |---|---|---|
//! | [`prepare`] | the slot not booted | priority 0, tries 0, not successful: never boots while written; only from a confirmed slot |
//! | [`activate`] | the slot not booted | priority above the booted slot, tries = N, not successful |
//! | [`boot_attempt`] | the chosen slot | what the boot path does: choose, and spend one try if unconfirmed |
//! | [`mark_good`] | the booted slot | successful, tries 0 |
//! | [`mark_bad`] | the booted slot | unbootable, so the other (good) slot boots next |
//! | [`rollback`] | the other slot | it boots next; only if it was confirmed good and is intact |

use crate::GptPrio;
use crate::gptprio::Nibble;
use serde::Serialize;
use std::fmt;

/// One of the two slots.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord, Serialize)]
pub enum Slot {
    /// The USR-A partition.
    A,
    /// The USR-B partition.
    B,
}

impl Slot {
    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// Both slots, in partition order.
    pub const BOTH: [Slot; 2] = [Slot::A, Slot::B];
}

impl std::ops::Not for Slot {
    type Output = Slot;
    fn not(self) -> Slot {
        self.other()
    }
}

impl std::str::FromStr for Slot {
    type Err = String;
    /// `A` or `B` (either case), as operators type it.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "A" | "a" => Ok(Slot::A),
            "B" | "b" => Ok(Slot::B),
            _ => Err(format!("{s:?} is not a slot (A or B)")),
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Slot::A => "A",
            Slot::B => "B",
        })
    }
}

/// The attribute fields of both slots. Slot A's partition number is lower than B's (checked
/// when a disk is read), so "tie: lower partition number" means A.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Slots {
    /// Slot A's attributes.
    pub a: GptPrio,
    /// Slot B's attributes.
    pub b: GptPrio,
}

impl Slots {
    /// The attributes of `slot`.
    pub fn get(&self, slot: Slot) -> GptPrio {
        match slot {
            Slot::A => self.a,
            Slot::B => self.b,
        }
    }

    /// These slots with `slot`'s attributes replaced.
    #[must_use]
    pub fn with(mut self, slot: Slot, p: GptPrio) -> Self {
        match slot {
            Slot::A => self.a = p,
            Slot::B => self.b = p,
        }
        self
    }
}

/// Tries given to a newly activated slot, 1-15.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Tries(Nibble);

impl Tries {
    /// Tries, if `n` is 1-15.
    pub fn new(n: u8) -> Option<Self> {
        Nibble::new(n).filter(|t| t.get() > 0).map(Tries)
    }

    /// The count.
    pub fn get(self) -> u8 {
        self.0.get()
    }
}

/// A transition that must not happen from this state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransitionError {
    /// The booted slot is marked unbootable (it was marked bad, or the table changed under us).
    #[error("booted slot {slot} is not bootable ({bits}); refusing to build on it")]
    BootedNotBootable {
        /// The booted slot.
        slot: Slot,
        /// Its bits.
        bits: GptPrio,
    },
    /// The booted slot has not passed its health checks yet; the other slot is the way back.
    #[error(
        "booted slot {slot} is not confirmed good yet ({bits}); the other slot is the way back and must not be overwritten"
    )]
    BootedNotConfirmed {
        /// The booted slot.
        slot: Slot,
        /// Its bits.
        bits: GptPrio,
    },
    /// Marking the booted slot bad would leave nothing to boot.
    #[error("slot {other} is not bootable ({bits}): marking {slot} bad would leave no slot to boot")]
    NoFallback {
        /// The slot to mark bad.
        slot: Slot,
        /// The other slot.
        other: Slot,
        /// The other slot's bits.
        bits: GptPrio,
    },
    /// The other slot is not an image that was confirmed good.
    #[error("slot {slot} cannot be rolled back to: {why} ({bits})")]
    NoRollbackTarget {
        /// The other slot.
        slot: Slot,
        /// Why not.
        why: &'static str,
        /// Its bits.
        bits: GptPrio,
    },
}

/// The slot the boot path picks: the bootable one with the highest priority, A on a tie.
pub fn choose(s: &Slots) -> Option<Slot> {
    Slot::BOTH
        .into_iter()
        .filter(|&x| s.get(x).bootable())
        .max_by_key(|&x| (s.get(x).priority(), std::cmp::Reverse(x)))
}

/// What the boot path does: choose a slot and, when it is not yet successful, spend one try.
/// `None` when no slot is bootable.
pub fn boot_attempt(s: &Slots) -> Option<(Slot, Slots)> {
    let chosen = choose(s)?;
    let p = s.get(chosen);
    if p.successful() {
        return Some((chosen, *s));
    }
    let spent = Nibble::new(p.tries() - 1).expect("bootable and unsuccessful means tries > 0");
    Some((chosen, s.with(chosen, p.with_tries(spent))))
}

/// Whether `slot` is what a boot attempt could just have chosen, given the bits after it: the
/// second stage's check that it runs the slot the rule chose rather than one named by an edited
/// kernel command line. Exactly the slots `c` for which some `before` has
/// `boot_attempt(before) == Some((c, s))` (checked exhaustively by `tests/model.rs`).
pub fn chosen_by_rule(s: &Slots, slot: Slot) -> bool {
    if choose(s) == Some(slot) && s.get(slot).successful() {
        return true;
    }
    // An unconfirmed slot spent a try to get here: undo it and ask the rule again.
    let p = s.get(slot);
    if p.successful() || p.priority() == 0 {
        return false;
    }
    let Some(before) = Nibble::new(p.tries() + 1) else { return false };
    choose(&s.with(slot, p.with_tries(before))) == Some(slot)
}

fn booted_bootable(s: &Slots, booted: Slot) -> Result<(), TransitionError> {
    // The running slot may have spent its last try to get here; what matters is that it has a
    // priority (it was not marked bad).
    let bits = s.get(booted);
    if bits.priority() == 0 {
        return Err(TransitionError::BootedNotBootable { slot: booted, bits });
    }
    Ok(())
}

/// Marks the slot that is not booted unbootable, before anything is written to it.
///
/// Refused while the booted slot is not confirmed good: the other slot is then the way back,
/// and overwriting it would leave no known-good image.
pub fn prepare(s: &Slots, booted: Slot) -> Result<Slots, TransitionError> {
    booted_bootable(s, booted)?;
    let bits = s.get(booted);
    if !bits.successful() {
        return Err(TransitionError::BootedNotConfirmed { slot: booted, bits });
    }
    let target = booted.other();
    Ok(s.with(target, s.get(target).unbootable()))
}

/// Makes the freshly written and verified slot boot next, with `tries` attempts; the booted
/// slot keeps its successful bit and stays bootable below it, as the way back.
pub fn activate(s: &Slots, booted: Slot, tries: Tries) -> Result<Slots, TransitionError> {
    booted_bootable(s, booted)?;
    let target = booted.other();
    let two = Nibble::new(2).expect("2 fits");
    let one = Nibble::new(1).expect("1 fits");
    let new = s.get(target).with_priority(two).with_tries(tries.0).with_successful(false);
    Ok(s.with(target, new).with(booted, s.get(booted).with_priority(one)))
}

/// Confirms the booted slot: successful, no tries needed any more.
pub fn mark_good(s: &Slots, booted: Slot) -> Result<Slots, TransitionError> {
    booted_bootable(s, booted)?;
    Ok(s.with(booted, s.get(booted).with_successful(true).with_tries(Nibble::ZERO)))
}

/// Gives up the booted slot (health checks failed): the other slot boots next.
pub fn mark_bad(s: &Slots, booted: Slot) -> Result<Slots, TransitionError> {
    let other = booted.other();
    let bits = s.get(other);
    if !bits.bootable() {
        return Err(TransitionError::NoFallback { slot: booted, other, bits });
    }
    Ok(s.with(booted, s.get(booted).unbootable()))
}

/// A slot written onto a fresh disk by provisioning: it boots next with `tries` attempts and
/// must prove itself like any new slot; the other slot keeps its bits (on a fresh disk it is
/// empty and unbootable).
pub fn provisioned(s: &Slots, slot: Slot, tries: Tries) -> Slots {
    let two = Nibble::new(2).expect("2 fits");
    let other = slot.other();
    let o = s.get(other);
    let s =
        if o.priority() > 1 { s.with(other, o.with_priority(Nibble::new(1).expect("1 fits"))) } else { *s };
    s.with(slot, s.get(slot).with_priority(two).with_tries(tries.0).with_successful(false))
}

/// The boot path's verdict on a chosen slot it cannot open (no signed manifest, damaged):
/// unbootable, whatever the other slot holds (booting an unverifiable image is never the
/// fallback).
pub fn give_up(s: &Slots, slot: Slot) -> Slots {
    s.with(slot, s.get(slot).unbootable())
}

/// Makes the other slot boot next, if it holds an image that booted and was confirmed good
/// before and has not been touched since (a prepared slot has priority 0). The current slot
/// stays bootable below it.
pub fn rollback(s: &Slots, current: Slot) -> Result<Slots, TransitionError> {
    let target = current.other();
    let bits = s.get(target);
    if !bits.successful() {
        return Err(TransitionError::NoRollbackTarget {
            slot: target,
            why: "it was never confirmed good",
            bits,
        });
    }
    if bits.priority() == 0 {
        return Err(TransitionError::NoRollbackTarget {
            slot: target,
            why: "it is marked unbootable (being written, or given up)",
            bits,
        });
    }
    let two = Nibble::new(2).expect("2 fits");
    let one = Nibble::new(1).expect("1 fits");
    let cur = s.get(current);
    let cur = if cur.priority() > 0 { cur.with_priority(one) } else { cur };
    Ok(s.with(target, bits.with_priority(two)).with(current, cur))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pr: u8, t: u8, s: bool) -> GptPrio {
        GptPrio::from_parts(pr, t, s).unwrap()
    }

    #[test]
    fn choice_prefers_priority_then_a() {
        assert_eq!(choose(&Slots { a: p(1, 0, true), b: p(2, 3, false) }), Some(Slot::B));
        assert_eq!(choose(&Slots { a: p(2, 0, true), b: p(2, 3, false) }), Some(Slot::A));
        assert_eq!(choose(&Slots { a: p(1, 0, true), b: p(2, 0, false) }), Some(Slot::A));
        assert_eq!(choose(&Slots { a: p(0, 5, true), b: p(0, 0, true) }), None);
    }

    #[test]
    fn update_cycle() {
        let s = Slots { a: p(1, 0, true), b: p(0, 0, false) };
        let s = prepare(&s, Slot::A).unwrap();
        let s = activate(&s, Slot::A, Tries::new(2).unwrap()).unwrap();
        assert_eq!(s.b, p(2, 2, false));
        let (c, s) = boot_attempt(&s).unwrap();
        assert_eq!((c, s.b.tries()), (Slot::B, 1));
        let s = mark_good(&s, Slot::B).unwrap();
        assert_eq!(s.b, p(2, 0, true));
        assert_eq!(s.a, p(1, 0, true));
        let r = rollback(&s, Slot::B).unwrap();
        assert_eq!(choose(&r), Some(Slot::A));
    }

    #[test]
    fn refusals() {
        let s = Slots { a: p(1, 0, true), b: p(0, 0, false) };
        assert!(matches!(mark_bad(&s, Slot::A), Err(TransitionError::NoFallback { .. })));
        let e = rollback(&s, Slot::A).unwrap_err();
        assert_eq!(
            e.to_string(),
            "slot B cannot be rolled back to: it was never confirmed good (priority=0 tries=0 successful=0)"
        );
        let prepared = Slots { a: p(1, 0, true), b: p(0, 0, true) };
        assert!(matches!(rollback(&prepared, Slot::A), Err(TransitionError::NoRollbackTarget { .. })));
        assert!(matches!(prepare(&s, Slot::B), Err(TransitionError::BootedNotBootable { .. })));
        assert!(Tries::new(0).is_none() && Tries::new(16).is_none());
    }
}
