//! The agent on a caller-supplied redb backend, in virtual time, with
//! seeded entropy: what the deterministic simulation drives.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use edge_agent::{Agent, AgentConfig, Entropy};
use protocol::client::ClientStore;
use protocol::manifest::ChangeBody;
use protocol::Knowledge;
use redb::StorageBackend;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// An in-memory disk that keeps what was last synced: a crash (or a restore
/// of an old copy) reopens on that image.
#[derive(Debug, Default, Clone)]
struct SimDisk(Arc<Mutex<(Vec<u8>, Vec<u8>)>>);

impl SimDisk {
    fn from_image(img: Vec<u8>) -> SimDisk {
        SimDisk(Arc::new(Mutex::new((img.clone(), img))))
    }
    fn synced(&self) -> Vec<u8> {
        self.0.lock().unwrap().1.clone()
    }
}

impl StorageBackend for SimDisk {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.0.lock().unwrap().0.len() as u64)
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let g = self.0.lock().unwrap();
        let o = offset as usize;
        let src =
            g.0.get(o..o + out.len())
                .ok_or_else(|| std::io::Error::other("read past end"))?;
        out.copy_from_slice(src);
        Ok(())
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.0.lock().unwrap().0.resize(len as usize, 0);
        Ok(())
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        let mut g = self.0.lock().unwrap();
        g.1 = g.0.clone();
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut g = self.0.lock().unwrap();
        let o = offset as usize;
        let dst =
            g.0.get_mut(o..o + data.len())
                .ok_or_else(|| std::io::Error::other("write past end"))?;
        dst.copy_from_slice(data);
        Ok(())
    }
}

/// A seeded xorshift entropy source.
fn seeded(seed: u64) -> Entropy {
    let state = Mutex::new(seed | 1);
    Arc::new(move |buf: &mut [u8]| {
        let mut s = state.lock().unwrap();
        for b in buf.iter_mut() {
            *s ^= *s << 13;
            *s ^= *s >> 7;
            *s ^= *s << 17;
            *b = *s as u8;
        }
    })
}

const T0: u64 = 1_750_000_000_000;

/// Writes a file whose mtime is an hour before `T0` (virtual time).
fn write_file(path: &std::path::Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_millis(T0 - 3_600_000))
        .unwrap();
}

fn sim_config(watch: &std::path::Path, state: &std::path::Path, clock: &Arc<AtomicU64>) -> AgentConfig {
    let mut cfg = config("gw1", &[watch.to_path_buf()], state);
    let c = clock.clone();
    cfg.clock = Arc::new(move || c.load(Ordering::SeqCst));
    cfg.entropy = Some(seeded(42));
    cfg.status_snapshot = false;
    cfg
}

/// A temp dir whose `cell` folder holds `files` (name, seed of 10,000
/// pseudo-random bytes), a virtual clock at `T0`, and an agent config
/// watching `cell` with its state at `gw1.state`.
fn cell(files: &[(&str, u64)]) -> (tempfile::TempDir, Arc<AtomicU64>, AgentConfig) {
    let t = tempfile::tempdir().unwrap();
    let watch = t.path().join("cell");
    std::fs::create_dir(&watch).unwrap();
    for (name, seed) in files {
        write_file(&watch.join(name), &pseudo_random(10_000, *seed));
    }
    let clock = Arc::new(AtomicU64::new(T0));
    let cfg = sim_config(&watch, &t.path().join("gw1.state"), &clock);
    (t, clock, cfg)
}

#[test]
fn agent_on_an_in_memory_backend_scans_and_offers_changes() {
    let (t, clock, cfg) = cell(&[("f0.bin", 1), ("f1.bin", 2), ("f2.bin", 3)]);
    let (watch, state) = (t.path().join("cell"), t.path().join("gw1.state"));
    let mut a = Agent::open_with_backend(cfg.clone(), Box::new(redb::backends::InMemoryBackend::new())).unwrap();
    // The database is in memory; only the device key file is on disk.
    assert!(!state.exists());
    assert!(edge_agent::store::device_key_path(&state).exists());
    clock.store(T0 + 5_000, Ordering::SeqCst);
    let r = a.scan_once().unwrap();
    assert_eq!((r.files_new, r.changes_recorded), (3, 3));
    let pending = ClientStore::pending(&mut a, &Knowledge::default(), 100, 1 << 20).unwrap();
    let paths: Vec<&str> = pending.iter().map(|c| c.body.path()).collect();
    assert_eq!(paths, ["cell/f0.bin", "cell/f1.bin", "cell/f2.bin"]);
    assert_eq!(pending.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 2, 3]);
    for c in &pending {
        // Stamped by the injected clock, not the wall clock.
        assert_eq!(c.hlc.0 >> 16, T0 + 5_000);
        assert!(matches!(c.body, ChangeBody::File(_)));
        c.verify().unwrap();
    }
    // Everything the session needs: chunk bytes re-read from the file.
    let ChangeBody::File(f) = &pending[0].body else {
        unreachable!()
    };
    let bytes = ClientStore::chunk(&mut a, &pending[0], &f.chunks[0].id)
        .unwrap()
        .unwrap();
    assert_eq!(protocol::Hash32::of(&bytes), f.chunks[0].id);
    let st = a.status().unwrap();
    assert_eq!((st.next_seq, st.pending_changes), (4, 3));
    assert_eq!(st.oldest_pending_age_secs, Some(0));
    clock.store(T0 + 65_000, Ordering::SeqCst);
    assert_eq!(a.status().unwrap().oldest_pending_age_secs, Some(60));

    // Seeded entropy: another device state opened the same way gets the
    // same epoch and the same device key.
    let b = Agent::open_with_backend(
        sim_config(&watch, &t.path().join("other.state"), &clock),
        Box::new(redb::backends::InMemoryBackend::new()),
    )
    .unwrap();
    assert_eq!(b.replica(), a.replica());
    assert_eq!(b.public_key(), a.public_key());
}

#[test]
fn crash_and_restore_on_a_simulated_disk() {
    let (_t, _clock, cfg) = cell(&[("a.bin", 1)]);
    let disk = SimDisk::default();
    let a = Agent::open_with_backend(cfg.clone(), Box::new(disk.clone())).unwrap();
    let replica = a.replica();
    let key = a.public_key();
    a.crash();
    let empty_image = disk.synced();

    // Recorded and offered: durable, so it survives a crash.
    let disk = SimDisk::from_image(empty_image.clone());
    let mut a = Agent::open_with_backend(cfg.clone(), Box::new(disk.clone())).unwrap();
    assert_eq!((a.replica(), a.public_key()), (replica.clone(), key.clone()));
    a.scan_once().unwrap();
    let sent = ClientStore::pending(&mut a, &Knowledge::default(), 100, 1 << 20).unwrap();
    assert_eq!(sent.len(), 1);
    a.crash();
    let disk = SimDisk::from_image(disk.synced());
    let a = Agent::open_with_backend(cfg.clone(), Box::new(disk.clone())).unwrap();
    assert_eq!((a.replica(), a.next_seq(), a.offered()), (replica.clone(), 2, 1));
    drop(a);

    // Restored from the old (empty) copy while the server holds seq 1: a
    // new epoch, and the file is offered again under it.
    let mut a = Agent::open_with_backend(cfg, Box::new(SimDisk::from_image(empty_image))).unwrap();
    assert_eq!((a.replica(), a.next_seq()), (replica.clone(), 1));
    a.scan_once().unwrap();
    let mut server = Knowledge::default();
    server.insert(&replica, 1);
    ClientStore::on_knowledge(&mut a, &server, &Knowledge::default()).unwrap();
    assert_ne!(a.replica(), replica);
    assert!(a.rescan_needed());
    a.scan_once().unwrap();
    let again = ClientStore::pending(&mut a, &Knowledge::default(), 100, 1 << 20).unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].replica, a.replica());
    assert_eq!(a.public_key(), key);
}

/// Durable commits cost an fsync on a gateway: a scan that finds nothing
/// and the server's acknowledgements make none. Losing an acknowledgement
/// in a crash only means offering those changes again; it is not taken
/// for a rolled-back state.
#[test]
fn idle_scans_and_acknowledgements_make_no_durable_commit() {
    let (_t, clock, mut cfg) = cell(&[("f0.bin", 1), ("f1.bin", 2), ("f2.bin", 3)]);
    // Disk watermarks, as on a gateway: every scan is followed by a check
    // that stores its status (not durably).
    cfg.disk = Some(
        edge_agent::DiskWatermarks::new(
            edge_agent::Watermark::UsedPct(90.0),
            edge_agent::Watermark::UsedPct(80.0),
        )
        .unwrap(),
    );
    cfg.disk_probe = Arc::new(|_: &std::path::Path| {
        Ok(edge_agent::DiskStat {
            total: 1 << 30,
            free: 1 << 29,
        })
    });
    let disk = SimDisk::default();
    let mut a = Agent::open_with_backend(cfg.clone(), Box::new(disk.clone())).unwrap();
    a.scan_once().unwrap();
    a.enforce_disk().unwrap();
    let sent = ClientStore::pending(&mut a, &Knowledge::default(), 100, 1 << 20).unwrap();
    assert_eq!(sent.len(), 3);
    let offered = disk.synced();

    for i in 1..=3 {
        clock.store(T0 + i * 900_000, Ordering::SeqCst);
        let r = a.scan_once().unwrap();
        assert_eq!((r.files_unchanged, r.changes_recorded), (3, 0));
        assert!(a.enforce_disk().unwrap().is_some());
        assert!(disk.synced() == offered, "an idle scan made a durable commit");
    }

    let mut server = Knowledge::default();
    for c in &sent {
        server.insert(&c.replica, c.seq);
    }
    ClientStore::on_knowledge(&mut a, &server, &server).unwrap();
    assert_eq!(a.status().unwrap().pending_changes, 0);
    assert!(ClientStore::pending(&mut a, &server, 100, 1 << 20).unwrap().is_empty());
    assert!(disk.synced() == offered, "an acknowledgement made a durable commit");
    // The hourly server-changes refresh of an up-to-date device only moves
    // its cursor: no durable commit either.
    ClientStore::on_server_changes(&mut a, &[], Some(42)).unwrap();
    assert_eq!(ClientStore::server_cursor(&a), 42);
    assert!(
        disk.synced() == offered,
        "a cursor-only server change made a durable commit"
    );

    // A power cut (the disk keeps what was synced; redb's close would
    // still write) loses the acknowledgement, nothing else.
    let replica = a.replica();
    let image = disk.synced();
    a.crash();
    let mut a = Agent::open_with_backend(cfg, Box::new(SimDisk::from_image(image))).unwrap();
    let st = a.status().unwrap();
    assert_eq!(st.pending_changes, 3, "{st:?}");
    assert_eq!(ClientStore::server_cursor(&a), 0, "the cursor move was not durable");
    ClientStore::on_knowledge(&mut a, &server, &server).unwrap();
    assert_eq!(a.replica(), replica, "taken for a rolled-back state");
    assert_eq!(a.counters().state_rollbacks, 0);
    assert_eq!(a.status().unwrap().pending_changes, 0);
}

/// Aggregators push every server change to every device they know, so
/// most pushes bring a device nothing new: those commit nothing. Were they
/// non-durable commits, every `IDLE_FLUSH_EVERY` (64) of them would cost an
/// idle gateway an fsync at its next scan. A new state (a legal hold, a
/// shared head) is durable when it returns.
#[test]
fn server_changes_the_device_already_has_commit_nothing() {
    use protocol::meta::{MetaState, ServerBody, ServerChange};
    use protocol::shared::{ConflictPolicy, VersionVector};
    let (_t, _clock, cfg) = cell(&[("f.bin", 7)]);
    let disk = SimDisk::default();
    let mut a = Agent::open_with_backend(cfg, Box::new(disk.clone())).unwrap();
    a.scan_once().unwrap();
    let mut hold = MetaState::default();
    hold.holds.add("audit", 1);
    let mut vv = VersionVector::default();
    vv.0.insert("gw-other".into(), 1_700_000_000_000 << 16);
    let items = vec![
        ServerChange {
            gseq: 5,
            body: ServerBody::Meta {
                path: "**".into(),
                state: hold,
            },
        },
        ServerChange {
            gseq: 6,
            body: ServerBody::SharedHead {
                path: "cell/f.bin".into(),
                vv,
                policy: ConflictPolicy::KeepBoth,
                conflicts: 0,
            },
        },
    ];
    let before = disk.synced();
    ClientStore::on_server_changes(&mut a, &items, None).unwrap();
    let durable = disk.synced();
    assert!(durable != before, "new server states are durable at once");
    // The hourly refresh moves the cursor (not durably), then the same
    // items arrive again and again: pushes from both aggregators, and
    // refreshes answered with a cursor already reached.
    ClientStore::on_server_changes(&mut a, &items, Some(6)).unwrap();
    for _ in 0..100 {
        ClientStore::on_server_changes(&mut a, &items, None).unwrap();
        ClientStore::on_server_changes(&mut a, &items, Some(6)).unwrap();
    }
    assert_eq!(ClientStore::server_cursor(&a), 6);
    assert_eq!(a.server_states().unwrap().len(), 2);
    assert!(disk.synced() == durable);
    let r = a.scan_once().unwrap();
    assert_eq!(r.changes_recorded, 0);
    assert!(
        disk.synced() == durable,
        "pushes that brought nothing new made the idle scan flush"
    );
}

/// A `Superseded` entry replaces a seq that already left the device: it is
/// durable at once, so a power cut right after cannot bring back the
/// original change (whose chunks the agent could no longer send).
#[test]
fn a_supersede_survives_a_power_cut() {
    let (_t, _clock, cfg) = cell(&[("f.bin", 7)]);
    let disk = SimDisk::default();
    let mut a = Agent::open_with_backend(cfg.clone(), Box::new(disk.clone())).unwrap();
    a.scan_once().unwrap();
    let sent = ClientStore::pending(&mut a, &Knowledge::default(), 100, 1 << 20).unwrap();
    assert_eq!(sent.len(), 1);
    ClientStore::supersede(&mut a, &sent[0]).unwrap();
    let image = disk.synced();
    a.crash();
    let mut a = Agent::open_with_backend(cfg, Box::new(SimDisk::from_image(image))).unwrap();
    let again = ClientStore::pending(&mut a, &Knowledge::default(), 100, 1 << 20).unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].seq, sent[0].seq);
    assert!(
        matches!(again[0].body, ChangeBody::Superseded(_)),
        "the supersede was lost: {:?}",
        again[0].body
    );
}

/// A disk that can fill up: writes and growth fail while `full` is set.
#[derive(Debug, Clone, Default)]
struct FillingDisk {
    disk: SimDisk,
    full: Arc<std::sync::atomic::AtomicBool>,
}

impl FillingDisk {
    fn check(&self) -> Result<(), std::io::Error> {
        if self.full.load(Ordering::SeqCst) {
            return Err(std::io::Error::from(std::io::ErrorKind::StorageFull));
        }
        Ok(())
    }
}

impl StorageBackend for FillingDisk {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.disk.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.disk.read(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.check()?;
        self.disk.set_len(len)
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        self.check()?;
        self.disk.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.check()?;
        self.disk.write(offset, data)
    }
}

/// Found by the deterministic simulation (seed 21): after one failed write
/// (a full disk) redb refuses every later write until the database is
/// reopened, so a daemon that only logged the error never synced again. The
/// error is now recognisable (`is_poisoned_db`; the daemon exits on it and
/// its supervisor restarts it), and a reopen on the same disk recovers with
/// nothing committed lost.
#[test]
fn a_full_disk_poisons_the_state_database_until_it_is_reopened() {
    let (t, _clock, cfg) = cell(&[("a.bin", 1)]);
    let watch = t.path().join("cell");
    let disk = FillingDisk::default();
    let mut a = Agent::open_with_backend(cfg.clone(), Box::new(disk.clone())).unwrap();
    // scan_once ends with a flush (Durability::Immediate commit).
    assert_eq!(a.scan_once().unwrap().changes_recorded, 1);

    disk.full.store(true, Ordering::SeqCst);
    for i in 0..40u64 {
        write_file(&watch.join(format!("b{i}.bin")), &pseudo_random(20_000, i + 2));
    }
    let first = a.scan_once();
    assert!(first.is_err(), "a full disk fails the scan or its flush");
    disk.full.store(false, Ordering::SeqCst);
    // Room again, but the open database stays poisoned.
    let again = a.scan_once().unwrap_err();
    assert!(again.is_poisoned_db(), "{again}");
    assert!(again.to_string().contains("must be restarted"), "{again}");
    a.crash();

    // The supervisor's restart: reopen on the same disk.
    let mut a = Agent::open_with_backend(cfg, Box::new(disk.clone())).unwrap();
    let r = a.scan_once().unwrap();
    assert_eq!(r.files_new, 40, "{r:?}");
    let pending = ClientStore::pending(&mut a, &Knowledge::default(), 100, 1 << 20).unwrap();
    assert_eq!(pending.len(), 41, "the change recorded before the full disk survived");
}
