//! The MQTT driver against a real (embedded) broker with no aggregator:
//! sync times out cleanly; garbage on the down topics is counted, not fatal.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use edge_agent::{read_status, Agent, Error, WaitLevel};
use protocol::msg::{KnowledgeMsg, Message, MAX_MESSAGE, MQTT_MAX_PACKET};
use protocol::{topic, Knowledge};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::time::{Duration, Instant};

fn watch_with_files(t: &std::path::Path) -> std::path::PathBuf {
    let watch = t.join("cell");
    std::fs::create_dir(&watch).unwrap();
    for i in 0..3u64 {
        std::fs::write(watch.join(format!("f{i}.bin")), pseudo_random(30_000, i + 1)).unwrap();
    }
    watch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_with_nobody_answering_times_out_clearly() {
    let port = start_broker();
    let t = tempfile::tempdir().unwrap();
    let watch = watch_with_files(t.path());
    let state = t.path().join("s.redb");
    let mut cfg = config("gw1", std::slice::from_ref(&watch), &state);
    cfg.broker = format!("mqtt://127.0.0.1:{port}");
    let agent = Agent::open(cfg.clone()).unwrap();
    let t0 = Instant::now();
    let err = agent
        .sync(WaitLevel::Regional, Duration::from_millis(1500))
        .await
        .unwrap_err();
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "{took:?}"
    );
    match &err {
        Error::Timeout { secs, level, pending } => {
            assert_eq!((*level, *pending), ("regional", 3));
            assert!((secs - 1.5).abs() < 1e-9);
        }
        e => panic!("expected Timeout, got {e}"),
    }
    let msg = err.to_string();
    assert!(msg.starts_with("timed out after 1.5 s: 3 recorded change(s)"), "{msg}");
    assert!(msg.contains("regional level"), "{msg}");
    // Nothing lost, lock released, state readable.
    let s = read_status(&state).unwrap();
    assert_eq!((s.pending_changes, s.changes_recorded, s.from_snapshot), (3, 3, false));
    assert!(s.counters.messages_sent >= 1, "Hello was sent: {:?}", s.counters);

    // With no broker at all: the same clean timeout, not a connection error.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    cfg.broker = format!("mqtt://127.0.0.1:{dead_port}");
    let t0 = Instant::now();
    let err = Agent::open(cfg.clone())
        .unwrap()
        .sync(WaitLevel::Cloud, Duration::from_millis(800))
        .await
        .unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(
        matches!(
            err,
            Error::Timeout {
                level: "cloud",
                pending: 3,
                ..
            }
        ),
        "{err}"
    );

    // Nothing recorded: nothing to wait for, done without any broker.
    let empty = t.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let mut cfg = config("gw9", &[empty], &t.path().join("e.redb"));
    cfg.broker = format!("mqtt://127.0.0.1:{dead_port}");
    let rep = Agent::open(cfg)
        .unwrap()
        .sync(WaitLevel::Cloud, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(rep.changes_durable, 0);
}

/// Waits until the agent publishes a message of `kind`.
async fn wait_for(dev: &protocol::DeviceRef, kind: &str, rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) {
    let want = topic::up(dev, kind);
    let seen = tokio::time::timeout(Duration::from_secs(8), async {
        while let Some(t) = rx.recv().await {
            if t == want {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(seen, Ok(true), "agent never published {kind}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_down_topics_is_counted_and_survived() {
    let port = start_broker();
    let t = tempfile::tempdir().unwrap();
    let watch = watch_with_files(t.path());
    let state = t.path().join("s.redb");
    let mut cfg = config("gw1", std::slice::from_ref(&watch), &state);
    cfg.broker = format!("mqtt://127.0.0.1:{port}");
    let dev = device("gw1");
    let agent = Agent::open(cfg).unwrap();

    // A peer that watches what the agent publishes and injects downlink messages.
    let mut opts = MqttOptions::new("test-peer", "127.0.0.1", port);
    opts.set_max_packet_size(Some(MQTT_MAX_PACKET as u32));
    opts.set_keep_alive(Duration::from_secs(30));
    let (peer, mut el) = AsyncClient::new(opts, 64);
    peer.subscribe(topic::up(&dev, "+"), QoS::AtLeastOnce).await.unwrap();
    let (up_tx, mut up_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let (sub_tx, mut sub_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let poller = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = sub_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = up_tx.send(String::from_utf8_lossy(&p.topic).into_owned());
                }
                Ok(_) => {}
                Err(e) => panic!("test peer: {e}"),
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(5), sub_rx.recv())
        .await
        .unwrap();

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(agent.run(async {
        let _ = stop_rx.await;
    }));
    // The agent subscribes before it sends Hello on the same connection.
    wait_for(&dev, "hello", &mut up_rx).await;

    let valid = Message::Knowledge(KnowledgeMsg {
        regional: Knowledge::default(),
        cloud: Knowledge::default(),
        max_message: MAX_MESSAGE as u32,
        max_batch: 100,
    })
    .encode()
    .unwrap();
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("knowledge", Vec::new()),
        ("knowledge", pseudo_random(1000, 3)),
        ("knowledge", valid[..valid.len() - 3].to_vec()),
        ("prepare", vec![0xa1, 0x01, 0x02]), // CBOR, but no envelope
        ("committed", vec![0x9f; 64]),       // nested indefinite arrays
        ("cloudack", vec![0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]), // huge length
        ("knowledge", vec![0u8; MAX_MESSAGE + 1]), // over the envelope limit
    ];
    let n_bad = bad.len() as u64;
    for (kind, payload) in bad {
        peer.publish(topic::down(&dev, kind), QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    // Then a valid Knowledge: the agent answers with a Batch, which proves it
    // is alive and (same publisher, same order) has handled all of the above.
    peer.publish(topic::down(&dev, "knowledge"), QoS::AtLeastOnce, false, valid)
        .await
        .unwrap();
    wait_for(&dev, "batch", &mut up_rx).await;
    assert!(!run.is_finished(), "agent stopped");

    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("agent did not shut down")
        .unwrap()
        .unwrap();
    poller.abort();
    let s = read_status(&state).unwrap();
    assert_eq!(s.bad_messages, n_bad, "{:?}", s.counters);
    assert!(s.counters.messages_received > n_bad);
    assert_eq!(s.pending_changes, 3, "nothing was acknowledged");
}
