//! Policy classes at the edge (DESIGN.md §7): priority after an outage,
//! schedule windows, daily budgets that survive restarts, bandwidth caps
//! measured on the wire, and disk watermarks that prune only cloud-durable
//! data (oldest first, down to the low watermark) without recording
//! deletions.
//!
//! Network tests run the real MQTT driver against the embedded broker and a
//! small in-test aggregator (`protocol::server::Server` over an in-memory
//! store that reports everything it applies as cloud-durable at once).

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use edge_agent::policy::{ClassSpec, Prune, Quantity};
use edge_agent::{Agent, AgentConfig, DiskWatermarks, Watermark};
use protocol::client::ClientStore;
use protocol::manifest::{Change, ChangeBody};
use protocol::msg::{ChunkData, Message, MQTT_MAX_PACKET};
use protocol::server::{Peer, Server, ServerConfig, ServerStore};
use protocol::{topic, DeviceRef, Hash32, Knowledge, RangeSet};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// 2025-03-03 00:00:00 UTC in ms.
const DAY0: u64 = 1_740_960_000_000;
const HOUR: u64 = 3_600_000;

fn class(name: &str, globs: &[&str]) -> ClassSpec {
    ClassSpec {
        name: name.into(),
        globs: Some(globs.iter().map(|g| g.to_string()).collect()),
        ..ClassSpec::default()
    }
}

/// A clock tests move by hand.
fn manual_clock(start: u64) -> (Arc<AtomicU64>, edge_agent::Clock) {
    let t = Arc::new(AtomicU64::new(start));
    let c = t.clone();
    (t, Arc::new(move || c.load(Ordering::SeqCst)))
}

fn write(dir: &Path, name: &str, data: &[u8]) {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, data).unwrap();
    settle(&p);
}

fn paths(changes: &[Change]) -> Vec<String> {
    changes.iter().map(|c| c.body.path().to_string()).collect()
}

fn known(agent: &Agent, seqs: impl IntoIterator<Item = u64>) -> Knowledge {
    let mut k = Knowledge::default();
    let r = ClientStore::replica(agent);
    for s in seqs {
        k.insert(&r, s);
    }
    k
}

#[test]
fn pending_puts_higher_priority_first_keeps_file_order_and_starves_no_class() {
    let t = tempfile::tempdir().unwrap();
    let watch = t.path().join("cell");
    for i in 0..6 {
        write(&watch, &format!("bulk/b{i}.bin"), &pseudo_random(5_000, i));
    }
    write(&watch, "urgent/u0.bin", &pseudo_random(3_000, 100));
    write(&watch, "urgent/u1.bin", &pseudo_random(3_000, 101));
    let (now, clock) = manual_clock(DAY0 + 12 * HOUR);
    let mut cfg = config("gw1", std::slice::from_ref(&watch), &t.path().join("s.redb"));
    cfg.clock = clock;
    cfg.starvation = Duration::from_secs(60);
    cfg.classes = vec![
        ClassSpec {
            priority: Some(10),
            ..class("urgent", &["*/urgent/*"])
        },
        class("bulk", &["*/bulk/*"]),
    ];
    let mut a = Agent::open(cfg).unwrap();
    a.scan_once().unwrap();
    // A second version of u0, recorded after all the bulk files.
    std::fs::write(watch.join("urgent/u0.bin"), pseudo_random(3_500, 102)).unwrap();
    bump_mtime(&watch.join("urgent/u0.bin"), 10);
    a.scan_once().unwrap();
    assert_eq!(a.status().unwrap().pending_changes, 9);

    // Urgent first, in seq order, both versions of u0 in order.
    let first = a.pending(&Knowledge::default(), 100, usize::MAX).unwrap();
    assert_eq!(
        paths(&first),
        ["cell/urgent/u0.bin", "cell/urgent/u1.bin", "cell/urgent/u0.bin"],
        "only the urgent class, in seq order"
    );
    assert!(first.windows(2).all(|w| w[0].seq < w[1].seq));
    // Smaller batches take a prefix: never the second u0 version without the first.
    let two = a.pending(&Knowledge::default(), 2, usize::MAX).unwrap();
    assert_eq!(paths(&two), ["cell/urgent/u0.bin", "cell/urgent/u1.bin"]);
    // Once the urgent ones are known, bulk follows in seq order.
    let have = known(&a, first.iter().map(|c| c.seq));
    let next = a.pending(&have, 100, usize::MAX).unwrap();
    assert_eq!(next.len(), 6);
    assert!(next.iter().all(|c| c.body.path().contains("/bulk/")));

    // Starvation guard: bulk was last offered just now. With urgent work
    // still pending, bulk waits ... until it has waited 60 s.
    now.fetch_add(30_000, Ordering::SeqCst);
    let p = a.pending(&Knowledge::default(), 100, usize::MAX).unwrap();
    assert!(p.iter().all(|c| c.body.path().contains("/urgent/")));
    now.fetch_add(31_000, Ordering::SeqCst);
    let p = a.pending(&Knowledge::default(), 100, usize::MAX).unwrap();
    assert!(
        !p.is_empty() && p.iter().all(|c| c.body.path().contains("/bulk/")),
        "a class starved past the limit gets a batch: {:?}",
        paths(&p)
    );
    // ... and then priority rules again.
    let p = a.pending(&Knowledge::default(), 100, usize::MAX).unwrap();
    assert!(p.iter().all(|c| c.body.path().contains("/urgent/")));
}

#[test]
fn schedule_windows_gate_sending_but_not_recording() {
    let t = tempfile::tempdir().unwrap();
    let watch = t.path().join("cell");
    write(&watch, "night/big.bin", &pseudo_random(20_000, 1));
    write(&watch, "day/small.bin", &pseudo_random(2_000, 2));
    let (now, clock) = manual_clock(DAY0 + 12 * HOUR); // 12:00 UTC
    let mut cfg = config("gw1", std::slice::from_ref(&watch), &t.path().join("s.redb"));
    cfg.clock = clock;
    cfg.classes = vec![ClassSpec {
        schedule: Some(vec!["22:00-06:00".into()]),
        timezone: Some("utc".into()),
        ..class("night", &["*/night/*"])
    }];
    let mut a = Agent::open(cfg).unwrap();
    let rep = a.scan_once().unwrap();
    assert_eq!(rep.changes_recorded, 2, "both recorded, window or not");
    assert_eq!(a.status().unwrap().pending_changes, 2);
    let night = a.class_index("night").unwrap();
    assert_eq!(a.class_hold(night).unwrap(), Some(edge_agent::sched::Hold::Schedule));
    let p = a.pending(&Knowledge::default(), 100, usize::MAX).unwrap();
    assert_eq!(
        paths(&p),
        ["cell/day/small.bin"],
        "outside its window the class is not offered"
    );
    // A Data message of the class already in flight is held too.
    assert!(a.data_gate(&[(night, 1000)]).unwrap() > Duration::ZERO);
    // 05:59 the next morning: still inside "22:00-06:00".
    now.store(DAY0 + 24 * HOUR + 5 * HOUR + 59 * 60_000, Ordering::SeqCst);
    let p = a.pending(&Knowledge::default(), 100, usize::MAX).unwrap();
    assert_eq!(paths(&p), ["cell/day/small.bin", "cell/night/big.bin"]);
    assert_eq!(a.data_gate(&[(night, 1000)]).unwrap(), Duration::ZERO);
    // 06:00: closed again.
    now.store(DAY0 + 30 * HOUR, Ordering::SeqCst);
    let p = a.pending(&Knowledge::default(), 100, usize::MAX).unwrap();
    assert_eq!(paths(&p), ["cell/day/small.bin"]);
}

/// Reads every chunk of `c` as the session would, returning the charges.
fn send_chunks(a: &mut Agent, c: &Change) -> u64 {
    let ChangeBody::File(f) = &c.body else { return 0 };
    for r in &f.chunks {
        assert!(a.chunk(c, &r.id).unwrap().is_some());
    }
    let ch = a.take_charges();
    a.charge(&ch).unwrap();
    ch.iter().map(|x| x.1).sum()
}

#[test]
fn daily_budget_stops_a_class_and_survives_a_restart() {
    let t = tempfile::tempdir().unwrap();
    let watch = t.path().join("cell");
    for i in 0..3 {
        write(&watch, &format!("sat/f{i}.bin"), &pseudo_random(60_000, i + 1));
    }
    let state = t.path().join("s.redb");
    let (now, clock) = manual_clock(DAY0 + 10 * HOUR);
    let mut cfg = config("gw1", std::slice::from_ref(&watch), &state);
    cfg.clock = clock;
    cfg.classes = vec![ClassSpec {
        daily_budget: Some(Quantity::Text("100KB".into())),
        ..class("metered", &["*/sat/*"])
    }];
    let mut a = Agent::open(cfg.clone()).unwrap();
    a.scan_once().unwrap();
    let ci = a.class_index("metered").unwrap();
    let mut have = Knowledge::default();
    // Budget left 100 KB: one 60 KB version fits, the next does not.
    let b1 = a.pending(&have, 100, usize::MAX).unwrap();
    assert_eq!(b1.len(), 1);
    let sent1 = send_chunks(&mut a, &b1[0]);
    assert!(sent1 > 59_000, "{sent1}");
    have.union_with(&known(&a, [b1[0].seq]));
    assert_eq!(a.budget_left(ci).unwrap(), Some(100_000 - sent1));
    // Some budget left: the next change goes (a class's first change in a
    // batch always does), and spends the rest.
    let b2 = a.pending(&have, 100, usize::MAX).unwrap();
    assert_eq!(b2.len(), 1);
    send_chunks(&mut a, &b2[0]);
    have.union_with(&known(&a, [b2[0].seq]));
    assert_eq!(a.budget_left(ci).unwrap(), Some(0));
    assert!(a.pending(&have, 100, usize::MAX).unwrap().is_empty(), "budget spent");
    assert!(a.data_gate(&[(ci, 10)]).unwrap() > Duration::ZERO);
    drop(a);

    // Restart: the spend is in the state file.
    let mut a = Agent::open(cfg.clone()).unwrap();
    assert_eq!(a.budget_left(ci).unwrap(), Some(0));
    assert!(
        a.pending(&have, 100, usize::MAX).unwrap().is_empty(),
        "restart must not reset the budget"
    );
    // Next day (UTC): a fresh budget.
    now.store(DAY0 + 24 * HOUR + 1, Ordering::SeqCst);
    assert_eq!(a.budget_left(ci).unwrap(), Some(100_000));
    let b3 = a.pending(&have, 100, usize::MAX).unwrap();
    assert_eq!(b3.len(), 1);
}

// ---------------------------------------------------------------- network

/// What the in-test aggregator saw.
#[derive(Default)]
struct Seen {
    /// Path of each applied File change and when.
    applied: Vec<(String, Instant)>,
    /// Each Data message: when, chunk bytes.
    data: Vec<(Instant, u64)>,
}

struct Mem {
    chunks: HashSet<Hash32>,
    know: Knowledge,
    keys: HashMap<DeviceRef, Vec<u8>>,
    seen: Arc<Mutex<Seen>>,
}

impl ServerStore for Mem {
    fn knowledge(&mut self, _: &[DeviceRef]) -> protocol::Result<(Knowledge, Knowledge)> {
        Ok((self.know.clone(), self.know.clone()))
    }
    fn has_chunk(&mut self, id: &Hash32) -> protocol::Result<bool> {
        Ok(self.chunks.contains(id))
    }
    fn put_chunks(&mut self, chunks: &[ChunkData]) -> protocol::Result<()> {
        self.chunks.extend(chunks.iter().map(|c| c.id));
        Ok(())
    }
    fn device_key(&mut self, d: &DeviceRef) -> protocol::Result<Option<Vec<u8>>> {
        Ok(self.keys.get(d).cloned())
    }
    fn apply(&mut self, changes: &[Change]) -> protocol::Result<()> {
        let mut seen = self.seen.lock().unwrap();
        for c in changes {
            self.keys
                .entry(c.replica.device.clone())
                .or_insert_with(|| c.pubkey.clone());
            self.know.insert(&c.replica, c.seq);
            if let ChangeBody::File(f) = &c.body {
                seen.applied.push((f.path.clone(), Instant::now()));
            }
        }
        Ok(())
    }
    fn backpressure(&mut self) -> Option<u64> {
        None
    }
}

/// An aggregator whose sink is instant: applied = cloud-durable.
async fn start_aggregator(port: u16, dev: DeviceRef) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut opts = MqttOptions::new("test-agg", "127.0.0.1", port);
    opts.set_max_packet_size(Some(MQTT_MAX_PACKET as u32));
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(opts, 64);
    client.subscribe(topic::up(&dev, "+"), QoS::AtLeastOnce).await.unwrap();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let s2 = seen.clone();
    let task = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        let mut server = Server::new(ServerConfig::default());
        let mut mem = Mem {
            chunks: HashSet::new(),
            know: Knowledge::default(),
            keys: HashMap::new(),
            seen: s2.clone(),
        };
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Ok(msg) = Message::decode(&p.payload) else { continue };
                    if let Message::Data(d) = &msg {
                        let b = d.chunks.iter().map(|c| c.bytes.len() as u64).sum();
                        s2.lock().unwrap().data.push((Instant::now(), b));
                    }
                    let peer = Peer {
                        name: "dev",
                        device: Some(&dev),
                    };
                    let replies = server.handle(0, &peer, msg, &mut mem).unwrap();
                    for r in replies {
                        let payload = r.encode().unwrap();
                        client
                            .publish(topic::down(&dev, r.kind()), QoS::AtLeastOnce, false, payload)
                            .await
                            .unwrap();
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(5), ready_rx)
        .await
        .unwrap()
        .unwrap();
    (seen, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_high_priority_files_are_cloud_durable_first() {
    let port = start_broker();
    let t = tempfile::tempdir().unwrap();
    let watch = t.path().join("cell");
    // The backlog of an outage: 40 bulk files (2.4 MB) recorded first, then
    // three small alarm files.
    for i in 0..40 {
        write(&watch, &format!("bulk/b{i:02}.bin"), &pseudo_random(60_000, 2 * i + 1));
    }
    for i in 0..3 {
        write(&watch, &format!("zalarms/a{i}.csv"), &csv_lines(4_000, i + 100));
    }
    let state = t.path().join("s.redb");
    let mut cfg = config("gw1", std::slice::from_ref(&watch), &state);
    cfg.broker = format!("mqtt://127.0.0.1:{port}");
    cfg.client.max_batch = 8; // several batches, as on a long backlog
    cfg.classes = vec![
        ClassSpec {
            priority: Some(100),
            ..class("alarms", &["*/zalarms/*"])
        },
        class("bulk", &["*/bulk/*"]),
    ];
    // Recorded while offline.
    let mut a = Agent::open(cfg.clone()).unwrap();
    a.scan_once().unwrap();
    // Recorded last (seqs 41..43), offered first.
    let first = all_pending(&mut a);
    assert_eq!(
        paths(&first),
        ["cell/zalarms/a0.csv", "cell/zalarms/a1.csv", "cell/zalarms/a2.csv"]
    );
    assert!(first.iter().all(|c| c.seq > 40));
    drop(a);

    // The link returns.
    let (seen, agg) = start_aggregator(port, device("gw1")).await;
    let t0 = Instant::now();
    let rep = tokio::time::timeout(
        Duration::from_secs(9),
        Agent::open(cfg)
            .unwrap()
            .sync(edge_agent::WaitLevel::Cloud, Duration::from_secs(8)),
    )
    .await
    .unwrap()
    .unwrap();
    agg.abort();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.applied.len(), 43, "everything drained");
    let when = |pred: &dyn Fn(&str) -> bool| -> Vec<Duration> {
        seen.applied
            .iter()
            .filter(|(p, _)| pred(p))
            .map(|(_, at)| at.duration_since(t0))
            .collect()
    };
    let alarms = when(&|p| p.contains("/zalarms/"));
    let bulk = when(&|p| p.contains("/bulk/"));
    let last_alarm = alarms.iter().max().copied().unwrap();
    let first_bulk = bulk.iter().min().copied().unwrap();
    let last_bulk = bulk.iter().max().copied().unwrap();
    eprintln!(
        "alarms durable by {last_alarm:?}; bulk from {first_bulk:?} to {last_bulk:?}; sync took {:.2} s",
        rep.secs
    );
    assert!(
        last_alarm <= first_bulk,
        "every alarm file is cloud-durable before the first bulk file ({last_alarm:?} vs {first_bulk:?})"
    );
    // Seq order would have put them last.
    let order: Vec<&str> = seen.applied.iter().map(|(p, _)| p.as_str()).collect();
    assert!(order[..3].iter().all(|p| p.contains("/zalarms/")), "{:?}", &order[..5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_cap_holds_on_the_wire() {
    let port = start_broker();
    let t = tempfile::tempdir().unwrap();
    let watch = t.path().join("cell");
    for i in 0..6 {
        write(&watch, &format!("capped/f{i}.bin"), &pseudo_random(100_000, 2 * i + 11));
    }
    let state = t.path().join("s.redb");
    let mut cfg = config("gw1", std::slice::from_ref(&watch), &state);
    cfg.broker = format!("mqtt://127.0.0.1:{port}");
    cfg.client.data_bytes = 16 << 10;
    cfg.chunking = small_chunks();
    const CAP: u64 = 200_000;
    cfg.classes = vec![ClassSpec {
        bandwidth: Some(Quantity::Int(CAP)),
        ..class("capped", &["*/capped/*"])
    }];
    let (seen, agg) = start_aggregator(port, device("gw1")).await;
    let rep = tokio::time::timeout(
        Duration::from_secs(9),
        Agent::open(cfg)
            .unwrap()
            .sync(edge_agent::WaitLevel::Cloud, Duration::from_secs(8)),
    )
    .await
    .unwrap()
    .unwrap();
    agg.abort();
    let seen = seen.lock().unwrap();
    let total: u64 = seen.data.iter().map(|d| d.1).sum();
    assert!(total >= 600_000, "all chunk bytes arrived: {total}");
    let first = seen.data.first().unwrap();
    let last = seen.data.last().unwrap();
    let span = last.0.duration_since(first.0).as_secs_f64();
    // The bucket starts empty and lets a message leave when it is out of
    // debt: everything before the last message left at most at CAP.
    let rate = (total - last.1) as f64 / span;
    eprintln!(
        "{total} chunk bytes in {} Data messages over {span:.2} s: {rate:.0} B/s (cap {CAP}); sync {:.2} s",
        seen.data.len(),
        rep.secs
    );
    assert!(rate <= CAP as f64 * 1.10, "rate {rate:.0} B/s over the cap");
    assert!(
        rate >= CAP as f64 * 0.6,
        "rate {rate:.0} B/s: the cap should not throttle far below itself"
    );
    assert!(span >= 2.4, "{span:.2} s");
}

// ---------------------------------------------------------------- disk

fn disk_agent(t: &Path, watch: &Path, base: Arc<AtomicU64>, high: &str, low: &str) -> AgentConfig {
    let mut cfg = config("gw1", &[watch.to_path_buf()], &t.join("s.redb"));
    cfg.disk = Some(DiskWatermarks::new(Watermark::parse(high).unwrap(), Watermark::parse(low).unwrap()).unwrap());
    cfg.disk_probe = fake_disk(watch.to_path_buf(), 200_000, base);
    cfg
}

/// Marks these seqs cloud-durable the way a CloudAck does.
fn cloud_ack(a: &mut Agent, seqs: &[u64]) {
    all_pending(a); // offered, as if sent
    let r = ClientStore::replica(a);
    let mut k = Knowledge::default();
    let mut set = RangeSet::new();
    for s in seqs {
        set.insert(*s);
    }
    k.map.insert(r, set);
    a.on_knowledge(&k.clone(), &k).unwrap();
}

#[test]
fn watermarks_prune_only_cloud_durable_files_oldest_first_to_the_low_mark() {
    let t = tempfile::tempdir().unwrap();
    let watch = t.path().join("cell");
    aged_files(&watch, "d", 10, 10_000, 1); // f0 oldest … f9 newest
    let base = Arc::new(AtomicU64::new(50_000));
    // 200 kB disk, 150 kB used (75 %): over 70 %, prune to 50 %.
    let mut a = Agent::open(disk_agent(t.path(), &watch, base.clone(), "70%", "50%")).unwrap();
    a.scan_once().unwrap();
    let seq: HashMap<String, u64> = all_pending(&mut a)
        .iter()
        .map(|c| (c.body.path().to_string(), c.seq))
        .collect();
    // Cloud-durable: f1..f7. Not: f0 (the oldest), f8, f9.
    let durable: Vec<u64> = (1..=7).map(|i| seq[&format!("cell/d/f{i}.bin")]).collect();
    cloud_ack(&mut a, &durable);

    let d = a.enforce_disk().unwrap().unwrap();
    let exists = |i: u32| watch.join(format!("d/f{i}.bin")).exists();
    assert!(exists(0), "f0 is the oldest but not cloud-durable: never pruned");
    assert!((1..=5).all(|i| !exists(i)), "the five oldest durable files pruned");
    assert!((6..=9).all(exists), "pruning stopped at the low watermark");
    assert_eq!((d.pruned_files, d.pruned_bytes, d.over_high), (5, 50_000, false));
    assert!((d.used_pct - 50.0).abs() < 0.01, "{}", d.used_pct);
    assert_eq!(d.blocked_bytes_not_durable, 0);

    // Pruned files are not deletions: nothing new to send, tracked no more,
    // listed as pruned.
    let rep = a.scan_once().unwrap();
    assert_eq!((rep.files_deleted, rep.changes_recorded), (0, 0));
    assert!(all_pending(&mut a)
        .iter()
        .all(|c| !matches!(c.body, ChangeBody::Delete(_))));
    let p = a.pruned("cell/d/f1.bin").unwrap().unwrap();
    assert_eq!((p.size, p.forced), (10_000, false));
    let s = a.status().unwrap();
    assert_eq!(s.files_tracked, 5);
    let sd = s.disk.unwrap();
    assert_eq!((sd.pruned_files, sd.pruned_bytes), (5, 50_000));

    // Fuller disk: 170 kB used. Only f6, f7 are durable; the rest is blocked.
    base.store(120_000, Ordering::SeqCst);
    let d = a.enforce_disk().unwrap().unwrap();
    assert!(!exists(6) && !exists(7));
    assert!(exists(0) && exists(8) && exists(9), "not cloud-durable: kept");
    assert!(d.over_high, "still over: {}", d.used_pct);
    assert_eq!(d.blocked_bytes_not_durable, 30_000);
    assert_eq!(d.pruned_files, 7);
    let s = a.status().unwrap();
    assert!(s.disk.as_ref().unwrap().over_high);

    // A pruned file put back (e.g. restored) is a new file again.
    std::fs::write(watch.join("d/f1.bin"), pseudo_random(10_000, 2)).unwrap();
    let rep = a.scan_once().unwrap();
    assert_eq!(rep.files_new, 1);
    assert!(a.pruned("cell/d/f1.bin").unwrap().is_none());
}

#[test]
fn forced_classes_prune_after_durable_data_and_keep_local_is_honoured() {
    let t = tempfile::tempdir().unwrap();
    let watch = t.path().join("cell");
    aged_files(&watch, "scratch", 3, 10_000, 10); // oldest of all, never durable
    aged_files(&watch, "recent", 2, 10_000, 20); // durable, but keep_local 1 h
    aged_files(&watch, "plain", 3, 10_000, 30); // durable
    aged_files(&watch, "never", 1, 10_000, 40); // durable, prune = never
    let base = Arc::new(AtomicU64::new(70_000));
    // 160 kB used of 200 kB (80 %); low 40 % = 80 kB: 80 kB to free.
    let mut cfg = disk_agent(t.path(), &watch, base, "75%", "40%");
    cfg.classes = vec![
        ClassSpec {
            prune: Some(Prune::Force),
            ..class("scratch", &["*/scratch/*"])
        },
        ClassSpec {
            keep_local: Some(Quantity::Text("1h".into())),
            ..class("recent", &["*/recent/*"])
        },
        ClassSpec {
            prune: Some(Prune::Never),
            ..class("never", &["*/never/*"])
        },
    ];
    let mut a = Agent::open(cfg).unwrap();
    a.scan_once().unwrap();
    let pend = all_pending(&mut a);
    let durable: Vec<u64> = pend
        .iter()
        .filter(|c| !c.body.path().contains("/scratch/"))
        .map(|c| c.seq)
        .collect();
    cloud_ack(&mut a, &durable);
    let d = a.enforce_disk().unwrap().unwrap();
    let gone = |p: &str| !watch.join(p).exists();
    // Durable first: plain f0..f2 (30 kB). recent/* is inside keep_local,
    // never/* may not be pruned. Then forced: scratch, oldest first, all 3.
    assert!(gone("plain/f0.bin") && gone("plain/f1.bin") && gone("plain/f2.bin"));
    assert!(!gone("recent/f0.bin") && !gone("recent/f1.bin"), "keep_local");
    assert!(!gone("never/f0.bin"), "prune = never");
    assert!(gone("scratch/f0.bin") && gone("scratch/f1.bin") && gone("scratch/f2.bin"));
    assert_eq!((d.pruned_files, d.pruned_forced), (6, 3));
    assert!(a.pruned("cell/scratch/f0.bin").unwrap().unwrap().forced);
    // Forced pruning is not a deletion either.
    a.scan_once().unwrap();
    assert!(all_pending(&mut a)
        .iter()
        .all(|c| !matches!(c.body, ChangeBody::Delete(_))));
}
