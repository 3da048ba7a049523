//! Watch roots (label → directory) and path policy: include/exclude globs
//! and policy classes. Globs match the manifest path `label/rel/path`; `*`
//! crosses `/`, so `*.csv` matches CSV files at any depth.

use crate::error::{Error, Result};
use globset::{Glob, GlobSet, GlobSetBuilder};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct Root {
    /// Final path component of the watched directory: the first component
    /// of every manifest path under it.
    pub label: String,
    pub dir: PathBuf,
}

/// Roots sorted by label. Fails on non-UTF-8 or colliding labels.
pub fn roots(watch: &[PathBuf]) -> Result<Vec<Root>> {
    let mut out: Vec<Root> = Vec::new();
    for dir in watch {
        let label = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::Config(format!("watch root {} has no UTF-8 final component", dir.display())))?;
        protocol::manifest::validate_path(label)
            .map_err(|e| Error::Config(format!("watch root {}: {e}", dir.display())))?;
        if let Some(o) = out.iter().find(|r| r.label == label) {
            return Err(Error::Config(format!(
                "watch roots {} and {} have the same label {label:?}; rename one",
                o.dir.display(),
                dir.display()
            )));
        }
        out.push(Root {
            label: label.to_string(),
            dir: dir.clone(),
        });
    }
    out.sort_by(|a, b| a.label.cmp(&b.label));
    Ok(out)
}

/// The filesystem path of a manifest path, if it is under a root.
pub fn fs_path(roots: &[Root], manifest: &str) -> Option<PathBuf> {
    let (label, rel) = manifest.split_once('/')?;
    let root = roots.iter().find(|r| r.label == label)?;
    let mut p = root.dir.clone();
    for c in rel.split('/') {
        if c.is_empty() || c == "." || c == ".." {
            return None;
        }
        p.push(c);
    }
    Some(p)
}

pub const APPEND_CLASS: &str = "append";
pub const DEFAULT_CLASS: &str = "default";
/// Page-structured databases (SQLite and the like): edits land in scattered
/// 4 KiB pages, so this class chunks small (see `db_chunking`).
pub const DB_CLASS: &str = "db";

/// Default globs of the `db` class.
pub const DEFAULT_DB_GLOBS: &[&str] = &["*.sqlite", "*.sqlite3", "*.db", "*.db3"];

/// Default globs of the `append` class: archives that grow at the end.
pub const DEFAULT_APPEND_GLOBS: &[&str] = &["*.csv", "*.log", "*.jsonl", "*.txt"];

#[derive(Clone, Debug)]
pub struct Policy {
    include: Option<GlobSet>,
    exclude: GlobSet,
    append: GlobSet,
    db: GlobSet,
    /// zstd level of the `default` and `db` classes.
    pub level_default: i32,
    /// zstd level of the `append` class: text logs compress well even at 1,
    /// and appends are sealed often, so favour CPU.
    pub level_append: i32,
}

fn set(globs: &[String]) -> Result<GlobSet> {
    let mut b = GlobSetBuilder::new();
    for g in globs {
        b.add(Glob::new(g).map_err(|e| Error::Config(format!("glob {g:?}: {e}")))?);
    }
    b.build().map_err(|e| Error::Config(e.to_string()))
}

impl Policy {
    pub fn new(
        include: &[String],
        exclude: &[String],
        append: &[String],
        db: &[String],
        levels: (i32, i32),
    ) -> Result<Policy> {
        Ok(Policy {
            include: if include.is_empty() { None } else { Some(set(include)?) },
            exclude: set(exclude)?,
            append: set(append)?,
            db: set(db)?,
            level_default: levels.0,
            level_append: levels.1,
        })
    }

    pub fn included(&self, path: &str) -> bool {
        let p = Path::new(path);
        self.include.as_ref().is_none_or(|s| s.is_match(p)) && !self.exclude.is_match(p)
    }

    pub fn class(&self, path: &str) -> &'static str {
        if self.append.is_match(Path::new(path)) {
            APPEND_CLASS
        } else if self.db.is_match(Path::new(path)) {
            DB_CLASS
        } else {
            DEFAULT_CLASS
        }
    }

    pub fn level(&self, class: &str) -> i32 {
        if class == APPEND_CLASS {
            self.level_append
        } else {
            self.level_default
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_classes() {
        let r = roots(&["/a/x".into(), "/b/line1".into()]).unwrap();
        assert_eq!(r[0].label, "line1");
        assert!(roots(&["/a/x".into(), "/b/x".into()]).is_err());
        assert_eq!(fs_path(&r, "x/d/f.csv"), Some(PathBuf::from("/a/x/d/f.csv")));
        assert_eq!(fs_path(&r, "x/../f"), None);
        let globs: Vec<String> = DEFAULT_APPEND_GLOBS.iter().map(|s| s.to_string()).collect();
        let db: Vec<String> = DEFAULT_DB_GLOBS.iter().map(|s| s.to_string()).collect();
        let p = Policy::new(&[], &["*.tmp".into()], &globs, &db, (3, 1)).unwrap();
        assert_eq!(p.class("x/deep/dir/a.csv"), APPEND_CLASS);
        assert_eq!(p.class("x/db/quality.sqlite"), DB_CLASS);
        assert_eq!(p.class("x/a.bin"), DEFAULT_CLASS);
        assert!(!p.included("x/a/b.tmp") && p.included("x/a.bin"));
    }
}
