//! Client side of the sync flow: the agent's session with its aggregator.
//! Sans-IO: the driver feeds `connected`, `disconnected`, received messages
//! and timeouts, and sends whatever `poll_transmit` returns.
//!
//! The store, not this session, is the source of truth: after a disconnect
//! all in-flight work is forgotten and re-derived from the store and the
//! server's knowledge on the next connect. Every message it sends is
//! idempotent at the server, so resending after a timeout is always safe.

use crate::ids::{DeviceRef, Hash32, ReplicaId};
use crate::knowledge::Knowledge;
use crate::manifest::Change;
use crate::meta::ServerChange;
use crate::msg::*;
use crate::{Result, PROTO_VERSION};
use std::collections::{HashMap, VecDeque};

/// What the client session needs from storage.
pub trait ClientStore {
    fn device(&self) -> DeviceRef;
    /// The replica new changes are recorded under.
    fn replica(&self) -> ReplicaId;
    /// Up to `max` recorded changes that `have` does not contain, in seq
    /// order, whose encodings add up to at most `max_bytes` (at least one
    /// change is returned if any is pending).
    fn pending(&mut self, have: &Knowledge, max: usize, max_bytes: usize) -> Result<Vec<Change>>;
    /// Stored bytes of chunk `id` of `change`, re-read from the source and
    /// checked against `id`; `None` if the source changed since.
    fn chunk(&mut self, change: &Change, id: &Hash32) -> Result<Option<Vec<u8>>>;
    /// The bytes of `change` are gone: record it as superseded (same seq)
    /// and arrange for the file to be recorded again.
    fn supersede(&mut self, change: &Change) -> Result<()>;
    /// New knowledge from the server: regional (durable at the aggregator)
    /// and cloud (durable in the cloud; the store may now prune).
    fn on_knowledge(&mut self, regional: &Knowledge, cloud: &Knowledge) -> Result<()>;
    /// Every server change at or below this `gseq` has been applied.
    fn server_cursor(&self) -> u64 {
        0
    }
    /// Merges server changes (CRDT states: idempotent, any order) and, when
    /// `upto` is Some, moves the cursor there; a changed state durably,
    /// before returning (a cursor that alone moved may be lost in a crash:
    /// the items are asked for again).
    fn on_server_changes(&mut self, _items: &[ServerChange], _upto: Option<u64>) -> Result<()> {
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub response_timeout_ms: u64,
    pub max_batch: usize,
    pub max_batch_bytes: usize,
    /// Target payload of one Data message.
    pub data_bytes: usize,
    /// Back-off after a round that made no progress (doubles up to 64×).
    pub idle_backoff_ms: u64,
    pub software: String,
    /// While the server holds changes the client has not yet seen reach the
    /// cloud, Hello again this long after the last knowledge it received:
    /// a lost CloudAck then costs a delay, not a backlog until the next
    /// reconnect. 0 turns it off.
    pub knowledge_refresh_ms: u64,
    /// An idle session Hellos again this long after its last Hello (less up
    /// to a tenth, fixed per session, so a fleet that reconnected together
    /// spreads out), so the server changes after its cursor (shared-path
    /// heads, central metadata such as legal holds) reach a device that
    /// stays connected even when a push was lost (a push moves no cursor;
    /// only a Hello's answer is complete). 0 turns it off.
    pub changes_refresh_ms: u64,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            response_timeout_ms: 30_000,
            max_batch: 256,
            max_batch_bytes: 2 << 20,
            data_bytes: 1 << 20,
            idle_backoff_ms: 1_000,
            software: String::new(),
            knowledge_refresh_ms: 60_000,
            changes_refresh_ms: 3_600_000,
        }
    }
}

/// What a session holds in memory right now (for a driver's bounds
/// checks): the batch it is offering or sending, messages queued for
/// transmission, and the ranges of the knowledge it tracks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// Changes of the batch in flight (at most `max_batch`).
    pub batch_changes: usize,
    /// Their CBOR bytes (at most `max_batch_bytes` beyond the first change).
    pub batch_bytes: usize,
    /// Messages waiting for `poll_transmit`, and their encoded bytes.
    pub out_messages: usize,
    pub out_bytes: usize,
    /// Seq ranges in the regional and cloud knowledge.
    pub knowledge_ranges: usize,
}

/// Things the driver may want to log or count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Rejected { seq: u64, reason: String },
    Backoff { ms: u64 },
    Applied { count: usize },
    Superseded { seq: u64 },
    Nack { reason: String },
    Resent { kind: &'static str },
    ServerChanges { count: usize },
}

#[derive(Clone, Debug, Default)]
pub struct ClientStats {
    pub batches: u64,
    pub chunks_sent: u64,
    pub chunk_bytes_sent: u64,
    pub changes_applied: u64,
    pub resends: u64,
    /// Hellos of an idle session for server changes (`changes_refresh_ms`),
    /// not for lagging cloud knowledge.
    pub changes_refreshes: u64,
}

enum State {
    Offline,
    AwaitKnowledge,
    Idle,
    AwaitPrepare {
        id: u64,
        batch: Vec<Change>,
    },
    Sending {
        id: u64,
        batch: Vec<Change>,
        todo: VecDeque<(usize, Hash32)>,
    },
    AwaitCommitted {
        id: u64,
    },
    Backoff {
        id: u64,
        batch: Vec<Change>,
        until: u64,
    },
}

pub struct ClientSession {
    cfg: ClientConfig,
    state: State,
    regional: Knowledge,
    cloud: Knowledge,
    next_id: u64,
    /// Set when the store may hold something to send.
    dirty: bool,
    out: VecDeque<Message>,
    deadline: Option<u64>,
    idle_until: u64,
    backoff_mult: u64,
    events: VecDeque<Event>,
    /// A `Changes` answered this connection's Hello.
    exchanged: bool,
    /// After Knowledge: when to stop waiting for `Changes` (older servers
    /// send none).
    changes_wait_until: Option<u64>,
    /// When knowledge last arrived (Knowledge, Committed, CloudAck).
    last_knowledge: u64,
    /// When this connection last sent a Hello.
    last_hello: u64,
    /// Spreads the refreshes of sessions started together.
    jitter_seed: u64,
    pub stats: ClientStats,
}

impl ClientSession {
    /// `first_batch_id` should differ across restarts (e.g. from the clock)
    /// so a stale Prepare for an old batch is never mistaken for a new one.
    pub fn new(cfg: ClientConfig, first_batch_id: u64) -> ClientSession {
        ClientSession {
            cfg,
            state: State::Offline,
            regional: Knowledge::default(),
            cloud: Knowledge::default(),
            next_id: first_batch_id.max(1),
            dirty: true,
            out: VecDeque::new(),
            deadline: None,
            idle_until: 0,
            backoff_mult: 1,
            events: VecDeque::new(),
            exchanged: false,
            changes_wait_until: None,
            last_knowledge: 0,
            last_hello: 0,
            jitter_seed: first_batch_id,
            stats: ClientStats::default(),
        }
    }

    pub fn is_online(&self) -> bool {
        !matches!(self.state, State::Offline)
    }
    /// True when connected, nothing in flight and the store had nothing to send.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Idle) && !self.dirty && self.out.is_empty()
    }
    pub fn regional(&self) -> &Knowledge {
        &self.regional
    }
    pub fn cloud(&self) -> &Knowledge {
        &self.cloud
    }
    /// What the session holds in memory (encodes the batch and the queued
    /// messages to count their bytes: for occasional checks, not hot paths).
    pub fn held(&self) -> Held {
        let batch: &[Change] = match &self.state {
            State::AwaitPrepare { batch, .. } | State::Sending { batch, .. } | State::Backoff { batch, .. } => batch,
            _ => &[],
        };
        let ranges = |k: &Knowledge| k.map.values().map(|s| s.ranges().len()).sum::<usize>();
        Held {
            batch_changes: batch.len(),
            batch_bytes: batch.iter().map(|c| crate::to_cbor(c).len()).sum(),
            out_messages: self.out.len(),
            out_bytes: self.out.iter().map(|m| m.encode().map_or(0, |b| b.len())).sum(),
            knowledge_ranges: ranges(&self.regional) + ranges(&self.cloud),
        }
    }
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// This connection has exchanged knowledge and server changes (or the
    /// server answered Knowledge without Changes and the response timeout
    /// passed): a sync that reached its level may end.
    pub fn exchanged(&self, now: u64) -> bool {
        self.exchanged || self.changes_wait_until.is_some_and(|t| now >= t)
    }

    /// New local changes may exist.
    pub fn wake(&mut self) {
        self.dirty = true;
    }

    /// The transport is up (and subscribed): start with Hello.
    pub fn connected(&mut self, now: u64, store: &dyn ClientStore) {
        self.out.clear();
        self.exchanged = false;
        self.changes_wait_until = None;
        self.state = State::AwaitKnowledge;
        self.out.push_back(self.hello(store));
        self.last_hello = now;
        self.deadline = Some(now + self.cfg.response_timeout_ms);
    }

    /// The transport dropped: in-flight work goes back to the store.
    pub fn disconnected(&mut self) {
        self.state = State::Offline;
        self.out.clear();
        self.deadline = None;
        self.dirty = true;
    }

    fn hello(&self, store: &dyn ClientStore) -> Message {
        Message::Hello(Hello {
            proto: PROTO_VERSION,
            device: Some(store.device()),
            replica: Some(store.replica()),
            software: self.cfg.software.clone(),
            server_cursor: Some(store.server_cursor()),
        })
    }

    /// When an idle session should Hello again: to refresh cloud knowledge
    /// (`knowledge_refresh_ms`) or server changes (`changes_refresh_ms`).
    fn refresh_due(&self) -> Option<u64> {
        if !matches!(self.state, State::Idle) {
            return None;
        }
        let changes = (self.cfg.changes_refresh_ms > 0).then(|| self.last_hello + self.refresh_interval());
        self.knowledge_refresh_at().into_iter().chain(changes).min()
    }

    /// When cloud knowledge is due a refresh: only while the server holds
    /// changes not yet known to be in the cloud.
    fn knowledge_refresh_at(&self) -> Option<u64> {
        let behind = !self.cloud.covers(&self.regional);
        (behind && self.cfg.knowledge_refresh_ms > 0).then(|| self.last_knowledge + self.cfg.knowledge_refresh_ms)
    }

    /// `changes_refresh_ms` less a per-session share of up to a tenth of it,
    /// from `first_batch_id` (which differs per process start).
    fn refresh_interval(&self) -> u64 {
        let every = self.cfg.changes_refresh_ms;
        let spread = (every / 10).max(1);
        every - self.jitter_seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) % spread
    }

    /// Earliest time `handle_timeout` should run.
    pub fn poll_timeout(&self) -> Option<u64> {
        let t = match (&self.state, self.deadline) {
            (State::Backoff { until, .. }, _) => Some(*until),
            (State::Idle, _) if self.dirty && self.idle_until > 0 => Some(self.idle_until),
            (_, d) => d,
        };
        let changes = self.changes_wait_until.filter(|_| !self.exchanged);
        [self.refresh_due(), changes].into_iter().flatten().chain(t).min()
    }

    pub fn handle_timeout(&mut self, now: u64, store: &dyn ClientStore) {
        if self.changes_wait_until.is_some_and(|t| now >= t) {
            // The server sent no Changes: an older one. Stop waiting.
            self.exchanged = true;
        }
        if self.refresh_due().is_some_and(|t| now >= t) && self.out.is_empty() {
            if self.knowledge_refresh_at().is_none_or(|t| now < t) {
                self.stats.changes_refreshes += 1;
            }
            // Changes are regional but not known to be in the cloud (a
            // CloudAck may have been lost), or server changes may have been
            // pushed and lost. Hello is idempotent.
            self.out.push_back(self.hello(store));
            self.state = State::AwaitKnowledge;
            self.deadline = Some(now + self.cfg.response_timeout_ms);
            self.last_knowledge = now;
            self.last_hello = now;
            return;
        }
        match std::mem::replace(&mut self.state, State::Offline) {
            State::Backoff { id, batch, until } if now >= until => {
                self.send_batch(now, id, batch);
            }
            s @ State::Backoff { .. } => self.state = s,
            s => {
                self.state = s;
                if self.deadline.is_some_and(|d| now >= d) {
                    self.stats.resends += 1;
                    self.deadline = Some(now + self.cfg.response_timeout_ms);
                    let resend = match &self.state {
                        State::AwaitKnowledge => Some(self.hello(store)),
                        State::AwaitPrepare { id, batch } => Some(Message::Batch(Batch {
                            batch_id: *id,
                            changes: batch.clone(),
                        })),
                        State::AwaitCommitted { id } => Some(Message::Commit(Commit { batch_id: *id })),
                        _ => None,
                    };
                    if let Some(m) = resend {
                        self.events.push_back(Event::Resent { kind: m.kind() });
                        self.out.push_back(m);
                    } else {
                        self.deadline = None;
                    }
                }
            }
        }
    }

    fn send_batch(&mut self, now: u64, id: u64, batch: Vec<Change>) {
        self.stats.batches += 1;
        self.out.push_back(Message::Batch(Batch {
            batch_id: id,
            changes: batch.clone(),
        }));
        self.state = State::AwaitPrepare { id, batch };
        self.deadline = Some(now + self.cfg.response_timeout_ms);
    }

    /// Feeds one message from the server.
    pub fn handle(&mut self, now: u64, msg: Message, store: &mut dyn ClientStore) -> Result<()> {
        match msg {
            Message::Knowledge(k) => {
                self.last_knowledge = now;
                // Authoritative at connect: if the server lost data, we resend it.
                self.regional = k.regional;
                self.cloud.union_with(&k.cloud);
                self.cfg.max_batch = self.cfg.max_batch.min(k.max_batch.max(1) as usize);
                self.cfg.max_batch_bytes = self.cfg.max_batch_bytes.min(k.max_message as usize / 2);
                store.on_knowledge(&self.regional, &self.cloud)?;
                if matches!(self.state, State::AwaitKnowledge) {
                    self.changes_wait_until = Some(now + self.cfg.response_timeout_ms);
                    self.state = State::Idle;
                    self.deadline = None;
                    self.dirty = true;
                }
            }
            Message::Prepare(p) => {
                for (seq, reason) in &p.rejected {
                    self.events.push_back(Event::Rejected {
                        seq: *seq,
                        reason: reason.clone(),
                    });
                }
                let current = matches!(&self.state, State::AwaitPrepare { id, .. } if *id == p.batch_id);
                if !current {
                    return Ok(());
                }
                let State::AwaitPrepare { id, batch } = std::mem::replace(&mut self.state, State::Offline) else {
                    return Ok(());
                };
                if p.retry_after_ms > 0 {
                    self.events.push_back(Event::Backoff { ms: p.retry_after_ms });
                    self.state = State::Backoff {
                        id,
                        batch,
                        until: now + p.retry_after_ms,
                    };
                    self.deadline = None;
                    return Ok(());
                }
                // Map each missing chunk to the first change that holds it.
                let mut where_: HashMap<Hash32, usize> = HashMap::new();
                for (i, c) in batch.iter().enumerate() {
                    for r in c.chunk_refs() {
                        where_.entry(r.id).or_insert(i);
                    }
                }
                let todo = p
                    .missing
                    .iter()
                    .filter_map(|m| where_.get(m).map(|i| (*i, *m)))
                    .collect();
                self.state = State::Sending { id, batch, todo };
                self.deadline = None;
            }
            Message::Committed(c) => {
                self.last_knowledge = now;
                self.regional.union_with(&c.regional);
                self.cloud.union_with(&c.cloud);
                store.on_knowledge(&self.regional, &self.cloud)?;
                let applied = c.results.iter().filter(|r| r.status == Status::Applied).count();
                self.stats.changes_applied += applied as u64;
                if applied > 0 {
                    self.events.push_back(Event::Applied { count: applied });
                }
                if matches!(&self.state, State::AwaitCommitted { id } if *id == c.batch_id) {
                    self.state = State::Idle;
                    self.deadline = None;
                    self.dirty = true;
                    if applied == 0 {
                        // No progress (rejections, unknown batch, missing chunks):
                        // wait a little before offering again, growing to ~1 min.
                        self.idle_until = now + self.cfg.idle_backoff_ms * self.backoff_mult;
                        self.backoff_mult = (self.backoff_mult * 2).min(64);
                    } else {
                        self.idle_until = 0;
                        self.backoff_mult = 1;
                    }
                }
            }
            Message::CloudAck(a) => {
                self.last_knowledge = now;
                self.cloud.union_with(&a.cloud);
                store.on_knowledge(&self.regional, &self.cloud)?;
            }
            Message::Changes(ch) => {
                let mut items = Vec::with_capacity(ch.items.len());
                let mut refused = false;
                for it in ch.items {
                    match it.body.validate() {
                        Ok(()) => items.push(it),
                        Err(e) => {
                            refused = true;
                            self.events.push_back(Event::Nack {
                                reason: format!("server change {} refused: {e}", it.gseq),
                            });
                        }
                    }
                }
                // A refused item keeps the cursor where it was, so it is asked again.
                let upto = if refused { None } else { ch.upto };
                store.on_server_changes(&items, upto)?;
                self.exchanged = true;
                self.events.push_back(Event::ServerChanges { count: items.len() });
            }
            Message::Nack(n) => self.events.push_back(Event::Nack { reason: n.reason }),
            // Client-bound only; anything else is a confused peer.
            _ => {}
        }
        Ok(())
    }

    /// Next message to send, if any.
    pub fn poll_transmit(&mut self, now: u64, store: &mut dyn ClientStore) -> Result<Option<Message>> {
        if let Some(m) = self.out.pop_front() {
            return Ok(Some(m));
        }
        match &mut self.state {
            State::Idle if self.dirty && now >= self.idle_until => {
                let mut have = self.regional.clone();
                have.union_with(&self.cloud);
                let batch = store.pending(&have, self.cfg.max_batch, self.cfg.max_batch_bytes)?;
                if batch.is_empty() {
                    self.dirty = false;
                    return Ok(None);
                }
                let id = self.next_id;
                self.next_id += 1;
                self.send_batch(now, id, batch);
                Ok(self.out.pop_front())
            }
            State::Sending { id, batch, todo } => {
                let id = *id;
                let mut chunks = Vec::new();
                let mut bytes = 0usize;
                while bytes < self.cfg.data_bytes {
                    let Some((i, cid)) = todo.pop_front() else { break };
                    match store.chunk(&batch[i], &cid)? {
                        Some(b) => {
                            bytes += b.len();
                            chunks.push(ChunkData { id: cid, bytes: b });
                        }
                        None => {
                            // Source changed: the change becomes Superseded and the
                            // file is recorded again; drop its other chunks.
                            store.supersede(&batch[i])?;
                            self.events.push_back(Event::Superseded { seq: batch[i].seq });
                            todo.retain(|(j, _)| *j != i);
                        }
                    }
                }
                if !chunks.is_empty() {
                    self.stats.chunks_sent += chunks.len() as u64;
                    self.stats.chunk_bytes_sent += bytes as u64;
                    return Ok(Some(Message::Data(Data { batch_id: id, chunks })));
                }
                self.state = State::AwaitCommitted { id };
                self.deadline = Some(now + self.cfg.response_timeout_ms);
                Ok(Some(Message::Commit(Commit { batch_id: id })))
            }
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::knowledge::RangeSet;

    /// A store with nothing to send: the session alone is under test.
    struct Empty(DeviceRef);
    impl ClientStore for Empty {
        fn device(&self) -> DeviceRef {
            self.0.clone()
        }
        fn replica(&self) -> ReplicaId {
            ReplicaId {
                device: self.0.clone(),
                epoch: 1,
            }
        }
        fn pending(&mut self, _: &Knowledge, _: usize, _: usize) -> Result<Vec<Change>> {
            Ok(Vec::new())
        }
        fn chunk(&mut self, _: &Change, _: &Hash32) -> Result<Option<Vec<u8>>> {
            Ok(None)
        }
        fn supersede(&mut self, _: &Change) -> Result<()> {
            Ok(())
        }
        fn on_knowledge(&mut self, _: &Knowledge, _: &Knowledge) -> Result<()> {
            Ok(())
        }
    }

    fn knowledge(st: &Empty, hi: u64) -> Knowledge {
        let mut k = Knowledge::default();
        if hi > 0 {
            k.map.insert(st.replica(), RangeSet::up_to(hi));
        }
        k
    }

    #[test]
    fn a_lost_cloudack_is_recovered_by_a_knowledge_refresh() {
        let mut st = Empty(DeviceRef::new("t", "s", "d").expect("ids"));
        let mut s = ClientSession::new(ClientConfig::default(), 1);
        s.connected(0, &st);
        assert!(matches!(s.poll_transmit(0, &mut st), Ok(Some(Message::Hello(_)))));
        let k = KnowledgeMsg {
            regional: knowledge(&st, 3),
            cloud: knowledge(&st, 1),
            max_message: MAX_MESSAGE as u32,
            max_batch: 10,
        };
        s.handle(10, Message::Knowledge(k), &mut st).expect("knowledge");
        s.handle(
            10,
            Message::Changes(Changes {
                items: vec![],
                upto: None,
            }),
            &mut st,
        )
        .expect("changes");
        assert!(s.exchanged(10));
        assert!(matches!(s.poll_transmit(10, &mut st), Ok(None)));
        // Seqs 2..=3 are regional only; the CloudAck that would say they
        // reached the cloud never comes. A refresh is due after the interval.
        assert_eq!(s.poll_timeout(), Some(10 + 60_000));
        s.handle_timeout(30_000, &st);
        assert!(matches!(s.poll_transmit(30_000, &mut st), Ok(None)));
        s.handle_timeout(60_010, &st);
        assert!(matches!(s.poll_transmit(60_010, &mut st), Ok(Some(Message::Hello(_)))));
        // Once the cloud covers what is regional, nothing more is due.
        let k = KnowledgeMsg {
            regional: knowledge(&st, 3),
            cloud: knowledge(&st, 3),
            max_message: MAX_MESSAGE as u32,
            max_batch: 10,
        };
        s.handle(60_020, Message::Knowledge(k), &mut st).expect("knowledge");
        assert!(matches!(s.poll_transmit(60_020, &mut st), Ok(None)));
        // Only the hourly server-changes refresh is left.
        assert_eq!(s.poll_timeout(), Some(60_010 + s.refresh_interval()));
    }

    /// A server's answer to a Hello at `t` (empty knowledge, no changes,
    /// cursor 7); the session is idle after it.
    fn answer_hello(s: &mut ClientSession, st: &mut Empty, t: u64) {
        let k = KnowledgeMsg {
            regional: Knowledge::default(),
            cloud: Knowledge::default(),
            max_message: MAX_MESSAGE as u32,
            max_batch: 10,
        };
        s.handle(t, Message::Knowledge(k), st).expect("knowledge");
        let answer = Changes {
            items: vec![],
            upto: Some(7),
        };
        s.handle(t, Message::Changes(answer), st).expect("changes");
        assert!(matches!(s.poll_transmit(t, st), Ok(None)));
        assert!(s.is_idle());
    }

    #[test]
    fn a_connected_idle_session_asks_for_server_changes_again_every_hour() {
        let mut st = Empty(DeviceRef::new("t", "s", "d").expect("ids"));
        let mut s = ClientSession::new(ClientConfig::default(), 1);
        s.connected(100, &st);
        assert!(matches!(s.poll_transmit(100, &mut st), Ok(Some(Message::Hello(_)))));
        answer_hello(&mut s, &mut st, 110);
        // Nothing to send and the cloud covers everything: the next wake-up
        // is the refresh, 54 to 60 minutes after the Hello.
        let every = s.refresh_interval();
        assert!((3_240_000..=3_600_000).contains(&every), "{every}");
        let due = 100 + every;
        assert_eq!(s.poll_timeout(), Some(due));
        s.handle_timeout(due - 1, &st);
        assert!(matches!(s.poll_transmit(due - 1, &mut st), Ok(None)));
        s.handle_timeout(due, &st);
        match s.poll_transmit(due, &mut st) {
            Ok(Some(Message::Hello(h))) => assert_eq!(h.server_cursor, Some(0)),
            other => panic!("expected a Hello, got {other:?}"),
        }
        assert_eq!(s.stats.changes_refreshes, 1);
        // Answered: idle again, the next refresh as long after.
        answer_hello(&mut s, &mut st, due + 10);
        assert_eq!(s.poll_timeout(), Some(due + every));
        // Sessions started at other times refresh at other offsets.
        let spread: std::collections::BTreeSet<u64> = (1..50)
            .map(|id| ClientSession::new(ClientConfig::default(), id * 1_000_003).refresh_interval())
            .collect();
        assert!(spread.len() > 40, "{spread:?}");
        assert!(spread.iter().all(|e| (3_240_000..=3_600_000).contains(e)));
        // Turned off: no refresh at all.
        let mut s = ClientSession::new(
            ClientConfig {
                changes_refresh_ms: 0,
                ..ClientConfig::default()
            },
            1,
        );
        s.connected(0, &st);
        let _ = s.poll_transmit(0, &mut st);
        answer_hello(&mut s, &mut st, 10);
        assert_eq!(s.poll_timeout(), None, "no refresh when turned off");
    }

    #[test]
    fn a_sync_waits_for_the_changes_that_answer_its_hello() {
        let mut st = Empty(DeviceRef::new("t", "s", "d").expect("ids"));
        let mut s = ClientSession::new(ClientConfig::default(), 1);
        s.connected(0, &st);
        let _ = s.poll_transmit(0, &mut st);
        let k = KnowledgeMsg {
            regional: Knowledge::default(),
            cloud: Knowledge::default(),
            max_message: MAX_MESSAGE as u32,
            max_batch: 10,
        };
        s.handle(5, Message::Knowledge(k), &mut st).expect("knowledge");
        assert!(!s.exchanged(5), "Changes still to come");
        // An older server never sends one: the wait ends after the response timeout.
        s.handle_timeout(5 + 30_000, &st);
        assert!(s.exchanged(5 + 30_000));
    }
}
