//! Ferry's edge agent: scans watch folders, chunks and seals new data,
//! records signed changes in one redb file, and syncs them to a regional
//! aggregator over MQTT whenever a link exists (DESIGN.md §3–4).
//!
//! Library API (used by the `edge-agent` binary and by `sim` in-process):
//! [`AgentConfig`] → [`Agent::open`] → [`Agent::scan_once`],
//! [`Agent::run`] (daemon), [`Agent::sync`] (scan, sync to a durability
//! level, exit), [`Agent::status`] / [`read_status`].
//!
//! Without the daemon (deterministic simulation): [`Agent::open_with_backend`]
//! and the calls listed in [`driver`].

pub mod central;
pub mod chunker;
pub mod disk;
pub mod driver;
pub mod error;
pub mod net;
pub mod policy;
pub mod scan;
pub mod sched;
pub mod store;

pub use chunker::ChunkParams;
pub use error::{Error, Result};
pub use policy::{ClassSpec, DiskProbe, DiskStat, DiskWatermarks, FileConfig, Prune, Watermark};
pub use scan::ScanReport;
pub use store::{Counters, DiskStatus, Status};

use policy::{Policy, Root};
use protocol::client::{ClientConfig, ClientStore};
use protocol::manifest::{Change, ChangeBody};
use protocol::meta::ServerChange;
use protocol::seal::{Cipher, Sealer, TenantKey};
use protocol::{DeviceRef, Hash32, Knowledge, ReplicaId};
use serde::Serialize;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;
use store::Store;

/// Everything an agent needs. Build with [`AgentConfig::new`] and adjust.
#[derive(Clone)]
pub struct AgentConfig {
    /// `mqtt://host:port` (or `tcp://`, or `host:port`).
    pub broker: String,
    pub tenant: String,
    pub site: String,
    pub device: String,
    pub watch: Vec<PathBuf>,
    pub state: PathBuf,
    pub key: TenantKey,
    pub scan_interval: Duration,
    pub cipher: Cipher,
    /// Only paths matching one of these (if any) are archived.
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// Globs of the `append` class (append fast path, zstd level 1).
    pub append_globs: Vec<String>,
    /// Globs of the `db` class (page-structured databases, small chunks).
    pub db_globs: Vec<String>,
    pub chunking: ChunkParams,
    /// Chunk sizes of the `db` class. Measured on SQLite with ~10 % of pages
    /// edited per hour (`benches/examples/step_cost.rs`): 8 KiB average
    /// chunks send 2.2x fewer bytes than 64 KiB ones, manifests included.
    pub db_chunking: ChunkParams,
    /// zstd level of the `default` class.
    pub zstd_level: i32,
    /// zstd level of the `append` class.
    pub append_zstd_level: i32,
    /// Sync session tuning. `data_bytes` bounds one Data message and so the
    /// memory held by the MQTT client (default 512 KiB here).
    pub client: ClientConfig,
    /// Write `<state>.status.json` every few seconds while running, so
    /// `edge-agent status` works while the daemon holds the state file.
    pub status_snapshot: bool,
    /// MQTT keepalive. A silent link (open, nothing moving) is noticed and
    /// redialled within [`net::dead_after`] (2 × keepalive + 1 s).
    pub keepalive: Duration,
    /// Wall clock (Unix ms) used to stamp changes (their hybrid logical
    /// clock). The system clock by default; tests inject one that jumps.
    /// Policy time (schedule windows, budget days, `keep_local`,
    /// starvation) follows this clock too.
    pub clock: Clock,
    /// Policy classes from the config file: new classes (matched before the
    /// built-in ones, in this order) and overrides of `append`, `db` and
    /// `default` ([`policy::ClassSpec`]).
    pub classes: Vec<ClassSpec>,
    /// A class with pending changes gets a batch at least this often while
    /// higher-priority classes hold backlog (no class starves forever).
    pub starvation: Duration,
    /// Logical bytes of file versions per batch, beyond the first change:
    /// bounds how long a higher-priority change waits for a batch in flight.
    pub batch_data_bytes: u64,
    /// Disk watermarks; `None` disables pruning.
    pub disk: Option<DiskWatermarks>,
    /// How disk usage is measured (`df -Pk` by default; tests inject one,
    /// a simulator models full disks with it).
    pub disk_probe: DiskProbe,
    /// Random bytes for new epochs and a new device key: the system RNG
    /// when `None`. A deterministic simulation injects a seeded source.
    pub entropy: Option<Entropy>,
}

/// A source of random bytes: fills the buffer it is given.
pub type Entropy = std::sync::Arc<dyn Fn(&mut [u8]) + Send + Sync>;

/// A wall clock in Unix milliseconds.
pub type Clock = std::sync::Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    std::sync::Arc::new(store::now_ms)
}

impl AgentConfig {
    pub fn new(
        broker: impl Into<String>,
        device: &DeviceRef,
        watch: Vec<PathBuf>,
        state: impl Into<PathBuf>,
        key: TenantKey,
    ) -> AgentConfig {
        AgentConfig {
            broker: broker.into(),
            tenant: device.tenant.to_string(),
            site: device.site.to_string(),
            device: device.device.to_string(),
            watch,
            state: state.into(),
            key,
            scan_interval: Duration::from_secs(60),
            cipher: Cipher::for_this_cpu(),
            include: Vec::new(),
            exclude: Vec::new(),
            append_globs: policy::DEFAULT_APPEND_GLOBS.iter().map(|s| s.to_string()).collect(),
            db_globs: policy::DEFAULT_DB_GLOBS.iter().map(|s| s.to_string()).collect(),
            chunking: ChunkParams::default(),
            db_chunking: ChunkParams::DB,
            zstd_level: 3,
            append_zstd_level: 1,
            client: ClientConfig {
                data_bytes: 512 << 10,
                max_batch_bytes: 1 << 20,
                software: format!("edge-agent/{}", env!("CARGO_PKG_VERSION")),
                ..ClientConfig::default()
            },
            status_snapshot: true,
            keepalive: net::DEFAULT_KEEPALIVE,
            clock: system_clock(),
            classes: Vec::new(),
            starvation: Duration::from_secs(600),
            batch_data_bytes: 64 << 20,
            disk: None,
            disk_probe: policy::df_probe(),
            entropy: None,
        }
    }

    pub fn device_ref(&self) -> Result<DeviceRef> {
        Ok(DeviceRef::new(&self.tenant, &self.site, &self.device)?)
    }
}

/// Durability level `sync` waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WaitLevel {
    /// Fsynced at the aggregator.
    Regional,
    /// In the object store and catalog.
    Cloud,
}

impl WaitLevel {
    pub fn name(self) -> &'static str {
        match self {
            WaitLevel::Regional => "regional",
            WaitLevel::Cloud => "cloud",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct SyncReport {
    pub level: WaitLevel,
    pub scans: Vec<ScanReport>,
    /// Changes of the current epoch durable at `level` at the end.
    pub changes_durable: u64,
    pub wire_bytes_sent: u64,
    pub chunks_sent: u64,
    pub chunk_bytes_sent: u64,
    pub secs: f64,
}

/// Reads a tenant key file (`edge-agent keygen` format).
pub fn load_key(path: &Path) -> Result<TenantKey> {
    let err = |reason: String| Error::Key {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.len() > 4096 {
        return Err(err("too large to be a key file".into()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(key = %path.display(), "tenant key file is readable by group or others; chmod 600 it");
        }
    }
    TenantKey::parse(&text).map_err(|e| err(e.to_string()))
}

/// Generates a tenant key into a new file (mode 0600); refuses to overwrite.
pub fn write_new_key(path: &Path) -> Result<TenantKey> {
    use std::io::Write;
    let key = TenantKey::generate()?;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o.open(path).map_err(|e| Error::Key {
        path: path.to_path_buf(),
        reason: if e.kind() == std::io::ErrorKind::AlreadyExists {
            "already exists; refusing to overwrite a key (data sealed with it would become unreadable)".into()
        } else {
            e.to_string()
        },
    })?;
    f.write_all(key.to_file_string().as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(path, e))?;
    Ok(key)
}

/// Where a running agent writes its status snapshot.
pub fn snapshot_path(state: &Path) -> PathBuf {
    let mut s = state.as_os_str().to_owned();
    s.push(".status.json");
    PathBuf::from(s)
}

/// Status of a state file: read directly when no agent holds it, else from
/// the snapshot the running agent writes (`from_snapshot = true`).
pub fn read_status(state: &Path) -> Result<Status> {
    match Store::read_status(state) {
        Err(Error::Locked { path }) => {
            let snap = snapshot_path(state);
            let text = std::fs::read(&snap).map_err(|_| Error::Locked { path: path.clone() })?;
            let mut s: Status = serde_json::from_slice(&text).map_err(|e| Error::Corrupt {
                what: "status snapshot",
                detail: format!("{}: {e}", snap.display()),
            })?;
            s.from_snapshot = true;
            // The age in the snapshot was computed when it was written; a
            // stalled daemon must not show a frozen backlog age.
            if let Some(t) = s.oldest_pending_recorded_ms {
                s.oldest_pending_age_secs = Some(store::now_ms().saturating_sub(t) / 1000);
            }
            Ok(s)
        }
        other => other,
    }
}

/// How long an agent waits for a state file another process holds when it
/// opens it. `edge-agent status` opens the file read-only for a few
/// milliseconds (a shared lock): an agent starting in that instant must wait
/// for it, not exit with "in use by another process". A running agent holds
/// the file for good, so a second agent still fails, after this wait.
pub const OPEN_LOCK_WAIT: Duration = Duration::from_secs(5);

/// Runs `open` until it returns something other than [`Error::Locked`], for
/// at most `wait` (pausing 10 ms, doubling to 200 ms, between tries).
pub fn open_waiting<T>(wait: Duration, mut open: impl FnMut() -> Result<T>) -> Result<T> {
    let start = std::time::Instant::now();
    let mut pause = Duration::from_millis(10);
    loop {
        match open() {
            Err(Error::Locked { .. }) if start.elapsed() < wait => {
                std::thread::sleep(pause.min(wait.saturating_sub(start.elapsed())));
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

/// One device's agent: state, sealing, scanning, and the sync store.
pub struct Agent {
    cfg: AgentConfig,
    pub(crate) store: Store,
    pub(crate) sealer: Sealer,
    /// Sealer for the other cipher, for chunks sealed before a cipher change.
    other_sealer: Option<Sealer>,
    pub(crate) policy: Policy,
    pub(crate) roots: Vec<Root>,
    /// One chunker per policy class (same order as `policy.classes`).
    pub(crate) chunkers: Vec<chunker::Chunker>,
    pub(crate) seal_buf: Vec<u8>,
    pub(crate) read_buf: Vec<u8>,
    pub(crate) sched: sched::Sched,
    /// The last disk watermark check.
    pub(crate) disk_status: Option<store::DiskStatus>,
}

impl Agent {
    /// Opens the agent on its state file `cfg.state`.
    pub fn open(cfg: AgentConfig) -> Result<Agent> {
        Agent::open_inner(cfg, None)
    }

    /// Opens the agent with its redb database on `backend` instead of the
    /// state file (a simulator's in-memory backend that may lose unsynced
    /// writes). `cfg.state` still names the device key file
    /// (`<state>.device-key`) and the status snapshot; watch folders are
    /// real directories. Everything else (repair after a crash, identity,
    /// epoch detection) behaves as with a file. See [`driver`] for the
    /// calls a single-threaded driver makes.
    pub fn open_with_backend(cfg: AgentConfig, backend: Box<dyn redb::StorageBackend>) -> Result<Agent> {
        Agent::open_inner(cfg, Some(backend))
    }

    fn open_inner(cfg: AgentConfig, backend: Option<Box<dyn redb::StorageBackend>>) -> Result<Agent> {
        let device = cfg.device_ref()?;
        if cfg.watch.is_empty() {
            return Err(Error::Config("at least one --watch directory is needed".into()));
        }
        let roots = policy::roots(&cfg.watch)?;
        let policy = Policy::build(
            &cfg.include,
            &cfg.exclude,
            &policy::Builtins {
                append_globs: &cfg.append_globs,
                db_globs: &cfg.db_globs,
                chunking: cfg.chunking,
                db_chunking: cfg.db_chunking,
                zstd_level: cfg.zstd_level,
                append_zstd_level: cfg.append_zstd_level,
            },
            &cfg.classes,
        )?;
        let chunkers = policy
            .classes
            .iter()
            .map(|c| chunker::Chunker::new(c.chunking).map(|k| k.with_sqlite_pages(c.sqlite_pages)))
            .collect::<Result<Vec<_>>>()?;
        let opts = |backend| store::StoreOptions {
            backend,
            clock: cfg.clock.clone(),
            entropy: cfg.entropy.clone(),
        };
        let store = match backend {
            Some(b) => Store::open_with(&cfg.state, &device, opts(Some(b)))?,
            None => open_waiting(OPEN_LOCK_WAIT, || Store::open_with(&cfg.state, &device, opts(None)))?,
        };
        let sched = sched::Sched::new(&policy, (cfg.clock)());
        let sealer = Sealer::new(&cfg.key, cfg.cipher)?;
        tracing::info!(replica = %store.replica(), next_seq = store.next_seq(), "state opened");
        Ok(Agent {
            store,
            sealer,
            other_sealer: None,
            policy,
            roots,
            chunkers,
            seal_buf: Vec::new(),
            read_buf: Vec::new(),
            sched,
            disk_status: None,
            cfg,
        })
    }

    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }
    /// Durable commit of everything recorded so far and the counters (the
    /// daemon does this every 5 s; `pending` and `scan_once` flush too).
    pub fn flush(&mut self) -> Result<()> {
        self.store.flush()
    }
    /// Files must be scanned again soon (a change was superseded, a new
    /// epoch started, a pruned file could not be deleted): the driver should
    /// call [`Agent::scan_once`] without waiting for the scan interval.
    pub fn rescan_needed(&self) -> bool {
        self.store.rescan
    }
    /// The next seq this replica will hand out (`next_seq - 1` recorded).
    pub fn next_seq(&self) -> u64 {
        self.store.next_seq()
    }
    /// The highest seq of this epoch that ever left the device.
    pub fn offered(&self) -> u64 {
        self.store.offered()
    }
    /// Persisted (regional, cloud) knowledge of this device.
    pub fn knowledge(&self) -> (&Knowledge, &Knowledge) {
        (self.store.regional(), self.store.cloud())
    }
    /// Drops the agent like a crashed process: no final flush of the
    /// unflushed (non-durable) commits. redb itself still closes the
    /// backend, so a simulator should stop its backend from accepting
    /// writes (and drop what was not synced) before calling this.
    pub fn crash(mut self) {
        self.store.forget_unflushed();
    }
    pub fn replica(&self) -> ReplicaId {
        self.store.replica()
    }
    /// The device's Ed25519 public key (what the sink pins).
    pub fn public_key(&self) -> Vec<u8> {
        self.store.public_key()
    }
    /// The resolved policy (classes in matching order).
    pub fn policy(&self) -> &Policy {
        &self.policy
    }
    /// Index of a policy class by name.
    pub fn class_index(&self, name: &str) -> Option<usize> {
        self.policy.classes.iter().position(|c| c.name == name)
    }
    /// The record of a file the disk watermarks pruned (and that was not
    /// recorded again since).
    pub fn pruned(&self, path: &str) -> Result<Option<store::PrunedFile>> {
        self.store.pruned(path)
    }
    /// The last disk watermark check of this process.
    pub fn disk_status(&self) -> Option<&store::DiskStatus> {
        self.disk_status.as_ref()
    }
    pub fn counters(&self) -> &Counters {
        &self.store.counters
    }
    pub fn status(&self) -> Result<Status> {
        self.store.status()
    }
    /// The stored version vector (and policy) of a shared path.
    pub fn shared_state(&self, path: &str) -> Result<Option<protocol::shared::Shared>> {
        self.store.shared_state(path)
    }
    /// Merged server changes: (target, gseq, state), in target order.
    pub fn server_states(&self) -> Result<Vec<(String, u64, protocol::meta::ServerBody)>> {
        self.store.server_states()
    }

    /// Runs until `shutdown` resolves: scans every `scan_interval`, syncs
    /// whenever the broker is reachable. Persists counters on the way out.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        net::drive(&mut self, net::Mode::Run, shutdown).await.map(|_| ())
    }

    /// Scans once, then syncs until every recorded change is durable at
    /// `wait`, or fails with `Error::Timeout` after `timeout`.
    pub async fn sync(mut self, wait: WaitLevel, timeout: Duration) -> Result<SyncReport> {
        let shutdown = std::future::pending::<()>();
        net::drive(&mut self, net::Mode::Sync { wait, timeout }, shutdown).await
    }

    /// Writes the status snapshot next to the state file (atomically), so
    /// [`read_status`] works while this agent holds the state file. `run`
    /// and `sync` do this every few seconds; embedders may call it too.
    pub fn write_snapshot(&self) -> Result<()> {
        if !self.cfg.status_snapshot {
            return Ok(());
        }
        let s = self.status()?;
        let path = snapshot_path(&self.cfg.state);
        let tmp = snapshot_path(&self.cfg.state.with_extension("tmp"));
        let json = serde_json::to_vec_pretty(&s).map_err(|e| Error::Config(e.to_string()))?;
        std::fs::write(&tmp, json)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| Error::io(&path, e))
    }

    /// Stored bytes of chunk `id` of `change`, re-read from the file and
    /// resealed exactly as when it was first sealed.
    fn read_chunk(&mut self, change: &Change, id: &Hash32) -> Result<Option<Vec<u8>>> {
        let ChangeBody::File(f) = &change.body else {
            return Ok(None);
        };
        let mut off = 0u64;
        let mut len = None;
        for c in &f.chunks {
            if c.id == *id {
                len = Some(c.len);
                break;
            }
            off += u64::from(c.len);
        }
        let (Some(len), Some(path)) = (len, policy::fs_path(&self.roots, &f.path)) else {
            return Ok(None);
        };
        // A delta chunk's base is gone from the file: its stored bytes were
        // kept at scan time.
        if let Some(bytes) = self.store.sealed_chunk(id)? {
            let ci = self.policy.class_idx(&f.path);
            self.sched.charges.push((ci, bytes.len() as u64));
            return Ok(Some(bytes));
        }
        if f.is_link() {
            // A symbolic link's content is its target, read again now.
            use std::os::unix::ffi::OsStringExt;
            let target = match std::fs::read_link(&path) {
                Ok(t) => t.into_os_string().into_vec(),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidInput
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(Error::io(path, e)),
            };
            let Some(part) = usize::try_from(off)
                .ok()
                .and_then(|o| target.get(o..o.checked_add(len as usize)?))
            else {
                return Ok(None);
            };
            self.read_buf.clear();
            self.read_buf.extend_from_slice(part);
        } else {
            let mut file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(Error::io(path, e)),
            };
            self.read_buf.resize(len as usize, 0);
            match file
                .seek(SeekFrom::Start(off))
                .and_then(|_| file.read_exact(&mut self.read_buf))
            {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(Error::io(path, e)),
            }
        }
        self.store.counters.bytes_read += u64::from(len);
        let tag = self.sealer.index_tag(&self.read_buf);
        let mut found = self.store.known_reader()?.get(&tag)?;
        if found.is_none() && self.store.has_legacy_known()? {
            // Recorded by an agent before keyed-BLAKE3 tags.
            found = self.store.legacy_known(&self.sealer.legacy_index_tag(&self.read_buf))?;
        }
        let (level, cipher, base) = match found {
            Some(k) if k.id == *id => (k.level, k.cipher, k.base),
            Some(_) => return Ok(None), // these bytes were sealed as another chunk
            None => (self.policy.level(&f.class), self.sealer.cipher() as u8, None),
        };
        if base.is_some_and(|b| b.delta) {
            // Its sealed copy is gone (sent and dropped), and it cannot be
            // remade without its base: forget it, so the rescan that follows
            // the supersede seals this page afresh.
            self.store.forget_known(&tag)?;
            return Ok(None);
        }
        // An extension's base is its own prefix; a shorter read cannot hold it.
        if base.is_some_and(|b| b.len as usize >= self.read_buf.len()) {
            return Ok(None);
        }
        let sealer = if cipher == self.sealer.cipher() as u8 {
            &mut self.sealer
        } else {
            let c = match cipher {
                1 => Cipher::Aes256Gcm,
                2 => Cipher::ChaCha20Poly1305,
                _ => return Ok(None),
            };
            match &mut self.other_sealer {
                Some(s) if s.cipher() == c => s,
                slot => slot.insert(Sealer::new(&self.cfg.key, c)?),
            }
        };
        let got = sealer.seal_with_base(&self.read_buf, level, base, &mut self.seal_buf)?;
        if got != *id {
            return Ok(None);
        }
        let bytes = std::mem::take(&mut self.seal_buf);
        let ci = self.policy.class_idx(&f.path);
        self.sched.charges.push((ci, bytes.len() as u64));
        Ok(Some(bytes))
    }
}

fn store_err(e: Error) -> protocol::Error {
    match e {
        Error::Protocol(p) => p,
        e => protocol::Error::Store(e.to_string()),
    }
}

impl ClientStore for Agent {
    fn device(&self) -> DeviceRef {
        self.store.device().clone()
    }
    fn replica(&self) -> ReplicaId {
        self.store.replica()
    }
    fn pending(&mut self, have: &Knowledge, max: usize, max_bytes: usize) -> protocol::Result<Vec<Change>> {
        self.pending_by_policy(have, max, max_bytes).map_err(store_err)
    }
    fn chunk(&mut self, change: &Change, id: &Hash32) -> protocol::Result<Option<Vec<u8>>> {
        self.read_chunk(change, id).map_err(store_err)
    }
    fn supersede(&mut self, change: &Change) -> protocol::Result<()> {
        tracing::info!(change = %change.label(), "file changed before its chunks were sent; superseded");
        let now = (self.cfg.clock)();
        self.store.supersede(change, now).map_err(store_err)
    }
    fn on_knowledge(&mut self, regional: &Knowledge, cloud: &Knowledge) -> protocol::Result<()> {
        let now = (self.cfg.clock)();
        self.store
            .on_knowledge(regional, cloud, now)
            .map(|_| ())
            .map_err(store_err)
    }
    fn server_cursor(&self) -> u64 {
        self.store.server_cursor()
    }
    fn on_server_changes(&mut self, items: &[ServerChange], upto: Option<u64>) -> protocol::Result<()> {
        let now = (self.cfg.clock)();
        self.store
            .on_server_changes(items, upto, now)
            .map(|n| tracing::info!(merged = n, upto, cursor = self.store.server_cursor(), "server changes"))
            .map_err(store_err)
    }
}
