//! Central metadata and other server → device changes (DESIGN.md §4, §6).
//!
//! The sink keeps one state per (device, target); each is a state-based CRDT,
//! so a device may receive them late, twice or out of order and still ends
//! where the sink is: tags are an observed-remove set, retention a
//! max-register, legal holds an add-wins set (a hold wins over a concurrent
//! release, and a held path is never deleted or pruned).

use crate::shared::{ConflictPolicy, VersionVector};
use crate::{Error, Result};
use minicbor::{Decode, Encode};
use std::collections::{BTreeMap, BTreeSet};

/// Most elements (with tombstones) one set may hold.
pub const MAX_SET: usize = 4096;
/// Longest tag or hold reason.
pub const MAX_LABEL: usize = 256;

/// A unique add: the sink's sequence number of the operation that made it.
pub type Dot = u64;

/// Observed-remove set of strings.
#[derive(Clone, Default, PartialEq, Eq, Debug, Encode, Decode)]
pub struct OrSet {
    /// Element → the adds that put it there.
    #[n(0)]
    pub adds: BTreeMap<String, BTreeSet<Dot>>,
    /// Adds observed by a remove.
    #[n(1)]
    pub removed: BTreeSet<Dot>,
}

impl OrSet {
    pub fn add(&mut self, elem: &str, dot: Dot) {
        self.adds.entry(elem.to_string()).or_default().insert(dot);
    }

    /// Removes the adds of `elem` seen so far; a concurrent add survives.
    /// Returns whether the element was present.
    pub fn remove(&mut self, elem: &str) -> bool {
        let Some(dots) = self.adds.get(elem) else { return false };
        let live: Vec<Dot> = dots.difference(&self.removed).copied().collect();
        self.removed.extend(live.iter().copied());
        !live.is_empty()
    }

    pub fn contains(&self, elem: &str) -> bool {
        self.adds
            .get(elem)
            .is_some_and(|d| d.iter().any(|x| !self.removed.contains(x)))
    }

    pub fn values(&self) -> Vec<String> {
        self.adds
            .iter()
            .filter(|(_, d)| d.iter().any(|x| !self.removed.contains(x)))
            .map(|(e, _)| e.clone())
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.values().is_empty()
    }

    pub fn merge(&mut self, other: &OrSet) {
        for (e, d) in &other.adds {
            self.adds.entry(e.clone()).or_default().extend(d.iter().copied());
        }
        self.removed.extend(other.removed.iter().copied());
    }

    fn validate(&self, what: &str) -> Result<()> {
        let n = self.adds.values().map(BTreeSet::len).sum::<usize>() + self.removed.len();
        if n > MAX_SET {
            return Err(Error::Decode(format!("{what}: {n} entries (limit {MAX_SET})")));
        }
        if let Some(e) = self.adds.keys().find(|e| e.is_empty() || e.len() > MAX_LABEL) {
            return Err(Error::Decode(format!("{what}: label of {} bytes", e.len())));
        }
        Ok(())
    }
}

/// The central metadata of one target (a path glob on one device).
#[derive(Clone, Default, PartialEq, Eq, Debug, Encode, Decode)]
pub struct MetaState {
    #[n(0)]
    pub tags: OrSet,
    /// Keep versions at least this many days (max-register; 0 = no rule).
    #[n(1)]
    pub retain_days: u32,
    /// Legal holds by reason; held while any is present.
    #[n(2)]
    pub holds: OrSet,
}

impl MetaState {
    pub fn merge(&mut self, other: &MetaState) {
        self.tags.merge(&other.tags);
        self.retain_days = self.retain_days.max(other.retain_days);
        self.holds.merge(&other.holds);
    }
    pub fn held(&self) -> bool {
        !self.holds.is_empty()
    }
}

/// One server → device change. `gseq` is the sink's sequence number at the
/// moment this state last changed; a device that has applied everything up
/// to `n` asks only for `gseq > n`.
#[derive(Clone, PartialEq, Eq, Debug, Encode, Decode)]
pub struct ServerChange {
    #[n(0)]
    pub gseq: u64,
    #[n(1)]
    pub body: ServerBody,
}

/// A server change addressed to one device (sink → aggregator).
#[derive(Clone, PartialEq, Eq, Debug, Encode, Decode)]
pub struct DeviceChange {
    #[n(0)]
    pub device: crate::DeviceRef,
    #[n(1)]
    pub change: ServerChange,
}

/// Answer of the sink's fleet-wide `GET /v1/changes?after=N`: changes with
/// `gseq > N` in gseq order. `upto` is where the caller's cursor may move;
/// `more` says a next page exists.
#[derive(Clone, PartialEq, Eq, Debug, Default, Encode, Decode)]
pub struct FleetChanges {
    #[n(0)]
    pub items: Vec<DeviceChange>,
    #[n(1)]
    pub upto: u64,
    #[n(2)]
    pub more: bool,
}

#[derive(Clone, PartialEq, Eq, Debug, Encode, Decode)]
pub enum ServerBody {
    /// Metadata of the device's paths matching `path` (a glob; `**` = all).
    #[n(0)]
    Meta {
        #[n(0)]
        path: String,
        #[n(1)]
        state: MetaState,
    },
    /// What the cloud has seen of a shared path: the join of every version's
    /// vector (merge it so the next local version dominates them), and how
    /// many conflicts it holds under which policy.
    #[n(1)]
    SharedHead {
        #[n(0)]
        path: String,
        #[n(1)]
        vv: VersionVector,
        #[n(2)]
        policy: ConflictPolicy,
        #[n(3)]
        conflicts: u32,
    },
}

impl ServerBody {
    /// Identifies the state this body replaces (merges into) at a device.
    pub fn target(&self) -> String {
        match self {
            ServerBody::Meta { path, .. } => format!("meta:{path}"),
            ServerBody::SharedHead { path, .. } => format!("shared:{path}"),
        }
    }

    /// Merges `other` (same target) into self: CRDT join.
    pub fn merge(&mut self, other: &ServerBody) {
        match (self, other) {
            (ServerBody::Meta { state, .. }, ServerBody::Meta { state: o, .. }) => state.merge(o),
            (
                ServerBody::SharedHead { vv, conflicts, .. },
                ServerBody::SharedHead {
                    vv: ov, conflicts: oc, ..
                },
            ) => {
                vv.merge(ov);
                *conflicts = (*conflicts).max(*oc);
            }
            _ => {}
        }
    }

    /// Bounds peer input.
    pub fn validate(&self) -> Result<()> {
        match self {
            ServerBody::Meta { path, state } => {
                if path.is_empty() || path.len() > crate::manifest::MAX_PATH {
                    return Err(Error::Decode("metadata target path empty or too long".into()));
                }
                state.tags.validate("tags")?;
                state.holds.validate("holds")
            }
            ServerBody::SharedHead { path, vv, .. } => {
                crate::manifest::validate_path(path)?;
                crate::shared::Shared {
                    vv: vv.clone(),
                    policy: ConflictPolicy::default(),
                }
                .validate()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orset_observed_remove_and_add_wins() {
        let mut a = OrSet::default();
        a.add("x", 1);
        let mut b = a.clone();
        // b removes x while a concurrently adds it again: the new add survives.
        assert!(b.remove("x"));
        a.add("x", 2);
        let mut ab = a.clone();
        ab.merge(&b);
        let mut ba = b.clone();
        ba.merge(&a);
        assert_eq!(ab, ba);
        assert!(ab.contains("x"));
        // Without the concurrent add, the remove wins.
        let mut c = OrSet::default();
        c.add("y", 3);
        let mut d = c.clone();
        d.remove("y");
        c.merge(&d);
        assert!(!c.contains("y"));
        assert!(!d.remove("y"));
    }

    #[test]
    fn meta_merge_is_a_join() {
        let mut a = MetaState {
            retain_days: 30,
            ..Default::default()
        };
        a.holds.add("audit-2026", 5);
        let b = MetaState {
            retain_days: 365,
            ..Default::default()
        };
        let mut ab = a.clone();
        ab.merge(&b);
        let mut ba = b.clone();
        ba.merge(&a);
        assert_eq!(ab, ba);
        assert_eq!(ab.retain_days, 365);
        assert!(ab.held());
        let mut again = ab.clone();
        again.merge(&ab);
        assert_eq!(again, ab);
    }
}
