//! `sim`: run Ferry fleets. `sim demo` is the one-command tour of the whole
//! pipeline on this machine.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rumqttd=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
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
