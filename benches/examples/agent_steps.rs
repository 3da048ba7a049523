//! The real agent (scan, seal, known table, page deltas, extensions) over
//! generated change steps, with an in-process "server" that holds every
//! chunk id it was sent and acknowledges each step as cloud-durable. Prints,
//! for one step, the sealed chunk bytes per file next to `step_cost`'s
//! model, to find where the agent pays more than the model.
//!
//! `cargo run --release -p benches --example agent_steps -- [SCALE] [STEP]`

use edge_agent::{Agent, AgentConfig};
use protocol::client::ClientStore;
use protocol::manifest::ChangeBody;
use protocol::{DeviceRef, Knowledge, RangeSet};
use std::collections::{BTreeMap, HashSet};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let scale: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let upto: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let work = tempfile::tempdir()?;
    let dir = work.path().join("archive");
    let g = sim::gen::GenConfig::new(1, scale, 0, 4);
    sim::gen::generate_initial(&dir, &g)?;
    let dev = DeviceRef::new("acme", "p1", "gw1")?;
    let key = protocol::seal::TenantKey::from_bytes(1, [7; 32]);
    let cfg = AgentConfig::new(
        "mqtt://127.0.0.1:1",
        &dev,
        vec![dir.clone()],
        work.path().join("s.redb"),
        key,
    );
    let mut a = Agent::open(cfg)?;
    let mut held: HashSet<protocol::Hash32> = HashSet::new();
    for step in 0..=upto {
        if step > 0 {
            sim::gen::apply_step(&dir, &g, step)?;
        }
        a.scan_once()?;
        let pending = a.pending(&Knowledge::default(), usize::MAX, usize::MAX)?;
        let mut per_file: BTreeMap<String, (usize, u64, u64)> = BTreeMap::new();
        for c in &pending {
            let ChangeBody::File(f) = &c.body else { continue };
            for r in &f.chunks {
                if held.contains(&r.id) {
                    continue;
                }
                let Some(b) = a.chunk(c, &r.id)? else { continue };
                held.insert(r.id);
                let e = per_file.entry(f.path.clone()).or_default();
                e.0 += 1;
                e.1 += b.len() as u64;
                e.2 += u64::from(protocol::seal::base_of(&b)?.map_or(0, |x| x.depth));
            }
        }
        let r = ClientStore::replica(&a);
        let mut k = Knowledge::default();
        k.map.insert(r, RangeSet::up_to(a.status()?.next_seq - 1));
        a.on_knowledge(&k, &k)?;
        if step == upto {
            let mut total = 0;
            println!("{:<36} {:>7} {:>10} {:>9}", "file", "chunks", "bytes", "depths");
            for (p, (n, b, d)) in &per_file {
                println!("{p:<36} {n:>7} {b:>10} {d:>9}");
                total += b;
            }
            println!("{:<36} {:>7} {total:>10}", "TOTAL", "");
        }
    }
    Ok(())
}
