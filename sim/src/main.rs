//! `sim`: run Ferry fleets. `sim demo` is the one-command tour of the whole
//! pipeline on this machine.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// The simulator allocates per message, change and redb page; mimalloc
/// runs `fleet-1000-day` faster than glibc's malloc (BENCHMARKS §6).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sim",
    version,
    about = "Run Ferry fleets: the end-to-end demo on embedded defaults"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Which gateway of which generated fleet (`sim::gen::GenConfig`).
#[derive(clap::Args)]
struct GenArgs {
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// 1.0 is about 12 MiB.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Index of this gateway in its fleet (files shared across the fleet are equal).
    #[arg(long, default_value_t = 0)]
    device_index: usize,
    #[arg(long, default_value_t = 1)]
    fleet: usize,
}

impl GenArgs {
    fn config(&self) -> sim::gen::GenConfig {
        sim::gen::GenConfig::new(self.seed, self.scale, self.device_index, self.fleet)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Deterministic simulation: run SCENARIO.toml with one seed in virtual
    /// time (one thread). Prints a summary; a violated invariant prints the
    /// seed and the command that replays it, and exits 1.
    Run {
        scenario: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Write summary.txt and plots (SVG) here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Keep node state and watch folders here (default: a temp dir, removed).
        #[arg(long)]
        work: Option<PathBuf>,
    },
    /// Deterministic simulation: run many seeds (A..B, B exclusive, or A..=B)
    /// of SCENARIO.toml in parallel and summarize. Exit 1 if any seed fails.
    Sweep {
        #[arg(long)]
        seeds: String,
        scenario: PathBuf,
        /// Worker threads (each run is single-threaded).
        #[arg(long, default_value_t = 2)]
        jobs: usize,
    },
    /// Generate one gateway's initial factory archive into DIR (for
    /// benchmarks and manual runs).
    Gen {
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        g: GenArgs,
    },
    /// Apply hour STEP of changes to an archive made by `sim gen` (steps in
    /// order 1, 2, 3 … with the same seed/scale/index/fleet).
    Step {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        step: u32,
        #[command(flatten)]
        g: GenArgs,
    },
    /// Print the ideal lower bound of syncing BEFORE → AFTER as JSON: raw new
    /// and changed bytes, and zstd -3 of exactly those bytes.
    Ideal {
        /// The earlier tree (missing or empty: everything is new).
        before: PathBuf,
        after: PathBuf,
    },
    /// Embedded broker + cloud-sink + aggregator + N edge agents on generated
    /// factory archives: sync, an hour of changes, sync, restore from the
    /// cloud, byte-for-byte compare, report. Exit code 0 only on PASS.
    Demo {
        /// Number of gateways (edge agents).
        #[arg(long, default_value_t = 4, env = "FERRY_DEMO_AGENTS")]
        agents: usize,
        /// Archive size factor: 1.0 is about 12 MiB per gateway.
        #[arg(long, default_value_t = 1.0, env = "FERRY_DEMO_SCALE")]
        scale: f64,
        /// Hours of changes to apply and sync after the initial sync.
        #[arg(long, default_value_t = 1, env = "FERRY_DEMO_STEPS")]
        steps: u32,
        /// Seed of the archive generator.
        #[arg(long, default_value_t = 1, env = "FERRY_DEMO_SEED")]
        seed: u64,
        /// Work directory (must be empty or new); kept afterwards. Default: a temporary one, removed.
        #[arg(long, env = "FERRY_DEMO_WORK")]
        work: Option<PathBuf>,
        /// Keep the temporary work directory.
        #[arg(long)]
        keep: bool,
        /// Give up on a sync round after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Print the report as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // The simulation injects faults by the thousand: node warnings are noise there.
    let default_filter = match cli.cmd {
        Cmd::Run { .. } | Cmd::Sweep { .. } => "error",
        _ => "warn,rumqttd=off",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.cmd {
        Cmd::Run {
            scenario,
            seed,
            out,
            work,
        } => {
            let sc = sim::dst::Scenario::load(&scenario)?;
            let r = sim::dst::run(&sc, &sim::dst::Options { seed, work })?;
            let summary = r.metrics.summary(&sc, seed, &r.digest, r.wall_secs);
            print!("{summary}");
            if let Some(dir) = out {
                r.metrics.write(&dir, &summary)?;
                println!("  report: {}", dir.display());
            }
            if let Some(v) = r.violation {
                println!("VIOLATION at virtual {} ms: {v}", v.at);
                println!("last events:");
                for l in &r.tail {
                    println!("  {l}");
                }
                println!("seed {seed}; replay: sim run {} --seed {seed}", scenario.display());
                std::process::exit(1);
            }
            println!("PASS");
            Ok(())
        }
        Cmd::Sweep { seeds, scenario, jobs } => {
            let sc = sim::dst::Scenario::load(&scenario)?;
            let range = sim::dst::sweep::parse_seeds(&seeds)?;
            let t0 = std::time::Instant::now();
            let res = sim::dst::sweep::sweep(&sc, range, jobs);
            let failed: Vec<_> = res.iter().filter(|o| o.failure.is_some()).collect();
            let secs: Vec<f64> = res.iter().map(|o| o.wall_secs).collect();
            let max = secs.iter().cloned().fold(0.0, f64::max);
            let mean = secs.iter().sum::<f64>() / secs.len().max(1) as f64;
            for o in &failed {
                println!(
                    "FAIL seed {}: {}\n  replay: sim run {} --seed {}",
                    o.seed,
                    o.failure.as_deref().unwrap_or(""),
                    scenario.display(),
                    o.seed
                );
            }
            println!(
                "sweep {}: {} seeds, {} passed, {} failed; {:.1} s wall on {jobs} jobs (per seed: mean {:.2} s, max {:.2} s)",
                sc.name,
                res.len(),
                res.len() - failed.len(),
                failed.len(),
                t0.elapsed().as_secs_f64(),
                mean,
                max
            );
            if !failed.is_empty() {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Gen { out, g } => {
            let s = sim::gen::generate_initial(&out, &g.config())?;
            eprintln!("generated {} files, {} bytes in {}", s.files, s.bytes, out.display());
            Ok(())
        }
        Cmd::Step { dir, step, g } => {
            let s = sim::gen::apply_step(&dir, &g.config(), step)?;
            eprintln!(
                "step {step}: {} files touched, {} bytes new or changed",
                s.files, s.bytes
            );
            Ok(())
        }
        Cmd::Ideal { before, after } => {
            let b = if before.exists() {
                Some(sim::ideal::snapshot(&before)?)
            } else {
                None
            };
            let a = sim::ideal::snapshot(&after)?;
            let (raw, z) = sim::ideal::ideal(b.as_ref(), &a)?;
            println!("{}", serde_json::json!({ "changed_bytes": raw, "zstd3_bytes": z }));
            Ok(())
        }
        Cmd::Demo {
            agents,
            scale,
            steps,
            seed,
            work,
            keep,
            timeout,
            json,
        } => {
            if agents == 0 || scale.is_nan() || scale <= 0.0 {
                anyhow::bail!("--agents must be at least 1 and --scale positive");
            }
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let opts = sim::demo::DemoOpts {
                agents,
                scale,
                steps,
                seed,
                work,
                keep,
                timeout: Duration::from_secs(timeout),
                json,
            };
            let report = rt.block_on(sim::demo::run(opts))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                sim::demo::print_report(&report);
            }
            rt.shutdown_timeout(Duration::from_secs(5));
            if !report.pass {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
