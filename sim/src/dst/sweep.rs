//! `sim sweep`: many seeds of one scenario, each run single-threaded, spread
//! over worker threads.

use super::engine::{run, Options};
use super::scenario::Scenario;
use anyhow::{bail, Context, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One seed's outcome.
#[derive(Clone, Debug)]
pub struct SeedOutcome {
    pub seed: u64,
    pub digest: String,
    pub wall_secs: f64,
    /// `None`: passed. `Some`: the invariant and detail, or the error.
    pub failure: Option<String>,
}

/// Parses `A..B` (B exclusive) or `A..=B`.
pub fn parse_seeds(s: &str) -> Result<std::ops::Range<u64>> {
    let (a, b, incl) = if let Some((a, b)) = s.split_once("..=") {
        (a, b, true)
    } else if let Some((a, b)) = s.split_once("..") {
        (a, b, false)
    } else {
        bail!("seeds must look like A..B or A..=B, got {s:?}");
    };
    let a: u64 = a.trim().parse().with_context(|| format!("bad seed {a:?}"))?;
    let b: u64 = b.trim().parse().with_context(|| format!("bad seed {b:?}"))?;
    let b = if incl {
        b.checked_add(1).context("seed range overflows")?
    } else {
        b
    };
    if b <= a {
        bail!("empty seed range {s:?}");
    }
    if b - a > 10_000_000 {
        bail!("at most 10 million seeds per sweep");
    }
    Ok(a..b)
}

/// Runs every seed in `seeds` on `jobs` threads; results in seed order.
pub fn sweep(sc: &Scenario, seeds: std::ops::Range<u64>, jobs: usize) -> Vec<SeedOutcome> {
    let next = Arc::new(AtomicU64::new(seeds.start));
    let out = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            let (next, out) = (next.clone(), out.clone());
            let end = seeds.end;
            s.spawn(move || loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= end {
                    break;
                }
                let t0 = std::time::Instant::now();
                let r = run(sc, &Options { seed, work: None });
                let o = match r {
                    Ok(r) => SeedOutcome {
                        seed,
                        digest: r.digest,
                        wall_secs: r.wall_secs,
                        failure: r.violation.map(|v| v.to_string()),
                    },
                    Err(e) => SeedOutcome {
                        seed,
                        digest: String::new(),
                        wall_secs: t0.elapsed().as_secs_f64(),
                        failure: Some(format!("error: {e:#}")),
                    },
                };
                if let Ok(mut v) = out.lock() {
                    v.push(o);
                }
            });
        }
    });
    let mut v = match Arc::try_unwrap(out) {
        Ok(m) => m.into_inner().unwrap_or_else(|e| e.into_inner()),
        Err(a) => a.lock().map(|v| v.clone()).unwrap_or_default(),
    };
    v.sort_by_key(|o| o.seed);
    v
}
