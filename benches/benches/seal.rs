//! Per-core cost of the sealing stages of the edge pipeline, each alone:
//! keyed index tag, zstd + AEAD at levels 1 and 3 with both ciphers, and
//! the SHA-256 chunk id. `cargo bench -p benches --bench seal`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use protocol::seal::{Cipher, Sealer, TenantKey};
use protocol::Hash32;

fn bench(c: &mut Criterion) {
    let data = benches::sensor_text(1 << 20);
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
