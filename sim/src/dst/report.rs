//! What a run measured, the text summary, and the plots (SVG, `plotters`).

use super::core::{Ms, HOUR};
use super::net::Link;
use super::scenario::{LinkKind, Scenario};
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

#[derive(Default, Clone, Debug)]
pub struct Metrics {
    /// (virtual ms, changes recorded but not cloud-durable, agents offline).
    pub backlog: Vec<(Ms, u64, u64)>,
    /// (record → cloud-durable ms, number of changes).
    pub durable_ms: Vec<(Ms, u64)>,
    /// Peak edge state file size per agent.
    pub edge_peak: Vec<u64>,
    /// Peak measured agent memory per agent (`Bounds::edge_memory_bytes`).
    pub edge_mem_peak: Vec<u64>,
    /// Link kind name → (bytes up, bytes down, agents).
    pub link_bytes: BTreeMap<String, (u64, u64, u64)>,
    pub cloud_bytes: u64,
    pub written_bytes: u64,
    pub msgs_up: u64,
    pub msgs_down: u64,
    pub crashes: u64,
    /// Scans of clean agents skipped (they would have recorded nothing).
    pub scans_skipped: u64,
    /// Files the agents' disk watermarks pruned.
    pub pruned_files: u64,
    pub agg_crashes: u64,
    pub cloud_crashes: u64,
    /// Agent processes that exited on a poisoned state database.
    pub process_exits: u64,
    pub session_losses: u64,
    pub events: u64,
    pub end_ms: Ms,
    /// Versions of shared paths in the cloud, and conflicts among them.
    pub shared_versions: u64,
    pub shared_conflicts: u64,
    /// Server changes the aggregators stashed for Hello answers, and
    /// pushed to agents.
    pub server_changes_hello: u64,
    pub server_changes_pushed: u64,
    /// Hellos idle agents sent to refresh server changes (sessions that
    /// ended in a crash or exit included).
    pub changes_refreshes: u64,
    /// Presence payloads at the broker (published or last wills), and
    /// entries the aggregators sent to the cloud's fleet view.
    pub presence_published: u64,
    pub presence_sent: u64,
    /// Times an aggregator was answered a new presence view and re-sent everything.
    pub presence_resends: u64,
}

fn kind_name(k: LinkKind) -> &'static str {
    match k {
        LinkKind::Always => "always",
        LinkKind::Cellular => "cellular",
        LinkKind::Nightly => "nightly",
        LinkKind::Satellite => "satellite",
    }
}

/// The `p`-quantile of weighted samples.
pub fn quantile(samples: &[(u64, u64)], p: f64) -> Option<u64> {
    let mut v: Vec<(u64, u64)> = samples.to_vec();
    v.sort_unstable();
    let total: u64 = v.iter().map(|s| s.1).sum();
    if total == 0 {
        return None;
    }
    let target = ((total as f64) * p).ceil().max(1.0) as u64;
    let mut acc = 0;
    for (x, w) in v {
        acc += w;
        if acc >= target {
            return Some(x);
        }
    }
    None
}

impl Metrics {
    pub fn new(sc: &Scenario) -> Metrics {
        Metrics {
            edge_peak: vec![0; sc.agents],
            edge_mem_peak: vec![0; sc.agents],
            ..Metrics::default()
        }
    }

    pub fn finish_links<'a>(&mut self, links: impl Iterator<Item = &'a Link>) {
        for l in links {
            let e = self.link_bytes.entry(kind_name(l.spec.kind).to_string()).or_default();
            e.0 += l.bytes_up;
            e.1 += l.bytes_down;
            e.2 += 1;
        }
    }

    pub fn summary(&self, sc: &Scenario, seed: u64, digest: &str, wall: f64) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "scenario {} seed {seed}", sc.name);
        let _ = writeln!(
            s,
            "  fleet: {} agents, {} aggregators; {:.1} virtual days in {:.1} s wall ({} events)",
            sc.agents,
            sc.aggregators,
            self.end_ms as f64 / (24.0 * HOUR as f64),
            wall,
            self.events
        );
        let _ = writeln!(s, "  digest {digest}");
        let _ = writeln!(
            s,
            "  data written {:.1} MiB; to cloud {:.1} MiB; messages up {} down {}",
            self.written_bytes as f64 / 1048576.0,
            self.cloud_bytes as f64 / 1048576.0,
            self.msgs_up,
            self.msgs_down
        );
        let _ = writeln!(
            s,
            "  faults: {} agent crashes, {} aggregator crashes, {} cloud crashes, {} broker session losses",
            self.crashes, self.agg_crashes, self.cloud_crashes, self.session_losses
        );
        let _ = writeln!(
            s,
            "  agent exits on a poisoned state database: {}; scans of unchanged agents skipped: {}",
            self.process_exits, self.scans_skipped
        );
        let _ = writeln!(s, "  files pruned under disk pressure: {}", self.pruned_files);
        let _ = writeln!(
            s,
            "  shared paths: {} versions in the cloud, {} conflicts (same in any arrival order)",
            self.shared_versions, self.shared_conflicts
        );
        let _ = writeln!(
            s,
            "  server changes to agents: {} in Hello answers, {} pushed; {} hourly refresh Hellos",
            self.server_changes_hello, self.server_changes_pushed, self.changes_refreshes
        );
        let _ = writeln!(
            s,
            "  presence: {} payloads at the broker, {} entries sent to the fleet view, {} re-sends to a restarted cloud",
            self.presence_published, self.presence_sent, self.presence_resends
        );
        let peak = self.backlog.iter().map(|b| b.1).max().unwrap_or(0);
        let _ = writeln!(s, "  backlog peak {peak} changes");
        let q = |p| quantile(&self.durable_ms, p).map_or("-".to_string(), fmt_ms);
        let _ = writeln!(
            s,
            "  time to cloud-durable: p50 {} p90 {} p99 {} max {}",
            q(0.5),
            q(0.9),
            q(0.99),
            q(1.0)
        );
        let disk: Vec<(u64, u64)> = self.edge_peak.iter().map(|d| (*d, 1)).collect();
        let dq = |p| quantile(&disk, p).map_or("-".to_string(), fmt_bytes);
        let _ = writeln!(
            s,
            "  edge state file peak: p50 {} p90 {} p99 {} max {}",
            dq(0.5),
            dq(0.9),
            dq(0.99),
            dq(1.0)
        );
        let mem: Vec<(u64, u64)> = self.edge_mem_peak.iter().map(|d| (*d, 1)).collect();
        let mq = |p| quantile(&mem, p).map_or("-".to_string(), fmt_bytes);
        let _ = writeln!(
            s,
            "  edge memory peak (redb cache bound + session + knowledge): p50 {} max {}",
            mq(0.5),
            mq(1.0)
        );
        for (k, (up, down, n)) in &self.link_bytes {
            let _ = writeln!(
                s,
                "  link {k:<10} {n:>6} agents: up {} down {} ({} up per agent)",
                fmt_bytes(*up),
                fmt_bytes(*down),
                fmt_bytes(up / (*n).max(1))
            );
        }
        s
    }

    /// Writes `summary.txt` and the plots into `dir`.
    pub fn write(&self, dir: &Path, summary: &str) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("summary.txt"), summary)?;
        self.plot_backlog(&dir.join("backlog.svg"))?;
        self.plot_durable(&dir.join("time_to_durable.svg"))?;
        self.plot_links(&dir.join("link_bytes.svg"))?;
        self.plot_disk(&dir.join("edge_disk.svg"))?;
        Ok(())
    }

    fn plot_backlog(&self, path: &Path) -> Result<()> {
        let root = SVGBackend::new(path, (900, 450)).into_drawing_area();
        root.fill(&WHITE).map_err(pe)?;
        let xmax = self.backlog.last().map_or(1.0, |b| b.0 as f64 / HOUR as f64).max(1.0);
        let ymax = self.backlog.iter().map(|b| b.1.max(b.2)).max().unwrap_or(1).max(1) as f64;
        let mut ch = ChartBuilder::on(&root)
            .caption("Backlog over time", ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..xmax, 0.0..ymax * 1.05)
            .map_err(pe)?;
        ch.configure_mesh()
            .x_desc("virtual hours")
            .y_desc("changes / agents")
            .draw()
            .map_err(pe)?;
        ch.draw_series(LineSeries::new(
            self.backlog.iter().map(|b| (b.0 as f64 / HOUR as f64, b.1 as f64)),
            &BLUE,
        ))
        .map_err(pe)?
        .label("changes not cloud-durable")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        ch.draw_series(LineSeries::new(
            self.backlog.iter().map(|b| (b.0 as f64 / HOUR as f64, b.2 as f64)),
            &RED,
        ))
        .map_err(pe)?
        .label("agents offline")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        ch.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(pe)?;
        root.present().map_err(pe)?;
        Ok(())
    }

    fn plot_durable(&self, path: &Path) -> Result<()> {
        // Histogram over log2 buckets of minutes.
        let mut buckets = [0u64; 16];
        for (ms, n) in &self.durable_ms {
            let mins = (*ms / 60_000).max(1);
            let b = (63 - mins.leading_zeros() as usize).min(15);
            buckets[b] += n;
        }
        bar_chart(
            path,
            "Time from record to cloud-durable",
            "minutes (log2 buckets: 1, 2-3, 4-7, ...)",
            "changes",
            &buckets
                .iter()
                .enumerate()
                .map(|(i, n)| (format!("{}", 1u64 << i), *n))
                .collect::<Vec<_>>(),
        )
    }

    fn plot_links(&self, path: &Path) -> Result<()> {
        let rows: Vec<(String, u64)> = self
            .link_bytes
            .iter()
            .map(|(k, (up, _, n))| (k.clone(), up / (*n).max(1) / 1024))
            .collect();
        bar_chart(
            path,
            "Bytes up per agent, by link profile",
            "link profile",
            "KiB per agent",
            &rows,
        )
    }

    fn plot_disk(&self, path: &Path) -> Result<()> {
        let mut v = self.edge_peak.clone();
        v.sort_unstable();
        let root = SVGBackend::new(path, (900, 450)).into_drawing_area();
        root.fill(&WHITE).map_err(pe)?;
        let ymax = v.last().copied().unwrap_or(1).max(1) as f64 / 1024.0;
        let mut ch = ChartBuilder::on(&root)
            .caption("Edge state file: peak per agent (sorted)", ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..100.0, 0.0..ymax * 1.05)
            .map_err(pe)?;
        ch.configure_mesh()
            .x_desc("percentile of agents")
            .y_desc("KiB")
            .draw()
            .map_err(pe)?;
        let n = v.len().max(1) as f64;
        ch.draw_series(LineSeries::new(
            v.iter()
                .enumerate()
                .map(|(i, d)| ((i + 1) as f64 * 100.0 / n, *d as f64 / 1024.0)),
            &BLUE,
        ))
        .map_err(pe)?;
        root.present().map_err(pe)?;
        Ok(())
    }
}

fn bar_chart(path: &Path, title: &str, xdesc: &str, ydesc: &str, rows: &[(String, u64)]) -> Result<()> {
    let root = SVGBackend::new(path, (900, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(pe)?;
    let ymax = rows.iter().map(|r| r.1).max().unwrap_or(1).max(1) as f64;
    let n = rows.len().max(1);
    let labels: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    let mut ch = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..n as f64, 0.0..ymax * 1.05)
        .map_err(pe)?;
    ch.configure_mesh()
        .x_desc(xdesc)
        .y_desc(ydesc)
        .x_labels(n)
        .x_label_formatter(&|x| labels.get(x.floor() as usize).cloned().unwrap_or_default())
        .draw()
        .map_err(pe)?;
    ch.draw_series(
        rows.iter()
            .enumerate()
            .map(|(i, r)| Rectangle::new([(i as f64 + 0.1, 0.0), (i as f64 + 0.9, r.1 as f64)], BLUE.filled())),
    )
    .map_err(pe)?;
    root.present().map_err(pe)?;
    Ok(())
}

fn pe<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("plot: {e}")
}

pub fn fmt_ms(ms: u64) -> String {
    if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 2 * HOUR {
        format!("{:.1}m", ms as f64 / 60_000.0)
    } else {
        format!("{:.1}h", ms as f64 / HOUR as f64)
    }
}

pub fn fmt_bytes(b: u64) -> String {
    if b < 10 * 1024 {
        format!("{b} B")
    } else if b < 10 << 20 {
        format!("{:.1} KiB", b as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", b as f64 / 1048576.0)
    }
}
