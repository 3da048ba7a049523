//! The catalog: a redb index over the objects (chunks → packs, changes,
//! versions, knowledge, devices). Everything in it can be recreated from the
//! objects by `rebuild`, so it is an index, never the only copy.

use crate::{Error, Result};
use globset::{GlobBuilder, GlobMatcher};
use minicbor::{Decode, Encode};
use protocol::pack::PackEntry;
use protocol::{Change, ChangeBody, DeviceRef, Hash32, Knowledge, RangeSet, ReplicaId};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// redb page cache: explicit so a sink's memory does not scale with its catalog.
const CACHE_BYTES: usize = 32 << 20;
/// Largest encoded change we store or read back.
const MAX_CHANGE: usize = protocol::msg::MAX_MESSAGE;

/// chunk id → pack id (32) ‖ offset u64 BE ‖ len u32 BE
const CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chunks");
/// pack id → size u64 BE ‖ chunk count u32 BE
const PACKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("packs");
/// replica key ‖ 0 ‖ seq BE → version key (empty for superseded seqs). Each (replica, seq) once.
const CHANGES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("changes");
/// device key ‖ 0 ‖ path ‖ 0 ‖ hlc BE ‖ 0 ‖ epoch BE ‖ 0 ‖ seq BE → CBOR signed Change.
/// Paths never contain NUL, so one path's versions are contiguous and sorted by HLC.
const VERSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("versions");
/// replica key (`tenant/site/device/epoch`) → CBOR KnowledgeRecord
const KNOWLEDGE: TableDefinition<&str, &[u8]> = TableDefinition::new("knowledge");
/// device key (`tenant/site/device`) → CBOR DeviceRecord
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
/// device key → JSON `fleet::PresenceRecord`. Live state forwarded by
/// aggregators; not in the objects, so `rebuild` leaves it empty.
const PRESENCE: TableDefinition<&str, &[u8]> = TableDefinition::new("presence");
/// Largest presence record read back.
const MAX_PRESENCE_RECORD: usize = 64 << 10;

/// Bytes after the path in a version key: 0 ‖ hlc(8) ‖ 0 ‖ epoch(4) ‖ 0 ‖ seq(8).
const VKEY_SUFFIX: usize = 23;

#[derive(Encode, Decode)]
struct KnowledgeRecord {
    #[n(0)]
    replica: ReplicaId,
    #[n(1)]
    seqs: RangeSet,
}

#[derive(Encode, Decode, Clone)]
struct DeviceRecord {
    #[n(0)]
    device: DeviceRef,
    /// Ed25519 key pinned on first use; changes signed by any other key are refused.
    #[n(1)]
    #[cbor(with = "minicbor::bytes")]
    pubkey: Vec<u8>,
    #[n(2)]
    last_seen_ms: u64,
    #[n(3)]
    changes: u64,
    /// Current (latest, not deleted) files and their total size.
    #[n(4)]
    files: u64,
    #[n(5)]
    logical_bytes: u64,
    #[n(6)]
    epochs: BTreeSet<u32>,
}

/// Where a stored chunk lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLoc {
    pub pack: Hash32,
    pub offset: u64,
    pub len: u32,
}

/// Filters of `/v1/files` and `/v1/restore` (also their query string).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FileQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Glob over manifest paths; also matches every file below a matching directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// RFC 3339; versions whose HLC time is later are ignored. Default: now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// All versions (including deletions) instead of the latest per path.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub versions: bool,
}

/// One row of `/v1/files`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub tenant: String,
    pub site: String,
    pub device: String,
    pub epoch: u32,
    pub seq: u64,
    pub path: String,
    pub size: u64,
    pub mtime_ns: i64,
    pub hlc_ms: u64,
    pub deleted: bool,
    /// Whole-file SHA-256 (hex); null for deletions.
    pub sha256: Option<String>,
    /// Number of chunks.
    pub chunks: u64,
}

impl FileEntry {
    pub fn from_change(c: &Change) -> FileEntry {
        let d = &c.replica.device;
        let (size, mtime_ns, sha256, chunks, deleted) = match &c.body {
            ChangeBody::File(f) => (
                f.size,
                f.mtime_ns,
                Some(f.sha256.to_hex()),
                f.chunks.len() as u64,
                false,
            ),
            _ => (0, 0, None, 0, true),
        };
        FileEntry {
            tenant: d.tenant.to_string(),
            site: d.site.to_string(),
            device: d.device.to_string(),
            epoch: c.replica.epoch,
            seq: c.seq,
            path: c.body.path().to_string(),
            size,
            mtime_ns,
            hlc_ms: c.hlc.millis(),
            deleted,
            sha256,
            chunks,
        }
    }
}

/// One row of `/v1/devices`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub tenant: String,
    pub site: String,
    pub device: String,
    /// Number of epochs (replicas) seen.
    pub epochs: u64,
    pub changes: u64,
    pub files: u64,
    pub logical_bytes: u64,
    pub last_seen_ms: u64,
    /// Pinned Ed25519 public key, hex.
    pub pubkey: String,
}

/// What one `apply` did.
#[derive(Debug, Default, Clone)]
pub struct ApplyOutcome {
    pub applied: usize,
    pub duplicate: usize,
    /// Changes refused (signed by a key other than the pinned one): labels.
    pub rejected: Vec<String>,
}

/// A compiled `FileQuery`.
struct Selector {
    device: Option<String>,
    tenant: Option<String>,
    site: Option<String>,
    glob: Option<GlobMatcher>,
    at_ms: u64,
    versions: bool,
}

/// Compiles a path glob of a query (`None` or empty: everything).
pub(crate) fn compile_glob(p: Option<&str>) -> Result<Option<GlobMatcher>> {
    Ok(match p {
        None | Some("") => None,
        Some(p) => Some(
            GlobBuilder::new(p)
                .literal_separator(true)
                .build()
                .map_err(|e| Error::BadRequest(format!("bad path glob {p:?}: {e}")))?
                .compile_matcher(),
        ),
    })
}

/// The glob matches the path or one of its parent directories.
pub(crate) fn glob_matches(g: Option<&GlobMatcher>, p: &str) -> bool {
    let Some(g) = g else { return true };
    g.is_match(p) || p.match_indices('/').any(|(i, _)| g.is_match(&p[..i]))
}

impl Selector {
    fn new(q: &FileQuery) -> Result<Selector> {
        let glob = compile_glob(q.path.as_deref())?;
        let at_ms = match q.at.as_deref() {
            None | Some("") => u64::MAX,
            Some(s) => crate::parse_rfc3339_ms(s)?,
        };
        Ok(Selector {
            device: q.device.clone(),
            tenant: q.tenant.clone(),
            site: q.site.clone(),
            glob,
            at_ms,
            versions: q.versions,
        })
    }
    fn device_matches(&self, d: &DeviceRef) -> bool {
        let eq = |f: &Option<String>, v: &protocol::Id| f.as_deref().is_none_or(|f| f == v.as_str());
        eq(&self.device, &d.device) && eq(&self.tenant, &d.tenant) && eq(&self.site, &d.site)
    }
    /// The glob matches the path or one of its parent directories.
    fn path_matches(&self, p: &str) -> bool {
        glob_matches(self.glob.as_ref(), p)
    }
}

pub struct Catalog {
    db: Database,
    clock: crate::SinkClock,
    /// Names this process's presence table (random, new at every open):
    /// presence commits are not fsynced and `rebuild` starts it empty, so an
    /// aggregator that sees another view re-sends everything (`PresenceAck::view`).
    presence_view: String,
}

/// A boxed backend as a `redb::StorageBackend` (redb takes one by value).
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
    fn try_lock_range(
        &self,
        s: std::ops::Bound<u64>,
        e: std::ops::Bound<u64>,
    ) -> std::result::Result<bool, redb::BackendError> {
        self.0.try_lock_range(s, e)
    }
}

fn change_key(r: &ReplicaId, seq: u64) -> Vec<u8> {
    let mut k = r.key().into_bytes();
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn version_key(c: &Change) -> Vec<u8> {
    version_key_of(&c.replica.device.key(), c.body.path(), c.hlc.0, c.replica.epoch, c.seq)
}

fn version_key_of(dkey: &str, path: &str, hlc: u64, epoch: u32, seq: u64) -> Vec<u8> {
    let mut k = dkey.as_bytes().to_vec();
    k.reserve(path.len() + VKEY_SUFFIX + 1);
    k.push(0);
    k.extend_from_slice(path.as_bytes());
    k.push(0);
    k.extend_from_slice(&hlc.to_be_bytes());
    k.push(0);
    k.extend_from_slice(&epoch.to_be_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// (path, hlc ms) of a version key whose device prefix is `prefix_len` bytes (including its NUL).
fn split_version_key(k: &[u8], prefix_len: usize) -> Option<(&str, u64)> {
    if k.len() < prefix_len + VKEY_SUFFIX + 1 {
        return None;
    }
    let path = std::str::from_utf8(&k[prefix_len..k.len() - VKEY_SUFFIX]).ok()?;
    let hlc = u64::from_be_bytes(k[k.len() - 22..k.len() - 14].try_into().ok()?);
    Some((path, protocol::hlc::Hlc(hlc).millis()))
}

fn read_presence(b: &[u8]) -> Result<crate::fleet::PresenceRecord> {
    if b.len() > MAX_PRESENCE_RECORD {
        return Err(Error::Corrupt(format!("presence record of {} bytes", b.len())));
    }
    serde_json::from_slice(b).map_err(|e| Error::Corrupt(format!("presence record: {e}")))
}

fn decode<'b, T: minicbor::Decode<'b, ()>>(b: &'b [u8], what: &str) -> Result<T> {
    decode_within(b, MAX_CHANGE, what)
}

/// Decodes a catalog record of at most `limit` bytes; anything else is
/// `Corrupt` naming `what`. Every table of the catalog reads through this.
pub(crate) fn decode_within<'b, T: minicbor::Decode<'b, ()>>(b: &'b [u8], limit: usize, what: &str) -> Result<T> {
    protocol::from_cbor(b, limit).map_err(|e| Error::Corrupt(format!("{what}: {e}")))
}

impl Catalog {
    /// Opens (or creates) the catalog; fails if another process holds it.
    pub fn open(path: &Path) -> Result<Catalog> {
        Catalog::init(Database::builder().set_cache_size(CACHE_BYTES).create(path)?)
    }

    /// Opens (or creates) the catalog on `backend` instead of a file (a
    /// simulator's in-memory backend, e.g. `redb::backends::InMemoryBackend`,
    /// or one that may lose unsynced writes). Same schema and recovery as
    /// [`Catalog::open`].
    pub fn open_with_backend(backend: Box<dyn redb::StorageBackend>) -> Result<Catalog> {
        Catalog::init(
            Database::builder()
                .set_cache_size(CACHE_BYTES)
                .create_with_backend(DynBackend(backend))?,
        )
    }

    /// Replaces the clock (default: the wall clock).
    pub fn with_clock(mut self, clock: crate::SinkClock) -> Catalog {
        self.clock = clock;
        self
    }

    pub fn clock(&self) -> &crate::SinkClock {
        &self.clock
    }

    fn init(db: Database) -> Result<Catalog> {
        let clock = crate::SinkClock::system();
        let tx = db.begin_write()?;
        tx.open_table(CHUNKS)?;
        tx.open_table(PACKS)?;
        tx.open_table(CHANGES)?;
        tx.open_table(VERSIONS)?;
        tx.open_table(KNOWLEDGE)?;
        tx.open_table(DEVICES)?;
        tx.open_table(PRESENCE)?;
        crate::shared::SharedTables::open(&tx)?;
        crate::changes::StateTables::open(&tx, 0)?;
        tx.commit()?;
        let mut id = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
            .map_err(|_| Error::Io(std::io::Error::other("the OS gave no randomness for the presence view")))?;
        Ok(Catalog {
            db,
            clock,
            presence_view: hex::encode(id),
        })
    }

    /// This process's presence view (see [`crate::fleet::PresenceAck::view`]).
    pub fn presence_view(&self) -> &str {
        &self.presence_view
    }

    pub fn has_chunk(&self, id: &Hash32) -> Result<bool> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(CHUNKS)?.get(&id.0[..])?.is_some())
    }

    pub fn chunk(&self, id: &Hash32) -> Result<Option<ChunkLoc>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(CHUNKS)?;
        let Some(v) = t.get(&id.0[..])? else { return Ok(None) };
        let v = v.value();
        if v.len() != 44 {
            return Err(Error::Corrupt(format!("chunk entry of {} bytes", v.len())));
        }
        let mut pack = [0u8; 32];
        pack.copy_from_slice(&v[..32]);
        let offset = u64::from_be_bytes(v[32..40].try_into().map_err(|_| Error::Corrupt("chunk".into()))?);
        let len = u32::from_be_bytes(v[40..44].try_into().map_err(|_| Error::Corrupt("chunk".into()))?);
        Ok(Some(ChunkLoc {
            pack: Hash32(pack),
            offset,
            len,
        }))
    }

    pub fn has_pack(&self, id: &Hash32) -> Result<bool> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(PACKS)?.get(&id.0[..])?.is_some())
    }

    /// Indexes a pack whose object is already durable. A chunk already
    /// indexed in another pack keeps its first location. Returns new chunks.
    pub fn add_pack(&self, id: &Hash32, size: u64, entries: &[PackEntry]) -> Result<usize> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        let mut added = 0;
        {
            let mut packs = tx.open_table(PACKS)?;
            let mut chunks = tx.open_table(CHUNKS)?;
            let mut v = size.to_be_bytes().to_vec();
            v.extend_from_slice(&(entries.len() as u32).to_be_bytes());
            packs.insert(&id.0[..], &v[..])?;
            for e in entries {
                if chunks.get(&e.id.0[..])?.is_some() {
                    continue;
                }
                let mut v = id.0.to_vec();
                v.extend_from_slice(&e.offset.to_be_bytes());
                v.extend_from_slice(&e.len.to_be_bytes());
                chunks.insert(&e.id.0[..], &v[..])?;
                added += 1;
            }
        }
        tx.commit()?;
        Ok(added)
    }

    pub fn has_change(&self, r: &ReplicaId, seq: u64) -> Result<bool> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(CHANGES)?.get(&change_key(r, seq)[..])?.is_some())
    }

    /// What the catalog holds of these devices' replicas.
    pub fn knowledge(&self, devices: &[DeviceRef]) -> Result<Knowledge> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(KNOWLEDGE)?;
        let mut k = Knowledge::default();
        for d in devices {
            // Replica keys are `device key/epoch`; '0' is the byte after '/'.
            let lo = format!("{}/", d.key());
            let hi = format!("{}0", d.key());
            for e in t.range(lo.as_str()..hi.as_str())? {
                let (_, v) = e?;
                let r: KnowledgeRecord = decode(v.value(), "knowledge")?;
                k.map.entry(r.replica).or_default().union_with(&r.seqs);
            }
        }
        Ok(k)
    }

    pub fn device_key(&self, d: &DeviceRef) -> Result<Option<Vec<u8>>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(DEVICES)?;
        let Some(v) = t.get(d.key().as_str())? else {
            return Ok(None);
        };
        let r: DeviceRecord = decode(v.value(), "device")?;
        Ok(Some(r.pubkey))
    }

    /// Records changes in one durable transaction. The caller has checked
    /// signatures and chunk presence and written the manifest objects.
    /// (replica, seq) already present are skipped (idempotent); keys are
    /// pinned on first use and changes under another key are refused.
    /// `now_ms` is the receive time (None during rebuild: the HLC time is used).
    pub fn apply(&self, changes: &[Change], now_ms: Option<u64>) -> Result<ApplyOutcome> {
        let mut out = ApplyOutcome::default();
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        {
            let mut ct = tx.open_table(CHANGES)?;
            let mut vt = tx.open_table(VERSIONS)?;
            let mut kt = tx.open_table(KNOWLEDGE)?;
            let mut dt = tx.open_table(DEVICES)?;
            let mut shared = crate::shared::SharedTables::open(&tx)?;
            let mut touched: BTreeSet<(String, String)> = BTreeSet::new();
            let mut devices: BTreeMap<String, DeviceRecord> = BTreeMap::new();
            let mut know: BTreeMap<String, KnowledgeRecord> = BTreeMap::new();
            for c in changes {
                let ck = change_key(&c.replica, c.seq);
                if ct.get(&ck[..])?.is_some() {
                    out.duplicate += 1;
                    continue;
                }
                let dkey = c.replica.device.key();
                if !devices.contains_key(&dkey) {
                    let rec = match dt.get(dkey.as_str())? {
                        Some(v) => decode(v.value(), "device")?,
                        None => DeviceRecord {
                            device: c.replica.device.clone(),
                            pubkey: c.pubkey.clone(),
                            last_seen_ms: 0,
                            changes: 0,
                            files: 0,
                            logical_bytes: 0,
                            epochs: BTreeSet::new(),
                        },
                    };
                    devices.insert(dkey.clone(), rec);
                }
                let Some(dev) = devices.get_mut(&dkey) else { continue };
                if dev.pubkey != c.pubkey {
                    out.rejected.push(c.label());
                    continue;
                }
                let vkey = match &c.body {
                    ChangeBody::Superseded(_) => Vec::new(),
                    ChangeBody::File(_) | ChangeBody::Delete(_) => {
                        let vkey = version_key(c);
                        // The path's current latest version, if this one supersedes it.
                        let plen = dkey.len() + 1 + c.body.path().len() + 1;
                        let (lo, mut hi) = (vkey[..plen].to_vec(), vkey[..plen].to_vec());
                        if let Some(last) = hi.last_mut() {
                            *last = 1;
                        }
                        let prev = vt.range(&lo[..]..&hi[..])?.next_back().transpose()?;
                        let newest = prev.as_ref().is_none_or(|(k, _)| k.value() < &vkey[..]);
                        if newest {
                            if let Some((_, v)) = &prev {
                                if let ChangeBody::File(f) = decode::<Change>(v.value(), "version")?.body {
                                    dev.files = dev.files.saturating_sub(1);
                                    dev.logical_bytes = dev.logical_bytes.saturating_sub(f.size);
                                }
                            }
                            if let ChangeBody::File(f) = &c.body {
                                dev.files += 1;
                                dev.logical_bytes = dev.logical_bytes.saturating_add(f.size);
                            }
                        }
                        drop(prev);
                        vt.insert(&vkey[..], &protocol::to_cbor(c)[..])?;
                        touched.extend(shared.index(c)?);
                        vkey
                    }
                };
                ct.insert(&ck[..], &vkey[..])?;
                dev.changes += 1;
                dev.epochs.insert(c.replica.epoch);
                dev.last_seen_ms = dev.last_seen_ms.max(now_ms.unwrap_or(c.hlc.millis()));
                let rkey = c.replica.key();
                if !know.contains_key(&rkey) {
                    let rec = match kt.get(rkey.as_str())? {
                        Some(v) => decode(v.value(), "knowledge")?,
                        None => KnowledgeRecord {
                            replica: c.replica.clone(),
                            seqs: RangeSet::new(),
                        },
                    };
                    know.insert(rkey.clone(), rec);
                }
                if let Some(k) = know.get_mut(&rkey) {
                    k.seqs.insert(c.seq);
                }
                out.applied += 1;
            }
            for (k, rec) in &devices {
                dt.insert(k.as_str(), &protocol::to_cbor(rec)[..])?;
            }
            for (k, rec) in &know {
                kt.insert(k.as_str(), &protocol::to_cbor(rec)[..])?;
            }
            if !touched.is_empty() {
                let mut states = crate::changes::StateTables::open(&tx, self.clock.now_us())?;
                for (site, path) in &touched {
                    shared.refresh_heads(&mut states, site, path)?;
                }
            }
        }
        tx.commit()?;
        Ok(out)
    }

    fn device_records(&self) -> Result<Vec<DeviceRecord>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(DEVICES)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (_, v) = e?;
            out.push(decode(v.value(), "device")?);
        }
        Ok(out)
    }

    /// Merges presence updates (see `fleet::PresenceRecord::merge`) in one
    /// transaction. Not fsynced on its own: presence is live state that
    /// aggregators re-send, and the next durable commit makes it durable.
    pub fn put_presence(
        &self,
        updates: &[(DeviceRef, crate::fleet::PresenceUpdate)],
    ) -> Result<crate::fleet::PresenceAck> {
        let mut ack = crate::fleet::PresenceAck {
            view: self.presence_view.clone(),
            ..Default::default()
        };
        // An empty post is an aggregator asking for the view: no transaction.
        if updates.is_empty() {
            return Ok(ack);
        }
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::None)?;
        {
            let mut t = tx.open_table(PRESENCE)?;
            for (d, u) in updates {
                let key = d.key();
                let mut rec = match t.get(key.as_str())? {
                    Some(v) => read_presence(v.value())?,
                    None => crate::fleet::PresenceRecord {
                        last_seen_ms: 0,
                        presence: None,
                        aggregator: None,
                    },
                };
                if rec.merge(u) {
                    let bytes = serde_json::to_vec(&rec).map_err(|e| Error::Corrupt(format!("presence: {e}")))?;
                    t.insert(key.as_str(), bytes.as_slice())?;
                    ack.applied += 1;
                } else {
                    ack.unchanged += 1;
                }
            }
        }
        tx.commit()?;
        Ok(ack)
    }

    /// The presence record of each of `devices` (None: none received), in
    /// one read transaction.
    pub fn presence_records(&self, devices: &[DeviceRef]) -> Result<Vec<Option<crate::fleet::PresenceRecord>>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(PRESENCE)?;
        devices
            .iter()
            .map(|d| t.get(d.key().as_str())?.map(|v| read_presence(v.value())).transpose())
            .collect()
    }

    /// One row per device the catalog or presence knows, sorted by device key.
    pub fn fleet(&self, now_ms: u64) -> Result<Vec<crate::fleet::FleetRow>> {
        use crate::fleet::{row, CatalogCounts, PresenceRecord};
        let mut devs: BTreeMap<String, (DeviceRef, Option<CatalogCounts>, Option<PresenceRecord>)> = BTreeMap::new();
        for r in self.device_records()? {
            let counts = CatalogCounts {
                last_seen_ms: r.last_seen_ms,
                changes: r.changes,
                files: r.files,
                logical_bytes: r.logical_bytes,
                epochs: r.epochs.iter().copied().collect(),
            };
            devs.insert(r.device.key(), (r.device.clone(), Some(counts), None));
        }
        let tx = self.db.begin_read()?;
        let conflicts = crate::shared::conflict_counts(&tx)?;
        let t = tx.open_table(PRESENCE)?;
        for e in t.iter()? {
            let (k, v) = e?;
            let key = k.value().to_string();
            let mut parts = key.splitn(3, '/');
            let (Some(ts), Some(ss), Some(ds)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(Error::Corrupt(format!("presence key {key:?}")));
            };
            let d = DeviceRef::new(ts, ss, ds).map_err(|e| Error::Corrupt(format!("presence key {key:?}: {e}")))?;
            let rec = read_presence(v.value())?;
            devs.entry(key).or_insert_with(|| (d, None, None)).2 = Some(rec);
        }
        Ok(devs
            .iter()
            .map(|(k, (d, c, p))| {
                let mut r = row(d, c.as_ref(), p.as_ref(), now_ms);
                r.conflict_count = conflicts.get(k).copied().unwrap_or(0);
                r
            })
            .collect())
    }

    pub fn devices(&self) -> Result<Vec<DeviceInfo>> {
        Ok(self
            .device_records()?
            .into_iter()
            .map(|r| DeviceInfo {
                tenant: r.device.tenant.to_string(),
                site: r.device.site.to_string(),
                device: r.device.device.to_string(),
                epochs: r.epochs.len() as u64,
                changes: r.changes,
                files: r.files,
                logical_bytes: r.logical_bytes,
                last_seen_ms: r.last_seen_ms,
                pubkey: hex::encode(&r.pubkey),
            })
            .collect())
    }

    /// The signed changes a query selects: with `versions`, every version
    /// (deletions included) up to `at`; otherwise the latest version of each
    /// path as of `at`, deleted paths omitted. Ordered by device, path, time.
    pub fn select(&self, q: &FileQuery) -> Result<Vec<Change>> {
        let sel = Selector::new(q)?;
        let devices: Vec<DeviceRef> = self
            .device_records()?
            .into_iter()
            .map(|r| r.device)
            .filter(|d| sel.device_matches(d))
            .collect();
        let tx = self.db.begin_read()?;
        let t = tx.open_table(VERSIONS)?;
        let mut out = Vec::new();
        for d in devices {
            let mut lo = d.key().into_bytes();
            let mut hi = lo.clone();
            lo.push(0);
            hi.push(1);
            let plen = lo.len();
            // Latest-per-path mode: the best candidate of the current path.
            let mut cur: Option<(String, Vec<u8>)> = None;
            let mut last_path: Option<(String, bool)> = None;
            for e in t.range(&lo[..]..&hi[..])? {
                let (k, v) = e?;
                let Some((path, hlc_ms)) = split_version_key(k.value(), plen) else {
                    return Err(Error::Corrupt("malformed version key".into()));
                };
                // One glob evaluation per path, not per version.
                let matches = match &last_path {
                    Some((p, m)) if p == path => *m,
                    _ => {
                        let m = sel.path_matches(path);
                        last_path = Some((path.to_string(), m));
                        m
                    }
                };
                if !matches || hlc_ms > sel.at_ms {
                    continue;
                }
                if sel.versions {
                    out.push(decode(v.value(), "version")?);
                    continue;
                }
                if cur.as_ref().is_some_and(|(p, _)| p != path) {
                    if let Some((_, bytes)) = cur.take() {
                        push_live(&mut out, &bytes)?;
                    }
                }
                cur = Some((path.to_string(), v.value().to_vec()));
            }
            if let Some((_, bytes)) = cur {
                push_live(&mut out, &bytes)?;
            }
        }
        Ok(out)
    }

    pub fn files(&self, q: &FileQuery) -> Result<Vec<FileEntry>> {
        Ok(self.select(q)?.iter().map(FileEntry::from_change).collect())
    }

    /// The changes `/v1/restore` returns: latest live version per path.
    pub fn restore_set(&self, q: &FileQuery) -> Result<Vec<Change>> {
        let mut q = q.clone();
        q.versions = false;
        self.select(&q)
    }
}

/// Pushes a latest version unless it is a deletion.
fn push_live(out: &mut Vec<Change>, bytes: &[u8]) -> Result<()> {
    let c: Change = decode(bytes, "version")?;
    if matches!(c.body, ChangeBody::File(_)) {
        out.push(c);
    }
    Ok(())
}

/// Shared paths, conflicts and server changes (see `shared.rs`, `changes.rs`).
impl Catalog {
    /// Conflicts on shared paths, in (site, path, versions) order.
    pub fn conflicts(&self, q: &crate::shared::ConflictQuery) -> Result<Vec<crate::shared::ConflictInfo>> {
        let tx = self.db.begin_read()?;
        crate::shared::list_conflicts(&tx, q)
    }

    /// Number of conflict records and a SHA-256 over them in key order:
    /// two catalogs with equal digests hold the same conflicts, recorded
    /// the same way. Cheaper than [`Catalog::conflicts`] (nothing decoded),
    /// for comparing replicas or arrival orders.
    pub fn conflicts_digest(&self) -> Result<(u64, Hash32)> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(crate::shared::CONFLICTS)?;
        let mut h = protocol::sha::ResumableSha256::new();
        let mut n = 0u64;
        for e in t.iter()? {
            let (k, v) = e?;
            for part in [k.value(), v.value()] {
                h.update(&(part.len() as u64).to_be_bytes());
                h.update(part);
            }
            n += 1;
        }
        Ok((n, h.finish()))
    }

    /// The signed change of each device's latest version (HLC time at or
    /// before `at`, deletions included) of every shared path of the site,
    /// ordered by tenant, path, device.
    pub fn shared_set(&self, q: &crate::shared::SharedQuery) -> Result<Vec<Change>> {
        protocol::Id::new(&q.site).map_err(|e| Error::BadRequest(format!("bad site: {e}")))?;
        let tx = self.db.begin_read()?;
        let locs = crate::shared::latest_per_device(&tx, q)?;
        let t = tx.open_table(VERSIONS)?;
        let mut out = Vec::with_capacity(locs.len());
        for l in locs {
            let dkey = format!("{}/{}", l.site, l.device);
            let vkey = version_key_of(&dkey, &l.path, l.hlc, l.epoch, l.seq);
            let Some(v) = t.get(&vkey[..])? else {
                return Err(Error::Corrupt(format!(
                    "shared version {dkey} {} has no version entry",
                    l.path
                )));
            };
            out.push(decode(v.value(), "version")?);
        }
        Ok(out)
    }

    /// Server changes of one device after `after` (`GET /v1/changes?device=`).
    pub fn device_changes(&self, d: &DeviceRef, after: u64) -> Result<protocol::msg::Changes> {
        let tx = self.db.begin_read()?;
        crate::changes::device_changes(&tx, d, after)
    }

    /// Server changes of every device after `after`, at most `limit`.
    pub fn fleet_changes(&self, after: u64, limit: usize) -> Result<protocol::meta::FleetChanges> {
        let tx = self.db.begin_read()?;
        crate::changes::fleet_changes(&tx, after, limit)
    }

    /// First half of an operator op: checks the device is known, allocates
    /// the op's gseq (durably) and builds its record. `None` (with the
    /// current state) if the op changes nothing. The caller writes the
    /// record's object and then calls `apply_meta`.
    pub fn prepare_meta(
        &self,
        d: &DeviceRef,
        path: &str,
        op: &crate::changes::MetaOp,
    ) -> Result<(Option<crate::changes::MetaOpRecord>, crate::changes::MetaView)> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        if tx.open_table(DEVICES)?.get(d.key().as_str())?.is_none() {
            return Err(Error::NotFound(format!("unknown device {d}")));
        }
        let out = crate::changes::prepare_op(&tx, d, path, op, self.clock.now_us())?;
        if out.0.is_some() {
            tx.commit()?;
        }
        Ok(out)
    }

    /// Merges operator op records (their objects are durable) into the
    /// metadata states, each change under a new gseq.
    pub fn apply_meta(&self, recs: &[crate::changes::MetaOpRecord]) -> Result<Vec<crate::changes::MetaView>> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        let out = crate::changes::apply_ops(&tx, recs, self.clock.now_us())?;
        tx.commit()?;
        Ok(out)
    }

    /// Metadata states (`GET /v1/meta`).
    pub fn meta(&self, q: &crate::changes::MetaQuery) -> Result<Vec<crate::changes::MetaView>> {
        let tx = self.db.begin_read()?;
        crate::changes::list_meta(&tx, q)
    }
}
