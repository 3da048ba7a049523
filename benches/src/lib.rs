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
