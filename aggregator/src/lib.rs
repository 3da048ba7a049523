//! Ferry's regional aggregator (DESIGN.md §5): receives changes and chunks
//! from edge agents over MQTT, dedups chunks across all of them, holds them
//! durably (redb + pack files) and forwards them in packs to the cloud-sink.
//!
//! Library entry point: [`run`] / [`run_with_stats`], so `sim` can run an
//! aggregator in-process; the `aggregator` binary is a thin CLI around it.
//!
//! ```no_run
//! # async fn demo() -> aggregator::Result<()> {
//! use aggregator::{AggConfig, AggStats};
//! let stats = std::sync::Arc::new(AggStats::default());
//! let cfg = AggConfig::new("mqtt://127.0.0.1:1883", "http://127.0.0.1:8080", "/tmp/agg".into());
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let task = tokio::spawn(aggregator::run_with_stats(cfg, stats.clone(), async {
//!     let _ = stopped.await;
//! }));
//! println!("{:?}", stats.snapshot());
//! let _ = stop.send(()); // returns once the store is closed: safe to restart on the same dir
//! let _ = task.await;
//! # Ok(()) }
//! ```

pub mod forward;
pub mod mqtt;
pub mod presence;
pub mod sink;
pub mod store;

pub use store::{AggStore, StoreConfig};

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The one error type of the aggregator library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {0}")]
    Db(#[from] redb::Error),
    #[error("I/O on {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Protocol(#[from] protocol::Error),
    #[error("corrupt store: {0}")]
    Corrupt(String),
    #[error("sink: {0}")]
    Sink(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("internal task failed: {0}")]
    Internal(String),
    /// A write inside a group commit failed earlier: the group is abandoned.
    #[error("group commit abandoned after a failed write: {0}")]
    GroupFailed(String),
}

macro_rules! redb_errors {
    ($($t:ident),*) => {$(
        impl From<redb::$t> for Error {
            fn from(e: redb::$t) -> Self {
                Error::Db(e.into())
            }
        }
    )*};
}
redb_errors!(
    DatabaseError,
    TransactionError,
    TableError,
    StorageError,
    CommitError,
    SetDurabilityError
);

impl From<reqwest::Error> for Error {
    fn from(e: reqwest::Error) -> Self {
        Error::Sink(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything an aggregator needs to run.
#[derive(Clone, Debug)]
pub struct AggConfig {
    /// `mqtt://host:port`
    pub broker: String,
    /// `http://host:port` of the cloud-sink.
    pub sink: String,
    /// Holds `agg.redb` and `packs/`.
    pub data: PathBuf,
    /// MQTT client id is `ferry-agg-{id}`.
    pub id: String,
    /// MQTT v5 shared-subscription group, for several aggregator processes.
    pub share_group: Option<String>,
    /// Close a pack at this many bytes.
    pub pack_target: u64,
    /// Close the open pack when changes waiting to be forwarded have waited this long.
    pub pack_max_delay: Duration,
    /// Spool watermarks (bytes of local packs not yet uploaded).
    pub spool_high: u64,
    pub spool_low: u64,
    /// A sink request that makes no progress for this long fails (a stalled
    /// link is noticed): each request may take `sink_timeout` plus its body
    /// size at `sink_min_rate`.
    pub sink_timeout: Duration,
    /// Slowest upload rate (bytes/s) a sink link is expected to sustain.
    pub sink_min_rate: u64,
    /// Longest back-off between attempts while the sink is unreachable.
    pub sink_retry_max: Duration,
    /// At an agent's Hello, ask the sink what it holds of that device (at
    /// most this long) so the agent does not re-send what the cloud has.
    /// Zero turns the lookup off.
    pub cloud_lookup_timeout: Duration,
    /// How often to ask the sink for new server changes (tags, holds,
    /// retention, shared-path heads) and push them to the agents this
    /// aggregator serves. Agents also get them at every Hello. Zero: off.
    pub changes_poll: Duration,
    /// Presence is posted to the sink at least this often, to learn whether
    /// it restarted (`presence::REFRESH_EVERY`; tests shorten it).
    pub presence_refresh: Duration,
}

impl AggConfig {
    /// Defaults for everything but the endpoints and the data directory.
    pub fn new(broker: &str, sink: &str, data: PathBuf) -> AggConfig {
        AggConfig {
            broker: broker.to_string(),
            sink: sink.to_string(),
            data,
            id: "agg".to_string(),
            share_group: None,
            pack_target: 16 << 20,
            pack_max_delay: Duration::from_secs(1),
            spool_high: 2 << 30,
            spool_low: 3 << 29,
            sink_timeout: Duration::from_secs(30),
            sink_min_rate: 256 << 10,
            sink_retry_max: Duration::from_secs(30),
            presence_refresh: presence::REFRESH_EVERY,
            cloud_lookup_timeout: Duration::from_secs(3),
            changes_poll: Duration::from_secs(5),
        }
    }

    fn validate(&self) -> Result<()> {
        parse_mqtt_url(&self.broker)?;
        if !self.sink.starts_with("http://") {
            return Err(Error::Config(format!(
                "sink {:?} must be an http://HOST:PORT URL",
                self.sink
            )));
        }
        protocol::ids::Id::new(&self.id).map_err(|e| Error::Config(format!("--id: {e}")))?;
        if let Some(g) = &self.share_group {
            protocol::ids::Id::new(g).map_err(|e| Error::Config(format!("--share-group: {e}")))?;
        }
        if self.spool_low > self.spool_high {
            return Err(Error::Config("spool low watermark is above the high one".into()));
        }
        if self.sink_timeout.is_zero() || self.sink_min_rate == 0 || self.sink_retry_max.is_zero() {
            return Err(Error::Config(
                "sink timeout, minimum rate and retry maximum must be positive".into(),
            ));
        }
        if self.pack_target == 0 {
            return Err(Error::Config("pack target must be positive".into()));
        }
        Ok(())
    }
}

/// Parses `mqtt://host:port` into (host, port).
pub fn parse_mqtt_url(url: &str) -> Result<(String, u16)> {
    let bad = || Error::Config(format!("broker {url:?} must look like mqtt://HOST:PORT"));
    let rest = url.strip_prefix("mqtt://").ok_or_else(bad)?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || host.contains('/') || host.contains('@') || port == 0 {
        return Err(bad());
    }
    Ok((host.trim_start_matches('[').trim_end_matches(']').to_string(), port))
}

/// Live counters, shared with whoever started the aggregator.
#[derive(Default, Debug)]
pub struct AggStats {
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub bad_messages: AtomicU64,
    pub chunks_received: AtomicU64,
    pub chunks_duplicate: AtomicU64,
    /// Extension chunks that arrived before their base (should stay 0).
    pub chunks_base_missing: AtomicU64,
    pub bytes_received: AtomicU64,
    pub changes_applied: AtomicU64,
    pub changes_rejected: AtomicU64,
    pub backpressure: AtomicU64,
    pub packs_closed: AtomicU64,
    pub packs_uploaded: AtomicU64,
    pub forwarded_changes: AtomicU64,
    pub cloud_acked_changes: AtomicU64,
    pub sink_rejected_changes: AtomicU64,
    /// Chunks the sink asked for that exist only in the cloud (an error).
    pub sink_missing_lost: AtomicU64,
    pub sink_errors: AtomicU64,
    pub spool_bytes: AtomicU64,
    pub forward_queue: AtomicU64,
    /// Sink requests that failed for lack of progress (stalled link).
    pub sink_timeouts: AtomicU64,
    /// Agent Hellos answered with cloud knowledge fetched from the sink.
    pub cloud_lookups: AtomicU64,
    pub cloud_lookup_failures: AtomicU64,
    /// Server changes (metadata, shared heads) sent down to agents.
    pub server_changes_relayed: AtomicU64,
    /// Payloads on presence topics (valid or not).
    pub presence_in: AtomicU64,
    /// Presence payloads ignored as malformed or oversized.
    pub presence_bad: AtomicU64,
    /// Presence of devices beyond `presence::MAX_DEVICES`, dropped.
    pub presence_dropped: AtomicU64,
    /// Presence entries the sink accepted.
    pub presence_forwarded: AtomicU64,
    /// Failed `POST /v1/presence` attempts (retried).
    pub presence_forward_errors: AtomicU64,
    /// Times the sink answered a new presence view and everything was re-sent.
    pub presence_resends: AtomicU64,
}

/// A plain copy of [`AggStats`].
#[derive(Default, Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    pub messages_in: u64,
    pub messages_out: u64,
    pub bad_messages: u64,
    pub chunks_received: u64,
    pub chunks_duplicate: u64,
    pub chunks_base_missing: u64,
    pub bytes_received: u64,
    pub changes_applied: u64,
    pub changes_rejected: u64,
    pub backpressure: u64,
    pub packs_closed: u64,
    pub packs_uploaded: u64,
    pub forwarded_changes: u64,
    pub cloud_acked_changes: u64,
    pub sink_rejected_changes: u64,
    pub sink_missing_lost: u64,
    pub sink_errors: u64,
    pub spool_bytes: u64,
    pub forward_queue: u64,
    pub sink_timeouts: u64,
    pub cloud_lookups: u64,
    pub cloud_lookup_failures: u64,
    pub server_changes_relayed: u64,
    pub presence_in: u64,
    pub presence_bad: u64,
    pub presence_dropped: u64,
    pub presence_forwarded: u64,
    pub presence_forward_errors: u64,
    pub presence_resends: u64,
}

impl AggStats {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            messages_in: g(&self.messages_in),
            messages_out: g(&self.messages_out),
            bad_messages: g(&self.bad_messages),
            chunks_received: g(&self.chunks_received),
            chunks_duplicate: g(&self.chunks_duplicate),
            chunks_base_missing: g(&self.chunks_base_missing),
            bytes_received: g(&self.bytes_received),
            changes_applied: g(&self.changes_applied),
            changes_rejected: g(&self.changes_rejected),
            backpressure: g(&self.backpressure),
            packs_closed: g(&self.packs_closed),
            packs_uploaded: g(&self.packs_uploaded),
            forwarded_changes: g(&self.forwarded_changes),
            cloud_acked_changes: g(&self.cloud_acked_changes),
            sink_rejected_changes: g(&self.sink_rejected_changes),
            sink_missing_lost: g(&self.sink_missing_lost),
            sink_errors: g(&self.sink_errors),
            spool_bytes: g(&self.spool_bytes),
            forward_queue: g(&self.forward_queue),
            sink_timeouts: g(&self.sink_timeouts),
            cloud_lookups: g(&self.cloud_lookups),
            cloud_lookup_failures: g(&self.cloud_lookup_failures),
            server_changes_relayed: g(&self.server_changes_relayed),
            presence_in: g(&self.presence_in),
            presence_bad: g(&self.presence_bad),
            presence_dropped: g(&self.presence_dropped),
            presence_forwarded: g(&self.presence_forwarded),
            presence_forward_errors: g(&self.presence_forward_errors),
            presence_resends: g(&self.presence_resends),
        }
    }
}

/// Runs an aggregator until `shutdown` completes. See [`run_with_stats`].
pub async fn run(cfg: AggConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    run_with_stats(cfg, Arc::new(AggStats::default()), shutdown).await
}

/// Runs an aggregator until `shutdown` completes, counting into `stats`.
/// Broker and sink outages are retried forever; only a store that cannot be
/// opened (or invalid configuration) is an error. When this returns, the
/// store is closed and the data directory may be opened again.
pub async fn run_with_stats(cfg: AggConfig, stats: Arc<AggStats>, shutdown: impl Future<Output = ()>) -> Result<()> {
    cfg.validate()?;
    let scfg = StoreConfig {
        pack_target: cfg.pack_target,
        spool_high: cfg.spool_high,
        spool_low: cfg.spool_low,
        ..StoreConfig::default()
    };
    let store = Arc::new(open_store(&cfg, scfg).await?);
    tracing::info!(
        data = %cfg.data.display(),
        spool = store.spool_bytes(),
        queued = store.forward_len()?,
        "aggregator {} starting: broker {}, sink {}",
        cfg.id,
        cfg.broker,
        cfg.sink
    );

    let (client, eventloop) = mqtt::connect(&cfg)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = tokio::task::JoinSet::new();
    let tracker = Arc::new(presence::Tracker::new(&cfg.id, stats.clone()));
    tasks.spawn(mqtt::event_loop(
        eventloop,
        client.clone(),
        mqtt::subscription(&cfg),
        tx,
        stats.clone(),
        tracker.clone(),
    ));
    let sink = sink::SinkHttp::new(&cfg, stats.clone())?;
    tasks.spawn(presence::forward_loop(
        tracker.clone(),
        sink.clone(),
        cfg.sink_retry_max,
        cfg.presence_refresh.max(presence::FLUSH_EVERY),
    ));
    tasks.spawn(mqtt::changes_loop(
        sink.clone(),
        client.clone(),
        tracker,
        cfg.changes_poll,
        stats.clone(),
    ));
    let lookup = mqtt::CloudLookup::new(sink.clone(), cfg.cloud_lookup_timeout);
    tasks.spawn(mqtt::worker(
        rx,
        client.clone(),
        store.clone(),
        stats.clone(),
        Some(lookup),
    ));
    tasks.spawn(forward::forwarder(forward::Forwarder::with_sink(
        &cfg,
        sink,
        store.clone(),
        client.clone(),
        stats.clone(),
    )));
    let report = {
        let (stats, store) = (stats.clone(), store.clone());
        async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                stats.spool_bytes.store(store.spool_bytes(), Ordering::Relaxed);
                tracing::info!(stats = ?stats.snapshot(), "aggregator stats");
            }
        }
    };
    tasks.spawn(report);

    // The tasks run forever; one ending early is a bug (a panic): stop
    // cleanly and report it rather than limp on.
    let failure = tokio::select! {
        _ = shutdown => {
            tracing::info!("aggregator {} shutting down", cfg.id);
            None
        }
        r = tasks.join_next() => {
            tracing::error!("aggregator task ended unexpectedly: {r:?}");
            Some(format!("{r:?}"))
        }
    };
    let _ = client.try_disconnect();
    tasks.shutdown().await;
    // Blocking store calls still running hold clones of the store: wait for
    // them so the database is closed when we return.
    let mut store = store;
    for _ in 0..3000 {
        match Arc::try_unwrap(store) {
            Ok(s) => {
                drop(s);
                return failure.map_or(Ok(()), |f| Err(Error::Internal(f)));
            }
            Err(s) => {
                store = s;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    tracing::warn!("store still in use 30 s after shutdown");
    failure.map_or(Ok(()), |f| Err(Error::Internal(f)))
}

/// Opens the store; while another instance in this process still holds it
/// (an in-process restart right after an aborted `run`), waits up to 10 s.
async fn open_store(cfg: &AggConfig, scfg: StoreConfig) -> Result<AggStore> {
    let mut tries = 0;
    loop {
        let (data, sc) = (cfg.data.clone(), scfg.clone());
        let r = tokio::task::spawn_blocking(move || AggStore::open(&data, sc))
            .await
            .map_err(|e| Error::Internal(format!("opening the store: {e}")))?;
        match r {
            Err(Error::Db(redb::Error::DatabaseAlreadyOpen)) if tries < 100 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            r => return r,
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_urls() {
        assert_eq!(
            parse_mqtt_url("mqtt://127.0.0.1:1883").ok(),
            Some(("127.0.0.1".into(), 1883))
        );
        assert_eq!(
            parse_mqtt_url("mqtt://broker.local:1/").ok(),
            Some(("broker.local".into(), 1))
        );
        for bad in [
            "127.0.0.1:1883",
            "mqtts://h:1",
            "mqtt://h",
            "mqtt://h:x",
            "mqtt://:1",
            "mqtt://h:0",
            "tcp://h:1",
        ] {
            assert!(parse_mqtt_url(bad).is_err(), "{bad}");
        }
    }
}
