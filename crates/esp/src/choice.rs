//! Which set GRUB starts, and which one an update may write: pure, tested over every input.
//!
//! GRUB (`dracut/esp/grub.cfg`) tries the set the environment block names, then the other;
//! with no valid block, a then b. A set it cannot load (missing; under Secure Boot also cut
//! short or refused by shim) is skipped. Without Secure Boot GRUB loads whatever file is
//! there, so safety cannot rest on a half-written set being skipped: the set GRUB tries
//! *first* must be complete at every moment. [`plan`] keeps that: when GRUB's first choice is
//! not the complete set it ends up starting (no valid block, or a block naming a damaged set),
//! the block is first made to name the set that starts; then the other set is written, and
//! only once it is complete does the block name it.

/// One of the two first-stage sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Set {
    /// `acl-a-*`.
    A,
    /// `acl-b-*`.
    B,
}

impl Set {
    /// Both, in GRUB's order without an environment block.
    pub const BOTH: [Set; 2] = [Set::A, Set::B];

    /// The directory name, and the value of `acl_set`.
    pub fn name(self) -> &'static str {
        match self {
            Set::A => "a",
            Set::B => "b",
        }
    }

    /// The other set.
    pub fn other(self) -> Set {
        match self {
            Set::A => Set::B,
            Set::B => Set::A,
        }
    }

    /// The set named `s` (`a` or `b`).
    pub fn from_name(s: &str) -> Option<Set> {
        match s {
            "a" => Some(Set::A),
            "b" => Some(Set::B),
            _ => None,
        }
    }
}

impl std::fmt::Display for Set {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The order GRUB tries the sets in, given the set the environment block names (if valid).
pub fn order(named: Option<Set>) -> [Set; 2] {
    match named {
        Some(s) => [s, s.other()],
        None => Set::BOTH,
    }
}

/// The set GRUB starts: the first complete one in its order.
pub fn boots(named: Option<Set>, a_complete: bool, b_complete: bool) -> Option<Set> {
    let complete = |s: Set| match s {
        Set::A => a_complete,
        Set::B => b_complete,
    };
    order(named).into_iter().find(|&s| complete(s))
}

/// The set an update writes: the one GRUB does not start (a when it starts none).
pub fn target(boots: Option<Set>) -> Set {
    boots.map_or(Set::A, Set::other)
}

/// Which sets GRUB can load, corrected by what it did this boot: it started `started`, so that
/// set loads and every set it tries before it does not (`a`, `b`: the guesses without that).
/// Only sound while the block is the one GRUB read at boot; if it changed since, the
/// correction can only call a loadable set unloadable, which costs a needless rewrite, never
/// GRUB's first choice (the plan first names the started set).
pub fn observed(named: Option<Set>, a: bool, b: bool, started: Option<Set>) -> (bool, bool) {
    let Some(s) = started else { return (a, b) };
    let mut l = [a, b];
    for x in order(named) {
        l[x as usize] = x == s;
        if x == s {
            break;
        }
    }
    (l[0], l[1])
}

/// What an update does, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// First make the block name this set (the one GRUB starts, when GRUB would try another
    /// first).
    pub name_first: Option<Set>,
    /// Then write this set, and switch the block to it.
    pub write: Set,
}

/// The update's steps, given the block's set (if valid) and which sets are complete.
pub fn plan(named: Option<Set>, a_complete: bool, b_complete: bool) -> Plan {
    let now = boots(named, a_complete, b_complete);
    Plan { name_first: now.filter(|&s| named != Some(s)), write: target(now) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over every input, at every step of the plan (block fixed, target being written, target
    /// complete, switched): if a set was complete at the start, the set GRUB tries first is
    /// complete, and it is never the set being written; after the switch it is the new set.
    #[test]
    fn the_set_grub_tries_first_is_always_complete_and_never_written() {
        for named in [None, Some(Set::A), Some(Set::B)] {
            for a in [false, true] {
                for b in [false, true] {
                    let p = plan(named, a, b);
                    let start = boots(named, a, b);
                    let complete = |s: Set, a: bool, b: bool| if s == Set::A { a } else { b };
                    let named1 = p.name_first.or(named);
                    // While the target is written it is incomplete.
                    let (aw, bw) = (a && p.write != Set::A, b && p.write != Set::B);
                    // Then complete.
                    let (ac, bc) = (a || p.write == Set::A, b || p.write == Set::B);
                    let case = format!("{named:?} a={a} b={b}: {p:?}");
                    if let Some(s) = start {
                        assert_eq!(p.write, s.other(), "{case}");
                        for (n, a, b) in [(named1, a, b), (named1, aw, bw), (named1, ac, bc)] {
                            let first = order(n)[0];
                            assert!(complete(first, a, b), "first choice incomplete: {case}");
                            assert_ne!(first, p.write, "{case}");
                            assert_eq!(boots(n, a, b), Some(s), "{case}");
                        }
                    }
                    // The switch.
                    assert_eq!(order(Some(p.write))[0], p.write);
                    assert_eq!(boots(Some(p.write), ac, bc), Some(p.write), "{case}");
                    // Nothing is renamed that is already first.
                    if let Some(n) = p.name_first {
                        assert_ne!(Some(n), named, "{case}");
                    }
                }
            }
        }
    }

    /// With what GRUB did this boot, the model says GRUB starts that set, and the plan never
    /// writes it.
    #[test]
    fn the_set_grub_started_is_never_written() {
        for named in [None, Some(Set::A), Some(Set::B)] {
            for a in [false, true] {
                for b in [false, true] {
                    for s in Set::BOTH {
                        let (a2, b2) = observed(named, a, b, Some(s));
                        assert_eq!(boots(named, a2, b2), Some(s));
                        let p = plan(named, a2, b2);
                        assert_ne!(p.write, s, "{named:?} {a} {b} started {s}");
                    }
                    assert_eq!(observed(named, a, b, None), (a, b));
                }
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for s in Set::BOTH {
            assert_eq!(Set::from_name(s.name()), Some(s));
            assert_eq!(s.other().other(), s);
        }
        assert_eq!(Set::from_name("c"), None);
        assert_eq!(order(None), [Set::A, Set::B]);
        assert_eq!(order(Some(Set::B)), [Set::B, Set::A]);
    }
}
