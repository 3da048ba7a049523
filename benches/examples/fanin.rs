//! Aggregator fan-in load generator: many lightweight simulated agents in one
//! process, each with its own MQTT v5 connection (rumqttc) to a real broker,
//! speaking the real protocol (`protocol::client::ClientSession`) with real
//! sealed chunks (zstd + AES-256-GCM, `protocol::seal::Sealer`) and
//! Ed25519-signed changes. Used by `benches/scale.sh`; see BENCHMARKS.md §8.
//!
//! ```sh
//! cargo run --release -p benches --example fanin -- \
//!     --broker mqtt://127.0.0.1:1883 --agents 1000 --files 2 --chunks 4 --chunk-kib 64
//! ```
//!
//! Every agent's data is sealed in memory before the clock starts (every
//! chunk is unique, so cross-device dedup does not shrink the load). Then the
//! agents connect (at most `--connect-rate` per second), Hello, and offer
//! their changes all at once. The run ends when every agent's changes are
//! durable at the aggregator (regional knowledge) and, with `--wait-cloud`,
//! in the cloud. With `--pids name=PID,...` it samples those processes' CPU
//! time and peak RSS (VmHWM) from /proc.
//!
//! It prints one JSON object on stdout; progress goes to stderr.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use protocol::client::{ClientConfig, ClientSession, ClientStore};
use protocol::hlc::Hlc;
use protocol::manifest::{Change, ChangeBody, ChunkRef, FileVersion};
use protocol::msg::{Message, MQTT_MAX_PACKET};
use protocol::seal::{Cipher, Sealer, TenantKey};
use protocol::{topic, DeviceRef, Hash32, Knowledge, ReplicaId};
use rand::RngCore;
use ring::rand::SystemRandom;
use ring::signature::Ed25519KeyPair;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// mqtt://HOST:PORT
    #[arg(long)]
    broker: String,
    /// Concurrent simulated agents (one MQTT connection each).
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Files (changes) per agent.
    #[arg(long, default_value_t = 2)]
    files: usize,
    /// Chunks per file.
    #[arg(long, default_value_t = 4)]
    chunks: usize,
    /// Plaintext bytes per chunk, KiB (random, so sealed ≈ plaintext).
    #[arg(long, default_value_t = 64)]
    chunk_kib: usize,
    /// New connections per second.
    #[arg(long, default_value_t = 500)]
    connect_rate: u64,
    /// Also wait until every change is durable in the cloud.
    #[arg(long)]
    wait_cloud: bool,
    /// Give up after this many seconds (agents not done are counted).
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Tenant (device ids are a000000, a000001, …).
    #[arg(long, default_value = "bench")]
    tenant: String,
    /// Site id: use a new one per run so devices are new to the sink.
    #[arg(long, default_value = "fanin")]
    site: String,
    /// Processes to sample: name=PID,name=PID (CPU seconds and VmHWM).
    #[arg(long, default_value = "")]
    pids: String,
    /// Protocol response timeout (ms) of each simulated agent.
    #[arg(long, default_value_t = 30_000)]
    response_timeout_ms: u64,
}

/// One simulated agent's store: every change and sealed chunk in memory.
struct SimStore {
    replica: ReplicaId,
    changes: Vec<Change>,
    /// Encoded size estimate of each change, for `max_bytes`.
    sizes: Vec<usize>,
    chunks: HashMap<Hash32, Bytes>,
    /// Sealed bytes per change.
    change_bytes: Vec<u64>,
    regional_done: usize,
    cloud_done: usize,
    shared: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    regional_bytes: AtomicU64,
    cloud_bytes: AtomicU64,
    connected: AtomicU64,
    regional_agents: AtomicU64,
    cloud_agents: AtomicU64,
    failed: AtomicU64,
}

impl SimStore {
    /// Counts changes newly covered by `k` (contiguous from seq 1).
    fn advance(&self, k: &Knowledge, done: usize) -> (usize, u64) {
        let set = k.get(&self.replica);
        let mut n = done;
        let mut bytes = 0;
        while n < self.changes.len() && set.contains(self.changes[n].seq) {
            bytes += self.change_bytes[n];
            n += 1;
        }
        (n, bytes)
    }
}

impl ClientStore for SimStore {
    fn device(&self) -> DeviceRef {
        self.replica.device.clone()
    }
    fn replica(&self) -> ReplicaId {
        self.replica.clone()
    }
    fn pending(&mut self, have: &Knowledge, max: usize, max_bytes: usize) -> protocol::Result<Vec<Change>> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for (c, sz) in self.changes.iter().zip(&self.sizes) {
            if have.contains(&self.replica, c.seq) {
                continue;
            }
            if !out.is_empty() && (out.len() >= max || bytes + sz > max_bytes) {
                break;
            }
            bytes += sz;
            out.push(c.clone());
        }
        Ok(out)
    }
    fn chunk(&mut self, _change: &Change, id: &Hash32) -> protocol::Result<Option<Vec<u8>>> {
        Ok(self.chunks.get(id).map(|b| b.to_vec()))
    }
    fn supersede(&mut self, _change: &Change) -> protocol::Result<()> {
        Ok(())
    }
    fn on_knowledge(&mut self, regional: &Knowledge, cloud: &Knowledge) -> protocol::Result<()> {
        let mut both = regional.clone();
        both.union_with(cloud);
        let (n, b) = self.advance(&both, self.regional_done);
        if n > self.regional_done {
            self.shared.regional_bytes.fetch_add(b, Ordering::Relaxed);
            self.regional_done = n;
            if n == self.changes.len() {
                self.shared.regional_agents.fetch_add(1, Ordering::Relaxed);
            }
        }
        let (n, b) = self.advance(cloud, self.cloud_done);
        if n > self.cloud_done {
            self.shared.cloud_bytes.fetch_add(b, Ordering::Relaxed);
            self.cloud_done = n;
            if n == self.changes.len() {
                self.shared.cloud_agents.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// Builds one agent's changes: `files` files of `chunks` unique random chunks.
fn build_agent(args: &Args, i: usize, sealer: &mut Sealer, base: &[u8], shared: Arc<Counters>) -> Result<SimStore> {
    let dev = DeviceRef::new(&args.tenant, &args.site, &format!("a{i:06}")).context("device id")?;
    let replica = ReplicaId { device: dev, epoch: 1 };
    let rng = SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| anyhow::anyhow!("ed25519 keygen"))?;
    let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| anyhow::anyhow!("ed25519 key"))?;
    let mut plain = base.to_vec();
    let mut changes = Vec::new();
    let mut sizes = Vec::new();
    let mut chunks = HashMap::new();
    let mut change_bytes = Vec::new();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    for f in 0..args.files {
        let mut refs = Vec::new();
        let mut sealed_total = 0u64;
        for c in 0..args.chunks {
            // Unique plaintext per (agent, file, chunk).
            plain[..8].copy_from_slice(&(i as u64).to_le_bytes());
            plain[8..16].copy_from_slice(&(f as u64).to_le_bytes());
            plain[16..24].copy_from_slice(&(c as u64).to_le_bytes());
            let mut out = Vec::new();
            let id = sealer.seal(&plain, 1, &mut out)?;
            sealed_total += out.len() as u64;
            chunks.insert(id, Bytes::from(out));
            refs.push(ChunkRef {
                id,
                len: plain.len() as u32,
            });
        }
        let size = (plain.len() * args.chunks) as u64;
        let body = ChangeBody::File(FileVersion {
            path: format!("archive/f{f:05}.bin"),
            size,
            mtime_ns: now_ms as i64 * 1_000_000,
            class: "default".into(),
            chunks: refs,
            sha256: Hash32::of(&(f as u64).to_le_bytes()),
            mode: 0o100644,
        });
        let seq = f as u64 + 1;
        let ch = Change::sign(replica.clone(), seq, Hlc::from_parts(now_ms, seq as u16), body, &key);
        sizes.push(protocol::to_cbor(&ch).len());
        changes.push(ch);
        change_bytes.push(sealed_total);
    }
    Ok(SimStore {
        replica,
        changes,
        sizes,
        chunks,
        change_bytes,
        regional_done: 0,
        cloud_done: 0,
        shared,
    })
}

enum Ev {
    Subscribed,
    Msg(Bytes),
    Down,
}

/// Drives one agent until its changes are durable (regional, or cloud with
/// `wait_cloud`) or the deadline passes.
async fn run_agent(mut store: SimStore, args: Arc<Args>, t0: Instant, deadline: Instant) -> Result<()> {
    let (host, port) = {
        let rest = args
            .broker
            .strip_prefix("mqtt://")
            .context("--broker mqtt://HOST:PORT")?;
        let (h, p) = rest.rsplit_once(':').context("--broker mqtt://HOST:PORT")?;
        (h.to_string(), p.parse::<u16>().context("broker port")?)
    };
    let dev = store.device();
    let mut opts = MqttOptions::new(format!("fanin-{}-{}", dev.site, dev.device), host, port);
    opts.set_keep_alive(Duration::from_secs(60))
        .set_clean_start(true)
        .set_max_packet_size(Some(MQTT_MAX_PACKET as u32))
        .set_outgoing_inflight_upper_limit(16);
    let (client, mut ev) = AsyncClient::new(opts, 16);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let down = topic::down_filter(&dev);
    let sub_client = client.clone();
    // The event loop runs in its own task: it must never wait on us.
    let poller = tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let (c, f) = (sub_client.clone(), down.clone());
                    tokio::spawn(async move { c.subscribe(f, QoS::AtLeastOnce).await });
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if tx.send(Ev::Subscribed).is_err() {
                        return;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(Ev::Msg(p.payload)).is_err() {
                        return;
                    }
                }
                Ok(Event::Outgoing(_)) | Ok(Event::Incoming(_)) => {
                    if tx.send(Ev::Down).is_err() {
                        return;
                    }
                }
                Err(_) => {
                    if tx.send(Ev::Down).is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
    let now = || t0.elapsed().as_millis() as u64 + 1;
    let cfg = ClientConfig {
        response_timeout_ms: args.response_timeout_ms,
        software: "ferry-fanin-bench".into(),
        ..ClientConfig::default()
    };
    let mut session = ClientSession::new(cfg, now());
    let mut held: Option<(String, Bytes)> = None;
    let mut online = false;
    let shared = store.shared.clone();
    let result = loop {
        let done = if args.wait_cloud {
            store.cloud_done == store.changes.len()
        } else {
            store.regional_done == store.changes.len()
        };
        if done {
            break Ok(());
        }
        if Instant::now() >= deadline {
            break Err(anyhow::anyhow!("timed out"));
        }
        if online {
            loop {
                if held.is_none() {
                    match session.poll_transmit(now(), &mut store)? {
                        Some(m) => held = Some((topic::up(&dev, m.kind()), Bytes::from(m.encode()?))),
                        None => break,
                    }
                }
                let Some((t, p)) = held.take() else { break };
                if client
                    .try_publish(t.clone(), QoS::AtLeastOnce, false, p.clone())
                    .is_err()
                {
                    held = Some((t, p));
                    break;
                }
            }
        }
        let wait = session
            .poll_timeout()
            .map(|t| Duration::from_millis(t.saturating_sub(now())))
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Some(Ev::Subscribed)) => {
                if !online {
                    shared.connected.fetch_add(1, Ordering::Relaxed);
                }
                online = true;
                held = None;
                session.connected(now(), &store);
            }
            Ok(Some(Ev::Msg(b))) => {
                if let Ok(m) = Message::decode(&b) {
                    session.handle(now(), m, &mut store)?;
                }
            }
            Ok(Some(Ev::Down)) => {}
            Ok(None) => break Err(anyhow::anyhow!("event loop ended")),
            Err(_) => session.handle_timeout(now(), &store),
        }
    };
    let _ = client.try_disconnect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    poller.abort();
    result
}

/// (utime+stime seconds, VmHWM KiB, VmRSS KiB) of a process.
fn proc_sample(pid: u32) -> Option<(f64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((ticks / 100.0, kib("VmHWM:")?, kib("VmRSS:")?))
}

fn parse_pids(s: &str) -> Result<Vec<(String, u32)>> {
    let mut out = Vec::new();
    for kv in s.split(',').filter(|x| !x.is_empty()) {
        let (k, v) = kv.split_once('=').context("--pids name=PID,...")?;
        out.push((k.to_string(), v.parse().context("pid")?));
    }
    Ok(out)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.agents == 0 || args.files == 0 || args.chunks == 0 || args.chunk_kib == 0 {
        bail!("--agents, --files, --chunks and --chunk-kib must be positive");
    }
    let pids = parse_pids(&args.pids)?;
    let shared = Arc::new(Counters::default());

    // 1. Seal everything before the clock starts (all cores).
    let t_build = Instant::now();
    let tenant = TenantKey::generate()?;
    let mut base = vec![0u8; args.chunk_kib << 10];
    rand::thread_rng().fill_bytes(&mut base);
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let mut stores: Vec<Option<SimStore>> = (0..args.agents).map(|_| None).collect();
    std::thread::scope(|s| -> Result<()> {
        let mut hs = Vec::new();
        for t in 0..threads {
            let (args, tenant, base, shared) = (&args, &tenant, &base, shared.clone());
            hs.push(s.spawn(move || -> Result<Vec<(usize, SimStore)>> {
                let mut sealer = Sealer::new(tenant, Cipher::Aes256Gcm)?;
                let mut v = Vec::new();
                for i in (t..args.agents).step_by(threads) {
                    v.push((i, build_agent(args, i, &mut sealer, base, shared.clone())?));
                }
                Ok(v)
            }));
        }
        for h in hs {
            for (i, st) in h.join().map_err(|_| anyhow::anyhow!("builder panicked"))?? {
                stores[i] = Some(st);
            }
        }
        Ok(())
    })?;
    let stores: Vec<SimStore> = stores.into_iter().flatten().collect();
    let total_bytes: u64 = stores.iter().flat_map(|s| s.change_bytes.iter()).sum();
    let total_changes: usize = stores.iter().map(|s| s.changes.len()).sum();
    eprintln!(
        "fanin: sealed {} agents x {} files x {} chunks = {:.1} MiB in {:.1} s",
        args.agents,
        args.files,
        args.chunks,
        total_bytes as f64 / (1 << 20) as f64,
        t_build.elapsed().as_secs_f64()
    );

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let args = Arc::new(args);
    let out = rt.block_on(async move {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(args.timeout);
        let before: Vec<_> = pids.iter().map(|(n, p)| (n.clone(), proc_sample(*p))).collect();
        let mut tasks = Vec::new();
        let gap = Duration::from_micros(1_000_000 / args.connect_rate.max(1));
        for st in stores {
            tasks.push(tokio::spawn(run_agent(st, args.clone(), t0, deadline)));
            tokio::time::sleep(gap).await;
        }
        // Progress once a second; peak RSS of the sampled processes.
        let sh = shared.clone();
        let pids2 = pids.clone();
        let n_agents = args.agents as u64;
        let wait_cloud = args.wait_cloud;
        let monitor = tokio::spawn(async move {
            // (seconds since t0, regional bytes) every 250 ms.
            let mut samples: Vec<(f64, u64)> = Vec::new();
            let mut tick = 0u64;
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                tick += 1;
                let r = sh.regional_bytes.load(Ordering::Relaxed);
                samples.push((t0.elapsed().as_secs_f64(), r));
                if tick.is_multiple_of(4) {
                    let prev = samples.len().checked_sub(5).map(|i| samples[i].1).unwrap_or(0);
                    let rss: Vec<String> = pids2
                        .iter()
                        .filter_map(|(n, p)| proc_sample(*p).map(|(_, _, rss)| format!("{n} {} MiB", rss >> 10)))
                        .collect();
                    eprintln!(
                        "t={:>4.0}s connected={} regional_done={} cloud_done={} failed={} regional {:.1} MiB/s | {}",
                        t0.elapsed().as_secs_f64(),
                        sh.connected.load(Ordering::Relaxed),
                        sh.regional_agents.load(Ordering::Relaxed),
                        sh.cloud_agents.load(Ordering::Relaxed),
                        sh.failed.load(Ordering::Relaxed),
                        (r - prev) as f64 / (1 << 20) as f64,
                        rss.join(", ")
                    );
                }
                let done = if wait_cloud {
                    sh.cloud_agents.load(Ordering::Relaxed)
                } else {
                    sh.regional_agents.load(Ordering::Relaxed)
                };
                if done + sh.failed.load(Ordering::Relaxed) >= n_agents {
                    return samples;
                }
            }
        });
        let mut failures = 0u64;
        for t in tasks {
            match t.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    failures += 1;
                    shared.failed.fetch_add(1, Ordering::Relaxed);
                    if failures <= 5 {
                        eprintln!("agent failed: {e:#}");
                    }
                }
                Err(e) => {
                    failures += 1;
                    shared.failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("agent task: {e}");
                }
            }
        }
        let wall = t0.elapsed().as_secs_f64();
        let samples = monitor.await.unwrap_or_default();
        let after: Vec<_> = pids.iter().map(|(n, p)| (n.clone(), proc_sample(*p))).collect();
        let mut procs = serde_json::Map::new();
        for ((n, b), (_, a)) in before.iter().zip(after.iter()) {
            if let (Some(b), Some(a)) = (b, a) {
                procs.insert(
                    n.clone(),
                    serde_json::json!({
                        "cpu_s": a.0 - b.0,
                        "cpu_cores": (a.0 - b.0) / wall,
                        "peak_rss_mib": a.1 as f64 / 1024.0,
                    }),
                );
            }
        }
        let regional_bytes = shared.regional_bytes.load(Ordering::Relaxed);
        // Ingest window: from the last sample with nothing durable yet to the
        // first sample with everything that became durable.
        let start = samples.iter().rev().find(|s| s.1 == 0).map(|s| s.0).unwrap_or(0.0);
        let end = samples
            .iter()
            .find(|s| s.1 >= regional_bytes)
            .map(|s| s.0)
            .unwrap_or(wall);
        let window = (end - start).max(0.25);
        let peak = samples
            .windows(5)
            .map(|w| (w[4].1 - w[0].1) as f64 / (w[4].0 - w[0].0) / (1 << 20) as f64)
            .fold(0.0f64, f64::max);
        serde_json::json!({
            "agents": args.agents,
            "connected": shared.connected.load(Ordering::Relaxed),
            "agents_regional_done": shared.regional_agents.load(Ordering::Relaxed),
            "agents_cloud_done": shared.cloud_agents.load(Ordering::Relaxed),
            "agents_failed": failures,
            "changes": total_changes,
            "sealed_bytes": total_bytes,
            "regional_bytes": regional_bytes,
            "cloud_bytes": shared.cloud_bytes.load(Ordering::Relaxed),
            "wall_s": wall,
            "ingest_window_s": window,
            "ingest_mib_s": regional_bytes as f64 / (1 << 20) as f64 / window,
            "peak_1s_mib_s": peak,
            "processes": procs,
        })
    });
    println!("{out}");
    Ok(())
}
