//! Protocol messages (DESIGN.md §4) and their bounded CBOR envelope.
//!
//! Every field has an explicit number (`#[n(..)]`): new optional fields get
//! new numbers and old peers skip them, so the wire stays stable across
//! versions.

use crate::ids::{DeviceRef, Hash32, ReplicaId};
use crate::knowledge::Knowledge;
use crate::manifest::Change;
use crate::meta::ServerChange;
use crate::{Error, Result, PROTO_VERSION};
use minicbor::{Decode, Encode};

/// Hard upper bound on any encoded envelope. MQTT packet limits are set
/// above this (see `MQTT_MAX_PACKET`).
pub const MAX_MESSAGE: usize = 8 << 20;
/// MQTT packet size limit to configure on clients and brokers: the largest
/// envelope plus topic and property overhead.
pub const MQTT_MAX_PACKET: usize = MAX_MESSAGE + (64 << 10);

#[derive(Clone, PartialEq, Eq, Debug, Encode, Decode)]
pub struct Hello {
    #[n(0)]
    pub proto: u16,
    /// The device an agent speaks for; None for an aggregator talking to the sink.
    #[n(1)]
    pub device: Option<DeviceRef>,
    /// The agent's current replica (device + epoch).
    #[n(2)]
    pub replica: Option<ReplicaId>,
    #[n(3)]
    pub software: String,
    /// Server changes the agent has applied: every one with `gseq` at or
    /// below this (None from older agents and from aggregators).
    #[n(4)]
    pub server_cursor: Option<u64>,
}

#[derive(Clone, PartialEq, Eq, Debug, Encode, Decode)]
pub struct KnowledgeMsg {
    /// What this server holds durably of the client's replicas.
    #[n(0)]
    pub regional: Knowledge,
    /// What the cloud holds of them, as far as this server knows.
    #[n(1)]
    pub cloud: Knowledge,
    /// Largest envelope the server accepts.
    #[n(2)]
    pub max_message: u32,
    /// Largest number of changes per batch.
    #[n(3)]
    pub max_batch: u32,
}

#[derive(Clone, PartialEq, Eq, Debug, Encode, Decode)]
pub struct Batch {
    #[n(0)]
    pub batch_id: u64,
    #[n(1)]
    pub changes: Vec<Change>,
}

#[derive(Clone, PartialEq, Eq, Debug, Encode, Decode)]
pub struct Prepare {
    #[n(0)]
    pub batch_id: u64,
    /// Chunks the server lacks, each once.
    #[n(1)]
    pub missing: Vec<Hash32>,
    /// Non-zero: the server is out of room; resend the batch after this long.
    #[n(2)]
    pub retry_after_ms: u64,
    /// Changes refused outright (seq, reason).
    #[n(3)]
    pub rejected: Vec<(u64, String)>,
}

#[derive(Clone, PartialEq, Eq, Debug, Encode, Decode)]
pub struct ChunkData {
    #[n(0)]
    pub id: Hash32,
    #[n(1)]
    #[cbor(with = "minicbor::bytes")]
    pub bytes: Vec<u8>,
}

#[derive(Clone, PartialEq, Eq, Debug, Encode, Decode)]
pub struct Data {
    #[n(0)]
    pub batch_id: u64,
    #[n(1)]
    pub chunks: Vec<ChunkData>,
}

#[derive(Clone, PartialEq, Eq, Debug, Encode, Decode)]
pub struct Commit {
    #[n(0)]
    pub batch_id: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, Encode, Decode)]
pub enum Status {
    /// Durable at the server (now or before).
    #[n(0)]
    Applied,
    /// Some chunks are still missing: send them and commit again.
    #[n(1)]
    Missing,
    /// Refused; the reason was in Prepare and the server log.
    #[n(2)]
    Rejected,
}

#[derive(Clone, PartialEq, Eq, Debug, Encode, Decode)]
pub struct SeqStatus {
    #[n(0)]
    pub replica: ReplicaId,
    #[n(1)]
    pub seq: u64,
    #[n(2)]
    pub status: Status,
}

#[derive(Clone, PartialEq, Eq, Debug, Encode, Decode)]
pub struct Committed {
    #[n(0)]
    pub batch_id: u64,
    /// Empty when the server did not know the batch (it restarted, or
    /// evicted it): the client offers those changes again.
    #[n(1)]
    pub results: Vec<SeqStatus>,
    #[n(2)]
    pub regional: Knowledge,
    #[n(3)]
    pub cloud: Knowledge,
}

#[derive(Clone, PartialEq, Eq, Debug, Encode, Decode)]
pub struct CloudAck {
    #[n(0)]
    pub cloud: Knowledge,
}

/// Server → device changes (central metadata, shared-path heads). Each item
/// is a CRDT state: applying it twice or out of order is harmless.
#[derive(Clone, PartialEq, Eq, Debug, Encode, Decode)]
pub struct Changes {
    #[n(0)]
    pub items: Vec<ServerChange>,
    /// Some(n): `items` are every change for this device in
    /// (the Hello's `server_cursor`, n]; the device may move its cursor to n.
    /// None: a live push, which moves no cursor.
    #[n(1)]
    pub upto: Option<u64>,
}

#[derive(Clone, PartialEq, Eq, Debug, Encode, Decode)]
pub struct Nack {
    #[n(0)]
    pub reason: String,
}

#[derive(Clone, PartialEq, Eq, Debug, Encode, Decode)]
pub enum Message {
    #[n(1)]
    Hello(#[n(0)] Hello),
    #[n(2)]
    Knowledge(#[n(0)] KnowledgeMsg),
    #[n(3)]
    Batch(#[n(0)] Batch),
    #[n(4)]
    Prepare(#[n(0)] Prepare),
    #[n(5)]
    Data(#[n(0)] Data),
    #[n(6)]
    Commit(#[n(0)] Commit),
    #[n(7)]
    Committed(#[n(0)] Committed),
    #[n(8)]
    CloudAck(#[n(0)] CloudAck),
    #[n(9)]
    Nack(#[n(0)] Nack),
    #[n(10)]
    Changes(#[n(0)] Changes),
}

impl Message {
    /// Topic suffix / log name of the message kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Knowledge(_) => "knowledge",
            Message::Batch(_) => "batch",
            Message::Prepare(_) => "prepare",
            Message::Data(_) => "data",
            Message::Commit(_) => "commit",
            Message::Committed(_) => "committed",
            Message::CloudAck(_) => "cloudack",
            Message::Nack(_) => "nack",
            Message::Changes(_) => "changes",
        }
    }

    /// Encodes into a versioned envelope; fails if over `MAX_MESSAGE`.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let out = crate::to_cbor(&EnvelopeRef {
            version: PROTO_VERSION,
            msg: self,
        });
        if out.len() > MAX_MESSAGE {
            return Err(Error::TooLarge {
                size: out.len(),
                limit: MAX_MESSAGE,
            });
        }
        Ok(out)
    }

    /// Decodes an envelope of at most `MAX_MESSAGE` bytes. Never panics.
    pub fn decode(b: &[u8]) -> Result<Message> {
        if b.len() > MAX_MESSAGE {
            return Err(Error::TooLarge {
                size: b.len(),
                limit: MAX_MESSAGE,
            });
        }
        let mut d = minicbor::Decoder::new(b);
        // Read the version first so a newer peer gets a precise error.
        let n = d.array()?;
        if n != Some(2) {
            return Err(Error::Decode("envelope is not a 2-element array".into()));
        }
        let v = d.u16()?;
        if v != PROTO_VERSION {
            return Err(Error::Version(v));
        }
        let m: Message = d.decode()?;
        if d.position() != b.len() {
            return Err(Error::Decode("trailing bytes after envelope".into()));
        }
        Ok(m)
    }
}

#[derive(Encode)]
struct EnvelopeRef<'a> {
    #[n(0)]
    version: u16,
    #[n(1)]
    msg: &'a Message,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_version_check() {
        let m = Message::Commit(Commit { batch_id: 42 });
        let b = m.encode().expect("encode");
        assert_eq!(Message::decode(&b).expect("decode"), m);
        let mut other = b.clone();
        other[1] = 9; // version field
        assert!(matches!(Message::decode(&other), Err(Error::Version(9))));
        let mut trailing = b;
        trailing.push(0);
        assert!(Message::decode(&trailing).is_err());
    }

    #[test]
    fn oversized_is_refused_both_ways() {
        let big = vec![0u8; MAX_MESSAGE + 1];
        assert!(matches!(Message::decode(&big), Err(Error::TooLarge { .. })));
        let m = Message::Data(Data {
            batch_id: 1,
            chunks: vec![ChunkData {
                id: Hash32::default(),
                bytes: big,
            }],
        });
        assert!(matches!(m.encode(), Err(Error::TooLarge { .. })));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Message::decode(&b);
        }

        #[test]
        fn mutated_messages_never_panic(pos in 0usize..64, val in any::<u8>()) {
            let m = Message::Prepare(Prepare { batch_id: 3, missing: vec![Hash32::of(b"a")], retry_after_ms: 0, rejected: vec![(1, "x".into())] });
            let mut b = m.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let p = pos % b.len();
            b[p] = val;
            let _ = Message::decode(&b);
        }
    }
}
