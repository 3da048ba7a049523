//! A gateway clock that jumps backwards or is hours off: changes stay
//! ordered by their hybrid logical clock (DESIGN.md §2), across restarts
//! and new epochs, whatever the files' mtimes say.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use edge_agent::Agent;
use protocol::client::ClientStore;
use protocol::hlc::Hlc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

const HOUR: u64 = 3_600_000;

/// HLC of the latest pending version of `path`.
fn hlc_of(a: &mut Agent, path: &str) -> Hlc {
    all_pending(a)
        .into_iter()
        .rev()
        .find(|c| c.body.path() == path)
        .map(|c| c.hlc)
        .unwrap_or_else(|| panic!("no pending change of {path}"))
}

#[test]
fn hlc_never_goes_back_when_the_wall_clock_does() {
    let t = tempfile::tempdir().unwrap();
    let watch = t.path().join("cell");
    std::fs::create_dir(&watch).unwrap();
    let state = t.path().join("state.redb");
    let wall = Arc::new(AtomicU64::new(1_750_000_000_000));
    let mut cfg = config("gw1", std::slice::from_ref(&watch), &state);
    let w = wall.clone();
    cfg.clock = Arc::new(move || w.load(Ordering::SeqCst));
    let f = watch.join("line.csv");
    let mut version = 0u64;
    let mut write = |mtime: SystemTime| {
        version += 1;
        std::fs::write(&f, csv_lines(10_000 + version as usize * 100, version)).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
    };
    let now = SystemTime::now();
    let mut seen: Vec<Hlc> = Vec::new();
    let step = |a: &mut Agent, seen: &mut Vec<Hlc>, what: &str| {
        assert_eq!(a.scan_once().unwrap().changes_recorded, 1, "{what}");
        let h = hlc_of(a, "cell/line.csv");
        if let Some(prev) = seen.last() {
            assert!(h > *prev, "{what}: HLC went back from {prev:?} to {h:?}");
        }
        seen.push(h);
    };

    let mut a = Agent::open(cfg.clone()).unwrap();
    write(now - Duration::from_secs(7200));
    step(&mut a, &mut seen, "first version");
    assert_eq!(seen[0].millis(), 1_750_000_000_000);

    // The wall clock jumps three hours back (NTP fix, RTC battery).
    wall.fetch_sub(3 * HOUR, Ordering::SeqCst);
    write(now - Duration::from_secs(7000));
    step(&mut a, &mut seen, "after the clock jumped back");
    assert_eq!(seen[1].millis(), seen[0].millis(), "physical part holds, counter moves");

    // The file's mtime goes backwards too (copied in with an old stamp).
    write(now - Duration::from_secs(86_400));
    step(&mut a, &mut seen, "mtime a day back");

    // A restart while the clock is still behind: the HLC is in the state file.
    drop(a);
    let mut a = Agent::open(cfg.clone()).unwrap();
    write(now - Duration::from_secs(6000));
    step(&mut a, &mut seen, "after a restart with the clock behind");

    // Hours ahead, then corrected back.
    wall.fetch_add(8 * HOUR, Ordering::SeqCst);
    write(now - Duration::from_secs(5000));
    step(&mut a, &mut seen, "clock five hours ahead");
    wall.fetch_sub(5 * HOUR, Ordering::SeqCst);
    write(now - Duration::from_secs(4000));
    step(&mut a, &mut seen, "clock corrected back");

    // A new epoch (the server knows seqs this state never sent) keeps the HLC.
    let old = a.replica();
    a.on_knowledge(&knowledge_up_to(&old, 100), &protocol::Knowledge::default())
        .unwrap();
    assert_ne!(a.replica(), old);
    wall.fetch_sub(10 * HOUR, Ordering::SeqCst);
    step(&mut a, &mut seen, "first change of the new epoch, clock far behind");

    // Within one epoch, seq order and HLC order agree.
    let p = all_pending(&mut a);
    assert!(p.windows(2).all(|w| w[0].seq < w[1].seq && w[0].hlc < w[1].hlc));
}
