//! Pack format: many sealed chunks in one immutable object, so object stores
//! see few large writes.
//!
//! ```text
//! "FRYPACK1" | chunk bytes ... | index (CBOR [[id, offset, len] ...]) | index_len u32 BE | "FRYPIDX1"
//! ```
//! Offsets are from the start of the pack. The pack id is SHA-256 of the
//! whole pack, so a pack is verifiable and uploads are idempotent.

use crate::ids::Hash32;
use crate::{Error, Result};
use minicbor::{Decode, Encode};

pub const MAGIC: &[u8; 8] = b"FRYPACK1";
pub const TRAILER_MAGIC: &[u8; 8] = b"FRYPIDX1";
/// Largest pack a node accepts.
pub const MAX_PACK: usize = 256 << 20;
/// Largest sealed chunk a node accepts (max chunk size is far smaller).
pub const MAX_CHUNK: usize = 8 << 20;

#[derive(Clone, Copy, PartialEq, Eq, Debug, Encode, Decode)]
pub struct PackEntry {
    #[n(0)]
    pub id: Hash32,
    #[n(1)]
    pub offset: u64,
    #[n(2)]
    pub len: u32,
}

/// Builds a pack in memory (packs are bounded by `MAX_PACK`).
#[derive(Default)]
pub struct PackBuilder {
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl PackBuilder {
    pub fn new() -> Self {
        PackBuilder {
            buf: MAGIC.to_vec(),
            entries: Vec::new(),
        }
    }
    pub fn push(&mut self, id: Hash32, stored: &[u8]) {
        self.entries.push(PackEntry {
            id,
            offset: self.buf.len() as u64,
            len: stored.len() as u32,
        });
        self.buf.extend_from_slice(stored);
    }
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn chunk_count(&self) -> usize {
        self.entries.len()
    }
    /// Returns (pack id, bytes, entries).
    pub fn finish(mut self) -> (Hash32, Vec<u8>, Vec<PackEntry>) {
        let index = crate::to_cbor(&self.entries);
        self.buf.extend_from_slice(&index);
        self.buf.extend_from_slice(&(index.len() as u32).to_be_bytes());
        self.buf.extend_from_slice(TRAILER_MAGIC);
        (Hash32::of(&self.buf), self.buf, self.entries)
    }
}

/// Parses and fully verifies a pack: structure, bounds, and every chunk's id.
pub fn parse(pack: &[u8]) -> Result<Vec<PackEntry>> {
    let bad = |why: &str| Err(Error::CorruptPack(why.to_string()));
    if pack.len() > MAX_PACK {
        return bad("larger than the pack limit");
    }
    if pack.len() < 20 || &pack[..8] != MAGIC || &pack[pack.len() - 8..] != TRAILER_MAGIC {
        return bad("missing magic");
    }
    let il = pack.len() - 12;
    let index_len = u32::from_be_bytes([pack[il], pack[il + 1], pack[il + 2], pack[il + 3]]) as usize;
    if index_len > il - 8 {
        return bad("index length out of range");
    }
    let index_start = il - index_len;
    let entries: Vec<PackEntry> = crate::from_cbor(&pack[index_start..il], MAX_PACK)?;
    for e in &entries {
        let end = e.offset.checked_add(u64::from(e.len));
        match end {
            Some(end) if e.offset >= 8 && end <= index_start as u64 && (e.len as usize) <= MAX_CHUNK => {
                let bytes = &pack[e.offset as usize..end as usize];
                if Hash32::of(bytes) != e.id {
                    return Err(Error::CorruptPack(format!("chunk {} does not match its id", e.id)));
                }
            }
            _ => return bad("chunk entry out of bounds"),
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn build_parse_and_corruption() {
        let mut b = PackBuilder::new();
        for i in 0..5u8 {
            let data = vec![i; 100 + i as usize];
            b.push(Hash32::of(&data), &data);
        }
        let (id, bytes, entries) = b.finish();
        assert_eq!(id, Hash32::of(&bytes));
        assert_eq!(parse(&bytes).expect("parse"), entries);
        let mut bad = bytes.clone();
        bad[20] ^= 1;
        assert!(parse(&bad).is_err());
        assert!(parse(&bytes[..bytes.len() - 1]).is_err());
    }

    proptest! {
        #[test]
        fn random_packs_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut v = MAGIC.to_vec();
            v.extend_from_slice(&b);
            v.extend_from_slice(TRAILER_MAGIC);
            let _ = parse(&v);
        }
    }
}
