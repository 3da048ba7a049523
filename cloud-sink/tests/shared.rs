//! Shared paths and central metadata at the sink (issue 3, DESIGN.md §6):
//! conflicts found with version vectors and resolved per policy, the same
//! whatever the arrival order and after `rebuild`; `restore --shared`;
//! operator metadata as CRDT server changes with a monotone gseq; bad input.

mod common;

use anyhow::{ensure, Context, Result};
use cloud_sink::changes::{MetaOpRequest, MetaQuery, MetaView};
use cloud_sink::shared::{ConflictInfo, ConflictQuery};
use cloud_sink::{SharedRestoreRequest, SinkClient};
use common::*;
use protocol::meta::{MetaState, ServerBody, ServerChange};
use protocol::shared::{ConflictPolicy, VersionVector};
use protocol::{Change, DeviceRef};
use std::collections::BTreeMap;
use std::path::Path;

const KB: ConflictPolicy = ConflictPolicy::KeepBoth;
const LWW: ConflictPolicy = ConflictPolicy::LastWriterWins;
const AM: ConflictPolicy = ConflictPolicy::AppendMerge;

fn vv(e: &[(&str, u64)]) -> VersionVector {
    VersionVector(e.iter().map(|(d, ms)| (d.to_string(), hlc(*ms).0)).collect())
}

/// The two gateways' changes of one scenario, each as (change, chunks).
struct Scenario {
    a: Vec<Built>,
    a_del: Vec<Change>,
    b: Vec<Built>,
    b_del: Vec<Change>,
}

const COUNTS_A: &str = "ts,value\n1000,a1\n3000,both\n";
const COUNTS_B: &str = "ts,value\n2000,b2\n3000,both\n4000,b4\n";
const COUNTS_MERGED: &str = "ts,value\n1000,a1\n2000,b2\n3000,both\n4000,b4\n";

/// Gateways a and b of one site write shared paths without knowing each
/// other, except a's second setpoint, written after it saw b's.
fn scenario(a: &mut Device, b: &mut Device) -> Result<Scenario> {
    let none = VersionVector::default();
    let t = T0_MS;
    let a_list = vec![
        a.shared_file("line/recipe.txt", b"recipe from A\n", t + 1000, &none, KB)?,
        a.shared_file("line/setpoint.json", b"{\"sp\": 1}\n", t + 1000, &none, LWW)?,
        a.shared_file("line/mode.json", b"mode A\n", t + 1000, &none, LWW)?,
        a.shared_file("line/tmp.json", b"tmp A\n", t + 1000, &none, LWW)?,
        a.shared_file("line/counts.csv", COUNTS_A.as_bytes(), t + 1000, &none, AM)?,
        // Unshared: both devices write the same path in their own namespaces.
        a.file("own/notes.txt", b"notes A\n", t + 1000)?,
        // Saw b's setpoint (and its own first one): follows both, no conflict.
        a.shared_file(
            "line/setpoint.json",
            b"{\"sp\": 3}\n",
            t + 5000,
            &vv(&[("a", t + 1000), ("b", t + 2000)]),
            LWW,
        )?,
    ];
    let b_list = vec![
        b.shared_file("line/recipe.txt", b"recipe from B\n", t + 2000, &none, KB)?,
        b.shared_file("line/setpoint.json", b"{\"sp\": 2}\n", t + 2000, &none, LWW)?,
        b.shared_file("line/mode.json", b"mode B\n", t + 2000, &none, LWW)?,
        b.shared_file("line/counts.csv", COUNTS_B.as_bytes(), t + 2000, &none, AM)?,
        b.file("own/notes.txt", b"notes B\n", t + 2000)?,
    ];
    let b_del = vec![b.shared_delete("line/tmp.json", t + 2000, &none, LWW)];
    Ok(Scenario {
        a: a_list,
        a_del: Vec::new(),
        b: b_list,
        b_del,
    })
}

async fn conflicts(client: &SinkClient) -> Result<Vec<ConflictInfo>> {
    Ok(client.conflicts(&ConflictQuery::default()).await?)
}

async fn restore_shared(client: &SinkClient, dev: &Device, out: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let req = SharedRestoreRequest {
        site: "plant-1".into(),
        out_dir: out.to_path_buf(),
        ..SharedRestoreRequest::default()
    };
    cloud_sink::restore_shared(client, req, &dev.tenant).await?;
    tree(out)
}

fn devices(tk: &protocol::seal::TenantKey) -> Result<(Device, Device)> {
    let mut a = Device::new("a", tk)?;
    let mut b = Device::new("b", tk)?;
    // Distinct epochs are not needed; distinct keys are.
    a.replica.epoch = 7;
    b.replica.epoch = 9;
    Ok((a, b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_and_shared_restore_do_not_depend_on_arrival_order() -> Result<()> {
    let tk = protocol::seal::TenantKey::generate()?;
    let (mut a, mut b) = devices(&tk)?;
    let sc = scenario(&mut a, &mut b)?;

    // Sink 1: all of a, then all of b, one batch each.
    let d1 = tempfile::tempdir()?;
    let s1 = Sink::start(d1.path()).await?;
    sync_all(&s1.client, &sc.a.iter().collect::<Vec<_>>(), &sc.a_del, Via::Data).await?;
    sync_all(&s1.client, &sc.b.iter().collect::<Vec<_>>(), &sc.b_del, Via::PackFirst).await?;

    // Sink 2: b's deletion first, then every change alone, newest first.
    let d2 = tempfile::tempdir()?;
    let s2 = Sink::start(d2.path()).await?;
    sync_all(&s2.client, &[], &sc.b_del, Via::Data).await?;
    let mut all: Vec<&Built> = sc.a.iter().chain(sc.b.iter()).collect();
    all.sort_by_key(|x| std::cmp::Reverse(x.change.hlc));
    for x in all {
        sync_all(&s2.client, &[x], &[], Via::PackOnPrepare).await?;
    }

    let c1 = conflicts(&s1.client).await?;
    let c2 = conflicts(&s2.client).await?;
    ensure!(c1 == c2, "arrival order changed the conflicts:\n{c1:#?}\n{c2:#?}");
    let got: Vec<(&str, &str, &str, Option<&str>)> = c1
        .iter()
        .map(|c| {
            (
                c.path.as_str(),
                c.policy.as_str(),
                c.resolution.as_str(),
                c.winner.as_ref().map(|w| w.device.as_str()),
            )
        })
        .collect();
    ensure!(
        got == vec![
            ("line/counts.csv", "append-merge", "merged", None),
            ("line/mode.json", "last-writer-wins", "winner", Some("b")),
            ("line/recipe.txt", "keep-both", "both kept", Some("b")),
            // Only a's first setpoint and b's conflict: a's second saw b's.
            ("line/setpoint.json", "last-writer-wins", "winner", Some("b")),
            // b's deletion is the later version and wins.
            ("line/tmp.json", "last-writer-wins", "winner", Some("b")),
        ],
        "{got:#?}"
    );
    for c in &c1 {
        ensure!(c.tenant == "acme" && c.site == "plant-1", "{c:?}");
        let devs: Vec<&str> = c.versions.iter().map(|v| v.device.as_str()).collect();
        ensure!(devs == ["a", "b"], "{c:?}");
        ensure!(c.versions.iter().all(|v| v.time.ends_with('Z')), "{c:?}");
    }
    let sp = &c1[3];
    ensure!(
        sp.versions[0].seq == sc.a[1].change.seq && sp.versions[0].sha256.is_some(),
        "{sp:?}"
    );
    ensure!(
        c1[4].versions[1].deleted && c1[4].versions[1].sha256.is_none(),
        "{:?}",
        c1[4]
    );

    // Filters.
    let q = |device: Option<&str>, path: Option<&str>| ConflictQuery {
        device: device.map(str::to_string),
        path: path.map(str::to_string),
        ..ConflictQuery::default()
    };
    ensure!(s1.client.conflicts(&q(Some("a"), None)).await?.len() == 5);
    ensure!(s1.client.conflicts(&q(Some("c"), None)).await?.is_empty());
    ensure!(s1.client.conflicts(&q(None, Some("line/*.json"))).await?.len() == 3);
    ensure!(s1.client.conflicts(&q(None, Some("line"))).await?.len() == 5);

    // Fleet counts conflicts per device.
    let fleet = s1.client.fleet().await?;
    let counts: Vec<(String, u64)> = fleet.iter().map(|r| (r.device.clone(), r.conflict_count)).collect();
    ensure!(counts == vec![("a".into(), 5), ("b".into(), 5)], "{counts:?}");

    // The shared namespace restores the same from both sinks.
    let o1 = tempfile::tempdir()?;
    let o2 = tempfile::tempdir()?;
    let t1 = restore_shared(&s1.client, &a, o1.path()).await?;
    let t2 = restore_shared(&s2.client, &a, o2.path()).await?;
    ensure!(t1 == t2, "restore --shared differs by arrival order");
    let expect: BTreeMap<String, Vec<u8>> = [
        ("line/counts.csv", COUNTS_MERGED),
        // LWW among concurrent versions: the higher HLC (b).
        ("line/mode.json", "mode B\n"),
        // keep-both: the winner at the path, the other head flagged.
        ("line/recipe.txt", "recipe from B\n"),
        ("line/recipe.txt.conflict-a", "recipe from A\n"),
        // a's later version follows b's: it is the only head.
        ("line/setpoint.json", "{\"sp\": 3}\n"),
        // line/tmp.json: the winner is a deletion, so it is absent.
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
    .collect();
    ensure!(t1 == expect, "{:#?}", stringify(&t1));

    // As of a time before b wrote anything: a's versions alone, no conflicts.
    let o3 = tempfile::tempdir()?;
    let req = SharedRestoreRequest {
        site: "plant-1".into(),
        at: Some(cloud_sink::format_ms(T0_MS + 1500)),
        out_dir: o3.path().to_path_buf(),
        ..SharedRestoreRequest::default()
    }
    .with_path(Some("line/*.json"));
    cloud_sink::restore_shared(&s1.client, req, &a.tenant).await?;
    let t3 = stringify(&tree(o3.path())?);
    ensure!(
        t3 == [
            ("line/mode.json".to_string(), "mode A\n".to_string()),
            ("line/setpoint.json".into(), "{\"sp\": 1}\n".into()),
            ("line/tmp.json".into(), "tmp A\n".into()),
        ]
        .into_iter()
        .collect::<BTreeMap<_, _>>(),
        "{t3:#?}"
    );

    // Shared heads reached both devices as server changes: the join of the
    // vectors of every version of the path, and its conflicts.
    let ch = s1.client.changes(&a.dev, 0).await?;
    let head = ch
        .items
        .iter()
        .find_map(|c| match &c.body {
            ServerBody::SharedHead {
                path,
                vv,
                policy,
                conflicts,
            } if path == "line/setpoint.json" => Some((vv.clone(), *policy, *conflicts)),
            _ => None,
        })
        .context("shared head of setpoint")?;
    ensure!(
        head == (vv(&[("a", T0_MS + 5000), ("b", T0_MS + 2000)]), LWW, 1),
        "{head:?}"
    );
    ensure!(ch.items.len() == 5, "one head per shared path: {:?}", ch.items);
    ensure!(s1.client.changes(&b.dev, 0).await?.items.len() == 5);

    // Rebuild recomputes conflicts and heads from manifests alone.
    let upto = ch.upto.context("upto")?;
    s1.stop().await?;
    let rep = cloud_sink::rebuild(d1.path()).await?;
    ensure!(rep.bad_objects == 0, "{rep:?}");
    let s1 = Sink::start(d1.path()).await?;
    ensure!(conflicts(&s1.client).await? == c1, "rebuild changed the conflicts");
    let o4 = tempfile::tempdir()?;
    ensure!(restore_shared(&s1.client, &a, o4.path()).await? == t1);
    let after = s1.client.changes(&a.dev, upto).await?;
    ensure!(
        after.items.len() == 5 && after.items.iter().all(|c| c.gseq > upto),
        "after a rebuild every state has a gseq past the old cursor: {after:?}"
    );
    let fleet = s1.client.fleet().await?;
    ensure!(fleet.iter().all(|r| r.conflict_count == 5), "{fleet:?}");

    // A later version that saw everything adds no conflict.
    let seen = vv(&[("a", T0_MS + 1000), ("b", T0_MS + 2000)]);
    let later = b.shared_file("line/recipe.txt", b"recipe merged\n", T0_MS + 9000, &seen, KB)?;
    sync_all(&s1.client, &[&later], &[], Via::Data).await?;
    ensure!(
        conflicts(&s1.client).await? == c1,
        "a dominating version is no conflict"
    );
    let o5 = tempfile::tempdir()?;
    let t5 = restore_shared(&s1.client, &a, o5.path()).await?;
    ensure!(t5.get("line/recipe.txt").map(Vec::as_slice) == Some(&b"recipe merged\n"[..]));
    ensure!(!t5.contains_key("line/recipe.txt.conflict-a"), "{:?}", t5.keys());

    // The CLI: conflicts as a table and as JSON, and restore --shared.
    let table = cli(args(&["conflicts", "--sink", &s1.url])).await?;
    ensure!(
        table.contains("acme/plant-1 line/setpoint.json  [last-writer-wins] winner b"),
        "{table}"
    );
    ensure!(table.contains("[keep-both] both kept, b shown at the path"), "{table}");
    ensure!(
        table.contains("[append-merge] merged") && table.contains("(deleted)"),
        "{table}"
    );
    ensure!(table.ends_with("5 conflict(s)\n"), "{table}");
    let js = cli(args(&[
        "conflicts",
        "--sink",
        &s1.url,
        "--json",
        "--device",
        "a",
        "--path",
        "line/m*",
    ]))
    .await?;
    let rows: Vec<ConflictInfo> = serde_json::from_str(&js)?;
    ensure!(rows.len() == 1 && rows[0].path == "line/mode.json", "{rows:?}");
    let key = o5.path().join("tenant.key");
    std::fs::write(&key, a.tenant.to_file_string())?;
    let o6 = tempfile::tempdir()?;
    let out6 = o6.path().display().to_string();
    let kp = key.display().to_string();
    cli(args(&[
        "restore", "--sink", &s1.url, "--key", &kp, "--out", &out6, "--shared", "--site", "plant-1",
    ]))
    .await?;
    ensure!(tree(o6.path())? == t5, "CLI restore --shared");
    s1.stop().await?;
    s2.stop().await?;
    Ok(())
}

fn stringify(t: &BTreeMap<String, Vec<u8>>) -> BTreeMap<String, String> {
    t.iter()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).to_string()))
        .collect()
}

trait WithPath {
    fn with_path(self, p: Option<&str>) -> Self;
}
impl WithPath for SharedRestoreRequest {
    fn with_path(mut self, p: Option<&str>) -> Self {
        self.path_glob = p.map(str::to_string);
        self
    }
}

fn op(d: &DeviceRef, path: Option<&str>, op: &str, value: serde_json::Value) -> MetaOpRequest {
    MetaOpRequest {
        tenant: d.tenant.to_string(),
        site: d.site.to_string(),
        device: d.device.to_string(),
        path: path.map(str::to_string),
        op: op.into(),
        value,
    }
}

fn meta_of(ch: &[ServerChange], glob: &str) -> Option<(u64, MetaState)> {
    ch.iter().find_map(|c| match &c.body {
        ServerBody::Meta { path, state } if path == glob => Some((c.gseq, state.clone())),
        _ => None,
    })
}

/// Metadata without gseqs, for comparing across a rebuild.
fn shape(v: &[MetaView]) -> Vec<MetaView> {
    v.iter().map(|m| MetaView { gseq: 0, ..m.clone() }).collect()
}

/// Runs the `cloud-sink` binary (off the async workers); stdout on success.
async fn cli(args: Vec<String>) -> Result<String> {
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cloud-sink"))
            .args(&args)
            .env("RUST_LOG", "warn")
            .output()?;
        ensure!(
            out.status.success(),
            "cloud-sink {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    })
    .await?
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|x| x.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_ops_become_crdt_server_changes_and_survive_rebuild() -> Result<()> {
    let tk = protocol::seal::TenantKey::generate()?;
    let (mut a, mut b) = devices(&tk)?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start(dir.path()).await?;
    let fa = a.file("x/a.txt", b"a", T0_MS)?;
    let fb = b.file("x/b.txt", b"b", T0_MS)?;
    sync_all(&sink.client, &[&fa, &fb], &[], Via::Data).await?;
    let c = &sink.client;

    let empty = c.changes(&a.dev, 0).await?;
    ensure!(empty.items.is_empty(), "{empty:?}");

    let v1 = c.meta_op(&op(&a.dev, None, "tag-add", "critical".into())).await?;
    ensure!(
        v1.path == "**" && v1.tags == ["critical"] && v1.changed == Some(true),
        "{v1:?}"
    );
    let held = c.meta_op(&op(&a.dev, None, "hold", "audit".into())).await?;
    ensure!(held.held && held.gseq > v1.gseq, "{held:?}");
    let ch = c.changes(&a.dev, 0).await?;
    let (g, s) = meta_of(&ch.items, "**").context("meta state")?;
    ensure!(g == held.gseq && ch.items.len() == 1, "one state per target: {ch:?}");
    ensure!(s.tags.values() == ["critical"] && s.held(), "{s:?}");
    ensure!(ch.upto.is_some_and(|u| u >= g), "{ch:?}");
    // The device with nothing set gets nothing; `after` filters.
    ensure!(c.changes(&b.dev, 0).await?.items.is_empty());
    ensure!(c.changes(&a.dev, g).await?.items.is_empty());

    // Retention is a max-register: a lower value changes nothing.
    let r = c.meta_op(&op(&a.dev, None, "retain", 30.into())).await?;
    ensure!(r.retain_days == 30 && r.gseq > g, "{r:?}");
    let r2 = c.meta_op(&op(&a.dev, None, "retain", "10".into())).await?;
    ensure!(
        r2.retain_days == 30 && r2.changed == Some(false) && r2.gseq == r.gseq,
        "{r2:?}"
    );

    // Observed remove: the device's stale copy that still has the tag merges
    // with the removal to "removed"; a hold re-added after a release wins
    // over the stale released copy (add wins).
    let stale = meta_of(&c.changes(&a.dev, 0).await?.items, "**").context("state")?.1;
    let rm = c.meta_op(&op(&a.dev, None, "tag-remove", "critical".into())).await?;
    ensure!(rm.tags.is_empty(), "{rm:?}");
    let rel = c.meta_op(&op(&a.dev, None, "release", "audit".into())).await?;
    ensure!(!rel.held, "{rel:?}");
    let released = meta_of(&c.changes(&a.dev, 0).await?.items, "**").context("state")?.1;
    let mut merged = stale.clone();
    merged.merge(&released);
    ensure!(!merged.tags.contains("critical") && !merged.held(), "{merged:?}");
    c.meta_op(&op(&a.dev, None, "hold", "audit".into())).await?;
    let rehold = meta_of(&c.changes(&a.dev, 0).await?.items, "**").context("state")?.1;
    let mut m2 = released.clone();
    m2.merge(&rehold);
    ensure!(m2.held(), "a new hold wins over the earlier release: {m2:?}");
    // Another target of the same device, and of b.
    let t2 = c
        .meta_op(&op(&a.dev, Some("archive/line/**"), "tag-add", "line-3".into()))
        .await?;
    let tb = c.meta_op(&op(&b.dev, None, "hold", "court".into())).await?;
    ensure!(tb.gseq > t2.gseq, "{tb:?} {t2:?}");
    let ch = c.changes(&a.dev, 0).await?;
    ensure!(ch.items.len() == 2, "{ch:?}");
    let only_new = c.changes(&a.dev, t2.gseq - 1).await?;
    ensure!(
        only_new.items.len() == 1 && meta_of(&only_new.items, "archive/line/**").is_some(),
        "{only_new:?}"
    );

    // The fleet-wide feed: gseq order, paged.
    let all = c.fleet_changes(0, None).await?;
    ensure!(!all.more && all.items.len() == 3, "{all:?}");
    ensure!(
        all.items.windows(2).all(|w| w[0].change.gseq < w[1].change.gseq),
        "{all:?}"
    );
    ensure!(all.upto == tb.gseq, "{all:?}");
    let mut cursor = 0;
    let mut paged = Vec::new();
    loop {
        let p = c.fleet_changes(cursor, Some(1)).await?;
        ensure!(p.items.len() <= 1, "{p:?}");
        ensure!(p.upto >= cursor, "{p:?}");
        paged.extend(p.items);
        cursor = p.upto;
        if !p.more {
            break;
        }
    }
    ensure!(paged == all.items, "pages: {paged:?}");
    ensure!(c.fleet_changes(all.upto, None).await?.items.is_empty());

    // The CLI finds the device by id and sends ops over HTTP.
    let url = sink.url.clone();
    let out = cli(args(&[
        "tag", "--sink", &url, "--device", "b", "--add", "cli", "--json",
    ]))
    .await?;
    let v: MetaView = serde_json::from_str(&out)?;
    ensure!(v.tags == ["cli"] && v.holds == ["court"], "{v:?}");
    cli(args(&["tag", "--sink", &url, "--device", "b", "--remove", "cli"])).await?;
    let out = cli(args(&[
        "retain", "--sink", &url, "--device", "b", "--path", "x/**", "--days", "90",
    ]))
    .await?;
    ensure!(out.contains("acme/plant-1/b") && out.contains("90d"), "{out}");
    let out = cli(args(&[
        "hold", "--sink", &url, "--device", "b", "--path", "x/**", "--reason", "r1",
    ]))
    .await?;
    ensure!(out.contains("HELD"), "{out}");
    cli(args(&[
        "hold",
        "--sink",
        &url,
        "--device",
        "b",
        "--path",
        "x/**",
        "--reason",
        "r1",
        "--release",
    ]))
    .await?;
    let out = cli(args(&["meta", "--sink", &url, "--device", "b", "--json"])).await?;
    let rows: Vec<MetaView> = serde_json::from_str(&out)?;
    ensure!(rows.len() == 2, "{rows:?}");
    ensure!(
        rows.iter().all(|m| m.tags.is_empty()) && !rows[1].held && rows[1].retain_days == 90,
        "{rows:?}"
    );
    let out = cli(args(&["meta", "--sink", &url])).await?;
    ensure!(out.lines().count() == 5, "{out}");
    ensure!(
        cli(args(&["tag", "--sink", &url, "--device", "zz", "--add", "t"]))
            .await
            .is_err(),
        "an unknown device is an error"
    );
    let all = c.fleet_changes(0, None).await?;

    let before = c.meta(&MetaQuery::default()).await?;
    ensure!(before.len() == 4, "{before:?}");
    let only_b = c
        .meta(&MetaQuery {
            device: Some("b".into()),
            ..MetaQuery::default()
        })
        .await?;
    ensure!(only_b.len() == 2 && only_b[0].holds == ["court"], "{only_b:?}");

    // Rebuild: the ops' objects recreate the states; every gseq moves past
    // the old cursor, and new ops keep counting up.
    let old_upto = all.upto;
    sink.stop().await?;
    let rep = cloud_sink::rebuild(dir.path()).await?;
    ensure!(rep.meta_ops >= 8 && rep.bad_objects == 0, "{rep:?}");
    let sink = Sink::start(dir.path()).await?;
    let c = &sink.client;
    let after = c.meta(&MetaQuery::default()).await?;
    ensure!(shape(&after) == shape(&before), "{after:?}\n{before:?}");
    ensure!(after.iter().all(|m| m.gseq > old_upto), "{after:?}");
    let again = c.changes(&a.dev, old_upto).await?;
    ensure!(c.changes(&b.dev, old_upto).await?.items.len() == 2);
    ensure!(again.items.len() == 2, "{again:?}");
    // Dots survived: removing the re-added hold still works, and the stale
    // copy merged with the new state stays without the removed tag.
    let rel2 = c.meta_op(&op(&a.dev, None, "release", "audit".into())).await?;
    ensure!(!rel2.held && rel2.gseq > old_upto, "{rel2:?}");
    let now = meta_of(&c.changes(&a.dev, 0).await?.items, "**").context("state")?.1;
    let mut m3 = stale;
    m3.merge(&now);
    ensure!(!m3.tags.contains("critical") && !m3.held(), "{m3:?}");
    sink.stop().await?;
    Ok(())
}

async fn refused(resp: reqwest::Response, status: u16, why: &str) -> Result<()> {
    let got = resp.status().as_u16();
    let text = resp.text().await?;
    ensure!(got == status, "wanted {status} ({why}), got {got}: {text}");
    ensure!(text.contains(why), "reason {text:?} lacks {why:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_metadata_and_query_input_is_refused_with_a_reason() -> Result<()> {
    let tk = protocol::seal::TenantKey::generate()?;
    let (mut a, _) = devices(&tk)?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start(dir.path()).await?;
    let fa = a.file("x/a.txt", b"a", T0_MS)?;
    sync_all(&sink.client, &[&fa], &[], Via::Data).await?;
    let http = reqwest::Client::new();
    let url = |p: &str| format!("{}/v1/{p}", sink.url);
    let post = |body: Vec<u8>| {
        http.post(url("meta"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let json = |v: serde_json::Value| serde_json::to_vec(&v).unwrap_or_default();
    let base = serde_json::json!({"tenant": "acme", "site": "plant-1", "device": "a", "op": "tag-add", "value": "x"});
    let with = |k: &str, v: serde_json::Value| {
        let mut b = base.clone();
        b[k] = v;
        json(b)
    };
    refused(post(with("op", "tag-smash".into())).await?, 400, "unknown op").await?;
    refused(post(with("path", "a[".into())).await?, 400, "bad path glob").await?;
    refused(post(with("path", "".into())).await?, 400, "bad path glob").await?;
    refused(post(with("device", "../x".into())).await?, 400, "bad device").await?;
    refused(post(with("tenant", "ACME".into())).await?, 400, "bad device").await?;
    refused(post(with("value", "x".repeat(300).into())).await?, 400, "tag must be").await?;
    refused(post(with("value", 5.into())).await?, 400, "a string").await?;
    refused(post(b"not json".to_vec()).await?, 400, "not a metadata op").await?;
    refused(post(with("extra", 1.into())).await?, 400, "unknown field").await?;
    let mut retain = base.clone();
    retain["op"] = "retain".into();
    for bad in [
        serde_json::json!(0),
        serde_json::json!(-3),
        serde_json::json!("soon"),
        serde_json::json!(10_000_000),
    ] {
        retain["value"] = bad;
        refused(post(json(retain.clone())).await?, 400, "number of days").await?;
    }
    refused(post(with("device", "nobody".into())).await?, 404, "unknown device").await?;
    refused(post(vec![b' '; 100 << 10]).await?, 413, "exceeds the length limit").await?;
    ensure!(
        sink.client.meta(&MetaQuery::default()).await?.is_empty(),
        "nothing was stored"
    );

    let get = |q: &str| http.get(format!("{}/v1/{q}", sink.url)).send();
    refused(get("changes?device=a&after=0").await?, 400, "together").await?;
    refused(
        get("changes?tenant=acme&site=plant-1&device=A").await?,
        400,
        "bad device",
    )
    .await?;
    refused(
        get("changes?tenant=acme&site=plant-1&device=a&limit=5").await?,
        400,
        "limit",
    )
    .await?;
    refused(get("changes?after=0&limit=0").await?, 400, "at least 1").await?;
    refused(get("changes?after=soon").await?, 400, "after").await?;
    refused(get("changes?after=0&color=blue").await?, 400, "unknown field").await?;
    refused(get("conflicts?path=a%5B").await?, 400, "bad path glob").await?;
    refused(get("shared").await?, 400, "site").await?;
    refused(get("shared?site=Plant").await?, 400, "bad site").await?;
    refused(get("shared?site=plant-1&at=yesterday").await?, 400, "bad time").await?;
    // A huge limit is capped, not refused.
    let ok = http.get(url("changes?after=0&limit=99999999")).send().await?;
    ensure!(ok.status().is_success(), "{}", ok.status());
    // The sink still works.
    let v = sink.client.meta_op(&op(&a.dev, None, "tag-add", "ok".into())).await?;
    ensure!(v.tags == ["ok"], "{v:?}");
    sink.stop().await?;
    Ok(())
}

/// Random well-formed histories (each gateway's vector accumulates what it
/// wrote and saw; it sometimes observes another's version): the catalog's
/// conflicts are exactly `protocol::shared::concurrent_pairs`, and applying
/// the changes in another order and batching gives the same conflicts and
/// shared heads.
#[test]
fn indexed_conflicts_match_the_protocol_in_any_arrival_order() -> Result<()> {
    use protocol::shared::{concurrent_pairs, SharedVersion};
    let tk = protocol::seal::TenantKey::generate()?;
    let names = ["a", "b", "c"];
    let mut devs: Vec<Device> = names.iter().map(|n| Device::new(n, &tk)).collect::<Result<_>>()?;
    let (mut total, mut none) = (0, 0);
    for seed in 1..25u64 {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut local: Vec<VersionVector> = vec![VersionVector::default(); names.len()];
        let mut changes: Vec<Change> = Vec::new();
        let mut written: Vec<(String, SharedVersion)> = Vec::new();
        for i in 0..(6 + rnd(10)) {
            let d = rnd(3) as usize;
            if seed % 4 == 0 {
                // A fully synced site: every write saw all before it.
                for (_, seen) in &written {
                    local[d].merge(&seen.vv);
                }
            } else if !written.is_empty() && rnd(2) == 0 {
                let (_, seen) = &written[rnd(written.len() as u64) as usize];
                local[d].merge(&seen.vv);
            }
            let path = if rnd(3) == 0 { "line/b.csv" } else { "line/a.csv" };
            let ms = T0_MS + 1000 + i * 10;
            let policy = [KB, LWW, AM][rnd(3) as usize];
            let c = if rnd(5) == 0 {
                devs[d].shared_delete(path, ms, &local[d], policy)
            } else {
                devs[d]
                    .shared_file(path, format!("{i}\n").as_bytes(), ms, &local[d], policy)?
                    .change
            };
            let sh = c.shared.clone().context("shared")?;
            local[d].merge(&sh.vv);
            written.push((
                path.to_string(),
                SharedVersion {
                    device: names[d].to_string(),
                    hlc: c.hlc,
                    vv: sh.vv,
                    deleted: false,
                },
            ));
            changes.push(c);
        }
        // Expected: the protocol's pairs, per path, as (path, (dev, hlc), (dev, hlc)).
        let mut expect = std::collections::BTreeSet::new();
        for path in ["line/a.csv", "line/b.csv"] {
            let vs: Vec<SharedVersion> = written
                .iter()
                .filter(|(p, _)| p == path)
                .map(|(_, v)| v.clone())
                .collect();
            for (i, j) in concurrent_pairs(&vs) {
                let (p, q) = (&vs[i], &vs[j]);
                let (p, q) = if (&p.device, p.hlc) < (&q.device, q.hlc) {
                    (p, q)
                } else {
                    (q, p)
                };
                expect.insert((
                    path.to_string(),
                    (p.device.clone(), p.hlc.0),
                    (q.device.clone(), q.hlc.0),
                ));
            }
        }
        let dir = tempfile::tempdir()?;
        let one = cloud_sink::Catalog::open(&dir.path().join("one.redb"))?;
        one.apply(&changes, None)?;
        let two = cloud_sink::Catalog::open(&dir.path().join("two.redb"))?;
        let mut shuffled = changes.clone();
        for i in (1..shuffled.len()).rev() {
            shuffled.swap(i, rnd(i as u64 + 1) as usize);
        }
        let mut rest = shuffled.as_slice();
        while !rest.is_empty() {
            let n = (1 + rnd(3) as usize).min(rest.len());
            two.apply(&rest[..n], None)?;
            rest = &rest[n..];
        }
        let c1 = one.conflicts(&ConflictQuery::default())?;
        let c2 = two.conflicts(&ConflictQuery::default())?;
        ensure!(c1 == c2, "seed {seed}: order changed the conflicts");
        let got: std::collections::BTreeSet<_> = c1
            .iter()
            .map(|c| {
                let (p, q) = (&c.versions[0], &c.versions[1]);
                (c.path.clone(), (p.device.clone(), p.hlc), (q.device.clone(), q.hlc))
            })
            .collect();
        ensure!(got.len() == c1.len(), "seed {seed}: a conflict twice");
        ensure!(got == expect, "seed {seed}:\n got {got:?}\nwant {expect:?}");
        total += got.len();
        none += usize::from(got.is_empty());
        for d in &devs {
            let body = |c: &cloud_sink::Catalog| -> Result<Vec<ServerBody>> {
                let mut b: Vec<ServerBody> = c.device_changes(&d.dev, 0)?.items.into_iter().map(|i| i.body).collect();
                b.sort_by_key(ServerBody::target);
                Ok(b)
            };
            ensure!(
                body(&one)? == body(&two)?,
                "seed {seed}: shared heads differ for {}",
                d.dev
            );
        }
    }
    ensure!(
        total > 20 && none > 0,
        "histories too uniform: {total} conflicts, {none} without"
    );
    eprintln!("{total} conflicts over 24 histories, {none} without any");
    Ok(())
}
