//! Reconciliation on reconnect with real processes (issue 3, DESIGN.md §6):
//! two gateways of one site write the same shared paths while they know
//! nothing of each other; the cloud finds the concurrent versions with
//! version vectors and resolves each by its class's policy. Central metadata
//! set while a gateway is offline reaches it when it reconnects.

mod common;

use anyhow::{ensure, Context, Result};
use common::*;
use sim::procs::run_to_end;
use std::path::Path;

const CONFIG: &str = r#"
[[class]]
name = "setpoint"
globs = ["archive/line/setpoint.json"]
shared = true
conflict = "last-writer-wins"

[[class]]
name = "recipe"
globs = ["archive/line/recipe.txt"]
shared = true
conflict = "keep-both"

[[class]]
name = "line-log"
globs = ["archive/line/*.csv"]
append = true
shared = true
conflict = "append-merge"
"#;

fn write(f: &Fleet, dev: &str, rel: &str, body: &str) -> Result<()> {
    let p = f.archive(dev).join(rel);
    std::fs::create_dir_all(p.parent().context("parent")?)?;
    std::fs::write(p, body)?;
    Ok(())
}

fn sync(f: &Fleet, dev: &str, cfg: &Path) -> Result<serde_json::Value> {
    let mut args = vec!["sync".to_string()];
    args.extend(f.agent_args(dev));
    args.extend([
        "--config".into(),
        s(cfg),
        "--wait".into(),
        "cloud".into(),
        "--timeout".into(),
        "120".into(),
        "--json".into(),
    ]);
    let (ok, out, err) = run_to_end("edge-agent", &args, secs(150))?;
    ensure!(
        ok,
        "sync {dev} failed: {err}\n--- agg:\n{}",
        tail(&f.agg.log_text(), 30)
    );
    Ok(serde_json::from_str(&out)?)
}

fn sink_cli(f: &Fleet, args: &[&str]) -> Result<String> {
    let mut a: Vec<String> = vec![args[0].to_string(), "--sink".into(), f.sink_url.clone()];
    a.extend(args[1..].iter().map(|x| x.to_string()));
    let (ok, out, err) = run_to_end("cloud-sink", &a, secs(60))?;
    ensure!(ok, "cloud-sink {args:?} failed: {err}");
    Ok(out)
}

/// `cloud-sink restore --shared` of the test's site into `out`.
fn restore_shared(f: &Fleet, out: &Path) -> Result<()> {
    let (key, out) = (s(&f.key), s(out));
    sink_cli(
        f,
        &["restore", "--shared", "--site", "plant-1", "--key", &key, "--out", &out],
    )?;
    Ok(())
}

fn conflicts(f: &Fleet) -> Result<Vec<serde_json::Value>> {
    let out = sink_cli(f, &["conflicts", "--json"])?;
    let v: serde_json::Value = serde_json::from_str(&out).with_context(|| format!("conflicts JSON: {out}"))?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn of_path<'a>(cs: &'a [serde_json::Value], path: &str) -> Vec<&'a serde_json::Value> {
    cs.iter().filter(|c| c["path"] == path).collect()
}

/// On failure, prints the tails of every process log and keeps the work
/// dir (its path is printed) so a flaky run can be examined afterwards.
#[test]
fn concurrent_shared_writes_reconcile_and_metadata_flows_down() -> Result<()> {
    let f = Fleet::start(true)?;
    let r = scenario(&f);
    if r.is_err() {
        for log in ["agg.log", "agent-gw-b.log", "sink.log"] {
            let text = std::fs::read_to_string(f.dir().join(log)).unwrap_or_default();
            eprintln!("--- {log} (tail):\n{}", tail(&text, 60));
        }
        let Fleet { work, .. } = f;
        eprintln!("--- work dir kept: {}", work.keep().display());
    }
    r
}

fn scenario(f: &Fleet) -> Result<()> {
    let cfg = f.dir().join("shared.toml");
    std::fs::write(&cfg, CONFIG)?;
    let (a, b) = ("gw-a", "gw-b");

    // Both gateways capture the same line while neither knows the other's
    // versions: every shared path gets concurrent versions.
    write(f, a, "line/counts.csv", "ts,value\n1000,a1\n3000,both\n")?;
    write(f, a, "line/setpoint.json", "{\"sp\": 1}\n")?;
    write(f, a, "line/recipe.txt", "recipe from A\n")?;
    write(f, a, "own/notes.txt", "not shared\n")?;
    sync(f, a, &cfg)?;
    write(f, b, "line/counts.csv", "ts,value\n2000,b2\n3000,both\n4000,b4\n")?;
    write(f, b, "line/setpoint.json", "{\"sp\": 2}\n")?;
    write(f, b, "line/recipe.txt", "recipe from B\n")?;
    sync(f, b, &cfg)?;

    let cs = conflicts(f)?;
    for (path, policy) in [
        ("archive/line/counts.csv", "append-merge"),
        ("archive/line/setpoint.json", "last-writer-wins"),
        ("archive/line/recipe.txt", "keep-both"),
    ] {
        let c = of_path(&cs, path);
        ensure!(c.len() == 1, "one conflict on {path}, got {c:?}");
        ensure!(c[0]["policy"] == policy, "{path}: {}", c[0]);
    }
    ensure!(
        of_path(&cs, "archive/own/notes.txt").is_empty(),
        "unshared paths never conflict"
    );
    // B wrote later (higher HLC): it wins last-writer-wins.
    let lww = of_path(&cs, "archive/line/setpoint.json")[0];
    ensure!(lww["winner"]["device"] == b, "LWW winner: {lww}");

    // The shared view restores each resolution.
    let out = f.dir().join("shared-restore");
    restore_shared(f, &out)?;
    let read = |rel: &str| std::fs::read_to_string(out.join(rel)).with_context(|| format!("restored {rel}"));
    ensure!(
        read("archive/line/counts.csv")? == "ts,value\n1000,a1\n2000,b2\n3000,both\n4000,b4\n",
        "append-merge: union of records in timestamp order, once each: {:?}",
        read("archive/line/counts.csv")
    );
    ensure!(read("archive/line/setpoint.json")? == "{\"sp\": 2}\n");
    ensure!(read("archive/line/recipe.txt")? == "recipe from B\n");
    ensure!(read(&format!("archive/line/recipe.txt.conflict-{a}"))? == "recipe from A\n");
    // Each device's own history is untouched and restores as it was.
    f.assert_restore_equal(a)?;
    f.assert_restore_equal(b)?;

    // A reconnects and learns the cloud's vector of each shared path; its
    // next write then follows B's and is no new conflict.
    sync(f, a, &cfg)?;
    let st = f.status(a)?;
    let shared = st["shared"].as_array().cloned().unwrap_or_default();
    let counts = shared
        .iter()
        .find(|x| x["path"] == "archive/line/counts.csv")
        .with_context(|| format!("status shows shared paths: {st}"))?;
    ensure!(
        counts["vv"][b].as_u64().unwrap_or(0) > 0,
        "A knows B's version: {counts}"
    );
    write(f, a, "line/setpoint.json", "{\"sp\": 3}\n")?;
    sync(f, a, &cfg)?;
    let cs2 = conflicts(f)?;
    ensure!(
        cs2.len() == cs.len(),
        "a write after reconnecting is no conflict: {cs2:?}"
    );
    let out2 = f.dir().join("shared-restore-2");
    restore_shared(f, &out2)?;
    ensure!(std::fs::read_to_string(out2.join("archive/line/setpoint.json"))? == "{\"sp\": 3}\n");

    // Central metadata set while A is offline reaches it at its next connect.
    sink_cli(
        f,
        &["tag", "--device", a, "--path", "archive/line/**", "--add", "critical"],
    )?;
    sink_cli(
        f,
        &[
            "hold",
            "--device",
            a,
            "--path",
            "archive/line/**",
            "--reason",
            "audit-2026",
        ],
    )?;
    sink_cli(
        f,
        &["retain", "--device", a, "--path", "archive/line/**", "--days", "400"],
    )?;
    sync(f, a, &cfg)?;
    let st = f.status(a)?;
    let meta = st["metadata"].as_array().cloned().unwrap_or_default();
    let m = meta
        .iter()
        .find(|x| x["path"] == "archive/line/**")
        .with_context(|| format!("status shows metadata: {st}"))?;
    ensure!(
        m["tags"].as_array().is_some_and(|t| t.iter().any(|x| x == "critical")),
        "{m}"
    );
    ensure!(m["held"] == true && m["retain_days"] == 400, "{m}");

    // Online agents get it pushed without reconnecting.
    // The state file still says what B's last sync left: the daemon is up
    // once its snapshot answers (it holds the file) with the cursor its
    // Hello moved (A's syncs and the ops above allocated newer gseqs).
    let before = u(&f.status(b)?, "server_cursor");
    let mut agent = f.run_agent_with(b, &["--config", &s(&cfg)])?;
    let mut died = false;
    wait_until(secs(30), "B's daemon connected", || {
        died = died || !agent.alive();
        died || f
            .status(b)
            .is_ok_and(|st| st["from_snapshot"] == true && st["server_cursor"].as_u64().is_some_and(|c| c > before))
    })?;
    ensure!(!died, "B's daemon exited: {}", tail(&agent.log_text(), 20));
    sink_cli(f, &["tag", "--device", b, "--add", "line-3"])?;
    wait_until(secs(60), "tag pushed to the online agent", || {
        f.status(b).is_ok_and(|st| {
            st["metadata"].as_array().is_some_and(|ms| {
                ms.iter()
                    .any(|m| m["tags"].as_array().is_some_and(|t| t.iter().any(|x| x == "line-3")))
            })
        })
    })?;
    agent.kill();

    // The fleet view counts conflicts per device.
    let fleet = f.fleet_json()?;
    for d in [a, b] {
        let row = fleet
            .iter()
            .find(|r| r["device"] == d)
            .with_context(|| format!("{d} in fleet"))?;
        ensure!(u(row, "conflict_count") == 3, "{d}: {row}");
    }
    Ok(())
}
