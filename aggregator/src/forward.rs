//! Forwarder to the cloud-sink (docs/CONTRACTS.md, HTTP): uploads closed
//! packs, then offers queued changes whose chunks are all at the sink:
//! Hello once, then Batch → Prepare (missing chunks: build a pack from local
//! storage and PUT it) → Commit → Committed. Confirmed changes leave the
//! queue, cloud knowledge is persisted and relayed to agents as CloudAck.
//!
//! Every step is idempotent at the sink, so any failure just means: back off
//! (exponentially, up to `sink_retry_max`, 30 s by default) and start the
//! round again. Nothing is dropped.
//!
//! Split sans-IO (quinn-proto style): [`ForwardCore`] decides what to send
//! and when, and updates the store; it does no network I/O, reads no clock
//! and spawns nothing. The daemon drives it with [`Forwarder`] over
//! [`SinkHttp`] and MQTT; the simulator drives it in virtual time:
//!
//! ```text
//! let mut core = ForwardCore::new(&agg_cfg, stats);
//! loop {
//!     // 1. Ask for the next request (at most one is in flight).
//!     while let Some(req) = core.poll_request(now, &store)? {   // Err: logged, core backs off
//!         // 2. Deliver it to the sink; later hand back its outcome
//!         //    (Err(reason) for a failed/timed-out request):
//!         let notices = core.on_response(now, &store, req.req_id(), outcome)?;
//!         // 3. Publish each notice on notice.topic() (QoS 1, not retained).
//!     }
//!     // 4. Nothing to do: sleep until core.poll_timeout() (None: a request
//!     //    is in flight; wait for its response).
//! }
//! ```
//!
//! `now` must be the store's clock ([`crate::store::StoreConfig::clock`]):
//! the open pack closes `pack_max_delay` after `AggStore::apply` stamped the
//! first waiting change with it.

use crate::sink::SinkHttp;
use crate::store::{AggStore, ChunkBytes, ClosedPack, Queued};
use crate::{AggConfig, AggStats, Error, Result};
use protocol::ids::{DeviceRef, Hash32};
use protocol::msg::{Batch, CloudAck, Commit, Hello, Message, MAX_MESSAGE};
use protocol::pack::PackBuilder;
use protocol::topic;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Changes per forwarded batch (the sink's `max_batch` default).
const MAX_BATCH: usize = 512;
/// Encoded changes per batch, well under the envelope limit.
const MAX_BATCH_BYTES: usize = MAX_MESSAGE / 2;
/// Queue entries looked at per round when searching for ready changes.
const SCAN: usize = 50_000;

/// One request to the sink. `req_id` identifies its answer in
/// [`ForwardCore::on_response`].
#[derive(Clone, Debug)]
pub enum SinkRequest {
    /// `PUT /v1/packs/{id_hex}` with the pack's bytes.
    PutPack {
        req_id: u64,
        id_hex: String,
        bytes: Vec<u8>,
    },
    /// `POST /v1/sync` with one envelope.
    Sync { req_id: u64, message: Message },
}

impl SinkRequest {
    pub fn req_id(&self) -> u64 {
        match self {
            SinkRequest::PutPack { req_id, .. } | SinkRequest::Sync { req_id, .. } => *req_id,
        }
    }
}

/// A successful answer from the sink.
#[derive(Clone, Debug)]
pub enum SinkResponse {
    /// The pack is stored durably (HTTP 2xx to a PUT).
    Stored,
    /// The reply envelope to a `Sync`. A `Nack` counts as a failure.
    Reply(Message),
}

/// A message for one agent, to publish on its down topic.
#[derive(Clone, Debug)]
pub struct AgentNotice {
    pub device: DeviceRef,
    pub message: Message,
}

impl AgentNotice {
    /// `ferry/v1/{tenant}/{site}/{device}/down/{kind}`.
    pub fn topic(&self) -> String {
        topic::down(&self.device, self.message.kind())
    }
}

/// Where the current round is.
enum Step {
    /// No round in progress.
    Idle,
    /// A closed pack's PUT is in flight.
    Upload(ClosedPack),
    /// The Hello before a batch is in flight.
    Hello(Vec<Queued>),
    /// The Batch is in flight.
    Batch(Vec<Queued>, u64),
    /// Chunks the sink lacks go as packs; one PUT in flight at a time.
    Missing {
        batch: Vec<Queued>,
        batch_id: u64,
        rejected: Vec<(u64, String)>,
        todo: VecDeque<Hash32>,
    },
    /// The Commit is in flight.
    Commit {
        batch: Vec<Queued>,
        batch_id: u64,
        rejected: Vec<(u64, String)>,
    },
}

/// The forwarder's logic without I/O (module docs).
pub struct ForwardCore {
    stats: Arc<AggStats>,
    software: String,
    max_delay: Duration,
    retry_max_ms: u64,
    first_backoff_ms: u64,
    idle_ms: u64,
    backoff_ms: u64,
    hello_done: bool,
    /// Distinguishes this process's batch ids at the sink.
    id_salt: u64,
    batches: u64,
    step: Step,
    /// The request to send next (decided while handling a response).
    next: Option<SinkRequest>,
    in_flight: Option<u64>,
    next_req: u64,
    /// No new request before this (clock ms): idle wait or back-off.
    wake_at: u64,
}

impl ForwardCore {
    pub fn new(cfg: &AggConfig, stats: Arc<AggStats>) -> ForwardCore {
        // FNV-1a of the aggregator id.
        let id_salt = cfg.id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let retry_max_ms = ms(cfg.sink_retry_max).max(1);
        let first_backoff_ms = 500u64.min(retry_max_ms);
        ForwardCore {
            stats,
            software: crate::sink::software(cfg),
            max_delay: cfg.pack_max_delay,
            retry_max_ms,
            first_backoff_ms,
            idle_ms: ms(cfg.pack_max_delay / 4).clamp(20, 250),
            backoff_ms: first_backoff_ms,
            hello_done: false,
            id_salt,
            batches: 0,
            step: Step::Idle,
            next: None,
            in_flight: None,
            next_req: 0,
            wake_at: 0,
        }
    }

    /// When the driver should call [`ForwardCore::poll_request`] again
    /// (clock ms; already past: now). `None` while a request is in flight:
    /// its response (or failure) comes first.
    pub fn poll_timeout(&self) -> Option<u64> {
        if self.in_flight.is_some() {
            return None;
        }
        if self.next.is_some() {
            return Some(0);
        }
        Some(self.wake_at)
    }

    /// The current back-off after a failure (what the next one will wait).
    pub fn backoff(&self) -> Duration {
        Duration::from_millis(self.backoff_ms)
    }

    /// Is a request waiting for its response?
    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// The next request for the sink, if one is due at `now_ms`. At most one
    /// request is in flight. On `Err` (a store failure) the core has already
    /// backed off; the driver only logs it.
    pub fn poll_request(&mut self, now_ms: u64, store: &AggStore) -> Result<Option<SinkRequest>> {
        if self.in_flight.is_some() {
            return Ok(None);
        }
        let r = self.next_request(now_ms, store);
        match r {
            Ok(Some(req)) => {
                self.in_flight = Some(req.req_id());
                Ok(Some(req))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.fail(now_ms, &e);
                Err(e)
            }
        }
    }

    fn new_id(&mut self) -> u64 {
        self.next_req += 1;
        self.next_req
    }

    fn sync_req(&mut self, message: Message) -> SinkRequest {
        SinkRequest::Sync {
            req_id: self.new_id(),
            message,
        }
    }

    fn next_request(&mut self, now_ms: u64, store: &AggStore) -> Result<Option<SinkRequest>> {
        if let Some(r) = self.next.take() {
            return Ok(Some(r));
        }
        if let Step::Missing { .. } = self.step {
            return self.next_missing(store);
        }
        if !matches!(self.step, Step::Idle) || now_ms < self.wake_at {
            return Ok(None);
        }
        // A new round: close the open pack if changes waited long enough,
        // upload closed packs, then offer ready changes.
        if store.maybe_close_at(now_ms, self.max_delay)?.is_some() {
            AggStats::add(&self.stats.packs_closed, 1);
        }
        if let Some(p) = store.closed_packs()?.into_iter().next() {
            let bytes = std::fs::read(&p.path).map_err(|source| Error::Io {
                path: p.path.clone(),
                source,
            })?;
            let req = SinkRequest::PutPack {
                req_id: self.new_id(),
                id_hex: p.id.to_hex(),
                bytes,
            };
            self.step = Step::Upload(p);
            return Ok(Some(req));
        }
        let batch = store.ready_changes(MAX_BATCH, MAX_BATCH_BYTES, SCAN)?;
        self.stats.spool_bytes.store(store.spool_bytes(), Ordering::Relaxed);
        if batch.is_empty() {
            let n = store.forward_len()?;
            self.stats.forward_queue.store(n, Ordering::Relaxed);
            self.wake_at = now_ms.saturating_add(self.idle_ms);
            return Ok(None);
        }
        if !self.hello_done {
            let hello = Message::Hello(Hello {
                proto: protocol::PROTO_VERSION,
                device: None,
                replica: None,
                software: self.software.clone(),
                server_cursor: None,
            });
            self.step = Step::Hello(batch);
            return Ok(Some(self.sync_req(hello)));
        }
        Ok(Some(self.start_batch(now_ms, batch)))
    }

    fn start_batch(&mut self, now_ms: u64, batch: Vec<Queued>) -> SinkRequest {
        self.batches += 1;
        // Unique across restarts (time) and aggregators (salt).
        let batch_id = (now_ms << 20) ^ ((self.id_salt & 0xff) << 12) ^ (self.batches & 0xfff);
        let changes: Vec<_> = batch.iter().map(|q| q.change.clone()).collect();
        AggStats::add(&self.stats.forwarded_changes, changes.len() as u64);
        self.step = Step::Batch(batch, batch_id);
        self.sync_req(Message::Batch(Batch { batch_id, changes }))
    }

    /// The sink lacks chunks of changes we thought it had: send what is
    /// still local in fresh packs (one PUT at a time), then Commit. Chunks
    /// only the cloud had are an error at the sink; their changes stay
    /// queued and are logged.
    fn next_missing(&mut self, store: &AggStore) -> Result<Option<SinkRequest>> {
        let Step::Missing {
            batch,
            batch_id,
            rejected,
            todo,
        } = &mut self.step
        else {
            return Ok(None);
        };
        let mut pb = PackBuilder::new();
        while let Some(id) = todo.front().copied() {
            match store.read_chunk(&id)? {
                ChunkBytes::Local(bytes) => {
                    if pb.len() + bytes.len() > protocol::pack::MAX_PACK / 2 && !pb.is_empty() {
                        break;
                    }
                    todo.pop_front();
                    pb.push(id, &bytes);
                }
                other => {
                    todo.pop_front();
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
            let (pid, bytes, _) = pb.finish();
            let req_id = self.new_id();
            return Ok(Some(SinkRequest::PutPack {
                req_id,
                id_hex: pid.to_hex(),
                bytes,
            }));
        }
        let (batch, batch_id, rejected) = (std::mem::take(batch), *batch_id, std::mem::take(rejected));
        self.step = Step::Commit {
            batch,
            batch_id,
            rejected,
        };
        Ok(Some(self.sync_req(Message::Commit(Commit { batch_id }))))
    }

    /// The outcome of request `req_id`: the sink's answer, or why it failed
    /// (unreachable, timed out, non-2xx). Returns what to publish to agents.
    /// Answers to anything but the request in flight are ignored. On `Err`
    /// the core has already backed off (see [`ForwardCore::poll_timeout`]);
    /// the driver only logs it.
    pub fn on_response(
        &mut self,
        now_ms: u64,
        store: &AggStore,
        req_id: u64,
        outcome: std::result::Result<SinkResponse, String>,
    ) -> Result<Vec<AgentNotice>> {
        if self.in_flight != Some(req_id) {
            tracing::debug!(req_id, "ignoring a sink answer to a request not in flight");
            return Ok(Vec::new());
        }
        self.in_flight = None;
        let step = std::mem::replace(&mut self.step, Step::Idle);
        match self.advance(now_ms, store, step, outcome) {
            Ok(notices) => Ok(notices),
            Err((e, notices)) => {
                self.fail(now_ms, &e);
                if notices.is_empty() {
                    Err(e)
                } else {
                    // CloudAcks of what did get through still go out.
                    Ok(notices)
                }
            }
        }
    }

    fn advance(
        &mut self,
        now_ms: u64,
        store: &AggStore,
        step: Step,
        outcome: std::result::Result<SinkResponse, String>,
    ) -> std::result::Result<Vec<AgentNotice>, (Error, Vec<AgentNotice>)> {
        let bare = |e: Error| (e, Vec::new());
        let what = match &step {
            Step::Idle => "request",
            Step::Upload(_) | Step::Missing { .. } => "PUT pack",
            Step::Hello(_) => "hello",
            Step::Batch(..) => "batch",
            Step::Commit { .. } => "commit",
        };
        let reply = match outcome {
            Err(reason) => return Err(bare(Error::Sink(reason))),
            Ok(SinkResponse::Reply(Message::Nack(n))) => {
                return Err(bare(Error::Sink(format!("{what} refused: {}", n.reason))))
            }
            Ok(r) => r,
        };
        let unexpected = |r: &SinkResponse| {
            let kind = match r {
                SinkResponse::Stored => "stored",
                SinkResponse::Reply(m) => m.kind(),
            };
            bare(Error::Sink(format!("{what} answered with {kind}")))
        };
        match (step, reply) {
            (Step::Upload(p), SinkResponse::Stored) => {
                store.mark_uploaded(&p).map_err(bare)?;
                AggStats::add(&self.stats.packs_uploaded, 1);
                tracing::debug!(pack = %p.id, size = p.size, "uploaded pack");
                self.progress(now_ms);
                Ok(Vec::new())
            }
            (Step::Hello(batch), SinkResponse::Reply(Message::Knowledge(_))) => {
                self.hello_done = true;
                let req = self.start_batch(now_ms, batch);
                self.next = Some(req);
                Ok(Vec::new())
            }
            (Step::Batch(batch, batch_id), SinkResponse::Reply(Message::Prepare(p))) if p.batch_id == batch_id => {
                if p.retry_after_ms > 0 {
                    tracing::info!("sink is busy: retrying in {} ms", p.retry_after_ms);
                    self.progress(now_ms);
                    self.wake_at = now_ms.saturating_add(p.retry_after_ms.min(self.retry_max_ms));
                    return Ok(Vec::new());
                }
                self.step = Step::Missing {
                    batch,
                    batch_id,
                    rejected: p.rejected,
                    todo: p.missing.into_iter().collect(),
                };
                Ok(Vec::new())
            }
            (step @ Step::Missing { .. }, SinkResponse::Stored) => {
                self.step = step;
                Ok(Vec::new())
            }
            (
                Step::Commit {
                    batch,
                    batch_id,
                    rejected,
                },
                SinkResponse::Reply(Message::Committed(c)),
            ) if c.batch_id == batch_id => {
                if c.results.is_empty() {
                    return Err(bare(Error::Sink(format!("sink did not know batch {batch_id}"))));
                }
                let conf = store
                    .confirm(&batch, &c.results, &rejected, &[&c.regional, &c.cloud])
                    .map_err(bare)?;
                AggStats::add(&self.stats.cloud_acked_changes, conf.applied as u64);
                AggStats::add(&self.stats.sink_rejected_changes, conf.rejected as u64);
                let stuck = conf.applied == 0 && conf.missing > 0;
                let mut notices = Vec::with_capacity(conf.devices.len());
                for d in conf.devices {
                    let cloud = match store.cloud_knowledge(&d) {
                        Ok(k) => k,
                        Err(e) => return Err((e, notices)),
                    };
                    notices.push(AgentNotice {
                        device: d,
                        message: Message::CloudAck(CloudAck { cloud }),
                    });
                }
                if stuck {
                    // Back off instead of offering the same incomplete changes in a tight loop.
                    return Err((
                        Error::Sink(format!(
                            "{} forwarded changes still lack chunks at the sink",
                            conf.missing
                        )),
                        notices,
                    ));
                }
                self.progress(now_ms);
                Ok(notices)
            }
            (_, r) => Err(unexpected(&r)),
        }
    }

    /// A round made progress: the next one may start at once.
    fn progress(&mut self, now_ms: u64) {
        self.backoff_ms = self.first_backoff_ms;
        self.step = Step::Idle;
        self.wake_at = now_ms;
    }

    /// A failed round: forget it, say Hello again next time, back off.
    fn fail(&mut self, now_ms: u64, e: &Error) {
        AggStats::add(&self.stats.sink_errors, 1);
        self.hello_done = false;
        self.step = Step::Idle;
        self.next = None;
        self.in_flight = None;
        tracing::warn!("forwarding to the sink: {e}; retrying in {} ms", self.backoff_ms);
        self.wake_at = now_ms.saturating_add(self.backoff_ms);
        self.backoff_ms = self.backoff_ms.saturating_mul(2).min(self.retry_max_ms);
    }
}

/// The daemon's driver of [`ForwardCore`]: store work on the blocking pool,
/// requests over [`SinkHttp`], CloudAcks over MQTT.
pub struct Forwarder {
    core: Option<ForwardCore>,
    store: Arc<AggStore>,
    sink: SinkHttp,
    client: AsyncClient,
    stats: Arc<AggStats>,
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
        Forwarder {
            core: Some(ForwardCore::new(cfg, stats.clone())),
            store,
            sink,
            client,
            stats,
        }
    }

    /// Runs `f` on the core and the store off the async threads.
    async fn with_core<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut ForwardCore, &AggStore) -> T + Send + 'static,
    ) -> Result<T> {
        let mut core = self
            .core
            .take()
            .ok_or_else(|| Error::Internal("forwarder core lost".into()))?;
        let store = self.store.clone();
        let (core, out) = tokio::task::spawn_blocking(move || {
            let out = f(&mut core, &store);
            (core, out)
        })
        .await
        .map_err(|e| Error::Internal(format!("store task: {e}")))?;
        self.core = Some(core);
        Ok(out)
    }

    /// Sends one request; the sink's answer or why it failed.
    async fn call(&self, req: SinkRequest) -> std::result::Result<SinkResponse, String> {
        match req {
            SinkRequest::PutPack { id_hex, bytes, .. } => self
                .sink
                .put_pack(&id_hex, bytes)
                .await
                .map(|_| SinkResponse::Stored)
                .map_err(|e| e.to_string()),
            SinkRequest::Sync { message, .. } => self
                .sink
                .sync(&message)
                .await
                .map(SinkResponse::Reply)
                .map_err(|e| e.to_string()),
        }
    }

    fn publish(&self, notices: Vec<AgentNotice>) {
        for n in notices {
            let Ok(payload) = n.message.encode() else {
                continue;
            };
            // Best effort: agents also learn cloud knowledge on their next Hello.
            match self.client.try_publish(n.topic(), QoS::AtLeastOnce, false, payload) {
                Ok(()) => AggStats::add(&self.stats.messages_out, 1),
                Err(e) => tracing::debug!(device = %n.device, "cloudack not sent: {e}"),
            }
        }
    }

    /// One step: sends the next due request and handles its answer, or
    /// sleeps until the core's next timeout.
    async fn step(&mut self) -> Result<()> {
        let now = self.store.now_ms();
        let (req, timeout) = self
            .with_core(move |c, s| {
                let r = c.poll_request(now, s);
                (r, c.poll_timeout())
            })
            .await?;
        match req {
            Ok(Some(req)) => {
                let id = req.req_id();
                let outcome = self.call(req).await;
                let now = self.store.now_ms();
                match self.with_core(move |c, s| c.on_response(now, s, id, outcome)).await? {
                    Ok(notices) => self.publish(notices),
                    Err(e) => tracing::debug!("forward round failed: {e}"),
                }
            }
            Ok(None) => {
                let wait = timeout.map_or(250, |t| t.saturating_sub(self.store.now_ms()));
                tokio::time::sleep(Duration::from_millis(wait.max(1))).await;
            }
            Err(e) => tracing::debug!("forward round failed: {e}"),
        }
        Ok(())
    }
}

/// Runs the forwarder forever, backing off while the sink is unreachable.
pub async fn forwarder(mut f: Forwarder) {
    loop {
        if let Err(e) = f.step().await {
            tracing::error!("forwarder: {e}");
            tokio::time::sleep(Duration::from_secs(1)).await;
            if f.core.is_none() {
                return;
            }
        }
    }
}
