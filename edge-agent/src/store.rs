//! All agent state in ONE redb file.
//!
//! Tables:
//! - `meta`: identity (device), epoch, next seq, HLC, the device's Ed25519
//!   key (PKCS#8, generated on first open), counters, last knowledge.
//! - `files`: manifest path → [`FileMeta`] (small: what a scan compares).
//! - `file_chunks`: manifest path → [`FileChunks`] (chunk list with index
//!   tags and the saved SHA-256 state for the append fast path).
//! - `known`: HMAC index tag → sealed chunk id + how it was sealed.
//! - `outbox`: (epoch, seq) → recorded time, logical bytes, CBOR [`Change`].
//! - `budget`: policy class → budget day, bytes of chunk data sent that day
//!   (daily budgets survive restarts).
//! - `durable`: manifest path → (seq, Unix ms) when that version of the file
//!   became cloud-durable (for `keep_local`).
//! - `pruned`: manifest path → [`PrunedFile`]: files the disk watermarks
//!   deleted locally. Not deletions: the cloud keeps them and restores bring
//!   them back.
//! - `shared_vv`: manifest path of a shared class → CBOR [`Shared`]: the
//!   path's version vector (own entry = HLC of this device's latest change
//!   of it, merged with what the cloud reported) and the policy last used.
//! - `basis`: (path key, byte offset) → CBOR [`BasisSlot`]: for files sent
//!   as page deltas, a zstd-compressed copy of each page's last version the
//!   server acknowledged (`anchor`) and of its newest version (`cand`). A
//!   changed page is sealed as a delta against its anchor. The path key is
//!   the first 8 bytes of SHA-256(path); a collision can only make a delta
//!   larger, never wrong, as each entry pairs a chunk id with its plaintext.
//! - `sealed`: (epoch, seq, chunk id) → stored bytes of a delta chunk, kept
//!   until the change `seq` leaves the outbox (its base is not in the file
//!   any more, so it cannot be resealed at send time); `sealed_idx`: chunk
//!   id → its (epoch, seq) key.
//! - `server_state`: server-change target (`meta:<glob>`, `shared:<path>`)
//!   → gseq (u64 BE) + CBOR [`ServerBody`]: the CRDT join of every server
//!   change received for it. At most [`MAX_SERVER_TARGETS`] targets.
//!
//! Invariants:
//! - A recorded change (outbox entry, file state, known chunks, next seq,
//!   HLC, counters) is written in one transaction, so after any crash the
//!   file and outbox agree and a seq is never handed out twice.
//! - Scan transactions commit with `Durability::None` and are made durable
//!   by a periodic `flush` — and always before any change leaves the
//!   device (`pending` flushes first), so nothing the server may have seen
//!   can be lost and its seq reused.
//! - Outbox entries are deleted only when cloud knowledge covers them.
//!   Knowledge commits with `Durability::None`: losing it in a crash only
//!   means offering again what the server already holds.
//! - A change of a shared path and the path's new vector are written in
//!   one transaction; the vector only grows.
//! - Server changes and the server cursor move in one transaction, durable
//!   before the cursor is reported to the server again whenever a state
//!   changed; a cursor that alone moved may be lost (its items are asked
//!   for again and merge as no-ops).

use crate::central::{HeldFiles, Holds, MetaEntry, SharedEntry};
use crate::error::{Error, Result};
use minicbor::{Decode, Encode};
use protocol::hlc::Hlc;
use protocol::manifest::{Change, ChangeBody};
use protocol::meta::{MetaState, ServerBody, ServerChange};
use protocol::seal::BaseRef;
use protocol::shared::{ConflictPolicy, Shared};
use protocol::{DeviceRef, Hash32, Knowledge, ReplicaId};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::Ed25519KeyPair;
use serde::{Deserialize, Serialize};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::time::Duration;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const FILES: TableDefinition<&str, &[u8]> = TableDefinition::new("files");
const FILE_CHUNKS: TableDefinition<&str, &[u8]> = TableDefinition::new("file_chunks");
const KNOWN: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("known");
/// `known` as an agent before 2026-12-06 left it (HMAC-SHA-256 tags), kept
/// only while changes recorded then may still be sent: `chunk()` reseals
/// those from the file with the level, cipher and base found here.
const KNOWN_V1: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("known_hmac");
const OUTBOX: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("outbox");
const BUDGET: TableDefinition<&str, &[u8]> = TableDefinition::new("budget");
const DURABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("durable");
const PRUNED: TableDefinition<&str, &[u8]> = TableDefinition::new("pruned");
/// Manifest path of each empty directory recorded as present → its seq.
const EMPTY_DIRS: TableDefinition<&str, u64> = TableDefinition::new("empty_dirs");
/// Shared path → CBOR `Shared` (version vector + policy).
const SHARED_VV: TableDefinition<&str, &[u8]> = TableDefinition::new("shared_vv");
/// Server-change target → gseq (u64 BE) + CBOR `ServerBody` (merged state).
const SERVER_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("server_state");
/// (path key, byte offset) → CBOR `BasisSlot`.
const BASIS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("basis");
/// (epoch, seq, chunk id) → sealed bytes of a delta chunk not yet cloud-durable.
const SEALED: TableDefinition<(u32, u64, [u8; 32]), &[u8]> = TableDefinition::new("sealed");
/// Chunk id → the (epoch, seq) of its `sealed` entry.
const SEALED_IDX: TableDefinition<[u8; 32], (u32, u64)> = TableDefinition::new("sealed_idx");
/// (device, inode) → the tracked path last recorded with it. A hint for
/// rename detection only: a reader checks the path's `files` entry.
const INODES: TableDefinition<(u64, u64), &str> = TableDefinition::new("inodes");
/// Paths deleted by a scan whose `basis` rows were kept for a rename later
/// in that scan: dropped when the root's walk ends, or, after a scan that
/// stopped early, when the next one starts.
const KEPT_BASIS: TableDefinition<&str, ()> = TableDefinition::new("kept_basis");

/// Most server-change targets kept. Beyond it new targets are refused (and
/// logged), the cursor stays, and pruning stops: a hold might be missed.
pub const MAX_SERVER_TARGETS: u64 = 100_000;
/// HLCs in a server's version vectors further ahead of the wall clock than
/// this are merged into the vector but not into this device's clock (a bad
/// peer must not push the clock to the end of time).
const MAX_OBSERVE_AHEAD_MS: u64 = 86_400_000;
/// Entries of each list (`metadata`, `shared`) in `status`.
pub const STATUS_LIST_MAX: usize = 1000;
/// Held paths named in `status`.
const STATUS_HELD_PATHS: usize = 100;

/// redb page cache: small and explicit (the default is 1 GiB).
pub const CACHE_BYTES: usize = 4 << 20;
/// Make scan commits durable at least this often.
const FLUSH_EVERY: u32 = 512;
const FLUSH_INTERVAL: Duration = Duration::from_secs(2);
/// Non-durable commits other than records (knowledge, stat updates, disk
/// status) after which a scan ends with a durable commit anyway.
const IDLE_FLUSH_EVERY: u32 = 64;
/// Outbox value header: recorded ms (u64 BE) + logical bytes (u64 BE).
const OUTBOX_HEADER: usize = 16;

/// What a scan compares, per tracked file.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct FileMeta {
    #[n(0)]
    pub size: u64,
    #[n(1)]
    pub mtime_ns: i64,
    #[n(2)]
    pub inode: u64,
    #[n(3)]
    pub mode: u32,
    /// Seq of the change that recorded this state.
    #[n(4)]
    pub seq: u64,
    /// Set by `supersede`: the next scan re-records the file in full.
    #[n(5)]
    pub dirty: bool,
    /// The mtime was within [`RACY_NS`] of the moment the file was read: a
    /// same-size rewrite in the same timestamp tick would leave the stat
    /// unchanged, so the next scan checks the content (git's "racily clean").
    #[n(6)]
    #[cbor(default)]
    pub racy: bool,
    /// The filesystem (`st_dev`) the inode number belongs to; None from
    /// agents before 2026-12-07. A renamed file is recognised by device,
    /// inode, size and mtime only when this is known.
    #[n(7)]
    #[cbor(default)]
    pub dev: Option<u64>,
    /// The file's birth time (statx `btime`), where the filesystem reports
    /// one; None from agents before 2026-12-07. An inode number can be
    /// handed to another file (freed and reused, or renumbered on a
    /// remount, as FAT does); a birth time cannot be set, so a rename is
    /// recognised only when both match.
    #[n(8)]
    #[cbor(default)]
    pub btime_ns: Option<i64>,
}

/// Timestamps closer than this to the read are not trusted (coarse kernel
/// clocks tick every few ms; FAT and some network filesystems every 1–2 s).
pub const RACY_NS: i64 = 2_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct StoredChunk {
    #[n(0)]
    pub id: Hash32,
    #[n(1)]
    pub len: u32,
    #[n(2)]
    pub tag: Hash32,
}

#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct FileChunks {
    #[n(0)]
    pub chunks: Vec<StoredChunk>,
    /// `ResumableSha256` state after every chunk but the last (the start of
    /// the final, still-growing chunk); empty when there are no chunks.
    #[n(1)]
    #[cbor(with = "minicbor::bytes")]
    pub sha_before_last: Vec<u8>,
    #[n(2)]
    pub class: String,
    /// [`crate::chunker::Chunker::fingerprint`] of the chunking that cut
    /// these chunks; None from agents before 2026-12-06. A scan reuses the
    /// cut points only under the same chunking.
    #[n(3)]
    pub cuts: Option<u64>,
}

/// One version of a page kept as a delta base: chunk id, plaintext length,
/// the chunk's depth, the change that recorded it, and its plaintext
/// compressed with zstd.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct BasisPage {
    #[n(0)]
    pub id: Hash32,
    #[n(1)]
    pub len: u32,
    #[n(2)]
    pub depth: u8,
    #[n(3)]
    pub epoch: u32,
    /// Filled in by the record transaction (the scan does not know it yet).
    #[n(4)]
    pub seq: u64,
    #[n(5)]
    #[cbor(with = "minicbor::bytes")]
    pub zplain: Vec<u8>,
}

/// The delta bases of one page slot (see the `basis` table).
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub struct BasisSlot {
    /// The newest version the server is known to hold: what deltas use.
    #[n(0)]
    pub anchor: Option<BasisPage>,
    /// The newest version scanned, if newer than the anchor: the anchor
    /// once the server acknowledges its change.
    #[n(1)]
    pub cand: Option<BasisPage>,
    /// The full (depth 0) version the anchor's delta chain starts from,
    /// when the anchor is itself a delta: the base once the anchor's chain
    /// is at the depth bound.
    #[n(2)]
    pub root: Option<BasisPage>,
}

/// What a page-delta scan of one file adds to its record transaction.
#[derive(Clone, Debug, Default)]
pub struct DeltaWrites {
    /// Slots to write; the `cand` pages get this change's epoch and seq.
    pub basis: Vec<(u64, BasisSlot)>,
    /// Slots at or past this offset are removed (the file is this long).
    pub basis_end: u64,
    /// Slots at offsets that are not a multiple of
    /// [`crate::chunker::PAGE_GROUP`] are removed: an older agent chunked
    /// the file with another geometry (one chunk per page, before
    /// 2026-12-06), and no scan would overwrite them.
    pub regroup: bool,
    /// New delta chunks: id → stored bytes.
    pub sealed: Vec<(Hash32, Vec<u8>)>,
    /// Delta chunks this version references again: kept until it is sent.
    pub keep_sealed: Vec<Hash32>,
    /// A deletion that leaves the path's slots in place (a rename may
    /// take them later in the same scan, which then drops them).
    pub keep_basis: bool,
    /// The path's slots are removed before `basis` is written (a renamed
    /// file's slots replace whatever the path had).
    pub replace: bool,
}

/// Key of a manifest path in the `basis` table.
pub fn path_key(path: &str) -> u64 {
    let h = Hash32::of(path.as_bytes());
    u64::from_be_bytes([h.0[0], h.0[1], h.0[2], h.0[3], h.0[4], h.0[5], h.0[6], h.0[7]])
}

/// A read view of one file's delta bases, for one scan.
pub struct BasisReader {
    table: redb::ReadOnlyTable<(u64, u64), &'static [u8]>,
    sealed: redb::ReadOnlyTable<[u8; 32], (u32, u64)>,
    key: u64,
}

impl BasisReader {
    /// The slot at byte `offset`; an undecodable entry reads as empty (it
    /// only costs a full page).
    pub fn get(&self, offset: u64) -> Result<BasisSlot> {
        Ok(match self.table.get((self.key, offset))? {
            Some(v) => minicbor::decode(v.value()).unwrap_or_default(),
            None => BasisSlot::default(),
        })
    }

    /// Whether the sealed bytes of delta chunk `id` are kept.
    pub fn has_sealed(&self, id: &Hash32) -> Result<bool> {
        Ok(self.sealed.get(id.0)?.is_some())
    }
}

/// A file the disk watermarks deleted from the watch folder.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct PrunedFile {
    #[n(0)]
    pub size: u64,
    #[n(1)]
    pub mtime_ns: i64,
    #[n(2)]
    pub epoch: u32,
    #[n(3)]
    pub seq: u64,
    #[n(4)]
    pub pruned_ms: u64,
    /// Deleted although not cloud-durable (`prune = "force"`).
    #[n(5)]
    pub forced: bool,
}

/// The disk watermark condition, as of the last check.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DiskStatus {
    /// Highest percent used over the watched filesystems.
    pub used_pct: f64,
    pub free_bytes: u64,
    pub total_bytes: u64,
    pub over_high: bool,
    pub high: String,
    pub low: String,
    /// Files and bytes pruned over the life of the state file.
    pub pruned_files: u64,
    pub pruned_bytes: u64,
    /// Of those, deleted while not cloud-durable (`prune = "force"`).
    pub pruned_forced: u64,
    /// Still over the low watermark after pruning: bytes of tracked files
    /// that could not be pruned because they are not cloud-durable yet.
    pub blocked_bytes_not_durable: u64,
    /// Files (and their bytes) pruning passed over because a legal hold
    /// covers them (last pruning pass).
    pub held_files: u64,
    pub held_bytes: u64,
    /// Unix ms of the check.
    pub checked_ms: u64,
}

/// How a known chunk was sealed, so `chunk()` can reproduce the same bytes
/// even after the class's zstd level or the cipher setting changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnownChunk {
    pub id: Hash32,
    pub level: i32,
    pub cipher: u8,
    /// Set for an extension chunk (`protocol::seal`): the base is the
    /// chunk's own first `base.len` bytes, so it can be resealed from them.
    /// For a delta chunk (`base.delta`) the base is not in the file any
    /// more: its sealed bytes wait in the `sealed` table until sent.
    pub base: Option<BaseRef>,
}

impl KnownChunk {
    /// 34 bytes; 71 with an extension base (id, length u32 big-endian,
    /// depth); 72 with a delta base (the same, then 1).
    fn to_bytes(self) -> Vec<u8> {
        let mut b = Vec::with_capacity(72);
        b.extend_from_slice(&self.id.0);
        b.push(self.level.clamp(-128, 127) as i8 as u8);
        b.push(self.cipher);
        if let Some(base) = self.base {
            b.extend_from_slice(&base.id.0);
            b.extend_from_slice(&base.len.to_be_bytes());
            b.push(base.depth);
            if base.delta {
                b.push(1);
            }
        }
        b
    }
    fn from_bytes(b: &[u8]) -> Option<KnownChunk> {
        let id: [u8; 32] = b.get(..32)?.try_into().ok()?;
        let base = match b.len() {
            34 => None,
            71 | 72 => Some(BaseRef {
                id: Hash32(b.get(34..66)?.try_into().ok()?),
                len: u32::from_be_bytes(b.get(66..70)?.try_into().ok()?),
                depth: *b.get(70)?,
                delta: b.len() == 72,
            }),
            _ => return None,
        };
        Some(KnownChunk {
            id: Hash32(id),
            level: i32::from(*b.get(32)? as i8),
            cipher: *b.get(33)?,
            base,
        })
    }
}

/// Persistent counters. `files_tracked`, `logical_bytes`, `outbox_bytes`
/// and `changes_recorded` change only inside record transactions and are
/// exact; traffic counters are persisted periodically (a crash may lose the
/// last few seconds of them).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Counters {
    pub files_tracked: u64,
    pub logical_bytes: u64,
    /// Logical bytes of the changes still in the outbox.
    pub outbox_bytes: u64,
    pub changes_recorded: u64,
    pub epochs_started: u64,
    pub scans: u64,
    pub bytes_read: u64,
    pub bytes_chunked: u64,
    pub chunks_new: u64,
    pub chunks_skipped_known: u64,
    /// Of `chunks_new`, stored as extensions of a grown file's old tail.
    pub chunks_extension: u64,
    /// Of `chunks_new`, stored as deltas against a page's previous version.
    #[serde(default)]
    pub chunks_delta: u64,
    pub changed_during_read: u64,
    pub wire_bytes_sent: u64,
    pub messages_sent: u64,
    pub chunks_sent: u64,
    pub chunk_bytes_sent: u64,
    pub messages_received: u64,
    pub bad_messages: u64,
    pub superseded: u64,
    /// Connections dropped because the link went silent while connected.
    pub link_stalls: u64,
    /// Times the server knew seqs of this replica that this state never
    /// handed out (state lost or restored from an old copy): new epoch.
    pub state_rollbacks: u64,
    /// Files deleted locally by the disk watermarks (not user deletions).
    pub pruned_files: u64,
    pub pruned_bytes: u64,
    pub pruned_forced: u64,
    /// Chunk data bytes held back by bandwidth caps, schedules or budgets
    /// (counted once per held Data message).
    pub data_held: u64,
}

/// One replica's knowledge, for status output.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicaSummary {
    pub epoch: u32,
    pub seqs: u64,
    /// Up to 16 ranges `[lo, hi]`.
    pub ranges: Vec<(u64, u64)>,
}

fn summarize(k: &Knowledge) -> Vec<ReplicaSummary> {
    k.map
        .iter()
        .map(|(r, s)| ReplicaSummary {
            epoch: r.epoch,
            seqs: s.len(),
            ranges: s.ranges().iter().take(16).copied().collect(),
        })
        .collect()
}

/// Everything `edge-agent status` reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub device: String,
    pub epoch: u32,
    pub next_seq: u64,
    pub files_tracked: u64,
    /// Changes recorded over the life of this state file (all epochs).
    pub changes_recorded: u64,
    pub logical_bytes: u64,
    pub wire_bytes_sent: u64,
    pub messages_sent: u64,
    pub chunks_sent: u64,
    pub chunk_bytes_sent: u64,
    pub chunks_new: u64,
    pub chunks_skipped_known: u64,
    pub chunks_extension: u64,
    #[serde(default)]
    pub chunks_delta: u64,
    pub bytes_read: u64,
    pub bytes_chunked: u64,
    pub bad_messages: u64,
    /// Recorded changes not yet durable in the cloud.
    pub pending_changes: u64,
    pub pending_bytes: u64,
    /// Age of the oldest recorded change not yet durable in the cloud.
    pub oldest_pending_age_secs: Option<u64>,
    /// Seq (current epoch) of the oldest change not yet cloud-durable.
    #[serde(default)]
    pub oldest_pending_seq: Option<u64>,
    /// Unix ms when that change was recorded: unlike the age, it does not
    /// go stale in a snapshot.
    #[serde(default)]
    pub oldest_pending_recorded_ms: Option<u64>,
    /// Changes of the current epoch durable at the aggregator (or beyond).
    pub regional_durable: u64,
    pub cloud_durable: u64,
    pub regional: Vec<ReplicaSummary>,
    pub cloud: Vec<ReplicaSummary>,
    pub counters: Counters,
    /// Unix ms when this status was computed.
    pub as_of_ms: u64,
    /// True when read from the daemon's snapshot file because it holds the lock.
    pub from_snapshot: bool,
    /// Disk watermarks (null when never checked or not configured).
    #[serde(default)]
    pub disk: Option<DiskStatus>,
    /// Every server change at or below this sink sequence number is applied.
    #[serde(default)]
    pub server_cursor: u64,
    /// Central metadata targets (first [`STATUS_LIST_MAX`], by target).
    #[serde(default)]
    pub metadata: Vec<MetaEntry>,
    /// Shared paths (first [`STATUS_LIST_MAX`], by path).
    #[serde(default)]
    pub shared: Vec<SharedEntry>,
    /// Tracked files under legal hold (never pruned).
    #[serde(default)]
    pub held: HeldFiles,
    /// Server changes were refused for want of room ([`MAX_SERVER_TARGETS`]):
    /// the cursor stays and nothing is pruned.
    #[serde(default)]
    pub server_overflow: bool,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Fills `b` from the injected entropy source, or the system RNG.
fn fill_random(entropy: Option<&crate::Entropy>, b: &mut [u8]) -> Result<()> {
    match entropy {
        Some(f) => {
            f(b);
            Ok(())
        }
        None => SystemRandom::new()
            .fill(b)
            .map_err(|_| Error::Protocol(protocol::Error::Crypto("no system randomness"))),
    }
}

fn random_epoch(entropy: Option<&crate::Entropy>) -> Result<u32> {
    for _ in 0..1000 {
        let mut b = [0u8; 4];
        fill_random(entropy, &mut b)?;
        let e = u32::from_be_bytes(b);
        if e != 0 {
            return Ok(e);
        }
    }
    Err(Error::Protocol(protocol::Error::Crypto(
        "entropy source returns only zeros",
    )))
}

/// A new Ed25519 key as PKCS#8 v2 (the document ring's `generate_pkcs8`
/// writes). With an injected entropy source the key is derived from its
/// 32-byte seed, so a seeded simulation gets the same keys every run.
fn new_device_key(entropy: Option<&crate::Entropy>) -> Result<Vec<u8>> {
    let Some(f) = entropy else {
        let k = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| Error::Protocol(protocol::Error::Crypto("ed25519 keygen")))?;
        return Ok(k.as_ref().to_vec());
    };
    use ring::signature::KeyPair;
    let mut seed = [0u8; 32];
    f(&mut seed);
    let pair = Ed25519KeyPair::from_seed_unchecked(&seed)
        .map_err(|_| Error::Protocol(protocol::Error::Crypto("ed25519 key from seed")))?;
    // ring's PKCS#8 v2 template for Ed25519: prefix, seed, middle, public key.
    const PREFIX: [u8; 16] = [
        0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
    ];
    const MIDDLE: [u8; 3] = [0x81, 0x21, 0x00];
    let mut doc = Vec::with_capacity(83);
    doc.extend_from_slice(&PREFIX);
    doc.extend_from_slice(&seed);
    doc.extend_from_slice(&MIDDLE);
    doc.extend_from_slice(pair.public_key().as_ref());
    Ed25519KeyPair::from_pkcs8(&doc).map_err(|_| Error::Protocol(protocol::Error::Crypto("ed25519 pkcs8")))?;
    Ok(doc)
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

/// How [`Store::open_with`] opens the state. [`Default`]: the state file
/// itself, the system clock and the system RNG.
pub struct StoreOptions {
    /// Where the redb database lives instead of the state file (a
    /// simulator's in-memory backend). The state path still names the
    /// device key file (`<state>.device-key`) and the status snapshot.
    pub backend: Option<Box<dyn redb::StorageBackend>>,
    /// Unix ms: `created_ms`, flush pacing, status ages.
    pub clock: crate::Clock,
    /// Random bytes for epochs and a new device key (system RNG if `None`).
    pub entropy: Option<crate::Entropy>,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            backend: None,
            clock: crate::system_clock(),
            entropy: None,
        }
    }
}

fn corrupt(what: &'static str, e: impl std::fmt::Display) -> Error {
    Error::Corrupt {
        what,
        detail: e.to_string(),
    }
}

fn cbor_decode<'b, T: minicbor::Decode<'b, ()>>(what: &'static str, b: &'b [u8]) -> Result<T> {
    minicbor::decode(b).map_err(|e| corrupt(what, e))
}

fn u64_of(what: &'static str, b: &[u8]) -> Result<u64> {
    let a: [u8; 8] = b.try_into().map_err(|_| corrupt(what, "not 8 bytes"))?;
    Ok(u64::from_be_bytes(a))
}

fn outbox_header(v: &[u8]) -> Result<(u64, u64)> {
    if v.len() < OUTBOX_HEADER {
        return Err(corrupt("outbox entry", "short header"));
    }
    Ok((u64_of("outbox time", &v[..8])?, u64_of("outbox size", &v[8..16])?))
}

fn open_db_error(path: &Path, e: redb::DatabaseError) -> Error {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => Error::Locked {
            path: path.to_path_buf(),
        },
        redb::DatabaseError::Storage(redb::StorageError::Io(io)) => Error::io(path, io),
        e => Error::Db(format!("{}: {e}", path.display())),
    }
}

/// In-memory copy of the meta table's scalar fields.
struct Meta {
    epoch: u32,
    next_seq: u64,
    hlc: Hlc,
    /// Highest seq of this epoch that ever left the device (made durable
    /// here before it was returned by `pending`). The server can know no
    /// higher seq of this replica unless another copy of this state sent
    /// it: the state was rolled back.
    offered: u64,
}

/// The device's Ed25519 signing key lives in its own file next to the state
/// file (`<state>.device-key`, mode 0600): the sink pins it on first use, so
/// a state file that is lost or rolled back must not take the device's
/// identity with it. Losing both is a re-enrolment.
pub fn device_key_path(state: &Path) -> PathBuf {
    let mut s = state.as_os_str().to_owned();
    s.push(".device-key");
    PathBuf::from(s)
}

const KEY_FILE_HEADER: &str = "ferry-device-key v1";

/// PKCS#8 of the device key in `path`, if the file exists. A key file of
/// another device is an identity error.
fn read_device_key(path: &Path, device: &DeviceRef, state: &Path) -> Result<Option<Vec<u8>>> {
    let text = match std::fs::read(path) {
        Ok(t) if t.len() <= 4096 => String::from_utf8_lossy(&t).into_owned(),
        Ok(_) => return Err(corrupt("device key file", format!("{}: too large", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    let bad = |why: &str| corrupt("device key file", format!("{}: {why}", path.display()));
    let mut lines = text.lines();
    if lines.next() != Some(KEY_FILE_HEADER) {
        return Err(bad("not a Ferry device key file"));
    }
    let (mut dev, mut pkcs8) = (None, None);
    for l in lines {
        match l.split_once(' ') {
            Some(("device", d)) => dev = Some(d.to_string()),
            Some(("pkcs8", h)) => pkcs8 = Some(hex::decode(h.trim()).map_err(|_| bad("bad pkcs8 hex"))?),
            _ => {}
        }
    }
    let (Some(dev), Some(pkcs8)) = (dev, pkcs8) else {
        return Err(bad("missing device or pkcs8 line"));
    };
    if dev != device.key() {
        return Err(Error::Identity {
            path: state.to_path_buf(),
            stored: format!("{dev} (in {})", path.display()),
            requested: device.key(),
        });
    }
    Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|e| bad(&e.to_string()))?;
    Ok(Some(pkcs8))
}

/// Writes a new device key file (0600, fsynced, never overwriting).
fn write_device_key(path: &Path, device: &DeviceRef, pkcs8: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let text = format!(
        "{KEY_FILE_HEADER}\ndevice {}\npkcs8 {}\n",
        device.key(),
        hex::encode(pkcs8)
    );
    let mut f = o.open(path).map_err(|e| Error::io(path, e))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(path, e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

pub struct Store {
    db: Database,
    path: PathBuf,
    device: DeviceRef,
    meta: Meta,
    key: Ed25519KeyPair,
    pub counters: Counters,
    regional: Knowledge,
    cloud: Knowledge,
    /// Commits since the last durable one.
    unflushed: u32,
    /// Clock ms of the oldest unflushed record (meaningless while
    /// `records_unflushed` is false): a record flushes once that is
    /// [`FLUSH_INTERVAL`] old, so an idle spell before a scan does not cost
    /// a durable commit at its first record.
    dirty_since: u64,
    /// Some of those commits recorded changes: they must be durable before
    /// any change leaves the device. (Knowledge, stat updates and disk
    /// status need not be, so they do not force a durable commit there.)
    records_unflushed: bool,
    clock: crate::Clock,
    entropy: Option<crate::Entropy>,
    /// Set when files must be scanned again soon (supersede, new epoch).
    pub rescan: bool,
    server_cursor: u64,
}

impl Store {
    /// Opens or creates the state file for `device`. A new file starts a new
    /// random epoch and generates the device's signing key.
    pub fn open(path: &Path, device: &DeviceRef) -> Result<Store> {
        Store::open_with(path, device, StoreOptions::default())
    }

    /// [`Store::open`] with a caller-supplied backend, clock and entropy
    /// ([`StoreOptions`]). Opening, repair after a crash, identity and
    /// key checks and epoch detection are the same as with a file.
    pub fn open_with(path: &Path, device: &DeviceRef, opts: StoreOptions) -> Result<Store> {
        let StoreOptions {
            backend,
            clock,
            entropy,
        } = opts;
        let mut builder = redb::Builder::new();
        builder.set_cache_size(CACHE_BYTES);
        let db = match backend {
            Some(b) => builder.create_with_backend(DynBackend(b)),
            None => builder.create(path),
        }
        .map_err(|e| open_db_error(path, e))?;
        let key_path = device_key_path(path);
        let txn = db.begin_write()?;
        let fresh;
        {
            let mut meta = txn.open_table(META)?;
            txn.open_table(FILES)?;
            txn.open_table(FILE_CHUNKS)?;
            txn.open_table(KNOWN)?;
            txn.open_table(KNOWN_V1)?;
            txn.open_table(OUTBOX)?;
            txn.open_table(BUDGET)?;
            txn.open_table(DURABLE)?;
            txn.open_table(PRUNED)?;
            txn.open_table(EMPTY_DIRS)?;
            txn.open_table(SHARED_VV)?;
            txn.open_table(SERVER_STATE)?;
            txn.open_table(BASIS)?;
            txn.open_table(INODES)?;
            txn.open_table(KEPT_BASIS)?;
            txn.open_table(SEALED)?;
            txn.open_table(SEALED_IDX)?;
            let stored = meta
                .get("device")?
                .map(|v| String::from_utf8_lossy(v.value()).into_owned());
            match stored {
                Some(s) if s != device.key() => {
                    return Err(Error::Identity {
                        path: path.to_path_buf(),
                        stored: s,
                        requested: device.key(),
                    })
                }
                Some(_) => fresh = false,
                None => {
                    fresh = true;
                    // The device keeps its key across lost state files.
                    let pkcs8 = match read_device_key(&key_path, device, path)? {
                        Some(k) => k,
                        None => {
                            let k = new_device_key(entropy.as_ref())?;
                            write_device_key(&key_path, device, &k)?;
                            k
                        }
                    };
                    let counters = Counters {
                        epochs_started: 1,
                        ..Counters::default()
                    };
                    meta.insert("device", device.key().as_bytes())?;
                    meta.insert("epoch", &random_epoch(entropy.as_ref())?.to_be_bytes()[..])?;
                    meta.insert("next_seq", &1u64.to_be_bytes()[..])?;
                    meta.insert("hlc", &0u64.to_be_bytes()[..])?;
                    meta.insert("key", pkcs8.as_slice())?;
                    meta.insert("created_ms", &clock().to_be_bytes()[..])?;
                    meta.insert("counters", serde_json::to_vec(&counters).unwrap_or_default().as_slice())?;
                }
            }
            // Known chunks tagged by another function (an older agent's
            // HMAC-SHA-256) can never be hit by a scan again: moved to
            // `known_hmac` until the outbox is empty (changes recorded with
            // them are resealed from it at send time), so a scan seals them
            // again (a chunk sealed whole gets its old id back; the server
            // has it). Tags in `file_chunks` just stop matching, which costs
            // a full read once.
            let label = protocol::seal::INDEX_TAG_LABEL.as_bytes();
            if meta.get("index_tag")?.is_none_or(|v| v.value() != label) {
                if !fresh {
                    let mut known = txn.open_table(KNOWN)?;
                    let mut old = txn.open_table(KNOWN_V1)?;
                    let mut moved = 0u64;
                    for e in known.iter()? {
                        let (k, v) = e?;
                        old.insert(k.value(), v.value())?;
                        moved += 1;
                    }
                    known.retain(|_, _| false)?;
                    tracing::info!(
                        moved,
                        "index tags are keyed BLAKE3 now: known chunks kept apart until sent"
                    );
                }
                meta.insert("index_tag", label)?;
            }
        }
        txn.commit()?;
        if fresh {
            tracing::info!(state = %path.display(), "new state file: new epoch and device key");
        }
        let (meta, key, counters, regional, cloud, server_cursor) = {
            let r = db.begin_read()?;
            let t = r.open_table(META)?;
            let get = |k: &'static str| -> Result<Vec<u8>> {
                t.get(k)?
                    .map(|v| v.value().to_vec())
                    .ok_or_else(|| corrupt("meta", format!("missing {k}")))
            };
            let epoch = u32::from_be_bytes(get("epoch")?.try_into().map_err(|_| corrupt("meta", "epoch"))?);
            let next_seq = u64_of("next_seq", &get("next_seq")?)?;
            // State files from before `offered` was kept: assume everything
            // recorded may have left (the old, weaker check).
            let offered = match t.get("offered")? {
                Some(v) => u64_of("offered", v.value())?,
                None => next_seq.saturating_sub(1),
            };
            let meta = Meta {
                epoch,
                next_seq,
                hlc: Hlc(u64_of("hlc", &get("hlc")?)?),
                offered,
            };
            let pkcs8 = get("key")?;
            let key = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|e| corrupt("device key", e))?;
            match read_device_key(&key_path, device, path)? {
                Some(k) if k != pkcs8 => {
                    return Err(corrupt(
                        "device key file",
                        format!(
                            "{} holds another key than the state file {}; the sink accepts only the \
                             key it pinned for the device: restore the matching key file",
                            key_path.display(),
                            path.display()
                        ),
                    ))
                }
                Some(_) => {}
                // State files from before the key file existed.
                None => {
                    if let Err(e) = write_device_key(&key_path, device, &pkcs8) {
                        tracing::warn!("cannot save the device key next to the state file: {e}");
                    }
                }
            }
            let counters: Counters = serde_json::from_slice(&get("counters")?).map_err(|e| corrupt("counters", e))?;
            let know = |k: &str| -> Result<Knowledge> {
                match t.get(k)? {
                    Some(v) => cbor_decode("knowledge", v.value()),
                    None => Ok(Knowledge::default()),
                }
            };
            let server_cursor = match t.get("server_cursor")? {
                Some(v) => u64_of("server cursor", v.value())?,
                None => 0,
            };
            (meta, key, counters, know("regional")?, know("cloud")?, server_cursor)
        };
        Ok(Store {
            db,
            path: path.to_path_buf(),
            device: device.clone(),
            meta,
            key,
            counters,
            regional,
            cloud,
            unflushed: 0,
            dirty_since: 0,
            records_unflushed: false,
            clock,
            entropy,
            rescan: false,
            server_cursor,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn device(&self) -> &DeviceRef {
        &self.device
    }
    pub fn epoch(&self) -> u32 {
        self.meta.epoch
    }
    pub fn next_seq(&self) -> u64 {
        self.meta.next_seq
    }
    pub fn replica(&self) -> ReplicaId {
        ReplicaId {
            device: self.device.clone(),
            epoch: self.meta.epoch,
        }
    }
    pub fn public_key(&self) -> Vec<u8> {
        use ring::signature::KeyPair;
        self.key.public_key().as_ref().to_vec()
    }
    pub fn regional(&self) -> &Knowledge {
        &self.regional
    }
    pub fn cloud(&self) -> &Knowledge {
        &self.cloud
    }

    /// Up to `limit` tracked files whose path starts with `prefix`, after
    /// `after`, in key order. Short read transactions, so a long scan never
    /// pins old pages.
    pub fn file_page(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<(String, FileMeta)>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(FILES)?;
        let mut out = Vec::new();
        let range = match after {
            Some(a) => t.range::<&str>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))?,
            None => t.range::<&str>(prefix..)?,
        };
        for item in range {
            let (k, v) = item?;
            if !k.value().starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.value().to_string(), cbor_decode("file state", v.value())?));
        }
        Ok(out)
    }

    pub fn file_meta(&self, path: &str) -> Result<Option<FileMeta>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(FILES)?;
        let v = t.get(path)?;
        v.map(|v| cbor_decode("file state", v.value())).transpose()
    }

    pub fn file_chunks(&self, path: &str) -> Result<Option<FileChunks>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(FILE_CHUNKS)?;
        let v = t.get(path)?;
        v.map(|v| cbor_decode("file chunks", v.value())).transpose()
    }

    /// Whether known chunks of an older agent's tag function are kept
    /// (see `known_hmac`).
    pub fn has_legacy_known(&self) -> Result<bool> {
        Ok(!self.db.begin_read()?.open_table(KNOWN_V1)?.is_empty()?)
    }

    /// A known chunk of an older agent, by its HMAC-SHA-256 tag
    /// ([`protocol::seal::Sealer::legacy_index_tag`]).
    pub fn legacy_known(&self, tag: &Hash32) -> Result<Option<KnownChunk>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(KNOWN_V1)?;
        let v = t.get(tag.0)?;
        Ok(v.and_then(|v| KnownChunk::from_bytes(v.value())))
    }

    /// A read view of the known-chunk table, for one file's worth of lookups.
    pub fn known_reader(&self) -> Result<KnownReader> {
        let r = self.db.begin_read()?;
        Ok(KnownReader {
            table: r.open_table(KNOWN)?,
        })
    }

    /// A read view of `path`'s delta bases.
    pub fn basis_reader(&self, path: &str) -> Result<BasisReader> {
        let r = self.db.begin_read()?;
        Ok(BasisReader {
            table: r.open_table(BASIS)?,
            sealed: r.open_table(SEALED_IDX)?,
            key: path_key(path),
        })
    }

    /// Stored bytes of a delta chunk waiting to be sent, if kept and intact.
    pub fn sealed_chunk(&self, id: &Hash32) -> Result<Option<Vec<u8>>> {
        let r = self.db.begin_read()?;
        let Some(k) = r.open_table(SEALED_IDX)?.get(id.0)?.map(|v| v.value()) else {
            return Ok(None);
        };
        let t = r.open_table(SEALED)?;
        let v = t.get((k.0, k.1, id.0))?;
        Ok(v.map(|v| v.value().to_vec()).filter(|b| Hash32::of(b) == *id))
    }

    /// Drops a known chunk whose bytes can no longer be produced (a delta
    /// chunk whose sealed copy is gone): the next scan seals it afresh.
    pub fn forget_known(&mut self, tag: &Hash32) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(KNOWN)?.remove(tag.0)?;
        txn.commit()?;
        Ok(())
    }

    /// Records one change of an unshared path ([`Store::record_shared`]
    /// with no policy).
    pub fn record(
        &mut self,
        body: ChangeBody,
        file: Option<(FileMeta, FileChunks)>,
        new_known: &[(Hash32, KnownChunk)],
        now: u64,
    ) -> Result<Change> {
        self.record_shared(body, file, new_known, now, None)
    }

    /// Records one change in one transaction: outbox entry, file state (or
    /// its removal for a deletion), new known chunks, next seq, HLC and
    /// counters. In-memory state advances only after the commit succeeds.
    ///
    /// With `shared` (the path's class is shared), the path's stored
    /// version vector witnesses this change (own entry = its HLC), is
    /// stored back in the same transaction, and is signed into the change.
    pub fn record_shared(
        &mut self,
        body: ChangeBody,
        file: Option<(FileMeta, FileChunks)>,
        new_known: &[(Hash32, KnownChunk)],
        now: u64,
        shared: Option<ConflictPolicy>,
    ) -> Result<Change> {
        self.record_with_deltas(body, file, new_known, None, now, shared)
    }

    /// [`Store::record_shared`], with the page-delta state of a file
    /// version (`deltas`) written in the same transaction. A file version
    /// recorded without it, or a deletion, drops the path's delta bases.
    pub fn record_with_deltas(
        &mut self,
        body: ChangeBody,
        file: Option<(FileMeta, FileChunks)>,
        new_known: &[(Hash32, KnownChunk)],
        deltas: Option<&DeltaWrites>,
        now: u64,
        shared: Option<ConflictPolicy>,
    ) -> Result<Change> {
        let seq = self.meta.next_seq;
        let mut hlc = self.meta.hlc;
        let stamp = hlc.tick(now);
        let mut counters = self.counters.clone();
        let logical = match &body {
            ChangeBody::File(f) => f.size,
            _ => 0,
        };
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::None)?;
        let change;
        {
            let vv = match shared {
                Some(policy) => Some(self.witness(&txn, body.path(), stamp, policy)?),
                None => None,
            };
            change = Change::sign_shared(self.replica(), seq, stamp, body, vv, &self.key);
            let mut files = txn.open_table(FILES)?;
            let mut chunks = txn.open_table(FILE_CHUNKS)?;
            let path = change.body.path();
            let old: Option<FileMeta> = match files.get(path)? {
                Some(v) => Some(cbor_decode("file state", v.value())?),
                None => None,
            };
            if let Some(o) = &old {
                counters.files_tracked = counters.files_tracked.saturating_sub(1);
                counters.logical_bytes = counters.logical_bytes.saturating_sub(o.size);
            }
            let new_meta = match (&change.body, &file) {
                (ChangeBody::File(_), Some((m, _))) => Some(m),
                _ => None,
            };
            Self::relink_inode(&mut txn.open_table(INODES)?, old.as_ref(), new_meta, path)?;
            match (&change.body, file) {
                (ChangeBody::File(_), Some((mut meta, fc))) => {
                    meta.seq = seq;
                    meta.dirty = false;
                    counters.files_tracked += 1;
                    counters.logical_bytes += meta.size;
                    files.insert(path, protocol::to_cbor(&meta).as_slice())?;
                    chunks.insert(path, protocol::to_cbor(&fc).as_slice())?;
                }
                (ChangeBody::File(f), None) if f.is_dir() => {
                    txn.open_table(EMPTY_DIRS)?.insert(path, seq)?;
                }
                (ChangeBody::Delete(_), None) => {
                    files.remove(path)?;
                    chunks.remove(path)?;
                    txn.open_table(EMPTY_DIRS)?.remove(path)?;
                }
                _ => return Err(Error::Config("record: body and file state disagree".into())),
            }
            txn.open_table(PRUNED)?.remove(path)?;
            txn.open_table(DURABLE)?.remove(path)?;
            let mut known = txn.open_table(KNOWN)?;
            for (tag, k) in new_known {
                known.insert(tag.0, k.to_bytes().as_slice())?;
            }
            Self::write_deltas(&txn, path, deltas, (self.meta.epoch, seq))?;
            let mut outbox = txn.open_table(OUTBOX)?;
            let mut v = Vec::with_capacity(OUTBOX_HEADER + 256);
            v.extend_from_slice(&now.to_be_bytes());
            v.extend_from_slice(&logical.to_be_bytes());
            let _ = minicbor::encode(&change, &mut v);
            outbox.insert((self.meta.epoch, seq), v.as_slice())?;
            counters.outbox_bytes += logical;
            counters.changes_recorded += 1;
            let mut meta = txn.open_table(META)?;
            meta.insert("next_seq", &(seq + 1).to_be_bytes()[..])?;
            meta.insert("hlc", &hlc.0.to_be_bytes()[..])?;
            Self::put_counters(&mut meta, &counters)?;
        }
        txn.commit()?;
        self.meta.next_seq = seq + 1;
        self.meta.hlc = hlc;
        self.counters = counters;
        if !self.records_unflushed {
            self.dirty_since = (self.clock)();
            self.records_unflushed = true;
        }
        self.dirtied();
        if self.unflushed >= FLUSH_EVERY
            || (self.clock)().saturating_sub(self.dirty_since) >= FLUSH_INTERVAL.as_millis() as u64
        {
            self.flush()?;
        }
        Ok(change)
    }

    /// The `basis` and `sealed` part of a record transaction (`at`: the
    /// change's epoch and seq).
    fn write_deltas(
        txn: &redb::WriteTransaction,
        path: &str,
        deltas: Option<&DeltaWrites>,
        at: (u32, u64),
    ) -> Result<()> {
        let pk = path_key(path);
        let mut basis = txn.open_table(BASIS)?;
        let Some(d) = deltas else {
            basis.retain_in((pk, 0)..=(pk, u64::MAX), |_, _| false)?;
            return Ok(());
        };
        if d.keep_basis {
            txn.open_table(KEPT_BASIS)?.insert(path, ())?;
            return Ok(());
        }
        if d.replace {
            basis.retain_in((pk, 0)..=(pk, u64::MAX), |_, _| false)?;
        }
        if d.regroup {
            let stride = crate::chunker::PAGE_GROUP as u64;
            basis.retain_in((pk, 0)..=(pk, u64::MAX), |k, _| k.1.is_multiple_of(stride))?;
        }
        for (off, slot) in &d.basis {
            let mut slot = slot.clone();
            if let Some(c) = &mut slot.cand {
                (c.epoch, c.seq) = at;
            }
            basis.insert((pk, *off), protocol::to_cbor(&slot).as_slice())?;
        }
        basis.retain_in((pk, d.basis_end)..=(pk, u64::MAX), |_, _| false)?;
        let mut sealed = txn.open_table(SEALED)?;
        let mut idx = txn.open_table(SEALED_IDX)?;
        for (id, bytes) in &d.sealed {
            if let Some(old) = idx.insert(id.0, at)?.map(|v| v.value()) {
                if old != at {
                    sealed.remove((old.0, old.1, id.0))?;
                }
            }
            sealed.insert((at.0, at.1, id.0), bytes.as_slice())?;
        }
        // Re-key kept chunks to this change, so they live until it is sent.
        for id in &d.keep_sealed {
            let Some(old) = idx.get(id.0)?.map(|v| v.value()) else {
                continue;
            };
            if old == at {
                continue;
            }
            let bytes = sealed.remove((old.0, old.1, id.0))?.map(|v| v.value().to_vec());
            if let Some(b) = bytes {
                sealed.insert((at.0, at.1, id.0), b.as_slice())?;
                idx.insert(id.0, at)?;
            } else {
                idx.remove(id.0)?;
            }
        }
        Ok(())
    }

    /// Empty directories recorded as present under `prefix`, at most `limit`.
    pub fn empty_dirs(&self, prefix: &str, limit: usize) -> Result<Vec<String>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(EMPTY_DIRS)?;
        let mut out = Vec::new();
        for item in t.range(prefix..)? {
            let (k, _) = item?;
            let k = k.value();
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push(k.to_string());
        }
        Ok(out)
    }

    /// Updates the stat of a tracked file whose content was checked and
    /// found identical to its recorded version: no change, no seq.
    pub fn update_file_meta(&mut self, path: &str, meta: &FileMeta) -> Result<()> {
        self.update_file_metas(&[(path.to_string(), meta.clone())])
    }

    /// [`Store::update_file_meta`] for many files, in one transaction.
    pub fn update_file_metas(&mut self, metas: &[(String, FileMeta)]) -> Result<()> {
        if metas.is_empty() {
            return Ok(());
        }
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::None)?;
        {
            let mut files = txn.open_table(FILES)?;
            let mut inodes = txn.open_table(INODES)?;
            for (path, meta) in metas {
                let old = files.insert(path.as_str(), protocol::to_cbor(meta).as_slice())?;
                // An undecodable old entry is overwritten; its inode hint
                // (if any) stays, and readers check hints.
                let old: Option<FileMeta> = old.and_then(|v| minicbor::decode(v.value()).ok());
                Self::relink_inode(&mut inodes, old.as_ref(), Some(meta), path)?;
            }
        }
        txn.commit()?;
        self.dirtied();
        Ok(())
    }

    /// Moves `path`'s `inodes` entry from its `old` state's inode to its
    /// `new` one (None: the path is gone). Nothing is written while the
    /// inode stays (most records). The old entry is removed only if it
    /// still names `path` (another path may have taken it since: a rename).
    fn relink_inode(
        inodes: &mut redb::Table<(u64, u64), &str>,
        old: Option<&FileMeta>,
        new: Option<&FileMeta>,
        path: &str,
    ) -> Result<()> {
        let key = |m: &FileMeta| m.dev.map(|d| (d, m.inode));
        let (old, new) = (old.and_then(key), new.and_then(key));
        if old == new {
            return Ok(());
        }
        if let Some(k) = old {
            if inodes.get(k)?.is_some_and(|v| v.value() == path) {
                inodes.remove(k)?;
            }
        }
        if let Some(k) = new {
            inodes.insert(k, path)?;
        }
        Ok(())
    }

    /// The tracked path last recorded with this device and inode, if any
    /// (a hint: its `files` entry may since name another inode).
    pub fn inode_path(&self, dev: u64, inode: u64) -> Result<Option<String>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(INODES)?;
        let v = t.get((dev, inode))?;
        Ok(v.map(|v| v.value().to_string()))
    }

    /// Removes the delta bases of `paths` (files deleted by a scan whose
    /// bases were kept for a rename that may follow in the same scan).
    pub fn drop_basis(&mut self, paths: &[String]) -> Result<()> {
        if paths.is_empty() {
            return Ok(());
        }
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::None)?;
        {
            let mut basis = txn.open_table(BASIS)?;
            let mut kept = txn.open_table(KEPT_BASIS)?;
            for p in paths {
                let pk = path_key(p);
                basis.retain_in((pk, 0)..=(pk, u64::MAX), |_, _| false)?;
                kept.remove(p.as_str())?;
            }
        }
        txn.commit()?;
        self.dirtied();
        Ok(())
    }

    /// Drops the bases still kept for deleted paths: a scan that stopped
    /// before its root's walk ended left them. Called when a scan starts.
    pub fn drop_kept_basis(&mut self) -> Result<usize> {
        let paths: Vec<String> = {
            let r = self.db.begin_read()?;
            let t = r.open_table(KEPT_BASIS)?;
            let mut v = Vec::new();
            for item in t.iter()? {
                v.push(item?.0.value().to_string());
            }
            v
        };
        self.drop_basis(&paths)?;
        Ok(paths.len())
    }

    /// Notes a durable commit: every commit so far is durable.
    fn made_durable(&mut self) {
        self.unflushed = 0;
        self.records_unflushed = false;
    }

    /// Notes a commit made with `Durability::None`.
    fn dirtied(&mut self) {
        self.unflushed = self.unflushed.saturating_add(1);
    }

    fn put_counters(meta: &mut redb::Table<&str, &[u8]>, c: &Counters) -> Result<()> {
        let json = serde_json::to_vec(c).map_err(|e| Error::Db(e.to_string()))?;
        meta.insert("counters", json.as_slice())?;
        Ok(())
    }

    /// Marks nothing as waiting for a flush, so dropping the store does not
    /// commit (a simulated crash).
    pub fn forget_unflushed(&mut self) {
        self.unflushed = 0;
        self.records_unflushed = false;
    }

    /// Whether a scan should end with a durable commit: it recorded
    /// changes, or [`IDLE_FLUSH_EVERY`] other commits (knowledge, stat
    /// updates, disk status) wait. Those may be lost in a crash, but redb
    /// cannot reuse the pages they free until a durable commit, so they are
    /// not left to pile up on an idle gateway.
    pub fn needs_flush(&self) -> bool {
        self.records_unflushed || self.unflushed >= IDLE_FLUSH_EVERY
    }

    /// Durable commit of everything so far, including the counters.
    pub fn flush(&mut self) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            Self::put_counters(&mut meta, &self.counters)?;
        }
        txn.commit()?;
        self.made_durable();
        Ok(())
    }

    /// Recorded changes of the current replica not in `have`, in seq order,
    /// at most `max` and (beyond the first) `max_bytes` of CBOR. Flushes
    /// first: a change leaves the device only once it is durable here.
    pub fn pending(&mut self, have: &Knowledge, max: usize, max_bytes: usize) -> Result<Vec<Change>> {
        self.pending_limited(have, max, max_bytes, usize::MAX as u64)
    }

    /// [`Store::pending`], also stopping (beyond the first change) at
    /// `max_logical` bytes of file versions.
    pub fn pending_limited(
        &mut self,
        have: &Knowledge,
        max: usize,
        max_bytes: usize,
        max_logical: u64,
    ) -> Result<Vec<Change>> {
        let out = self.pending_unflushed(have, max, max_bytes, max_logical)?;
        self.mark_offered(out)
    }

    /// The outbox entries of the current epoch with these seqs, in the
    /// given order (missing ones skipped), made durable like `pending`.
    pub fn take(&mut self, seqs: &[u64]) -> Result<Vec<Change>> {
        let mut out = Vec::with_capacity(seqs.len());
        {
            let r = self.db.begin_read()?;
            let t = r.open_table(OUTBOX)?;
            for &seq in seqs {
                if let Some(v) = t.get((self.meta.epoch, seq))? {
                    let v = v.value();
                    outbox_header(v)?;
                    out.push(protocol::from_cbor(&v[OUTBOX_HEADER..], protocol::msg::MAX_MESSAGE)?);
                }
            }
        }
        self.mark_offered(out)
    }

    /// Calls `f(seq, recorded_ms, logical_bytes, change_cbor)` for every
    /// outbox entry of the current epoch not in `have`, in seq order, until
    /// it returns false.
    pub fn outbox_scan(&self, have: &Knowledge, mut f: impl FnMut(u64, u64, u64, &[u8]) -> bool) -> Result<()> {
        let set = have.get(&self.replica());
        let r = self.db.begin_read()?;
        let t = r.open_table(OUTBOX)?;
        let mut cursor = 1u64;
        'outer: loop {
            for item in t.range((self.meta.epoch, cursor)..=(self.meta.epoch, u64::MAX))? {
                let (k, v) = item?;
                let seq = k.value().1;
                if set.contains(seq) {
                    let hi = set
                        .ranges()
                        .iter()
                        .find(|(lo, hi)| *lo <= seq && seq <= *hi)
                        .map_or(seq, |r| r.1);
                    if hi == u64::MAX {
                        break 'outer;
                    }
                    cursor = hi + 1;
                    continue 'outer;
                }
                let v = v.value();
                let (recorded, logical) = outbox_header(v)?;
                if !f(seq, recorded, logical, &v[OUTBOX_HEADER..]) {
                    break 'outer;
                }
            }
            break;
        }
        Ok(())
    }

    fn mark_offered(&mut self, out: Vec<Change>) -> Result<Vec<Change>> {
        // Durable before anything leaves: every record so far and the
        // high-water mark of what left (the rollback check relies on it).
        let top = out.iter().map(|c| c.seq).max().unwrap_or(0);
        if self.records_unflushed || top > self.meta.offered {
            let offered = top.max(self.meta.offered);
            let txn = self.db.begin_write()?;
            {
                let mut meta = txn.open_table(META)?;
                Self::put_counters(&mut meta, &self.counters)?;
                meta.insert("offered", &offered.to_be_bytes()[..])?;
            }
            txn.commit()?;
            self.meta.offered = offered;
            self.made_durable();
        }
        Ok(out)
    }

    /// Highest seq of the current epoch that ever left the device.
    pub fn offered(&self) -> u64 {
        self.meta.offered
    }

    fn pending_unflushed(
        &mut self,
        have: &Knowledge,
        max: usize,
        max_bytes: usize,
        max_logical: u64,
    ) -> Result<Vec<Change>> {
        let (mut out, mut bytes, mut logical) = (Vec::new(), 0usize, 0u64);
        let mut bad = None;
        self.outbox_scan(have, |_, _, lb, body| {
            if !out.is_empty() && (bytes + body.len() > max_bytes || logical.saturating_add(lb) > max_logical) {
                return false;
            }
            match protocol::from_cbor::<Change>(body, protocol::msg::MAX_MESSAGE) {
                Ok(c) => {
                    logical = logical.saturating_add(lb);
                    bytes += body.len();
                    out.push(c);
                    out.len() < max
                }
                Err(e) => {
                    bad = Some(e);
                    false
                }
            }
        })?;
        match bad {
            Some(e) => Err(e.into()),
            None => Ok(out),
        }
    }

    /// Rewrites the outbox entry of `change` as a signed `Superseded` with
    /// the same seq, and marks the file so the next scan records it again.
    pub fn supersede(&mut self, change: &Change, now: u64) -> Result<()> {
        if change.replica != self.replica() {
            return Ok(());
        }
        let path = change.body.path().to_string();
        let mut hlc = self.meta.hlc;
        let stamp = hlc.tick(now);
        let mut counters = self.counters.clone();
        // Durable: the Superseded entry replaces a seq that already left.
        let txn = self.db.begin_write()?;
        {
            let mut outbox = txn.open_table(OUTBOX)?;
            let key = (self.meta.epoch, change.seq);
            let old = match outbox.get(key)? {
                Some(v) => {
                    let v = v.value();
                    let (recorded, logical) = outbox_header(v)?;
                    let c: Change = protocol::from_cbor(&v[OUTBOX_HEADER..], protocol::msg::MAX_MESSAGE)?;
                    Some((recorded, logical, matches!(c.body, ChangeBody::Superseded(_))))
                }
                None => None,
            };
            let Some((recorded, logical, already)) = old else {
                return Ok(()); // already pruned: the cloud has it
            };
            if already {
                // Idempotent: a second, differently signed Superseded under
                // the same seq would look like a conflict to the server.
                return Ok(());
            }
            // A superseded change of a shared path carries a vector too
            // (witnessing its own HLC, like every change of the path).
            let vv = match &change.shared {
                Some(s) => Some(self.witness(&txn, &path, stamp, s.policy)?),
                None => None,
            };
            let sup = Change::sign_shared(
                self.replica(),
                change.seq,
                stamp,
                ChangeBody::Superseded(path.clone()),
                vv,
                &self.key,
            );
            let mut v = Vec::with_capacity(OUTBOX_HEADER + 128);
            v.extend_from_slice(&recorded.to_be_bytes());
            v.extend_from_slice(&0u64.to_be_bytes());
            let _ = minicbor::encode(&sup, &mut v);
            outbox.insert(key, v.as_slice())?;
            counters.outbox_bytes = counters.outbox_bytes.saturating_sub(logical);
            counters.superseded += 1;
            // The superseded version's pages never reach the cloud, though
            // its seq will be acknowledged: none may serve as a delta base.
            let pk = path_key(&path);
            txn.open_table(BASIS)?
                .retain_in((pk, 0)..=(pk, u64::MAX), |_, _| false)?;
            let mut files = txn.open_table(FILES)?;
            let meta: Option<FileMeta> = match files.get(path.as_str())? {
                Some(v) => Some(cbor_decode("file state", v.value())?),
                None => None,
            };
            if let Some(mut m) = meta.filter(|m| m.seq == change.seq) {
                m.dirty = true;
                files.insert(path.as_str(), protocol::to_cbor(&m).as_slice())?;
            }
            let mut meta = txn.open_table(META)?;
            meta.insert("hlc", &hlc.0.to_be_bytes()[..])?;
            Self::put_counters(&mut meta, &counters)?;
        }
        txn.commit()?;
        self.meta.hlc = hlc;
        self.counters = counters;
        self.rescan = true;
        self.made_durable();
        Ok(())
    }

    /// Persists the server's knowledge of this device, prunes outbox entries
    /// the cloud holds, and starts a new epoch if the server knows seqs of
    /// this replica that this state file never handed out (restored from an
    /// old copy). Returns true when a new epoch was started.
    /// `now` (Unix ms) stamps the deletions a new epoch records again.
    pub fn on_knowledge(&mut self, regional: &Knowledge, cloud: &Knowledge, now: u64) -> Result<bool> {
        let regional = regional.for_device(&self.device);
        let cloud = cloud.for_device(&self.device);
        let me = self.replica();
        // Seqs above `offered` never left this state file. (Comparing with
        // next_seq instead misses a rolled-back state that recorded new
        // changes before it reconnected: their seqs collide with the ones
        // the lost lineage sent, and the server's copies would be taken
        // for ours — those changes would never be sent.)
        let ahead = [&regional, &cloud]
            .iter()
            .filter_map(|k| k.get(&me).max())
            .max()
            .filter(|m| *m > self.meta.offered);
        if let Some(max) = ahead {
            self.counters.state_rollbacks += 1;
            tracing::error!(
                replica = %me,
                server_max_seq = max,
                offered = self.meta.offered,
                next_seq = self.meta.next_seq,
                "the server holds seqs this state file never recorded: the state was restored \
                 from an old copy or lost. Starting a new epoch; every file is offered again \
                 (known chunks make that cheap)"
            );
            self.new_epoch(now)?;
            return Ok(true);
        }
        if regional == self.regional && cloud == self.cloud {
            return Ok(false);
        }
        let mut counters = self.counters.clone();
        // Not durable: a crash that loses this only makes the agent offer
        // again what the server holds (it answers Applied), and bases stay
        // at versions the cloud already held. Saves a durable commit, an
        // fsync on a gateway, per acknowledgement.
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::None)?;
        {
            let mut outbox = txn.open_table(OUTBOX)?;
            let epoch = self.meta.epoch;
            let mut freed = 0u64;
            let mut made_durable: Vec<(String, u64)> = Vec::new();
            for &(lo, hi) in cloud.get(&me).ranges() {
                outbox.retain_in((epoch, lo)..=(epoch, hi), |k, v| {
                    let logical = outbox_header(v).map_or(0, |h| h.1);
                    freed += logical;
                    if logical > 0 {
                        if let Some(p) = v.get(OUTBOX_HEADER..).and_then(change_path) {
                            made_durable.push((p, k.1));
                        }
                    }
                    false
                })?;
            }
            // Delta chunks of changes that left the outbox are in the cloud.
            let first = outbox.first()?.map(|(k, _)| k.value());
            drop(outbox);
            Self::drop_sealed_before(&txn, first)?;
            if first.is_none() {
                // Nothing recorded by an older agent can be sent any more.
                txn.open_table(KNOWN_V1)?.retain(|_, _| false)?;
            }
            let files = txn.open_table(FILES)?;
            let mut durable = txn.open_table(DURABLE)?;
            for (p, seq) in made_durable {
                let current = match files.get(p.as_str())? {
                    Some(v) => cbor_decode::<FileMeta>("file state", v.value())?.seq == seq,
                    None => false,
                };
                if current {
                    let mut b = [0u8; 16];
                    b[..8].copy_from_slice(&seq.to_be_bytes());
                    b[8..].copy_from_slice(&now.to_be_bytes());
                    durable.insert(p.as_str(), &b[..])?;
                }
            }
            counters.outbox_bytes = counters.outbox_bytes.saturating_sub(freed);
            let mut meta = txn.open_table(META)?;
            meta.insert("regional", protocol::to_cbor(&regional).as_slice())?;
            meta.insert("cloud", protocol::to_cbor(&cloud).as_slice())?;
            Self::put_counters(&mut meta, &counters)?;
        }
        txn.commit()?;
        self.regional = regional;
        self.cloud = cloud;
        self.counters = counters;
        self.dirtied();
        Ok(false)
    }

    /// Removes the sealed delta chunks keyed before `first` (the oldest
    /// outbox entry; None: the outbox is empty, remove all).
    fn drop_sealed_before(txn: &redb::WriteTransaction, first: Option<(u32, u64)>) -> Result<()> {
        let mut sealed = txn.open_table(SEALED)?;
        let mut idx = txn.open_table(SEALED_IDX)?;
        let Some((e, s)) = first else {
            sealed.retain(|_, _| false)?;
            idx.retain(|_, _| false)?;
            return Ok(());
        };
        let mut gone: Vec<((u32, u64), [u8; 32])> = Vec::new();
        sealed.retain_in(..(e, s, [0u8; 32]), |k, _| {
            gone.push(((k.0, k.1), k.2));
            false
        })?;
        for (at, id) in gone {
            if idx.get(id)?.is_some_and(|v| v.value() == at) {
                idx.remove(id)?;
            }
        }
        Ok(())
    }

    /// New replica: drop the outbox (its seqs belong to a history the
    /// server no longer agrees with) and re-record every file. File states
    /// are kept but marked dirty, so the next scan records every file still
    /// on disk again, in full, and a deletion for every tracked file that is
    /// gone (without them, the old epoch's versions of files deleted since
    /// would come back in a restore). Known chunks stay: they are a local
    /// seal cache, valid for any epoch, so re-offering costs no chunk bytes
    /// the server already has.
    ///
    /// Deletions still in the outbox are recorded again in the new epoch:
    /// their files have no state left to notice they are gone.
    pub fn new_epoch(&mut self, now: u64) -> Result<()> {
        let epoch = random_epoch(self.entropy.as_ref())?;
        let mut counters = self.counters.clone();
        counters.epochs_started += 1;
        counters.outbox_bytes = 0;
        let mut deleted: Vec<(String, Option<ConflictPolicy>)> = Vec::new();
        let txn = self.db.begin_write()?;
        {
            let mut outbox = txn.open_table(OUTBOX)?;
            for item in outbox.iter()? {
                let (_, v) = item?;
                let v = v.value();
                outbox_header(v)?;
                let c: Change = protocol::from_cbor(&v[OUTBOX_HEADER..], protocol::msg::MAX_MESSAGE)?;
                if let ChangeBody::Delete(p) = c.body {
                    deleted.push((p, c.shared.map(|s| s.policy)));
                }
            }
            outbox.retain(|_, _| false)?;
            drop(outbox);
            let mut files = txn.open_table(FILES)?;
            deleted.retain(|(p, _)| files.get(p.as_str()).ok().flatten().is_none());
            let mut dirty = Vec::new();
            for item in files.iter()? {
                let (k, v) = item?;
                let mut m: FileMeta = cbor_decode("file state", v.value())?;
                m.dirty = true;
                m.seq = 0;
                dirty.push((k.value().to_string(), m));
            }
            for (k, m) in dirty {
                files.insert(k.as_str(), protocol::to_cbor(&m).as_slice())?;
            }
            // Empty directories are offered again by the next scan.
            txn.open_table(EMPTY_DIRS)?.retain(|_, _| false)?;
            // Delta bases and kept delta bytes belong to the old history: a
            // base "acknowledged" there may never have been sent by this
            // lineage, and the new epoch's seqs do not order after it.
            txn.open_table(BASIS)?.retain(|_, _| false)?;
            txn.open_table(SEALED)?.retain(|_, _| false)?;
            txn.open_table(SEALED_IDX)?.retain(|_, _| false)?;
            let mut meta = txn.open_table(META)?;
            meta.insert("epoch", &epoch.to_be_bytes()[..])?;
            meta.insert("next_seq", &1u64.to_be_bytes()[..])?;
            meta.insert("offered", &0u64.to_be_bytes()[..])?;
            Self::put_counters(&mut meta, &counters)?;
        }
        txn.commit()?;
        tracing::warn!(old = self.meta.epoch, new = epoch, "started a new epoch");
        self.meta.epoch = epoch;
        self.meta.next_seq = 1;
        self.meta.offered = 0;
        self.counters = counters;
        self.rescan = true;
        self.made_durable();
        deleted.sort();
        deleted.dedup_by(|a, b| a.0 == b.0);
        for (p, shared) in deleted {
            self.record_shared(ChangeBody::Delete(p), None, &[], now, shared)?;
        }
        Ok(())
    }

    /// Bytes of chunk data sent today (budget day `day`) for `class`.
    pub fn budget_spent(&self, class: &str, day: u64) -> Result<u64> {
        let r = self.db.begin_read()?;
        let t = r.open_table(BUDGET)?;
        Ok(match t.get(class)? {
            Some(v) if v.value().len() == 16 && u64_of("budget day", &v.value()[..8])? == day => {
                u64_of("budget spent", &v.value()[8..])?
            }
            _ => 0,
        })
    }

    /// Adds `bytes` to the class's spend of budget day `day` (a new day
    /// starts from zero) and returns the total. Durable at once: a restart
    /// must not hand a metered link a fresh budget.
    pub fn budget_add(&mut self, class: &str, day: u64, bytes: u64) -> Result<u64> {
        let spent = self.budget_spent(class, day)?.saturating_add(bytes);
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(BUDGET)?;
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&day.to_be_bytes());
            b[8..].copy_from_slice(&spent.to_be_bytes());
            t.insert(class, &b[..])?;
        }
        txn.commit()?;
        self.made_durable();
        Ok(spent)
    }

    /// Unix ms since which version `seq` of `path` is cloud-durable, if recorded.
    pub fn durable_since(&self, path: &str, seq: u64) -> Result<Option<u64>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(DURABLE)?;
        Ok(match t.get(path)? {
            Some(v) if v.value().len() == 16 && u64_of("durable seq", &v.value()[..8])? == seq => {
                Some(u64_of("durable ms", &v.value()[8..])?)
            }
            _ => None,
        })
    }

    /// Is the tracked version of a file cloud-durable (this epoch)?
    pub fn is_cloud_durable(&self, meta: &FileMeta) -> bool {
        !meta.dirty && meta.seq > 0 && self.cloud.get(&self.replica()).contains(meta.seq)
    }

    /// Forgets a file the disk watermarks are about to delete: it leaves
    /// `files` (so no scan records a deletion) and is listed in `pruned`.
    /// Durable before the caller deletes the file: a crash in between
    /// leaves an untracked file that the next scan records again, never a
    /// deletion in the cloud.
    pub fn prune_file(&mut self, path: &str, meta: &FileMeta, forced: bool, now: u64) -> Result<()> {
        let mut counters = self.counters.clone();
        let txn = self.db.begin_write()?;
        {
            let mut files = txn.open_table(FILES)?;
            let Some(old) = files.remove(path)?.map(|v| v.value().to_vec()) else {
                return Ok(());
            };
            if let Ok(o) = cbor_decode::<FileMeta>("file state", &old) {
                Self::relink_inode(&mut txn.open_table(INODES)?, Some(&o), None, path)?;
            }
            txn.open_table(FILE_CHUNKS)?.remove(path)?;
            txn.open_table(DURABLE)?.remove(path)?;
            let rec = PrunedFile {
                size: meta.size,
                mtime_ns: meta.mtime_ns,
                epoch: self.meta.epoch,
                seq: meta.seq,
                pruned_ms: now,
                forced,
            };
            txn.open_table(PRUNED)?
                .insert(path, protocol::to_cbor(&rec).as_slice())?;
            counters.files_tracked = counters.files_tracked.saturating_sub(1);
            counters.logical_bytes = counters.logical_bytes.saturating_sub(meta.size);
            counters.pruned_files += 1;
            counters.pruned_bytes += meta.size;
            if forced {
                counters.pruned_forced += 1;
            }
            let mut m = txn.open_table(META)?;
            Self::put_counters(&mut m, &counters)?;
        }
        txn.commit()?;
        self.counters = counters;
        self.made_durable();
        Ok(())
    }

    /// The record of a pruned file, if `path` was pruned and not recorded since.
    pub fn pruned(&self, path: &str) -> Result<Option<PrunedFile>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(PRUNED)?;
        let v = t.get(path)?;
        v.map(|v| cbor_decode("pruned file", v.value())).transpose()
    }

    /// Saves the last disk check for `status` (made durable by the next flush).
    pub fn set_disk_status(&mut self, d: &DiskStatus) -> Result<()> {
        let json = serde_json::to_vec(d).map_err(|e| Error::Db(e.to_string()))?;
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::None)?;
        txn.open_table(META)?.insert("disk", json.as_slice())?;
        txn.commit()?;
        self.dirtied();
        Ok(())
    }

    /// Number of outbox entries of the current epoch not in `have`.
    pub fn count_not_in(&self, have: &Knowledge) -> Result<u64> {
        let set = have.get(&self.replica());
        let r = self.db.begin_read()?;
        let t = r.open_table(OUTBOX)?;
        let mut n = 0;
        for item in t.range((self.meta.epoch, 0)..=(self.meta.epoch, u64::MAX))? {
            let (k, _) = item?;
            if !set.contains(k.value().1) {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Within `txn`: the stored vector of shared `path` witnesses this
    /// device's change at `stamp` and is stored back; returns what the
    /// change carries.
    fn witness(&self, txn: &redb::WriteTransaction, path: &str, stamp: Hlc, policy: ConflictPolicy) -> Result<Shared> {
        let mut t = txn.open_table(SHARED_VV)?;
        let mut sh: Shared = match t.get(path)? {
            Some(v) => cbor_decode("shared path vector", v.value())?,
            None => Shared::default(),
        };
        sh.vv.witness(self.device.device.as_str(), stamp);
        sh.policy = policy;
        t.insert(path, protocol::to_cbor(&sh).as_slice())?;
        Ok(sh)
    }

    /// The stored vector (and last policy) of a shared path.
    pub fn shared_state(&self, path: &str) -> Result<Option<Shared>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(SHARED_VV)?;
        let v = t.get(path)?;
        v.map(|v| cbor_decode("shared path vector", v.value())).transpose()
    }

    /// Every server change at or below this gseq has been applied.
    pub fn server_cursor(&self) -> u64 {
        self.server_cursor
    }

    /// Merges server changes in one transaction: none when nothing is new
    /// (the usual push), not fsynced when only the cursor or the clock
    /// moved, durable when a state or a shared-path vector changed. Each
    /// goes into the
    /// state of its target (CRDT join, so duplicates and any order end in
    /// the same state; the higher gseq is kept), a `SharedHead`'s vector
    /// also into the path's own vector (so the next local version
    /// dominates what the cloud has seen; its HLCs are observed by this
    /// device's clock), and, when `upto` is Some and nothing was refused,
    /// the cursor to `max(cursor, upto)`.
    ///
    /// Invalid items are skipped. New targets beyond [`MAX_SERVER_TARGETS`]
    /// are refused with an error logged: the cursor then stays (the server
    /// sends them again) and pruning stops, since a refused change may be a
    /// legal hold. Returns the number of items merged.
    pub fn on_server_changes(&mut self, items: &[ServerChange], upto: Option<u64>, now: u64) -> Result<usize> {
        if items.is_empty() && upto.is_none_or(|u| u <= self.server_cursor) {
            return Ok(0);
        }
        let mut hlc = self.meta.hlc;
        let mut cursor = self.server_cursor;
        let (mut merged, mut refused, mut overflow) = (0usize, 0usize, false);
        // States and shared-path vectors that differ from what was stored
        // (new, grown, newer gseq, another policy).
        let mut changed = 0usize;
        let mut txn = self.db.begin_write()?;
        {
            let mut states = txn.open_table(SERVER_STATE)?;
            let mut vvs = txn.open_table(SHARED_VV)?;
            let mut targets = states.len()?;
            for it in items {
                if let Err(e) = it.body.validate() {
                    tracing::warn!(gseq = it.gseq, "server change refused: {e}");
                    refused += 1;
                    continue;
                }
                let target = it.body.target();
                let old = match states.get(target.as_str())? {
                    Some(v) => Some(decode_server_state(v.value())?),
                    None => None,
                };
                let (gseq, body, item_changed) = match old {
                    Some((gseq, old_body)) => {
                        let mut body = old_body.clone();
                        body.merge(&it.body);
                        // Not part of the join: the policy of the newest state.
                        if let (ServerBody::SharedHead { policy, .. }, ServerBody::SharedHead { policy: p, .. }) =
                            (&mut body, &it.body)
                        {
                            if it.gseq > gseq {
                                *policy = *p;
                            }
                        }
                        let new_gseq = gseq.max(it.gseq);
                        let item_changed = new_gseq != gseq || body != old_body;
                        (new_gseq, body, item_changed)
                    }
                    None if targets >= MAX_SERVER_TARGETS => {
                        tracing::error!(
                            gseq = it.gseq,
                            target = %target.chars().take(200).collect::<String>(),
                            limit = MAX_SERVER_TARGETS,
                            "too many central metadata / shared-path targets; refusing new ones \
                             (pruning is suspended: a refused change may be a legal hold)"
                        );
                        refused += 1;
                        overflow = true;
                        continue;
                    }
                    None => {
                        targets += 1;
                        (it.gseq, it.body.clone(), true)
                    }
                };
                // Unchanged states are not written again: a push or refresh
                // that brings nothing new writes nothing at all (below).
                if item_changed {
                    changed += 1;
                    let mut v = Vec::with_capacity(64);
                    v.extend_from_slice(&gseq.to_be_bytes());
                    let _ = minicbor::encode(&body, &mut v);
                    states.insert(target.as_str(), v.as_slice())?;
                }
                if let (ServerBody::SharedHead { path, vv, .. }, ServerBody::SharedHead { policy, .. }) =
                    (&it.body, &body)
                {
                    let old: Shared = match vvs.get(path.as_str())? {
                        Some(v) => cbor_decode("shared path vector", v.value())?,
                        None => Shared::default(),
                    };
                    let mut sh = old.clone();
                    sh.vv.merge(vv);
                    // The cloud's current policy, until a local change says.
                    sh.policy = *policy;
                    if sh != old {
                        changed += 1;
                        vvs.insert(path.as_str(), protocol::to_cbor(&sh).as_slice())?;
                    }
                    // Observed by this device's clock (the own entry too, e.g.
                    // after a restored state file): the next local change gets
                    // a higher HLC than every version it dominates.
                    let horizon = now.saturating_add(MAX_OBSERVE_AHEAD_MS);
                    for (d, t) in &vv.0 {
                        if Hlc(*t).millis() <= horizon {
                            hlc.observe(Hlc(*t));
                        } else {
                            tracing::warn!(path = %path, device = %d, hlc = t, "shared-path vector entry far in the future; not observed by the clock");
                        }
                    }
                }
                merged += 1;
            }
            if let Some(u) = upto.filter(|_| refused == 0) {
                cursor = cursor.max(u);
            }
            if cursor == self.server_cursor && hlc.0 == self.meta.hlc.0 && changed == 0 && !overflow {
                // Items it already had (most pushes, sent to every device
                // an aggregator knows): nothing to write.
                drop((states, vvs));
                txn.abort()?;
                return Ok(merged);
            }
            let mut meta = txn.open_table(META)?;
            if cursor != self.server_cursor {
                meta.insert("server_cursor", &cursor.to_be_bytes()[..])?;
            }
            if overflow {
                meta.insert("server_overflow", &[1u8][..])?;
            }
            if hlc.0 != self.meta.hlc.0 {
                meta.insert("hlc", &hlc.0.to_be_bytes()[..])?;
            }
        }
        // Nothing changed but the cursor or the clock (the hourly refresh
        // of an up-to-date device): no fsync. A crash that loses it only
        // makes the next Hello ask for the same items again, which merge
        // as no-ops. A state that changed (a hold, a shared head) is
        // durable before this returns.
        let durable = changed > 0 || overflow;
        if !durable {
            txn.set_durability(Durability::None)?;
        }
        txn.commit()?;
        if durable {
            self.made_durable();
        } else {
            self.dirtied();
        }
        self.server_cursor = cursor;
        self.meta.hlc = hlc;
        Ok(merged)
    }

    /// Every server state: (target, gseq, merged body), in target order.
    pub fn server_states(&self) -> Result<Vec<(String, u64, ServerBody)>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(SERVER_STATE)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            let (g, b) = decode_server_state(v.value())?;
            out.push((k.value().to_string(), g, b));
        }
        Ok(out)
    }

    /// The legal holds in force (for pruning).
    pub fn holds(&self) -> Result<Holds> {
        let r = self.db.begin_read()?;
        holds_of(&r)
    }

    pub fn status(&self) -> Result<Status> {
        status_of(&self.db, (self.clock)())
    }

    /// Status of a state file without taking it over: `Error::Locked` if a
    /// running agent holds it.
    pub fn read_status(path: &Path) -> Result<Status> {
        if !path.exists() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such state file"),
            ));
        }
        match redb::Builder::new().set_cache_size(CACHE_BYTES).open_read_only(path) {
            Ok(db) => status_of(&db, now_ms()),
            // Left by a crashed agent: a read-only open cannot repair it. No
            // agent holds it (that would be DatabaseAlreadyOpen), so repair it
            // the way the agent's next start would, then read.
            Err(redb::DatabaseError::RepairAborted) => {
                tracing::info!(state = %path.display(), "state file needs repair after a crash; repairing");
                let db = redb::Builder::new()
                    .set_cache_size(CACHE_BYTES)
                    .open(path)
                    .map_err(|e| open_db_error(path, e))?;
                status_of(&db, now_ms())
            }
            Err(e) => Err(open_db_error(path, e)),
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if self.unflushed > 0 {
            if let Err(e) = self.flush() {
                tracing::warn!("final flush of {} failed: {e}", self.path.display());
            }
        }
    }
}

/// gseq (u64 BE) + CBOR `ServerBody`.
fn decode_server_state(v: &[u8]) -> Result<(u64, ServerBody)> {
    let g = v.get(..8).ok_or_else(|| corrupt("server state", "short"))?;
    let body = protocol::from_cbor(&v[8..], protocol::msg::MAX_MESSAGE).map_err(|e| corrupt("server state", e))?;
    Ok((u64_of("server state gseq", g)?, body))
}

/// A table of a state file written before that table existed reads as empty.
fn open_opt<K: redb::Key + 'static, V: redb::Value + 'static>(
    r: &redb::ReadTransaction,
    def: TableDefinition<K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>> {
    match r.open_table(def) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Calls `f(target_path, state, gseq)` for every `Meta` state.
fn each_meta(r: &redb::ReadTransaction, mut f: impl FnMut(&str, &MetaState, u64) -> bool) -> Result<()> {
    let Some(t) = open_opt(r, SERVER_STATE)? else {
        return Ok(());
    };
    for item in t.range("meta:".."meta;")? {
        let (_, v) = item?;
        if let (g, ServerBody::Meta { path, state }) = decode_server_state(v.value())? {
            if !f(&path, &state, g) {
                break;
            }
        }
    }
    Ok(())
}

fn overflowed(r: &redb::ReadTransaction) -> Result<bool> {
    Ok(r.open_table(META)?.get("server_overflow")?.is_some())
}

fn holds_of(r: &redb::ReadTransaction) -> Result<Holds> {
    let mut held: Vec<String> = Vec::new();
    each_meta(r, |p, s, _| {
        if s.held() {
            held.push(p.to_string());
        }
        true
    })?;
    Ok(Holds::build(held.iter().map(String::as_str), overflowed(r)?))
}

/// Central metadata, shared paths and held files for `status`.
fn central_status(r: &redb::ReadTransaction) -> Result<(Vec<MetaEntry>, Vec<SharedEntry>, HeldFiles)> {
    let mut metadata = Vec::new();
    each_meta(r, |path, s, gseq| {
        metadata.push(MetaEntry {
            path: path.to_string(),
            tags: s.tags.values(),
            retain_days: s.retain_days,
            held: s.held(),
            holds: s.holds.values(),
            gseq,
        });
        metadata.len() < STATUS_LIST_MAX
    })?;
    let mut shared = Vec::new();
    if let Some(t) = open_opt(r, SHARED_VV)? {
        let states = open_opt(r, SERVER_STATE)?;
        for item in t.iter()? {
            if shared.len() >= STATUS_LIST_MAX {
                break;
            }
            let (k, v) = item?;
            let path = k.value();
            let local: Shared = cbor_decode("shared path vector", v.value())?;
            let head = match &states {
                Some(st) => match st.get(format!("shared:{path}").as_str())? {
                    Some(v) => Some(decode_server_state(v.value())?.1),
                    None => None,
                },
                None => None,
            };
            let (policy, conflicts) = match head {
                Some(ServerBody::SharedHead { policy, conflicts, .. }) => (policy, conflicts),
                _ => (local.policy, 0),
            };
            shared.push(SharedEntry {
                path: path.to_string(),
                policy: policy.as_str().to_string(),
                vv: local.vv.0,
                conflicts,
            });
        }
    }
    let holds = holds_of(r)?;
    let mut held = HeldFiles {
        all: holds.all,
        ..HeldFiles::default()
    };
    if !holds.is_empty() {
        // Only while holds exist (rarely): one pass over the tracked files.
        let files = r.open_table(FILES)?;
        for item in files.iter()? {
            let (k, v) = item?;
            if holds.held(k.value()) {
                let m: FileMeta = cbor_decode("file state", v.value())?;
                held.files += 1;
                held.bytes += m.size;
                if held.paths.len() < STATUS_HELD_PATHS {
                    held.paths.push(k.value().to_string());
                }
            }
        }
    }
    Ok((metadata, shared, held))
}

fn status_of(db: &impl ReadableDatabase, now: u64) -> Result<Status> {
    let r = db.begin_read()?;
    let meta = r.open_table(META)?;
    let get = |k: &'static str| -> Result<Vec<u8>> {
        meta.get(k)?
            .map(|v| v.value().to_vec())
            .ok_or_else(|| corrupt("meta", format!("missing {k}")))
    };
    let device = String::from_utf8_lossy(&get("device")?).into_owned();
    let epoch = u32::from_be_bytes(get("epoch")?.try_into().map_err(|_| corrupt("meta", "epoch"))?);
    let next_seq = u64_of("next_seq", &get("next_seq")?)?;
    let counters: Counters = serde_json::from_slice(&get("counters")?).map_err(|e| corrupt("counters", e))?;
    let know = |k: &str| -> Result<Knowledge> {
        match meta.get(k)? {
            Some(v) => cbor_decode("knowledge", v.value()),
            None => Ok(Knowledge::default()),
        }
    };
    let (regional, cloud) = (know("regional")?, know("cloud")?);
    let outbox = r.open_table(OUTBOX)?;
    let oldest = match outbox.first()? {
        Some((k, v)) => Some((k.value().1, outbox_header(v.value())?.0)),
        None => None,
    };
    let durable = |k: &Knowledge| {
        k.map
            .iter()
            .filter(|(r, _)| r.epoch == epoch)
            .map(|(_, s)| s.len())
            .sum::<u64>()
    };
    let server_cursor = match meta.get("server_cursor")? {
        Some(v) => u64_of("server cursor", v.value())?,
        None => 0,
    };
    let server_overflow = overflowed(&r)?;
    let (metadata, shared, held) = central_status(&r)?;
    let mut both = regional.clone();
    both.union_with(&cloud);
    let disk = match meta.get("disk")? {
        Some(v) => serde_json::from_slice::<DiskStatus>(v.value()).ok().map(|mut d| {
            d.pruned_files = counters.pruned_files;
            d.pruned_bytes = counters.pruned_bytes;
            d.pruned_forced = counters.pruned_forced;
            d
        }),
        None => None,
    };
    Ok(Status {
        device,
        epoch,
        next_seq,
        files_tracked: counters.files_tracked,
        changes_recorded: counters.changes_recorded,
        logical_bytes: counters.logical_bytes,
        wire_bytes_sent: counters.wire_bytes_sent,
        messages_sent: counters.messages_sent,
        chunks_sent: counters.chunks_sent,
        chunk_bytes_sent: counters.chunk_bytes_sent,
        chunks_new: counters.chunks_new,
        chunks_skipped_known: counters.chunks_skipped_known,
        chunks_extension: counters.chunks_extension,
        chunks_delta: counters.chunks_delta,
        bytes_read: counters.bytes_read,
        bytes_chunked: counters.bytes_chunked,
        bad_messages: counters.bad_messages,
        pending_changes: outbox.len()?,
        pending_bytes: counters.outbox_bytes,
        oldest_pending_age_secs: oldest.map(|(_, t)| now.saturating_sub(t) / 1000),
        oldest_pending_seq: oldest.map(|(seq, _)| seq),
        oldest_pending_recorded_ms: oldest.map(|(_, t)| t),
        regional_durable: durable(&both),
        cloud_durable: durable(&cloud),
        regional: summarize(&regional),
        cloud: summarize(&cloud),
        counters,
        as_of_ms: now,
        from_snapshot: false,
        disk,
        server_cursor,
        metadata,
        shared,
        held,
        server_overflow,
    })
}

/// The path of a CBOR `Change` without decoding its chunk list:
/// `[replica, seq, hlc, [variant, [path | [path, …]]], …]`.
pub fn change_path(cbor: &[u8]) -> Option<String> {
    let mut d = minicbor::Decoder::new(cbor);
    d.array().ok()?;
    d.skip().ok()?; // replica
    d.skip().ok()?; // seq
    d.skip().ok()?; // hlc
    d.array().ok()?;
    let variant = d.u32().ok()?;
    d.array().ok()?;
    if variant == 0 {
        d.array().ok()?; // FileVersion
    }
    d.str().ok().map(str::to_string)
}

/// Known-chunk lookups within one read transaction.
pub struct KnownReader {
    table: redb::ReadOnlyTable<[u8; 32], &'static [u8]>,
}

impl KnownReader {
    pub fn get(&self, tag: &Hash32) -> Result<Option<KnownChunk>> {
        Ok(self.table.get(tag.0)?.and_then(|v| KnownChunk::from_bytes(v.value())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::manifest::{ChunkRef, FileVersion};

    fn dev() -> DeviceRef {
        DeviceRef::new("acme", "plant1", "gw1").unwrap()
    }

    fn file(path: &str, size: u64) -> (ChangeBody, Option<(FileMeta, FileChunks)>) {
        let id = Hash32([size as u8; 32]);
        let body = ChangeBody::File(FileVersion {
            path: path.into(),
            size,
            mtime_ns: 1,
            class: "default".into(),
            chunks: vec![ChunkRef { id, len: size as u32 }],
            sha256: id,
            mode: 0o644,
        });
        let meta = FileMeta {
            size,
            mtime_ns: 1,
            inode: 1,
            mode: 0o644,
            seq: 0,
            dirty: false,
            racy: false,
            dev: None,
            btime_ns: None,
        };
        let fc = FileChunks {
            chunks: vec![StoredChunk {
                id,
                len: size as u32,
                tag: id,
            }],
            sha_before_last: Vec::new(),
            class: "default".into(),
            cuts: None,
        };
        (body, Some((meta, fc)))
    }

    #[test]
    fn known_chunks_of_another_tag_function_are_kept_apart_until_sent() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("s.redb");
        let k = |n: u8| {
            (
                Hash32([n; 32]),
                KnownChunk {
                    id: Hash32([n + 100; 32]),
                    level: 3,
                    cipher: 1,
                    base: None,
                },
            )
        };
        let count = |s: &Store| s.db.begin_read().unwrap().open_table(KNOWN).unwrap().len().unwrap();
        {
            let mut s = Store::open(&path, &dev()).unwrap();
            let (body, f) = file("a", 10);
            s.record(body, f, &[k(1), k(2)], now_ms()).unwrap();
            s.flush().unwrap();
        }
        // Reopened by the same version: kept.
        let s = Store::open(&path, &dev()).unwrap();
        assert_eq!(count(&s), 2);
        // As an older agent left it: no tag function recorded.
        let w = s.db.begin_write().unwrap();
        w.open_table(META).unwrap().remove("index_tag").unwrap();
        w.commit().unwrap();
        drop(s);
        let mut s = Store::open(&path, &dev()).unwrap();
        assert_eq!(count(&s), 0, "HMAC-tagged entries can never be hit by a scan");
        let r = s.db.begin_read().unwrap();
        let label = r
            .open_table(META)
            .unwrap()
            .get("index_tag")
            .unwrap()
            .map(|v| v.value().to_vec());
        assert_eq!(label.as_deref(), Some(protocol::seal::INDEX_TAG_LABEL.as_bytes()));
        drop(r);
        // Kept apart while the change recorded with them waits to be sent.
        assert!(s.has_legacy_known().unwrap());
        assert_eq!(s.legacy_known(&k(2).0).unwrap(), Some(k(2).1));
        assert_eq!(all(&mut s).len(), 1);
        // Once the cloud holds everything, they go.
        let mut acked = Knowledge::default();
        acked.map.insert(s.replica(), protocol::knowledge::RangeSet::up_to(1));
        s.on_knowledge(&acked, &acked, now_ms()).unwrap();
        assert_eq!(all(&mut s).len(), 0);
        assert!(!s.has_legacy_known().unwrap());
    }

    #[test]
    fn a_regroup_drops_basis_slots_of_an_older_chunk_geometry() {
        let t = tempfile::tempdir().unwrap();
        let mut s = Store::open(&t.path().join("s.redb"), &dev()).unwrap();
        let g = crate::chunker::PAGE_GROUP as u64;
        let slot = |len: u32| BasisSlot {
            anchor: Some(BasisPage {
                id: Hash32([len as u8; 32]),
                len,
                depth: 0,
                epoch: 0,
                seq: 1,
                zplain: vec![1, 2, 3],
            }),
            ..BasisSlot::default()
        };
        let write = |s: &mut Store, basis: Vec<(u64, BasisSlot)>, regroup: bool| {
            let (body, f) = file("db/q.sqlite", 4 * g);
            let d = DeltaWrites {
                basis,
                basis_end: 4 * g,
                regroup,
                ..DeltaWrites::default()
            };
            s.record_with_deltas(body, f, &[], Some(&d), now_ms(), None).unwrap();
        };
        // One slot per 4 KiB page, as an older agent wrote them.
        write(
            &mut s,
            (0..8)
                .map(|i| (i * 4096, slot(4096)))
                .chain([(g, slot(4096))])
                .collect(),
            false,
        );
        let r = s.basis_reader("db/q.sqlite").unwrap();
        assert!(r.get(4096).unwrap().anchor.is_some());
        drop(r);
        // Without a regroup, a group-sized write leaves the page slots.
        write(&mut s, vec![(0, slot(g as u32))], false);
        assert!(s
            .basis_reader("db/q.sqlite")
            .unwrap()
            .get(8192)
            .unwrap()
            .anchor
            .is_some());
        write(&mut s, vec![(0, slot(g as u32))], true);
        let r = s.basis_reader("db/q.sqlite").unwrap();
        for off in (1..8).map(|i| i * 4096) {
            assert_eq!(r.get(off).unwrap(), BasisSlot::default(), "slot at {off}");
        }
        assert_eq!(r.get(0).unwrap().anchor.map(|a| a.len), Some(g as u32));
        assert_eq!(r.get(g).unwrap(), slot(4096), "slots at group offsets stay");
    }

    #[test]
    fn bases_kept_by_a_deletion_are_dropped_when_the_next_scan_starts() {
        let t = tempfile::tempdir().unwrap();
        let mut s = Store::open(&t.path().join("s.redb"), &dev()).unwrap();
        let slot = BasisSlot {
            anchor: Some(BasisPage {
                id: Hash32([3; 32]),
                len: 4096,
                depth: 0,
                epoch: 0,
                seq: 1,
                zplain: vec![1, 2, 3],
            }),
            ..BasisSlot::default()
        };
        let (body, f) = file("db/q.sqlite", 4096);
        let d = DeltaWrites {
            basis: vec![(0, slot.clone())],
            basis_end: 4096,
            ..DeltaWrites::default()
        };
        s.record_with_deltas(body, f, &[], Some(&d), now_ms(), None).unwrap();
        // Deleted, its bases kept for a rename; the scan stops there.
        let keep = DeltaWrites {
            keep_basis: true,
            ..DeltaWrites::default()
        };
        s.record_with_deltas(
            ChangeBody::Delete("db/q.sqlite".into()),
            None,
            &[],
            Some(&keep),
            now_ms(),
            None,
        )
        .unwrap();
        assert_eq!(s.basis_reader("db/q.sqlite").unwrap().get(0).unwrap(), slot);
        assert_eq!(s.drop_kept_basis().unwrap(), 1);
        assert_eq!(
            s.basis_reader("db/q.sqlite").unwrap().get(0).unwrap(),
            BasisSlot::default()
        );
        assert_eq!(s.drop_kept_basis().unwrap(), 0, "dropped once");
    }

    fn record(s: &mut Store, path: &str, size: u64) -> Change {
        let (body, f) = file(path, size);
        s.record(body, f, &[], now_ms()).unwrap()
    }

    fn all(s: &mut Store) -> Vec<Change> {
        s.pending(&Knowledge::default(), usize::MAX, usize::MAX).unwrap()
    }

    /// A copy of the state file as it is on disk right now: what a crash
    /// (power loss after the OS wrote what it was given) would leave.
    fn crash_copy(s: &Store, to: &Path) {
        std::fs::copy(s.path(), to).unwrap();
    }

    /// After reopening a crash image: outbox, file states, next seq and
    /// counters agree (they are written in one transaction).
    fn consistent(s: &mut Store) {
        let out = all(s);
        assert_eq!(out.len() as u64, s.next_seq() - 1, "outbox and next_seq disagree");
        let seqs: Vec<u64> = out.iter().map(|c| c.seq).collect();
        assert_eq!(seqs, (1..s.next_seq()).collect::<Vec<_>>());
        assert_eq!(s.counters.changes_recorded, s.next_seq() - 1);
        let files = s.file_page("", None, 1000).unwrap();
        assert_eq!(files.len() as u64, s.counters.files_tracked);
        for (p, m) in files {
            assert!(out.iter().any(|c| c.seq == m.seq && c.body.path() == p));
        }
    }

    #[test]
    fn crash_images_never_reuse_a_seq_that_left_the_device() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("s.redb");
        let mut s = Store::open(&p, &dev()).unwrap();
        let a = record(&mut s, "x/a", 10);
        assert_eq!(a.seq, 1);
        // 1. Crash before anything left: seq 1 may be lost or kept, but the
        //    state is consistent either way.
        crash_copy(&s, &t.path().join("c1.redb"));
        // 2. `pending` makes everything it returns durable first.
        let sent = all(&mut s);
        assert_eq!(sent, vec![a.clone()]);
        crash_copy(&s, &t.path().join("c2.redb"));
        // 3. More non-durable records after the send.
        let b = record(&mut s, "x/b", 20);
        assert_eq!(b.seq, 2);
        crash_copy(&s, &t.path().join("c3.redb"));
        drop(s);

        let mut c1 = Store::open(&t.path().join("c1.redb"), &dev()).unwrap();
        consistent(&mut c1);
        drop(c1);

        // Seq 1 left the device: every later image holds exactly that change,
        // and a new record gets a new seq.
        for img in ["c2.redb", "c3.redb"] {
            let mut c = Store::open(&t.path().join(img), &dev()).unwrap();
            consistent(&mut c);
            assert!(c.next_seq() >= 2, "{img}: seq 1 would be handed out again");
            assert_eq!(all(&mut c)[0], a, "{img}: seq 1 changed");
            let n = record(&mut c, "x/c", 30);
            assert!(n.seq >= 2 && n.seq == c.next_seq() - 1);
            drop(c);
            let mut c = Store::open(&t.path().join(img), &dev()).unwrap();
            consistent(&mut c);
        }
    }

    #[test]
    fn drop_flushes_and_reopen_continues() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("s.redb");
        let mut s = Store::open(&p, &dev()).unwrap();
        let epoch = s.epoch();
        for i in 0..5 {
            record(&mut s, &format!("x/{i}"), 100 + i);
        }
        s.counters.wire_bytes_sent = 1234;
        s.flush().unwrap();
        drop(s);
        let mut s = Store::open(&p, &dev()).unwrap();
        assert_eq!((s.epoch(), s.next_seq()), (epoch, 6));
        assert_eq!(s.counters.wire_bytes_sent, 1234);
        consistent(&mut s);
        // A deletion removes the file state in the same transaction.
        let d = s.record(ChangeBody::Delete("x/0".into()), None, &[], now_ms()).unwrap();
        assert_eq!(d.seq, 6);
        assert_eq!(s.file_meta("x/0").unwrap(), None);
        assert_eq!(s.counters.files_tracked, 4);
        assert_eq!(s.counters.logical_bytes, 101 + 102 + 103 + 104);
        // Body and file state must agree.
        let (body, _) = file("x/9", 1);
        assert!(s.record(body, None, &[], now_ms()).is_err());
        assert_eq!(s.next_seq(), 7, "a refused record hands out no seq");
    }

    #[test]
    fn supersede_is_idempotent_and_marks_the_file_dirty() {
        let t = tempfile::tempdir().unwrap();
        let mut s = Store::open(&t.path().join("s.redb"), &dev()).unwrap();
        let a = record(&mut s, "x/a", 10);
        s.supersede(&a, now_ms()).unwrap();
        let first = all(&mut s);
        assert_eq!(first[0].body, ChangeBody::Superseded("x/a".into()));
        assert_eq!(first[0].seq, a.seq);
        assert!(s.file_meta("x/a").unwrap().unwrap().dirty);
        assert_eq!(s.counters.outbox_bytes, 0);
        // A second supersede of the same seq (e.g. a replayed batch) must
        // not produce a second, differently signed change under that seq.
        s.supersede(&a, now_ms() + 5).unwrap();
        assert_eq!(all(&mut s), first);
        assert_eq!(s.counters.superseded, 1);
        // A change of another replica (old epoch) is ignored.
        let mut other = a.clone();
        other.replica.epoch ^= 1;
        s.supersede(&other, now_ms()).unwrap();
        assert_eq!(all(&mut s), first);
    }

    #[test]
    fn known_chunk_bytes_round_trip() {
        let k = KnownChunk {
            id: Hash32([3; 32]),
            level: -5,
            cipher: 2,
            base: None,
        };
        assert_eq!(KnownChunk::from_bytes(&k.to_bytes()), Some(k));
        let e = KnownChunk {
            base: Some(BaseRef {
                id: Hash32([4; 32]),
                len: 70_000,
                depth: 3,
                delta: false,
            }),
            ..k
        };
        assert_eq!(e.to_bytes().len(), 71);
        assert_eq!(KnownChunk::from_bytes(&e.to_bytes()), Some(e));
        let d = KnownChunk {
            base: e.base.map(|b| BaseRef { delta: true, ..b }),
            ..k
        };
        assert_eq!(d.to_bytes().len(), 72);
        assert_eq!(KnownChunk::from_bytes(&d.to_bytes()), Some(d));
        assert_eq!(KnownChunk::from_bytes(&[0u8; 10]), None);
        assert_eq!(KnownChunk::from_bytes(&[0u8; 50]), None);
    }
}
