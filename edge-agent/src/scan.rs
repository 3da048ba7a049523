//! Scanning watch roots and recording changes (DESIGN.md §3).
//!
//! Each root is walked with siblings sorted by `name` (files) or `name/`
//! (directories): that makes the walk visit manifest paths in byte order,
//! the order of the `files` table, so new, changed and deleted files are
//! found by one merge of the walk with a paged cursor over the table —
//! memory stays bounded however many files there are. Unchanged files cost
//! one `lstat` (the walk itself reads directories only) — except a file whose
//! mtime was within `RACY_NS` of its last read: a same-size rewrite in the
//! same timestamp tick would not show in the stat, so its content is checked
//! again, and a new version is recorded only if it differs. A new path
//! holding a tracked file's inode, size and mtime is that file renamed: it
//! is recorded with the file's chunks, reading only the last one
//! (`Agent::adopt`, docs/design.md §6).

use crate::error::{Error, Result};
use crate::policy::Root;
use crate::store::{BasisPage, BasisSlot, DeltaWrites, FileChunks, FileMeta, KnownChunk, StoredChunk};
use crate::Agent;
use protocol::manifest::{ChangeBody, ChunkRef, FileVersion};
use protocol::seal::{BaseRef, MAX_DEPTH};
use protocol::sha::ResumableSha256;
use protocol::{Hash32, Knowledge, ReplicaId};
use serde::Serialize;
use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use walkdir::{DirEntry, WalkDir};

/// What a file version is read from: the file, or a symbolic link's target.
enum Src {
    File(File),
    Mem(std::io::Cursor<Vec<u8>>),
}

impl Read for Src {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Src::File(f) => f.read(b),
            Src::Mem(m) => m.read(b),
        }
    }
}

impl Seek for Src {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        match self {
            Src::File(f) => f.seek(pos),
            Src::Mem(m) => m.seek(pos),
        }
    }
}

/// What one scan did.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ScanReport {
    pub files_seen: u64,
    pub files_unchanged: u64,
    pub files_new: u64,
    pub files_changed: u64,
    pub files_deleted: u64,
    /// Changed while being read, or unreadable: tried again next scan.
    pub files_skipped: u64,
    /// Appends handled by chunking only the new tail.
    pub append_fast_path: u64,
    /// Files re-read whose chunks were all those of their previous version
    /// (same size): the whole-file SHA-256 was resumed from that version's
    /// saved state over the last chunk only.
    pub same_content_fast_path: u64,
    /// Bytes of those files cut where their previous version was cut
    /// (each chunk checked by its index tag), without running FastCDC.
    pub bytes_same_cuts: u64,
    pub changes_recorded: u64,
    /// Bytes read from files (chunking plus append checks).
    pub bytes_read: u64,
    pub bytes_chunked: u64,
    pub chunks_new: u64,
    pub chunks_known: u64,
    /// New chunks stored as extensions of the file's old last chunk.
    pub chunks_extension: u64,
    /// New chunks stored as deltas against the page's previous version.
    pub chunks_delta: u64,
    /// New paths recognised as a tracked file renamed (same device, inode,
    /// size and mtime): recorded with its chunks, only its last chunk read.
    pub files_renamed: u64,
    pub secs: f64,
}

/// Files larger than this are not sent as page deltas: the basis (a
/// compressed copy of every page, twice at most) would cost too much disk.
pub const MAX_DELTA_FILE: u64 = 256 << 20;
/// Largest chunk of a page-chunked file (its pages, grouped): bounds a
/// basis copy's decompressed size.
const MAX_PAGE: usize = crate::chunker::PAGE_GROUP;
/// zstd level of the basis copies (kept locally, written on every change)
/// that sealing did not already make: a page sealed whole keeps the zstd
/// frame its seal made (`Sealer::last_frame`), so only deltas, stored
/// pages and reused chunks are compressed again.
const BASIS_LEVEL: i32 = 1;

/// Log a progress line every this many files or bytes.
const PROGRESS_FILES: u64 = 5_000;
const PROGRESS_BYTES: u64 = 512 << 20;
const PAGE: usize = 256;
/// Empty directories tracked per root; past this, none are recorded or deleted.
const MAX_EMPTY_DIRS: usize = 100_000;
/// Bounds on the versions a root's scan keeps in memory after their path
/// was deleted or given another inode (rename candidates): files, and
/// their chunk entries (72 bytes each).
const MAX_VACATED: usize = 4096;
const MAX_VACATED_CHUNKS: usize = 1 << 15;
const BACKFILL_BATCH: usize = 1024;

/// A tracked version whose path no longer holds its inode: a path seen
/// later in the same scan with that device, inode, size and mtime is the
/// file renamed.
struct Gone {
    path: String,
    meta: FileMeta,
    fc: FileChunks,
    /// The path's delta bases are still in the state file (its deletion
    /// kept them, or it is still tracked).
    basis: bool,
}

/// One root scan's rename candidates, by (device, inode), bounded.
#[derive(Default)]
struct Vacated {
    by_inode: HashMap<(u64, u64), Gone>,
    chunks: usize,
    /// Deleted paths whose delta bases were kept: dropped when the root is
    /// done. At most `MAX_VACATED`.
    kept_basis: Vec<String>,
    /// Unchanged files whose record lacks the device or birth time (an
    /// older agent's): written in batches of `BACKFILL_BATCH`.
    backfill: Vec<(String, FileMeta)>,
}

impl Vacated {
    /// Whether a version of `n` chunks may be kept.
    fn room(&self, n: usize) -> bool {
        self.by_inode.len() < MAX_VACATED && self.chunks + n <= MAX_VACATED_CHUNKS
    }
    fn put(&mut self, dev: u64, g: Gone) {
        if self.room(g.fc.chunks.len()) {
            self.chunks += g.fc.chunks.len();
            if let Some(old) = self.by_inode.insert((dev, g.meta.inode), g) {
                self.chunks -= old.fc.chunks.len();
            }
        }
    }
    fn take(&mut self, dev: u64, inode: u64) -> Option<Gone> {
        let g = self.by_inode.remove(&(dev, inode))?;
        self.chunks -= g.fc.chunks.len();
        Some(g)
    }
}

/// Adds an empty directory to `seen`; false once the bound is reached.
fn note_empty(seen: &mut BTreeSet<String>, path: String) -> bool {
    if seen.len() >= MAX_EMPTY_DIRS {
        return false;
    }
    seen.insert(path);
    true
}
/// Beyond this many unreadable directories in a root, record no deletions in it.
const MAX_BLOCKED: usize = 1_000;

/// Sibling order that makes a depth-first walk visit paths in byte order.
fn walk_order(a: &DirEntry, b: &DirEntry) -> Ordering {
    let key = |e: &DirEntry| {
        let sep: &[u8] = if e.file_type().is_dir() { b"/" } else { b"" };
        (e.file_name().as_encoded_bytes().to_vec(), sep)
    };
    let (an, asep) = key(a);
    let (bn, bsep) = key(b);
    an.iter().chain(asep).cmp(bn.iter().chain(bsep))
}

/// `label/rel/path`, or None for non-UTF-8 names.
fn manifest_path(root: &Root, p: &Path) -> Option<String> {
    let rel = p.strip_prefix(&root.dir).ok()?;
    let mut s = root.label.clone();
    for c in rel.components() {
        s.push('/');
        s.push_str(c.as_os_str().to_str()?);
    }
    Some(s)
}

/// Paged cursor over the tracked files of one root.
struct Cursor {
    prefix: String,
    page: VecDeque<(String, FileMeta)>,
    after: Option<String>,
    done: bool,
}

impl Cursor {
    fn peek(&mut self, agent: &Agent) -> Result<Option<&(String, FileMeta)>> {
        if self.page.is_empty() && !self.done {
            let page = agent.store.file_page(&self.prefix, self.after.as_deref(), PAGE)?;
            self.done = page.len() < PAGE;
            self.after = page.last().map(|p| p.0.clone()).or(self.after.take());
            self.page = page.into();
        }
        Ok(self.page.front())
    }
    fn take(&mut self) -> Option<(String, FileMeta)> {
        self.page.pop_front()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Stat {
    size: u64,
    mtime_ns: i64,
    inode: u64,
    mode: u32,
    dev: u64,
    /// Birth time, where the filesystem reports one (statx).
    btime: Option<i64>,
}

impl Stat {
    fn of(md: &fs::Metadata) -> Stat {
        Stat {
            size: md.len(),
            mtime_ns: md.mtime().saturating_mul(1_000_000_000).saturating_add(md.mtime_nsec()),
            inode: md.ino(),
            mode: md.mode() & 0o7777,
            dev: md.dev(),
            btime: md
                .created()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .and_then(|d| i64::try_from(d.as_nanos()).ok()),
        }
    }
    /// The state to record for a version read with this stat, taken at
    /// `stat_wall_ns` (a recent mtime is not trusted next time: `racy`).
    fn meta(&self, stat_wall_ns: i64) -> FileMeta {
        FileMeta {
            size: self.size,
            mtime_ns: self.mtime_ns,
            inode: self.inode,
            mode: self.mode,
            seq: 0,
            dirty: false,
            racy: self.mtime_ns > stat_wall_ns.saturating_sub(crate::store::RACY_NS),
            dev: Some(self.dev),
            btime_ns: self.btime,
        }
    }
    fn same_as(&self, m: &FileMeta) -> bool {
        self.size == m.size && self.mtime_ns == m.mtime_ns && self.inode == m.inode
    }
}

impl Agent {
    /// Scans every root once and records what changed. All times (change
    /// stamps, the racy-mtime check, `secs`) come from the configured
    /// clock; directories are walked in sorted order.
    pub fn scan_once(&mut self) -> Result<ScanReport> {
        let t0 = (self.config().clock)();
        let mut rep = ScanReport::default();
        self.store.rescan = false;
        let swept = self.store.drop_kept_basis()?;
        if swept > 0 {
            tracing::info!(files = swept, "dropped the delta bases a stopped scan kept for renames");
        }
        for root in self.roots.clone() {
            self.scan_root(&root, &mut rep, t0)?;
        }
        self.store.counters.scans += 1;
        // A scan that wrote nothing costs no durable commit (an fsync on a
        // gateway); its counters are saved with the next one.
        if self.store.needs_flush() {
            self.store.flush()?;
        }
        rep.secs = (self.config().clock)().saturating_sub(t0) as f64 / 1000.0;
        tracing::info!(
            files = rep.files_seen,
            changed = rep.files_changed,
            new = rep.files_new,
            deleted = rep.files_deleted,
            skipped = rep.files_skipped,
            mib_chunked = rep.bytes_chunked >> 20,
            chunks_new = rep.chunks_new,
            chunks_known = rep.chunks_known,
            secs = format!("{:.2}", rep.secs),
            "scan done"
        );
        Ok(rep)
    }

    fn scan_root(&mut self, root: &Root, rep: &mut ScanReport, t0: u64) -> Result<()> {
        // A missing root (unmounted disk, typo) must not read as "everything deleted".
        match fs::metadata(&root.dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) | Err(_) => {
                tracing::warn!(root = %root.dir.display(), "watch root is not a readable directory; skipped, no deletions recorded");
                return Ok(());
            }
        }
        let mut cursor = Cursor {
            prefix: format!("{}/", root.label),
            page: VecDeque::new(),
            after: None,
            done: false,
        };
        let mut blocked: Vec<String> = Vec::new();
        let mut vac = Vacated::default();
        let mut empty_dirs: BTreeSet<String> = BTreeSet::new();
        let mut dirs_capped = false;
        let (mut next_files, mut next_bytes) = (PROGRESS_FILES, PROGRESS_BYTES);
        let walk = WalkDir::new(&root.dir)
            .min_depth(1)
            .follow_links(false)
            .sort_by(walk_order);
        // The last directory walked, until the next walk item tells whether
        // it holds anything (the walk lists a directory's contents right
        // after it): emptiness costs no extra read of the directory.
        let mut last_dir: Option<(std::path::PathBuf, String)> = None;
        for entry in walk {
            if let Some((dir, p)) = last_dir.take() {
                // Unreadable (an error for the directory itself) counts as not empty.
                let inside = match &entry {
                    Ok(e) => e.path().starts_with(&dir),
                    Err(e) => e.path().is_none_or(|x| x.starts_with(&dir)),
                };
                if !inside {
                    dirs_capped |= !note_empty(&mut empty_dirs, p);
                }
            }
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!("scan: {e}");
                    // Files under an unreadable directory are not deleted.
                    match e.path().and_then(|p| manifest_path(root, p)) {
                        Some(p) if blocked.len() < MAX_BLOCKED => blocked.push(p),
                        _ => blocked.push(String::new()), // blocks every deletion
                    }
                    continue;
                }
            };
            if entry.file_type().is_dir() {
                // Empty directories are recorded (restores recreate them);
                // others are implied by the files inside.
                last_dir = manifest_path(root, entry.path())
                    .filter(|p| self.policy.included(p) && protocol::manifest::validate_path(p).is_ok())
                    .map(|p| (entry.path().to_path_buf(), p));
                continue;
            }
            if !entry.file_type().is_file() && !entry.file_type().is_symlink() {
                continue; // devices, sockets and fifos are not archived
            }
            let Some(path) = manifest_path(root, entry.path()) else {
                tracing::warn!(path = %entry.path().display(), "skipping non-UTF-8 file name");
                continue;
            };
            if !self.policy.included(&path) || protocol::manifest::validate_path(&path).is_err() {
                continue;
            }
            rep.files_seen += 1;
            // Tracked paths sorting before this one were not seen: deleted.
            while let Some((k, _)) = cursor.peek(self)? {
                if k.as_str() >= path.as_str() {
                    break;
                }
                if let Some((k, m)) = cursor.take() {
                    self.maybe_delete(root, k, m, &blocked, rep, &mut vac)?;
                }
            }
            let old = match cursor.peek(self)? {
                Some((k, _)) if *k == path => cursor.take().map(|x| x.1),
                _ => None,
            };
            if let Err(e) = self.scan_file(&path, &entry, old, rep, &mut vac) {
                match e {
                    Error::Io { .. } => {
                        tracing::warn!("scan: {e}; will retry next scan");
                        rep.files_skipped += 1;
                    }
                    e => return Err(e),
                }
            }
            if rep.files_seen >= next_files || rep.bytes_chunked >= next_bytes {
                next_files = rep.files_seen + PROGRESS_FILES;
                next_bytes = rep.bytes_chunked + PROGRESS_BYTES;
                tracing::info!(
                    files = rep.files_seen,
                    mib_chunked = rep.bytes_chunked >> 20,
                    changes = rep.changes_recorded,
                    secs = (self.config().clock)().saturating_sub(t0) / 1000,
                    "scan progress"
                );
            }
        }
        if let Some((_, p)) = last_dir {
            dirs_capped |= !note_empty(&mut empty_dirs, p);
        }
        while cursor.peek(self)?.is_some() {
            if let Some((k, m)) = cursor.take() {
                self.maybe_delete(root, k, m, &blocked, rep, &mut vac)?;
            }
        }
        self.store.drop_basis(&vac.kept_basis)?;
        self.store.update_file_metas(&vac.backfill)?;
        if dirs_capped {
            tracing::warn!(root = %root.dir.display(), "more than {MAX_EMPTY_DIRS} empty directories; not tracking them");
            return Ok(());
        }
        self.sync_empty_dirs(root, &cursor.prefix, &empty_dirs, &blocked, rep)
    }

    /// Records empty directories that appeared, and the end of those that
    /// vanished or now hold files (they are then implied by their files).
    fn sync_empty_dirs(
        &mut self,
        root: &Root,
        prefix: &str,
        seen: &BTreeSet<String>,
        blocked: &[String],
        rep: &mut ScanReport,
    ) -> Result<()> {
        let stored: BTreeSet<String> = self.store.empty_dirs(prefix, MAX_EMPTY_DIRS + 1)?.into_iter().collect();
        for gone in stored.difference(seen) {
            if blocked.iter().any(|b| gone.starts_with(b.as_str())) {
                continue;
            }
            let now = (self.config().clock)();
            let shared = self.policy.shared(gone);
            self.store
                .record_shared(ChangeBody::Delete(gone.clone()), None, &[], now, shared)?;
            rep.changes_recorded += 1;
        }
        for new in seen.difference(&stored) {
            let Some(dir) = crate::policy::fs_path(std::slice::from_ref(root), new) else {
                continue;
            };
            let Ok(md) = fs::symlink_metadata(&dir) else {
                continue; // vanished since the walk: next scan
            };
            let v = FileVersion {
                path: new.clone(),
                size: 0,
                mtime_ns: md.mtime().saturating_mul(1_000_000_000).saturating_add(md.mtime_nsec()),
                class: self.policy.class(new).to_string(),
                chunks: Vec::new(),
                sha256: Hash32::of(b""),
                mode: protocol::manifest::MODE_DIR | (md.mode() & 0o7777),
            };
            let now = (self.config().clock)();
            let shared = self.policy.shared(new);
            self.store.record_shared(ChangeBody::File(v), None, &[], now, shared)?;
            rep.changes_recorded += 1;
        }
        Ok(())
    }

    fn maybe_delete(
        &mut self,
        root: &Root,
        path: String,
        meta: FileMeta,
        blocked: &[String],
        rep: &mut ScanReport,
        vac: &mut Vacated,
    ) -> Result<()> {
        if blocked.iter().any(|b| path.starts_with(b.as_str())) {
            return Ok(());
        }
        // The walk missed it; make sure it is really gone (one stat per deletion).
        if let Some(p) = crate::policy::fs_path(std::slice::from_ref(root), &path) {
            if fs::symlink_metadata(&p).is_ok_and(|m| m.is_file() || m.is_symlink()) && self.policy.included(&path) {
                return Ok(());
            }
        }
        // A rename candidate: a new path later in this scan may be this
        // file. A page-delta file's bases stay until the root is done.
        let mut keep = None;
        if let Some(g) = self.vacate(&path, meta, vac)? {
            let c = self.policy.classes.get(self.policy.class_idx(&path));
            if c.is_some_and(|c| c.sqlite_pages && c.page_deltas) && vac.kept_basis.len() < MAX_VACATED {
                keep = Some(DeltaWrites {
                    keep_basis: true,
                    ..DeltaWrites::default()
                });
                vac.kept_basis.push(path.clone());
            }
            vac.put(
                g.0,
                Gone {
                    basis: keep.is_some(),
                    ..g.1
                },
            );
        }
        let now = (self.config().clock)();
        let shared = self.policy.shared(&path);
        self.store
            .record_with_deltas(ChangeBody::Delete(path), None, &[], keep.as_ref(), now, shared)?;
        rep.files_deleted += 1;
        rep.changes_recorded += 1;
        Ok(())
    }

    /// `path`'s tracked version as a rename candidate, with its device:
    /// None if it cannot be one (unknown device, untrusted stat, no chunks
    /// or no room).
    fn vacate(&self, path: &str, meta: FileMeta, vac: &Vacated) -> Result<Option<(u64, Gone)>> {
        let trusted = !meta.dirty && !meta.racy && meta.size > 0 && meta.btime_ns.is_some();
        let Some(dev) = meta.dev.filter(|_| trusted) else {
            return Ok(None);
        };
        // An undecodable entry is no candidate (and must not stop the scan).
        let fc = self.store.file_chunks(path).ok().flatten();
        let Some(fc) = fc.filter(|fc| vac.room(fc.chunks.len())) else {
            return Ok(None);
        };
        Ok(Some((
            dev,
            Gone {
                path: path.to_string(),
                meta,
                fc,
                basis: false,
            },
        )))
    }

    /// Records `path` as a tracked file renamed, if its stat names one: a
    /// version whose path was deleted or given another inode in this scan
    /// (`vac`), or still tracked under another path (the `inodes` table),
    /// with the same device, inode, size and mtime — the trust a scan gives
    /// an unchanged stat. Its chunks are taken as they were; only the last
    /// chunk is read, checked by its tag and hashed onto the saved state to
    /// give the whole-file SHA-256. False: read the file as usual.
    #[allow(clippy::too_many_arguments)]
    fn adopt(
        &mut self,
        path: &str,
        fs_path: &Path,
        st: &Stat,
        old: Option<&FileMeta>,
        (ci, class, page_deltas): (usize, &str, bool),
        stat_wall_ns: i64,
        rep: &mut ScanReport,
        vac: &mut Vacated,
    ) -> Result<bool> {
        let g = match vac.take(st.dev, st.inode) {
            Some(g) => g,
            None => {
                let Some(p) = self.store.inode_path(st.dev, st.inode)?.filter(|p| p != path) else {
                    return Ok(false);
                };
                // Undecodable entries are no candidate (and must not stop the scan).
                let meta = self.store.file_meta(&p).ok().flatten();
                let fc = self.store.file_chunks(&p).ok().flatten();
                let (Some(meta), Some(fc)) = (meta, fc) else {
                    return Ok(false);
                };
                if meta.dev != Some(st.dev) || meta.inode != st.inode {
                    return Ok(false);
                }
                Gone {
                    path: p,
                    meta,
                    fc,
                    basis: true,
                }
            }
        };
        let (m, fc) = (&g.meta, &g.fc);
        let Some(chunker) = self.chunkers.get(ci) else {
            return Err(Error::Config("no chunker for the policy class".into()));
        };
        let same = !m.dirty
            && !m.racy
            && m.size == st.size
            && m.mtime_ns == st.mtime_ns
            && st.btime.is_some()
            && m.btime_ns == st.btime
            && fc.cuts == Some(chunker.fingerprint());
        let (true, Some(mut sha), Some(last)) =
            (same, resume_state(fc, st.size, chunker.max_chunk()), fc.chunks.last())
        else {
            return Ok(false);
        };
        let last_start = st.size - u64::from(last.len);
        // A page-delta file takes the old path's slots as of now (an
        // acknowledged candidate is the anchor): the same chunks at the same
        // offsets, so those must still be there. Other files keep none.
        let slots = page_deltas && st.size <= MAX_DELTA_FILE;
        if slots && !g.basis {
            return Ok(false);
        }
        let mut w = DeltaWrites {
            basis_end: if slots { st.size } else { 0 },
            replace: true,
            ..DeltaWrites::default()
        };
        // Every chunk must be one a full read would reuse: known under its
        // tag with this id, and a delta chunk only while its sealed bytes
        // are kept (they move to this change) or the cloud holds it as this
        // page's anchor.
        {
            let known = self.store.known_reader()?;
            let old = PageDeltas {
                basis: self.store.basis_reader(&g.path)?,
                cloud: self.store.cloud().clone(),
                device: self.store.device().clone(),
                on: None,
                w: DeltaWrites::default(),
                zc: None,
            };
            let mut at = 0u64;
            for c in &fc.chunks {
                let slot = match slots {
                    true => old.current(at)?,
                    false => BasisSlot::default(),
                };
                match known.get(&c.tag)? {
                    Some(k) if k.id == c.id => {
                        if k.base.is_some_and(|b| b.delta) {
                            if old.basis.has_sealed(&k.id)? {
                                w.keep_sealed.push(k.id);
                            } else if slot.anchor.as_ref().is_none_or(|a| a.id != k.id || !old.acked(a)) {
                                // A full read would seal it again.
                                return Ok(false);
                            }
                        }
                    }
                    _ => return Ok(false),
                }
                if slot != BasisSlot::default() {
                    w.basis.push((at, slot));
                }
                at += u64::from(c.len);
            }
        }
        use std::os::unix::fs::FileExt;
        let f = File::open(fs_path).map_err(|e| Error::io(fs_path, e))?;
        let fmd = f.metadata().map_err(|e| Error::io(fs_path, e))?;
        self.read_buf.resize(last.len as usize, 0);
        f.read_exact_at(&mut self.read_buf, last_start)
            .map_err(|e| Error::io(fs_path, e))?;
        rep.bytes_read += u64::from(last.len);
        self.store.counters.bytes_read += u64::from(last.len);
        let after = fs::symlink_metadata(fs_path).map(|m| Stat::of(&m)).ok();
        if Stat::of(&fmd) != *st || after != Some(*st) || self.sealer.index_tag(&self.read_buf) != last.tag {
            return Ok(false);
        }
        sha.update(&self.read_buf);
        let fv = FileVersion {
            path: path.to_string(),
            size: st.size,
            mtime_ns: st.mtime_ns,
            class: class.to_string(),
            chunks: fc.chunks.iter().map(|c| ChunkRef { id: c.id, len: c.len }).collect(),
            sha256: sha.finish(),
            mode: st.mode,
        };
        let meta = st.meta(stat_wall_ns);
        tracing::debug!(path, from = %g.path, "renamed: chunks taken from the old path");
        // Under another class (a rotated `app.log` → `app.log.1`) the
        // chunks are still these: the cuts are this class's (checked
        // above), and a full read would find each one known by its tag.
        let fc = FileChunks {
            class: class.to_string(),
            ..g.fc
        };
        let now = (self.config().clock)();
        let shared = self.policy.shared(path);
        self.store
            .record_with_deltas(ChangeBody::File(fv), Some((meta, fc)), &[], Some(&w), now, shared)?;
        match old {
            Some(_) => rep.files_changed += 1,
            None => rep.files_new += 1,
        }
        rep.files_renamed += 1;
        rep.changes_recorded += 1;
        Ok(true)
    }

    fn scan_file(
        &mut self,
        path: &str,
        entry: &DirEntry,
        old: Option<FileMeta>,
        rep: &mut ScanReport,
        vac: &mut Vacated,
    ) -> Result<()> {
        let fs_path = entry.path();
        let stat_wall_ns = i64::try_from((self.config().clock)())
            .unwrap_or(i64::MAX)
            .saturating_mul(1_000_000);
        let md = entry.metadata().map_err(|e| {
            Error::io(
                fs_path,
                e.into_io_error().unwrap_or_else(|| std::io::Error::other("stat")),
            )
        })?;
        let st = Stat::of(&md);
        if let Some(o) = &old {
            if !o.dirty && !o.racy && st.same_as(o) {
                // Recorded by an agent before 2026-12-07: the device and
                // birth time are added once (batched), so a later rename of
                // this file is recognised.
                if o.dev != Some(st.dev) || (o.btime_ns.is_none() && st.btime.is_some()) {
                    let m = FileMeta {
                        dev: Some(st.dev),
                        btime_ns: st.btime,
                        ..o.clone()
                    };
                    vac.backfill.push((path.to_string(), m));
                    if vac.backfill.len() >= BACKFILL_BATCH {
                        self.store.update_file_metas(&std::mem::take(&mut vac.backfill))?;
                    }
                }
                rep.files_unchanged += 1;
                return Ok(());
            }
        }
        let ci = self.policy.class_idx(path);
        let (class, level, append_class, sqlite_class, page_deltas) = match self.policy.classes.get(ci) {
            Some(c) => (
                c.name.clone(),
                c.zstd_level,
                c.append,
                c.sqlite_pages,
                c.sqlite_pages && c.page_deltas,
            ),
            None => return Err(Error::Config("no policy class".into())),
        };
        let class = class.as_str();
        // A symbolic link is archived as itself: its content is the target path.
        let is_link = entry.file_type().is_symlink();
        // Another inode than the one tracked here (or none tracked): the
        // tracked version is a rename candidate, and this may be a rename.
        if !is_link
            && old
                .as_ref()
                .is_none_or(|o| o.inode != st.inode || o.dev.is_some_and(|d| d != st.dev))
        {
            if let Some(o) = old.clone() {
                if let Some((dev, g)) = self.vacate(path, o, vac)? {
                    vac.put(dev, g);
                }
            }
            let what = (ci, class, page_deltas);
            if self.adopt(path, fs_path, &st, old.as_ref(), what, stat_wall_ns, rep, vac)? {
                return Ok(());
            }
        }
        let mut file = if is_link {
            let target = fs::read_link(fs_path).map_err(|e| Error::io(fs_path, e))?;
            Src::Mem(std::io::Cursor::new(target.into_os_string().into_vec()))
        } else {
            Src::File(File::open(fs_path).map_err(|e| Error::io(fs_path, e))?)
        };
        let mut start = 0u64;
        let mut chunks: Vec<StoredChunk> = Vec::new();
        let mut sha = ResumableSha256::new();
        let mut bytes_read = 0u64;

        // The file grew in place: its last chunk may be the base of an
        // extension (below), and with an append class the fast path may skip
        // to it.
        let grew = old
            .as_ref()
            .is_some_and(|o| !is_link && !o.dirty && o.inode == st.inode && st.size > o.size);
        let old_fc = match grew {
            true => self.store.file_chunks(path)?.filter(|fc| fc.class == class),
            false => None,
        };
        let known = self.store.known_reader()?;
        // The old last chunk, as an extension base: only when the server
        // holds the version that sent it (so the base is stored wherever
        // this chunk goes) and its chain is not already at the depth bound.
        let mut tail: Option<(u64, StoredChunk, u8)> = None;
        if let (Some(o), Some(fc)) = (&old, &old_fc) {
            if let Some((last, before)) = fc.chunks.split_last() {
                if self.store.regional().contains(&self.store.replica(), o.seq) {
                    let depth = known
                        .get(&last.tag)?
                        .filter(|k| k.id == last.id)
                        .map(|k| k.base.map_or(0, |b| b.depth));
                    let start: u64 = before.iter().map(|c| u64::from(c.len)).sum();
                    match depth {
                        Some(d) if d < MAX_DEPTH => tail = Some((start, *last, d + 1)),
                        Some(_) => {
                            // At the depth bound: extend the link half way
                            // down the chain instead, which costs the last
                            // few appends, not the whole chunk again.
                            self.read_buf.resize(last.len as usize, 0);
                            file.seek(SeekFrom::Start(start))
                                .and_then(|_| file.read_exact(&mut self.read_buf))
                                .map_err(|e| Error::io(fs_path, e))?;
                            bytes_read += u64::from(last.len);
                            if let Some((link, d)) = chain_link(&self.sealer, &known, &self.read_buf, *last)? {
                                tail = Some((start, link, d + 1));
                            }
                        }
                        None => {}
                    }
                }
            }
        }

        // Append fast path: the file grew and its last stable chunk is unchanged.
        if append_class {
            if let Some(fc) = &old_fc {
                let n = fc.chunks.len();
                if n >= 2 {
                    let last_start: u64 = fc.chunks[..n - 1].iter().map(|c| u64::from(c.len)).sum();
                    let stable = fc.chunks[n - 2];
                    let stable_start = last_start - u64::from(stable.len);
                    self.read_buf.resize(stable.len as usize, 0);
                    file.seek(SeekFrom::Start(stable_start))
                        .and_then(|_| file.read_exact(&mut self.read_buf))
                        .map_err(|e| Error::io(fs_path, e))?;
                    bytes_read += u64::from(stable.len);
                    let saved = ResumableSha256::from_bytes(&fc.sha_before_last).ok();
                    if let Some(s) = saved.filter(|s| s.len() == last_start) {
                        if self.sealer.index_tag(&self.read_buf) == stable.tag {
                            start = last_start;
                            chunks = fc.chunks[..n - 1].to_vec();
                            sha = s;
                            rep.append_fast_path += 1;
                        }
                    }
                }
            }
        }
        file.seek(SeekFrom::Start(start)).map_err(|e| Error::io(fs_path, e))?;

        // Same size as the last version (touched, or edited in place): while
        // its chunks are that version's (index tag and length), the
        // whole-file SHA-256 is not computed; if all are, it is resumed from
        // the saved state before the last chunk. At the first chunk that
        // differs, the bytes before it are read again (through a duplicate of
        // this descriptor, so the same file) and hashed. A write during the
        // scan is caught by the stat check after the read, as for any read.
        let mut same: Option<(FileChunks, File, ResumableSha256)> = None;
        let (cuts, max_chunk) = match self.chunkers.get(ci) {
            Some(c) => (c.fingerprint(), c.max_chunk()),
            None => return Err(Error::Config("no chunker for the policy class".into())),
        };
        if let (Some(o), Src::File(f)) = (&old, &file) {
            if start == 0 && !o.dirty && o.size == st.size && o.inode == st.inode {
                if let Some(fc) = self.store.file_chunks(path)?.filter(|fc| fc.class == class) {
                    if let Some(saved) = resume_state(&fc, st.size, max_chunk) {
                        same = Some((fc, f.try_clone().map_err(|e| Error::io(fs_path, e))?, saved));
                    }
                }
            }
        }
        let (mut reread, mut same_hit, mut torn) = (0u64, false, false);

        // Page deltas: whole-file reads of page-chunked files only (decided
        // at the first chunk, which holds the SQLite header).
        let mut pages = match page_deltas && !is_link && start == 0 && st.size <= MAX_DELTA_FILE {
            true => Some(PageDeltas {
                basis: self.store.basis_reader(path)?,
                cloud: self.store.cloud().clone(),
                device: self.store.device().clone(),
                on: None,
                w: DeltaWrites {
                    basis_end: st.size,
                    ..DeltaWrites::default()
                },
                zc: None,
            }),
            false => None,
        };
        let mut new_known: Vec<(Hash32, KnownChunk)> = Vec::new();
        let mut local: HashMap<Hash32, Hash32> = HashMap::new();
        let mut sha_before_last = sha.clone();
        let (mut n_new, mut n_known, mut n_ext, mut n_delta) = (0u64, 0u64, 0u64, 0u64);
        let mut off = start;
        // The old version's cut points, to check before chunking: while its
        // chunks are unchanged, FastCDC would cut exactly there (a cut
        // depends only on the bytes since the previous cut), so it is run
        // only from the first chunk that differs. Only if this chunking cut
        // them (an older geometry or other sizes record another `cuts`).
        let plan: Vec<StoredChunk> = match &same {
            Some((fc, _, _)) if fc.cuts == Some(cuts) => fc.chunks.clone(),
            _ => Vec::new(),
        };
        let Agent {
            chunkers,
            sealer,
            seal_buf,
            read_buf,
            ..
        } = self;
        let chunker = chunkers
            .get_mut(ci)
            .ok_or_else(|| Error::Config("no chunker for the policy class".into()))?;
        let cipher = sealer.cipher() as u8;
        let tagger = sealer.tagger();
        let mut on_chunk = |plain: &[u8], tag: Hash32| -> Result<()> {
            let at = off;
            off += plain.len() as u64;
            match same
                .as_ref()
                .map(|(fc, f, saved)| (fc, f, saved, fc.chunks.get(chunks.len())))
            {
                Some((fc, _, saved, Some(c))) if c.tag == tag && c.len as usize == plain.len() => {
                    if chunks.len() + 1 == fc.chunks.len() {
                        // Every chunk is the old version's: so is the hash.
                        sha_before_last = saved.clone();
                        sha = sha_before_last.clone();
                        sha.update(plain);
                        same = None;
                        same_hit = true;
                    }
                }
                Some((_, f, _, _)) => {
                    torn |= !hash_prefix(f, &chunks, &tagger, &mut sha, fs_path)?;
                    reread += at;
                    same = None;
                    sha_before_last = sha.clone();
                    sha.update(plain);
                }
                None => {
                    sha_before_last = sha.clone();
                    sha.update(plain);
                }
            }
            if let Some(p) = pages.as_mut().filter(|p| p.on.is_none()) {
                p.on = Some(
                    at == 0 && crate::chunker::sqlite_page_size(plain).is_some_and(|n| plain.len().is_multiple_of(n)),
                );
                // Slots shorter than a group but not this first chunk's
                // length: an older agent's geometry (one chunk per page).
                if p.on == Some(true) {
                    let s = p.basis.get(0)?;
                    p.w.regroup = [&s.anchor, &s.cand, &s.root]
                        .into_iter()
                        .flatten()
                        .any(|b| (b.len as usize) < crate::chunker::PAGE_GROUP && b.len as usize != plain.len());
                }
            }
            // A known delta chunk is reused only while its sealed bytes are
            // kept or the cloud holds it as this page's anchor: otherwise a
            // server that asks for it could not be given it. Else it is
            // sealed again, against the anchor.
            let hit = match (known.get(&tag)?, pages.as_ref().filter(|p| p.on == Some(true))) {
                (Some(k), Some(p)) if k.base.is_some_and(|b| b.delta) => {
                    let anchored = || {
                        p.current(at)
                            .ok()
                            .and_then(|s| s.anchor)
                            .is_some_and(|a| a.id == k.id && p.acked(&a))
                    };
                    (p.basis.has_sealed(&k.id)? || anchored()).then_some(k)
                }
                (k, _) => k,
            };
            let pd = pages.as_mut().filter(|p| p.on == Some(true));
            let id = if let Some(id) = local.get(&tag) {
                n_known += 1;
                *id
            } else if let Some(k) = hit {
                n_known += 1;
                if let Some(p) = pd {
                    if k.base.is_some_and(|b| b.delta) {
                        p.w.keep_sealed.push(k.id);
                    }
                    p.page(at, plain, k.id, k.base.map_or(0, |b| b.depth), None)?;
                }
                k.id
            } else {
                let (id, base) = match pd.and_then(|p| p.anchor(at).map(|a| (p, a))) {
                    Some((p, anchor)) => {
                        // A changed page: sealed against its last cloud-durable version.
                        // Bounded by the largest page group: the length is disk input.
                        let base_plain = zstd::bulk::decompress(&anchor.zplain, (anchor.len as usize).min(MAX_PAGE))
                            .ok()
                            .filter(|b| !b.is_empty() && b.len() == anchor.len as usize);
                        let base = BaseRef {
                            id: anchor.id,
                            len: anchor.len,
                            depth: anchor.depth + 1,
                            delta: true,
                        };
                        let mut id = match &base_plain {
                            Some(b) => sealer.seal_delta(plain, level, base, b, seal_buf)?,
                            None => sealer.seal(plain, level, seal_buf)?,
                        };
                        let mut base = base_plain.map(|_| base);
                        // Against a full version (the page's first change, or its
                        // chain's root once the anchor is at the depth bound: then
                        // the delta holds every edit since) the whole page may be
                        // smaller.
                        if base.is_some() && anchor.depth == 0 {
                            let mut full = Vec::new();
                            let full_id = sealer.seal(plain, level, &mut full)?;
                            if full.len() <= seal_buf.len() {
                                (id, base) = (full_id, None);
                                *seal_buf = full;
                            }
                        }
                        if base.is_some() {
                            p.w.sealed.push((id, seal_buf.clone()));
                        }
                        (id, base)
                    }
                    None => {
                        // The old tail grown in place: store only what was appended.
                        let base = match tail {
                            Some((s, l, depth))
                                if s == at
                                    && plain.len() > l.len as usize
                                    && sealer.index_tag(&plain[..l.len as usize]) == l.tag =>
                            {
                                Some(BaseRef {
                                    id: l.id,
                                    len: l.len,
                                    depth,
                                    delta: false,
                                })
                            }
                            _ => None,
                        };
                        (sealer.seal_with_base(plain, level, base, seal_buf)?, base)
                    }
                };
                if let Some(p) = pages.as_mut().filter(|p| p.on == Some(true)) {
                    // Every seal above was of `plain`: its frame, if the
                    // last one compressed it alone, is a copy of this page.
                    // Guarded by the frame's declared size, so a frame of
                    // other bytes can never become this page's copy.
                    let frame = sealer.last_frame().filter(|f| {
                        zstd::zstd_safe::get_frame_content_size(f).ok().flatten() == Some(plain.len() as u64)
                    });
                    p.page(at, plain, id, base.map_or(0, |b| b.depth), frame)?;
                }
                new_known.push((
                    tag,
                    KnownChunk {
                        id,
                        level,
                        cipher,
                        base,
                    },
                ));
                local.insert(tag, id);
                n_new += 1;
                n_delta += u64::from(base.is_some_and(|b| b.delta));
                n_ext += u64::from(base.is_some_and(|b| !b.delta));
                id
            };
            chunks.push(StoredChunk {
                id,
                len: plain.len() as u32,
                tag,
            });
            Ok(())
        };
        let (mut predicted, mut page_mode) = (0u64, None);
        // The append fast path starts mid-file: whether the file is cut into
        // page groups is decided from its first bytes, read apart.
        if let (true, true, Src::File(f)) = (start > 0, sqlite_class, &file) {
            use std::os::unix::fs::FileExt;
            let mut head = [0u8; 100];
            let n = f.read_at(&mut head, 0).map_err(|e| Error::io(fs_path, e))?;
            page_mode = Some(chunker.pages_for(&head[..n]));
        }
        for c in &plan {
            read_buf.resize(c.len as usize, 0);
            // A short or failed read: the chunker below reads from here
            // again and reports it.
            if file.read_exact(read_buf).is_err() {
                break;
            }
            let tag = tagger.tag(read_buf);
            if tag != c.tag {
                break;
            }
            if predicted == 0 {
                page_mode = Some(chunker.pages_for(read_buf));
            }
            on_chunk(read_buf, tag)?;
            predicted += u64::from(c.len);
        }
        if !plan.is_empty() {
            file.seek(SeekFrom::Start(start + predicted))
                .map_err(|e| Error::io(fs_path, e))?;
        }
        let read = predicted
            + chunker.run_from(&mut file, fs_path, page_mode, |plain| {
                on_chunk(plain, tagger.tag(plain))
            })?;
        drop(known);
        // Still deferring: fewer bytes than the old version were read (the
        // file shrank meanwhile), so the hash is incomplete; the stat check
        // below skips this version.
        let hashed_all = same.is_none() && !torn && sha.len() == start + read;
        bytes_read += read + reread;
        rep.bytes_read += bytes_read;
        rep.bytes_chunked += read;
        let c = &mut self.store.counters;
        c.bytes_read += bytes_read;
        c.bytes_chunked += read;

        // Changed while we read it? Then this version is not coherent: skip,
        // the next scan sees the new stat and tries again.
        let after = fs::symlink_metadata(fs_path).map(|m| Stat::of(&m)).ok();
        if after != Some(st) || start + read != st.size || !hashed_all {
            tracing::debug!(path, "changed while being read; retrying next scan");
            self.store.counters.changed_during_read += 1;
            rep.files_skipped += 1;
            return Ok(());
        }
        rep.same_content_fast_path += u64::from(same_hit);
        rep.bytes_same_cuts += predicted;
        let c = &mut self.store.counters;
        c.chunks_new += n_new;
        c.chunks_extension += n_ext;
        c.chunks_delta += n_delta;
        rep.chunks_delta += n_delta;
        c.chunks_skipped_known += n_known;
        rep.chunks_new += n_new;
        rep.chunks_extension += n_ext;
        rep.chunks_known += n_known;
        let fv = FileVersion {
            path: path.to_string(),
            size: st.size,
            mtime_ns: st.mtime_ns,
            class: class.to_string(),
            chunks: chunks.iter().map(|c| ChunkRef { id: c.id, len: c.len }).collect(),
            sha256: sha.finish(),
            mode: if is_link {
                protocol::manifest::MODE_LINK | st.mode
            } else {
                st.mode
            },
        };
        let mut meta = st.meta(stat_wall_ns);
        // Re-read only because the last stat was not trustworthy, and the
        // content and metadata are what was recorded: no new version.
        if let Some(o) = old
            .as_ref()
            .filter(|o| !o.dirty && o.size == st.size && o.mtime_ns == st.mtime_ns)
        {
            let same = o.mode == st.mode
                && self.store.file_chunks(path)?.is_some_and(|fc| {
                    fc.class == class
                        && fc.chunks.len() == chunks.len()
                        && fc
                            .chunks
                            .iter()
                            .zip(&chunks)
                            .all(|(a, b)| a.id == b.id && a.len == b.len)
                });
            if same {
                meta.seq = o.seq;
                self.store.update_file_meta(path, &meta)?;
                rep.files_unchanged += 1;
                return Ok(());
            }
        }
        if old.is_some() {
            rep.files_changed += 1;
        } else {
            rep.files_new += 1;
        }
        let fc = FileChunks {
            chunks,
            sha_before_last: if fv.chunks.is_empty() {
                Vec::new()
            } else {
                sha_before_last.to_bytes()
            },
            class: class.to_string(),
            // The append fast path kept the old version's first chunks:
            // they were cut by this chunking only if that version says so.
            cuts: match start {
                0 => Some(cuts),
                _ => old_fc.as_ref().and_then(|fc| fc.cuts).filter(|c| *c == cuts),
            },
        };
        let now = (self.config().clock)();
        let shared = self.policy.shared(path);
        let deltas = pages.filter(|p| p.on == Some(true)).map(|p| p.w);
        self.store.record_with_deltas(
            ChangeBody::File(fv),
            Some((meta, fc)),
            &new_known,
            deltas.as_ref(),
            now,
            shared,
        )?;
        rep.changes_recorded += 1;
        Ok(())
    }
}

/// The SHA-256 state saved before `fc`'s last chunk, if `fc` can stand for
/// a file of `size` bytes: chunks present, each at most `max_chunk` (they
/// are read into memory) and adding up to `size`, and the state covering
/// all but the last. State-file input, so checked before any use.
fn resume_state(fc: &FileChunks, size: u64, max_chunk: usize) -> Option<ResumableSha256> {
    let (_, before) = fc.chunks.split_last()?;
    let sane = fc.chunks.iter().all(|c| c.len > 0 && c.len as usize <= max_chunk)
        && fc.chunks.iter().map(|c| u64::from(c.len)).sum::<u64>() == size;
    let last_start: u64 = before.iter().map(|c| u64::from(c.len)).sum();
    ResumableSha256::from_bytes(&fc.sha_before_last)
        .ok()
        .filter(|s| sane && s.len() == last_start)
}

/// Hashes the bytes of `f` that `prefix` (the chunks read so far, from
/// offset 0) covers into `sha` (a fresh state), read again with `pread` so
/// the descriptor's offset (the chunker's) stays put. False if a chunk
/// read now is not the one read before (its tag differs): the file
/// changed in between, and the hash would not be of the chunks recorded.
fn hash_prefix(
    f: &File,
    prefix: &[StoredChunk],
    tagger: &protocol::seal::Tagger,
    sha: &mut ResumableSha256,
    path: &Path,
) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    let mut buf = Vec::new();
    let mut at = 0u64;
    for c in prefix {
        // Lengths were bounded when the chunks were cut (at most a chunk).
        buf.resize(c.len as usize, 0);
        f.read_exact_at(&mut buf, at).map_err(|e| Error::io(path, e))?;
        if tagger.tag(&buf) != c.tag {
            return Ok(false);
        }
        sha.update(&buf);
        at += u64::from(c.len);
    }
    Ok(true)
}

/// The link of an extension chain at depth `MAX_DEPTH / 2` or less (and
/// its depth), if every link down to it is in the known table: each link's
/// base is a prefix of `bytes` (the old tail's plaintext), found by its
/// length and index tag. Extending it restarts the chain half way, so an
/// append at the bound costs the appends since that link: a few, bounded,
/// where the chain's full first chunk would cost every append since it.
fn chain_link(
    sealer: &protocol::seal::Sealer,
    known: &crate::store::KnownReader,
    bytes: &[u8],
    last: StoredChunk,
) -> Result<Option<(StoredChunk, u8)>> {
    let mut cur = last;
    for _ in 0..=MAX_DEPTH {
        let Some(k) = known.get(&cur.tag)?.filter(|k| k.id == cur.id) else {
            return Ok(None);
        };
        let depth = k.base.map_or(0, |b| b.depth);
        let Some(b) = k.base.filter(|_| depth > MAX_DEPTH / 2) else {
            return Ok(Some((cur, depth)));
        };
        let Some(part) = bytes.get(..b.len as usize).filter(|_| !b.delta) else {
            return Ok(None);
        };
        cur = StoredChunk {
            id: b.id,
            len: b.len,
            tag: sealer.index_tag(part),
        };
    }
    Ok(None)
}

/// Page-delta state of one file scan. A "page" here is one chunk of a
/// page-chunked file: [`crate::chunker::PAGE_GROUP`] bytes of whole pages.
struct PageDeltas {
    basis: crate::store::BasisReader,
    /// Bases must be cloud-durable, not only regional: if a region lost a
    /// base, the page it held may be gone from the file, so the agent could
    /// not send it again, and every delta on it would be unreadable.
    cloud: Knowledge,
    device: protocol::DeviceRef,
    /// Whether the file is page-chunked: decided at its first chunk.
    on: Option<bool>,
    w: DeltaWrites,
    /// For the basis copies; made at the first page and reused (a zstd
    /// context per page cost a fifth of a new SQLite file's scan).
    zc: Option<zstd::bulk::Compressor<'static>>,
}

impl PageDeltas {
    fn acked(&self, p: &BasisPage) -> bool {
        let r = ReplicaId {
            device: self.device.clone(),
            epoch: p.epoch,
        };
        self.cloud.contains(&r, p.seq)
    }

    /// The slot at `at` as of now: its candidate becomes the anchor once
    /// the cloud holds the change that recorded it.
    fn current(&self, at: u64) -> Result<BasisSlot> {
        let mut slot = self.basis.get(at)?;
        if slot.cand.as_ref().is_some_and(|c| self.acked(c)) {
            let old = std::mem::replace(&mut slot.anchor, slot.cand.take());
            // Keep the chain's full first version while the anchor is a delta.
            match &slot.anchor {
                Some(a) if a.depth > 0 => {
                    if let Some(o) = old.filter(|o| o.depth == 0) {
                        slot.root = Some(o);
                    }
                }
                _ => slot.root = None,
            }
        }
        Ok(slot)
    }

    /// The base for a changed page at `at`: the anchor, which the cloud
    /// holds, unless its chain is at the depth bound; then the chain's full
    /// first version (a delta against it costs every edit since, still less
    /// than the whole page).
    fn anchor(&self, at: u64) -> Option<BasisPage> {
        let slot = self.current(at).ok()?;
        match slot.anchor.filter(|a| self.acked(a)) {
            Some(a) if a.depth < MAX_DEPTH => Some(a),
            Some(_) => slot.root.filter(|r| r.depth == 0 && self.acked(r)),
            None => None,
        }
    }

    /// Records that the page at `at` is now chunk `id` (plaintext `plain`,
    /// depth `depth`): a new candidate, unless it already is one. `frame`,
    /// if given, is a zstd frame of `plain` to keep as its copy (the one
    /// sealing just made, [`protocol::seal::Sealer::last_frame`]).
    fn page(&mut self, at: u64, plain: &[u8], id: Hash32, depth: u8, frame: Option<&[u8]>) -> Result<()> {
        let mut slot = self.current(at)?;
        if slot.cand.as_ref().is_some_and(|c| c.id == id) {
            return Ok(());
        }
        if slot.anchor.as_ref().is_some_and(|a| a.id == id) {
            if slot.cand.is_none() {
                return Ok(());
            }
            slot.cand = None;
        } else {
            let zplain = match frame {
                Some(f) => f.to_vec(),
                None => {
                    let zerr = |e: std::io::Error| Error::Config(format!("zstd: {e}"));
                    let zc = match &mut self.zc {
                        Some(z) => z,
                        None => self.zc.insert(zstd::bulk::Compressor::new(BASIS_LEVEL).map_err(zerr)?),
                    };
                    zc.compress(plain).map_err(zerr)?
                }
            };
            slot.cand = Some(BasisPage {
                id,
                len: plain.len() as u32,
                depth,
                epoch: 0,
                seq: 0,
                zplain,
            });
        }
        self.w.basis.push((at, slot));
        Ok(())
    }
}
