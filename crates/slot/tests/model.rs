//! Model check of the slot transitions: every sequence of update steps, boots, health results,
//! operator rollbacks, reboots and power cuts up to a bounded length, from a fresh disk.
//!
//! Each transition is one atomic table write (`torn.rs` shows the write is atomic), so a crash
//! "between any two writes" is a power cut between any two actions. The model keeps ghost state
//! the disk does not have: what each slot really holds (nothing, a half-written image, a good
//! image, an image whose kernel panics, an image that fails its health checks), which slot's
//! image was confirmed good, and which slot the last decision intended to boot next.
//! After every action it checks:
//!
//! 1. some slot holding an image that was confirmed good is bootable;
//! 2. no slot holding nothing or a half-written image is bootable;
//! 3. the slot the boot path would choose is the intended one;
//! 4. the running slot is never the target of a write.

use slot::choice::{self, Slot, Slots};
use slot::{GptPrio, Tries};
use std::collections::HashSet;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Content {
    Empty,
    Partial,
    Good,
    Panics,
    Unhealthy,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Agent {
    Idle,
    Prepared(Slot),
    Writing(Slot),
    Written(Slot),
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct World {
    slots: Slots,
    content: [Content; 2],
    confirmed: [bool; 2],
    running: Option<Slot>,
    agent: Agent,
    intended: Slot,
    /// The operator rolled back since the last activation: that choice stands.
    rolled_back: bool,
}

#[derive(Clone, Copy, Debug)]
enum Action {
    Boot,
    PowerCut,
    Reboot,
    StartUpdate,
    WriteStart,
    WriteDone(Content),
    Activate,
    Health,
    Rollback,
}

const ACTIONS: [Action; 11] = [
    Action::Boot,
    Action::PowerCut,
    Action::Reboot,
    Action::StartUpdate,
    Action::WriteStart,
    Action::WriteDone(Content::Good),
    Action::WriteDone(Content::Panics),
    Action::WriteDone(Content::Unhealthy),
    Action::Activate,
    Action::Health,
    Action::Rollback,
];

fn idx(s: Slot) -> usize {
    match s {
        Slot::A => 0,
        Slot::B => 1,
    }
}

const TRIES: u8 = 2;

/// The world after `a`, or `None` when `a` does not apply. Panics on a model violation.
fn step(w: &World, a: Action) -> Option<World> {
    let mut n = *w;
    match (a, w.running, w.agent) {
        (Action::Boot, None, _) => {
            let (chosen, slots) =
                choice::boot_attempt(&w.slots).expect("no bootable slot: the node is bricked");
            n.slots = slots;
            let c = w.content[idx(chosen)];
            assert!(!matches!(c, Content::Empty | Content::Partial), "booted slot {chosen} holding {c:?}");
            let p = slots.get(chosen);
            // A slot that just spent its last try falls back to the other on the next boot.
            n.intended = if !p.successful() && p.tries() == 0 { chosen.other() } else { chosen };
            n.running = match c {
                Content::Panics => None,
                _ => Some(chosen),
            };
            n.agent = match w.agent {
                // After a reboot the agent starts over; a half-written slot stays unbootable.
                Agent::Written(_) | Agent::Prepared(_) | Agent::Writing(_) => Agent::Idle,
                Agent::Idle => Agent::Idle,
            };
        }
        (Action::PowerCut | Action::Reboot, Some(_), _) => n.running = None,
        (Action::StartUpdate, Some(r), Agent::Idle) => {
            // The function itself must refuse to start from an unconfirmed slot.
            n.slots = match choice::prepare(&w.slots, r) {
                Ok(s) => s,
                Err(_) if !w.slots.get(r).successful() => return None,
                Err(e) => panic!("prepare refused on a confirmed slot: {e}"),
            };
            n.agent = Agent::Prepared(r.other());
            // A staged but not yet booted update is withdrawn: the running slot boots next.
            n.intended = r;
            n.rolled_back = false;
        }
        (Action::WriteStart, Some(r), Agent::Prepared(t)) => {
            assert_ne!(t, r, "writing the running slot");
            n.content[idx(t)] = Content::Partial;
            n.confirmed[idx(t)] = false;
            n.agent = Agent::Writing(t);
        }
        (Action::WriteDone(c), Some(_), Agent::Writing(t)) => {
            n.content[idx(t)] = c;
            n.agent = Agent::Written(t);
        }
        (Action::Activate, Some(r), Agent::Written(t)) => {
            n.slots = choice::activate(&w.slots, r, Tries::new(TRIES).unwrap()).expect("activate refused");
            n.intended = t;
            n.rolled_back = false;
            n.agent = Agent::Idle;
        }
        (Action::Health, Some(r), _) if !w.slots.get(r).successful() && w.slots.get(r).priority() > 0 => {
            match w.content[idx(r)] {
                Content::Good => {
                    n.slots = choice::mark_good(&w.slots, r).expect("mark good refused");
                    n.confirmed[idx(r)] = true;
                    // A slot confirmed on its last try boots next; but after an operator's
                    // rollback the other slot still does.
                    if !w.rolled_back {
                        n.intended = r;
                    }
                }
                Content::Unhealthy => {
                    n.slots = choice::mark_bad(&w.slots, r).expect("mark bad refused: no fallback");
                    n.intended = r.other();
                }
                other => panic!("running slot {r} holds {other:?}"),
            }
        }
        (Action::Rollback, Some(r), Agent::Idle) => match choice::rollback(&w.slots, r) {
            Ok(slots) => {
                n.slots = slots;
                n.intended = r.other();
                n.rolled_back = true;
            }
            Err(_) => return None,
        },
        _ => return None,
    }
    check(&n);
    Some(n)
}

fn check(w: &World) {
    let good_bootable = Slot::BOTH
        .iter()
        .any(|&s| w.slots.get(s).bootable() && w.content[idx(s)] == Content::Good && w.confirmed[idx(s)]);
    assert!(good_bootable, "no confirmed-good slot is bootable: {w:?}");
    for s in Slot::BOTH {
        if matches!(w.content[idx(s)], Content::Empty | Content::Partial) {
            assert!(!w.slots.get(s).bootable(), "slot {s} is bootable with {:?}: {w:?}", w.content[idx(s)]);
        }
    }
    assert_eq!(choice::choose(&w.slots), Some(w.intended), "boots next is not the intended slot: {w:?}");
}

fn explore(w: &World, depth: usize, path: &mut Vec<Action>, seen: &mut HashSet<World>, sequences: &mut u64) {
    seen.insert(*w);
    if depth == 0 {
        *sequences += 1;
        return;
    }
    let mut any = false;
    for a in ACTIONS {
        path.push(a);
        let next = std::panic::catch_unwind(|| step(w, a)).unwrap_or_else(|e| {
            eprintln!("violation after actions {path:?}");
            std::panic::resume_unwind(e)
        });
        if let Some(n) = next {
            any = true;
            explore(&n, depth - 1, path, seen, sequences);
        }
        path.pop();
    }
    if !any {
        *sequences += 1;
    }
}

#[test]
fn every_sequence_keeps_a_good_slot_bootable() {
    let start = World {
        slots: Slots { a: GptPrio::from_parts(1, 0, true).unwrap(), b: GptPrio(0) },
        content: [Content::Good, Content::Empty],
        confirmed: [true, false],
        running: Some(Slot::A),
        agent: Agent::Idle,
        intended: Slot::A,
        rolled_back: false,
    };
    check(&start);
    let depth = std::env::var("ACL_MODEL_DEPTH").ok().and_then(|d| d.parse().ok()).unwrap_or(18);
    let mut seen = HashSet::new();
    let mut sequences = 0;
    explore(&start, depth, &mut Vec::new(), &mut seen, &mut sequences);
    eprintln!("model: {sequences} action sequences of length {depth}, {} distinct states", seen.len());
    // The bound must reach the interesting states: a second update after a confirmed first
    // one, a slot rolled back to, tries exhausted by a panicking kernel.
    assert!(seen.iter().any(|w| w.confirmed == [true, true]));
    assert!(seen.iter().any(|w| w.content.contains(&Content::Panics) && w.running.is_some() && {
        let s = w.slots.get(Slot::A.other());
        !s.bootable() || !w.slots.get(Slot::A).bootable()
    }));
    assert!(sequences > 100_000, "only {sequences} sequences");

    // Beyond any bound: every reachable state and every action from it (breadth first).
    let mut reached: HashSet<World> = HashSet::from([start]);
    let mut queue = vec![start];
    let mut transitions = 0u64;
    while let Some(w) = queue.pop() {
        for a in ACTIONS {
            if let Some(n) = step(&w, a) {
                transitions += 1;
                if reached.insert(n) {
                    queue.push(n);
                }
            }
        }
    }
    eprintln!("model: all {} reachable states and {transitions} transitions checked", reached.len());
    assert_eq!(reached.len(), seen.len(), "the bounded search should have reached every state");
}

/// `chosen_by_rule` (the second stage's check) accepts exactly the slots a boot attempt can
/// have chosen, over every pair of gptprio values.
#[test]
fn chosen_by_rule_is_exactly_what_boot_attempt_chooses() {
    let all: Vec<GptPrio> = (0..16u8)
        .flat_map(|p| {
            (0..16u8).flat_map(move |t| [false, true].map(|ok| GptPrio::from_parts(p, t, ok).unwrap()))
        })
        .collect();
    let mut possible = HashSet::new();
    for &a in &all {
        for &b in &all {
            if let Some((chosen, after)) = choice::boot_attempt(&Slots { a, b }) {
                possible.insert((after, chosen));
            }
        }
    }
    let mut accepted = 0usize;
    for &a in &all {
        for &b in &all {
            let s = Slots { a, b };
            for x in Slot::BOTH {
                let want = possible.contains(&(s, x));
                assert_eq!(choice::chosen_by_rule(&s, x), want, "slot {x} with A {a:?}, B {b:?}");
                accepted += usize::from(want);
            }
        }
    }
    // Neither everything nor nothing: the check can refuse.
    assert!(accepted > 1000 && accepted < all.len() * all.len(), "{accepted}");
}
