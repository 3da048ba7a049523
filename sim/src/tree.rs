//! Byte-for-byte comparison of directory trees.

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Regular files under `root`, keyed by `/`-separated relative path, with sizes.
pub fn list_files(root: &Path) -> Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e?;
            let ft = e.file_type()?;
            let p = e.path();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let rel = p.strip_prefix(root)?.to_string_lossy().replace('\\', "/");
                out.insert(rel, e.metadata()?.len());
            }
        }
    }
    Ok(out)
}

/// Differences between two trees; empty means identical.
pub fn diff_trees(a: &Path, b: &Path) -> Result<Vec<String>> {
    let fa = list_files(a)?;
    let fb = if b.exists() { list_files(b)? } else { BTreeMap::new() };
    let mut diffs = Vec::new();
    for (p, _) in fa.iter().filter(|(p, _)| !fb.contains_key(*p)) {
        diffs.push(format!("missing in restore: {p}"));
    }
    for (p, _) in fb.iter().filter(|(p, _)| !fa.contains_key(*p)) {
        diffs.push(format!("extra in restore: {p}"));
    }
    for (p, size) in &fa {
        if let Some(sb) = fb.get(p) {
            if size != sb {
                diffs.push(format!("size differs: {p} ({size} vs {sb})"));
            } else if !same_bytes(&a.join(p), &b.join(p))? {
                diffs.push(format!("content differs: {p}"));
            }
        }
    }
    Ok(diffs)
}

fn same_bytes(a: &PathBuf, b: &PathBuf) -> Result<bool> {
    let mut fa = std::fs::File::open(a)?;
    let mut fb = std::fs::File::open(b)?;
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let r = f.read(&mut buf[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_every_kind_of_difference() -> Result<()> {
        let a = tempfile::tempdir()?;
        let b = tempfile::tempdir()?;
        std::fs::create_dir_all(a.path().join("x"))?;
        std::fs::create_dir_all(b.path().join("x"))?;
        std::fs::write(a.path().join("x/same"), b"hello")?;
        std::fs::write(b.path().join("x/same"), b"hello")?;
        assert!(diff_trees(a.path(), b.path())?.is_empty());
        std::fs::write(a.path().join("x/edit"), b"hello")?;
        std::fs::write(b.path().join("x/edit"), b"hellp")?;
        std::fs::write(a.path().join("only-a"), b"1")?;
        std::fs::write(b.path().join("only-b"), b"1")?;
        let d = diff_trees(a.path(), b.path())?;
        assert_eq!(d.len(), 3, "{d:?}");
        Ok(())
    }
}
