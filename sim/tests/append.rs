//! Appends cost the appended bytes (issue 5): a growing log's old last
//! chunk, cut at end-of-file, is not sent again. Real processes over
//! Mosquitto: after each small append the agent sends the grown tail as an
//! extension chunk (`protocol::seal`), and every version restores byte for
//! byte, also as of an earlier time (restore follows the base chain).

mod common;

use anyhow::{ensure, Result};
use common::*;
use std::io::Write;

/// CSV rows like a sensor log: compressible, but every row differs.
fn rows(from: u64, n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for i in from..from + n {
        let v = (i * 7919) % 1000;
        out.extend_from_slice(
            format!(
                "2026-11-29T{:02}:{:02}:{:02}.{:03}Z,line1,spindle_temp,{}.{},ok\n",
                (i / 3600) % 24,
                (i / 60) % 60,
                i % 60,
                i % 1000,
                40 + v / 100,
                v % 100
            )
            .as_bytes(),
        );
    }
    out
}

#[test]
fn appends_send_only_the_appended_bytes_and_restore_exactly() -> Result<()> {
    let f = Fleet::start(true)?;
    let dev = "gw-append";
    let dir = f.archive(dev).join("logs");
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("line1.csv");
    // ~300 KB: several content-defined chunks plus a tail cut at EOF.
    let mut next = 0u64;
    let first = rows(next, 5_000);
    next += 5_000;
    std::fs::write(&log, &first)?;
    f.sync(dev, 60)?;
    let mut snapshots = Vec::new();
    let (mut ext_total, mut worst) = (0u64, 0f64);
    for step in 0..6 {
        let before = f.status(dev)?;
        let add = rows(next, 40);
        next += 40;
        std::fs::OpenOptions::new().append(true).open(&log)?.write_all(&add)?;
        f.sync(dev, 60)?;
        let after = f.status(dev)?;
        let sent = u(&after, "chunk_bytes_sent") - u(&before, "chunk_bytes_sent");
        let ext = u(&after, "chunks_extension") - u(&before, "chunks_extension");
        let z = zstd::bulk::compress(&add, 3)?.len() as u64;
        eprintln!(
            "append {step}: {} bytes appended (zstd -3: {z}), {sent} chunk bytes sent, {ext} extension chunks",
            add.len()
        );
        ext_total += ext;
        worst = worst.max(sent as f64 / add.len() as f64);
        // A re-sent tail chunk would cost tens of KB; the extension costs
        // the compressed append plus the seal's 79 bytes of header.
        ensure!(
            sent <= z + 200,
            "append {step}: {sent} chunk bytes sent for {} appended bytes ({z} compressed)",
            add.len()
        );
        snapshots.push((cloud_sink::now_ms(), std::fs::read(&log)?));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    eprintln!("worst chunk bytes sent / appended bytes: {worst:.3}");
    ensure!(ext_total >= 5, "appends were sent as extension chunks: {ext_total}");
    f.assert_restore_equal(dev)?;
    f.assert_changes_once(dev)?;
    // Earlier versions too: each needs its own base chain.
    for (i, (t, want)) in snapshots.iter().enumerate().take(5) {
        let out = f.dir().join(format!("restore-at-{i}"));
        f.restore(dev, &out, &["--at", &cloud_sink::format_ms(*t)])?;
        ensure!(
            std::fs::read(out.join("archive/logs/line1.csv"))? == *want,
            "version {i} restores byte for byte"
        );
    }
    Ok(())
}
