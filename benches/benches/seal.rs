//! Per-core cost of the sealing stages of the edge pipeline, each alone:
//! keyed index tag, zstd + AEAD at levels 1 and 3 with both ciphers, and
//! the SHA-256 chunk id. `cargo bench -p benches --bench seal`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use protocol::seal::{Cipher, Sealer, TenantKey};
use protocol::Hash32;

/// 1 MiB of CSV-like sensor text: realistic compressibility.
fn sensor_text() -> Vec<u8> {
    let mut s = String::new();
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut t = 1_700_000_000_000u64;
    while s.len() < 1 << 20 {
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
    s.into_bytes()
}

fn bench(c: &mut Criterion) {
    let data = sensor_text();
    let chunk = &data[..64 << 10];
    let key = TenantKey::from_bytes(1, [7; 32]);
    let mut g = c.benchmark_group("seal_64KiB");
    g.throughput(Throughput::Bytes(chunk.len() as u64));
    let s = Sealer::new(&key, Cipher::Aes256Gcm).expect("sealer");
    g.bench_function("index_tag", |b| b.iter(|| s.index_tag(chunk)));
    g.bench_function("sha256", |b| b.iter(|| Hash32::of(chunk)));
    for cipher in [Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305] {
        let mut s = Sealer::new(&key, cipher).expect("sealer");
        let mut out = Vec::new();
        for level in [1, 3] {
            g.bench_with_input(BenchmarkId::new(format!("seal_{cipher:?}"), level), &level, |b, &l| {
                b.iter(|| s.seal(chunk, l, &mut out).expect("seal"))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
