//! `edge-agent`: Ferry's gateway daemon and its operator commands.
//!
//! A thin CLI over the library: `keygen`, `run` (daemon), `sync` (scan once,
//! sync to a durability level, exit) and `status`.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use edge_agent::policy::{ClassSpec, FileConfig};
use edge_agent::{Agent, AgentConfig, ChunkParams, DiskWatermarks, WaitLevel, Watermark};
use protocol::seal::Cipher;
use protocol::DeviceRef;
use std::path::PathBuf;
use std::time::Duration;

const CONFIG_HELP: &str = "\
POLICY CONFIG FILE (--config FILE, TOML; full commented example: docs/agent.example.toml)
Command-line flags and FERRY_* variables override the file.

  include = [\"line1/**\"]          # like --include / --exclude
  exclude = [\"*.tmp\"]
  starvation = \"10m\"              # a class with backlog gets a batch at least this often
  batch_data_bytes = \"64MiB\"      # file bytes per batch: bounds how long urgent data waits
  disk_high = \"90%\"               # like --disk-high / --disk-low: % used, or a size = bytes free
  disk_low = \"80%\"

  [[class]]                       # first matching class wins; new classes match before
  name = \"alarms\"                 # the built-in append, db and default (which a [[class]]
  globs = [\"*/alarms/*.csv\"]      # with that name overrides field by field)
  priority = 100                  # higher goes first after an outage (default 0)
  append = true                   # append fast path (built-in append class: true)
  chunk_avg_kib = 64              # FastCDC average (min avg/4, max avg*4)
  zstd_level = 1
  schedule = [\"22:00-06:00\"]      # send only inside these windows (still recorded outside)
  timezone = \"utc\"                # of schedule and budget days: utc (default), local, +HH:MM
  bandwidth = \"200KiB\"            # cap on chunk data, bytes/s (token bucket)
  daily_budget = \"50MiB\"          # chunk data per day; spend persisted in the state file
  keep_local = \"7d\"               # keep on disk this long after cloud durability
  prune = \"durable\"               # never | durable (default) | force (may delete data
                                  # not yet in the cloud)
  shared = true                   # several gateways of the site write these paths: each
                                  # change carries a version vector
  conflict = \"keep-both\"          # how the cloud resolves concurrent versions: keep-both
                                  # (default), last-writer-wins, append-merge (line logs);
                                  # only with shared = true

Sizes: 123, 64KiB, 1.5MB, 2GiB. Durations: 90 (s), 30s, 15m, 12h, 7d.
Disk watermarks: over --disk-high the agent deletes from the watch folders the oldest
files whose latest version is cloud-durable and older than keep_local, until under
--disk-low. Pruned files are not recorded as deletions: the cloud keeps them and
restores bring them back. The condition is in `status --json` (disk), presence and logs.
Legal hold wins over deletion: a path under a legal hold set centrally (server changes)
is never pruned, whatever prune, keep_local and the watermarks say. Central metadata
(tags, retention, holds) and shared paths (vectors, conflicts) are in `status`.";

#[derive(Parser)]
#[command(
    name = "edge-agent",
    after_long_help = CONFIG_HELP,
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
    #[command(after_long_help = CONFIG_HELP)]
    Run(AgentArgs),
    /// Scan once, sync, and exit 0 only when every recorded change is
    /// durable at the --wait level; non-zero on timeout.
    #[command(after_long_help = CONFIG_HELP)]
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
    /// backlog, disk, central metadata (tags, retention, legal holds and the
    /// files they hold), shared paths (version vectors, cloud conflicts).
    /// Works while the daemon runs (reads its status snapshot).
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
    #[arg(long, required = true, env = "FERRY_WATCH")]
    watch: Vec<PathBuf>,
    /// The agent's state file (redb). Created on first use.
    #[arg(long, env = "FERRY_STATE")]
    state: PathBuf,
    /// Tenant key file (from `edge-agent keygen`).
    #[arg(long, env = "FERRY_KEY")]
    key: PathBuf,
    /// Policy config file (TOML): classes with priority, schedule,
    /// bandwidth, daily budget, keep_local, prune, shared + conflict; disk
    /// watermarks. Flags
    /// given on the command line override it. Format: see --help.
    #[arg(long, env = "FERRY_CONFIG")]
    config: Option<PathBuf>,
    /// Disk high watermark of the watch filesystem: `90%` (used) or a size
    /// such as `2GiB` (free). Over it, prune down to --disk-low.
    #[arg(long, env = "FERRY_DISK_HIGH", requires = "disk_low")]
    disk_high: Option<String>,
    /// Disk low watermark: `80%` (used) or a size (free), same kind as --disk-high.
    #[arg(long, env = "FERRY_DISK_LOW", requires = "disk_high")]
    disk_low: Option<String>,
    /// Seconds between scans of the watch folders (run mode).
    #[arg(long, default_value_t = 60, env = "FERRY_SCAN_INTERVAL")]
    scan_interval: u64,
    /// Only archive paths matching one of these globs (relative to the
    /// watch folder's parent, e.g. `archive/**/*.csv`). Repeatable.
    #[arg(long, env = "FERRY_INCLUDE")]
    include: Vec<String>,
    /// Skip paths matching these globs. Repeatable.
    #[arg(long, env = "FERRY_EXCLUDE")]
    exclude: Vec<String>,
    /// Globs of append-only files (logs): append fast path, zstd level 1.
    #[arg(long, env = "FERRY_APPEND")]
    append: Vec<String>,
    /// Globs of page-structured databases (SQLite …): small chunks, so an
    /// edit of a few pages re-sends little. Default: *.sqlite, *.sqlite3, *.db, *.db3.
    #[arg(long, env = "FERRY_DB")]
    db: Vec<String>,
    /// FastCDC average chunk size in KiB for the db class (min = avg/4,
    /// max = avg*4). Default 8.
    #[arg(long, env = "FERRY_DB_CHUNK_AVG_KIB")]
    db_chunk_avg_kib: Option<usize>,
    /// zstd level for the default and db classes. Default 3.
    #[arg(long, env = "FERRY_ZSTD_LEVEL")]
    zstd_level: Option<i32>,
    /// Chunk cipher.
    #[arg(long, value_enum, default_value = "auto", env = "FERRY_CIPHER")]
    cipher: CipherArg,
    /// FastCDC average chunk size in KiB for the default and append classes
    /// (min = avg/4, max = avg*4). Default 64.
    #[arg(long, env = "FERRY_CHUNK_AVG_KIB")]
    chunk_avg_kib: Option<usize>,
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
        // Defaults < config file < command line (and FERRY_* variables).
        let file = match &self.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        cfg.include = if self.include.is_empty() {
            file.include.clone().unwrap_or_default()
        } else {
            self.include.clone()
        };
        cfg.exclude = if self.exclude.is_empty() {
            file.exclude.clone().unwrap_or_default()
        } else {
            self.exclude.clone()
        };
        cfg.classes = file.classes.clone();
        let mut patch = |name: &str, f: &dyn Fn(&mut ClassSpec)| {
            for c in cfg.classes.iter_mut().filter(|c| c.name == name) {
                f(c);
            }
        };
        if !self.append.is_empty() {
            patch("append", &|c| c.globs = None);
        }
        if !self.db.is_empty() {
            patch("db", &|c| c.globs = None);
        }
        if self.zstd_level.is_some() {
            patch("default", &|c| c.zstd_level = None);
            patch("db", &|c| c.zstd_level = None);
        }
        if self.chunk_avg_kib.is_some() {
            patch("default", &|c| c.chunk_avg_kib = None);
            patch("append", &|c| c.chunk_avg_kib = None);
        }
        if self.db_chunk_avg_kib.is_some() {
            patch("db", &|c| c.chunk_avg_kib = None);
        }
        if !self.append.is_empty() {
            cfg.append_globs = self.append.clone();
        }
        if !self.db.is_empty() {
            cfg.db_globs = self.db.clone();
        }
        if let Some(q) = &file.starvation {
            cfg.starvation = q.duration()?;
        }
        if let Some(q) = &file.batch_data_bytes {
            cfg.batch_data_bytes = q.bytes()?.max(1);
        }
        let high = self.disk_high.clone().or(file.disk_high.clone());
        let low = self.disk_low.clone().or(file.disk_low.clone());
        cfg.disk = match (high, low) {
            (Some(h), Some(l)) => Some(DiskWatermarks::new(Watermark::parse(&h)?, Watermark::parse(&l)?)?),
            (None, None) => None,
            _ => anyhow::bail!("disk watermarks need both a high and a low value"),
        };
        let db_avg = self.db_chunk_avg_kib.unwrap_or(8) << 10;
        cfg.db_chunking = ChunkParams {
            min: db_avg / 4,
            avg: db_avg,
            max: db_avg * 4,
        };
        cfg.db_chunking
            .validate()
            .context("--db-chunk-avg-kib must be between 1 and 1024 KiB")?;
        cfg.zstd_level = self.zstd_level.unwrap_or(3);
        cfg.cipher = match self.cipher {
            CipherArg::Auto => Cipher::for_this_cpu(),
            CipherArg::Aes256Gcm => Cipher::Aes256Gcm,
            CipherArg::Chacha20Poly1305 => Cipher::ChaCha20Poly1305,
        };
        let avg = self.chunk_avg_kib.unwrap_or(64) << 10;
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
                if let Some(d) = &s.disk {
                    println!(
                        "disk              {:.1}% used{}; pruned {} file(s), {} bytes; {} bytes not cloud-durable blocking",
                        d.used_pct,
                        if d.over_high { " (OVER the high watermark)" } else { "" },
                        d.pruned_files,
                        d.pruned_bytes,
                        d.blocked_bytes_not_durable
                    );
                }
                println!(
                    "server changes    applied up to {}{}",
                    s.server_cursor,
                    if s.server_overflow {
                        " (REFUSED some: too many targets; pruning suspended)"
                    } else {
                        ""
                    }
                );
                const SHOW: usize = 20;
                for m in s.metadata.iter().take(SHOW) {
                    println!(
                        "metadata          {}: tags [{}], retain {} d{}",
                        m.path,
                        m.tags.join(", "),
                        m.retain_days,
                        if m.held {
                            format!(", LEGAL HOLD ({})", m.holds.join(", "))
                        } else {
                            String::new()
                        }
                    );
                }
                if s.held.all {
                    println!("held              every file (a hold could not be matched): nothing is pruned");
                } else if s.held.files > 0 {
                    println!(
                        "held              {} file(s), {} bytes under legal hold (never pruned): {}{}",
                        s.held.files,
                        s.held.bytes,
                        s.held.paths.join(", "),
                        if s.held.files as usize > s.held.paths.len() {
                            ", …"
                        } else {
                            ""
                        }
                    );
                }
                if s.metadata.len() > SHOW {
                    println!("metadata          … {} more (see --json)", s.metadata.len() - SHOW);
                }
                for sh in s.shared.iter().take(SHOW) {
                    let vv: Vec<String> = sh.vv.iter().map(|(d, h)| format!("{d}={h}")).collect();
                    println!(
                        "shared            {} ({}): [{}]{}",
                        sh.path,
                        sh.policy,
                        vv.join(" "),
                        if sh.conflicts > 0 {
                            format!(", {} conflict(s) in the cloud", sh.conflicts)
                        } else {
                            String::new()
                        }
                    );
                }
                if s.shared.len() > SHOW {
                    println!("shared            … {} more (see --json)", s.shared.len() - SHOW);
                }
                if s.from_snapshot {
                    println!("(from the running agent's snapshot)");
                }
            }
            Ok(())
        }
    }
}
