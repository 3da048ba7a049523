//! Ferry's central cloud-sink: writes packs and signed manifests to an object
//! store, keeps a redb catalog that can always be rebuilt from those objects,
//! serves the sync protocol to aggregators and a query/restore API to the CLI.
//!
//! Layout of a data directory:
//! ```text
//! DIR/catalog.redb                                   index, rebuildable (its
//!                                                    `presence` table is live state, re-sent by aggregators)
//! DIR/objects/packs/<2 hex>/<pack id hex>            protocol::pack objects
//! DIR/objects/manifests/<tenant>/<site>/<device>/<epoch>/<seq>   CBOR signed Change
//! DIR/objects/meta/<tenant>/<site>/<device>/<gseq>              CBOR changes::MetaOpRecord (operator op)
//! ```
//! Invariant: an object is durable before any catalog entry points at it.

pub mod catalog;
pub mod changes;
pub mod client;
pub mod fleet;
pub mod http;
pub mod objects;
pub mod restore;
pub mod shared;
pub mod store;

pub use catalog::{Catalog, DeviceInfo, FileEntry, FileQuery};
pub use client::SinkClient;
pub use fleet::{FleetRow, PresenceUpdate};
pub use http::{serve, serve_with, ServeConfig};
pub use objects::Objects;
pub use restore::{restore, restore_shared, RestoreReport, RestoreRequest, SharedRestoreRequest};
pub use store::{rebuild, RebuildReport, SinkStore};

/// The one error type of the cloud-sink library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Protocol(#[from] protocol::Error),
    #[error("catalog: {0}")]
    Catalog(#[from] redb::Error),
    #[error("object store: {0}")]
    Objects(#[from] object_store::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    /// The sink answered with a non-2xx status.
    #[error("sink answered {status}: {reason}")]
    Status { status: u16, reason: String },
    /// Bad input from a peer or user (maps to HTTP 400).
    #[error("{0}")]
    BadRequest(String),
    /// The request names something the sink does not hold (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// Data failed verification (signature, key, hash, length): restore refuses it.
    #[error("verification failed: {0}")]
    Verify(String),
    /// A restore target that would leave the output directory or pass a symlink.
    #[error("unsafe restore path {0:?}: {1}")]
    UnsafePath(String, String),
    #[error("catalog is corrupt: {0}")]
    Corrupt(String),
    #[error("background task failed: {0}")]
    Task(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

// redb has one error type per operation; all of them fold into `redb::Error`.
macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Catalog(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Task(e.to_string())
    }
}

/// The catalog's clock: the wall clock by default ([`SinkClock::system`]);
/// a simulator supplies its virtual time ([`SinkClock::from_ms`]). It times
/// receive stamps (`last_seen`) of changes a [`SinkStore`] applies, operator
/// ops, and the gseqs of server changes (`max(last + 1, now in µs)`).
#[derive(Clone)]
pub struct SinkClock(std::sync::Arc<dyn Fn() -> u64 + Send + Sync>);

impl SinkClock {
    /// The wall clock, in microseconds.
    pub fn system() -> SinkClock {
        SinkClock(std::sync::Arc::new(now_us))
    }
    /// A clock in Unix milliseconds (e.g. a simulator's virtual time).
    pub fn from_ms(f: impl Fn() -> u64 + Send + Sync + 'static) -> SinkClock {
        SinkClock(std::sync::Arc::new(move || f().saturating_mul(1000)))
    }
    /// Unix microseconds.
    pub fn now_us(&self) -> u64 {
        (self.0)()
    }
    /// Unix milliseconds.
    pub fn now_ms(&self) -> u64 {
        self.now_us() / 1000
    }
}

impl Default for SinkClock {
    fn default() -> Self {
        SinkClock::system()
    }
}

impl std::fmt::Debug for SinkClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SinkClock")
    }
}

/// Microseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Parses RFC 3339 into Unix milliseconds (negative times are refused).
pub fn parse_rfc3339_ms(s: &str) -> Result<u64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).map_err(|e| {
        Error::BadRequest(format!(
            "bad time {s:?} (want RFC 3339, e.g. 2026-11-22T10:00:00Z): {e}"
        ))
    })?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| Error::BadRequest(format!("time {s:?} is before 1970")))
}

/// Formats Unix milliseconds as RFC 3339 (UTC).
pub fn format_ms(ms: u64) -> String {
    format_ns(i128::from(ms) * 1_000_000)
}

/// Formats Unix nanoseconds as RFC 3339 (UTC); out-of-range values print raw.
pub fn format_ns(ns: i128) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ns)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("{ns}ns"))
}
