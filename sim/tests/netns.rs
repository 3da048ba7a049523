//! A gateway behind a slow link made with `tc tbf`, in network namespaces
//! this test creates itself: the region (Mosquitto, aggregator, cloud-sink)
//! lives in one namespace, the agent in another, joined by a veth pair whose
//! agent end is limited to 8 Mbit/s. Traffic never leaves the two namespaces.
//!
//! Needs root, iproute2 and the tbf qdisc; elsewhere it says why and passes
//! without running (this kernel has tbf but not netem).

mod common;

use anyhow::{bail, Context, Result};
use common::{noise, s};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Netns {
    region: String,
    gateway: String,
    children: Vec<Child>,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    if !out.status.success() {
        bail!("ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl Netns {
    fn create(tag: u32) -> Result<Netns> {
        let n = Netns {
            region: format!("ferry-r-{tag}"),
            gateway: format!("ferry-g-{tag}"),
            children: Vec::new(),
        };
        let (va, vb) = (format!("fr{tag}"), format!("fg{tag}"));
        let net = tag % 250;
        ip(&["netns", "add", &n.region])?;
        ip(&["netns", "add", &n.gateway])?;
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        ip(&["link", "set", &va, "netns", &n.region])?;
        ip(&["link", "set", &vb, "netns", &n.gateway])?;
        ip(&[
            "-n",
            &n.region,
            "addr",
            "add",
            &format!("10.213.{net}.1/24"),
            "dev",
            &va,
        ])?;
        ip(&[
            "-n",
            &n.gateway,
            "addr",
            "add",
            &format!("10.213.{net}.2/24"),
            "dev",
            &vb,
        ])?;
        for (ns, dev) in [(&n.region, &va), (&n.gateway, &vb)] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let st = Command::new("tc")
            .args(["-n", &n.gateway, "qdisc", "add", "dev", &vb, "root", "tbf"])
            .args(["rate", "8mbit", "burst", "32kbit", "latency", "400ms"])
            .status()?;
        if !st.success() {
            bail!("tc tbf failed");
        }
        Ok(n)
    }

    fn spawn(&mut self, ns: &str, bin: &Path, args: &[String], log: &Path) -> Result<()> {
        let out = std::fs::File::create(log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        self.children.push(child);
        Ok(())
    }

    fn run(&self, ns: &str, bin: &Path, args: &[String], timeout: Duration) -> Result<(bool, String)> {
        let log = tempfile::NamedTempFile::new()?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.reopen()?)
            .stderr(log.reopen()?)
            .spawn()?;
        let t = Instant::now();
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok((st.success(), std::fs::read_to_string(log.path()).unwrap_or_default()));
            }
            if t.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} timed out: {}", bin.display(), std::fs::read_to_string(log.path())?);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting a namespace removes its end of the veth pair, and so both.
        let _ = ip(&["netns", "del", &self.gateway]);
        let _ = ip(&["netns", "del", &self.region]);
    }
}

fn wait_for_log(path: &Path, needle: &str, timeout: Duration) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if std::fs::read_to_string(path).unwrap_or_default().contains(needle) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{} never said {needle:?}", path.display())
}

#[test]
fn gateway_behind_an_8_mbit_tbf_link_syncs_and_restores() -> Result<()> {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))?;
    let Some(mosquitto) = sim::broker::mosquitto_binary() else {
        eprintln!("SKIP: mosquitto not installed");
        return Ok(());
    };
    if !is_root {
        eprintln!("SKIP: network namespaces need root");
        return Ok(());
    }
    let tag = std::process::id() % 60_000;
    let mut ns = match Netns::create(tag) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("SKIP: cannot create network namespaces with tbf here: {e:#}");
            let _ = ip(&["netns", "del", &format!("ferry-g-{tag}")]);
            let _ = ip(&["netns", "del", &format!("ferry-r-{tag}")]);
            return Ok(());
        }
    };
    let bins = sim::procs::bin_dir()?;
    let work = tempfile::tempdir()?;
    let w = work.path();
    let addr = format!("10.213.{}.1", tag % 250);
    let region = ns.region.clone();
    let gateway = ns.gateway.clone();

    std::fs::write(
        w.join("m.conf"),
        format!(
            "listener 1883 {addr}\nallow_anonymous true\nmax_packet_size {}\n",
            protocol::msg::MQTT_MAX_PACKET + 1024
        ),
    )?;
    ns.spawn(
        &region,
        &mosquitto,
        &["-c".into(), s(w.join("m.conf"))],
        &w.join("mosquitto.log"),
    )?;
    ns.spawn(
        &region,
        &bins.join("cloud-sink"),
        &[
            "serve".into(),
            "--data".into(),
            s(w.join("cloud")),
            "--listen".into(),
            "127.0.0.1:8080".into(),
        ],
        &w.join("sink.log"),
    )?;
    wait_for_log(&w.join("sink.log"), "cloud-sink serving", Duration::from_secs(20))?;
    ns.spawn(
        &region,
        &bins.join("aggregator"),
        &[
            "run".into(),
            "--broker".into(),
            format!("mqtt://{addr}:1883"),
            "--sink".into(),
            "http://127.0.0.1:8080".into(),
            "--data".into(),
            s(w.join("region")),
            "--pack-max-delay".into(),
            "200ms".into(),
        ],
        &w.join("agg.log"),
    )?;

    let key = w.join("tenant.key");
    let (ok, out) = ns.run(
        &gateway,
        &bins.join("edge-agent"),
        &["keygen".into(), "--out".into(), s(&key)],
        Duration::from_secs(20),
    )?;
    assert!(ok, "{out}");
    let archive = w.join("gw").join("archive");
    std::fs::create_dir_all(&archive)?;
    let size = 3 << 20;
    std::fs::write(archive.join("frame.raw"), noise(size, 5))?;
    std::fs::write(archive.join("line.csv"), "ts,v\n1,2\n")?;

    let t = Instant::now();
    let (ok, out) = ns.run(
        &gateway,
        &bins.join("edge-agent"),
        &[
            "sync".into(),
            "--broker".into(),
            format!("mqtt://{addr}:1883"),
            "--tenant".into(),
            "acme".into(),
            "--site".into(),
            "p1".into(),
            "--device".into(),
            "slow-gw".into(),
            "--watch".into(),
            s(&archive),
            "--state".into(),
            s(w.join("gw").join("agent.redb")),
            "--key".into(),
            s(&key),
            "--timeout".into(),
            "90".into(),
        ],
        Duration::from_secs(120),
    )?;
    let secs = t.elapsed().as_secs_f64();
    assert!(ok, "sync over the tbf link failed:\n{out}");
    // 3 MiB of incompressible data over 8 Mbit/s takes at least ~3.1 s: the
    // link limit was in force (and the sync still completed through it).
    eprintln!("3 MiB over an 8 Mbit/s tbf link: cloud-durable in {secs:.1} s");
    assert!(secs > 2.5, "sync took {secs:.1} s: the tbf limit was not in the path");

    let out_dir = w.join("restored");
    let (ok, out) = ns.run(
        &region,
        &bins.join("cloud-sink"),
        &[
            "restore".into(),
            "--sink".into(),
            "http://127.0.0.1:8080".into(),
            "--device".into(),
            "slow-gw".into(),
            "--key".into(),
            s(&key),
            "--out".into(),
            s(&out_dir),
        ],
        Duration::from_secs(60),
    )?;
    assert!(ok, "{out}");
    let diffs = sim::tree::diff_trees(&archive, &out_dir.join("archive"))?;
    assert!(diffs.is_empty(), "{diffs:?}");
    Ok(())
}
