//! Scenario files (TOML). Every field has a default, so a scenario names
//! only what it changes. Durations are strings with a unit (`"90s"`,
//! `"15m"`, `"6h"`, `"3d"`, `"250ms"`) or plain integers (milliseconds).

use super::core::{Ms, DAY, HOUR, MINUTE, SECOND};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer};
use std::path::Path;

/// A duration in virtual milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Ms);

pub fn parse_duration(s: &str) -> Result<Ms> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().with_context(|| format!("bad duration {s:?}"))?;
    let mult = match unit.trim() {
        "" | "ms" => 1,
        "s" => SECOND,
        "m" | "min" => MINUTE,
        "h" => HOUR,
        "d" => DAY,
        u => bail!("bad duration unit {u:?} in {s:?} (use ms, s, m, h or d)"),
    };
    if !n.is_finite() || n < 0.0 || n * mult as f64 > 1e15 {
        bail!("duration {s:?} out of range");
    }
    Ok((n * mult as f64).round() as Ms)
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Dur, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Dur(n)),
            Raw::S(s) => parse_duration(&s).map(Dur).map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    pub name: String,
    /// Gateways in the fleet.
    pub agents: usize,
    /// Aggregators (agents are spread over them; a dead one's agents fail
    /// over to the next alive one).
    pub aggregators: usize,
    /// Virtual time with workload and faults.
    pub duration: Dur,
    /// After `duration`: every fault stops, every link comes up, and the
    /// fleet must converge within this much virtual time.
    pub heal: Dur,
    /// Multiplies every workload byte count.
    pub data_scale: f64,
    /// How often agents scan their watch folder (after writing anyway).
    pub scan_interval: Dur,
    /// Round trip of one aggregator → cloud request.
    pub sink_rtt: Dur,
    /// An idle forwarder polls its queue at most this often (it is woken
    /// when a batch commits).
    pub forward_idle: Dur,
    /// Close an aggregator's open pack at least this often when changes wait.
    pub pack_max_delay: Dur,
    /// Each aggregator polls the cloud for new server changes (shared-path
    /// heads, central metadata) this often and pushes them to the agents
    /// (the daemon's `--changes-poll`); 0 turns the push off, leaving only
    /// the answer to each Hello.
    pub changes_poll: Dur,
    /// Drive presence: agents publish a retained `online` presence at each
    /// connect and leave an `offline` last will; every aggregator tracks it
    /// (with last-seen from up messages) and sends it to the cloud's fleet
    /// view. Checked by `presence-converges`.
    pub presence: bool,
    /// A connected agent re-publishes its presence this often (the daemon's
    /// `PRESENCE_MAX`, 5 min; it also publishes sooner when what the
    /// presence says changed, which is not simulated). 0: only at connect.
    pub presence_heartbeat: Dur,
    /// Bounds checked by the invariants.
    pub bounds: Bounds,
    pub workload: Vec<Workload>,
    pub link: Vec<LinkSpec>,
    pub outage: Vec<Outage>,
    pub faults: Faults,
    /// Samples for the report (backlog, disk) this often.
    pub sample_interval: Dur,
    /// Deliberately injected bugs (the simulator's self-test).
    pub bugs: Bugs,
    /// Edge disks and pruning (`Agent::enforce_disk`).
    pub edge_disk: EdgeDisk,
    /// Run the scans the simulator skips for clean agents anyway, and
    /// report `scan-skip` if one records a change (checks the skip rule).
    pub verify_scan_skips: bool,
}

/// Bugs injected into the real code, to check that the simulator finds them.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Bugs {
    /// Aggregators acknowledge batches before they are durable
    /// (`StoreConfig::unsafe_ack_before_fsync`): an aggregator crash must
    /// then show up as `acknowledged-not-lost`.
    pub ack_before_fsync: bool,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            name: "unnamed".into(),
            agents: 10,
            aggregators: 1,
            duration: Dur(DAY),
            heal: Dur(6 * HOUR),
            data_scale: 1.0,
            scan_interval: Dur(10 * MINUTE),
            sink_rtt: Dur(30),
            forward_idle: Dur(5 * SECOND),
            pack_max_delay: Dur(30 * SECOND),
            changes_poll: Dur(5 * SECOND),
            presence: true,
            presence_heartbeat: Dur(5 * MINUTE),
            bounds: Bounds::default(),
            workload: vec![Workload::default()],
            link: vec![LinkSpec::default()],
            outage: Vec::new(),
            faults: Faults::default(),
            sample_interval: Dur(10 * MINUTE),
            bugs: Bugs::default(),
            verify_scan_skips: false,
            edge_disk: EdgeDisk::default(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Bounds {
    /// Largest edge state file (redb) allowed, bytes.
    pub edge_state_bytes: u64,
    /// Most messages a broker session may queue for an offline client.
    pub session_queue: usize,
    /// Most messages in flight on one link.
    pub link_in_flight: usize,
    /// Largest agent memory allowed, bytes, as the simulator measures it:
    /// the agent's redb page cache at its configured size
    /// (`edge_agent::store::CACHE_BYTES`; redb reports no usage), plus what
    /// its `ClientSession` holds (the batch in flight in CBOR bytes, queued
    /// messages encoded), plus 16 bytes per seq range of the knowledge the
    /// session and the agent keep.
    pub edge_memory_bytes: u64,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            edge_state_bytes: 64 << 20,
            session_queue: 1000,
            link_in_flight: 10_000,
            edge_memory_bytes: 16 << 20,
        }
    }
}

/// Each gateway's disk holds `capacity` bytes, used by its watch folder and
/// its state file (the agent's disk probe measures both). After every scan
/// the agent runs its real `enforce_disk`: over `high_pct` used it deletes
/// its oldest cloud-durable files until under `low_pct`. `capacity = 0`:
/// no watermarks, no pruning.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeDisk {
    pub capacity: u64,
    pub high_pct: f64,
    pub low_pct: f64,
}

impl Default for EdgeDisk {
    fn default() -> Self {
        EdgeDisk {
            capacity: 0,
            high_pct: 90.0,
            low_pct: 70.0,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    /// Log files that only grow.
    Append,
    /// Files rewritten in place (same name, new content).
    Rewrite,
    /// Quiet, then many new files at once.
    Burst,
    /// A path written by a group of gateways (redundant capture, shared class).
    Shared,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    pub kind: WorkloadKind,
    /// Relative weight in the fleet's mix (each agent gets one workload).
    pub weight: u32,
    /// Files the workload keeps writing.
    pub files: usize,
    /// Time between writes (mean; exponential).
    pub every: Dur,
    /// Bytes per write (before `data_scale`).
    pub bytes: u64,
    /// Burst: files per burst.
    pub burst_files: usize,
    /// Shared: gateways per group writing the same paths. The gateways of
    /// a site with this workload are taken in index order, `group` at a
    /// time; each group has its own paths (sites are 50 gateways, so
    /// `group = 50` makes every such gateway of a site write the same ones).
    pub group: usize,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            kind: WorkloadKind::Append,
            weight: 1,
            files: 2,
            every: Dur(HOUR),
            bytes: 64 << 10,
            burst_files: 20,
            group: 2,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum LinkKind {
    Always,
    /// Up for an exponential time with mean `mean_up`, then down for one
    /// with mean `mean_down`.
    Cellular,
    /// Up only inside a daily window.
    Nightly,
    /// Always up, long latency.
    Satellite,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinkSpec {
    pub kind: LinkKind,
    pub weight: u32,
    /// One-way latency (plus up to `jitter`).
    pub latency: Dur,
    pub jitter: Dur,
    /// Bytes per second (0: unlimited).
    pub bandwidth: u64,
    pub mean_up: Dur,
    pub mean_down: Dur,
    /// Nightly: window start (time of day) and length.
    pub window_start: Dur,
    pub window_len: Dur,
}

impl Default for LinkSpec {
    fn default() -> Self {
        LinkSpec {
            kind: LinkKind::Always,
            weight: 1,
            latency: Dur(40),
            jitter: Dur(20),
            bandwidth: 0,
            mean_up: Dur(4 * HOUR),
            mean_down: Dur(15 * MINUTE),
            window_start: Dur(HOUR),
            window_len: Dur(4 * HOUR),
        }
    }
}

/// A scheduled outage of a fraction of the fleet's links.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Outage {
    pub fraction: f64,
    pub start: Dur,
    pub len: Dur,
}

impl Default for Outage {
    fn default() -> Self {
        Outage {
            fraction: 0.1,
            start: Dur(HOUR),
            len: Dur(DAY),
        }
    }
}

/// A window during which the cloud refuses every request.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    pub start: Dur,
    pub len: Dur,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Agent process crashes per agent per day (state not synced is lost).
    pub agent_crash_per_day: f64,
    /// How long a crashed process stays down.
    pub restart_after: Dur,
    /// Torn crashes: each unsynced page survives with probability 1/2.
    pub torn_writes: bool,
    /// Per message on an agent link: the message is lost and the
    /// connection breaks (MQTT over TCP loses nothing on a live connection;
    /// what is lost is lost with it, and the client reconnects).
    pub loss: f64,
    /// Per message: lost while the connection stays up (no MQTT broker does
    /// this on a live QoS 1 session; it tests what the protocol alone
    /// recovers from).
    pub silent_loss: f64,
    pub dup: f64,
    /// Extra delay of up to `reorder_delay` (so later messages overtake it).
    pub reorder: f64,
    pub reorder_delay: Dur,
    /// Broker loses every session (session_present = 0), per day.
    pub session_loss_per_day: f64,
    /// Per cloud request.
    pub sink_error: f64,
    pub sink_outages: Vec<Window>,
    /// Edge disk full for `disk_full_len`, per agent per day.
    pub disk_full_per_day: f64,
    pub disk_full_len: Dur,
    /// Agent wall-clock jumps (±`clock_jump_max`), per agent per day.
    pub clock_jump_per_day: f64,
    pub clock_jump_max: Dur,
    /// Aggregator crashes per aggregator per day (its agents fail over).
    pub agg_crash_per_day: f64,
    pub agg_down_for: Dur,
    /// Cloud node crashes per day: its catalog loses what it had not
    /// synced, and no request reaches it for `cloud_down_for`.
    pub cloud_crash_per_day: f64,
    pub cloud_down_for: Dur,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            agent_crash_per_day: 0.0,
            restart_after: Dur(MINUTE),
            torn_writes: false,
            loss: 0.0,
            silent_loss: 0.0,
            dup: 0.0,
            reorder: 0.0,
            reorder_delay: Dur(2 * SECOND),
            session_loss_per_day: 0.0,
            sink_error: 0.0,
            sink_outages: Vec::new(),
            disk_full_per_day: 0.0,
            disk_full_len: Dur(HOUR),
            clock_jump_per_day: 0.0,
            clock_jump_max: Dur(HOUR),
            agg_crash_per_day: 0.0,
            agg_down_for: Dur(10 * MINUTE),
            cloud_crash_per_day: 0.0,
            cloud_down_for: Dur(2 * MINUTE),
        }
    }
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("scenario {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Scenario> {
        let s: Scenario = toml::from_str(text)?;
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> Result<()> {
        if self.agents == 0 || self.agents > 100_000 {
            bail!("agents must be 1..=100000");
        }
        if self.aggregators == 0 || self.aggregators > 64 {
            bail!("aggregators must be 1..=64");
        }
        if !(self.data_scale.is_finite() && self.data_scale > 0.0 && self.data_scale <= 100.0) {
            bail!("data_scale must be in (0, 100]");
        }
        if self.duration.0 == 0 || self.duration.0 > 3650 * DAY {
            bail!("duration must be between 1 ms and 10 years");
        }
        if self.sink_rtt.0 == 0 || self.sink_rtt.0 > HOUR {
            bail!("sink_rtt must be in (0, 1h]");
        }
        if self.presence_heartbeat.0 != 0 && self.presence_heartbeat.0 < SECOND {
            bail!("presence_heartbeat must be 0 (only at connect) or at least 1 s");
        }
        if self.changes_poll.0 != 0 && self.changes_poll.0 < 100 {
            bail!("changes_poll must be 0 (off) or at least 100 ms");
        }
        if self.heal.0 > 365 * DAY {
            bail!("heal must be at most a year");
        }
        for (what, d) in [
            ("scan_interval", self.scan_interval),
            ("sample_interval", self.sample_interval),
            ("pack_max_delay", self.pack_max_delay),
        ] {
            if d.0 < 100 {
                bail!("{what} must be at least 100 ms");
            }
        }
        if self.workload.is_empty() || self.workload.iter().all(|w| w.weight == 0) {
            bail!("at least one workload with a weight above 0 is needed");
        }
        for w in &self.workload {
            if w.every.0 < SECOND {
                bail!("workload.every must be at least 1 s");
            }
            if w.files == 0 || w.files > 10_000 || w.burst_files > 10_000 || w.group == 0 || w.group > 64 {
                bail!("workload files/burst_files must be 1..=10000 and group 1..=64");
            }
            if w.bytes > 1 << 30 {
                bail!("workload.bytes must be at most 1 GiB");
            }
        }
        let d = &self.edge_disk;
        if d.capacity > 0 && !(d.low_pct > 0.0 && d.low_pct < d.high_pct && d.high_pct <= 100.0) {
            bail!("edge_disk: need 0 < low_pct < high_pct <= 100");
        }
        if self.link.is_empty() || self.link.iter().all(|l| l.weight == 0) {
            bail!("at least one link with a weight above 0 is needed");
        }
        for l in &self.link {
            if l.kind == LinkKind::Cellular && (l.mean_up.0 < SECOND || l.mean_down.0 < SECOND) {
                bail!("cellular mean_up and mean_down must be at least 1 s");
            }
            if l.kind == LinkKind::Nightly && (l.window_len.0 == 0 || l.window_len.0 > DAY || l.window_start.0 >= DAY) {
                bail!("nightly window_start must be under 1 d and window_len in (0, 1d]");
            }
        }
        for o in &self.outage {
            if !(0.0..=1.0).contains(&o.fraction) {
                bail!("outage.fraction must be in [0, 1]");
            }
        }
        let f = &self.faults;
        for (what, p) in [
            ("loss", f.loss),
            ("silent_loss", f.silent_loss),
            ("dup", f.dup),
            ("reorder", f.reorder),
            ("sink_error", f.sink_error),
        ] {
            if !(0.0..=1.0).contains(&p) {
                bail!("faults.{what} must be a probability in [0, 1]");
            }
        }
        for (what, r) in [
            ("agent_crash_per_day", f.agent_crash_per_day),
            ("session_loss_per_day", f.session_loss_per_day),
            ("disk_full_per_day", f.disk_full_per_day),
            ("clock_jump_per_day", f.clock_jump_per_day),
            ("agg_crash_per_day", f.agg_crash_per_day),
            ("cloud_crash_per_day", f.cloud_crash_per_day),
        ] {
            if !(r.is_finite() && (0.0..=10_000.0).contains(&r)) {
                bail!("faults.{what} must be in [0, 10000]");
            }
        }
        if f.loss >= 1.0 {
            bail!("faults.loss must be below 1 (nothing would ever arrive)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("3d").unwrap(), 3 * DAY);
        assert_eq!(parse_duration("250ms").unwrap(), 250);
        assert_eq!(parse_duration("1.5h").unwrap(), 90 * MINUTE);
        assert!(parse_duration("3 weeks").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn bad_scenarios_are_errors_not_panics() {
        assert!(Scenario::parse("agents = 0").is_err());
        assert!(Scenario::parse("nonsense = 1").is_err());
        assert!(Scenario::parse("[faults]\nloss = 2.0").is_err());
        assert!(Scenario::parse("duration = \"1x\"").is_err());
        let s = Scenario::parse("agents = 3\nduration = \"2h\"").unwrap();
        assert_eq!(s.duration.0, 2 * HOUR);
    }
}
