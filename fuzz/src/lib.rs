//! Fuzzing every decoder that reads the wire, on stable Rust.
//!
//! Each [`Target`] takes raw bytes as they would arrive from NATS and runs the engine's own
//! decoding on them (events, the `Policy-State` header, agent answers, admin arguments, policy
//! documents, tap records), then checks what must hold for whatever decoded: it round-trips,
//! candidates only narrow, the dispatcher's keys stay the dispatcher's. A panic anywhere is a
//! finding. Inputs come from a seed corpus (`fuzz/corpus/<target>/`, valid messages) by
//! mutation, from a generator of arbitrary MessagePack trees over the contract's field names,
//! and from plain random bytes. There is no coverage feedback (that needs nightly); the
//! structure-aware generator is what reaches past the first type check.
#![forbid(unsafe_code)]

mod gen;
mod targets;

pub use gen::{mutate, structured};
pub use targets::{seeds, Target, TARGETS};
