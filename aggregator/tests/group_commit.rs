//! Group commit (aggregator::mqtt::handle_group_at, store::Group): many
//! messages in one redb transaction and one pack fsync, and the invariant
//! that makes it safe: no reply acknowledging durability is handed out
//! before the group's state is durable, and a crash before the commit loses
//! only the group (whose messages were never acked).
//!
//! redb runs on a crash-simulating backend: a crash keeps exactly what the
//! last `sync_data` made durable. Pack files are real files; startup
//! truncates what the crashed process appended past the committed length.

#![allow(clippy::unwrap_used)]

mod common;

use aggregator::mqtt::{handle_group_at, Handled};
use aggregator::store::{AggStore, StoreConfig};
use common::{chunk, file_change, key, replica};
use protocol::msg::*;
use protocol::server::{Peer, Server, ServerConfig};
use protocol::{topic, Change, DeviceRef};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

#[derive(Debug, Default)]
struct Disk {
    data: Vec<u8>,
    /// What the last sync made durable.
    durable: Vec<u8>,
    syncs: u64,
    /// Every sync from now on fails (an fsync error).
    fail_sync: bool,
    /// Bumped by a crash: older handles can no longer touch the data.
    generation: u64,
}

/// An in-memory redb backend that loses unsynced writes on `crash`.
#[derive(Clone, Debug, Default)]
struct CrashDisk {
    inner: Arc<Mutex<Disk>>,
    generation: u64,
}

impl CrashDisk {
    fn live(&self) -> io::Result<std::sync::MutexGuard<'_, Disk>> {
        let g = self.inner.lock().unwrap();
        if g.generation != self.generation {
            return Err(io::Error::other("simulated process crashed"));
        }
        Ok(g)
    }
    /// Power cut: the file is what the last sync made durable.
    fn crash(&self) {
        let mut g = self.inner.lock().unwrap();
        g.generation += 1;
        g.data = g.durable.clone();
        g.fail_sync = false;
    }
    /// A handle for the restarted process.
    fn reopen(&self) -> CrashDisk {
        CrashDisk {
            inner: self.inner.clone(),
            generation: self.inner.lock().unwrap().generation,
        }
    }
    fn syncs(&self) -> u64 {
        self.inner.lock().unwrap().syncs
    }
    fn fail_syncs(&self) {
        self.inner.lock().unwrap().fail_sync = true;
    }
}

impl redb::StorageBackend for CrashDisk {
    fn len(&self) -> io::Result<u64> {
        Ok(self.live()?.data.len() as u64)
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let g = self.live()?;
        let s = offset as usize;
        let src = g
            .data
            .get(s..s + out.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "read past end"))?;
        out.copy_from_slice(src);
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.live()?.data.resize(len as usize, 0);
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        let mut g = self.live()?;
        if g.fail_sync {
            return Err(io::Error::other("simulated fsync failure"));
        }
        g.durable = g.data.clone();
        g.syncs += 1;
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut g = self.live()?;
        let s = offset as usize;
        let dst = g
            .data
            .get_mut(s..s + data.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "write past end"))?;
        dst.copy_from_slice(data);
        Ok(())
    }
}

fn open(dir: &Path, disk: &CrashDisk) -> AggStore {
    let cfg = StoreConfig {
        cache_bytes: 4 << 20,
        ..StoreConfig::default()
    };
    AggStore::open_with_backend(dir, cfg, Box::new(disk.reopen())).unwrap()
}

const NOW: u64 = 1_750_000_000_000;

/// One agent's whole round (Hello, Batch, Data, Commit) as queued messages.
struct Agent {
    dev: DeviceRef,
    change: Change,
    chunks: Vec<ChunkData>,
}

impl Agent {
    fn new(name: &str, seed: u32) -> Agent {
        let dev = DeviceRef::new("acme", "plant-1", name).unwrap();
        let chunks: Vec<ChunkData> = (0..3).map(|i| chunk(seed * 10 + i, 20_000)).collect();
        let change = file_change(&key().unwrap(), &dev, 1, &chunks);
        Agent { dev, change, chunks }
    }

    fn msg(&self, m: &Message) -> (Vec<u8>, Vec<u8>) {
        (topic::up(&self.dev, m.kind()).into_bytes(), m.encode().unwrap())
    }

    fn round(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        vec![
            self.msg(&Message::Hello(Hello {
                proto: protocol::PROTO_VERSION,
                device: Some(self.dev.clone()),
                replica: Some(replica(&self.dev)),
                software: "test".into(),
                server_cursor: None,
            })),
            self.msg(&Message::Batch(Batch {
                batch_id: 7,
                changes: vec![self.change.clone()],
            })),
            self.msg(&Message::Data(Data {
                batch_id: 7,
                chunks: self.chunks.clone(),
            })),
            self.msg(&Message::Commit(Commit { batch_id: 7 })),
        ]
    }

    /// Durable here: the change is in regional knowledge and every chunk is stored.
    fn held_by(&self, s: &AggStore) -> bool {
        let (regional, _) = s.knowledge_of(std::slice::from_ref(&self.dev)).unwrap();
        let chunks = self.chunks.iter().all(|c| s.has_chunk(&c.id).unwrap());
        assert_eq!(
            regional.contains(&self.change.replica, 1),
            chunks,
            "a change is applied only with its chunks"
        );
        chunks
    }
}

fn run_group(server: &mut Server, s: &AggStore, msgs: &[(Vec<u8>, Vec<u8>)]) -> Vec<Handled> {
    let items: Vec<(&[u8], &[u8])> = msgs.iter().map(|(t, p)| (&t[..], &p[..])).collect();
    handle_group_at(server, s, NOW, &items)
}

fn decode(out: &[Handled]) -> Vec<Message> {
    out.iter()
        .flat_map(|(r, _)| r.iter().map(|(_, p)| Message::decode(p).unwrap()))
        .collect()
}

/// The change statuses the Committed replies acknowledge.
fn committed(replies: &[Message]) -> Vec<Status> {
    replies
        .iter()
        .filter_map(|m| match m {
            Message::Committed(c) => Some(c.results.iter().map(|r| r.status)),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn a_group_is_one_commit_and_its_acks_are_durable_when_handed_out() {
    let dir = tempfile::tempdir().unwrap();
    let disk = CrashDisk::default();
    let (a, b) = (Agent::new("gw-a", 1), Agent::new("gw-b", 2));
    let s = open(dir.path(), &disk);
    let mut server = Server::new(ServerConfig::default());
    // Two agents' whole rounds, interleaved, in one group: the Commits see
    // the chunks the Data messages wrote earlier in the same transaction.
    let (ra, rb) = (a.round(), b.round());
    let msgs: Vec<_> = ra.into_iter().zip(rb).flat_map(|(x, y)| [x, y]).collect();
    let syncs = disk.syncs();
    let out = run_group(&mut server, &s, &msgs);
    assert_eq!(out.len(), 8);
    assert!(out.iter().all(|(_, bad)| !bad));
    let replies = decode(&out);
    assert_eq!(committed(&replies), vec![Status::Applied, Status::Applied]);
    // One commit for the eight messages (redb syncs a commit at most twice:
    // data, then the header).
    let group_syncs = disk.syncs() - syncs;
    assert!((1..=2).contains(&group_syncs), "{group_syncs} redb syncs for one group");
    // The Committed replies carry the knowledge the group wrote.
    for (m, agent) in replies
        .iter()
        .filter(|m| matches!(m, Message::Committed(_)))
        .zip([&a, &b])
    {
        let Message::Committed(c) = m else { unreachable!() };
        assert!(c.regional.contains(&agent.change.replica, 1));
    }
    // Handed out means durable: a power cut right now keeps all of it.
    disk.crash();
    drop(s);
    let s = open(dir.path(), &disk);
    assert!(a.held_by(&s) && b.held_by(&s));
    for c in a.chunks.iter().chain(&b.chunks) {
        assert_eq!(
            s.read_chunk(&c.id).unwrap(),
            aggregator::store::ChunkBytes::Local(c.bytes.clone())
        );
    }
}

#[test]
fn a_crash_before_the_commit_loses_only_the_unacked_group() {
    let dir = tempfile::tempdir().unwrap();
    let disk = CrashDisk::default();
    let (a, b) = (Agent::new("gw-a", 1), Agent::new("gw-b", 2));
    let s = open(dir.path(), &disk);
    let mut server = Server::new(ServerConfig::default());
    // Group 1 (agent a) commits: its acks were handed out.
    let out = run_group(&mut server, &s, &a.round());
    assert_eq!(committed(&decode(&out)), vec![Status::Applied]);
    // Group 2 (agent b) runs through the server logic inside a store group:
    // the replies exist (and would say Applied) but the group has not
    // committed, so the worker holds them.
    let held = {
        let mut g = s.group().unwrap();
        let mut replies = Vec::new();
        for (t, p) in b.round() {
            let (dev, _, _) = topic::parse(std::str::from_utf8(&t).unwrap()).unwrap();
            let peer_key = dev.key();
            let peer = Peer {
                name: &peer_key,
                device: Some(&dev),
            };
            let m = Message::decode(&p).unwrap();
            replies.extend(server.handle(NOW, &peer, m, &mut g).unwrap());
        }
        // The group sees its own writes...
        assert!(g
            .knowledge(std::slice::from_ref(&b.dev))
            .unwrap()
            .0
            .contains(&b.change.replica, 1));
        // ...nothing outside it does...
        assert!(!b.held_by(&s));
        // ...and the power goes before the commit.
        disk.crash();
        replies
    };
    assert_eq!(committed(&held), vec![Status::Applied]);
    drop(s);
    let s = open(dir.path(), &disk);
    // Acked state survived; the uncommitted group is gone entirely, its
    // appended pack bytes truncated, so the agent sends it again.
    assert!(a.held_by(&s));
    assert!(!b.held_by(&s));
    let mut server = Server::new(ServerConfig::default());
    let out = run_group(&mut server, &s, &b.round());
    assert_eq!(committed(&decode(&out)), vec![Status::Applied]);
    assert!(b.held_by(&s));
    for c in a.chunks.iter().chain(&b.chunks) {
        assert_eq!(
            s.read_chunk(&c.id).unwrap(),
            aggregator::store::ChunkBytes::Local(c.bytes.clone())
        );
    }
}

#[test]
fn a_group_that_cannot_commit_acknowledges_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let disk = CrashDisk::default();
    let (a, b) = (Agent::new("gw-a", 1), Agent::new("gw-b", 2));
    let s = open(dir.path(), &disk);
    let mut server = Server::new(ServerConfig::default());
    let out = run_group(&mut server, &s, &a.round());
    assert_eq!(committed(&decode(&out)), vec![Status::Applied]);
    // fsync fails from now on: the group's commit fails, so every message
    // of it gets a Nack: no Knowledge, Prepare or Committed is handed out.
    disk.fail_syncs();
    let out = run_group(&mut server, &s, &b.round());
    assert_eq!(out.len(), 4);
    let replies = decode(&out);
    assert_eq!(replies.len(), 4);
    assert!(replies.iter().all(|m| matches!(m, Message::Nack(_))), "{replies:?}");
    disk.crash();
    drop(s);
    let s = open(dir.path(), &disk);
    assert!(a.held_by(&s));
    assert!(!b.held_by(&s));
}
