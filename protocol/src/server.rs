//! Server side of the sync flow, shared by the aggregator (agents over MQTT)
//! and the cloud-sink (aggregators over HTTP). Sans-IO: storage is reached
//! through [`ServerStore`], time comes in as `now_ms`.

use crate::ids::{DeviceRef, Hash32};
use crate::knowledge::Knowledge;
use crate::manifest::Change;
use crate::msg::*;
use crate::pack::MAX_CHUNK;
use crate::{Result, PROTO_VERSION};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

/// What the server logic needs from storage.
pub trait ServerStore {
    /// What this node holds durably of these devices' replicas, and what the
    /// cloud holds of them as far as this node knows.
    fn knowledge(&mut self, devices: &[DeviceRef]) -> Result<(Knowledge, Knowledge)>;
    fn has_chunk(&mut self, id: &Hash32) -> Result<bool>;
    /// Stores chunks (ids already verified) so they survive a crash.
    fn put_chunks(&mut self, chunks: &[ChunkData]) -> Result<()>;
    /// The pinned signing key of a device (trust on first use), if any.
    fn device_key(&mut self, device: &DeviceRef) -> Result<Option<Vec<u8>>>;
    /// Durably records changes (all chunks present, signatures checked) and
    /// pins the keys of devices seen for the first time, before returning.
    fn apply(&mut self, changes: &[Change]) -> Result<()>;
    /// `Some(ms)` when out of room: clients back off that long.
    fn backpressure(&mut self) -> Option<u64>;
    /// Server changes for `device` after its cursor, answered after the
    /// Knowledge at Hello. `None` when this node has none to offer (it could
    /// not reach the cloud, or it is the cloud's own client).
    fn server_changes(&mut self, _device: &DeviceRef, _after: u64) -> Result<Option<Changes>> {
        Ok(None)
    }
}

/// Who sent a message. `device` is the identity the transport vouches for
/// (the MQTT topic under broker ACLs); `None` for a trusted aggregator.
pub struct Peer<'a> {
    pub name: &'a str,
    pub device: Option<&'a DeviceRef>,
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub max_batch: u32,
    /// Batches held between Batch and Commit, over all peers.
    pub max_pending: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_batch: 512,
            max_pending: 20_000,
        }
    }
}

#[derive(Default, Clone, Debug)]
pub struct ServerStats {
    pub batches: u64,
    pub changes_applied: u64,
    pub changes_rejected: u64,
    pub chunks_received: u64,
    pub chunk_bytes_received: u64,
    pub chunks_duplicate: u64,
    pub chunks_bad: u64,
    /// Verified chunks kept although their batch was unknown (after a restart).
    pub chunks_orphan: u64,
    /// Extension chunks (`seal::base_of`) whose base this server did not
    /// hold when they arrived. Agents only extend a base the server has
    /// acknowledged, so this stays 0 unless that rule broke; kept anyway
    /// (the base may still come) and counted.
    pub chunks_base_missing: u64,
    pub backpressure: u64,
    /// Changes in a batch that this server already held: their signature
    /// is not checked again (it was when they were first applied), which
    /// matters on reconnects that resend a whole outbox.
    pub changes_known: u64,
}

struct Pending {
    /// Accepted changes, each with whether its signature was checked. A
    /// change the server already held is not; it is checked in Commit if it
    /// is to be applied after all.
    changes: Vec<(Change, bool)>,
    rejected: Vec<Change>,
    /// Chunks asked for in Prepare: the only ones Data may deliver.
    wanted: HashSet<Hash32>,
}

pub struct Server {
    cfg: ServerConfig,
    pending: HashMap<(String, u64), Pending>,
    order: VecDeque<(String, u64)>,
    pub stats: ServerStats,
}

impl Server {
    pub fn new(cfg: ServerConfig) -> Server {
        Server {
            cfg,
            pending: HashMap::new(),
            order: VecDeque::new(),
            stats: ServerStats::default(),
        }
    }

    /// Handles one message and returns the replies, in order.
    pub fn handle(
        &mut self,
        _now_ms: u64,
        peer: &Peer,
        msg: Message,
        store: &mut dyn ServerStore,
    ) -> Result<Vec<Message>> {
        match msg {
            Message::Hello(h) => self.hello(peer, h, store),
            Message::Batch(b) => self.batch(peer, b, store),
            Message::Data(d) => self.data(peer, d, store),
            Message::Commit(c) => self.commit(peer, c, store),
            other => Ok(vec![nack(format!("a server does not accept {}", other.kind()))]),
        }
    }

    fn hello(&mut self, peer: &Peer, h: Hello, store: &mut dyn ServerStore) -> Result<Vec<Message>> {
        if h.proto != PROTO_VERSION {
            return Ok(vec![nack(format!(
                "protocol {} not supported; this server speaks {PROTO_VERSION}",
                h.proto
            ))]);
        }
        let device = match (peer.device, &h.device) {
            (Some(p), Some(d)) if p != d => return Ok(vec![nack(format!("hello for {d} on {p}'s topic"))]),
            (Some(p), _) => Some(p.clone()),
            (None, d) => d.clone(),
        };
        let (regional, cloud) = match &device {
            Some(d) => store.knowledge(std::slice::from_ref(d))?,
            None => Default::default(),
        };
        let mut out = vec![Message::Knowledge(KnowledgeMsg {
            regional,
            cloud,
            max_message: MAX_MESSAGE as u32,
            max_batch: self.cfg.max_batch,
        })];
        // A client that keeps a cursor always gets a Changes (empty when
        // there is nothing to offer): it tells the client the exchange is over.
        if let (Some(d), Some(after)) = (&device, h.server_cursor) {
            let ch = store.server_changes(d, after)?.unwrap_or(Changes {
                items: Vec::new(),
                upto: None,
            });
            out.push(Message::Changes(ch));
        }
        Ok(out)
    }

    fn batch(&mut self, peer: &Peer, b: Batch, store: &mut dyn ServerStore) -> Result<Vec<Message>> {
        self.stats.batches += 1;
        if b.changes.len() > self.cfg.max_batch as usize {
            return Ok(vec![nack(format!(
                "batch of {} changes exceeds {}",
                b.changes.len(),
                self.cfg.max_batch
            ))]);
        }
        let devices: Vec<DeviceRef> = b
            .changes
            .iter()
            .map(|c| c.replica.device.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let (regional, _) = store.knowledge(&devices)?;
        let mut keys: HashMap<DeviceRef, Option<Vec<u8>>> = HashMap::new();
        let mut accepted = Vec::new();
        let mut rejected = Vec::new();
        let mut reasons = Vec::new();
        for c in b.changes {
            let held = regional.contains(&c.replica, c.seq);
            let reason = match peer.device {
                Some(d) if *d != c.replica.device => Some(format!("change for {} sent by {d}", c.replica.device)),
                _ if held => None,
                _ => match c.verify() {
                    Err(e) => Some(e.to_string()),
                    Ok(()) => {
                        let pinned = match keys.get(&c.replica.device) {
                            Some(k) => k.clone(),
                            None => {
                                let k = store.device_key(&c.replica.device)?;
                                keys.insert(c.replica.device.clone(), k.clone());
                                k
                            }
                        };
                        match pinned {
                            Some(k) if k != c.pubkey => Some(format!(
                                "{} is signed by a key other than the one pinned for the device",
                                c.label()
                            )),
                            Some(_) => None,
                            None => {
                                // First use: the first key seen pins the device for
                                // the rest of this batch too.
                                keys.insert(c.replica.device.clone(), Some(c.pubkey.clone()));
                                None
                            }
                        }
                    }
                },
            };
            match reason {
                Some(r) => {
                    self.stats.changes_rejected += 1;
                    reasons.push((c.seq, r));
                    rejected.push(c);
                }
                None => {
                    if held {
                        self.stats.changes_known += 1;
                    }
                    accepted.push((c, !held));
                }
            }
        }
        let todo: Vec<&Change> = accepted
            .iter()
            .filter(|(_, checked)| *checked)
            .map(|(c, _)| c)
            .collect();
        if !todo.is_empty() {
            if let Some(ms) = store.backpressure() {
                self.stats.backpressure += 1;
                return Ok(vec![Message::Prepare(Prepare {
                    batch_id: b.batch_id,
                    missing: Vec::new(),
                    retry_after_ms: ms.max(1),
                    rejected: reasons,
                })]);
            }
        }
        let mut wanted = HashSet::new();
        let mut missing = Vec::new();
        for c in &todo {
            for r in c.chunk_refs() {
                if !wanted.contains(&r.id) && !store.has_chunk(&r.id)? {
                    wanted.insert(r.id);
                    missing.push(r.id);
                }
            }
        }
        self.remember(
            peer.name,
            b.batch_id,
            Pending {
                changes: accepted,
                rejected,
                wanted,
            },
        );
        Ok(vec![Message::Prepare(Prepare {
            batch_id: b.batch_id,
            missing,
            retry_after_ms: 0,
            rejected: reasons,
        })])
    }

    fn remember(&mut self, peer: &str, id: u64, p: Pending) {
        let key = (peer.to_string(), id);
        if self.pending.insert(key.clone(), p).is_none() {
            self.order.push_back(key);
        }
        // Oldest batches go first; their clients get an empty Committed and resend.
        while self.pending.len() > self.cfg.max_pending {
            match self.order.pop_front() {
                Some(k) => {
                    self.pending.remove(&k);
                }
                None => break,
            }
        }
        if self.order.len() > 2 * self.cfg.max_pending.max(1) {
            let pending = &self.pending;
            self.order.retain(|k| pending.contains_key(k));
        }
    }

    fn data(&mut self, peer: &Peer, d: Data, store: &mut dyn ServerStore) -> Result<Vec<Message>> {
        // Chunks of a batch this server no longer knows (it restarted, or
        // evicted the batch) are still kept when they verify: a peer that
        // may sign changes referencing any chunk gains nothing it could not
        // do anyway, and the client then does not re-send them after the
        // restart. Not while out of room, though.
        let wanted = self
            .pending
            .get(&(peer.name.to_string(), d.batch_id))
            .map(|p| &p.wanted);
        if wanted.is_none() && store.backpressure().is_some() {
            return Ok(Vec::new());
        }
        let mut good = Vec::with_capacity(d.chunks.len());
        for c in d.chunks {
            let asked = wanted.is_none_or(|w| w.contains(&c.id));
            if c.bytes.len() > MAX_CHUNK || !asked || Hash32::of(&c.bytes) != c.id {
                self.stats.chunks_bad += 1;
                continue;
            }
            if store.has_chunk(&c.id)? {
                self.stats.chunks_duplicate += 1;
                continue;
            }
            if let Ok(Some(b)) = crate::seal::base_of(&c.bytes) {
                if !good.iter().any(|g: &ChunkData| g.id == b.id) && !store.has_chunk(&b.id)? {
                    self.stats.chunks_base_missing += 1;
                }
            }
            self.stats.chunks_received += 1;
            self.stats.chunk_bytes_received += c.bytes.len() as u64;
            if wanted.is_none() {
                self.stats.chunks_orphan += 1;
            }
            good.push(c);
        }
        if !good.is_empty() {
            store.put_chunks(&good)?;
        }
        Ok(Vec::new())
    }

    fn commit(&mut self, peer: &Peer, c: Commit, store: &mut dyn ServerStore) -> Result<Vec<Message>> {
        let key = (peer.name.to_string(), c.batch_id);
        let Some(p) = self.pending.remove(&key) else {
            let (regional, cloud) = match peer.device {
                Some(d) => store.knowledge(std::slice::from_ref(d))?,
                None => Default::default(),
            };
            return Ok(vec![Message::Committed(Committed {
                batch_id: c.batch_id,
                results: Vec::new(),
                regional,
                cloud,
            })]);
        };
        let devices: Vec<DeviceRef> = p
            .changes
            .iter()
            .map(|(c, _)| c)
            .chain(&p.rejected)
            .map(|c| c.replica.device.clone())
            .chain(peer.device.cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let (regional, _) = store.knowledge(&devices)?;
        let mut results = Vec::with_capacity(p.changes.len() + p.rejected.len());
        let mut ready = Vec::new();
        let mut rejected = p.rejected;
        // Keys are checked again here: another batch may have pinned a key
        // for a new device between this batch's Prepare and its Commit.
        let mut keys: HashMap<DeviceRef, Option<Vec<u8>>> = HashMap::new();
        let mut changes = Vec::with_capacity(p.changes.len());
        for (ch, checked) in p.changes {
            // Held at Prepare, so not checked then; knowledge only grows, but
            // a change is never applied unchecked.
            if !checked && !regional.contains(&ch.replica, ch.seq) && ch.verify().is_err() {
                self.stats.changes_rejected += 1;
                rejected.push(ch);
                continue;
            }
            let pinned = match keys.get(&ch.replica.device) {
                Some(k) => k.clone(),
                None => store.device_key(&ch.replica.device)?,
            };
            match pinned {
                Some(k) if k != ch.pubkey => {
                    self.stats.changes_rejected += 1;
                    rejected.push(ch);
                }
                _ => {
                    keys.insert(ch.replica.device.clone(), Some(ch.pubkey.clone()));
                    changes.push(ch);
                }
            }
        }
        for ch in changes {
            let status = if regional.contains(&ch.replica, ch.seq) {
                Status::Applied
            } else {
                let mut complete = true;
                for r in ch.chunk_refs() {
                    if !store.has_chunk(&r.id)? {
                        complete = false;
                        break;
                    }
                }
                if complete {
                    Status::Applied
                } else {
                    Status::Missing
                }
            };
            results.push(SeqStatus {
                replica: ch.replica.clone(),
                seq: ch.seq,
                status,
            });
            if status == Status::Applied && !regional.contains(&ch.replica, ch.seq) {
                ready.push(ch);
            }
        }
        for ch in rejected {
            results.push(SeqStatus {
                replica: ch.replica,
                seq: ch.seq,
                status: Status::Rejected,
            });
        }
        if !ready.is_empty() {
            store.apply(&ready)?;
            self.stats.changes_applied += ready.len() as u64;
        }
        let (regional, cloud) = store.knowledge(&devices)?;
        Ok(vec![Message::Committed(Committed {
            batch_id: c.batch_id,
            results,
            regional,
            cloud,
        })])
    }
}

fn nack(reason: String) -> Message {
    Message::Nack(Nack { reason })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;
    use crate::ids::ReplicaId;
    use crate::manifest::ChangeBody;
    use ring::rand::SystemRandom;
    use ring::signature::Ed25519KeyPair;
    use std::collections::HashMap;

    /// An in-memory store with real key pinning (first use) on apply.
    #[derive(Default)]
    struct Mem {
        keys: HashMap<DeviceRef, Vec<u8>>,
        know: Knowledge,
        /// Chunks held; `all_chunks` makes every chunk count as held.
        chunks: HashSet<Hash32>,
        all_chunks: bool,
    }

    impl ServerStore for Mem {
        fn knowledge(&mut self, _: &[DeviceRef]) -> Result<(Knowledge, Knowledge)> {
            Ok((self.know.clone(), Knowledge::default()))
        }
        fn has_chunk(&mut self, id: &Hash32) -> Result<bool> {
            Ok(self.all_chunks || self.chunks.contains(id))
        }
        fn put_chunks(&mut self, c: &[ChunkData]) -> Result<()> {
            self.chunks.extend(c.iter().map(|c| c.id));
            Ok(())
        }
        fn device_key(&mut self, d: &DeviceRef) -> Result<Option<Vec<u8>>> {
            Ok(self.keys.get(d).cloned())
        }
        fn apply(&mut self, changes: &[Change]) -> Result<()> {
            for c in changes {
                let k = self
                    .keys
                    .entry(c.replica.device.clone())
                    .or_insert_with(|| c.pubkey.clone());
                assert_eq!(*k, c.pubkey, "server applied a change signed by an unpinned key");
                self.know.insert(&c.replica, c.seq);
            }
            Ok(())
        }
        fn backpressure(&mut self) -> Option<u64> {
            None
        }
    }

    fn key() -> Ed25519KeyPair {
        let pk = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("keygen");
        Ed25519KeyPair::from_pkcs8(pk.as_ref()).expect("key")
    }

    fn change(seq: u64, k: &Ed25519KeyPair) -> Change {
        let replica = ReplicaId {
            device: DeviceRef::new("t", "s", "new-dev").expect("ids"),
            epoch: 1,
        };
        Change::sign(replica, seq, Hlc(seq), ChangeBody::Delete(format!("f{seq}")), k)
    }

    /// A server, a store that holds every chunk, and an aggregator peer.
    fn aggregator_round() -> (Server, Mem, Peer<'static>) {
        let st = Mem {
            all_chunks: true,
            ..Mem::default()
        };
        let peer = Peer {
            name: "agg",
            device: None,
        };
        (Server::new(ServerConfig::default()), st, peer)
    }

    fn statuses(m: &[Message]) -> Vec<(u64, Status)> {
        match m {
            [Message::Committed(c)] => c.results.iter().map(|r| (r.seq, r.status)).collect(),
            other => panic!("expected Committed, got {other:?}"),
        }
    }

    #[test]
    fn first_key_pins_a_new_device_within_a_batch_and_across_batches() {
        let (good, bad) = (key(), key());
        let (mut srv, mut st, peer) = aggregator_round();
        // One batch, two keys for a device never seen: the second is refused.
        let b = Batch {
            batch_id: 1,
            changes: vec![change(1, &good), change(2, &bad)],
        };
        let r = srv.handle(0, &peer, Message::Batch(b), &mut st).expect("batch");
        let Message::Prepare(p) = &r[0] else { panic!("{r:?}") };
        assert_eq!(p.rejected.len(), 1);
        assert_eq!(p.rejected[0].0, 2);
        // A second batch, prepared before the first commits, with the other key.
        let b2 = Batch {
            batch_id: 2,
            changes: vec![change(3, &bad)],
        };
        let r = srv.handle(0, &peer, Message::Batch(b2), &mut st).expect("batch");
        let Message::Prepare(p) = &r[0] else { panic!("{r:?}") };
        assert!(p.rejected.is_empty(), "nothing pinned yet at Prepare time");
        let c1 = srv
            .handle(0, &peer, Message::Commit(Commit { batch_id: 1 }), &mut st)
            .expect("commit");
        assert_eq!(statuses(&c1), vec![(1, Status::Applied), (2, Status::Rejected)]);
        // Now the device is pinned: the other key's change is rejected at Commit,
        // not reported Applied.
        let c2 = srv
            .handle(0, &peer, Message::Commit(Commit { batch_id: 2 }), &mut st)
            .expect("commit");
        assert_eq!(statuses(&c2), vec![(3, Status::Rejected)]);
        assert!(st.know.contains(&change(1, &good).replica, 1));
        assert!(!st.know.contains(&change(3, &bad).replica, 3));
    }

    #[test]
    fn held_changes_are_not_verified_again_and_never_applied_unchecked() {
        let k = key();
        let (mut srv, mut st, peer) = aggregator_round();
        let round = |srv: &mut Server, st: &mut Mem, id: u64, changes: Vec<Change>| {
            let r = srv
                .handle(0, &peer, Message::Batch(Batch { batch_id: id, changes }), st)
                .expect("batch");
            let Message::Prepare(p) = &r[0] else { panic!("{r:?}") };
            let rejected: Vec<u64> = p.rejected.iter().map(|r| r.0).collect();
            let c = srv
                .handle(0, &peer, Message::Commit(Commit { batch_id: id }), st)
                .expect("commit");
            (rejected, statuses(&c))
        };
        let forged = |seq: u64| {
            let mut c = change(seq, &k);
            c.signature[0] ^= 1;
            c
        };
        assert_eq!(
            round(&mut srv, &mut st, 1, vec![change(1, &k)]),
            (vec![], vec![(1, Status::Applied)])
        );
        assert_eq!(srv.stats.changes_known, 0);
        // A resend of a held change is answered from knowledge, unchecked;
        // a change not held is checked as before.
        assert_eq!(
            round(&mut srv, &mut st, 2, vec![forged(1), forged(2)]),
            (vec![2], vec![(1, Status::Applied), (2, Status::Rejected)])
        );
        assert_eq!(srv.stats.changes_known, 1);
        assert!(!st.know.contains(&change(2, &k).replica, 2));
        // Held at Prepare but not at Commit (knowledge lost in between):
        // the signature is checked before anything is applied.
        let r = srv
            .handle(
                0,
                &peer,
                Message::Batch(Batch {
                    batch_id: 3,
                    changes: vec![forged(1)],
                }),
                &mut st,
            )
            .expect("batch");
        assert!(matches!(&r[0], Message::Prepare(p) if p.rejected.is_empty()), "{r:?}");
        st.know = Knowledge::default();
        let c = srv
            .handle(0, &peer, Message::Commit(Commit { batch_id: 3 }), &mut st)
            .expect("commit");
        assert_eq!(statuses(&c), vec![(1, Status::Rejected)]);
        assert!(
            !st.know.contains(&change(1, &k).replica, 1),
            "a forged change was applied"
        );
    }

    #[test]
    fn extension_chunks_arriving_before_their_base_are_counted() {
        use crate::seal::{BaseRef, Cipher, Sealer, TenantKey};
        let mut sealer = Sealer::new(&TenantKey::from_bytes(1, [7; 32]), Cipher::Aes256Gcm).expect("sealer");
        let text = b"2026-11-29T10:00:00Z,line1,41.5\n".repeat(200);
        let (mut base, mut ext) = (Vec::new(), Vec::new());
        let base_id = sealer.seal(&text[..3000], 3, &mut base).expect("seal");
        let b = BaseRef {
            id: base_id,
            len: 3000,
            depth: 1,
            delta: false,
        };
        let ext_id = sealer.seal_with_base(&text, 3, Some(b), &mut ext).expect("seal");
        let data = |chunks: Vec<(Hash32, &Vec<u8>)>| {
            Message::Data(Data {
                batch_id: 9,
                chunks: chunks
                    .into_iter()
                    .map(|(id, bytes)| ChunkData {
                        id,
                        bytes: bytes.clone(),
                    })
                    .collect(),
            })
        };
        let peer = Peer {
            name: "agg",
            device: None,
        };
        // Base first in the same message: fine.
        let (mut srv, mut st) = (Server::new(ServerConfig::default()), Mem::default());
        srv.handle(0, &peer, data(vec![(base_id, &base), (ext_id, &ext)]), &mut st)
            .expect("data");
        assert_eq!((srv.stats.chunks_received, srv.stats.chunks_base_missing), (2, 0));
        // Base already held: fine.
        let (mut srv, mut st) = (Server::new(ServerConfig::default()), Mem::default());
        st.chunks.insert(base_id);
        srv.handle(0, &peer, data(vec![(ext_id, &ext)]), &mut st).expect("data");
        assert_eq!(srv.stats.chunks_base_missing, 0);
        // Base missing: kept (it may still come) and counted.
        let (mut srv, mut st) = (Server::new(ServerConfig::default()), Mem::default());
        srv.handle(0, &peer, data(vec![(ext_id, &ext)]), &mut st).expect("data");
        assert_eq!(srv.stats.chunks_base_missing, 1);
        assert!(st.chunks.contains(&ext_id));
    }
}
