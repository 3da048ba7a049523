//! `SinkStore`: the protocol server's storage at the cloud (regional and
//! cloud knowledge are the same thing here), pack uploads, and `rebuild`.

use crate::catalog::Catalog;
use crate::objects::{manifest_key, pack_key, Objects};
use crate::{Error, Result};
use bytes::Bytes;
use futures::StreamExt;
use protocol::msg::ChunkData;
use protocol::pack::{PackBuilder, PackEntry, MAX_CHUNK, TRAILER_MAGIC};
use protocol::server::ServerStore;
use protocol::{Change, DeviceRef, Hash32, Knowledge};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::runtime::Handle;

/// File name of the catalog inside a data directory.
pub const CATALOG_FILE: &str = "catalog.redb";
/// Object directory inside a data directory.
pub const OBJECTS_DIR: &str = "objects";
/// Manifests fetched and applied per transaction during rebuild.
const REBUILD_BATCH: usize = 256;

/// Storage of the sans-IO `protocol::server::Server` at the sink.
///
/// Its methods block (object writes run on `rt` via `Handle::block_on`), so
/// it must be driven from a blocking thread (`spawn_blocking`) or, as the
/// simulator does, from outside any runtime with `rt` a current-thread
/// runtime's handle; never from inside an async task. Receive times come
/// from the catalog's clock ([`Catalog::with_clock`]).
pub struct SinkStore {
    catalog: Arc<Catalog>,
    objects: Objects,
    rt: Handle,
}

fn store_err(e: Error) -> protocol::Error {
    protocol::Error::Store(e.to_string())
}

impl SinkStore {
    pub fn new(catalog: Arc<Catalog>, objects: Objects, rt: Handle) -> SinkStore {
        SinkStore { catalog, objects, rt }
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    /// [`put_pack`] (`PUT /v1/packs/{id}`) without the blocking pool: checks
    /// and indexes on the calling thread, writes the object with
    /// `rt.block_on`. Blocks like the other methods.
    pub fn put_pack(&self, id: Hash32, bytes: Bytes) -> Result<usize> {
        let entries = check_pack(&id, &bytes)?;
        if self.catalog.has_pack(&id)? {
            return Ok(0);
        }
        let size = bytes.len() as u64;
        self.rt
            .block_on(self.objects.put_durable(vec![(pack_key(&id), bytes)]))?;
        self.catalog.add_pack(&id, size, &entries)
    }

    fn apply_inner(&mut self, changes: &[Change]) -> Result<()> {
        let mut fresh = Vec::with_capacity(changes.len());
        // Key pinning happens here, before any object is written: a change
        // the catalog would refuse must not leave a manifest object behind,
        // or `rebuild` (which pins in seq order) could pin its key instead.
        let mut pinned: HashMap<DeviceRef, Option<Vec<u8>>> = HashMap::new();
        for c in changes {
            if self.catalog.has_change(&c.replica, c.seq)? {
                continue;
            }
            let key = match pinned.entry(c.replica.device.clone()) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => e.insert(self.catalog.device_key(&c.replica.device)?),
            };
            match key {
                Some(k) if *k != c.pubkey => {
                    tracing::warn!(change = %c.label(), "refused: signed by a key other than the pinned one");
                    continue;
                }
                Some(_) => {}
                // First use in this batch: this change's key is the one pinned.
                None => *key = Some(c.pubkey.clone()),
            }
            fresh.push(c.clone());
        }
        if fresh.is_empty() {
            return Ok(());
        }
        // Objects first: the catalog never points at something not durable.
        let items = fresh
            .iter()
            .map(|c| (manifest_key(&c.replica, c.seq), Bytes::from(protocol::to_cbor(c))))
            .collect();
        self.rt.block_on(self.objects.put_durable(items))?;
        let out = self.catalog.apply(&fresh, Some(self.catalog.clock().now_ms()))?;
        for r in &out.rejected {
            tracing::warn!(change = %r, "refused: signed by a key other than the pinned one");
        }
        tracing::debug!(applied = out.applied, duplicate = out.duplicate, "applied changes");
        Ok(())
    }
}

impl ServerStore for SinkStore {
    fn knowledge(&mut self, devices: &[DeviceRef]) -> protocol::Result<(Knowledge, Knowledge)> {
        let k = self.catalog.knowledge(devices).map_err(store_err)?;
        Ok((k.clone(), k))
    }
    fn has_chunk(&mut self, id: &Hash32) -> protocol::Result<bool> {
        self.catalog.has_chunk(id).map_err(store_err)
    }
    fn put_chunks(&mut self, chunks: &[ChunkData]) -> protocol::Result<()> {
        let mut b = PackBuilder::new();
        for c in chunks {
            b.push(c.id, &c.bytes);
        }
        let (id, bytes, entries) = b.finish();
        let size = bytes.len() as u64;
        self.rt
            .block_on(self.objects.put_durable(vec![(pack_key(&id), bytes.into())]))
            .map_err(store_err)?;
        self.catalog.add_pack(&id, size, &entries).map_err(store_err)?;
        Ok(())
    }
    fn device_key(&mut self, device: &DeviceRef) -> protocol::Result<Option<Vec<u8>>> {
        self.catalog.device_key(device).map_err(store_err)
    }
    fn apply(&mut self, changes: &[Change]) -> protocol::Result<()> {
        self.apply_inner(changes).map_err(store_err)
    }
    fn backpressure(&mut self) -> Option<u64> {
        None
    }
}

/// Stores an uploaded pack: checks `id == SHA-256(bytes)` and the pack's
/// structure and chunk ids, writes the object durably, then indexes it.
/// Idempotent. Returns the number of newly indexed chunks.
pub async fn put_pack(catalog: &Arc<Catalog>, objects: &Objects, id: Hash32, bytes: Bytes) -> Result<usize> {
    let (entries, bytes) =
        tokio::task::spawn_blocking(move || Ok::<_, Error>((check_pack(&id, &bytes)?, bytes))).await??;
    let cat = catalog.clone();
    if tokio::task::spawn_blocking(move || cat.has_pack(&id)).await?? {
        return Ok(0);
    }
    let size = bytes.len() as u64;
    objects.put_durable(vec![(pack_key(&id), bytes)]).await?;
    let cat = catalog.clone();
    tokio::task::spawn_blocking(move || cat.add_pack(&id, size, &entries)).await?
}

/// Checks `id == SHA-256(bytes)` and parses the pack's index.
fn check_pack(id: &Hash32, bytes: &[u8]) -> Result<Vec<PackEntry>> {
    if Hash32::of(bytes) != *id {
        return Err(Error::BadRequest(format!(
            "pack id {id} is not the SHA-256 of the body"
        )));
    }
    Ok(protocol::pack::parse(bytes)?)
}

/// What `rebuild` found.
#[derive(Debug, Default, Clone)]
pub struct RebuildReport {
    pub packs: u64,
    pub chunks: u64,
    pub changes: u64,
    /// Operator metadata ops replayed.
    pub meta_ops: u64,
    /// Objects that could not be used (corrupt, misplaced, bad signature, wrong key).
    pub bad_objects: u64,
}

/// Recreates `DIR/catalog.redb` from the objects alone. Refuses to run while
/// a sink has the catalog open; the new catalog replaces the old atomically.
pub async fn rebuild(data: &Path) -> Result<RebuildReport> {
    let live = data.join(CATALOG_FILE);
    // Holding the old catalog open keeps a sink from starting meanwhile.
    let old = if live.exists() {
        let p = live.clone();
        Some(tokio::task::spawn_blocking(move || Catalog::open(&p)).await??)
    } else {
        None
    };
    let tmp = data.join(format!("{CATALOG_FILE}.rebuild"));
    if tmp.exists() {
        std::fs::remove_file(&tmp)?;
    }
    let t = tmp.clone();
    let catalog = Arc::new(tokio::task::spawn_blocking(move || Catalog::open(&t)).await??);
    let objects = Objects::open_local(&data.join(OBJECTS_DIR))?;
    let rep = rebuild_into(&catalog, &objects).await?;
    drop(catalog);
    drop(old);
    std::fs::rename(&tmp, &live)?;
    std::fs::File::open(data)?.sync_all()?;
    Ok(rep)
}

/// Indexes every object of `objects` into `catalog` (normally a new, empty
/// one): packs, then manifests in (epoch, seq) order per device, then
/// operator ops. [`rebuild`] on a catalog and store the caller opened.
pub async fn rebuild_into(catalog: &Arc<Catalog>, objects: &Objects) -> Result<RebuildReport> {
    let mut rep = RebuildReport::default();
    rebuild_packs(catalog, objects, &mut rep).await?;
    rebuild_manifests(catalog, objects, &mut rep).await?;
    rebuild_meta(catalog, objects, &mut rep).await?;
    Ok(rep)
}

async fn rebuild_packs(catalog: &Arc<Catalog>, objects: &Objects, rep: &mut RebuildReport) -> Result<()> {
    for meta in objects.list("packs").await? {
        let key = meta.location.to_string();
        let id = meta.location.filename().and_then(|n| Hash32::from_hex(n).ok());
        let found = match id {
            Some(id) if key == pack_key(&id) => read_pack_index(objects, &key, meta.size).await.map(|e| (id, e)),
            _ => Err(Error::Corrupt("not a pack object name".into())),
        };
        match found {
            Ok((id, entries)) => {
                let cat = catalog.clone();
                let size = meta.size;
                rep.chunks += tokio::task::spawn_blocking(move || cat.add_pack(&id, size, &entries)).await?? as u64;
                rep.packs += 1;
            }
            Err(e) => {
                tracing::warn!(object = %key, error = %e, "skipping unusable pack object");
                rep.bad_objects += 1;
            }
        }
    }
    Ok(())
}

/// Reads only a pack's trailer and index (not its chunks) and checks bounds.
async fn read_pack_index(objects: &Objects, key: &str, size: u64) -> Result<Vec<PackEntry>> {
    let bad = |why: &str| Error::Corrupt(format!("pack {key}: {why}"));
    if size < 20 || size > protocol::pack::MAX_PACK as u64 {
        return Err(bad("size out of range"));
    }
    let trailer = objects.get_range(key, size - 12..size).await?;
    if trailer.len() != 12 || &trailer[4..] != TRAILER_MAGIC {
        return Err(bad("missing trailer"));
    }
    let index_len = u64::from(u32::from_be_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]));
    if index_len > size - 20 {
        return Err(bad("index length out of range"));
    }
    let index_start = size - 12 - index_len;
    let index = objects.get_range(key, index_start..size - 12).await?;
    let entries: Vec<PackEntry> = protocol::from_cbor(&index, protocol::pack::MAX_PACK)?;
    for e in &entries {
        let end = e.offset.checked_add(u64::from(e.len));
        if e.offset < 8 || end.is_none_or(|end| end > index_start) || e.len as usize > MAX_CHUNK {
            return Err(bad("chunk entry out of bounds"));
        }
    }
    Ok(entries)
}

async fn rebuild_manifests(catalog: &Arc<Catalog>, objects: &Objects, rep: &mut RebuildReport) -> Result<()> {
    let mut device_dirs = Vec::new();
    for t in objects.list_dirs("manifests").await? {
        for s in objects.list_dirs(&t).await? {
            device_dirs.extend(objects.list_dirs(&s).await?);
        }
    }
    for dir in device_dirs {
        // Apply in (epoch, seq) order so the key pinned is the device's first.
        let mut keys: Vec<((u32, u64), String)> = Vec::new();
        for meta in objects.list(&dir).await? {
            let key = meta.location.to_string();
            let parts: Vec<&str> = key.rsplitn(3, '/').collect();
            match (
                parts.get(1).and_then(|e| e.parse().ok()),
                parts.first().and_then(|s| s.parse().ok()),
            ) {
                (Some(epoch), Some(seq)) => keys.push(((epoch, seq), key)),
                _ => {
                    tracing::warn!(object = %key, "skipping object with a non-manifest name");
                    rep.bad_objects += 1;
                }
            }
        }
        keys.sort();
        for batch in keys.chunks(REBUILD_BATCH) {
            let fetched: Vec<(String, Result<Bytes>)> = futures::stream::iter(batch.iter().map(|(_, k)| k.clone()))
                .map(|k| async move {
                    let r = objects.get(&k).await;
                    (k, r)
                })
                .buffered(16)
                .collect()
                .await;
            let mut changes = Vec::with_capacity(fetched.len());
            for (key, bytes) in fetched {
                match bytes.and_then(|b| manifest_from_object(&key, &b)) {
                    Ok(c) => changes.push(c),
                    Err(e) => {
                        tracing::warn!(object = %key, error = %e, "skipping unusable manifest object");
                        rep.bad_objects += 1;
                    }
                }
            }
            let cat = catalog.clone();
            let out = tokio::task::spawn_blocking(move || cat.apply(&changes, None)).await??;
            for r in &out.rejected {
                tracing::warn!(change = %r, "manifest signed by a key other than the device's pinned key");
            }
            rep.changes += out.applied as u64;
            rep.bad_objects += out.rejected.len() as u64;
        }
    }
    Ok(())
}

/// Replays the operator ops (`meta/…` objects) into the metadata states.
/// Each record is a CRDT delta, so the order does not matter; they are
/// applied in gseq order anyway, and the catalog's gseq counter moves past
/// every op's gseq so new dots never repeat old ones.
async fn rebuild_meta(catalog: &Arc<Catalog>, objects: &Objects, rep: &mut RebuildReport) -> Result<()> {
    let mut recs = Vec::new();
    for meta in objects.list("meta").await? {
        let key = meta.location.to_string();
        let rec = if meta.size > crate::changes::MAX_META_OBJECT as u64 {
            Err(Error::Corrupt(format!("{} bytes", meta.size)))
        } else {
            objects.get(&key).await.and_then(|b| {
                let r: crate::changes::MetaOpRecord = protocol::from_cbor(&b, crate::changes::MAX_META_OBJECT)?;
                r.validate()?;
                if r.object_key() != key {
                    return Err(Error::Corrupt(format!("op {} stored under {key}", r.gseq)));
                }
                Ok(r)
            })
        };
        match rec {
            Ok(r) => recs.push(r),
            Err(e) => {
                tracing::warn!(object = %key, error = %e, "skipping unusable metadata op object");
                rep.bad_objects += 1;
            }
        }
    }
    recs.sort_by_key(|r| r.gseq);
    for batch in recs.chunks(REBUILD_BATCH) {
        let cat = catalog.clone();
        let batch = batch.to_vec();
        let n = batch.len() as u64;
        tokio::task::spawn_blocking(move || cat.apply_meta(&batch)).await??;
        rep.meta_ops += n;
    }
    Ok(())
}

/// Decodes and verifies a manifest object, and checks it sits where its
/// replica and seq say it should.
fn manifest_from_object(key: &str, bytes: &[u8]) -> Result<Change> {
    let c: Change = protocol::from_cbor(bytes, protocol::msg::MAX_MESSAGE)?;
    c.verify()?;
    if manifest_key(&c.replica, c.seq) != key {
        return Err(Error::Corrupt(format!("{} stored under {key}", c.label())));
    }
    Ok(c)
}

/// Paths of a data directory.
pub fn catalog_path(data: &Path) -> PathBuf {
    data.join(CATALOG_FILE)
}
