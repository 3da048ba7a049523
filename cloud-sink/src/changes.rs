//! Server → device changes (DESIGN.md §4, §6; `protocol::meta`): one CRDT
//! state per (device, target), each with the `gseq` at which it last changed.
//!
//! Two kinds of target:
//! - `shared:<path>`: the `SharedHead` of a shared path, for every device
//!   with a version there (kept by `shared.rs` at apply, recomputed from
//!   manifests by `rebuild`);
//! - `meta:<glob>`: central metadata set by operators (`POST /v1/meta`).
//!   Each operator op is written first as an object
//!   `meta/<tenant>/<site>/<device>/<gseq>` (CBOR `MetaOpRecord`, durable
//!   before the catalog changes), so `rebuild` recreates these states.
//!
//! `gseq` is allocated as `max(last + 1, unix microseconds now)`, so it stays
//! monotone across `rebuild` (a fresh catalog starts from the clock) and a
//! device's cursor never skips a change. A rebuilt catalog gives every state
//! a new, larger gseq: devices receive them again, which CRDT merges ignore.
//!
//! Tables:
//! ```text
//! server_states  device key ‖ 0 ‖ target → CBOR ServerChange (its latest state)
//! server_gseq    gseq                   → device key ‖ 0 ‖ target (one row per state)
//! counters       "gseq"                 → last gseq allocated
//! ```

use crate::catalog::decode_within;
use crate::{Error, Result};
use globset::GlobBuilder;
use minicbor::{Decode, Encode};
use protocol::meta::{DeviceChange, FleetChanges, MetaState, ServerBody, ServerChange, MAX_LABEL, MAX_SET};
use protocol::msg::Changes;
use protocol::DeviceRef;
use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

pub(crate) const STATES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("server_states");
pub(crate) const GSEQ: TableDefinition<u64, &[u8]> = TableDefinition::new("server_gseq");
pub(crate) const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// Default and largest page of the fleet-wide `GET /v1/changes`.
pub const DEFAULT_PAGE: usize = 1000;
pub const MAX_PAGE: usize = 10_000;
/// Largest `POST /v1/meta` body.
pub const MAX_META_BODY: usize = 64 << 10;
/// Longest retention accepted (100 years).
pub const MAX_RETAIN_DAYS: u32 = 36_525;
/// Largest meta op object read back by `rebuild`.
pub const MAX_META_OBJECT: usize = 1 << 20;
/// Encoded-size budget of one per-device `Changes` answer.
const CHANGES_BUDGET: usize = protocol::msg::MAX_MESSAGE / 2;
/// Largest state record read back.
const MAX_STATE: usize = protocol::msg::MAX_MESSAGE;

fn state_key(dkey: &str, target: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(dkey.len() + target.len() + 1);
    k.extend_from_slice(dkey.as_bytes());
    k.push(0);
    k.extend_from_slice(target.as_bytes());
    k
}

/// `t/s/d ‖ 0 ‖ target` → the device.
fn device_of(k: &[u8]) -> Result<DeviceRef> {
    let bad = || Error::Corrupt("malformed server state key".into());
    let i = k.iter().position(|b| *b == 0).ok_or_else(bad)?;
    let key = std::str::from_utf8(&k[..i]).map_err(|_| bad())?;
    let mut p = key.splitn(3, '/');
    match (p.next(), p.next(), p.next()) {
        (Some(t), Some(s), Some(d)) => DeviceRef::new(t, s, d).map_err(|e| Error::Corrupt(format!("{key:?}: {e}"))),
        _ => Err(bad()),
    }
}

/// The server-change tables, open in one write transaction.
pub(crate) struct StateTables<'t> {
    states: Table<'t, &'static [u8], &'static [u8]>,
    gseq: Table<'t, u64, &'static [u8]>,
    counters: Table<'t, &'static str, u64>,
    /// The transaction's time (Unix µs): the floor of new gseqs.
    now_us: u64,
}

impl<'t> StateTables<'t> {
    pub fn open(tx: &'t WriteTransaction, now_us: u64) -> Result<StateTables<'t>> {
        Ok(StateTables {
            now_us,
            states: tx.open_table(STATES)?,
            gseq: tx.open_table(GSEQ)?,
            counters: tx.open_table(COUNTERS)?,
        })
    }

    /// A new gseq: `max(last + 1, now in µs)`.
    pub fn next_gseq(&mut self) -> Result<u64> {
        let last = self.counters.get("gseq")?.map_or(0, |v| v.value());
        let g = last.saturating_add(1).max(self.now_us);
        self.counters.insert("gseq", g)?;
        Ok(g)
    }

    /// Raises the last allocated gseq to at least `g` (rebuild replays ops).
    pub fn observe_gseq(&mut self, g: u64) -> Result<()> {
        let last = self.counters.get("gseq")?.map_or(0, |v| v.value());
        if g > last {
            self.counters.insert("gseq", g)?;
        }
        Ok(())
    }

    pub fn get(&self, dkey: &str, target: &str) -> Result<Option<ServerChange>> {
        match self.states.get(&state_key(dkey, target)[..])? {
            Some(v) => Ok(Some(decode_within(v.value(), MAX_STATE, "server state")?)),
            None => Ok(None),
        }
    }

    /// Stores `body` as the state of its target at `dkey` under a new gseq,
    /// unless it equals what is there. Returns the new gseq if it changed.
    pub fn put(&mut self, dkey: &str, body: ServerBody) -> Result<Option<u64>> {
        let key = state_key(dkey, &body.target());
        let old: Option<ServerChange> = match self.states.get(&key[..])? {
            Some(v) => Some(decode_within(v.value(), MAX_STATE, "server state")?),
            None => None,
        };
        if old.as_ref().is_some_and(|o| o.body == body) {
            return Ok(None);
        }
        let g = self.next_gseq()?;
        if let Some(o) = old {
            self.gseq.remove(o.gseq)?;
        }
        self.states
            .insert(&key[..], &protocol::to_cbor(&ServerChange { gseq: g, body })[..])?;
        self.gseq.insert(g, &key[..])?;
        Ok(Some(g))
    }
}

fn last_gseq(tx: &redb::ReadTransaction) -> Result<u64> {
    Ok(tx.open_table(COUNTERS)?.get("gseq")?.map_or(0, |v| v.value()))
}

/// `GET /v1/changes?tenant&site&device&after`: the latest state of every
/// target of `d` with gseq > `after`, in gseq order; `upto` is the current
/// last gseq (or, if the answer had to be cut, the last gseq it holds).
pub(crate) fn device_changes(tx: &redb::ReadTransaction, d: &DeviceRef, after: u64) -> Result<Changes> {
    let upto = last_gseq(tx)?;
    let t = tx.open_table(STATES)?;
    let lo = state_key(&d.key(), "");
    let mut hi = lo.clone();
    if let Some(l) = hi.last_mut() {
        *l = 1;
    }
    let mut items = Vec::new();
    for e in t.range(&lo[..]..&hi[..])? {
        let (_, v) = e?;
        let c: ServerChange = decode_within(v.value(), MAX_STATE, "server state")?;
        if c.gseq > after {
            items.push(c);
        }
    }
    items.sort_by_key(|c| c.gseq);
    let mut size = 0;
    for (i, c) in items.iter().enumerate() {
        size += protocol::to_cbor(c).len();
        if size > CHANGES_BUDGET {
            let upto = items[..i].last().map_or(after, |c| c.gseq);
            items.truncate(i);
            return Ok(Changes {
                items,
                upto: Some(upto),
            });
        }
    }
    Ok(Changes {
        items,
        upto: Some(upto.max(after)),
    })
}

/// `GET /v1/changes?after&limit`: changes of every device with gseq >
/// `after`, in gseq order, at most `limit`.
pub(crate) fn fleet_changes(tx: &redb::ReadTransaction, after: u64, limit: usize) -> Result<FleetChanges> {
    let last = last_gseq(tx)?;
    let idx = tx.open_table(GSEQ)?;
    let states = tx.open_table(STATES)?;
    let mut items = Vec::new();
    let mut more = false;
    let mut size = 0;
    for e in idx.range(after.saturating_add(1)..)? {
        let (g, k) = e?;
        if items.len() >= limit || size > CHANGES_BUDGET {
            more = true;
            break;
        }
        let device = device_of(k.value())?;
        let Some(v) = states.get(k.value())? else {
            return Err(Error::Corrupt(format!("gseq {} names a missing state", g.value())));
        };
        let change: ServerChange = decode_within(v.value(), MAX_STATE, "server state")?;
        size += v.value().len();
        items.push(DeviceChange { device, change });
    }
    let upto = if more {
        items.last().map_or(after, |c| c.change.gseq)
    } else {
        last.max(after)
    };
    Ok(FleetChanges { items, upto, more })
}

/// `POST /v1/meta` body: one operator op on one device's paths.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaOpRequest {
    pub tenant: String,
    pub site: String,
    pub device: String,
    /// Glob over the device's paths; default `**` (everything).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `tag-add`, `tag-remove`, `hold`, `release` or `retain`.
    pub op: String,
    /// The tag, the hold reason, or the retention in days (number).
    pub value: serde_json::Value,
}

/// A checked operator op.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaOp {
    TagAdd(String),
    TagRemove(String),
    Hold(String),
    Release(String),
    Retain(u32),
}

impl MetaOp {
    fn name(&self) -> &'static str {
        match self {
            MetaOp::TagAdd(_) => "tag-add",
            MetaOp::TagRemove(_) => "tag-remove",
            MetaOp::Hold(_) => "hold",
            MetaOp::Release(_) => "release",
            MetaOp::Retain(_) => "retain",
        }
    }
    fn value(&self) -> String {
        match self {
            MetaOp::TagAdd(s) | MetaOp::TagRemove(s) | MetaOp::Hold(s) | MetaOp::Release(s) => s.clone(),
            MetaOp::Retain(d) => d.to_string(),
        }
    }
}

/// Checks a metadata target glob.
pub fn check_glob(p: &str) -> Result<()> {
    if p.is_empty() || p.len() > protocol::manifest::MAX_PATH || p.chars().any(char::is_control) {
        return Err(Error::BadRequest(format!(
            "bad path glob {:?}: empty, longer than {} bytes or with control characters",
            p.chars().take(100).collect::<String>(),
            protocol::manifest::MAX_PATH
        )));
    }
    GlobBuilder::new(p)
        .literal_separator(true)
        .build()
        .map_err(|e| Error::BadRequest(format!("bad path glob {p:?}: {e}")))?;
    Ok(())
}

impl MetaOpRequest {
    /// Validates the request: ids, glob, op and value.
    pub fn check(&self) -> Result<(DeviceRef, String, MetaOp)> {
        let d = DeviceRef::new(&self.tenant, &self.site, &self.device)
            .map_err(|e| Error::BadRequest(format!("bad device: {e}")))?;
        let path = self.path.clone().unwrap_or_else(|| "**".to_string());
        check_glob(&path)?;
        let label = |what: &str| -> Result<String> {
            let Some(s) = self.value.as_str() else {
                return Err(Error::BadRequest(format!(
                    "{}: value must be a {what} (a string)",
                    self.op
                )));
            };
            if s.is_empty() || s.len() > MAX_LABEL || s.chars().any(char::is_control) {
                return Err(Error::BadRequest(format!(
                    "{}: {what} must be 1 to {MAX_LABEL} bytes without control characters",
                    self.op
                )));
            }
            Ok(s.to_string())
        };
        let op = match self.op.as_str() {
            "tag-add" => MetaOp::TagAdd(label("tag")?),
            "tag-remove" => MetaOp::TagRemove(label("tag")?),
            "hold" => MetaOp::Hold(label("hold reason")?),
            "release" => MetaOp::Release(label("hold reason")?),
            "retain" => {
                let days = match &self.value {
                    serde_json::Value::Number(n) => n.as_u64(),
                    serde_json::Value::String(s) => s.trim().parse::<u64>().ok(),
                    _ => None,
                };
                match days {
                    Some(n @ 1..) if n <= u64::from(MAX_RETAIN_DAYS) => MetaOp::Retain(n as u32),
                    _ => {
                        return Err(Error::BadRequest(format!(
                            "retain: value must be a number of days from 1 to {MAX_RETAIN_DAYS}"
                        )))
                    }
                }
            }
            other => {
                return Err(Error::BadRequest(format!(
                    "unknown op {other:?}: use tag-add, tag-remove, hold, release or retain"
                )))
            }
        };
        Ok((d, path, op))
    }
}

/// An operator op as stored in its object (`meta/<t>/<s>/<d>/<gseq>`): the
/// delta it made (adds carry `gseq` as their dot; removes list the dots they
/// observed), so replaying the objects in any order rebuilds the same state.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct MetaOpRecord {
    #[n(0)]
    pub device: DeviceRef,
    #[n(1)]
    pub path: String,
    #[n(2)]
    pub gseq: u64,
    #[n(3)]
    pub op: String,
    #[n(4)]
    pub value: String,
    #[n(5)]
    pub delta: MetaState,
    /// Sink clock when the op was made.
    #[n(6)]
    pub at_ms: u64,
}

impl MetaOpRecord {
    pub fn object_key(&self) -> String {
        let d = &self.device;
        format!("meta/{}/{}/{}/{}", d.tenant, d.site, d.device, self.gseq)
    }

    /// Bounds a record read back from an object.
    pub fn validate(&self) -> Result<()> {
        check_glob(&self.path)?;
        ServerBody::Meta {
            path: self.path.clone(),
            state: self.delta.clone(),
        }
        .validate()?;
        Ok(())
    }
}

/// One metadata state (JSON of `GET /v1/meta` and `POST /v1/meta`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaView {
    pub tenant: String,
    pub site: String,
    pub device: String,
    /// The glob the state applies to.
    pub path: String,
    pub gseq: u64,
    pub tags: Vec<String>,
    pub holds: Vec<String>,
    pub held: bool,
    pub retain_days: u32,
    /// In a `POST /v1/meta` answer: whether the op changed anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<bool>,
}

impl MetaView {
    fn new(d: &DeviceRef, path: &str, gseq: u64, s: &MetaState) -> MetaView {
        MetaView {
            tenant: d.tenant.to_string(),
            site: d.site.to_string(),
            device: d.device.to_string(),
            path: path.to_string(),
            gseq,
            tags: s.tags.values(),
            holds: s.holds.values(),
            held: s.held(),
            retain_days: s.retain_days,
            changed: None,
        }
    }
}

fn set_size(s: &protocol::meta::OrSet) -> usize {
    s.adds.values().map(|d| d.len()).sum::<usize>() + s.removed.len()
}

/// Builds the record of `op` against the current state of (device, path):
/// `None` if the op would change nothing. Allocates the op's gseq (its dot).
pub(crate) fn prepare_op(
    tx: &WriteTransaction,
    d: &DeviceRef,
    path: &str,
    op: &MetaOp,
    now_us: u64,
) -> Result<(Option<MetaOpRecord>, MetaView)> {
    let now_ms = now_us / 1000;
    let mut st = StateTables::open(tx, now_us)?;
    let target = ServerBody::Meta {
        path: path.to_string(),
        state: MetaState::default(),
    }
    .target();
    let (cur_gseq, cur) = match st.get(&d.key(), &target)? {
        Some(ServerChange {
            gseq,
            body: ServerBody::Meta { state, .. },
        }) => (gseq, state),
        Some(_) => return Err(Error::Corrupt(format!("state {target} of {d} is not metadata"))),
        None => (0, MetaState::default()),
    };
    let mut delta = MetaState::default();
    let full = |s: &protocol::meta::OrSet| {
        if set_size(s) >= MAX_SET {
            Err(Error::BadRequest(format!(
                "{d} {path}: at most {MAX_SET} set entries per target"
            )))
        } else {
            Ok(())
        }
    };
    let mut dot = None;
    match op {
        MetaOp::TagAdd(t) if !cur.tags.contains(t) => {
            full(&cur.tags)?;
            let g = st.next_gseq()?;
            delta.tags.add(t, g);
            dot = Some(g);
        }
        MetaOp::Hold(r) if !cur.holds.contains(r) => {
            full(&cur.holds)?;
            let g = st.next_gseq()?;
            delta.holds.add(r, g);
            dot = Some(g);
        }
        MetaOp::TagRemove(t) if cur.tags.contains(t) => {
            full(&cur.tags)?;
            let mut s = cur.tags.clone();
            s.remove(t);
            delta.tags.removed = s.removed.difference(&cur.tags.removed).copied().collect();
        }
        MetaOp::Release(r) if cur.holds.contains(r) => {
            full(&cur.holds)?;
            let mut s = cur.holds.clone();
            s.remove(r);
            delta.holds.removed = s.removed.difference(&cur.holds.removed).copied().collect();
        }
        MetaOp::Retain(n) if *n > cur.retain_days => delta.retain_days = *n,
        _ => {
            let mut v = MetaView::new(d, path, cur_gseq, &cur);
            v.changed = Some(false);
            return Ok((None, v));
        }
    }
    let gseq = match dot {
        Some(g) => g,
        None => st.next_gseq()?,
    };
    let rec = MetaOpRecord {
        device: d.clone(),
        path: path.to_string(),
        gseq,
        op: op.name().to_string(),
        value: op.value(),
        delta,
        at_ms: now_ms,
    };
    let mut v = MetaView::new(d, path, cur_gseq, &cur);
    v.changed = Some(true);
    Ok((Some(rec), v))
}

/// Merges op records into their states (new gseq per changed state).
/// Returns the resulting views, in input order.
pub(crate) fn apply_ops(tx: &WriteTransaction, recs: &[MetaOpRecord], now_us: u64) -> Result<Vec<MetaView>> {
    let mut st = StateTables::open(tx, now_us)?;
    let mut out = Vec::with_capacity(recs.len());
    for r in recs {
        st.observe_gseq(r.gseq)?;
        let dkey = r.device.key();
        let target = format!("meta:{}", r.path);
        let mut state = match st.get(&dkey, &target)? {
            Some(ServerChange {
                body: ServerBody::Meta { state, .. },
                ..
            }) => state,
            _ => MetaState::default(),
        };
        state.merge(&r.delta);
        let body = ServerBody::Meta {
            path: r.path.clone(),
            state: state.clone(),
        };
        st.put(&dkey, body)?;
        let gseq = st.get(&dkey, &target)?.map_or(0, |c| c.gseq);
        let mut v = MetaView::new(&r.device, &r.path, gseq, &state);
        v.changed = Some(true);
        out.push(v);
    }
    Ok(out)
}

/// Filters of `GET /v1/meta` (also its query string).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MetaQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// Every metadata state `q` selects, by device then glob.
pub(crate) fn list_meta(tx: &redb::ReadTransaction, q: &MetaQuery) -> Result<Vec<MetaView>> {
    let t = tx.open_table(STATES)?;
    let mut out = Vec::new();
    for e in t.iter()? {
        let (k, v) = e?;
        let d = device_of(k.value())?;
        let want = |f: &Option<String>, v: &protocol::Id| f.as_deref().is_none_or(|f| f == v.as_str());
        if !(want(&q.tenant, &d.tenant) && want(&q.site, &d.site) && want(&q.device, &d.device)) {
            continue;
        }
        let c: ServerChange = decode_within(v.value(), MAX_STATE, "server state")?;
        if let ServerBody::Meta { path, state } = &c.body {
            out.push(MetaView::new(&d, path, c.gseq, state));
        }
    }
    Ok(out)
}
