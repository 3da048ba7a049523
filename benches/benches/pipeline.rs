//! The edge pipeline per core, single-threaded, on a generated factory
//! archive (~12 MiB: CSV logs, binary series, SQLite, camera blobs):
//! - `chunk_only`: FastCDC over the bytes in memory;
//! - `scan_new`: a fresh state file, every byte read, chunked, hashed,
//!   looked up, compressed, sealed and recorded (one redb transaction per
//!   file version) — what an initial sync costs the gateway's CPU, at the
//!   default levels (zstd 1 for the append class, 3 for the others);
//! - `scan_new_zstd1`, `scan_new_zstd3`: the same with every class at one
//!   level (the goals are stated per level);
//! - `scan_seen`: every file's mtime changed but not its bytes: read, each
//!   chunk checked against the file's previous version, nothing sealed;
//! - `scan_seen_moved`: the folder renamed (settled files: mtimes an hour
//!   old): each file is recognised by device, inode, size and mtime and
//!   recorded with its chunks, only its last chunk read;
//! - `scan_seen_copied`: the same bytes under new paths as new files (the
//!   folder copied, the old one deleted): no previous version to compare
//!   with, so read, chunked, hashed, every chunk an index-tag hit, nothing
//!   sealed.
//!
//! `cargo bench -p benches --bench pipeline`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use edge_agent::chunker::Chunker;
use edge_agent::{Agent, AgentConfig, ChunkParams};
use protocol::seal::TenantKey;
use protocol::DeviceRef;
use std::path::Path;
use std::time::{Duration, SystemTime};

fn archive_bytes(dir: &Path) -> (u64, Vec<u8>) {
    let files = sim::tree::list_files(dir).expect("list");
    let mut all = Vec::new();
    for rel in files.keys() {
        all.extend(std::fs::read(dir.join(rel)).expect("read"));
    }
    (all.len() as u64, all)
}

fn agent(dir: &Path, state: &Path) -> Agent {
    agent_at(dir, state, None)
}

/// An agent; with `level`, every class compresses at that zstd level.
fn agent_at(dir: &Path, state: &Path, level: Option<i32>) -> Agent {
    let dev = DeviceRef::new("acme", "plant-1", "bench").expect("id");
    let key = TenantKey::from_bytes(1, [9; 32]);
    let mut cfg = AgentConfig::new("mqtt://127.0.0.1:1", &dev, vec![dir.to_path_buf()], state, key);
    cfg.status_snapshot = false;
    if let Some(l) = level {
        (cfg.zstd_level, cfg.append_zstd_level) = (l, l);
    }
    Agent::open(cfg).expect("open")
}

fn bench(c: &mut Criterion) {
    let work = tempfile::tempdir().expect("tmp");
    let dir = work.path().join("archive");
    let g = sim::gen::GenConfig::new(1, 1.0, 0, 1);
    sim::gen::generate_initial(&dir, &g).expect("generate");
    let (total, all) = archive_bytes(&dir);

    let mut grp = c.benchmark_group("edge_pipeline");
    grp.throughput(Throughput::Bytes(total));
    grp.sample_size(10);
    grp.measurement_time(Duration::from_secs(20));

    grp.bench_function("chunk_only", |b| {
        let mut ch = Chunker::new(ChunkParams::default()).expect("chunker");
        b.iter(|| {
            let mut n = 0usize;
            ch.run(&all[..], Path::new("mem"), |c| {
                n += c.len();
                Ok(())
            })
            .expect("chunk");
            n
        })
    });

    for (name, level) in [
        ("scan_new", None),
        ("scan_new_zstd1", Some(1)),
        ("scan_new_zstd3", Some(3)),
    ] {
        grp.bench_function(name, |b| {
            b.iter_batched(
                || tempfile::tempdir().expect("tmp"),
                |st| {
                    let mut a = agent_at(&dir, &st.path().join("agent.redb"), level);
                    let r = a.scan_once().expect("scan");
                    assert!(r.changes_recorded > 0);
                    drop(a);
                    st
                },
                criterion::BatchSize::PerIteration,
            )
        });
    }

    let st = tempfile::tempdir().expect("tmp");
    let state = st.path().join("agent.redb");
    agent(&dir, &state).scan_once().expect("first scan");
    let mut tick = 0u64;
    grp.bench_function("scan_seen", |b| {
        b.iter_batched(
            || {
                // New mtimes, same bytes: forces a full read and re-chunk.
                tick += 1;
                let t = SystemTime::now() + Duration::from_secs(tick);
                for rel in sim::tree::list_files(&dir).expect("list").keys() {
                    let f = std::fs::File::options().write(true).open(dir.join(rel)).expect("open");
                    f.set_modified(t).expect("mtime");
                }
                agent(&dir, &state)
            },
            |mut a| {
                let r = a.scan_once().expect("scan");
                assert_eq!(r.chunks_new, 0, "nothing new to seal");
                a
            },
            criterion::BatchSize::PerIteration,
        )
    });
    // The archive one folder down, renamed before every scan.
    let root = work.path().join("moved");
    let mut at = root.join("v0");
    std::fs::create_dir_all(&root).expect("mkdir");
    copy_tree(&dir, &at);
    let st = tempfile::tempdir().expect("tmp");
    let state = st.path().join("agent.redb");
    agent(&root, &state).scan_once().expect("first scan");
    let mut n = 0u64;
    grp.bench_function("scan_seen_moved", |b| {
        b.iter_batched(
            || {
                n += 1;
                let next = root.join(format!("v{n}"));
                std::fs::rename(&at, &next).expect("rename");
                at = next;
                agent(&root, &state)
            },
            |mut a| {
                let r = a.scan_once().expect("scan");
                assert_eq!(r.chunks_new, 0, "nothing new to seal");
                assert!(r.files_new > 0);
                assert_eq!(r.files_renamed, r.files_new, "every file recognised");
                a
            },
            criterion::BatchSize::PerIteration,
        )
    });
    // The archive copied to a new folder and the old one deleted before
    // every scan: new inodes, so new files of known bytes.
    let root = work.path().join("copied");
    let mut at = root.join("v0");
    copy_tree(&dir, &at);
    let st = tempfile::tempdir().expect("tmp");
    let state = st.path().join("agent.redb");
    agent(&root, &state).scan_once().expect("first scan");
    let mut n = 0u64;
    grp.bench_function("scan_seen_copied", |b| {
        b.iter_batched(
            || {
                n += 1;
                let next = root.join(format!("v{n}"));
                copy_tree(&at, &next);
                std::fs::remove_dir_all(&at).expect("rm");
                at = next;
                agent(&root, &state)
            },
            |mut a| {
                let r = a.scan_once().expect("scan");
                assert_eq!(
                    (r.chunks_new, r.files_renamed),
                    (0, 0),
                    "nothing new to seal, no renames"
                );
                assert!(r.files_new > 0);
                a
            },
            criterion::BatchSize::PerIteration,
        )
    });
    grp.finish();
}

/// Copies the files under `from` to `to`, settled: mtimes an hour old (an
/// archive's files, whose stat a scan trusts).
fn copy_tree(from: &Path, to: &Path) {
    let settled = SystemTime::now() - Duration::from_secs(3600);
    for rel in sim::tree::list_files(from).expect("list").keys() {
        let dst = to.join(rel);
        std::fs::create_dir_all(dst.parent().expect("parent")).expect("mkdir");
        std::fs::copy(from.join(rel), &dst).expect("copy");
        let f = std::fs::File::options().write(true).open(&dst).expect("open");
        f.set_modified(settled).expect("mtime");
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
