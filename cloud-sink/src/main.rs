//! `cloud-sink`: Ferry's central store and its query/restore CLI.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use cloud_sink::{FileQuery, RestoreRequest, ServeConfig, SinkClient};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "cloud-sink",
    version,
    about = "Ferry cloud-sink: stores packs and signed manifests in an object store, keeps a \
             catalog, and answers queries and restores."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the sync protocol (for aggregators) and the query API until
    /// SIGINT or SIGTERM.
    Serve {
        /// Data directory: catalog.redb and objects/ (the local object store).
        #[arg(long, env = "FERRY_DATA")]
        data: PathBuf,
        /// Address to listen on.
        #[arg(long, env = "FERRY_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// List files (latest version per path, or every version) held in the cloud.
    Ls {
        #[command(flatten)]
        sel: Select,
        /// Every version, not only the latest of each path.
        #[arg(long)]
        versions: bool,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List devices known to the sink.
    Devices {
        #[arg(long, env = "FERRY_SINK")]
        sink: String,
        #[arg(long)]
        json: bool,
    },
    /// Restore files byte-identical as of a time, verifying every chunk, the
    /// signature of every manifest and each file's SHA-256. Files go under
    /// OUT/<path>; nothing is written outside OUT.
    Restore {
        #[command(flatten)]
        sel: Select,
        /// Tenant key file (from `edge-agent keygen`).
        #[arg(long, env = "FERRY_KEY")]
        key: PathBuf,
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Recreate catalog.redb from the objects alone (sink must be stopped).
    Rebuild {
        #[arg(long, env = "FERRY_DATA")]
        data: PathBuf,
    },
}

#[derive(Args)]
struct Select {
    /// Cloud-sink base URL, http://HOST:PORT.
    #[arg(long, env = "FERRY_SINK")]
    sink: String,
    /// Only this device.
    #[arg(long)]
    device: Option<String>,
    #[arg(long)]
    tenant: Option<String>,
    #[arg(long)]
    site: Option<String>,
    /// Glob over paths (`archive/**/*.csv`); a directory selects everything below it.
    #[arg(long)]
    path: Option<String>,
    /// As of this time (RFC 3339, e.g. 2026-11-22T10:00:00Z); default now.
    #[arg(long)]
    at: Option<String>,
}

impl Select {
    fn query(&self, versions: bool) -> FileQuery {
        FileQuery {
            device: self.device.clone(),
            tenant: self.tenant.clone(),
            site: self.site.clone(),
            path: self.path.clone(),
            at: self.at.clone(),
            versions,
        }
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
        eprintln!("cloud-sink: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    let res = rt.block_on(async move {
        match cli.cmd {
            Cmd::Serve { data, listen } => {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("listening on {listen}"))?;
                cloud_sink::serve(ServeConfig::new(data), listener, shutdown_signal()).await?;
            }
            Cmd::Ls { sel, versions, json } => {
                let client = SinkClient::new(&sel.sink)?;
                let files = client.files(&sel.query(versions)).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&files)?);
                } else {
                    println!(
                        "{:<12} {:<12} {:>6} {:>14} {:<25} path",
                        "site", "device", "seq", "size", "modified"
                    );
                    for f in &files {
                        println!(
                            "{:<12} {:<12} {:>6} {:>14} {:<25} {}{}",
                            f.site,
                            f.device,
                            f.seq,
                            f.size,
                            cloud_sink::format_ns(i128::from(f.mtime_ns)),
                            f.path,
                            if f.deleted { " (deleted)" } else { "" }
                        );
                    }
                    eprintln!("{} file version(s)", files.len());
                }
            }
            Cmd::Devices { sink, json } => {
                let client = SinkClient::new(&sink)?;
                let devs = client.devices().await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&devs)?);
                } else {
                    println!(
                        "{:<12} {:<12} {:<12} {:>7} {:>7} {:>14} last seen",
                        "tenant", "site", "device", "files", "changes", "logical bytes"
                    );
                    for d in &devs {
                        println!(
                            "{:<12} {:<12} {:<12} {:>7} {:>7} {:>14} {}",
                            d.tenant,
                            d.site,
                            d.device,
                            d.files,
                            d.changes,
                            d.logical_bytes,
                            cloud_sink::format_ms(d.last_seen_ms)
                        );
                    }
                }
            }
            Cmd::Restore { sel, key, out } => {
                let key = edge_key(&key)?;
                let client = SinkClient::new(&sel.sink)?;
                let req = RestoreRequest {
                    device: sel.device.clone(),
                    tenant: sel.tenant.clone(),
                    site: sel.site.clone(),
                    path_glob: sel.path.clone(),
                    at: sel.at.clone(),
                    out_dir: out.clone(),
                };
                let rep = cloud_sink::restore(&client, req, &key).await?;
                eprintln!(
                    "restored {} file(s), {} bytes into {} (every chunk, signature and file hash verified)",
                    rep.files,
                    rep.bytes,
                    out.display()
                );
            }
            Cmd::Rebuild { data } => {
                let r = cloud_sink::rebuild(&data).await?;
                eprintln!(
                    "catalog rebuilt: {} pack(s), {} chunk(s), {} change(s); {} unusable object(s)",
                    r.packs, r.chunks, r.changes, r.bad_objects
                );
            }
        }
        anyhow::Ok(())
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    res
}

/// Reads a tenant key file (the format `edge-agent keygen` writes).
fn edge_key(path: &std::path::Path) -> Result<protocol::seal::TenantKey> {
    let meta = std::fs::metadata(path).with_context(|| format!("key file {}", path.display()))?;
    anyhow::ensure!(
        meta.len() <= 4096,
        "key file {} is too large to be a key",
        path.display()
    );
    let text = std::fs::read_to_string(path).with_context(|| format!("key file {}", path.display()))?;
    protocol::seal::TenantKey::parse(&text).with_context(|| format!("key file {}", path.display()))
}
