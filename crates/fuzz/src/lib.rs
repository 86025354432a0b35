//! Fuzzing of the parsers that read what the network or a disk hands us: channel index,
//! manifest, signature file, slot trailer, GPT, node annotations and the agent's local API.
//!
//! Stable Rust, no instrumentation: `proptest` drives each parser with inputs made from a seed
//! corpus kept in `corpus/` (valid documents, so that mutations reach deep into the parsers)
//! mutated by byte edits, splices and truncations, plus raw random bytes. The property is the
//! same everywhere: no panic, whatever the input, and a bounded result. `cargo xtask test` runs
//! a bounded number of cases per parser (`ACL_FUZZ_CASES`, 256 by default); set it higher for a
//! longer run. `cargo test -p fuzz -- --ignored write_corpus` regenerates the seeds.
