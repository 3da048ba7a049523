//! Deterministic simulation of whole fleets in virtual time (`sim run`,
//! `sim sweep`): see `sim/README.md` for the fault model and invariants.

pub mod backend;
pub mod core;
