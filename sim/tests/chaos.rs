//! Seeded chaos over real processes (issue 3): a fleet of agent daemons on
//! Mosquitto keeps changing its archives while, round after round, random
//! faults hit it — SIGKILLs of agents, the aggregator, the sink and the
//! broker; agent links cut, stalled, throttled and reset; sink outages;
//! aggregator failover between two data directories (the old one comes back
//! with its spool); agent state files deleted. Then everything heals and
//! every gateway must be cloud-durable, restore byte for byte, and hold each
//! change once in the catalog.
//!
//! `FERRY_CHAOS_SEED=N FERRY_CHAOS_ROUNDS=R cargo test -p sim --test chaos`
//! replays or lengthens a run; the fault log is printed on failure.

mod common;

use anyhow::{ensure, Context, Result};
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sim::gen::{self, GenConfig};
use sim::procs::Proc;
use std::time::Duration;

const SCALE: f64 = 0.04;
const AGENTS: usize = 3;

fn env_u64(k: &str, d: u64) -> u64 {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

struct Chaos {
    f: Fleet,
    rng: StdRng,
    agents: Vec<(String, GenConfig, Proc)>,
    /// Which aggregator data directory runs now ("main" is `f.agg`).
    agg_b: Option<Proc>,
    on_b: bool,
    log: Vec<String>,
}

impl Chaos {
    fn note(&mut self, s: String) {
        eprintln!("chaos: {s}");
        self.log.push(s);
    }

    fn pause(&mut self, lo: u64, hi: u64) {
        let ms = self.rng.gen_range(lo..=hi);
        std::thread::sleep(Duration::from_millis(ms));
    }

    fn agent_args() -> [&'static str; 4] {
        ["--keepalive", "5", "--response-timeout", "5"]
    }

    fn fault(&mut self, round: u32) -> Result<()> {
        let i = self.rng.gen_range(0..AGENTS);
        let dev = self.agents[i].0.clone();
        match self.rng.gen_range(0..9) {
            0 => {
                self.note(format!("round {round}: SIGKILL agent {dev}, restart"));
                self.agents[i].2.restart()?;
            }
            1 => {
                self.note(format!("round {round}: SIGKILL aggregator, restart"));
                if self.on_b {
                    if let Some(p) = self.agg_b.as_mut() {
                        p.restart()?;
                    }
                } else {
                    self.f.agg.restart()?;
                }
            }
            2 => {
                self.note(format!("round {round}: SIGKILL sink, down 1-4 s, restart"));
                self.f.sink.kill();
                self.pause(1000, 4000);
                self.f.sink.restart()?;
            }
            3 => {
                self.note(format!("round {round}: SIGKILL broker, restart"));
                if let Broker::Mosquitto(m) = &mut self.f.broker {
                    m.restart()?;
                }
            }
            4 => {
                let how = self.rng.gen_range(0..3);
                let what = ["cut", "stall", "reset"][how];
                self.note(format!("round {round}: agent link {what} for 1-4 s"));
                match how {
                    0 => self.f.link.cut(),
                    1 => self.f.link.stall(),
                    _ => self.f.link.reset(),
                }
                self.pause(1000, 4000);
                self.f.link.heal();
            }
            5 => {
                self.note(format!("round {round}: agent link throttled to 64 KiB/s for 3 s"));
                self.f.link.set_rate(64 << 10);
                self.pause(3000, 3000);
                self.f.link.set_rate(0);
            }
            6 => {
                self.note(format!("round {round}: sink link cut for 2-5 s"));
                let l = self.f.sink_link.as_ref().context("sink proxy")?;
                l.cut();
                self.pause(2000, 5000);
                let l = self.f.sink_link.as_ref().context("sink proxy")?;
                l.heal();
            }
            7 => {
                // Failover: the running aggregator dies for good (its spool
                // with it, until it returns); the other data dir takes over.
                self.on_b = !self.on_b;
                let to = if self.on_b { "b" } else { "main" };
                self.note(format!("round {round}: aggregator failover to {to}"));
                let sink = self.f.sink_link.as_ref().map(|p| p.url("http")).context("sink proxy")?;
                if self.on_b {
                    self.f.agg.kill();
                    let b = self.f.start_aggregator("b", &self.f.broker.url(), &sink, &[])?;
                    self.agg_b = Some(b);
                } else {
                    if let Some(mut b) = self.agg_b.take() {
                        b.kill();
                    }
                    self.f.agg.restart()?;
                }
            }
            _ => {
                self.note(format!("round {round}: {dev} loses its state file"));
                self.agents[i].2.kill();
                // The state file and its status snapshot; the device key stays.
                let st = self.f.state(&dev);
                std::fs::remove_file(&st).with_context(|| {
                    let dir: Vec<_> = std::fs::read_dir(st.parent().unwrap_or(&st))
                        .map(|d| d.flatten().map(|e| e.file_name()).collect())
                        .unwrap_or_default();
                    format!("removing {} (beside it: {dir:?})", st.display())
                })?;
                let _ = std::fs::remove_file(edge_agent::snapshot_path(&st));
                self.agents[i].2.restart()?;
            }
        }
        Ok(())
    }
}

#[test]
fn seeded_chaos_over_real_processes_loses_nothing() -> Result<()> {
    let seed = env_u64("FERRY_CHAOS_SEED", 11);
    let rounds = env_u64("FERRY_CHAOS_ROUNDS", 8) as u32;
    let f = Fleet::start_with(FleetOpts {
        mosquitto: true,
        sink_proxy: true,
        agg_args: ["--sink-timeout", "3s", "--sink-retry-max", "1s"]
            .map(String::from)
            .to_vec(),
        ..FleetOpts::default()
    })?;
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let g = GenConfig::new(seed, SCALE, i, AGENTS);
        let dev = g.device_id();
        gen::generate_initial(&f.archive(&dev), &g)?;
        let p = f.run_agent_with(&dev, &Chaos::agent_args())?;
        agents.push((dev, g, p));
    }
    for (dev, _, p) in &mut agents {
        let st = f.state(dev);
        wait_until(secs(30), &format!("{dev} opened its state"), || st.exists())
            .with_context(|| tail(&p.log_text(), 20))?;
    }
    let mut c = Chaos {
        f,
        rng: StdRng::seed_from_u64(seed),
        agents,
        agg_b: None,
        on_b: false,
        log: Vec::new(),
    };
    let run = (|| -> Result<()> {
        for round in 1..=rounds {
            // Faults must hit running daemons: a daemon that died on its own
            // (a bad flag, a crash) fails the run.
            for (dev, _, p) in &mut c.agents {
                ensure!(
                    p.alive(),
                    "agent {dev} is not running before round {round}:\n{}",
                    tail(&p.log_text(), 20)
                );
            }
            for k in 0..AGENTS {
                let (dev, g) = (c.agents[k].0.clone(), c.agents[k].1.clone());
                gen::apply_step(&c.f.archive(&dev), &g, round)?;
            }
            c.pause(300, 1500);
            c.fault(round)?;
            c.pause(500, 2500);
        }
        Ok(())
    })();
    let result = run.and_then(|_| {
        // Heal everything; the aggregator that is current stays.
        c.f.link.heal();
        c.f.link.set_rate(0);
        if let Some(l) = c.f.sink_link.as_ref() {
            l.heal();
        }
        for (dev, _, p) in &mut c.agents {
            p.kill();
            let r = c.f.sync(dev, 180)?;
            eprintln!("{dev}: final sync {r}");
        }
        for (dev, _, _) in &c.agents {
            c.f.assert_restore_equal(dev)?;
            let n = c.f.assert_changes_once(dev)?;
            let st = c.f.status(dev)?;
            ensure!(u(&st, "pending_changes") == 0, "{dev} still has a backlog: {st}");
            eprintln!("{dev}: {n} changes in the catalog, each once");
        }
        Ok(())
    });
    if let Err(e) = &result {
        eprintln!(
            "chaos failed with FERRY_CHAOS_SEED={seed} FERRY_CHAOS_ROUNDS={rounds}\nfaults:\n  {}\n{e:#}\n--- aggregator log tail:\n{}",
            c.log.join("\n  "),
            tail(&c.f.agg.log_text(), 40)
        );
    }
    result
}
