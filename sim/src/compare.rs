//! Simulation vs real processes (`tests/dst_vs_real.rs`): the deterministic
//! simulator's outcome of a scenario next to the same workload replayed on
//! the real binaries.
//!
//! The simulator writes its gateways' watch folders to a work directory.
//! Its workload is drawn from per-agent seeded streams that nothing else
//! touches, so a run of the same scenario and seed with a shorter `duration`
//! writes a prefix of the same files: runs ending at several times give the
//! gateways' folders at those checkpoints ([`dst_checkpoint`]). The real
//! fleet gets each checkpoint copied into its watch folders ([`mirror`],
//! mtimes kept) and syncs; then catalogs, restores, backlogs and conflicts
//! are compared. Helpers here turn `cloud-sink ls --json` rows into the same
//! shape as a folder ([`Tree`]).

use crate::dst::{self, RunResult, Scenario};
use anyhow::{bail, Context, Result};
use protocol::Hash32;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// One gateway's files: path as the catalog names it (`<watch folder
/// name>/<relative path>`) → (SHA-256 hex, size).
pub type Tree = BTreeMap<String, (String, u64)>;

/// The device the simulator gives agent `i` (`sim::dst::engine`: tenant
/// `sim`, 50 agents a site, `gw00000`…), as (tenant, site, device).
pub fn dst_device(i: usize) -> (String, String, String) {
    ("sim".into(), format!("site{}", i / 50), format!("gw{i:05}"))
}

/// Agent `i`'s watch folder in a simulator work directory.
pub fn dst_watch(work: &Path, i: usize) -> PathBuf {
    work.join(format!("a{i:05}")).join("data")
}

/// The simulator's run of `sc` ended at `duration_ms` (then healed as the
/// scenario says), in `work`: its result and every agent's watch folder.
pub fn dst_checkpoint(sc: &Scenario, seed: u64, duration_ms: u64, work: &Path) -> Result<(RunResult, Vec<Tree>)> {
    let mut sc = sc.clone();
    sc.duration = dst::scenario::Dur(duration_ms);
    let r = dst::run(
        &sc,
        &dst::Options {
            seed,
            work: Some(work.to_path_buf()),
        },
    )?;
    let trees = (0..sc.agents)
        .map(|i| tree(&dst_watch(work, i)))
        .collect::<Result<Vec<_>>>()?;
    Ok((r, trees))
}

/// Every regular file under `root`, named `<root's name>/<relative path>`.
pub fn tree(root: &Path) -> Result<Tree> {
    let name = root
        .file_name()
        .context("watch folder without a name")?
        .to_string_lossy()
        .into_owned();
    let mut out = Tree::new();
    if !root.exists() {
        return Ok(out);
    }
    for e in walkdir::WalkDir::new(root).sort_by_file_name() {
        let e = e?;
        if !e.file_type().is_file() {
            continue;
        }
        let rel = e.path().strip_prefix(root)?.to_string_lossy().replace('\\', "/");
        let bytes = std::fs::read(e.path()).with_context(|| format!("reading {}", e.path().display()))?;
        out.insert(
            format!("{name}/{rel}"),
            (Hash32::of(&bytes).to_hex(), bytes.len() as u64),
        );
    }
    Ok(out)
}

/// Makes `dst` hold exactly the files of `src` (bytes and mtimes), touching
/// only files that differ. Returns how many files were written or removed.
pub fn mirror(src: &Path, dst: &Path) -> Result<usize> {
    std::fs::create_dir_all(dst)?;
    let mut n = 0;
    let mut keep = std::collections::BTreeSet::new();
    for e in walkdir::WalkDir::new(src).sort_by_file_name() {
        let e = e?;
        if !e.file_type().is_file() {
            continue;
        }
        let rel = e.path().strip_prefix(src)?.to_path_buf();
        let to = dst.join(&rel);
        keep.insert(rel);
        let bytes = std::fs::read(e.path())?;
        let mtime: SystemTime = e.metadata()?.modified()?;
        let same = std::fs::read(&to).is_ok_and(|b| b == bytes)
            && std::fs::metadata(&to)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t == mtime);
        if same {
            continue;
        }
        if let Some(p) = to.parent() {
            std::fs::create_dir_all(p)?;
        }
        std::fs::write(&to, &bytes)?;
        std::fs::File::options().write(true).open(&to)?.set_modified(mtime)?;
        n += 1;
    }
    let mut gone = Vec::new();
    for e in walkdir::WalkDir::new(dst) {
        let e = e?;
        if e.file_type().is_file() && !keep.contains(e.path().strip_prefix(dst)?) {
            gone.push(e.path().to_path_buf());
        }
    }
    for p in gone {
        std::fs::remove_file(&p)?;
        n += 1;
    }
    Ok(n)
}

fn field<'a>(row: &'a serde_json::Value, name: &str) -> Result<&'a serde_json::Value> {
    row.get(name)
        .with_context(|| format!("catalog row without {name}: {row}"))
}

fn text(row: &serde_json::Value, name: &str) -> Result<String> {
    match field(row, name)?.as_str() {
        Some(s) => Ok(s.to_string()),
        None => bail!("catalog row: {name} is not a string: {row}"),
    }
}

fn num(row: &serde_json::Value, name: &str) -> Result<u64> {
    match field(row, name)?.as_u64() {
        Some(n) => Ok(n),
        None => bail!("catalog row: {name} is not a number: {row}"),
    }
}

/// `cloud-sink ls --json` rows (latest version per path, deletions
/// omitted) of one device as a [`Tree`].
pub fn tree_of_rows(rows: &[serde_json::Value]) -> Result<Tree> {
    let mut out = Tree::new();
    for r in rows {
        if field(r, "deleted")?.as_bool() == Some(true) {
            continue;
        }
        let path = text(r, "path")?;
        if out
            .insert(path.clone(), (text(r, "sha256")?, num(r, "size")?))
            .is_some()
        {
            bail!("{path} listed twice as a latest version");
        }
    }
    Ok(out)
}

/// Versions (`ls --versions --json` rows) that repeat another version of
/// the same replica: same epoch, path, content, size and mtime under a
/// second seq. Empty when each change is in the catalog once.
pub fn repeated_versions(rows: &[serde_json::Value]) -> Result<Vec<String>> {
    let mut seen: BTreeMap<(u64, String, String, u64, i64), u64> = BTreeMap::new();
    let mut out = Vec::new();
    for r in rows {
        if field(r, "deleted")?.as_bool() == Some(true) {
            continue;
        }
        let mtime = field(r, "mtime_ns")?.as_i64().unwrap_or_default();
        let k = (
            num(r, "epoch")?,
            text(r, "path")?,
            text(r, "sha256")?,
            num(r, "size")?,
            mtime,
        );
        let seq = num(r, "seq")?;
        if let Some(prev) = seen.insert(k.clone(), seq) {
            out.push(format!("{} (epoch {}) under seqs {prev} and {seq}", k.1, k.0));
        }
    }
    Ok(out)
}

/// How many versions the catalog of one device must hold after a replay of
/// `checkpoints` (each a [`Tree`] of that device, in order): one per file
/// per checkpoint at which it is new or differs from the previous one.
pub fn expected_versions(checkpoints: &[Tree]) -> usize {
    let mut n = 0;
    let empty = Tree::new();
    let mut prev = &empty;
    for t in checkpoints {
        n += t.iter().filter(|(p, v)| prev.get(*p) != Some(v)).count();
        prev = t;
    }
    n
}

/// Differences between two trees, for messages (at most `max`).
pub fn tree_diff(want: &Tree, got: &Tree, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    for (p, v) in want {
        match got.get(p) {
            Some(g) if g == v => {}
            Some(g) => out.push(format!("{p}: want {v:?}, got {g:?}")),
            None => out.push(format!("{p}: missing")),
        }
    }
    for p in got.keys().filter(|p| !want.contains_key(*p)) {
        out.push(format!("{p}: not expected"));
    }
    out.truncate(max);
    out
}
