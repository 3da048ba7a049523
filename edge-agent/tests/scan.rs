//! Scanning: append fast path cost and soundness, re-chunking on edits and
//! truncation, known-chunk skip, deterministic sealing, and `supersede`.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use edge_agent::{Agent, ChunkParams};
use protocol::client::ClientStore;
use protocol::manifest::ChangeBody;
use std::collections::HashSet;
use std::io::{Seek, SeekFrom, Write};

fn ids(v: &protocol::FileVersion) -> Vec<protocol::Hash32> {
    v.chunks.iter().map(|c| c.id).collect()
}

fn append(path: &std::path::Path, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(data).unwrap();
}

#[test]
fn append_costs_o_appended_bytes_and_matches_full_chunking() {
    let t = tempfile::tempdir().unwrap();
    let watch = t.path().join("line1");
    std::fs::create_dir(&watch).unwrap();
    let file = watch.join("press.csv");
    let mut content = csv_lines(4 << 20, 1);
    std::fs::write(&file, &content).unwrap();
    let params = ChunkParams::default();
    let max = params.max as u64;
    let mut agent = Agent::open(config("gw1", std::slice::from_ref(&watch), &t.path().join("a.redb"))).unwrap();

    let r1 = agent.scan_once().unwrap();
    assert_eq!((r1.files_new, r1.changes_recorded), (1, 1));
    assert_eq!(r1.bytes_chunked, content.len() as u64);
    let v1 = latest_version(&mut agent, "line1/press.csv");
    assert_eq!(v1.class, "append");
    assert!(
        v1.chunks.len() >= 8,
        "4 MiB should give many chunks, got {}",
        v1.chunks.len()
    );

    // Append ~20 KiB: the second scan costs O(appended), not O(file).
    for round in 0..3u64 {
        let tail = csv_lines(20 << 10, 100 + round);
        append(&file, &tail);
        content.extend_from_slice(&tail);
        let before = agent.counters().clone();
        let r = agent.scan_once().unwrap();
        let appended = tail.len() as u64;
        assert_eq!(
            (r.files_changed, r.changes_recorded, r.append_fast_path),
            (1, 1, 1),
            "{r:?}"
        );
        // Reads: the stable chunk (≤ max) to verify it, then the old last chunk (≤ max) + the tail.
        assert!(
            r.bytes_read <= appended + 2 * max,
            "read {} for a {appended} B append",
            r.bytes_read
        );
        assert!(
            r.bytes_chunked <= appended + max,
            "chunked {} for a {appended} B append",
            r.bytes_chunked
        );
        let c = agent.counters();
        assert_eq!(c.bytes_read - before.bytes_read, r.bytes_read);
        assert_eq!(c.bytes_chunked - before.bytes_chunked, r.bytes_chunked);
        assert!(r.chunks_new <= 6, "{r:?}");

        // Sound: the recorded manifest is exactly what chunking the whole file gives.
        let v = latest_version(&mut agent, "line1/press.csv");
        let fresh = fresh_chunking(&file, params, &t.path().join(format!("fresh{round}")));
        assert_eq!(ids(&v), ids(&fresh), "append fast path diverged from full chunking");
        assert_eq!(v.chunks, fresh.chunks);
        assert_eq!(v.size, content.len() as u64);
        assert_eq!(v.sha256.0, sha256(&content));
    }

    // An edit inside the still-growing last chunk plus an append: the fast
    // path re-chunks from the last stable cut, so the edit is captured.
    let n = content.len();
    content[n - 100..n - 90].copy_from_slice(b"EDITED####");
    let tail = csv_lines(10 << 10, 7);
    content.extend_from_slice(&tail);
    std::fs::write(&file, &content).unwrap();
    let r = agent.scan_once().unwrap();
    assert_eq!(r.changes_recorded, 1);
    let v = latest_version(&mut agent, "line1/press.csv");
    assert_eq!(v.sha256.0, sha256(&content));
    assert_eq!(
        ids(&v),
        ids(&fresh_chunking(&file, params, &t.path().join("fresh-edit-tail")))
    );

    // A same-size edit in the middle: full re-chunk, only a few chunks change.
    let old = ids(&v);
    let mid = content.len() / 2;
    content[mid..mid + 64].copy_from_slice(&[b'#'; 64]);
    let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.seek(SeekFrom::Start(mid as u64)).unwrap();
    f.write_all(&[b'#'; 64]).unwrap();
    drop(f);
    bump_mtime(&file, 10);
    let r = agent.scan_once().unwrap();
    assert_eq!((r.files_changed, r.append_fast_path), (1, 0), "{r:?}");
    assert_eq!(
        r.bytes_chunked,
        content.len() as u64,
        "a mid-file edit re-chunks the whole file"
    );
    assert!(r.chunks_new <= 3, "CDC keeps unchanged regions: {r:?}");
    let v = latest_version(&mut agent, "line1/press.csv");
    let new_ids = ids(&v);
    assert_eq!(r.chunks_new + r.chunks_known, new_ids.len() as u64, "{r:?}");
    let old_set: HashSet<_> = old.iter().collect();
    let changed = new_ids.iter().filter(|id| !old_set.contains(id)).count();
    assert!((1..=3).contains(&changed), "{changed} chunks changed for a 64 B edit");
    assert_eq!(v.sha256.0, sha256(&content));
    assert_eq!(
        new_ids,
        ids(&fresh_chunking(&file, params, &t.path().join("fresh-mid")))
    );

    // Truncation: a full re-chunk, equal to chunking the shorter file.
    content.truncate(3 << 20);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    let r = agent.scan_once().unwrap();
    assert_eq!((r.files_changed, r.append_fast_path), (1, 0), "{r:?}");
    assert_eq!(r.bytes_chunked, 3 << 20);
    let v = latest_version(&mut agent, "line1/press.csv");
    assert_eq!(v.size, 3 << 20);
    assert_eq!(v.sha256.0, sha256(&content));
    assert_eq!(
        ids(&v),
        ids(&fresh_chunking(&file, params, &t.path().join("fresh-trunc")))
    );

    // And appending after the truncation uses the fast path again, soundly.
    let tail = csv_lines(30 << 10, 9);
    append(&file, &tail);
    content.extend_from_slice(&tail);
    let r = agent.scan_once().unwrap();
    assert_eq!(r.append_fast_path, 1);
    let v = latest_version(&mut agent, "line1/press.csv");
    assert_eq!(v.sha256.0, sha256(&content));
    assert_eq!(
        ids(&v),
        ids(&fresh_chunking(&file, params, &t.path().join("fresh-trunc-app")))
    );
}

#[test]
fn append_fast_path_is_not_used_when_the_stable_chunk_changed() {
    let t = tempfile::tempdir().unwrap();
    let watch = t.path().join("logs");
    std::fs::create_dir(&watch).unwrap();
    let file = watch.join("x.log");
    let params = small_chunks();
    let mut content = csv_lines(200 << 10, 3);
    std::fs::write(&file, &content).unwrap();
    let mut cfg = config("gw1", std::slice::from_ref(&watch), &t.path().join("a.redb"));
    cfg.chunking = params;
    let mut agent = Agent::open(cfg).unwrap();
    agent.scan_once().unwrap();
    let v = latest_version(&mut agent, "logs/x.log");
    // Edit inside the second-to-last chunk (the "stable" one), then append.
    let n = v.chunks.len();
    let stable_start: u64 = v.chunks[..n - 2].iter().map(|c| u64::from(c.len)).sum();
    let at = stable_start as usize + 10;
    content[at..at + 4].copy_from_slice(b"ZZZZ");
    content.extend_from_slice(&csv_lines(5 << 10, 4));
    std::fs::write(&file, &content).unwrap();
    let r = agent.scan_once().unwrap();
    assert_eq!(r.append_fast_path, 0, "{r:?}");
    assert_eq!(r.bytes_chunked, content.len() as u64);
    let v = latest_version(&mut agent, "logs/x.log");
    assert_eq!(v.sha256.0, sha256(&content));
    assert_eq!(ids(&v), ids(&fresh_chunking(&file, params, &t.path().join("fresh"))));
}

#[test]
fn identical_files_skip_known_chunks_and_sealing_is_deterministic() {
    let t = tempfile::tempdir().unwrap();
    let watch = t.path().join("cell");
    std::fs::create_dir(&watch).unwrap();
    let data = pseudo_random(600 << 10, 11);
    std::fs::write(watch.join("a.bin"), &data).unwrap();
    std::fs::write(watch.join("b.bin"), &data).unwrap();
    settle(&watch.join("a.bin"));
    settle(&watch.join("b.bin"));
    let mut cfg = config("gw1", std::slice::from_ref(&watch), &t.path().join("a.redb"));
    cfg.chunking = small_chunks();
    let mut a = Agent::open(cfg).unwrap();
    let r = a.scan_once().unwrap();
    let va = latest_version(&mut a, "cell/a.bin");
    let vb = latest_version(&mut a, "cell/b.bin");
    let k = va.chunks.len() as u64;
    assert!(k > 10);
    assert_eq!(ids(&va), ids(&vb));
    // Random data has no repeated chunks: a.bin seals k, b.bin's k are all known.
    assert_eq!((r.files_new, r.chunks_new, r.chunks_known), (2, k, k), "{r:?}");
    assert_eq!(a.counters().chunks_new, k);
    assert_eq!(a.counters().chunks_skipped_known, k);
    let st = a.status().unwrap();
    assert_eq!((st.chunks_new, st.chunks_skipped_known), (k, k));

    // A third copy in a later scan: also all known, nothing sealed.
    std::fs::write(watch.join("c.bin"), &data).unwrap();
    settle(&watch.join("c.bin"));
    let r = a.scan_once().unwrap();
    assert_eq!((r.files_new, r.chunks_new, r.chunks_known), (1, 0, k), "{r:?}");

    // Another device of the same tenant (own state file, own device key)
    // seals the same data to the same chunk ids: cross-device dedup.
    let watch2 = t.path().join("other").join("cell");
    std::fs::create_dir_all(&watch2).unwrap();
    std::fs::write(watch2.join("z.bin"), &data).unwrap();
    let mut cfg = config("gw2", std::slice::from_ref(&watch2), &t.path().join("b.redb"));
    cfg.chunking = small_chunks();
    let mut b = Agent::open(cfg).unwrap();
    assert_ne!(a.public_key(), b.public_key());
    b.scan_once().unwrap();
    let vz = latest_version(&mut b, "cell/z.bin");
    assert_eq!(ids(&vz), ids(&va));
    // And the stored bytes are the same, checkable without keys.
    let ca = all_pending(&mut a)[0].clone();
    let cb = all_pending(&mut b)[0].clone();
    let id = va.chunks[3].id;
    let sa = a.chunk(&ca, &id).unwrap().unwrap();
    let sb = b.chunk(&cb, &id).unwrap().unwrap();
    assert_eq!(sa, sb);
    assert_eq!(sha256(&sa), id.0);

    // A different tenant key gives different ids (the ids depend on the key).
    let watch3 = t.path().join("third").join("cell");
    std::fs::create_dir_all(&watch3).unwrap();
    std::fs::write(watch3.join("z.bin"), &data).unwrap();
    let mut cfg = config("gw3", std::slice::from_ref(&watch3), &t.path().join("c.redb"));
    cfg.chunking = small_chunks();
    cfg.key = protocol::seal::TenantKey::from_bytes(2, [9u8; 32]);
    let mut c = Agent::open(cfg).unwrap();
    c.scan_once().unwrap();
    let v3 = latest_version(&mut c, "cell/z.bin");
    assert_eq!(v3.chunks.len(), va.chunks.len(), "cut points do not depend on the key");
    assert!(ids(&v3).iter().all(|id| !ids(&va).contains(id)));
}

#[test]
fn supersede_after_the_file_changed_rerecords_and_loses_nothing() {
    let t = tempfile::tempdir().unwrap();
    let watch = t.path().join("cell");
    std::fs::create_dir(&watch).unwrap();
    let file = watch.join("recipe.bin");
    let gone = watch.join("gone.bin");
    std::fs::write(&file, pseudo_random(100 << 10, 5)).unwrap();
    std::fs::write(&gone, pseudo_random(50 << 10, 6)).unwrap();
    let mut cfg = config("gw1", std::slice::from_ref(&watch), &t.path().join("a.redb"));
    cfg.chunking = small_chunks();
    let mut a = Agent::open(cfg).unwrap();
    a.scan_once().unwrap();
    let changes = all_pending(&mut a);
    assert_eq!(changes.len(), 2);
    let c_gone = changes
        .iter()
        .find(|c| c.body.path() == "cell/gone.bin")
        .unwrap()
        .clone();
    let c = changes
        .iter()
        .find(|c| c.body.path() == "cell/recipe.bin")
        .unwrap()
        .clone();
    let ChangeBody::File(v) = &c.body else { panic!() };

    // Before the change, every chunk reads back and hashes to its id.
    for r in &v.chunks {
        let b = a.chunk(&c, &r.id).unwrap().expect("chunk readable");
        assert_eq!(sha256(&b), r.id.0);
    }
    // The file changes (same size) before its chunks were read.
    let new_data = pseudo_random(100 << 10, 55);
    std::fs::write(&file, &new_data).unwrap();
    bump_mtime(&file, 5);
    assert_eq!(a.chunk(&c, &v.chunks[0].id).unwrap(), None);
    // A deleted file's chunks are gone too.
    std::fs::remove_file(&gone).unwrap();
    let ChangeBody::File(vg) = &c_gone.body else { panic!() };
    assert_eq!(a.chunk(&c_gone, &vg.chunks[0].id).unwrap(), None);

    a.supersede(&c).unwrap();
    a.supersede(&c_gone).unwrap();
    assert_eq!(a.counters().superseded, 2);
    // Same seqs, now Superseded bodies; still pending (the server may need them).
    let p = all_pending(&mut a);
    assert_eq!(p.len(), 2);
    let sup = p.iter().find(|x| x.seq == c.seq).unwrap();
    assert_eq!(sup.body, ChangeBody::Superseded("cell/recipe.bin".into()));
    assert_eq!(sup.replica, c.replica);

    // The next scan records the new version and the deletion.
    let r = a.scan_once().unwrap();
    assert_eq!(
        (r.files_changed, r.files_deleted, r.changes_recorded),
        (1, 1, 2),
        "{r:?}"
    );
    let p = all_pending(&mut a);
    assert_eq!(p.len(), 4, "superseded entries stay until the cloud has them");
    let newest = latest_version(&mut a, "cell/recipe.bin");
    assert_eq!(newest.sha256.0, sha256(&new_data));
    let nc = p
        .iter()
        .find(|x| matches!(&x.body, ChangeBody::File(f) if f.sha256 == newest.sha256))
        .unwrap();
    assert!(nc.seq > c.seq);
    for r in &newest.chunks {
        let b = a.chunk(nc, &r.id).unwrap().expect("new version readable");
        assert_eq!(sha256(&b), r.id.0);
    }
    assert!(p.iter().any(|x| x.body == ChangeBody::Delete("cell/gone.bin".into())));
    let st = a.status().unwrap();
    assert_eq!(st.files_tracked, 1);
    assert_eq!(st.logical_bytes, 100 << 10);
    // A second scan has nothing left to do.
    let r = a.scan_once().unwrap();
    assert_eq!(r.changes_recorded, 0, "{r:?}");

    // Superseding a change whose file was already re-recorded, or twice, is harmless.
    a.supersede(&c).unwrap();
    let r = a.scan_once().unwrap();
    assert_eq!(r.changes_recorded, 0, "{r:?}");
}

#[test]
fn same_size_rewrite_within_one_mtime_tick_is_not_missed() {
    let t = tempfile::tempdir().unwrap();
    let watch = t.path().join("cell");
    std::fs::create_dir(&watch).unwrap();
    let file = watch.join("recipe.bin");
    let set_mtime = |when: std::time::SystemTime| {
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.set_modified(when).unwrap();
    };
    let tick = std::time::SystemTime::now();
    std::fs::write(&file, pseudo_random(40_000, 1)).unwrap();
    set_mtime(tick);
    let mut cfg = config("gw1", std::slice::from_ref(&watch), &t.path().join("a.redb"));
    cfg.chunking = small_chunks();
    let mut a = Agent::open(cfg).unwrap();
    assert_eq!(a.scan_once().unwrap().changes_recorded, 1);

    // Rewritten in place, same size, within the same timestamp tick: size,
    // mtime and inode all look unchanged.
    let new_data = pseudo_random(40_000, 2);
    std::fs::write(&file, &new_data).unwrap();
    set_mtime(tick);
    let r = a.scan_once().unwrap();
    assert_eq!(r.changes_recorded, 1, "same-tick rewrite missed: {r:?}");
    assert_eq!(latest_version(&mut a, "cell/recipe.bin").sha256.0, sha256(&new_data));

    // While the mtime is still recent the content is re-checked, but an
    // unchanged file records nothing new.
    let r = a.scan_once().unwrap();
    assert_eq!((r.changes_recorded, r.files_unchanged), (0, 1), "{r:?}");
    assert_eq!(r.bytes_read, 40_000);

    // Once the mtime is old enough, the stat is trusted: one stat, no read.
    settle(&file);
    assert_eq!(
        a.scan_once().unwrap().changes_recorded,
        1,
        "mtime is part of the version"
    );
    let r = a.scan_once().unwrap();
    assert_eq!(
        (r.changes_recorded, r.files_unchanged, r.bytes_read),
        (0, 1, 0),
        "{r:?}"
    );
    assert_eq!(all_pending(&mut a).len(), 3);
}

#[test]
fn db_class_chunks_small_so_a_page_edit_resends_little() {
    let t = tempfile::tempdir().unwrap();
    let watch = t.path().join("plant");
    std::fs::create_dir(&watch).unwrap();
    let db = watch.join("quality.sqlite");
    let bin = watch.join("same.bin");
    let content = pseudo_random(2 << 20, 11);
    std::fs::write(&db, &content).unwrap();
    std::fs::write(&bin, &content).unwrap();
    settle(&db);
    settle(&bin);
    let mut agent = Agent::open(config("gw1", std::slice::from_ref(&watch), &t.path().join("a.redb"))).unwrap();
    agent.scan_once().unwrap();
    let v1 = latest_version(&mut agent, "plant/quality.sqlite");
    let b1 = latest_version(&mut agent, "plant/same.bin");
    assert_eq!(v1.class, "db");
    assert_eq!(b1.class, "default");
    let p = ChunkParams::DB;
    assert!(
        v1.chunks.iter().all(|c| c.len as usize <= p.max),
        "db chunks stay small"
    );
    assert!(
        v1.chunks.len() > 4 * b1.chunks.len(),
        "{} vs {}",
        v1.chunks.len(),
        b1.chunks.len()
    );

    // Edit one 4 KiB page in the middle of both files (same size).
    for f in [&db, &bin] {
        let mut h = std::fs::OpenOptions::new().write(true).open(f).unwrap();
        h.seek(SeekFrom::Start(1 << 20)).unwrap();
        h.write_all(&[0xAB; 4096]).unwrap();
        drop(h);
        bump_mtime(f, 7200);
    }
    agent.scan_once().unwrap();
    let changed_bytes = |old: &protocol::FileVersion, new: &protocol::FileVersion| -> u64 {
        let before: HashSet<_> = old.chunks.iter().map(|c| c.id).collect();
        new.chunks
            .iter()
            .filter(|c| !before.contains(&c.id))
            .map(|c| u64::from(c.len))
            .sum()
    };
    let v2 = latest_version(&mut agent, "plant/quality.sqlite");
    let b2 = latest_version(&mut agent, "plant/same.bin");
    let (db_new, bin_new) = (changed_bytes(&v1, &v2), changed_bytes(&b1, &b2));
    assert!(
        db_new > 0 && db_new <= 3 * p.max as u64,
        "db re-sends {db_new} bytes for one page"
    );
    assert!(db_new < bin_new, "db class {db_new} vs default {bin_new}");
}

/// A temporary directory with a watch folder `plant` holding `name` with
/// `content`, settled (its stat trusted): (dir, watch folder, file).
fn watched_file(name: &str, content: &[u8]) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let watch = t.path().join("plant");
    std::fs::create_dir(&watch).unwrap();
    let file = watch.join(name);
    std::fs::write(&file, content).unwrap();
    settle(&file);
    (t, watch, file)
}

/// A page-structured file with a SQLite header (4 KiB pages of rows).
fn sqlite_like(len: usize) -> Vec<u8> {
    let mut d = csv_lines(len, 5);
    d.truncate(len);
    d[..16].copy_from_slice(b"SQLite format 3\0");
    d[16..18].copy_from_slice(&4096u16.to_be_bytes());
    d
}

#[test]
fn a_file_with_its_old_chunks_reuses_its_old_cuts_and_hash_and_any_change_rechunks() {
    for (name, mut content) in [
        ("series.bin", pseudo_random(3 << 20, 21)),
        ("quality.sqlite", sqlite_like(2 << 20)),
    ] {
        let (t, watch, file) = watched_file(name, &content);
        let path = format!("plant/{name}");
        let mut a = Agent::open(config("gw1", std::slice::from_ref(&watch), &t.path().join("a.redb"))).unwrap();
        a.scan_once().unwrap();
        let n = latest_version(&mut a, &path).chunks.len();
        assert!(n >= 8, "{name}: {n} chunks");
        let len = content.len();
        // (what, the byte to flip, whether the old hash is resumed)
        let edits: [(&str, Option<usize>, bool); 6] = [
            ("touched", None, true),
            ("middle byte", Some(len / 2), false),
            ("touched after a middle edit", None, true),
            ("first byte", Some(20), false),
            ("last byte", Some(len - 1), false),
            ("touched again", None, true),
        ];
        for (step, (what, at, resumed)) in edits.into_iter().enumerate() {
            if let Some(i) = at {
                content[i] ^= 0x5A;
                std::fs::write(&file, &content).unwrap();
            }
            bump_mtime(&file, 3600 * (step as u64 + 1));
            let r = a.scan_once().unwrap();
            assert_eq!(r.changes_recorded, 1, "{name}, {what}: {r:?}");
            assert_eq!(r.same_content_fast_path, u64::from(resumed), "{name}, {what}: {r:?}");
            // Cut where the old version was, up to the first changed chunk.
            let (lo, hi) = match at {
                None => (len, len),
                Some(i) => (i.saturating_sub(256 << 10), i),
            };
            assert!(
                (lo as u64..=hi as u64).contains(&r.bytes_same_cuts),
                "{name}, {what}: {} bytes cut as before",
                r.bytes_same_cuts
            );
            let v = latest_version(&mut a, &path);
            assert_eq!(v.sha256.0, sha256(&content), "{name}, {what}: the whole-file SHA-256");
            assert_eq!(v.size, len as u64);
            // The cuts are exactly those of chunking the file afresh.
            let fresh = fresh_chunking(&file, ChunkParams::default(), &t.path().join(format!("f{step}")));
            let cuts = |v: &protocol::FileVersion| v.chunks.iter().map(|c| c.len).collect::<Vec<_>>();
            assert_eq!(cuts(&v), cuts(&fresh), "{name}, {what}");
        }
    }
}

#[test]
fn old_cut_points_are_not_reused_under_other_chunk_sizes() {
    let (t, watch, file) = watched_file("series.bin", &pseudo_random(1 << 20, 4));
    let state = t.path().join("a.redb");
    // Cut small first: every old chunk also fits the default sizes.
    let mut cfg = config("gw1", std::slice::from_ref(&watch), &state);
    cfg.chunking = small_chunks();
    Agent::open(cfg).unwrap().scan_once().unwrap();
    // The same file, touched, under the default sizes: cut afresh.
    let mut a = Agent::open(config("gw1", std::slice::from_ref(&watch), &state)).unwrap();
    bump_mtime(&file, 3600);
    let r = a.scan_once().unwrap();
    assert_eq!((r.changes_recorded, r.bytes_same_cuts), (1, 0), "{r:?}");
    let v = latest_version(&mut a, "plant/series.bin");
    let fresh = fresh_chunking(&file, ChunkParams::default(), &t.path().join("fresh"));
    let cuts = |v: &protocol::FileVersion| v.chunks.iter().map(|c| c.len).collect::<Vec<_>>();
    assert_eq!(cuts(&v), cuts(&fresh));
    assert_eq!(v.sha256.0, sha256(&std::fs::read(&file).unwrap()));
    // Touched again under the same sizes: the cuts are reused.
    bump_mtime(&file, 7200);
    let r = a.scan_once().unwrap();
    assert_eq!(r.bytes_same_cuts, 1 << 20, "{r:?}");
}

#[test]
fn changes_recorded_with_hmac_tags_are_still_sent_after_the_upgrade() {
    use protocol::seal::{base_of, Cipher, Sealer};
    use redb::{ReadableTable, TableDefinition};
    let v1_bytes = csv_lines(20_000, 3);
    let (t, watch, file) = watched_file("line.log", &v1_bytes);
    let state = t.path().join("a.redb");
    let (v1, v2, v2_bytes) = {
        let mut a = Agent::open(config("gw1", std::slice::from_ref(&watch), &state)).unwrap();
        a.scan_once().unwrap();
        let v1 = latest_version(&mut a, "plant/line.log");
        let r = ClientStore::replica(&a);
        let k = knowledge_up_to(&r, a.status().unwrap().next_seq - 1);
        a.on_knowledge(&k, &k).unwrap();
        // Grown: the new last chunk is an extension of the old one, which
        // only `known` (its base) lets the agent reseal at send time.
        append(&file, &csv_lines(300, 9)[..300]);
        bump_mtime(&file, 3600);
        a.scan_once().unwrap();
        let v2 = latest_version(&mut a, "plant/line.log");
        (v1, v2, std::fs::read(&file).unwrap())
    };
    let ext = *v2.chunks.last().unwrap();
    // Make the state file an older agent's: `known` keyed by HMAC-SHA-256
    // tags, and no record of the tag function.
    {
        let sealer = Sealer::new(&key(), Cipher::Aes256Gcm).unwrap();
        let known: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("known");
        let meta: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
        let db = redb::Database::open(&state).unwrap();
        let w = db.begin_write().unwrap();
        {
            let mut kt = w.open_table(known).unwrap();
            for (v, bytes) in [(&v1, &v1_bytes), (&v2, &v2_bytes)] {
                let mut off = 0usize;
                for c in &v.chunks {
                    let plain = &bytes[off..off + c.len as usize];
                    off += c.len as usize;
                    let entry = kt
                        .remove(sealer.index_tag(plain).0)
                        .unwrap()
                        .map(|e| e.value().to_vec());
                    if let Some(e) = entry {
                        kt.insert(sealer.legacy_index_tag(plain).0, e.as_slice()).unwrap();
                    }
                }
            }
            assert!(kt.iter().unwrap().count() >= 2);
            w.open_table(meta).unwrap().remove("index_tag").unwrap();
        }
        w.commit().unwrap();
    }
    let mut a = Agent::open(config("gw1", std::slice::from_ref(&watch), &state)).unwrap();
    let c2 = all_pending(&mut a).into_iter().last().unwrap();
    let stored = a
        .chunk(&c2, &ext.id)
        .unwrap()
        .expect("resealed with the old base information");
    assert_eq!(protocol::Hash32::of(&stored), ext.id);
    assert!(
        base_of(&stored).unwrap().is_some_and(|b| !b.delta),
        "an extension chunk"
    );
}

#[test]
fn an_append_class_with_sqlite_pages_cuts_the_grown_tail_into_page_groups() {
    use edge_agent::chunker::PAGE_GROUP;
    let mut content = sqlite_like(3 * PAGE_GROUP + 5000);
    let (t, watch, file) = watched_file("journal.sqlite", &content);
    let mut cfg = config("gw1", std::slice::from_ref(&watch), &t.path().join("a.redb"));
    cfg.classes = vec![edge_agent::policy::ClassSpec {
        name: "journal".into(),
        globs: Some(vec!["*.sqlite".into()]),
        append: Some(true),
        sqlite_pages: Some(true),
        page_deltas: Some(false),
        ..Default::default()
    }];
    let mut a = Agent::open(cfg).unwrap();
    a.scan_once().unwrap();
    // Grown by pages of rows: the fast path chunks from the old last chunk.
    let tail = csv_lines(2 * PAGE_GROUP, 77);
    append(&file, &tail[..2 * PAGE_GROUP]);
    content.extend_from_slice(&tail[..2 * PAGE_GROUP]);
    bump_mtime(&file, 3600);
    let r = a.scan_once().unwrap();
    assert_eq!(r.append_fast_path, 1, "{r:?}");
    let v = latest_version(&mut a, "plant/journal.sqlite");
    assert_eq!(v.class, "journal");
    let (last, rest) = v.chunks.split_last().unwrap();
    assert!(
        rest.iter().all(|c| c.len as usize == PAGE_GROUP),
        "{:?}",
        v.chunks.iter().map(|c| c.len).collect::<Vec<_>>()
    );
    assert_eq!(rest.len() * PAGE_GROUP + last.len as usize, content.len());
    assert_eq!(v.sha256.0, sha256(&content));
}
