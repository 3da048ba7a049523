//! Forwarder to the cloud-sink (docs/CONTRACTS.md, HTTP): uploads closed
//! packs, then offers queued changes whose chunks are all at the sink:
//! Hello once, then Batch → Prepare (missing chunks: build a pack from local
//! storage and PUT it) → Commit → Committed. Confirmed changes leave the
//! queue, cloud knowledge is persisted and relayed to agents as CloudAck.
//!
//! Every step is idempotent at the sink, so any failure just means: back off
//! (exponentially, up to `sink_retry_max`, 30 s by default) and start the round again. Nothing is dropped.

use crate::sink::SinkHttp;
use crate::store::{AggStore, ChunkBytes, ClosedPack, Queued};
use crate::{AggConfig, AggStats, Error, Result};
use protocol::msg::{Batch, CloudAck, Commit, Hello, Message, MAX_MESSAGE};
use protocol::pack::PackBuilder;
use protocol::topic;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Changes per forwarded batch (the sink's `max_batch` default).
const MAX_BATCH: usize = 512;
/// Encoded changes per batch, well under the envelope limit.
const MAX_BATCH_BYTES: usize = MAX_MESSAGE / 2;
/// Queue entries looked at per round when searching for ready changes.
const SCAN: usize = 50_000;

pub struct Forwarder {
    store: Arc<AggStore>,
    sink: SinkHttp,
    client: AsyncClient,
    stats: Arc<AggStats>,
    max_delay: Duration,
    retry_max: Duration,
    hello_done: bool,
    /// Distinguishes this process's batch ids at the sink.
    id_salt: u64,
    batches: u64,
}

impl Forwarder {
    pub fn new(cfg: &AggConfig, store: Arc<AggStore>, client: AsyncClient, stats: Arc<AggStats>) -> Result<Self> {
        let sink = SinkHttp::new(cfg, stats.clone())?;
        Ok(Self::with_sink(cfg, sink, store, client, stats))
    }

    pub fn with_sink(
        cfg: &AggConfig,
        sink: SinkHttp,
        store: Arc<AggStore>,
        client: AsyncClient,
        stats: Arc<AggStats>,
    ) -> Self {
        // FNV-1a of the aggregator id.
        let id_salt = cfg.id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        Forwarder {
            store,
            sink,
            client,
            stats,
            max_delay: cfg.pack_max_delay,
            retry_max: cfg.sink_retry_max,
            hello_done: false,
            id_salt,
            batches: 0,
        }
    }

    /// Runs a blocking store operation off the async threads.
    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&AggStore) -> Result<T> + Send + 'static) -> Result<T> {
        let s = self.store.clone();
        tokio::task::spawn_blocking(move || f(&s))
            .await
            .map_err(|e| Error::Internal(format!("store task: {e}")))?
    }

    /// One round; true if it made progress (run again right away).
    pub async fn round(&mut self) -> Result<bool> {
        let max_delay = self.max_delay;
        if self.blocking(move |s| s.maybe_close(max_delay)).await?.is_some() {
            AggStats::add(&self.stats.packs_closed, 1);
        }
        let mut progress = false;
        for p in self.blocking(|s| s.closed_packs()).await? {
            self.upload(&p).await?;
            progress = true;
        }
        let batch = self
            .blocking(|s| s.ready_changes(MAX_BATCH, MAX_BATCH_BYTES, SCAN))
            .await?;
        self.stats
            .spool_bytes
            .store(self.store.spool_bytes(), Ordering::Relaxed);
        if batch.is_empty() {
            let n = self.blocking(|s| s.forward_len()).await?;
            self.stats.forward_queue.store(n, Ordering::Relaxed);
            return Ok(progress);
        }
        self.forward(batch).await?;
        Ok(true)
    }

    async fn upload(&self, p: &ClosedPack) -> Result<()> {
        let path = p.path.clone();
        let body = tokio::fs::read(&path)
            .await
            .map_err(|source| Error::Io { path, source })?;
        self.put_pack(&p.id.to_hex(), body).await?;
        let pc = p.clone();
        self.blocking(move |s| s.mark_uploaded(&pc)).await?;
        AggStats::add(&self.stats.packs_uploaded, 1);
        tracing::debug!(pack = %p.id, size = p.size, "uploaded pack");
        Ok(())
    }

    async fn put_pack(&self, id_hex: &str, body: Vec<u8>) -> Result<()> {
        self.sink.put_pack(id_hex, body).await
    }

    async fn sync(&self, m: &Message) -> Result<Message> {
        self.sink.sync(m).await
    }

    fn next_batch_id(&mut self) -> u64 {
        self.batches += 1;
        // Unique across restarts (time) and aggregators (salt).
        (crate::now_ms() << 20) ^ ((self.id_salt & 0xff) << 12) ^ (self.batches & 0xfff)
    }

    async fn forward(&mut self, batch: Vec<Queued>) -> Result<()> {
        if !self.hello_done {
            let hello = Message::Hello(Hello {
                proto: protocol::PROTO_VERSION,
                device: None,
                replica: None,
                software: self.sink.software().to_string(),
                server_cursor: None,
            });
            match self.sync(&hello).await? {
                Message::Knowledge(_) => self.hello_done = true,
                other => return Err(Error::Sink(format!("hello answered with {}", other.kind()))),
            }
        }
        let batch_id = self.next_batch_id();
        let changes: Vec<_> = batch.iter().map(|q| q.change.clone()).collect();
        AggStats::add(&self.stats.forwarded_changes, changes.len() as u64);
        let prepare = match self.sync(&Message::Batch(Batch { batch_id, changes })).await? {
            Message::Prepare(p) if p.batch_id == batch_id => p,
            other => return Err(Error::Sink(format!("batch answered with {}", other.kind()))),
        };
        if prepare.retry_after_ms > 0 {
            tracing::info!("sink is busy: retrying in {} ms", prepare.retry_after_ms);
            tokio::time::sleep(Duration::from_millis(prepare.retry_after_ms).min(self.retry_max)).await;
            return Ok(());
        }
        if !prepare.missing.is_empty() {
            self.send_missing(&batch, &prepare.missing).await?;
        }
        let committed = match self.sync(&Message::Commit(Commit { batch_id })).await? {
            Message::Committed(c) if c.batch_id == batch_id => c,
            other => return Err(Error::Sink(format!("commit answered with {}", other.kind()))),
        };
        if committed.results.is_empty() {
            self.hello_done = false;
            return Err(Error::Sink(format!("sink did not know batch {batch_id}")));
        }
        let (results, reasons) = (committed.results.clone(), prepare.rejected.clone());
        let conf = self
            .blocking(move |s| s.confirm(&batch, &results, &reasons, &[&committed.regional, &committed.cloud]))
            .await?;
        AggStats::add(&self.stats.cloud_acked_changes, conf.applied as u64);
        AggStats::add(&self.stats.sink_rejected_changes, conf.rejected as u64);
        let stuck = conf.applied == 0 && conf.missing > 0;
        for d in conf.devices {
            let dd = d.clone();
            let cloud = self.blocking(move |s| s.cloud_knowledge(&dd)).await?;
            let Ok(payload) = Message::CloudAck(CloudAck { cloud }).encode() else {
                continue;
            };
            // Best effort: agents also learn cloud knowledge on their next Hello.
            match self
                .client
                .try_publish(topic::down(&d, "cloudack"), QoS::AtLeastOnce, false, payload)
            {
                Ok(()) => AggStats::add(&self.stats.messages_out, 1),
                Err(e) => tracing::debug!(device = %d, "cloudack not sent: {e}"),
            }
        }
        if stuck {
            // Back off instead of offering the same incomplete changes in a tight loop.
            return Err(Error::Sink(format!(
                "{} forwarded changes still lack chunks at the sink",
                conf.missing
            )));
        }
        Ok(())
    }

    /// The sink lacks chunks of changes we thought it had: send what is still
    /// local in a fresh pack. Chunks only the cloud had are an error at the
    /// sink; their changes stay queued and are logged.
    async fn send_missing(&self, batch: &[Queued], missing: &[protocol::Hash32]) -> Result<()> {
        let ids = missing.to_vec();
        let found = self
            .blocking(move |s| {
                let mut v = Vec::new();
                for id in ids {
                    v.push((id, s.read_chunk(&id)?));
                }
                Ok(v)
            })
            .await?;
        let mut pb = PackBuilder::new();
        for (id, b) in found {
            match b {
                ChunkBytes::Local(bytes) => {
                    if pb.len() + bytes.len() > protocol::pack::MAX_PACK / 2 && !pb.is_empty() {
                        let full = std::mem::replace(&mut pb, PackBuilder::new());
                        let (pid, body, _) = full.finish();
                        self.put_pack(&pid.to_hex(), body).await?;
                    }
                    pb.push(id, &bytes);
                }
                other => {
                    AggStats::add(&self.stats.sink_missing_lost, 1);
                    let users: Vec<String> = batch
                        .iter()
                        .filter(|q| q.change.chunk_refs().iter().any(|r| r.id == id))
                        .map(|q| q.change.label())
                        .collect();
                    tracing::error!(
                        chunk = %id,
                        "sink is missing a chunk the aggregator no longer holds ({other:?}); changes stay queued: {users:?}"
                    );
                }
            }
        }
        if !pb.is_empty() {
            let (pid, body, _) = pb.finish();
            self.put_pack(&pid.to_hex(), body).await?;
        }
        Ok(())
    }
}

/// Runs rounds forever, backing off while the sink is unreachable.
pub async fn forwarder(mut f: Forwarder) {
    let idle = (f.max_delay / 4).clamp(Duration::from_millis(20), Duration::from_millis(250));
    let first = Duration::from_millis(500).min(f.retry_max);
    let mut backoff = first;
    loop {
        match f.round().await {
            Ok(true) => backoff = first,
            Ok(false) => tokio::time::sleep(idle).await,
            Err(e) => {
                AggStats::add(&f.stats.sink_errors, 1);
                f.hello_done = false;
                tracing::warn!("forwarding to {}: {e}; retrying in {backoff:?}", f.sink.base());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(f.retry_max);
            }
        }
    }
}
