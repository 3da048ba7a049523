//! The aggregator's MQTT path against the embedded broker (rumqttd), with a
//! raw rumqttc v5 client playing the device. The sink URL points at a closed
//! port: forwarding retries in the background and must not disturb anything.

use aggregator::{AggConfig, AggStats};
use anyhow::{bail, Context, Result};
use protocol::hlc::Hlc;
use protocol::manifest::{Change, ChangeBody, ChunkRef, FileVersion};
use protocol::msg::*;
use protocol::{topic, DeviceRef, Hash32, ReplicaId};
use ring::signature::Ed25519KeyPair;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn start_broker() -> Result<u16> {
    let port = free_port()?;
    let max = MQTT_MAX_PACKET;
    let cfg = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 100
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v5.1]
name = "v5-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
    [v5.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = {max}
    max_inflight_count = 100
    dynamic_filters = true
"#
    );
    let config: rumqttd::Config = toml::from_str(&cfg).context("rumqttd config")?;
    std::thread::spawn(move || {
        let mut broker = rumqttd::Broker::new(config);
        let _ = broker.start();
    });
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("broker did not start")
}

struct Agg {
    stop: oneshot::Sender<()>,
    task: JoinHandle<aggregator::Result<()>>,
}

fn start_agg(broker: u16, sink: u16, data: &Path, stats: Arc<AggStats>) -> Agg {
    let mut cfg = AggConfig::new(
        &format!("mqtt://127.0.0.1:{broker}"),
        &format!("http://127.0.0.1:{sink}"),
        data.to_path_buf(),
    );
    cfg.id = "test".into();
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(aggregator::run_with_stats(cfg, stats, async move {
        let _ = rx.await;
    }));
    Agg { stop, task }
}

impl Agg {
    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.task.await??;
        Ok(())
    }
}

/// A device speaking raw protocol messages over MQTT.
struct Device {
    dev: DeviceRef,
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
}

impl Device {
    async fn connect(broker: u16, dev: DeviceRef) -> Result<Device> {
        let mut o = MqttOptions::new(format!("test-device-{}", dev.device), "127.0.0.1", broker);
        o.set_max_packet_size(Some(MQTT_MAX_PACKET as u32));
        let (client, mut ev) = AsyncClient::new(o, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (subbed_tx, subbed_rx) = oneshot::channel();
        let mut subbed_tx = Some(subbed_tx);
        let (c, filter) = (client.clone(), topic::down_filter(&dev));
        tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let (c, f) = (c.clone(), filter.clone());
                        tokio::spawn(async move { c.subscribe(f, QoS::AtLeastOnce).await });
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(t) = subbed_tx.take() {
                            let _ = t.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let t = String::from_utf8_lossy(&p.topic).to_string();
                        if tx.send((t, p.payload.to_vec())).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subbed_rx).await??;
        Ok(Device { dev, client, rx })
    }

    async fn publish_raw(&self, kind: &str, payload: Vec<u8>) -> Result<()> {
        self.client
            .publish(topic::up(&self.dev, kind), QoS::AtLeastOnce, false, payload)
            .await?;
        Ok(())
    }

    async fn send(&self, m: &Message) -> Result<()> {
        self.publish_raw(m.kind(), m.encode()?).await
    }

    /// Next message on down/`kind`, skipping others.
    async fn recv(&mut self, kind: &str, timeout: Duration) -> Result<Message> {
        let want = topic::down(&self.dev, kind);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (t, payload) = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .with_context(|| format!("no {kind} reply"))?
                .context("device loop ended")?;
            if t == want {
                return Ok(Message::decode(&payload)?);
            }
        }
    }

    /// Hello until the aggregator (which may still be subscribing) answers.
    async fn hello(&mut self) -> Result<KnowledgeMsg> {
        for _ in 0..30 {
            self.send(&Message::Hello(Hello {
                proto: protocol::PROTO_VERSION,
                device: Some(self.dev.clone()),
                replica: Some(replica(&self.dev)),
                software: "test".into(),
            }))
            .await?;
            if let Ok(Message::Knowledge(k)) = self.recv("knowledge", Duration::from_secs(1)).await {
                return Ok(k);
            }
        }
        bail!("aggregator never answered Hello")
    }
}

fn replica(d: &DeviceRef) -> ReplicaId {
    ReplicaId {
        device: d.clone(),
        epoch: 1,
    }
}

fn key() -> Result<Ed25519KeyPair> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| anyhow::anyhow!("keygen"))?;
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| anyhow::anyhow!("key"))
}

fn chunk(seed: u32, len: usize) -> ChunkData {
    let bytes: Vec<u8> = (0..len)
        .map(|i| ((i as u32).wrapping_mul(31) ^ seed.wrapping_mul(2_654_435_761)) as u8)
        .collect();
    ChunkData {
        id: Hash32::of(&bytes),
        bytes,
    }
}

fn file_change(k: &Ed25519KeyPair, d: &DeviceRef, seq: u64, chunks: &[ChunkData]) -> Change {
    let body = ChangeBody::File(FileVersion {
        path: format!("line1/log-{seq}.csv"),
        size: chunks.iter().map(|c| c.bytes.len() as u64).sum(),
        mtime_ns: 1,
        class: "default".into(),
        chunks: chunks
            .iter()
            .map(|c| ChunkRef {
                id: c.id,
                len: c.bytes.len() as u32,
            })
            .collect(),
        sha256: Hash32::default(),
        mode: 0o644,
    });
    Change::sign(replica(d), seq, Hlc(seq), body, k)
}

async fn prepare(dev: &mut Device, batch_id: u64, changes: Vec<Change>) -> Result<Prepare> {
    dev.send(&Message::Batch(Batch { batch_id, changes })).await?;
    match dev.recv("prepare", Duration::from_secs(10)).await? {
        Message::Prepare(p) if p.batch_id == batch_id => Ok(p),
        other => bail!("expected Prepare, got {other:?}"),
    }
}

async fn commit(dev: &mut Device, batch_id: u64) -> Result<Committed> {
    dev.send(&Message::Commit(Commit { batch_id })).await?;
    match dev.recv("committed", Duration::from_secs(10)).await? {
        Message::Committed(c) if c.batch_id == batch_id => Ok(c),
        other => bail!("expected Committed, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sync_bad_input_and_restart_over_mqtt() -> Result<()> {
    let broker = start_broker()?;
    let sink = free_port()?; // nothing listens there
    let data = tempfile::tempdir()?;
    let stats = Arc::new(AggStats::default());
    let agg = start_agg(broker, sink, data.path(), stats.clone());

    let d = DeviceRef::new("acme", "plant-1", "gw-1")?;
    let mut dev = Device::connect(broker, d.clone()).await?;
    let k = key()?;

    // 1. A full round: Hello, Batch, Data, Commit.
    let hello = dev.hello().await?;
    assert!(hello.regional.map.is_empty());
    let chunks: Vec<ChunkData> = (0..3).map(|i| chunk(i, 20_000 + i as usize)).collect();
    let c1 = file_change(&k, &d, 1, &chunks);
    let p = prepare(&mut dev, 1, vec![c1.clone()]).await?;
    assert_eq!(p.missing, chunks.iter().map(|c| c.id).collect::<Vec<_>>());
    assert_eq!(p.retry_after_ms, 0);
    dev.send(&Message::Data(Data {
        batch_id: 1,
        chunks: chunks.clone(),
    }))
    .await?;
    let done = commit(&mut dev, 1).await?;
    assert_eq!(done.results.len(), 1);
    assert_eq!(done.results[0].status, Status::Applied);
    assert!(done.regional.contains(&replica(&d), 1));

    // 2. Bad input on every up topic: garbage, oversized, and the wrong kind.
    let kinds = ["hello", "batch", "data", "commit", "prepare", "bogus"];
    let oversized = vec![0x80u8; MAX_MESSAGE + 1];
    for kind in kinds {
        for payload in [b"\xff\x00garbage".to_vec(), Vec::new(), oversized.clone()] {
            let len = payload.len();
            dev.publish_raw(kind, payload).await?;
            match dev.recv("nack", Duration::from_secs(10)).await? {
                Message::Nack(n) => assert!(n.reason.contains(kind), "{kind} ({len} bytes): {}", n.reason),
                other => bail!("expected Nack, got {other:?}"),
            }
        }
    }
    dev.publish_raw("hello", Message::Commit(Commit { batch_id: 9 }).encode()?)
        .await?;
    assert!(matches!(
        dev.recv("nack", Duration::from_secs(10)).await?,
        Message::Nack(_)
    ));
    // A change signed for another device is refused, not applied.
    let other = DeviceRef::new("acme", "plant-1", "gw-2")?;
    let foreign = file_change(&k, &other, 1, &[]);
    let p = prepare(&mut dev, 2, vec![foreign]).await?;
    assert_eq!(p.rejected.len(), 1);
    let s = stats.snapshot();
    assert!(s.bad_messages >= 19, "{s:?}");

    // Still working, and it remembers the change.
    let hello = dev.hello().await?;
    assert!(hello.regional.contains(&replica(&d), 1));

    // 3. Stop mid-transfer, restart on the same data dir: chunks already
    //    received are not asked for again.
    let chunks2: Vec<ChunkData> = (10..18).map(|i| chunk(i, 10_000)).collect();
    let c2 = file_change(&k, &d, 2, &chunks2);
    let p = prepare(&mut dev, 3, vec![c2.clone()]).await?;
    assert_eq!(p.missing.len(), 8);
    dev.send(&Message::Data(Data {
        batch_id: 3,
        chunks: chunks2[..5].to_vec(),
    }))
    .await?;
    // Per-device order: once Hello is answered, the Data was handled.
    dev.hello().await?;
    agg.stop().await?;

    let stats2 = Arc::new(AggStats::default());
    let agg = start_agg(broker, sink, data.path(), stats2.clone());
    let hello = dev.hello().await?;
    assert!(hello.regional.contains(&replica(&d), 1));
    assert!(!hello.regional.contains(&replica(&d), 2));
    let p = prepare(&mut dev, 4, vec![c2.clone()]).await?;
    assert_eq!(p.missing, chunks2[5..].iter().map(|c| c.id).collect::<Vec<_>>());
    dev.send(&Message::Data(Data {
        batch_id: 4,
        chunks: chunks2[5..].to_vec(),
    }))
    .await?;
    let done = commit(&mut dev, 4).await?;
    assert_eq!(done.results[0].status, Status::Applied);
    assert!(done.regional.contains(&replica(&d), 2));
    // Replaying an old batch's commit is harmless: empty results, same knowledge.
    let again = commit(&mut dev, 3).await?;
    assert!(again.results.is_empty());
    assert!(again.regional.contains(&replica(&d), 2));
    // Offering an applied change again asks for nothing.
    let p = prepare(&mut dev, 5, vec![c1, c2]).await?;
    assert!(p.missing.is_empty());

    let s = stats2.snapshot();
    assert_eq!(s.changes_applied, 1, "{s:?}");
    assert_eq!(s.chunks_received, 3, "{s:?}");
    agg.stop().await?;
    Ok(())
}
