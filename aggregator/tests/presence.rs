//! Presence over a real broker (rumqttd, and Mosquitto when installed):
//! malformed and oversized payloads on presence topics are ignored and
//! counted and the aggregator keeps serving; valid presence (retained, so it
//! also arrives from before the aggregator subscribed) and last-seen reach a
//! fake sink's `POST /v1/presence`, keyed by the topic's device.

mod common;

use aggregator::AggStats;
use anyhow::{ensure, Context, Result};
use common::*;
use protocol::{topic, DeviceRef};
use rumqttc::v5::mqttbytes::QoS;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn presence_with_rumqttd() -> Result<()> {
    scenario(start_broker()?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn presence_with_mosquitto() -> Result<()> {
    let Some(m) = start_mosquitto()? else {
        eprintln!("mosquitto is not installed: skipped");
        return Ok(());
    };
    scenario(m.port).await
}

/// A sink that records `POST /v1/presence` bodies and answers everything
/// else 503. Its presence answers name no view (a sink older than views).
async fn fake_sink() -> Result<(u16, Arc<Mutex<Vec<serde_json::Value>>>)> {
    fake_sink_with_view(Arc::new(Mutex::new(String::new()))).await
}

/// [`fake_sink`] whose presence answers name `view` when it is not empty.
async fn fake_sink_with_view(view: Arc<Mutex<String>>) -> Result<(u16, Arc<Mutex<Vec<serde_json::Value>>>)> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = l.local_addr()?.port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let g = g.clone();
            let view = view.lock().map(|v| v.clone()).unwrap_or_default();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = vec![0u8; 64 << 10];
                let (head, body) = loop {
                    let Ok(n) = s.read(&mut tmp).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break (head, buf[end + 4..end + 4 + len].to_vec());
                    }
                };
                let answer = if head.starts_with("post /v1/presence ") {
                    if let Ok(serde_json::Value::Array(v)) = serde_json::from_slice(&body) {
                        if let Ok(mut g) = g.lock() {
                            g.extend(v);
                        }
                    }
                    let json = if view.is_empty() {
                        "{}".to_string()
                    } else {
                        format!(r#"{{"applied":0,"unchanged":0,"view":"{view}"}}"#)
                    };
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{json}",
                        json.len()
                    )
                } else {
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 5\r\nconnection: close\r\n\r\naway\n"
                        .to_string()
                };
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    Ok((port, got))
}

async fn scenario(broker: u16) -> Result<()> {
    let (sink, posted) = fake_sink().await?;
    let d = DeviceRef::new("acme", "plant-1", "gw-1")?;
    let mut dev = Device::connect(broker, d.clone()).await?;
    // Retained before the aggregator runs: it must still learn it.
    dev.client
        .publish(
            topic::presence(&d),
            QoS::AtLeastOnce,
            true,
            br#"{"state":"online","version":"9.9.9","epoch":5,"backlog_bytes":0,"backlog_changes":0,"device":"not-me","ts_ms":1}"#.to_vec(),
        )
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let data = tempfile::tempdir()?;
    let stats = Arc::new(AggStats::default());
    let agg = start_agg(broker, sink, data.path(), stats.clone());
    dev.hello().await?;

    // Garbage, wrong types, unknown states, oversized, deeply nested; some retained.
    let oversized = vec![b'{'; 1 << 20];
    let bad: Vec<Vec<u8>> = vec![
        b"\xff\xfe\x00".to_vec(),
        b"{\"state\":\"online\"".to_vec(),
        b"{\"state\":\"asleep\"}".to_vec(),
        b"{\"state\":\"online\",\"epoch\":\"x\"}".to_vec(),
        b"[1,2,3]".to_vec(),
        format!("{}1{}", "[".repeat(5000), "]".repeat(5000)).into_bytes(),
        oversized,
    ];
    let n_bad = bad.len() as u64;
    for (i, b) in bad.into_iter().enumerate() {
        dev.client
            .publish(topic::presence(&d), QoS::AtLeastOnce, i % 2 == 0, b)
            .await?;
    }
    // Presence on a topic with invalid ids is ignored (the topic does not parse).
    dev.client
        .publish(
            "ferry/v1/ACME/plant-1/gw-1/presence",
            QoS::AtLeastOnce,
            false,
            b"{}".to_vec(),
        )
        .await?;
    let t0 = std::time::Instant::now();
    while stats.snapshot().presence_bad < n_bad && t0.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = stats.snapshot();
    ensure!(s.presence_bad == n_bad, "bad presence counted: {s:?}");
    // The aggregator is alive and serving.
    dev.hello()
        .await
        .context("aggregator still answers after bad presence")?;

    // The last valid presence we send wins; offline does not move last_seen.
    dev.client
        .publish(
            topic::presence(&d),
            QoS::AtLeastOnce,
            true,
            br#"{"state":"offline","version":"9.9.9","epoch":5,"ts_ms":1}"#.to_vec(),
        )
        .await?;
    let found = |want: &str| -> Option<serde_json::Value> {
        let g = posted.lock().ok()?;
        g.iter()
            .rev()
            .find(|u| u["device"] == "gw-1" && u["presence"]["state"] == want)
            .cloned()
    };
    let t0 = std::time::Instant::now();
    while found("offline").is_none() && t0.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let online = found("online").context("online presence (retained before start) forwarded")?;
    let offline = found("offline").context("offline presence forwarded")?;
    ensure!(online["tenant"] == "acme" && online["site"] == "plant-1", "{online}");
    ensure!(
        online["presence"]["version"] == "9.9.9" && online["presence"]["epoch"] == 5,
        "{online}"
    );
    ensure!(online["aggregator"] == "test", "{online}");
    ensure!(
        offline["last_seen_ms"].as_u64() > Some(0),
        "hello counted as seen: {offline}"
    );
    ensure!(
        offline["presence"]["observed_ms"].as_u64() >= online["presence"]["observed_ms"].as_u64(),
        "{online} {offline}"
    );
    ensure!(
        posted
            .lock()
            .map(|g| g.iter().all(|u| u["device"] == "gw-1"))
            .unwrap_or(false),
        "only the topic's device is reported"
    );
    let s = stats.snapshot();
    ensure!(s.presence_forwarded >= 2, "{s:?}");
    // Clean the retained messages so a shared broker is not polluted.
    dev.client
        .publish(topic::presence(&d), QoS::AtLeastOnce, true, Vec::new())
        .await?;
    agg.stop().await?;
    Ok(())
}

/// A device connected to `broker` whose retained presence says `online`.
async fn retained_online(broker: u16, name: &str) -> Result<(DeviceRef, Device)> {
    let d = DeviceRef::new("acme", "plant-1", name)?;
    let dev = Device::connect(broker, d.clone()).await?;
    dev.client
        .publish(
            topic::presence(&d),
            QoS::AtLeastOnce,
            true,
            br#"{"state":"online","epoch":1,"ts_ms":1}"#.to_vec(),
        )
        .await?;
    Ok((d, dev))
}

/// Entries for device `name` the fake sink received so far.
fn posts_of(posted: &Mutex<Vec<serde_json::Value>>, name: &str) -> usize {
    posted
        .lock()
        .map(|g| g.iter().filter(|u| u["device"] == name).count())
        .unwrap_or(0)
}

/// Waits until `f` holds, at most `limit`.
async fn wait_until(what: &str, limit: Duration, f: impl Fn() -> bool) -> Result<()> {
    let t0 = std::time::Instant::now();
    while !f() {
        ensure!(t0.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A sink answering another presence view than before (it restarted and may
/// have lost presence) is sent every device's presence again, including
/// devices that stayed quiet; while the view stays the same, nothing already
/// sent is sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sink_with_a_new_view_is_sent_all_presence_again() -> Result<()> {
    let broker = start_broker()?;
    let view = Arc::new(Mutex::new("v1".to_string()));
    let (sink, posted) = fake_sink_with_view(view.clone()).await?;
    let (quiet, q) = retained_online(broker, "gw-quiet").await?;
    let mut b = Device::connect(broker, DeviceRef::new("acme", "plant-1", "gw-busy")?).await?;
    let data = tempfile::tempdir()?;
    let stats = Arc::new(AggStats::default());
    let agg = start_agg(broker, sink, data.path(), stats.clone());
    let posts = |name: &str| posts_of(&posted, name);
    let limit = Duration::from_secs(20);
    b.hello().await?;
    wait_until("both devices forwarded", limit, || {
        posts("gw-quiet") >= 1 && posts("gw-busy") >= 1
    })
    .await?;
    // Same view: the busy device's next sign of life is sent, the quiet one is not.
    tokio::time::sleep(Duration::from_millis(aggregator::presence::LAST_SEEN_STEP_MS + 200)).await;
    let (quiet_before, busy_before) = (posts("gw-quiet"), posts("gw-busy"));
    b.hello().await?;
    wait_until("the busy device's last-seen", limit, || posts("gw-busy") > busy_before).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ensure!(
        posts("gw-quiet") == quiet_before,
        "quiet device re-sent while the view stayed"
    );
    ensure!(stats.snapshot().presence_resends == 0);
    // The sink restarts: its next answer names a new view.
    *view.lock().map_err(|_| anyhow::anyhow!("lock"))? = "v2".into();
    tokio::time::sleep(Duration::from_millis(aggregator::presence::LAST_SEEN_STEP_MS + 200)).await;
    b.hello().await?;
    wait_until("the quiet device re-sent", limit, || posts("gw-quiet") > quiet_before).await?;
    ensure!(stats.snapshot().presence_resends == 1, "{:?}", stats.snapshot());
    q.client
        .publish(topic::presence(&quiet), QoS::AtLeastOnce, true, Vec::new())
        .await?;
    agg.stop().await?;
    Ok(())
}

/// With no device traffic at all, the aggregator still posts (an empty
/// probe) every `presence_refresh`: while the sink's view stays the same it
/// re-sends nothing; once the sink restarted (a new view), the probe's
/// answer makes it re-send every device.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn probes_find_a_restarted_sink_without_device_traffic() -> Result<()> {
    let broker = start_broker()?;
    let view = Arc::new(Mutex::new("v1".to_string()));
    let (sink, posted) = fake_sink_with_view(view.clone()).await?;
    let (quiet, q) = retained_online(broker, "gw-probe").await?;
    let data = tempfile::tempdir()?;
    let stats = Arc::new(AggStats::default());
    let agg = start_agg_with(broker, sink, data.path(), stats.clone(), |c| {
        c.presence_refresh = Duration::from_secs(2);
    });
    let posts = || posts_of(&posted, "gw-probe");
    wait_until("presence forwarded", Duration::from_secs(20), || posts() > 0).await?;
    // Three refresh periods with the same view: probes only.
    tokio::time::sleep(Duration::from_secs(7)).await;
    ensure!(posts() == 1, "re-sent while the sink's view stayed: {}", posts());
    *view.lock().map_err(|_| anyhow::anyhow!("lock"))? = "v2".into();
    wait_until("a probe to find the restarted sink", Duration::from_secs(10), || {
        posts() >= 2
    })
    .await
    .with_context(|| format!("{:?}", stats.snapshot()))?;
    ensure!(stats.snapshot().presence_resends == 1, "{:?}", stats.snapshot());
    q.client
        .publish(topic::presence(&quiet), QoS::AtLeastOnce, true, Vec::new())
        .await?;
    agg.stop().await?;
    Ok(())
}
