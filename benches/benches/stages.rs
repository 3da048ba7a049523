//! Per-core cost of the edge pipeline stages the `seal` and `pipeline`
//! benches do not cover, each alone: known-chunk lookup in the redb state
//! (hit and miss), manifest encoding and signing, sealing an extension
//! chunk, and opening chunks (what a restore pays per chunk).
//! `cargo bench -p benches --bench stages`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edge_agent::store::{KnownChunk, Store};
use protocol::hlc::Hlc;
use protocol::manifest::{Change, ChangeBody, ChunkRef, FileVersion};
use protocol::seal::{BaseRef, Cipher, Sealer, TenantKey};
use protocol::{DeviceRef, Hash32, ReplicaId};
use ring::rand::SystemRandom;
use ring::signature::Ed25519KeyPair;

fn tag(i: u64) -> Hash32 {
    Hash32::of(&i.to_le_bytes())
}

fn known_lookup(c: &mut Criterion) {
    const N: u64 = 100_000;
    let dir = tempfile::tempdir().expect("tmp");
    let dev = DeviceRef::new("t", "s", "bench").expect("device");
    let mut store = Store::open(&dir.path().join("state.redb"), &dev).expect("store");
    let known: Vec<(Hash32, KnownChunk)> = (0..N)
        .map(|i| {
            let k = KnownChunk {
                id: Hash32::of(&(i + N).to_le_bytes()),
                level: 3,
                cipher: 1,
                base: None,
            };
            (tag(i), k)
        })
        .collect();
    for part in known.chunks(10_000) {
        store
            .record(ChangeBody::Delete("x/y".into()), None, part, 1_700_000_000_000)
            .expect("record");
    }
    store.flush().expect("flush");
    let r = store.known_reader().expect("reader");
    let mut g = c.benchmark_group("known_lookup_100k");
    g.throughput(Throughput::Elements(1));
    let mut i = 0u64;
    g.bench_function("hit", |b| {
        b.iter(|| {
            i = (i + 7919) % N;
            r.get(&tag(i)).expect("get").expect("hit")
        })
    });
    g.bench_function("miss", |b| {
        b.iter(|| {
            i += 1;
            r.get(&tag(N + i)).expect("get")
        })
    });
    g.finish();
}

fn manifest(c: &mut Criterion) {
    let pk = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("keygen");
    let key = Ed25519KeyPair::from_pkcs8(pk.as_ref()).expect("key");
    let replica = ReplicaId {
        device: DeviceRef::new("t", "s", "bench").expect("device"),
        epoch: 1,
    };
    let mut g = c.benchmark_group("manifest_encode_sign");
    for n in [16usize, 1024] {
        let chunks: Vec<ChunkRef> = (0..n as u64).map(|i| ChunkRef { id: tag(i), len: 65536 }).collect();
        let fv = FileVersion {
            path: "archive/logs/line3_sensors.csv".into(),
            size: 65536 * n as u64,
            mtime_ns: 1_700_000_000_000_000_000,
            class: "append".into(),
            chunks,
            sha256: tag(1),
            mode: 0o644,
        };
        // Throughput in manifest bytes, so chunk-list size is visible.
        let one = Change::sign(replica.clone(), 1, Hlc(1), ChangeBody::File(fv.clone()), &key);
        g.throughput(Throughput::Bytes(protocol::to_cbor(&one).len() as u64));
        g.bench_with_input(BenchmarkId::new("chunks", n), &fv, |b, fv| {
            b.iter(|| {
                let ch = Change::sign(replica.clone(), 1, Hlc(1), ChangeBody::File(fv.clone()), &key);
                protocol::to_cbor(&ch)
            })
        });
    }
    g.finish();
}

fn extension_and_open(c: &mut Criterion) {
    let text = benches::sensor_text(128 << 10);
    let key = TenantKey::from_bytes(1, [7; 32]);
    let mut s = Sealer::new(&key, Cipher::Aes256Gcm).expect("sealer");
    let (base_plain, grown) = (&text[..60 << 10], &text[..64 << 10]);
    let mut base_stored = Vec::new();
    let base_id = s.seal(base_plain, 1, &mut base_stored).expect("seal");
    let base = BaseRef {
        id: base_id,
        len: base_plain.len() as u32,
        depth: 1,
        delta: false,
    };
    let mut g = c.benchmark_group("extension_64KiB_of_which_4KiB_new");
    g.throughput(Throughput::Bytes(grown.len() as u64));
    let mut out = Vec::new();
    g.bench_function("seal_full_level1", |b| {
        b.iter(|| s.seal(grown, 1, &mut out).expect("seal"))
    });
    g.bench_function("seal_extension_level1", |b| {
        b.iter(|| s.seal_with_base(grown, 1, Some(base), &mut out).expect("seal"))
    });
    let mut full = Vec::new();
    s.seal(grown, 1, &mut full).expect("seal");
    let mut ext = Vec::new();
    s.seal_with_base(grown, 1, Some(base), &mut ext).expect("seal");
    g.bench_function("open_full", |b| b.iter(|| s.open(&full, grown.len()).expect("open")));
    g.bench_function("open_extension", |b| {
        b.iter(|| s.open_with_base(&ext, grown.len(), Some(base_plain)).expect("open"))
    });
    g.finish();
}

criterion_group!(benches, known_lookup, manifest, extension_and_open);
criterion_main!(benches);
