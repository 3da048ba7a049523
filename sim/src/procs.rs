//! Real Ferry processes for end-to-end tests: find (or build) the binaries,
//! start them with logs to files, SIGKILL and restart them.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Directory holding the workspace binaries of the current profile.
pub fn bin_dir() -> Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| find_or_build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn find_or_build() -> Result<PathBuf> {
    // Test binaries live in target/<profile>/deps; the daemons one level up.
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("exe has no parent")?.to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let names = ["edge-agent", "aggregator", "cloud-sink"];
    // Outside cargo (no $CARGO) use what is there. Under `cargo test`, build
    // once per test process: `cargo test -p sim` alone does not rebuild the
    // other crates' binaries, and a stale daemon would test old code.
    if names.iter().all(|n| dir.join(n).exists()) && (std::env::var_os("CARGO").is_none() || !stale(&dir, &names)) {
        return Ok(dir);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let release = dir.ends_with("release");
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--bins",
        "-p",
        "edge-agent",
        "-p",
        "aggregator",
        "-p",
        "cloud-sink",
    ]);
    if release {
        cmd.arg("--release");
    }
    let st = cmd.status().context("running cargo build for the daemons")?;
    if !st.success() || !names.iter().all(|n| dir.join(n).exists()) {
        bail!("could not build the daemons into {}", dir.display());
    }
    Ok(dir)
}

/// True when a source file of the workspace is newer than the oldest binary.
fn stale(dir: &Path, names: &[&str]) -> bool {
    let oldest_bin = names
        .iter()
        .filter_map(|n| std::fs::metadata(dir.join(n)).and_then(|m| m.modified()).ok())
        .min();
    let Some(oldest_bin) = oldest_bin else { return true };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut newest = None;
    for sub in ["protocol", "edge-agent", "aggregator", "cloud-sink"] {
        for e in walkdir::WalkDir::new(root.join(sub).join("src")).into_iter().flatten() {
            if let Ok(t) = std::fs::metadata(e.path()).and_then(|m| m.modified()) {
                newest = newest.max(Some(t));
            }
        }
    }
    for f in ["Cargo.lock", "Cargo.toml"] {
        if let Ok(t) = std::fs::metadata(root.join(f)).and_then(|m| m.modified()) {
            newest = newest.max(Some(t));
        }
    }
    newest.is_some_and(|n| n > oldest_bin)
}

/// A running daemon; SIGKILLed on drop.
pub struct Proc {
    pub name: String,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Starts `bin` with `args`; stdout+stderr go to `log` (appended).
    pub fn start(bin: &str, args: &[String], log: &Path) -> Result<Proc> {
        let mut p = Proc {
            name: bin.to_string(),
            args: args.to_vec(),
            envs: Vec::new(),
            log: log.to_path_buf(),
            child: None,
        };
        p.spawn()?;
        Ok(p)
    }

    fn spawn(&mut self) -> Result<()> {
        let path = bin_dir()?.join(&self.name);
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let err = out.try_clone()?;
        let child = Command::new(&path)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", path.display()))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a daemon binary to completion with a timeout; returns (exit ok,
/// stdout, stderr). Output goes through temp files, not pipes, so a chatty
/// process can never block on a full pipe while we wait for it.
pub fn run_to_end(bin: &str, args: &[String], timeout: Duration) -> Result<(bool, String, String)> {
    let path = bin_dir()?.join(bin);
    let out = tempfile::tempfile()?;
    let err = tempfile::tempfile()?;
    let mut child = Command::new(&path)
        .args(args)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(err.try_clone()?)
        .spawn()
        .with_context(|| format!("starting {}", path.display()))?;
    let start = Instant::now();
    let read = |mut f: &std::fs::File| -> String {
        use std::io::{Read, Seek};
        let mut s = Vec::new();
        let _ = f.rewind().and_then(|_| f.read_to_end(&mut s));
        String::from_utf8_lossy(&s).into_owned()
    };
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok((st.success(), read(&out), read(&err)));
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{bin} {args:?} did not finish in {timeout:?}\nstderr:\n{}", read(&err));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
