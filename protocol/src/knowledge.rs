//! Knowledge: what a node holds durably, as per-replica sets of seq ranges.
//! Usually one range `1..=n` per replica, so it stays tiny however long the
//! history is.

use crate::ids::{DeviceRef, ReplicaId};
use minicbor::{decode, encode, Decode, Decoder, Encode, Encoder};
use std::collections::BTreeMap;

/// Upper bound on ranges in one decoded set; a peer cannot make us hold more.
pub const MAX_RANGES: usize = 100_000;

/// A set of u64 as sorted, disjoint, non-adjacent inclusive ranges.
#[derive(Clone, Default, PartialEq, Eq, Debug)]
pub struct RangeSet {
    ranges: Vec<(u64, u64)>,
}

impl RangeSet {
    pub fn new() -> RangeSet {
        RangeSet::default()
    }
    /// `1..=n`, or empty for n = 0.
    pub fn up_to(n: u64) -> RangeSet {
        let mut r = RangeSet::new();
        if n > 0 {
            r.ranges.push((1, n));
        }
        r
    }
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
    pub fn contains(&self, x: u64) -> bool {
        // Index of the first range whose end >= x.
        let i = self.ranges.partition_point(|r| r.1 < x);
        i < self.ranges.len() && self.ranges[i].0 <= x
    }
    pub fn insert(&mut self, x: u64) {
        self.insert_range(x, x);
    }
    pub fn insert_range(&mut self, lo: u64, hi: u64) {
        if lo > hi {
            return;
        }
        // Ranges that overlap or touch [lo, hi] are merged into one.
        let start = self.ranges.partition_point(|r| r.1.saturating_add(1) < lo);
        let mut end = start;
        let (mut nlo, mut nhi) = (lo, hi);
        while end < self.ranges.len() && self.ranges[end].0 <= hi.saturating_add(1) {
            nlo = nlo.min(self.ranges[end].0);
            nhi = nhi.max(self.ranges[end].1);
            end += 1;
        }
        self.ranges.splice(start..end, [(nlo, nhi)]);
    }
    pub fn union_with(&mut self, other: &RangeSet) {
        for &(lo, hi) in &other.ranges {
            self.insert_range(lo, hi);
        }
    }
    /// Largest element, if any.
    pub fn max(&self) -> Option<u64> {
        self.ranges.last().map(|r| r.1)
    }
    /// Number of elements (saturating).
    pub fn len(&self) -> u64 {
        self.ranges.iter().fold(0u64, |a, r| a.saturating_add(r.1 - r.0 + 1))
    }
}

impl<C> Encode<C> for RangeSet {
    fn encode<W: encode::Write>(&self, e: &mut Encoder<W>, _: &mut C) -> Result<(), encode::Error<W::Error>> {
        e.array(self.ranges.len() as u64 * 2)?;
        for &(lo, hi) in &self.ranges {
            e.u64(lo)?.u64(hi)?;
        }
        Ok(())
    }
}

impl<'b, C> Decode<'b, C> for RangeSet {
    fn decode(d: &mut Decoder<'b>, _: &mut C) -> Result<Self, decode::Error> {
        let n = d
            .array()?
            .ok_or_else(|| decode::Error::message("indefinite range set"))?;
        if n % 2 != 0 || n / 2 > MAX_RANGES as u64 {
            return Err(decode::Error::message("range set has odd length or too many ranges"));
        }
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for _ in 0..n / 2 {
            let lo = d.u64()?;
            let hi = d.u64()?;
            // Canonical form only: sorted, disjoint, non-adjacent.
            let ok = lo <= hi && ranges.last().is_none_or(|p| p.1.saturating_add(1) < lo);
            if !ok {
                return Err(decode::Error::message("range set is not canonical"));
            }
            ranges.push((lo, hi));
        }
        Ok(RangeSet { ranges })
    }
}

/// Per-replica knowledge.
#[derive(Clone, Default, PartialEq, Eq, Debug)]
pub struct Knowledge {
    pub map: BTreeMap<ReplicaId, RangeSet>,
}

impl Knowledge {
    pub fn contains(&self, r: &ReplicaId, seq: u64) -> bool {
        self.map.get(r).is_some_and(|s| s.contains(seq))
    }
    pub fn insert(&mut self, r: &ReplicaId, seq: u64) {
        self.map.entry(r.clone()).or_default().insert(seq);
    }
    pub fn get(&self, r: &ReplicaId) -> RangeSet {
        self.map.get(r).cloned().unwrap_or_default()
    }
    pub fn union_with(&mut self, other: &Knowledge) {
        for (r, s) in &other.map {
            self.map.entry(r.clone()).or_default().union_with(s);
        }
    }
    /// True if every seq in `other` is also in self.
    pub fn covers(&self, other: &Knowledge) -> bool {
        other.map.iter().all(|(r, s)| {
            let mut u = self.get(r);
            let before = u.len();
            u.union_with(s);
            u.len() == before
        })
    }
    /// Only the replicas of one device.
    pub fn for_device(&self, d: &DeviceRef) -> Knowledge {
        Knowledge {
            map: self
                .map
                .iter()
                .filter(|(r, _)| &r.device == d)
                .map(|(r, s)| (r.clone(), s.clone()))
                .collect(),
        }
    }
}

impl<C> Encode<C> for Knowledge {
    fn encode<W: encode::Write>(&self, e: &mut Encoder<W>, ctx: &mut C) -> Result<(), encode::Error<W::Error>> {
        e.array(self.map.len() as u64)?;
        for (r, s) in &self.map {
            e.array(2)?;
            r.encode(e, ctx)?;
            s.encode(e, ctx)?;
        }
        Ok(())
    }
}

impl<'b, C> Decode<'b, C> for Knowledge {
    fn decode(d: &mut Decoder<'b>, ctx: &mut C) -> Result<Self, decode::Error> {
        let n = d
            .array()?
            .ok_or_else(|| decode::Error::message("indefinite knowledge"))?;
        let mut map = BTreeMap::new();
        for _ in 0..n {
            if d.array()? != Some(2) {
                return Err(decode::Error::message("knowledge entry is not a pair"));
            }
            let r = ReplicaId::decode(d, ctx)?;
            let s = RangeSet::decode(d, ctx)?;
            map.entry(r).or_insert_with(RangeSet::new).union_with(&s);
        }
        Ok(Knowledge { map })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn merges_adjacent_and_overlapping() {
        let mut s = RangeSet::new();
        s.insert(3);
        s.insert(1);
        s.insert(2);
        assert_eq!(s.ranges(), &[(1, 3)]);
        s.insert_range(10, 12);
        s.insert_range(5, 9);
        assert_eq!(s.ranges(), &[(1, 3), (5, 12)]);
        s.insert(4);
        assert_eq!(s.ranges(), &[(1, 12)]);
        assert!(s.contains(12) && !s.contains(13) && !s.contains(0));
        s.insert(u64::MAX);
        assert_eq!(s.max(), Some(u64::MAX));
    }

    #[test]
    fn non_canonical_wire_form_is_rejected() {
        // [5,6, 1,2] is unsorted.
        let mut buf = Vec::new();
        let mut e = Encoder::new(&mut buf);
        e.array(4)
            .and_then(|e| e.u64(5))
            .and_then(|e| e.u64(6))
            .and_then(|e| e.u64(1))
            .and_then(|e| e.u64(2))
            .ok();
        assert!(crate::from_cbor::<RangeSet>(&buf, 1024).is_err());
    }

    proptest! {
        #[test]
        fn behaves_like_a_set(xs in proptest::collection::vec(0u64..200, 0..100)) {
            let mut s = RangeSet::new();
            let mut model = BTreeSet::new();
            for x in &xs { s.insert(*x); model.insert(*x); }
            for x in 0..201 { prop_assert_eq!(s.contains(x), model.contains(&x)); }
            prop_assert_eq!(s.len(), model.len() as u64);
            let back: RangeSet = crate::from_cbor(&crate::to_cbor(&s), 1 << 20).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(back, s);
        }

        #[test]
        fn decoding_random_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = crate::from_cbor::<Knowledge>(&b, 1024);
        }
    }
}
