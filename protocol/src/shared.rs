//! Shared paths (DESIGN.md §6): several gateways of one site write the same
//! path. Each version carries a version vector; versions no other version
//! dominates are the path's *heads*, and concurrent heads are resolved by the
//! class's policy. Everything here is a pure function of the set of versions,
//! so the outcome never depends on the order in which they arrived.

use crate::hlc::Hlc;
use crate::{Error, Result};
use minicbor::{Decode, Encode};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

/// Most entries a version vector may hold (devices writing one shared path).
pub const MAX_VV_ENTRIES: usize = 1024;

/// Device name (within the site) → the HLC of that device's latest version of
/// the path that the writer had seen. A device's own entry is the HLC of the
/// version itself, so its own versions form a chain even across epochs.
#[derive(Clone, Default, PartialEq, Eq, Debug, Encode, Decode)]
#[cbor(transparent)]
pub struct VersionVector(#[n(0)] pub BTreeMap<String, u64>);

impl VersionVector {
    pub fn get(&self, device: &str) -> u64 {
        self.0.get(device).copied().unwrap_or(0)
    }

    /// Pointwise maximum.
    pub fn merge(&mut self, other: &VersionVector) {
        for (d, v) in &other.0 {
            let e = self.0.entry(d.clone()).or_insert(0);
            *e = (*e).max(*v);
        }
    }

    /// Sets `device`'s entry to `hlc` (never lowers it).
    pub fn witness(&mut self, device: &str, hlc: Hlc) {
        let e = self.0.entry(device.to_string()).or_insert(0);
        *e = (*e).max(hlc.0);
    }

    /// `Some(Greater)` if self dominates, `Some(Less)` if dominated,
    /// `Some(Equal)` if equal, `None` if concurrent.
    pub fn compare(&self, other: &VersionVector) -> Option<Ordering> {
        let (mut ge, mut le) = (true, true);
        let keys: BTreeSet<&String> = self.0.keys().chain(other.0.keys()).collect();
        for k in keys {
            let (a, b) = (self.get(k), other.get(k));
            ge &= a >= b;
            le &= a <= b;
        }
        match (ge, le) {
            (true, true) => Some(Ordering::Equal),
            (true, false) => Some(Ordering::Greater),
            (false, true) => Some(Ordering::Less),
            (false, false) => None,
        }
    }

    pub fn concurrent(&self, other: &VersionVector) -> bool {
        self.compare(other).is_none()
    }
}

/// How concurrent versions of a shared path are resolved.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug, Encode, Decode, Hash, PartialOrd, Ord)]
pub enum ConflictPolicy {
    /// Both kept and restorable; the path shows the HLC-latest, others are flagged.
    #[default]
    #[n(0)]
    KeepBoth,
    /// The version with the highest HLC (then device name) wins.
    #[n(1)]
    LastWriterWins,
    /// Line-oriented logs: the union of all writers' records, ordered by
    /// timestamp (the line's first field), identical records once.
    #[n(2)]
    AppendMerge,
}

impl ConflictPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictPolicy::KeepBoth => "keep-both",
            ConflictPolicy::LastWriterWins => "last-writer-wins",
            ConflictPolicy::AppendMerge => "append-merge",
        }
    }
}

impl std::str::FromStr for ConflictPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "keep-both" => Ok(ConflictPolicy::KeepBoth),
            "last-writer-wins" | "lww" => Ok(ConflictPolicy::LastWriterWins),
            "append-merge" => Ok(ConflictPolicy::AppendMerge),
            _ => Err(Error::Invalid(format!(
                "conflict policy {s:?}: use keep-both, last-writer-wins or append-merge"
            ))),
        }
    }
}

impl std::fmt::Display for ConflictPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Carried (and signed) in a change of a path whose class is shared.
#[derive(Clone, Default, PartialEq, Eq, Debug, Encode, Decode)]
pub struct Shared {
    #[n(0)]
    pub vv: VersionVector,
    #[n(1)]
    pub policy: ConflictPolicy,
}

impl Shared {
    /// Bounds a peer-supplied vector.
    pub fn validate(&self) -> Result<()> {
        if self.vv.0.len() > MAX_VV_ENTRIES {
            return Err(Error::Decode(format!(
                "version vector has {} entries (limit {MAX_VV_ENTRIES})",
                self.vv.0.len()
            )));
        }
        if self.vv.0.keys().any(|k| crate::Id::new(k).is_err()) {
            return Err(Error::Decode("version vector names an invalid device id".into()));
        }
        Ok(())
    }
}

/// One version of a shared path, as the resolution functions see it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SharedVersion {
    pub device: String,
    pub hlc: Hlc,
    pub vv: VersionVector,
    /// A deletion rather than content.
    pub deleted: bool,
}

/// Total order used to pick a winner among concurrent versions: HLC, then
/// device name. Deterministic whatever the arrival order.
pub fn winner_order(a: &SharedVersion, b: &SharedVersion) -> Ordering {
    a.hlc.cmp(&b.hlc).then_with(|| a.device.cmp(&b.device))
}

/// Indexes of the heads: versions that no other version strictly dominates,
/// one per distinct vector (the HLC-latest if two carry equal vectors),
/// sorted winner first.
pub fn heads(versions: &[SharedVersion]) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    for (i, v) in versions.iter().enumerate() {
        let beaten = versions.iter().enumerate().any(|(j, w)| {
            j != i
                && match w.vv.compare(&v.vv) {
                    Some(Ordering::Greater) => true,
                    Some(Ordering::Equal) => winner_order(w, v) == Ordering::Greater,
                    _ => false,
                }
        });
        if !beaten {
            out.push(i);
        }
    }
    out.sort_by(|a, b| winner_order(&versions[*b], &versions[*a]));
    out
}

/// Pairs of concurrent versions `(i, j)` with `i < j`: each is one conflict.
/// Symmetric, so the set is the same whatever the arrival order.
pub fn concurrent_pairs(versions: &[SharedVersion]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for i in 0..versions.len() {
        for j in i + 1..versions.len() {
            if versions[i].device != versions[j].device && versions[i].vv.concurrent(&versions[j].vv) {
                out.push((i, j));
            }
        }
    }
    out
}

/// The timestamp key of a record: its first field (up to `,`, `;`, tab or
/// space). Numeric keys sort numerically, others as bytes.
fn record_key(line: &[u8]) -> (u8, f64, &[u8]) {
    let end = line
        .iter()
        .position(|b| matches!(b, b',' | b';' | b'\t' | b' '))
        .unwrap_or(line.len());
    let field = &line[..end];
    match std::str::from_utf8(field)
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
    {
        Some(n) if n.is_finite() => (0, n, field),
        _ => (1, 0.0, field),
    }
}

/// `append-merge`: the union of the records (lines) of every part, each
/// distinct record once, in timestamp order (ties by bytes). A header line
/// that every part starts with stays first. Independent of the parts' order.
pub fn merge_lines(parts: &[&[u8]]) -> Vec<u8> {
    let split = |p: &[u8]| -> Vec<Vec<u8>> {
        p.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l).to_vec())
            .collect()
    };
    let lists: Vec<Vec<Vec<u8>>> = parts.iter().map(|p| split(p)).collect();
    // A common first line that does not parse as a timestamp is a header.
    let header = lists
        .first()
        .and_then(|l| l.first())
        .filter(|h| record_key(h).0 == 1 && lists.iter().all(|l| l.first() == Some(h)))
        .cloned();
    let mut records: BTreeSet<Vec<u8>> = BTreeSet::new();
    for l in &lists {
        let skip = usize::from(header.is_some());
        records.extend(l.iter().skip(skip).cloned());
    }
    let mut recs: Vec<Vec<u8>> = records.into_iter().collect();
    recs.sort_by(|a, b| {
        let (ka, kb) = (record_key(a), record_key(b));
        ka.0.cmp(&kb.0)
            .then(ka.1.total_cmp(&kb.1))
            .then_with(|| ka.2.cmp(kb.2))
            .then_with(|| a.cmp(b))
    });
    let mut out = Vec::new();
    for r in header.iter().chain(recs.iter()) {
        out.extend_from_slice(r);
        out.push(b'\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vv(e: &[(&str, u64)]) -> VersionVector {
        VersionVector(e.iter().map(|(d, v)| (d.to_string(), *v)).collect())
    }
    fn ver(d: &str, hlc: u64, e: &[(&str, u64)]) -> SharedVersion {
        SharedVersion {
            device: d.into(),
            hlc: Hlc(hlc),
            vv: vv(e),
            deleted: false,
        }
    }

    #[test]
    fn compare_and_concurrency() {
        assert_eq!(vv(&[("a", 2)]).compare(&vv(&[("a", 1)])), Some(Ordering::Greater));
        assert_eq!(
            vv(&[("a", 1)]).compare(&vv(&[("a", 1), ("b", 1)])),
            Some(Ordering::Less)
        );
        assert!(vv(&[("a", 2)]).concurrent(&vv(&[("b", 1)])));
        assert_eq!(vv(&[]).compare(&vv(&[])), Some(Ordering::Equal));
        let mut m = vv(&[("a", 2), ("b", 1)]);
        m.merge(&vv(&[("b", 5), ("c", 1)]));
        assert_eq!(m, vv(&[("a", 2), ("b", 5), ("c", 1)]));
    }

    #[test]
    fn heads_and_pairs() {
        // a1 and b1 concurrent; a2 saw b1 and dominates both.
        let vs = vec![
            ver("a", 10, &[("a", 10)]),
            ver("b", 11, &[("b", 11)]),
            ver("a", 20, &[("a", 20), ("b", 11)]),
        ];
        assert_eq!(heads(&vs), vec![2]);
        assert_eq!(concurrent_pairs(&vs), vec![(0, 1)]);
        assert_eq!(heads(&vs[..2]), vec![1, 0]);
    }

    #[test]
    fn merge_keeps_header_orders_and_dedups() {
        let a = b"ts,v\n1,a\n3,c\n";
        let b = b"ts,v\n2,b\n3,c\n10,z\n";
        assert_eq!(merge_lines(&[a, b]), b"ts,v\n1,a\n2,b\n3,c\n10,z\n".to_vec());
        assert_eq!(merge_lines(&[b, a]), merge_lines(&[a, b]));
        assert_eq!(merge_lines(&[]), Vec::<u8>::new());
    }

    proptest! {
        #[test]
        fn outcome_is_independent_of_arrival_order(
            writes in proptest::collection::vec((0usize..3, 0u64..4), 1..8),
            seed in any::<u64>(),
        ) {
            // Devices write in turn, each having seen a random prefix of the others.
            let names = ["a", "b", "c"];
            let mut vs: Vec<SharedVersion> = Vec::new();
            for (i, (d, seen)) in writes.iter().enumerate() {
                let mut v = VersionVector::default();
                for w in vs.iter().take(*seen as usize) {
                    v.merge(&w.vv);
                }
                let hlc = 100 + i as u64;
                v.witness(names[*d], Hlc(hlc));
                vs.push(SharedVersion { device: names[*d].into(), hlc: Hlc(hlc), vv: v, deleted: false });
            }
            let key = |vs: &[SharedVersion]| {
                let h: BTreeSet<u64> = heads(vs).iter().map(|i| vs[*i].hlc.0).collect();
                let p: BTreeSet<(u64, u64)> = concurrent_pairs(vs)
                    .iter()
                    .map(|(i, j)| (vs[*i].hlc.0.min(vs[*j].hlc.0), vs[*i].hlc.0.max(vs[*j].hlc.0)))
                    .collect();
                let w = heads(vs).first().map(|i| vs[*i].hlc.0);
                (h, p, w)
            };
            let mut shuffled = vs.clone();
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            prop_assert_eq!(key(&vs), key(&shuffled));
        }

        #[test]
        fn merge_is_order_independent_and_idempotent(
            a in proptest::collection::vec(0u32..50, 0..20),
            b in proptest::collection::vec(0u32..50, 0..20),
        ) {
            let text = |v: &[u32]| v.iter().map(|n| format!("{n},x{n}\n")).collect::<String>().into_bytes();
            let (ta, tb) = (text(&a), text(&b));
            let ab = merge_lines(&[&ta, &tb]);
            prop_assert_eq!(&ab, &merge_lines(&[&tb, &ta]));
            prop_assert_eq!(&merge_lines(&[&ab, &ta]), &ab);
        }
    }
}
