//! Deterministic simulation of whole fleets in virtual time (`sim run`,
//! `sim sweep`): see `sim/README.md` for the fault model and invariants.

pub mod backend;
pub mod core;
pub mod engine;
pub mod faultstore;
pub mod net;
pub mod nodes;
pub mod report;
pub mod scenario;
pub mod sweep;

pub use engine::{run, Options, RunResult, Violation};
pub use scenario::Scenario;
