//! The HTTP API (docs/CONTRACTS.md): the sync protocol for aggregators and
//! queries, chunk reads and restore sets for the CLI.

use crate::catalog::{Catalog, FileQuery};
use crate::objects::{pack_key, Objects};
use crate::store::{SinkStore, CATALOG_FILE, OBJECTS_DIR};
use crate::{Error, Result};
use axum::body::Bytes;
use axum::extract::Request;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::middleware::{from_fn, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use protocol::msg::MAX_MESSAGE;
use protocol::pack::MAX_PACK;
use protocol::server::{Peer, Server, ServerConfig};
use protocol::{Hash32, Message};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::Mutex;

/// Header an aggregator may send to name itself. Pending batches are keyed by
/// (peer, batch id), so aggregators sharing an IP address need distinct names.
pub const PEER_HEADER: &str = "x-ferry-peer";

/// How long `serve` waits, after shutdown, for in-flight work to release the catalog.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Data directory: `catalog.redb` and `objects/`.
    pub data: PathBuf,
    pub server: ServerConfig,
}

impl ServeConfig {
    pub fn new(data: impl Into<PathBuf>) -> ServeConfig {
        ServeConfig {
            data: data.into(),
            server: ServerConfig::default(),
        }
    }
}

/// The protocol state machine and its store: one lock, so batches are
/// handled one at a time and the store sees a consistent sequence.
struct Sync {
    server: Server,
    store: SinkStore,
}

#[derive(Clone)]
struct AppState {
    sync: Arc<Mutex<Sync>>,
    catalog: Arc<Catalog>,
    objects: Objects,
    /// Operator ops one at a time: each observes the one before it.
    meta: Arc<Mutex<()>>,
}

/// Serves the API on `listener` until `shutdown` completes, then drains
/// open requests and returns (the catalog is closed when this returns).
pub async fn serve(
    cfg: ServeConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    std::fs::create_dir_all(&cfg.data)?;
    let path = cfg.data.join(CATALOG_FILE);
    let catalog = Arc::new(tokio::task::spawn_blocking(move || Catalog::open(&path)).await??);
    let objects = Objects::open_local(&cfg.data.join(OBJECTS_DIR))?;
    tracing::info!(data = %cfg.data.display(), "data directory");
    serve_with(catalog, objects, cfg.server, listener, shutdown).await
}

/// [`serve`] on a catalog and object store the caller opened (e.g.
/// [`Catalog::open_with_backend`] and [`Objects::in_memory`]). Returns once
/// nothing but the caller holds `catalog`.
pub async fn serve_with(
    catalog: Arc<Catalog>,
    objects: Objects,
    server: ServerConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    // The caller's references and `catalog`: after shutdown, `held` stands
    // in for `catalog` and nothing beyond the caller's may remain.
    let callers = Arc::strong_count(&catalog);
    let store = SinkStore::new(catalog.clone(), objects.clone(), tokio::runtime::Handle::current());
    // Kept to wait, after shutdown, until nothing else holds the catalog.
    let held = catalog.clone();
    let state = AppState {
        sync: Arc::new(Mutex::new(Sync {
            server: Server::new(server),
            store,
        })),
        catalog,
        objects,
        meta: Arc::new(Mutex::new(())),
    };
    let app = Router::new()
        .route(
            "/v1/sync",
            post(sync)
                .layer(DefaultBodyLimit::max(MAX_MESSAGE))
                .layer(from_fn(|r: Request, n: Next| announced_limit(MAX_MESSAGE, r, n))),
        )
        .route(
            "/v1/packs/{id}",
            put(put_pack)
                .layer(DefaultBodyLimit::max(MAX_PACK))
                .layer(from_fn(one_pack_upload_of_many))
                .layer(from_fn(|r: Request, n: Next| announced_limit(MAX_PACK, r, n))),
        )
        .route("/v1/chunks/{id}", get(get_chunk))
        .route(
            "/v1/chunks",
            post(get_chunks)
                .layer(DefaultBodyLimit::max(MAX_BATCH_IDS * 32))
                .layer(from_fn(|r: Request, n: Next| announced_limit(MAX_BATCH_IDS * 32, r, n))),
        )
        .route("/v1/files", get(files))
        .route("/v1/restore", get(restore_set))
        .route("/v1/devices", get(devices))
        .route(
            "/v1/presence",
            post(presence)
                .layer(DefaultBodyLimit::max(crate::fleet::MAX_PRESENCE_BODY))
                .layer(from_fn(|r: Request, n: Next| {
                    announced_limit(crate::fleet::MAX_PRESENCE_BODY, r, n)
                })),
        )
        .route("/v1/fleet", get(fleet))
        .route("/v1/changes", get(changes))
        .route(
            "/v1/meta",
            get(meta_list)
                .post(meta_op)
                .layer(DefaultBodyLimit::max(crate::changes::MAX_META_BODY))
                .layer(from_fn(|r: Request, n: Next| {
                    announced_limit(crate::changes::MAX_META_BODY, r, n)
                })),
        )
        .route("/v1/conflicts", get(conflicts))
        .route("/v1/shared", get(shared_set))
        .route("/v1/health", get(|| async { "ok" }))
        // Every error has a plain-text reason, unknown routes and methods too.
        .method_not_allowed_fallback(|m: Method, uri: Uri| async move {
            ApiError(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method {m} is not allowed on {}", uri.path()),
            )
        })
        .fallback(|uri: Uri| async move { ApiError(StatusCode::NOT_FOUND, format!("no such endpoint {}", uri.path())) })
        .with_state(state);
    tracing::info!(addr = ?listener.local_addr().ok(), "cloud-sink serving");
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown)
        .await?;
    // axum returns once every connection has signalled that it closed, but
    // each connection task drops its copy of the router state (and so of the
    // catalog) only just after that, and blocking store work of a request
    // whose client went away may still be running. Wait for all of them, so
    // the redb file is unlocked when `serve` returns and a new sink or
    // `rebuild` can open it at once.
    let deadline = tokio::time::Instant::now() + CLOSE_TIMEOUT;
    while Arc::strong_count(&held) > callers {
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Task(format!(
                "catalog still in use {} s after shutdown",
                CLOSE_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    drop(held);
    tracing::info!("cloud-sink stopped");
    Ok(())
}

/// Refuses a body whose `content-length` exceeds `limit` before reading any
/// of it. (`DefaultBodyLimit` alone fails only once `limit + 1` bytes have
/// arrived, after buffering up to `limit` of them.)
async fn announced_limit(limit: usize, req: Request, next: Next) -> Response {
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match announced {
        Some(n) if n > limit as u64 => ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body of {n} bytes exceeds the length limit of {limit} bytes"),
        )
        .into_response(),
        _ => next.run(req).await,
    }
}

/// A non-2xx answer with a plain-text reason.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.0,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            self.1 + "\n",
        )
            .into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        use protocol::Error as P;
        let client_fault = matches!(
            &e,
            Error::BadRequest(_)
                | Error::Protocol(
                    P::TooLarge { .. }
                        | P::Decode(_)
                        | P::Version(_)
                        | P::InvalidId(_)
                        | P::InvalidPath(..)
                        | P::BadSignature(_)
                        | P::CorruptPack(_)
                        | P::CorruptChunk(..)
                )
        );
        if let Error::NotFound(why) = &e {
            return ApiError(StatusCode::NOT_FOUND, why.clone());
        }
        if client_fault {
            tracing::info!(error = %e, "bad request");
            ApiError(StatusCode::BAD_REQUEST, e.to_string())
        } else {
            tracing::error!(error = %e, "request failed");
            ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::from(e).into()
    }
}

type ApiResult<T> = std::result::Result<T, ApiError>;

fn parse_id(s: &str) -> ApiResult<Hash32> {
    Hash32::from_hex(s).map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad id {s:?}: {e}")))
}

fn cbor(bytes: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/cbor")], bytes).into_response()
}

/// The aggregator's name: `x-ferry-peer` if it is a valid id, else its IP.
fn peer_name(headers: &HeaderMap, addr: SocketAddr) -> String {
    headers
        .get(PEER_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| protocol::Id::new(v).is_ok())
        .map(|v| format!("peer:{v}"))
        .unwrap_or_else(|| format!("ip:{}", addr.ip()))
}

async fn sync(
    State(st): State<AppState>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let msg = Message::decode(&body).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    let name = peer_name(&headers, addr);
    let kind = msg.kind();
    let mut guard = st.sync.lock_owned().await;
    let now = st.catalog.clock().now_ms();
    // The store blocks on disk and object writes: run it off the async workers.
    let replies = tokio::task::spawn_blocking(move || {
        let Sync { server, store } = &mut *guard;
        let peer = Peer {
            name: &name,
            device: None,
        };
        server.handle(now, &peer, msg, store)
    })
    .await?
    .map_err(Error::from)?;
    match replies.into_iter().next() {
        None => Ok(StatusCode::NO_CONTENT.into_response()),
        Some(Message::Nack(n)) => {
            tracing::info!(kind, reason = %n.reason, "nack");
            Err(ApiError(StatusCode::UNPROCESSABLE_ENTITY, n.reason))
        }
        Some(m) => Ok(cbor(m.encode().map_err(Error::from)?)),
    }
}

async fn put_pack(State(st): State<AppState>, Path(id): Path<String>, body: Bytes) -> ApiResult<&'static str> {
    let id = parse_id(&id)?;
    let added = crate::store::put_pack(&st.catalog, &st.objects, id, body).await?;
    tracing::debug!(pack = %id, added, "pack stored");
    Ok("stored")
}

async fn get_chunk(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let id = parse_id(&id)?;
    let cat = st.catalog.clone();
    let loc = tokio::task::spawn_blocking(move || cat.chunk(&id)).await??;
    let Some(loc) = loc else {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("unknown chunk {id}")));
    };
    let bytes = stored_bytes(&st.objects, &id, &loc).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// A chunk's stored bytes from its pack: all `loc.len` of them, or an error
/// (a short range would otherwise pass for a chunk, or shift a batch's framing).
async fn stored_bytes(objects: &Objects, id: &Hash32, loc: &crate::catalog::ChunkLoc) -> ApiResult<Bytes> {
    let end = loc.offset + u64::from(loc.len);
    let bytes = objects.get_range(&pack_key(&loc.pack), loc.offset..end).await?;
    if bytes.len() != loc.len as usize {
        return Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("chunk {id}: its pack gave {} of {} bytes", bytes.len(), loc.len),
        ));
    }
    Ok(bytes)
}

/// Pack uploads read and stored at once. Each body is held whole (up to
/// `MAX_PACK`, 256 MiB), so this bounds their memory to 2 GiB whatever the
/// aggregators do. Further uploads wait for a turn before their body is
/// read (they are not refused: a forwarder would only send them again).
pub const PACK_UPLOADS: usize = 8;
static PACKS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(PACK_UPLOADS);

/// Slowest upload a turn is held for: 64 KiB/s, after a minute's grace.
const PACK_MIN_RATE: u64 = 64 << 10;
const PACK_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// Holds one of the [`PACK_UPLOADS`] turns while the request's body is read
/// and stored, for at most a minute plus its announced length (else
/// `MAX_PACK`) at [`PACK_MIN_RATE`]: a sender that stalls gets 408 and gives
/// its turn back instead of holding it forever.
async fn one_pack_upload_of_many(req: Request, next: Next) -> Response {
    let len = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(MAX_PACK as u64);
    let limit = PACK_GRACE + std::time::Duration::from_secs(len / PACK_MIN_RATE);
    // Never closed, so the only error cannot happen; without a turn the
    // request would still be served, only unbounded.
    let _turn = PACKS.acquire().await;
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError(
            StatusCode::REQUEST_TIMEOUT,
            format!("pack upload of {len} bytes not done within {} s", limit.as_secs()),
        )
        .into_response(),
    }
}

/// Most chunk ids in one `POST /v1/chunks`.
pub const MAX_BATCH_IDS: usize = 1024;
/// Most stored bytes one `POST /v1/chunks` answers with; a batch whose
/// chunks hold more is refused (the client asks for about 1 MiB at a time).
pub const MAX_BATCH_BYTES: u64 = 16 << 20;
/// Batch answers being assembled at once: with [`MAX_BATCH_BYTES`], bounds
/// the memory they hold to 128 MiB whatever the callers do.
static BATCHES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(8);

/// `POST /v1/chunks`: the body is chunk ids (32 bytes each, at most
/// [`MAX_BATCH_IDS`]); the answer is, for each in order, its stored length
/// (u32 BE) and its stored bytes. One request for many small chunks: a
/// restore of a typical archive asks for tens of thousands of ~27 KB chunks.
async fn get_chunks(State(st): State<AppState>, body: axum::body::Bytes) -> ApiResult<Response> {
    let why = if body.is_empty() {
        Some("no chunk ids".to_string())
    } else if !body.len().is_multiple_of(32) {
        Some(format!("{} bytes are not chunk ids of 32 bytes each", body.len()))
    } else if body.len() / 32 > MAX_BATCH_IDS {
        Some(format!("{} chunk ids, more than {MAX_BATCH_IDS}", body.len() / 32))
    } else {
        None
    };
    if let Some(why) = why {
        return Err(ApiError(StatusCode::BAD_REQUEST, why));
    }
    let ids: Vec<Hash32> = body
        .chunks_exact(32)
        .map(|c| {
            let mut b = [0u8; 32];
            b.copy_from_slice(c);
            Hash32(b)
        })
        .collect();
    let cat = st.catalog.clone();
    let locs = tokio::task::spawn_blocking(move || {
        ids.iter()
            .map(|id| cat.chunk(id).map(|l| (*id, l)))
            .collect::<Result<Vec<_>>>()
    })
    .await??;
    let mut total = 0u64;
    for (id, loc) in &locs {
        let Some(loc) = loc else {
            return Err(ApiError(StatusCode::NOT_FOUND, format!("unknown chunk {id}")));
        };
        total += u64::from(loc.len) + 4;
    }
    if total > MAX_BATCH_BYTES {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the chunks hold {total} bytes, over {MAX_BATCH_BYTES}: ask for fewer"),
        ));
    }
    let _permit = BATCHES
        .acquire()
        .await
        .map_err(|_| ApiError(StatusCode::SERVICE_UNAVAILABLE, "shutting down".into()))?;
    let mut out = Vec::with_capacity(total as usize);
    for (id, loc) in locs.into_iter().filter_map(|(id, l)| l.map(|l| (id, l))) {
        let bytes = stored_bytes(&st.objects, &id, &loc).await?;
        out.extend_from_slice(&loc.len.to_be_bytes());
        out.extend_from_slice(&bytes);
    }
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], out).into_response())
}

async fn files(State(st): State<AppState>, Query(q): Query<FileQuery>) -> ApiResult<Response> {
    let cat = st.catalog.clone();
    let rows = tokio::task::spawn_blocking(move || cat.files(&q)).await??;
    Ok(Json(rows).into_response())
}

async fn restore_set(State(st): State<AppState>, Query(q): Query<FileQuery>) -> ApiResult<Response> {
    let cat = st.catalog.clone();
    let changes = tokio::task::spawn_blocking(move || cat.restore_set(&q)).await??;
    Ok(cbor(protocol::to_cbor(&changes)))
}

async fn devices(State(st): State<AppState>) -> ApiResult<Response> {
    let cat = st.catalog.clone();
    let rows = tokio::task::spawn_blocking(move || cat.devices()).await??;
    Ok(Json(rows).into_response())
}

/// `POST /v1/presence`: a JSON array of presence updates from an aggregator.
async fn presence(State(st): State<AppState>, body: Bytes) -> ApiResult<Response> {
    let updates = crate::fleet::parse_updates(&body, st.catalog.clock().now_ms())?;
    let cat = st.catalog.clone();
    let ack = tokio::task::spawn_blocking(move || cat.put_presence(&updates)).await??;
    Ok(Json(ack).into_response())
}

/// `GET /v1/fleet`: one row per device.
async fn fleet(State(st): State<AppState>) -> ApiResult<Response> {
    let cat = st.catalog.clone();
    let rows = tokio::task::spawn_blocking(move || {
        let now = cat.clock().now_ms();
        cat.fleet(now)
    })
    .await??;
    Ok(Json(rows).into_response())
}

/// Query of `GET /v1/changes`: one device (`tenant`, `site`, `device`,
/// `after`) or the whole fleet (`after`, `limit`).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangesQuery {
    tenant: Option<String>,
    site: Option<String>,
    device: Option<String>,
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

/// `GET /v1/changes`: CBOR `protocol::msg::Changes` for one device, or CBOR
/// `protocol::meta::FleetChanges` for the fleet.
async fn changes(State(st): State<AppState>, Query(q): Query<ChangesQuery>) -> ApiResult<Response> {
    let cat = st.catalog.clone();
    let bytes = match (&q.tenant, &q.site, &q.device) {
        (Some(t), Some(s), Some(d)) => {
            if q.limit.is_some() {
                return Err(Error::BadRequest("limit applies only to the fleet-wide query (no device)".into()).into());
            }
            let dev = protocol::DeviceRef::new(t, s, d).map_err(|e| Error::BadRequest(format!("bad device: {e}")))?;
            let after = q.after;
            protocol::to_cbor(&tokio::task::spawn_blocking(move || cat.device_changes(&dev, after)).await??)
        }
        (None, None, None) => {
            let limit = match q.limit {
                None => crate::changes::DEFAULT_PAGE,
                Some(0) => return Err(Error::BadRequest("limit must be at least 1".into()).into()),
                Some(n) => n.min(crate::changes::MAX_PAGE),
            };
            let after = q.after;
            protocol::to_cbor(&tokio::task::spawn_blocking(move || cat.fleet_changes(after, limit)).await??)
        }
        _ => {
            return Err(Error::BadRequest("give tenant, site and device together, or none of them".into()).into());
        }
    };
    Ok(cbor(bytes))
}

/// `POST /v1/meta`: one operator op (JSON `changes::MetaOpRequest`); answers
/// the target's new state (JSON `changes::MetaView`). The op's object is
/// durable before the catalog changes.
async fn meta_op(State(st): State<AppState>, body: Bytes) -> ApiResult<Response> {
    let req: crate::changes::MetaOpRequest =
        serde_json::from_slice(&body).map_err(|e| Error::BadRequest(format!("body is not a metadata op: {e}")))?;
    let (dev, path, op) = req.check()?;
    let _one = st.meta.lock().await;
    let cat = st.catalog.clone();
    let (rec, view) = tokio::task::spawn_blocking(move || cat.prepare_meta(&dev, &path, &op)).await??;
    let Some(rec) = rec else {
        return Ok(Json(view).into_response());
    };
    let bytes = axum::body::Bytes::from(protocol::to_cbor(&rec));
    st.objects.put_durable(vec![(rec.object_key(), bytes)]).await?;
    let cat = st.catalog.clone();
    let views = tokio::task::spawn_blocking(move || cat.apply_meta(std::slice::from_ref(&rec))).await??;
    let view = views
        .into_iter()
        .next()
        .ok_or_else(|| Error::Task("metadata op applied nothing".into()))?;
    tracing::info!(device = %format!("{}/{}/{}", view.tenant, view.site, view.device), path = %view.path, gseq = view.gseq, "metadata op");
    Ok(Json(view).into_response())
}

/// `GET /v1/meta?tenant&site&device`: JSON array of `changes::MetaView`.
async fn meta_list(State(st): State<AppState>, Query(q): Query<crate::changes::MetaQuery>) -> ApiResult<Response> {
    let cat = st.catalog.clone();
    let rows = tokio::task::spawn_blocking(move || cat.meta(&q)).await??;
    Ok(Json(rows).into_response())
}

/// `GET /v1/conflicts?tenant&site&device&path`: JSON array of `shared::ConflictInfo`.
async fn conflicts(State(st): State<AppState>, Query(q): Query<crate::shared::ConflictQuery>) -> ApiResult<Response> {
    let cat = st.catalog.clone();
    let rows = tokio::task::spawn_blocking(move || cat.conflicts(&q)).await??;
    Ok(Json(rows).into_response())
}

/// `GET /v1/shared?site&tenant&path&at`: CBOR `Vec<Change>`, each device's
/// latest version of every shared path of the site (for `restore --shared`).
async fn shared_set(State(st): State<AppState>, Query(q): Query<crate::shared::SharedQuery>) -> ApiResult<Response> {
    let cat = st.catalog.clone();
    let changes = tokio::task::spawn_blocking(move || cat.shared_set(&q)).await??;
    Ok(cbor(protocol::to_cbor(&changes)))
}
