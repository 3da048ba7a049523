//! End to end through the real sink over HTTP: the sync protocol with real
//! sealed chunks and signed changes, listings, restore (also as of a time),
//! restart on the same data directory, and `rebuild` from the objects alone.

mod common;

use anyhow::Result;
use cloud_sink::{format_ms, DeviceInfo, FileQuery};
use common::*;
use protocol::msg::Status;
use protocol::seal::TenantKey;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_list_and_restore_over_http() -> Result<()> {
    let data = tempfile::tempdir()?;
    let sink = Sink::start(data.path()).await?;
    let tk = TenantKey::generate()?;
    let mut gw = Device::new("gw-1", &tk)?;

    let big = bytes(1, 5 * CHUNK + 123); // six chunks
    let csv = b"ts,sensor,value\n".repeat(700); // compresses, two chunks
    let empty: Vec<u8> = Vec::new();
    let dup = big[..CHUNK].to_vec(); // same chunk as big's first: dedup
    let a = gw.file("line1/big.bin", &big, T0_MS)?;
    let b = gw.file("line1/logs/today.csv", &csv, T0_MS + 1)?;
    let c = gw.file("line1/empty", &empty, T0_MS + 2)?;
    let d = gw.file("line2/dup.bin", &dup, T0_MS + 3)?;
    let f_bytes = bytes(7, CHUNK + 50);
    let f = gw.file("line2/data.bin", &f_bytes, T0_MS + 5)?;

    // Pack uploaded first (the aggregator's path), then Batch/Commit.
    let k = hello(&sink.client).await?;
    assert!(k.regional.map.is_empty());
    assert!(k.max_batch > 0 && k.max_message as usize == protocol::msg::MAX_MESSAGE);
    sync_all(&sink.client, &[&a, &b], &[], Via::PackFirst).await?;
    // Chunks over Data messages; `c` and `d` need nothing new.
    let done = sync_all(&sink.client, &[&c, &d, &f], &[], Via::Data).await?;
    for seq in 1..=5 {
        assert!(done.regional.contains(&gw.replica, seq));
    }

    // Chunks sent as a pack built from exactly what Prepare lists.
    let e_bytes = bytes(5, 2 * CHUNK);
    let e = gw.file("line2/other.bin", &e_bytes, T0_MS + 4)?;
    sync_all(&sink.client, &[&e], &[], Via::PackOnPrepare).await?;

    // Replaying a whole batch is harmless: nothing missing, still applied, not counted twice.
    let (prep, again) = sync_round(&sink.client, vec![a.change.clone()], &a.chunks, Via::Data).await?;
    assert!(prep.missing.is_empty() && prep.rejected.is_empty(), "{prep:?}");
    assert_eq!(again.results[0].status, Status::Applied);

    // Listings.
    let files = sink.client.files(&query(&gw)).await?;
    let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "line1/big.bin",
            "line1/empty",
            "line1/logs/today.csv",
            "line2/data.bin",
            "line2/dup.bin",
            "line2/other.bin"
        ]
    );
    let bigf = &files[0];
    assert_eq!(
        (bigf.size, bigf.chunks, bigf.seq, bigf.hlc_ms, bigf.deleted),
        (big.len() as u64, 6, 1, T0_MS, false)
    );
    assert_eq!(
        bigf.sha256.as_deref(),
        Some(protocol::Hash32::of(&big).to_hex().as_str())
    );
    assert_eq!(
        (bigf.tenant.as_str(), bigf.site.as_str(), bigf.device.as_str()),
        ("acme", "plant-1", "gw-1")
    );
    // Globs: a directory selects everything below it; `*` does not cross `/`.
    let q = |p: &str| FileQuery {
        path: Some(p.into()),
        ..query(&gw)
    };
    assert_eq!(sink.client.files(&q("line1")).await?.len(), 3);
    assert_eq!(sink.client.files(&q("line1/*")).await?.len(), 3);
    assert_eq!(sink.client.files(&q("*.bin")).await?.len(), 0);
    assert_eq!(sink.client.files(&q("**/*.bin")).await?.len(), 4);
    assert_eq!(
        sink.client
            .files(&FileQuery {
                device: Some("nope".into()),
                ..FileQuery::default()
            })
            .await?
            .len(),
        0
    );

    let devs = sink.client.devices().await?;
    assert_eq!(devs.len(), 1);
    let dv = &devs[0];
    let logical = (big.len() + csv.len() + dup.len() + f_bytes.len() + e_bytes.len()) as u64;
    assert_eq!((dv.epochs, dv.changes, dv.files, dv.logical_bytes), (1, 6, 6, logical));
    assert_eq!(dv.pubkey, hex::encode(ring::signature::KeyPair::public_key(&gw.key)));
    assert!(dv.last_seen_ms >= T0_MS);

    // Restore everything, byte-identical, with mode and mtime.
    let out = tempfile::tempdir()?;
    let rep = restore_to(&sink.client, &gw, None, out.path()).await?;
    assert_eq!(rep.files, 6);
    assert_eq!(rep.bytes, logical);
    expect_tree(
        out.path(),
        &[
            ("line1/big.bin", &big),
            ("line1/empty", &empty),
            ("line1/logs/today.csv", &csv),
            ("line2/data.bin", &f_bytes),
            ("line2/dup.bin", &dup),
            ("line2/other.bin", &e_bytes),
        ],
    )?;
    let meta = std::fs::metadata(out.path().join("line1/big.bin"))?;
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o640
    );
    let mtime = meta.modified()?.duration_since(std::time::UNIX_EPOCH)?;
    assert_eq!(mtime.as_millis() as u64, T0_MS);

    // Restoring again over the existing tree replaces files; one subtree only.
    let rep = cloud_sink::restore(
        &sink.client,
        cloud_sink::RestoreRequest {
            device: Some("gw-1".into()),
            path_glob: Some("line1/logs".into()),
            out_dir: out.path().join("sub"),
            ..Default::default()
        },
        &tk,
    )
    .await?;
    assert_eq!(rep.files, 1);
    assert_eq!(std::fs::read(out.path().join("sub/line1/logs/today.csv"))?, csv);
    restore_to(&sink.client, &gw, None, out.path()).await?;
    assert_eq!(std::fs::read(out.path().join("line1/big.bin"))?, big);

    // The wrong tenant key cannot open the chunks, and writes nothing.
    let other = Device::new("gw-1", &TenantKey::generate()?)?;
    let out2 = tempfile::tempdir()?;
    let err = restore_to(&sink.client, &other, None, out2.path()).await.err();
    assert!(err.is_some(), "restore with another tenant key succeeded");
    assert!(tree(out2.path())?.is_empty());

    // Object layout of DESIGN.md §5.
    let objs = listing(&sink.objects())?;
    assert!(objs.iter().any(|o| o == "manifests/acme/plant-1/gw-1/1/1"), "{objs:?}");
    assert!(objs.iter().filter(|o| o.starts_with("packs/")).count() >= 3, "{objs:?}");
    sink.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_as_of_a_time_and_deletions() -> Result<()> {
    let data = tempfile::tempdir()?;
    let sink = Sink::start(data.path()).await?;
    let tk = TenantKey::generate()?;
    let mut gw = Device::new("gw-2", &tk)?;
    let (t1, t2, t3) = (T0_MS, T0_MS + 60_000, T0_MS + 120_000);
    let old = bytes(10, CHUNK + 7);
    let new = bytes(11, 2 * CHUNK + 9);
    let gone = b"short-lived".to_vec();
    let v1 = gw.file("cfg/settings.json", &old, t1)?;
    let g1 = gw.file("cfg/tmp.txt", &gone, t1)?;
    sync_all(&sink.client, &[&v1, &g1], &[], Via::PackFirst).await?;
    let v2 = gw.file("cfg/settings.json", &new, t2)?;
    let del = gw.delete("cfg/tmp.txt", t3);
    sync_all(&sink.client, &[&v2], &[del], Via::Data).await?;

    // Between the versions: the old bytes, and the not-yet-deleted file.
    let between = format_ms(t1 + 30_000);
    let out = tempfile::tempdir()?;
    restore_to(&sink.client, &gw, Some(between.clone()), out.path()).await?;
    expect_tree(out.path(), &[("cfg/settings.json", &old), ("cfg/tmp.txt", &gone)])?;

    // After v2 but before the deletion.
    let out = tempfile::tempdir()?;
    restore_to(&sink.client, &gw, Some(format_ms(t2 + 1)), out.path()).await?;
    expect_tree(out.path(), &[("cfg/settings.json", &new), ("cfg/tmp.txt", &gone)])?;

    // Now (no `at`), and exactly at the deletion: new bytes, deleted path absent.
    for at in [None, Some(format_ms(t3))] {
        let out = tempfile::tempdir()?;
        restore_to(&sink.client, &gw, at, out.path()).await?;
        expect_tree(out.path(), &[("cfg/settings.json", &new)])?;
    }

    // Before anything existed: nothing.
    let out = tempfile::tempdir()?;
    let rep = restore_to(&sink.client, &gw, Some(format_ms(t1 - 1)), out.path()).await?;
    assert_eq!(rep.files, 0);

    // Listings agree: latest per path, and all versions with the deletion.
    let latest = sink.client.files(&query(&gw)).await?;
    assert_eq!(latest.len(), 1);
    assert_eq!((latest[0].path.as_str(), latest[0].seq), ("cfg/settings.json", 3));
    let all = sink
        .client
        .files(&FileQuery {
            versions: true,
            ..query(&gw)
        })
        .await?;
    let rows: Vec<(&str, u64, bool)> = all.iter().map(|f| (f.path.as_str(), f.hlc_ms, f.deleted)).collect();
    assert_eq!(
        rows,
        [
            ("cfg/settings.json", t1, false),
            ("cfg/settings.json", t2, false),
            ("cfg/tmp.txt", t1, false),
            ("cfg/tmp.txt", t3, true),
        ]
    );
    let then = sink
        .client
        .files(&FileQuery {
            at: Some(between),
            ..query(&gw)
        })
        .await?;
    assert_eq!(then.len(), 2);
    let dv = &sink.client.devices().await?[0];
    assert_eq!((dv.files, dv.logical_bytes, dv.changes), (1, new.len() as u64, 4));
    sink.stop().await
}

/// `devices` rows without `last_seen_ms`: the receive time is not part of
/// the objects, so a rebuilt catalog derives it from HLC times instead.
fn devices_sans_time(mut d: Vec<DeviceInfo>) -> Vec<DeviceInfo> {
    for r in &mut d {
        r.last_seen_ms = 0;
    }
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_and_rebuild_keep_everything() -> Result<()> {
    let data = tempfile::tempdir()?;
    let tk = TenantKey::generate()?;
    let mut g1 = Device::new("gw-a", &tk)?;
    let mut g2 = Device::new("gw-b", &tk)?;
    let f1 = bytes(20, 3 * CHUNK);
    let f2 = bytes(21, 100);
    let f3 = bytes(22, CHUNK + 1);
    let sink = Sink::start(data.path()).await?;
    let a = g1.file("x/a.bin", &f1, T0_MS)?;
    let b = g1.file("x/b.bin", &f2, T0_MS + 5)?;
    let del = g1.delete("x/b.bin", T0_MS + 10);
    let c = g2.file("y/c.bin", &f3, T0_MS + 7)?;
    sync_all(&sink.client, &[&a, &b], &[del], Via::PackFirst).await?;
    sync_all(&sink.client, &[&c], &[], Via::Data).await?;
    let all = FileQuery {
        versions: true,
        ..FileQuery::default()
    };
    let files = sink.client.files(&all).await?;
    let latest = sink.client.files(&FileQuery::default()).await?;
    let devices = sink.client.devices().await?;
    assert_eq!(files.len(), 4);
    assert_eq!(devices.len(), 2);
    sink.stop().await?;

    // A new server on the same directory: same answers, knowledge intact.
    let sink = Sink::start(data.path()).await?;
    assert_eq!(sink.client.files(&all).await?, files);
    assert_eq!(sink.client.devices().await?, devices);
    let (prep, done) = sync_round(&sink.client, vec![a.change.clone()], &a.chunks, Via::Data).await?;
    assert!(prep.missing.is_empty());
    assert_eq!(done.results[0].status, Status::Applied);
    assert!(done.cloud.contains(&g1.replica, 3));
    let out = tempfile::tempdir()?;
    restore_to(&sink.client, &g1, None, out.path()).await?;
    assert_eq!(
        tree(out.path())?.into_iter().collect::<Vec<_>>(),
        [("x/a.bin".to_string(), f1.clone())]
    );
    // While the sink runs, rebuild refuses (the catalog is locked).
    assert!(cloud_sink::rebuild(data.path()).await.is_err());
    sink.stop().await?;

    // Rebuild from the objects alone (plus some junk that must be skipped).
    let junk = data.path().join("objects/packs/zz");
    std::fs::create_dir_all(&junk)?;
    std::fs::write(junk.join("not-a-pack"), b"junk")?;
    std::fs::remove_file(data.path().join("catalog.redb"))?;
    let rep = cloud_sink::rebuild(data.path()).await?;
    assert_eq!((rep.changes, rep.bad_objects), (4, 1), "{rep:?}");
    assert!(rep.packs >= 2 && rep.chunks == 6, "{rep:?}");
    // Rebuilding over an existing catalog works too and gives the same.
    let rep2 = cloud_sink::rebuild(data.path()).await?;
    assert_eq!(
        (rep2.changes, rep2.chunks, rep2.packs),
        (rep.changes, rep.chunks, rep.packs)
    );

    let sink = Sink::start(data.path()).await?;
    assert_eq!(sink.client.files(&all).await?, files);
    assert_eq!(sink.client.files(&FileQuery::default()).await?, latest);
    assert_eq!(
        devices_sans_time(sink.client.devices().await?),
        devices_sans_time(devices)
    );
    let out = tempfile::tempdir()?;
    restore_to(&sink.client, &g2, None, out.path()).await?;
    assert_eq!(std::fs::read(out.path().join("y/c.bin"))?, f3);
    // Knowledge came back too: the sink does not ask for anything again.
    let (prep, done) = sync_round(&sink.client, vec![c.change.clone()], &[], Via::Data).await?;
    assert!(prep.missing.is_empty());
    assert!(done.cloud.contains(&g2.replica, 1));
    sink.stop().await
}

/// Two changes of a device the sink has never seen, signed by different
/// keys, in one batch: the first pins the key and the other is refused.
/// The refused change must not leave a manifest object behind, or `rebuild`
/// (which applies in seq order) would pin the other key and disagree with
/// the live catalog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_pinning_race_in_one_batch_survives_rebuild() -> Result<()> {
    let data = tempfile::tempdir()?;
    let tk = TenantKey::generate()?;
    // Same device id, different signing keys; the forger signs seq 1, the real device seq 2.
    let mut real = Device::new("gw-k", &tk)?;
    let mut forger = Device::new("gw-k", &tk)?;
    real.seq();
    let good = real.file("d/good", &bytes(30, 500), T0_MS + 2)?;
    let evil = forger.file("d/evil", &bytes(31, 500), T0_MS + 1)?;
    assert_eq!((good.change.seq, evil.change.seq), (2, 1));

    let sink = Sink::start(data.path()).await?;
    // The real device's change comes first in the batch and pins its key.
    let chunks: Vec<_> = good.chunks.iter().chain(&evil.chunks).cloned().collect();
    sync_round(
        &sink.client,
        vec![good.change.clone(), evil.change.clone()],
        &chunks,
        Via::Data,
    )
    .await?;
    let live = sink.client.files(&FileQuery::default()).await?;
    let live_paths: Vec<&str> = live.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(live_paths, ["d/good"]);
    let devs = sink.client.devices().await?;
    assert_eq!(
        devs[0].pubkey,
        hex::encode(ring::signature::KeyPair::public_key(&real.key))
    );
    sink.stop().await?;

    let objs = listing(&data.path().join("objects"))?;
    assert!(
        !objs.iter().any(|o| o == "manifests/acme/plant-1/gw-k/1/1"),
        "the refused change was stored: {objs:?}"
    );
    cloud_sink::rebuild(data.path()).await?;
    let sink = Sink::start(data.path()).await?;
    assert_eq!(sink.client.files(&FileQuery::default()).await?, live);
    assert_eq!(devices_sans_time(sink.client.devices().await?), devices_sans_time(devs));
    sink.stop().await
}

/// `serve` promises the catalog is closed when it returns: a new sink or
/// `rebuild` on the same directory must be able to open it right away, even
/// with requests (and keep-alive connections) just before the shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_sink_releases_the_catalog_at_once() -> Result<()> {
    let data = tempfile::tempdir()?;
    let tk = TenantKey::generate()?;
    let mut gw = Device::new("gw-r", &tk)?;
    for i in 0..30u64 {
        let sink = Sink::start(data.path()).await?;
        let f = gw.file(&format!("r/{i}"), &bytes(i, 64), T0_MS + i)?;
        // Several connections in flight until just before the stop.
        let (q, built) = (FileQuery::default(), [&f]);
        let (a, b, c) = tokio::join!(
            sync_all(&sink.client, &built, &[], Via::Data),
            sink.client.files(&q),
            sink.client.devices()
        );
        a?;
        b?;
        c?;
        // Many pooled connections, as restore's parallel chunk fetches leave.
        let chunk = f.chunks[0].id;
        futures::future::try_join_all((0..16).map(|_| sink.client.chunk(&chunk))).await?;
        sink.stop().await?;
        if i % 10 == 9 {
            cloud_sink::rebuild(data.path()).await?;
        } else {
            cloud_sink::Catalog::open(&data.path().join("catalog.redb"))?;
        }
    }
    Ok(())
}

/// Pack bodies are read `PACK_UPLOADS` at a time: while that many senders
/// stall half-way, another upload waits for a turn; once they go away it is
/// stored. Then more uploads at once than there are turns all complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pack_uploads_take_turns_and_all_complete() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let data = tempfile::tempdir()?;
    let sink = Sink::start(data.path()).await?;
    let tk = TenantKey::generate()?;
    let mut gw = Device::new("gw-1", &tk)?;
    let turns = cloud_sink::http::PACK_UPLOADS;
    let mut packs = Vec::new();
    let mut ids = Vec::new();
    for i in 0..3 * turns + 1 {
        let f = gw.file(
            &format!("p/{i}.bin"),
            &bytes(100 + i as u64, 2 * CHUNK),
            T0_MS + i as u64,
        )?;
        ids.extend(f.chunks.iter().map(|c| c.id));
        packs.push(pack(&f.chunks));
    }
    // `turns` senders announce a body and send a tenth of it.
    let mut stalled = Vec::new();
    for (id, b) in &packs[..turns] {
        let mut s = tokio::net::TcpStream::connect(sink.addr).await?;
        let head = format!(
            "PUT /v1/packs/{id} HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
            b.len()
        );
        s.write_all(head.as_bytes()).await?;
        s.write_all(&b[..b.len() / 10]).await?;
        stalled.push(s);
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (id, b) = packs[turns].clone();
    let waiting = tokio::spawn({
        let client = sink.client.clone();
        async move { client.put_pack(&id, b).await }
    });
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert!(!waiting.is_finished(), "an upload was read while every turn was taken");
    drop(stalled);
    tokio::time::timeout(std::time::Duration::from_secs(30), waiting).await???;
    // Three times as many uploads at once as there are turns.
    let uploads = packs.into_iter().map(|(id, b)| {
        let client = &sink.client;
        async move { client.put_pack(&id, b).await }
    });
    for r in futures::future::join_all(uploads).await {
        r?;
    }
    for id in &ids {
        assert!(
            sink.client.chunk(id).await.is_ok(),
            "chunk {id} not served after its pack was stored"
        );
    }
    Ok(())
}
