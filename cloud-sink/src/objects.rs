//! The object store and Ferry's object layout. `Objects` works over any
//! `object_store::ObjectStore`: the daemon's local directory
//! ([`Objects::open_local`]), memory ([`Objects::in_memory`], for tests and
//! the simulator) or a caller's store ([`Objects::with_store`], e.g. one that
//! injects errors). The local-directory backend does not fsync, so
//! `put_durable` syncs its files and their directories itself: an object
//! must be durable before the catalog may point at it. Other stores are
//! taken to be durable once `put` returns.

use crate::{Error, Result};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;
use object_store::{ObjectMeta, ObjectStore};
use protocol::{Hash32, ReplicaId};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Objects written concurrently by one `put_durable` call.
const PUT_CONCURRENCY: usize = 16;

#[derive(Clone)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    /// Set for the local-directory backend: its files are fsynced after writes.
    local: Option<Local>,
}

#[derive(Clone)]
struct Local {
    fs: Arc<LocalFileSystem>,
    /// Canonical local root: directories up to here are fsynced after writes.
    root: PathBuf,
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.local {
            Some(l) => write!(f, "Objects(local {})", l.root.display()),
            None => write!(f, "Objects({})", self.store),
        }
    }
}

pub fn pack_key(id: &Hash32) -> String {
    let h = id.to_hex();
    format!("packs/{}/{h}", &h[..2])
}

pub fn manifest_key(r: &ReplicaId, seq: u64) -> String {
    let d = &r.device;
    format!("manifests/{}/{}/{}/{}/{seq}", d.tenant, d.site, d.device, r.epoch)
}

impl Objects {
    /// Opens the local object directory, creating it if needed.
    pub fn open_local(dir: &Path) -> Result<Objects> {
        std::fs::create_dir_all(dir)?;
        let root = std::fs::canonicalize(dir)?;
        let fs = Arc::new(LocalFileSystem::new_with_prefix(&root)?);
        Ok(Objects {
            store: fs.clone(),
            local: Some(Local { fs, root }),
        })
    }

    /// An empty store in memory (`object_store::memory::InMemory`).
    pub fn in_memory() -> Objects {
        Objects::with_store(Arc::new(InMemory::new()))
    }

    /// Objects on any store. `put_durable` trusts the store: an object is
    /// taken to be durable once its `put` returned Ok.
    pub fn with_store(store: Arc<dyn ObjectStore>) -> Objects {
        Objects { store, local: None }
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Writes objects and returns once all of them are durable.
    pub async fn put_durable(&self, items: Vec<(String, Bytes)>) -> Result<()> {
        let Some(local) = &self.local else {
            return futures::stream::iter(items)
                .map(|(key, bytes)| async move {
                    self.store.put(&ObjPath::from(key.as_str()), bytes.into()).await?;
                    Ok::<_, Error>(())
                })
                .buffer_unordered(PUT_CONCURRENCY)
                .try_collect::<Vec<()>>()
                .await
                .map(|_| ());
        };
        let files: Vec<PathBuf> = futures::stream::iter(items)
            .map(|(key, bytes)| async move {
                let loc = ObjPath::from(key.as_str());
                local.fs.put(&loc, bytes.into()).await?;
                Ok::<_, Error>(local.fs.path_to_filesystem(&loc)?)
            })
            .buffer_unordered(PUT_CONCURRENCY)
            .try_collect()
            .await?;
        let root = local.root.clone();
        tokio::task::spawn_blocking(move || sync_all(&files, &root)).await?
    }

    pub async fn get(&self, key: &str) -> Result<Bytes> {
        Ok(self.store.get(&ObjPath::from(key)).await?.bytes().await?)
    }

    pub async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<Bytes> {
        Ok(self.store.get_range(&ObjPath::from(key), range).await?)
    }

    pub async fn exists(&self, key: &str) -> Result<bool> {
        match self.store.head(&ObjPath::from(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Every object under `prefix`, recursively.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        Ok(self.store.list(Some(&ObjPath::from(prefix))).try_collect().await?)
    }

    /// The immediate "directories" under `prefix`.
    pub async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>> {
        let r = self.store.list_with_delimiter(Some(&ObjPath::from(prefix))).await?;
        Ok(r.common_prefixes.iter().map(|p| p.to_string()).collect())
    }
}

/// fsyncs each file, then each directory between the files and `root` once.
fn sync_all(files: &[PathBuf], root: &Path) -> Result<()> {
    let mut dirs = BTreeSet::new();
    for f in files {
        std::fs::File::open(f)?.sync_all()?;
        let mut d = f.parent();
        while let Some(p) = d {
            if !p.starts_with(root) || !dirs.insert(p.to_path_buf()) {
                break;
            }
            d = p.parent();
        }
    }
    for d in dirs {
        std::fs::File::open(&d)?.sync_all()?;
    }
    Ok(())
}
