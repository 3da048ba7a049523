//! The nodes the simulator drives: each wraps the real code of a daemon.
//!
//! - [`AgentNode`]: a real `edge_agent::Agent` (scanning a real watch
//!   folder, sealing, its real redb schema) and a real
//!   `protocol::client::ClientSession`, exactly the pair `edge-agent`'s
//!   network loop drives, but fed virtual time and simulated messages.
//! - [`AggNode`]: `protocol::server::Server` on the real
//!   `aggregator::store::AggStore` (redb on a [`CrashBackend`]) and the
//!   real sans-IO forwarder `aggregator::forward::ForwardCore`.
//! - [`CloudNode`]: `protocol::server::Server` on the real
//!   `cloud_sink::store::SinkStore` and catalog (redb on a [`CrashBackend`],
//!   virtual clock) over `cloud_sink::objects::Objects` on an in-memory object store
//!   that injects errors during sink faults.

use super::core::{Ms, EPOCH_UNIX_MS};
use super::faultstore::FaultStore;
use aggregator::forward::ForwardCore;
use aggregator::store::{AggStore, StoreClock, StoreConfig};
use aggregator::{AggConfig, AggStats};
use anyhow::{anyhow, Context, Result};
use cloud_sink::catalog::Catalog;
use cloud_sink::objects::Objects;
use cloud_sink::store::SinkStore;
use cloud_sink::SinkClock;
use edge_agent::{Agent, AgentConfig, ClassSpec, DiskStat, DiskWatermarks, Watermark};
use protocol::client::{ClientConfig, ClientSession};
use protocol::msg::Message;
use protocol::seal::{Cipher, TenantKey};
use protocol::server::{Peer, Server, ServerConfig};
use protocol::{DeviceRef, Hash32};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use super::backend::CrashBackend;
use super::core::VClock;
use rand::RngCore;
use rand_chacha::ChaCha8Rng;
use std::sync::Mutex;

/// Per-agent clock skew (ms) applied on top of virtual time.
#[derive(Clone, Default)]
pub struct Skew(pub Arc<AtomicI64>);

impl Skew {
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
    pub fn add(&self, d: i64) {
        self.0.fetch_add(d, Ordering::Relaxed);
    }
}

/// Unix ms a node sees at virtual time `t` with skew `s`.
pub fn wall(t: Ms, s: i64) -> u64 {
    (EPOCH_UNIX_MS as i64 + t as i64 + s).max(0) as u64
}

pub struct AgentNode {
    pub agent: Agent,
    pub session: ClientSession,
}

pub struct AgentSetup {
    /// The agent's redb file: survives crashes as far as it was synced.
    pub disk: CrashBackend,
    /// Seeded entropy (epochs, device key).
    pub entropy: Arc<Mutex<ChaCha8Rng>>,
    pub device: DeviceRef,
    pub watch: PathBuf,
    pub state: PathBuf,
    pub key: TenantKey,
    pub clock: VClock,
    pub skew: Skew,
    pub shared_globs: Vec<String>,
    /// (capacity bytes, high % used, low % used): disk watermarks and a
    /// probe measuring the watch folder plus the state file.
    pub edge_disk: Option<(u64, f64, f64)>,
}

impl AgentNode {
    pub fn open(s: &AgentSetup, first_batch_id: u64) -> Result<AgentNode> {
        let mut cfg = AgentConfig::new("sim", &s.device, vec![s.watch.clone()], &s.state, s.key.clone());
        // One cipher everywhere, so sealed bytes (and a run) do not depend on the CPU.
        cfg.cipher = Cipher::ChaCha20Poly1305;
        cfg.status_snapshot = false;
        let (clock, skew) = (s.clock.clone(), s.skew.clone());
        cfg.clock = Arc::new(move || wall(clock.now(), skew.get()));
        if !s.shared_globs.is_empty() {
            cfg.classes.push(ClassSpec {
                name: "shared".into(),
                globs: Some(s.shared_globs.clone()),
                shared: Some(true),
                conflict: Some("last-writer-wins".into()),
                ..ClassSpec::default()
            });
        }
        if let Some((cap, high, low)) = s.edge_disk {
            cfg.disk = Some(DiskWatermarks::new(Watermark::UsedPct(high), Watermark::UsedPct(low))?);
            let (watch, disk) = (s.watch.clone(), s.disk.clone());
            cfg.disk_probe = Arc::new(move |_: &Path| {
                let files: u64 = walkdir::WalkDir::new(&watch)
                    .into_iter()
                    .filter_map(|e| e.ok())
                    .filter_map(|e| e.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum();
                Ok(DiskStat {
                    total: cap,
                    free: cap.saturating_sub(files + disk.size()),
                })
            });
        }
        let ent = s.entropy.clone();
        cfg.entropy = Some(Arc::new(move |buf: &mut [u8]| {
            if let Ok(mut r) = ent.lock() {
                r.fill_bytes(buf)
            }
        }));
        // Virtual time: the same timeouts the daemon uses.
        let client: ClientConfig = cfg.client.clone();
        let agent = Agent::open_with_backend(cfg, Box::new(s.disk.reopen()))
            .with_context(|| format!("opening agent {}", s.device))?;
        Ok(AgentNode {
            agent,
            session: ClientSession::new(client, first_batch_id),
        })
    }
}

pub struct AggNode {
    pub server: Server,
    pub store: AggStore,
    /// The real forwarder logic (`aggregator::forward::ForwardCore`).
    pub core: ForwardCore,
}

impl AggNode {
    /// Opens the aggregator's store on `disk` (redb) and `dir` (pack files),
    /// with the store clock on virtual time.
    pub fn open(
        dir: &Path,
        disk: &CrashBackend,
        id: usize,
        clock: VClock,
        pack_max_delay: Ms,
        ack_before_fsync: bool,
    ) -> Result<AggNode> {
        let cfg = StoreConfig {
            unsafe_ack_before_fsync: ack_before_fsync,
            pack_target: 4 << 20,
            cache_bytes: 4 << 20,
            clock: StoreClock(Arc::new(move || wall(clock.now(), 0))),
            ..StoreConfig::default()
        };
        let store = AggStore::open_with_backend(dir, cfg, Box::new(disk.reopen()))
            .with_context(|| format!("opening aggregator store {}", dir.display()))?;
        let mut acfg = AggConfig::new("sim", "sim", dir.to_path_buf());
        acfg.id = format!("agg{id}");
        acfg.pack_max_delay = std::time::Duration::from_millis(pack_max_delay);
        let core = ForwardCore::new(&acfg, Arc::new(AggStats::default()));
        Ok(AggNode {
            server: Server::new(ServerConfig::default()),
            store,
            core,
        })
    }

    /// Handles one message from an agent (the topic vouches for `device`).
    pub fn handle(&mut self, now: Ms, device: &DeviceRef, msg: Message) -> Result<Vec<Message>> {
        let name = device.key();
        let peer = Peer {
            name: &name,
            device: Some(device),
        };
        let mut st = &self.store;
        Ok(self.server.handle(wall(now, 0), &peer, msg, &mut st)?)
    }
}

pub struct CloudNode {
    /// Kept alive for the store's handle (`SinkStore` blocks on it).
    _rt: tokio::runtime::Runtime,
    pub catalog: Arc<Catalog>,
    /// The object store (in memory), which fails writes on demand.
    pub objects: Arc<FaultStore>,
    server: Server,
    store: SinkStore,
}

impl CloudNode {
    /// The catalog on `disk` (a [`CrashBackend`]: a cloud crash loses what
    /// the catalog did not sync) with its clock on virtual time, objects in
    /// `objects` (in memory, a separate durable service that survives the
    /// node's crashes). The tokio runtime has no I/O or timer driver: the
    /// in-memory store's futures complete at once under `block_on`.
    pub fn open(clock: VClock, disk: &CrashBackend, objects: Arc<FaultStore>) -> Result<CloudNode> {
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        let catalog = Catalog::open_with_backend(Box::new(disk.reopen()))
            .context("opening the cloud catalog")?
            .with_clock(SinkClock::from_ms(move || wall(clock.now(), 0)));
        let catalog = Arc::new(catalog);
        let store = SinkStore::new(
            catalog.clone(),
            Objects::with_store(objects.clone()),
            rt.handle().clone(),
        );
        Ok(CloudNode {
            _rt: rt,
            catalog,
            objects,
            server: Server::new(ServerConfig::default()),
            store,
        })
    }

    /// `POST /v1/sync`: the first reply; a Nack is an error (HTTP 422).
    pub fn sync(&mut self, now: Ms, m: &Message) -> Result<Message> {
        let peer = Peer {
            name: "aggregator",
            device: None,
        };
        let replies = self.server.handle(wall(now, 0), &peer, m.clone(), &mut self.store)?;
        match replies.into_iter().next() {
            Some(Message::Nack(n)) => Err(anyhow!("sink refused: {}", n.reason)),
            Some(m) => Ok(m),
            None => Err(anyhow!("sink gave no answer")),
        }
    }

    /// `PUT /v1/packs/{id}`.
    pub fn put_pack(&mut self, id: Hash32, bytes: Vec<u8>) -> Result<()> {
        self.store.put_pack(id, bytes.into())?;
        Ok(())
    }
}
