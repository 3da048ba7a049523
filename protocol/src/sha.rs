//! SHA-256 whose state can be saved and resumed, so the whole-file digest of
//! an append-only file costs O(appended bytes), not O(file).

use crate::ids::Hash32;
use crate::{Error, Result};
use sha2::digest::generic_array::GenericArray;
use sha2::digest::typenum::U64;

/// Blocks handed to `compress256` at once.
const BATCH: usize = 64;

const H0: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumableSha256 {
    state: [u32; 8],
    /// Bytes already folded into `state` (a multiple of 64).
    done: u64,
    /// Pending tail, < 64 bytes.
    tail: Vec<u8>,
}

impl Default for ResumableSha256 {
    fn default() -> Self {
        ResumableSha256 {
            state: H0,
            done: 0,
            tail: Vec::with_capacity(64),
        }
    }
}

impl ResumableSha256 {
    pub fn new() -> Self {
        Self::default()
    }

    /// Total bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.done + self.tail.len() as u64
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn update(&mut self, mut data: &[u8]) {
        if !self.tail.is_empty() {
            let take = (64 - self.tail.len()).min(data.len());
            self.tail.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.tail.len() == 64 {
                let block = GenericArray::clone_from_slice(&self.tail);
                sha2::compress256(&mut self.state, &[block]);
                self.done += 64;
                self.tail.clear();
            }
        }
        let whole = data.len() / 64 * 64;
        if whole > 0 {
            // Whole blocks go through a reused stack batch: a memcpy per block.
            // (`GenericArray::clone_from_slice` copied byte by byte through an
            // iterator and cost as much as the hashing itself.)
            let mut batch = [GenericArray::<u8, U64>::default(); BATCH];
            for group in data[..whole].chunks(64 * BATCH) {
                let n = group.len() / 64;
                for (b, c) in batch.iter_mut().zip(group.chunks_exact(64)) {
                    b.copy_from_slice(c);
                }
                sha2::compress256(&mut self.state, &batch[..n]);
            }
            self.done += whole as u64;
        }
        self.tail.extend_from_slice(&data[whole..]);
    }

    /// Digest of everything so far; the hasher can keep going.
    pub fn finish(&self) -> Hash32 {
        let mut state = self.state;
        let bits = self.len().wrapping_mul(8);
        let mut last = self.tail.clone();
        last.push(0x80);
        while last.len() % 64 != 56 {
            last.push(0);
        }
        last.extend_from_slice(&bits.to_be_bytes());
        let blocks: Vec<_> = last.chunks_exact(64).map(GenericArray::clone_from_slice).collect();
        sha2::compress256(&mut state, &blocks);
        let mut out = [0u8; 32];
        for (o, w) in out.chunks_exact_mut(4).zip(state) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        Hash32(out)
    }

    /// Serialized state: 32 bytes state, 8 bytes count, tail.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(40 + self.tail.len());
        for w in self.state {
            v.extend_from_slice(&w.to_be_bytes());
        }
        v.extend_from_slice(&self.done.to_be_bytes());
        v.extend_from_slice(&self.tail);
        v
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        if b.len() < 40 || b.len() >= 40 + 64 {
            return Err(Error::Decode("bad saved sha-256 state".into()));
        }
        let mut state = [0u32; 8];
        for (i, w) in state.iter_mut().enumerate() {
            *w = u32::from_be_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
        }
        let mut n = [0u8; 8];
        n.copy_from_slice(&b[32..40]);
        let done = u64::from_be_bytes(n);
        if done % 64 != 0 {
            return Err(Error::Decode("bad saved sha-256 count".into()));
        }
        Ok(ResumableSha256 {
            state,
            done,
            tail: b[40..].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn matches_sha256_in_any_split(data in proptest::collection::vec(any::<u8>(), 0..700), cut in 0usize..700) {
            let cut = cut.min(data.len());
            let mut h = ResumableSha256::new();
            h.update(&data[..cut]);
            let h = ResumableSha256::from_bytes(&h.to_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let mut h2 = h.clone();
            h2.update(&data[cut..]);
            prop_assert_eq!(h2.finish(), Hash32::of(&data));
            prop_assert_eq!(h.finish(), Hash32::of(&data[..cut]));
        }

        /// Longer inputs than one batch of blocks, fed in uneven pieces.
        #[test]
        fn matches_sha256_across_batches(len in 0usize..20_000, piece in 1usize..9_000, seed in any::<u8>()) {
            let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
            let mut h = ResumableSha256::new();
            for p in data.chunks(piece) {
                h.update(p);
            }
            prop_assert_eq!(h.finish(), Hash32::of(&data));
        }
    }
}
