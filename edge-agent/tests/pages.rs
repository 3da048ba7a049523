//! Page deltas (issue 5): a changed chunk of a page-chunked database (a
//! group of whole pages, `chunker::PAGE_GROUP` bytes) is sealed against the
//! chunk's last cloud-durable version, kept compressed in the state file. Checked on the Agent API (no broker): which pages become
//! deltas, that their bytes open to the new page with the old one as base,
//! that only cloud-durable versions serve as bases, that chains stop at the
//! depth bound, and that kept sealed bytes go once their change is durable.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use edge_agent::chunker::PAGE_GROUP as CH;
use edge_agent::Agent;
use protocol::client::ClientStore;
use protocol::manifest::{Change, ChangeBody, FileVersion};
use protocol::seal::{base_of, Sealer, MAX_DEPTH};
use std::path::Path;

const PS: usize = 4096;
/// Chunks of the test database, each `CH` bytes (16 pages).
const CHUNKS: usize = 16;
const PAGES: usize = CHUNKS * CH / PS;

/// A page-structured file with a SQLite header: page `i` holds rows that
/// differ a little from page to page (so pages compress, and do not dedup).
fn database() -> Vec<u8> {
    let mut d = Vec::with_capacity(PS * PAGES);
    for i in 0..PAGES {
        let mut p: Vec<u8> = format!("page {i}: ")
            .bytes()
            .chain((0..).flat_map(|r| format!("row {r},sensor {i},temp 21.{},ok;", (r * 7 + i) % 10).into_bytes()))
            .take(PS)
            .collect();
        p.truncate(PS);
        d.extend_from_slice(&p);
    }
    d[..16].copy_from_slice(b"SQLite format 3\0");
    d[16..18].copy_from_slice(&(PS as u16).to_be_bytes());
    d
}

/// Rewrites a few bytes of row data in chunk `chunk` (`salt` makes each edit new).
fn edit(db: &mut [u8], chunk: usize, salt: u64) {
    let at = chunk * CH + 200 + (salt as usize * 97) % 3000;
    db[at..at + 8].copy_from_slice(&salt.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
}

fn write(path: &Path, db: &[u8]) {
    std::fs::write(path, db).unwrap();
    bump_mtime(path, 0);
}

/// A watch folder holding `name` with `content`, and an agent that has
/// scanned it once. The temporary directory lives as long as the result.
fn scanned(name: &str, content: &[u8]) -> (tempfile::TempDir, std::path::PathBuf, Agent) {
    let t = tempfile::tempdir().unwrap();
    let watch = t.path().join("plant");
    std::fs::create_dir_all(&watch).unwrap();
    let file = watch.join(name);
    write(&file, content);
    let mut a = Agent::open(config("gw1", std::slice::from_ref(&watch), &t.path().join("s.redb"))).unwrap();
    a.scan_once().unwrap();
    (t, file, a)
}

/// The newest pending version of the database, and its change.
fn newest(a: &mut Agent) -> (Change, FileVersion) {
    let c = all_pending(a)
        .into_iter()
        .rev()
        .find(|c| matches!(c.body, ChangeBody::File(_)))
        .unwrap();
    let ChangeBody::File(f) = c.body.clone() else {
        unreachable!()
    };
    (c, f)
}

/// Cloud-durable up to the newest seq, as a CloudAck reports it.
fn ack_all(a: &mut Agent) {
    all_pending(a); // offered, as if sent
    let r = ClientStore::replica(a);
    let k = knowledge_up_to(&r, a.status().unwrap().next_seq - 1);
    a.on_knowledge(&k, &k).unwrap();
}

#[test]
fn changed_pages_are_deltas_against_their_durable_version() {
    let mut db = database();
    let (_t, file, mut a) = scanned("quality.sqlite", &db);
    let (_, v1) = newest(&mut a);
    assert_eq!(v1.chunks.len(), CHUNKS, "one chunk per {CH} bytes of pages");
    assert_eq!(a.status().unwrap().chunks_delta, 0, "nothing to be a delta of yet");

    // Not durable yet: v2's pages cannot be deltas (the cloud may never get v1).
    edit(&mut db, 10, 1);
    write(&file, &db);
    a.scan_once().unwrap();
    assert_eq!(a.status().unwrap().chunks_delta, 0, "bases must be cloud-durable");
    let (_, v2) = newest(&mut a);

    // Durable now. Three chunks change in the middle: three delta chunks,
    // each opening to the new chunk with the durable one as its base.
    ack_all(&mut a);
    let old = db.clone();
    for p in [4, 5, 12] {
        edit(&mut db, p, 2);
    }
    write(&file, &db);
    a.scan_once().unwrap();
    let (c3, v3) = newest(&mut a);
    assert_eq!(a.status().unwrap().chunks_delta, 3);
    let mut sealer = Sealer::new(&key(), protocol::seal::Cipher::ChaCha20Poly1305).unwrap();
    for p in [4, 5, 12] {
        let id = v3.chunks[p].id;
        let stored = a.chunk(&c3, &id).unwrap().expect("a pending delta chunk is available");
        assert_eq!(protocol::Hash32::of(&stored), id);
        let b = base_of(&stored).unwrap().expect("a delta chunk names its base");
        assert!(b.delta);
        assert_eq!(b.id, v2.chunks[p].id, "chunk {p}'s base is its durable version");
        assert_eq!(b.depth, 1);
        let base = &old[p * CH..(p + 1) * CH];
        let plain = sealer.open_with_base(&stored, CH, Some(base)).unwrap();
        assert_eq!(plain, &db[p * CH..(p + 1) * CH]);
        let mut full = Vec::new();
        sealer.seal(&plain, 3, &mut full).unwrap();
        assert!(
            stored.len() * 2 < full.len(),
            "delta {} vs full {}",
            stored.len(),
            full.len()
        );
    }
    // Chunk 10 changed in v2 and not since: it is reused as it is.
    assert_eq!(v3.chunks[10].id, v2.chunks[10].id);
    assert_ne!(v2.chunks[10].id, v1.chunks[10].id);

    // Once v3 is durable its kept bytes go; a server asking again for one
    // gets None (the change is then superseded and the page sealed afresh).
    ack_all(&mut a);
    let id = v3.chunks[4].id;
    assert!(a.chunk(&c3, &id).unwrap().is_none());
}

#[test]
fn delta_chains_stop_at_the_depth_bound() {
    let mut db = database();
    let (_t, file, mut a) = scanned("quality.sqlite", &db);
    let (_, v1) = newest(&mut a);
    let root = v1.chunks[5].id;
    let mut chain = Vec::new();
    for step in 1..=(u64::from(MAX_DEPTH) + 2) {
        ack_all(&mut a);
        edit(&mut db, 5, step);
        write(&file, &db);
        a.scan_once().unwrap();
        let (c, v) = newest(&mut a);
        let stored = a.chunk(&c, &v.chunks[5].id).unwrap().unwrap();
        let b = base_of(&stored).unwrap().expect("every edit is a delta");
        chain.push((b.depth, b.id == root));
    }
    // Depths 1, 2, …, 8 (the first on the full first version); at the bound
    // the chain starts again from that full version: depth 1, then 2.
    let want: Vec<(u8, bool)> = (1..=MAX_DEPTH)
        .map(|d| (d, d == 1))
        .chain([(1, true), (2, false)])
        .collect();
    assert_eq!(chain, want);
}

#[test]
fn extension_chains_restart_half_way_at_the_depth_bound() {
    let mut log = csv_lines(20_000, 3);
    let (_t, file, mut a) = scanned("line.log", &log);
    let (_, v1) = newest(&mut a);
    let root = *v1.chunks.last().unwrap();
    let mut chain = Vec::new();
    for step in 1..=(u64::from(MAX_DEPTH) + 2) {
        ack_all(&mut a);
        // Small appends: no new cut point, the tail chunk just grows.
        log.extend_from_slice(&csv_lines(300, 100 + step)[..300]);
        write(&file, &log);
        a.scan_once().unwrap();
        let (c, v) = newest(&mut a);
        let last = v.chunks.last().unwrap();
        let stored = a.chunk(&c, &last.id).unwrap().unwrap();
        let b = base_of(&stored).unwrap().expect("every append is an extension");
        assert!(!b.delta);
        chain.push((b.depth, b.id == root.id));
    }
    // At the bound the chain restarts half way down (depth 4 + 1), so an
    // append costs the last few appends, not the whole chunk.
    let want: Vec<(u8, bool)> = (1..=MAX_DEPTH)
        .map(|d| (d, d == 1))
        .chain([(MAX_DEPTH / 2 + 1, false), (MAX_DEPTH / 2 + 2, false)])
        .collect();
    assert_eq!(chain, want);
}

#[test]
fn a_superseded_version_is_never_a_delta_base() {
    let mut db = database();
    let (_t, file, mut a) = scanned("quality.sqlite", &db);
    ack_all(&mut a);
    edit(&mut db, 7, 1);
    write(&file, &db);
    a.scan_once().unwrap();
    let (c2, v2) = newest(&mut a);
    // The file changed before v2's chunks went out: v2 is superseded, and
    // the cloud then acknowledges its seq (as a Superseded record).
    a.supersede(&c2).unwrap();
    ack_all(&mut a);
    edit(&mut db, 7, 2);
    write(&file, &db);
    a.scan_once().unwrap();
    let (c3, v3) = newest(&mut a);
    assert!(v3.chunks.len() == CHUNKS && c3.seq > c2.seq);
    let stored = a.chunk(&c3, &v3.chunks[7].id).unwrap().unwrap();
    let base = base_of(&stored).unwrap();
    assert!(
        base.is_none_or(|b| b.id != v2.chunks[7].id),
        "v2's chunk never reached the cloud; it must not be a base"
    );
}

#[test]
fn a_known_delta_whose_bytes_are_gone_is_sealed_again() {
    let mut db = database();
    let (_t, file, mut a) = scanned("quality.sqlite", &db);
    ack_all(&mut a);
    edit(&mut db, 9, 1);
    let page_v2 = db.clone();
    write(&file, &db);
    a.scan_once().unwrap();
    let (_, v2) = newest(&mut a);
    ack_all(&mut a);
    edit(&mut db, 9, 2);
    write(&file, &db);
    a.scan_once().unwrap();
    ack_all(&mut a); // v2's and v3's kept delta bytes are dropped
                     // The page goes back to its v2 content: the known table names v2's
                     // delta chunk, whose bytes are gone and which is not the anchor now.
    write(&file, &page_v2);
    a.scan_once().unwrap();
    let (c4, v4) = newest(&mut a);
    let id = v4.chunks[9].id;
    assert_ne!(id, v2.chunks[9].id, "not the chunk whose bytes are gone");
    let stored = a.chunk(&c4, &id).unwrap().expect("its bytes can be sent");
    assert_eq!(protocol::Hash32::of(&stored), id);
}

#[test]
fn regional_acknowledgement_is_not_enough_for_a_base() {
    let mut db = database();
    let (_t, file, mut a) = scanned("quality.sqlite", &db);
    all_pending(&mut a); // offered, as if sent
                         // The region holds v1, the cloud does not yet.
    let r = ClientStore::replica(&a);
    let regional = knowledge_up_to(&r, a.status().unwrap().next_seq - 1);
    a.on_knowledge(&regional, &protocol::Knowledge::default()).unwrap();
    edit(&mut db, 3, 1);
    write(&file, &db);
    a.scan_once().unwrap();
    assert_eq!(
        a.status().unwrap().chunks_delta,
        0,
        "only a cloud-durable version is a base"
    );
    // Cloud-durable now: the next edit is a delta.
    ack_all(&mut a);
    edit(&mut db, 3, 2);
    write(&file, &db);
    a.scan_once().unwrap();
    assert_eq!(a.status().unwrap().chunks_delta, 1);
}

#[test]
fn a_renamed_database_keeps_its_delta_bases() {
    // "archive" sorts before the old name, "zone" after: the old path is
    // still tracked, or already deleted, when the new one is met.
    for new_name in ["archive.sqlite", "zone.sqlite"] {
        let mut db = database();
        let (_t, file, mut a) = scanned("quality.sqlite", &db);
        settle(&file);
        a.scan_once().unwrap(); // the stat is trusted from now on
        let (_, v1) = newest(&mut a);
        ack_all(&mut a);

        let moved = file.with_file_name(new_name);
        std::fs::rename(&file, &moved).unwrap();
        let r = a.scan_once().unwrap();
        // Rename detection needs birth times; without them the renamed
        // database is read in full.
        if std::fs::metadata(&moved).and_then(|m| m.created()).is_err() {
            assert_eq!((r.files_renamed, r.bytes_chunked), (0, db.len() as u64));
            continue;
        }
        assert_eq!((r.files_renamed, r.bytes_chunked), (1, 0), "{new_name}: {r:?}");
        let (_, v2) = newest(&mut a);
        assert_eq!(v2.chunks, v1.chunks);

        // An edit under the new name is a delta against the durable page,
        // as it would have been under the old one.
        edit(&mut db, 3, 7);
        write(&moved, &db);
        let r = a.scan_once().unwrap();
        assert_eq!(r.chunks_delta, 1, "{new_name}: {r:?}");
        let (c3, v3) = newest(&mut a);
        let stored = a.chunk(&c3, &v3.chunks[3].id).unwrap().unwrap();
        let b = base_of(&stored).unwrap().expect("a delta names its base");
        assert_eq!(b.id, v1.chunks[3].id);
    }
}
