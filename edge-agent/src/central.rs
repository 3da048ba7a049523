//! Central metadata and shared-path state at the edge (DESIGN.md §6).
//!
//! The sink sends server changes (`Message::Changes`): per target, a CRDT
//! state (`meta:<glob>` → tags, retention, legal holds; `shared:<path>` →
//! what the cloud has seen of a shared path). The store merges them into
//! its `server_state` table ([`crate::store::Store::on_server_changes`]).
//! Here: which local paths a legal hold covers (a held path is never
//! pruned), and the shapes `edge-agent status` reports.

use crate::policy::set;
use globset::GlobSet;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

/// The paths covered by legal holds: a `Meta` target's glob (matched like
/// class globs: against the manifest path, `*` crosses `/`, `**` = all)
/// whose state is held.
#[derive(Clone, Debug, Default)]
pub struct Holds {
    globs: Option<GlobSet>,
    /// Targets taken literally too (a path with `[` or `{` is also a glob).
    literal: HashSet<String>,
    /// Everything is held: a hold whose glob does not parse, or server
    /// changes the device could not keep. Hold wins over deletion, so when
    /// in doubt nothing is pruned.
    pub all: bool,
    /// Number of held targets.
    pub targets: usize,
}

impl Holds {
    /// From the held `Meta` targets (`path` globs). `overflow`: the device
    /// refused server changes, so it may not know every hold.
    pub fn build<'a>(held: impl IntoIterator<Item = &'a str>, overflow: bool) -> Holds {
        let mut h = Holds {
            all: overflow,
            ..Holds::default()
        };
        let mut globs = Vec::new();
        for p in held {
            h.targets += 1;
            h.literal.insert(p.to_string());
            globs.push(p.to_string());
        }
        if !globs.is_empty() {
            match set(&globs) {
                Ok(s) => h.globs = Some(s),
                Err(e) => {
                    tracing::warn!("a legal hold's target is not a valid glob ({e}); holding every path");
                    h.all = true;
                }
            }
        }
        h
    }

    pub fn is_empty(&self) -> bool {
        !self.all && self.targets == 0
    }

    /// Is the manifest path `path` under a legal hold?
    pub fn held(&self, path: &str) -> bool {
        self.all || self.literal.contains(path) || self.globs.as_ref().is_some_and(|g| g.is_match(Path::new(path)))
    }
}

/// One central metadata target, for `status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct MetaEntry {
    /// The target's path glob (`**` = every path of the device).
    pub path: String,
    pub tags: Vec<String>,
    /// Keep versions at least this many days (0 = no rule).
    pub retain_days: u32,
    /// Under legal hold: never pruned locally.
    pub held: bool,
    /// Reasons of the holds.
    pub holds: Vec<String>,
    /// Sink sequence number of the last change merged into this state.
    pub gseq: u64,
}

/// One shared path, for `status`: the local version vector (which has
/// merged what the cloud reported) and the cloud's conflict count.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct SharedEntry {
    pub path: String,
    /// `keep-both`, `last-writer-wins` or `append-merge`: the cloud's view
    /// when it reported one, else the policy of the last local change.
    pub policy: String,
    /// Device → HLC of its latest version this device has seen.
    pub vv: BTreeMap<String, u64>,
    /// Concurrent versions the cloud holds for the path (0 until it says).
    pub conflicts: u32,
}

/// Tracked files covered by a legal hold, for `status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct HeldFiles {
    pub files: u64,
    pub bytes: u64,
    /// The first few held paths, in path order.
    pub paths: Vec<String>,
    /// Every path is treated as held (a hold's glob did not parse, or the
    /// device refused server changes over its limit): nothing is pruned.
    pub all: bool,
}
