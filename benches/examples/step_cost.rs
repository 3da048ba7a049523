//! Where the bytes of one change step go, per file: the ideal lower bound
//! (zstd -3 of exactly the new and changed bytes: appended tails, or the
//! differing 4 KiB blocks) next to what the agent's chunking must send
//! (zstd of the chunks whose plaintext is new), before sealing overhead and
//! manifests. Chunking as in the agent: SQLite files in page groups,
//! others content-defined; a new chunk that starts with the file's old last
//! chunk costs only its suffix, compressed against it (an extension chunk).
//!
//! `cargo run --release -p benches --example step_cost -- [SCALE] [STEP]`
//! A changed SQLite page group costs its delta against the group's previous
//! version (zstd with the old group as reference), as the agent seals it.
//! (env `AVG` / `DB_AVG`: average chunk bytes to try instead of the defaults;
//! `NO_PAGES=1`: content-defined SQLite chunks; `NO_EXT=1`: no extensions;
//! `NO_DELTA=1`: changed pages compressed alone)

use benches::{zstd_len, zstd_len_against, zstd_len_delta};
use edge_agent::chunker::Chunker;
use edge_agent::ChunkParams;
use std::collections::HashSet;
use std::path::Path;

fn params(path: &str) -> ChunkParams {
    // Defaults as in the agent: db class 8 KiB, everything else 64 KiB.
    let db = path.ends_with(".sqlite");
    let avg: usize = std::env::var(if db { "DB_AVG" } else { "AVG" })
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if db { 8 << 10 } else { 64 << 10 });
    ChunkParams {
        min: avg / 4,
        avg,
        max: avg * 4,
    }
}

/// (offset, bytes) of each chunk, as the agent cuts `path`.
fn chunks(data: &[u8], path: &str) -> Vec<(usize, Vec<u8>)> {
    let pages = path.ends_with(".sqlite") && std::env::var_os("NO_PAGES").is_none();
    let mut c = Chunker::new(params(path)).expect("params").with_sqlite_pages(pages);
    let mut out = Vec::new();
    let mut off = 0;
    c.run(data, Path::new("mem"), |ch| {
        out.push((off, ch.to_vec()));
        off += ch.len();
        Ok(())
    })
    .expect("chunk");
    out
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let scale: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let step: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let (before, after) = benches::around_step(scale, step).expect("generated archive");
    let known: HashSet<Vec<u8>> = before
        .iter()
        .flat_map(|(p, d)| chunks(d, p).into_iter().map(|c| c.1))
        .collect();
    let (mut t_raw, mut t_ideal, mut t_cdc) = (0, 0, 0);
    println!(
        "{:<36} {:>10} {:>10} {:>10} {:>7}",
        "file", "changed", "ideal", "cdc", "cdc/id"
    );
    for (path, data) in &after {
        let ch = sim::ideal::changed_bytes(before.get(path).map(Vec::as_slice), data);
        if ch.is_empty() {
            continue;
        }
        let level = if path.ends_with(".csv") || path.ends_with(".log") {
            1
        } else {
            3
        };
        let ideal = zstd_len(&ch, 3);
        // The old last chunk, if the file grew in place: the extension base.
        let tail = before
            .get(path)
            .filter(|_| std::env::var_os("NO_EXT").is_none())
            .and_then(|o| chunks(o, path).pop());
        // The old page at the same offset, as a delta base.
        let paged = path.ends_with(".sqlite")
            && std::env::var_os("NO_PAGES").is_none()
            && std::env::var_os("NO_DELTA").is_none();
        let old_page = |off: usize, len: usize| {
            before
                .get(path)
                .filter(|_| paged)
                .and_then(|o| o.get(off..off.checked_add(len)?))
        };
        let cdc: usize = chunks(data, path)
            .iter()
            .filter(|(_, c)| !known.contains(c))
            .map(|(off, c)| match (&tail, old_page(*off, c.len())) {
                (Some((t_off, t)), _) if t_off == off && c.len() > t.len() && c.starts_with(t) => {
                    zstd_len_against(t, &c[t.len()..], level)
                }
                (_, Some(o)) => zstd_len_delta(o, c, level),
                _ => zstd_len(c, level).min(c.len()),
            })
            .sum();
        t_raw += ch.len();
        t_ideal += ideal;
        t_cdc += cdc;
        println!(
            "{:<36} {:>10} {:>10} {:>10} {:>6.2}x",
            path,
            ch.len(),
            ideal,
            cdc,
            cdc as f64 / ideal.max(1) as f64
        );
    }
    println!(
        "{:<36} {:>10} {:>10} {:>10} {:>6.2}x",
        "TOTAL",
        t_raw,
        t_ideal,
        t_cdc,
        t_cdc as f64 / t_ideal.max(1) as f64
    );
}
