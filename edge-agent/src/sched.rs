//! Sending by policy (DESIGN.md §7): which recorded changes go next
//! (`priority`, `schedule`, `daily_budget`, starvation guard), and whether a
//! Data message may leave now (`bandwidth` token bucket, schedule, budget).
//!
//! Batch choice ([`Agent::pending_by_policy`]):
//! 1. A class is *eligible* when its schedule window is open and today's
//!    budget is not spent. Ineligible classes are still recorded, just not
//!    offered.
//! 2. If an eligible class with pending changes has not been offered
//!    anything for `starvation` (default 10 min), it alone fills the batch
//!    (the longest-waiting first). Otherwise the batch holds the eligible
//!    classes of the highest priority that has pending changes.
//! 3. Within a batch, changes go in seq order and each class's share is a
//!    prefix of its pending changes, so a file's versions (a path belongs
//!    to one class) are always offered in seq order.
//! 4. A batch stops at `max` changes, `max_bytes` of manifests, and
//!    `batch_data_bytes` of file versions (beyond the first change), and a
//!    budgeted class stops at its remaining budget (beyond its first
//!    change).

use crate::error::Result;
use crate::policy::Policy;
use crate::Agent;
use protocol::manifest::Change;
use protocol::Knowledge;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// A token bucket of `rate` bytes/s holding at most one second of credit.
/// It starts empty and may go into debt by one message: a message leaves
/// when the balance is not negative, so the average rate never exceeds
/// `rate` whatever the message size.
#[derive(Clone, Debug)]
pub struct Bucket {
    pub rate: u64,
    tokens: f64,
    /// Clock ms of the last refill. Unset until first used: no credit
    /// builds up before sending starts.
    at: Option<u64>,
}

impl Bucket {
    pub fn new(rate: u64) -> Bucket {
        Bucket {
            rate,
            tokens: 0.0,
            at: None,
        }
    }
    fn refill(&mut self, now_ms: u64) {
        // A clock stepping back adds no credit (and restarts from there).
        let dt = self.at.map_or(0.0, |at| now_ms.saturating_sub(at) as f64 / 1000.0);
        self.tokens = (self.tokens + dt * self.rate as f64).min(self.rate as f64);
        self.at = Some(now_ms);
    }
    /// How long until a message may leave (zero: now). `now_ms` is the
    /// agent's clock.
    pub fn wait(&mut self, now_ms: u64) -> Duration {
        self.refill(now_ms);
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate as f64)
        }
    }
    pub fn take(&mut self, now_ms: u64, bytes: u64) {
        self.refill(now_ms);
        self.tokens -= bytes as f64;
    }
}

/// In-memory scheduling state of an agent.
pub struct Sched {
    /// Policy-clock ms when each class last had a change offered.
    pub last_served: Vec<u64>,
    /// (epoch, seq) → class index, so a backlog is classified once.
    class_of: HashMap<(u32, u64), usize>,
    pub buckets: Vec<Option<Bucket>>,
    /// Per class: (budget day, bytes spent), loaded from the state file.
    budget: Vec<Option<(u64, u64)>>,
    /// (class, sealed bytes) of chunks read since the driver last took them.
    pub charges: Vec<(usize, u64)>,
}

impl Sched {
    pub fn new(policy: &Policy, now_ms: u64) -> Sched {
        let n = policy.classes.len();
        Sched {
            last_served: vec![now_ms; n],
            class_of: HashMap::new(),
            buckets: policy.classes.iter().map(|c| c.bandwidth.map(Bucket::new)).collect(),
            budget: vec![None; n],
            charges: Vec::new(),
        }
    }
}

/// Why a class cannot send right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    Schedule,
    Budget,
}

struct Cand {
    seq: u64,
    body: usize,
    logical: u64,
}

impl Agent {
    fn now_policy(&self) -> u64 {
        (self.config().clock)()
    }

    /// Bytes of chunk data `class` sent on budget day `day`.
    fn spent(&mut self, ci: usize, day: u64) -> Result<u64> {
        if let Some(Some((d, s))) = self.sched.budget.get(ci) {
            if *d == day {
                return Ok(*s);
            }
        }
        let name = self.policy.classes.get(ci).map(|c| c.name.clone()).unwrap_or_default();
        let s = self.store.budget_spent(&name, day)?;
        if let Some(slot) = self.sched.budget.get_mut(ci) {
            *slot = Some((day, s));
        }
        Ok(s)
    }

    /// Remaining budget of a class today (`None`: no budget).
    pub fn budget_left(&mut self, ci: usize) -> Result<Option<u64>> {
        let now = self.now_policy();
        let Some(c) = self.policy.classes.get(ci) else {
            return Ok(None);
        };
        let Some(b) = c.daily_budget else { return Ok(None) };
        let day = c.day(now);
        Ok(Some(b.saturating_sub(self.spent(ci, day)?)))
    }

    /// Why class `ci` may not send now, if it may not.
    pub fn class_hold(&mut self, ci: usize) -> Result<Option<Hold>> {
        let now = self.now_policy();
        let open = self.policy.classes.get(ci).is_none_or(|c| c.open_at(now));
        if !open {
            return Ok(Some(Hold::Schedule));
        }
        Ok(match self.budget_left(ci)? {
            Some(0) => Some(Hold::Budget),
            _ => None,
        })
    }

    /// Does any class restrict when it sends (so the driver must re-offer
    /// periodically: a window opens, a budget day starts)?
    pub fn policy_gated(&self) -> bool {
        self.policy.classes.iter().any(|c| c.gated())
    }

    /// The changes to offer next, by policy (module doc).
    pub fn pending_by_policy(&mut self, have: &Knowledge, max: usize, max_bytes: usize) -> Result<Vec<Change>> {
        let n = self.policy.classes.len();
        let now = self.now_policy();
        let mut hold = Vec::with_capacity(n);
        for ci in 0..n {
            hold.push(self.class_hold(ci)?.is_some());
        }
        let same_priority = self.policy.classes.windows(2).all(|w| w[0].priority == w[1].priority);
        let budgets = self.policy.classes.iter().any(|c| c.daily_budget.is_some());
        if same_priority && !budgets && !hold.iter().any(|h| *h) {
            // Nothing to choose between: seq order, as before policies.
            let out = self
                .store
                .pending_limited(have, max, max_bytes, self.config().batch_data_bytes)?;
            for c in &out {
                let ci = self.policy.class_idx(c.body.path());
                if let Some(t) = self.sched.last_served.get_mut(ci) {
                    *t = now;
                }
            }
            return Ok(out);
        }

        // 1. Classify the backlog; keep each class's first `max` changes.
        let epoch = self.store.epoch();
        let mut per: Vec<Vec<Cand>> = (0..n).map(|_| Vec::new()).collect();
        let mut cache = std::mem::take(&mut self.sched.class_of);
        let mut seen: HashMap<(u32, u64), usize> = HashMap::with_capacity(cache.len());
        let policy = &self.policy;
        self.store.outbox_scan(have, |seq, _recorded, logical, body| {
            let ci = match cache.get(&(epoch, seq)) {
                Some(c) => *c,
                None => match crate::store::change_path(body) {
                    Some(p) => policy.class_idx(&p),
                    None => n.saturating_sub(1),
                },
            };
            seen.insert((epoch, seq), ci);
            if let Some(list) = per.get_mut(ci) {
                if list.len() < max {
                    list.push(Cand {
                        seq,
                        body: body.len(),
                        logical,
                    });
                }
            }
            true
        })?;
        cache.clear();
        self.sched.class_of = seen;

        // 2. Which classes fill this batch.
        let ready: Vec<usize> = (0..n)
            .filter(|&ci| !hold.get(ci).copied().unwrap_or(true) && per.get(ci).is_some_and(|l| !l.is_empty()))
            .collect();
        if ready.is_empty() {
            return Ok(Vec::new());
        }
        let starvation = self.config().starvation.as_millis() as u64;
        let top = ready
            .iter()
            .map(|&ci| self.policy.classes.get(ci).map_or(0, |c| c.priority))
            .max()
            .unwrap_or(0);
        let starved = ready
            .iter()
            .copied()
            .filter(|&ci| {
                self.policy.classes.get(ci).is_some_and(|c| c.priority < top)
                    && now.saturating_sub(self.sched.last_served.get(ci).copied().unwrap_or(now)) >= starvation
            })
            .min_by_key(|&ci| self.sched.last_served.get(ci).copied().unwrap_or(now));
        let group: Vec<usize> = match starved {
            Some(ci) => {
                tracing::info!(
                    class = %self.policy.classes.get(ci).map_or("", |c| c.name.as_str()),
                    "class waited past the starvation limit; offering it ahead of higher priorities"
                );
                vec![ci]
            }
            None => ready
                .iter()
                .copied()
                .filter(|&ci| self.policy.classes.get(ci).is_some_and(|c| c.priority == top))
                .collect(),
        };

        // 3. Merge the group's candidates in seq order, within the limits.
        let mut left: Vec<Option<u64>> = Vec::with_capacity(n);
        for ci in 0..n {
            left.push(if group.contains(&ci) {
                self.budget_left(ci)?
            } else {
                None
            });
        }
        let mut merged: Vec<(u64, usize, usize, u64)> = group
            .iter()
            .flat_map(|&ci| {
                per.get(ci)
                    .into_iter()
                    .flatten()
                    .map(move |c| (c.seq, ci, c.body, c.logical))
            })
            .collect();
        merged.sort_unstable_by_key(|m| m.0);
        let max_logical = self.config().batch_data_bytes;
        let (mut seqs, mut bytes, mut logical) = (Vec::new(), 0usize, 0u64);
        let mut closed = vec![false; n];
        let mut taken = vec![0usize; n];
        for (seq, ci, body, lb) in merged {
            if seqs.len() >= max {
                break;
            }
            if !seqs.is_empty() && (bytes + body > max_bytes || logical.saturating_add(lb) > max_logical) {
                break;
            }
            if closed.get(ci).copied().unwrap_or(true) {
                continue;
            }
            if let Some(Some(rem)) = left.get_mut(ci) {
                if taken.get(ci).copied().unwrap_or(0) > 0 && lb > *rem {
                    // Later versions of this class wait for tomorrow's budget.
                    if let Some(c) = closed.get_mut(ci) {
                        *c = true;
                    }
                    continue;
                }
                *rem = rem.saturating_sub(lb);
            }
            bytes += body;
            logical = logical.saturating_add(lb);
            if let Some(t) = taken.get_mut(ci) {
                *t += 1;
            }
            seqs.push(seq);
        }
        for &ci in &group {
            if taken.get(ci).copied().unwrap_or(0) > 0 {
                if let Some(t) = self.sched.last_served.get_mut(ci) {
                    *t = now;
                }
            }
        }
        self.store.take(&seqs)
    }

    /// The (class, bytes) of chunks read since the last call: what the
    /// Data message just built carries.
    pub fn take_charges(&mut self) -> Vec<(usize, u64)> {
        std::mem::take(&mut self.sched.charges)
    }

    /// How long a Data message carrying `charges` must wait (zero: send
    /// now): bandwidth caps, closed schedule windows and spent budgets.
    pub fn data_gate(&mut self, charges: &[(usize, u64)]) -> Result<Duration> {
        let now_ms = self.now_policy();
        let mut wait = Duration::ZERO;
        let mut classes: Vec<usize> = charges.iter().map(|c| c.0).collect();
        classes.sort_unstable();
        classes.dedup();
        for ci in classes {
            match self.class_hold(ci)? {
                Some(Hold::Schedule) => wait = wait.max(Duration::from_secs(15)),
                Some(Hold::Budget) => {
                    let next = self.policy.classes.get(ci).map_or(60_000, |c| c.ms_to_next_day(now_ms));
                    wait = wait.max(Duration::from_millis(next.min(60_000)));
                }
                None => {}
            }
            if let Some(Some(b)) = self.sched.buckets.get_mut(ci) {
                wait = wait.max(b.wait(now_ms));
            }
        }
        Ok(wait)
    }

    /// Accounts a Data message that left: token buckets and daily budgets
    /// (persisted at once).
    pub fn charge(&mut self, charges: &[(usize, u64)]) -> Result<()> {
        let now_ms = self.now_policy();
        let mut per: BTreeMap<usize, u64> = BTreeMap::new();
        for &(ci, b) in charges {
            *per.entry(ci).or_default() += b;
        }
        for (ci, bytes) in per {
            if let Some(Some(b)) = self.sched.buckets.get_mut(ci) {
                b.take(now_ms, bytes);
            }
            let Some(c) = self.policy.classes.get(ci) else { continue };
            if let Some(budget) = c.daily_budget {
                let (name, day) = (c.name.clone(), c.day(now_ms));
                let spent = self.store.budget_add(&name, day, bytes)?;
                if let Some(slot) = self.sched.budget.get_mut(ci) {
                    *slot = Some((day, spent));
                }
                if spent >= budget {
                    tracing::info!(class = %name, spent, budget, "daily budget spent; class paused until the next day");
                }
            }
        }
        Ok(())
    }
}
