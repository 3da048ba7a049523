//! Malformed, oversized and hostile requests on every HTTP endpoint: each
//! gets a 4xx with a plain-text reason, nothing is stored, and the sink keeps
//! serving (health ok, earlier data still restorable).

mod common;

use anyhow::{ensure, Context, Result};
use cloud_sink::FileQuery;
use common::*;
use protocol::msg::*;
use protocol::pack::PackBuilder;
use protocol::seal::TenantKey;
use protocol::{ChangeBody, Hash32};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Checks a refusal: the status, a text/plain content type and a reason
/// containing `why` (case-insensitive).
async fn refused(resp: reqwest::Response, status: u16, why: &str) -> Result<String> {
    let got = resp.status().as_u16();
    let ct = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let text = resp.text().await?;
    ensure!(got == status, "status {got}, want {status}: {text:?}");
    ensure!(ct.starts_with("text/plain"), "content type {ct:?} for {text:?}");
    ensure!(!text.trim().is_empty(), "empty reason for {status}");
    ensure!(
        text.to_lowercase().contains(&why.to_lowercase()),
        "reason {text:?} does not say {why:?}"
    );
    Ok(text)
}

/// An HTTP answer read off a raw socket.
struct Raw {
    status: u16,
    head: String,
    body: String,
}

/// Reads one HTTP/1.1 answer (Content-Length framed) from `s`.
async fn read_answer(s: &mut tokio::net::TcpStream) -> Result<Raw> {
    let mut buf = Vec::new();
    let mut tmp = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).context("status")?;
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                return Ok(Raw { status, head, body });
            }
        }
        let n = tokio::time::timeout_at(deadline, s.read(&mut tmp))
            .await
            .context("no answer")??;
        ensure!(n > 0, "connection closed after {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// Sends raw bytes on a fresh TCP connection and reads the answer.
async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> Result<Raw> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(request).await?;
    read_answer(&mut s).await
}

/// Sends `total` body bytes with chunked encoding (no length announced),
/// without the final chunk, and reads the answer.
async fn raw_chunked(addr: std::net::SocketAddr, method_path: &str, total: usize) -> Result<Raw> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("{method_path} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n").as_bytes())
        .await?;
    let piece = vec![0u8; 256 << 10];
    let mut sent = 0;
    while sent < total {
        let n = piece.len().min(total - sent);
        let mut frame = format!("{n:x}\r\n").into_bytes();
        frame.extend_from_slice(&piece[..n]);
        frame.extend_from_slice(b"\r\n");
        if s.write_all(&frame).await.is_err() {
            break; // refused early: the answer is waiting
        }
        sent += n;
    }
    read_answer(&mut s).await
}

fn raw_refused(r: &Raw, status: u16, why: &str) {
    assert_eq!(r.status, status, "{} {}", r.head, r.body);
    assert!(r.head.contains("content-type: text/plain"), "{}", r.head);
    assert!(r.body.to_lowercase().contains(why), "{:?} lacks {why:?}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_refuses_bad_input_and_keeps_serving() -> Result<()> {
    let data = tempfile::tempdir()?;
    let sink = Sink::start(data.path()).await?;
    let tk = TenantKey::generate()?;
    let mut gw = Device::new("gw-b", &tk)?;
    let plain = bytes(50, CHUNK + 10);
    let good = gw.file("keep/me.bin", &plain, T0_MS)?;
    sync_all(&sink.client, &[&good], &[], Via::PackFirst).await?;
    let before = listing(&sink.objects())?;

    let http = reqwest::Client::new();
    let url = |p: &str| format!("{}/v1/{p}", sink.url);
    let post = |b: Vec<u8>| http.post(url("sync")).body(b).send();

    // ---- POST /v1/sync
    refused(post(bytes(1, 1000)).await?, 400, "malformed").await?;
    refused(post(Vec::new()).await?, 400, "malformed").await?;
    let enc = Message::Batch(Batch {
        batch_id: 9,
        changes: vec![good.change.clone()],
    })
    .encode()?;
    for cut in [1, 2, 5, enc.len() / 2, enc.len() - 1] {
        refused(post(enc[..cut].to_vec()).await?, 400, "malformed").await?;
    }
    let mut trailing = enc.clone();
    trailing.push(0);
    refused(post(trailing).await?, 400, "trailing").await?;
    let mut v2 = enc.clone();
    assert_eq!(v2[1], 1, "envelope version byte");
    v2[1] = 2;
    refused(post(v2).await?, 400, "unsupported protocol version 2").await?;
    // A Batch declaring 2^60 changes: refused without allocating for them.
    let mut huge = vec![0x82, 0x01, 0x82, 0x03, 0x82, 0x09, 0x9b];
    huge.extend_from_slice(&(1u64 << 60).to_be_bytes());
    refused(post(huge).await?, 400, "malformed").await?;
    // A byte string claiming 4 GiB inside a Data message.
    let mut big_bytes = vec![0x82, 0x01, 0x82, 0x05, 0x82, 0x09, 0x81, 0x82, 0x58, 0x20];
    big_bytes.extend_from_slice(&[0u8; 32]);
    big_bytes.extend_from_slice(&[0x5a, 0xff, 0xff, 0xff, 0xff, 0x00]);
    refused(post(big_bytes).await?, 400, "malformed").await?;
    // Over the envelope limit: announced (refused before any byte is read),
    // or not announced (refused once the limit is passed).
    let r = raw(
        sink.addr,
        format!(
            "POST /v1/sync HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
            MAX_MESSAGE + 1
        )
        .as_bytes(),
    )
    .await?;
    raw_refused(&r, 413, "length limit");
    let r = raw_chunked(sink.addr, "POST /v1/sync", MAX_MESSAGE + 1).await?;
    raw_refused(&r, 413, "length limit");
    // Well-formed, but not acceptable.
    let hello2 = Message::Hello(Hello {
        proto: 2,
        device: None,
        replica: None,
        software: "future".into(),
        server_cursor: None,
    });
    refused(post(hello2.encode()?).await?, 422, "protocol 2 not supported").await?;
    let prepare = Message::Prepare(Prepare {
        batch_id: 1,
        missing: vec![],
        retry_after_ms: 0,
        rejected: vec![],
    });
    refused(post(prepare.encode()?).await?, 422, "does not accept prepare").await?;
    let too_many = Message::Batch(Batch {
        batch_id: 10,
        changes: vec![good.change.clone(); 513],
    });
    refused(post(too_many.encode()?).await?, 422, "exceeds").await?;
    refused(http.get(url("sync")).send().await?, 405, "method").await?;
    // Data for a batch the sink never saw: chunks whose bytes do not hash to
    // their id are dropped (verified ones would be kept, see protocol
    // `Server::data`); Commit of the batch says it is unknown.
    let stray = Message::Data(Data {
        batch_id: 4242,
        chunks: vec![ChunkData {
            id: Hash32::of(b"claimed"),
            bytes: b"stray".to_vec(),
        }],
    });
    assert!(sink.client.sync(&stray).await?.is_none());
    assert!(commit(&sink.client, 4242).await?.results.is_empty());
    // A tampered signature is rejected in Prepare, with the reason.
    let mut forged = gw.file("keep/forged.bin", b"forged", T0_MS + 1)?;
    if let ChangeBody::File(f) = &mut forged.change.body {
        f.mode = 0o4755;
    }
    let p = batch(&sink.client, 11, vec![forged.change.clone()]).await?;
    assert_eq!(p.rejected.len(), 1);
    assert!(p.rejected[0].1.contains("bad signature"), "{:?}", p.rejected);
    assert!(p.missing.is_empty());
    assert_eq!(commit(&sink.client, 11).await?.results[0].status, Status::Rejected);
    // Data whose bytes do not hash to the wanted id is not stored: still Missing.
    let next = gw.file("keep/next.bin", b"next", T0_MS + 2)?;
    let p = batch(&sink.client, 12, vec![next.change.clone()]).await?;
    assert_eq!(p.missing, vec![next.chunks[0].id]);
    let wrong = Message::Data(Data {
        batch_id: 12,
        chunks: vec![ChunkData {
            id: next.chunks[0].id,
            bytes: b"not the sealed bytes".to_vec(),
        }],
    });
    assert!(sink.client.sync(&wrong).await?.is_none());
    assert_eq!(commit(&sink.client, 12).await?.results[0].status, Status::Missing);

    // ---- PUT /v1/packs/{id}
    let (pack_id, pack_bytes) = pack(&next.chunks);
    let put = |id: String, b: Vec<u8>| http.put(url(&format!("packs/{id}"))).body(b).send();
    refused(
        put(Hash32::of(b"other").to_hex(), pack_bytes.clone()).await?,
        400,
        "not the SHA-256",
    )
    .await?;
    let junk = bytes(2, 4096);
    refused(put(Hash32::of(&junk).to_hex(), junk).await?, 400, "corrupt pack").await?;
    refused(put(Hash32::of(b"").to_hex(), Vec::new()).await?, 400, "corrupt pack").await?;
    let cut = pack_bytes[..pack_bytes.len() - 3].to_vec();
    refused(put(Hash32::of(&cut).to_hex(), cut).await?, 400, "corrupt pack").await?;
    let mut flipped = pack_bytes.clone();
    flipped[12] ^= 1; // inside the chunk: its id no longer matches
    refused(
        put(Hash32::of(&flipped).to_hex(), flipped).await?,
        400,
        "does not match its id",
    )
    .await?;
    let mut lying = PackBuilder::new();
    lying.push(next.chunks[0].id, b"other bytes under a real chunk id");
    let (lid, lbytes, _) = lying.finish();
    refused(put(lid.to_hex(), lbytes).await?, 400, "does not match its id").await?;
    let mut bad_index = pack_bytes.clone();
    let n = bad_index.len();
    bad_index[n - 12..n - 8].copy_from_slice(&u32::MAX.to_be_bytes());
    refused(
        put(Hash32::of(&bad_index).to_hex(), bad_index).await?,
        400,
        "index length",
    )
    .await?;
    for bad in ["xyz", "00", &"g".repeat(64), &"0".repeat(65), "..%2F..%2Fcatalog.redb"] {
        refused(put(bad.to_string(), pack_bytes.clone()).await?, 400, "bad id").await?;
    }
    // Over the pack limit, announced by content-length: refused without reading it.
    let r = raw(
        sink.addr,
        format!(
            "PUT /v1/packs/{} HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
            pack_id,
            protocol::pack::MAX_PACK + 1
        )
        .as_bytes(),
    )
    .await?;
    raw_refused(&r, 413, "length limit");
    // Nothing of it was stored.
    assert_eq!(listing(&sink.objects())?, before);
    // The real pack is accepted, twice (idempotent), and completes batch 12.
    for _ in 0..2 {
        let r = put(pack_id.to_hex(), pack_bytes.clone()).await?;
        assert_eq!(r.status().as_u16(), 200, "{}", r.text().await?);
    }
    assert_eq!(
        commit(&sink.client, 12).await?.results.len(),
        0,
        "batch 12 was consumed"
    );
    let (prep, done) = sync_round(&sink.client, vec![next.change.clone()], &[], Via::Data).await?;
    assert!(prep.missing.is_empty());
    assert_eq!(done.results[0].status, Status::Applied);

    // ---- GET /v1/chunks/{id}
    for bad in ["zz", &"a".repeat(63), &"z".repeat(64), "..%2F..%2Fcatalog.redb"] {
        refused(http.get(url(&format!("chunks/{bad}"))).send().await?, 400, "bad id").await?;
    }
    let unknown = Hash32::of(b"unknown").to_hex();
    refused(
        http.get(url(&format!("chunks/{unknown}"))).send().await?,
        404,
        "unknown chunk",
    )
    .await?;
    let ok = http.get(url(&format!("chunks/{}", good.chunks[0].id))).send().await?;
    assert_eq!(ok.status().as_u16(), 200);
    assert_eq!(ok.bytes().await?.as_ref(), &good.chunks[0].bytes[..]);

    // ---- POST /v1/chunks (many chunks in one answer)
    let batch = |b: Vec<u8>| http.post(url("chunks")).body(b).send();
    let id_bytes = |ids: &[Hash32]| -> Vec<u8> { ids.iter().flat_map(|i| i.0).collect() };
    for (bad, status, why) in [
        (Vec::new(), 400, "no chunk ids"),
        (vec![7u8; 31], 400, "not chunk ids of 32 bytes"),
        (
            vec![7u8; 32 * (cloud_sink::http::MAX_BATCH_IDS + 1)],
            413,
            "exceeds the length limit",
        ),
    ] {
        refused(batch(bad).await?, status, why).await?;
    }
    let unknown_id = Hash32::of(b"unknown");
    refused(
        batch(id_bytes(&[good.chunks[0].id, unknown_id])).await?,
        404,
        "unknown chunk",
    )
    .await?;
    let ids: Vec<Hash32> = good.chunks.iter().chain(&good.chunks).map(|c| c.id).collect();
    let ok = batch(id_bytes(&ids)).await?;
    assert_eq!(ok.status().as_u16(), 200);
    let mut want = Vec::new();
    for c in good.chunks.iter().chain(&good.chunks) {
        want.extend_from_slice(&(c.bytes.len() as u32).to_be_bytes());
        want.extend_from_slice(&c.bytes);
    }
    assert_eq!(ok.bytes().await?.as_ref(), &want[..]);

    // ---- GET /v1/files, /v1/restore
    for ep in ["files", "restore"] {
        let get = |q: &str| http.get(format!("{}?{q}", url(ep))).send();
        refused(get("at=yesterday").await?, 400, "bad time").await?;
        refused(get("at=2026-13-01T00:00:00Z").await?, 400, "bad time").await?;
        refused(get("at=1969-12-31T00:00:00Z").await?, 400, "before 1970").await?;
        refused(get("path=a%5B").await?, 400, "bad path glob").await?;
        refused(get("path=%7Ba,b").await?, 400, "bad path glob").await?;
        refused(get("versions=maybe").await?, 400, "query").await?;
        refused(get("device=a&device=b").await?, 400, "query").await?;
        let r = get("path=keep&at=2030-01-01T00:00:00Z&unknown=1").await?;
        assert_eq!(r.status().as_u16(), 200, "{}", r.text().await?);
    }
    // ---- the rest
    refused(http.get(url("nope")).send().await?, 404, "no such").await?;
    refused(http.post(url("devices")).send().await?, 405, "method").await?;
    let mut s = tokio::net::TcpStream::connect(sink.addr).await?;
    s.write_all(b"GARBAGE\r\n\r\n").await?;
    let mut b = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await??;
    assert!(String::from_utf8_lossy(&b[..n]).starts_with("HTTP/1.1 400"));

    // Still serving, nothing lost, earlier data restorable.
    sink.client.health().await?;
    let files = sink.client.files(&FileQuery::default()).await?;
    assert_eq!(
        files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
        ["keep/me.bin", "keep/next.bin"]
    );
    let out = tempfile::tempdir()?;
    restore_to(&sink.client, &gw, None, out.path()).await?;
    assert_eq!(std::fs::read(out.path().join("keep/me.bin"))?, plain);
    assert_eq!(std::fs::read(out.path().join("keep/next.bin"))?, b"next");
    sink.stop().await
}
