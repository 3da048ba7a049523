//! Deterministic, seeded generator of realistic factory-gateway archive
//! folders, plus hourly "change steps".
//!
//! Used by `sim demo`, by tests and by benchmarks. Everything is a pure
//! function of `(seed, device_index, step)` and the history of steps applied
//! so far: no clock, no OS randomness. Mtimes are not controlled.
//!
//! Layout of one gateway folder (sizes at `scale = 1.0`, ≈ 12 MiB in total):
//!
//! | path | size | behaviour |
//! |---|---|---|
//! | `config/gateway.toml` | < 1 KiB | static |
//! | `logs/line{N}_sensors.csv` (2–3 files) | 1.25 MiB each | append-only text, ~3 % per step |
//! | `logs/app.log` | ~64 KiB | append-only; rotated every 6 steps |
//! | `logs/rotated/app.log.{1..4}` | ~96 KiB each | renamed on rotation (`app.log` → `app.log.1` → `app.log.2` …) |
//! | `series/{name}.bin` (3 files) | 512 KiB each | append-only binary records, ~3 % per step |
//! | `db/quality.sqlite` | ~3 MiB | real SQLite; ~10 % of pages edited per step plus inserts |
//! | `rollup/daily_summary.json` | ~20 KiB | rewritten entirely each step, mostly similar |
//! | `camera/frame_0000.raw` | 512 KiB | reference frame, identical on every gateway of the fleet |
//! | `camera/frame_{NNNN}.raw` (N ≥ 1) | 256 KiB–1 MiB | random bytes, unique per device; one new per step, oldest deleted every 10 steps |
//! | `firmware/gw-fw-2.3.1.img` | 1 MiB | identical on every gateway of the fleet |
//!
//! Files shared across the fleet derive their bytes from `cfg.seed` only; all
//! other content also mixes in `cfg.device_index`.
//!
//! Timeline: the initial archive holds the [`HISTORY_HOURS`] hours before
//! virtual time `T0` (2026-03-02T00:00:00Z); step `s` adds the hour
//! `[T0 + (s-1) h, T0 + s h)`. Steps are meant to be applied in order
//! 1, 2, 3 … exactly once each.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{bail, ensure, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

/// Generator settings for one gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenConfig {
    /// Fleet-wide seed. Shared files depend on this only.
    pub seed: u64,
    /// Size factor; 1.0 ≈ 12 MiB per gateway. Must be finite and > 0.
    pub scale: f64,
    /// Index of this gateway in the fleet (`0..fleet_size`).
    pub device_index: usize,
    /// Number of gateways in the fleet (≥ 1).
    pub fleet_size: usize,
}

impl GenConfig {
    pub fn new(seed: u64, scale: f64, device_index: usize, fleet_size: usize) -> Self {
        Self {
            seed,
            scale,
            device_index,
            fleet_size,
        }
    }

    /// Device id of this gateway, e.g. `gw-0003`.
    pub fn device_id(&self) -> String {
        device_id(self.device_index)
    }

    fn validate(&self) -> Result<()> {
        ensure!(
            self.scale.is_finite() && self.scale > 0.0,
            "gen: scale must be finite and > 0 (got {})",
            self.scale
        );
        ensure!(self.fleet_size >= 1, "gen: fleet_size must be >= 1");
        ensure!(
            self.device_index < self.fleet_size,
            "gen: device_index {} out of range for fleet_size {}",
            self.device_index,
            self.fleet_size
        );
        Ok(())
    }

    fn dev(&self) -> u64 {
        self.device_index as u64
    }

    /// `bytes` (a size at scale 1.0) scaled, never below `min`.
    fn scaled(&self, bytes: f64, min: u64) -> u64 {
        ((bytes * self.scale).round() as u64).max(min)
    }
}

/// What a generator call wrote.
///
/// `generate_initial`: number of files and their total size.
/// `apply_step`: number of files created, modified or renamed, and the bytes
/// appended / rewritten / changed (for the SQLite file: 4 KiB pages that
/// differ, plus growth). Deletions are not counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenSummary {
    pub files: u64,
    pub bytes: u64,
}

impl GenSummary {
    fn add(&mut self, other: GenSummary) {
        self.files += other.files;
        self.bytes += other.bytes;
    }
}

/// Device id used for gateway `index` (`gw-0000`, `gw-0001`, …).
pub fn device_id(index: usize) -> String {
    format!("gw-{index:04}")
}

/// Hours of history in the initial archive; each step adds one hour, so
/// append-only files grow by ~1/32 ≈ 3 % per step.
pub const HISTORY_HOURS: i64 = 32;
/// Virtual time origin: 2026-03-02T00:00:00Z, in Unix seconds.
pub const T0_UNIX: i64 = days_from_civil(2026, 3, 2) * 86_400;

/// Relative path of the shared (fleet-wide identical) reference frame.
pub const REFERENCE_FRAME: &str = "camera/frame_0000.raw";
/// Relative path of the shared (fleet-wide identical) firmware image.
pub const FIRMWARE_IMAGE: &str = "firmware/gw-fw-2.3.1.img";
/// Relative path of the SQLite database.
pub const QUALITY_DB: &str = "db/quality.sqlite";
/// Relative path of the rollup file rewritten each step.
pub const ROLLUP: &str = "rollup/daily_summary.json";

const MIB: f64 = 1024.0 * 1024.0;
const KIB: f64 = 1024.0;

const CSV_BYTES_PER_FILE: f64 = 1.25 * MIB;
const CSV_AVG_ROW: f64 = 50.0;
const SERIES_BYTES_PER_FILE: f64 = 0.5 * MIB;
const SERIES_HEADER_LEN: usize = 16;
const DB_TARGET_BYTES: f64 = 3.0 * MIB;
const DB_AVG_ROW: f64 = 180.0;
const DB_PAGE: usize = 4096;
const APPLOG_BYTES_PER_HOUR: f64 = 8.0 * KIB;
const APPLOG_AVG_LINE: f64 = 80.0;
const APPLOG_CURRENT_HOURS: i64 = 8;
const APPLOG_ROTATED_HOURS: i64 = 12;
const APPLOG_INITIAL_ROTATED: u32 = 2;
const MAX_ROTATED: u32 = 4;
const ROTATE_EVERY: u32 = 6;
const DELETE_FRAME_EVERY: u32 = 10;
const INITIAL_FRAMES: u32 = 3;
const FRAME_MIN: f64 = 256.0 * KIB;
const FRAME_MAX: f64 = 1024.0 * KIB;
const REFERENCE_FRAME_BYTES: f64 = 512.0 * KIB;
const FIRMWARE_BYTES: f64 = 1.0 * MIB;
const ROLLUP_CALIBRATION_ENTRIES: f64 = 80.0;

// Stream tags for derived seeds.
const T_LAYOUT: u64 = 1;
const T_CSV: u64 = 2;
const T_SERIES: u64 = 3;
const T_APPLOG: u64 = 4;
const T_DB_INIT: u64 = 5;
const T_DB_STEP: u64 = 6;
const T_ROLLUP: u64 = 7;
const T_FRAME: u64 = 8;
const T_REFERENCE: u64 = 9;
const T_FIRMWARE: u64 = 10;
const T_PHASE: u64 = 11;
const T_ROLLUP_HOUR: u64 = 12;

// ---------------------------------------------------------------------------
// Public entry points
// ---------------------------------------------------------------------------

/// Populate `dir` (created if missing) with the initial archive of one
/// gateway. Files of the layout are overwritten; `dir` should be empty.
pub fn generate_initial(dir: &Path, cfg: &GenConfig) -> Result<GenSummary> {
    cfg.validate()?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let layout = Layout::new(cfg);
    let mut sum = GenSummary::default();

    // Static config.
    write_file(
        &dir.join("config/gateway.toml"),
        config_toml(cfg, &layout).as_bytes(),
        &mut sum,
    )?;

    // CSV sensor logs.
    for line in &layout.lines {
        let rows = csv_rows_per_hour(cfg);
        let mut out = Vec::with_capacity(cfg.scaled(CSV_BYTES_PER_FILE * 1.1, 4096) as usize);
        out.extend_from_slice(b"timestamp,sensor_id,value,unit,status\n");
        for h in -HISTORY_HOURS..0 {
            csv_hour(cfg, line, h, rows, &mut out);
        }
        write_file(&dir.join(line.csv_path()), &out, &mut sum)?;
    }

    // Binary series.
    for (idx, spec) in layout.series.iter().enumerate() {
        let recs = series_records_per_hour(cfg, spec);
        let mut out =
            Vec::with_capacity(SERIES_HEADER_LEN + (recs as usize) * spec.record_len() * HISTORY_HOURS as usize);
        series_header(spec, &mut out);
        for h in -HISTORY_HOURS..0 {
            series_hour(cfg, idx, spec, h, recs, &mut out);
        }
        write_file(&dir.join(spec.path()), &out, &mut sum)?;
    }

    // Application log: current file plus older rotated ones.
    {
        let mut out = Vec::new();
        for h in -APPLOG_CURRENT_HOURS..0 {
            applog_hour(cfg, &layout, h, &mut out);
        }
        write_file(&dir.join("logs/app.log"), &out, &mut sum)?;
        for k in 1..=APPLOG_INITIAL_ROTATED {
            let end = -APPLOG_CURRENT_HOURS - APPLOG_ROTATED_HOURS * (i64::from(k) - 1);
            let mut out = Vec::new();
            for h in end - APPLOG_ROTATED_HOURS..end {
                applog_hour(cfg, &layout, h, &mut out);
            }
            write_file(&dir.join(format!("logs/rotated/app.log.{k}")), &out, &mut sum)?;
        }
    }

    // SQLite database.
    sum.add(db_create(&dir.join(QUALITY_DB), cfg, &layout)?);

    // Rollup, as of the end of the last history hour.
    write_file(&dir.join(ROLLUP), &rollup_json(cfg, &layout, -1)?, &mut sum)?;

    // Camera frames: shared reference plus device-unique frames.
    write_file(&dir.join(REFERENCE_FRAME), &reference_frame(cfg), &mut sum)?;
    for n in 1..=INITIAL_FRAMES {
        write_file(&dir.join(frame_path(n)), &frame_bytes(cfg, n), &mut sum)?;
    }

    // Shared firmware image.
    write_file(&dir.join(FIRMWARE_IMAGE), &firmware_image(cfg), &mut sum)?;

    Ok(sum)
}

/// Apply one "hour" of changes (`step` = 1, 2, 3 …) to a gateway folder
/// produced by [`generate_initial`]: appends to the CSV logs, the binary
/// series and `app.log`, mid-file page edits and inserts in the SQLite
/// database, a rewritten rollup, one new camera frame; every 6th step (phase
/// per device) `app.log` is rotated by renames into `logs/rotated/`, every
/// 10th step the oldest device camera frame is deleted.
///
/// Deterministic for `(cfg.seed, cfg.device_index, step)` given the same
/// starting tree.
pub fn apply_step(dir: &Path, cfg: &GenConfig, step: u32) -> Result<GenSummary> {
    cfg.validate()?;
    ensure!(step >= 1, "gen: steps are numbered from 1");
    let db_path = dir.join(QUALITY_DB);
    if !db_path.is_file() {
        bail!(
            "gen: {} is not a generated gateway folder (missing {QUALITY_DB})",
            dir.display()
        );
    }
    let layout = Layout::new(cfg);
    let hour = i64::from(step) - 1;
    let mut sum = GenSummary::default();

    // CSV appends.
    let rows = csv_rows_per_hour(cfg);
    for line in &layout.lines {
        let mut out = Vec::with_capacity(cfg.scaled(CSV_BYTES_PER_FILE / 30.0, 1024) as usize);
        csv_hour(cfg, line, hour, rows, &mut out);
        append_file(&dir.join(line.csv_path()), &out, &mut sum)?;
    }

    // Series appends.
    for (idx, spec) in layout.series.iter().enumerate() {
        let recs = series_records_per_hour(cfg, spec);
        let mut out = Vec::with_capacity(recs as usize * spec.record_len());
        series_hour(cfg, idx, spec, hour, recs, &mut out);
        append_file(&dir.join(spec.path()), &out, &mut sum)?;
    }

    // app.log: maybe rotate, then append this hour.
    let phase = device_phase(cfg);
    if (u64::from(step) + phase).is_multiple_of(u64::from(ROTATE_EVERY)) {
        sum.files += rotate_app_log(dir)?;
    }
    {
        let mut out = Vec::new();
        applog_hour(cfg, &layout, hour, &mut out);
        append_file(&dir.join("logs/app.log"), &out, &mut sum)?;
    }

    // SQLite edits.
    sum.add(db_step(&db_path, cfg, &layout, step)?);

    // Rollup rewrite.
    write_file(&dir.join(ROLLUP), &rollup_json(cfg, &layout, hour)?, &mut sum)?;

    // New camera frame.
    let n = INITIAL_FRAMES + step;
    write_file(&dir.join(frame_path(n)), &frame_bytes(cfg, n), &mut sum)?;

    // Occasionally delete the oldest device frame (never the shared one).
    if (u64::from(step) + phase / 7).is_multiple_of(u64::from(DELETE_FRAME_EVERY)) {
        delete_oldest_frame(dir)?;
    }

    Ok(sum)
}

/// Generate the initial archives of a whole fleet under `root/{device_id}`,
/// in parallel. Returns the summed summary.
pub fn generate_fleet(root: &Path, seed: u64, scale: f64, fleet_size: usize) -> Result<GenSummary> {
    for_each_device(fleet_size, |i| {
        let cfg = GenConfig::new(seed, scale, i, fleet_size);
        generate_initial(&root.join(cfg.device_id()), &cfg)
    })
}

/// Apply `step` to every gateway folder under `root/{device_id}`, in
/// parallel. Returns the summed summary.
pub fn apply_step_fleet(root: &Path, seed: u64, scale: f64, fleet_size: usize, step: u32) -> Result<GenSummary> {
    for_each_device(fleet_size, |i| {
        let cfg = GenConfig::new(seed, scale, i, fleet_size);
        apply_step(&root.join(cfg.device_id()), &cfg, step)
    })
}

fn for_each_device<F>(fleet_size: usize, f: F) -> Result<GenSummary>
where
    F: Fn(usize) -> Result<GenSummary> + Sync,
{
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(fleet_size.max(1));
    let next = AtomicUsize::new(0);
    let total = Mutex::new(Ok(GenSummary::default()));
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= fleet_size {
                    break;
                }
                let r = f(i);
                let mut t = match total.lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                match (&mut *t, r) {
                    (Ok(acc), Ok(one)) => acc.add(one),
                    (Ok(_), Err(e)) => {
                        *t = Err(e.context(format!("gateway {}", device_id(i))));
                        // Stop handing out work.
                        next.store(fleet_size, Ordering::Relaxed);
                    }
                    (Err(_), _) => {}
                }
            });
        }
    });
    match total.into_inner() {
        Ok(r) => r,
        Err(p) => p.into_inner(),
    }
}

/// Path, size and content hash of one file of a tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileFingerprint {
    /// Relative path with `/` separators.
    pub path: String,
    pub len: u64,
    /// [`content_hash`] of the bytes.
    pub hash: u64,
}

/// Fingerprint every regular file under `dir`, sorted by path. Useful to
/// compare generated, replicated and restored trees.
pub fn fingerprint_tree(dir: &Path) -> Result<Vec<FileFingerprint>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        for entry in fs::read_dir(&abs).with_context(|| format!("reading {}", abs.display()))? {
            let entry = entry?;
            let ty = entry.file_type()?;
            let rel_child = rel.join(entry.file_name());
            if ty.is_dir() {
                stack.push(rel_child);
            } else if ty.is_file() {
                let bytes = fs::read(entry.path()).with_context(|| format!("reading {}", entry.path().display()))?;
                let path = rel_child
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                out.push(FileFingerprint {
                    path,
                    len: bytes.len() as u64,
                    hash: content_hash(&bytes),
                });
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// A simple, fast, non-cryptographic 64-bit content hash (stable across
/// platforms and releases of this crate).
pub fn content_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ (bytes.len() as u64);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(w))
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(29);
    }
    for &b in chunks.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h)
}

// ---------------------------------------------------------------------------
// Seeds, noise, time
// ---------------------------------------------------------------------------

fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn derive(parts: &[u64]) -> u64 {
    parts.iter().fold(0x243f_6a88_85a3_08d3, |h, &p| mix64(h ^ mix64(p)))
}

fn rng_for(parts: &[u64]) -> StdRng {
    StdRng::seed_from_u64(derive(parts))
}

fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Smooth value noise in [0, 1): stateless, built from IEEE-exact operations
/// only, so identical on every platform.
fn smooth(key: u64, t_secs: f64, period: f64) -> f64 {
    let x = t_secs / period;
    let k = x.floor();
    let f = x - k;
    let a = unit(derive(&[key, k as i64 as u64]));
    let b = unit(derive(&[key, (k as i64 + 1) as u64]));
    let s = f * f * (3.0 - 2.0 * f);
    a + (b - a) * s
}

fn device_phase(cfg: &GenConfig) -> u64 {
    derive(&[cfg.seed, cfg.dev(), T_PHASE]) % 64
}

fn hour_start_ms(h: i64) -> i64 {
    (T0_UNIX + h * 3600) * 1000
}

const fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Write `2026-03-02T08:00:03.250Z`.
fn write_iso_ms(out: &mut Vec<u8>, ms: i64) {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    );
}

fn iso_ms(ms: i64) -> String {
    let mut v = Vec::with_capacity(24);
    write_iso_ms(&mut v, ms);
    String::from_utf8_lossy(&v).into_owned()
}

fn iso_date(ms: i64) -> String {
    let (y, m, d) = civil_from_days(ms.div_euclid(86_400_000));
    format!("{y:04}-{m:02}-{d:02}")
}

// ---------------------------------------------------------------------------
// Device layout (derived from seed + device index)
// ---------------------------------------------------------------------------

struct SensorKind {
    code: &'static str,
    unit: &'static str,
    base: (f64, f64),
    amp: (f64, f64),
    decimals: usize,
}

const SENSOR_KINDS: &[SensorKind] = &[
    SensorKind {
        code: "TEMP",
        unit: "degC",
        base: (40.0, 90.0),
        amp: (2.0, 8.0),
        decimals: 2,
    },
    SensorKind {
        code: "PRESS",
        unit: "bar",
        base: (4.0, 8.0),
        amp: (0.2, 0.8),
        decimals: 3,
    },
    SensorKind {
        code: "VIB",
        unit: "mm/s",
        base: (1.0, 5.0),
        amp: (0.5, 2.0),
        decimals: 3,
    },
    SensorKind {
        code: "CURR",
        unit: "A",
        base: (10.0, 40.0),
        amp: (1.0, 5.0),
        decimals: 2,
    },
    SensorKind {
        code: "SPEED",
        unit: "rpm",
        base: (1200.0, 3000.0),
        amp: (20.0, 120.0),
        decimals: 1,
    },
    SensorKind {
        code: "HUM",
        unit: "%RH",
        base: (30.0, 60.0),
        amp: (3.0, 10.0),
        decimals: 1,
    },
    SensorKind {
        code: "FLOW",
        unit: "l/min",
        base: (5.0, 25.0),
        amp: (0.5, 3.0),
        decimals: 2,
    },
];

struct Sensor {
    id: String,
    unit: &'static str,
    base: f64,
    amp: f64,
    decimals: usize,
    key: u64,
}

impl Sensor {
    /// Noise-free trend at time `ms`.
    fn trend(&self, ms: i64) -> f64 {
        let t = ms as f64 / 1000.0;
        let slow = smooth(self.key, t, 6.0 * 3600.0);
        let fast = smooth(self.key ^ 0x5555, t, 600.0);
        self.base + self.amp * (2.0 * slow - 1.0) + 0.25 * self.amp * (2.0 * fast - 1.0)
    }

    fn warn_threshold(&self) -> f64 {
        self.base + 0.9 * self.amp
    }
}

struct Line {
    line: u32,
    sensors: Vec<Sensor>,
}

impl Line {
    fn csv_path(&self) -> String {
        format!("logs/line{}_sensors.csv", self.line)
    }
}

struct Channel {
    base: f64,
    amp: f64,
    noise: f64,
    key: u64,
}

struct SeriesSpec {
    name: &'static str,
    channels: Vec<Channel>,
}

impl SeriesSpec {
    fn record_len(&self) -> usize {
        8 + 4 * self.channels.len()
    }
    fn path(&self) -> String {
        format!("series/{}.bin", self.name)
    }
}

/// One channel: (base, base jitter, amplitude, noise).
type ChannelDef = (f64, f64, f64, f64);

/// (name, channels)
const SERIES_DEFS: &[(&str, &[ChannelDef])] = &[
    (
        "spindle_vibration",
        &[(2.0, 0.5, 0.8, 0.05), (2.2, 0.5, 0.8, 0.05), (1.6, 0.4, 0.6, 0.05)],
    ),
    (
        "motor_current",
        &[(18.0, 3.0, 2.5, 0.1), (18.0, 3.0, 2.5, 0.1), (18.0, 3.0, 2.5, 0.1)],
    ),
    ("ambient", &[(24.0, 2.0, 3.0, 0.02), (45.0, 5.0, 8.0, 0.1)]),
];

struct Layout {
    device: String,
    site: String,
    lines: Vec<Line>,
    series: Vec<SeriesSpec>,
    operators: Vec<String>,
}

impl Layout {
    fn new(cfg: &GenConfig) -> Self {
        let mut rng = rng_for(&[cfg.seed, cfg.dev(), T_LAYOUT]);
        let n_lines = rng.gen_range(2..=3u32);
        let mut lines = Vec::new();
        for line in 1..=n_lines {
            let n_sensors = rng.gen_range(6..=10usize);
            let mut counts = [0u32; 8];
            let mut sensors = Vec::with_capacity(n_sensors);
            for _ in 0..n_sensors {
                let k = rng.gen_range(0..SENSOR_KINDS.len());
                let kind = &SENSOR_KINDS[k];
                counts[k] += 1;
                sensors.push(Sensor {
                    id: format!("L{line}-{}-{:02}", kind.code, counts[k]),
                    unit: kind.unit,
                    base: rng.gen_range(kind.base.0..kind.base.1),
                    amp: rng.gen_range(kind.amp.0..kind.amp.1),
                    decimals: kind.decimals,
                    key: rng.gen(),
                });
            }
            lines.push(Line { line, sensors });
        }
        let series = SERIES_DEFS
            .iter()
            .map(|(name, chans)| SeriesSpec {
                name,
                channels: chans
                    .iter()
                    .map(|&(base, jitter, amp, noise)| Channel {
                        base: base + rng.gen_range(-jitter..=jitter),
                        amp,
                        noise,
                        key: rng.gen(),
                    })
                    .collect(),
            })
            .collect();
        const FIRST: &[&str] = &[
            "ana", "ben", "chen", "dara", "emil", "fatma", "goran", "hana", "ivo", "jun",
        ];
        let operators = (0..6)
            .map(|_| {
                format!(
                    "{}.{}",
                    FIRST[rng.gen_range(0..FIRST.len())],
                    (b'a' + rng.gen_range(0..26u8)) as char
                )
            })
            .collect();
        Layout {
            device: cfg.device_id(),
            site: format!("site-{:02}", cfg.device_index / 25),
            lines,
            series,
            operators,
        }
    }

    fn all_sensors(&self) -> impl Iterator<Item = &Sensor> {
        self.lines.iter().flat_map(|l| l.sensors.iter())
    }
}

fn config_toml(cfg: &GenConfig, layout: &Layout) -> String {
    let mut s = String::new();
    s.push_str("# Ferry simulated gateway\n");
    s.push_str(&format!("device = \"{}\"\n", layout.device));
    s.push_str(&format!("site = \"{}\"\n", layout.site));
    s.push_str("firmware = \"2.3.1\"\n");
    let lines: Vec<String> = layout.lines.iter().map(|l| l.line.to_string()).collect();
    s.push_str(&format!("lines = [{}]\n", lines.join(", ")));
    s.push_str(&format!(
        "sample_interval_ms = {}\n",
        3_600_000 / csv_rows_per_hour(cfg).max(1)
    ));
    for l in &layout.lines {
        s.push_str(&format!("\n[line{}]\nsensors = [", l.line));
        let ids: Vec<String> = l.sensors.iter().map(|x| format!("\"{}\"", x.id)).collect();
        s.push_str(&ids.join(", "));
        s.push_str("]\n");
    }
    s
}

// ---------------------------------------------------------------------------
// CSV sensor logs
// ---------------------------------------------------------------------------

fn csv_rows_per_hour(cfg: &GenConfig) -> u64 {
    cfg.scaled(CSV_BYTES_PER_FILE / HISTORY_HOURS as f64 / CSV_AVG_ROW, 1)
}

fn csv_hour(cfg: &GenConfig, line: &Line, h: i64, rows: u64, out: &mut Vec<u8>) {
    let mut rng = rng_for(&[cfg.seed, cfg.dev(), T_CSV, u64::from(line.line), h as u64]);
    let start = hour_start_ms(h);
    let interval = (3_600_000 / rows.max(1)).max(1) as i64;
    let n = line.sensors.len();
    for i in 0..rows as i64 {
        let ts = start + i * interval + rng.gen_range(0..interval);
        let s = &line.sensors[(i as usize) % n];
        let v = s.trend(ts) + 0.04 * s.amp * (2.0 * rng.gen::<f64>() - 1.0);
        let status = if rng.gen_bool(0.0003) {
            "ERR"
        } else if v > s.warn_threshold() {
            "WARN"
        } else {
            "OK"
        };
        write_iso_ms(out, ts);
        let _ = writeln!(out, ",{},{:.*},{},{}", s.id, s.decimals, v, s.unit, status);
    }
}

// ---------------------------------------------------------------------------
// Binary series
// ---------------------------------------------------------------------------

fn series_records_per_hour(cfg: &GenConfig, spec: &SeriesSpec) -> u64 {
    cfg.scaled(
        SERIES_BYTES_PER_FILE / HISTORY_HOURS as f64 / spec.record_len() as f64,
        1,
    )
}

/// 16-byte header: magic `TSER`, u16 version, u16 channel count, u32 record
/// length, u32 reserved (all little-endian).
fn series_header(spec: &SeriesSpec, out: &mut Vec<u8>) {
    out.extend_from_slice(b"TSER");
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&(spec.channels.len() as u16).to_le_bytes());
    out.extend_from_slice(&(spec.record_len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
}

fn series_hour(cfg: &GenConfig, idx: usize, spec: &SeriesSpec, h: i64, recs: u64, out: &mut Vec<u8>) {
    let mut rng = rng_for(&[cfg.seed, cfg.dev(), T_SERIES, idx as u64, h as u64]);
    let start = hour_start_ms(h);
    let interval = (3_600_000 / recs.max(1)).max(1) as i64;
    for i in 0..recs as i64 {
        let ts = start + i * interval;
        out.extend_from_slice(&ts.to_le_bytes());
        let t = ts as f64 / 1000.0;
        for c in &spec.channels {
            let v = c.base + c.amp * (2.0 * smooth(c.key, t, 1800.0) - 1.0) + c.noise * (2.0 * rng.gen::<f64>() - 1.0);
            let q = ((v * 100.0).round() / 100.0) as f32;
            out.extend_from_slice(&q.to_le_bytes());
        }
    }
}

// ---------------------------------------------------------------------------
// Application log
// ---------------------------------------------------------------------------

fn applog_hour(cfg: &GenConfig, layout: &Layout, h: i64, out: &mut Vec<u8>) {
    let mut rng = rng_for(&[cfg.seed, cfg.dev(), T_APPLOG, h as u64]);
    let n = cfg.scaled(APPLOG_BYTES_PER_HOUR / APPLOG_AVG_LINE, 1) as i64;
    let start = hour_start_ms(h);
    let interval = (3_600_000 / n).max(1);
    for i in 0..n {
        let ts = start + i * interval + rng.gen_range(0..interval);
        write_iso_ms(out, ts);
        let line = &layout.lines[rng.gen_range(0..layout.lines.len())];
        let r: f64 = rng.gen();
        let _ = if r < 0.55 {
            writeln!(
                out,
                " INFO  collector: flushed {} readings for line {} ({} ms)",
                rng.gen_range(40..900),
                line.line,
                rng.gen_range(2..40)
            )
        } else if r < 0.75 {
            writeln!(
                out,
                " INFO  series: wrote {} records to {} ({} B)",
                rng.gen_range(10..400),
                layout.series[rng.gen_range(0..layout.series.len())].name,
                rng.gen_range(200..9000)
            )
        } else if r < 0.85 {
            writeln!(
                out,
                " DEBUG plc: poll cycle line {} took {} us, {} tags",
                line.line,
                rng.gen_range(300..4000),
                rng.gen_range(20..120)
            )
        } else if r < 0.93 {
            writeln!(
                out,
                " INFO  camera: captured frame on line {} exposure={}us gain={:.1}",
                line.line,
                rng.gen_range(200..2000),
                rng.gen_range(1.0..8.0f64)
            )
        } else if r < 0.985 {
            let s = &line.sensors[rng.gen_range(0..line.sensors.len())];
            writeln!(
                out,
                " WARN  monitor: {} above threshold {:.2} {}",
                s.id,
                s.warn_threshold(),
                s.unit
            )
        } else {
            writeln!(
                out,
                " ERROR plc: read timeout on line {} (attempt {}/3), retrying",
                line.line,
                rng.gen_range(1..=3)
            )
        };
    }
}

fn rotate_app_log(dir: &Path) -> Result<u64> {
    let rot = dir.join("logs/rotated");
    fs::create_dir_all(&rot)?;
    let oldest = rot.join(format!("app.log.{MAX_ROTATED}"));
    if oldest.exists() {
        fs::remove_file(&oldest)?;
    }
    let mut renamed = 0;
    for k in (1..MAX_ROTATED).rev() {
        let from = rot.join(format!("app.log.{k}"));
        if from.exists() {
            fs::rename(&from, rot.join(format!("app.log.{}", k + 1)))?;
            renamed += 1;
        }
    }
    let cur = dir.join("logs/app.log");
    if cur.exists() {
        fs::rename(&cur, rot.join("app.log.1"))?;
        renamed += 1;
    }
    Ok(renamed)
}

// ---------------------------------------------------------------------------
// SQLite quality database
// ---------------------------------------------------------------------------

const DB_SCHEMA: &str = "
PRAGMA page_size = 4096;
PRAGMA synchronous = OFF;
CREATE TABLE stations (
    id      TEXT PRIMARY KEY,
    line    INTEGER NOT NULL,
    kind    TEXT NOT NULL
);
CREATE TABLE inspections (
    id          INTEGER PRIMARY KEY,
    ts          TEXT NOT NULL,
    line        INTEGER NOT NULL,
    station     TEXT NOT NULL,
    part_serial TEXT NOT NULL,
    result      TEXT NOT NULL,
    defect_code TEXT,
    dim_a_mm    REAL NOT NULL,
    dim_b_mm    REAL NOT NULL,
    torque_nm   REAL NOT NULL,
    operator    TEXT NOT NULL,
    notes       TEXT
);
CREATE INDEX idx_inspections_serial ON inspections(part_serial);
";

const DEFECTS: &[&str] = &[
    "D101-scratch",
    "D102-dent",
    "D204-burr",
    "D310-misalign",
    "D415-porosity",
    "D520-torque-low",
    "D521-torque-high",
];
const NOTES: &[&str] = &[
    "",
    "ok",
    "visual check only",
    "sample pulled for lab",
    "re-measured after fixture clean",
    "edge finish borderline, accepted per WI-22",
    "operator changed mid-shift",
    "gauge recalibrated before measurement",
];
const STATION_KINDS: &[&str] = &["vision", "cmm", "torque", "leak", "final"];

struct Inspection {
    ts: String,
    line: u32,
    station: String,
    serial: String,
    result: &'static str,
    defect: Option<&'static str>,
    dim_a: f64,
    dim_b: f64,
    torque: f64,
    operator: String,
    notes: String,
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn inspection(rng: &mut StdRng, layout: &Layout, id: i64, ts_ms: i64) -> Inspection {
    let line = layout.lines[rng.gen_range(0..layout.lines.len())].line;
    let st = rng.gen_range(0..STATION_KINDS.len());
    let r: f64 = rng.gen();
    let (result, defect) = if r < 0.92 {
        ("PASS", None)
    } else if r < 0.97 {
        ("FAIL", Some(DEFECTS[rng.gen_range(0..DEFECTS.len())]))
    } else {
        ("REWORK", Some(DEFECTS[rng.gen_range(0..DEFECTS.len())]))
    };
    let notes = if rng.gen_bool(0.6) {
        NOTES[rng.gen_range(0..NOTES.len())].to_string()
    } else {
        format!(
            "{}; batch {}-{:04}",
            NOTES[rng.gen_range(0..NOTES.len())],
            layout.device,
            rng.gen_range(0..10_000)
        )
    };
    Inspection {
        ts: iso_ms(ts_ms),
        line,
        station: format!("L{line}-ST{:02}-{}", st + 1, STATION_KINDS[st]),
        serial: format!("{}-L{line}-{id:08}", layout.device),
        result,
        defect,
        dim_a: round3(rng.gen_range(49.9..50.1)),
        dim_b: round3(rng.gen_range(12.45..12.55)),
        torque: round3(rng.gen_range(8.0..12.0)),
        operator: layout.operators[rng.gen_range(0..layout.operators.len())].clone(),
        notes,
    }
}

const INSERT_SQL: &str = "INSERT INTO inspections \
    (id, ts, line, station, part_serial, result, defect_code, dim_a_mm, dim_b_mm, torque_nm, operator, notes) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)";

fn insert_row(stmt: &mut rusqlite::Statement<'_>, id: i64, r: &Inspection) -> Result<()> {
    stmt.execute(rusqlite::params![
        id, r.ts, r.line, r.station, r.serial, r.result, r.defect, r.dim_a, r.dim_b, r.torque, r.operator, r.notes
    ])?;
    Ok(())
}

fn db_initial_rows(cfg: &GenConfig) -> u64 {
    cfg.scaled(DB_TARGET_BYTES / DB_AVG_ROW, 64)
}

fn db_create(path: &Path, cfg: &GenConfig, layout: &Layout) -> Result<GenSummary> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    for p in [path.to_path_buf(), path.with_extension("sqlite-journal")] {
        if p.exists() {
            fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    let mut conn = rusqlite::Connection::open(path).with_context(|| format!("creating {}", path.display()))?;
    conn.execute_batch(DB_SCHEMA)?;
    let mut rng = rng_for(&[cfg.seed, cfg.dev(), T_DB_INIT]);
    let n = db_initial_rows(cfg) as i64;
    let start = hour_start_ms(-HISTORY_HOURS);
    let span = HISTORY_HOURS * 3_600_000;
    let tx = conn.transaction()?;
    {
        let mut st = tx.prepare("INSERT INTO stations (id, line, kind) VALUES (?1, ?2, ?3)")?;
        for l in &layout.lines {
            for (k, kind) in STATION_KINDS.iter().enumerate() {
                st.execute(rusqlite::params![
                    format!("L{}-ST{:02}-{kind}", l.line, k + 1),
                    l.line,
                    kind
                ])?;
            }
        }
        let mut stmt = tx.prepare(INSERT_SQL)?;
        for id in 1..=n {
            let ts = start + (id - 1) * span / n + rng.gen_range(0..(span / n).max(1));
            let row = inspection(&mut rng, layout, id, ts);
            insert_row(&mut stmt, id, &row)?;
        }
    }
    tx.commit()?;
    conn.close().map_err(|(_, e)| e)?;
    let len = fs::metadata(path)?.len();
    Ok(GenSummary { files: 1, bytes: len })
}

fn db_step(path: &Path, cfg: &GenConfig, layout: &Layout, step: u32) -> Result<GenSummary> {
    let before = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut rng = rng_for(&[cfg.seed, cfg.dev(), T_DB_STEP, u64::from(step)]);
    let mut conn = rusqlite::Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    conn.execute_batch("PRAGMA synchronous = OFF;")?;
    let page_count: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let max_id: i64 = conn.query_row("SELECT COALESCE(MAX(id), 0) FROM inspections", [], |r| r.get(0))?;
    let n_updates = (page_count / 10).max(1);
    let n_inserts = (db_initial_rows(cfg) / 100).max(1) as i64;
    let hour = i64::from(step) - 1;
    let tx = conn.transaction()?;
    {
        let mut upd = tx.prepare(
            "UPDATE inspections SET result = ?1, defect_code = ?2, torque_nm = ?3, notes = ?4 WHERE id = ?5",
        )?;
        if max_id > 0 {
            for _ in 0..n_updates {
                let id = rng.gen_range(1..=max_id);
                let (result, defect) = if rng.gen_bool(0.7) {
                    ("PASS", None)
                } else {
                    ("REWORK", Some(DEFECTS[rng.gen_range(0..DEFECTS.len())]))
                };
                let op = &layout.operators[rng.gen_range(0..layout.operators.len())];
                let notes = format!("re-inspected step {step} by {op}");
                upd.execute(rusqlite::params![
                    result,
                    defect,
                    round3(rng.gen_range(8.0..12.0)),
                    notes,
                    id
                ])?;
            }
        }
        let mut ins = tx.prepare(INSERT_SQL)?;
        let start = hour_start_ms(hour);
        let span = 3_600_000 / n_inserts;
        for k in 0..n_inserts {
            let id = max_id + 1 + k;
            let ts = start + k * span + rng.gen_range(0..span.max(1));
            let row = inspection(&mut rng, layout, id, ts);
            insert_row(&mut ins, id, &row)?;
        }
    }
    tx.commit()?;
    conn.close().map_err(|(_, e)| e)?;
    let after = fs::read(path)?;
    let changed_pages = before
        .chunks(DB_PAGE)
        .zip(after.chunks(DB_PAGE))
        .filter(|(a, b)| a != b)
        .count() as u64;
    let growth = after.len().saturating_sub(before.len()) as u64;
    Ok(GenSummary {
        files: 1,
        bytes: changed_pages * DB_PAGE as u64 + growth,
    })
}

// ---------------------------------------------------------------------------
// Rollup
// ---------------------------------------------------------------------------

/// Rollup as of the end of hour `h`: stats for the day so far, the last 24
/// hourly buckets and a static calibration log.
fn rollup_json(cfg: &GenConfig, layout: &Layout, h: i64) -> Result<Vec<u8>> {
    use serde_json::json;
    let end_ms = hour_start_ms(h + 1);
    let day_start = end_ms.div_euclid(86_400_000) * 86_400_000;
    let day_start = if day_start == end_ms {
        day_start - 86_400_000
    } else {
        day_start
    };
    let sample_step = 300_000i64;

    let lines: Vec<_> = layout
        .lines
        .iter()
        .map(|l| {
            let sensors: Vec<_> = l
                .sensors
                .iter()
                .map(|s| {
                    let (mut min, mut max, mut sum, mut n, mut warn) =
                        (f64::INFINITY, f64::NEG_INFINITY, 0.0, 0u64, 0u64);
                    let mut t = day_start;
                    while t < end_ms {
                        let v = s.trend(t);
                        min = min.min(v);
                        max = max.max(v);
                        sum += v;
                        n += 1;
                        if v > s.warn_threshold() {
                            warn += 1;
                        }
                        t += sample_step;
                    }
                    let p = 10f64.powi(s.decimals as i32);
                    let r = |x: f64| (x * p).round() / p;
                    json!({
                        "sensor": s.id,
                        "unit": s.unit,
                        "min": r(min),
                        "max": r(max),
                        "mean": r(sum / n.max(1) as f64),
                        "samples": n,
                        "warn_samples": warn,
                        "warn_threshold": r(s.warn_threshold()),
                    })
                })
                .collect();
            json!({ "line": l.line, "sensors": sensors })
        })
        .collect();

    let hourly: Vec<_> = (h - 23..=h)
        .map(|hh| {
            let mut rng = rng_for(&[cfg.seed, cfg.dev(), T_ROLLUP_HOUR, hh as u64]);
            json!({
                "hour": iso_ms(hour_start_ms(hh)),
                "readings": csv_rows_per_hour(cfg) * layout.lines.len() as u64,
                "warnings": rng.gen_range(0..40),
                "inspections": rng.gen_range(50..400),
                "rejects": rng.gen_range(0..12),
                "downtime_s": if rng.gen_bool(0.1) { rng.gen_range(30..900) } else { 0 },
            })
        })
        .collect();

    let mut rng = rng_for(&[cfg.seed, cfg.dev(), T_ROLLUP]);
    let sensors: Vec<&Sensor> = layout.all_sensors().collect();
    let n_cal = cfg.scaled(ROLLUP_CALIBRATION_ENTRIES, 4);
    let calibration: Vec<_> = (0..n_cal)
        .map(|i| {
            let s = sensors[rng.gen_range(0..sensors.len())];
            let when = hour_start_ms(-HISTORY_HOURS) - (n_cal - i) as i64 * 86_400_000 * 3;
            json!({
                "sensor": s.id,
                "date": iso_date(when),
                "offset": round3(rng.gen_range(-0.5..0.5)),
                "gain": round3(rng.gen_range(0.98..1.02)),
                "certificate": format!("CAL-{}-{:06}", layout.site, rng.gen_range(0..1_000_000)),
                "technician": layout.operators[rng.gen_range(0..layout.operators.len())],
                "passed": rng.gen_bool(0.97),
            })
        })
        .collect();

    let doc = json!({
        "schema": "ferry.sim.daily_summary/1",
        "device": layout.device,
        "site": layout.site,
        "firmware": "2.3.1",
        "day": iso_date(day_start),
        "generated_at": iso_ms(end_ms),
        "lines": lines,
        "hourly": hourly,
        "calibration_log": calibration,
    });
    let mut out = serde_json::to_vec_pretty(&doc)?;
    out.push(b'\n');
    Ok(out)
}

// ---------------------------------------------------------------------------
// Camera frames and firmware
// ---------------------------------------------------------------------------

fn frame_path(n: u32) -> String {
    format!("camera/frame_{n:04}.raw")
}

/// Raw frame: 32-byte header, then random (incompressible) pixels.
fn raw_frame(rng: &mut StdRng, len: usize, frame_no: u32) -> Vec<u8> {
    let len = len.max(32);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v[32..]);
    v[..4].copy_from_slice(b"RAWF");
    v[4..8].copy_from_slice(&frame_no.to_le_bytes());
    v[8..16].copy_from_slice(&(len as u64 - 32).to_le_bytes());
    v[16..20].copy_from_slice(&1280u32.to_le_bytes());
    v[20..24].copy_from_slice(&((len as u32 - 32) / 1280).to_le_bytes());
    v
}

fn frame_bytes(cfg: &GenConfig, n: u32) -> Vec<u8> {
    let mut rng = rng_for(&[cfg.seed, cfg.dev(), T_FRAME, u64::from(n)]);
    let min = cfg.scaled(FRAME_MIN, 1024);
    let max = cfg.scaled(FRAME_MAX, 2048).max(min + 1);
    let len = rng.gen_range(min..max) as usize;
    raw_frame(&mut rng, len, n)
}

/// Identical on every gateway: derived from `cfg.seed` only.
fn reference_frame(cfg: &GenConfig) -> Vec<u8> {
    let mut rng = rng_for(&[cfg.seed, T_REFERENCE]);
    raw_frame(&mut rng, cfg.scaled(REFERENCE_FRAME_BYTES, 1024) as usize, 0)
}

/// Identical on every gateway: derived from `cfg.seed` only. Partly
/// compressible: header, random "code" sections, zero padding, tables.
fn firmware_image(cfg: &GenConfig) -> Vec<u8> {
    let mut rng = rng_for(&[cfg.seed, T_FIRMWARE]);
    let len = cfg.scaled(FIRMWARE_BYTES, 4096) as usize;
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(b"GWFW\x02\x03\x01\x00ferry-sim gateway firmware 2.3.1\0");
    while v.len() < len {
        let seg = rng.gen_range(4096..65_536usize).min(len - v.len());
        let kind: f64 = rng.gen();
        let at = v.len();
        v.resize(at + seg, 0);
        if kind < 0.6 {
            rng.fill_bytes(&mut v[at..]);
        } else if kind < 0.8 {
            // Zero padding: already zeroed.
        } else {
            let mut row = [0u8; 64];
            rng.fill_bytes(&mut row);
            for (i, b) in v[at..].iter_mut().enumerate() {
                *b = row[i % 64].wrapping_add((i / 4096) as u8);
            }
        }
    }
    v.truncate(len);
    v
}

fn delete_oldest_frame(dir: &Path) -> Result<bool> {
    let cam = dir.join("camera");
    let mut frames: Vec<u32> = Vec::new();
    for e in fs::read_dir(&cam).with_context(|| format!("reading {}", cam.display()))? {
        let name = e?.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name
            .strip_prefix("frame_")
            .and_then(|r| r.strip_suffix(".raw"))
            .and_then(|n| n.parse::<u32>().ok())
        {
            if n >= 1 {
                frames.push(n);
            }
        }
    }
    frames.sort_unstable();
    if frames.len() < 2 {
        return Ok(false);
    }
    fs::remove_file(dir.join(frame_path(frames[0])))?;
    Ok(true)
}

// ---------------------------------------------------------------------------
// File helpers
// ---------------------------------------------------------------------------

fn write_file(path: &Path, data: &[u8], sum: &mut GenSummary) -> Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::write(path, data).with_context(|| format!("writing {}", path.display()))?;
    sum.files += 1;
    sum.bytes += data.len() as u64;
    Ok(())
}

fn append_file(path: &Path, data: &[u8], sum: &mut GenSummary) -> Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("appending to {}", path.display()))?;
    sum.files += 1;
    sum.bytes += data.len() as u64;
    Ok(())
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const SCALE: f64 = 0.15;

    fn cfg(seed: u64, device_index: usize) -> GenConfig {
        GenConfig::new(seed, SCALE, device_index, 4)
    }

    fn map(fp: &[FileFingerprint]) -> BTreeMap<String, (u64, u64)> {
        fp.iter().map(|f| (f.path.clone(), (f.len, f.hash))).collect()
    }

    #[test]
    fn same_seed_same_tree() -> Result<()> {
        let a = tempfile::tempdir()?;
        let b = tempfile::tempdir()?;
        let sa = generate_initial(a.path(), &cfg(7, 1))?;
        let sb = generate_initial(b.path(), &cfg(7, 1))?;
        assert_eq!(sa, sb);
        let fa = fingerprint_tree(a.path())?;
        assert_eq!(fa, fingerprint_tree(b.path())?);
        assert_eq!(sa.files, fa.len() as u64);
        assert_eq!(sa.bytes, fa.iter().map(|f| f.len).sum::<u64>());
        // A different seed gives a different tree.
        let c = tempfile::tempdir()?;
        generate_initial(c.path(), &cfg(8, 1))?;
        let fc = map(&fingerprint_tree(c.path())?);
        let fa = map(&fa);
        assert_ne!(fa.get(FIRMWARE_IMAGE), fc.get(FIRMWARE_IMAGE));
        assert_ne!(fa.get(QUALITY_DB), fc.get(QUALITY_DB));
        Ok(())
    }

    #[test]
    fn layout_and_sizes() -> Result<()> {
        let d = tempfile::tempdir()?;
        let s = generate_initial(d.path(), &cfg(1, 0))?;
        let fp = map(&fingerprint_tree(d.path())?);
        for p in [
            "config/gateway.toml",
            "logs/line1_sensors.csv",
            "logs/line2_sensors.csv",
            "logs/app.log",
            "logs/rotated/app.log.1",
            "series/spindle_vibration.bin",
            "series/motor_current.bin",
            "series/ambient.bin",
            QUALITY_DB,
            ROLLUP,
            REFERENCE_FRAME,
            "camera/frame_0001.raw",
            FIRMWARE_IMAGE,
        ] {
            assert!(fp.contains_key(p), "missing {p}");
        }
        // Total proportional to scale: ≈ 12 MiB * SCALE.
        let expect = 12.0 * MIB * SCALE;
        let got = s.bytes as f64;
        assert!(got > expect * 0.75 && got < expect * 1.25, "total {got} vs {expect}");
        // CSV is realistic text.
        let csv = fs::read_to_string(d.path().join("logs/line1_sensors.csv"))?;
        let mut it = csv.lines();
        assert_eq!(it.next(), Some("timestamp,sensor_id,value,unit,status"));
        let row: Vec<&str> = it.next().unwrap_or_default().split(',').collect();
        assert_eq!(row.len(), 5);
        assert!(row[0].starts_with("2026-02-28T16:00:"), "{}", row[0]);
        assert!(row[2].parse::<f64>().is_ok());
        // Series: header + whole records.
        let ser = fs::read(d.path().join("series/ambient.bin"))?;
        assert_eq!(&ser[..4], b"TSER");
        assert_eq!((ser.len() - SERIES_HEADER_LEN) % 16, 0);
        Ok(())
    }

    #[test]
    fn shared_files_identical_device_files_differ() -> Result<()> {
        let a = tempfile::tempdir()?;
        let b = tempfile::tempdir()?;
        generate_initial(a.path(), &cfg(42, 0))?;
        generate_initial(b.path(), &cfg(42, 3))?;
        let fa = map(&fingerprint_tree(a.path())?);
        let fb = map(&fingerprint_tree(b.path())?);
        for shared in [REFERENCE_FRAME, FIRMWARE_IMAGE] {
            assert_eq!(fa.get(shared), fb.get(shared), "{shared}");
            assert!(fa.contains_key(shared));
        }
        for own in [
            "camera/frame_0001.raw",
            "logs/line1_sensors.csv",
            "series/motor_current.bin",
            QUALITY_DB,
            ROLLUP,
            "config/gateway.toml",
        ] {
            assert!(fa.contains_key(own) && fb.contains_key(own), "{own}");
            assert_ne!(fa.get(own), fb.get(own), "{own}");
        }
        Ok(())
    }

    #[test]
    fn steps_change_tree_deterministically() -> Result<()> {
        let a = tempfile::tempdir()?;
        let b = tempfile::tempdir()?;
        let c = cfg(9, 2);
        generate_initial(a.path(), &c)?;
        generate_initial(b.path(), &c)?;
        let mut prev = map(&fingerprint_tree(a.path())?);
        let initial = prev.clone();
        let mut saw_rename = false;
        let mut saw_delete = false;
        for step in 1..=12 {
            let sa = apply_step(a.path(), &c, step)?;
            let sb = apply_step(b.path(), &c, step)?;
            assert_eq!(sa, sb);
            assert!(sa.files >= 8 && sa.bytes > 0, "{sa:?}");
            let fa = fingerprint_tree(a.path())?;
            assert_eq!(fa, fingerprint_tree(b.path())?, "step {step}");
            let cur = map(&fa);
            assert_ne!(cur, prev);
            // Appends keep the old prefix.
            let csv = fs::read(a.path().join("logs/line1_sensors.csv"))?;
            let old_len = prev["logs/line1_sensors.csv"].0 as usize;
            assert!(csv.len() > old_len);
            // Rollup rewritten, shared files untouched.
            assert_ne!(cur[ROLLUP], prev[ROLLUP]);
            assert_eq!(cur[FIRMWARE_IMAGE], initial[FIRMWARE_IMAGE]);
            assert_eq!(cur[REFERENCE_FRAME], initial[REFERENCE_FRAME]);
            assert!(cur.contains_key(&frame_path(INITIAL_FRAMES + step)));
            if let Some(old) = prev.get("logs/app.log") {
                if cur.get("logs/rotated/app.log.1") == Some(old) {
                    saw_rename = true;
                }
            }
            if prev.keys().any(|k| k.starts_with("camera/") && !cur.contains_key(k)) {
                saw_delete = true;
            }
            prev = cur;
        }
        assert!(saw_rename, "app.log was never rotated");
        assert!(saw_delete, "no camera frame was deleted");
        // Initial CSV content is a prefix of the current one.
        let csv = fs::read(a.path().join("logs/line1_sensors.csv"))?;
        let d = tempfile::tempdir()?;
        generate_initial(d.path(), &c)?;
        let csv0 = fs::read(d.path().join("logs/line1_sensors.csv"))?;
        assert!(csv.starts_with(&csv0));
        Ok(())
    }

    #[test]
    fn sqlite_opens_and_changes_some_pages() -> Result<()> {
        let d = tempfile::tempdir()?;
        let c = GenConfig::new(3, 0.5, 0, 1);
        generate_initial(d.path(), &c)?;
        let db = d.path().join(QUALITY_DB);
        let rows = |p: &Path| -> Result<i64> {
            let conn = rusqlite::Connection::open(p)?;
            Ok(conn.query_row("SELECT COUNT(*) FROM inspections", [], |r| r.get(0))?)
        };
        let n0 = rows(&db)?;
        assert!(n0 > 1000, "{n0}");
        let before = fs::read(&db)?;
        let s = db_step(&db, &c, &Layout::new(&c), 1)?;
        let after = fs::read(&db)?;
        assert!(rows(&db)? > n0);
        let pages = before.len() / DB_PAGE;
        let changed = before
            .chunks(DB_PAGE)
            .zip(after.chunks(DB_PAGE))
            .filter(|(a, b)| a != b)
            .count();
        // Roughly 10 % of pages edited in place (plus header/index pages).
        assert!(
            changed * 100 >= pages * 5 && changed * 100 <= pages * 20,
            "{changed}/{pages}"
        );
        assert!(s.bytes >= (changed * DB_PAGE) as u64);
        assert!(!d.path().join("db/quality.sqlite-journal").exists());
        Ok(())
    }

    #[test]
    fn fleet_helpers() -> Result<()> {
        let d = tempfile::tempdir()?;
        let s = generate_fleet(d.path(), 5, 0.05, 3)?;
        assert!(s.files >= 3 * 14);
        let one = tempfile::tempdir()?;
        generate_initial(one.path(), &GenConfig::new(5, 0.05, 2, 3))?;
        assert_eq!(
            fingerprint_tree(&d.path().join("gw-0002"))?,
            fingerprint_tree(one.path())?
        );
        let s1 = apply_step_fleet(d.path(), 5, 0.05, 3, 1)?;
        assert!(s1.bytes > 0);
        assert!(generate_initial(d.path(), &GenConfig::new(5, 0.0, 0, 1)).is_err());
        assert!(generate_initial(d.path(), &GenConfig::new(5, 1.0, 3, 3)).is_err());
        Ok(())
    }

    #[test]
    fn civil_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(days_from_civil(2026, 3, 2)), (2026, 3, 2));
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
        assert_eq!(iso_ms(T0_UNIX * 1000 + 3_723_250), "2026-03-02T01:02:03.250Z");
    }
}
