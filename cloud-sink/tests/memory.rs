//! The sink without a data directory: the catalog on
//! `redb::backends::InMemoryBackend`, objects in `Objects::in_memory()`.
//! The e2e flow over HTTP (`serve_with`), a rebuild from the in-memory
//! objects, and the simulator's way of driving it: `SinkStore` and the
//! protocol server from a plain thread with a current-thread runtime and a
//! virtual clock (no wall-clock time reaches the catalog).

mod common;

use anyhow::{anyhow, bail, ensure, Context, Result};
use cloud_sink::catalog::Catalog;
use cloud_sink::objects::{manifest_key, pack_key, Objects};
use cloud_sink::store::{rebuild_into, SinkStore};
use cloud_sink::{SinkClient, SinkClock};
use common::*;
use protocol::msg::*;
use protocol::seal::TenantKey;
use protocol::server::{Peer, Server, ServerConfig};
use protocol::shared::{ConflictPolicy, VersionVector};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

fn memory_catalog() -> Result<Arc<Catalog>> {
    Ok(Arc::new(Catalog::open_with_backend(Box::new(
        redb::backends::InMemoryBackend::new(),
    ))?))
}

/// A sink served by `serve_with` on a caller's catalog and objects.
struct MemSink {
    client: SinkClient,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<cloud_sink::Result<()>>,
}

impl MemSink {
    async fn start(catalog: Arc<Catalog>, objects: Objects) -> Result<MemSink> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(cloud_sink::serve_with(
            catalog,
            objects,
            ServerConfig::default(),
            listener,
            async move {
                let _ = rx.await;
            },
        ));
        let client = SinkClient::new(&url)?.with_peer_name("test-agg");
        for _ in 0..200 {
            if client.health().await.is_ok() {
                return Ok(MemSink { client, stop, task });
            }
            if task.is_finished() {
                task.await??;
                bail!("sink exited during startup");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("sink did not become healthy")
    }

    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .context("sink did not stop")???;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_and_restore_in_memory_then_rebuild() -> Result<()> {
    let catalog = memory_catalog()?;
    let objects = Objects::in_memory();
    let sink = MemSink::start(catalog.clone(), objects.clone()).await?;
    let tk = TenantKey::generate()?;
    let mut gw = Device::new("gw-1", &tk)?;

    let big = bytes(1, 5 * CHUNK + 123);
    let csv = b"ts,sensor,value\n".repeat(700);
    let small = bytes(2, 1000);
    let a = gw.file("line1/big.bin", &big, T0_MS)?;
    let b = gw.file("line1/data.csv", &csv, T0_MS + 1)?;
    let c = gw.file("line2/small.bin", &small, T0_MS + 2)?;
    sync_all(&sink.client, &[&a], &[], Via::PackFirst).await?;
    sync_all(&sink.client, &[&b], &[], Via::PackOnPrepare).await?;
    sync_all(&sink.client, &[&c], &[], Via::Data).await?;
    // A second version and a delete.
    let big2 = bytes(3, 2 * CHUNK);
    let a2 = gw.file("line1/big.bin", &big2, T0_MS + 10)?;
    let del = gw.delete("line2/small.bin", T0_MS + 11);
    sync_all(&sink.client, &[&a2], &[del], Via::PackOnPrepare).await?;

    let out = tempfile::tempdir()?;
    let rep = restore_to(&sink.client, &gw, None, out.path()).await?;
    ensure!(rep.files == 2, "{rep:?}");
    expect_tree(out.path(), &[("line1/big.bin", &big2), ("line1/data.csv", &csv)])?;
    let then = tempfile::tempdir()?;
    restore_to(&sink.client, &gw, Some(cloud_sink::format_ms(T0_MS + 5)), then.path()).await?;
    expect_tree(
        then.path(),
        &[
            ("line1/big.bin", &big),
            ("line1/data.csv", &csv),
            ("line2/small.bin", &small),
        ],
    )?;
    // The objects are where the layout says.
    ensure!(objects.exists(&manifest_key(&gw.replica, 1)).await?);
    ensure!(!objects.list("packs").await?.is_empty());
    sink.stop().await?;
    // `serve_with` returned: only the test holds the catalog.
    ensure!(Arc::strong_count(&catalog) == 1);

    // A new in-memory catalog rebuilt from the in-memory objects alone.
    let rebuilt = memory_catalog()?;
    let rep = rebuild_into(&rebuilt, &objects).await?;
    ensure!(rep.changes == 5 && rep.bad_objects == 0, "{rep:?}");
    ensure!(rep.packs >= 4, "{rep:?}");
    ensure!(
        rebuilt.devices()?
            == catalog
                .devices()?
                .into_iter()
                .map(|mut d| {
                    // `last_seen` is the receive time live and the HLC time after rebuild.
                    d.last_seen_ms = T0_MS + 11;
                    d
                })
                .collect::<Vec<_>>()
    );
    let sink = MemSink::start(rebuilt, objects).await?;
    let again = tempfile::tempdir()?;
    restore_to(&sink.client, &gw, None, again.path()).await?;
    expect_tree(again.path(), &[("line1/big.bin", &big2), ("line1/data.csv", &csv)])?;
    sink.stop().await
}

#[tokio::test]
async fn list_and_list_dirs_agree_on_memory_and_local() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let local = Objects::open_local(dir.path())?;
    let mem = Objects::in_memory();
    let items: Vec<(String, bytes::Bytes)> = [
        "manifests/acme/plant-1/gw-1/1/1",
        "manifests/acme/plant-1/gw-1/1/2",
        "manifests/acme/plant-1/gw-2/1/1",
        "manifests/acme/plant-2/gw-3/2/7",
        "meta/acme/plant-1/gw-1/123",
        "packs/ab/abcd",
    ]
    .iter()
    .map(|k| (k.to_string(), bytes::Bytes::from(k.as_bytes().to_vec())))
    .collect();
    for o in [&local, &mem] {
        o.put_durable(items.clone()).await?;
    }
    for o in [&local, &mem] {
        let mut dirs = o.list_dirs("manifests/acme").await?;
        dirs.sort();
        ensure!(
            dirs == ["manifests/acme/plant-1", "manifests/acme/plant-2"],
            "{o:?}: {dirs:?}"
        );
        let mut dirs = o.list_dirs("manifests/acme/plant-1").await?;
        dirs.sort();
        ensure!(
            dirs == ["manifests/acme/plant-1/gw-1", "manifests/acme/plant-1/gw-2"],
            "{o:?}: {dirs:?}"
        );
        let mut keys: Vec<String> = o
            .list("manifests/acme/plant-1/gw-1")
            .await?
            .into_iter()
            .map(|m| m.location.to_string())
            .collect();
        keys.sort();
        ensure!(
            keys == ["manifests/acme/plant-1/gw-1/1/1", "manifests/acme/plant-1/gw-1/1/2"],
            "{o:?}: {keys:?}"
        );
        // A prefix matches whole segments only.
        ensure!(o.list("manifests/acme/plant").await?.is_empty(), "{o:?}");
        ensure!(o.list("nothing").await?.is_empty(), "{o:?}");
        ensure!(o.list_dirs("nothing").await?.is_empty(), "{o:?}");
        ensure!(o.get("packs/ab/abcd").await?.as_ref() == b"packs/ab/abcd", "{o:?}");
        ensure!(o.get_range("packs/ab/abcd", 6..8).await?.as_ref() == b"ab", "{o:?}");
        ensure!(!o.exists("packs/ab/nope").await?, "{o:?}");
        ensure!(o.get("packs/ab/nope").await.is_err(), "{o:?}");
    }
    Ok(())
}

/// The simulator's way: a plain thread, a current-thread runtime, the sans-IO
/// server on `SinkStore`, `SinkStore::put_pack` for uploads, virtual time.
#[test]
fn sim_style_drive_uses_only_the_injected_clock() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let vnow = Arc::new(AtomicU64::new(5_000));
    let t = vnow.clone();
    let clock = SinkClock::from_ms(move || t.load(Ordering::Relaxed));
    let catalog =
        Arc::new(Catalog::open_with_backend(Box::new(redb::backends::InMemoryBackend::new()))?.with_clock(clock));
    let objects = Objects::in_memory();
    let mut store = SinkStore::new(catalog.clone(), objects.clone(), rt.handle().clone());
    let mut server = Server::new(ServerConfig::default());
    let peer = Peer {
        name: "aggregator",
        device: None,
    };
    let tk = TenantKey::generate()?;
    let mut gw = Device::new("gw-1", &tk)?;
    let none = VersionVector::default();
    let plain = bytes(7, 2 * CHUNK + 5);
    let f = gw.shared_file("line/recipe.txt", &plain, T0_MS, &none, ConflictPolicy::LastWriterWins)?;

    // The pack first, as the aggregator uploads it; twice is idempotent.
    let (id, pack_bytes) = pack(&f.chunks);
    ensure!(store.put_pack(id, pack_bytes.clone().into())? == f.chunks.len());
    ensure!(store.put_pack(id, pack_bytes.clone().into())? == 0);
    // A pack whose id is not its hash is refused, and nothing is stored.
    let bad = protocol::Hash32::of(b"other");
    match store.put_pack(bad, pack_bytes.into()) {
        Err(cloud_sink::Error::BadRequest(_)) => {}
        other => bail!("bad pack id: {other:?}"),
    }
    let exists = rt.block_on(objects.exists(&pack_key(&bad)))?;
    ensure!(!exists);

    let mut handle = |now: u64, m: Message| -> Result<Vec<Message>> { Ok(server.handle(now, &peer, m, &mut store)?) };
    vnow.store(7_000, Ordering::Relaxed);
    handle(
        7_000,
        Message::Hello(Hello {
            proto: protocol::PROTO_VERSION,
            device: None,
            replica: None,
            software: "sim".into(),
            server_cursor: None,
        }),
    )?;
    let r = handle(
        7_000,
        Message::Batch(Batch {
            batch_id: 1,
            changes: vec![f.change.clone()],
        }),
    )?;
    match r.first() {
        Some(Message::Prepare(p)) if p.missing.is_empty() && p.rejected.is_empty() => {}
        other => bail!("batch answered with {other:?}"),
    }
    let r = handle(7_000, Message::Commit(Commit { batch_id: 1 }))?;
    match r.first() {
        Some(Message::Committed(c)) if c.results.iter().all(|r| r.status == Status::Applied) => {}
        other => bail!("commit answered with {other:?}"),
    }

    // Receive time and the shared head's gseq come from the virtual clock.
    let devs = catalog.devices()?;
    let d = devs.first().ok_or_else(|| anyhow!("no device"))?;
    ensure!(d.last_seen_ms == 7_000, "{d:?}");
    let fc = catalog.fleet_changes(0, 100)?;
    let first = fc.items.first().ok_or_else(|| anyhow!("no server change"))?;
    ensure!(first.change.gseq == 7_000_000, "{fc:?}");
    ensure!(fc.items.iter().all(|i| i.change.gseq < 7_001_000), "{fc:?}");

    // The change's chunks can be read back from the in-memory objects.
    let loc = catalog
        .chunk(&f.chunks[0].id)?
        .ok_or_else(|| anyhow!("chunk not indexed"))?;
    let got = rt.block_on(objects.get(&pack_key(&loc.pack)))?;
    ensure!(!got.is_empty());
    Ok(())
}
