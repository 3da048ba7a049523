//! Shared helpers for the cloud-sink integration tests: a real sink served on
//! 127.0.0.1:0 from a temp data directory, and a "device" that builds real
//! sealed chunks and Ed25519-signed changes the way the edge agent does.
#![allow(dead_code)]

use anyhow::{anyhow, bail, ensure, Context, Result};
use cloud_sink::{FileQuery, RestoreReport, RestoreRequest, ServeConfig, SinkClient};
use protocol::hlc::Hlc;
use protocol::msg::*;
use protocol::pack::PackBuilder;
use protocol::seal::{Cipher, Sealer, TenantKey};
use protocol::shared::{ConflictPolicy, Shared, VersionVector};
use protocol::{Change, ChangeBody, ChunkRef, DeviceRef, FileVersion, Hash32, ReplicaId};
use ring::signature::Ed25519KeyPair;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// 2023-11-14T22:13:20Z: HLC times of test changes start here.
pub const T0_MS: u64 = 1_700_000_000_000;
/// Plaintext bytes per chunk (small so multi-chunk files stay cheap).
pub const CHUNK: usize = 16 << 10;

/// A cloud-sink served in-process until `stop`.
pub struct Sink {
    pub addr: SocketAddr,
    pub url: String,
    pub client: SinkClient,
    pub data: PathBuf,
    stop: oneshot::Sender<()>,
    task: JoinHandle<cloud_sink::Result<()>>,
}

impl Sink {
    pub async fn start(data: &Path) -> Result<Sink> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(cloud_sink::serve(ServeConfig::new(data), listener, async move {
            let _ = rx.await;
        }));
        let url = format!("http://{addr}");
        let client = SinkClient::new(&url)?.with_peer_name("test-agg");
        for _ in 0..200 {
            if client.health().await.is_ok() {
                return Ok(Sink {
                    addr,
                    url,
                    client,
                    data: data.to_path_buf(),
                    stop,
                    task,
                });
            }
            if task.is_finished() {
                task.await??;
                bail!("sink exited during startup");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("sink did not become healthy")
    }

    /// Triggers the shutdown future and waits for `serve` to return.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .context("sink did not stop")???;
        Ok(())
    }

    pub fn objects(&self) -> PathBuf {
        self.data.join("objects")
    }
}

pub fn ed25519() -> Result<Ed25519KeyPair> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| anyhow!("keygen"))?;
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| anyhow!("key"))
}

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn hlc(ms: u64) -> Hlc {
    Hlc::from_parts(ms, 0)
}

/// A device as the edge agent would be: a signing key, a tenant key, a replica.
pub struct Device {
    pub dev: DeviceRef,
    pub replica: ReplicaId,
    pub key: Ed25519KeyPair,
    pub tenant: TenantKey,
    sealer: Sealer,
    next_seq: u64,
}

/// A file version and the sealed chunks it needs.
pub struct Built {
    pub change: Change,
    pub chunks: Vec<ChunkData>,
}

impl Device {
    pub fn new(device: &str, tenant: &TenantKey) -> Result<Device> {
        let dev = DeviceRef::new("acme", "plant-1", device)?;
        Ok(Device {
            replica: ReplicaId {
                device: dev.clone(),
                epoch: 1,
            },
            dev,
            key: ed25519()?,
            tenant: tenant.clone(),
            sealer: Sealer::new(tenant, Cipher::for_this_cpu())?,
            next_seq: 1,
        })
    }

    pub fn seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// Seals `plain` in CHUNK-sized pieces and signs a file version of it.
    pub fn file(&mut self, path: &str, plain: &[u8], hlc_ms: u64) -> Result<Built> {
        let mut chunks = Vec::new();
        let mut refs = Vec::new();
        for piece in plain.chunks(CHUNK) {
            let mut stored = Vec::new();
            let id = self.sealer.seal(piece, 3, &mut stored)?;
            refs.push(ChunkRef {
                id,
                len: piece.len() as u32,
            });
            chunks.push(ChunkData { id, bytes: stored });
        }
        let body = ChangeBody::File(FileVersion {
            path: path.into(),
            size: plain.len() as u64,
            mtime_ns: i64::try_from(hlc_ms)? * 1_000_000,
            class: "default".into(),
            chunks: refs,
            sha256: Hash32::of(plain),
            mode: 0o640,
        });
        let seq = self.seq();
        Ok(Built {
            change: Change::sign(self.replica.clone(), seq, hlc(hlc_ms), body, &self.key),
            chunks,
        })
    }

    /// A file version of a shared path: its vector is `seen` plus this
    /// version's own HLC under this device's name.
    pub fn shared_file(
        &mut self,
        path: &str,
        plain: &[u8],
        hlc_ms: u64,
        seen: &VersionVector,
        policy: ConflictPolicy,
    ) -> Result<Built> {
        let b = self.file(path, plain, hlc_ms)?;
        let c = b.change;
        Ok(Built {
            change: Change::sign_shared(
                c.replica,
                c.seq,
                c.hlc,
                c.body,
                Some(self.shared(hlc_ms, seen, policy)),
                &self.key,
            ),
            chunks: b.chunks,
        })
    }

    /// A deletion of a shared path (see `shared_file`).
    pub fn shared_delete(&mut self, path: &str, hlc_ms: u64, seen: &VersionVector, policy: ConflictPolicy) -> Change {
        let seq = self.seq();
        let shared = self.shared(hlc_ms, seen, policy);
        Change::sign_shared(
            self.replica.clone(),
            seq,
            hlc(hlc_ms),
            ChangeBody::Delete(path.into()),
            Some(shared),
            &self.key,
        )
    }

    fn shared(&self, hlc_ms: u64, seen: &VersionVector, policy: ConflictPolicy) -> Shared {
        let mut vv = seen.clone();
        vv.witness(self.dev.device.as_str(), hlc(hlc_ms));
        Shared { vv, policy }
    }

    pub fn delete(&mut self, path: &str, hlc_ms: u64) -> Change {
        let seq = self.seq();
        Change::sign(
            self.replica.clone(),
            seq,
            hlc(hlc_ms),
            ChangeBody::Delete(path.into()),
            &self.key,
        )
    }
}

/// Builds a pack of distinct chunks: (id, bytes).
pub fn pack(chunks: &[ChunkData]) -> (Hash32, Vec<u8>) {
    let mut seen = std::collections::HashSet::new();
    let mut b = PackBuilder::new();
    for c in chunks {
        if seen.insert(c.id) {
            b.push(c.id, &c.bytes);
        }
    }
    let (id, bytes, _) = b.finish();
    (id, bytes)
}

/// How the chunks of a batch reach the sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// `PUT /v1/packs/{id}` before the Batch, as the aggregator uploads closed packs.
    PackFirst,
    /// `PUT /v1/packs/{id}` with exactly the chunks Prepare names.
    PackOnPrepare,
    /// `Data` messages over `/v1/sync`.
    Data,
}

static BATCH: AtomicU64 = AtomicU64::new(1);

pub async fn hello(client: &SinkClient) -> Result<KnowledgeMsg> {
    let m = Message::Hello(Hello {
        proto: protocol::PROTO_VERSION,
        device: None,
        replica: None,
        software: "cloud-sink tests".into(),
        server_cursor: None,
    });
    match client.sync(&m).await? {
        Some(Message::Knowledge(k)) => Ok(k),
        other => bail!("hello answered with {other:?}"),
    }
}

pub async fn batch(client: &SinkClient, batch_id: u64, changes: Vec<Change>) -> Result<Prepare> {
    match client.sync(&Message::Batch(Batch { batch_id, changes })).await? {
        Some(Message::Prepare(p)) if p.batch_id == batch_id => Ok(p),
        other => bail!("batch answered with {other:?}"),
    }
}

pub async fn commit(client: &SinkClient, batch_id: u64) -> Result<Committed> {
    match client.sync(&Message::Commit(Commit { batch_id })).await? {
        Some(Message::Committed(c)) if c.batch_id == batch_id => Ok(c),
        other => bail!("commit answered with {other:?}"),
    }
}

/// One full protocol round: Hello → (pack) → Batch → Prepare → (pack | Data)
/// → Commit → Committed. Returns Prepare and Committed.
pub async fn sync_round(
    client: &SinkClient,
    changes: Vec<Change>,
    chunks: &[ChunkData],
    via: Via,
) -> Result<(Prepare, Committed)> {
    hello(client).await?;
    if via == Via::PackFirst && !chunks.is_empty() {
        let (id, bytes) = pack(chunks);
        client.put_pack(&id, bytes).await?;
    }
    let batch_id = BATCH.fetch_add(1, Ordering::Relaxed);
    let prep = batch(client, batch_id, changes).await?;
    ensure!(prep.retry_after_ms == 0, "sink asked to back off");
    if !prep.missing.is_empty() {
        let by_id: BTreeMap<Hash32, &ChunkData> = chunks.iter().map(|c| (c.id, c)).collect();
        let wanted: Vec<ChunkData> = prep
            .missing
            .iter()
            .map(|id| {
                by_id
                    .get(id)
                    .map(|c| (*c).clone())
                    .context("sink asked for a chunk we never had")
            })
            .collect::<Result<_>>()?;
        match via {
            Via::PackFirst | Via::PackOnPrepare => {
                let (id, bytes) = pack(&wanted);
                client.put_pack(&id, bytes).await?;
            }
            Via::Data => {
                // Two Data messages, to exercise "many, any order".
                let mid = wanted.len() / 2;
                for part in [&wanted[mid..], &wanted[..mid]] {
                    let r = client
                        .sync(&Message::Data(Data {
                            batch_id,
                            chunks: part.to_vec(),
                        }))
                        .await?;
                    ensure!(r.is_none(), "Data answered with {r:?}");
                }
            }
        }
    }
    let done = commit(client, batch_id).await?;
    Ok((prep, done))
}

/// `sync_round` that insists every change was applied and is cloud-durable.
pub async fn sync_all(client: &SinkClient, built: &[&Built], deletes: &[Change], via: Via) -> Result<Committed> {
    let mut changes: Vec<Change> = built.iter().map(|b| b.change.clone()).collect();
    changes.extend(deletes.iter().cloned());
    let chunks: Vec<ChunkData> = built.iter().flat_map(|b| b.chunks.iter().cloned()).collect();
    let (prep, done) = sync_round(client, changes.clone(), &chunks, via).await?;
    ensure!(prep.rejected.is_empty(), "rejected: {:?}", prep.rejected);
    ensure!(done.results.len() == changes.len(), "results: {:?}", done.results);
    for r in &done.results {
        ensure!(r.status == Status::Applied, "{r:?}");
    }
    for c in &changes {
        ensure!(
            done.cloud.contains(&c.replica, c.seq),
            "cloud knowledge lacks {}",
            c.label()
        );
    }
    Ok(done)
}

pub fn query(dev: &Device) -> FileQuery {
    FileQuery {
        device: Some(dev.dev.device.to_string()),
        ..FileQuery::default()
    }
}

pub async fn restore_to(
    client: &SinkClient,
    dev: &Device,
    at: Option<String>,
    out: &Path,
) -> cloud_sink::Result<RestoreReport> {
    let req = RestoreRequest {
        device: Some(dev.dev.device.to_string()),
        at,
        out_dir: out.to_path_buf(),
        ..RestoreRequest::default()
    };
    cloud_sink::restore(client, req, &dev.tenant).await
}

/// Every regular file under `dir`, relative path → bytes (symlinks are not followed).
pub fn tree(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let t = e.file_type()?;
            let p = e.path();
            if t.is_dir() {
                stack.push(p);
            } else if t.is_file() {
                let rel = p.strip_prefix(dir)?.to_string_lossy().to_string();
                out.insert(rel, std::fs::read(&p)?);
            }
        }
    }
    Ok(out)
}

/// Every object file under `dir` (recursive), relative paths.
pub fn listing(dir: &Path) -> Result<Vec<String>> {
    Ok(tree(dir)?.into_keys().collect())
}

/// The restored tree under `out` is exactly `want` (paths and bytes).
pub fn expect_tree(out: &std::path::Path, want: &[(&str, &[u8])]) -> Result<()> {
    let got = tree(out)?;
    let want: BTreeMap<String, Vec<u8>> = want.iter().map(|(p, b)| (p.to_string(), b.to_vec())).collect();
    ensure!(
        got.keys().collect::<Vec<_>>() == want.keys().collect::<Vec<_>>(),
        "restored {:?}, want {:?}",
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (p, b) in &want {
        ensure!(got[p] == *b, "{p}: restored bytes differ");
    }
    Ok(())
}
