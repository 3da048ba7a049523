//! The nodes the simulator drives: each wraps the real code of a daemon.
//!
//! - [`AgentNode`]: a real `edge_agent::Agent` (scanning a real watch
//!   folder, sealing, its real redb schema) and a real
//!   `protocol::client::ClientSession`, exactly the pair `edge-agent`'s
//!   network loop drives, but fed virtual time and simulated messages.
//! - [`AggNode`]: `protocol::server::Server` on the real
//!   `aggregator::store::AggStore`, plus a forward round to the cloud
//!   written against `AggStore`'s public API (the same steps as
//!   `aggregator::forward::Forwarder::round`, but synchronous).
//! - [`CloudNode`]: `protocol::server::Server` on the real
//!   `cloud_sink::store::SinkStore`, catalog and object store, driven on a
//!   current-thread tokio runtime with `block_on` (no I/O races).

use super::core::{Ms, EPOCH_UNIX_MS};
use aggregator::store::{AggStore, ChunkBytes, StoreConfig};
use anyhow::{anyhow, Context, Result};
use cloud_sink::catalog::Catalog;
use cloud_sink::objects::Objects;
use cloud_sink::store::SinkStore;
use edge_agent::{Agent, AgentConfig, ClassSpec};
use protocol::client::{ClientConfig, ClientSession};
use protocol::msg::{Batch, Commit, Hello, Message, MAX_MESSAGE};
use protocol::pack::PackBuilder;
use protocol::seal::{Cipher, TenantKey};
use protocol::server::{Peer, Server, ServerConfig};
use protocol::{DeviceRef, Hash32, Knowledge};
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
    pub hello_done: bool,
    pub batches: u64,
    /// Virtual time the open pack was last closed.
    pub last_close: Ms,
}

impl AggNode {
    pub fn open(dir: &Path, salt: u64, now: Ms) -> Result<AggNode> {
        let cfg = StoreConfig {
            pack_target: 4 << 20,
            cache_bytes: 4 << 20,
            ..StoreConfig::default()
        };
        let store = AggStore::open(dir, cfg).with_context(|| format!("opening aggregator store {}", dir.display()))?;
        Ok(AggNode {
            server: Server::new(ServerConfig::default()),
            store,
            hello_done: false,
            batches: salt << 32,
            last_close: now,
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

/// What one forward round did.
#[derive(Default, Debug)]
pub struct RoundOutcome {
    pub packs: u64,
    pub pack_bytes: u64,
    pub applied: u64,
    pub progress: bool,
    /// Devices whose cloud knowledge grew, with it (to send as CloudAck).
    pub acks: Vec<(DeviceRef, Knowledge)>,
}

/// The cloud as the aggregator sees it: requests that may fail.
pub trait Cloud {
    fn sync(&mut self, now: Ms, m: &Message) -> Result<Message>;
    fn put_pack(&mut self, id: Hash32, bytes: Vec<u8>) -> Result<()>;
}

const FWD_MAX_BATCH: usize = 512;
const FWD_MAX_BATCH_BYTES: usize = MAX_MESSAGE / 2;
const FWD_SCAN: usize = 50_000;

impl AggNode {
    /// One forward round (`aggregator::forward::Forwarder::round`): close the
    /// open pack if changes have waited `max_delay`, upload closed packs, then
    /// offer ready changes. An error means: back off, try again next round.
    pub fn forward_round(&mut self, now: Ms, max_delay: Ms, cloud: &mut dyn Cloud) -> Result<RoundOutcome> {
        let mut out = RoundOutcome::default();
        if now.saturating_sub(self.last_close) >= max_delay && self.store.forward_len()? > 0 {
            self.store.close_open_pack()?;
            self.last_close = now;
        }
        for p in self.store.closed_packs()? {
            let body = std::fs::read(&p.path).with_context(|| format!("reading {}", p.path.display()))?;
            out.pack_bytes += body.len() as u64;
            cloud.put_pack(p.id, body)?;
            self.store.mark_uploaded(&p)?;
            out.packs += 1;
            out.progress = true;
        }
        let batch = self.store.ready_changes(FWD_MAX_BATCH, FWD_MAX_BATCH_BYTES, FWD_SCAN)?;
        if batch.is_empty() {
            return Ok(out);
        }
        if !self.hello_done {
            let hello = Message::Hello(Hello {
                proto: protocol::PROTO_VERSION,
                device: None,
                replica: None,
                software: "aggregator/sim".into(),
                server_cursor: None,
            });
            match cloud.sync(now, &hello)? {
                Message::Knowledge(_) => self.hello_done = true,
                other => return Err(anyhow!("hello answered with {}", other.kind())),
            }
        }
        self.batches += 1;
        let batch_id = self.batches;
        let changes: Vec<_> = batch.iter().map(|q| q.change.clone()).collect();
        let prepare = match cloud.sync(now, &Message::Batch(Batch { batch_id, changes }))? {
            Message::Prepare(p) if p.batch_id == batch_id => p,
            other => return Err(anyhow!("batch answered with {}", other.kind())),
        };
        if prepare.retry_after_ms > 0 {
            return Ok(out);
        }
        if !prepare.missing.is_empty() {
            let mut pb = PackBuilder::new();
            for id in &prepare.missing {
                if let ChunkBytes::Local(b) = self.store.read_chunk(id)? {
                    pb.push(*id, &b);
                }
            }
            if !pb.is_empty() {
                let (pid, body, _) = pb.finish();
                out.pack_bytes += body.len() as u64;
                cloud.put_pack(pid, body)?;
            }
        }
        let committed = match cloud.sync(now, &Message::Commit(Commit { batch_id }))? {
            Message::Committed(c) if c.batch_id == batch_id => c,
            other => return Err(anyhow!("commit answered with {}", other.kind())),
        };
        if committed.results.is_empty() {
            self.hello_done = false;
            return Err(anyhow!("sink did not know batch {batch_id}"));
        }
        let conf = self.store.confirm(
            &batch,
            &committed.results,
            &prepare.rejected,
            &[&committed.regional, &committed.cloud],
        )?;
        out.applied += conf.applied as u64;
        out.progress |= conf.applied > 0;
        for d in conf.devices {
            let k = self.store.cloud_knowledge(&d)?;
            out.acks.push((d, k));
        }
        if conf.applied == 0 && conf.missing > 0 {
            return Err(anyhow!(
                "{} forwarded changes still lack chunks at the sink",
                conf.missing
            ));
        }
        Ok(out)
    }
}

pub struct CloudNode {
    rt: tokio::runtime::Runtime,
    pub catalog: Arc<Catalog>,
    objects: Objects,
    server: Server,
    store: SinkStore,
    pub dir: PathBuf,
}

impl CloudNode {
    pub fn open(dir: &Path) -> Result<CloudNode> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::fs::create_dir_all(dir)?;
        let catalog = Arc::new(Catalog::open(&cloud_sink::store::catalog_path(dir))?);
        let objects = Objects::open_local(&dir.join(cloud_sink::store::OBJECTS_DIR))?;
        let store = SinkStore::new(catalog.clone(), objects.clone(), rt.handle().clone());
        Ok(CloudNode {
            rt,
            catalog,
            objects,
            server: Server::new(ServerConfig::default()),
            store,
            dir: dir.to_path_buf(),
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
        let (cat, obj) = (self.catalog.clone(), self.objects.clone());
        self.rt
            .block_on(async move { cloud_sink::store::put_pack(&cat, &obj, id, bytes.into()).await })?;
        Ok(())
    }
}
