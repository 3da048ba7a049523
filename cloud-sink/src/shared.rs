//! Shared paths at the sink (DESIGN.md §6): a change with `shared: Some(..)`
//! also belongs to its site's shared namespace (scope `tenant/site`, key the
//! manifest path). Every version of every shared path is indexed; a newly
//! applied version is compared with the versions already there, and each
//! version of another device concurrent with it is one conflict, stored under
//! an order-independent key. Everything stored is a function of the *set* of
//! versions, so any arrival order (and `rebuild`) ends with equal tables.
//!
//! Tables (all in the catalog, recomputed from manifests by `rebuild`):
//! ```text
//! shared           site ‖ 0 ‖ path ‖ 0 ‖ vid            → CBOR SharedRec
//! conflicts        site ‖ 0 ‖ path ‖ 0 ‖ vid(a) ‖ vid(b) → CBOR ConflictRecord  (vid(a) < vid(b))
//! conflict_counts  device key                          → conflicts its versions are part of
//! vid = device ‖ 0 ‖ hlc u64 BE ‖ epoch u32 BE ‖ seq u64 BE
//! ```
//! `site` is `tenant/site`. Device ids and paths contain no NUL, so a vid
//! parses unambiguously and one path's versions are contiguous, sorted by
//! device then HLC.
//! `shared_paths` (site ‖ 0 ‖ path ‖ 0 → CBOR PathSummary) keeps the join of
//! the path's vectors, its devices, its latest version and its number of
//! conflicts, so a new version costs no rescan of the path.
//!
//! Two versions V, W of different devices conflict when neither had seen
//! the other (`V.vv[W.device] < W.hlc` and `W.vv[V.device] < V.hlc`) and
//! their vectors are concurrent. A device's own entry is its version's HLC,
//! so for vectors built as `protocol::shared` describes this is exactly
//! concurrency; the first condition lets a new version skip every version
//! of a device older than what it has seen (an index seek per device), and
//! being symmetric it keeps the result independent of arrival order even
//! for ill-formed vectors.

use crate::catalog::decode_within;
use crate::changes::StateTables;
use crate::{Error, Result};
use minicbor::{Decode, Encode};
use protocol::hlc::Hlc;
use protocol::meta::ServerBody;
use protocol::shared::{winner_order, ConflictPolicy, SharedVersion, VersionVector};
use protocol::{Change, ChangeBody, Hash32};
use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

pub(crate) const SHARED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("shared");
pub(crate) const CONFLICTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("conflicts");
pub(crate) const CONFLICT_COUNTS: TableDefinition<&str, u64> = TableDefinition::new("conflict_counts");
pub(crate) const SHARED_PATHS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("shared_paths");

/// What the server change of a shared path needs, kept up to date at apply.
#[derive(Clone, Debug, Default, Encode, Decode)]
struct PathSummary {
    #[n(0)]
    vv: VersionVector,
    #[n(1)]
    devices: BTreeSet<String>,
    /// The latest version by `winner_order`: its policy is the path's.
    #[n(2)]
    latest: Option<SharedRec>,
    #[n(3)]
    conflicts: u32,
}

/// Bytes after the device in a vid: 0 ‖ hlc(8) ‖ epoch(4) ‖ seq(8).
const VID_TAIL: usize = 21;
/// Largest record read back from the shared tables.
const MAX_REC: usize = 1 << 20;

/// One version of a shared path as the index keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub(crate) struct SharedRec {
    #[n(0)]
    pub device: String,
    #[n(1)]
    pub epoch: u32,
    #[n(2)]
    pub seq: u64,
    #[n(3)]
    pub hlc: u64,
    #[n(4)]
    pub vv: VersionVector,
    #[n(5)]
    pub policy: ConflictPolicy,
    /// None for a deletion.
    #[n(6)]
    pub sha256: Option<Hash32>,
    #[n(7)]
    pub size: u64,
}

impl SharedRec {
    fn from_change(c: &Change) -> Option<SharedRec> {
        let sh = c.shared.as_ref()?;
        let (sha256, size) = match &c.body {
            ChangeBody::File(f) => (Some(f.sha256), f.size),
            ChangeBody::Delete(_) => (None, 0),
            ChangeBody::Superseded(_) => return None,
        };
        Some(SharedRec {
            device: c.replica.device.device.to_string(),
            epoch: c.replica.epoch,
            seq: c.seq,
            hlc: c.hlc.0,
            vv: sh.vv.clone(),
            policy: sh.policy,
            sha256,
            size,
        })
    }

    fn vid(&self) -> Vec<u8> {
        let mut k = self.device.as_bytes().to_vec();
        k.push(0);
        k.extend_from_slice(&self.hlc.to_be_bytes());
        k.extend_from_slice(&self.epoch.to_be_bytes());
        k.extend_from_slice(&self.seq.to_be_bytes());
        k
    }

    fn version(&self) -> SharedVersion {
        SharedVersion {
            device: self.device.clone(),
            hlc: Hlc(self.hlc),
            vv: self.vv.clone(),
            deleted: self.sha256.is_none(),
        }
    }

    fn to_ref(&self) -> VersionRef {
        VersionRef {
            device: self.device.clone(),
            epoch: self.epoch,
            seq: self.seq,
            hlc: self.hlc,
            time: crate::format_ms(Hlc(self.hlc).millis()),
            deleted: self.sha256.is_none(),
            sha256: self.sha256.map(|h| h.to_hex()),
            size: self.size,
        }
    }
}

/// A conflict: two concurrent versions of one shared path by two devices.
#[derive(Clone, Debug, Encode, Decode)]
pub(crate) struct ConflictRecord {
    #[n(0)]
    pub a: SharedRec,
    #[n(1)]
    pub b: SharedRec,
}

/// One version in a conflict (JSON of `/v1/conflicts`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRef {
    pub device: String,
    pub epoch: u32,
    pub seq: u64,
    /// Raw HLC (ms << 16 | counter).
    pub hlc: u64,
    /// HLC time, RFC 3339.
    pub time: String,
    pub deleted: bool,
    /// Whole-file SHA-256 (hex); null for a deletion.
    pub sha256: Option<String>,
    pub size: u64,
}

/// One row of `GET /v1/conflicts`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictInfo {
    pub tenant: String,
    pub site: String,
    pub path: String,
    /// `keep-both`, `last-writer-wins` or `append-merge`: the policy of the
    /// later version (by HLC, then device).
    pub policy: String,
    /// `both kept` (keep-both), `winner` (last-writer-wins) or `merged` (append-merge).
    pub resolution: String,
    /// The version shown at the path (keep-both) or kept
    /// (last-writer-wins); null for append-merge.
    pub winner: Option<VersionRef>,
    /// The two versions, ordered by device then HLC.
    pub versions: Vec<VersionRef>,
}

/// Filters of `GET /v1/conflicts` (also its query string).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConflictQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Conflicts one of whose versions is this device's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Glob over shared paths (a directory matches everything below it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// Query of `GET /v1/shared`: a site's shared namespace as of a time.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SharedQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub site: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// RFC 3339; versions whose HLC time is later are ignored. Default: now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

fn path_prefix(site: &str, path: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(site.len() + path.len() + 2);
    k.extend_from_slice(site.as_bytes());
    k.push(0);
    k.extend_from_slice(path.as_bytes());
    k.push(0);
    k
}

/// The exclusive end of a range of keys starting with `prefix` (which ends in 0).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut hi = prefix.to_vec();
    if let Some(l) = hi.last_mut() {
        *l = 1;
    }
    hi
}

/// Splits `site ‖ 0 ‖ path ‖ 0 ‖ rest` into (site, path, rest).
fn split_key(k: &[u8]) -> Result<(&str, &str, &[u8])> {
    let bad = || Error::Corrupt("malformed shared-path key".into());
    let i = k.iter().position(|b| *b == 0).ok_or_else(bad)?;
    let j = k[i + 1..].iter().position(|b| *b == 0).ok_or_else(bad)? + i + 1;
    let site = std::str::from_utf8(&k[..i]).map_err(|_| bad())?;
    let path = std::str::from_utf8(&k[i + 1..j]).map_err(|_| bad())?;
    Ok((site, path, &k[j + 1..]))
}

/// `tenant/site` → (tenant, site).
fn split_site(site: &str) -> Result<(&str, &str)> {
    site.split_once('/')
        .ok_or_else(|| Error::Corrupt(format!("site key {site:?}")))
}

/// The shared tables, open in one write transaction.
pub(crate) struct SharedTables<'t> {
    shared: Table<'t, &'static [u8], &'static [u8]>,
    conflicts: Table<'t, &'static [u8], &'static [u8]>,
    counts: Table<'t, &'static str, u64>,
    paths: Table<'t, &'static [u8], &'static [u8]>,
}

impl<'t> SharedTables<'t> {
    pub fn open(tx: &'t WriteTransaction) -> Result<SharedTables<'t>> {
        Ok(SharedTables {
            shared: tx.open_table(SHARED)?,
            conflicts: tx.open_table(CONFLICTS)?,
            counts: tx.open_table(CONFLICT_COUNTS)?,
            paths: tx.open_table(SHARED_PATHS)?,
        })
    }

    /// Indexes a newly applied change of a shared path and records its
    /// conflicts. Returns the (site, path) it touched, if any.
    pub fn index(&mut self, c: &Change) -> Result<Option<(String, String)>> {
        let Some(rec) = SharedRec::from_change(c) else {
            return Ok(None);
        };
        let d = &c.replica.device;
        let site = format!("{}/{}", d.tenant, d.site);
        let path = c.body.path().to_string();
        let prefix = path_prefix(&site, &path);
        let mut key = prefix.clone();
        key.extend_from_slice(&rec.vid());
        if self.shared.get(&key[..])?.is_some() {
            return Ok(Some((site, path)));
        }
        let concurrent = self.concurrent_with(&prefix, &rec)?;
        self.shared.insert(&key[..], &protocol::to_cbor(&rec)[..])?;
        let mut sum: PathSummary = match self.paths.get(&prefix[..])? {
            Some(v) => decode_within(v.value(), MAX_REC, "shared path summary")?,
            None => PathSummary::default(),
        };
        sum.vv.merge(&rec.vv);
        sum.devices.insert(rec.device.clone());
        if sum
            .latest
            .as_ref()
            .is_none_or(|l| winner_order(&rec.version(), &l.version()) == Ordering::Greater)
        {
            sum.latest = Some(rec.clone());
        }
        for w in concurrent {
            let (a, b) = if w.vid() < rec.vid() {
                (w, rec.clone())
            } else {
                (rec.clone(), w)
            };
            let mut ck = prefix.clone();
            ck.extend_from_slice(&a.vid());
            ck.extend_from_slice(&b.vid());
            if self.conflicts.get(&ck[..])?.is_some() {
                continue;
            }
            for dev in [&a.device, &b.device] {
                let dkey = format!("{site}/{dev}");
                let n = self.counts.get(dkey.as_str())?.map_or(0, |v| v.value());
                self.counts.insert(dkey.as_str(), n + 1)?;
            }
            self.conflicts
                .insert(&ck[..], &protocol::to_cbor(&ConflictRecord { a, b })[..])?;
            sum.conflicts = sum.conflicts.saturating_add(1);
        }
        self.paths.insert(&prefix[..], &protocol::to_cbor(&sum)[..])?;
        Ok(Some((site, path)))
    }

    /// The versions under `prefix` (one path) that conflict with `rec`: per
    /// other device, only its versions newer than what `rec` had seen of it.
    fn concurrent_with(&self, prefix: &[u8], rec: &SharedRec) -> Result<Vec<SharedRec>> {
        let end = prefix_end(prefix);
        let mut out = Vec::new();
        let mut cursor = prefix.to_vec();
        loop {
            // The next device with a version at this path.
            let dev = match self.shared.range(&cursor[..]..&end[..])?.next() {
                None => break,
                Some(e) => {
                    let (k, _) = e?;
                    let (_, _, vid) = split_key(k.value())?;
                    parse_vid(vid)?.0.to_string()
                }
            };
            let mut dlo = prefix.to_vec();
            dlo.extend_from_slice(dev.as_bytes());
            dlo.push(0);
            let dhi = prefix_end(&dlo);
            if dev != rec.device {
                let mut lo = dlo;
                lo.extend_from_slice(&rec.vv.get(&dev).saturating_add(1).to_be_bytes());
                for e in self.shared.range(&lo[..]..&dhi[..])? {
                    let (_, v) = e?;
                    let w: SharedRec = decode_within(v.value(), MAX_REC, "shared version")?;
                    if w.vv.get(&rec.device) < rec.hlc && w.vv.concurrent(&rec.vv) {
                        out.push(w);
                    }
                }
            }
            cursor = dhi;
        }
        Ok(out)
    }

    /// Recomputes the `SharedHead` server state of every device with a
    /// version at (site, path): the join of all vectors, the policy of the
    /// latest version, and the number of conflicts at the path.
    pub fn refresh_heads(&self, states: &mut StateTables<'_>, site: &str, path: &str) -> Result<()> {
        let prefix = path_prefix(site, path);
        let Some(v) = self.paths.get(&prefix[..])? else {
            return Ok(());
        };
        let sum: PathSummary = decode_within(v.value(), MAX_REC, "shared path summary")?;
        let Some(latest) = &sum.latest else { return Ok(()) };
        let body = ServerBody::SharedHead {
            path: path.to_string(),
            vv: sum.vv.clone(),
            policy: latest.policy,
            conflicts: sum.conflicts,
        };
        for dev in &sum.devices {
            states.put(&format!("{site}/{dev}"), body.clone())?;
        }
        Ok(())
    }
}

/// Per device key: number of conflicts its versions are part of.
pub(crate) fn conflict_counts(tx: &redb::ReadTransaction) -> Result<BTreeMap<String, u64>> {
    let t = tx.open_table(CONFLICT_COUNTS)?;
    let mut out = BTreeMap::new();
    for e in t.iter()? {
        let (k, v) = e?;
        out.insert(k.value().to_string(), v.value());
    }
    Ok(out)
}

/// How a conflict between `a` and `b` is resolved: (policy, resolution, winner).
/// A function of the pair alone, so independent of arrival order.
fn resolve(a: &SharedRec, b: &SharedRec) -> (ConflictPolicy, &'static str, Option<VersionRef>) {
    let (w, _) = if winner_order(&a.version(), &b.version()) == Ordering::Greater {
        (a, b)
    } else {
        (b, a)
    };
    match w.policy {
        ConflictPolicy::KeepBoth => (w.policy, "both kept", Some(w.to_ref())),
        ConflictPolicy::LastWriterWins => (w.policy, "winner", Some(w.to_ref())),
        ConflictPolicy::AppendMerge => (w.policy, "merged", None),
    }
}

/// The conflicts `q` selects, in key order (site, path, versions).
pub(crate) fn list_conflicts(tx: &redb::ReadTransaction, q: &ConflictQuery) -> Result<Vec<ConflictInfo>> {
    let glob = crate::catalog::compile_glob(q.path.as_deref())?;
    let t = tx.open_table(CONFLICTS)?;
    let mut out = Vec::new();
    for e in t.iter()? {
        let (k, v) = e?;
        let (site_key, path, _) = split_key(k.value())?;
        let (tenant, site) = split_site(site_key)?;
        let want = |f: &Option<String>, v: &str| f.as_deref().is_none_or(|f| f == v);
        if !want(&q.tenant, tenant) || !want(&q.site, site) || !crate::catalog::glob_matches(glob.as_ref(), path) {
            continue;
        }
        let r: ConflictRecord = decode_within(v.value(), MAX_REC, "conflict")?;
        if q.device.as_deref().is_some_and(|d| d != r.a.device && d != r.b.device) {
            continue;
        }
        let (policy, resolution, winner) = resolve(&r.a, &r.b);
        out.push(ConflictInfo {
            tenant: tenant.to_string(),
            site: site.to_string(),
            path: path.to_string(),
            policy: policy.as_str().to_string(),
            resolution: resolution.to_string(),
            winner,
            versions: vec![r.a.to_ref(), r.b.to_ref()],
        });
    }
    Ok(out)
}

/// A shared version's location: (site key, path, device, hlc, epoch, seq).
pub(crate) struct SharedLoc {
    pub site: String,
    pub path: String,
    pub device: String,
    pub hlc: u64,
    pub epoch: u32,
    pub seq: u64,
}

fn parse_vid(v: &[u8]) -> Result<(&str, u64, u32, u64)> {
    let bad = || Error::Corrupt("malformed shared version id".into());
    if v.len() < VID_TAIL + 1 {
        return Err(bad());
    }
    let (dev, tail) = v.split_at(v.len() - VID_TAIL);
    if tail[0] != 0 {
        return Err(bad());
    }
    let device = std::str::from_utf8(dev).map_err(|_| bad())?;
    let hlc = u64::from_be_bytes(tail[1..9].try_into().map_err(|_| bad())?);
    let epoch = u32::from_be_bytes(tail[9..13].try_into().map_err(|_| bad())?);
    let seq = u64::from_be_bytes(tail[13..21].try_into().map_err(|_| bad())?);
    Ok((device, hlc, epoch, seq))
}

/// For every shared path of the site(s) `q` selects, each device's latest
/// version with HLC time at or before `at`.
pub(crate) fn latest_per_device(tx: &redb::ReadTransaction, q: &SharedQuery) -> Result<Vec<SharedLoc>> {
    let glob = crate::catalog::compile_glob(q.path.as_deref())?;
    let at_ms = match q.at.as_deref() {
        None | Some("") => u64::MAX,
        Some(s) => crate::parse_rfc3339_ms(s)?,
    };
    let t = tx.open_table(SHARED)?;
    let mut out: Vec<SharedLoc> = Vec::new();
    for e in t.iter()? {
        let (k, _) = e?;
        let (site_key, path, vid) = split_key(k.value())?;
        let (tenant, site) = split_site(site_key)?;
        if site != q.site || q.tenant.as_deref().is_some_and(|t| t != tenant) {
            continue;
        }
        let (device, hlc, epoch, seq) = parse_vid(vid)?;
        if Hlc(hlc).millis() > at_ms || !crate::catalog::glob_matches(glob.as_ref(), path) {
            continue;
        }
        // Keys sort by device then HLC: a later one of the same device replaces.
        let loc = SharedLoc {
            site: site_key.to_string(),
            path: path.to_string(),
            device: device.to_string(),
            hlc,
            epoch,
            seq,
        };
        match out.last_mut() {
            Some(l) if l.site == loc.site && l.path == loc.path && l.device == loc.device => *l = loc,
            _ => out.push(loc),
        }
    }
    Ok(out)
}
