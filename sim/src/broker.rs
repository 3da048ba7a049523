//! Real MQTT brokers for the demo and tests, bound to 127.0.0.1 on a free
//! port: the embedded rumqttd (no persistence: demo and tests only) and
//! Mosquitto from Debian's packages.

use anyhow::{anyhow, bail, Context, Result};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let start = Instant::now();
    while start.elapsed() < timeout {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listening on 127.0.0.1:{port} after {timeout:?}")
}

/// rumqttd running in a background thread. rumqttd has no shutdown API; it
/// lives until the process exits.
pub struct EmbeddedBroker {
    pub port: u16,
}

impl EmbeddedBroker {
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

/// Starts rumqttd with an MQTT v5 listener on 127.0.0.1:`port` (0 = pick).
pub fn start_embedded(port: u16) -> Result<EmbeddedBroker> {
    let port = if port == 0 { free_port()? } else { port };
    let max = protocol::msg::MQTT_MAX_PACKET;
    let cfg = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 20010
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v5.1]
name = "v5-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
    [v5.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = {max}
    max_inflight_count = 100
    dynamic_filters = true
"#
    );
    let config: rumqttd::Config = toml::from_str(&cfg).context("rumqttd config")?;
    std::thread::Builder::new().name("rumqttd".into()).spawn(move || {
        let mut broker = rumqttd::Broker::new(config);
        if let Err(e) = broker.start() {
            tracing::error!("embedded broker stopped: {e}");
        }
    })?;
    wait_for_port(port, Duration::from_secs(10))?;
    Ok(EmbeddedBroker { port })
}

/// A Mosquitto process; killed on drop.
pub struct Mosquitto {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    persistence: bool,
}

pub fn mosquitto_binary() -> Option<PathBuf> {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

impl Mosquitto {
    /// Starts Mosquitto on 127.0.0.1 with its config and (optional)
    /// persistence under `dir`. Persistence is off by default in Mosquitto;
    /// with it, sessions and queued QoS 1 messages survive a restart.
    pub fn start(dir: &Path, persistence: bool) -> Result<Mosquitto> {
        let mut m = Mosquitto {
            child: None,
            port: free_port()?,
            dir: dir.to_path_buf(),
            persistence,
        };
        m.spawn()?;
        Ok(m)
    }

    fn spawn(&mut self) -> Result<()> {
        let bin =
            mosquitto_binary().ok_or_else(|| anyhow!("mosquitto is not installed (apt-get install -y mosquitto)"))?;
        std::fs::create_dir_all(&self.dir)?;
        let conf = self.dir.join("mosquitto.conf");
        let mut text = format!(
            "listener {} 127.0.0.1\nallow_anonymous true\nmax_packet_size {}\nmax_inflight_messages 100\nmax_queued_messages 100000\nmax_queued_bytes 0\nlog_dest stderr\nlog_type error\nlog_type warning\n",
            self.port,
            protocol::msg::MQTT_MAX_PACKET + 1024,
        );
        if self.persistence {
            text.push_str(&format!(
                "persistence true\npersistence_location {}/\nautosave_interval 1\n",
                self.dir.display()
            ));
        }
        std::fs::write(&conf, text)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("mosquitto.log"))?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10))
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port and data directory.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}
