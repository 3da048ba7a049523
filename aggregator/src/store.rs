//! The aggregator's durable store: one redb file (`agg.redb`) plus pack files
//! under `packs/`.
//!
//! Invariants:
//! - Every chunk in `CHUNKS` with state `LOCAL` has its bytes fsynced in the
//!   pack named by its pack seq, at the recorded offset; the redb transaction
//!   that indexes a chunk is committed only after the bytes are fsynced.
//! - The open pack's committed length is recorded in `PACKS`; bytes after it
//!   were never acknowledged and are truncated on startup.
//! - A pack is closed (index + trailer appended, fsynced, recorded `CLOSED`
//!   with its id) before it is renamed to `<id hex>.pack`; startup finishes an
//!   interrupted rename.
//! - A pack is deleted only after the sink answered 200 to its PUT (durable
//!   there); its chunks then turn `CLOUD` and still count for dedup. Its
//!   `PACK_ENTRIES` rows go in that transaction, its `PACKS` row once the
//!   file is gone (except the highest seq, so seqs never repeat).
//! - `apply` writes changes, regional knowledge and the forward queue in one
//!   Immediate transaction; a change leaves the forward queue only when the
//!   sink confirmed it (or refused it, then it is kept in `SINK_REJECTED`).
//! - `REGIONAL` (not `CHANGES`) records what was applied. A confirmed
//!   change's `CHANGES` row is deleted with its queue entry, so `CHANGES`
//!   holds only queued and sink-refused changes; `CHUNKS` rows stay for dedup.

use crate::{Error, Result};
use protocol::ids::{DeviceRef, Hash32, ReplicaId};
use protocol::knowledge::{Knowledge, RangeSet};
use protocol::manifest::Change;
use protocol::msg::{Changes, ChunkData, SeqStatus, Status, MAX_MESSAGE};
use protocol::pack::{PackEntry, MAGIC, MAX_PACK, TRAILER_MAGIC};
use protocol::server::ServerStore;
use protocol::sha::ResumableSha256;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// chunk id → (pack seq, offset, len, state)
const CHUNKS: TableDefinition<&[u8; 32], (u64, u64, u32, u8)> = TableDefinition::new("chunks");
/// (pack seq, offset) → (chunk id, len): the index a pack gets when it closes;
/// removed at upload.
const PACK_ENTRIES: TableDefinition<(u64, u64), (&[u8; 32], u32)> = TableDefinition::new("pack_entries");
/// pack seq → (state, pack id (zero while open), size: committed length while open).
/// Rows of uploaded packs are removed once their files are gone.
const PACKS: TableDefinition<u64, (u8, &[u8; 32], u64)> = TableDefinition::new("packs");
/// (replica key, seq) → CBOR Change, each written once; deleted when the sink
/// confirms it.
const CHANGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("changes");
/// replica key → CBOR (ReplicaId, RangeSet)
const REGIONAL: TableDefinition<&str, &[u8]> = TableDefinition::new("regional");
const CLOUD: TableDefinition<&str, &[u8]> = TableDefinition::new("cloud");
/// queue no → (replica key, seq): applied here, not yet confirmed by the sink.
const FORWARD: TableDefinition<u64, (&str, u64)> = TableDefinition::new("forward");
/// (replica key, seq) → reason: the sink refused the change. Kept for operators.
const SINK_REJECTED: TableDefinition<(&str, u64), &str> = TableDefinition::new("sink_rejected");
/// device key → pinned Ed25519 public key (trust on first use).
const DEVICE_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("device_keys");
/// counters: "next_forward"
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const LOCAL: u8 = 0;
const CLOUD_STATE: u8 = 1;
const PACK_OPEN: u8 = 0;
const PACK_CLOSED: u8 = 1;
const PACK_UPLOADED: u8 = 2;
const ZERO_ID: [u8; 32] = [0; 32];
/// Retry delay handed to agents while the spool is above the high watermark.
pub const BACKPRESSURE_MS: u64 = 5_000;

/// A clock in Unix milliseconds: the wall clock by default
/// ([`StoreClock::system`]); a simulator supplies its virtual time.
#[derive(Clone)]
pub struct StoreClock(pub Arc<dyn Fn() -> u64 + Send + Sync>);

impl StoreClock {
    pub fn system() -> StoreClock {
        StoreClock(Arc::new(crate::now_ms))
    }
    pub fn now_ms(&self) -> u64 {
        (self.0)()
    }
}

impl std::fmt::Debug for StoreClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreClock")
    }
}

#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Close the open pack once it holds this many bytes.
    pub pack_target: u64,
    /// Local pack bytes not yet uploaded: above `spool_high` agents are told
    /// to back off until the spool is below `spool_low`.
    pub spool_high: u64,
    pub spool_low: u64,
    /// redb page cache.
    pub cache_bytes: usize,
    /// Time of `apply` (when changes start waiting for the open pack to
    /// close). The forwarder compares it with the `now_ms` it is given, so
    /// both must be the same clock.
    pub clock: StoreClock,
    /// Deliberately wrong: for the simulator's self-test. `apply` commits
    /// without waiting for durability (redb `Durability::None`), so a batch
    /// is acknowledged before it is on disk. Never set this outside tests.
    pub unsafe_ack_before_fsync: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            pack_target: 16 << 20,
            spool_high: 2 << 30,
            spool_low: 3 << 29,
            cache_bytes: 64 << 20,
            clock: StoreClock::system(),
            unsafe_ack_before_fsync: false,
        }
    }
}

/// A closed pack waiting for upload.
#[derive(Clone, Debug)]
pub struct ClosedPack {
    pub seq: u64,
    pub id: Hash32,
    pub path: PathBuf,
    pub size: u64,
}

/// Where a chunk's bytes are.
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkBytes {
    Local(Vec<u8>),
    /// Uploaded and deleted here: only the sink has it.
    CloudOnly,
    Unknown,
}

/// A change in the forward queue.
#[derive(Clone, Debug)]
pub struct Queued {
    pub qno: u64,
    pub change: Change,
}

/// What the sink said about one forwarded batch.
#[derive(Default, Debug)]
pub struct Confirmed {
    pub applied: usize,
    pub rejected: usize,
    pub missing: usize,
    /// Devices whose cloud knowledge grew.
    pub devices: Vec<DeviceRef>,
}

struct OpenPack {
    seq: u64,
    file: File,
    /// Committed length (everything up to here is fsynced and indexed).
    len: u64,
    chunks: u64,
    /// SHA-256 state of the first `len` bytes, kept as they are written so
    /// closing names the pack without reading it back; None for a pack
    /// opened again after a restart (read back once, at its close).
    sha: Option<ResumableSha256>,
    /// Recorded closed, but the next open pack could not be made yet:
    /// nothing may be written to this file again (it is a closed pack).
    retired: bool,
}

pub struct AggStore {
    dir: PathBuf,
    db: Database,
    cfg: StoreConfig,
    /// The open pack; held while appending, closing and reading pack files.
    open: Mutex<OpenPack>,
    /// Bytes of open and closed (not uploaded) packs.
    spool: AtomicU64,
    over_high: AtomicBool,
    /// When (clock ms) the oldest change still waiting for the open pack to
    /// close was applied.
    waiting_since: Mutex<Option<u64>>,
    /// Server changes fetched from the sink for an agent's Hello, taken when
    /// that Hello is answered. In memory only: the sink is their source.
    relay: Mutex<HashMap<String, Changes>>,
}

/// Most stashed server-change answers (one per device whose Hello is in flight).
const MAX_RELAY: usize = 10_000;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// Keys of one device's replicas are `tenant/site/device/<epoch>`: this is
/// the range holding exactly them ('0' follows '/').
fn device_range(d: &DeviceRef) -> (String, String) {
    let k = d.key();
    (format!("{k}/"), format!("{k}0"))
}

/// Adds `k` to the CLOUD table; returns the devices whose knowledge grew.
fn union_cloud(cl: &mut redb::Table<&str, &[u8]>, k: &Knowledge) -> Result<Vec<DeviceRef>> {
    let mut grew = Vec::new();
    for (rep, set) in &k.map {
        let rk = rep.key();
        let mut cur = match cl.get(rk.as_str())? {
            Some(v) => decode_know(v.value())?.1,
            None => RangeSet::new(),
        };
        let before = cur.clone();
        cur.union_with(set);
        if cur != before {
            cl.insert(rk.as_str(), protocol::to_cbor(&(rep.clone(), cur)).as_slice())?;
            grew.push(rep.device.clone());
        }
    }
    Ok(grew)
}

fn decode_know(b: &[u8]) -> Result<(ReplicaId, RangeSet)> {
    Ok(protocol::from_cbor(b, MAX_MESSAGE)?)
}

fn decode_change(b: &[u8]) -> Result<Change> {
    Ok(protocol::from_cbor(b, MAX_MESSAGE)?)
}

impl AggStore {
    /// Opens (or creates) the store in `dir` and recovers from any crash:
    /// truncates the open pack to its committed length and finishes
    /// interrupted pack renames and deletions.
    pub fn open(dir: &Path, cfg: StoreConfig) -> Result<AggStore> {
        AggStore::open_inner(dir, cfg, None)
    }

    /// [`AggStore::open`] with the redb database on `backend` (a
    /// simulator's in-memory backend that may lose unsynced writes) instead
    /// of `dir/agg.redb`. Pack files stay in `dir/packs`. Recovery is the
    /// same as with a file.
    pub fn open_with_backend(dir: &Path, cfg: StoreConfig, backend: Box<dyn redb::StorageBackend>) -> Result<AggStore> {
        AggStore::open_inner(dir, cfg, Some(backend))
    }

    fn open_inner(dir: &Path, cfg: StoreConfig, backend: Option<Box<dyn redb::StorageBackend>>) -> Result<AggStore> {
        let packs = dir.join("packs");
        std::fs::create_dir_all(&packs).map_err(io_err(&packs))?;
        let mut builder = Database::builder();
        builder.set_cache_size(cfg.cache_bytes);
        let db = match backend {
            Some(b) => builder.create_with_backend(DynBackend(b))?,
            None => builder.create(dir.join("agg.redb"))?,
        };
        {
            let tx = db.begin_write()?;
            tx.open_table(CHUNKS)?;
            tx.open_table(PACK_ENTRIES)?;
            tx.open_table(PACKS)?;
            tx.open_table(CHANGES)?;
            tx.open_table(REGIONAL)?;
            tx.open_table(CLOUD)?;
            tx.open_table(FORWARD)?;
            tx.open_table(SINK_REJECTED)?;
            tx.open_table(DEVICE_KEYS)?;
            tx.open_table(META)?;
            tx.commit()?;
        }
        let mut spool = 0u64;
        let mut open_seq = None;
        let mut last_seq = 0u64;
        let rows: Vec<(u64, u8, [u8; 32], u64)> = {
            let rtx = db.begin_read()?;
            let t = rtx.open_table(PACKS)?;
            let mut v = Vec::new();
            for r in t.range::<u64>(..)? {
                let (k, val) = r?;
                let (state, id, size) = val.value();
                v.push((k.value(), state, *id, size));
            }
            v
        };
        for (seq, state, id, size) in rows {
            last_seq = seq;
            let open_path = packs.join(format!("open-{seq}.pack"));
            let id_path = packs.join(format!("{}.pack", Hash32(id).to_hex()));
            match state {
                PACK_OPEN => {
                    if open_seq.is_some() {
                        return Err(Error::Corrupt(format!("more than one open pack (second: {seq})")));
                    }
                    open_seq = Some((seq, size));
                    spool += size;
                }
                PACK_CLOSED => {
                    if !id_path.exists() {
                        if open_path.exists() {
                            // Crash between recording the close and the rename.
                            std::fs::rename(&open_path, &id_path).map_err(io_err(&open_path))?;
                            fsync_dir(&packs)?;
                        } else {
                            tracing::error!(
                                pack = %Hash32(id),
                                "closed pack {seq} is missing from {}: its chunks cannot be uploaded",
                                packs.display()
                            );
                        }
                    }
                    spool += size;
                }
                _ => {
                    // Uploaded: a crash may have left the file behind.
                    for p in [&id_path, &open_path] {
                        if p.exists() {
                            std::fs::remove_file(p).map_err(io_err(p))?;
                        }
                    }
                }
            }
        }
        forget_uploaded_packs(&db, &packs)?;
        sweep_confirmed_changes(&db)?;
        let open = match open_seq {
            Some((seq, size)) => {
                let path = packs.join(format!("open-{seq}.pack"));
                let file = if path.exists() {
                    OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)
                        .map_err(io_err(&path))?
                } else {
                    if size > MAGIC.len() as u64 {
                        return Err(Error::Corrupt(format!(
                            "open pack {} with {size} committed bytes is missing",
                            path.display()
                        )));
                    }
                    new_pack_file(&path)?
                };
                let actual = file.metadata().map_err(io_err(&path))?.len();
                if actual < size {
                    return Err(Error::Corrupt(format!(
                        "open pack {} has {actual} bytes, {size} were committed",
                        path.display()
                    )));
                }
                if actual > size {
                    tracing::info!("truncating open pack {} from {actual} to {size} bytes", path.display());
                    file.set_len(size).map_err(io_err(&path))?;
                    file.sync_all().map_err(io_err(&path))?;
                }
                let chunks = {
                    let rtx = db.begin_read()?;
                    let t = rtx.open_table(PACK_ENTRIES)?;
                    t.range((seq, 0)..=(seq, u64::MAX))?.count() as u64
                };
                OpenPack {
                    seq,
                    file,
                    len: size,
                    chunks,
                    sha: None,
                    retired: false,
                }
            }
            None => {
                let p = create_open_pack(&db, &packs, last_seq + 1)?;
                spool += p.len;
                p
            }
        };
        let forward_waiting = !db.begin_read()?.open_table(FORWARD)?.is_empty()?;
        let now = cfg.clock.now_ms();
        let store = AggStore {
            dir: dir.to_path_buf(),
            db,
            cfg,
            open: Mutex::new(open),
            spool: AtomicU64::new(spool),
            over_high: AtomicBool::new(false),
            // Changes queued before a restart may wait for the open pack: close it soon.
            waiting_since: Mutex::new(forward_waiting.then_some(now)),
            relay: Mutex::new(HashMap::new()),
        };
        store.update_watermark();
        Ok(store)
    }

    /// The store's clock ([`StoreConfig::clock`]).
    pub fn now_ms(&self) -> u64 {
        self.cfg.clock.now_ms()
    }

    /// The open pack closes once it holds this many bytes.
    fn close_at(&self) -> u64 {
        self.cfg.pack_target.min(MAX_PACK as u64 / 2)
    }

    fn packs_dir(&self) -> PathBuf {
        self.dir.join("packs")
    }

    fn lock_open(&self) -> Result<MutexGuard<'_, OpenPack>> {
        self.open
            .lock()
            .map_err(|_| Error::Corrupt("open pack lock poisoned by a panic".into()))
    }

    /// Bytes of local packs not yet uploaded.
    pub fn spool_bytes(&self) -> u64 {
        self.spool.load(Ordering::Relaxed)
    }

    fn update_watermark(&self) {
        let s = self.spool_bytes();
        if s >= self.cfg.spool_high {
            if !self.over_high.swap(true, Ordering::Relaxed) {
                tracing::warn!(spool = s, "spool above high watermark: agents are told to back off");
            }
        } else if s < self.cfg.spool_low && self.over_high.swap(false, Ordering::Relaxed) {
            tracing::info!(spool = s, "spool below low watermark: accepting data again");
        }
    }

    /// `Some(ms)` while the spool is above the high watermark (until it is
    /// below the low one).
    /// Keeps the sink's answer for `device`'s pending Hello (see `relay`).
    pub fn stash_changes(&self, device: &DeviceRef, ch: Changes) {
        let mut g = self.relay.lock().unwrap_or_else(|p| p.into_inner());
        if g.len() >= MAX_RELAY && !g.contains_key(&device.key()) {
            // Only an optimisation is lost: the agent asks again at its next Hello.
            return;
        }
        g.insert(device.key(), ch);
    }

    /// Takes the stashed answer for `device`, if any.
    pub fn take_changes(&self, device: &DeviceRef) -> Option<Changes> {
        self.relay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&device.key())
    }

    pub fn backpressure_ms(&self) -> Option<u64> {
        self.update_watermark();
        self.over_high.load(Ordering::Relaxed).then_some(BACKPRESSURE_MS)
    }

    /// (regional, cloud) knowledge of these devices' replicas.
    pub fn knowledge_of(&self, devices: &[DeviceRef]) -> Result<(Knowledge, Knowledge)> {
        let rtx = self.db.begin_read()?;
        let mut out = (Knowledge::default(), Knowledge::default());
        read_knowledge(&rtx.open_table(REGIONAL)?, devices, &mut out.0)?;
        read_knowledge(&rtx.open_table(CLOUD)?, devices, &mut out.1)?;
        Ok(out)
    }

    /// Cloud knowledge of one device.
    pub fn cloud_knowledge(&self, d: &DeviceRef) -> Result<Knowledge> {
        Ok(self.knowledge_of(std::slice::from_ref(d))?.1)
    }

    pub fn has_chunk(&self, id: &Hash32) -> Result<bool> {
        let rtx = self.db.begin_read()?;
        let t = rtx.open_table(CHUNKS)?;
        Ok(t.get(&id.0)?.is_some())
    }

    /// Opens a group commit: everything written through the [`Group`] goes
    /// into one redb write transaction and is made durable (open pack
    /// fsynced, then one Immediate commit) by [`Group::commit`]; reads
    /// through it see its own writes. Holds the open-pack lock and redb's
    /// write lock until it ends, so nothing else commits in between.
    pub fn group(&self) -> Result<Group<'_>> {
        // Lock order everywhere: open pack, then the redb write transaction.
        let mut open = self.lock_open()?;
        self.ensure_open(&mut open)?;
        let tx = self.db.begin_write()?;
        let end = open.len;
        let sha = open.sha.clone();
        Ok(Group {
            store: self,
            open,
            tx: Some(tx),
            end,
            sha,
            new_chunks: 0,
            dirty: false,
            wrote_chunks: false,
            applied: false,
            failed: None,
        })
    }

    /// Appends new chunks (ids already verified) to the open pack, fsyncs,
    /// then indexes them in one Immediate transaction. Returns only after
    /// that: the chunks survive any crash from then on.
    pub fn put_chunks(&self, chunks: &[ChunkData]) -> Result<()> {
        let mut g = self.group()?;
        g.put_chunks(chunks)?;
        g.commit()
    }

    pub fn device_key(&self, d: &DeviceRef) -> Result<Option<Vec<u8>>> {
        let rtx = self.db.begin_read()?;
        let t = rtx.open_table(DEVICE_KEYS)?;
        Ok(t.get(d.key().as_str())?.map(|v| v.value().to_vec()))
    }

    /// Records changes (chunks present, signatures checked by the caller),
    /// regional knowledge, pinned keys and the forward queue in one Immediate
    /// transaction. Changes already recorded are skipped (idempotent).
    pub fn apply(&self, changes: &[Change]) -> Result<()> {
        let mut g = self.group()?;
        g.apply(changes)?;
        g.commit()
    }

    /// Closes the open pack if changes have waited for it at least
    /// `max_delay` (by the store's clock).
    pub fn maybe_close(&self, max_delay: Duration) -> Result<Option<Hash32>> {
        self.maybe_close_at(self.now_ms(), max_delay)
    }

    /// [`AggStore::maybe_close`] at `now_ms` (the store's clock). A clock
    /// that stepped back before the wait began closes the pack too.
    pub fn maybe_close_at(&self, now_ms: u64, max_delay: Duration) -> Result<Option<Hash32>> {
        let max = u64::try_from(max_delay.as_millis()).unwrap_or(u64::MAX);
        let due = match self.waiting_since.lock() {
            Ok(w) => w.is_some_and(|t| now_ms < t || now_ms - t >= max),
            Err(_) => true,
        };
        if due {
            self.close_open_pack()
        } else {
            Ok(None)
        }
    }

    /// Closes the open pack if it holds any chunk; returns the new pack id.
    pub fn close_open_pack(&self) -> Result<Option<Hash32>> {
        let mut open = self.lock_open()?;
        self.close_locked(&mut open)
    }

    /// Replaces a retired open pack (a close whose last steps failed) with
    /// a new one, so nothing is appended to a closed pack's file.
    fn ensure_open(&self, open: &mut OpenPack) -> Result<()> {
        if open.retired {
            let next = create_open_pack(&self.db, &self.packs_dir(), open.seq + 1)?;
            self.spool.fetch_add(next.len, Ordering::Relaxed);
            *open = next;
        }
        Ok(())
    }

    fn close_locked(&self, open: &mut OpenPack) -> Result<Option<Hash32>> {
        self.ensure_open(open)?;
        if let Ok(mut w) = self.waiting_since.lock() {
            *w = None;
        }
        if open.chunks == 0 {
            return Ok(None);
        }
        let packs = self.packs_dir();
        let path = packs.join(format!("open-{}.pack", open.seq));
        let entries: Vec<PackEntry> = {
            let rtx = self.db.begin_read()?;
            let t = rtx.open_table(PACK_ENTRIES)?;
            let mut v = Vec::new();
            for r in t.range((open.seq, 0)..=(open.seq, u64::MAX))? {
                let (k, val) = r?;
                let (id, len) = val.value();
                v.push(PackEntry {
                    id: Hash32(*id),
                    offset: k.value().1,
                    len,
                });
            }
            v
        };
        // Same layout as protocol::pack::PackBuilder::finish.
        let index = protocol::to_cbor(&entries);
        let index_len =
            u32::try_from(index.len()).map_err(|_| Error::Corrupt("pack index larger than 4 GiB".into()))?;
        let mut tail = index;
        tail.extend_from_slice(&index_len.to_be_bytes());
        tail.extend_from_slice(TRAILER_MAGIC);
        open.file.write_all_at(&tail, open.len).map_err(io_err(&path))?;
        let size = open.len + tail.len() as u64;
        // Bytes past the trailer (a failed group's, never indexed) would be
        // uploaded with the pack and break its id: cut them off.
        open.file.set_len(size).map_err(io_err(&path))?;
        open.file.sync_data().map_err(io_err(&path))?;
        let id = match open.sha.take().filter(|h| h.len() == open.len) {
            Some(mut h) => {
                h.update(&tail);
                h.finish()
            }
            None => hash_file(&path, size)?,
        };
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        tx.open_table(PACKS)?.insert(open.seq, (PACK_CLOSED, &id.0, size))?;
        tx.commit()?;
        // Closed from here on: if a step below fails, the next group starts
        // a new open pack (`ensure_open`), and a restart finishes the rename.
        open.retired = true;
        let final_path = packs.join(format!("{}.pack", id.to_hex()));
        std::fs::rename(&path, &final_path).map_err(io_err(&path))?;
        fsync_dir(&packs)?;
        self.spool.fetch_add(tail.len() as u64, Ordering::Relaxed);
        tracing::debug!(pack = %id, chunks = entries.len(), size, "closed pack");
        let next = create_open_pack(&self.db, &packs, open.seq + 1)?;
        self.spool.fetch_add(next.len, Ordering::Relaxed);
        *open = next;
        Ok(Some(id))
    }

    /// Closed packs not yet uploaded, oldest first.
    pub fn closed_packs(&self) -> Result<Vec<ClosedPack>> {
        let rtx = self.db.begin_read()?;
        let t = rtx.open_table(PACKS)?;
        let mut v = Vec::new();
        for r in t.range::<u64>(..)? {
            let (k, val) = r?;
            let (state, id, size) = val.value();
            if state == PACK_CLOSED {
                let id = Hash32(*id);
                v.push(ClosedPack {
                    seq: k.value(),
                    id,
                    path: self.packs_dir().join(format!("{}.pack", id.to_hex())),
                    size,
                });
            }
        }
        Ok(v)
    }

    /// The sink holds this pack durably: its chunks become cloud chunks and
    /// the local file goes.
    pub fn mark_uploaded(&self, pack: &ClosedPack) -> Result<()> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        {
            let mut pt = tx.open_table(PACKS)?;
            match pt.get(pack.seq)?.map(|v| v.value().0) {
                Some(PACK_CLOSED) => {}
                _ => return Ok(()),
            }
            pt.insert(pack.seq, (PACK_UPLOADED, &pack.id.0, pack.size))?;
            let mut et = tx.open_table(PACK_ENTRIES)?;
            let mut ct = tx.open_table(CHUNKS)?;
            let ids: Vec<[u8; 32]> = et
                .extract_from_if((pack.seq, 0)..=(pack.seq, u64::MAX), |_, _| true)?
                .map(|r| r.map(|(_, v)| *v.value().0))
                .collect::<std::result::Result<_, _>>()?;
            for id in &ids {
                let cur = ct.get(id)?.map(|v| v.value());
                if let Some((seq, off, len, _)) = cur {
                    ct.insert(id, (seq, off, len, CLOUD_STATE))?;
                }
            }
        }
        tx.commit()?;
        if pack.path.exists() {
            std::fs::remove_file(&pack.path).map_err(io_err(&pack.path))?;
        }
        self.spool
            .fetch_sub(pack.size.min(self.spool_bytes()), Ordering::Relaxed);
        self.update_watermark();
        // Housekeeping only: the rows left behind are retried next time.
        if let Err(e) = forget_uploaded_packs(&self.db, &self.packs_dir()) {
            tracing::warn!("forgetting uploaded packs: {e}");
        }
        Ok(())
    }

    /// The stored bytes of a chunk, if they are still here.
    pub fn read_chunk(&self, id: &Hash32) -> Result<ChunkBytes> {
        // Holding the open-pack lock keeps the pack from being renamed or
        // deleted under us.
        let _open = self.lock_open()?;
        let rtx = self.db.begin_read()?;
        let Some((seq, off, len, state)) = rtx.open_table(CHUNKS)?.get(&id.0)?.map(|v| v.value()) else {
            return Ok(ChunkBytes::Unknown);
        };
        if state == CLOUD_STATE {
            return Ok(ChunkBytes::CloudOnly);
        }
        let Some((pstate, pid, _)) = rtx.open_table(PACKS)?.get(seq)?.map(|v| {
            let (s, i, z) = v.value();
            (s, *i, z)
        }) else {
            return Err(Error::Corrupt(format!("chunk {id} is in unknown pack {seq}")));
        };
        let path = match pstate {
            PACK_OPEN => self.packs_dir().join(format!("open-{seq}.pack")),
            _ => self.packs_dir().join(format!("{}.pack", Hash32(pid).to_hex())),
        };
        let f = File::open(&path).map_err(io_err(&path))?;
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, off).map_err(io_err(&path))?;
        if Hash32::of(&buf) != *id {
            return Err(Error::Corrupt(format!(
                "chunk {id} in {} does not match its id",
                path.display()
            )));
        }
        Ok(ChunkBytes::Local(buf))
    }

    /// Number of changes waiting to be confirmed by the sink.
    pub fn forward_len(&self) -> Result<u64> {
        let rtx = self.db.begin_read()?;
        Ok(rtx.open_table(FORWARD)?.len()?)
    }

    /// Up to `max` queued changes (oldest first, at most `max_bytes` encoded)
    /// whose chunks are all at the sink already. Looks at no more than
    /// `scan` queue entries.
    pub fn ready_changes(&self, max: usize, max_bytes: usize, scan: usize) -> Result<Vec<Queued>> {
        let rtx = self.db.begin_read()?;
        let ft = rtx.open_table(FORWARD)?;
        let ct = rtx.open_table(CHANGES)?;
        let kt = rtx.open_table(CHUNKS)?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for r in ft.range::<u64>(..)?.take(scan) {
            let (k, v) = r?;
            let (rk, seq) = v.value();
            let Some(raw) = ct.get((rk, seq))? else {
                tracing::error!("forward queue names {rk}:{seq}, which is not stored");
                continue;
            };
            if !out.is_empty() && bytes + raw.value().len() > max_bytes {
                break;
            }
            let change = decode_change(raw.value())?;
            let mut ready = true;
            for c in change.chunk_refs() {
                if kt.get(&c.id.0)?.map(|v| v.value().3) != Some(CLOUD_STATE) {
                    ready = false;
                    break;
                }
            }
            if ready {
                bytes += raw.value().len();
                out.push(Queued { qno: k.value(), change });
                if out.len() >= max {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Records the sink's answer to a forwarded batch: Applied changes leave
    /// the queue, Rejected ones move to `SINK_REJECTED`, Missing ones go to
    /// the back of the queue. Cloud knowledge grows by what the sink reports.
    pub fn confirm(
        &self,
        batch: &[Queued],
        results: &[SeqStatus],
        reasons: &[(u64, String)],
        sink_knowledge: &[&Knowledge],
    ) -> Result<Confirmed> {
        let mut out = Confirmed::default();
        let by_key: HashMap<(&ReplicaId, u64), &Queued> =
            batch.iter().map(|q| ((&q.change.replica, q.change.seq), q)).collect();
        let mut cloud = Knowledge::default();
        for k in sink_knowledge {
            cloud.union_with(k);
        }
        let mut devices = BTreeSet::new();
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        {
            let mut ft = tx.open_table(FORWARD)?;
            let mut ct = tx.open_table(CHANGES)?;
            let mut rj = tx.open_table(SINK_REJECTED)?;
            let mut mt = tx.open_table(META)?;
            let mut next = mt.get("next_forward")?.map(|v| v.value()).unwrap_or(1);
            for r in results {
                let Some(q) = by_key.get(&(&r.replica, r.seq)) else {
                    continue;
                };
                let rk = q.change.replica.key();
                match r.status {
                    Status::Applied => {
                        // The signed change is durable at the sink: nothing
                        // reads its row any more (`apply` consults `regional`).
                        // Only the queue entry just offered drops it, so a row
                        // some other entry names is never lost.
                        let was = ft.remove(q.qno)?.map(|v| {
                            let (k, s) = v.value();
                            (k == rk.as_str(), s)
                        });
                        if was == Some((true, r.seq)) {
                            ct.remove((rk.as_str(), r.seq))?;
                        }
                        cloud.insert(&r.replica, r.seq);
                        out.applied += 1;
                    }
                    Status::Rejected => {
                        let reason = reasons
                            .iter()
                            .find(|(s, _)| *s == r.seq)
                            .map(|(_, why)| why.as_str())
                            .unwrap_or("refused by the sink");
                        tracing::error!(change = %q.change.label(), "sink rejected change: {reason}");
                        ft.remove(q.qno)?;
                        rj.insert((rk.as_str(), r.seq), reason)?;
                        out.rejected += 1;
                    }
                    Status::Missing => {
                        // To the back, so it does not block the changes behind it.
                        ft.remove(q.qno)?;
                        ft.insert(next, (rk.as_str(), r.seq))?;
                        next += 1;
                        out.missing += 1;
                    }
                }
            }
            mt.insert("next_forward", next)?;
            devices.extend(union_cloud(&mut tx.open_table(CLOUD)?, &cloud)?);
        }
        tx.commit()?;
        out.devices = devices.into_iter().collect();
        Ok(out)
    }

    /// Adds what the sink reports it holds (e.g. of a device that moved here
    /// from another aggregator) to the cloud knowledge. Returns whether it grew.
    pub fn merge_cloud(&self, k: &Knowledge) -> Result<bool> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        let grew = !union_cloud(&mut tx.open_table(CLOUD)?, k)?.is_empty();
        if grew {
            tx.commit()?;
        } else {
            tx.abort()?;
        }
        Ok(grew)
    }

    /// Changes the sink refused, with reasons.
    pub fn sink_rejected(&self) -> Result<Vec<(String, u64, String)>> {
        let rtx = self.db.begin_read()?;
        let t = rtx.open_table(SINK_REJECTED)?;
        let mut v = Vec::new();
        for r in t.range::<(&str, u64)>(..)? {
            let (k, val) = r?;
            let (rk, seq) = k.value();
            v.push((rk.to_string(), seq, val.value().to_string()));
        }
        Ok(v)
    }
}

/// Reads the knowledge of `devices`' replicas from a REGIONAL or CLOUD table
/// (of a read or a write transaction) into `k`.
fn read_knowledge(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    devices: &[DeviceRef],
    k: &mut Knowledge,
) -> Result<()> {
    for d in devices {
        let (lo, hi) = device_range(d);
        for r in t.range(lo.as_str()..hi.as_str())? {
            let (_, v) = r?;
            let (rep, set) = decode_know(v.value())?;
            k.map.entry(rep).or_default().union_with(&set);
        }
    }
    Ok(())
}

/// A group commit ([`AggStore::group`]): many messages' chunks and changes
/// in one redb write transaction, made durable at once by [`Group::commit`].
///
/// Invariants:
/// - Nothing written through the group is durable, or visible outside it,
///   before `commit` (or a checkpoint: a pack that fills up mid-group is
///   committed and closed then) returns Ok; a crash before loses exactly
///   the group's writes: pack bytes past the committed length are truncated
///   at startup, and the transaction never committed.
/// - A commit fsyncs the open pack before the transaction that indexes its
///   new bytes, as `AggStore::put_chunks` always did.
/// - After a write inside the transaction failed, the group never commits
///   (a half-applied message must not become durable): `commit` aborts and
///   returns the error, and the caller acknowledges nothing of the group.
/// - Dropping a group without `commit` aborts it.
pub struct Group<'a> {
    store: &'a AggStore,
    open: MutexGuard<'a, OpenPack>,
    /// `None` only after a failure.
    tx: Option<redb::WriteTransaction>,
    /// End of the open pack including this group's appended bytes (only
    /// `open.len` of it is committed).
    end: u64,
    /// The open pack's SHA-256 state over `end` bytes (see `OpenPack::sha`).
    sha: Option<ResumableSha256>,
    new_chunks: u64,
    /// The transaction holds writes.
    dirty: bool,
    wrote_chunks: bool,
    /// Some change was recorded (the open pack's wait starts at commit).
    applied: bool,
    failed: Option<String>,
}

impl Group<'_> {
    fn tx(&self) -> Result<&redb::WriteTransaction> {
        match (&self.tx, &self.failed) {
            (Some(tx), None) => Ok(tx),
            (_, why) => Err(Error::GroupFailed(why.clone().unwrap_or_default())),
        }
    }

    fn fail(&mut self, e: &Error) {
        self.failed.get_or_insert_with(|| e.to_string());
    }

    pub fn knowledge(&self, devices: &[DeviceRef]) -> Result<(Knowledge, Knowledge)> {
        let tx = self.tx()?;
        let mut out = (Knowledge::default(), Knowledge::default());
        read_knowledge(&tx.open_table(REGIONAL)?, devices, &mut out.0)?;
        read_knowledge(&tx.open_table(CLOUD)?, devices, &mut out.1)?;
        Ok(out)
    }

    pub fn has_chunk(&self, id: &Hash32) -> Result<bool> {
        Ok(self.tx()?.open_table(CHUNKS)?.get(&id.0)?.is_some())
    }

    pub fn device_key(&self, d: &DeviceRef) -> Result<Option<Vec<u8>>> {
        let t = self.tx()?.open_table(DEVICE_KEYS)?;
        let key = t.get(d.key().as_str())?.map(|v| v.value().to_vec());
        Ok(key)
    }

    /// Appends new chunks (ids already verified) to the open pack and
    /// indexes them in the group's transaction; durable at `commit`.
    pub fn put_chunks(&mut self, chunks: &[ChunkData]) -> Result<()> {
        let tx = self.tx()?;
        let todo: Vec<&ChunkData> = {
            let t = tx.open_table(CHUNKS)?;
            let mut seen = HashSet::new();
            let mut v = Vec::new();
            for c in chunks {
                if seen.insert(c.id) && t.get(&c.id.0)?.is_none() {
                    v.push(c);
                }
            }
            v
        };
        if todo.is_empty() {
            return Ok(());
        }
        let start = self.end;
        let mut buf = Vec::with_capacity(todo.iter().map(|c| c.bytes.len()).sum());
        let mut entries = Vec::with_capacity(todo.len());
        for c in &todo {
            let len = u32::try_from(c.bytes.len())
                .map_err(|_| Error::Corrupt(format!("chunk {} larger than 4 GiB", c.id)))?;
            entries.push(PackEntry {
                id: c.id,
                offset: start + buf.len() as u64,
                len,
            });
            buf.extend_from_slice(&c.bytes);
        }
        let end = start + buf.len() as u64;
        let path = self.store.packs_dir().join(format!("open-{}.pack", self.open.seq));
        if let Err(e) = self.open.file.write_all_at(&buf, start) {
            // Nothing indexed yet: the group goes on without these chunks.
            let _ = self.open.file.set_len(start);
            return Err(io_err(&path)(e));
        }
        let seq = self.open.seq;
        let indexed = (|| {
            let mut ct = tx.open_table(CHUNKS)?;
            let mut et = tx.open_table(PACK_ENTRIES)?;
            for e in &entries {
                ct.insert(&e.id.0, (seq, e.offset, e.len, LOCAL))?;
                et.insert((seq, e.offset), (&e.id.0, e.len))?;
            }
            Ok(())
        })();
        if let Err(e) = indexed {
            self.fail(&e);
            return Err(e);
        }
        if let Some(h) = &mut self.sha {
            h.update(&buf);
        }
        self.end = end;
        self.new_chunks += entries.len() as u64;
        self.dirty = true;
        self.wrote_chunks = true;
        if self.end >= self.store.close_at() {
            // The pack is full: commit what the group holds so far (durable
            // earlier than needed, never later) and close it.
            self.checkpoint()?;
            if let Err(e) = self.store.close_locked(&mut self.open) {
                tracing::error!("closing a full pack: {e}; retried later");
            }
            // A close that failed after recording the pack closed left it
            // retired: this group goes on in a new open pack, or stops.
            if let Err(e) = self.store.ensure_open(&mut self.open) {
                self.fail(&e);
                return Err(e);
            }
            self.end = self.open.len;
            self.sha = self.open.sha.clone();
            match self.store.db.begin_write() {
                Ok(tx) => self.tx = Some(tx),
                Err(e) => {
                    let e = Error::from(e);
                    self.fail(&e);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Records changes (chunks present, signatures checked by the caller),
    /// regional knowledge, pinned keys and the forward queue in the group's
    /// transaction. Changes already recorded are skipped (idempotent).
    pub fn apply(&mut self, changes: &[Change]) -> Result<()> {
        let tx = self.tx()?;
        let res = (|| {
            let mut added = 0usize;
            let mut ct = tx.open_table(CHANGES)?;
            let mut rt = tx.open_table(REGIONAL)?;
            let mut ft = tx.open_table(FORWARD)?;
            let mut kt = tx.open_table(DEVICE_KEYS)?;
            let mut mt = tx.open_table(META)?;
            let mut next = mt.get("next_forward")?.map(|v| v.value()).unwrap_or(1);
            let mut know: BTreeMap<String, (ReplicaId, RangeSet)> = BTreeMap::new();
            let mut grown = BTreeSet::new();
            for c in changes {
                let rk = c.replica.key();
                if !know.contains_key(&rk) {
                    let cur = match rt.get(rk.as_str())? {
                        Some(v) => decode_know(v.value())?,
                        None => (c.replica.clone(), RangeSet::new()),
                    };
                    know.insert(rk.clone(), cur);
                }
                // Regional knowledge, not `changes`, says what was applied:
                // rows of confirmed changes are deleted.
                let Some((_, set)) = know.get_mut(&rk) else {
                    continue;
                };
                if set.contains(c.seq) {
                    continue;
                }
                set.insert(c.seq);
                grown.insert(rk.clone());
                ct.insert((rk.as_str(), c.seq), protocol::to_cbor(c).as_slice())?;
                ft.insert(next, (rk.as_str(), c.seq))?;
                next += 1;
                let dk = c.replica.device.key();
                if kt.get(dk.as_str())?.is_none() {
                    kt.insert(dk.as_str(), c.pubkey.as_slice())?;
                }
                added += 1;
            }
            for (rk, v) in know.iter().filter(|(rk, _)| grown.contains(*rk)) {
                rt.insert(rk.as_str(), protocol::to_cbor(v).as_slice())?;
            }
            if added > 0 {
                mt.insert("next_forward", next)?;
            }
            Ok(added)
        })();
        match res {
            Ok(0) => Ok(()),
            Ok(_) => {
                self.dirty = true;
                self.applied = true;
                Ok(())
            }
            Err(e) => {
                self.fail(&e);
                Err(e)
            }
        }
    }

    /// Makes everything written so far durable: fsyncs the open pack, then
    /// commits the transaction (Immediate) and only then advances the open
    /// pack's committed length in memory. Leaves no transaction behind.
    fn checkpoint(&mut self) -> Result<()> {
        if let Some(why) = &self.failed {
            return Err(Error::GroupFailed(why.clone()));
        }
        let Some(mut tx) = self.tx.take() else {
            return Err(Error::GroupFailed("no transaction".into()));
        };
        if !self.dirty {
            tx.abort()?;
            return Ok(());
        }
        let (seq, end) = (self.open.seq, self.end);
        let path = self.store.packs_dir().join(format!("open-{seq}.pack"));
        let durability = if self.store.cfg.unsafe_ack_before_fsync && !self.wrote_chunks {
            Durability::None
        } else {
            Durability::Immediate
        };
        let res = (|| {
            if end > self.open.len {
                self.open.file.sync_data().map_err(io_err(&path))?;
                tx.open_table(PACKS)?.insert(seq, (PACK_OPEN, &ZERO_ID, end))?;
            }
            tx.set_durability(durability)?;
            tx.commit()?;
            Ok(())
        })();
        if let Err(e) = res {
            // Nothing of the group was acknowledged: drop its pack bytes
            // (best effort; startup truncates to the committed length anyway).
            let _ = self.open.file.set_len(self.open.len);
            self.fail(&e);
            return Err(e);
        }
        let added = end - self.open.len;
        self.open.len = end;
        self.open.sha = self.sha.clone();
        self.open.chunks += self.new_chunks;
        self.store.spool.fetch_add(added, Ordering::Relaxed);
        if self.applied {
            let now = self.store.now_ms();
            if let Ok(mut w) = self.store.waiting_since.lock() {
                w.get_or_insert(now);
            }
        }
        (self.new_chunks, self.dirty, self.wrote_chunks, self.applied) = (0, false, false, false);
        Ok(())
    }

    /// Makes the group durable (one pack fsync, one redb commit). Only after
    /// this returned Ok may anything that acknowledges the group's writes
    /// be published. Closes the open pack once it reached its target.
    pub fn commit(mut self) -> Result<()> {
        self.checkpoint()?;
        if self.open.len >= self.store.close_at() {
            // Durable already: a failed close is retried later, not reported.
            if let Err(e) = self.store.close_locked(&mut self.open) {
                tracing::error!("closing a full pack: {e}; retried later");
            }
        }
        self.store.update_watermark();
        Ok(())
    }
}

/// The server logic's view of a group commit: replies it produces may
/// acknowledge the group's writes, so they wait for [`Group::commit`].
impl ServerStore for Group<'_> {
    fn knowledge(&mut self, devices: &[DeviceRef]) -> protocol::Result<(Knowledge, Knowledge)> {
        Group::knowledge(self, devices).map_err(store_err)
    }
    fn has_chunk(&mut self, id: &Hash32) -> protocol::Result<bool> {
        Group::has_chunk(self, id).map_err(store_err)
    }
    fn put_chunks(&mut self, chunks: &[ChunkData]) -> protocol::Result<()> {
        Group::put_chunks(self, chunks).map_err(store_err)
    }
    fn device_key(&mut self, device: &DeviceRef) -> protocol::Result<Option<Vec<u8>>> {
        Group::device_key(self, device).map_err(store_err)
    }
    fn apply(&mut self, changes: &[Change]) -> protocol::Result<()> {
        Group::apply(self, changes).map_err(store_err)
    }
    fn backpressure(&mut self) -> Option<u64> {
        self.store.backpressure_ms()
    }
    fn server_changes(&mut self, device: &DeviceRef, _after: u64) -> protocol::Result<Option<Changes>> {
        Ok(self.store.take_changes(device))
    }
}

/// Deletes the `packs` rows of uploaded packs whose files are gone. Their
/// chunks are `CLOUD` (dedup needs only those rows) and their entries went at
/// upload. The row with the highest seq stays so pack seqs never repeat; a
/// row whose file is still there stays so startup deletes the file.
fn forget_uploaded_packs(db: &Database, packs: &Path) -> Result<usize> {
    let mut tx = db.begin_write()?;
    tx.set_durability(Durability::Immediate)?;
    let mut n = 0usize;
    {
        let mut pt = tx.open_table(PACKS)?;
        let last = pt.last()?.map(|(k, _)| k.value());
        pt.retain(|seq, (state, id, _)| {
            let gone = state == PACK_UPLOADED
                && Some(seq) != last
                && !packs.join(format!("{}.pack", Hash32(*id).to_hex())).exists()
                && !packs.join(format!("open-{seq}.pack")).exists();
            n += usize::from(gone);
            !gone
        })?;
    }
    if n > 0 {
        tx.commit()?;
    } else {
        tx.abort()?;
    }
    Ok(n)
}

/// Deletes `changes` rows that are neither queued nor refused by the sink:
/// the sink confirmed them. `confirm` deletes them as it goes; this catches
/// rows kept by earlier versions. Cheap when there is nothing to do.
fn sweep_confirmed_changes(db: &Database) -> Result<usize> {
    let keep: HashSet<(String, u64)> = {
        let rtx = db.begin_read()?;
        let (ct, ft, rj) = (
            rtx.open_table(CHANGES)?,
            rtx.open_table(FORWARD)?,
            rtx.open_table(SINK_REJECTED)?,
        );
        if ct.len()? <= ft.len()? + rj.len()? {
            return Ok(0);
        }
        let mut keep = HashSet::new();
        for r in ft.range::<u64>(..)? {
            let (_, v) = r?;
            let (rk, seq) = v.value();
            keep.insert((rk.to_string(), seq));
        }
        for r in rj.range::<(&str, u64)>(..)? {
            let (k, _) = r?;
            let (rk, seq) = k.value();
            keep.insert((rk.to_string(), seq));
        }
        keep
    };
    let mut tx = db.begin_write()?;
    tx.set_durability(Durability::Immediate)?;
    let mut n = 0usize;
    tx.open_table(CHANGES)?.retain(|(rk, seq), _| {
        let confirmed = !keep.contains(&(rk.to_string(), seq));
        n += usize::from(confirmed);
        !confirmed
    })?;
    tx.commit()?;
    if n > 0 {
        tracing::info!("deleted {n} change rows the sink had confirmed");
    }
    Ok(n)
}

fn new_pack_file(path: &Path) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all_at(MAGIC, 0).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    Ok(f)
}

/// Creates `packs/open-<seq>.pack` (a stale file from a crash is replaced)
/// and records it as the open pack.
fn create_open_pack(db: &Database, packs: &Path, seq: u64) -> Result<OpenPack> {
    let path = packs.join(format!("open-{seq}.pack"));
    let file = new_pack_file(&path)?;
    fsync_dir(packs)?;
    let mut tx = db.begin_write()?;
    tx.set_durability(Durability::Immediate)?;
    tx.open_table(PACKS)?
        .insert(seq, (PACK_OPEN, &ZERO_ID, MAGIC.len() as u64))?;
    tx.commit()?;
    let mut sha = ResumableSha256::new();
    sha.update(MAGIC);
    Ok(OpenPack {
        seq,
        file,
        len: MAGIC.len() as u64,
        chunks: 0,
        sha: Some(sha),
        retired: false,
    })
}

/// SHA-256 of the first `len` bytes of a file, streamed.
fn hash_file(path: &Path, len: u64) -> Result<Hash32> {
    let f = File::open(path).map_err(io_err(path))?;
    let mut h = protocol::sha::ResumableSha256::new();
    let mut r = f.take(len);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = r.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    if h.len() != len {
        return Err(Error::Corrupt(format!(
            "{} is shorter than {len} bytes",
            path.display()
        )));
    }
    Ok(h.finish())
}

/// A caller-supplied redb backend, boxed (redb wants a sized backend).
#[derive(Debug)]
struct DynBackend(Box<dyn redb::StorageBackend>);

impl redb::StorageBackend for DynBackend {
    fn len(&self) -> std::result::Result<u64, std::io::Error> {
        self.0.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::result::Result<(), std::io::Error> {
        self.0.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::result::Result<(), std::io::Error> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> std::result::Result<(), std::io::Error> {
        self.0.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::result::Result<(), std::io::Error> {
        self.0.write(offset, data)
    }
    fn close(&self) -> std::result::Result<(), std::io::Error> {
        self.0.close()
    }
    fn try_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> std::result::Result<bool, redb::BackendError> {
        self.0.try_lock_range(s, e)
    }
    fn try_lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> std::result::Result<bool, redb::BackendError> {
        self.0.try_lock_shared_range(s, e)
    }
    fn lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> std::result::Result<(), redb::BackendError> {
        self.0.lock_range(s, e)
    }
    fn lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> std::result::Result<(), redb::BackendError> {
        self.0.lock_shared_range(s, e)
    }
    fn unlock_range(&self, s: Bound<u64>, e: Bound<u64>) -> std::result::Result<(), redb::BackendError> {
        self.0.unlock_range(s, e)
    }
    fn query_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> std::result::Result<bool, redb::BackendError> {
        self.0.query_lock_range(s, e)
    }
}

fn store_err(e: Error) -> protocol::Error {
    protocol::Error::Store(e.to_string())
}

/// The server logic's view of the store. Implemented on a shared reference
/// so the MQTT worker and the forwarder can use one store.
impl ServerStore for &AggStore {
    fn knowledge(&mut self, devices: &[DeviceRef]) -> protocol::Result<(Knowledge, Knowledge)> {
        self.knowledge_of(devices).map_err(store_err)
    }
    fn has_chunk(&mut self, id: &Hash32) -> protocol::Result<bool> {
        AggStore::has_chunk(self, id).map_err(store_err)
    }
    fn put_chunks(&mut self, chunks: &[ChunkData]) -> protocol::Result<()> {
        AggStore::put_chunks(self, chunks).map_err(store_err)
    }
    fn device_key(&mut self, device: &DeviceRef) -> protocol::Result<Option<Vec<u8>>> {
        AggStore::device_key(self, device).map_err(store_err)
    }
    fn apply(&mut self, changes: &[Change]) -> protocol::Result<()> {
        AggStore::apply(self, changes).map_err(store_err)
    }
    fn backpressure(&mut self) -> Option<u64> {
        self.backpressure_ms()
    }
    fn server_changes(&mut self, device: &DeviceRef, _after: u64) -> protocol::Result<Option<Changes>> {
        // None (the sink could not be asked): the server logic answers an
        // empty Changes, so the agent keeps its cursor.
        Ok(self.take_changes(device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::hlc::Hlc;
    use protocol::manifest::{ChangeBody, ChunkRef, FileVersion};
    use protocol::msg::Status;
    use ring::signature::Ed25519KeyPair;

    fn key() -> Ed25519KeyPair {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("keygen");
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key")
    }

    fn chunk(i: u32, len: usize) -> ChunkData {
        let bytes: Vec<u8> = (0..len)
            .map(|j| (j as u32 ^ i.wrapping_mul(2654435761)) as u8)
            .collect();
        ChunkData {
            id: Hash32::of(&bytes),
            bytes,
        }
    }

    fn change(k: &Ed25519KeyPair, seq: u64, chunks: &[&ChunkData]) -> Change {
        let replica = ReplicaId {
            device: DeviceRef::new("acme", "plant-1", "gw-1").expect("ids"),
            epoch: 1,
        };
        let body = ChangeBody::File(FileVersion {
            path: format!("root/f{seq}.csv"),
            size: chunks.iter().map(|c| c.bytes.len() as u64).sum(),
            mtime_ns: 0,
            class: "default".into(),
            chunks: chunks
                .iter()
                .map(|c| ChunkRef {
                    id: c.id,
                    len: c.bytes.len() as u32,
                })
                .collect(),
            sha256: Hash32::default(),
            mode: 0o644,
        });
        Change::sign(replica, seq, Hlc(seq), body, k)
    }

    fn cfg() -> StoreConfig {
        StoreConfig {
            pack_target: 1 << 20,
            spool_high: 1 << 30,
            spool_low: 1 << 29,
            cache_bytes: 4 << 20,
            ..StoreConfig::default()
        }
    }

    fn open_pack_path(dir: &Path) -> PathBuf {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("packs"))
            .expect("packs dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("open-")))
            .collect();
        assert_eq!(v.len(), 1, "{v:?}");
        v.remove(0)
    }

    #[test]
    fn chunks_survive_a_crash_and_the_open_pack_is_truncated() {
        let dir = tempfile::tempdir().expect("tmp");
        let (a, b) = (chunk(1, 1000), chunk(2, 3000));
        let committed = {
            let s = AggStore::open(dir.path(), cfg()).expect("open");
            s.put_chunks(&[a.clone(), b.clone(), a.clone()]).expect("put");
            s.put_chunks(std::slice::from_ref(&b)).expect("put again is a no-op");
            let p = open_pack_path(dir.path());
            let len = std::fs::metadata(&p).expect("meta").len();
            assert_eq!(len, 8 + 4000);
            // Bytes written after the last commit (a crash mid-append).
            let f = OpenOptions::new().append(true).open(&p).expect("open pack");
            f.write_all_at(&[0xAA; 777], len).expect("garbage");
            len
            // dropped without closing
        };
        let s = AggStore::open(dir.path(), cfg()).expect("reopen");
        assert_eq!(
            std::fs::metadata(open_pack_path(dir.path())).expect("meta").len(),
            committed
        );
        assert!(s.has_chunk(&a.id).expect("has") && s.has_chunk(&b.id).expect("has"));
        assert_eq!(s.read_chunk(&b.id).expect("read"), ChunkBytes::Local(b.bytes.clone()));
        assert_eq!(s.read_chunk(&Hash32::of(b"nope")).expect("read"), ChunkBytes::Unknown);
        // Appending continues at the committed length.
        let c = chunk(3, 500);
        s.put_chunks(std::slice::from_ref(&c)).expect("put");
        assert_eq!(s.read_chunk(&c.id).expect("read"), ChunkBytes::Local(c.bytes));
        assert_eq!(s.spool_bytes(), committed + 500);
    }

    #[test]
    fn apply_is_idempotent_and_durable() {
        let dir = tempfile::tempdir().expect("tmp");
        let k = key();
        let a = chunk(1, 100);
        let c1 = change(&k, 1, &[&a]);
        let c2 = change(&k, 2, &[]);
        let dev = c1.replica.device.clone();
        {
            let s = AggStore::open(dir.path(), cfg()).expect("open");
            s.put_chunks(std::slice::from_ref(&a)).expect("put");
            s.apply(&[c1.clone(), c2.clone()]).expect("apply");
            s.apply(&[c2.clone(), c1.clone()]).expect("apply again");
            assert_eq!(s.forward_len().expect("len"), 2);
        }
        let s = AggStore::open(dir.path(), cfg()).expect("reopen");
        s.apply(std::slice::from_ref(&c1)).expect("apply after restart");
        assert_eq!(s.forward_len().expect("len"), 2);
        let (regional, cloud) = s.knowledge_of(std::slice::from_ref(&dev)).expect("knowledge");
        assert_eq!(regional.get(&c1.replica).ranges(), &[(1, 2)]);
        assert!(cloud.map.is_empty());
        assert_eq!(s.device_key(&dev).expect("key"), Some(c1.pubkey.clone()));
        // Another device with a prefix-sharing name sees nothing of gw-1.
        let other = DeviceRef::new("acme", "plant-1", "gw-10").expect("ids");
        assert!(s.knowledge_of(&[other]).expect("k").0.map.is_empty());
    }

    #[test]
    fn closed_pack_parses_uploads_and_forwards() {
        let dir = tempfile::tempdir().expect("tmp");
        let k = key();
        let chunks: Vec<ChunkData> = (0..20).map(|i| chunk(i, 1000 + i as usize * 7)).collect();
        let s = AggStore::open(dir.path(), cfg()).expect("open");
        s.put_chunks(&chunks[..10]).expect("put");
        s.put_chunks(&chunks[10..]).expect("put");
        let ch = change(&k, 1, &chunks.iter().collect::<Vec<_>>());
        s.apply(std::slice::from_ref(&ch)).expect("apply");
        assert!(s.ready_changes(10, 1 << 20, 100).expect("ready").is_empty());
        assert!(s.maybe_close(Duration::from_secs(3600)).expect("not due").is_none());
        let id = s.maybe_close(Duration::ZERO).expect("close").expect("pack");
        let closed = s.closed_packs().expect("closed");
        assert_eq!(closed.len(), 1);
        let bytes = std::fs::read(&closed[0].path).expect("read pack");
        assert_eq!(Hash32::of(&bytes), id);
        assert_eq!(bytes.len() as u64, closed[0].size);
        let entries = protocol::pack::parse(&bytes).expect("sink accepts the pack");
        assert_eq!(entries.len(), 20);
        for (e, c) in entries.iter().zip(&chunks) {
            assert_eq!(e.id, c.id);
        }
        // Still readable from the closed pack (the sink may ask again).
        assert_eq!(
            s.read_chunk(&chunks[3].id).expect("read"),
            ChunkBytes::Local(chunks[3].bytes.clone())
        );
        // An empty open pack does not close.
        assert!(s.close_open_pack().expect("close").is_none());

        let spool = s.spool_bytes();
        s.mark_uploaded(&closed[0]).expect("uploaded");
        assert!(!closed[0].path.exists());
        assert_eq!(s.spool_bytes(), spool - closed[0].size);
        assert_eq!(s.read_chunk(&chunks[3].id).expect("read"), ChunkBytes::CloudOnly);
        assert!(s.has_chunk(&chunks[3].id).expect("dedup still knows it"));

        let ready = s.ready_changes(10, 1 << 20, 100).expect("ready");
        assert_eq!(ready.len(), 1);
        let results = [SeqStatus {
            replica: ch.replica.clone(),
            seq: 1,
            status: Status::Applied,
        }];
        let conf = s.confirm(&ready, &results, &[], &[]).expect("confirm");
        assert_eq!((conf.applied, conf.devices.len()), (1, 1));
        assert_eq!(s.forward_len().expect("len"), 0);
        let cloud = s.cloud_knowledge(&ch.replica.device).expect("cloud");
        assert!(cloud.contains(&ch.replica, 1));
        drop(s);
        let s = AggStore::open(dir.path(), cfg()).expect("reopen");
        assert!(s.closed_packs().expect("closed").is_empty());
        assert!(s
            .cloud_knowledge(&ch.replica.device)
            .expect("cloud")
            .contains(&ch.replica, 1));
    }

    fn rows(s: &AggStore) -> (u64, u64, u64, u64) {
        let rtx = s.db.begin_read().expect("read");
        (
            rtx.open_table(CHANGES).expect("t").len().expect("len"),
            rtx.open_table(PACKS).expect("t").len().expect("len"),
            rtx.open_table(PACK_ENTRIES).expect("t").len().expect("len"),
            rtx.open_table(CHUNKS).expect("t").len().expect("len"),
        )
    }

    #[test]
    fn confirmed_changes_and_uploaded_packs_leave_no_rows() {
        let dir = tempfile::tempdir().expect("tmp");
        let k = key();
        let chunks: Vec<ChunkData> = (0..6).map(|i| chunk(i, 2000 + i as usize)).collect();
        let changes: Vec<Change> = (1..=6u64).map(|q| change(&k, q, &[&chunks[q as usize - 1]])).collect();
        let dev = changes[0].replica.device.clone();
        let rep = changes[0].replica.clone();
        let s = AggStore::open(dir.path(), cfg()).expect("open");
        // Three packs, each uploaded before the next one closes.
        for part in 0..3 {
            let (c, ch) = (&chunks[part * 2..part * 2 + 2], &changes[part * 2..part * 2 + 2]);
            s.put_chunks(c).expect("put");
            s.apply(ch).expect("apply");
            s.close_open_pack().expect("close").expect("pack");
            for p in s.closed_packs().expect("closed") {
                s.mark_uploaded(&p).expect("uploaded");
            }
        }
        // Only the open pack's row remains; uploaded packs' entries are gone.
        assert_eq!(rows(&s), (6, 1, 0, 6));
        let ready = s.ready_changes(10, 1 << 20, 100).expect("ready");
        assert_eq!(ready.len(), 6);
        let st = |seq, status| SeqStatus {
            replica: rep.clone(),
            seq,
            status,
        };
        let results: Vec<SeqStatus> = (1..=4).map(|q| st(q, Status::Applied)).collect();
        let results = [results, vec![st(5, Status::Rejected), st(6, Status::Missing)]].concat();
        let conf = s.confirm(&ready, &results, &[(5, "no".into())], &[]).expect("confirm");
        assert_eq!((conf.applied, conf.rejected, conf.missing), (4, 1, 1));
        // Kept: the refused change (for operators) and the re-queued one.
        assert_eq!(rows(&s).0, 2);
        assert_eq!(s.forward_len().expect("len"), 1);

        let check = |s: &AggStore| {
            let (regional, cloud) = s.knowledge_of(std::slice::from_ref(&dev)).expect("knowledge");
            assert_eq!(regional.get(&rep).ranges(), &[(1, 6)]);
            assert!((1..=4).all(|q| cloud.contains(&rep, q)) && !cloud.contains(&rep, 5));
            assert!(chunks.iter().all(|c| s.has_chunk(&c.id).expect("has")));
            assert_eq!(s.read_chunk(&chunks[0].id).expect("read"), ChunkBytes::CloudOnly);
            // An agent retrying confirmed changes: still applied once.
            s.apply(&changes).expect("apply again");
            assert_eq!(s.forward_len().expect("len"), 1);
            assert_eq!(rows(s).0, 2);
            // Dedup: the chunks are not stored again.
            let spool = s.spool_bytes();
            s.put_chunks(&chunks).expect("put again");
            assert_eq!(s.spool_bytes(), spool);
            let again = s.ready_changes(10, 1 << 20, 100).expect("ready");
            assert_eq!(again.len(), 1);
            assert_eq!(again[0].change, changes[5]);
        };
        check(&s);
        drop(s);
        let s = AggStore::open(dir.path(), cfg()).expect("reopen");
        check(&s);
        assert_eq!(rows(&s), (2, 1, 0, 6));

        // Rows earlier versions kept (a confirmed change, an uploaded pack
        // left behind by a crash before its file went) go at startup.
        let open_seq = {
            let t = s.db.begin_read().expect("r").open_table(PACKS).expect("t");
            let only = t.first().expect("first").map(|(k, _)| k.value());
            only.expect("the open pack's row")
        };
        {
            let tx = s.db.begin_write().expect("w");
            tx.open_table(CHANGES)
                .expect("t")
                .insert((rep.key().as_str(), 1), protocol::to_cbor(&changes[0]).as_slice())
                .expect("insert");
            tx.open_table(PACKS)
                .expect("t")
                .insert(open_seq - 1, (PACK_UPLOADED, &[7; 32], 100))
                .expect("insert");
            tx.commit().expect("commit");
        }
        let leftover = dir
            .path()
            .join("packs")
            .join(format!("{}.pack", Hash32([7; 32]).to_hex()));
        std::fs::write(&leftover, b"uploaded").expect("leftover");
        drop(s);
        let s = AggStore::open(dir.path(), cfg()).expect("reopen");
        assert!(!leftover.exists());
        assert_eq!(rows(&s), (2, 1, 0, 6));
        check(&s);
    }

    #[test]
    fn cloud_knowledge_learned_from_the_sink_is_merged_and_kept() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = AggStore::open(dir.path(), cfg()).expect("open");
        let rep = ReplicaId {
            device: DeviceRef::new("acme", "plant-1", "gw-moved").expect("ids"),
            epoch: 3,
        };
        let mut k = Knowledge::default();
        for seq in 1..=5 {
            k.insert(&rep, seq);
        }
        assert!(s.merge_cloud(&k).expect("merge"));
        // Nothing new: no write.
        assert!(!s.merge_cloud(&k).expect("merge again"));
        let mut more = Knowledge::default();
        more.insert(&rep, 9);
        assert!(s.merge_cloud(&more).expect("merge more"));
        drop(s);
        let s = AggStore::open(dir.path(), cfg()).expect("reopen");
        let (regional, cloud) = s.knowledge_of(std::slice::from_ref(&rep.device)).expect("k");
        assert!(regional.map.is_empty(), "the region holds none of it");
        assert!((1..=5).all(|q| cloud.contains(&rep, q)) && cloud.contains(&rep, 9));
        assert!(!cloud.contains(&rep, 6));
    }

    #[test]
    fn sink_missing_and_rejected_changes_are_kept() {
        let dir = tempfile::tempdir().expect("tmp");
        let k = key();
        let s = AggStore::open(dir.path(), cfg()).expect("open");
        let (c1, c2) = (change(&k, 1, &[]), change(&k, 2, &[]));
        s.apply(&[c1.clone(), c2.clone()]).expect("apply");
        let ready = s.ready_changes(10, 1 << 20, 100).expect("ready");
        assert_eq!(ready.len(), 2);
        let st = |c: &Change, status| SeqStatus {
            replica: c.replica.clone(),
            seq: c.seq,
            status,
        };
        let conf = s
            .confirm(
                &ready,
                &[st(&c1, Status::Missing), st(&c2, Status::Rejected)],
                &[(2, "bad key".into())],
                &[],
            )
            .expect("confirm");
        assert_eq!((conf.applied, conf.missing, conf.rejected), (0, 1, 1));
        let again = s.ready_changes(10, 1 << 20, 100).expect("ready");
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].change, c1);
        assert!(again[0].qno > ready[1].qno, "missing change moved to the back");
        assert_eq!(s.sink_rejected().expect("rej")[0].2, "bad key");
    }

    #[test]
    fn a_closed_pack_is_named_by_the_sha256_of_its_bytes() {
        let dir = tempfile::tempdir().expect("tmp");
        let pack_bytes =
            |id: Hash32| std::fs::read(dir.path().join("packs").join(format!("{}.pack", id.to_hex()))).expect("pack");
        let first = {
            let s = AggStore::open(dir.path(), cfg()).expect("open");
            // Three groups, and a chunk already held (not written again).
            for i in 0..3 {
                s.put_chunks(&[chunk(i, 3000 + i as usize), chunk(0, 3000)])
                    .expect("put");
            }
            let id = s.close_open_pack().expect("close").expect("pack");
            assert_eq!(Hash32::of(&pack_bytes(id)), id, "hashed while written");
            s.put_chunks(&[chunk(7, 5000)]).expect("put");
            id
        };
        // Reopened with a pack half full: its state is read back at close.
        let s = AggStore::open(dir.path(), cfg()).expect("reopen");
        s.put_chunks(&[chunk(8, 6000)]).expect("put");
        let id = s.close_open_pack().expect("close").expect("pack");
        assert_ne!(id, first);
        assert_eq!(Hash32::of(&pack_bytes(id)), id, "read back after a restart");
    }

    #[test]
    fn bytes_of_a_failed_group_are_not_part_of_the_closed_pack() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = AggStore::open(dir.path(), cfg()).expect("open");
        s.put_chunks(&[chunk(1, 3000)]).expect("put");
        {
            // Written to the open pack, then the group is dropped uncommitted.
            let mut g = s.group().expect("group");
            g.put_chunks(&[chunk(2, 200_000)]).expect("put");
        }
        s.put_chunks(&[chunk(3, 1000)]).expect("put");
        let id = s.close_open_pack().expect("close").expect("pack");
        let bytes = std::fs::read(dir.path().join("packs").join(format!("{}.pack", id.to_hex()))).expect("pack");
        assert_eq!(Hash32::of(&bytes), id, "the uploaded file is the pack its id names");
        assert!(bytes.len() < 200_000);
    }

    #[test]
    fn interrupted_close_is_finished_on_startup() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = chunk(1, 4000);
        let (id, open_name) = {
            let s = AggStore::open(dir.path(), cfg()).expect("open");
            s.put_chunks(std::slice::from_ref(&a)).expect("put");
            let open_name = open_pack_path(dir.path());
            let id = s.close_open_pack().expect("close").expect("pack");
            (id, open_name)
        };
        // Pretend the crash hit between recording the close and the rename.
        let final_path = dir.path().join("packs").join(format!("{}.pack", id.to_hex()));
        std::fs::rename(&final_path, &open_name).expect("unrename");
        let s = AggStore::open(dir.path(), cfg()).expect("reopen");
        assert!(final_path.exists() && !open_name.exists());
        assert_eq!(s.closed_packs().expect("closed")[0].id, id);
        assert_eq!(s.read_chunk(&a.id).expect("read"), ChunkBytes::Local(a.bytes));
    }

    #[test]
    fn packs_close_at_target_and_backpressure_has_hysteresis() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = AggStore::open(
            dir.path(),
            StoreConfig {
                pack_target: 10_000,
                spool_high: 30_000,
                spool_low: 15_000,
                cache_bytes: 4 << 20,
                ..StoreConfig::default()
            },
        )
        .expect("open");
        assert_eq!(s.backpressure_ms(), None);
        for i in 0..8 {
            s.put_chunks(&[chunk(i, 4000)]).expect("put");
        }
        let closed = s.closed_packs().expect("closed");
        assert!(closed.len() >= 2, "{closed:?}");
        assert_eq!(s.backpressure_ms(), Some(BACKPRESSURE_MS));
        s.mark_uploaded(&closed[0]).expect("up");
        // Between the watermarks: still backing off.
        assert!(s.spool_bytes() >= 15_000);
        assert_eq!(s.backpressure_ms(), Some(BACKPRESSURE_MS));
        s.mark_uploaded(&closed[1]).expect("up");
        assert!(s.spool_bytes() < 15_000);
        assert_eq!(s.backpressure_ms(), None);
    }
}
