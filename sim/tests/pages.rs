//! A database edit costs about the edit (issue 5): a changed chunk of a
//! SQLite database (a group of whole pages, `PAGE_GROUP` bytes) is sealed
//! as a delta against the chunk's last cloud-durable version (a compressed
//! copy kept in the agent's state file), not sent whole. Real
//! processes over Mosquitto; a real SQLite database (`sim gen`) edited in
//! the middle step after step; every version restores byte for byte, also
//! as of earlier times (restore follows each page's delta chain).

mod common;

use anyhow::{ensure, Result};
use common::*;

const DB: &str = "db/quality.sqlite";

/// The pages of `new` that differ from `old`, zstd -3 of each of them
/// alone (what sending every changed page alone costs), and the page
/// groups (chunks) they fall in.
fn changed_pages_alone(old: &[u8], new: &[u8]) -> Result<(usize, u64, usize)> {
    let ps = 4096;
    let (mut n, mut z, mut groups) = (0, 0u64, std::collections::BTreeSet::new());
    for (i, p) in new.chunks(ps).enumerate() {
        if old.get(i * ps..(i + 1) * ps) != Some(p) {
            n += 1;
            z += zstd::bulk::compress(p, 3)?.len() as u64;
            groups.insert(i * ps / edge_agent::chunker::PAGE_GROUP);
        }
    }
    Ok((n, z, groups.len()))
}

#[test]
fn page_edits_are_sent_as_deltas_and_restore_exactly() -> Result<()> {
    let f = Fleet::start(true)?;
    let dev = "gw-pages";
    let src = tempfile::tempdir()?;
    let g = sim::gen::GenConfig::new(7, 0.5, 0, 1);
    sim::gen::generate_initial(src.path(), &g)?;
    let dst = f.archive(dev).join(DB);
    std::fs::create_dir_all(dst.parent().expect("parent"))?;
    std::fs::copy(src.path().join(DB), &dst)?;
    f.sync(dev, 60)?;
    let mut snapshots = Vec::new();
    for step in 1..=4 {
        let old = std::fs::read(&dst)?;
        sim::gen::apply_step(src.path(), &g, step)?;
        // Rewritten in place, as SQLite does.
        std::fs::write(&dst, std::fs::read(src.path().join(DB))?)?;
        let new = std::fs::read(&dst)?;
        let (pages, alone, groups) = changed_pages_alone(&old, &new)?;
        let before = f.status(dev)?;
        f.sync(dev, 60)?;
        let after = f.status(dev)?;
        let sent = u(&after, "chunk_bytes_sent") - u(&before, "chunk_bytes_sent");
        let deltas = u(&after, "chunks_delta") - u(&before, "chunks_delta");
        eprintln!(
            "step {step}: {pages} pages in {groups} chunks changed; the pages alone compress \
             to {alone} bytes; {sent} chunk bytes sent, {deltas} delta chunks"
        );
        ensure!(pages > 0, "step {step} changed the database");
        // Pages appended at the end have no previous version; edits in the
        // middle do: most changed chunks go as deltas.
        ensure!(
            deltas * 2 >= groups as u64,
            "step {step}: {deltas} of {groups} changed chunks were deltas"
        );
        ensure!(
            sent * 2 < alone,
            "step {step}: {sent} chunk bytes sent; the changed pages alone compress to {alone}"
        );
        snapshots.push((cloud_sink::now_ms(), new));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    f.assert_restore_equal(dev)?;
    f.assert_changes_once(dev)?;
    for (i, (t, want)) in snapshots.iter().enumerate() {
        let out = f.dir().join(format!("restore-at-{i}"));
        f.restore(dev, &out, &["--at", &cloud_sink::format_ms(*t)])?;
        ensure!(
            std::fs::read(out.join("archive").join(DB))? == *want,
            "version {} restores byte for byte",
            i + 1
        );
    }
    Ok(())
}
