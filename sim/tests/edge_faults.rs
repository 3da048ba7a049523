//! Edge side of intermittent links (issue 3), with real processes: the
//! agent ↔ broker link cut, stalled, throttled and flapping in the middle
//! of batches; the agent's state file deleted or rolled back to an old
//! copy; versions whose file mtimes go backwards. After each: `sync --wait
//! cloud` succeeds, a restore equals the source, every (epoch, seq) is once
//! in the catalog, and the bytes through the proxy stay near the data size.

mod common;

use anyhow::{ensure, Context, Result};
use common::*;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Keepalive the fault tests give the agent: a stall is noticed within
/// 2 × 5 + 1 = 11 s (the default, 15 s, gives 31 s; rumqttc's minimum is 5 s).
const KEEPALIVE: u64 = 5;

type SyncOut = Result<(bool, String, String)>;

/// `edge-agent sync --wait cloud` in the background, with `extra` flags.
fn spawn_sync(f: &Fleet, dev: &str, timeout_secs: u64, extra: &[&str]) -> JoinHandle<SyncOut> {
    let mut args = vec!["sync".to_string()];
    args.extend(f.agent_args(dev));
    args.extend(
        [
            "--wait",
            "cloud",
            "--timeout",
            &timeout_secs.to_string(),
            "--json",
            "--scan-interval",
            "1",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    std::thread::spawn(move || sim::procs::run_to_end("edge-agent", &args, secs(timeout_secs + 20)))
}

/// Waits for a background sync and returns its JSON report.
fn join_sync(f: &Fleet, h: JoinHandle<SyncOut>) -> Result<serde_json::Value> {
    let (ok, out, err) = h.join().map_err(|_| anyhow::anyhow!("sync thread panicked"))??;
    ensure!(
        ok,
        "edge-agent sync failed:\n{}\n--- aggregator log tail:\n{}",
        tail(&err, 40),
        tail(&f.agg.log_text(), 30)
    );
    serde_json::from_str(&out).with_context(|| format!("sync report: {out}"))
}

fn sync_now(f: &Fleet, dev: &str) -> Result<serde_json::Value> {
    join_sync(f, spawn_sync(f, dev, 60, &["--keepalive", &KEEPALIVE.to_string()]))
}

/// Every (epoch, seq) appears once in the catalog; returns all versions.
fn versions(f: &Fleet, dev: &str) -> Result<Vec<serde_json::Value>> {
    f.versions_once(dev)
}

/// Writes `n` incompressible files of `size` bytes; returns their total.
fn noise_files(dir: &Path, n: usize, size: usize, seed: u64) -> Result<u64> {
    std::fs::create_dir_all(dir)?;
    for i in 0..n {
        std::fs::write(dir.join(format!("frame_{i:03}.raw")), noise(size, seed + i as u64))?;
    }
    Ok((n * size) as u64)
}

/// The checks after every fault; returns bytes through the proxy / data.
fn check_after(f: &Fleet, dev: &str, data: u64, what: &str) -> Result<f64> {
    f.assert_restore_equal(dev)?;
    let rows = versions(f, dev)?;
    ensure!(!rows.is_empty(), "{what}: empty catalog");
    let again = sync_now(f, dev)?;
    ensure!(u(&again, "chunks_sent") == 0, "{what}: nothing left to send: {again}");
    let ratio = f.link.up_bytes() as f64 / data as f64;
    eprintln!(
        "{what}: {} bytes agent -> broker for {data} bytes of data ({ratio:.2}x), {} connections, {} versions",
        f.link.up_bytes(),
        f.link.connections(),
        rows.len()
    );
    Ok(ratio)
}

fn wait_up_bytes(f: &Fleet, at_least: u64) -> Result<()> {
    wait_until(secs(30), &format!("{at_least} bytes through the link"), || {
        f.link.up_bytes() >= at_least
    })
}

/// A stall (connection open, nothing forwarded) in the middle of a batch:
/// rumqttc is stuck writing a publish and never pings, so only the agent's
/// liveness watchdog notices; it must redial within 2 × keepalive + 1 s
/// and the sync must finish once the link is back.
fn stall_mid_batch(mosquitto: bool) -> Result<()> {
    let f = Fleet::start(mosquitto)?;
    let dev = "gw-stall";
    let data = noise_files(&f.archive(dev).join("camera"), 6, 1536 << 10, 10)?;
    f.link.set_rate(3 << 20);
    let h = spawn_sync(&f, dev, 90, &["--keepalive", &KEEPALIVE.to_string()]);
    wait_up_bytes(&f, 2 << 20)?;
    let conns = f.link.connections();
    f.link.stall();
    let t = Instant::now();
    // Detected when the agent dials again (the new connection is accepted,
    // then stalls in its turn).
    let limit = Duration::from_secs(2 * KEEPALIVE + 1) + Duration::from_secs(4);
    wait_until(limit + secs(5), "the agent to redial a stalled link", || {
        f.link.connections() > conns
    })?;
    let detect = t.elapsed();
    f.link.heal();
    f.link.set_rate(0);
    eprintln!(
        "stall noticed after {:.1} s (keepalive {KEEPALIVE} s)",
        detect.as_secs_f64()
    );
    ensure!(detect <= limit, "stall noticed only after {detect:?}");
    join_sync(&f, h)?;
    // Which of the two noticed it: rumqttc's unanswered ping (the link was
    // idle between packets), or the agent's watchdog (stuck mid-write, when
    // the socket buffers are full; loopback buffers usually absorb the
    // 8 × 512 KiB rumqttc keeps in flight, so it is usually the ping).
    let st = f.status(dev)?;
    eprintln!(
        "stall: watchdog redials {}",
        st["counters"]["link_stalls"].as_u64().unwrap_or(0)
    );
    let ratio = check_after(&f, dev, data, "stall")?;
    ensure!(ratio < 1.6, "stall: re-sent too much ({ratio:.2}x)");
    Ok(())
}

#[test]
fn stall_mid_batch_is_noticed_and_sync_resumes_mosquitto() -> Result<()> {
    stall_mid_batch(true)
}

#[test]
fn stall_mid_batch_is_noticed_and_sync_resumes_embedded_broker() -> Result<()> {
    stall_mid_batch(false)
}

/// Cut for 3 s mid-batch, then throttled to 256 KiB/s for 3 s mid-batch.
#[test]
fn cut_and_throttle_mid_batch() -> Result<()> {
    let f = Fleet::start(true)?;
    let dev = "gw-cut";
    let mut data = noise_files(&f.archive(dev).join("camera"), 6, 1536 << 10, 20)?;
    let csv = b"ts,temp\n1,20.5\n2,20.6\n".repeat(2000);
    data += csv.len() as u64;
    std::fs::write(f.archive(dev).join("line1.csv"), csv)?;
    f.link.set_rate(3 << 20);
    let h = spawn_sync(&f, dev, 90, &["--keepalive", &KEEPALIVE.to_string()]);
    wait_up_bytes(&f, 2 << 20)?;
    f.link.cut();
    std::thread::sleep(secs(3)); // the outage
    f.link.heal();
    wait_up_bytes(&f, 5 << 20)?;
    f.link.set_rate(256 << 10);
    std::thread::sleep(secs(3)); // the slow stretch
    f.link.set_rate(0);
    join_sync(&f, h)?;
    let ratio = check_after(&f, dev, data, "cut + throttle")?;
    ensure!(ratio < 1.6, "cut + throttle: re-sent too much ({ratio:.2}x)");
    Ok(())
}

/// The link drops every 1–3 s for ~15 s while ~10 MiB move.
#[test]
fn flapping_link_while_10_mib_move() -> Result<()> {
    let f = Fleet::start(true)?;
    let dev = "gw-flap";
    let data = noise_files(&f.archive(dev).join("camera"), 7, 1536 << 10, 30)?;
    // 1 MiB/s: the transfer outlasts the flapping.
    f.link.set_rate(1 << 20);
    let h = spawn_sync(&f, dev, 120, &["--keepalive", &KEEPALIVE.to_string()]);
    wait_up_bytes(&f, 256 << 10)?;
    let t = Instant::now();
    let gaps_ms = [1200u64, 2500, 1700, 3000, 1000, 2200, 1500, 2800];
    let mut flaps = 0;
    for (i, g) in gaps_ms.iter().cycle().enumerate() {
        if t.elapsed() >= secs(15) {
            break;
        }
        std::thread::sleep(Duration::from_millis(*g));
        if i % 2 == 0 {
            f.link.reset(); // connections dropped, redial works at once
        } else {
            f.link.cut(); // down for a moment
            std::thread::sleep(Duration::from_millis(400));
            f.link.heal();
        }
        flaps += 1;
    }
    let during = f.link.up_bytes();
    f.link.set_rate(0);
    join_sync(&f, h)?;
    eprintln!("flapping: {flaps} drops in 15 s; {during} bytes moved meanwhile");
    let ratio = check_after(&f, dev, data, "flapping")?;
    ensure!(ratio < 1.8, "flapping: re-sent too much ({ratio:.2}x)");
    Ok(())
}

/// The state file deleted: the device keeps its key (the sink pinned it),
/// starts a new epoch, re-offers everything, and dedup keeps re-sent chunk
/// bytes near zero. Then restored from an old copy after more changes
/// synced: the server knows seqs the copy never sent → new epoch, files
/// changed and deleted meanwhile are right, nothing in the cloud is
/// overwritten and old versions stay restorable with `--at`.
#[test]
fn state_deleted_then_restored_from_an_old_copy() -> Result<()> {
    let f = Fleet::start(false)?;
    let dev = "gw-state";
    let arch = f.archive(dev);
    let mut data = noise_files(&arch.join("camera"), 4, 1 << 20, 40)?;
    let csv = b"ts,temp\n1,20.5\n".repeat(4000);
    data += csv.len() as u64;
    std::fs::write(arch.join("line1.csv"), &csv)?;
    sync_now(&f, dev)?;
    let epoch1 = u(&f.status(dev)?, "epoch");
    let state = f.state(dev);

    // 1. State file deleted.
    std::fs::remove_file(&state)?;
    let _ = std::fs::remove_file(sim_snapshot(&state));
    let before = f.link.up_bytes();
    let r = sync_now(&f, dev)?;
    let resent = f.link.up_bytes() - before;
    let st = f.status(dev)?;
    let epoch2 = u(&st, "epoch");
    ensure!(epoch2 != epoch1, "a deleted state starts a new epoch");
    eprintln!(
        "state deleted: {resent} bytes through the link to re-offer {data} bytes ({:.3}x), {} chunk bytes",
        resent as f64 / data as f64,
        u(&r, "chunk_bytes_sent")
    );
    ensure!(
        u(&r, "chunk_bytes_sent") == 0,
        "every chunk is in the region already: {r}"
    );
    ensure!(resent < data / 20, "re-offering after state loss sent {resent} bytes");
    f.assert_restore_equal(dev)?;
    let rows = versions(&f, dev)?;
    ensure!(
        rows.iter().any(|r| u(r, "epoch") == epoch1) && rows.iter().any(|r| u(r, "epoch") == epoch2),
        "both epochs listed"
    );

    // 2. Restored from an old copy.
    let old_copy = f.dir().join("old-state.redb");
    std::fs::copy(&state, &old_copy)?;
    let t_old = max_hlc(&versions(&f, dev)?);
    let frame1 = arch.join("camera").join("frame_001.raw");
    let frame1_v1 = std::fs::read(&frame1)?;
    let mut frame1_v2 = frame1_v1.clone();
    frame1_v2.extend_from_slice(&noise(48 << 10, 77));
    std::fs::write(&frame1, &frame1_v2)?;
    std::fs::write(arch.join("line1.csv"), [&csv[..], b"2,20.7\n"].concat())?;
    std::fs::write(arch.join("notes.txt"), b"shift 2: ok\n")?;
    sync_now(&f, dev)?;
    // Back to the old copy; meanwhile frame 1 changed again and frame 2 was
    // deleted. The old copy records those before it hears from the server.
    std::fs::copy(&old_copy, &state)?;
    let _ = std::fs::remove_file(sim_snapshot(&state));
    let mut frame1_v3 = frame1_v2.clone();
    frame1_v3.extend_from_slice(&noise(16 << 10, 78));
    std::fs::write(&frame1, &frame1_v3)?;
    std::fs::remove_file(arch.join("camera").join("frame_002.raw"))?;
    let before = f.link.up_bytes();
    let r = sync_now(&f, dev)?;
    let resent = f.link.up_bytes() - before;
    let st = f.status(dev)?;
    let epoch3 = u(&st, "epoch");
    eprintln!(
        "state rolled back: new epoch {epoch3}; {resent} bytes through the link ({:.3}x of {data}), {} chunk bytes",
        resent as f64 / data as f64,
        u(&r, "chunk_bytes_sent")
    );
    ensure!(epoch3 != epoch2, "a rolled-back state starts a new epoch: {st}");
    ensure!(st["counters"]["state_rollbacks"].as_u64() == Some(1), "{st}");
    ensure!(resent < data / 10, "re-offering after a rollback sent {resent} bytes");
    f.assert_restore_equal(dev)?;
    let rows = versions(&f, dev)?;
    for e in [epoch1, epoch2, epoch3] {
        ensure!(rows.iter().any(|r| u(r, "epoch") == e), "epoch {e} listed");
    }
    // Nothing overwritten: as of the first epochs, frame 1 is its first
    // version and frame 2 exists.
    let out = f.dir().join("restore-old");
    f.restore(dev, &out, &["--at", &cloud_sink::format_ms(t_old)])?;
    ensure!(std::fs::read(out.join("archive/camera/frame_001.raw"))? == frame1_v1);
    ensure!(out.join("archive/camera/frame_002.raw").exists());
    ensure!(!out.join("archive/notes.txt").exists());
    Ok(())
}

/// Versions whose file mtimes go backwards: the catalog orders by HLC, so
/// the latest version is the last one recorded, and `--at` picks by HLC.
#[test]
fn restore_picks_the_latest_version_by_hlc_when_mtimes_go_backwards() -> Result<()> {
    let f = Fleet::start(false)?;
    let dev = "gw-mtime";
    let arch = f.archive(dev);
    std::fs::create_dir_all(&arch)?;
    let p = arch.join("recipe.json");
    let day = Duration::from_secs(86_400);
    let set_mtime = |t: std::time::SystemTime| -> Result<()> {
        std::fs::OpenOptions::new().write(true).open(&p)?.set_modified(t)?;
        Ok(())
    };
    let now = std::time::SystemTime::now();
    std::fs::write(&p, b"{\"v\":1}")?;
    set_mtime(now - day)?;
    sync_now(&f, dev)?;
    let t1 = max_hlc(&versions(&f, dev)?);
    std::fs::write(&p, b"{\"v\":2, \"older mtime\":true}")?;
    set_mtime(now - 30 * day)?;
    sync_now(&f, dev)?;
    let rows = versions(&f, dev)?;
    ensure!(rows.len() == 2, "two versions: {rows:?}");
    let mut by_hlc = rows.clone();
    by_hlc.sort_by_key(|r| u(r, "hlc_ms"));
    let mtime = |r: &serde_json::Value| r["mtime_ns"].as_i64().unwrap_or(0);
    ensure!(
        mtime(&by_hlc[1]) < mtime(&by_hlc[0]),
        "the later version has the older mtime"
    );
    f.assert_restore_equal(dev)?;
    let out = f.dir().join("restore-t1");
    f.restore(dev, &out, &["--at", &cloud_sink::format_ms(t1)])?;
    ensure!(std::fs::read(out.join("archive/recipe.json"))? == b"{\"v\":1}");
    Ok(())
}

fn max_hlc(rows: &[serde_json::Value]) -> u64 {
    rows.iter().map(|r| u(r, "hlc_ms")).max().unwrap_or(0)
}

fn sim_snapshot(state: &Path) -> std::path::PathBuf {
    edge_agent::snapshot_path(state)
}
