//! Experiment: how much a changed SQLite page costs under different
//! compression references (alone; against neighbour pages of the new file;
//! against the same page's old version; the ideal concatenation).
//! `cargo run --release -p benches --example page_ref -- [SCALE] [STEP]`

use benches::{zstd_len, zstd_len_against};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let scale: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let step: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let (before, after) = benches::around_step(scale, step).expect("generated archive");
    for (path, new) in &after {
        if !path.ends_with(".sqlite") {
            continue;
        }
        let old = before.get(path).cloned().unwrap_or_default();
        let ps = 4096;
        let n = new.len() / ps;
        let page = |d: &[u8], i: usize| d.get(i * ps..(i + 1) * ps).map(<[u8]>::to_vec);
        let changed: Vec<usize> = (0..n).filter(|&i| page(new, i) != page(&old, i)).collect();
        let mut cat = Vec::new();
        let (mut alone, mut prev1, mut prev4, mut around, mut oldver, mut chain) = (0, 0, 0, 0, 0, 0);
        let mut last: Option<Vec<u8>> = None;
        for &i in &changed {
            let p = page(new, i).unwrap_or_default();
            cat.extend_from_slice(&p);
            alone += zstd_len(&p, 3);
            let lo = i.saturating_sub(1) * ps;
            prev1 += if i > 0 {
                zstd_len_against(&new[lo..i * ps], &p, 3)
            } else {
                zstd_len(&p, 3)
            };
            let lo4 = i.saturating_sub(4) * ps;
            prev4 += if i > 0 {
                zstd_len_against(&new[lo4..i * ps], &p, 3)
            } else {
                zstd_len(&p, 3)
            };
            // Both unchanged-or-not neighbours: the page before and after.
            let mut nb = Vec::new();
            if i > 0 {
                nb.extend_from_slice(&new[(i - 1) * ps..i * ps]);
            }
            if let Some(a) = page(new, i + 1) {
                nb.extend_from_slice(&a);
            }
            around += if nb.is_empty() {
                zstd_len(&p, 3)
            } else {
                zstd_len_against(&nb, &p, 3)
            };
            oldver += match page(&old, i) {
                Some(o) => zstd_len_against(&o, &p, 3),
                None => zstd_len(&p, 3),
            };
            chain += match &last {
                Some(l) => zstd_len_against(l, &p, 3),
                None => zstd_len(&p, 3),
            };
            last = Some(p);
        }
        println!("{path}: {} pages, {} changed", n, changed.len());
        println!("  ideal (zstd -3 of all changed pages) {}", zstd_len(&cat, 3));
        println!("  each page alone                      {alone}");
        println!("  against the page before (new file)   {prev1}");
        println!("  against the 4 pages before           {prev4}");
        println!("  against the pages before and after   {around}");
        println!("  against the previous changed page    {chain}");
        println!("  against its own old version          {oldver}");
    }
}
