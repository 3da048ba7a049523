//! Disk watermarks (DESIGN.md §7): over the high watermark, delete from
//! the watch folders the oldest files whose latest version is cloud-durable
//! and older than their class's `keep_local`, until under the low
//! watermark. Files that are not cloud-durable are deleted only when their
//! class says `prune = "force"`, and only after every durable candidate.
//! A pruned file leaves the `files` table and is listed in `pruned`: no
//! scan records it as deleted, so the cloud keeps it and restores bring it
//! back.
//!
//! Legal hold wins over deletion (DESIGN.md §6): a file a held central
//! metadata target covers is never pruned, whatever `prune` and
//! `keep_local` say and however full the disk is.

use crate::error::Result;
use crate::policy::{fs_path, Prune, Root};
use crate::store::DiskStatus;
use crate::Agent;
use std::collections::BinaryHeap;
use std::os::unix::fs::MetadataExt;

/// Most prune-and-measure rounds per check.
const ROUNDS: usize = 4;

/// A candidate for deletion, ordered by age (mtime), then path.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Cand {
    mtime_ns: i64,
    path: String,
    size: u64,
}

/// Keeps the oldest candidates whose sizes add up to at least `need`
/// (bounded memory however many files are tracked).
struct Oldest {
    heap: BinaryHeap<Cand>,
    bytes: u64,
    need: u64,
}

impl Oldest {
    fn new(need: u64) -> Oldest {
        Oldest {
            heap: BinaryHeap::new(),
            bytes: 0,
            need,
        }
    }
    fn push(&mut self, c: Cand) {
        self.bytes += c.size;
        self.heap.push(c);
        while let Some(top) = self.heap.peek() {
            if self.bytes - top.size >= self.need {
                self.bytes -= top.size;
                self.heap.pop();
            } else {
                break;
            }
        }
    }
    fn into_sorted(self) -> Vec<Cand> {
        self.heap.into_sorted_vec()
    }
}

impl Agent {
    /// Checks the disk watermarks of every watched filesystem and prunes
    /// if needed. Returns the condition (also kept for `status` and
    /// presence); `None` when no watermarks are configured.
    pub fn enforce_disk(&mut self) -> Result<Option<DiskStatus>> {
        let Some(wm) = self.config().disk else { return Ok(None) };
        let probe = self.config().disk_probe.clone();
        // Roots on the same filesystem are measured and pruned together.
        let mut groups: Vec<(u64, Vec<Root>)> = Vec::new();
        for r in &self.roots {
            let dev = std::fs::metadata(&r.dir).map(|m| m.dev()).unwrap_or(u64::MAX);
            match groups.iter_mut().find(|g| g.0 == dev) {
                Some(g) => g.1.push(r.clone()),
                None => groups.push((dev, vec![r.clone()])),
            }
        }
        let mut st = DiskStatus {
            high: wm.high.describe(),
            low: wm.low.describe(),
            checked_ms: (self.config().clock)(),
            ..DiskStatus::default()
        };
        for (_, roots) in groups {
            let Some(first) = roots.first() else { continue };
            let mut stat = match probe(&first.dir) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(root = %first.dir.display(), "cannot measure disk usage: {e}");
                    continue;
                }
            };
            let over = wm.over_high(&stat);
            if over {
                tracing::warn!(
                    root = %first.dir.display(),
                    used_pct = format!("{:.1}", stat.used_pct()),
                    free_bytes = stat.free,
                    high = %wm.high.describe(),
                    low = %wm.low.describe(),
                    "disk over the high watermark; pruning the oldest cloud-durable files"
                );
                let (mut files, mut bytes) = (0u64, 0u64);
                let mut blocked = 0u64;
                let mut held = (0u64, 0u64);
                for _ in 0..ROUNDS {
                    let need = wm.to_free(&stat);
                    if need == 0 {
                        blocked = 0;
                        break;
                    }
                    let r = self.prune_round(&roots, need)?;
                    let (f, b) = (r.files, r.bytes);
                    files += f;
                    bytes += b;
                    blocked = r.blocked;
                    held = r.held;
                    stat = match probe(&first.dir) {
                        Ok(s) => s,
                        Err(_) => break,
                    };
                    if f == 0 {
                        break;
                    }
                }
                let under_low = wm.to_free(&stat) == 0;
                if !under_low {
                    tracing::warn!(
                        root = %first.dir.display(),
                        used_pct = format!("{:.1}", stat.used_pct()),
                        pruned_files = files,
                        pruned_bytes = bytes,
                        blocked_bytes_not_durable = blocked,
                        held_files = held.0,
                        held_bytes = held.1,
                        "still over the low watermark: the remaining files are not cloud-durable \
                         (or are kept by keep_local / prune = \"never\" / a legal hold)"
                    );
                } else {
                    tracing::info!(
                        root = %first.dir.display(),
                        used_pct = format!("{:.1}", stat.used_pct()),
                        pruned_files = files,
                        pruned_bytes = bytes,
                        "pruned under the low watermark"
                    );
                    blocked = 0;
                }
                st.blocked_bytes_not_durable += blocked;
                st.held_files += held.0;
                st.held_bytes += held.1;
            }
            if stat.used_pct() >= st.used_pct || st.total_bytes == 0 {
                st.used_pct = stat.used_pct();
                st.free_bytes = stat.free;
                st.total_bytes = stat.total;
            }
            st.over_high |= wm.over_high(&stat);
        }
        let c = &self.store.counters;
        st.pruned_files = c.pruned_files;
        st.pruned_bytes = c.pruned_bytes;
        st.pruned_forced = c.pruned_forced;
        self.store.set_disk_status(&st)?;
        self.disk_status = Some(st.clone());
        Ok(Some(st))
    }

    /// One pass: deletes the oldest eligible files of `roots` until `need`
    /// bytes are freed. Files under a legal hold are never candidates.
    fn prune_round(&mut self, roots: &[Root], need: u64) -> Result<Round> {
        let now = (self.config().clock)();
        let mut durable = Oldest::new(need);
        let mut forced = Oldest::new(need);
        let mut blocked = 0u64;
        let holds = self.store.holds()?;
        if holds.all {
            tracing::warn!("pruning suspended: not every legal hold is known (see status: held.all)");
        }
        let mut held = (0u64, 0u64);
        for root in roots {
            let prefix = format!("{}/", root.label);
            let mut after: Option<String> = None;
            loop {
                let page = self.store.file_page(&prefix, after.as_deref(), 512)?;
                let done = page.len() < 512;
                after = page.last().map(|p| p.0.clone());
                for (path, meta) in page {
                    if holds.held(&path) {
                        held.0 += 1;
                        held.1 += meta.size;
                        continue;
                    }
                    let Some(class) = self.policy.classes.get(self.policy.class_idx(&path)) else {
                        continue;
                    };
                    if class.prune == Prune::Never {
                        continue;
                    }
                    let cand = Cand {
                        mtime_ns: meta.mtime_ns,
                        path,
                        size: meta.size,
                    };
                    if self.store.is_cloud_durable(&meta) {
                        let since = self
                            .store
                            .durable_since(&cand.path, meta.seq)?
                            .unwrap_or((meta.mtime_ns / 1_000_000).max(0) as u64);
                        if now.saturating_sub(since) >= class.keep_local.as_millis() as u64 {
                            durable.push(cand);
                        }
                    } else if class.prune == Prune::Force {
                        forced.push(cand);
                    } else {
                        blocked += meta.size;
                    }
                }
                if done || after.is_none() {
                    break;
                }
            }
        }
        let (mut files, mut freed) = (0u64, 0u64);
        let list = durable
            .into_sorted()
            .into_iter()
            .map(|c| (c, false))
            .chain(forced.into_sorted().into_iter().map(|c| (c, true)));
        let roots_all = self.roots.clone();
        for (c, force) in list {
            if freed >= need {
                break;
            }
            let Some(meta) = self.store.file_meta(&c.path)? else {
                continue;
            };
            let Some(p) = fs_path(&roots_all, &c.path) else {
                continue;
            };
            // Only the recorded version: a file changed since then holds
            // data the cloud does not have.
            let same = std::fs::symlink_metadata(&p).is_ok_and(|m| {
                m.is_file() && m.len() == meta.size && m.ino() == meta.inode && mtime_ns(&m) == meta.mtime_ns
            });
            if !same {
                continue;
            }
            let durable_now = self.store.is_cloud_durable(&meta);
            if !durable_now && !force {
                continue;
            }
            self.store.prune_file(&c.path, &meta, !durable_now, now)?;
            match std::fs::remove_file(&p) {
                Ok(()) => {
                    files += 1;
                    freed += meta.size;
                    if durable_now {
                        tracing::debug!(path = %c.path, size = meta.size, "pruned (cloud-durable)");
                    } else {
                        tracing::warn!(path = %c.path, size = meta.size, "pruned a file that is NOT cloud-durable (prune = \"force\")");
                    }
                }
                Err(e) => {
                    // Untracked now: the next scan records it again.
                    tracing::warn!(path = %p.display(), "cannot prune: {e}");
                    self.store.rescan = true;
                }
            }
        }
        Ok(Round {
            files,
            bytes: freed,
            blocked,
            held,
        })
    }
}

/// What one pruning pass did.
struct Round {
    files: u64,
    bytes: u64,
    /// Bytes kept because not cloud-durable.
    blocked: u64,
    /// Files and bytes kept because a legal hold covers them.
    held: (u64, u64),
}

fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    m.mtime().saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec())
}
