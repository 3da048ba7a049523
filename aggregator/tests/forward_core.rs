//! The sans-IO forwarder core in virtual time, single-threaded, with the
//! aggregator store on an in-memory redb backend: what the deterministic
//! simulation drives. The sink is a fake answering with the real
//! `protocol::server::Server` over an in-memory `ServerStore`.

#![allow(clippy::unwrap_used)]

mod common;

use aggregator::forward::{AgentNotice, ForwardCore, SinkRequest, SinkResponse};
use aggregator::mqtt::handle_publish_at;
use aggregator::store::{AggStore, StoreClock, StoreConfig};
use aggregator::{AggConfig, AggStats};
use common::{chunk, file_change, key, replica, MemSink};
use protocol::msg::*;
use protocol::server::{Peer, Server, ServerConfig};
use protocol::{topic, Change, DeviceRef, Hash32};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The cloud-sink as the forwarder sees it: real server logic, memory
/// storage, and requests that fail while `down` is set.
struct FakeSink {
    server: Server,
    mem: MemSink,
    packs: Vec<String>,
    down: bool,
    requests: Vec<&'static str>,
}

impl FakeSink {
    fn new() -> FakeSink {
        FakeSink {
            server: Server::new(ServerConfig::default()),
            mem: MemSink::default(),
            packs: Vec::new(),
            down: false,
            requests: Vec::new(),
        }
    }

    fn answer(&mut self, req: SinkRequest) -> Result<SinkResponse, String> {
        if self.down {
            return Err("connection refused".into());
        }
        match req {
            SinkRequest::PutPack { id_hex, bytes, .. } => {
                self.requests.push("put");
                if Hash32::of(&bytes).to_hex() != id_hex {
                    return Err("400: pack id mismatch".into());
                }
                let entries = protocol::pack::parse(&bytes).map_err(|e| e.to_string())?;
                self.mem.chunks.extend(entries.iter().map(|e| e.id));
                self.packs.push(id_hex);
                Ok(SinkResponse::Stored)
            }
            SinkRequest::Sync { message, .. } => {
                self.requests.push(message.kind());
                let peer = Peer {
                    name: "agg",
                    device: None,
                };
                let mut replies = self
                    .server
                    .handle(0, &peer, message, &mut self.mem)
                    .map_err(|e| e.to_string())?;
                if replies.is_empty() {
                    return Err("204: no reply".into());
                }
                Ok(SinkResponse::Reply(replies.remove(0)))
            }
        }
    }
}

/// Sends requests until the core has nothing due at `now`; returns the
/// notices for agents and the number of failed rounds.
fn drive(core: &mut ForwardCore, store: &AggStore, sink: &mut FakeSink, now: u64) -> (Vec<AgentNotice>, usize) {
    let (mut notices, mut errors) = (Vec::new(), 0);
    for _ in 0..100 {
        let req = match core.poll_request(now, store) {
            Ok(Some(r)) => r,
            Ok(None) => return (notices, errors),
            Err(_) => {
                errors += 1;
                continue;
            }
        };
        let id = req.req_id();
        let outcome = sink.answer(req);
        match core.on_response(now, store, id, outcome) {
            Ok(n) => notices.extend(n),
            Err(_) => errors += 1,
        }
    }
    panic!("the core kept sending at one instant");
}

const T0: u64 = 1_750_000_000_000;

struct Setup {
    _dir: tempfile::TempDir,
    clock: Arc<AtomicU64>,
    store: AggStore,
    stats: Arc<AggStats>,
    core: ForwardCore,
    dev: DeviceRef,
    key: ring::signature::Ed25519KeyPair,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(T0));
    let c = clock.clone();
    let scfg = StoreConfig {
        clock: StoreClock(Arc::new(move || c.load(Ordering::SeqCst))),
        ..StoreConfig::default()
    };
    let store =
        AggStore::open_with_backend(dir.path(), scfg, Box::new(redb::backends::InMemoryBackend::new())).unwrap();
    assert!(!dir.path().join("agg.redb").exists());
    let mut cfg = AggConfig::new("mqtt://127.0.0.1:1", "http://127.0.0.1:1", dir.path().to_path_buf());
    cfg.id = "sim".into();
    cfg.pack_max_delay = Duration::from_secs(1);
    cfg.sink_retry_max = Duration::from_secs(8);
    let stats = Arc::new(AggStats::default());
    let core = ForwardCore::new(&cfg, stats.clone());
    Setup {
        _dir: dir,
        clock,
        store,
        stats,
        core,
        dev: DeviceRef::new("acme", "plant-1", "gw-1").unwrap(),
        key: key().unwrap(),
    }
}

/// An agent's full round through `handle_publish_at`, at virtual time `now`.
fn ingest(s: &Setup, server: &mut Server, seq: u64, chunks: &[ChunkData]) -> Change {
    let now = s.clock.load(Ordering::SeqCst);
    let c = file_change(&s.key, &s.dev, seq, chunks);
    let mut send = |m: Message| -> Vec<Message> {
        let (replies, bad) = handle_publish_at(
            server,
            &s.store,
            now,
            topic::up(&s.dev, m.kind()).as_bytes(),
            &m.encode().unwrap(),
        );
        assert!(!bad);
        replies.iter().map(|(_, p)| Message::decode(p).unwrap()).collect()
    };
    let r = send(Message::Hello(Hello {
        proto: protocol::PROTO_VERSION,
        device: Some(s.dev.clone()),
        replica: Some(replica(&s.dev)),
        software: "test".into(),
        server_cursor: None,
    }));
    assert!(matches!(r.first(), Some(Message::Knowledge(_))));
    let r = send(Message::Batch(Batch {
        batch_id: seq,
        changes: vec![c.clone()],
    }));
    let Some(Message::Prepare(p)) = r.first() else {
        panic!("{r:?}")
    };
    assert_eq!(p.missing.len(), chunks.len());
    send(Message::Data(Data {
        batch_id: seq,
        chunks: chunks.to_vec(),
    }));
    let r = send(Message::Commit(Commit { batch_id: seq }));
    let Some(Message::Committed(cm)) = r.first() else {
        panic!("{r:?}")
    };
    assert_eq!(cm.results[0].status, Status::Applied);
    c
}

#[test]
fn forwards_packs_and_batches_backs_off_and_relays_cloudack() {
    let mut s = setup();
    let mut server = Server::new(ServerConfig::default());
    let chunks: Vec<ChunkData> = (0..4).map(|i| chunk(i, 30_000)).collect();
    ingest(&s, &mut server, 1, &chunks);
    let mut sink = FakeSink::new();
    sink.down = true;

    // Applied at T0: the open pack waits for `pack_max_delay`, and nothing
    // is ready (its chunks are only here).
    let (n, e) = drive(&mut s.core, &s.store, &mut sink, T0);
    assert_eq!((n.len(), e), (0, 0));
    assert!(sink.requests.is_empty());
    assert_eq!(s.core.poll_timeout(), Some(T0 + 250));

    // One second later the pack closes; the sink is down: back-off 0.5 s,
    // then 1 s, then 2 s (doubling up to `sink_retry_max`).
    let mut now = T0 + 1_000;
    let (_, e) = drive(&mut s.core, &s.store, &mut sink, now);
    assert_eq!(e, 1);
    assert_eq!(s.stats.snapshot().packs_closed, 1);
    assert_eq!(s.core.poll_timeout(), Some(now + 500));
    // Not before the back-off is over.
    assert!(s.core.poll_request(now + 499, &s.store).unwrap().is_none());
    now += 500;
    assert_eq!(drive(&mut s.core, &s.store, &mut sink, now).1, 1);
    assert_eq!(s.core.poll_timeout(), Some(now + 1_000));
    now += 1_000;
    assert_eq!(drive(&mut s.core, &s.store, &mut sink, now).1, 1);
    assert_eq!(s.core.poll_timeout(), Some(now + 2_000));
    assert_eq!(s.stats.snapshot().sink_errors, 3);
    assert_eq!(s.store.forward_len().unwrap(), 1);

    // The sink is back: the pack, then Hello, Batch, Commit; the change is
    // confirmed and the agent gets a CloudAck.
    sink.down = false;
    now += 2_000;
    let (notices, e) = drive(&mut s.core, &s.store, &mut sink, now);
    assert_eq!(e, 0);
    assert_eq!(sink.requests, ["put", "hello", "batch", "commit"]);
    assert_eq!(sink.packs.len(), 1);
    assert_eq!(sink.mem.changes.len(), 1);
    assert_eq!(s.store.forward_len().unwrap(), 0);
    assert_eq!(notices.len(), 1);
    assert_eq!(notices[0].device, s.dev);
    assert_eq!(notices[0].topic(), topic::down(&s.dev, "cloudack"));
    let Message::CloudAck(ack) = &notices[0].message else {
        panic!()
    };
    assert!(ack.cloud.contains(&replica(&s.dev), 1));
    let st = s.stats.snapshot();
    assert_eq!(
        (st.packs_uploaded, st.cloud_acked_changes, st.forwarded_changes),
        (1, 1, 1)
    );
    // Success resets the back-off; idle polling resumes.
    assert_eq!(s.core.backoff(), Duration::from_millis(500));
    assert_eq!(s.core.poll_timeout(), Some(now + 250));

    // A second change: the Hello is not repeated.
    s.clock.store(now, Ordering::SeqCst);
    ingest(&s, &mut server, 2, &[chunk(9, 20_000)]);
    sink.requests.clear();
    now += 1_000;
    let (notices, e) = drive(&mut s.core, &s.store, &mut sink, now);
    assert_eq!(e, 0);
    assert_eq!(sink.requests, ["put", "batch", "commit"]);
    assert_eq!(notices.len(), 1);
    assert_eq!(s.store.forward_len().unwrap(), 0);
}

#[test]
fn busy_sink_and_chunks_the_sink_lost() {
    let mut s = setup();
    let mut server = Server::new(ServerConfig::default());
    ingest(&s, &mut server, 1, &[chunk(1, 10_000), chunk(2, 10_000)]);
    let mut sink = FakeSink::new();
    sink.mem.busy = Some(3_000);

    // Out of room: Prepare says retry_after; the core waits that long
    // (capped by sink_retry_max) without counting an error.
    let mut now = T0 + 1_000;
    let (n, e) = drive(&mut s.core, &s.store, &mut sink, now);
    assert_eq!((n.len(), e), (0, 0));
    assert_eq!(sink.requests, ["put", "hello", "batch"]);
    assert_eq!(s.core.poll_timeout(), Some(now + 3_000));
    assert_eq!(s.stats.snapshot().sink_errors, 0);

    // The sink lost one chunk (only the cloud had it): the change stays
    // queued, the loss is counted, and the core backs off.
    sink.mem.busy = None;
    let lost = chunk(2, 10_000).id;
    sink.mem.chunks.remove(&lost);
    sink.requests.clear();
    now += 3_000;
    let (n, e) = drive(&mut s.core, &s.store, &mut sink, now);
    assert_eq!((n.len(), e), (0, 1));
    assert_eq!(sink.requests, ["batch", "commit"]);
    let st = s.stats.snapshot();
    assert_eq!((st.sink_missing_lost, st.sink_errors), (1, 1));
    assert_eq!(s.store.forward_len().unwrap(), 1);
    assert_eq!(s.core.poll_timeout(), Some(now + 500));

    // Answers to requests not in flight are ignored.
    assert!(s
        .core
        .on_response(now, &s.store, 9_999, Ok(SinkResponse::Stored))
        .unwrap()
        .is_empty());
}
