//! A fleet of real Ferry processes for end-to-end tests: a real broker
//! (Mosquitto or the embedded rumqttd), `cloud-sink serve`, `aggregator run`,
//! and `edge-agent` runs/syncs, all on 127.0.0.1, logs under the work dir.
#![allow(dead_code)]

use anyhow::{bail, Context, Result};
use sim::broker::{self, EmbeddedBroker, Mosquitto};
use sim::procs::{run_to_end, Proc};
use sim::proxy::Proxy;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub enum Broker {
    Mosquitto(Mosquitto),
    Embedded(EmbeddedBroker),
}

impl Broker {
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port())
    }
    pub fn port(&self) -> u16 {
        match self {
            Broker::Mosquitto(m) => m.port,
            Broker::Embedded(e) => e.port,
        }
    }
}

pub struct Fleet {
    pub work: tempfile::TempDir,
    pub broker: Broker,
    pub sink_url: String,
    pub sink_port: u16,
    pub sink: Proc,
    pub agg: Proc,
    pub key: PathBuf,
    /// Agents reach the broker through this proxy (counts, throttles, cuts).
    pub link: Proxy,
    /// With `FleetOpts::sink_proxy`: the aggregator reaches the sink through this.
    pub sink_link: Option<Proxy>,
    /// With `FleetOpts::agg_broker_proxy`: the aggregator reaches the broker through this.
    pub agg_link: Option<Proxy>,
}

/// How `Fleet::start_with` sets the fleet up.
#[derive(Clone, Debug, Default)]
pub struct FleetOpts {
    /// Mosquitto (else the embedded rumqttd).
    pub mosquitto: bool,
    /// Mosquitto without persistence: a restart loses every session.
    pub no_persistence: bool,
    /// A proxy between the aggregator and the sink (`Fleet::sink_link`).
    pub sink_proxy: bool,
    /// A proxy between the aggregator and the broker (`Fleet::agg_link`).
    pub agg_broker_proxy: bool,
    /// Extra `aggregator run` flags.
    pub agg_args: Vec<String>,
}

pub fn s(x: impl AsRef<std::ffi::OsStr>) -> String {
    x.as_ref().to_string_lossy().into_owned()
}

impl Fleet {
    /// Starts a broker, a sink and an aggregator, and writes a tenant key.
    pub fn start(mosquitto: bool) -> Result<Fleet> {
        Fleet::start_with(FleetOpts {
            mosquitto,
            ..FleetOpts::default()
        })
    }

    /// Starts a fleet as `opts` says.
    pub fn start_with(opts: FleetOpts) -> Result<Fleet> {
        let work = tempfile::Builder::new().prefix("ferry-e2e-").tempdir()?;
        let broker = if opts.mosquitto {
            // Persistence on, as production should run it, unless asked otherwise.
            Broker::Mosquitto(Mosquitto::start(&work.path().join("mosquitto"), !opts.no_persistence)?)
        } else {
            Broker::Embedded(broker::start_embedded(0)?)
        };
        let sink_port = broker::free_port()?;
        let sink_url = format!("http://127.0.0.1:{sink_port}");
        let sink = Proc::start(
            "cloud-sink",
            &[
                "serve".into(),
                "--data".into(),
                s(work.path().join("cloud")),
                "--listen".into(),
                format!("127.0.0.1:{sink_port}"),
            ],
            &work.path().join("sink.log"),
        )?;
        broker::wait_for_port(sink_port, Duration::from_secs(20))?;
        let local = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let sink_link = if opts.sink_proxy {
            Some(Proxy::start(local(sink_port))?)
        } else {
            None
        };
        let agg_link = if opts.agg_broker_proxy {
            Some(Proxy::start(local(broker.port()))?)
        } else {
            None
        };
        let mut agg_args: Vec<String> = vec![
            "run".into(),
            "--broker".into(),
            agg_link.as_ref().map_or_else(|| broker.url(), |p| p.url("mqtt")),
            "--sink".into(),
            sink_link.as_ref().map_or_else(|| sink_url.clone(), |p| p.url("http")),
            "--data".into(),
            s(work.path().join("region")),
            "--pack-max-delay".into(),
            "200ms".into(),
        ];
        agg_args.extend(opts.agg_args.iter().cloned());
        let agg = Proc::start("aggregator", &agg_args, &work.path().join("agg.log"))?;
        let key = work.path().join("tenant.key");
        let (ok, _, err) = run_to_end("edge-agent", &["keygen".into(), "--out".into(), s(&key)], secs(20))?;
        anyhow::ensure!(ok, "keygen failed: {err}");
        let link = Proxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], broker.port())))?;
        Ok(Fleet {
            link,
            sink_link,
            agg_link,
            work,
            broker,
            sink_url,
            sink_port,
            sink,
            agg,
            key,
        })
    }

    pub fn dir(&self) -> &Path {
        self.work.path()
    }

    pub fn archive(&self, device: &str) -> PathBuf {
        self.dir().join("gw").join(device).join("archive")
    }

    pub fn state(&self, device: &str) -> PathBuf {
        self.dir().join("gw").join(device).join("agent.redb")
    }

    /// The flags `run` and `sync` share.
    pub fn agent_args(&self, device: &str) -> Vec<String> {
        self.agent_args_via(device, &self.link.url("mqtt"))
    }

    /// The flags `run` and `sync` share, with the agent talking to `broker`.
    pub fn agent_args_via(&self, device: &str, broker: &str) -> Vec<String> {
        vec![
            "--broker".into(),
            broker.into(),
            "--tenant".into(),
            "acme".into(),
            "--site".into(),
            "plant-1".into(),
            "--device".into(),
            device.into(),
            "--watch".into(),
            s(self.archive(device)),
            "--state".into(),
            s(self.state(device)),
            "--key".into(),
            s(&self.key),
        ]
    }

    /// `edge-agent sync --wait cloud`; returns the parsed JSON report.
    pub fn sync(&self, device: &str, timeout_secs: u64) -> Result<serde_json::Value> {
        self.sync_via(device, &self.link.url("mqtt"), "cloud", timeout_secs)
    }

    /// `edge-agent sync --wait LEVEL` through `broker`; returns the parsed JSON report.
    pub fn sync_via(&self, device: &str, broker: &str, wait: &str, timeout_secs: u64) -> Result<serde_json::Value> {
        let mut args = vec!["sync".to_string()];
        args.extend(self.agent_args_via(device, broker));
        args.extend([
            "--wait".into(),
            wait.into(),
            "--timeout".into(),
            timeout_secs.to_string(),
            "--json".into(),
        ]);
        let (ok, out, err) = run_to_end("edge-agent", &args, secs(timeout_secs + 30))?;
        if !ok {
            bail!(
                "edge-agent sync {device} failed:\n{err}\n--- aggregator log tail:\n{}",
                tail(&self.agg.log_text(), 40)
            );
        }
        serde_json::from_str(&out).with_context(|| format!("sync report: {out}"))
    }

    /// `edge-agent run` as a daemon (scan every second).
    pub fn run_agent(&self, device: &str) -> Result<Proc> {
        let mut args = vec!["run".to_string()];
        args.extend(self.agent_args(device));
        args.extend(["--scan-interval".into(), "1".into()]);
        Proc::start("edge-agent", &args, &self.dir().join(format!("agent-{device}.log")))
    }

    /// `edge-agent run` as a daemon (scan every second) with extra flags
    /// (e.g. `--keepalive 5`).
    pub fn run_agent_with(&self, device: &str, extra_args: &[&str]) -> Result<Proc> {
        let mut args = vec!["run".to_string()];
        args.extend(self.agent_args(device));
        args.extend(["--scan-interval".into(), "1".into()]);
        args.extend(extra_args.iter().map(|a| a.to_string()));
        Proc::start("edge-agent", &args, &self.dir().join(format!("agent-{device}.log")))
    }

    /// `cloud-sink fleet --json`: one row per device, sorted by device key.
    pub fn fleet_json(&self) -> Result<Vec<serde_json::Value>> {
        let (ok, out, err) = run_to_end(
            "cloud-sink",
            &["fleet".into(), "--sink".into(), self.sink_url.clone(), "--json".into()],
            secs(30),
        )?;
        anyhow::ensure!(ok, "cloud-sink fleet failed: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).with_context(|| format!("fleet JSON: {out}"))?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// `cloud-sink fleet` as a table, with extra flags.
    pub fn fleet_table(&self, extra: &[&str]) -> Result<String> {
        let mut args: Vec<String> = vec!["fleet".into(), "--sink".into(), self.sink_url.clone()];
        args.extend(extra.iter().map(|x| x.to_string()));
        let (ok, out, err) = run_to_end("cloud-sink", &args, secs(30))?;
        anyhow::ensure!(ok, "cloud-sink fleet failed: {err}");
        Ok(out)
    }

    pub fn status(&self, device: &str) -> Result<serde_json::Value> {
        let (ok, out, err) = run_to_end(
            "edge-agent",
            &[
                "status".into(),
                "--state".into(),
                s(self.state(device)),
                "--json".into(),
            ],
            secs(20),
        )?;
        anyhow::ensure!(ok, "status failed: {err}");
        Ok(serde_json::from_str(&out)?)
    }

    /// `cloud-sink restore --device D` into `out`.
    pub fn restore(&self, device: &str, out: &Path, extra: &[&str]) -> Result<()> {
        let mut args: Vec<String> = vec![
            "restore".into(),
            "--sink".into(),
            self.sink_url.clone(),
            "--device".into(),
            device.into(),
            "--key".into(),
            s(&self.key),
            "--out".into(),
            s(out),
        ];
        args.extend(extra.iter().map(|x| x.to_string()));
        let (ok, _, err) = run_to_end("cloud-sink", &args, secs(120))?;
        anyhow::ensure!(ok, "restore of {device} failed: {err}");
        Ok(())
    }

    pub fn ls_json(&self, device: &str) -> Result<serde_json::Value> {
        let (ok, out, err) = run_to_end(
            "cloud-sink",
            &[
                "ls".into(),
                "--sink".into(),
                self.sink_url.clone(),
                "--device".into(),
                device.into(),
                "--json".into(),
            ],
            secs(30),
        )?;
        anyhow::ensure!(ok, "ls failed: {err}");
        Ok(serde_json::from_str(&out)?)
    }

    /// Restores `device` into a fresh folder and compares it with its archive.
    pub fn assert_restore_equal(&self, device: &str) -> Result<()> {
        let out = self.dir().join(format!("restore-{device}-{}", unique()));
        self.restore(device, &out, &[])?;
        let diffs = sim::tree::diff_trees(&self.archive(device), &out.join("archive"))?;
        if !diffs.is_empty() {
            bail!("restore of {device} differs from its archive: {diffs:?}");
        }
        Ok(())
    }
}

impl Fleet {
    /// Starts another aggregator named `id` (data under `region-{id}`, log
    /// `agg-{id}.log`) on `broker`, forwarding to `sink`.
    pub fn start_aggregator(&self, id: &str, broker: &str, sink: &str, extra: &[&str]) -> Result<Proc> {
        let mut args: Vec<String> = vec![
            "run".into(),
            "--id".into(),
            id.into(),
            "--broker".into(),
            broker.into(),
            "--sink".into(),
            sink.into(),
            "--data".into(),
            s(self.dir().join(format!("region-{id}"))),
            "--pack-max-delay".into(),
            "200ms".into(),
        ];
        args.extend(extra.iter().map(|x| x.to_string()));
        Proc::start("aggregator", &args, &self.dir().join(format!("agg-{id}.log")))
    }

    /// `cloud-sink ls --versions --json` rows of `device`.
    pub fn versions(&self, device: &str) -> Result<Vec<serde_json::Value>> {
        let (ok, out, err) = run_to_end(
            "cloud-sink",
            &[
                "ls".into(),
                "--sink".into(),
                self.sink_url.clone(),
                "--device".into(),
                device.into(),
                "--versions".into(),
                "--json".into(),
            ],
            secs(30),
        )?;
        anyhow::ensure!(ok, "ls --versions failed: {err}");
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// Every (epoch, seq) of `device` is in the catalog once; returns the versions.
    pub fn versions_once(&self, device: &str) -> Result<Vec<serde_json::Value>> {
        let rows = self.versions(device)?;
        let mut seen = std::collections::HashSet::new();
        for r in &rows {
            let k = (u(r, "epoch"), u(r, "seq"));
            anyhow::ensure!(seen.insert(k), "change {k:?} of {device} is in the catalog twice");
        }
        Ok(rows)
    }

    /// Every (epoch, seq) of `device` is in the catalog once; returns how many.
    pub fn assert_changes_once(&self, device: &str) -> Result<usize> {
        Ok(self.versions_once(device)?.len())
    }
}

/// Bytes of the files under `dir` (0 if it does not exist).
pub fn dir_bytes(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn u(v: &serde_json::Value, field: &str) -> u64 {
    v.get(field)
        .and_then(|x| x.as_u64())
        .unwrap_or_else(|| panic!("no numeric {field} in {v}"))
}

/// Deterministic incompressible bytes.
pub fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    // Distinct seeds must give distinct streams (xorshift needs a non-zero state).
    seed = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Waits until `f` is true or fails after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out waiting for {what}")
}
