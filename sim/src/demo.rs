//! `sim demo`: the whole pipeline on one machine — embedded MQTT broker,
//! cloud-sink on a local object-store folder, one aggregator, N edge agents
//! on generated factory archives — synced, changed, synced again, restored
//! from the cloud and compared byte for byte.

use crate::broker;
use crate::gen::{self, GenConfig};
use crate::ideal;
use crate::tree;
use anyhow::{bail, Context, Result};
use edge_agent::{Agent, AgentConfig, WaitLevel};
use protocol::seal::TenantKey;
use protocol::{Change, DeviceRef};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct DemoOpts {
    pub agents: usize,
    pub scale: f64,
    pub steps: u32,
    pub seed: u64,
    pub work: Option<PathBuf>,
    pub keep: bool,
    pub timeout: Duration,
    pub json: bool,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RoundStats {
    pub round: String,
    pub logical_bytes: u64,
    pub changed_bytes: u64,
    /// zstd -3 of exactly the new and changed bytes (`crate::ideal`).
    pub ideal_bytes: u64,
    pub wire_bytes: u64,
    pub chunk_bytes: u64,
    pub chunks_sent: u64,
    pub secs_to_cloud: f64,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DeviceReport {
    pub device: String,
    pub files: u64,
    pub rounds: Vec<RoundStats>,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DemoReport {
    pub devices: Vec<DeviceReport>,
    pub restored_files: u64,
    pub restored_bytes: u64,
    /// Plaintext bytes referenced by the latest versions / unique plaintext bytes.
    pub dedup_ratio: f64,
    /// Sealed bytes in the object store's packs.
    pub stored_bytes: u64,
    pub differences: Vec<String>,
    pub secs: f64,
    pub pass: bool,
}

fn step(n: usize, total: usize, what: &str, t0: Instant) {
    eprintln!("[{n}/{total}] {what} ({:.1}s)", t0.elapsed().as_secs_f64());
}

pub async fn run(opts: DemoOpts) -> Result<DemoReport> {
    let t0 = Instant::now();
    let total = 7;
    // Holds the temporary work dir (deleted on drop) unless --keep or --work.
    let mut _tmp_guard = None;
    let work = match &opts.work {
        Some(w) => {
            if w.exists() && std::fs::read_dir(w)?.next().is_some() {
                bail!("work directory {} is not empty; pass an empty or new one", w.display());
            }
            std::fs::create_dir_all(w)?;
            w.clone()
        }
        None => {
            let t = tempfile::Builder::new().prefix("ferry-demo-").tempdir()?;
            if opts.keep {
                t.keep()
            } else {
                let p = t.path().to_path_buf();
                _tmp_guard = Some(t);
                p
            }
        }
    };
    eprintln!(
        "ferry demo: {} gateways, scale {}, {} change step(s), work dir {}",
        opts.agents,
        opts.scale,
        opts.steps,
        work.display()
    );

    step(1, total, "starting embedded MQTT broker, cloud-sink and aggregator", t0);
    let mqtt = broker::start_embedded(0)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sink_url = format!("http://{}", listener.local_addr()?);
    let sink_data = work.join("cloud");
    let sink_task = tokio::spawn(cloud_sink::serve(
        cloud_sink::ServeConfig::new(&sink_data),
        listener,
        stopped(stop_rx.clone()),
    ));
    let agg_stats = Arc::new(aggregator::AggStats::default());
    let agg_task = tokio::spawn(aggregator::run_with_stats(
        aggregator::AggConfig::new(&mqtt.url(), &sink_url, work.join("region")),
        agg_stats.clone(),
        stopped(stop_rx.clone()),
    ));

    step(2, total, "generating factory archives", t0);
    let key = TenantKey::generate()?;
    std::fs::write(work.join("tenant.key"), key.to_file_string())?;
    let mut devices = Vec::new();
    for i in 0..opts.agents {
        let g = GenConfig::new(opts.seed, opts.scale, i, opts.agents);
        let dev = DeviceRef::new("acme", "plant-1", &g.device_id())?;
        let archive = work.join("gateways").join(dev.device.as_str()).join("archive");
        let s = gen::generate_initial(&archive, &g)?;
        devices.push((g, dev, archive, s));
    }
    let logical: u64 = devices.iter().map(|d| d.3.bytes).sum();
    eprintln!(
        "      {} files, {:.1} MiB across {} gateways",
        devices.iter().map(|d| d.3.files).sum::<u64>(),
        mib(logical),
        opts.agents
    );

    let mut reports: Vec<DeviceReport> = devices
        .iter()
        .map(|d| DeviceReport {
            device: d.1.device.to_string(),
            ..Default::default()
        })
        .collect();

    step(3, total, "initial sync of every gateway to cloud-durable", t0);
    let mut snaps = Vec::new();
    let mut changed = Vec::new();
    for d in &devices {
        let snap = ideal::snapshot(&d.2)?;
        changed.push(ideal::ideal(None, &snap)?);
        snaps.push(snap);
    }
    sync_round(
        &opts,
        &mqtt.url(),
        &work,
        &key,
        &devices,
        "initial",
        &changed,
        &mut reports,
    )
    .await?;

    for s in 1..=opts.steps {
        step(
            4,
            total,
            &format!("applying hour {s} of changes (appends, mid-file edits, new files) and syncing"),
            t0,
        );
        let mut changed = Vec::new();
        for (d, snap) in devices.iter().zip(snaps.iter_mut()) {
            gen::apply_step(&d.2, &d.0, s)?;
            let after = ideal::snapshot(&d.2)?;
            changed.push(ideal::ideal(Some(snap), &after)?);
            *snap = after;
        }
        sync_round(
            &opts,
            &mqtt.url(),
            &work,
            &key,
            &devices,
            &format!("hour {s}"),
            &changed,
            &mut reports,
        )
        .await?;
    }

    step(5, total, "restoring everything from the cloud into a fresh folder", t0);
    let client = cloud_sink::SinkClient::new(&sink_url)?;
    let out = work.join("restore");
    let rep = cloud_sink::restore(
        &client,
        cloud_sink::RestoreRequest {
            out_dir: out.clone(),
            ..Default::default()
        },
        &key,
    )
    .await
    .context("restore")?;

    step(
        6,
        total,
        "comparing restored trees with the gateways, byte for byte",
        t0,
    );
    let mut differences = Vec::new();
    for (_, dev, archive, _) in &devices {
        for d in tree::diff_trees(archive, &out.join(dev.device.as_str()).join("archive"))? {
            differences.push(format!("{}: {d}", dev.device));
        }
    }
    let latest = client.restore(&cloud_sink::FileQuery::default()).await?;
    let dedup_ratio = dedup_ratio(&latest);
    let stored_bytes = dir_bytes(&sink_data.join("objects").join("packs"));

    step(7, total, "stopping", t0);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), sink_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), agg_task).await;

    for (r, d) in reports.iter_mut().zip(&devices) {
        r.files = tree::list_files(&d.2)?.len() as u64;
    }
    let report = DemoReport {
        pass: differences.is_empty() && rep.files > 0,
        devices: reports,
        restored_files: rep.files,
        restored_bytes: rep.bytes,
        dedup_ratio,
        stored_bytes,
        differences,
        secs: t0.elapsed().as_secs_f64(),
    };
    if _tmp_guard.is_none() {
        eprintln!("work directory kept: {}", work.display());
    }
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
async fn sync_round(
    opts: &DemoOpts,
    broker: &str,
    work: &Path,
    key: &TenantKey,
    devices: &[(GenConfig, DeviceRef, PathBuf, gen::GenSummary)],
    round: &str,
    changed: &[(u64, u64)],
    reports: &mut [DeviceReport],
) -> Result<()> {
    let mut tasks = Vec::new();
    for (_, dev, archive, _) in devices {
        let state = work.join("gateways").join(dev.device.as_str()).join("agent.redb");
        let mut cfg = AgentConfig::new(broker, dev, vec![archive.clone()], state.clone(), key.clone());
        cfg.status_snapshot = false;
        let timeout = opts.timeout;
        tasks.push(tokio::spawn(async move {
            let before = match Agent::open(cfg.clone()) {
                Ok(a) => a.status()?,
                Err(e) => return Err(anyhow::Error::from(e)),
            };
            let t = Instant::now();
            let agent = Agent::open(cfg)?;
            let rep = agent.sync(WaitLevel::Cloud, timeout).await?;
            let secs = t.elapsed().as_secs_f64();
            let after = edge_agent::read_status(&state)?;
            anyhow::Ok((before, after, rep, secs))
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (before, after, _rep, secs) = t.await?.with_context(|| format!("{round} sync of {}", devices[i].1))?;
        let r = RoundStats {
            round: round.to_string(),
            logical_bytes: after.logical_bytes,
            changed_bytes: changed[i].0,
            ideal_bytes: changed[i].1,
            wire_bytes: after.wire_bytes_sent - before.wire_bytes_sent,
            chunk_bytes: after.chunk_bytes_sent - before.chunk_bytes_sent,
            chunks_sent: after.chunks_sent - before.chunks_sent,
            secs_to_cloud: secs,
        };
        eprintln!(
            "      {}: {:>8.2} MiB sent, {:>5} chunks, cloud-durable in {:.1}s",
            devices[i].1.device,
            mib(r.wire_bytes),
            r.chunks_sent,
            secs
        );
        reports[i].rounds.push(r);
    }
    Ok(())
}

fn dedup_ratio(latest: &[Change]) -> f64 {
    let mut referenced = 0u64;
    let mut unique: HashMap<protocol::Hash32, u64> = HashMap::new();
    for c in latest {
        for r in c.chunk_refs() {
            referenced += u64::from(r.len);
            unique.insert(r.id, u64::from(r.len));
        }
    }
    let u: u64 = unique.values().sum();
    if u == 0 {
        1.0
    } else {
        referenced as f64 / u as f64
    }
}

fn dir_bytes(p: &Path) -> u64 {
    tree::list_files(p).map(|m| m.values().sum()).unwrap_or(0)
}

pub fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// The short human report.
pub fn print_report(r: &DemoReport) {
    println!();
    println!(
        "{:<10} {:>6} {:>10} {:<9} {:>11} {:>11} {:>11} {:>10} {:>9}",
        "device", "files", "logical", "round", "changed", "ideal", "sent", "sent/ideal", "to cloud"
    );
    for d in &r.devices {
        for (i, x) in d.rounds.iter().enumerate() {
            let (dev, files) = if i == 0 {
                (d.device.as_str(), d.files.to_string())
            } else {
                ("", String::new())
            };
            println!(
                "{:<10} {:>6} {:>8.2}Mi {:<9} {:>9.2}Mi {:>9.2}Mi {:>9.2}Mi {:>9.2}x {:>8.1}s",
                dev,
                files,
                mib(x.logical_bytes),
                x.round,
                mib(x.changed_bytes),
                mib(x.ideal_bytes),
                mib(x.wire_bytes),
                x.wire_bytes as f64 / x.ideal_bytes.max(1) as f64,
                x.secs_to_cloud
            );
        }
    }
    let logical: u64 = r
        .devices
        .iter()
        .filter_map(|d| d.rounds.last())
        .map(|x| x.logical_bytes)
        .sum();
    let sent: u64 = r.devices.iter().flat_map(|d| &d.rounds).map(|x| x.wire_bytes).sum();
    println!();
    println!(
        "logical bytes now      {:>10.2} MiB over {} gateways",
        mib(logical),
        r.devices.len()
    );
    let ideal: u64 = r.devices.iter().flat_map(|d| &d.rounds).map(|x| x.ideal_bytes).sum();
    println!("bytes sent (all MQTT)  {:>10.2} MiB", mib(sent));
    println!(
        "ideal lower bound      {:>10.2} MiB (zstd -3 of exactly the new and changed bytes; sent {:.2}x that)",
        mib(ideal),
        sent as f64 / ideal.max(1) as f64
    );
    println!(
        "stored in cloud packs  {:>10.2} MiB (sealed: deduplicated, compressed, encrypted)",
        mib(r.stored_bytes)
    );
    println!(
        "dedup ratio            {:>10.2}x (chunk bytes referenced / unique)",
        r.dedup_ratio
    );
    println!(
        "restored               {:>10} files, {:.2} MiB",
        r.restored_files,
        mib(r.restored_bytes)
    );
    for d in r.differences.iter().take(20) {
        println!("DIFF {d}");
    }
    println!("total time             {:>10.1} s", r.secs);
    println!(
        "{}",
        if r.pass {
            "PASS: every restored file is byte-identical to its gateway"
        } else {
            "FAIL"
        }
    );
}
