//! Restore (docs/CONTRACTS.md "Restore"): fetch the signed changes, verify
//! signatures and pinned keys, fetch and verify every chunk, decrypt, check
//! lengths and the whole-file SHA-256, and write each file under the output
//! directory via a temp file and a rename. Nothing is written outside `out`
//! whatever a manifest says: paths are validated, joined component by
//! component, and existing symlinks on the way are refused.

use crate::catalog::FileQuery;
use crate::client::{verify_chunk, SinkClient};
use crate::{Error, Result};
use futures::{Stream, StreamExt};
use protocol::seal::{base_of, BaseRef, Cipher, Sealer, TenantKey, MAX_DEPTH};
use protocol::sha::ResumableSha256;
use protocol::{Change, ChangeBody, ChunkRef, DeviceRef, FileVersion};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Chunks opened (and, from a sink without batches, fetched) at once. Each
/// holds its stored bytes (at most `MAX_CHUNK`) and, once opened, its
/// plaintext (its signed length); an extension chunk also its base chain
/// (at most `MAX_DEPTH` more chunks).
const FETCH_CONCURRENCY: usize = 8;
/// Fetched chunks queued for the writer thread, and written chunks queued
/// for the hashing thread. So at most FETCH_CONCURRENCY + 2 × WRITE_QUEUE
/// plus 2 chunks are held at a time, plus the
/// batches in flight and the one being handed out (`BATCHES_IN_FLIGHT` + 1,
/// each at most `BATCH_MAX` chunks within its answer limit), whatever the
/// sink answers (16 was measured no faster than 8 here: BENCHMARKS §9).
const WRITE_QUEUE: usize = 8;
/// Full chunks with at least this many stored bytes are checked and opened
/// on the blocking pool, in parallel; smaller ones by the writer thread:
/// a hand-off (thread wake-up) per small chunk costs more CPU than it
/// saves. 32 KiB against 256 KiB: median 513 against 491 MB/s over 12
/// alternating restores each, 9 MiB more peak RSS (BENCHMARKS §9).
const PARALLEL_OPEN_MIN: usize = 32 << 10;

/// A fetched chunk: opened, or (a small full chunk) still sealed and not
/// yet checked against its id.
enum Fetched {
    Plain(Vec<u8>),
    Sealed(Vec<u8>),
}

impl Fetched {
    /// The plaintext; a sealed chunk is first checked against its id (as
    /// `SinkClient::chunk` does), then opened.
    fn open(self, pool: &SealerPool, r: &ChunkRef) -> Result<Vec<u8>> {
        match self {
            Fetched::Plain(p) => Ok(p),
            Fetched::Sealed(stored) => {
                verify_chunk(&r.id, &stored)?;
                pool.with(|s| Ok(s.open(&stored, r.len as usize)?))
            }
        }
    }
}

/// Sealers for the blocking tasks that open chunks: a `Sealer` is `&mut`
/// (reusable zstd context), so each task takes one from here, or makes one.
struct SealerPool {
    key: TenantKey,
    cipher: Cipher,
    free: Mutex<Vec<Sealer>>,
}

impl SealerPool {
    fn new(key: &TenantKey) -> Result<Arc<SealerPool>> {
        let cipher = Cipher::for_this_cpu();
        // Fail early on a bad key, and keep the sealer for the first task.
        let first = Sealer::new(key, cipher)?;
        Ok(Arc::new(SealerPool {
            key: key.clone(),
            cipher,
            free: Mutex::new(vec![first]),
        }))
    }

    fn with<T>(&self, f: impl FnOnce(&mut Sealer) -> Result<T>) -> Result<T> {
        let pooled = self.free.lock().ok().and_then(|mut v| v.pop());
        let mut sealer = match pooled {
            Some(s) => s,
            None => Sealer::new(&self.key, self.cipher)?,
        };
        let r = f(&mut sealer);
        if let Ok(mut v) = self.free.lock() {
            v.push(sealer);
        }
        r
    }
}

/// Runs CPU work (hashing, AEAD, zstd) on tokio's blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await?
}

#[derive(Clone, Debug, Default)]
pub struct RestoreRequest {
    pub device: Option<String>,
    pub tenant: Option<String>,
    pub site: Option<String>,
    /// Glob over paths; a directory matches everything below it.
    pub path_glob: Option<String>,
    /// RFC 3339; default now.
    pub at: Option<String>,
    pub out_dir: PathBuf,
}

#[derive(Clone, Debug, Default)]
pub struct RestoreReport {
    pub files: u64,
    pub bytes: u64,
    /// Empty directories recreated.
    pub dirs: u64,
    /// Files written, in order.
    pub paths: Vec<PathBuf>,
}

/// One verified file to write: its version and its target relative to `out`.
struct Item {
    file: FileVersion,
    rel: Vec<String>,
    /// Content already fetched and verified (an append-merge result):
    /// written as is instead of streaming `file.chunks`.
    merged: Option<Vec<u8>>,
}

/// Largest shared file version `restore --shared` reads whole for an append-merge.
pub const MAX_MERGE_PART: u64 = 256 << 20;
/// Largest sum of the parts merged into one shared path.
pub const MAX_MERGE_TOTAL: u64 = 1 << 30;

/// `restore --shared`: a site's shared namespace as of a time.
#[derive(Clone, Debug, Default)]
pub struct SharedRestoreRequest {
    /// Needed only when the site name exists under several tenants.
    pub tenant: Option<String>,
    pub site: String,
    /// Glob over shared paths; a directory matches everything below it.
    pub path_glob: Option<String>,
    /// RFC 3339; default now.
    pub at: Option<String>,
    pub out_dir: PathBuf,
}

pub async fn restore(client: &SinkClient, req: RestoreRequest, key: &TenantKey) -> Result<RestoreReport> {
    if let Some(at) = &req.at {
        crate::parse_rfc3339_ms(at)?;
    }
    let q = FileQuery {
        device: req.device.clone(),
        tenant: req.tenant.clone(),
        site: req.site.clone(),
        path: req.path_glob.clone(),
        at: req.at.clone(),
        versions: false,
    };
    let changes = client.restore(&q).await?;
    let pinned: HashMap<(String, String, String), String> = client
        .devices()
        .await?
        .into_iter()
        .map(|d| ((d.tenant, d.site, d.device), d.pubkey))
        .collect();
    let items = plan(&req, changes, &pinned)?;
    let pool = SealerPool::new(key)?;
    write_items(client, &pool, &req.out_dir, items).await
}

/// Writes verified items under `out`: fetches, verifies and decrypts their
/// chunks (or writes merged content as is).
///
/// The stages overlap: this task drives one ordered stream of all chunks
/// of all files (`FETCH_CONCURRENCY` downloads at a time; large and
/// extension chunks are checked against their ids and opened on the
/// blocking pool, see `PARALLEL_OPEN_MIN`); a writer thread takes them in
/// order from a bounded queue, checks and opens the small ones, checks each
/// chunk's length and writes; a hashing thread computes each file's SHA-256
/// and a finishing thread renames each file into place, in order, only
/// after its size and SHA-256 matched the signed manifest. Every check of the
/// sequential version is kept: chunk id, AEAD, per-chunk length, whole-file
/// size and SHA-256.
async fn write_items(
    client: &SinkClient,
    pool: &Arc<SealerPool>,
    out: &Path,
    items: Vec<Item>,
) -> Result<RestoreReport> {
    std::fs::create_dir_all(out)?;
    let refs: Vec<ChunkRef> = items
        .iter()
        .filter(|i| i.merged.is_none())
        .flat_map(|i| i.file.chunks.iter().copied())
        .collect();
    let (tx, rx) = tokio::sync::mpsc::channel(WRITE_QUEUE);
    let out = out.to_path_buf();
    let p = Arc::clone(pool);
    let mut writer = tokio::task::spawn_blocking(move || write_files(&out, &items, &p, rx));
    let feed = async {
        let mut chunks = std::pin::pin!(opened_chunks(client, pool, refs));
        while let Some(next) = chunks.next().await {
            let failed = next.is_err();
            // A closed queue: the writer stopped (its error is the answer).
            if tx.send(next).await.is_err() || failed {
                break;
            }
        }
    };
    tokio::select! {
        // The writer finished first (done, or failed): stop fetching.
        r = &mut writer => r?,
        // Every chunk (or the first error) is queued: wait for the writer.
        () = feed => writer.await?,
    }
}

/// What the writer hands the hashing thread: a written chunk's plaintext,
/// or the end of a file (answered with the file's SHA-256).
enum ToHash {
    Data(Vec<u8>),
    End,
}

/// The hashing thread of [`write_files`]: the whole-file SHA-256 of what
/// the writer wrote, one digest per `End`, so hashing and writing overlap.
fn hash_files(rx: std::sync::mpsc::Receiver<ToHash>, tx: std::sync::mpsc::SyncSender<protocol::Hash32>) {
    let mut sha = ResumableSha256::new();
    while let Ok(m) = rx.recv() {
        match m {
            ToHash::Data(b) => sha.update(&b),
            ToHash::End => {
                let done = std::mem::replace(&mut sha, ResumableSha256::new());
                if tx.send(done.finish()).is_err() {
                    return;
                }
            }
        }
    }
}

/// A verified file waiting for its fsync and rename: the temporary file,
/// its target, and the manifest's mode and mtime.
type ToFinish = (TempFile, PathBuf, u32, i64);

/// What the writer and the finishing thread share: the targets handed
/// over and not yet renamed, and whether the finisher stopped.
#[derive(Default)]
struct Finishing {
    pending: Mutex<HashSet<PathBuf>>,
    stopped: AtomicBool,
}

impl Finishing {
    fn is_pending(&self, p: &Path) -> bool {
        self.pending.lock().is_ok_and(|s| s.contains(p))
    }
}

/// Sets the flag when dropped: the finishing thread marks itself stopped
/// however it ends (an error, or a panic), so the writer never waits for a
/// rename that will not come.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Why the writer stopped: its own error, or the finisher's (then the
/// finisher's error is the answer).
enum Stopped {
    Finisher,
    Error(Error),
}

impl From<Error> for Stopped {
    fn from(e: Error) -> Stopped {
        Stopped::Error(e)
    }
}

impl From<std::io::Error> for Stopped {
    fn from(e: std::io::Error) -> Stopped {
        Stopped::Error(e.into())
    }
}

/// Files verified and written, waiting for the finishing thread.
const FINISH_QUEUE: usize = 4;

/// The writer side of [`write_items`], on a blocking thread: `rx` yields
/// every chunk of every non-merged item, in order. Two more threads
/// overlap with it: the whole-file SHA-256 ([`hash_files`], at most
/// `WRITE_QUEUE` chunks behind), and the fsync and rename of each verified
/// file (in order, at most `FINISH_QUEUE` files behind), so the next file
/// is written while the last one reaches the disk. A file is renamed into
/// place only after its size and digest match; the restore fails with the
/// first error of any of the three.
fn write_files(
    out: &Path,
    items: &[Item],
    pool: &SealerPool,
    rx: tokio::sync::mpsc::Receiver<Result<(ChunkRef, Fetched)>>,
) -> Result<RestoreReport> {
    let state = Finishing::default();
    std::thread::scope(|s| {
        // Owned by this closure and dropped before the scope joins the
        // threads, which ends them.
        let (to_hash, hash_rx) = std::sync::mpsc::sync_channel(WRITE_QUEUE);
        let (digest_tx, digests) = std::sync::mpsc::sync_channel(1);
        s.spawn(move || hash_files(hash_rx, digest_tx));
        let (to_finish, finish_rx) = std::sync::mpsc::sync_channel::<ToFinish>(FINISH_QUEUE);
        let st = &state;
        let finisher = s.spawn(move || -> Result<()> {
            // It ends normally only once the writer is done sending.
            let _stopped = StopOnDrop(&st.stopped);
            for (w, target, mode, mtime_ns) in finish_rx {
                w.finish(&target, mode, mtime_ns)?;
                if let Ok(mut p) = st.pending.lock() {
                    p.remove(&target);
                }
            }
            Ok(())
        });
        let written = write_files_with(out, items, pool, rx, &to_hash, &digests, (&to_finish, st));
        drop(to_finish);
        let finished = finisher
            .join()
            .unwrap_or_else(|_| Err(Error::Task("the finishing thread panicked".into())));
        match (written, finished) {
            (Ok(r), Ok(())) => Ok(r),
            (Ok(_), Err(e)) | (Err(Stopped::Finisher), Err(e)) | (Err(Stopped::Error(e)), _) => Err(e),
            (Err(Stopped::Finisher), Ok(())) => Err(Error::Task("the finishing thread stopped".into())),
        }
    })
}

fn write_files_with(
    out: &Path,
    items: &[Item],
    pool: &SealerPool,
    mut rx: tokio::sync::mpsc::Receiver<Result<(ChunkRef, Fetched)>>,
    to_hash: &std::sync::mpsc::SyncSender<ToHash>,
    digests: &std::sync::mpsc::Receiver<protocol::Hash32>,
    (to_finish, state): (&std::sync::mpsc::SyncSender<ToFinish>, &Finishing),
) -> std::result::Result<RestoreReport, Stopped> {
    let hash_gone = || Error::Task("the hashing thread stopped".into());
    let finish = |w: TempFile, target: &Path, f: &FileVersion| {
        if let Ok(mut p) = state.pending.lock() {
            p.insert(target.to_path_buf());
        }
        to_finish
            .send((w, target.to_path_buf(), f.mode, f.mtime_ns))
            .map_err(|_| Stopped::Finisher)
    };
    let stopped = || state.stopped.load(Ordering::SeqCst);
    let mut report = RestoreReport::default();
    for item in items {
        // A file queued for its rename at this path or above it must be in
        // place first, so the path checks below see it (and refuse to put
        // a file under a file); nothing more is done once the finisher stopped.
        let want = item.rel.iter().fold(out.to_path_buf(), |p, c| p.join(c));
        while want.ancestors().any(|a| state.is_pending(a)) && !stopped() {
            std::thread::sleep(Duration::from_millis(1));
        }
        if stopped() {
            return Err(Stopped::Finisher);
        }
        let target = prepare_target(out, &item.rel)?;
        if let Some(bytes) = &item.merged {
            let mut w = TempFile::create(&target)?;
            w.file.write_all(bytes)?;
            finish(w, &target, &item.file)?;
            report.files += 1;
            report.bytes += bytes.len() as u64;
            report.paths.push(target);
            continue;
        }
        if item.file.is_dir() {
            // An empty directory: no chunks. prepare_target refused links on
            // the way; the entry itself must be a directory or absent.
            match std::fs::symlink_metadata(&target) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(Error::UnsafePath(
                        item.file.path.clone(),
                        "a non-directory is in the way of a directory".into(),
                    )
                    .into())
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir(&target)?,
                Err(e) => return Err(e.into()),
            }
            if item.file.mode & 0o777 != 0 {
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(item.file.mode & 0o777))?;
            }
            report.dirs += 1;
            continue;
        }
        let mut w = TempFile::create(&target)?;
        let mut written = 0u64;
        // A symbolic link's content is its target path: kept, bounded, to
        // create the link once verified.
        let mut link: Option<Vec<u8>> = item.file.is_link().then(Vec::new);
        if link.is_some() && item.file.size > MAX_LINK_TARGET {
            return Err(Error::Verify(format!(
                "{}: symbolic link target of {} bytes",
                item.file.path, item.file.size
            ))
            .into());
        }
        for _ in 0..item.file.chunks.len() {
            let Some(next) = rx.blocking_recv() else {
                return Err(Error::Task("chunk stream ended early".into()).into());
            };
            if stopped() {
                return Err(Stopped::Finisher);
            }
            let (r, fetched) = next?;
            let plain = fetched.open(pool, &r)?;
            if plain.len() != r.len as usize {
                return Err(Error::Verify(format!(
                    "{}: chunk {} opened to {} bytes, manifest says {}",
                    item.file.path,
                    r.id,
                    plain.len(),
                    r.len
                ))
                .into());
            }
            match &mut link {
                Some(l) => l.extend_from_slice(&plain),
                None => w.file.write_all(&plain)?,
            }
            written += plain.len() as u64;
            to_hash.send(ToHash::Data(plain)).map_err(|_| hash_gone())?;
        }
        to_hash.send(ToHash::End).map_err(|_| hash_gone())?;
        let digest = digests.recv().map_err(|_| hash_gone())?;
        if written != item.file.size || digest != item.file.sha256 {
            return Err(Error::Verify(format!(
                "{}: restored bytes do not match the signed size and SHA-256",
                item.file.path
            ))
            .into());
        }
        match link {
            Some(l) => {
                drop(w);
                make_link(&target, &l)?;
            }
            None => finish(w, &target, &item.file)?,
        }
        report.files += 1;
        report.bytes += written;
        report.paths.push(target);
    }
    Ok(report)
}

/// Verifies every change before anything is written, and maps each to its
/// target: `out/<path>`, or `out/<device>/<path>` when several devices match
/// without `--device` (`out/<tenant>/<site>/<device>/<path>` if device ids repeat).
fn plan(
    req: &RestoreRequest,
    changes: Vec<Change>,
    pinned: &HashMap<(String, String, String), String>,
) -> Result<Vec<Item>> {
    let devices: BTreeSet<DeviceRef> = changes.iter().map(|c| c.replica.device.clone()).collect();
    let ids: BTreeSet<&str> = devices.iter().map(|d| d.device.as_str()).collect();
    let prefixed = req.device.is_none() && devices.len() > 1;
    let full_prefix = ids.len() < devices.len();
    let mut seen = BTreeMap::new();
    let mut items = Vec::with_capacity(changes.len());
    for c in changes {
        c.verify().map_err(|e| Error::Verify(e.to_string()))?;
        let d = &c.replica.device;
        let want = |f: &Option<String>, v: &protocol::Id| f.as_deref().is_none_or(|f| f == v.as_str());
        if !(want(&req.device, &d.device) && want(&req.tenant, &d.tenant) && want(&req.site, &d.site)) {
            return Err(Error::Verify(format!(
                "sink returned {} which was not asked for",
                c.label()
            )));
        }
        let key = (d.tenant.to_string(), d.site.to_string(), d.device.to_string());
        match pinned.get(&key) {
            Some(k) if *k == hex::encode(&c.pubkey) => {}
            _ => {
                return Err(Error::Verify(format!(
                    "{} is not signed by the key the sink pinned for {d}",
                    c.label()
                )))
            }
        }
        let ChangeBody::File(file) = c.body else {
            return Err(Error::Verify(format!("{} is not a file version", c.label())));
        };
        let mut rel: Vec<String> = match (prefixed, full_prefix) {
            (false, _) => Vec::new(),
            (true, false) => vec![d.device.to_string()],
            (true, true) => vec![d.tenant.to_string(), d.site.to_string(), d.device.to_string()],
        };
        protocol::manifest::validate_path(&file.path)?;
        rel.extend(file.path.split('/').map(str::to_string));
        if let Some(prev) = seen.insert(rel.clone(), c.replica.to_string()) {
            return Err(Error::Verify(format!(
                "{} restored twice (from {prev} and {})",
                file.path, c.replica
            )));
        }
        items.push(Item {
            file,
            rel,
            merged: None,
        });
    }
    Ok(items)
}

/// Chunks are asked for in batches (`POST /v1/chunks`) until their
/// plaintext reaches this many bytes, or `BATCH_MAX` chunks.
const BATCH_BYTES: u64 = 1 << 20;
const BATCH_MAX: usize = 256;
/// Batches in flight at once.
const BATCHES_IN_FLIGHT: usize = 2;

/// A generous bound on a chunk's stored size from its plaintext length:
/// zstd's worst case (under 1/128 more), the seal's headers and AEAD tag.
fn stored_bound(len: u32) -> usize {
    let len = len as usize;
    len + len / 8 + 4096
}

/// `refs` cut into batches of at most `BATCH_BYTES` of plaintext (a larger
/// chunk alone) and `BATCH_MAX` chunks, in order.
fn batches(refs: Vec<ChunkRef>) -> Vec<Vec<ChunkRef>> {
    let mut out: Vec<Vec<ChunkRef>> = Vec::new();
    let mut bytes = 0u64;
    for r in refs {
        match out.last_mut() {
            Some(b) if b.len() < BATCH_MAX && bytes + u64::from(r.len) <= BATCH_BYTES => {
                bytes += u64::from(r.len);
                b.push(r);
            }
            _ => {
                bytes = u64::from(r.len);
                out.push(vec![r]);
            }
        }
    }
    out
}

/// Fetches `refs` in order, in batches (see [`batches`]), and opens the
/// large and the extension chunks, up to `FETCH_CONCURRENCY` at a time
/// (see [`Fetched`]; lengths are not yet checked).
fn opened_chunks<'a>(
    client: &'a SinkClient,
    pool: &'a Arc<SealerPool>,
    refs: Vec<ChunkRef>,
) -> impl Stream<Item = Result<(ChunkRef, Fetched)>> + 'a {
    futures::stream::iter(batches(refs))
        .map(move |b| {
            // A task of its own: a batch downloads while the one before is
            // opened and written (a future in `buffered` only moves when
            // the stream is polled, and that waits for the writer).
            let c = client.clone();
            AbortOnDrop(tokio::spawn(async move { fetch_batch(&c, b).await }))
        })
        .buffered(BATCHES_IN_FLIGHT)
        .flat_map(|fetched| {
            let items: Vec<Result<(ChunkRef, Vec<u8>)>> = match fetched {
                Ok(Ok(v)) => v.into_iter().map(Ok).collect(),
                Ok(Err(e)) => vec![Err(e)],
                Err(e) => vec![Err(e.into())],
            };
            futures::stream::iter(items)
        })
        .map(move |item| async move {
            let (r, stored) = item?;
            open_stored(client, pool, r, stored).await.map(|p| (r, p))
        })
        .buffered(FETCH_CONCURRENCY)
}

/// A spawned task that is aborted when its handle is dropped (a restore
/// that stops early does not leave downloads running).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> std::future::Future for AbortOnDrop<T> {
    type Output = std::result::Result<T, tokio::task::JoinError>;
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

/// The stored bytes of a batch of chunks, not yet checked against their
/// ids: one request, or one per chunk (up to `FETCH_CONCURRENCY` at a time)
/// for a single chunk or a sink without the batch endpoint.
async fn fetch_batch(client: &SinkClient, refs: Vec<ChunkRef>) -> Result<Vec<(ChunkRef, Vec<u8>)>> {
    if refs.len() > 1 {
        let ids: Vec<protocol::Hash32> = refs.iter().map(|r| r.id).collect();
        let limit = refs.iter().map(|r| stored_bound(r.len)).sum();
        if let Some(all) = client.chunks_unverified(&ids, limit).await? {
            return Ok(refs.into_iter().zip(all).collect());
        }
    }
    futures::stream::iter(refs)
        .map(|r| async move { client.chunk_unverified(&r.id).await.map(|b| (r, b)) })
        .buffered(FETCH_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// Opens one fetched chunk. A small full chunk is returned sealed; a large
/// one is opened on the blocking pool: its stored bytes are checked against
/// its id there (as `SinkClient::chunk` does) before anything else reads
/// them. An extension chunk then needs its base chain.
async fn open_stored(client: &SinkClient, pool: &Arc<SealerPool>, r: ChunkRef, stored: Vec<u8>) -> Result<Fetched> {
    if stored.len() < PARALLEL_OPEN_MIN && matches!(base_of(&stored), Ok(None)) {
        return Ok(Fetched::Sealed(stored));
    }
    let len = r.len as usize;
    let p = Arc::clone(pool);
    let opened = blocking(move || {
        verify_chunk(&r.id, &stored)?;
        match base_of(&stored)? {
            None => Ok(Ok(p.with(|s| Ok(s.open(&stored, len)?))?)),
            Some(base) => Ok(Err((stored, base))),
        }
    })
    .await?;
    match opened {
        Ok(plain) => Ok(Fetched::Plain(plain)),
        Err((stored, base)) => Ok(Fetched::Plain(open_extension(client, pool, stored, base, len).await?)),
    }
}

/// Opens an extension chunk (`protocol::seal`), whose stored bytes were
/// verified by id: first fetches its base chain (each verified by its id),
/// at most `MAX_DEPTH` deep, each base strictly shallower than what extends
/// it; then opens the chain and the chunk on the blocking pool.
async fn open_extension(
    client: &SinkClient,
    pool: &Arc<SealerPool>,
    stored: Vec<u8>,
    mut base: BaseRef,
    len: usize,
) -> Result<Vec<u8>> {
    // (stored bytes, plaintext length) from this chunk's base down to a full one.
    let mut chain: Vec<(Vec<u8>, usize)> = Vec::new();
    let mut depth = base.depth;
    loop {
        if chain.len() >= usize::from(MAX_DEPTH) {
            return Err(Error::Verify(format!("chunk {}: extension chain too deep", base.id)));
        }
        let bytes = client.chunk(&base.id).await?;
        let want = base.len as usize;
        match base_of(&bytes)? {
            None => {
                chain.push((bytes, want));
                break;
            }
            Some(next) if next.depth < depth => {
                chain.push((bytes, want));
                depth = next.depth;
                base = next;
            }
            Some(_) => {
                return Err(Error::Verify(format!(
                    "chunk {}: extension base is not shallower than its extension",
                    base.id
                )))
            }
        }
    }
    let pool = Arc::clone(pool);
    blocking(move || {
        pool.with(|sealer| {
            // The last entry is the full chunk; each one before extends the next.
            let mut plain: Option<Vec<u8>> = None;
            while let Some((bytes, want)) = chain.pop() {
                plain = Some(sealer.open_with_base(&bytes, want, plain.as_deref())?);
            }
            Ok(sealer.open_with_base(&stored, len, plain.as_deref())?)
        })
    })
    .await
}

/// Fetches one whole file version, verifying every chunk, the length and
/// the SHA-256. Refuses versions over `MAX_MERGE_PART`.
async fn fetch_whole(client: &SinkClient, pool: &Arc<SealerPool>, f: &FileVersion) -> Result<Vec<u8>> {
    if f.size > MAX_MERGE_PART {
        return Err(Error::BadRequest(format!(
            "{}: a shared version of {} bytes is over the {} MiB append-merge limit; restore it per device instead",
            f.path,
            f.size,
            MAX_MERGE_PART >> 20
        )));
    }
    let mut out = Vec::with_capacity(f.size as usize);
    let mut chunks = std::pin::pin!(opened_chunks(client, pool, f.chunks.clone()));
    while let Some(next) = chunks.next().await {
        let (r, fetched) = next?;
        let plain = fetched.open(pool, &r)?;
        if plain.len() != r.len as usize {
            return Err(Error::Verify(format!(
                "{}: chunk {} has the wrong length",
                f.path, r.id
            )));
        }
        out.extend_from_slice(&plain);
    }
    if out.len() as u64 != f.size || protocol::Hash32::of(&out) != f.sha256 {
        return Err(Error::Verify(format!(
            "{}: restored bytes do not match the signed size and SHA-256",
            f.path
        )));
    }
    Ok(out)
}

/// `<path>.conflict-<device>` as target components.
fn conflict_rel(path: &str, device: &str) -> Vec<String> {
    let mut rel: Vec<String> = path.split('/').map(str::to_string).collect();
    if let Some(last) = rel.last_mut() {
        last.push_str(".conflict-");
        last.push_str(device);
    }
    rel
}

/// Restores a site's shared namespace as of `at`. Per shared path it takes
/// each device's latest version, verifies every signature (vectors and
/// policy are signed) and pinned key, and resolves by the policy of the
/// winning head (`protocol::shared`): last-writer-wins writes the winner
/// (nothing if it is a deletion); keep-both writes the winner at the path
/// and each other head at `<path>.conflict-<device>`; append-merge writes
/// `merge_lines` of every device's latest file version.
pub async fn restore_shared(client: &SinkClient, req: SharedRestoreRequest, key: &TenantKey) -> Result<RestoreReport> {
    use protocol::shared::{heads, merge_lines, ConflictPolicy, SharedVersion};
    if let Some(at) = &req.at {
        crate::parse_rfc3339_ms(at)?;
    }
    protocol::Id::new(&req.site).map_err(|e| Error::BadRequest(format!("bad site: {e}")))?;
    let q = crate::shared::SharedQuery {
        tenant: req.tenant.clone(),
        site: req.site.clone(),
        path: req.path_glob.clone(),
        at: req.at.clone(),
    };
    let changes = client.shared(&q).await?;
    let pinned: HashMap<(String, String, String), String> = client
        .devices()
        .await?
        .into_iter()
        .map(|d| ((d.tenant, d.site, d.device), d.pubkey))
        .collect();
    let mut tenants = BTreeSet::new();
    let mut by_path: BTreeMap<String, Vec<Change>> = BTreeMap::new();
    for c in changes {
        c.verify().map_err(|e| Error::Verify(e.to_string()))?;
        let d = &c.replica.device;
        if d.site.as_str() != req.site || req.tenant.as_deref().is_some_and(|t| t != d.tenant.as_str()) {
            return Err(Error::Verify(format!(
                "sink returned {} which was not asked for",
                c.label()
            )));
        }
        let key = (d.tenant.to_string(), d.site.to_string(), d.device.to_string());
        if pinned.get(&key).is_none_or(|k| *k != hex::encode(&c.pubkey)) {
            return Err(Error::Verify(format!(
                "{} is not signed by the key the sink pinned for {d}",
                c.label()
            )));
        }
        if c.shared.is_none() || matches!(c.body, ChangeBody::Superseded(_)) {
            return Err(Error::Verify(format!("{} is not a shared version", c.label())));
        }
        tenants.insert(d.tenant.to_string());
        let group = by_path.entry(c.body.path().to_string()).or_default();
        if group.iter().any(|o| o.replica.device == c.replica.device) {
            return Err(Error::Verify(format!(
                "sink returned two latest versions for {}",
                c.label()
            )));
        }
        group.push(c);
    }
    if tenants.len() > 1 {
        return Err(Error::BadRequest(format!(
            "site {} exists under tenants {}: pass --tenant",
            req.site,
            tenants.into_iter().collect::<Vec<_>>().join(", ")
        )));
    }
    let pool = SealerPool::new(key)?;
    let mut items = Vec::new();
    let mut seen = BTreeSet::new();
    for (path, group) in by_path {
        protocol::manifest::validate_path(&path)?;
        let versions: Vec<SharedVersion> = group
            .iter()
            .map(|c| SharedVersion {
                device: c.replica.device.device.to_string(),
                hlc: c.hlc,
                vv: c.shared.as_ref().map(|s| s.vv.clone()).unwrap_or_default(),
                deleted: !matches!(c.body, ChangeBody::File(_)),
            })
            .collect();
        let hs = heads(&versions);
        let Some(&w) = hs.first() else { continue };
        let policy = group[w].shared.as_ref().map(|s| s.policy).unwrap_or_default();
        let file_of = |i: usize| match &group[i].body {
            ChangeBody::File(f) => Some(f.clone()),
            _ => None,
        };
        match policy {
            ConflictPolicy::LastWriterWins => {
                if let Some(f) = file_of(w) {
                    items.push((path.split('/').map(str::to_string).collect(), f, None));
                }
            }
            ConflictPolicy::KeepBoth => {
                for (n, &i) in hs.iter().enumerate() {
                    let Some(f) = file_of(i) else { continue };
                    let rel = if n == 0 {
                        path.split('/').map(str::to_string).collect()
                    } else {
                        conflict_rel(&path, &versions[i].device)
                    };
                    items.push((rel, f, None));
                }
            }
            ConflictPolicy::AppendMerge => {
                // Every device's latest file version, the latest first (its
                // metadata labels the result).
                let mut order: Vec<usize> = (0..group.len()).collect();
                order.sort_by(|a, b| protocol::shared::winner_order(&versions[*b], &versions[*a]));
                let files: Vec<FileVersion> = order
                    .iter()
                    .filter_map(|&i| file_of(i))
                    .filter(|f| !f.is_dir() && !f.is_link())
                    .collect();
                let Some(first) = files.first().cloned() else { continue };
                let total: u64 = files.iter().map(|f| f.size).sum();
                if total > MAX_MERGE_TOTAL {
                    return Err(Error::BadRequest(format!(
                        "{path}: {total} bytes of shared versions to merge, over the {} MiB limit",
                        MAX_MERGE_TOTAL >> 20
                    )));
                }
                if files.len() == 1 {
                    // Nothing to merge: the signed version, byte for byte.
                    items.push((path.split('/').map(str::to_string).collect(), first, None));
                    continue;
                }
                let mut parts = Vec::with_capacity(files.len());
                for f in &files {
                    parts.push(fetch_whole(client, &pool, f).await?);
                }
                let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
                let merged = merge_lines(&refs);
                let mut f = first;
                f.size = merged.len() as u64;
                f.sha256 = protocol::Hash32::of(&merged);
                f.chunks = Vec::new();
                items.push((path.split('/').map(str::to_string).collect(), f, Some(merged)));
            }
        }
    }
    let mut out = Vec::with_capacity(items.len());
    for (rel, file, merged) in items {
        if !seen.insert(rel.clone()) {
            return Err(Error::Verify(format!("{} would be restored twice", rel.join("/"))));
        }
        out.push(Item { file, rel, merged });
    }
    write_items(client, &pool, &req.out_dir, out).await
}

/// Joins `rel` under `out`, creating missing directories one at a time.
/// Refuses components that are not plain names, existing symlinks anywhere
/// below `out`, and non-directories in the way.
pub fn prepare_target(out: &Path, rel: &[String]) -> Result<PathBuf> {
    let shown = rel.join("/");
    let unsafe_path = |why: &str| Error::UnsafePath(shown.clone(), why.to_string());
    let Some((name, dirs)) = rel.split_last() else {
        return Err(unsafe_path("empty path"));
    };
    let mut cur = out.to_path_buf();
    for (i, part) in rel.iter().enumerate() {
        let mut comps = Path::new(part).components();
        let plain = matches!(comps.next(), Some(Component::Normal(c)) if c == part.as_str());
        if !plain || comps.next().is_some() || part.contains('/') || part.contains('\0') {
            return Err(unsafe_path("component is not a plain name"));
        }
        cur.push(part);
        let is_dir = i < dirs.len();
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => return Err(unsafe_path("a symlink is in the way")),
            Ok(m) if is_dir && !m.is_dir() => return Err(unsafe_path("a non-directory is in the way")),
            Ok(m) if !is_dir && m.is_dir() => return Err(unsafe_path("a directory is in the way")),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if is_dir {
                    std::fs::create_dir(&cur)?;
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    // Belt and braces: only plain components were pushed onto `out`.
    if !cur.starts_with(out)
        || cur.components().count() != out.components().count() + rel.len()
        || cur.file_name().is_none_or(|n| n != name.as_str())
    {
        return Err(unsafe_path("escapes the output directory"));
    }
    Ok(cur)
}

/// A temp file next to the target; removed unless `finish` renames it.
struct TempFile {
    file: std::fs::File,
    path: PathBuf,
    done: bool,
}

/// Longest symbolic link target a restore creates (PATH_MAX).
const MAX_LINK_TARGET: u64 = 4096;

/// Creates the symbolic link `target` → `dest` via a fresh temporary name
/// and a rename: never follows or writes through anything already there.
fn make_link(target: &Path, dest: &[u8]) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = target.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".ferry-restore-{}-link-{n}.tmp", std::process::id()));
    std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(dest), &tmp)?;
    if let Err(e) = std::fs::rename(&tmp, target) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    Ok(())
}

impl TempFile {
    fn create(target: &Path) -> Result<TempFile> {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = target.parent().unwrap_or(Path::new("."));
        let path = dir.join(format!(".ferry-restore-{}-{n}.tmp", std::process::id()));
        // create_new: never follows or reuses something already there.
        let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
        Ok(TempFile {
            file,
            path,
            done: false,
        })
    }

    /// Sets the manifest's `mode` and `mtime_ns`, makes the file durable and
    /// renames it to `target`.
    fn finish(mut self, target: &Path, mode: u32, mtime_ns: i64) -> Result<()> {
        // Mode bits without setuid/setgid/sticky; 0 means "unknown": keep the default.
        if mode & 0o777 != 0 {
            self.file
                .set_permissions(std::fs::Permissions::from_mode(mode & 0o777))?;
        }
        let mtime = if mtime_ns >= 0 {
            UNIX_EPOCH.checked_add(Duration::from_nanos(mtime_ns as u64))
        } else {
            UNIX_EPOCH.checked_sub(Duration::from_nanos(mtime_ns.unsigned_abs()))
        };
        self.file.set_modified(mtime.unwrap_or(SystemTime::UNIX_EPOCH))?;
        self.file.sync_all()?;
        // The target was checked by prepare_target; rename replaces a file, never follows a link.
        std::fs::rename(&self.path, target)?;
        self.done = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
