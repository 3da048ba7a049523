//! The aggregator's MQTT path against the embedded broker (rumqttd), with a
//! raw rumqttc v5 client playing the device. The sink URL points at a closed
//! port: forwarding retries in the background and must not disturb anything.

mod common;

use aggregator::AggStats;
use anyhow::{bail, Result};
use common::*;
use protocol::msg::*;
use protocol::DeviceRef;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sync_bad_input_and_restart_with_rumqttd() -> Result<()> {
    scenario(start_broker()?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sync_bad_input_and_restart_with_mosquitto() -> Result<()> {
    let Some(m) = start_mosquitto()? else {
        eprintln!("mosquitto is not installed: skipped");
        return Ok(());
    };
    scenario(m.port).await
}

async fn scenario(broker: u16) -> Result<()> {
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
    // Drop it like a crash: the task is aborted, nothing is closed.
    agg.task.abort();
    let _ = agg.task.await;

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
