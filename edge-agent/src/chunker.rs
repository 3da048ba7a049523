//! Streaming FastCDC 2020 over a reusable buffer: memory is bounded by
//! `2 × max` whatever the file size, and cut points are identical to
//! `fastcdc::v2020::FastCDC` over the whole input (golden tests below).
//!
//! Why this is identical: a v2020 cut only looks at the first `max` bytes
//! after the previous cut, so cutting a window that holds at least `max`
//! bytes (or everything up to EOF) gives the same answer as cutting the whole
//! slice. The same fact makes the append fast path sound: chunking from an
//! earlier cut point reproduces the whole-file cuts after it.

use crate::error::{Error, Result};
use fastcdc::v2020::{cut, select_masks, Normalization};
use std::io::Read;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkParams {
    pub min: usize,
    pub avg: usize,
    pub max: usize,
}

impl Default for ChunkParams {
    /// DESIGN.md §3: 16 / 64 / 256 KiB.
    fn default() -> Self {
        ChunkParams {
            min: 16 << 10,
            avg: 64 << 10,
            max: 256 << 10,
        }
    }
}

impl ChunkParams {
    /// The `db` class: 2 / 8 / 32 KiB.
    pub const DB: ChunkParams = ChunkParams {
        min: 2 << 10,
        avg: 8 << 10,
        max: 32 << 10,
    };

    pub fn validate(&self) -> Result<()> {
        use fastcdc::v2020::{AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN};
        let ok = (MINIMUM_MIN..=MINIMUM_MAX).contains(&self.min)
            && (AVERAGE_MIN..=AVERAGE_MAX).contains(&self.avg)
            && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&self.max)
            && self.min <= self.avg
            && self.avg <= self.max
            && self.min.is_multiple_of(2)
            && self.avg.is_multiple_of(2)
            && self.max.is_multiple_of(2);
        if ok {
            Ok(())
        } else {
            Err(Error::Config(format!("invalid chunk sizes {self:?}")))
        }
    }
}

pub struct Chunker {
    p: ChunkParams,
    mask_s: u64,
    mask_l: u64,
    buf: Vec<u8>,
    /// Cut SQLite databases into groups of whole pages ([`PAGE_GROUP`]).
    sqlite_pages: bool,
}

/// The page size of a SQLite database from its 100-byte header (bytes
/// 16..18, big-endian; 1 means 65536), or None if `head` is not one.
pub fn sqlite_page_size(head: &[u8]) -> Option<usize> {
    if head.len() < 18 || &head[..16] != b"SQLite format 3\0" {
        return None;
    }
    let n = match u16::from_be_bytes([head[16], head[17]]) {
        1 => 65536,
        n => usize::from(n),
    };
    (n.is_power_of_two() && (512..=65536).contains(&n)).then_some(n)
}

/// Bytes per chunk of a page-chunked SQLite database: 32 pages of 4 KiB,
/// two of 64 KiB. Every valid page size divides it, so chunks hold whole
/// pages. Measured on the `sim gen` database (BENCHMARKS.md §5), against
/// zstd -3 of the whole file: one chunk per 4 KiB page compressed its
/// first version to 1.56x, and its manifest listed every page; groups of
/// 16 pages to 1.13x, of 32 to 1.08x (`zstd` CLI). A changed group is sent
/// as a delta against its previous version and costs about its changed
/// pages alone (modelled with `zstd --patch-from` on hour 1: 20 KB for
/// 32-page groups, 24 KB for 16, 62 KB page by page, with 38 bytes of
/// manifest entry per chunk). At most `scan::MAX_PAGE`.
pub const PAGE_GROUP: usize = 128 << 10;

impl Chunker {
    pub fn new(p: ChunkParams) -> Result<Chunker> {
        p.validate()?;
        let (mask_s, mask_l) = select_masks(p.avg, Normalization::Level1);
        Ok(Chunker {
            p,
            mask_s,
            mask_l,
            buf: vec![0; 2 * p.max],
            sqlite_pages: false,
        })
    }

    /// With `on`, a source that starts with a SQLite header is cut every
    /// [`PAGE_GROUP`] bytes (whole pages) instead of by content: an edit
    /// to a page changes exactly one chunk, and pages do not move when rows
    /// change. Other files are cut by content as usual.
    pub fn with_sqlite_pages(mut self, on: bool) -> Chunker {
        self.sqlite_pages = on;
        if on && self.buf.len() < 2 * PAGE_GROUP {
            self.buf.resize(2 * PAGE_GROUP, 0);
        }
        self
    }

    pub fn params(&self) -> ChunkParams {
        self.p
    }

    /// Names this chunking (FastCDC 2020 parameters, page groups): equal
    /// fingerprints cut equal bytes at equal points.
    pub fn fingerprint(&self) -> u64 {
        let name = format!(
            "fastcdc-2020 min {} avg {} max {} sqlite-pages {} group {PAGE_GROUP}",
            self.p.min, self.p.avg, self.p.max, self.sqlite_pages
        );
        let h = protocol::Hash32::of(name.as_bytes()).0;
        u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]])
    }

    /// Longest chunk this chunking cuts.
    pub fn max_chunk(&self) -> usize {
        match self.sqlite_pages {
            true => self.p.max.max(PAGE_GROUP),
            false => self.p.max,
        }
    }

    /// Whether a file that starts with `head` is cut into page groups.
    pub fn pages_for(&self, head: &[u8]) -> bool {
        self.sqlite_pages && sqlite_page_size(head).is_some()
    }

    /// Length of the next chunk at the start of `window` (which holds at
    /// least `max` bytes unless it ends at EOF).
    fn cut(&self, window: &[u8]) -> usize {
        let (_, n) = cut(
            window,
            self.p.min,
            self.p.avg,
            self.p.max,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        n
    }

    /// Reads `src` to EOF, calling `f(chunk)` for each chunk in order.
    /// Returns the number of bytes read. `what` names the source in errors.
    pub fn run<R: Read>(&mut self, src: R, what: &std::path::Path, f: impl FnMut(&[u8]) -> Result<()>) -> Result<u64> {
        self.run_from(src, what, None, f)
    }

    /// [`Chunker::run`] on a source positioned at a cut point of its file
    /// (not at its start). `pages`: whether the file is cut into page
    /// groups (decided from its first bytes, which this source may not
    /// hold); None decides it from the source's first bytes, as `run`.
    pub fn run_from<R: Read>(
        &mut self,
        mut src: R,
        what: &std::path::Path,
        pages: Option<bool>,
        mut f: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<u64> {
        let (mut start, mut end, mut eof, mut total) = (0usize, 0usize, false, 0u64);
        // Cut into page groups? Unless given, decided after the first fill,
        // from the source's first bytes.
        let mut groups = pages.map(|p| p && self.sqlite_pages);
        loop {
            let need = match groups {
                Some(true) => PAGE_GROUP,
                _ => self.p.max,
            };
            if end - start < need && !eof {
                // Refill: move the tail to the front, then read until full or EOF.
                self.buf.copy_within(start..end, 0);
                end -= start;
                start = 0;
                while end < self.buf.len() {
                    match src.read(&mut self.buf[end..]) {
                        Ok(0) => {
                            eof = true;
                            break;
                        }
                        Ok(n) => {
                            end += n;
                            total += n as u64;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(Error::io(what, e)),
                    }
                }
            }
            if start == end {
                return Ok(total);
            }
            let n = match *groups.get_or_insert_with(|| self.pages_for(&self.buf[start..end])) {
                true => PAGE_GROUP.min(end - start),
                false => self.cut(&self.buf[start..end]).max(1),
            };
            f(&self.buf[start..start + n])?;
            start += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64: a fixed, dependency-free pseudo-random source.
    pub(crate) fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
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

    fn cuts(data: &[u8], p: ChunkParams, read_size: usize) -> Vec<usize> {
        /// A reader that returns at most `n` bytes per call, to exercise refills.
        struct Dribble<'a>(&'a [u8], usize);
        impl Read for Dribble<'_> {
            fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
                let n = self.0.len().min(b.len()).min(self.1);
                b[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut c = Chunker::new(p).unwrap();
        let mut out = Vec::new();
        let mut off = 0;
        let total = c
            .run(Dribble(data, read_size), std::path::Path::new("mem"), |ch| {
                off += ch.len();
                out.push(off);
                Ok(())
            })
            .unwrap();
        assert_eq!(total as usize, data.len());
        out
    }

    fn reference(data: &[u8], p: ChunkParams) -> Vec<usize> {
        fastcdc::v2020::FastCDC::new(data, p.min, p.avg, p.max)
            .map(|c| c.offset + c.length)
            .collect()
    }

    #[test]
    fn golden_cut_points_default_params() {
        let data = pseudo_random(2 << 20, 0x5eed_f00d);
        let p = ChunkParams::default();
        let got = cuts(&data, p, 1 << 20);
        // Computed once with fastcdc 5.0.0; a change here changes every chunk id.
        let golden: Vec<usize> = GOLDEN_DEFAULT.to_vec();
        assert_eq!(got, golden);
        assert_eq!(got, reference(&data, p));
        assert_eq!(cuts(&data, p, 4093), golden, "independent of read sizes");
    }

    #[test]
    fn golden_cut_points_small_params() {
        let data = pseudo_random(100_000, 42);
        let p = ChunkParams {
            min: 2048,
            avg: 8192,
            max: 32768,
        };
        let got = cuts(&data, p, 7777);
        assert_eq!(got, GOLDEN_SMALL.to_vec());
        assert_eq!(got, reference(&data, p));
    }

    #[test]
    fn streaming_equals_whole_slice_on_edge_inputs() {
        let p = ChunkParams::default();
        for data in [
            Vec::new(),
            vec![7u8; 1],
            vec![0u8; 3 * p.max + 5],
            pseudo_random(p.min, 1),
            pseudo_random(p.max + 1, 2),
            pseudo_random(5 * p.max + 3, 3),
        ] {
            assert_eq!(cuts(&data, p, 65536), reference(&data, p), "len {}", data.len());
        }
    }

    #[test]
    fn sqlite_databases_are_cut_into_groups_of_whole_pages() {
        let mut db = pseudo_random(2 * PAGE_GROUP + 40 * 4096 + 100, 9);
        db[..16].copy_from_slice(b"SQLite format 3\0");
        db[16..18].copy_from_slice(&4096u16.to_be_bytes());
        let run = |data: &[u8]| {
            let mut c = Chunker::new(ChunkParams::DB).unwrap().with_sqlite_pages(true);
            let mut out = Vec::new();
            let mut off = 0;
            c.run(&mut std::io::Cursor::new(data), std::path::Path::new("mem"), |ch| {
                off += ch.len();
                out.push(off);
                Ok(())
            })
            .unwrap();
            out
        };
        let mut want: Vec<usize> = (1..).map(|i| i * PAGE_GROUP).take_while(|n| *n < db.len()).collect();
        want.push(db.len());
        assert!(want.len() > 1);
        assert_eq!(run(&db), want);
        assert_eq!(PAGE_GROUP % 65536, 0, "every page size divides a group");
        // Not a database (or pages off): content-defined as before.
        let mut plain = db.clone();
        plain[0] = b'X';
        assert_eq!(run(&plain), reference(&plain, ChunkParams::DB));
        let mut c = Chunker::new(ChunkParams::DB).unwrap();
        let mut n = 0;
        c.run(&db[..], std::path::Path::new("mem"), |_| {
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, reference(&db, ChunkParams::DB).len());
        // Page sizes: 1 means 65536; others must be powers of two >= 512.
        let mut h = db[..18].to_vec();
        h[16..18].copy_from_slice(&1u16.to_be_bytes());
        assert_eq!(sqlite_page_size(&h), Some(65536));
        h[16..18].copy_from_slice(&1000u16.to_be_bytes());
        assert_eq!(sqlite_page_size(&h), None);
        assert_eq!(sqlite_page_size(b"SQLite"), None);
        // 64 KiB pages, larger than the db class's 32 KiB maximum: grouped too.
        let mut big = pseudo_random(3 * PAGE_GROUP + 1000, 3);
        big[..18].copy_from_slice(&h[..18]);
        big[16..18].copy_from_slice(&1u16.to_be_bytes());
        assert_eq!(
            run(&big),
            [PAGE_GROUP, 2 * PAGE_GROUP, 3 * PAGE_GROUP, 3 * PAGE_GROUP + 1000]
        );
    }

    const GOLDEN_DEFAULT: &[usize] = &[
        29740, 78084, 144962, 357141, 376356, 392810, 417073, 493984, 571419, 656258, 823321, 913018, 960985, 1073206,
        1140681, 1268179, 1353190, 1451990, 1565461, 1640765, 1689790, 1762385, 1869728, 1950615, 1985481, 2057251,
        2097152,
    ];
    const GOLDEN_SMALL: &[usize] = &[7284, 9392, 21240, 30662, 39387, 49500, 70200, 85297, 94704, 100000];
}
