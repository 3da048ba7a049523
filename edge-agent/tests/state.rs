//! State file: restart, outbox pruning by cloud knowledge, identity and
//! lock errors, status (library and `edge-agent status --json`).

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use edge_agent::{read_status, snapshot_path, Agent, Error};
use protocol::client::ClientStore;
use protocol::Knowledge;

fn setup(t: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let watch = t.join("cell");
    std::fs::create_dir(&watch).unwrap();
    for (i, n) in ["a.bin", "b.bin", "c.csv"].iter().enumerate() {
        std::fs::write(watch.join(n), pseudo_random(20_000 + i * 1000, i as u64 + 1)).unwrap();
        settle(&watch.join(n));
    }
    (watch, t.join("state.redb"))
}

#[test]
fn restart_continues_seq_keeps_outbox_and_prunes_on_cloud_knowledge() {
    let t = tempfile::tempdir().unwrap();
    let (watch, state) = setup(t.path());
    let cfg = config("gw1", std::slice::from_ref(&watch), &state);
    let replica;
    {
        let mut a = Agent::open(cfg.clone()).unwrap();
        replica = a.replica();
        let r = a.scan_once().unwrap();
        assert_eq!(r.changes_recorded, 3);
        let s = a.status().unwrap();
        assert_eq!((s.next_seq, s.files_tracked, s.changes_recorded), (4, 3, 3));
        assert_eq!((s.pending_changes, s.oldest_pending_seq), (3, Some(1)));
        assert_eq!(s.logical_bytes, 20_000 + 21_000 + 22_000);
        assert_eq!(s.pending_bytes, s.logical_bytes);
    }
    // Reopen: same replica, seq continues, nothing re-recorded, outbox intact.
    let mut a = Agent::open(cfg.clone()).unwrap();
    assert_eq!(a.replica(), replica);
    let r = a.scan_once().unwrap();
    assert_eq!(
        (r.files_unchanged, r.changes_recorded, r.bytes_read),
        (3, 0, 0),
        "{r:?}"
    );
    let p = all_pending(&mut a);
    assert_eq!(p.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    std::fs::write(watch.join("a.bin"), pseudo_random(5_000, 77)).unwrap();
    let r = a.scan_once().unwrap();
    assert_eq!(r.changes_recorded, 1);
    assert_eq!(all_pending(&mut a).last().unwrap().seq, 4);
    assert_eq!(a.status().unwrap().next_seq, 5);

    // Regional knowledge alone prunes nothing; `pending(have)` skips what the server has.
    a.on_knowledge(&knowledge_up_to(&replica, 4), &Knowledge::default())
        .unwrap();
    assert_eq!(a.status().unwrap().pending_changes, 4);
    assert!(a
        .pending(&knowledge_up_to(&replica, 4), 100, 1 << 20)
        .unwrap()
        .is_empty());
    let mut have = Knowledge::default();
    have.insert(&replica, 2);
    let seqs: Vec<u64> = a.pending(&have, 100, 1 << 20).unwrap().iter().map(|c| c.seq).collect();
    assert_eq!(seqs, vec![1, 3, 4]);
    assert_eq!(a.pending(&have, 1, 1 << 20).unwrap().len(), 1, "max");
    assert_eq!(
        a.pending(&have, 100, 1).unwrap().len(),
        1,
        "at least one even over max_bytes"
    );

    // Cloud knowledge of 1..=2 prunes those two.
    a.on_knowledge(&knowledge_up_to(&replica, 4), &knowledge_up_to(&replica, 2))
        .unwrap();
    let s = a.status().unwrap();
    assert_eq!((s.pending_changes, s.oldest_pending_seq), (2, Some(3)));
    assert_eq!((s.regional_durable, s.cloud_durable), (4, 2));
    assert_eq!(
        all_pending(&mut a).iter().map(|c| c.seq).collect::<Vec<_>>(),
        vec![3, 4]
    );

    // Cloud knowledge of everything: outbox empty.
    a.on_knowledge(&knowledge_up_to(&replica, 4), &knowledge_up_to(&replica, 4))
        .unwrap();
    let s = a.status().unwrap();
    assert_eq!((s.pending_changes, s.pending_bytes), (0, 0));
    assert_eq!((s.oldest_pending_seq, s.oldest_pending_age_secs), (None, None));
    assert_eq!(s.oldest_pending_recorded_ms, None);
    assert!(all_pending(&mut a).is_empty());
    drop(a);

    // All of it survives a restart.
    let mut a = Agent::open(cfg).unwrap();
    let s = a.status().unwrap();
    assert_eq!(
        (s.next_seq, s.pending_changes, s.cloud_durable, s.files_tracked),
        (5, 0, 4, 3)
    );
    assert!(all_pending(&mut a).is_empty());
    assert_eq!(a.scan_once().unwrap().changes_recorded, 0);
}

#[test]
fn server_ahead_of_state_starts_a_new_epoch_and_reoffers_everything() {
    let t = tempfile::tempdir().unwrap();
    let (watch, state) = setup(t.path());
    let mut a = Agent::open(config("gw1", std::slice::from_ref(&watch), &state)).unwrap();
    a.scan_once().unwrap();
    let old = a.replica();
    // The server knows seq 10 of this replica, which this state never handed
    // out: the state was restored from an old copy.
    a.on_knowledge(&knowledge_up_to(&old, 10), &Knowledge::default())
        .unwrap();
    assert_ne!(a.replica(), old);
    assert_eq!(a.replica().device, old.device);
    let s = a.status().unwrap();
    assert_eq!((s.next_seq, s.pending_changes), (1, 0));
    assert_eq!(s.counters.state_rollbacks, 1);
    let r = a.scan_once().unwrap();
    assert_eq!(
        (r.files_changed, r.changes_recorded, r.chunks_new),
        (3, 3, 0),
        "every file re-recorded; known chunks stay valid: {r:?}"
    );
    let p = all_pending(&mut a);
    assert_eq!(p.len(), 3);
    assert!(p.iter().all(|c| c.replica == a.replica()));
    let s = a.status().unwrap();
    assert_eq!((s.files_tracked, s.logical_bytes), (3, 63_000));
}

/// The bug this guards against: a state file restored from an old copy
/// records new changes (a startup scan, or days offline) before it hears
/// from the server. Its new seqs then collide with the ones the lost
/// lineage already sent, so "server knows a seq >= next_seq" never fires,
/// and the server's copies of those seqs were taken for these changes,
/// which were never sent: a.bin's newest content was silently lost.
#[test]
fn rolled_back_state_that_recorded_before_reconnecting_starts_a_new_epoch() {
    let t = tempfile::tempdir().unwrap();
    let (watch, state) = setup(t.path());
    let cfg = config("gw1", std::slice::from_ref(&watch), &state);
    let old_copy = t.path().join("old.redb");
    let replica;
    {
        let mut a = Agent::open(cfg.clone()).unwrap();
        replica = a.replica();
        a.scan_once().unwrap();
        all_pending(&mut a);
        a.on_knowledge(&knowledge_up_to(&replica, 3), &knowledge_up_to(&replica, 3))
            .unwrap();
    }
    std::fs::copy(&state, &old_copy).unwrap();
    {
        // The lineage that is about to be lost sends seqs 4 and 5.
        let mut a = Agent::open(cfg.clone()).unwrap();
        std::fs::write(watch.join("a.bin"), pseudo_random(30_000, 41)).unwrap();
        std::fs::write(watch.join("b.bin"), pseudo_random(30_000, 42)).unwrap();
        bump_mtime(&watch.join("a.bin"), 5);
        bump_mtime(&watch.join("b.bin"), 5);
        assert_eq!(a.scan_once().unwrap().changes_recorded, 2);
        assert_eq!(all_pending(&mut a).len(), 2);
        a.on_knowledge(&knowledge_up_to(&replica, 5), &knowledge_up_to(&replica, 5))
            .unwrap();
        assert_eq!(a.replica(), replica, "no rollback yet");
    }
    // The state comes back from the old copy; meanwhile a.bin changed again
    // and c.csv was deleted.
    std::fs::copy(&old_copy, &state).unwrap();
    std::fs::write(watch.join("a.bin"), pseudo_random(30_000, 43)).unwrap();
    bump_mtime(&watch.join("a.bin"), 10);
    std::fs::remove_file(watch.join("c.csv")).unwrap();
    let mut a = Agent::open(cfg).unwrap();
    assert_eq!(a.replica(), replica);
    let pubkey = a.public_key();
    assert_eq!(a.scan_once().unwrap().changes_recorded, 3); // seqs 4, 5, 6
                                                            // Reconnect: the server knows 1..=5. Seqs 4 and 5 of this state never
                                                            // left it; the server's are the lost lineage's.
    a.on_knowledge(&knowledge_up_to(&replica, 5), &knowledge_up_to(&replica, 5))
        .unwrap();
    assert_ne!(a.replica(), replica, "a rolled-back state must start a new epoch");
    assert_eq!(a.public_key(), pubkey, "the device keeps its key");
    assert_eq!(a.status().unwrap().counters.state_rollbacks, 1);
    let r = a.scan_once().unwrap();
    assert_eq!((r.changes_recorded, r.files_changed), (2, 2), "{r:?}");
    let p = all_pending(&mut a);
    let paths: Vec<(&str, bool)> = p
        .iter()
        .map(|c| {
            (
                c.body.path(),
                matches!(c.body, protocol::manifest::ChangeBody::Delete(_)),
            )
        })
        .collect();
    assert_eq!(
        paths,
        vec![("cell/c.csv", true), ("cell/a.bin", false), ("cell/b.bin", false)],
        "the deletion the old outbox held is recorded again, and every file on disk re-offered"
    );
    assert!(p.iter().all(|c| c.replica == a.replica()));
    // a.bin's newest content is what is offered.
    let v = latest_version(&mut a, "cell/a.bin");
    assert_eq!(v.sha256.0, sha256(&pseudo_random(30_000, 43)));
}

/// The server knowing exactly what this state offered is not a rollback,
/// even when nothing beyond it was recorded; and offers survive a restart.
#[test]
fn knowledge_of_offered_seqs_is_not_a_rollback() {
    let t = tempfile::tempdir().unwrap();
    let (watch, state) = setup(t.path());
    let cfg = config("gw1", std::slice::from_ref(&watch), &state);
    let r;
    {
        let mut a = Agent::open(cfg.clone()).unwrap();
        r = a.replica();
        a.scan_once().unwrap();
        assert_eq!(a.pending(&Knowledge::default(), 2, 1 << 20).unwrap().len(), 2);
    }
    let mut a = Agent::open(cfg).unwrap();
    a.on_knowledge(&knowledge_up_to(&r, 2), &Knowledge::default()).unwrap();
    assert_eq!(a.replica(), r);
    // Seq 3 was recorded but never offered: a server that knows it got it
    // from another copy of this state.
    a.on_knowledge(&knowledge_up_to(&r, 3), &Knowledge::default()).unwrap();
    assert_ne!(a.replica(), r);
}

/// The device key lives next to the state file: a deleted state file gives
/// a new epoch but the same key (the sink pinned it); a key file of another
/// device, or one that disagrees with the state file, is refused.
#[test]
fn device_key_survives_a_deleted_state_file() {
    let t = tempfile::tempdir().unwrap();
    let (watch, state) = setup(t.path());
    let cfg = config("gw1", std::slice::from_ref(&watch), &state);
    let a = Agent::open(cfg.clone()).unwrap();
    let (key, replica) = (a.public_key(), a.replica());
    drop(a);
    let key_file = edge_agent::store::device_key_path(&state);
    let text = std::fs::read_to_string(&key_file).unwrap();
    assert!(text.contains("device acme/plant1/gw1"), "{text}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "key file readable by others: {mode:o}");
    }
    std::fs::remove_file(&state).unwrap();
    let mut a = Agent::open(cfg.clone()).unwrap();
    assert_eq!(a.public_key(), key);
    assert_ne!(a.replica(), replica, "new state, new epoch");
    assert_eq!(a.scan_once().unwrap().files_new, 3);
    drop(a);

    // Another device's key file next to a new state file.
    let other = t.path().join("other.redb");
    std::fs::copy(&key_file, edge_agent::store::device_key_path(&other)).unwrap();
    match Agent::open(config("gw2", std::slice::from_ref(&watch), &other)) {
        Err(Error::Identity { requested, .. }) => assert_eq!(requested, "acme/plant1/gw2"),
        Err(e) => panic!("expected Identity, got {e}"),
        Ok(_) => panic!("opened with another device's key"),
    }
    // A key file that disagrees with the state file.
    let st2 = t.path().join("st2.redb");
    drop(Agent::open(config("gw1", std::slice::from_ref(&watch), &st2)).unwrap());
    std::fs::copy(&key_file, edge_agent::store::device_key_path(&st2)).unwrap();
    match Agent::open(config("gw1", std::slice::from_ref(&watch), &st2)) {
        Err(Error::Corrupt { detail, .. }) => assert!(detail.contains("another key"), "{detail}"),
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("opened with a mismatched key file"),
    }
    // Garbage in the key file is a clear error, not a panic.
    std::fs::write(edge_agent::store::device_key_path(&st2), "junk").unwrap();
    assert!(matches!(
        Agent::open(config("gw1", std::slice::from_ref(&watch), &st2)),
        Err(Error::Corrupt { .. })
    ));
}

#[test]
fn identity_and_lock_errors_and_snapshot_fallback() {
    let t = tempfile::tempdir().unwrap();
    let (watch, state) = setup(t.path());
    let a = Agent::open(config("gw1", std::slice::from_ref(&watch), &state)).unwrap();

    // Held by another Agent: Locked, and read_status has no snapshot yet.
    match Agent::open(config("gw1", std::slice::from_ref(&watch), &state)) {
        Err(Error::Locked { path }) => assert_eq!(path, state),
        Err(e) => panic!("expected Locked, got {e}"),
        Ok(_) => panic!("expected Locked, opened twice"),
    }
    assert!(matches!(read_status(&state), Err(Error::Locked { .. })));
    a.write_snapshot().unwrap();
    assert!(snapshot_path(&state).exists());
    let s = read_status(&state).unwrap();
    assert!(s.from_snapshot);
    assert_eq!(s.device, "acme/plant1/gw1");
    drop(a);

    // Not held: read directly.
    assert!(!read_status(&state).unwrap().from_snapshot);

    // Another device's state file.
    match Agent::open(config("gw2", std::slice::from_ref(&watch), &state)) {
        Err(Error::Identity { stored, requested, .. }) => {
            assert_eq!(stored, "acme/plant1/gw1");
            assert_eq!(requested, "acme/plant1/gw2");
        }
        Err(e) => panic!("expected Identity, got {e}"),
        Ok(_) => panic!("opened another device's state"),
    }
    // The failed open changed nothing.
    let mut a = Agent::open(config("gw1", std::slice::from_ref(&watch), &state)).unwrap();
    assert_eq!(a.scan_once().unwrap().files_new, 3);

    // A missing state file is an I/O error, not a new empty status.
    assert!(matches!(
        read_status(&t.path().join("nope.redb")),
        Err(Error::Io { .. })
    ));
    // The redb page cache is small and explicit (the default is 1 GiB).
    const { assert!(edge_agent::store::CACHE_BYTES <= 16 << 20) };
}

#[test]
fn status_json_has_the_operator_fields() {
    let t = tempfile::tempdir().unwrap();
    let (watch, state) = setup(t.path());
    let t_before = edge_agent::store::now_ms();
    {
        let mut a = Agent::open(config("gw1", std::slice::from_ref(&watch), &state)).unwrap();
        a.scan_once().unwrap();
        let r = a.replica();
        all_pending(&mut a); // offered to the server
        a.on_knowledge(&knowledge_up_to(&r, 3), &knowledge_up_to(&r, 1))
            .unwrap();
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["status", "--json", "--state"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in [
        "files_tracked",
        "changes_recorded",
        "logical_bytes",
        "wire_bytes_sent",
        "chunks_sent",
        "chunks_skipped_known",
        "oldest_pending_age_secs",
        "oldest_pending_seq",
        "oldest_pending_recorded_ms",
        "pending_changes",
    ] {
        assert!(v.get(k).is_some(), "status --json lacks {k}: {v}");
    }
    assert_eq!(v["files_tracked"], 3);
    assert_eq!(v["changes_recorded"], 3);
    assert_eq!(v["logical_bytes"], 63_000);
    assert_eq!(v["wire_bytes_sent"], 0);
    assert_eq!(v["pending_changes"], 2);
    assert_eq!(v["oldest_pending_seq"], 2, "seq 1 is cloud-durable");
    assert_eq!(v["oldest_pending_age_secs"], 0);
    let rec = v["oldest_pending_recorded_ms"].as_u64().unwrap();
    assert!(rec >= t_before && rec <= edge_agent::store::now_ms());

    // The library gives the same, and the text form names the backlog.
    let s = read_status(&state).unwrap();
    assert_eq!(s.oldest_pending_seq, Some(2));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["status", "--state"])
        .arg(&state)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("backlog           2 change(s)"), "{text}");
    assert!(text.contains("(seq 2)"), "{text}");
}

#[test]
fn snapshot_age_is_recomputed_when_read() {
    let t = tempfile::tempdir().unwrap();
    let (watch, state) = setup(t.path());
    let mut a = Agent::open(config("gw1", std::slice::from_ref(&watch), &state)).unwrap();
    a.scan_once().unwrap();
    a.write_snapshot().unwrap();
    // Age the snapshot: pretend it was written (and the change recorded) an hour ago.
    let snap = snapshot_path(&state);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&snap).unwrap()).unwrap();
    let hour_ago = edge_agent::store::now_ms() - 3_600_000;
    v["oldest_pending_recorded_ms"] = hour_ago.into();
    v["oldest_pending_age_secs"] = 0.into();
    std::fs::write(&snap, serde_json::to_vec(&v).unwrap()).unwrap();
    let s = read_status(&state).unwrap();
    assert!(s.from_snapshot);
    let age = s.oldest_pending_age_secs.unwrap();
    assert!((3600..3700).contains(&age), "stale snapshot age not recomputed: {age}");
}
