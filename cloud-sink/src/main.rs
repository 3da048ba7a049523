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
    /// Fleet health: per device online/offline, last seen, backlog not yet
    /// cloud-durable, epoch, conflicts, counts. Devices that are offline or
    /// have a large or old backlog are flagged.
    Fleet {
        #[arg(long, env = "FERRY_SINK")]
        sink: String,
        /// The sink's JSON rows (`GET /v1/fleet`) instead of a table.
        #[arg(long)]
        json: bool,
        /// Flag a backlog of at least this many bytes (e.g. 1GiB, 500M).
        #[arg(long, default_value = "1GiB", value_parser = parse_size)]
        backlog_warn: u64,
        /// Flag a backlog whose oldest change is at least this old (e.g. 1h, 30m, 90s).
        #[arg(long, default_value = "1h", value_parser = parse_secs)]
        age_warn: u64,
    },
    /// Restore files byte-identical as of a time, verifying every chunk, the
    /// signature of every manifest and each file's SHA-256. Files go under
    /// OUT/<path>; nothing is written outside OUT.
    ///
    /// With --shared, restore a site's shared namespace instead (paths that
    /// several gateways write): per shared path, each device's latest version
    /// as of --at is considered and the path's policy decides what is written.
    /// last-writer-wins: the winner (highest HLC; nothing if it is a deletion).
    /// keep-both: the winner at the path, every other concurrent head at
    /// <path>.conflict-<device>. append-merge: the line-merge of every
    /// device's latest version (each at most 256 MiB).
    Restore {
        #[command(flatten)]
        sel: Select,
        /// Tenant key file (from `edge-agent keygen`).
        #[arg(long, env = "FERRY_KEY")]
        key: PathBuf,
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Restore the shared namespace of --site (needs --site; --device is not allowed).
        #[arg(long, requires = "site", conflicts_with = "device")]
        shared: bool,
    },
    /// List conflicts on shared paths: concurrent versions of one path by two
    /// devices, with the policy, the resolution (keep-both: both kept;
    /// last-writer-wins: the winner; append-merge: merged) and both versions.
    Conflicts {
        #[arg(long, env = "FERRY_SINK")]
        sink: String,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        site: Option<String>,
        /// Only conflicts one of whose versions is this device's.
        #[arg(long)]
        device: Option<String>,
        /// Glob over shared paths; a directory selects everything below it.
        #[arg(long)]
        path: Option<String>,
        /// The sink's JSON rows (`GET /v1/conflicts`) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Add or remove a tag on a device's paths (central metadata, sent to
    /// the device as a server change).
    #[command(group(clap::ArgGroup::new("action").required(true).args(["add", "remove"])))]
    Tag {
        #[command(flatten)]
        target: Target,
        /// Tag to add.
        #[arg(long, value_name = "TAG")]
        add: Option<String>,
        /// Tag to remove (removes the adds seen so far; a concurrent add survives).
        #[arg(long, value_name = "TAG")]
        remove: Option<String>,
    },
    /// Put a legal hold on a device's paths, or release one. A held path is
    /// never deleted or pruned; a hold wins over a concurrent release.
    Hold {
        #[command(flatten)]
        target: Target,
        /// Why (the hold's name; release names the same reason).
        #[arg(long)]
        reason: String,
        /// Release the hold with this reason instead of adding it.
        #[arg(long)]
        release: bool,
    },
    /// Keep a device's versions at least N days. Retention only grows: the
    /// largest value set wins.
    Retain {
        #[command(flatten)]
        target: Target,
        #[arg(long, value_name = "N")]
        days: u32,
    },
    /// List central metadata states (tags, holds, retention) per device and path glob.
    Meta {
        #[arg(long, env = "FERRY_SINK")]
        sink: String,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        site: Option<String>,
        #[arg(long)]
        device: Option<String>,
        /// The sink's JSON rows (`GET /v1/meta`) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Recreate catalog.redb from the objects alone (sink must be stopped).
    Rebuild {
        #[arg(long, env = "FERRY_DATA")]
        data: PathBuf,
    },
}

/// The device and paths an operator op applies to.
#[derive(Args)]
struct Target {
    /// Cloud-sink base URL, http://HOST:PORT.
    #[arg(long, env = "FERRY_SINK")]
    sink: String,
    /// The device (its id; add --tenant/--site if the id exists in several sites).
    #[arg(long)]
    device: String,
    /// The device's tenant (needed only if the device id is ambiguous).
    #[arg(long)]
    tenant: Option<String>,
    /// The device's site (needed only if the device id is ambiguous).
    #[arg(long)]
    site: Option<String>,
    /// Glob over the device's paths the op applies to.
    #[arg(long, default_value = "**")]
    path: String,
    /// Print the resulting state as JSON.
    #[arg(long)]
    json: bool,
}

impl Target {
    /// Finds the one device the selection names, via `/v1/devices`.
    async fn device(&self, client: &SinkClient) -> Result<protocol::DeviceRef> {
        let want = |f: &Option<String>, v: &str| f.as_deref().is_none_or(|f| f == v);
        let found: Vec<_> = client
            .devices()
            .await?
            .into_iter()
            .filter(|d| d.device == self.device && want(&self.tenant, &d.tenant) && want(&self.site, &d.site))
            .collect();
        match found.as_slice() {
            [d] => Ok(protocol::DeviceRef::new(&d.tenant, &d.site, &d.device)?),
            [] => anyhow::bail!(
                "no device {:?} matches at the sink (see `cloud-sink devices`)",
                self.device
            ),
            many => anyhow::bail!(
                "device {:?} is ambiguous: {}; pass --tenant and --site",
                self.device,
                many.iter()
                    .map(|d| format!("{}/{}/{}", d.tenant, d.site, d.device))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// Sends one op and prints the resulting state.
    async fn send(&self, op: &str, value: serde_json::Value) -> Result<()> {
        let client = SinkClient::new(&self.sink)?;
        let d = self.device(&client).await?;
        let req = cloud_sink::changes::MetaOpRequest {
            tenant: d.tenant.to_string(),
            site: d.site.to_string(),
            device: d.device.to_string(),
            path: Some(self.path.clone()),
            op: op.to_string(),
            value,
        };
        let v = client.meta_op(&req).await?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            print!("{}", meta_table(std::slice::from_ref(&v)));
            if v.changed == Some(false) {
                eprintln!("unchanged: the state already had that");
            }
        }
        Ok(())
    }
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
            Cmd::Fleet {
                sink,
                json,
                backlog_warn,
                age_warn,
            } => {
                let client = SinkClient::new(&sink)?;
                let rows = client.fleet().await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                } else {
                    print!("{}", fleet_table(&rows, backlog_warn, age_warn));
                }
            }
            Cmd::Restore {
                sel,
                key,
                out,
                shared: true,
            } => {
                let key = edge_key(&key)?;
                let client = SinkClient::new(&sel.sink)?;
                let req = cloud_sink::SharedRestoreRequest {
                    tenant: sel.tenant.clone(),
                    site: sel.site.clone().context("--shared needs --site")?,
                    path_glob: sel.path.clone(),
                    at: sel.at.clone(),
                    out_dir: out.clone(),
                };
                let rep = cloud_sink::restore_shared(&client, req, &key).await?;
                eprintln!(
                    "restored {} shared file(s), {} bytes into {} (every chunk, signature and file hash verified)",
                    rep.files,
                    rep.bytes,
                    out.display()
                );
            }
            Cmd::Restore { sel, key, out, .. } => {
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
                    "restored {} file(s), {} bytes, {} empty director(ies) into {} (every chunk, signature and file hash verified)",
                    rep.files,
                    rep.bytes,
                    rep.dirs,
                    out.display()
                );
            }
            Cmd::Conflicts {
                sink,
                tenant,
                site,
                device,
                path,
                json,
            } => {
                let client = SinkClient::new(&sink)?;
                let q = cloud_sink::shared::ConflictQuery {
                    tenant,
                    site,
                    device,
                    path,
                };
                let rows = client.conflicts(&q).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                } else {
                    print!("{}", conflicts_table(&rows));
                }
            }
            Cmd::Tag { target, add, remove } => match (add, remove) {
                (Some(t), _) => target.send("tag-add", t.into()).await?,
                (None, Some(t)) => target.send("tag-remove", t.into()).await?,
                (None, None) => anyhow::bail!("give --add TAG or --remove TAG"),
            },
            Cmd::Hold {
                target,
                reason,
                release,
            } => {
                let op = if release { "release" } else { "hold" };
                target.send(op, reason.into()).await?;
            }
            Cmd::Retain { target, days } => target.send("retain", days.into()).await?,
            Cmd::Meta {
                sink,
                tenant,
                site,
                device,
                json,
            } => {
                let client = SinkClient::new(&sink)?;
                let rows = client
                    .meta(&cloud_sink::changes::MetaQuery { tenant, site, device })
                    .await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                } else {
                    print!("{}", meta_table(&rows));
                }
            }
            Cmd::Rebuild { data } => {
                let r = cloud_sink::rebuild(&data).await?;
                eprintln!(
                    "catalog rebuilt: {} pack(s), {} chunk(s), {} change(s), {} metadata op(s); {} unusable object(s)",
                    r.packs, r.chunks, r.changes, r.meta_ops, r.bad_objects
                );
            }
        }
        anyhow::Ok(())
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    res
}

/// Metadata states, one line each.
fn meta_table(rows: &[cloud_sink::changes::MetaView]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<32} {:<20} {:>6} {:<8} {:<24} tags",
        "tenant/site/device", "path", "retain", "held", "holds"
    );
    for r in rows {
        let list = |v: &[String]| if v.is_empty() { "-".to_string() } else { v.join(",") };
        let _ = writeln!(
            out,
            "{:<32} {:<20} {:>6} {:<8} {:<24} {}",
            format!("{}/{}/{}", r.tenant, r.site, r.device),
            r.path,
            if r.retain_days == 0 {
                "-".to_string()
            } else {
                format!("{}d", r.retain_days)
            },
            if r.held { "HELD" } else { "no" },
            list(&r.holds),
            list(&r.tags)
        );
    }
    out
}

/// Conflicts: one header line per conflict, then its two versions.
fn conflicts_table(rows: &[cloud_sink::shared::ConflictInfo]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for c in rows {
        let resolution = match (c.resolution.as_str(), &c.winner) {
            ("winner", Some(w)) => format!("winner {}", w.device),
            ("both kept", Some(w)) => format!("both kept, {} shown at the path", w.device),
            (r, _) => r.to_string(),
        };
        let _ = writeln!(out, "{}/{} {}  [{}] {}", c.tenant, c.site, c.path, c.policy, resolution);
        for v in &c.versions {
            let mark = if c.winner.as_ref() == Some(v) { '*' } else { ' ' };
            let _ = writeln!(
                out,
                "  {mark} {:<16} epoch {:>10} seq {:>8} {:<25} {}",
                v.device,
                v.epoch,
                v.seq,
                v.time,
                v.sha256.as_deref().unwrap_or("(deleted)")
            );
        }
    }
    let _ = writeln!(out, "{} conflict(s)", rows.len());
    out
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

/// `123`, `16MiB`, `16M`, `2GiB`, `1.5G`, `64KiB`.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => return Err(format!("unknown size unit {u:?} (use B, KiB, MiB, GiB, TiB)")),
    };
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a size like 1GiB"))?;
    if !n.is_finite() || n < 0.0 {
        return Err(format!("{s:?} is not a size"));
    }
    Ok((n * mult as f64) as u64)
}

/// `90s`, `30m`, `2h`, `1d`, or plain seconds.
fn parse_secs(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 1h"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        u => return Err(format!("unknown duration unit {u:?} (use s, m, h, d)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too long"))
}

/// `3s`, `4m`, `2h`, `5d`.
fn ago(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn human_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// The readable fleet table, flagged rows marked with `!`, and a summary line.
fn fleet_table(rows: &[cloud_sink::FleetRow], backlog_warn: u64, age_warn: u64) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "  {:<32} {:<8} {:>9} {:>8} {:>11} {:>8} {:>10} {:>8} {:>7} {:>10} {:>9} {:<8} flags",
        "tenant/site/device",
        "state",
        "last seen",
        "backlog",
        "bytes",
        "oldest",
        "epoch",
        "changes",
        "files",
        "size",
        "conflicts",
        "version"
    );
    let mut flagged = 0;
    let mut online = 0;
    for r in rows {
        let f = cloud_sink::fleet::flags(r, backlog_warn, age_warn);
        if !f.is_empty() {
            flagged += 1;
        }
        if r.online {
            online += 1;
        }
        let dash = || "-".to_string();
        let _ = writeln!(
            out,
            "{} {:<32} {:<8} {:>9} {:>8} {:>11} {:>8} {:>10} {:>8} {:>7} {:>10} {:>9} {:<8} {}",
            if f.is_empty() { ' ' } else { '!' },
            format!("{}/{}/{}", r.tenant, r.site, r.device),
            r.state,
            r.last_seen_age_secs.map_or_else(dash, |a| format!("{} ago", ago(a))),
            r.backlog_changes.map_or_else(dash, |n| n.to_string()),
            r.backlog_bytes.map_or_else(dash, human_bytes),
            r.oldest_unsynced_age_secs.map_or_else(dash, ago),
            r.epoch.map_or_else(dash, |e| e.to_string()),
            r.changes,
            r.files,
            human_bytes(r.logical_bytes),
            r.conflict_count,
            r.agent_version.clone().unwrap_or_else(dash),
            f.join(",")
        );
    }
    let _ = writeln!(
        out,
        "{} device(s), {online} online, {flagged} flagged (backlog >= {}, oldest unsynced change >= {})",
        rows.len(),
        human_bytes(backlog_warn),
        ago(age_warn)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("500M"), Ok(500 << 20));
        assert!(parse_size("3 furlongs").is_err());
        assert_eq!(parse_secs("1h"), Ok(3600));
        assert_eq!(parse_secs("90"), Ok(90));
        assert!(parse_secs("1y").is_err());
        assert_eq!(ago(59), "59s");
        assert_eq!(ago(3 * 3600), "3h");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
