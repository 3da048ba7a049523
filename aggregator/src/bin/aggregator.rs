//! `aggregator run …`: Ferry's regional aggregator daemon.

use aggregator::{AggConfig, AggStats};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "aggregator",
    version,
    about = "Ferry regional aggregator: receives changes and chunks from edge agents over MQTT, \
             stores them durably and forwards them in packs to the cloud-sink."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the aggregator until SIGINT or SIGTERM.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// MQTT v5 broker, mqtt://HOST:PORT.
    #[arg(long, env = "FERRY_BROKER", value_parser = parse_broker)]
    broker: String,
    /// Cloud-sink base URL, http://HOST:PORT.
    #[arg(long, env = "FERRY_SINK")]
    sink: String,
    /// Data directory (agg.redb and packs/).
    #[arg(long, env = "FERRY_DATA")]
    data: PathBuf,
    /// Aggregator name; the MQTT client id is ferry-agg-ID.
    #[arg(long, env = "FERRY_AGG_ID", default_value = "agg")]
    id: String,
    /// MQTT v5 shared-subscription group, to split agents over several aggregators.
    #[arg(long, env = "FERRY_SHARE_GROUP")]
    share_group: Option<String>,
    /// Close a pack once it reaches this size (e.g. 16MiB, 8M, 1048576).
    #[arg(long, env = "FERRY_PACK_TARGET", default_value = "16MiB", value_parser = parse_size)]
    pack_target: u64,
    /// Close the open pack when changes have waited this long for it (e.g. 1s, 250ms).
    #[arg(long, env = "FERRY_PACK_MAX_DELAY", default_value = "1s", value_parser = parse_duration)]
    pack_max_delay: Duration,
    /// Above this many bytes of packs not yet uploaded, agents are told to back off.
    #[arg(long, env = "FERRY_SPOOL_HIGH", default_value = "2GiB", value_parser = parse_size)]
    spool_high: u64,
    /// ... until the spool is below this.
    #[arg(long, env = "FERRY_SPOOL_LOW", default_value = "1536MiB", value_parser = parse_size)]
    spool_low: u64,
    /// A sink request with no progress for this long fails and is retried
    /// (a stalled link is noticed); requests with a body get body/min-rate more.
    #[arg(long, env = "FERRY_SINK_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    sink_timeout: Duration,
    /// Slowest upload rate to the sink that still counts as progress (e.g. 256KiB).
    #[arg(long, env = "FERRY_SINK_MIN_RATE", default_value = "256KiB", value_parser = parse_size)]
    sink_min_rate: u64,
    /// Longest back-off between attempts while the sink is unreachable.
    #[arg(long, env = "FERRY_SINK_RETRY_MAX", default_value = "30s", value_parser = parse_duration)]
    sink_retry_max: Duration,
    /// How long an agent's Hello may wait for the sink's knowledge of that
    /// device (so a moved agent re-sends nothing the cloud holds); 0 = off.
    #[arg(long, env = "FERRY_CLOUD_LOOKUP_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    cloud_lookup_timeout: Duration,
    /// How often to fetch new server changes (tags, holds, retention,
    /// shared-path heads) from the sink and push them to online agents.
    /// Agents also receive them at every (re)connect; 0 = push off.
    #[arg(long, env = "FERRY_CHANGES_POLL", default_value = "5s", value_parser = parse_duration)]
    changes_poll: Duration,
}

fn parse_broker(s: &str) -> Result<String, String> {
    aggregator::parse_mqtt_url(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
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
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a size like 16MiB"))?;
    if !n.is_finite() || n < 0.0 {
        return Err(format!("{s:?} is not a size"));
    }
    Ok((n * mult as f64) as u64)
}

/// `1s`, `250ms`, `2m`, or plain milliseconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 1s or 250ms"))?;
    match unit {
        "" | "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        u => Err(format!("unknown duration unit {u:?} (use ms, s, m)")),
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
        eprintln!("aggregator: {e:#}");
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
    let Cmd::Run(a) = cli.cmd;
    let cfg = AggConfig {
        broker: a.broker,
        sink: a.sink,
        data: a.data,
        id: a.id,
        share_group: a.share_group,
        pack_target: a.pack_target,
        pack_max_delay: a.pack_max_delay,
        spool_high: a.spool_high,
        spool_low: a.spool_low,
        sink_timeout: a.sink_timeout,
        sink_min_rate: a.sink_min_rate,
        sink_retry_max: a.sink_retry_max,
        cloud_lookup_timeout: a.cloud_lookup_timeout,
        changes_poll: a.changes_poll,
        presence_refresh: aggregator::presence::REFRESH_EVERY,
    };
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    let stats = Arc::new(AggStats::default());
    let res = rt.block_on(aggregator::run_with_stats(cfg, stats.clone(), shutdown_signal()));
    // run_with_stats has closed the store; nothing left is worth waiting for.
    rt.shutdown_timeout(Duration::from_secs(1));
    tracing::info!(stats = ?stats.snapshot(), "aggregator stopped");
    Ok(res?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("12 parsecs").is_err());
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("40"), Ok(Duration::from_millis(40)));
        assert!(parse_duration("1h").is_err());
    }
}
