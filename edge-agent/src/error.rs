//! The one error type of the edge-agent library.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is in use by another process (a running edge-agent?)")]
    Locked { path: PathBuf },
    #[error("state database: {0}")]
    Db(String),
    /// redb refuses every write after a failed one (typically a full disk):
    /// the database must be closed and opened again. Daemons exit on it so
    /// their supervisor restarts them; nothing committed is lost.
    #[error(
        "state database refused writes after an earlier I/O error (disk full?): {0}; \
         the agent must be restarted to reopen it"
    )]
    DbPoisoned(String),
    #[error("state file holds {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
    #[error("state file {path} belongs to device {stored}, not {requested}")]
    Identity {
        path: PathBuf,
        stored: String,
        requested: String,
    },
    #[error("key file {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Protocol(#[from] protocol::Error),
    #[error("mqtt: {0}")]
    Mqtt(String),
    #[error(
        "timed out after {secs:.1} s: {pending} recorded change(s) not yet durable at the {level} level \
         (is the broker reachable and an aggregator serving this device?)"
    )]
    Timeout {
        secs: f64,
        level: &'static str,
        pending: u64,
    },
    #[error("sync stopped: {0}")]
    Stopped(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// True when the state database must be reopened before it works again.
    pub fn is_poisoned_db(&self) -> bool {
        match self {
            Error::DbPoisoned(_) => true,
            Error::Protocol(protocol::Error::Store(s)) => s.contains("refused writes after an earlier I/O error"),
            _ => false,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// All redb error types funnel into `Error::Db`, except the lock error,
/// which operators need to recognise, and a poisoned database
/// ([`Error::DbPoisoned`]), which only a reopen cures.
macro_rules! db_error {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Error {
                let e: redb::Error = e.into();
                match e {
                    redb::Error::PreviousIo => Error::DbPoisoned(e.to_string()),
                    e => Error::Db(e.to_string()),
                }
            }
        }
    )*};
}
db_error!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl From<redb::DatabaseError> for Error {
    fn from(e: redb::DatabaseError) -> Error {
        Error::Db(e.to_string())
    }
}
