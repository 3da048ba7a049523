//! `POST /v1/presence` and `GET /v1/fleet`: presence merges by observation
//! time, replays change nothing, bad bodies get a 4xx and store nothing,
//! presence survives a restart, each sink process names its own presence
//! view, and the fleet view joins catalog counts.

mod common;

use anyhow::{ensure, Result};
use cloud_sink::fleet::{PresenceInfo, PresenceUpdate};
use common::*;

fn upd(device: &str, state: &str, observed_ms: u64, last_seen_ms: u64) -> PresenceUpdate {
    PresenceUpdate {
        tenant: "acme".into(),
        site: "plant-1".into(),
        device: device.into(),
        last_seen_ms,
        presence: Some(PresenceInfo {
            state: state.into(),
            version: Some("0.1.0".into()),
            epoch: Some(42),
            backlog_bytes: Some(1000),
            backlog_changes: Some(3),
            oldest_unsynced_age_secs: Some(7),
            ts_ms: Some(1),
            disk: Some(serde_json::json!({"free_bytes": 123})),
            observed_ms,
        }),
        aggregator: Some("agg-a".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_fleet() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sink = Sink::start(dir.path()).await?;
    let now = cloud_sink::now_ms();

    let ack = sink
        .client
        .post_presence(&[
            upd("gw-1", "online", now - 5000, now - 5000),
            upd("gw-2", "online", now, now),
        ])
        .await?;
    ensure!(ack.applied == 2, "{ack:?}");
    // The presence view names this sink process: the same in every answer
    // (an empty post asks for it), another one after a restart.
    let view = ack.view.clone();
    ensure!(view.len() == 32, "{ack:?}");
    let probe = sink.client.post_presence(&[]).await?;
    ensure!(
        probe.view == view && probe.applied == 0 && probe.unchanged == 0,
        "{probe:?}"
    );
    // Replays change nothing; an older observation loses to a newer one.
    let ack = sink
        .client
        .post_presence(&[upd("gw-1", "online", now - 5000, now - 5000)])
        .await?;
    ensure!(ack.applied == 0 && ack.unchanged == 1, "{ack:?}");
    ensure!(ack.view == view, "{ack:?}");
    sink.client
        .post_presence(&[upd("gw-1", "offline", now - 1000, 0)])
        .await?;
    let ack = sink
        .client
        .post_presence(&[upd("gw-1", "online", now - 3000, now - 3000)])
        .await?;
    ensure!(ack.applied == 1, "last_seen still grows: {ack:?}");

    let rows = sink.client.fleet().await?;
    ensure!(rows.len() == 2, "{rows:?}");
    let g1 = &rows[0];
    ensure!(g1.device == "gw-1" && g1.state == "offline" && !g1.online, "{g1:?}");
    ensure!(g1.last_seen_ms == Some(now - 3000), "{g1:?}");
    ensure!(
        g1.backlog_changes == Some(3) && g1.backlog_bytes == Some(1000),
        "{g1:?}"
    );
    ensure!(g1.oldest_unsynced_age_secs.is_some_and(|a| a >= 7), "{g1:?}");
    ensure!(g1.epoch == Some(42) && g1.conflict_count == 0, "{g1:?}");
    ensure!(g1.disk == Some(serde_json::json!({"free_bytes": 123})), "{g1:?}");
    ensure!(g1.last_seen.as_deref().is_some_and(|s| s.ends_with('Z')), "{g1:?}");
    ensure!(rows[1].online, "{:?}", rows[1]);

    // Bad bodies: 4xx with a plain-text reason, nothing stored.
    let http = reqwest::Client::new();
    let url = format!("{}/v1/presence", sink.url);
    let bodies: Vec<(Vec<u8>, u16)> = vec![
        (b"not json".to_vec(), 400),
        (b"{\"tenant\":\"acme\"}".to_vec(), 400),
        (b"[{\"tenant\":\"acme\",\"site\":\"plant-1\",\"device\":\"Evil/../x\"}]".to_vec(), 400),
        (
            b"[{\"tenant\":\"acme\",\"site\":\"plant-1\",\"device\":\"gw-9\",\"presence\":{\"state\":\"zombie\",\"observed_ms\":1}}]"
                .to_vec(),
            400,
        ),
    ];
    for (b, want) in bodies {
        let r = http.post(&url).body(b).send().await?;
        let got = r.status().as_u16();
        let text = r.text().await?;
        ensure!(got == want, "status {got}, want {want}: {text}");
        ensure!(!text.trim().is_empty(), "no reason");
    }
    // Oversized, announced: refused before the body is sent.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = tokio::net::TcpStream::connect(sink.addr).await?;
        let req = format!(
            "POST /v1/presence HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            (5 << 20) + 1
        );
        c.write_all(req.as_bytes()).await?;
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), c.read(&mut buf)).await??;
        let head = String::from_utf8_lossy(&buf[..n]).to_string();
        ensure!(head.starts_with("HTTP/1.1 413"), "{head}");
    }
    let r = http.get(format!("{}/v1/fleet", sink.url)).send().await?;
    ensure!(r.status().as_u16() == 200);
    ensure!(sink.client.fleet().await?.len() == 2, "bad bodies stored nothing");

    // Presence is kept across a restart (it is in the catalog).
    sink.stop().await?;
    let sink = Sink::start(dir.path()).await?;
    let rows = sink.client.fleet().await?;
    ensure!(rows.len() == 2 && rows[0].state == "offline", "{rows:?}");
    let after = sink.client.post_presence(&[]).await?;
    ensure!(
        after.view.len() == 32 && after.view != view,
        "a restarted sink names a new view: {after:?}"
    );
    sink.stop().await?;
    Ok(())
}
