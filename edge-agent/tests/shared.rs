//! Shared paths and central metadata at the edge (DESIGN.md §6): version
//! vectors on the changes of shared classes, server changes merged as
//! CRDTs with a durable cursor, legal holds that beat every kind of local
//! pruning, and what `status` reports about them.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use edge_agent::policy::{ClassSpec, FileConfig, Prune};
use edge_agent::{read_status, Agent, AgentConfig, DiskWatermarks, Watermark};
use protocol::client::{ClientConfig, ClientSession, ClientStore};
use protocol::hlc::Hlc;
use protocol::manifest::{Change, ChangeBody};
use protocol::meta::{MetaState, ServerBody, ServerChange};
use protocol::msg::Message;
use protocol::shared::{ConflictPolicy, VersionVector};
use protocol::{Knowledge, RangeSet};
use std::cmp::Ordering;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering as AtOrd};
use std::sync::Arc;

/// 2025-03-03 00:00:00 UTC in ms.
const DAY0: u64 = 1_740_960_000_000;

fn class(name: &str, globs: &[&str]) -> ClassSpec {
    ClassSpec {
        name: name.into(),
        globs: Some(globs.iter().map(|g| g.to_string()).collect()),
        ..ClassSpec::default()
    }
}

fn shared_class(name: &str, globs: &[&str], conflict: Option<&str>) -> ClassSpec {
    ClassSpec {
        shared: Some(true),
        conflict: conflict.map(str::to_string),
        ..class(name, globs)
    }
}

fn manual_clock(start: u64) -> (Arc<AtomicU64>, edge_agent::Clock) {
    let t = Arc::new(AtomicU64::new(start));
    let c = t.clone();
    (t, Arc::new(move || c.load(AtOrd::SeqCst)))
}

fn write(dir: &Path, name: &str, data: &[u8]) {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, data).unwrap();
    settle(&p);
}

fn vv(e: &[(&str, u64)]) -> VersionVector {
    VersionVector(e.iter().map(|(d, v)| (d.to_string(), *v)).collect())
}

/// The last pending change of `path`.
fn last_change(a: &mut Agent, path: &str) -> Change {
    all_pending(a)
        .into_iter()
        .rev()
        .find(|c| c.body.path() == path)
        .unwrap_or_else(|| panic!("no pending change of {path}"))
}

/// An agent (device gw1) watching `<t>/cell` with a shared class for
/// `*/line/*` (append-merge) and a manual clock.
fn shared_agent(t: &Path) -> (PathBuf, AgentConfig, Arc<AtomicU64>) {
    let watch = t.join("cell");
    std::fs::create_dir_all(&watch).unwrap();
    let (now, clock) = manual_clock(DAY0);
    let mut cfg = config("gw1", std::slice::from_ref(&watch), &t.join("s.redb"));
    cfg.clock = clock;
    cfg.classes = vec![shared_class("line", &["*/line/*"], Some("append-merge"))];
    (watch, cfg, now)
}

#[test]
fn shared_classes_sign_a_growing_vector_and_unshared_ones_none() {
    let t = tempfile::tempdir().unwrap();
    let (watch, cfg, now) = shared_agent(t.path());
    write(&watch, "line/a.csv", &csv_lines(4_000, 1));
    write(&watch, "other/b.bin", &pseudo_random(3_000, 2));
    let mut a = Agent::open(cfg).unwrap();
    a.scan_once().unwrap();

    let c1 = last_change(&mut a, "cell/line/a.csv");
    c1.verify().unwrap();
    let s1 = c1.shared.clone().expect("a shared class's change carries a vector");
    assert_eq!(s1.policy, ConflictPolicy::AppendMerge);
    assert_eq!(s1.vv, vv(&[("gw1", c1.hlc.0)]), "own entry = the change's HLC");
    assert_eq!(a.shared_state("cell/line/a.csv").unwrap().unwrap(), s1);

    // Unshared: no vector, encoded exactly as before shared paths existed.
    let b = last_change(&mut a, "cell/other/b.bin");
    assert_eq!(b.shared, None);
    assert_eq!(protocol::to_cbor(&b)[0], 0x86, "a 6-element change, as before");
    assert!(a.shared_state("cell/other/b.bin").unwrap().is_none());

    // A new version: the vector grows and dominates the previous one.
    now.fetch_add(60_000, AtOrd::SeqCst);
    let mut more = csv_lines(4_000, 1);
    more.extend_from_slice(&csv_lines(500, 3));
    write(&watch, "line/a.csv", &more);
    bump_mtime(&watch.join("line/a.csv"), 7200);
    assert_eq!(a.scan_once().unwrap().changes_recorded, 1);
    let c2 = last_change(&mut a, "cell/line/a.csv");
    c2.verify().unwrap();
    let s2 = c2.shared.clone().unwrap();
    assert!(c2.hlc > c1.hlc);
    assert_eq!(s2.vv.get("gw1"), c2.hlc.0);
    assert_eq!(s2.vv.compare(&s1.vv), Some(Ordering::Greater));

    // A deletion of a shared path is a version too.
    std::fs::remove_file(watch.join("line/a.csv")).unwrap();
    a.scan_once().unwrap();
    let d = last_change(&mut a, "cell/line/a.csv");
    assert!(matches!(d.body, ChangeBody::Delete(_)));
    d.verify().unwrap();
    let sd = d.shared.unwrap();
    assert_eq!(sd.vv.get("gw1"), d.hlc.0);
    assert_eq!(sd.vv.compare(&s2.vv), Some(Ordering::Greater));
}

#[test]
fn a_superseded_change_of_a_shared_path_carries_a_vector() {
    let t = tempfile::tempdir().unwrap();
    let (watch, cfg, _now) = shared_agent(t.path());
    write(&watch, "line/a.csv", &csv_lines(4_000, 1));
    write(&watch, "other/b.bin", &pseudo_random(3_000, 2));
    let mut a = Agent::open(cfg).unwrap();
    a.scan_once().unwrap();
    let c = last_change(&mut a, "cell/line/a.csv");
    let b = last_change(&mut a, "cell/other/b.bin");
    a.supersede(&c).unwrap();
    a.supersede(&b).unwrap();
    let sup = all_pending(&mut a).into_iter().find(|x| x.seq == c.seq).unwrap();
    assert!(matches!(sup.body, ChangeBody::Superseded(_)));
    sup.verify().unwrap();
    let s = sup.shared.expect("superseded change of a shared path has a vector");
    assert_eq!(s.vv.get("gw1"), sup.hlc.0);
    assert_eq!(s.vv.compare(&c.shared.unwrap().vv), Some(Ordering::Greater));
    let bsup = all_pending(&mut a).into_iter().find(|x| x.seq == b.seq).unwrap();
    assert!(matches!(bsup.body, ChangeBody::Superseded(_)) && bsup.shared.is_none());
    // The re-recorded version dominates the superseded one.
    a.scan_once().unwrap();
    let again = last_change(&mut a, "cell/line/a.csv");
    assert!(matches!(again.body, ChangeBody::File(_)));
    assert_eq!(again.shared.unwrap().vv.compare(&s.vv), Some(Ordering::Greater));
}

#[test]
fn after_a_shared_head_from_another_device_the_next_version_dominates_it() {
    let t = tempfile::tempdir().unwrap();
    let (watch, cfg, now) = shared_agent(t.path());
    write(&watch, "line/a.csv", &csv_lines(4_000, 1));
    let mut a = Agent::open(cfg).unwrap();
    a.scan_once().unwrap();
    let c1 = last_change(&mut a, "cell/line/a.csv");
    // gw2 wrote the path concurrently, with a clock 10 s ahead of ours.
    let gw2 = Hlc::from_parts(DAY0 + 10_000, 4).0;
    let cloud = vv(&[("gw1", c1.hlc.0), ("gw2", gw2)]);
    let head = ServerChange {
        gseq: 7,
        body: ServerBody::SharedHead {
            path: "cell/line/a.csv".into(),
            vv: cloud.clone(),
            policy: ConflictPolicy::AppendMerge,
            conflicts: 1,
        },
    };
    a.on_server_changes(&[head], Some(7)).unwrap();
    assert_eq!(a.server_cursor(), 7);
    // The stored vector now knows gw2's version.
    assert_eq!(a.shared_state("cell/line/a.csv").unwrap().unwrap().vv, cloud);

    now.fetch_add(1_000, AtOrd::SeqCst); // still behind gw2's clock
    let mut more = csv_lines(4_000, 1);
    more.extend_from_slice(&csv_lines(300, 9));
    write(&watch, "line/a.csv", &more);
    bump_mtime(&watch.join("line/a.csv"), 7200);
    a.scan_once().unwrap();
    let c2 = last_change(&mut a, "cell/line/a.csv");
    let s2 = c2.shared.unwrap();
    assert_eq!(s2.vv.compare(&cloud), Some(Ordering::Greater));
    assert_eq!(s2.vv.get("gw2"), gw2);
    // Our clock observed gw2's: the dominating version is also the HLC-latest
    // (last-writer-wins agrees with causality), and own entry = its HLC.
    assert!(c2.hlc.0 > gw2);
    assert_eq!(s2.vv.get("gw1"), c2.hlc.0);
}

/// Meta states as the sink would build them over time (each one the
/// state after its operation, so later ones include earlier ones).
fn meta_history() -> Vec<ServerChange> {
    let mut s = MetaState::default();
    let mut out = Vec::new();
    let mut push = |gseq: u64, s: &MetaState, path: &str| {
        out.push(ServerChange {
            gseq,
            body: ServerBody::Meta {
                path: path.into(),
                state: s.clone(),
            },
        })
    };
    s.tags.add("line-a", 1);
    push(1, &s, "cell/line/**");
    s.tags.add("qa", 2);
    s.tags.remove("line-a");
    s.retain_days = 30;
    push(2, &s, "cell/line/**");
    s.holds.add("audit-2026", 3);
    push(3, &s, "cell/line/**");
    let other = MetaState {
        retain_days: 7,
        ..MetaState::default()
    };
    push(4, &other, "**");
    out.push(ServerChange {
        gseq: 5,
        body: ServerBody::SharedHead {
            path: "cell/line/a.csv".into(),
            vv: vv(&[("gw2", 100)]),
            policy: ConflictPolicy::KeepBoth,
            conflicts: 0,
        },
    });
    out.push(ServerChange {
        gseq: 6,
        body: ServerBody::SharedHead {
            path: "cell/line/a.csv".into(),
            vv: vv(&[("gw2", 200), ("gw3", 50)]),
            policy: ConflictPolicy::LastWriterWins,
            conflicts: 2,
        },
    });
    out
}

#[test]
fn server_changes_merge_idempotently_in_any_order_and_the_cursor_moves_only_with_upto() {
    let t = tempfile::tempdir().unwrap();
    let hist = meta_history();
    let open = |name: &str| {
        let watch = t.path().join(name).join("cell");
        std::fs::create_dir_all(&watch).unwrap();
        let state = t.path().join(name).join("s.redb");
        (config("gw1", &[watch], &state), state)
    };

    let (cfg_a, _) = open("a");
    let mut a = Agent::open(cfg_a).unwrap();
    a.on_server_changes(&hist, Some(6)).unwrap();
    assert_eq!(a.server_cursor(), 6);

    // Reversed, duplicated and split into live pushes (no upto).
    let (cfg_b, state_b) = open("b");
    let mut b = Agent::open(cfg_b.clone()).unwrap();
    let mut rev = hist.clone();
    rev.reverse();
    b.on_server_changes(&rev[..3], None).unwrap();
    assert_eq!(b.server_cursor(), 0, "a live push moves no cursor");
    b.on_server_changes(&rev, None).unwrap();
    b.on_server_changes(&hist[1..2], None).unwrap();
    assert_eq!(b.server_cursor(), 0);
    assert_eq!(b.server_states().unwrap(), a.server_states().unwrap());
    assert_eq!(
        b.shared_state("cell/line/a.csv").unwrap(),
        a.shared_state("cell/line/a.csv").unwrap()
    );
    let states = a.server_states().unwrap();
    assert_eq!(states.len(), 3, "{states:?}");
    // The newest state's policy wins whatever the order.
    assert!(states.iter().any(|(k, g, b)| k == "shared:cell/line/a.csv"
        && *g == 6
        && matches!(
            b,
            ServerBody::SharedHead {
                policy: ConflictPolicy::LastWriterWins,
                conflicts: 2,
                ..
            }
        )));

    // The cursor moves only forward, only with `upto`.
    b.on_server_changes(&[], Some(4)).unwrap();
    assert_eq!(b.server_cursor(), 4);
    b.on_server_changes(&hist[..1], Some(2)).unwrap();
    assert_eq!(b.server_cursor(), 4);
    let before = b.server_states().unwrap();
    drop(b);

    // Durable: survives reopening, and the next Hello asks from there.
    let b = Agent::open(cfg_b).unwrap();
    assert_eq!(b.server_cursor(), 4);
    assert_eq!(b.server_states().unwrap(), before);
    let mut session = ClientSession::new(ClientConfig::default(), 1);
    session.connected(0, &b);
    let mut b = b;
    match session.poll_transmit(0, &mut b).unwrap() {
        Some(Message::Hello(h)) => assert_eq!(h.server_cursor, Some(4)),
        m => panic!("expected Hello, got {m:?}"),
    }
    // Through the session: Changes with upto move the cursor.
    session
        .handle(
            0,
            Message::Changes(protocol::msg::Changes {
                items: hist[4..].to_vec(),
                upto: Some(9),
            }),
            &mut b,
        )
        .unwrap();
    assert_eq!(b.server_cursor(), 9);
    drop(b);
    let s = read_status(&state_b).unwrap();
    assert_eq!(s.server_cursor, 9);
}

#[test]
fn status_json_shows_cursor_metadata_holds_and_shared_paths() {
    let t = tempfile::tempdir().unwrap();
    let (watch, cfg, _now) = shared_agent(t.path());
    write(&watch, "line/a.csv", &csv_lines(4_000, 1));
    write(&watch, "line/b.csv", &csv_lines(2_000, 2));
    write(&watch, "other/c.bin", &pseudo_random(3_000, 3));
    let state = cfg.state.clone();
    let mut a = Agent::open(cfg).unwrap();
    a.scan_once().unwrap();
    let own = last_change(&mut a, "cell/line/a.csv").hlc.0;
    a.on_server_changes(&meta_history(), Some(6)).unwrap();
    let s = a.status().unwrap();
    let j = serde_json::to_value(&s).unwrap();
    // Existing fields are still there.
    assert_eq!(j["files_tracked"], 3);
    assert_eq!(j["device"], s.device.as_str());
    assert_eq!(j["server_cursor"], 6);
    let meta = j["metadata"].as_array().unwrap();
    assert_eq!(meta.len(), 2);
    let line = meta.iter().find(|m| m["path"] == "cell/line/**").unwrap();
    assert_eq!(line["tags"], serde_json::json!(["qa"]));
    assert_eq!(line["retain_days"], 30);
    assert_eq!(line["held"], true);
    assert_eq!(line["holds"], serde_json::json!(["audit-2026"]));
    let all = meta.iter().find(|m| m["path"] == "**").unwrap();
    assert_eq!(
        (all["held"].as_bool(), all["retain_days"].as_u64()),
        (Some(false), Some(7))
    );
    let shared = j["shared"].as_array().unwrap();
    assert_eq!(shared.len(), 2, "{shared:?}");
    let sa = shared.iter().find(|x| x["path"] == "cell/line/a.csv").unwrap();
    assert_eq!(sa["policy"], "last-writer-wins", "the cloud's view");
    assert_eq!(sa["conflicts"], 2);
    assert_eq!(sa["vv"], serde_json::json!({"gw1": own, "gw2": 200, "gw3": 50}));
    let sb = shared.iter().find(|x| x["path"] == "cell/line/b.csv").unwrap();
    assert_eq!(
        (sb["policy"].as_str(), sb["conflicts"].as_u64()),
        (Some("append-merge"), Some(0))
    );
    // Held files: the two under cell/line/.
    assert_eq!(j["held"]["files"], 2);
    assert_eq!(
        j["held"]["paths"],
        serde_json::json!(["cell/line/a.csv", "cell/line/b.csv"])
    );
    assert_eq!(j["held"]["all"], false);

    // The snapshot (daemon running) and the state file (not) say the same.
    a.write_snapshot().unwrap();
    let snap = read_status(&state);
    assert!(snap.is_ok());
    drop(a);
    let r = read_status(&state).unwrap();
    assert!(!r.from_snapshot);
    assert_eq!(
        (r.server_cursor, &r.metadata, &r.shared, &r.held),
        (6, &s.metadata, &s.shared, &s.held)
    );
}

// ---------------------------------------------------------------- holds

fn hold(gseq: u64, path: &str, reason: &str, dot: u64) -> (ServerChange, MetaState) {
    let mut s = MetaState::default();
    s.holds.add(reason, dot);
    (
        ServerChange {
            gseq,
            body: ServerBody::Meta {
                path: path.into(),
                state: s.clone(),
            },
        },
        s,
    )
}

#[test]
fn legal_hold_wins_over_forced_and_durable_pruning_until_released() {
    let t = tempfile::tempdir().unwrap();
    let watch = t.path().join("cell");
    aged_files(&watch, "scratch", 3, 10_000, 10); // never durable, prune = force
    aged_files(&watch, "plain", 3, 10_000, 20); // durable, keep_local 0
                                                // 200 kB disk, 110 kB used (55 %): over 50 %, prune towards 5 % — i.e.
                                                // everything the policy allows.
    let mut cfg = config("gw1", std::slice::from_ref(&watch), &t.path().join("s.redb"));
    cfg.disk = Some(DiskWatermarks::new(Watermark::parse("50%").unwrap(), Watermark::parse("5%").unwrap()).unwrap());
    let base = Arc::new(AtomicU64::new(50_000));
    cfg.disk_probe = fake_disk(watch.clone(), 200_000, base.clone());
    cfg.classes = vec![ClassSpec {
        prune: Some(Prune::Force),
        ..class("scratch", &["*/scratch/*"])
    }];
    let mut a = Agent::open(cfg).unwrap();
    a.scan_once().unwrap();
    let durable: Vec<u64> = all_pending(&mut a)
        .iter()
        .filter(|c| c.body.path().contains("/plain/"))
        .map(|c| c.seq)
        .collect();
    let mut set = RangeSet::new();
    for s in &durable {
        set.insert(*s);
    }
    let mut k = Knowledge::default();
    k.map.insert(ClientStore::replica(&a), set);
    a.on_knowledge(&k.clone(), &k).unwrap();

    // Held: one forced file by its exact path, one durable file by a glob.
    let (h1, _) = hold(1, "cell/scratch/f1.bin", "case-17", 1);
    let (h2, h2_state) = hold(2, "*/plain/f2*", "audit", 2);
    a.on_server_changes(&[h1, h2], Some(2)).unwrap();

    let d = a.enforce_disk().unwrap().unwrap();
    let gone = |p: &str| !watch.join(p).exists();
    assert!(
        gone("scratch/f0.bin") && gone("scratch/f2.bin"),
        "unheld forced files pruned"
    );
    assert!(
        !gone("scratch/f1.bin"),
        "a held file is never pruned, even with prune = force"
    );
    assert!(
        gone("plain/f0.bin") && gone("plain/f1.bin"),
        "unheld durable files pruned"
    );
    assert!(
        !gone("plain/f2.bin"),
        "a held durable file past keep_local is not pruned"
    );
    assert_eq!((d.held_files, d.held_bytes), (2, 20_000));
    assert_eq!((d.pruned_files, d.pruned_forced), (4, 2));
    let s = a.status().unwrap();
    assert_eq!(s.held.files, 2);
    assert_eq!(s.held.paths, vec!["cell/plain/f2.bin", "cell/scratch/f1.bin"]);

    // The hold on plain/f2 is released (observed remove): it may go now.
    let mut released = h2_state;
    assert!(released.holds.remove("audit"));
    a.on_server_changes(
        &[ServerChange {
            gseq: 3,
            body: ServerBody::Meta {
                path: "*/plain/f2*".into(),
                state: released,
            },
        }],
        Some(3),
    )
    .unwrap();
    // A late duplicate of the hold does not bring it back.
    let (h2_again, _) = hold(2, "*/plain/f2*", "audit", 2);
    a.on_server_changes(&[h2_again], None).unwrap();
    base.store(100_000, AtOrd::SeqCst); // over the high watermark again
    a.enforce_disk().unwrap();
    assert!(gone("plain/f2.bin"), "released");
    assert!(!gone("scratch/f1.bin"), "still held");
    assert_eq!(a.status().unwrap().held.files, 1);
}

// ---------------------------------------------------------------- config

#[test]
fn conflict_without_shared_is_a_clear_config_error() {
    let err = FileConfig::parse("[[class]]\nname = \"x\"\nglobs = [\"*/x/*\"]\nconflict = \"last-writer-wins\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs shared = true") && err.contains("\"x\""), "{err}");
    let err =
        FileConfig::parse("[[class]]\nname = \"x\"\nglobs = [\"*/x/*\"]\nshared = false\nconflict = \"keep-both\"")
            .unwrap_err()
            .to_string();
    assert!(err.contains("needs shared = true"), "{err}");
    let err = FileConfig::parse("[[class]]\nname = \"x\"\nglobs = [\"*/x/*\"]\nshared = true\nconflict = \"newest\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("keep-both, last-writer-wins or append-merge"), "{err}");

    // Built by the library too (config not from a file).
    let t = tempfile::tempdir().unwrap();
    let watch = t.path().join("cell");
    std::fs::create_dir_all(&watch).unwrap();
    let mut cfg = config("gw1", std::slice::from_ref(&watch), &t.path().join("s.redb"));
    cfg.classes = vec![ClassSpec {
        conflict: Some("append-merge".into()),
        ..class("x", &["*/x/*"])
    }];
    let err = Agent::open(cfg.clone()).err().unwrap().to_string();
    assert!(err.contains("needs shared = true"), "{err}");

    // shared alone means keep-both; a built-in class may be shared too.
    let f = FileConfig::parse(
        "[[class]]\nname = \"x\"\nglobs = [\"*/x/*\"]\nshared = true\n[[class]]\nname = \"append\"\nshared = true\nconflict = \"append-merge\"",
    )
    .unwrap();
    cfg.classes = f.classes;
    let a = Agent::open(cfg).unwrap();
    assert_eq!(a.policy().shared("cell/x/a.bin"), Some(ConflictPolicy::KeepBoth));
    assert_eq!(a.policy().shared("cell/y.csv"), Some(ConflictPolicy::AppendMerge));
    assert_eq!(a.policy().shared("cell/y.bin"), None);
}
