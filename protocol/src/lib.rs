//! Ferry's shared protocol: wire types, knowledge, manifests, chunk sealing,
//! pack format, and the sans-IO sync state machines used by every node.
//!
//! Nothing in this crate touches sockets, clocks, tasks or disks: callers pass
//! `now` (milliseconds) and inputs, and get outputs back (the quinn-proto /
//! rustls shape). Storage is reached only through the narrow store traits in
//! [`client`] and [`server`], so the daemons and `sim` drive the same logic.

pub mod client;
pub mod hlc;
pub mod ids;
pub mod knowledge;
pub mod manifest;
pub mod meta;
pub mod msg;
pub mod pack;
pub mod seal;
pub mod server;
pub mod sha;
pub mod shared;
pub mod topic;

pub use ids::{DeviceRef, Hash32, Id, ReplicaId};
pub use knowledge::{Knowledge, RangeSet};
pub use manifest::{Change, ChangeBody, ChunkRef, FileVersion};
pub use msg::Message;

/// Protocol version carried in every envelope.
pub const PROTO_VERSION: u16 = 1;

/// The one error type of the protocol crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed message: {0}")]
    Decode(String),
    #[error("unsupported protocol version {0} (this node speaks {PROTO_VERSION})")]
    Version(u16),
    #[error("invalid id {0:?}: ids match [a-z0-9][a-z0-9_-]{{0,63}}")]
    InvalidId(String),
    #[error("invalid path {0:?}: {1}")]
    InvalidPath(String, &'static str),
    #[error("bad signature on change {0}")]
    BadSignature(String),
    #[error("crypto: {0}")]
    Crypto(&'static str),
    #[error("corrupt chunk {0}: {1}")]
    CorruptChunk(String, &'static str),
    #[error("corrupt pack: {0}")]
    CorruptPack(String),
    #[error("compression: {0}")]
    Compress(String),
    #[error("key file: {0}")]
    KeyFile(String),
    #[error("store: {0}")]
    Store(String),
    /// A user or config value out of range (a policy name, a tag).
    #[error("invalid {0}")]
    Invalid(String),
}

impl From<minicbor::decode::Error> for Error {
    fn from(e: minicbor::decode::Error) -> Self {
        Error::Decode(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Encodes any CBOR value into a fresh buffer. Encoding into a `Vec` cannot fail.
pub fn to_cbor<T: minicbor::Encode<()>>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing to a Vec is infallible; our Encode impls never return errors.
    let _ = minicbor::encode(v, &mut out);
    out
}

/// Decodes a CBOR value from bytes that must be at most `limit` long.
/// minicbor does not pre-allocate from declared lengths, so memory stays
/// proportional to the (bounded) input.
pub fn from_cbor<'b, T: minicbor::Decode<'b, ()>>(b: &'b [u8], limit: usize) -> Result<T> {
    if b.len() > limit {
        return Err(Error::TooLarge { size: b.len(), limit });
    }
    Ok(minicbor::decode(b)?)
}
