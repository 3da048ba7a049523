//! The simulator: one thread, one event queue, virtual time.
//!
//! Every node's inputs are events: workload writes, scans, timers of the
//! client session, messages arriving over links, forward rounds, faults.
//! After each event the invariants that the event could affect are checked;
//! at the end every fault stops, every link comes up, and the fleet must
//! converge (see `sim/README.md`).

use super::backend::CrashBackend;
use super::core::{stream, EventLog, Kind, Ms, Queue, VClock, DAY, MINUTE, SECOND};
use super::net::{exp_ms, Link, Session};
use super::nodes::{wall, AgentNode, AgentSetup, AggNode, CloudNode, Skew};
use super::report::Metrics;
use super::scenario::{Faults, LinkKind, Scenario, WorkloadKind};
use aggregator::forward::{SinkRequest, SinkResponse};
use anyhow::{anyhow, Context, Result};
use protocol::msg::{Changes, Message};
use protocol::seal::TenantKey;
use protocol::{DeviceRef, Hash32, Knowledge, ReplicaId};
use rand::{Rng, RngCore};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A path's newest version in the catalog: (hlc, seq, (sha, size) unless deleted).
type Latest = (protocol::hlc::Hlc, u64, Option<(Hash32, u64)>);

/// A catalog's conflicts and its latest (replica, seq) per device and shared path.
/// A catalog's shared state as the order check compares it: (conflict
/// count, digest of the conflict records), and each latest shared version.
type SharedView = ((u64, Hash32), Vec<(String, u64)>);

/// How a run ended.
#[derive(Clone, Debug)]
pub struct Violation {
    pub invariant: &'static str,
    pub detail: String,
    pub at: Ms,
}

pub struct RunResult {
    pub seed: u64,
    pub digest: String,
    pub events: u64,
    pub violation: Option<Violation>,
    pub wall_secs: f64,
    pub metrics: Metrics,
    pub tail: Vec<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Options {
    pub seed: u64,
    /// Run directory for watch folders and node state (a temp dir if None).
    pub work: Option<PathBuf>,
}

#[derive(Debug)]
enum Ev {
    Write(usize),
    Scan(usize),
    Timer(usize, Ms),
    Profile(usize, bool),
    Outage(usize, bool),
    Connect(usize, u64),
    /// The connection of this generation breaks (a message was lost with it).
    Reset(usize, u64),
    Up {
        a: usize,
        gen: u64,
        bytes: Vec<u8>,
    },
    Down {
        a: usize,
        gen: u64,
        bytes: Vec<u8>,
    },
    /// Poll aggregator `g`'s forward core (valid if it is still its timer).
    Forward(usize, Ms),
    /// Aggregator `g` (process generation) polls the cloud for server
    /// changes to push.
    ChangesPoll(usize, u64),
    /// Agent `a`'s retained presence, published on connection `gen`,
    /// reaches the broker.
    Presence {
        a: usize,
        gen: u64,
        bytes: Vec<u8>,
    },
    /// Agent `a` re-publishes its presence on connection `gen` (heartbeat).
    Heartbeat(usize, u64),
    /// Aggregator `g` (process generation) sends its changed presence
    /// entries to the cloud (valid if it is still its timer).
    PresenceFlush(usize, u64, Ms),
    /// The cloud's answer to request `req_id` of aggregator `g` (process generation `gen`).
    SinkReply {
        g: usize,
        gen: u64,
        req_id: u64,
        outcome: std::result::Result<SinkResponse, String>,
    },
    Crash(usize),
    Restart(usize),
    SessionLoss,
    AggCrash(usize),
    AggRestart(usize),
    CloudCrash,
    DiskFull(usize, bool),
    ClockJump(usize),
    Sample,
    Heal,
}

struct AgentSlot {
    setup: AgentSetup,
    node: Option<AgentNode>,
    link: Link,
    /// Generation of the live connection (None: offline).
    conn: Option<u64>,
    gen: u64,
    connecting: bool,
    session: Session,
    agg: usize,
    wl: usize,
    wrng: ChaCha8Rng,
    writes: u64,
    timer: Option<Ms>,
    replica: Option<ReplicaId>,
    next_seq: u64,
    /// (first seq, last seq, recorded at) of scans not yet cloud-durable.
    recorded: VecDeque<(u64, u64, Ms)>,
    /// Highest contiguous seq the agent was told is cloud-durable.
    cloud_acked: u64,
    disk_full: bool,
    /// A scan ran after the heal began (everything on disk is recorded).
    scanned_after_heal: bool,
    restarts: u64,
    batch_base: u64,
    /// The last scan succeeded completely (nothing skipped, no rescan
    /// asked for) and nothing that could change its outcome happened since:
    /// no workload write, restart, clock jump, disk-full toggle, prune or
    /// heal. A scan of a clean agent that asks for no rescan would record
    /// nothing, so it is skipped (`verify_scan_skips` runs it anyway and
    /// checks that).
    clean: bool,
    /// Shared workload: the group of gateways (of this site and workload)
    /// that writes the same paths as this one.
    group: usize,
    /// Every file the workload wrote (it never deletes one): a file missing
    /// from the watch folder was pruned.
    written: std::collections::BTreeSet<PathBuf>,
    /// The gateway has connected to the broker at least once: whom the
    /// push reaches when presence is not simulated.
    announced: bool,
    /// The broker's retained presence of this gateway (the latest it
    /// published, or its last will), and the will it left with the
    /// connection that is up.
    retained: Option<Vec<u8>>,
    will: Option<Vec<u8>>,
    /// Wall ms at which an aggregator last received an up message from it.
    last_up_ms: u64,
    /// The epoch its last published presence gave.
    presence_epoch: Option<u32>,
}

struct AggSlot {
    dir: PathBuf,
    disk: CrashBackend,
    node: Option<AggNode>,
    /// Process generation: answers to a crashed process are dropped.
    gen: u64,
    fwd_timer: Option<Ms>,
    /// Regional knowledge this aggregator acknowledged (Committed): a
    /// restart must not lose it.
    acked: Knowledge,
    /// Cloud gseq up to which server changes were pushed (in memory, as in
    /// the daemon: a restart starts a minute before its clock).
    changes_cursor: u64,
    /// After a failed Hello lookup the aggregator answers Hellos from
    /// local knowledge alone until then (`aggregator::mqtt::CloudLookup`).
    lookup_quiet_until: Ms,
    /// The daemon's presence tracker (real code, in memory: a restart
    /// starts empty and the broker sends it every retained presence).
    tracker: std::sync::Arc<aggregator::presence::Tracker>,
    /// The pending presence flush, its back-off after a failure, when a
    /// post is next due (`REFRESH_EVERY`), and whether it still is.
    presence_flush: Option<Ms>,
    presence_backoff: Ms,
    presence_retry_at: Ms,
    presence_refresh_at: Ms,
    presence_probe: bool,
}

/// `FERRY_DST_TRACE=<agent index>` prints that agent's messages (debugging).
fn trace_agent() -> Option<usize> {
    std::env::var("FERRY_DST_TRACE").ok()?.parse().ok()
}

fn describe(m: &Message) -> String {
    match m {
        Message::Batch(b) => format!(
            "Batch {} seqs {:?}",
            b.batch_id,
            b.changes.iter().map(|c| c.seq).collect::<Vec<_>>()
        ),
        Message::Prepare(p) => format!(
            "Prepare {} missing {} retry {}",
            p.batch_id,
            p.missing.len(),
            p.retry_after_ms
        ),
        Message::Data(d) => format!("Data {} chunks {}", d.batch_id, d.chunks.len()),
        Message::Commit(c) => format!("Commit {}", c.batch_id),
        Message::Committed(c) => format!(
            "Committed {} results {:?} regional {:?} cloud {:?}",
            c.batch_id,
            c.results.iter().map(|r| (r.seq, r.status)).collect::<Vec<_>>(),
            c.regional.map.values().map(|x| x.ranges().to_vec()).collect::<Vec<_>>(),
            c.cloud.map.values().map(|x| x.ranges().to_vec()).collect::<Vec<_>>()
        ),
        Message::Knowledge(k) => format!(
            "Knowledge regional {:?} cloud {:?}",
            k.regional.map.values().map(|x| x.ranges().to_vec()).collect::<Vec<_>>(),
            k.cloud.map.values().map(|x| x.ranges().to_vec()).collect::<Vec<_>>()
        ),
        Message::CloudAck(c) => format!(
            "CloudAck {:?}",
            c.cloud
                .map
                .iter()
                .map(|(r, x)| (r.epoch, x.ranges().to_vec()))
                .collect::<Vec<_>>()
        ),
        m => m.kind().to_string(),
    }
}

pub struct Sim {
    trace: Option<usize>,
    sc: Scenario,
    seed: u64,
    clock: VClock,
    q: Queue<Ev>,
    pub log: EventLog,
    agents: Vec<AgentSlot>,
    aggs: Vec<AggSlot>,
    cloud: CloudNode,
    /// The cloud catalog's disk (survives cloud crashes as far as synced).
    cloud_disk: CrashBackend,
    /// No request reaches the cloud before this (it is restarting).
    cloud_down_until: Ms,
    healing: bool,
    end: Ms,
    rng_net: ChaCha8Rng,
    rng_fault: ChaCha8Rng,
    rng_link: ChaCha8Rng,
    rng_sink: ChaCha8Rng,
    /// Failures of Hello lookups and change polls, and of presence flushes
    /// (streams of their own, so they do not shift the forwarder's sink
    /// faults or each other).
    rng_lookup: ChaCha8Rng,
    rng_presence: ChaCha8Rng,
    pub metrics: Metrics,
    _tmp: Option<tempfile::TempDir>,
    work: PathBuf,
}

fn pick_weighted(rng: &mut ChaCha8Rng, weights: &[u32]) -> usize {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    let mut x = rng.gen_range(0..total.max(1));
    for (i, w) in weights.iter().enumerate() {
        if x < u64::from(*w) {
            return i;
        }
        x -= u64::from(*w);
    }
    0
}

/// Text-like content (compressible like real logs), deterministic from `rng`.
fn content(rng: &mut ChaCha8Rng, len: usize, t: Ms) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    while out.len() < len {
        let v = rng.next_u32();
        let _ = writeln!(out, "{t} sensor={} value={} status=ok", v % 97, v >> 8);
    }
    out.truncate(len);
    out
}

impl Sim {
    pub fn new(sc: Scenario, opts: &Options) -> Result<Sim> {
        sc.validate()?;
        let (tmp, work) = match &opts.work {
            Some(w) => {
                std::fs::create_dir_all(w)?;
                (None, w.clone())
            }
            None => {
                // tmpfs when there is one: the aggregator's and the cloud's
                // fsyncs are then free (their crash model is not the disk's).
                let shm = Path::new("/dev/shm");
                let mut b = tempfile::Builder::new();
                b.prefix("ferry-dst-");
                let t = if shm.is_dir() {
                    b.tempdir_in(shm).or_else(|_| b.tempdir())?
                } else {
                    b.tempdir()?
                };
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let seed = opts.seed;
        let mut kr = stream(seed, "tenant-key", 0);
        let mut master = [0u8; 32];
        kr.fill_bytes(&mut master);
        let key = TenantKey::from_bytes(kr.next_u32(), master);
        let clock = VClock::default();
        let mut rng_assign = stream(seed, "assign", 0);
        let wl_weights: Vec<u32> = sc.workload.iter().map(|w| w.weight).collect();
        let link_weights: Vec<u32> = sc.link.iter().map(|l| l.weight).collect();
        let shared_globs = if sc.workload.iter().any(|w| w.kind == WorkloadKind::Shared) {
            vec!["*/shared/*".to_string()]
        } else {
            Vec::new()
        };
        let mut agents = Vec::with_capacity(sc.agents);
        for i in 0..sc.agents {
            let site = format!("site{}", i / 50);
            let device = DeviceRef::new("sim", &site, &format!("gw{i:05}"))?;
            let base = work.join(format!("a{i:05}"));
            let watch = base.join("data");
            std::fs::create_dir_all(&watch)?;
            let wl = pick_weighted(&mut rng_assign, &wl_weights);
            let li = pick_weighted(&mut rng_assign, &link_weights);
            agents.push(AgentSlot {
                setup: AgentSetup {
                    disk: CrashBackend::new(),
                    entropy: std::sync::Arc::new(std::sync::Mutex::new(stream(seed, "entropy", i as u64))),
                    device,
                    watch,
                    state: base.join("state.redb"),
                    key: key.clone(),
                    clock: clock.clone(),
                    skew: Skew::default(),
                    shared_globs: shared_globs.clone(),
                    edge_disk: (sc.edge_disk.capacity > 0).then_some((
                        sc.edge_disk.capacity,
                        sc.edge_disk.high_pct,
                        sc.edge_disk.low_pct,
                    )),
                },
                node: None,
                link: Link::new(sc.link[li].clone()),
                conn: None,
                gen: 0,
                connecting: false,
                session: Session::default(),
                agg: i % sc.aggregators,
                wl,
                wrng: stream(seed, "workload", i as u64),
                writes: 0,
                timer: None,
                replica: None,
                next_seq: 1,
                recorded: VecDeque::new(),
                cloud_acked: 0,
                disk_full: false,
                scanned_after_heal: false,
                restarts: 0,
                batch_base: 0,
                clean: false,
                group: 0,
                written: Default::default(),
                announced: false,
                retained: None,
                will: None,
                last_up_ms: 0,
                presence_epoch: None,
            });
        }
        // `group` gateways of a site with the same shared workload write the
        // same paths: the k-th such gateway of a site (by index) is in group
        // k / group.
        let mut rank: BTreeMap<(String, usize), usize> = BTreeMap::new();
        for s in agents.iter_mut() {
            let w = &sc.workload[s.wl];
            if w.kind == WorkloadKind::Shared {
                let r = rank.entry((s.setup.device.site.to_string(), s.wl)).or_insert(0);
                s.group = *r / w.group.max(1);
                *r += 1;
            }
        }
        let mut aggs = Vec::new();
        for g in 0..sc.aggregators {
            let dir = work.join(format!("agg{g}"));
            let disk = CrashBackend::new();
            aggs.push(AggSlot {
                node: Some(AggNode::open(
                    &dir,
                    &disk,
                    g,
                    clock.clone(),
                    sc.pack_max_delay.0,
                    sc.bugs.ack_before_fsync,
                )?),
                dir,
                disk,
                gen: 0,
                fwd_timer: None,
                acked: Knowledge::default(),
                changes_cursor: 0,
                lookup_quiet_until: 0,
                tracker: new_tracker(g),
                presence_flush: None,
                presence_backoff: 0,
                presence_retry_at: 0,
                presence_refresh_at: 0,
                presence_probe: false,
            });
            aggs[g].reset_process(g, 0);
        }
        let cloud_disk = CrashBackend::new();
        let cloud = CloudNode::open(
            clock.clone(),
            &cloud_disk,
            std::sync::Arc::new(super::faultstore::FaultStore::new()),
        )?;
        let end = sc.duration.0;
        let metrics = Metrics::new(&sc);
        Ok(Sim {
            trace: trace_agent(),
            seed,
            clock,
            q: Queue::default(),
            log: EventLog::default(),
            agents,
            aggs,
            cloud,
            cloud_disk,
            cloud_down_until: 0,
            healing: false,
            end,
            rng_net: stream(seed, "net", 0),
            rng_fault: stream(seed, "fault", 0),
            rng_link: stream(seed, "link", 0),
            rng_sink: stream(seed, "sink", 0),
            rng_lookup: stream(seed, "lookup", 0),
            rng_presence: stream(seed, "presence", 0),
            metrics,
            sc,
            _tmp: tmp,
            work,
        })
    }

    pub fn work_dir(&self) -> &Path {
        &self.work
    }

    fn now(&self) -> Ms {
        self.clock.now()
    }

    fn faults(&self) -> Option<&Faults> {
        (!self.healing).then_some(&self.sc.faults)
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Schedules the first events of everything.
    fn start(&mut self) -> Result<()> {
        let n = self.agents.len();
        for a in 0..n {
            self.open_agent(a)?;
            let w = &self.sc.workload[self.agents[a].wl];
            let first = self.agents[a].wrng.gen_range(0..w.every.0.max(1));
            // Like every later write: none after the end, when the heal's
            // final scans have already run (a workload whose period is
            // longer than the run may not write at all).
            if first < self.end {
                self.q.push(first, Ev::Write(a));
            }
            let scan0 = self.agents[a].wrng.gen_range(0..self.sc.scan_interval.0);
            self.q.push(scan0, Ev::Scan(a));
            // Link profile.
            if self.agents[a].link.spec.kind == LinkKind::Nightly {
                let open = self.agents[a].link.nightly_open(0);
                self.agents[a].link.profile_up = open;
            }
            if let Some((t, up)) = self.agents[a].link.next_profile_change(0, &mut self.rng_link) {
                self.q.push(t, Ev::Profile(a, up));
            }
            self.try_connect(a);
            let f = self.sc.faults.clone();
            self.schedule_rate(f.agent_crash_per_day, 0, Ev::Crash(a));
            self.schedule_rate(f.disk_full_per_day, 0, Ev::DiskFull(a, true));
            self.schedule_rate(f.clock_jump_per_day, 0, Ev::ClockJump(a));
        }
        // Scheduled outages: the first `fraction` of a seeded shuffle.
        for o in self.sc.outage.clone() {
            let k = ((n as f64) * o.fraction).round() as usize;
            let mut idx: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                let j = self.rng_link.gen_range(0..=i);
                idx.swap(i, j);
            }
            for &a in idx.iter().take(k) {
                self.q.push(o.start.0, Ev::Outage(a, true));
                self.q.push(o.start.0 + o.len.0, Ev::Outage(a, false));
            }
        }
        for g in 0..self.aggs.len() {
            self.poll_forward(g)?;
            self.schedule_changes_poll(g);
            let r = self.sc.faults.agg_crash_per_day;
            self.schedule_rate(r, 0, Ev::AggCrash(g));
        }
        let r = self.sc.faults.session_loss_per_day;
        self.schedule_rate(r, 0, Ev::SessionLoss);
        let r = self.sc.faults.cloud_crash_per_day;
        self.schedule_rate(r, 0, Ev::CloudCrash);
        self.q.push(0, Ev::Sample);
        self.q.push(self.end, Ev::Heal);
        Ok(())
    }

    /// Schedules `ev` after an exponential time for `per_day` events a day.
    fn schedule_rate(&mut self, per_day: f64, now: Ms, ev: Ev) {
        if per_day <= 0.0 || self.healing {
            return;
        }
        let mean = (DAY as f64 / per_day).max(1.0) as Ms;
        let t = now + exp_ms(&mut self.rng_fault, mean);
        if t < self.end {
            self.q.push(t, ev);
        }
    }

    fn open_agent(&mut self, a: usize) -> Result<()> {
        let now = self.now();
        let s = &mut self.agents[a];
        s.batch_base += 1 << 24;
        let node = AgentNode::open(&s.setup, s.batch_base + now)?;
        let next_seq = node.agent.next_seq();
        let rep = node.agent.replica();
        if s.replica.as_ref() != Some(&rep) {
            s.recorded.clear();
            s.cloud_acked = 0;
        }
        s.replica = Some(rep);
        // Unsynced records lost in a crash are recorded again under the same seqs.
        while s.recorded.back().is_some_and(|r| r.0 >= next_seq) {
            s.recorded.pop_back();
        }
        if let Some(r) = s.recorded.back_mut() {
            r.1 = r.1.min(next_seq.saturating_sub(1));
        }
        s.next_seq = next_seq;
        s.node = Some(node);
        s.timer = None;
        s.clean = false;
        Ok(())
    }

    fn agent_online(&self, a: usize) -> bool {
        let s = &self.agents[a];
        s.node.is_some() && s.link.is_up() && self.aggs[s.agg].node.is_some()
    }

    fn try_connect(&mut self, a: usize) {
        if !self.agent_online(a) || self.agents[a].conn.is_some() || self.agents[a].connecting {
            return;
        }
        let s = &mut self.agents[a];
        s.connecting = true;
        s.gen += 1;
        // CONNECT + CONNACK: one round trip.
        let t = self.clock.now() + 2 * s.link.spec.latency.0 + 1;
        let gen = s.gen;
        self.q.push(t, Ev::Connect(a, gen));
    }

    /// The agent's connection breaks (link, crash, store error): the broker
    /// publishes its last will.
    fn disconnect(&mut self, a: usize) {
        self.disconnect_with(a, true);
    }

    fn disconnect_with(&mut self, a: usize, will: bool) {
        let now = self.now();
        let s = &mut self.agents[a];
        s.connecting = false;
        if s.conn.take().is_some() {
            if let Some(n) = &mut s.node {
                n.session.disconnected();
            }
            self.log.log(now, Kind::LinkDown, a as u64, 0, 0);
            if will {
                self.publish_will(a);
            } else {
                self.agents[a].will = None;
            }
        }
    }

    /// The connection broke without a clean disconnect (nothing in the
    /// simulation leaves cleanly): the broker publishes the gateway's last
    /// will, its `offline` presence stamped when it connected.
    fn publish_will(&mut self, a: usize) {
        if let Some(will) = self.agents[a].will.take() {
            self.presence_at_broker(a, will);
        }
    }

    /// A presence payload of agent `a` reaches the broker: it becomes the
    /// retained one and goes to every aggregator that is up (the presence
    /// subscription is not shared).
    fn presence_at_broker(&mut self, a: usize, bytes: Vec<u8>) {
        let now = self.now();
        let device = self.agents[a].setup.device.clone();
        for g in 0..self.aggs.len() {
            if self.aggs[g].node.is_some() {
                // Refused payloads are counted by the tracker; the agent's never are.
                let _ = self.aggs[g].tracker.on_payload(&device, &bytes, wall(now, 0));
                self.presence_dirty(g);
            }
        }
        self.log.log(now, Kind::Presence, a as u64, bytes.len() as u64, 0);
        self.metrics.presence_published += 1;
        self.agents[a].retained = Some(bytes);
    }

    /// Agent `a` publishes its presence on connection `gen` (at connect and
    /// on each heartbeat) and schedules the next heartbeat.
    fn presence_beat(&mut self, a: usize, gen: u64) {
        self.publish_presence(a, gen);
        let hb = self.sc.presence_heartbeat.0;
        if hb > 0 {
            self.q.push(self.now() + hb, Ev::Heartbeat(a, gen));
        }
    }

    /// Agent `a` publishes its presence (retained, QoS 1) on connection `gen`.
    fn publish_presence(&mut self, a: usize, gen: u64) {
        let now = self.now();
        let s = &self.agents[a];
        let Some(n) = &s.node else { return };
        let bytes = n.agent.presence(true, wall(now, s.setup.skew.get()));
        let epoch = n.agent.replica().epoch;
        let t = now + s.link.spec.latency.0;
        self.agents[a].presence_epoch = Some(epoch);
        self.q.push(t, Ev::Presence { a, gen, bytes });
    }

    /// `presence-order`: after the cloud merged presence updates, each
    /// device's record holds, of what it held before and what was sent,
    /// the presence that arrived last at an aggregator (by `observed_ms`;
    /// on a tie, either) and the later last-seen: a late copy never wins
    /// over a newer one, and a newer one is never refused (a last will's
    /// stale `ts_ms` must not decide).
    fn check_presence_order(
        &self,
        devices: &[DeviceRef],
        updates: &[(DeviceRef, cloud_sink::fleet::PresenceUpdate)],
        before: Vec<Option<cloud_sink::fleet::PresenceRecord>>,
    ) -> Result<()> {
        let after = self.cloud.catalog.presence_records(devices)?;
        for (((d, u), old), rec) in updates.iter().zip(before).zip(after) {
            let Some(rec) = rec else {
                return Err(violation(
                    "presence-order",
                    format!("{d}: presence sent, none recorded"),
                ));
            };
            let old_p = old.as_ref().and_then(|o| o.presence.as_ref());
            let want_observed = old_p
                .map(|p| p.observed_ms)
                .into_iter()
                .chain(u.presence.as_ref().map(|p| p.observed_ms))
                .max();
            let want_seen = old.as_ref().map_or(0, |o| o.last_seen_ms).max(u.last_seen_ms);
            let got_observed = rec.presence.as_ref().map(|p| p.observed_ms);
            if got_observed != want_observed || rec.last_seen_ms != want_seen {
                return Err(violation(
                    "presence-order",
                    format!("{d}: held {old:?}, sent {u:?}, the cloud kept {rec:?}"),
                ));
            }
        }
        Ok(())
    }

    /// Aggregator `g`'s tracker has entries to send: flush them a second
    /// from now (`FLUSH_EVERY`), unless a flush is already due.
    fn presence_dirty(&mut self, g: usize) {
        let now = self.now();
        let slot = &mut self.aggs[g];
        // Never before a failed flush's back-off is over (`forward_loop`
        // sleeps it out).
        let t = (now + FLUSH_EVERY).max(slot.presence_retry_at);
        if slot.presence_flush.is_none_or(|f| f > t) && slot.tracker.pending() > 0 {
            slot.presence_flush = Some(t);
            self.q.push(t, Ev::PresenceFlush(g, slot.gen, t));
        }
    }

    /// `aggregator::presence::forward_loop`: aggregator `g` sends its
    /// changed entries to the cloud (`POST /v1/presence`: the body is
    /// serialized and parsed by the sink's own `fleet::parse_updates`, then
    /// `Catalog::put_presence`), at most `MAX_POST` a request. A failure
    /// puts them back and backs off (0.5 s doubling to 30 s). Every
    /// `REFRESH_EVERY` a post is due even with nothing to send (a probe);
    /// an answer naming another presence view than before (the cloud
    /// restarted) marks everything to be sent again.
    fn on_presence_flush(&mut self, g: usize, gen: u64, t: Ms) -> Result<()> {
        let now = self.now();
        let slot = &mut self.aggs[g];
        if slot.gen != gen || slot.presence_flush != Some(t) || slot.node.is_none() {
            return Ok(());
        }
        slot.presence_flush = None;
        if now >= slot.presence_refresh_at {
            slot.presence_probe |= slot.tracker.refresh_due();
            slot.presence_refresh_at = now + REFRESH_EVERY;
        }
        let tracker = slot.tracker.clone();
        let mut failed = false;
        for _ in 0..1000 {
            let batch = tracker.take_dirty(aggregator::presence::MAX_POST);
            if batch.is_empty() && !self.aggs[g].presence_probe {
                self.aggs[g].presence_backoff = PRESENCE_RETRY_FIRST;
                break;
            }
            if self.side_request_fails(now, true) {
                tracker.retry(&batch);
                let slot = &mut self.aggs[g];
                failed = true;
                slot.presence_retry_at = now + slot.presence_backoff;
                slot.presence_backoff = (slot.presence_backoff * 2).min(PRESENCE_RETRY_MAX);
                self.log
                    .log(now, Kind::Presence, 1000 + g as u64, batch.len() as u64, 0);
                break;
            }
            let body = serde_json::to_vec(&batch)?;
            let updates = cloud_sink::fleet::parse_updates(&body, wall(now, 0))
                .map_err(|e| anyhow!("the sink refused aggregator {g}'s presence: {e}"))?;
            let devices: Vec<DeviceRef> = updates.iter().map(|(d, _)| d.clone()).collect();
            let before = self.cloud.catalog.presence_records(&devices)?;
            let ack = self.cloud.catalog.put_presence(&updates)?;
            self.check_presence_order(&devices, &updates, before)?;
            self.aggs[g].presence_probe = false;
            tracker.sent(&batch);
            if tracker.sink_view(aggregator::presence::sink_view(&serde_json::to_vec(&ack)?)) {
                self.metrics.presence_resends += 1;
            }
            self.metrics.presence_sent += batch.len() as u64;
            self.log
                .log(now, Kind::Presence, 1000 + g as u64, batch.len() as u64, 1);
        }
        // The next flush: the retry, else the next probe.
        let slot = &mut self.aggs[g];
        let next = if failed {
            slot.presence_retry_at
        } else {
            slot.presence_refresh_at
        }
        .max(now + 1);
        slot.presence_flush = Some(next);
        self.q.push(next, Ev::PresenceFlush(g, gen, next));
        Ok(())
    }

    fn on_connect(&mut self, a: usize, gen: u64) -> Result<()> {
        if self.agents[a].gen != gen || !self.agents[a].connecting {
            return Ok(());
        }
        self.agents[a].connecting = false;
        if !self.agent_online(a) {
            return Ok(());
        }
        let now = self.now();
        let s = &mut self.agents[a];
        s.conn = Some(gen);
        let present = s.session.exists;
        s.session.exists = true;
        s.announced = true;
        self.log.log(now, Kind::LinkUp, a as u64, gen, present as u64);
        if let Some(n) = &mut s.node {
            n.session.connected(now, &n.agent);
            // The last will goes with CONNECT and `online` is published once
            // subscribed. The daemon's will was built at its previous
            // presence publish (an older `ts_ms`); presence is ordered by
            // arrival, so only the stamp differs.
            s.will = self
                .sc
                .presence
                .then(|| n.agent.presence(false, wall(now, s.setup.skew.get())));
        }
        if self.sc.presence {
            self.presence_beat(a, gen);
        }
        // Deliver what the session kept while the client was away.
        let queued: Vec<Vec<u8>> = self.agents[a].session.queue.drain(..).collect();
        for m in queued {
            self.send_down(a, m);
        }
        self.pump(a)
    }

    /// Aggregator → broker → agent.
    fn send_down(&mut self, a: usize, bytes: Vec<u8>) {
        let now = self.now();
        let bound = self.sc.bounds.session_queue;
        let s = &mut self.agents[a];
        match s.conn {
            Some(gen) => {
                let faults = (!self.healing).then_some(&self.sc.faults);
                let fate = s.link.transmit(now, bytes.len(), false, faults, &mut self.rng_net);
                if fate.arrivals.is_empty() {
                    self.log.log(now, Kind::Drop, a as u64, 1, bytes.len() as u64);
                }
                if let Some(t) = fate.reset {
                    self.q.push(t, Ev::Reset(a, gen));
                }
                if fate.arrivals.len() > 1 {
                    self.log.log(now, Kind::Dup, a as u64, 1, bytes.len() as u64);
                }
                for t in fate.arrivals {
                    self.q.push(
                        t,
                        Ev::Down {
                            a,
                            gen,
                            bytes: bytes.clone(),
                        },
                    );
                }
            }
            None => {
                if !s.session.enqueue(bytes, bound) {
                    self.log.log(now, Kind::Drop, a as u64, 2, 0);
                }
            }
        }
    }

    /// Runs the client session until it has nothing more to send.
    fn pump(&mut self, a: usize) -> Result<()> {
        let now = self.now();
        let Some(gen) = self.agents[a].conn else {
            self.reschedule_timer(a);
            return Ok(());
        };
        let mut out = Vec::new();
        let mut store_error = false;
        let mut poisoned = false;
        {
            let Some(n) = &mut self.agents[a].node else {
                return Ok(());
            };
            for _ in 0..10_000 {
                match n.session.poll_transmit(now, &mut n.agent) {
                    Ok(Some(m)) => {
                        // No bandwidth caps or budgets in the sim's policy:
                        // charge at once so budget accounting runs as in the daemon.
                        let charges = n.agent.take_charges();
                        if !charges.is_empty() {
                            let _ = n.agent.charge(&charges);
                        }
                        out.push(m)
                    }
                    Ok(None) => break,
                    Err(e) => {
                        // A store error (full disk, ...): as the daemon does,
                        // drop the connection and try again 5 s later.
                        self.log.log(now, Kind::Error, a as u64, 1, 0);
                        tracing::debug!(agent = a, "poll_transmit: {e}");
                        poisoned |= needs_reopen(&e);
                        store_error = true;
                        break;
                    }
                }
            }
            while n.session.poll_event().is_some() {}
        }
        if poisoned {
            return self.process_exit(a);
        }
        if store_error {
            self.disconnect(a);
            let s = &mut self.agents[a];
            s.connecting = true;
            s.gen += 1;
            let g2 = s.gen;
            self.q.push(now + 5 * SECOND, Ev::Connect(a, g2));
        }
        for m in out {
            let bytes = m.encode()?;
            self.metrics.msgs_up += 1;
            let faults = self.faults().cloned();
            let fate = self.agents[a]
                .link
                .transmit(now, bytes.len(), true, faults.as_ref(), &mut self.rng_net);
            self.log
                .log(now, Kind::Send, a as u64, m.kind().len() as u64, bytes.len() as u64);
            if fate.arrivals.is_empty() {
                self.log.log(now, Kind::Drop, a as u64, 0, bytes.len() as u64);
            }
            if let Some(t) = fate.reset {
                self.q.push(t, Ev::Reset(a, gen));
            }
            for t in fate.arrivals {
                self.q.push(
                    t,
                    Ev::Up {
                        a,
                        gen,
                        bytes: bytes.clone(),
                    },
                );
            }
        }
        self.reschedule_timer(a);
        Ok(())
    }

    fn reschedule_timer(&mut self, a: usize) {
        let s = &mut self.agents[a];
        let t = s.node.as_ref().and_then(|n| n.session.poll_timeout());
        if let Some(t) = t {
            if s.timer != Some(t) {
                s.timer = Some(t);
                self.q.push(t.max(self.clock.now()), Ev::Timer(a, t));
            }
        } else {
            s.timer = None;
        }
    }

    fn on_up(&mut self, a: usize, gen: u64, bytes: Vec<u8>) -> Result<()> {
        // A message still on the wire when its connection died is lost.
        if self.agents[a].conn != Some(gen) {
            return Ok(());
        }
        let now = self.now();
        let g = self.agents[a].agg;
        let device = self.agents[a].setup.device.clone();
        if self.aggs[g].node.is_none() {
            return Ok(());
        }
        self.log.log(now, Kind::Deliver, a as u64, 0, bytes.len() as u64);
        let msg = match Message::decode(&bytes) {
            Ok(m) => m,
            Err(e) => return Err(anyhow!("aggregator could not decode a message the agent encoded: {e}")),
        };
        if let Message::Hello(h) = &msg {
            self.hello_lookup(g, a, h.server_cursor)?;
        }
        if self.sc.presence {
            self.aggs[g].tracker.seen(&device, wall(now, 0));
            self.agents[a].last_up_ms = wall(now, 0);
            self.presence_dirty(g);
        }
        let Some(node) = &mut self.aggs[g].node else {
            return Ok(());
        };
        if self.trace == Some(a) {
            eprintln!("{now:>10} agg{g} <- a{a}: {}", describe(&msg));
        }
        let replies = match node.handle(now, &device, msg) {
            Ok(r) => r,
            Err(e) => {
                // A store error (e.g. disk) is a failed request: no PUBACK, no answer.
                self.log.log(now, Kind::Error, 1000 + g as u64, 0, 0);
                tracing::debug!(agg = g, "handle: {e}");
                return Ok(());
            }
        };
        for r in replies {
            if let Message::Committed(c) = &r {
                self.aggs[g].acked.union_with(&c.regional);
                // New changes to forward: poll the forward core soon.
                let t = now + 1;
                if self.aggs[g].fwd_timer.is_some_and(|f| f > t) {
                    self.aggs[g].fwd_timer = Some(t);
                    self.q.push(t, Ev::Forward(g, t));
                }
            }
            let b = r.encode()?;
            self.metrics.msgs_down += 1;
            self.send_down(a, b);
        }
        Ok(())
    }

    fn on_down(&mut self, a: usize, gen: u64, bytes: Vec<u8>) -> Result<()> {
        if self.agents[a].conn != Some(gen) {
            return Ok(());
        }
        let now = self.now();
        let msg = Message::decode(&bytes).map_err(|e| anyhow!("agent could not decode: {e}"))?;
        self.log.log(now, Kind::Deliver, a as u64, 1, bytes.len() as u64);
        if self.trace == Some(a) {
            eprintln!("{now:>10} a{a} <- {}", describe(&msg));
        }
        {
            let Some(n) = &mut self.agents[a].node else {
                return Ok(());
            };
            if let Err(e) = n.session.handle(now, msg, &mut n.agent) {
                self.log.log(now, Kind::Error, a as u64, 2, 0);
                tracing::debug!(agent = a, "handle: {e}");
                if needs_reopen(&e) {
                    return self.process_exit(a);
                }
            }
        }
        // The daemon re-publishes presence when what it says changed (at
        // most every 10 s; here at once, and only for a new epoch, e.g.
        // after a rollback was detected: the rest only refreshes figures).
        let epoch = self.agents[a].node.as_ref().map(|n| n.agent.replica().epoch);
        if self.sc.presence && epoch.is_some() && epoch != self.agents[a].presence_epoch {
            self.publish_presence(a, gen);
        }
        self.after_knowledge(a)?;
        self.pump(a)
    }

    /// The agent may have learned of new cloud durability: check it against
    /// the catalog (nothing acknowledged end to end may be missing there)
    /// and record time-to-cloud-durable.
    fn after_knowledge(&mut self, a: usize) -> Result<()> {
        let now = self.now();
        let s = &mut self.agents[a];
        let (Some(n), Some(rep)) = (&s.node, &s.replica) else {
            return Ok(());
        };
        let set = n.session.cloud().get(rep);
        let hi = match set.ranges().first() {
            Some((1, hi)) => *hi,
            _ => 0,
        };
        if hi <= s.cloud_acked {
            return Ok(());
        }
        let cat = self.cloud.catalog.knowledge(std::slice::from_ref(&rep.device))?;
        let have = cat.get(rep);
        for seq in s.cloud_acked + 1..=hi {
            if !have.contains(seq) {
                return Err(violation(
                    "acknowledged-not-lost",
                    format!(
                        "{} seq {seq} acknowledged as cloud-durable but not in the catalog",
                        rep.key()
                    ),
                ));
            }
        }
        self.log.log(now, Kind::CloudAck, a as u64, hi, 0);
        s.cloud_acked = hi;
        while let Some(&(lo, top, t)) = s.recorded.front() {
            if top > hi {
                break;
            }
            self.metrics.durable_ms.push((now - t, top - lo + 1));
            s.recorded.pop_front();
        }
        Ok(())
    }

    fn on_write(&mut self, a: usize) -> Result<()> {
        let now = self.now();
        let w = self.sc.workload[self.agents[a].wl].clone();
        let scale = self.sc.data_scale;
        let s = &mut self.agents[a];
        s.writes += 1;
        s.clean = false;
        let len = ((w.bytes as f64) * scale).max(1.0) as usize;
        let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_millis(super::nodes::wall(now, 0));
        let mut written = Vec::new();
        match w.kind {
            WorkloadKind::Append => {
                let i = s.wrng.gen_range(0..w.files);
                let p = s.setup.watch.join(format!("log{i}.log"));
                let data = content(&mut s.wrng, len, now);
                let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&p)?;
                f.write_all(&data)?;
                written.push((p, f));
            }
            WorkloadKind::Rewrite => {
                let i = s.wrng.gen_range(0..w.files);
                let p = s.setup.watch.join(format!("table{i}.dat"));
                let data = content(&mut s.wrng, len, now);
                std::fs::write(&p, &data)?;
                let f = std::fs::OpenOptions::new().write(true).open(&p)?;
                written.push((p, f));
            }
            WorkloadKind::Burst => {
                let dir = s.setup.watch.join(format!("burst{}", s.writes));
                std::fs::create_dir_all(&dir)?;
                let per = (len / w.burst_files.max(1)).max(1);
                for k in 0..w.burst_files {
                    let p = dir.join(format!("f{k}.bin"));
                    let data = content(&mut s.wrng, per, now);
                    std::fs::write(&p, &data)?;
                    let f = std::fs::OpenOptions::new().write(true).open(&p)?;
                    written.push((p, f));
                }
            }
            WorkloadKind::Shared => {
                let dir = s.setup.watch.join("shared");
                std::fs::create_dir_all(&dir)?;
                let i = s.wrng.gen_range(0..w.files);
                // Paths of the workload and group: the group's gateways write
                // the same ones (concurrent versions of one shared path).
                // Group 0 of the first shared workload keeps the plain names.
                let first = self.sc.workload.iter().position(|w| w.kind == WorkloadKind::Shared) == Some(s.wl);
                let name = match (first, s.group) {
                    (true, 0) => format!("line{i}.log"),
                    (true, k) => format!("line{i}-g{k}.log"),
                    (false, k) => format!("line{i}-w{}-g{k}.log", s.wl),
                };
                let p = dir.join(name);
                let data = content(&mut s.wrng, len, now);
                std::fs::write(&p, &data)?;
                let f = std::fs::OpenOptions::new().write(true).open(&p)?;
                written.push((p, f));
            }
        }
        let mut bytes = 0u64;
        for (p, _) in &written {
            if !s.written.contains(p) {
                s.written.insert(p.clone());
            }
        }
        for (_, f) in &written {
            f.set_modified(mtime)?;
            bytes += f.metadata()?.len();
        }
        self.metrics.written_bytes += len as u64;
        self.log.log(now, Kind::Write, a as u64, written.len() as u64, bytes);
        if !self.healing {
            let next = now + exp_ms(&mut self.agents[a].wrng, w.every.0);
            if next < self.end {
                self.q.push(next, Ev::Write(a));
            }
        }
        Ok(())
    }

    fn on_scan(&mut self, a: usize) -> Result<()> {
        let now = self.now();
        let interval = self.sc.scan_interval.0;
        let verify = self.sc.verify_scan_skips;
        let healing = self.healing;
        let s = &mut self.agents[a];
        // The first scan after the heal always runs (it is what says that
        // everything on disk is recorded).
        // A supersede or a new epoch since the last scan asks for a rescan.
        let skip =
            s.clean && (!healing || s.scanned_after_heal) && s.node.as_ref().is_some_and(|n| !n.agent.rescan_needed());
        if let Some(n) = &mut s.node {
            if skip {
                self.metrics.scans_skipped += 1;
            }
            if skip && !verify {
                self.log.log(now, Kind::Scan, a as u64, 0, 0);
            } else {
                match n.agent.scan_once() {
                    Ok(rep) => {
                        // Re-reading a racy file (mtime too close to the scan's
                        // clock) that turns out unchanged records nothing.
                        if skip && rep.changes_recorded > 0 {
                            return Err(violation(
                                "scan-skip",
                                format!(
                                    "agent {a}: a scan the simulator would have skipped recorded {} changes",
                                    rep.changes_recorded
                                ),
                            ));
                        }
                        let next = n.agent.next_seq();
                        if next > s.next_seq {
                            s.recorded.push_back((s.next_seq, next - 1, now));
                        }
                        s.next_seq = next;
                        if rep.changes_recorded > 0 {
                            n.session.wake();
                        }
                        if healing {
                            s.scanned_after_heal = true;
                        }
                        s.clean = rep.files_skipped == 0 && !n.agent.rescan_needed();
                        self.log
                            .log(now, Kind::Scan, a as u64, rep.changes_recorded, rep.bytes_chunked);
                        // The disk watermarks, after each scan as the daemon does.
                        match n.agent.enforce_disk() {
                            Ok(Some(st)) if st.pruned_files > 0 => {
                                s.clean = false;
                                self.metrics.pruned_files += st.pruned_files;
                                self.log
                                    .log(now, Kind::Prune, a as u64, st.pruned_files, st.pruned_bytes);
                                self.check_pruned(a)?;
                            }
                            Ok(_) => {}
                            Err(e) => {
                                self.log.log(now, Kind::Error, a as u64, 4, 0);
                                tracing::debug!(agent = a, "enforce_disk: {e}");
                            }
                        }
                    }
                    Err(e) => {
                        s.clean = false;
                        self.log.log(now, Kind::Error, a as u64, 3, 0);
                        tracing::debug!(agent = a, "scan: {e}");
                        if needs_reopen(&e) {
                            return self.process_exit(a);
                        }
                    }
                }
            }
        }
        if !self.healing || now < self.end + self.sc.heal.0 {
            self.q.push(now + interval, Ev::Scan(a));
        }
        self.pump(a)
    }

    /// `pruned-only-durable`: every written file gone from the watch folder
    /// was pruned by the agent, and the pruned version is in the catalog.
    fn check_pruned(&mut self, a: usize) -> Result<()> {
        let s = &self.agents[a];
        let Some(n) = &s.node else { return Ok(()) };
        let dev = &s.setup.device;
        let have = self.cloud.catalog.knowledge(std::slice::from_ref(dev))?;
        for p in &s.written {
            if p.exists() {
                continue;
            }
            let rel = p.strip_prefix(&s.setup.watch)?.to_string_lossy().replace('\\', "/");
            let path = format!("data/{rel}");
            let Some(pf) = n.agent.pruned(&path)? else {
                return Err(violation(
                    "pruned-only-durable",
                    format!("{dev}: {path} is gone from the gateway but not recorded as pruned"),
                ));
            };
            let rep = ReplicaId {
                device: dev.clone(),
                epoch: pf.epoch,
            };
            if !have.get(&rep).contains(pf.seq) {
                return Err(violation(
                    "pruned-only-durable",
                    format!(
                        "{dev}: {path} was pruned at version {} seq {} which the catalog does not hold",
                        pf.epoch, pf.seq
                    ),
                ));
            }
        }
        Ok(())
    }

    fn sink_down(&self, now: Ms) -> bool {
        now < self.cloud_down_until
            || (!self.healing
                && self
                    .sc
                    .faults
                    .sink_outages
                    .iter()
                    .any(|w| now >= w.start.0 && now < w.start.0 + w.len.0))
    }

    /// Asks aggregator `g`'s forward core for its next request; the cloud
    /// handles it at once and the answer arrives a round trip later.
    fn poll_forward(&mut self, g: usize) -> Result<()> {
        let now = self.now();
        let down = self.sink_down(now);
        let error_p = if self.healing { 0.0 } else { self.sc.faults.sink_error };
        let slot = &mut self.aggs[g];
        let Some(node) = &mut slot.node else {
            return Ok(());
        };
        let wnow = wall(now, 0);
        match node.core.poll_request(wnow, &node.store) {
            Ok(Some(req)) => {
                let req_id = req.req_id();
                // A sink outage: the request does not reach the cloud. A
                // sink error: one time in three the same; otherwise the
                // cloud's object store fails after 0-2 writes (the request
                // dies half-way inside the real sink).
                let fail = down || (error_p > 0.0 && self.rng_sink.gen_bool(error_p));
                let store_fault = fail && !down && self.rng_sink.gen_range(0..3) > 0;
                if store_fault {
                    let k = self.rng_sink.gen_range(0..3);
                    self.cloud.objects.fail_after(k);
                    self.log
                        .log(now, Kind::SinkError, 1000 + g as u64, req_id, 1 + u64::from(k));
                }
                let outcome = if fail && !store_fault {
                    self.log.log(now, Kind::SinkError, 1000 + g as u64, req_id, 0);
                    Err("simulated sink error".to_string())
                } else {
                    match req {
                        SinkRequest::PutPack { id_hex, bytes, .. } => {
                            self.metrics.cloud_bytes += bytes.len() as u64;
                            let id = Hash32::from_hex(&id_hex).map_err(|e| anyhow!("pack id: {e}"))?;
                            self.cloud
                                .put_pack(id, bytes)
                                .map(|_| SinkResponse::Stored)
                                .map_err(|e| format!("{e:#}"))
                        }
                        SinkRequest::Sync { message, .. } => {
                            self.metrics.cloud_bytes += message.encode().map(|b| b.len() as u64).unwrap_or(0);
                            self.cloud
                                .sync(now, &message)
                                .map(SinkResponse::Reply)
                                .map_err(|e| format!("{e:#}"))
                        }
                    }
                };
                if store_fault {
                    self.cloud.objects.heal();
                }
                let gen = slot.gen;
                slot.fwd_timer = None;
                self.q.push(
                    now + self.sc.sink_rtt.0,
                    Ev::SinkReply {
                        g,
                        gen,
                        req_id,
                        outcome,
                    },
                );
            }
            Ok(None) => {
                if let Some(t) = node.core.poll_timeout() {
                    // The core polls its store every ~250 ms when idle; the
                    // sim polls at most every `forward_idle` and is woken at
                    // once when an agent's batch commits.
                    let t = t
                        .saturating_sub(super::core::EPOCH_UNIX_MS)
                        .max(now + self.sc.forward_idle.0);
                    if slot.fwd_timer != Some(t) {
                        slot.fwd_timer = Some(t);
                        self.q.push(t, Ev::Forward(g, t));
                    }
                }
            }
            Err(e) => {
                self.log.log(now, Kind::Error, 1000 + g as u64, 1, 0);
                tracing::debug!(agg = g, "forward: {e}");
                if let Some(t) = node.core.poll_timeout() {
                    let t = t.saturating_sub(super::core::EPOCH_UNIX_MS).max(now + 1);
                    slot.fwd_timer = Some(t);
                    self.q.push(t, Ev::Forward(g, t));
                }
            }
        }
        Ok(())
    }

    fn on_sink_reply(
        &mut self,
        g: usize,
        gen: u64,
        req_id: u64,
        outcome: std::result::Result<SinkResponse, String>,
    ) -> Result<()> {
        let now = self.now();
        let slot = &mut self.aggs[g];
        if slot.gen != gen {
            return Ok(());
        }
        let Some(node) = &mut slot.node else {
            return Ok(());
        };
        let ok = outcome.is_ok();
        let notices = match node.core.on_response(wall(now, 0), &node.store, req_id, outcome) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(agg = g, "forward: {e}");
                Vec::new()
            }
        };
        if ok {
            self.log
                .log(now, Kind::Forward, 1000 + g as u64, req_id, notices.len() as u64);
        }
        for n in notices {
            let Some(a) = self.agent_index(&n.device) else { continue };
            let b = n.message.encode()?;
            self.send_down(a, b);
        }
        self.poll_forward(g)
    }

    /// A sink request other than the forwarder's (Hello lookup, change
    /// poll) fails: during a sink outage, and at the scenario's
    /// `sink_error` rate before the heal.
    fn side_request_fails(&mut self, now: Ms, presence: bool) -> bool {
        let error_p = if self.healing { 0.0 } else { self.sc.faults.sink_error };
        if self.sink_down(now) {
            return true;
        }
        let rng = if presence {
            &mut self.rng_presence
        } else {
            &mut self.rng_lookup
        };
        error_p > 0.0 && rng.gen_bool(error_p)
    }

    /// `aggregator::mqtt::CloudLookup` at agent `a`'s Hello to aggregator
    /// `g`: what the cloud holds of the device joins the aggregator's cloud
    /// knowledge (an agent that moved here re-sends nothing the cloud has),
    /// and the server changes after the Hello's cursor are stashed for the
    /// answer (shared-path heads, central metadata). The daemon's Hello
    /// waits a sink round trip for this; here it takes no virtual time. A
    /// failure only costs the optimisation, and the aggregator then answers
    /// Hellos from local knowledge alone for 30 s, as the daemon does.
    fn hello_lookup(&mut self, g: usize, a: usize, cursor: Option<u64>) -> Result<()> {
        let now = self.now();
        if now < self.aggs[g].lookup_quiet_until {
            return Ok(());
        }
        if self.side_request_fails(now, false) {
            self.aggs[g].lookup_quiet_until = now + LOOKUP_QUIET;
            self.log.log(now, Kind::Lookup, 1000 + g as u64, a as u64, 0);
            return Ok(());
        }
        let device = self.agents[a].setup.device.clone();
        let k = self.cloud.catalog.knowledge(std::slice::from_ref(&device))?;
        let changes = cursor
            .map(|after| self.cloud.catalog.device_changes(&device, after))
            .transpose()?;
        let Some(node) = &self.aggs[g].node else {
            return Ok(());
        };
        if !k.map.is_empty() {
            if let Err(e) = node.store.merge_cloud(&k) {
                // The daemon logs it and answers from what it has.
                self.log.log(now, Kind::Error, 1000 + g as u64, 2, 0);
                tracing::debug!(agg = g, "storing cloud knowledge: {e}");
            }
        }
        let n = changes.as_ref().map_or(0, |c| c.items.len() as u64);
        if let Some(ch) = changes {
            node.store.stash_changes(&device, ch);
        }
        self.metrics.server_changes_hello += n;
        self.log.log(now, Kind::Lookup, 1000 + g as u64, a as u64, 1 + n);
        Ok(())
    }

    fn schedule_changes_poll(&mut self, g: usize) {
        let every = self.sc.changes_poll.0;
        if every > 0 {
            let gen = self.aggs[g].gen;
            self.q.push(self.now() + every, Ev::ChangesPoll(g, gen));
        }
    }

    /// `aggregator::mqtt::changes_loop`: aggregator `g` asks the cloud for
    /// the server changes after its cursor, page by page, and pushes each
    /// device's share through the broker as a `Changes` without `upto` (a
    /// push moves no cursor; the Hello answer is what a device can rely
    /// on). It pushes to the gateways its presence tracker knows (they
    /// published presence, retained and unshared, or sent it a message);
    /// without simulated presence, to every gateway that has ever connected.
    fn on_changes_poll(&mut self, g: usize, gen: u64) -> Result<()> {
        if self.aggs[g].gen != gen || self.aggs[g].node.is_none() {
            return Ok(());
        }
        let now = self.now();
        self.schedule_changes_poll(g);
        if self.side_request_fails(now, false) {
            return Ok(());
        }
        for _ in 0..1000 {
            let page = self.cloud.catalog.fleet_changes(self.aggs[g].changes_cursor, 1000)?;
            let mut per: BTreeMap<usize, Vec<protocol::meta::ServerChange>> = BTreeMap::new();
            for it in page.items {
                let Some(a) = self.agent_index(&it.device) else {
                    continue;
                };
                // The daemon pushes to devices its presence tracker knows.
                let known = if self.sc.presence {
                    self.aggs[g].tracker.get(&it.device).is_some()
                } else {
                    self.agents[a].announced
                };
                if it.change.body.validate().is_ok() && known {
                    per.entry(a).or_default().push(it.change);
                }
            }
            for (a, items) in per {
                let n = items.len() as u64;
                let b = Message::Changes(Changes { items, upto: None }).encode()?;
                self.metrics.msgs_down += 1;
                self.metrics.server_changes_pushed += n;
                self.log.log(now, Kind::Push, a as u64, n, 1000 + g as u64);
                self.send_down(a, b);
            }
            let slot = &mut self.aggs[g];
            slot.changes_cursor = slot.changes_cursor.max(page.upto);
            if !page.more {
                break;
            }
        }
        Ok(())
    }

    fn agent_index(&self, d: &DeviceRef) -> Option<usize> {
        let s = d.device.as_str().strip_prefix("gw")?;
        let i: usize = s.parse().ok()?;
        (i < self.agents.len()).then_some(i)
    }

    fn on_crash(&mut self, a: usize) -> Result<()> {
        let now = self.now();
        self.disconnect(a);
        let torn = self.sc.faults.torn_writes;
        let s = &mut self.agents[a];
        if let Some(node) = s.node.take() {
            self.metrics.changes_refreshes += node.session.stats.changes_refreshes;
            // Power cut: unsynced pages are gone (or some survive, torn), and
            // the dead process can no longer write.
            if torn {
                let rng = &mut self.rng_fault;
                s.setup.disk.crash_keeping(|_| rng.gen_bool(0.5));
            } else {
                s.setup.disk.crash();
            }
            node.agent.crash();
            s.restarts += 1;
            self.metrics.crashes += 1;
            self.log.log(now, Kind::Crash, a as u64, 0, 0);
            if self.trace == Some(a) {
                eprintln!("{now:>10} a{a} CRASH");
            }
            let back = now + self.sc.faults.restart_after.0;
            self.q.push(back, Ev::Restart(a));
        }
        let r = self.sc.faults.agent_crash_per_day;
        self.schedule_rate(r, now, Ev::Crash(a));
        Ok(())
    }

    /// The agent's redb refuses every write after a failed write (a full
    /// disk): "Previous I/O error occurred. Please close and re-open the
    /// database". The process exits and its supervisor starts it again 5 s
    /// later: no power cut, so the storage keeps what was written.
    fn process_exit(&mut self, a: usize) -> Result<()> {
        let now = self.now();
        self.disconnect(a);
        if let Some(node) = self.agents[a].node.take() {
            self.metrics.changes_refreshes += node.session.stats.changes_refreshes;
            node.agent.crash();
            self.metrics.process_exits += 1;
            self.log.log(now, Kind::Crash, a as u64, 1, 0);
            self.q.push(now + 5 * SECOND, Ev::Restart(a));
        }
        Ok(())
    }

    fn on_restart(&mut self, a: usize) -> Result<()> {
        let now = self.now();
        if self.agents[a].node.is_some() {
            return Ok(());
        }
        self.open_agent(a)?;
        self.log.log(now, Kind::Restart, a as u64, self.agents[a].next_seq, 0);
        if self.trace == Some(a) {
            let n = self.agents[a]
                .node
                .as_ref()
                .map(|n| (n.agent.replica().epoch, n.agent.next_seq()));
            eprintln!("{now:>10} a{a} RESTART {n:?}");
        }
        self.try_connect(a);
        Ok(())
    }

    fn on_session_loss(&mut self) -> Result<()> {
        let now = self.now();
        self.log.log(now, Kind::SessionLoss, 0, 0, 0);
        self.metrics.session_losses += 1;
        // A broker restart: every client is cut off and every session (and
        // what it queued) is gone, and with it, as Mosquitto keeps no
        // state by default, the retained presence and the wills (a broker
        // that stops publishes none).
        for a in 0..self.agents.len() {
            self.disconnect_with(a, false);
            self.agents[a].session = Session::default();
            self.agents[a].retained = None;
        }
        for a in 0..self.agents.len() {
            self.try_connect(a);
        }
        let r = self.sc.faults.session_loss_per_day;
        self.schedule_rate(r, now, Ev::SessionLoss);
        Ok(())
    }

    fn on_agg_crash(&mut self, g: usize) -> Result<()> {
        let now = self.now();
        if let Some(node) = self.aggs[g].node.take() {
            // Power cut first: the crash fences the dead process's handle,
            // so dropping its database afterwards cannot flush anything (a
            // drop before the crash would be a clean shutdown).
            self.aggs[g].disk.crash();
            drop(node);
            self.aggs[g].gen += 1;
            self.aggs[g].fwd_timer = None;
            self.log.log(now, Kind::Failover, 1000 + g as u64, 0, 0);
            self.metrics.agg_crashes += 1;
            let back = now + self.sc.faults.agg_down_for.0;
            self.q.push(back, Ev::AggRestart(g));
            // Its agents fail over to the next aggregator that is up. (Their
            // broker connections would survive; the simulator reconnects
            // them to route them anew, without publishing their wills.)
            let n = self.aggs.len();
            for a in 0..self.agents.len() {
                if self.agents[a].agg != g {
                    continue;
                }
                self.disconnect_with(a, false);
                if let Some(h) = (1..n).map(|k| (g + k) % n).find(|h| self.aggs[*h].node.is_some()) {
                    self.agents[a].agg = h;
                }
                self.try_connect(a);
            }
        }
        let r = self.sc.faults.agg_crash_per_day;
        self.schedule_rate(r, now, Ev::AggCrash(g));
        Ok(())
    }

    /// Power cut in the cloud: the catalog loses what it had not synced (the
    /// disk crashes before the old node is dropped, so nothing is flushed
    /// on the way down), a new node opens on what survived, and no request
    /// reaches it for `cloud_down_for`. Everything an agent was told is
    /// cloud-durable must still be in the catalog.
    fn on_cloud_crash(&mut self) -> Result<()> {
        let now = self.now();
        self.cloud_disk.crash();
        let objects = self.cloud.objects.clone();
        let node = CloudNode::open(self.clock.clone(), &self.cloud_disk, objects)?;
        drop(std::mem::replace(&mut self.cloud, node));
        self.cloud_down_until = now + self.sc.faults.cloud_down_for.0;
        self.metrics.cloud_crashes += 1;
        self.log.log(now, Kind::Crash, 2000, 0, 0);
        let devices: Vec<DeviceRef> = self
            .agents
            .iter()
            .filter(|s| s.cloud_acked > 0)
            .map(|s| s.setup.device.clone())
            .collect();
        let have = self.cloud.catalog.knowledge(&devices)?;
        for s in &self.agents {
            let Some(rep) = &s.replica else { continue };
            let set = have.get(rep);
            if let Some(seq) = (1..=s.cloud_acked).find(|q| !set.contains(*q)) {
                return Err(violation(
                    "acknowledged-not-lost",
                    format!(
                        "{} seq {seq} was acknowledged as cloud-durable and a cloud crash lost it",
                        rep.key()
                    ),
                ));
            }
        }
        let r = self.sc.faults.cloud_crash_per_day;
        self.schedule_rate(r, now, Ev::CloudCrash);
        Ok(())
    }

    fn on_agg_restart(&mut self, g: usize) -> Result<()> {
        let now = self.now();
        let slot = &mut self.aggs[g];
        if slot.node.is_some() {
            return Ok(());
        }
        let node = AggNode::open(
            &slot.dir,
            &slot.disk,
            g,
            self.clock.clone(),
            self.sc.pack_max_delay.0,
            self.sc.bugs.ack_before_fsync,
        )?;
        // Nothing the aggregator acknowledged as regionally durable is lost.
        let devices: Vec<DeviceRef> = slot.acked.map.keys().map(|r| r.device.clone()).collect();
        let (regional, _) = node.store.knowledge_of(&devices)?;
        for (rep, set) in &slot.acked.map {
            let have = regional.get(rep);
            for &(lo, hi) in set.ranges() {
                for seq in lo..=hi {
                    if !have.contains(seq) {
                        return Err(violation(
                            "acknowledged-not-lost",
                            format!("aggregator {g} lost {} seq {seq} it had acknowledged", rep.key()),
                        ));
                    }
                }
            }
        }
        slot.node = Some(node);
        slot.reset_process(g, now);
        // Subscribing brings every retained presence.
        let tracker = slot.tracker.clone();
        for a in 0..self.agents.len() {
            if let Some(p) = &self.agents[a].retained {
                let _ = tracker.on_payload(&self.agents[a].setup.device, p, wall(now, 0));
            }
        }
        self.presence_dirty(g);
        self.log.log(now, Kind::Restart, 1000 + g as u64, 0, 0);
        self.poll_forward(g)?;
        self.schedule_changes_poll(g);
        for a in 0..self.agents.len() {
            if self.agents[a].agg == g {
                self.try_connect(a);
            }
        }
        Ok(())
    }

    fn on_sample(&mut self) -> Result<()> {
        let now = self.now();
        let mut backlog = 0u64;
        let mut offline = 0u64;
        for a in 0..self.agents.len() {
            let s = &self.agents[a];
            let pending = s.next_seq.saturating_sub(1).saturating_sub(s.cloud_acked);
            backlog += pending;
            if s.conn.is_none() {
                offline += 1;
            }
            let disk = s.setup.disk.size();
            if disk > self.sc.bounds.edge_state_bytes {
                return Err(violation(
                    "edge-bounds",
                    format!(
                        "agent {a} state file is {disk} bytes, over the bound {}",
                        self.sc.bounds.edge_state_bytes
                    ),
                ));
            }
            let m = &mut self.metrics.edge_peak[a];
            *m = (*m).max(disk);
            if let Some(n) = &s.node {
                let mem = agent_memory(n);
                if mem > self.sc.bounds.edge_memory_bytes {
                    return Err(violation(
                        "edge-bounds",
                        format!(
                            "agent {a} holds {mem} bytes in memory ({:?}), over the bound {}",
                            n.session.held(),
                            self.sc.bounds.edge_memory_bytes
                        ),
                    ));
                }
                let m = &mut self.metrics.edge_mem_peak[a];
                *m = (*m).max(mem);
            }
            let q = s.session.queue.len();
            if q > self.sc.bounds.session_queue {
                return Err(violation("edge-bounds", format!("agent {a} session queue {q}")));
            }
        }
        self.metrics.backlog.push((now, backlog, offline));
        let next = now + self.sc.sample_interval.0;
        if next <= self.end + self.sc.heal.0 {
            self.q.push(next, Ev::Sample);
        }
        Ok(())
    }

    fn on_heal(&mut self) -> Result<()> {
        let now = self.now();
        self.healing = true;
        self.cloud_down_until = 0;
        self.log.log(now, Kind::Heal, 0, 0, 0);
        for a in 0..self.agents.len() {
            let s = &mut self.agents[a];
            s.link.outages = 0;
            s.link.profile_up = true;
            s.setup.skew.0.store(0, std::sync::atomic::Ordering::Relaxed);
            s.setup.disk.set_capacity(None);
            s.disk_full = false;
            s.clean = false;
            if s.node.is_none() {
                self.open_agent(a)?;
            }
            self.try_connect(a);
            // A final write-free scan so everything on disk is recorded.
            self.q.push(now + 1, Ev::Scan(a));
        }
        for g in 0..self.aggs.len() {
            if self.aggs[g].node.is_none() {
                self.on_agg_restart(g)?;
            }
        }
        Ok(())
    }

    fn step(&mut self, ev: Ev) -> Result<()> {
        match ev {
            Ev::Write(a) => self.on_write(a),
            Ev::Scan(a) => self.on_scan(a),
            Ev::Timer(a, t) => {
                if self.agents[a].timer != Some(t) {
                    return Ok(());
                }
                self.agents[a].timer = None;
                let now = self.now();
                if let Some(n) = &mut self.agents[a].node {
                    n.session.handle_timeout(now, &n.agent);
                }
                self.pump(a)
            }
            Ev::Profile(a, up) => {
                if self.healing {
                    return Ok(());
                }
                let now = self.now();
                self.agents[a].link.profile_up = up;
                if let Some((t, u)) = self.agents[a].link.next_profile_change(now, &mut self.rng_link) {
                    self.q.push(t, Ev::Profile(a, u));
                }
                self.link_changed(a);
                Ok(())
            }
            Ev::Outage(a, start) => {
                if self.healing {
                    return Ok(());
                }
                let l = &mut self.agents[a].link;
                if start {
                    l.outages += 1;
                } else {
                    l.outages = l.outages.saturating_sub(1);
                }
                self.link_changed(a);
                Ok(())
            }
            Ev::Connect(a, gen) => self.on_connect(a, gen),
            Ev::Reset(a, gen) => {
                if self.agents[a].conn == Some(gen) {
                    self.disconnect(a);
                    self.try_connect(a);
                }
                Ok(())
            }
            Ev::Up { a, gen, bytes } => self.on_up(a, gen, bytes),
            Ev::Down { a, gen, bytes } => self.on_down(a, gen, bytes),
            Ev::Forward(g, t) => {
                if self.aggs[g].fwd_timer != Some(t) {
                    return Ok(());
                }
                self.aggs[g].fwd_timer = None;
                self.poll_forward(g)
            }
            Ev::SinkReply {
                g,
                gen,
                req_id,
                outcome,
            } => self.on_sink_reply(g, gen, req_id, outcome),
            Ev::ChangesPoll(g, gen) => self.on_changes_poll(g, gen),
            Ev::Presence { a, gen, bytes } => {
                // A publish still in flight when its connection broke is
                // lost; the next connection publishes afresh.
                if self.agents[a].conn == Some(gen) {
                    self.presence_at_broker(a, bytes);
                }
                Ok(())
            }
            Ev::Heartbeat(a, gen) => {
                if self.agents[a].conn == Some(gen) {
                    self.presence_beat(a, gen);
                }
                Ok(())
            }
            Ev::PresenceFlush(g, gen, t) => self.on_presence_flush(g, gen, t),
            Ev::Crash(a) => {
                if self.healing {
                    return Ok(());
                }
                self.on_crash(a)
            }
            Ev::Restart(a) => self.on_restart(a),
            Ev::SessionLoss => {
                if self.healing {
                    return Ok(());
                }
                self.on_session_loss()
            }
            Ev::AggCrash(g) => {
                if self.healing {
                    return Ok(());
                }
                self.on_agg_crash(g)
            }
            Ev::AggRestart(g) => self.on_agg_restart(g),
            Ev::CloudCrash => {
                if self.healing {
                    return Ok(());
                }
                self.on_cloud_crash()
            }
            Ev::DiskFull(a, on) => {
                // The state file cannot grow: redb commits that need room fail.
                let now = self.now();
                let full = on && !self.healing;
                self.agents[a].disk_full = full;
                self.agents[a].clean = false;
                let d = &self.agents[a].setup.disk;
                d.set_capacity(full.then(|| d.size()));
                self.log.log(now, Kind::DiskFull, a as u64, on as u64, 0);
                if on {
                    let len = self.sc.faults.disk_full_len.0;
                    self.q.push(now + len, Ev::DiskFull(a, false));
                    let r = self.sc.faults.disk_full_per_day;
                    self.schedule_rate(r, now + len, Ev::DiskFull(a, true));
                }
                Ok(())
            }
            Ev::ClockJump(a) => {
                if self.healing {
                    return Ok(());
                }
                let now = self.now();
                let max = self.sc.faults.clock_jump_max.0 as i64;
                let d = self.rng_fault.gen_range(-max..=max);
                self.agents[a].setup.skew.add(d);
                self.agents[a].clean = false;
                self.log.log(now, Kind::ClockJump, a as u64, d as u64, 0);
                let r = self.sc.faults.clock_jump_per_day;
                self.schedule_rate(r, now, Ev::ClockJump(a));
                Ok(())
            }
            Ev::Sample => self.on_sample(),
            Ev::Heal => self.on_heal(),
        }
    }

    fn link_changed(&mut self, a: usize) {
        if self.agent_online(a) {
            self.try_connect(a);
        } else {
            self.disconnect(a);
        }
    }

    /// True when nothing is left to move: every agent connected and idle,
    /// every aggregator's forward queue empty.
    fn quiescent(&mut self) -> Result<bool> {
        for s in &self.agents {
            let Some(n) = &s.node else { return Ok(false) };
            if !s.scanned_after_heal
                || n.agent.rescan_needed()
                || s.conn.is_none()
                || !n.session.is_idle()
                || s.next_seq.saturating_sub(1) > s.cloud_acked
            {
                return Ok(false);
            }
        }
        for g in &self.aggs {
            if let Some(n) = &g.node {
                if n.store.forward_len()? > 0 {
                    return Ok(false);
                }
            }
        }
        Ok(self.server_divergence()?.is_none() && self.presence_divergence()?.is_none())
    }

    /// `presence-converges`: every aggregator has sent its presence
    /// entries, and the cloud's fleet view shows every gateway `online`
    /// (all are connected now), with its current epoch and a last-seen
    /// time no older than its last up message's arrival at an aggregator
    /// (less the tracker's `LAST_SEEN_STEP_MS`). The first difference,
    /// described.
    fn presence_divergence(&self) -> Result<Option<String>> {
        if !self.sc.presence {
            return Ok(None);
        }
        for (g, slot) in self.aggs.iter().enumerate() {
            let n = slot.tracker.pending();
            if slot.node.is_some() && n > 0 {
                return Ok(Some(format!("aggregator {g} has {n} presence entries to send")));
            }
        }
        let rows = self.cloud.catalog.fleet(wall(self.now(), 0))?;
        let by: BTreeMap<String, &cloud_sink::fleet::FleetRow> = rows
            .iter()
            .map(|r| (format!("{}/{}/{}", r.tenant, r.site, r.device), r))
            .collect();
        let step = aggregator::presence::LAST_SEEN_STEP_MS;
        for (i, s) in self.agents.iter().enumerate() {
            let key = s.setup.device.key();
            let Some(r) = by.get(&key) else {
                return Ok(Some(format!("agent {i} ({key}) is not in the cloud's fleet view")));
            };
            // The agent's own (a rollback may start an epoch while connected).
            let epoch = s.node.as_ref().map(|n| n.agent.replica().epoch);
            let seen = r.last_seen_ms.unwrap_or(0);
            if r.state != "online" || r.epoch != epoch || seen + step < s.last_up_ms {
                return Ok(Some(format!(
                    "agent {i} ({key}) is connected with epoch {epoch:?}, its last up message arrived at {}; \
                     the fleet view says {} (aggregator {:?}), epoch {:?}, last seen {seen}",
                    s.last_up_ms, r.state, r.aggregator, r.epoch
                )));
            }
        }
        Ok(None)
    }

    /// `server-changes-converge`: every agent's server states (shared-path
    /// heads, central metadata) include the cloud's latest state of every
    /// target of its device. The first agent that lacks one, described.
    fn server_divergence(&self) -> Result<Option<String>> {
        for (i, s) in self.agents.iter().enumerate() {
            let Some(n) = &s.node else {
                return Ok(Some(format!("agent {i} is down")));
            };
            let mut cloud = Vec::new();
            let mut after = 0;
            // Paged as a Hello answer is (a cut answer's `upto` is its last item).
            for _ in 0..10_000 {
                let ch = self.cloud.catalog.device_changes(&s.setup.device, after)?;
                if ch.items.is_empty() {
                    break;
                }
                after = ch.upto.unwrap_or(u64::MAX);
                cloud.extend(ch.items);
            }
            if cloud.is_empty() {
                continue;
            }
            let have: BTreeMap<String, protocol::meta::ServerBody> = n
                .agent
                .server_states()?
                .into_iter()
                .map(|(target, _, body)| (target, body))
                .collect();
            for c in cloud {
                let target = c.body.target();
                let covered = have.get(&target).is_some_and(|b| {
                    let mut joined = b.clone();
                    joined.merge(&c.body);
                    &joined == b
                });
                if !covered {
                    return Ok(Some(format!(
                        "agent {i} ({}): {target} at gseq {} is {:?} in the cloud, {:?} at the agent (cursor {})",
                        s.setup.device,
                        c.gseq,
                        c.body,
                        have.get(&target),
                        protocol::client::ClientStore::server_cursor(&n.agent)
                    )));
                }
            }
        }
        Ok(None)
    }

    /// Runs to the end: the scenario, then the heal phase until quiescent
    /// (or its time is up), then the final checks.
    pub fn run(&mut self) -> Result<Option<Violation>> {
        self.start()?;
        let deadline = self.end + self.sc.heal.0;
        let mut last_quiet_check = 0;
        let mut steps: u64 = 0;
        let (mut last_t, mut same_t) = (u64::MAX, 0u64);
        while let Some((t, ev)) = self.q.pop() {
            if t > deadline {
                break;
            }
            self.clock.set(t);
            steps += 1;
            if let Err(e) = self.step(ev) {
                return match e.downcast::<Violation>() {
                    Ok(v) => Ok(Some(Violation { at: t, ..v })),
                    Err(e) => Err(e.context(format!("at virtual time {t} ms"))),
                };
            }
            if self.healing && t >= last_quiet_check + 10 * SECOND {
                last_quiet_check = t;
                if self.quiescent()? {
                    break;
                }
            }
            // Bounded: no livelock at one instant, no runaway run.
            if t == last_t {
                same_t += 1;
                if same_t > 1_000_000 {
                    return Ok(Some(Violation {
                        invariant: "progress",
                        detail: "a million events at one virtual instant (livelock)".into(),
                        at: t,
                    }));
                }
            } else {
                last_t = t;
                same_t = 0;
            }
            if steps > 200_000_000 {
                return Err(anyhow!("more than 200M events: runaway run"));
            }
        }
        self.metrics.events = steps;
        self.metrics.end_ms = self.now();
        self.metrics.changes_refreshes += self
            .agents
            .iter()
            .filter_map(|s| s.node.as_ref())
            .map(|n| n.session.stats.changes_refreshes)
            .sum::<u64>();
        self.finish()
    }

    /// Final invariants after the last heal.
    fn finish(&mut self) -> Result<Option<Violation>> {
        let now = self.now();
        if !self.quiescent()? {
            let stuck: Vec<String> = self
                .agents
                .iter()
                .enumerate()
                .filter(|(_, s)| {
                    s.next_seq.saturating_sub(1) > s.cloud_acked
                        || s.conn.is_none()
                        || !s.scanned_after_heal
                        || s.node
                            .as_ref()
                            .is_none_or(|n| n.agent.rescan_needed() || !n.session.is_idle())
                })
                .take(5)
                .map(|(i, s)| {
                    let st = s.node.as_ref().map(|n| {
                        let (r, c) = n.agent.knowledge();
                        format!(
                            "online {} idle {} regional {:?} cloud {:?} session-cloud {:?}",
                            n.session.is_online(),
                            n.session.is_idle(),
                            r.map.values().map(|x| x.ranges().to_vec()).collect::<Vec<_>>(),
                            c.map.values().map(|x| x.ranges().to_vec()).collect::<Vec<_>>(),
                            n.session
                                .cloud()
                                .map
                                .values()
                                .map(|x| x.ranges().to_vec())
                                .collect::<Vec<_>>()
                        )
                    });
                    format!(
                        "agent {i} (aggregator {}): scanned after heal {} rescan {}; recorded {} acked {}; {}",
                        s.agg,
                        s.scanned_after_heal,
                        s.node.as_ref().is_some_and(|n| n.agent.rescan_needed()),
                        s.next_seq - 1,
                        s.cloud_acked,
                        st.unwrap_or_default()
                    )
                })
                .collect();
            let mut fwd = Vec::new();
            let mut queued = false;
            for g in &self.aggs {
                queued |= g.node.as_ref().map_or(Ok(0), |n| n.store.forward_len())? > 0;
                fwd.push(match &g.node {
                    Some(n) => format!(
                        "{} (sink rejected {:?})",
                        n.store.forward_len()?,
                        n.store.sink_rejected()?
                    ),
                    None => "down".into(),
                });
            }
            if stuck.is_empty() && !queued {
                if let Some(d) = self.server_divergence()? {
                    return Ok(Some(Violation {
                        invariant: "server-changes-converge",
                        detail: format!("{} ms after the heal: {d}", self.sc.heal.0),
                        at: now,
                    }));
                }
                if let Some(d) = self.presence_divergence()? {
                    return Ok(Some(Violation {
                        invariant: "presence-converges",
                        detail: format!("{} ms after the heal: {d}", self.sc.heal.0),
                        at: now,
                    }));
                }
            }
            return Ok(Some(Violation {
                invariant: "converges-after-heal",
                detail: format!(
                    "not converged {} ms after the heal: {}; aggregator forward queues {}",
                    self.sc.heal.0,
                    stuck.join("; "),
                    fwd.join(",")
                ),
                at: now,
            }));
        }
        // Every version in the catalog, read once (ordered by device, path,
        // time) and grouped by device: the same rows a per-device query
        // gives, without one scan of the device table per agent.
        let all = self.cloud.catalog.select(&cloud_sink::catalog::FileQuery {
            versions: true,
            ..Default::default()
        })?;
        let mut by_device: BTreeMap<String, Vec<&protocol::Change>> = BTreeMap::new();
        for c in &all {
            by_device.entry(c.replica.device.key()).or_default().push(c);
        }
        for a in 0..self.agents.len() {
            let versions = by_device
                .get(&self.agents[a].setup.device.key())
                .map(Vec::as_slice)
                .unwrap_or_default();
            if let Some(v) = self.check_replica(a, versions)? {
                return Ok(Some(Violation { at: now, ..v }));
            }
        }
        if let Some(v) = self.check_shared_order(&all)? {
            return Ok(Some(Violation { at: now, ..v }));
        }
        Ok(None)
    }

    /// `conflict-order`: the cloud's conflicts and shared view are a
    /// function of the *set* of shared versions. A fresh catalog that
    /// receives the same versions reversed, and in a seeded shuffle (in
    /// seeded batches), must list the same conflicts (with the same
    /// resolution and winner) and the same latest version per device and path.
    fn check_shared_order(&mut self, all: &[protocol::Change]) -> Result<Option<Violation>> {
        use cloud_sink::catalog::Catalog;
        use cloud_sink::shared::{ConflictQuery, SharedQuery};
        let all: Vec<protocol::Change> = all.iter().filter(|c| c.shared.is_some()).cloned().collect();
        self.metrics.shared_versions = all.len() as u64;
        if all.is_empty() {
            return Ok(None);
        }
        let sites: std::collections::BTreeSet<(String, String)> = all
            .iter()
            .map(|c| (c.replica.device.tenant.to_string(), c.replica.device.site.to_string()))
            .collect();
        // The conflicts are compared by a digest of the raw records (equal
        // records resolve equally: resolution is a function of the pair);
        // they are listed only to explain a difference.
        let view = |cat: &Catalog| -> Result<SharedView> {
            let conflicts = cat.conflicts_digest()?;
            let mut latest = Vec::new();
            for (tenant, site) in &sites {
                let q = SharedQuery {
                    tenant: Some(tenant.clone()),
                    site: site.clone(),
                    ..SharedQuery::default()
                };
                latest.extend(cat.shared_set(&q)?.iter().map(|c| (c.replica.key(), c.seq)));
            }
            Ok((conflicts, latest))
        };
        let mut shuffled = all.clone();
        let mut rng = stream(self.seed, "order", 0);
        for i in (1..shuffled.len()).rev() {
            let j = rng.gen_range(0..=i);
            shuffled.swap(i, j);
        }
        let reversed: Vec<protocol::Change> = all.iter().rev().cloned().collect();
        // A fresh catalog given `order`: reversed in one transaction (the
        // catalog indexes its changes one after another), shuffled in
        // seeded batches of 1-32 (drawn from `rng` after the shuffle).
        let fresh = |order: Vec<protocol::Change>, rng: Option<ChaCha8Rng>| -> Result<(Catalog, SharedView)> {
            let cat = Catalog::open_with_backend(Box::new(redb::backends::InMemoryBackend::new()))?;
            match rng {
                None => {
                    cat.apply(&order, None)?;
                }
                Some(mut rng) => {
                    let mut rest = &order[..];
                    while !rest.is_empty() {
                        let k = rng.gen_range(1..=32usize).min(rest.len());
                        cat.apply(&rest[..k], None)?;
                        rest = &rest[k..];
                    }
                }
            }
            let v = view(&cat)?;
            Ok((cat, v))
        };
        // The two fresh catalogs are independent of each other and of the
        // run: build each on its own thread (same inputs, same draws, so
        // the check does not depend on the threads).
        let joined = |h: std::thread::ScopedJoinHandle<'_, Result<(Catalog, SharedView)>>, name: &str| {
            h.join()
                .unwrap_or_else(|_| Err(anyhow!("the {name}-order check panicked")))
        };
        let (want, got_reversed, got_shuffled) = std::thread::scope(|sc| {
            let shuf = sc.spawn(|| fresh(shuffled, Some(rng)));
            let rev = sc.spawn(|| fresh(reversed, None));
            let want = view(&self.cloud.catalog);
            (want, joined(rev, "reversed"), joined(shuf, "shuffled"))
        });
        let want = want?;
        self.metrics.shared_conflicts = want.0 .0;
        for (name, got) in [("reversed", got_reversed?), ("shuffled", got_shuffled?)] {
            let (cat, got) = got;
            if got.0 != want.0 {
                let all_of = |c: &Catalog| c.conflicts(&ConflictQuery::default());
                let (mine, theirs) = (all_of(&cat)?, all_of(&self.cloud.catalog)?);
                let diff: Vec<_> = mine.iter().filter(|c| !theirs.contains(c)).take(2).collect();
                let miss: Vec<_> = theirs.iter().filter(|c| !mine.contains(c)).take(2).collect();
                return Ok(Some(violation_v(
                    "conflict-order",
                    format!(
                        "{} shared versions applied {name}: {} conflicts instead of {}; only in {name}: {diff:?}; only in the cloud: {miss:?}",
                        all.len(),
                        got.0 .0,
                        want.0 .0
                    ),
                )));
            }
            if got.1 != want.1 {
                return Ok(Some(violation_v(
                    "conflict-order",
                    format!(
                        "{} shared versions applied {name}: the shared view differs ({:?} vs the cloud's {:?})",
                        all.len(),
                        got.1.iter().filter(|x| !want.1.contains(x)).take(3).collect::<Vec<_>>(),
                        want.1.iter().filter(|x| !got.1.contains(x)).take(3).collect::<Vec<_>>()
                    ),
                )));
            }
        }
        Ok(None)
    }

    /// `all`: every version of the agent's device in the catalog.
    fn check_replica(&self, a: usize, all: &[&protocol::Change]) -> Result<Option<Violation>> {
        use protocol::manifest::ChangeBody;
        let s = &self.agents[a];
        let dev = &s.setup.device;
        let mut seen: BTreeMap<(String, Hash32, i64, u64), u64> = BTreeMap::new();
        let mut latest: BTreeMap<String, Latest> = BTreeMap::new();
        for c in all {
            let path = match &c.body {
                ChangeBody::File(f) => {
                    let k = (format!("{}:{}", c.replica.epoch, f.path), f.sha256, f.mtime_ns, f.size);
                    if let Some(prev) = seen.insert(k, c.seq) {
                        return Ok(Some(violation_v(
                            "change-once",
                            format!(
                                "{}: version of {} recorded twice (seq {prev} and {})",
                                dev, f.path, c.seq
                            ),
                        )));
                    }
                    f.path.clone()
                }
                ChangeBody::Delete(p) => p.clone(),
                _ => continue,
            };
            let val = match &c.body {
                ChangeBody::File(f) => Some((f.sha256, f.size)),
                _ => None,
            };
            let e = latest.entry(path).or_insert((c.hlc, c.seq, val));
            if (c.hlc, c.seq) >= (e.0, e.1) {
                *e = (c.hlc, c.seq, val);
            }
        }
        // Compare with the watch folder.
        let root = &s.setup.watch;
        let mut on_disk = BTreeMap::new();
        for e in walkdir::WalkDir::new(root).sort_by_file_name() {
            let e = e?;
            if !e.file_type().is_file() {
                continue;
            }
            let rel = e.path().strip_prefix(root)?.to_string_lossy().replace('\\', "/");
            let bytes = std::fs::read(e.path())?;
            on_disk.insert(format!("data/{rel}"), (Hash32::of(&bytes), bytes.len() as u64));
        }
        for (p, (sha, size)) in &on_disk {
            match latest.get(p) {
                Some((_, _, Some((s2, z2)))) if s2 == sha && z2 == size => {}
                other => {
                    return Ok(Some(violation_v(
                        "converges-after-heal",
                        format!("{dev}: {p} on the gateway ({size} bytes) differs from the cloud's latest ({other:?})"),
                    )))
                }
            }
        }
        Ok(None)
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.invariant, self.detail)
    }
}
impl std::error::Error for Violation {}

/// How long Hellos skip the cloud lookup after one failed (the daemon's
/// `LOOKUP_QUIET`).
const LOOKUP_QUIET: Ms = 30 * SECOND;

/// The daemon's presence timings (`aggregator::presence`), in virtual ms.
const FLUSH_EVERY: Ms = aggregator::presence::FLUSH_EVERY.as_millis() as Ms;
const REFRESH_EVERY: Ms = aggregator::presence::REFRESH_EVERY.as_millis() as Ms;
/// Presence back-off: 0.5 s doubling up to the daemon's default `--sink-retry-max`.
const PRESENCE_RETRY_FIRST: Ms = 500;
const PRESENCE_RETRY_MAX: Ms = 30 * SECOND;

impl AggSlot {
    /// What a new aggregator process at `now` starts from (all in memory
    /// in the daemon).
    fn reset_process(&mut self, g: usize, now: Ms) {
        self.changes_cursor = changes_cursor_at(now);
        self.lookup_quiet_until = 0;
        self.tracker = new_tracker(g);
        self.presence_flush = None;
        self.presence_backoff = PRESENCE_RETRY_FIRST;
        self.presence_retry_at = 0;
        self.presence_refresh_at = now + REFRESH_EVERY;
        self.presence_probe = false;
    }
}

fn new_tracker(g: usize) -> std::sync::Arc<aggregator::presence::Tracker> {
    std::sync::Arc::new(aggregator::presence::Tracker::new(
        &format!("agg{g}"),
        std::sync::Arc::new(aggregator::AggStats::default()),
    ))
}

/// The push cursor of an aggregator (re)started at `t`: the cloud's gseq
/// of a minute before its clock (gseqs are Unix microseconds), as
/// `aggregator::mqtt::changes_loop` starts.
fn changes_cursor_at(t: Ms) -> u64 {
    wall(t, 0).saturating_sub(60_000).saturating_mul(1000)
}

fn violation(invariant: &'static str, detail: String) -> anyhow::Error {
    anyhow::Error::new(Violation {
        invariant,
        detail,
        at: 0,
    })
}
fn violation_v(invariant: &'static str, detail: String) -> Violation {
    Violation {
        invariant,
        detail,
        at: 0,
    }
}

/// A state database poisoned by an earlier I/O error (it must be
/// reopened): `edge_agent::Error::DbPoisoned`, whose text also reaches the
/// sim through protocol store errors, or redb's own message.
fn needs_reopen(e: &dyn std::fmt::Display) -> bool {
    let s = e.to_string();
    s.contains("refused writes after an earlier I/O error") || s.contains("Previous I/O error")
}

/// An agent's memory as the simulator can measure it in-process (see
/// `Bounds::edge_memory_bytes`): redb's page cache at its configured bound,
/// what the client session holds, and the knowledge ranges kept.
fn agent_memory(n: &AgentNode) -> u64 {
    let h = n.session.held();
    let (r, c) = n.agent.knowledge();
    let ranges = |k: &Knowledge| k.map.values().map(|s| s.ranges().len()).sum::<usize>();
    let ranges = h.knowledge_ranges + ranges(r) + ranges(c);
    (edge_agent::store::CACHE_BYTES + h.batch_bytes + h.out_bytes + 16 * ranges) as u64
}

/// Runs one seed of a scenario.
pub fn run(sc: &Scenario, opts: &Options) -> Result<RunResult> {
    let t0 = std::time::Instant::now();
    let mut sim = Sim::new(sc.clone(), opts).context("setting up the simulation")?;
    let violation = sim.run()?;
    let m = std::mem::take(&mut sim.metrics);
    let mut metrics = m;
    metrics.finish_links(sim.agents.iter().map(|s| &s.link));
    Ok(RunResult {
        seed: opts.seed,
        digest: sim.log.digest(),
        events: sim.log.count,
        violation,
        wall_secs: t0.elapsed().as_secs_f64(),
        metrics,
        tail: sim.log.tail().collect(),
    })
}

/// Convenience for tests and small runs.
pub fn minutes(n: u64) -> Ms {
    n * MINUTE
}
