//! The deterministic simulator next to real processes (issue 4): one small
//! scenario run through `sim::dst`, and the same workload replayed on a real
//! Mosquitto, cloud-sink, aggregator and edge-agent binaries. What must
//! match is compared: the catalog's files per device at every checkpoint,
//! the versions recorded (each change once), restored bytes, the backlog,
//! and the shared-path versions and conflicts. See `sim::compare` and the
//! section "Simulation vs real processes" of `sim/README.md`.

mod common;

use anyhow::{ensure, Context, Result};
use common::*;
use sim::compare::{self, Tree};
use sim::dst::Scenario;
use sim::procs::run_to_end;
use std::path::{Path, PathBuf};

/// Four gateways of one site on always-up links, no faults: append logs,
/// rewritten tables, and a shared path that several gateways write.
const SCENARIO: &str = r#"
name = "dst-vs-real"
agents = 4
aggregators = 1
duration = "3h"
heal = "1h"
data_scale = 0.05
scan_interval = "1m"
sample_interval = "10m"
pack_max_delay = "5s"

[[workload]]
kind = "append"
weight = 1
every = "40m"
bytes = 20000
files = 2

[[workload]]
kind = "rewrite"
weight = 1
every = "50m"
bytes = 8000
files = 2

[[workload]]
kind = "shared"
weight = 2
every = "4h"
bytes = 4000
files = 1

[[link]]
kind = "always"
"#;

/// Seeds whose workloads fit the comparison: every gateway has files, at
/// least two write the shared path, and at these checkpoints every state
/// the simulation's scans recorded is seen by the replay too, so even the
/// number of versions must match. Seed 2: two shared writers once each
/// (1 conflict); seed 3: 5 shared versions, 1 conflict; seed 9: 6 shared
/// versions over two paths, 2 conflicts. Seed 9 needs the simulation's
/// server changes (shared-path heads reaching agents at Hello and by
/// push): without them it counted 4 conflicts to the real processes' 2.
/// Found by listing seeds 1..20; the test checks each still has
/// that shape, so a simulator change that reshuffles them fails loudly
/// instead of comparing less.
const SEEDS: [u64; 3] = [2, 3, 9];

/// Virtual minutes at which the simulated runs end (each healed after):
/// every 15 minutes of the 3 hours.
const CHECKPOINTS: [u64; 12] = [15, 30, 45, 60, 75, 90, 105, 120, 135, 150, 165, 180];

/// The real agents' class for the simulator's shared files (as
/// `sim::dst::nodes` configures them).
const AGENT_CONFIG: &str = r#"
[[class]]
name = "shared"
globs = ["*/shared/*"]
shared = true
conflict = "last-writer-wins"
"#;

struct Gateway {
    tenant: String,
    site: String,
    device: String,
    watch: PathBuf,
    state: PathBuf,
}

impl Gateway {
    fn args(&self, f: &Fleet, cfg: &Path) -> Vec<String> {
        vec![
            "--broker".into(),
            f.link.url("mqtt"),
            "--tenant".into(),
            self.tenant.clone(),
            "--site".into(),
            self.site.clone(),
            "--device".into(),
            self.device.clone(),
            "--watch".into(),
            s(&self.watch),
            "--state".into(),
            s(&self.state),
            "--key".into(),
            s(&f.key),
            "--config".into(),
            s(cfg),
        ]
    }

    fn sync(&self, f: &Fleet, cfg: &Path) -> Result<()> {
        let mut args = vec!["sync".to_string()];
        args.extend(self.args(f, cfg));
        args.extend(["--wait".into(), "cloud".into(), "--timeout".into(), "60".into()]);
        let (ok, _, err) = run_to_end("edge-agent", &args, secs(90))?;
        ensure!(
            ok,
            "sync {} failed: {err}\n--- aggregator log tail:\n{}",
            self.device,
            tail(&f.agg.log_text(), 30)
        );
        Ok(())
    }

    fn sink(&self, f: &Fleet, cmd: &str, extra: &[&str]) -> Result<String> {
        let mut a: Vec<String> = vec![
            cmd.into(),
            "--sink".into(),
            f.sink_url.clone(),
            "--tenant".into(),
            self.tenant.clone(),
            "--site".into(),
            self.site.clone(),
            "--device".into(),
            self.device.clone(),
        ];
        a.extend(extra.iter().map(|x| x.to_string()));
        let (ok, out, err) = run_to_end("cloud-sink", &a, secs(60))?;
        ensure!(ok, "cloud-sink {cmd} {} failed: {err}", self.device);
        Ok(out)
    }

    fn rows(&self, f: &Fleet, versions: bool) -> Result<Vec<serde_json::Value>> {
        let extra: &[&str] = if versions {
            &["--json", "--versions"]
        } else {
            &["--json"]
        };
        let out = self.sink(f, "ls", extra)?;
        let v: serde_json::Value = serde_json::from_str(&out).with_context(|| format!("ls JSON: {out}"))?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }
}

fn shared_only(t: &Tree) -> Tree {
    t.iter()
        .filter(|(p, _)| p.contains("/shared/"))
        .map(|(p, v)| (p.clone(), v.clone()))
        .collect()
}

/// The latest mtime of a shared file in `dir`, if it has one: within a
/// checkpoint, gateways sync in the order the simulation wrote their shared
/// files, so the real clocks order the versions as the virtual one did.
fn shared_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    walkdir::WalkDir::new(dir.join("shared"))
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max()
}

#[test]
fn simulation_and_real_processes_agree_on_one_scenario() -> Result<()> {
    let sc = Scenario::parse(SCENARIO)?;
    // Another seed of the same scenario (exploration; the shape checks
    // say when it does not fit).
    let seeds = match std::env::var("FERRY_DST_VS_REAL_SEED") {
        Ok(v) => vec![v.parse().with_context(|| format!("FERRY_DST_VS_REAL_SEED={v}"))?],
        Err(_) => SEEDS.to_vec(),
    };
    for seed in seeds {
        agree(&sc, seed).with_context(|| format!("seed {seed}"))?;
    }
    Ok(())
}

/// One seed: the simulation to each checkpoint, the same folders on real
/// processes (a fresh fleet), and everything that must match compared.
fn agree(sc: &Scenario, seed: u64) -> Result<()> {
    let f = Fleet::start(true)?;
    let cfg = f.dir().join("agent.toml");
    std::fs::write(&cfg, AGENT_CONFIG)?;
    let gws: Vec<Gateway> = (0..sc.agents)
        .map(|i| {
            let (tenant, site, device) = compare::dst_device(i);
            let base = f.dir().join("gw").join(&device);
            Gateway {
                tenant,
                site,
                device,
                // Named like the simulator's, so catalog paths are the same.
                watch: base.join("data"),
                state: base.join("agent.redb"),
            }
        })
        .collect();
    for g in &gws {
        std::fs::create_dir_all(&g.watch)?;
    }

    // Per gateway, its folder at each checkpoint (the simulator's).
    let mut seen: Vec<Vec<Tree>> = vec![Vec::new(); sc.agents];
    let mut last = None;
    for (k, minutes) in CHECKPOINTS.iter().enumerate() {
        let work = f.dir().join(format!("dst-{minutes}m"));
        let (r, trees) = compare::dst_checkpoint(sc, seed, minutes * 60_000, &work)?;
        ensure!(
            r.violation.is_none(),
            "simulation to {minutes} min (seed {seed}): {:?}\n{}",
            r.violation,
            r.tail.join("\n")
        );

        // The same folders on the real gateways, then a sync each.
        let mut order: Vec<usize> = (0..sc.agents).collect();
        order.sort_by_key(|&i| shared_mtime(&compare::dst_watch(&work, i)));
        for &i in &order {
            // A gateway whose folder did not change has nothing to record.
            if compare::mirror(&compare::dst_watch(&work, i), &gws[i].watch)? > 0 {
                gws[i].sync(&f, &cfg)?;
            }
        }
        // The simulated agents stay connected and learn each other's
        // shared-path heads within seconds (the aggregators' push); the
        // replay's one-shot syncs scan before they connect, so a real
        // gateway would learn them only at its next sync, after its next
        // write. Once a shared file changed, a second round of syncs gives
        // the real writers what the simulated ones were pushed.
        let shared_moved =
            (0..sc.agents).any(|i| shared_only(&trees[i]) != seen[i].last().map(shared_only).unwrap_or_default());
        if shared_moved {
            for &i in &order {
                if !shared_only(&trees[i]).is_empty() {
                    gws[i].sync(&f, &cfg)?;
                }
            }
        }
        // The catalog's latest files per device: the simulation's cloud
        // holds exactly the gateways' files (its converges-after-heal
        // invariant), the real one must hold the same.
        for (i, g) in gws.iter().enumerate() {
            let real = compare::tree_of_rows(&g.rows(&f, false)?)?;
            ensure!(
                real == trees[i],
                "checkpoint {k} ({minutes} min), {}: real catalog differs from the simulation: {:?}",
                g.device,
                compare::tree_diff(&trees[i], &real, 10)
            );
            seen[i].push(trees[i].clone());
        }
        last = Some(r);
    }
    let r = last.context("no checkpoint")?;

    // The scenario still has the shape the comparison needs.
    let finals: Vec<&Tree> = seen.iter().filter_map(|cp| cp.last()).collect();
    let writers = finals.iter().filter(|t| !shared_only(t).is_empty()).count();
    ensure!(
        writers >= 2 && finals.iter().all(|t| !t.is_empty()),
        "seed {seed} no longer gives every gateway files and >= 2 shared writers: {finals:?}"
    );

    for (i, g) in gws.iter().enumerate() {
        // Each observed change once: one version per file per checkpoint
        // at which it was new or different, none repeated.
        let rows = g.rows(&f, true)?;
        let repeated = compare::repeated_versions(&rows)?;
        ensure!(
            repeated.is_empty(),
            "{}: versions recorded twice: {repeated:?}",
            g.device
        );
        let want = compare::expected_versions(&seen[i]);
        ensure!(
            rows.len() == want,
            "{}: {} versions in the real catalog, {want} changes observed",
            g.device,
            rows.len()
        );
        // Restored bytes equal the simulated gateway's files.
        let out = f.dir().join(format!("restore-{}", g.device));
        g.sink(&f, "restore", &["--key", &s(&f.key), "--out", &s(&out)])?;
        let restored = compare::tree(&out.join("data"))?;
        ensure!(
            &restored == finals[i],
            "{}: restore differs from the simulation's files: {:?}",
            g.device,
            compare::tree_diff(finals[i], &restored, 10)
        );
        // No backlog on either side.
        let (ok, st, err) = run_to_end(
            "edge-agent",
            &["status".into(), "--state".into(), s(&g.state), "--json".into()],
            secs(20),
        )?;
        ensure!(ok, "status {}: {err}", g.device);
        let st: serde_json::Value = serde_json::from_str(&st)?;
        ensure!(u(&st, "pending_changes") == 0, "{}: backlog {st}", g.device);
    }
    let dst_backlog = r.metrics.backlog.last().map(|b| b.1);
    ensure!(
        dst_backlog.unwrap_or(0) == 0,
        "simulation backlog at the end: {dst_backlog:?}"
    );

    // Shared paths: the same versions and the same conflicts.
    let real_shared: usize = gws
        .iter()
        .map(|g| g.rows(&f, true))
        .collect::<Result<Vec<_>>>()?
        .iter()
        .flatten()
        .filter(|row| row["path"].as_str().is_some_and(|p| p.contains("/shared/")))
        .count();
    let observed: usize = seen
        .iter()
        .map(|cp| compare::expected_versions(&cp.iter().map(shared_only).collect::<Vec<_>>()))
        .sum();
    ensure!(
        r.metrics.shared_versions as usize == observed,
        "the simulation recorded {} shared versions, the checkpoints show {observed}: a shared \
         file changed twice between checkpoints, pick finer ones",
        r.metrics.shared_versions
    );
    ensure!(
        real_shared == observed,
        "shared versions: real {real_shared}, simulation {observed}"
    );
    let (ok, out, err) = run_to_end(
        "cloud-sink",
        &["conflicts".into(), "--sink".into(), f.sink_url.clone(), "--json".into()],
        secs(60),
    )?;
    ensure!(ok, "cloud-sink conflicts: {err}");
    let conflicts: serde_json::Value = serde_json::from_str(&out)?;
    let conflicts = conflicts.as_array().cloned().unwrap_or_default();
    let pairs: Vec<String> = conflicts
        .iter()
        .map(|c| {
            let v = |k: usize| format!("{}:{}", c["versions"][k]["device"], c["versions"][k]["seq"]);
            format!("{} {} vs {}", c["path"], v(0), v(1))
        })
        .collect();
    ensure!(
        conflicts.len() as u64 == r.metrics.shared_conflicts && !conflicts.is_empty(),
        "conflicts: real {}, simulation {}; real: {pairs:?}",
        conflicts.len(),
        r.metrics.shared_conflicts
    );
    for c in &conflicts {
        ensure!(c["policy"] == "last-writer-wins", "{c}");
    }
    // Versions fleet-wide: what the simulation saw become cloud-durable
    // (one per change, its change-once invariant) is what the real catalog holds.
    let versions: Vec<usize> = seen.iter().map(|cp| compare::expected_versions(cp)).collect();
    let dst_changes: u64 = r.metrics.durable_ms.iter().map(|d| d.1).sum();
    ensure!(
        versions.iter().sum::<usize>() as u64 == dst_changes,
        "versions: real {versions:?} (sum), simulation {dst_changes} changes durable"
    );
    eprintln!(
        "dst vs real, seed {seed}, checkpoints {CHECKPOINTS:?} min: files per gateway {:?}, versions {versions:?}, \
         shared versions {observed}, conflicts {}; simulation: {} events",
        finals.iter().map(|t| t.len()).collect::<Vec<_>>(),
        conflicts.len(),
        r.events
    );
    Ok(())
}
