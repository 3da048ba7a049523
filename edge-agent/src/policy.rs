//! Watch roots (label → directory) and path policy: include/exclude globs
//! and policy classes. Globs match the manifest path `label/rel/path`; `*`
//! crosses `/`, so `*.csv` matches CSV files at any depth.
//!
//! A policy class (DESIGN.md §7) decides, per glob: chunking and zstd level,
//! the append fast path, `priority` (which backlog goes first after an
//! outage), `schedule` windows, a `bandwidth` cap, a `daily_budget` for
//! metered links, `keep_local` (how long a file stays on disk after it is
//! cloud-durable) and `prune` (whether the disk watermarks may delete it).
//! A class may be `shared` (DESIGN.md §6: several gateways of the site
//! write the same paths): its changes carry a version vector and the
//! class's `conflict` policy (`keep-both`, `last-writer-wins`,
//! `append-merge`), by which the cloud resolves concurrent versions.
//! Three classes are built in (`append`, `db`, `default`); a TOML config
//! file ([`FileConfig`], example in `docs/agent.example.toml`) adds classes
//! and overrides the built-in ones.

use crate::chunker::ChunkParams;
use crate::error::{Error, Result};
use globset::{Glob, GlobSet, GlobSetBuilder};
use protocol::shared::ConflictPolicy;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// Whether the disk watermarks may delete a class's files from the watch
/// folders.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prune {
    /// Never deleted by the agent.
    Never,
    /// Deleted (oldest first) only once the latest version is durable in
    /// the cloud and older than `keep_local`. The default.
    #[default]
    Durable,
    /// Also deleted when not yet cloud-durable, after every durable
    /// candidate: data loss the operator accepted for this class.
    Force,
}

/// Time zone of a class's schedule windows and budget days.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tz {
    Utc,
    /// The gateway's local time (from `date +%z`, refreshed every 10 min).
    Local,
    /// A fixed offset from UTC, in minutes.
    Fixed(i32),
}

impl Tz {
    pub fn parse(s: &str) -> Result<Tz> {
        let t = s.trim();
        match t.to_ascii_lowercase().as_str() {
            "utc" | "z" | "gmt" => return Ok(Tz::Utc),
            "local" => return Ok(Tz::Local),
            _ => {}
        }
        parse_offset(t).map(Tz::Fixed).ok_or_else(|| {
            Error::Config(format!(
                "timezone {s:?}: use \"utc\", \"local\" or an offset like \"+02:00\""
            ))
        })
    }

    /// Offset from UTC in ms.
    pub fn offset_ms(self) -> i64 {
        match self {
            Tz::Utc => 0,
            Tz::Fixed(m) => i64::from(m) * 60_000,
            Tz::Local => local_offset_minutes() * 60_000,
        }
    }
}

/// `+HH:MM`, `-HHMM`, `+HH`.
fn parse_offset(s: &str) -> Option<i32> {
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let digits: String = rest.chars().filter(|c| *c != ':').collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) || !(digits.len() == 2 || digits.len() == 4) {
        return None;
    }
    let h: i32 = digits.get(..2)?.parse().ok()?;
    let m: i32 = if digits.len() == 4 {
        digits.get(2..)?.parse().ok()?
    } else {
        0
    };
    (h <= 14 && m < 60).then_some(sign * (h * 60 + m))
}

fn local_offset_minutes() -> i64 {
    static CACHE: std::sync::Mutex<Option<(Instant, i64)>> = std::sync::Mutex::new(None);
    let Ok(mut g) = CACHE.lock() else { return 0 };
    if let Some((at, off)) = *g {
        if at.elapsed() < Duration::from_secs(600) {
            return off;
        }
    }
    let off = std::process::Command::new("date")
        .arg("+%z")
        .output()
        .ok()
        .and_then(|o| parse_offset(String::from_utf8_lossy(&o.stdout).trim()))
        .map(i64::from)
        .unwrap_or_else(|| {
            tracing::warn!("cannot read the local UTC offset (`date +%z`); using UTC for schedules");
            0
        });
    *g = Some((Instant::now(), off));
    off
}

/// A daily window `HH:MM-HH:MM` (minutes of the day, end exclusive). An end
/// before the start wraps past midnight; equal ends mean all day.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: u32,
    pub end: u32,
}

impl Window {
    pub fn parse(s: &str) -> Result<Window> {
        let bad = || Error::Config(format!("schedule window {s:?}: use HH:MM-HH:MM, e.g. \"22:00-06:00\""));
        let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
        let hm = |t: &str| -> Option<u32> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
            ((h < 24 && m < 60) || (h == 24 && m == 0)).then_some(h * 60 + m)
        };
        Ok(Window {
            start: hm(a).ok_or_else(bad)? % 1440,
            end: hm(b).ok_or_else(bad)? % 1440,
        })
    }
    pub fn contains(&self, minute: u32) -> bool {
        match self.start.cmp(&self.end) {
            std::cmp::Ordering::Less => self.start <= minute && minute < self.end,
            std::cmp::Ordering::Greater => minute >= self.start || minute < self.end,
            std::cmp::Ordering::Equal => true,
        }
    }
}

/// `123`, `64KiB`, `1.5MB`, `2GiB`, `10k` … (K/M/G/T: powers of 1000 with
/// `B`/no suffix letter `i`; KiB/MiB/GiB/TiB: powers of 1024).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        Error::Config(format!(
            "size {s:?}: expected a number with an optional unit (KiB, MB, …)"
        ))
    })?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "ti" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        u => return Err(Error::Config(format!("size {s:?}: unknown unit {u:?}"))),
    };
    let v = n * mult;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(Error::Config(format!("size {s:?} out of range")));
    }
    Ok(v as u64)
}

/// `90` (seconds), `30s`, `15m`, `12h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| Error::Config(format!("duration {s:?}: expected e.g. 30s, 15m, 12h, 7d")))?;
    let mult = match unit.trim() {
        "" | "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        u => return Err(Error::Config(format!("duration {s:?}: unknown unit {u:?}"))),
    };
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

/// A number or a string with a unit, as written in the TOML file.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Quantity {
    Int(u64),
    Text(String),
}

impl Quantity {
    pub fn bytes(&self) -> Result<u64> {
        match self {
            Quantity::Int(n) => Ok(*n),
            Quantity::Text(s) => parse_size(s),
        }
    }
    pub fn duration(&self) -> Result<Duration> {
        match self {
            Quantity::Int(n) => Ok(Duration::from_secs(*n)),
            Quantity::Text(s) => parse_duration(s),
        }
    }
}

/// One `[[class]]` of the config file. Every field but `name` is optional:
/// on a built-in class (`append`, `db`, `default`) it overrides only what is
/// given; a new class starts from the `default` class's settings and needs
/// `globs`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClassSpec {
    pub name: String,
    pub globs: Option<Vec<String>>,
    pub priority: Option<i32>,
    pub chunk_avg_kib: Option<usize>,
    pub zstd_level: Option<i32>,
    /// Use the append fast path (files that only grow at the end).
    pub append: Option<bool>,
    /// Cut SQLite databases into 128 KiB groups of whole pages
    /// (`chunker::PAGE_GROUP`; on for the `db` class).
    pub sqlite_pages: Option<bool>,
    /// Send a changed page group as a delta against its previous version,
    /// keeping a compressed copy of each group in the state file
    /// (on for the `db` class; needs `sqlite_pages`).
    pub page_deltas: Option<bool>,
    pub schedule: Option<Vec<String>>,
    pub timezone: Option<String>,
    /// Bytes per second of chunk data, e.g. `"200KiB"`.
    pub bandwidth: Option<Quantity>,
    /// Bytes of chunk data per day (in `timezone`), e.g. `"50MiB"`.
    pub daily_budget: Option<Quantity>,
    /// How long a file stays on disk after it is cloud-durable, e.g. `"7d"`.
    pub keep_local: Option<Quantity>,
    pub prune: Option<Prune>,
    /// Several devices of the site write these paths (DESIGN.md §6): every
    /// change carries a version vector and the `conflict` policy.
    pub shared: Option<bool>,
    /// How the cloud resolves concurrent versions of a shared path:
    /// `keep-both` (default), `last-writer-wins` or `append-merge`. Only
    /// with `shared = true`.
    pub conflict: Option<String>,
}

impl ClassSpec {
    /// The conflict policy if this spec makes its class shared, `Some(None)`
    /// if it makes it unshared, `None` if it says nothing. `conflict`
    /// without `shared = true` is an error: the policy would silently do
    /// nothing.
    pub fn shared_policy(&self) -> Result<Option<Option<ConflictPolicy>>> {
        let policy = match &self.conflict {
            Some(c) => Some(
                c.parse::<ConflictPolicy>()
                    .map_err(|e| Error::Config(format!("class {:?}: {e}", self.name)))?,
            ),
            None => None,
        };
        match (self.shared, policy) {
            (Some(true), p) => Ok(Some(Some(p.unwrap_or_default()))),
            (_, Some(p)) => Err(Error::Config(format!(
                "class {:?}: conflict = {:?} needs shared = true (conflict policies apply only to \
                 paths several devices write)",
                self.name,
                p.as_str()
            ))),
            (Some(false), None) => Ok(Some(None)),
            (None, None) => Ok(None),
        }
    }
}

/// The agent's TOML config file (`edge-agent run|sync --config FILE`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub include: Option<Vec<String>>,
    pub exclude: Option<Vec<String>>,
    /// A class with pending changes gets a batch at least this often, even
    /// while higher-priority classes have backlog.
    pub starvation: Option<Quantity>,
    /// Most logical bytes of file versions offered in one batch (beyond the
    /// first change): bounds how long a higher-priority change recorded
    /// meanwhile waits for the batch in flight.
    pub batch_data_bytes: Option<Quantity>,
    pub disk_high: Option<String>,
    pub disk_low: Option<String>,
    #[serde(default, rename = "class")]
    pub classes: Vec<ClassSpec>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        FileConfig::parse(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }
    pub fn parse(text: &str) -> Result<FileConfig> {
        let f: FileConfig = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        for c in &f.classes {
            c.shared_policy()?;
        }
        Ok(f)
    }
}

/// A disk watermark: percent of the filesystem used, or bytes free.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Watermark {
    UsedPct(f64),
    FreeBytes(u64),
}

impl Watermark {
    /// `"90%"` (used) or a size (`"2GiB"`: free space).
    pub fn parse(s: &str) -> Result<Watermark> {
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            let v: f64 = p
                .trim()
                .parse()
                .map_err(|_| Error::Config(format!("watermark {s:?}: expected e.g. 90% or 2GiB (free)")))?;
            if !(0.0..=100.0).contains(&v) {
                return Err(Error::Config(format!("watermark {s:?}: percent must be 0..100")));
            }
            Ok(Watermark::UsedPct(v))
        } else {
            Ok(Watermark::FreeBytes(parse_size(t)?))
        }
    }
    pub fn describe(&self) -> String {
        match self {
            Watermark::UsedPct(p) => format!("{p}% used"),
            Watermark::FreeBytes(b) => format!("{b} bytes free"),
        }
    }
}

/// Size and free space of a filesystem, as a [`DiskProbe`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskStat {
    pub total: u64,
    /// Free to unprivileged users.
    pub free: u64,
}

impl DiskStat {
    pub fn used_pct(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        self.total.saturating_sub(self.free) as f64 * 100.0 / self.total as f64
    }
}

/// Measures the filesystem holding a path. Injectable so tests need no full disk.
pub type DiskProbe = Arc<dyn Fn(&Path) -> std::io::Result<DiskStat> + Send + Sync>;

/// The default probe: POSIX `df -Pk PATH` (total = used + available, as df
/// computes its percentage).
pub fn df_probe() -> DiskProbe {
    Arc::new(|path: &Path| {
        let out = std::process::Command::new("df").arg("-Pk").arg(path).output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "df failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .nth(1)
            .ok_or_else(|| std::io::Error::other("df: no output line"))?;
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> std::io::Result<u64> {
            f.get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| std::io::Error::other(format!("df: cannot parse {line:?}")))
        };
        let (used, avail) = (num(2)?, num(3)?);
        Ok(DiskStat {
            total: (used + avail).saturating_mul(1024),
            free: avail.saturating_mul(1024),
        })
    })
}

/// High and low disk watermarks: over `high`, prune until under `low`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DiskWatermarks {
    pub high: Watermark,
    pub low: Watermark,
}

impl DiskWatermarks {
    pub fn new(high: Watermark, low: Watermark) -> Result<DiskWatermarks> {
        let ok = match (high, low) {
            (Watermark::UsedPct(h), Watermark::UsedPct(l)) => l < h,
            (Watermark::FreeBytes(h), Watermark::FreeBytes(l)) => l > h,
            _ => false,
        };
        if !ok {
            return Err(Error::Config(format!(
                "disk watermarks: high {} and low {} must be the same kind (both % used or both free \
                 bytes) with low below high",
                high.describe(),
                low.describe()
            )));
        }
        Ok(DiskWatermarks { high, low })
    }
    pub fn over_high(&self, s: &DiskStat) -> bool {
        match self.high {
            Watermark::UsedPct(p) => s.used_pct() >= p,
            Watermark::FreeBytes(b) => s.free <= b,
        }
    }
    /// Bytes to free to get under the low watermark (0 when already there).
    pub fn to_free(&self, s: &DiskStat) -> u64 {
        match self.low {
            Watermark::UsedPct(p) => {
                let target_used = (s.total as f64 * p / 100.0) as u64;
                s.total.saturating_sub(s.free).saturating_sub(target_used)
            }
            Watermark::FreeBytes(b) => b.saturating_sub(s.free),
        }
    }
}

/// One resolved policy class.
#[derive(Clone, Debug)]
pub struct Class {
    pub name: String,
    globs: Option<GlobSet>,
    pub glob_list: Vec<String>,
    pub priority: i32,
    pub chunking: ChunkParams,
    pub zstd_level: i32,
    pub append: bool,
    /// Chunk SQLite databases in groups of whole pages (`chunker::PAGE_GROUP`).
    pub sqlite_pages: bool,
    /// Seal changed page groups as deltas against their previous version.
    pub page_deltas: bool,
    pub schedule: Vec<Window>,
    pub tz: Tz,
    pub bandwidth: Option<u64>,
    pub daily_budget: Option<u64>,
    pub keep_local: Duration,
    pub prune: Prune,
    /// `Some(policy)` for a shared class: its changes carry a version vector.
    pub shared: Option<ConflictPolicy>,
}

impl Class {
    /// May this class send at `now_ms` (Unix ms)?
    pub fn open_at(&self, now_ms: u64) -> bool {
        if self.schedule.is_empty() {
            return true;
        }
        let local = now_ms as i64 + self.tz.offset_ms();
        let minute = (local.rem_euclid(86_400_000) / 60_000) as u32;
        self.schedule.iter().any(|w| w.contains(minute))
    }
    /// The budget day (days since 1970-01-01 in the class's time zone).
    pub fn day(&self, now_ms: u64) -> u64 {
        (now_ms as i64 + self.tz.offset_ms()).max(0) as u64 / 86_400_000
    }
    /// Ms until the next budget day starts.
    pub fn ms_to_next_day(&self, now_ms: u64) -> u64 {
        let local = (now_ms as i64 + self.tz.offset_ms()).max(0) as u64;
        86_400_000 - local % 86_400_000
    }
    /// Does this class restrict when or how much it sends?
    pub fn gated(&self) -> bool {
        !self.schedule.is_empty() || self.daily_budget.is_some()
    }
}

/// Include/exclude filters and the classes, in matching order (the first
/// class whose globs match wins; `default` matches everything, last).
#[derive(Clone, Debug)]
pub struct Policy {
    include: Option<GlobSet>,
    exclude: GlobSet,
    pub classes: Vec<Class>,
}

pub(crate) fn set(globs: &[String]) -> Result<GlobSet> {
    let mut b = GlobSetBuilder::new();
    for g in globs {
        b.add(Glob::new(g).map_err(|e| Error::Config(format!("glob {g:?}: {e}")))?);
    }
    b.build().map_err(|e| Error::Config(e.to_string()))
}

/// Settings of the built-in classes (from `AgentConfig`).
pub struct Builtins<'a> {
    pub append_globs: &'a [String],
    pub db_globs: &'a [String],
    pub chunking: ChunkParams,
    pub db_chunking: ChunkParams,
    pub zstd_level: i32,
    pub append_zstd_level: i32,
}

impl Policy {
    /// The built-in classes, then `specs` applied over them (overriding a
    /// built-in of the same name, or adding a class before the built-ins).
    pub fn build(include: &[String], exclude: &[String], b: &Builtins, specs: &[ClassSpec]) -> Result<Policy> {
        let base = |name: &str, globs: &[String], chunking, level, append| Class {
            name: name.to_string(),
            globs: None,
            glob_list: globs.to_vec(),
            priority: 0,
            chunking,
            zstd_level: level,
            append,
            sqlite_pages: name == DB_CLASS,
            page_deltas: name == DB_CLASS,
            schedule: Vec::new(),
            tz: Tz::Utc,
            bandwidth: None,
            daily_budget: None,
            keep_local: Duration::ZERO,
            prune: Prune::Durable,
            shared: None,
        };
        let mut builtins = vec![
            base(APPEND_CLASS, b.append_globs, b.chunking, b.append_zstd_level, true),
            base(DB_CLASS, b.db_globs, b.db_chunking, b.zstd_level, false),
            base(DEFAULT_CLASS, &[], b.chunking, b.zstd_level, false),
        ];
        let mut added: Vec<Class> = Vec::new();
        for spec in specs {
            let ctx = |e: Error| Error::Config(format!("class {:?}: {e}", spec.name));
            protocol::manifest::validate_path(&spec.name)
                .ok()
                .filter(|_| !spec.name.contains('/'))
                .ok_or_else(|| Error::Config(format!("class name {:?} is not a plain name", spec.name)))?;
            if added.iter().any(|c| c.name == spec.name) {
                return Err(Error::Config(format!("class {:?} is defined twice", spec.name)));
            }
            let class = match builtins.iter_mut().find(|c| c.name == spec.name) {
                Some(c) => c,
                None => {
                    if spec.globs.as_ref().is_none_or(|g| g.is_empty()) {
                        return Err(Error::Config(format!("class {:?} needs globs", spec.name)));
                    }
                    let mut c = base(&spec.name, &[], b.chunking, b.zstd_level, false);
                    c.name = spec.name.clone();
                    added.push(c);
                    added.last_mut().ok_or_else(|| Error::Config("class list".into()))?
                }
            };
            if let Some(g) = &spec.globs {
                if class.name == DEFAULT_CLASS {
                    return Err(Error::Config(
                        "class \"default\" matches everything; it takes no globs".into(),
                    ));
                }
                class.glob_list = g.clone();
            }
            if let Some(p) = spec.priority {
                class.priority = p;
            }
            if let Some(kib) = spec.chunk_avg_kib {
                let avg = kib << 10;
                class.chunking = ChunkParams {
                    min: avg / 4,
                    avg,
                    max: avg * 4,
                };
                class.chunking.validate().map_err(ctx)?;
            }
            if let Some(l) = spec.zstd_level {
                if !(-7..=22).contains(&l) {
                    return Err(ctx(Error::Config(format!("zstd_level {l} out of -7..22"))));
                }
                class.zstd_level = l;
            }
            if let Some(a) = spec.append {
                class.append = a;
            }
            if let Some(p) = spec.sqlite_pages {
                class.sqlite_pages = p;
            }
            if let Some(p) = spec.page_deltas {
                class.page_deltas = p;
            }
            if let Some(s) = &spec.schedule {
                class.schedule = s.iter().map(|w| Window::parse(w)).collect::<Result<_>>().map_err(ctx)?;
            }
            if let Some(t) = &spec.timezone {
                class.tz = Tz::parse(t).map_err(ctx)?;
            }
            if let Some(q) = &spec.bandwidth {
                let v = q.bytes().map_err(ctx)?;
                class.bandwidth = (v > 0).then_some(v);
            }
            if let Some(q) = &spec.daily_budget {
                class.daily_budget = Some(q.bytes().map_err(ctx)?);
            }
            if let Some(q) = &spec.keep_local {
                class.keep_local = q.duration().map_err(ctx)?;
            }
            if let Some(p) = spec.prune {
                class.prune = p;
            }
            if let Some(sh) = spec.shared_policy()? {
                class.shared = sh;
            }
        }
        let mut classes = added;
        classes.extend(builtins);
        for c in &mut classes {
            if c.name != DEFAULT_CLASS {
                c.globs = Some(set(&c.glob_list)?);
            }
        }
        Ok(Policy {
            include: if include.is_empty() { None } else { Some(set(include)?) },
            exclude: set(exclude)?,
            classes,
        })
    }

    /// Only the built-in classes (the behaviour before config files).
    pub fn new(
        include: &[String],
        exclude: &[String],
        append: &[String],
        db: &[String],
        levels: (i32, i32),
    ) -> Result<Policy> {
        let b = Builtins {
            append_globs: append,
            db_globs: db,
            chunking: ChunkParams::default(),
            db_chunking: ChunkParams::DB,
            zstd_level: levels.0,
            append_zstd_level: levels.1,
        };
        Policy::build(include, exclude, &b, &[])
    }

    pub fn included(&self, path: &str) -> bool {
        let p = Path::new(path);
        self.include.as_ref().is_none_or(|s| s.is_match(p)) && !self.exclude.is_match(p)
    }

    /// Index (in `classes`) of the class of `path`.
    pub fn class_idx(&self, path: &str) -> usize {
        let p = Path::new(path);
        self.classes
            .iter()
            .position(|c| c.globs.as_ref().is_none_or(|g| g.is_match(p)))
            .unwrap_or(self.classes.len().saturating_sub(1))
    }

    pub fn class(&self, path: &str) -> &str {
        self.classes
            .get(self.class_idx(path))
            .map_or(DEFAULT_CLASS, |c| c.name.as_str())
    }

    /// The conflict policy of `path`'s class if that class is shared.
    pub fn shared(&self, path: &str) -> Option<ConflictPolicy> {
        self.classes.get(self.class_idx(path)).and_then(|c| c.shared)
    }

    pub fn by_name(&self, name: &str) -> Option<&Class> {
        self.classes.iter().find(|c| c.name == name)
    }

    /// zstd level of a class by name (the `default` class's for unknown names).
    pub fn level(&self, class: &str) -> i32 {
        self.by_name(class)
            .or_else(|| self.by_name(DEFAULT_CLASS))
            .map_or(3, |c| c.zstd_level)
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
        assert_eq!((p.level("append"), p.level("db"), p.level("nope")), (1, 3, 3));
    }

    #[test]
    fn config_file_classes() {
        let f = FileConfig::parse(
            r#"
            starvation = "10m"
            [[class]]
            name = "alarms"
            globs = ["*/alarms/*"]
            priority = 10
            bandwidth = "100KiB"
            schedule = ["22:00-06:00"]
            timezone = "+01:00"
            [[class]]
            name = "append"
            daily_budget = 5000000
            keep_local = "7d"
            prune = "never"
            "#,
        )
        .unwrap();
        let globs: Vec<String> = DEFAULT_APPEND_GLOBS.iter().map(|s| s.to_string()).collect();
        let b = Builtins {
            append_globs: &globs,
            db_globs: &[],
            chunking: ChunkParams::default(),
            db_chunking: ChunkParams::DB,
            zstd_level: 3,
            append_zstd_level: 1,
        };
        let p = Policy::build(&[], &[], &b, &f.classes).unwrap();
        assert_eq!(p.class("x/alarms/a.csv"), "alarms");
        assert_eq!(p.class("x/b.csv"), APPEND_CLASS);
        let a = p.by_name("alarms").unwrap();
        assert_eq!((a.priority, a.bandwidth, a.tz), (10, Some(100 << 10), Tz::Fixed(60)));
        // 21:30 UTC = 22:30 at +01:00: open; 05:30 UTC = 06:30: closed.
        assert!(a.open_at(21 * 3_600_000 + 30 * 60_000));
        assert!(!a.open_at(5 * 3_600_000 + 30 * 60_000));
        let ap = p.by_name("append").unwrap();
        assert_eq!(
            (ap.daily_budget, ap.keep_local, ap.prune),
            (Some(5_000_000), Duration::from_secs(7 * 86400), Prune::Never)
        );
        assert!(ap.append && !a.append);
        assert_eq!(f.starvation.unwrap().duration().unwrap(), Duration::from_secs(600));
        assert!(FileConfig::parse("[[class]]\nname = \"x\"\nbogus = 1").is_err());
        assert!(Policy::build(
            &[],
            &[],
            &b,
            &[ClassSpec {
                name: "x".into(),
                ..Default::default()
            }]
        )
        .is_err());
    }

    #[test]
    fn units_windows_watermarks() {
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1.5MB").unwrap(), 1_500_000);
        assert_eq!(parse_size("10").unwrap(), 10);
        assert!(parse_size("3 parsecs").is_err());
        assert_eq!(parse_duration("12h").unwrap(), Duration::from_secs(43200));
        let w = Window::parse("22:00-06:00").unwrap();
        assert!(w.contains(23 * 60) && w.contains(0) && !w.contains(6 * 60) && !w.contains(12 * 60));
        assert!(Window::parse("25:00-01:00").is_err());
        let wm = DiskWatermarks::new(Watermark::parse("90%").unwrap(), Watermark::parse("80%").unwrap()).unwrap();
        let s = DiskStat { total: 1000, free: 50 };
        assert!(wm.over_high(&s));
        assert_eq!(wm.to_free(&s), 150);
        let wm = DiskWatermarks::new(Watermark::parse("1KB").unwrap(), Watermark::parse("3KB").unwrap()).unwrap();
        assert!(wm.over_high(&DiskStat {
            total: 10_000,
            free: 900
        }));
        assert_eq!(
            wm.to_free(&DiskStat {
                total: 10_000,
                free: 900
            }),
            2100
        );
        assert!(DiskWatermarks::new(Watermark::UsedPct(80.0), Watermark::UsedPct(90.0)).is_err());
        assert_eq!(Tz::parse("-05:30").unwrap(), Tz::Fixed(-330));
    }
}

#[cfg(test)]
mod example {
    /// docs/agent.example.toml parses and builds.
    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../../docs/agent.example.toml");
        let f = super::FileConfig::parse(text).unwrap();
        let b = super::Builtins {
            append_globs: &[],
            db_globs: &[],
            chunking: crate::ChunkParams::default(),
            db_chunking: crate::ChunkParams::DB,
            zstd_level: 3,
            append_zstd_level: 1,
        };
        let p = super::Policy::build(&[], &[], &b, &f.classes).unwrap();
        assert_eq!(p.class("x/alarms/a.csv"), "alarms");
        assert!(super::Watermark::parse(f.disk_high.as_deref().unwrap()).is_ok());
    }
}
