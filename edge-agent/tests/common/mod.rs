//! Shared helpers for the edge-agent API tests.
#![allow(dead_code, clippy::unwrap_used)]

use edge_agent::{Agent, AgentConfig, ChunkParams};
use protocol::client::ClientStore;
use protocol::manifest::{Change, ChangeBody, FileVersion};
use protocol::seal::{Cipher, TenantKey};
use protocol::{DeviceRef, Knowledge, RangeSet, ReplicaId};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

pub fn key() -> TenantKey {
    TenantKey::from_bytes(1, [7u8; 32])
}

pub fn device(name: &str) -> DeviceRef {
    DeviceRef::new("acme", "plant1", name).unwrap()
}

/// A config for `device` watching `watch`, state in `state`. Fixed cipher
/// so chunk ids do not depend on the CPU.
pub fn config(name: &str, watch: &[PathBuf], state: &Path) -> AgentConfig {
    let mut cfg = AgentConfig::new("mqtt://127.0.0.1:1", &device(name), watch.to_vec(), state, key());
    cfg.cipher = Cipher::ChaCha20Poly1305;
    cfg.status_snapshot = true;
    cfg
}

/// Small chunks: 2 / 8 / 32 KiB, for tests that want many chunks cheaply.
pub fn small_chunks() -> ChunkParams {
    ChunkParams {
        min: 2 << 10,
        avg: 8 << 10,
        max: 32 << 10,
    }
}

/// xorshift64: fixed pseudo-random bytes.
pub fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    // Distinct seeds give distinct streams (`seed |= 1` alone made 2k and
    // 2k+1 equal); xorshift needs a non-zero state.
    seed = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// CSV-like log lines (compressible, but varied enough for CDC), at least
/// `len` bytes, whole lines only.
pub fn csv_lines(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 128);
    let mut s = seed | 1;
    let mut i = seed.wrapping_mul(1000);
    while out.len() < len {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        i += 1;
        let line = format!(
            "2025-03-{:02}T{:02}:{:02}:{:02}.{:03},press-{:02},{}.{:03},{},{}\n",
            1 + (i / 86400) % 28,
            (i / 3600) % 24,
            (i / 60) % 60,
            i % 60,
            s % 1000,
            (s >> 10) % 40,
            (s >> 20) % 500,
            (s >> 30) % 1000,
            if (s >> 40).is_multiple_of(17) { "ALARM" } else { "OK" },
            i
        );
        out.extend_from_slice(line.as_bytes());
    }
    out
}

/// Sets a file's mtime `secs` seconds from now, so a rewrite within one
/// timestamp tick still looks changed (tests must not depend on timing).
pub fn bump_mtime(path: &Path, secs: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(secs)).unwrap();
}

/// Sets a file's mtime an hour back: a settled archive file, whose stat a
/// scan can trust (a fresh mtime makes the next scan re-check the content).
pub fn settle(path: &Path) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(3600)).unwrap();
}

/// Every recorded change still in the outbox, in seq order.
pub fn all_pending(agent: &mut Agent) -> Vec<Change> {
    agent.pending(&Knowledge::default(), usize::MAX, usize::MAX).unwrap()
}

/// The latest pending `File` version of `path`.
pub fn latest_version(agent: &mut Agent, path: &str) -> FileVersion {
    all_pending(agent)
        .into_iter()
        .rev()
        .find_map(|c| match c.body {
            ChangeBody::File(f) if f.path == path => Some(f),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no pending version of {path}"))
}

/// Knowledge of `1..=n` of `replica`.
pub fn knowledge_up_to(replica: &ReplicaId, n: u64) -> Knowledge {
    let mut k = Knowledge::default();
    k.map.insert(replica.clone(), RangeSet::up_to(n));
    k
}

/// Chunk ids a fresh agent (new state file) records for `file` alone.
pub fn fresh_chunking(file: &Path, params: ChunkParams, work: &Path) -> FileVersion {
    let label = "fresh";
    let dir = work.join(label);
    std::fs::create_dir_all(&dir).unwrap();
    let name = file.file_name().unwrap();
    std::fs::copy(file, dir.join(name)).unwrap();
    let mut cfg = config("fresh", &[dir], &work.join("fresh.redb"));
    cfg.chunking = params;
    let mut a = Agent::open(cfg).unwrap();
    a.scan_once().unwrap();
    latest_version(&mut a, &format!("{label}/{}", name.to_str().unwrap()))
}

pub fn sha256(b: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(b).into()
}

/// rumqttd (MQTT v5) on a free 127.0.0.1 port, in a background thread for
/// the rest of the process (rumqttd has no shutdown API). Same settings as
/// `sim::broker::start_embedded`.
pub fn start_broker() -> u16 {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let max = protocol::msg::MQTT_MAX_PACKET;
    let cfg = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 100
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v5.1]
name = "v5-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
    [v5.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = {max}
    max_inflight_count = 100
    dynamic_filters = true
"#
    );
    let config: rumqttd::Config = toml::from_str(&cfg).unwrap();
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            let _ = broker.start();
        })
        .unwrap();
    for _ in 0..400 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return port;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("broker did not start on port {port}");
}

/// A disk of `total` bytes holding `base` bytes plus the files under `dir`.
pub fn fake_disk(
    dir: PathBuf,
    total: u64,
    base: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> edge_agent::DiskProbe {
    fn size(p: &Path) -> u64 {
        let mut n = 0;
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                let m = e.metadata().unwrap();
                n += if m.is_dir() { size(&e.path()) } else { m.len() };
            }
        }
        n
    }
    std::sync::Arc::new(move |_p: &Path| {
        let used = base.load(std::sync::atomic::Ordering::SeqCst) + size(&dir);
        Ok(edge_agent::DiskStat {
            total,
            free: total.saturating_sub(used),
        })
    })
}

/// Files f0..f{n-1} of `size` bytes, f0 the oldest (mtime `n - i + 1` hours ago).
pub fn aged_files(dir: &Path, sub: &str, n: u64, size: usize, seed: u64) {
    for i in 0..n {
        let p = dir.join(sub).join(format!("f{i}.bin"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, pseudo_random(size, seed + i)).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(3600 * (n - i + 1)))
            .unwrap();
    }
}
