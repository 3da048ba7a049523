//! An agent starting while `edge-agent status` reads its state file.
//!
//! `status` opens the file read-only (a shared lock) for a few milliseconds.
//! An agent whose open fell into that instant used to exit with "state file
//! … is in use by another process": sim/tests/shared.rs then waited in vain
//! for a tag pushed to a daemon that had never started (its check that the
//! daemon was up read the state file the previous sync left).

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use edge_agent::{Agent, Error, OPEN_LOCK_WAIT};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[test]
fn an_agent_opening_during_a_status_read_waits_for_it() {
    let t = tempfile::tempdir().unwrap();
    let watch = t.path().join("cell");
    std::fs::create_dir(&watch).unwrap();
    let state = t.path().join("state.redb");
    let cfg = config("gw1", std::slice::from_ref(&watch), &state);
    drop(Agent::open(cfg.clone()).unwrap());

    // A reader holds the file the way `edge-agent status` does.
    let (held_tx, held_rx) = mpsc::channel();
    let reader = {
        let state = state.clone();
        std::thread::spawn(move || {
            let db = redb::Builder::new().open_read_only(&state).unwrap();
            held_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            drop(db);
        })
    };
    held_rx.recv().unwrap();
    // Right now the file is in use: an exclusive open fails.
    let once = redb::Builder::new().create(&state);
    assert!(
        matches!(once, Err(redb::DatabaseError::DatabaseAlreadyOpen)),
        "the reader holds the file"
    );
    // The agent's own open waits for the reader and succeeds.
    let a = Agent::open(cfg.clone()).expect("opens once the reader is done");
    reader.join().unwrap();

    // A running agent holds the file for good: a second one still fails,
    // after the wait.
    let t0 = Instant::now();
    let second = Agent::open(cfg.clone());
    assert!(matches!(second, Err(Error::Locked { .. })), "opened twice");
    assert!(t0.elapsed() >= OPEN_LOCK_WAIT);
    drop(a);
}
