//! A `redb::StorageBackend` in memory whose writes since the last
//! `sync_data` are lost on [`CrashBackend::crash`], as on a power cut.
//!
//! It keeps the bytes, the length at the last sync, and an undo log: the
//! first time a page below the synced length is overwritten (or truncated)
//! after a sync, its synced content is saved. `crash` puts those pages back
//! and truncates to the synced length, so the file is exactly what the last
//! `sync_data` made durable. `torn` crashes keep a random subset of the
//! unsynced pages instead (a disk that wrote some of them).
//!
//! The backend is a cheap handle (`Arc` inside): the simulator keeps one
//! clone while redb owns another, so it can crash the storage after the
//! node (and its `Database`) was dropped, then reopen a new node on it.
//! A capacity makes writes past it fail with `StorageFull` (full disk).

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

const PAGE: u64 = 4096;
const PAGE_US: usize = PAGE as usize;

static ZERO_PAGE: [u8; PAGE_US] = [0; PAGE_US];

/// Grows `v` to `len` bytes with zeros (a no-op if it is not shorter).
/// `Vec::resize` writes one byte at a time in a debug build, where the
/// test suite's sweeps run this: about a third of their time went there.
/// Copying from a zero page is a `memcpy` at any optimisation level.
fn grow_zeroed(v: &mut Vec<u8>, len: usize) {
    v.reserve(len.saturating_sub(v.len()));
    while v.len() < len {
        let k = (len - v.len()).min(PAGE_US);
        v.extend_from_slice(&ZERO_PAGE[..k]);
    }
}

#[derive(Debug, Default)]
struct Inner {
    data: Vec<u8>,
    synced_len: u64,
    /// Pages below `synced_len` changed since the last sync, in the order
    /// they were first changed: (page number, bytes saved).
    undo: Vec<(u64, usize)>,
    /// Their content at the last sync: slot `i` of `undo` at `i * PAGE`.
    /// Kept (with its capacity) across syncs, so saving a page allocates
    /// nothing in the steady state.
    undo_data: Vec<u8>,
    /// Per page below `synced_len`: already saved since the last sync.
    saved: Vec<bool>,
    capacity: Option<u64>,
    syncs: u64,
    writes: u64,
    /// Highest length ever reached.
    peak: u64,
    /// Bumped by every crash: handles of an earlier generation (the
    /// crashed process's) can no longer touch the data.
    generation: u64,
}

impl Inner {
    fn save_pages(&mut self, from: u64, to: u64) {
        let to = to.min(self.synced_len);
        if from >= to {
            return;
        }
        for p in from / PAGE..to.div_ceil(PAGE) {
            let pi = p as usize;
            if self.saved.get(pi).copied().unwrap_or(true) {
                continue;
            }
            self.saved[pi] = true;
            let s = pi * PAGE_US;
            let e = (((p + 1) * PAGE).min(self.synced_len) as usize).min(self.data.len());
            let old = self.data.get(s..e).unwrap_or_default();
            self.undo.push((p, old.len()));
            let at = self.undo_data.len();
            self.undo_data.extend_from_slice(old);
            grow_zeroed(&mut self.undo_data, at + PAGE_US);
        }
    }

    /// Forgets the undo log (after a sync or a crash) and sizes `saved`
    /// for the new synced length.
    fn reset_undo(&mut self) {
        for &(p, _) in &self.undo {
            if let Some(x) = self.saved.get_mut(p as usize) {
                *x = false;
            }
        }
        self.undo.clear();
        self.undo_data.clear();
        self.saved.resize(self.synced_len.div_ceil(PAGE) as usize, false);
    }
}

/// Shared handle to one simulated disk file.
#[derive(Clone, Debug, Default)]
pub struct CrashBackend {
    inner: Arc<Mutex<Inner>>,
    generation: u64,
}

fn full() -> io::Error {
    io::Error::new(io::ErrorKind::StorageFull, "simulated disk full")
}

impl CrashBackend {
    pub fn new() -> CrashBackend {
        CrashBackend::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug in this file; the data is
        // still consistent enough for the simulator to report on.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A handle for the next process: one that a later crash fences off
    /// like the previous ones.
    pub fn reopen(&self) -> CrashBackend {
        CrashBackend {
            inner: self.inner.clone(),
            generation: self.lock().generation,
        }
    }

    /// The storage as seen by this handle's process (an error once it crashed).
    fn live(&self) -> Result<MutexGuard<'_, Inner>, io::Error> {
        let g = self.lock();
        if g.generation != self.generation {
            return Err(io::Error::other("simulated process crashed"));
        }
        Ok(g)
    }

    /// Limits the file to `cap` bytes (`None`: unlimited).
    pub fn set_capacity(&self, cap: Option<u64>) {
        self.lock().capacity = cap;
    }

    /// Current length (what the file occupies on disk).
    pub fn size(&self) -> u64 {
        self.lock().data.len() as u64
    }
    /// Highest length the file ever had.
    pub fn peak(&self) -> u64 {
        self.lock().peak
    }
    pub fn synced_len(&self) -> u64 {
        self.lock().synced_len
    }
    /// (sync_data calls, write calls) so far.
    pub fn io_counts(&self) -> (u64, u64) {
        let g = self.lock();
        (g.syncs, g.writes)
    }
    /// Bytes written since the last sync that a crash would lose (an upper bound).
    pub fn unsynced_pages(&self) -> usize {
        self.lock().undo.len()
    }

    /// Power cut: everything not made durable by `sync_data` is lost.
    pub fn crash(&self) {
        self.crash_keeping(|_| false)
    }

    /// A torn crash: each page written since the last sync survives if
    /// `keep(page)` says so, the others revert. The length still reverts to
    /// the synced length.
    pub fn crash_keeping(&self, mut keep: impl FnMut(u64) -> bool) {
        let mut g = self.lock();
        g.generation += 1;
        let synced = g.synced_len as usize;
        grow_zeroed(&mut g.data, synced);
        // Page order, so a torn crash's draws do not depend on write order.
        let mut undo: Vec<(usize, u64, usize)> = g.undo.iter().enumerate().map(|(i, &(p, n))| (i, p, n)).collect();
        undo.sort_unstable_by_key(|u| u.1);
        let Inner { data, undo_data, .. } = &mut *g;
        for (i, p, n) in undo {
            if keep(p) {
                continue;
            }
            let s = (p * PAGE) as usize;
            let e = (s + n).min(data.len());
            if let (Some(dst), Some(src)) = (data.get_mut(s..e), undo_data.get(i * PAGE_US..i * PAGE_US + (e - s))) {
                dst.copy_from_slice(src);
            }
        }
        g.data.truncate(synced);
        g.reset_undo();
    }
}

impl redb::StorageBackend for CrashBackend {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.live()?.data.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let g = self.live()?;
        let s = usize::try_from(offset).map_err(|_| io::Error::other("offset out of range"))?;
        match s.checked_add(out.len()).and_then(|e| g.data.get(s..e)) {
            Some(src) => {
                out.copy_from_slice(src);
                Ok(())
            }
            None => Err(io::Error::new(io::ErrorKind::InvalidInput, "read past end")),
        }
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut g = self.live()?;
        if g.capacity.is_some_and(|c| len > c) && len > g.data.len() as u64 {
            return Err(full());
        }
        let cur = g.data.len() as u64;
        if len < cur {
            g.save_pages(len, cur);
        }
        let n = usize::try_from(len).map_err(|_| io::Error::other("length out of range"))?;
        if n < g.data.len() {
            g.data.truncate(n);
        } else {
            grow_zeroed(&mut g.data, n);
        }
        g.peak = g.peak.max(len);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let mut g = self.live()?;
        g.synced_len = g.data.len() as u64;
        g.reset_undo();
        g.syncs += 1;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut g = self.live()?;
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| io::Error::other("write out of range"))?;
        if end > g.data.len() as u64 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "write past end"));
        }
        g.save_pages(offset, end);
        let s = offset as usize;
        g.data[s..s + data.len()].copy_from_slice(data);
        g.writes += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{Database, Durability, ReadableDatabase, StorageBackend, TableDefinition};

    const T: TableDefinition<u64, &[u8]> = TableDefinition::new("t");

    #[test]
    fn synced_survives_unsynced_does_not() {
        let b = CrashBackend::new();
        b.set_len(10_000).unwrap();
        b.write(0, &[1; 5000]).unwrap();
        b.sync_data().unwrap();
        b.write(100, &[2; 10]).unwrap();
        b.set_len(20_000).unwrap();
        b.write(15_000, &[3; 10]).unwrap();
        b.crash();
        assert!(b.write(0, &[0]).is_err(), "the crashed process is fenced off");
        let b = b.reopen();
        assert_eq!(b.size(), 10_000);
        let mut out = [0u8; 5000];
        b.read(0, &mut out).unwrap();
        assert!(out.iter().all(|x| *x == 1));
    }

    #[test]
    fn truncation_after_sync_is_undone() {
        let b = CrashBackend::new();
        b.set_len(3 * PAGE).unwrap();
        b.write(0, &vec![7; 3 * PAGE as usize]).unwrap();
        b.sync_data().unwrap();
        b.set_len(10).unwrap();
        b.crash();
        let b = b.reopen();
        assert_eq!(b.size(), 3 * PAGE);
        let mut out = vec![0u8; 3 * PAGE as usize];
        b.read(0, &mut out).unwrap();
        assert!(out.iter().all(|x| *x == 7));
    }

    #[test]
    fn torn_crash_keeps_exactly_the_chosen_pages() {
        let b = CrashBackend::new();
        b.set_len(4 * PAGE).unwrap();
        b.write(0, &vec![1; 4 * PAGE as usize]).unwrap();
        b.sync_data().unwrap();
        // Pages change in reverse order, one of them twice.
        for p in (0..4).rev() {
            b.write(p * PAGE, &vec![2; PAGE as usize]).unwrap();
        }
        b.write(PAGE, &[3; 10]).unwrap();
        let mut asked = Vec::new();
        b.crash_keeping(|p| {
            asked.push(p);
            p % 2 == 0
        });
        assert_eq!(asked, vec![0, 1, 2, 3], "each changed page once, in page order");
        let b = b.reopen();
        let mut out = vec![0u8; 4 * PAGE as usize];
        b.read(0, &mut out).unwrap();
        for (p, page) in out.chunks(PAGE as usize).enumerate() {
            let want = if p % 2 == 0 { 2 } else { 1 };
            assert!(page.iter().all(|x| *x == want), "page {p}");
        }
        // The undo log starts afresh: a new sync and crash keep the data.
        b.sync_data().unwrap();
        b.crash();
        let b = b.reopen();
        b.read(0, &mut out).unwrap();
        assert!(out[..PAGE as usize].iter().all(|x| *x == 2));
    }

    #[test]
    fn capacity_refuses_growth() {
        let b = CrashBackend::new();
        b.set_capacity(Some(100));
        assert!(b.set_len(50).is_ok());
        assert_eq!(b.set_len(200).unwrap_err().kind(), io::ErrorKind::StorageFull);
    }

    fn put(db: &Database, k: u64, v: &[u8], d: Durability) {
        let mut tx = db.begin_write().unwrap();
        tx.set_durability(d).unwrap();
        tx.open_table(T).unwrap().insert(k, v).unwrap();
        tx.commit().unwrap();
    }

    fn get(db: &Database, k: u64) -> Option<Vec<u8>> {
        let r = db.begin_read().unwrap();
        let t = r.open_table(T).ok()?;
        t.get(k).unwrap().map(|v| v.value().to_vec())
    }

    #[test]
    fn redb_reopened_after_crash_keeps_immediate_commits() {
        let b = CrashBackend::new();
        {
            let db = Database::builder().create_with_backend(b.clone()).unwrap();
            for k in 0..50 {
                put(&db, k, &[k as u8; 300], Durability::Immediate);
            }
            for k in 50..60 {
                put(&db, k, &[9; 300], Durability::None);
            }
            // The power goes before redb can close the file.
            b.crash();
        }
        let db = Database::builder().create_with_backend(b.reopen()).unwrap();
        for k in 0..50 {
            assert_eq!(get(&db, k), Some(vec![k as u8; 300]), "key {k}");
        }
        // Non-durable commits may be lost, and the database still opens.
        put(&db, 100, b"after", Durability::Immediate);
        assert_eq!(get(&db, 100).as_deref(), Some(&b"after"[..]));
    }

    #[test]
    fn redb_crash_in_the_middle_of_many_commits() {
        // Crash at many points (dropping the database without close) and
        // check every Immediate commit before the crash is there.
        for crash_after in [1u64, 3, 7, 20] {
            let b = CrashBackend::new();
            let mut committed = 0;
            {
                let db = Database::builder().create_with_backend(b.clone()).unwrap();
                for k in 0..crash_after {
                    put(&db, k, &k.to_le_bytes(), Durability::Immediate);
                    committed += 1;
                    // Unsynced noise that the crash must discard.
                    put(&db, 1000 + k, &[1; 2000], Durability::None);
                }
                b.crash();
                drop(db);
            }
            let db = Database::builder().create_with_backend(b.reopen()).unwrap();
            for k in 0..committed {
                assert_eq!(get(&db, k), Some(k.to_le_bytes().to_vec()));
            }
        }
    }
}
