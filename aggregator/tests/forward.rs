//! The forwarder against a minimal in-test HTTP sink that runs the real
//! `protocol::server::Server` over an in-memory store (the real cloud-sink is
//! built elsewhere). The sink starts late: everything must wait and then flow.

mod common;

use aggregator::AggStats;
use anyhow::{bail, Result};
use common::*;
use protocol::knowledge::Knowledge;
use protocol::msg::*;
use protocol::server::{Peer, Server, ServerConfig};
use protocol::{DeviceRef, Hash32};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

type Shared = Arc<Mutex<(Server, MemSink)>>;

fn route(sink: &Shared, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let Ok(mut g) = sink.lock() else {
        return (500, b"poisoned".to_vec());
    };
    let (server, store) = &mut *g;
    if let ("PUT", Some(id)) = (method, path.strip_prefix("/v1/packs/")) {
        if Hash32::of(body).to_hex() != id {
            return (400, b"pack id mismatch".to_vec());
        }
        return match protocol::pack::parse(body) {
            Ok(entries) => {
                store.chunks.extend(entries.iter().map(|e| e.id));
                store.packs += 1;
                (200, Vec::new())
            }
            Err(e) => (400, e.to_string().into_bytes()),
        };
    }
    if (method, path) != ("POST", "/v1/sync") {
        return (404, b"no such route".to_vec());
    }
    let msg = match Message::decode(body) {
        Ok(m) => m,
        Err(e) => return (400, e.to_string().into_bytes()),
    };
    let peer = Peer {
        name: "agg",
        device: None,
    };
    match server.handle(0, &peer, msg, store) {
        Ok(replies) => match replies.first() {
            Some(r) => (200, r.encode().unwrap_or_default()),
            None => (204, Vec::new()),
        },
        Err(e) => (500, e.to_string().into_bytes()),
    }
}

/// Serves HTTP/1.1 (keep-alive, Content-Length bodies) on `port`.
async fn serve(port: u16, sink: Shared) -> Result<()> {
    let l = TcpListener::bind(("127.0.0.1", port)).await?;
    tokio::spawn(async move {
        while let Ok((sock, _)) = l.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut r = BufReader::new(r);
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut parts = line.split_whitespace();
                    let (method, path) = (
                        parts.next().unwrap_or("").to_string(),
                        parts.next().unwrap_or("").to_string(),
                    );
                    let mut len = 0usize;
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            if k.eq_ignore_ascii_case("content-length") {
                                len = v.trim().parse().unwrap_or(0);
                            }
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let (code, out) = route(&sink, &method, &path, &body);
                    let head = format!("HTTP/1.1 {code} X\r\ncontent-length: {}\r\n\r\n", out.len());
                    if w.write_all(head.as_bytes()).await.is_err() || w.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(())
}

async fn cloudack(dev: &mut Device, want_seq: u64) -> Result<Knowledge> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        if let Ok(Message::CloudAck(a)) = dev.recv("cloudack", Duration::from_secs(1)).await {
            if a.cloud.contains(&replica(&dev.dev), want_seq) {
                return Ok(a.cloud);
            }
        }
    }
    bail!("no CloudAck for seq {want_seq}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forwards_to_a_late_sink_and_relays_cloudack() -> Result<()> {
    let broker = start_broker()?;
    let sink_port = free_port()?;
    let data = tempfile::tempdir()?;
    let stats = Arc::new(AggStats::default());
    let agg = start_agg_with(broker, sink_port, data.path(), stats.clone(), |c| {
        c.pack_max_delay = Duration::from_millis(100);
    });

    let d1 = DeviceRef::new("acme", "plant-1", "gw-1")?;
    let mut dev = Device::connect(broker, d1.clone()).await?;
    let k = key()?;
    dev.hello().await?;
    let chunks: Vec<ChunkData> = (0..4).map(|i| chunk(i, 30_000)).collect();
    let c1 = file_change(&k, &d1, 1, &chunks);
    let p = prepare(&mut dev, 1, vec![c1.clone()]).await?;
    assert_eq!(p.missing.len(), 4);
    dev.send(&Message::Data(Data {
        batch_id: 1,
        chunks: chunks.clone(),
    }))
    .await?;
    assert_eq!(commit(&mut dev, 1).await?.results[0].status, Status::Applied);

    // The sink is down: the pack closes, nothing is lost, errors are counted.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = stats.snapshot();
    assert!(
        s.sink_errors > 0 && s.packs_closed == 1 && s.packs_uploaded == 0,
        "{s:?}"
    );

    let sink: Shared = Arc::new(Mutex::new((Server::new(ServerConfig::default()), MemSink::default())));
    serve(sink_port, sink.clone()).await?;
    cloudack(&mut dev, 1).await?;
    {
        let g = sink.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        assert_eq!(g.1.changes, vec![c1.clone()]);
        assert!(chunks.iter().all(|c| g.1.chunks.contains(&c.id)));
    }
    let s = stats.snapshot();
    assert_eq!((s.packs_uploaded, s.cloud_acked_changes), (1, 1), "{s:?}");
    // Uploaded packs are deleted; only the (empty) open pack is left.
    let files: Vec<String> = std::fs::read_dir(data.path().join("packs"))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string()))
        .collect();
    assert!(files.len() == 1 && files[0].starts_with("open-"), "{files:?}");

    // A second device shares a chunk that now lives only in the cloud: it is
    // deduplicated, and only the new chunk is asked for and forwarded.
    let d2 = DeviceRef::new("acme", "plant-1", "gw-2")?;
    let mut dev2 = Device::connect(broker, d2.clone()).await?;
    dev2.hello().await?;
    let fresh = chunk(99, 5_000);
    let c2 = file_change(&k, &d2, 1, &[chunks[0].clone(), fresh.clone()]);
    let p = prepare(&mut dev2, 1, vec![c2.clone()]).await?;
    assert_eq!(p.missing, vec![fresh.id]);
    dev2.send(&Message::Data(Data {
        batch_id: 1,
        chunks: vec![fresh],
    }))
    .await?;
    assert_eq!(commit(&mut dev2, 1).await?.results[0].status, Status::Applied);
    cloudack(&mut dev2, 1).await?;
    assert_eq!(sink.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.1.changes.len(), 2);

    // Cloud knowledge is persisted and handed out on Hello, also after a restart.
    agg.stop().await?;
    let agg = start_agg(broker, sink_port, data.path(), Arc::new(AggStats::default()));
    let hello = dev.hello().await?;
    assert!(hello.cloud.contains(&replica(&d1), 1));
    assert!(hello.regional.contains(&replica(&d1), 1));
    agg.stop().await?;
    Ok(())
}
