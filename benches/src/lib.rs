//! Shared inputs of the benchmarks.

/// `len` bytes of CSV-like sensor text (timestamp, sensor, value, unit,
/// status): the compressibility of a real line log, every row different.
pub fn sensor_text(len: usize) -> Vec<u8> {
    let mut s = String::new();
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut t = 1_700_000_000_000u64;
    while s.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        t += 250;
        s.push_str(&format!(
            "{t},line3-temp-{:02},{:.3},degC,OK\n",
            x % 16,
            20.0 + (x % 1000) as f64 / 100.0
        ));
    }
    s.truncate(len);
    s.into_bytes()
}

/// zstd size of `b` at `level` (0 for empty input).
pub fn zstd_len(b: &[u8], level: i32) -> usize {
    if b.is_empty() {
        return 0;
    }
    zstd::bulk::compress(b, level).map_or(b.len(), |z| z.len())
}

/// zstd size of `data` compressed with `prefix` as reference, as an
/// extension chunk stores it (`protocol::seal`).
pub fn zstd_len_against(prefix: &[u8], data: &[u8], level: i32) -> usize {
    against(prefix, data, level, false)
}

/// [`zstd_len_against`] with long-distance matching, as the agent seals a
/// delta chunk (`protocol::seal`).
pub fn zstd_len_delta(prefix: &[u8], data: &[u8], level: i32) -> usize {
    against(prefix, data, level, true)
}

fn against(prefix: &[u8], data: &[u8], level: i32, ldm: bool) -> usize {
    use zstd::zstd_safe::{CCtx, CParameter};
    let mut c = CCtx::create();
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
    let ok = c.set_parameter(CParameter::CompressionLevel(level)).is_ok()
        && c.set_parameter(CParameter::EnableLongDistanceMatching(ldm)).is_ok()
        && c.ref_prefix(prefix).is_ok()
        && c.compress2(&mut out, data).is_ok();
    if ok {
        out.len()
    } else {
        data.len()
    }
}

/// One generated gateway archive (`sim gen`, device 0 of 4) as it is before
/// and after change step `step` (steps 1..step-1 applied first): (before,
/// after), path → bytes.
pub fn around_step(scale: f64, step: u32) -> anyhow::Result<(sim::ideal::Snapshot, sim::ideal::Snapshot)> {
    let work = tempfile::tempdir()?;
    let dir = work.path().join("archive");
    let g = sim::gen::GenConfig::new(1, scale, 0, 4);
    sim::gen::generate_initial(&dir, &g)?;
    for s in 1..step {
        sim::gen::apply_step(&dir, &g, s)?;
    }
    let before = sim::ideal::snapshot(&dir)?;
    sim::gen::apply_step(&dir, &g, step)?;
    Ok((before, sim::ideal::snapshot(&dir)?))
}
