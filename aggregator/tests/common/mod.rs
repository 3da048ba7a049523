//! Shared test helpers: embedded broker, in-process aggregator, raw device.
#![allow(dead_code)]

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

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn start_broker() -> Result<u16> {
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

/// Mosquitto on a free port (killed on drop), if it is installed.
pub struct Mosquitto {
    pub port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start_mosquitto() -> Result<Option<Mosquitto>> {
    let Some(bin) = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        return Ok(None);
    };
    let port = free_port()?;
    let dir = tempfile::tempdir()?;
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nmax_packet_size {}\nmax_queued_messages 10000\n",
            MQTT_MAX_PACKET + 1024
        ),
    )?;
    let child = std::process::Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let m = Mosquitto { port, child, _dir: dir };
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(Some(m));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("mosquitto did not start")
}

pub struct Agg {
    pub stop: oneshot::Sender<()>,
    pub task: JoinHandle<aggregator::Result<()>>,
}

pub fn start_agg(broker: u16, sink: u16, data: &Path, stats: Arc<AggStats>) -> Agg {
    start_agg_with(broker, sink, data, stats, |_| {})
}

pub fn start_agg_with(
    broker: u16,
    sink: u16,
    data: &Path,
    stats: Arc<AggStats>,
    tweak: impl FnOnce(&mut AggConfig),
) -> Agg {
    let mut cfg = AggConfig::new(
        &format!("mqtt://127.0.0.1:{broker}"),
        &format!("http://127.0.0.1:{sink}"),
        data.to_path_buf(),
    );
    cfg.id = "test".into();
    tweak(&mut cfg);
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(aggregator::run_with_stats(cfg, stats, async move {
        let _ = rx.await;
    }));
    Agg { stop, task }
}

impl Agg {
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.task.await??;
        Ok(())
    }
}

/// A device speaking raw protocol messages over MQTT.
pub struct Device {
    pub dev: DeviceRef,
    pub client: AsyncClient,
    pub rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
}

impl Device {
    pub async fn connect(broker: u16, dev: DeviceRef) -> Result<Device> {
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

    pub async fn publish_raw(&self, kind: &str, payload: Vec<u8>) -> Result<()> {
        self.client
            .publish(topic::up(&self.dev, kind), QoS::AtLeastOnce, false, payload)
            .await?;
        Ok(())
    }

    pub async fn send(&self, m: &Message) -> Result<()> {
        self.publish_raw(m.kind(), m.encode()?).await
    }

    /// Next message on down/`kind`, skipping others.
    pub async fn recv(&mut self, kind: &str, timeout: Duration) -> Result<Message> {
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
    pub async fn hello(&mut self) -> Result<KnowledgeMsg> {
        for _ in 0..30 {
            self.send(&Message::Hello(Hello {
                proto: protocol::PROTO_VERSION,
                device: Some(self.dev.clone()),
                replica: Some(replica(&self.dev)),
                software: "test".into(),
                server_cursor: None,
            }))
            .await?;
            if let Ok(Message::Knowledge(k)) = self.recv("knowledge", Duration::from_secs(1)).await {
                return Ok(k);
            }
        }
        bail!("aggregator never answered Hello")
    }
}

pub fn replica(d: &DeviceRef) -> ReplicaId {
    ReplicaId {
        device: d.clone(),
        epoch: 1,
    }
}

pub fn key() -> Result<Ed25519KeyPair> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| anyhow::anyhow!("keygen"))?;
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| anyhow::anyhow!("key"))
}

pub fn chunk(seed: u32, len: usize) -> ChunkData {
    let bytes: Vec<u8> = (0..len)
        .map(|i| ((i as u32).wrapping_mul(31) ^ seed.wrapping_mul(2_654_435_761)) as u8)
        .collect();
    ChunkData {
        id: Hash32::of(&bytes),
        bytes,
    }
}

pub fn file_change(k: &Ed25519KeyPair, d: &DeviceRef, seq: u64, chunks: &[ChunkData]) -> Change {
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

pub async fn prepare(dev: &mut Device, batch_id: u64, changes: Vec<Change>) -> Result<Prepare> {
    dev.send(&Message::Batch(Batch { batch_id, changes })).await?;
    match dev.recv("prepare", Duration::from_secs(10)).await? {
        Message::Prepare(p) if p.batch_id == batch_id => Ok(p),
        other => bail!("expected Prepare, got {other:?}"),
    }
}

pub async fn commit(dev: &mut Device, batch_id: u64) -> Result<Committed> {
    dev.send(&Message::Commit(Commit { batch_id })).await?;
    match dev.recv("committed", Duration::from_secs(10)).await? {
        Message::Committed(c) if c.batch_id == batch_id => Ok(c),
        other => bail!("expected Committed, got {other:?}"),
    }
}

/// The sink's storage as the forwarder tests need it: the real
/// `protocol::server::Server` logic runs on top, only storage is in memory.
#[derive(Default)]
pub struct MemSink {
    pub chunks: std::collections::BTreeSet<Hash32>,
    pub known: protocol::Knowledge,
    pub keys: std::collections::BTreeMap<DeviceRef, Vec<u8>>,
    pub changes: Vec<Change>,
    pub packs: usize,
    /// `Some(ms)`: answer Prepare with back-pressure.
    pub busy: Option<u64>,
}

impl protocol::server::ServerStore for MemSink {
    fn knowledge(&mut self, devices: &[DeviceRef]) -> protocol::Result<(protocol::Knowledge, protocol::Knowledge)> {
        let mut k = protocol::Knowledge::default();
        for d in devices {
            k.union_with(&self.known.for_device(d));
        }
        Ok((k.clone(), k))
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
        for c in changes {
            self.keys.entry(c.replica.device.clone()).or_insert(c.pubkey.clone());
            self.known.insert(&c.replica, c.seq);
            self.changes.push(c.clone());
        }
        Ok(())
    }
    fn backpressure(&mut self) -> Option<u64> {
        self.busy
    }
}
