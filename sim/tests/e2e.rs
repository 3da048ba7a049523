//! End to end with real processes: `edge-agent`, `aggregator` and
//! `cloud-sink` binaries over a real broker (Mosquitto from Debian's
//! packages, and the embedded rumqttd), everything on 127.0.0.1.

mod common;

use anyhow::Result;
use common::*;
use sim::gen::{self, GenConfig};
use std::time::Duration;

const SEED: u64 = 7;
const SCALE: f64 = 0.12;

fn gen_fleet(f: &Fleet, n: usize) -> Result<Vec<(String, GenConfig)>> {
    let mut out = Vec::new();
    for i in 0..n {
        let g = GenConfig::new(SEED, SCALE, i, n);
        let dev = g.device_id();
        gen::generate_initial(&f.archive(&dev), &g)?;
        out.push((dev, g));
    }
    Ok(out)
}

#[test]
fn mosquitto_fleet_syncs_changes_dedups_and_restores() -> Result<()> {
    let f = Fleet::start(true)?;
    let fleet = gen_fleet(&f, 2)?;
    let (a, b) = (&fleet[0].0, &fleet[1].0);

    // Initial sync of both gateways to cloud-durable.
    let ra = f.sync(a, 120)?;
    let rb = f.sync(b, 120)?;
    assert!(u(&ra, "chunks_sent") > 0 && u(&rb, "chunks_sent") > 0);
    f.assert_restore_equal(a)?;

    // Cross-device dedup: the same new 2 MiB blob on both gateways is sent once.
    let blob = noise(2 << 20, 99);
    for d in [a, b] {
        let p = f.archive(d).join("camera").join("shared_blob.raw");
        std::fs::create_dir_all(p.parent().expect("parent"))?;
        std::fs::write(p, &blob)?;
    }
    let ra = f.sync(a, 120)?;
    let rb = f.sync(b, 120)?;
    assert!(
        u(&ra, "chunk_bytes_sent") >= blob.len() as u64,
        "first gateway sends the blob: {ra}"
    );
    assert!(
        u(&rb, "chunk_bytes_sent") < 64 << 10,
        "second gateway must not re-send the blob the region holds: {rb}"
    );

    // An hour of changes on both, synced; append-heavy steps cost far less
    // than the archive.
    for (d, g) in &fleet {
        let step = gen::apply_step(&f.archive(d), g, 1)?;
        let before = f.status(d)?;
        let r = f.sync(d, 120)?;
        let after = f.status(d)?;
        let logical = u(&after, "logical_bytes");
        let sent = u(&r, "wire_bytes_sent");
        eprintln!(
            "{d}: step changed {} bytes, sent {sent} of {logical} logical",
            step.bytes
        );
        assert!(
            sent < logical / 2,
            "{d}: step sent {sent} bytes for a {logical}-byte archive"
        );
        assert!(u(&after, "changes_recorded") > u(&before, "changes_recorded"));
    }
    for (d, _) in &fleet {
        f.assert_restore_equal(d)?;
        f.assert_changes_once(d)?;
        let st = f.status(d)?;
        for field in [
            "files_tracked",
            "changes_recorded",
            "logical_bytes",
            "wire_bytes_sent",
            "chunks_sent",
            "chunks_skipped_known",
        ] {
            u(&st, field);
        }
        assert_eq!(u(&st, "pending_changes"), 0, "{st}");
        assert!(st["oldest_pending_age_secs"].is_null(), "{st}");
    }
    // A sync with nothing new sends no chunks.
    let r = f.sync(a, 60)?;
    assert_eq!(u(&r, "chunks_sent"), 0);
    let ls = f.ls_json(a)?;
    assert!(ls.as_array().is_some_and(|x| !x.is_empty()));
    Ok(())
}

/// SIGKILLs the agent, the aggregator, the sink (and Mosquitto) while
/// chunks are moving; then one `sync --wait cloud` must finish the job with
/// nothing lost, each change once in the catalog, and little re-sent.
fn kill_everything_mid_transfer(mosquitto: bool) -> Result<()> {
    let mut f = Fleet::start(mosquitto)?;
    let dev = "gw-kill";
    let arch = f.archive(dev);
    std::fs::create_dir_all(arch.join("camera"))?;
    let mut unique = 0u64;
    for i in 0..8 {
        let b = noise(1536 << 10, 1000 + i);
        unique += b.len() as u64;
        std::fs::write(arch.join("camera").join(format!("frame_{i:04}.raw")), b)?;
    }
    std::fs::write(arch.join("line1.csv"), "ts,temp\n1,20.5\n")?;
    let pause = |ms| std::thread::sleep(Duration::from_millis(ms));
    // A 3 MiB/s link: the ~13 MiB take several seconds, so every kill below
    // lands while chunks are moving.
    f.link.set_rate(3 << 20);

    let mut agent = f.run_agent(dev)?;
    pause(1500);
    agent.kill();
    agent.restart()?;
    pause(1200);
    f.agg.kill();
    pause(300);
    f.agg.restart()?;
    pause(1200);
    f.sink.kill();
    pause(300);
    f.sink.restart()?;
    sim::broker::wait_for_port(f.sink_port, secs(20))?;
    if let Broker::Mosquitto(m) = &mut f.broker {
        pause(800);
        m.restart()?;
    }
    // New data arrives while things recover; then the agent dies again.
    std::fs::write(arch.join("line1.csv"), "ts,temp\n1,20.5\n2,20.7\n")?;
    let b = noise(700 << 10, 4242);
    unique += b.len() as u64;
    std::fs::write(arch.join("camera").join("late.raw"), b)?;
    pause(1500);
    agent.kill();
    // `status` works on a state file left by a SIGKILL (it needs repair).
    let before_final = f.status(dev)?;
    eprintln!(
        "before the final sync: {} of {} changes cloud-durable; {} bytes through the link",
        u(&before_final, "cloud_durable"),
        u(&before_final, "changes_recorded"),
        f.link.up_bytes()
    );
    f.link.set_rate(0);

    let r = f.sync(dev, 180)?;
    eprintln!("final sync: {r}");
    f.assert_restore_equal(dev)?;
    let n = f.assert_changes_once(dev)?;
    assert!(n >= 10, "expected at least 10 file versions, catalog has {n}");
    // Measured on the wire (the agent's own counters lose their last
    // seconds to a SIGKILL).
    let sent = f.link.up_bytes();
    eprintln!(
        "agent -> broker bytes over all restarts: {sent}; unique data {unique} ({:.2}x)",
        sent as f64 / unique as f64
    );
    assert!(sent <= unique + unique / 2, "re-sent too much: {sent} for {unique}");
    let again = f.sync(dev, 60)?;
    assert_eq!(u(&again, "chunks_sent"), 0, "nothing left to send: {again}");
    Ok(())
}

#[test]
fn sigkill_each_process_mid_transfer_embedded_broker() -> Result<()> {
    kill_everything_mid_transfer(false)
}

#[test]
fn sigkill_each_process_mid_transfer_mosquitto() -> Result<()> {
    kill_everything_mid_transfer(true)
}

#[test]
fn cli_errors_are_clear() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let watch = dir.path().join("w");
    std::fs::create_dir_all(&watch)?;
    std::fs::write(watch.join("a.csv"), "1,2\n")?;
    // Missing key file.
    let (ok, _, err) = sim::procs::run_to_end(
        "edge-agent",
        &[
            "sync".into(),
            "--broker".into(),
            "mqtt://127.0.0.1:1".into(),
            "--tenant".into(),
            "acme".into(),
            "--site".into(),
            "p".into(),
            "--device".into(),
            "d".into(),
            "--watch".into(),
            s(&watch),
            "--state".into(),
            s(dir.path().join("st.redb")),
            "--key".into(),
            s(dir.path().join("missing.key")),
            "--timeout".into(),
            "2".into(),
        ],
        secs(30),
    )?;
    assert!(!ok && err.contains("missing.key"), "{err}");
    // Bad device id.
    let key = dir.path().join("k");
    let (ok, _, _) = sim::procs::run_to_end("edge-agent", &["keygen".into(), "--out".into(), s(&key)], secs(20))?;
    assert!(ok);
    let (ok, _, err) = sim::procs::run_to_end("edge-agent", &["keygen".into(), "--out".into(), s(&key)], secs(20))?;
    assert!(!ok && err.contains("refusing to overwrite"), "{err}");
    // No broker: sync times out with a clear message and a non-zero exit.
    let (ok, _, err) = sim::procs::run_to_end(
        "edge-agent",
        &[
            "sync".into(),
            "--broker".into(),
            format!("mqtt://127.0.0.1:{}", sim::broker::free_port()?),
            "--tenant".into(),
            "acme".into(),
            "--site".into(),
            "p".into(),
            "--device".into(),
            "d".into(),
            "--watch".into(),
            s(&watch),
            "--state".into(),
            s(dir.path().join("st.redb")),
            "--key".into(),
            s(&key),
            "--timeout".into(),
            "2".into(),
        ],
        secs(30),
    )?;
    assert!(!ok && err.contains("timed out"), "{err}");
    // Sink unreachable.
    let (ok, _, err) = sim::procs::run_to_end(
        "cloud-sink",
        &[
            "ls".into(),
            "--sink".into(),
            format!("http://127.0.0.1:{}", sim::broker::free_port()?),
        ],
        secs(30),
    )?;
    assert!(!ok && !err.is_empty(), "{err}");
    Ok(())
}

/// `diff -r` equality, empty directories and symbolic links included: empty
/// directories are recorded, recreated by restore, and their end is recorded
/// when they fill up or go; links are restored as links (even dangling ones).
#[test]
fn empty_directories_and_symlinks_survive_the_round_trip() -> Result<()> {
    let f = Fleet::start(false)?;
    let dev = "gw-dirs";
    let a = f.archive(dev);
    for d in ["x/empty1", "y/deep/empty2", "z"] {
        std::fs::create_dir_all(a.join(d))?;
    }
    std::fs::write(a.join("z/f.txt"), "a\n")?;
    // Symbolic links are archived as links: to a file, to a directory, dangling.
    std::os::unix::fs::symlink("z/f.txt", a.join("latest.txt"))?;
    std::os::unix::fs::symlink("y", a.join("ydir"))?;
    std::os::unix::fs::symlink("/nonexistent/target", a.join("dangling"))?;
    let diff_r = |out: &std::path::Path| -> Result<()> {
        let o = std::process::Command::new("diff")
            .args(["-r", "--no-dereference"])
            .arg(&a)
            .arg(out.join("archive"))
            .output()?;
        anyhow::ensure!(o.status.success(), "diff -r: {}", String::from_utf8_lossy(&o.stdout));
        Ok(())
    };
    f.sync(dev, 60)?;
    let out1 = f.dir().join("r1");
    f.restore(dev, &out1, &[])?;
    diff_r(&out1)?;
    // Fill one, remove one, empty a parent, add one, delete the only file.
    std::fs::write(a.join("x/empty1/now-full.txt"), "c\n")?;
    std::fs::remove_dir(a.join("y/deep/empty2"))?;
    std::fs::create_dir(a.join("z/new-empty"))?;
    std::fs::remove_file(a.join("z/f.txt"))?;
    std::fs::remove_file(a.join("latest.txt"))?;
    std::os::unix::fs::symlink("x/empty1/now-full.txt", a.join("latest.txt"))?;
    f.sync(dev, 60)?;
    let out2 = f.dir().join("r2");
    f.restore(dev, &out2, &[])?;
    diff_r(&out2)?;
    assert!(out2.join("archive/y/deep").is_dir() && !out2.join("archive/y/deep/empty2").exists());
    assert_eq!(
        std::fs::read_link(out2.join("archive/latest.txt"))?,
        std::path::PathBuf::from("x/empty1/now-full.txt")
    );
    // Nothing new to record on a rescan.
    let r = f.sync(dev, 60)?;
    assert_eq!(r["scans"][0]["changes_recorded"], 0, "{r}");
    Ok(())
}
