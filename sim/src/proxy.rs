//! A fault-injecting TCP proxy for real-process tests: sits between agents
//! and the broker (or the aggregator and the sink) on 127.0.0.1, counts the
//! bytes each way, and can throttle, stall (open but silent) or cut links.
//!
//! Runs on its own thread with its own tokio runtime, so tests written as
//! plain blocking code can use it.

use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Default)]
struct Shared {
    /// Client → target bytes forwarded.
    up: AtomicU64,
    /// Target → client bytes forwarded.
    down: AtomicU64,
    /// Bytes per second each way per connection; 0 = unlimited.
    rate: AtomicU64,
    /// While set, new connections are refused (accepted and closed).
    down_link: AtomicBool,
    /// While set, connections stay open but nothing is forwarded.
    stalled: AtomicBool,
    connections: AtomicU64,
}

pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
    /// Bumped to close every open connection.
    cut_tx: watch::Sender<u64>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Proxy {
    /// Listens on 127.0.0.1:0 and forwards every connection to `target`.
    pub fn start(target: SocketAddr) -> Result<Proxy> {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").context("proxy bind")?;
        std_listener.set_nonblocking(true)?;
        let port = std_listener.local_addr()?.port();
        let shared = Arc::new(Shared::default());
        let (cut_tx, cut_rx) = watch::channel(0u64);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let sh = shared.clone();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::thread::Builder::new().name("proxy".into()).spawn(move || {
            rt.block_on(async move {
                let listener = match TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("proxy: {e}");
                        return;
                    }
                };
                tokio::select! {
                    _ = stop_rx => {}
                    _ = accept_loop(listener, target, sh, cut_rx) => {}
                }
            });
        })?;
        Ok(Proxy {
            port,
            shared,
            cut_tx,
            _stop: stop_tx,
        })
    }

    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}", self.port)
    }
    pub fn up_bytes(&self) -> u64 {
        self.shared.up.load(Ordering::Relaxed)
    }
    pub fn down_bytes(&self) -> u64 {
        self.shared.down.load(Ordering::Relaxed)
    }
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }
    /// Limits each direction of each connection to `bytes_per_sec` (0 = off).
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.shared.rate.store(bytes_per_sec, Ordering::Relaxed);
    }
    /// Closes every open connection and refuses new ones until `heal`.
    pub fn cut(&self) {
        self.shared.down_link.store(true, Ordering::SeqCst);
        self.cut_tx.send_modify(|g| *g += 1);
    }
    /// Closes every open connection once; new ones are accepted.
    pub fn reset(&self) {
        self.cut_tx.send_modify(|g| *g += 1);
    }
    pub fn heal(&self) {
        self.shared.down_link.store(false, Ordering::SeqCst);
        self.shared.stalled.store(false, Ordering::SeqCst);
    }
    /// Keeps connections open but forwards nothing (a silent link).
    pub fn stall(&self) {
        self.shared.stalled.store(true, Ordering::SeqCst);
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, sh: Arc<Shared>, cut: watch::Receiver<u64>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if sh.down_link.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        sh.connections.fetch_add(1, Ordering::Relaxed);
        let sh = sh.clone();
        let mut cut = cut.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(target).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            cut.mark_unchanged();
            tokio::select! {
                _ = pump(cr, sw, &sh, true) => {}
                _ = pump(sr, cw, &sh, false) => {}
                _ = cut.changed() => {}
            }
        });
    }
}

async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    sh: &Shared,
    up: bool,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        while sh.stalled.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let rate = sh.rate.load(Ordering::Relaxed);
        if rate > 0 {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
        }
        w.write_all(&buf[..n]).await?;
        let c = if up { &sh.up } else { &sh.down };
        c.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn forwards_counts_throttles_and_cuts() -> Result<()> {
        // An echo server.
        let echo = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = echo.local_addr()?;
        std::thread::spawn(move || {
            for s in echo.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut s = s;
                    let mut b = [0u8; 4096];
                    while let Ok(n) = s.read(&mut b) {
                        if n == 0 || s.write_all(&b[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let p = Proxy::start(addr)?;
        let mut c = std::net::TcpStream::connect(("127.0.0.1", p.port))?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        c.write_all(b"hello")?;
        let mut got = [0u8; 5];
        c.read_exact(&mut got)?;
        assert_eq!(&got, b"hello");
        // Counters move right after each write: poll briefly.
        let t = std::time::Instant::now();
        while (p.up_bytes(), p.down_bytes()) != (5, 5) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!((p.up_bytes(), p.down_bytes()), (5, 5));

        p.set_rate(20_000);
        let t = std::time::Instant::now();
        let data = vec![7u8; 10_000];
        c.write_all(&data)?;
        let mut back = vec![0u8; 10_000];
        c.read_exact(&mut back)?;
        assert!(
            t.elapsed() >= Duration::from_millis(400),
            "throttled: {:?}",
            t.elapsed()
        );
        p.set_rate(0);

        p.cut();
        let mut b = [0u8; 1];
        // The open connection is closed: EOF or an error.
        let r = c.read(&mut b);
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        p.heal();
        let mut c2 = std::net::TcpStream::connect(("127.0.0.1", p.port))?;
        c2.set_read_timeout(Some(Duration::from_secs(5)))?;
        c2.write_all(b"x")?;
        c2.read_exact(&mut b)?;
        assert_eq!(&b, b"x");
        Ok(())
    }
}
