//! The cloud's object store in the simulation: `object_store`'s `InMemory`
//! behind a wrapper that fails writes while a sink fault is injected.
//!
//! [`FaultStore::fail_after`] lets the next `n` puts succeed and fails every
//! later one until [`FaultStore::heal`]: `n = 0` is an object store that is
//! down, `n > 0` a request that dies half-way (some objects written, the
//! catalog not updated), which the sink must survive by being idempotent.

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions,
    PutPayload, PutResult, Result,
};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct FaultStore {
    inner: InMemory,
    /// Puts that may still succeed; negative: no fault.
    budget: Arc<AtomicI64>,
}

impl std::fmt::Display for FaultStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FaultStore({})", self.inner)
    }
}

impl FaultStore {
    pub fn new() -> FaultStore {
        FaultStore {
            inner: InMemory::new(),
            budget: Arc::new(AtomicI64::new(-1)),
        }
    }
    /// The next `n` puts succeed, later ones fail (until `heal`).
    pub fn fail_after(&self, n: u32) {
        self.budget.store(i64::from(n), Ordering::Relaxed);
    }
    pub fn heal(&self) {
        self.budget.store(-1, Ordering::Relaxed);
    }
    fn check(&self, what: &str, location: &Path) -> Result<()> {
        let b = self.budget.load(Ordering::Relaxed);
        if b < 0 {
            return Ok(());
        }
        if b > 0 {
            self.budget.store(b - 1, Ordering::Relaxed);
            return Ok(());
        }
        Err(object_store::Error::Generic {
            store: "sim",
            source: format!("simulated object store fault on {what} {location}").into(),
        })
    }
}

#[async_trait]
impl ObjectStore for FaultStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        self.check("put", location)?;
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        self.check("put", location)?;
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }
    async fn delete(&self, location: &Path) -> Result<()> {
        self.check("delete", location)?;
        self.inner.delete(location).await
    }
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy(&self, from: &Path, to: &Path) -> Result<()> {
        self.check("copy", to)?;
        self.inner.copy(from, to).await
    }
    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> Result<()> {
        self.check("copy", to)?;
        self.inner.copy_if_not_exists(from, to).await
    }
}
