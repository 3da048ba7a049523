//! Rename detection: a path that holds a tracked file's inode (same device,
//! size and mtime) is recorded with that file's chunks after reading only
//! its last chunk, whichever of the two paths the walk meets first, and
//! for a rotated log; a copy, or a renamed file written since, is read in
//! full.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use edge_agent::Agent;
use protocol::client::ClientStore;
use protocol::manifest::{ChangeBody, FileVersion};
use std::path::Path;

fn agent(t: &Path, watch: &Path) -> Agent {
    Agent::open(config("gw1", &[watch.to_path_buf()], &t.join("s.redb"))).unwrap()
}

/// Whether the filesystem under `dir` reports birth times, which rename
/// detection needs: without them a renamed file is read in full, and the
/// tests check that instead.
fn birth_times(dir: &Path) -> bool {
    std::fs::metadata(dir).and_then(|m| m.created()).is_ok()
}

/// A temporary directory holding an empty watch folder `plant`.
fn watch_folder() -> (tempfile::TempDir, std::path::PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let watch = t.path().join("plant");
    std::fs::create_dir(&watch).unwrap();
    (t, watch)
}

fn write_settled(path: &Path, content: &[u8]) {
    std::fs::write(path, content).unwrap();
    settle(path);
}

/// The version's chunks, hash and size are those of `expected` (a full
/// read of the same bytes), and its hash is the bytes' SHA-256.
fn same_file(got: &FileVersion, expected: &FileVersion, bytes: &[u8]) {
    assert_eq!(got.chunks, expected.chunks);
    assert_eq!(got.size, bytes.len() as u64);
    assert_eq!(got.sha256.0, sha256(bytes));
    assert_eq!(got.sha256, expected.sha256);
}

#[test]
fn a_renamed_file_is_recorded_with_its_chunks_reading_only_its_last_chunk() {
    let (t, watch) = watch_folder();
    // `a.bin` → `b.bin`: the walk meets the old path first (it is deleted
    // before the new one is seen). `z.csv` → `c.csv`: the new path first
    // (the old one is still tracked then).
    let bin = pseudo_random(3 << 20, 5);
    let csv = csv_lines(1 << 20, 6);
    write_settled(&watch.join("a.bin"), &bin);
    write_settled(&watch.join("z.csv"), &csv);
    let mut a = agent(t.path(), &watch);
    a.scan_once().unwrap();
    let v_bin = latest_version(&mut a, "plant/a.bin");
    let v_csv = latest_version(&mut a, "plant/z.csv");
    assert!(v_bin.chunks.len() > 4 && v_csv.chunks.len() > 1);

    std::fs::rename(watch.join("a.bin"), watch.join("b.bin")).unwrap();
    std::fs::rename(watch.join("z.csv"), watch.join("c.csv")).unwrap();
    let r = a.scan_once().unwrap();
    assert_eq!((r.files_new, r.files_deleted, r.chunks_new), (2, 2, 0));
    if birth_times(&watch) {
        assert_eq!(r.files_renamed, 2, "{r:?}");
        let last = u64::from(v_bin.chunks.last().unwrap().len + v_csv.chunks.last().unwrap().len);
        assert_eq!(r.bytes_read, last, "only the last chunks are read");
        assert_eq!(r.bytes_chunked, 0);
    } else {
        assert_eq!((r.files_renamed, r.bytes_chunked), (0, (bin.len() + csv.len()) as u64));
    }
    let b = latest_version(&mut a, "plant/b.bin");
    let c = latest_version(&mut a, "plant/c.csv");
    same_file(&b, &v_bin, &bin);
    same_file(&c, &v_csv, &csv);

    // The renamed versions can be sent: each chunk is produced from the
    // file under its new path.
    let change = all_pending(&mut a)
        .into_iter()
        .find(|c| matches!(&c.body, ChangeBody::File(f) if f.path == "plant/b.bin"))
        .unwrap();
    for r in &b.chunks {
        let stored = a.chunk(&change, &r.id).unwrap().expect("chunk of a renamed file");
        assert_eq!(protocol::Hash32::of(&stored), r.id);
    }
    // And they are tracked: a scan after that reads nothing.
    let r = a.scan_once().unwrap();
    assert_eq!((r.files_unchanged, r.changes_recorded, r.bytes_read), (2, 0, 0));

    // Renamed, and its last bytes rewritten in place with the mtime put
    // back: the stat matches, but the last chunk's tag does not.
    std::fs::rename(watch.join("b.bin"), watch.join("e.bin")).unwrap();
    let mtime = std::fs::metadata(watch.join("e.bin")).unwrap().modified().unwrap();
    let mut edited = bin.clone();
    let n = edited.len();
    edited[n - 10..].copy_from_slice(b"0123456789");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::options().write(true).open(watch.join("e.bin")).unwrap();
        f.seek(SeekFrom::Start(n as u64 - 10)).unwrap();
        f.write_all(b"0123456789").unwrap();
        f.set_modified(mtime).unwrap();
    }
    let r = a.scan_once().unwrap();
    assert_eq!(r.files_renamed, 0, "{r:?}");
    assert_eq!(r.bytes_chunked, edited.len() as u64);
    assert_eq!(latest_version(&mut a, "plant/e.bin").sha256.0, sha256(&edited));

    // A file renamed, then written: its mtime differs, it is read in full.
    std::fs::rename(watch.join("c.csv"), watch.join("d.csv")).unwrap();
    let mut grown = csv.clone();
    grown.extend_from_slice(b"more,rows\n");
    std::fs::write(watch.join("d.csv"), &grown).unwrap();
    settle(&watch.join("d.csv"));
    let r = a.scan_once().unwrap();
    assert_eq!(r.files_renamed, 0);
    assert_eq!(r.bytes_chunked, grown.len() as u64);
    assert_eq!(latest_version(&mut a, "plant/d.csv").sha256.0, sha256(&grown));
}

#[test]
fn a_rotated_log_is_recognised_and_the_new_log_read() {
    let (t, watch) = watch_folder();
    let (one, two) = (csv_lines(600 << 10, 1), csv_lines(700 << 10, 2));
    write_settled(&watch.join("app.log"), &one);
    write_settled(&watch.join("app.log.1"), &two);
    let mut a = agent(t.path(), &watch);
    a.scan_once().unwrap();
    let (v_one, v_two) = (
        latest_version(&mut a, "plant/app.log"),
        latest_version(&mut a, "plant/app.log.1"),
    );

    // logrotate: app.log.1 → app.log.2, app.log → app.log.1, a new app.log.
    // The walk meets app.log first (another inode now), then app.log.1
    // (another inode: app.log's old one), then app.log.2 (new).
    std::fs::rename(watch.join("app.log.1"), watch.join("app.log.2")).unwrap();
    std::fs::rename(watch.join("app.log"), watch.join("app.log.1")).unwrap();
    let fresh = csv_lines(50 << 10, 3);
    write_settled(&watch.join("app.log"), &fresh);
    let r = a.scan_once().unwrap();
    assert_eq!((r.files_new, r.files_changed, r.files_deleted), (1, 2, 0));
    if birth_times(&watch) {
        assert_eq!(r.files_renamed, 2, "{r:?}");
        assert_eq!(r.bytes_chunked, fresh.len() as u64, "only the new log is chunked");
    } else {
        assert_eq!(r.files_renamed, 0);
    }
    same_file(&latest_version(&mut a, "plant/app.log.1"), &v_one, &one);
    same_file(&latest_version(&mut a, "plant/app.log.2"), &v_two, &two);
    assert_eq!(latest_version(&mut a, "plant/app.log").sha256.0, sha256(&fresh));
}

#[test]
fn a_copy_is_read_in_full_and_a_stale_inode_hint_is_ignored() {
    let (t, watch) = watch_folder();
    let bin = pseudo_random(1 << 20, 9);
    write_settled(&watch.join("a.bin"), &bin);
    let mut a = agent(t.path(), &watch);
    a.scan_once().unwrap();
    let v = latest_version(&mut a, "plant/a.bin");

    // Copied (another inode) with the mtime kept, the original deleted:
    // the same bytes, but not the same file; read in full, every chunk known.
    std::fs::copy(watch.join("a.bin"), watch.join("b.bin")).unwrap();
    let mtime = std::fs::metadata(watch.join("a.bin")).unwrap().modified().unwrap();
    std::fs::File::options()
        .write(true)
        .open(watch.join("b.bin"))
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    std::fs::remove_file(watch.join("a.bin")).unwrap();
    let r = a.scan_once().unwrap();
    assert_eq!(r.files_renamed, 0);
    assert_eq!(r.bytes_chunked, bin.len() as u64);
    assert_eq!(r.chunks_new, 0);
    same_file(&latest_version(&mut a, "plant/b.bin"), &v, &bin);

    // b.bin rewritten in place (same inode and size, another mtime), then
    // renamed to a name the walk meets first (so the `inodes` table names
    // b.bin, still tracked): the inode is b.bin's, but the recorded version
    // is not this content, so nothing is taken.
    std::fs::write(watch.join("b.bin"), pseudo_random(1 << 20, 10)).unwrap();
    settle(&watch.join("b.bin"));
    std::fs::rename(watch.join("b.bin"), watch.join("a0.bin")).unwrap();
    let r = a.scan_once().unwrap();
    assert_eq!(r.files_renamed, 0, "b.bin's recorded mtime is not a0.bin's");
    assert_eq!(r.bytes_chunked, 1 << 20);
}

#[test]
fn a_file_recorded_by_an_older_agent_is_recognised_once_its_stat_is_completed() {
    let (t, watch) = watch_folder();
    let bin = pseudo_random(1 << 20, 4);
    write_settled(&watch.join("a.bin"), &bin);
    agent(t.path(), &watch).scan_once().unwrap();
    // The record as an agent before 2026-12-07 wrote it: no device, no
    // birth time.
    let state = t.path().join("s.redb");
    {
        let mut s = edge_agent::store::Store::open(&state, &device("gw1")).unwrap();
        let m = s.file_meta("plant/a.bin").unwrap().unwrap();
        assert_eq!(m.btime_ns.is_some(), birth_times(&watch));
        assert!(m.dev.is_some());
        let legacy = edge_agent::store::FileMeta {
            dev: None,
            btime_ns: None,
            ..m
        };
        s.update_file_meta("plant/a.bin", &legacy).unwrap();
        s.flush().unwrap();
    }
    // Unchanged: nothing is read or recorded, and the stat is completed.
    let mut a = agent(t.path(), &watch);
    let r = a.scan_once().unwrap();
    assert_eq!((r.files_unchanged, r.changes_recorded, r.bytes_read), (1, 0, 0));
    std::fs::rename(watch.join("a.bin"), watch.join("b.bin")).unwrap();
    let r = a.scan_once().unwrap();
    assert_eq!(r.files_renamed, u64::from(birth_times(&watch)), "{r:?}");
    assert_eq!(latest_version(&mut a, "plant/b.bin").sha256.0, sha256(&bin));
}
