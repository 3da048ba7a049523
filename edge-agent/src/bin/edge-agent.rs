//! `edge-agent`: Ferry's gateway daemon and its operator commands.
//!
//! A thin CLI over the library: `keygen`, `run` (daemon), `sync` (scan once,
//! sync to a durability level, exit) and `status`.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use edge_agent::{Agent, AgentConfig, ChunkParams, WaitLevel};
use protocol::seal::Cipher;
use protocol::DeviceRef;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "edge-agent",
    version,
    about = "Ferry edge agent: watches archive folders on a gateway, chunks, compresses, \
             encrypts and signs new data, keeps all sync state in one redb file, and syncs \
             it to a regional aggregator over MQTT v5 whenever a link exists."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new tenant master key file (mode 0600). Every device of a
    /// tenant uses the same key: equal data then dedups across devices, and
    /// `cloud-sink restore` needs it to decrypt.
    Keygen {
        /// Where to write the key; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Run the agent until SIGINT or SIGTERM: scan every --scan-interval,
    /// sync whenever the broker is reachable.
    Run(AgentArgs),
    /// Scan once, sync, and exit 0 only when every recorded change is
    /// durable at the --wait level; non-zero on timeout.
    Sync {
        #[command(flatten)]
        agent: AgentArgs,
        /// Durability to wait for: `regional` (fsynced at the aggregator) or
        /// `cloud` (in the object store and catalog; the default).
        #[arg(long, value_enum, default_value = "cloud", env = "FERRY_WAIT")]
        wait: Wait,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600, env = "FERRY_TIMEOUT")]
        timeout: u64,
        /// Print the sync report as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Show what a state file holds: files tracked, changes, bytes sent,
    /// backlog. Works while the daemon runs (reads its status snapshot).
    Status {
        /// The agent's state file.
        #[arg(long, env = "FERRY_STATE")]
        state: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Wait {
    Regional,
    Cloud,
}

#[derive(Clone, Copy, ValueEnum)]
enum CipherArg {
    /// AES-256-GCM where the CPU has AES instructions, else ChaCha20-Poly1305.
    Auto,
    Aes256Gcm,
    Chacha20Poly1305,
}

#[derive(Args)]
struct AgentArgs {
    /// MQTT v5 broker, mqtt://HOST:PORT.
    #[arg(long, env = "FERRY_BROKER")]
    broker: String,
    /// Tenant id ([a-z0-9][a-z0-9_-]{0,63}).
    #[arg(long, env = "FERRY_TENANT")]
    tenant: String,
    /// Site (factory) id.
    #[arg(long, env = "FERRY_SITE")]
    site: String,
    /// Device (gateway) id.
    #[arg(long, env = "FERRY_DEVICE")]
    device: String,
    /// Folder to archive; repeat for several. Each is restored under its
    /// folder name, so two watch folders must have different names.
    #[arg(long, required = true, env = "FERRY_WATCH", value_delimiter = ',')]
    watch: Vec<PathBuf>,
    /// The agent's state file (redb). Created on first use.
    #[arg(long, env = "FERRY_STATE")]
    state: PathBuf,
    /// Tenant key file (from `edge-agent keygen`).
    #[arg(long, env = "FERRY_KEY")]
    key: PathBuf,
    /// Seconds between scans of the watch folders (run mode).
    #[arg(long, default_value_t = 60, env = "FERRY_SCAN_INTERVAL")]
    scan_interval: u64,
    /// Only archive paths matching one of these globs (relative to the
    /// watch folder's parent, e.g. `archive/**/*.csv`). Repeatable.
    #[arg(long, env = "FERRY_INCLUDE", value_delimiter = ',')]
    include: Vec<String>,
    /// Skip paths matching these globs. Repeatable.
    #[arg(long, env = "FERRY_EXCLUDE", value_delimiter = ',')]
    exclude: Vec<String>,
    /// Globs of append-only files (logs): append fast path, zstd level 1.
    #[arg(long, env = "FERRY_APPEND", value_delimiter = ',')]
    append: Vec<String>,
    /// Globs of page-structured databases (SQLite …): small chunks, so an
    /// edit of a few pages re-sends little. Default: *.sqlite, *.sqlite3, *.db, *.db3.
    #[arg(long, env = "FERRY_DB", value_delimiter = ',')]
    db: Vec<String>,
    /// FastCDC average chunk size in KiB for the db class (min = avg/4, max = avg*4).
    #[arg(long, default_value_t = 8, env = "FERRY_DB_CHUNK_AVG_KIB")]
    db_chunk_avg_kib: usize,
    /// zstd level for other files.
    #[arg(long, default_value_t = 3, env = "FERRY_ZSTD_LEVEL")]
    zstd_level: i32,
    /// Chunk cipher.
    #[arg(long, value_enum, default_value = "auto", env = "FERRY_CIPHER")]
    cipher: CipherArg,
    /// FastCDC average chunk size in KiB (min = avg/4, max = avg*4).
    #[arg(long, default_value_t = 64, env = "FERRY_CHUNK_AVG_KIB")]
    chunk_avg_kib: usize,
    /// MQTT keepalive in seconds. A link that goes silent (open but nothing
    /// moving) is dropped and redialled within 2 × keepalive + 1 s.
    #[arg(long, default_value_t = 15, env = "FERRY_KEEPALIVE")]
    keepalive: u64,
    /// Seconds to wait for the aggregator's answer (Knowledge, Prepare,
    /// Committed) before sending the request again.
    #[arg(long, default_value_t = 30, env = "FERRY_RESPONSE_TIMEOUT")]
    response_timeout: u64,
}

impl AgentArgs {
    fn config(&self) -> Result<AgentConfig> {
        let device = DeviceRef::new(&self.tenant, &self.site, &self.device).context("bad --tenant/--site/--device")?;
        let key = edge_agent::load_key(&self.key)?;
        let mut cfg = AgentConfig::new(&self.broker, &device, self.watch.clone(), &self.state, key);
        edge_agent::net::parse_broker(&self.broker)?;
        cfg.scan_interval = Duration::from_secs(self.scan_interval.max(1));
        anyhow::ensure!(
            (5..=3600).contains(&self.keepalive),
            "--keepalive must be between 5 and 3600 seconds"
        );
        cfg.keepalive = Duration::from_secs(self.keepalive);
        cfg.client.response_timeout_ms = self.response_timeout.clamp(1, 86_400) * 1000;
        cfg.include = self.include.clone();
        cfg.exclude = self.exclude.clone();
        if !self.append.is_empty() {
            cfg.append_globs = self.append.clone();
        }
        if !self.db.is_empty() {
            cfg.db_globs = self.db.clone();
        }
        let db_avg = self.db_chunk_avg_kib << 10;
        cfg.db_chunking = ChunkParams {
            min: db_avg / 4,
            avg: db_avg,
            max: db_avg * 4,
        };
        cfg.db_chunking
            .validate()
            .context("--db-chunk-avg-kib must be between 1 and 1024 KiB")?;
        cfg.zstd_level = self.zstd_level;
        cfg.cipher = match self.cipher {
            CipherArg::Auto => Cipher::for_this_cpu(),
            CipherArg::Aes256Gcm => Cipher::Aes256Gcm,
            CipherArg::Chacha20Poly1305 => Cipher::ChaCha20Poly1305,
        };
        let avg = self.chunk_avg_kib << 10;
        cfg.chunking = ChunkParams {
            min: avg / 4,
            avg,
            max: avg * 4,
        };
        cfg.chunking
            .validate()
            .context("--chunk-avg-kib must be between 1 and 1024 KiB")?;
        Ok(cfg)
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("edge-agent: {e:#}");
        std::process::exit(1);
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    // Two workers: one for the MQTT poller, one for scans and the session.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

fn real_main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    match Cli::parse().cmd {
        Cmd::Keygen { out } => {
            edge_agent::write_new_key(&out)?;
            eprintln!(
                "wrote a new tenant key to {} (keep it secret and backed up: without it nothing can be restored)",
                out.display()
            );
            Ok(())
        }
        Cmd::Run(a) => {
            let agent = Agent::open(a.config()?)?;
            let rt = runtime()?;
            rt.block_on(agent.run(shutdown_signal()))?;
            rt.shutdown_timeout(Duration::from_secs(1));
            Ok(())
        }
        Cmd::Sync {
            agent,
            wait,
            timeout,
            json,
        } => {
            let level = match wait {
                Wait::Regional => WaitLevel::Regional,
                Wait::Cloud => WaitLevel::Cloud,
            };
            let agent = Agent::open(agent.config()?)?;
            let rt = runtime()?;
            let rep = rt.block_on(async {
                tokio::select! {
                    r = agent.sync(level, Duration::from_secs(timeout)) => r.map(Some),
                    _ = shutdown_signal() => Ok(None),
                }
            })?;
            rt.shutdown_timeout(Duration::from_secs(1));
            let Some(rep) = rep else {
                anyhow::bail!("interrupted before every change was durable");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&rep)?);
            } else {
                let recorded: u64 = rep.scans.iter().map(|s| s.changes_recorded).sum();
                eprintln!(
                    "synced: {} change(s) recorded this run, all {} change(s) of this epoch durable at the {} level; \
                     {} bytes sent in {} chunk(s) ({} MQTT payload bytes) in {:.1} s",
                    recorded,
                    rep.changes_durable,
                    rep.level.name(),
                    rep.chunk_bytes_sent,
                    rep.chunks_sent,
                    rep.wire_bytes_sent,
                    rep.secs
                );
            }
            Ok(())
        }
        Cmd::Status { state, json } => {
            let s = edge_agent::read_status(&state)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("device            {} (epoch {})", s.device, s.epoch);
                println!("files tracked     {}", s.files_tracked);
                println!("changes recorded  {}", s.changes_recorded);
                println!("logical bytes     {}", s.logical_bytes);
                println!(
                    "sent              {} MQTT payload bytes, {} chunks ({} bytes)",
                    s.wire_bytes_sent, s.chunks_sent, s.chunk_bytes_sent
                );
                println!("chunks skipped    {} (already known)", s.chunks_skipped_known);
                println!(
                    "durable           {} regional, {} cloud (this epoch)",
                    s.regional_durable, s.cloud_durable
                );
                match s.oldest_pending_age_secs {
                    Some(a) => println!(
                        "backlog           {} change(s), {} bytes, oldest {a} s old (seq {})",
                        s.pending_changes,
                        s.pending_bytes,
                        s.oldest_pending_seq.map_or("?".to_string(), |q| q.to_string())
                    ),
                    None => println!("backlog           none: everything recorded is cloud-durable"),
                }
                if s.from_snapshot {
                    println!("(from the running agent's snapshot)");
                }
            }
            Ok(())
        }
    }
}
