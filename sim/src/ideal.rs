//! The ideal lower bound for a sync round: zstd -3 of exactly the new and
//! changed bytes — appended tails, differing 4 KiB blocks, whole new files —
//! each file compressed on its own. No real tool reaches it (it ignores the
//! cost of finding the change and of describing it); it is the yardstick the
//! demo and the benchmarks report bytes against.

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// Every regular file under `dir`, by relative path.
pub type Snapshot = BTreeMap<String, Vec<u8>>;

pub fn snapshot(dir: &Path) -> Result<Snapshot> {
    let mut out = Snapshot::new();
    for rel in crate::tree::list_files(dir)?.keys() {
        let p = dir.join(rel);
        out.insert(
            rel.clone(),
            std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
        );
    }
    Ok(out)
}

/// The bytes of `new` that `old` does not already hold at the same place.
pub fn changed_bytes(old: Option<&[u8]>, new: &[u8]) -> Vec<u8> {
    const BLOCK: usize = 4096;
    match old {
        None => new.to_vec(),
        Some(o) if new.starts_with(o) => new[o.len()..].to_vec(),
        Some(o) => {
            let mut out = Vec::new();
            for (i, b) in new.chunks(BLOCK).enumerate() {
                let s = i * BLOCK;
                if o.get(s..s + b.len()) != Some(b) {
                    out.extend_from_slice(b);
                }
            }
            out
        }
    }
}

/// zstd -3 size of `b` (never more than `b` itself plus a frame header).
pub fn zstd3_len(b: &[u8]) -> Result<u64> {
    if b.is_empty() {
        return Ok(0);
    }
    Ok(zstd::bulk::compress(b, 3)?.len() as u64)
}

/// Raw and zstd -3 bytes of what changed from `before` (None: nothing was
/// there) to `after`.
pub fn ideal(before: Option<&Snapshot>, after: &Snapshot) -> Result<(u64, u64)> {
    let (mut raw, mut z) = (0, 0);
    for (path, data) in after {
        let ch = changed_bytes(before.and_then(|b| b.get(path)).map(Vec::as_slice), data);
        raw += ch.len() as u64;
        z += zstd3_len(&ch)?;
    }
    Ok((raw, z))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_blocks_and_new_files() {
        let old = vec![1u8; 10_000];
        let mut app = old.clone();
        app.extend_from_slice(b"tail");
        assert_eq!(changed_bytes(Some(&old), &app), b"tail");
        let mut edit = old.clone();
        edit[5000] = 9;
        assert_eq!(changed_bytes(Some(&old), &edit).len(), 4096);
        assert_eq!(changed_bytes(None, &old).len(), 10_000);
        let mut a = Snapshot::new();
        a.insert("x".into(), old.clone());
        let mut b = a.clone();
        b.insert("y".into(), vec![0; 100]);
        let (raw, z) = ideal(Some(&a), &b).unwrap_or_default();
        assert_eq!(raw, 100);
        assert!(z > 0 && z < 100);
    }
}
