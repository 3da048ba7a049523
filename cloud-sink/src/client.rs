//! HTTP client of the sink API, used by the CLI, by restore and by `sim`.
//! Every response body is read with a size bound, so a misbehaving sink
//! cannot make the client hold unbounded memory.

use crate::catalog::{DeviceInfo, FileEntry, FileQuery};
use crate::{Error, Result};
use protocol::pack::MAX_CHUNK;
use protocol::{Change, Hash32, Message};

/// Upper bound on a listing or restore-set response.
pub const MAX_LISTING: usize = 1 << 30;

#[derive(Clone)]
pub struct SinkClient {
    base: String,
    http: reqwest::Client,
    peer: Option<String>,
}

impl SinkClient {
    /// `base` is `http://host:port` (a trailing `/` or `/v1` is accepted).
    pub fn new(base: &str) -> Result<SinkClient> {
        let base = base.trim_end_matches('/').trim_end_matches("/v1").to_string();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            return Err(Error::BadRequest(format!("sink URL {base:?} must start with http://")));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()?;
        Ok(SinkClient { base, http, peer: None })
    }

    /// Names this client in sync requests (`x-ferry-peer`), for aggregators
    /// that share an IP address.
    pub fn with_peer_name(mut self, name: &str) -> SinkClient {
        self.peer = Some(name.to_string());
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/{path}", self.base)
    }

    pub async fn health(&self) -> Result<()> {
        self.send(self.http.get(self.url("health")), 1024).await.map(|_| ())
    }

    pub async fn files(&self, q: &FileQuery) -> Result<Vec<FileEntry>> {
        let b = self
            .send(self.http.get(self.url("files")).query(q), MAX_LISTING)
            .await?;
        serde_json::from_slice(&b).map_err(|e| Error::BadRequest(format!("bad /v1/files answer: {e}")))
    }

    pub async fn devices(&self) -> Result<Vec<DeviceInfo>> {
        let b = self.send(self.http.get(self.url("devices")), MAX_LISTING).await?;
        serde_json::from_slice(&b).map_err(|e| Error::BadRequest(format!("bad /v1/devices answer: {e}")))
    }

    /// Fleet health, one row per device (`/v1/fleet`).
    pub async fn fleet(&self) -> Result<Vec<crate::fleet::FleetRow>> {
        let b = self.send(self.http.get(self.url("fleet")), MAX_LISTING).await?;
        serde_json::from_slice(&b).map_err(|e| Error::BadRequest(format!("bad /v1/fleet answer: {e}")))
    }

    /// `POST /v1/presence` (what aggregators send; for tests and tools).
    pub async fn post_presence(&self, updates: &[crate::fleet::PresenceUpdate]) -> Result<crate::fleet::PresenceAck> {
        let body = serde_json::to_vec(updates).map_err(|e| Error::BadRequest(format!("encoding presence: {e}")))?;
        let req = self
            .http
            .post(self.url("presence"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        let b = self.send(req, 64 << 10).await?;
        serde_json::from_slice(&b).map_err(|e| Error::BadRequest(format!("bad /v1/presence answer: {e}")))
    }

    /// The signed changes to restore (`/v1/restore`). Not verified here.
    pub async fn restore(&self, q: &FileQuery) -> Result<Vec<Change>> {
        let b = self
            .send(self.http.get(self.url("restore")).query(q), MAX_LISTING)
            .await?;
        Ok(protocol::from_cbor(&b, MAX_LISTING)?)
    }

    /// Server changes for one device after `after` (`GET /v1/changes`).
    pub async fn changes(&self, d: &protocol::DeviceRef, after: u64) -> Result<protocol::msg::Changes> {
        let q = [
            ("tenant", d.tenant.to_string()),
            ("site", d.site.to_string()),
            ("device", d.device.to_string()),
            ("after", after.to_string()),
        ];
        let b = self
            .send(self.http.get(self.url("changes")).query(&q), protocol::msg::MAX_MESSAGE)
            .await?;
        Ok(protocol::from_cbor(&b, protocol::msg::MAX_MESSAGE)?)
    }

    /// Server changes of the whole fleet after `after`, one page
    /// (`GET /v1/changes?after&limit`; the sink's default page if `limit` is None).
    pub async fn fleet_changes(&self, after: u64, limit: Option<usize>) -> Result<protocol::meta::FleetChanges> {
        let mut q = vec![("after", after.to_string())];
        if let Some(l) = limit {
            q.push(("limit", l.to_string()));
        }
        let b = self
            .send(self.http.get(self.url("changes")).query(&q), MAX_LISTING)
            .await?;
        Ok(protocol::from_cbor(&b, MAX_LISTING)?)
    }

    /// One operator op (`POST /v1/meta`); answers the target's new state.
    pub async fn meta_op(&self, op: &crate::changes::MetaOpRequest) -> Result<crate::changes::MetaView> {
        let body = serde_json::to_vec(op).map_err(|e| Error::BadRequest(format!("encoding op: {e}")))?;
        let req = self
            .http
            .post(self.url("meta"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        let b = self.send(req, 1 << 20).await?;
        serde_json::from_slice(&b).map_err(|e| Error::BadRequest(format!("bad /v1/meta answer: {e}")))
    }

    /// Metadata states (`GET /v1/meta`).
    pub async fn meta(&self, q: &crate::changes::MetaQuery) -> Result<Vec<crate::changes::MetaView>> {
        let b = self.send(self.http.get(self.url("meta")).query(q), MAX_LISTING).await?;
        serde_json::from_slice(&b).map_err(|e| Error::BadRequest(format!("bad /v1/meta answer: {e}")))
    }

    /// Conflicts on shared paths (`GET /v1/conflicts`).
    pub async fn conflicts(&self, q: &crate::shared::ConflictQuery) -> Result<Vec<crate::shared::ConflictInfo>> {
        let b = self
            .send(self.http.get(self.url("conflicts")).query(q), MAX_LISTING)
            .await?;
        serde_json::from_slice(&b).map_err(|e| Error::BadRequest(format!("bad /v1/conflicts answer: {e}")))
    }

    /// Each device's latest version of every shared path of a site
    /// (`GET /v1/shared`). Not verified here.
    pub async fn shared(&self, q: &crate::shared::SharedQuery) -> Result<Vec<Change>> {
        let b = self
            .send(self.http.get(self.url("shared")).query(q), MAX_LISTING)
            .await?;
        Ok(protocol::from_cbor(&b, MAX_LISTING)?)
    }

    /// Stored bytes of a chunk, checked against its id.
    pub async fn chunk(&self, id: &Hash32) -> Result<Vec<u8>> {
        let b = self.chunk_unverified(id).await?;
        verify_chunk(id, &b)?;
        Ok(b)
    }

    /// Stored bytes of a chunk, NOT yet checked against its id (at most
    /// `MAX_CHUNK` bytes). For restore, which runs [`verify_chunk`] on a
    /// worker thread before using the bytes; anything else uses [`Self::chunk`].
    pub(crate) async fn chunk_unverified(&self, id: &Hash32) -> Result<Vec<u8>> {
        self.send(self.http.get(self.url(&format!("chunks/{id}"))), MAX_CHUNK)
            .await
    }

    /// Stored bytes of many chunks in one request (`POST /v1/chunks`), in
    /// the order asked, NOT yet checked against their ids; `limit` bounds
    /// the answer. `None` if the sink has no such endpoint (an older sink,
    /// or one of its ids is unknown: ask one at a time for the details).
    pub(crate) async fn chunks_unverified(&self, ids: &[Hash32], limit: usize) -> Result<Option<Vec<Vec<u8>>>> {
        let body: Vec<u8> = ids.iter().flat_map(|id| id.0).collect();
        let req = self
            .http
            .post(self.url("chunks"))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
        let b = match self.send(req, limit.saturating_add(4 * ids.len())).await {
            Ok(b) => b,
            Err(Error::Status { status: 404 | 405, .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        split_batch(&b, ids.len()).map(Some)
    }

    /// Uploads a pack (`PUT /v1/packs/{id}`).
    pub async fn put_pack(&self, id: &Hash32, bytes: Vec<u8>) -> Result<()> {
        let req = self.http.put(self.url(&format!("packs/{id}"))).body(bytes);
        self.send(req, 1024).await.map(|_| ())
    }

    /// One sync round trip; `None` for an empty (204) answer.
    pub async fn sync(&self, msg: &Message) -> Result<Option<Message>> {
        let mut req = self
            .http
            .post(self.url("sync"))
            .header(reqwest::header::CONTENT_TYPE, "application/cbor")
            .body(msg.encode()?);
        if let Some(p) = &self.peer {
            req = req.header(crate::http::PEER_HEADER, p);
        }
        let b = self.send(req, protocol::msg::MAX_MESSAGE).await?;
        if b.is_empty() {
            return Ok(None);
        }
        Ok(Some(Message::decode(&b)?))
    }

    /// Sends a request; non-2xx becomes `Error::Status` with the body text.
    async fn send(&self, req: reqwest::RequestBuilder, limit: usize) -> Result<Vec<u8>> {
        let mut resp = req.send().await?;
        let status = resp.status();
        let body = read_limited(&mut resp, if status.is_success() { limit } else { 64 << 10 }).await?;
        if !status.is_success() {
            return Err(Error::Status {
                status: status.as_u16(),
                reason: String::from_utf8_lossy(&body).trim().to_string(),
            });
        }
        Ok(body)
    }
}

/// Splits a `POST /v1/chunks` answer into `n` stored chunks: each a u32 BE
/// length (at most `MAX_CHUNK`) and that many bytes, nothing after.
fn split_batch(mut b: &[u8], n: usize) -> Result<Vec<Vec<u8>>> {
    let bad = |why: &str| Error::BadRequest(format!("bad /v1/chunks answer: {why}"));
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (len, rest) = b.split_first_chunk::<4>().ok_or_else(|| bad("truncated"))?;
        let len = u32::from_be_bytes(*len) as usize;
        if len > protocol::pack::MAX_CHUNK {
            return Err(bad("chunk over the size limit"));
        }
        let (item, rest) = rest.split_at_checked(len).ok_or_else(|| bad("truncated"))?;
        out.push(item.to_vec());
        b = rest;
    }
    if !b.is_empty() {
        return Err(bad("bytes after the last chunk"));
    }
    Ok(out)
}

/// Checks stored chunk bytes against the chunk id, SHA-256(stored).
pub fn verify_chunk(id: &Hash32, stored: &[u8]) -> Result<()> {
    if Hash32::of(stored) != *id {
        return Err(Error::Verify(format!("chunk {id}: stored bytes do not hash to its id")));
    }
    Ok(())
}

/// Largest body capacity reserved up front from a Content-Length header;
/// bigger bodies grow as they arrive.
const MAX_RESERVE: u64 = 16 << 20;

async fn read_limited(resp: &mut reqwest::Response, limit: usize) -> Result<Vec<u8>> {
    let declared = resp.content_length();
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Error::BadRequest(format!("sink answer larger than {limit} bytes")));
    }
    // Reserve what the header declares (already bounded by `limit`, and by
    // MAX_RESERVE): one allocation and no regrowth copies for a chunk body.
    let mut out = Vec::with_capacity(declared.unwrap_or(0).min(MAX_RESERVE) as usize);
    while let Some(c) = resp.chunk().await? {
        if out.len() + c.len() > limit {
            return Err(Error::BadRequest(format!("sink answer larger than {limit} bytes")));
        }
        out.extend_from_slice(&c);
    }
    Ok(out)
}
