//! The deterministic core: virtual time, the event queue, seeded random
//! streams, and the append-only event log whose digest names a run.
//!
//! Nothing here reads the wall clock or the OS RNG. A run is a pure function
//! of (scenario, seed): the queue breaks time ties by insertion order, and
//! every random decision draws from a ChaCha8 stream derived from the seed
//! and a purpose label, so adding draws for one purpose never shifts another.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;

/// Virtual milliseconds since the start of the run.
pub type Ms = u64;

pub const SECOND: Ms = 1_000;
pub const MINUTE: Ms = 60 * SECOND;
pub const HOUR: Ms = 60 * MINUTE;
pub const DAY: Ms = 24 * HOUR;

/// Unix ms of virtual time 0 (2024-01-01T00:00:00Z). Node clocks are this
/// plus virtual time, plus any injected clock offset.
pub const EPOCH_UNIX_MS: u64 = 1_704_067_200_000;

/// The shared virtual clock. Nodes read it through closures (the agent's
/// injectable `Clock`); only the simulator advances it.
#[derive(Clone, Default, Debug)]
pub struct VClock(Arc<AtomicU64>);

impl VClock {
    pub fn now(&self) -> Ms {
        self.0.load(AtomicOrdering::Relaxed)
    }
    pub fn set(&self, t: Ms) {
        self.0.store(t, AtomicOrdering::Relaxed)
    }
}

struct Entry<E> {
    at: Ms,
    seq: u64,
    ev: E,
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl<E> Eq for Entry<E> {}
impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl<E> Ord for Entry<E> {
    /// Reversed: the heap pops the earliest (time, insertion seq) first.
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// Events ordered by (time, insertion sequence).
pub struct Queue<E> {
    heap: BinaryHeap<Entry<E>>,
    seq: u64,
}

impl<E> Default for Queue<E> {
    fn default() -> Self {
        Queue {
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }
}

impl<E> Queue<E> {
    pub fn push(&mut self, at: Ms, ev: E) {
        self.seq += 1;
        self.heap.push(Entry { at, seq: self.seq, ev });
    }
    pub fn pop(&mut self) -> Option<(Ms, E)> {
        self.heap.pop().map(|e| (e.at, e.ev))
    }
    pub fn peek_time(&self) -> Option<Ms> {
        self.heap.peek().map(|e| e.at)
    }
    pub fn len(&self) -> usize {
        self.heap.len()
    }
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

/// A random stream for one purpose, derived from the run seed:
/// ChaCha8 keyed by SHA-256("ferry-sim" ‖ seed ‖ purpose ‖ index).
pub fn stream(seed: u64, purpose: &str, index: u64) -> ChaCha8Rng {
    let mut h = Sha256::new();
    h.update(b"ferry-sim\0");
    h.update(seed.to_le_bytes());
    h.update(purpose.as_bytes());
    h.update([0]);
    h.update(index.to_le_bytes());
    ChaCha8Rng::from_seed(h.finalize().into())
}

/// Kinds of logged events (the byte goes into the digest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Write = 1,
    Scan = 2,
    Send = 3,
    Deliver = 4,
    Drop = 5,
    Dup = 6,
    LinkUp = 7,
    LinkDown = 8,
    Crash = 9,
    Restart = 10,
    SessionLoss = 11,
    SinkError = 12,
    Forward = 13,
    CloudAck = 14,
    DiskFull = 15,
    ClockJump = 16,
    Failover = 17,
    Heal = 18,
    Error = 19,
    Prune = 20,
    /// An aggregator's cloud lookup at a Hello (a = 1000 + aggregator,
    /// b = agent, c = 0 failed, else 1 + server changes stashed).
    Lookup = 21,
    /// Server changes pushed to an agent (a = agent, b = items,
    /// c = 1000 + aggregator).
    Push = 22,
    /// Presence: at the broker (a = agent, b = bytes), or an aggregator's
    /// flush (a = 1000 + aggregator, b = entries, c = 1 sent / 0 failed).
    Presence = 23,
}

/// The run's event log: every event is hashed as it happens; the last few
/// are kept in memory to print with a failure.
pub struct EventLog {
    hasher: Sha256,
    pub count: u64,
    tail: VecDeque<(Ms, Kind, u64, u64, u64)>,
    keep: usize,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog {
            hasher: Sha256::new(),
            count: 0,
            tail: VecDeque::new(),
            keep: 64,
        }
    }
}

impl EventLog {
    /// Records one event: time, kind, node and two kind-specific numbers.
    pub fn log(&mut self, t: Ms, kind: Kind, node: u64, a: u64, b: u64) {
        let mut rec = [0u8; 33];
        rec[..8].copy_from_slice(&t.to_le_bytes());
        rec[8] = kind as u8;
        rec[9..17].copy_from_slice(&node.to_le_bytes());
        rec[17..25].copy_from_slice(&a.to_le_bytes());
        rec[25..33].copy_from_slice(&b.to_le_bytes());
        self.hasher.update(rec);
        self.count += 1;
        if self.tail.len() == self.keep {
            self.tail.pop_front();
        }
        self.tail.push_back((t, kind, node, a, b));
    }
    /// Digest of everything logged so far (hex).
    pub fn digest(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }
    pub fn tail(&self) -> impl Iterator<Item = String> + '_ {
        self.tail
            .iter()
            .map(|(t, k, n, a, b)| format!("{:>12} ms {k:?} node={n} {a} {b}", t))
    }
}

/// A cheap content hash for the log (FNV-1a), e.g. of a message's bytes.
pub fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn queue_orders_by_time_then_insertion() {
        let mut q = Queue::default();
        q.push(5, "b");
        q.push(1, "a");
        q.push(5, "c");
        q.push(0, "z");
        let got: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(got, vec![(0, "z"), (1, "a"), (5, "b"), (5, "c")]);
    }

    #[test]
    fn streams_are_stable_and_independent() {
        let a: u64 = stream(7, "link", 3).gen();
        let b: u64 = stream(7, "link", 3).gen();
        let c: u64 = stream(7, "link", 4).gen();
        let d: u64 = stream(8, "link", 3).gen();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }

    #[test]
    fn digest_depends_on_every_event() {
        let mut x = EventLog::default();
        let mut y = EventLog::default();
        x.log(1, Kind::Send, 2, 3, 4);
        y.log(1, Kind::Send, 2, 3, 5);
        assert_ne!(x.digest(), y.digest());
    }
}
