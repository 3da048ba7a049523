//! Adversarial input to and from the sink: traversal paths in signed
//! changes (refused by the real sink; refused by restore even when a hostile
//! server serves them), symlinks inside the output directory, and tampered
//! objects on disk (restore fails verification instead of writing bad bytes).

mod common;

use anyhow::{ensure, Context, Result};
use axum::extract::Path as UrlPath;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use cloud_sink::restore::prepare_target;
use cloud_sink::{DeviceInfo, Error, FileQuery, SinkClient};
use common::*;
use protocol::msg::{ChunkData, Status};
use protocol::seal::TenantKey;
use protocol::{Change, ChangeBody, FileVersion, Hash32};
use ring::signature::KeyPair;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

const BAD_PATHS: [&str; 7] = [
    "../evil",
    "/etc/x",
    "a/../../b",
    "a/./b",
    "a//b",
    "a\\..\\..\\b",
    "line1/..",
];

/// Re-signs a file change of `gw` with another path (the device's real key).
fn with_path(gw: &Device, c: &Change, path: &str) -> Change {
    let ChangeBody::File(f) = &c.body else {
        return c.clone();
    };
    let body = ChangeBody::File(FileVersion {
        path: path.into(),
        ..f.clone()
    });
    Change::sign(c.replica.clone(), c.seq, c.hlc, body, &gw.key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_refuses_traversal_paths_at_batch() -> Result<()> {
    let root = tempfile::tempdir()?;
    let data = root.path().join("data");
    let sink = Sink::start(&data).await?;
    let tk = TenantKey::generate()?;
    let mut gw = Device::new("gw-t", &tk)?;
    let ok = gw.file("fine/ok.txt", b"fine", T0_MS)?;
    let mut changes = vec![ok.change.clone()];
    let mut chunks = ok.chunks.clone();
    for (i, p) in BAD_PATHS.iter().enumerate() {
        let b = gw.file("placeholder", &bytes(100 + i as u64, 64), T0_MS + 1 + i as u64)?;
        changes.push(with_path(&gw, &b.change, p));
        chunks.extend(b.chunks);
    }
    let del = gw.delete("../../etc/passwd", T0_MS + 50);
    changes.push(del.clone());

    let (prep, done) = sync_round(&sink.client, changes.clone(), &chunks, Via::Data).await?;
    let rejected: Vec<u64> = prep.rejected.iter().map(|(s, _)| *s).collect();
    let want: Vec<u64> = changes[1..].iter().map(|c| c.seq).collect();
    assert_eq!(rejected, want, "{:?}", prep.rejected);
    for (_, why) in &prep.rejected {
        assert!(why.contains("invalid path"), "{why}");
    }
    // Only the good change's chunk was asked for.
    assert_eq!(prep.missing, vec![ok.chunks[0].id]);
    for r in &done.results {
        let want = if r.seq == ok.change.seq {
            Status::Applied
        } else {
            Status::Rejected
        };
        assert_eq!(r.status, want, "{r:?}");
    }
    assert!(!done.cloud.contains(&gw.replica, 2));

    // Nothing of them is listed, stored, or outside the data directory.
    let files = sink.client.files(&FileQuery::default()).await?;
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].path, "fine/ok.txt");
    let objs = listing(&sink.objects())?;
    let manifests: Vec<&String> = objs.iter().filter(|o| o.starts_with("manifests/")).collect();
    assert_eq!(manifests, ["manifests/acme/plant-1/gw-t/1/1"]);
    let mut top: Vec<String> = std::fs::read_dir(root.path())?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().to_string()))
        .collect::<std::io::Result<_>>()?;
    top.sort();
    assert_eq!(top, ["data"]);
    assert_eq!(sink.client.devices().await?[0].changes, 1);
    sink.stop().await
}

#[test]
fn prepare_target_stays_inside_out() -> Result<()> {
    let root = tempfile::tempdir()?;
    let out = root.path().join("out");
    let outside = root.path().join("outside");
    std::fs::create_dir_all(&out)?;
    std::fs::create_dir_all(&outside)?;
    let rel = |s: &[&str]| s.iter().map(|p| p.to_string()).collect::<Vec<_>>();

    // Components that are not plain names.
    for bad in [
        rel(&["..", "evil"]),
        rel(&["/etc", "x"]),
        rel(&["/etc/x"]),
        rel(&["a", "..", "..", "b"]),
        rel(&["a/../../b"]),
        rel(&["a/b"]),
        rel(&["."]),
        rel(&["a", ""]),
        rel(&["a\0b"]),
        rel(&[]),
    ] {
        match prepare_target(&out, &bad) {
            Err(Error::UnsafePath(..)) => {}
            other => anyhow::bail!("{bad:?}: {other:?}"),
        }
    }
    // A symlink inside out pointing outside is never followed: not as a
    // directory on the way, not as the target itself.
    std::os::unix::fs::symlink(&outside, out.join("link"))?;
    std::fs::write(outside.join("victim"), b"precious")?;
    std::os::unix::fs::symlink(outside.join("victim"), out.join("file-link"))?;
    for bad in [
        rel(&["link", "x"]),
        rel(&["link", "deeper", "x"]),
        rel(&["link"]),
        rel(&["file-link"]),
    ] {
        match prepare_target(&out, &bad) {
            Err(Error::UnsafePath(_, why)) => ensure!(why.contains("symlink"), "{bad:?}: {why}"),
            other => anyhow::bail!("{bad:?}: {other:?}"),
        }
    }
    // A file where a directory should be, and a directory where the file should be.
    std::fs::write(out.join("plain"), b"x")?;
    std::fs::create_dir(out.join("dir"))?;
    assert!(matches!(
        prepare_target(&out, &rel(&["plain", "x"])),
        Err(Error::UnsafePath(..))
    ));
    assert!(matches!(
        prepare_target(&out, &rel(&["dir"])),
        Err(Error::UnsafePath(..))
    ));

    assert_eq!(listing(&outside)?, ["victim"]);
    assert_eq!(std::fs::read(outside.join("victim"))?, b"precious");
    assert!(!root.path().join("evil").exists() && !root.path().join("b").exists());

    // Good paths create their directories, inside out only.
    let t = prepare_target(&out, &rel(&["a", "b", "c.txt"]))?;
    assert_eq!(t, out.join("a/b/c.txt"));
    assert!(out.join("a/b").is_dir() && !t.exists());
    Ok(())
}

/// What a hostile sink serves: a restore set, pinned keys, chunk bytes.
#[derive(Clone, Default)]
struct Hostile {
    changes: Vec<Change>,
    devices: Vec<DeviceInfo>,
    chunks: HashMap<String, Vec<u8>>,
    /// The raw answer to every `POST /v1/chunks` (no such endpoint if None).
    batch: Option<Vec<u8>>,
}

/// A tiny adversarial sink: answers /v1/restore, /v1/devices and
/// /v1/chunks/{id} with whatever it was given.
async fn serve_hostile(h: Hostile) -> Result<SinkClient> {
    let h = Arc::new(h);
    let (a, b, c) = (h.clone(), h.clone(), h.clone());
    let mut app =
        Router::new()
            .route("/v1/restore", get(move || async move { protocol::to_cbor(&a.changes) }))
            .route("/v1/devices", get(move || async move { Json(b.devices.clone()) }))
            .route(
                "/v1/chunks/{id}",
                get(move |UrlPath(id): UrlPath<String>| async move {
                    c.chunks.get(&id).cloned().ok_or(StatusCode::NOT_FOUND)
                }),
            );
    if let Some(batch) = h.batch.clone() {
        app = app.route("/v1/chunks", axum::routing::post(move || async move { batch }));
    }
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move { axum::serve(l, app).await });
    Ok(SinkClient::new(&format!("http://{addr}"))?)
}

fn pinned(gw: &Device) -> DeviceInfo {
    DeviceInfo {
        tenant: gw.dev.tenant.to_string(),
        site: gw.dev.site.to_string(),
        device: gw.dev.device.to_string(),
        epochs: 1,
        changes: 1,
        files: 1,
        logical_bytes: 0,
        last_seen_ms: 0,
        pubkey: hex::encode(gw.key.public_key()),
    }
}

fn hostile_set(gw: &Device, changes: Vec<Change>, chunks: &[ChunkData]) -> Hostile {
    Hostile {
        changes,
        devices: vec![pinned(gw)],
        chunks: chunks.iter().map(|c| (c.id.to_hex(), c.bytes.clone())).collect(),
        batch: None,
    }
}

/// A `POST /v1/chunks` answer: each chunk's length (u32 BE) and bytes.
fn framed(chunks: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in chunks {
        out.extend_from_slice(&(c.len() as u32).to_be_bytes());
        out.extend_from_slice(c);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_bad_batch_answers() -> Result<()> {
    let root = tempfile::tempdir()?;
    let out = root.path().join("out");
    let tk = TenantKey::generate()?;
    let mut gw = Device::new("gw-b", &tk)?;
    let payload: Vec<u8> = (0..3 * CHUNK as u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
    let good = gw.file("ok/file.bin", &payload, T0_MS)?;
    ensure!(good.chunks.len() >= 3, "want several chunks in one batch");
    let parts: Vec<&[u8]> = good.chunks.iter().map(|c| c.bytes.as_slice()).collect();
    let mut swapped = parts.clone();
    swapped.swap(0, 1);
    let whole = framed(&parts);
    let cases: [(&str, Vec<u8>); 5] = [
        ("truncated", whole[..whole.len() - 1].to_vec()),
        ("trailing bytes", [whole.clone(), vec![0]].concat()),
        (
            "a length over the limit",
            [u32::MAX.to_be_bytes().to_vec(), whole.clone()].concat(),
        ),
        ("one chunk short", framed(&parts[1..])),
        ("chunks swapped", framed(&swapped)),
    ];
    for (what, answer) in cases {
        let mut h = hostile_set(&gw, vec![good.change.clone()], &good.chunks);
        h.batch = Some(answer);
        let err = restore_to(&serve_hostile(h).await?, &gw, None, &out)
            .await
            .err()
            .context(what)?;
        assert!(matches!(err, Error::Verify(_) | Error::BadRequest(_)), "{what}: {err}");
        assert!(!out.join("ok/file.bin").exists(), "{what}");
    }
    // The honest batch answer restores.
    let mut h = hostile_set(&gw, vec![good.change.clone()], &good.chunks);
    h.batch = Some(whole);
    restore_to(&serve_hostile(h).await?, &gw, None, &out).await?;
    assert_eq!(std::fs::read(out.join("ok/file.bin"))?, payload);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_what_a_hostile_sink_serves() -> Result<()> {
    let root = tempfile::tempdir()?;
    let out = root.path().join("out");
    let tk = TenantKey::generate()?;
    let mut gw = Device::new("gw-h", &tk)?;
    let payload = b"owned\n".to_vec();
    let good = gw.file("ok/file.txt", &payload, T0_MS)?;

    // Validly signed by the pinned key, with traversal paths.
    for p in BAD_PATHS {
        let evil = with_path(&gw, &good.change, p);
        evil.verify().err().context("a traversal path verified")?;
        let client = serve_hostile(hostile_set(&gw, vec![good.change.clone(), evil], &good.chunks)).await?;
        let err = restore_to(&client, &gw, None, &out).await.err().context(p)?;
        assert!(matches!(err, Error::Verify(_) | Error::UnsafePath(..)), "{p}: {err}");
        // Verification happens before anything is written, even the good file.
        assert!(tree(root.path())?.is_empty(), "{p}: {:?}", tree(root.path())?);
    }

    // Signed by a key other than the one pinned for the device.
    let mut impostor = Device::new("gw-h", &tk)?;
    let forged = impostor.file("ok/file.txt", b"forged", T0_MS + 1)?;
    let client = serve_hostile(hostile_set(&gw, vec![forged.change.clone()], &forged.chunks)).await?;
    let err = restore_to(&client, &gw, None, &out).await.err().context("forged")?;
    assert!(matches!(err, Error::Verify(_)), "{err}");

    // A change for a device that was not asked for.
    let mut other = Device::new("gw-other", &tk)?;
    let o = other.file("ok/file.txt", b"other", T0_MS)?;
    let mut h = hostile_set(&other, vec![o.change.clone()], &o.chunks);
    h.devices.push(pinned(&gw));
    let err = restore_to(&serve_hostile(h).await?, &gw, None, &out)
        .await
        .err()
        .context("other device")?;
    assert!(matches!(err, Error::Verify(_)), "{err}");

    // A signed change whose chunk bytes the server swapped for other
    // (validly sealed) bytes: the id check fails.
    let mut h = hostile_set(&gw, vec![good.change.clone()], &good.chunks);
    let swapped = gw.file("x", b"swapped", T0_MS)?;
    h.chunks
        .insert(good.chunks[0].id.to_hex(), swapped.chunks[0].bytes.clone());
    let err = restore_to(&serve_hostile(h).await?, &gw, None, &out)
        .await
        .err()
        .context("swapped chunk")?;
    assert!(matches!(err, Error::Verify(_)), "{err}");
    assert!(!out.join("ok/file.txt").exists());

    // Two changes for the same path.
    let dup = gw.file("ok/file.txt", b"again", T0_MS + 5)?;
    let mut chunks = good.chunks.clone();
    chunks.extend(dup.chunks.clone());
    let h = hostile_set(&gw, vec![good.change.clone(), dup.change.clone()], &chunks);
    let err = restore_to(&serve_hostile(h).await?, &gw, None, &out)
        .await
        .err()
        .context("duplicate path")?;
    assert!(matches!(err, Error::Verify(_)), "{err}");

    // And the honest answer restores.
    let client = serve_hostile(hostile_set(&gw, vec![good.change.clone()], &good.chunks)).await?;
    restore_to(&client, &gw, None, &out).await?;
    assert_eq!(std::fs::read(out.join("ok/file.txt"))?, payload);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_does_not_follow_a_symlink_inside_out() -> Result<()> {
    let root = tempfile::tempdir()?;
    let data = root.path().join("data");
    let (out, outside) = (root.path().join("out"), root.path().join("outside"));
    std::fs::create_dir_all(&out)?;
    std::fs::create_dir_all(&outside)?;
    let sink = Sink::start(&data).await?;
    let tk = TenantKey::generate()?;
    let mut gw = Device::new("gw-s", &tk)?;
    let f = gw.file("line1/a.csv", b"a,b\n1,2\n", T0_MS)?;
    let g = gw.file("top.txt", b"top", T0_MS)?;
    sync_all(&sink.client, &[&f, &g], &[], Via::PackFirst).await?;

    // `out/line1` is a symlink to a directory outside `out`.
    std::os::unix::fs::symlink(&outside, out.join("line1"))?;
    let err = restore_to(&sink.client, &gw, None, &out)
        .await
        .err()
        .context("symlink dir")?;
    assert!(matches!(err, Error::UnsafePath(..)), "{err}");
    // `out/top.txt` is a symlink to a file outside `out`.
    std::fs::remove_file(out.join("line1"))?;
    std::fs::write(outside.join("victim"), b"precious")?;
    std::os::unix::fs::symlink(outside.join("victim"), out.join("top.txt"))?;
    let err = restore_to(&sink.client, &gw, None, &out)
        .await
        .err()
        .context("symlink file")?;
    assert!(matches!(err, Error::UnsafePath(..)), "{err}");
    assert_eq!(listing(&outside)?, ["victim"]);
    assert_eq!(std::fs::read(outside.join("victim"))?, b"precious");
    // No temp files are left behind.
    for f in listing(&out)? {
        assert!(!f.contains(".ferry-restore-"), "{f}");
    }
    sink.stop().await
}

fn flip_byte(path: &Path, at: usize) -> Result<()> {
    let mut b = std::fs::read(path)?;
    b[at] ^= 0x40;
    std::fs::write(path, b)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_objects_fail_verification() -> Result<()> {
    let data = tempfile::tempdir()?;
    let sink = Sink::start(data.path()).await?;
    let tk = TenantKey::generate()?;
    let mut gw = Device::new("gw-x", &tk)?;
    let plain = bytes(40, 2 * CHUNK + 3);
    let f = gw.file("t/data.bin", &plain, T0_MS)?;
    let other = gw.file("t/other.bin", &bytes(41, 99), T0_MS)?;
    // One pack per file, so tampering hits exactly one file.
    sync_all(&sink.client, &[&f], &[], Via::PackFirst).await?;
    sync_all(&sink.client, &[&other], &[], Via::PackFirst).await?;
    let (pack_id, pack_bytes) = pack(&f.chunks);
    let hex = pack_id.to_hex();
    let pack_path = sink.objects().join(format!("packs/{}/{hex}", &hex[..2]));
    assert_eq!(std::fs::read(&pack_path)?, pack_bytes);

    // A flipped bit inside the second chunk of the pack, on disk.
    let second = 8 + f.chunks[0].bytes.len() + 10;
    flip_byte(&pack_path, second)?;
    let out = tempfile::tempdir()?;
    let q = cloud_sink::RestoreRequest {
        device: Some("gw-x".into()),
        path_glob: Some("t/data.bin".into()),
        out_dir: out.path().to_path_buf(),
        ..Default::default()
    };
    let err = cloud_sink::restore(&sink.client, q.clone(), &tk)
        .await
        .err()
        .context("tampered pack restored")?;
    assert!(matches!(err, Error::Verify(_)), "{err}");
    assert!(tree(out.path())?.is_empty(), "{:?}", listing(out.path())?);
    // The chunk endpoint serves the bytes it has; the client checks them.
    let e = sink.client.chunk(&f.chunks[1].id).await.err().context("chunk")?;
    assert!(matches!(e, Error::Verify(_)), "{e}");
    // The untouched file still restores.
    let rep = cloud_sink::restore(
        &sink.client,
        cloud_sink::RestoreRequest {
            path_glob: Some("t/other.bin".into()),
            ..q.clone()
        },
        &tk,
    )
    .await?;
    assert_eq!(rep.files, 1);

    // A chunk replaced by another validly sealed chunk of the same length
    // (same tenant key) still fails: its id is its SHA-256.
    flip_byte(&pack_path, second)?; // undo
    let mut swapped = plain.clone();
    swapped[0] ^= 1;
    let s = gw.file("x", &swapped[..CHUNK], T0_MS)?;
    ensure!(
        s.chunks[0].bytes.len() == f.chunks[0].bytes.len(),
        "random bytes compressed?"
    );
    let mut b = std::fs::read(&pack_path)?;
    b[8..8 + s.chunks[0].bytes.len()].copy_from_slice(&s.chunks[0].bytes);
    std::fs::write(&pack_path, b)?;
    let err = cloud_sink::restore(&sink.client, q.clone(), &tk)
        .await
        .err()
        .context("swapped chunk restored")?;
    assert!(matches!(err, Error::Verify(_)), "{err}");
    assert!(!out.path().join("t/data.bin").exists());

    // A truncated pack object: the range read fails, nothing is written.
    std::fs::write(&pack_path, &pack_bytes[..20])?;
    assert!(cloud_sink::restore(&sink.client, q.clone(), &tk).await.is_err());
    assert!(tree(out.path())?.keys().all(|k| k == "t/other.bin"));
    // Restoring the object restores the file.
    std::fs::write(&pack_path, &pack_bytes)?;
    cloud_sink::restore(&sink.client, q, &tk).await?;
    assert_eq!(std::fs::read(out.path().join("t/data.bin"))?, plain);
    sink.stop().await?;

    // A tampered manifest object is skipped by rebuild, never indexed.
    let m = data.path().join("objects/manifests/acme/plant-1/gw-x/1/2");
    let len = std::fs::metadata(&m)?.len() as usize;
    flip_byte(&m, len - 5)?;
    let rep = cloud_sink::rebuild(data.path()).await?;
    assert_eq!((rep.changes, rep.bad_objects), (1, 1), "{rep:?}");
    let sink = Sink::start(data.path()).await?;
    let files = sink.client.files(&FileQuery::default()).await?;
    assert_eq!(
        files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
        ["t/data.bin"]
    );
    assert_eq!(files[0].sha256, Some(Hash32::of(&plain).to_hex()));
    sink.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_under_a_restored_file_is_refused_after_that_file_is_in_place() -> Result<()> {
    // Signed versions of `a` and `a/b` as current at once (no filesystem
    // holds both): `a` is restored, then `a/b` is refused because a file is
    // in its way, not raced against `a`'s rename (which runs on the
    // finishing thread).
    let root = tempfile::tempdir()?;
    let out = root.path().join("out");
    let tk = TenantKey::generate()?;
    let mut gw = Device::new("gw-u", &tk)?;
    for _ in 0..5 {
        let a = gw.file("x/a", b"first", T0_MS)?;
        let ab = gw.file("x/a/b", b"second", T0_MS + 1)?;
        let chunks: Vec<ChunkData> = a.chunks.iter().chain(&ab.chunks).cloned().collect();
        let client = serve_hostile(hostile_set(&gw, vec![a.change.clone(), ab.change.clone()], &chunks)).await?;
        let err = restore_to(&client, &gw, None, &out).await.err().context("a/b")?;
        assert!(matches!(err, Error::UnsafePath(..)), "{err}");
        assert_eq!(std::fs::read(out.join("x/a"))?, b"first");
        std::fs::remove_dir_all(&out)?;
    }
    Ok(())
}
