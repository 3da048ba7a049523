//! Fleet health with real processes over Mosquitto: two agents run as
//! daemons; `cloud-sink fleet --json` shows both online, recently seen, with
//! an empty backlog after sync; an agent SIGKILLed gets its last will
//! published by the broker (its socket closed) and shows offline within a
//! bounded wait; an agent frozen with SIGSTOP (a hung gateway: the socket
//! stays open, no pings) shows offline once the broker's keepalive check
//! (1.5 × `--keepalive 5`) fires its will.

mod common;

use anyhow::{ensure, Context, Result};
use common::*;
use std::time::{Duration, Instant};

fn row<'a>(rows: &'a [serde_json::Value], device: &str) -> Option<&'a serde_json::Value> {
    rows.iter().find(|r| r["device"] == device)
}

/// Polls `cloud-sink fleet --json` until `ok` holds for every row of
/// `devices`; returns the rows and how long it took.
fn wait_fleet(
    f: &Fleet,
    devices: &[&str],
    timeout: Duration,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> Result<(Vec<serde_json::Value>, Duration)> {
    let t0 = Instant::now();
    let mut last = Vec::new();
    while t0.elapsed() < timeout {
        last = f.fleet_json()?;
        if devices.iter().all(|d| row(&last, d).is_some_and(&ok)) {
            return Ok((last, t0.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    anyhow::bail!(
        "timed out after {timeout:?} waiting for {what}; fleet: {}\n--- aggregator log tail:\n{}",
        serde_json::to_string_pretty(&last).unwrap_or_default(),
        tail(&f.agg.log_text(), 30)
    )
}

#[test]
fn fleet_shows_presence_and_last_will() -> Result<()> {
    let f = Fleet::start(true)?;
    let (a, b) = ("gw-a", "gw-b");
    for (i, d) in [a, b].iter().enumerate() {
        let dir = f.archive(d).join("logs");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("line.csv"), noise(300_000, i as u64 + 1))?;
        std::fs::write(dir.join("cell.bin"), noise(100_000, i as u64 + 10))?;
    }
    // Sync to the cloud first: the agent computes presence at connect, so
    // daemons started now report an empty backlog.
    for d in [a, b] {
        f.sync(d, 60)?;
    }
    let mut agent_a = f.run_agent_with(a, &["--keepalive", "5"])?;
    let mut agent_b = f.run_agent_with(b, &["--keepalive", "5"])?;

    let (rows, took) = wait_fleet(&f, &[a, b], secs(20), "both agents online", |r| {
        r["state"] == "online" && r["online"] == true && r["backlog_changes"] == 0
    })?;
    eprintln!("both online in the fleet view {took:?} after the daemons started");
    let now = cloud_sink::now_ms();
    for d in [a, b] {
        let r = row(&rows, d).context("row")?;
        ensure!(r["tenant"] == "acme" && r["site"] == "plant-1", "{r}");
        let seen = u(r, "last_seen_ms");
        ensure!(
            now.saturating_sub(seen) < 30_000,
            "{d} last seen {} ms ago: {r}",
            now - seen
        );
        ensure!(r["last_seen"].as_str().is_some_and(|s| s.ends_with('Z')), "{r}");
        ensure!(
            u(r, "backlog_bytes") == 0 && r["oldest_unsynced_age_secs"].is_null(),
            "{r}"
        );
        ensure!(u(r, "changes") == 2 && u(r, "files") == 2, "{r}");
        ensure!(u(r, "logical_bytes") == 400_000, "{r}");
        ensure!(u(r, "conflict_count") == 0, "{r}");
        let epoch = u(r, "epoch");
        ensure!(
            r["epochs"]
                .as_array()
                .is_some_and(|e| e.iter().any(|x| x.as_u64() == Some(epoch))),
            "the presence epoch is one the catalog holds: {r}"
        );
        ensure!(r["agent_version"].as_str().is_some_and(|v| !v.is_empty()), "{r}");
    }
    let table = f.fleet_table(&[])?;
    ensure!(
        table.contains("acme/plant-1/gw-a") && !table.contains("OFFLINE"),
        "{table}"
    );

    // SIGKILL b: no clean offline; the broker publishes its last will.
    let killed = Instant::now();
    agent_b.kill();
    let (rows, _) = wait_fleet(&f, &[b], secs(30), "the killed agent offline", |r| {
        r["state"] == "offline"
    })?;
    let took = killed.elapsed();
    eprintln!("SIGKILLed agent shown offline after {took:?}");
    let rb = row(&rows, b).context("row b")?;
    ensure!(rb["online"] == false, "{rb}");
    ensure!(rb["last_seen_ms"].is_u64(), "last_seen kept: {rb}");
    let ra = row(&rows, a).context("row a")?;
    ensure!(ra["state"] == "online", "the other agent stays online: {ra}");
    let table = f.fleet_table(&[])?;
    let line = table.lines().find(|l| l.contains("gw-b")).context("gw-b in table")?;
    ensure!(line.starts_with('!') && line.contains("OFFLINE"), "{table}");
    let line = table.lines().find(|l| l.contains("gw-a")).context("gw-a in table")?;
    ensure!(!line.starts_with('!'), "{table}");

    // SIGSTOP a: the connection stays open but silent; Mosquitto gives up
    // after 1.5 × keepalive (7.5 s) and publishes the will.
    let pid = agent_a.pid().context("pid of a")?;
    let stopped = Instant::now();
    let st = std::process::Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()?;
    ensure!(st.success(), "kill -STOP failed");
    let res = wait_fleet(&f, &[a], secs(25), "the frozen agent offline", |r| {
        r["state"] == "offline"
    });
    let took = stopped.elapsed();
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &pid.to_string()])
        .status();
    agent_a.kill();
    res?;
    eprintln!("SIGSTOPped agent (keepalive 5 s) shown offline after {took:?}");
    ensure!(
        took >= Duration::from_secs(5),
        "offline before the keepalive could expire: {took:?}"
    );
    Ok(())
}

/// Presence follows the backlog while the agent stays connected: with the
/// aggregator down, a new file raises the backlog the fleet view shows (once
/// the aggregator is back and relays the retained presence), and after the
/// sync it falls back to 0 without any reconnect of the agent.
#[test]
fn presence_follows_the_backlog_without_reconnecting() -> Result<()> {
    let mut f = Fleet::start(true)?;
    let d = "gw-live";
    std::fs::create_dir_all(f.archive(d))?;
    std::fs::write(f.archive(d).join("first.bin"), noise(50_000, 77))?;
    f.sync(d, 60)?;
    let mut agent = f.run_agent_with(d, &["--keepalive", "5"])?;
    wait_fleet(&f, &[d], Duration::from_secs(20), "online, empty backlog", |r| {
        r["online"] == true && r["backlog_changes"] == 0
    })?;
    f.agg.kill();
    let written_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    std::fs::write(f.archive(d).join("second.bin"), noise(50_000, 78))?;
    // The agent scans every second and re-publishes presence within
    // PERSIST_EVERY + PRESENCE_MIN (15 s) of the change.
    std::thread::sleep(Duration::from_secs(16));
    f.agg.restart()?;
    let (_, t) = wait_fleet(
        &f,
        &[d],
        Duration::from_secs(30),
        "backlog 0 again after the sync",
        |r| {
            // A presence published after the file was written, by the same
            // connection: without re-publishing, presence would still be the
            // one from connect time.
            r["backlog_changes"] == 0
                && r["changes"].as_u64().is_some_and(|c| c >= 2)
                && r["presence_ts_ms"].as_u64().is_some_and(|ts| ts > written_ms)
        },
    )?;
    eprintln!("presence showed the drained backlog {t:?} after the aggregator came back");
    ensure!(agent.alive(), "agent died");
    agent.kill();
    Ok(())
}
