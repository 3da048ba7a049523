//! MQTT v5 driver (CONTRACTS.md): connects with a persistent session, feeds
//! the sans-IO `ClientSession`, publishes what it transmits, and runs scans.
//!
//! Shape: one task owns the agent (store, session, scans) and does all the
//! work; a small task only polls rumqttc's event loop (polling must never
//! stop, or keepalives lapse) and forwards the few events that matter over
//! a bounded channel. Publishing uses `try_publish`; when rumqttc's request
//! channel is full, the one encoded message is held and retried on the next
//! progress event. With `data_bytes` = 512 KiB, request capacity 8 and 8
//! in-flight publishes, MQTT buffering stays under ~9 MiB.
//!
//! rumqttc keeps unacked publishes in memory only and drops them when the
//! broker answers `session_present = 0`; that is fine because the redb
//! outbox is the truth and every ConnAck restarts the flow with Hello.

use crate::error::{Error, Result};
use crate::store::now_ms;
use crate::{Agent, ScanReport, SyncReport, WaitLevel};
use bytes::Bytes;
use protocol::client::{ClientSession, Event as SessionEvent};
use protocol::msg::{Message, MQTT_MAX_PACKET};
use protocol::topic;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use rumqttc::Outgoing;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub(crate) enum Mode {
    Run,
    Sync { wait: WaitLevel, timeout: Duration },
}

enum NetEvent {
    Connected,
    Publish {
        topic: Bytes,
        payload: Bytes,
    },
    /// rumqttc took a request or got an ack: a held publish may fit now.
    Progress,
    Down(String),
}

/// Default MQTT keepalive. rumqttc pings every keepalive and fails the
/// connection when a ping is still unanswered at the next one, so an idle
/// silent link is noticed within about twice this; a busy one by the
/// liveness watchdog (see [`dead_after`]).
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(15);
/// The shortest keepalive rumqttc accepts.
pub const MIN_KEEPALIVE: Duration = Duration::from_secs(5);
const SESSION_EXPIRY_SECS: u32 = 7 * 24 * 3600;
const REQUEST_CAPACITY: usize = 8;
const INFLIGHT: u16 = 8;
const PERSIST_EVERY: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// `mqtt://host:port`, `tcp://host:port` or `host[:port]` (default 1883).
pub fn parse_broker(url: &str) -> Result<(String, u16)> {
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .unwrap_or(url);
    if rest.contains("://") {
        return Err(Error::Config(format!(
            "broker {url:?}: only mqtt:// and tcp:// are supported by this build"
        )));
    }
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h,
            p.parse::<u16>()
                .map_err(|_| Error::Config(format!("broker {url:?}: bad port")))?,
        ),
        _ => (rest, 1883),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(Error::Config(format!("broker {url:?}: no host")));
    }
    Ok((host.to_string(), port))
}

/// Runs `f` without stalling other tasks on a multi-threaded runtime (scans
/// are blocking disk and CPU work).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Presence is re-published when it changed, but not more often than this…
const PRESENCE_MIN: Duration = Duration::from_secs(10);
/// …and at least this often while online (a heartbeat for `last_seen`).
const PRESENCE_MAX: Duration = Duration::from_secs(300);

/// A presence payload without its timestamp: equal keys say the same thing.
fn presence_key(body: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(mut m)) => {
            m.remove("ts_ms");
            serde_json::Value::Object(m).to_string()
        }
        _ => String::from_utf8_lossy(body).into_owned(),
    }
}

fn presence(agent: &Agent, online: bool) -> Vec<u8> {
    agent.presence(online, now_ms())
}

impl Agent {
    /// The retained presence payload (JSON) the agent publishes on
    /// `…/up/presence`: `online` or `offline` with backlog and disk state,
    /// stamped `ts_ms = now_ms`.
    pub fn presence(&self, online: bool, now_ms: u64) -> Vec<u8> {
        let s = self.status().ok();
        serde_json::json!({
            "state": if online { "online" } else { "offline" },
            "version": env!("CARGO_PKG_VERSION"),
            "epoch": self.store.epoch(),
            "backlog_bytes": s.as_ref().map(|s| s.pending_bytes),
            "backlog_changes": s.as_ref().map(|s| s.pending_changes),
            "oldest_unsynced_age_secs": s.as_ref().and_then(|s| s.oldest_pending_age_secs),
            "disk": self.disk_status.as_ref().map(|d| serde_json::json!({
                "used_pct": (d.used_pct * 10.0).round() / 10.0,
                "free_bytes": d.free_bytes,
                "over_high": d.over_high,
                "pruned_files": d.pruned_files,
                "pruned_bytes": d.pruned_bytes,
                "blocked_bytes_not_durable": d.blocked_bytes_not_durable,
            })),
            "ts_ms": now_ms,
        })
        .to_string()
        .into_bytes()
    }
}

/// How long the MQTT event loop may show no sign of life (no packet in,
/// no packet fully written out, no ping) while connected before the driver
/// drops the connection and dials again.
///
/// rumqttc pings only between packets: while it is stuck writing a publish
/// into a link that stopped reading (a "stalled" link: open but silent,
/// TCP zero window), it never gets to its ping timer and TCP itself never
/// gives up, so without this watchdog the agent would hang forever. On a
/// live link something happens at least every keepalive (a ping and its
/// answer), and every finished publish (at most `data_bytes`, 512 KiB) is an
/// event, so links slower than about `data_bytes / (2 * keepalive)` (17 KB/s
/// at 15 s) could be mistaken for stalled.
pub fn dead_after(keepalive: Duration) -> Duration {
    keepalive * 2 + Duration::from_secs(1)
}

/// Back-off before reconnect attempt `n` (0-based): doubling from 1 s to
/// [`BACKOFF_MAX`], with up to 25 % random jitter so a fleet that lost its
/// broker at the same moment does not return in lockstep.
fn backoff_delay(n: u32) -> Duration {
    let base = Duration::from_secs(1).saturating_mul(1u32 << n.min(5)).min(BACKOFF_MAX);
    let mut b = [0u8; 2];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    let frac = f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX) * 0.25;
    base.mul_f64(1.0 + frac)
}

/// The last-will payload for the next (re)connect: kept current by the
/// driver, so the broker's `offline` carries a fresh backlog and timestamp.
type Will = Arc<Mutex<Bytes>>;

fn with_will(opts: &mut MqttOptions, will: &Will) {
    if let (Some(mut lw), Ok(msg)) = (opts.last_will(), will.lock()) {
        lw.message = msg.clone();
        opts.set_last_will(lw);
    }
}

async fn poll_loop(mut el: EventLoop, tx: mpsc::Sender<NetEvent>, alive: Arc<AtomicU64>, t0: Instant, will: Will) {
    let mut attempt = 0u32;
    loop {
        let polled = el.poll().await;
        if polled.is_ok() {
            alive.store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
        let ev = match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                attempt = 0;
                NetEvent::Connected
            }
            Ok(Event::Incoming(Packet::Publish(p))) => NetEvent::Publish {
                topic: p.topic,
                payload: p.payload,
            },
            Ok(Event::Incoming(Packet::PubAck(_))) | Ok(Event::Outgoing(Outgoing::Publish(_))) => {
                let _ = tx.try_send(NetEvent::Progress);
                continue;
            }
            Ok(_) => continue,
            Err(ConnectionError::RequestsDone) => return,
            Err(e) => {
                if tx.send(NetEvent::Down(e.to_string())).await.is_err() {
                    return;
                }
                with_will(&mut el.options, &will);
                tokio::time::sleep(backoff_delay(attempt)).await;
                attempt = attempt.saturating_add(1);
                continue;
            }
        };
        if tx.send(ev).await.is_err() {
            return;
        }
    }
}

/// One rumqttc client and its polling task. Replaced as a whole when the
/// liveness watchdog finds the link dead: rumqttc cannot be told to drop a
/// connection that is stuck mid-write.
struct Conn {
    client: AsyncClient,
    poller: tokio::task::JoinHandle<()>,
    rx: mpsc::Receiver<NetEvent>,
    /// Milliseconds since `t0` of the event loop's last sign of life.
    alive: Arc<AtomicU64>,
}

impl Conn {
    fn open(opts: &MqttOptions, t0: Instant, will: &Will) -> Conn {
        let mut opts = opts.clone();
        with_will(&mut opts, will);
        let (client, eventloop) = AsyncClient::new(opts, REQUEST_CAPACITY);
        let (tx, rx) = mpsc::channel(64);
        let alive = Arc::new(AtomicU64::new(t0.elapsed().as_millis() as u64));
        let poller = tokio::spawn(poll_loop(eventloop, tx, alive.clone(), t0, will.clone()));
        Conn {
            client,
            poller,
            rx,
            alive,
        }
    }
    /// When the event loop last showed a sign of life.
    fn last_alive(&self, t0: Instant) -> Instant {
        t0 + Duration::from_millis(self.alive.load(Ordering::Relaxed))
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

struct Held {
    topic: String,
    payload: Bytes,
    chunks: u64,
    chunk_bytes: u64,
    /// (policy class, bytes) of the chunks in a Data message.
    charges: Vec<(usize, u64)>,
    /// Counted once in `data_held` when first held back by policy.
    policy_held: bool,
}

/// How often a policy-gated agent offers its backlog again (a schedule
/// window may have opened, a budget day begun).
const POLICY_RECHECK: Duration = Duration::from_secs(10);

/// Every change of the current epoch is in `have` (or nothing is recorded).
fn all_durable(agent: &Agent, session: &ClientSession, wait: WaitLevel) -> bool {
    if agent.store.rescan {
        return false;
    }
    let last = agent.store.next_seq() - 1;
    if last == 0 {
        return true;
    }
    let mut have = session.cloud().clone();
    have.union_with(agent.store.cloud());
    if wait == WaitLevel::Regional {
        have.union_with(session.regional());
    }
    let set = have.get(&agent.store.replica());
    set.ranges().first().is_some_and(|&(lo, hi)| lo <= 1 && hi >= last)
}

pub(crate) async fn drive(agent: &mut Agent, mode: Mode, shutdown: impl Future<Output = ()>) -> Result<SyncReport> {
    let t0 = Instant::now();
    let base = now_ms();
    let now = move || base + t0.elapsed().as_millis() as u64;
    let start_counters = agent.store.counters.clone();
    let mut scans: Vec<ScanReport> = Vec::new();
    let is_sync = matches!(mode, Mode::Sync { .. });
    scans.push(blocking(|| agent.scan_once())?);
    if let Err(e) = blocking(|| agent.enforce_disk()) {
        tracing::warn!("disk watermark check failed: {e}");
    }

    let dev = agent.store.device().clone();
    let (host, port) = parse_broker(&agent.config().broker)?;
    // rumqttc panics below 5 s.
    let keepalive = agent
        .config()
        .keepalive
        .clamp(MIN_KEEPALIVE, Duration::from_secs(u16::MAX.into()));
    let client_id = format!("ferry-agent-{}-{}-{}", dev.tenant, dev.site, dev.device);
    let mut opts = MqttOptions::new(client_id, host, port);
    opts.set_keep_alive(keepalive)
        .set_clean_start(false)
        .set_session_expiry_interval(Some(SESSION_EXPIRY_SECS))
        .set_max_packet_size(Some(MQTT_MAX_PACKET as u32))
        .set_outgoing_inflight_upper_limit(INFLIGHT)
        .set_last_will(LastWill::new(
            topic::presence(&dev),
            presence(agent, false),
            QoS::AtLeastOnce,
            true,
            None,
        ));
    let dead_after = dead_after(keepalive);
    let will: Will = Arc::new(Mutex::new(Bytes::from(presence(agent, false))));
    let mut conn = Conn::open(&opts, t0, &will);
    let down_prefix = topic::down(&dev, "");

    let mut session = ClientSession::new(agent.config().client.clone(), now_ms());
    let scan_interval = agent.config().scan_interval.max(Duration::from_millis(100));
    let mut next_scan = Instant::now() + scan_interval;
    let mut next_persist = Instant::now() + PERSIST_EVERY;
    // What the last retained presence said (without its timestamp), and when.
    let mut last_presence: Option<(String, Instant)> = None;
    let deadline = match mode {
        Mode::Sync { timeout, .. } => Some(Instant::now() + timeout),
        Mode::Run => None,
    };
    let mut online = false;
    let mut was_down = false;
    let mut held: Option<Held> = None;
    // A Data message held back by a bandwidth cap, schedule or budget.
    let mut gate_until: Option<Instant> = None;
    let mut next_policy_wake = Instant::now() + POLICY_RECHECK;
    // After a store error: stop sending for a while, then restart the flow.
    let mut paused_until: Option<Instant> = None;
    tokio::pin!(shutdown);
    let _ = agent.write_snapshot();

    let result: Result<()> = 'main: loop {
        // 1. Transmit whatever the session has, as far as rumqttc takes it.
        while online && paused_until.is_none() {
            let h = match held.take() {
                Some(h) => h,
                None => match session.poll_transmit(now(), agent) {
                    Ok(Some(m)) => {
                        let (chunks, chunk_bytes) = match &m {
                            Message::Data(d) => (
                                d.chunks.len() as u64,
                                d.chunks.iter().map(|c| c.bytes.len() as u64).sum(),
                            ),
                            _ => (0, 0),
                        };
                        let charges = if matches!(m, Message::Data(_)) {
                            agent.take_charges()
                        } else {
                            Vec::new()
                        };
                        let payload = match m.encode() {
                            Ok(p) => p,
                            Err(e) => {
                                tracing::error!("cannot encode {}: {e}", m.kind());
                                if is_sync {
                                    break 'main Err(e.into());
                                }
                                paused_until = Some(Instant::now() + Duration::from_secs(60));
                                break;
                            }
                        };
                        Held {
                            topic: topic::up(&dev, m.kind()),
                            payload: Bytes::from(payload),
                            chunks,
                            chunk_bytes,
                            charges,
                            policy_held: false,
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!("sync store error: {e}");
                        if is_sync {
                            break 'main Err(e.into());
                        }
                        paused_until = Some(Instant::now() + Duration::from_secs(5));
                        break;
                    }
                },
            };
            let mut h = h;
            if !h.charges.is_empty() {
                let wait = agent.data_gate(&h.charges).unwrap_or(Duration::ZERO);
                if !wait.is_zero() {
                    if !h.policy_held {
                        h.policy_held = true;
                        agent.store.counters.data_held += h.chunk_bytes;
                    }
                    gate_until = Some(Instant::now() + wait);
                    held = Some(h);
                    break;
                }
            }
            gate_until = None;
            let len = h.payload.len() as u64;
            match conn
                .client
                .try_publish(h.topic.clone(), QoS::AtLeastOnce, false, h.payload.clone())
            {
                Ok(()) => {
                    let c = &mut agent.store.counters;
                    c.wire_bytes_sent += len;
                    c.messages_sent += 1;
                    c.chunks_sent += h.chunks;
                    c.chunk_bytes_sent += h.chunk_bytes;
                    if !h.charges.is_empty() {
                        if let Err(e) = agent.charge(&h.charges) {
                            tracing::warn!("accounting sent bytes: {e}");
                        }
                    }
                }
                Err(_) => {
                    held = Some(h);
                    break;
                }
            }
        }
        while let Some(ev) = session.poll_event() {
            match ev {
                SessionEvent::Rejected { seq, reason } => tracing::warn!(seq, %reason, "change rejected by the server"),
                SessionEvent::Nack { reason } => tracing::warn!(%reason, "server refused a message"),
                SessionEvent::Backoff { ms } => tracing::info!(ms, "server is busy; backing off"),
                e => tracing::debug!(?e, "session"),
            }
        }

        // 2. Done? (sync mode)
        if let Mode::Sync { wait, timeout } = mode {
            // A sync is an exchange: knowledge and server changes both ways
            // (an agent that never recorded anything has nothing to wait for).
            let exchanged = session.exchanged(now()) || agent.store.next_seq() == 1;
            if exchanged && all_durable(agent, &session, wait) {
                break Ok(());
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let mut have = session.cloud().clone();
                if wait == WaitLevel::Regional {
                    have.union_with(session.regional());
                }
                let pending = agent.store.count_not_in(&have).unwrap_or(0);
                break Err(Error::Timeout {
                    secs: timeout.as_secs_f64(),
                    level: wait.name(),
                    pending,
                });
            }
        }

        // 3. Wait for the network, a timer, or shutdown.
        let mut wake = next_scan.min(next_persist);
        if let Some(d) = deadline {
            wake = wake.min(d);
        }
        if let Some(t) = session.poll_timeout() {
            wake = wake.min(t0 + Duration::from_millis(t.saturating_sub(base)));
        }
        if let Some(p) = paused_until {
            wake = wake.min(p);
        }
        if held.is_some() {
            wake = wake.min(gate_until.unwrap_or_else(|| Instant::now() + Duration::from_millis(50)));
        }
        if agent.policy_gated() {
            wake = wake.min(next_policy_wake);
        }
        if online {
            wake = wake.min(conn.last_alive(t0) + dead_after);
        }
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            ev = conn.rx.recv() => match ev {
                None => break Err(Error::Mqtt("MQTT event loop stopped".into())),
                Some(NetEvent::Connected) => {
                    tracing::info!(broker = %agent.config().broker, "connected");
                    online = true;
                    was_down = false;
                    held = None;
                    // Bounded: requests queued before a reconnect may fill
                    // rumqttc's channel, and the link may stall right away.
                    let client = conn.client.clone();
                    let pres = presence(agent, true);
                    last_presence = Some((presence_key(&pres), Instant::now()));
                    if let Ok(mut w) = will.lock() {
                        *w = Bytes::from(presence(agent, false));
                    }
                    let setup = tokio::time::timeout(dead_after, async {
                        client.subscribe(topic::down_filter(&dev), QoS::AtLeastOnce).await?;
                        client.publish(topic::presence(&dev), QoS::AtLeastOnce, true, pres).await
                    })
                    .await;
                    match setup {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => break Err(Error::Mqtt(e.to_string())),
                        Err(_) => {
                            tracing::warn!("no progress subscribing after connect; dialing again");
                            online = false;
                            was_down = true;
                            session.disconnected();
                            conn = Conn::open(&opts, t0, &will);
                            continue;
                        }
                    }
                    if paused_until.is_none() {
                        session.connected(now(), agent);
                    }
                }
                Some(NetEvent::Publish { topic, payload }) => {
                    agent.store.counters.messages_received += 1;
                    if !topic.starts_with(down_prefix.as_bytes()) {
                        continue;
                    }
                    match Message::decode(&payload) {
                        Ok(m) => {
                            if let Err(e) = session.handle(now(), m, agent) {
                                tracing::error!("sync store error: {e}");
                                let e: Error = e.into();
                                if is_sync || e.is_poisoned_db() {
                                    break Err(e);
                                }
                                paused_until = Some(Instant::now() + Duration::from_secs(5));
                            }
                        }
                        Err(e) => {
                            agent.store.counters.bad_messages += 1;
                            tracing::warn!(topic = %String::from_utf8_lossy(&topic), "ignoring bad message: {e}");
                        }
                    }
                }
                Some(NetEvent::Progress) => {}
                Some(NetEvent::Down(e)) => {
                    if online || !was_down {
                        tracing::warn!(broker = %agent.config().broker, "connection lost or refused: {e}; retrying with back-off");
                    } else {
                        tracing::debug!("still offline: {e}");
                    }
                    online = false;
                    was_down = true;
                    held = None;
                    session.disconnected();
                }
            },
            _ = tokio::time::sleep_until(wake.into()) => {}
        }

        // 4. Timers.
        // Liveness: a connected event loop that showed no sign of life for
        // `dead_after` (and is not just waiting for us to take its events)
        // is stuck on a dead link. Drop it and dial again.
        if online && conn.rx.is_empty() && Instant::now() >= conn.last_alive(t0) + dead_after {
            let silent = Instant::now().saturating_duration_since(conn.last_alive(t0));
            tracing::warn!(
                broker = %agent.config().broker,
                silent_secs = format!("{:.1}", silent.as_secs_f64()),
                "link silent while connected (stalled?); dropping the connection and dialing again"
            );
            agent.store.counters.link_stalls += 1;
            online = false;
            was_down = true;
            held = None;
            session.disconnected();
            conn = Conn::open(&opts, t0, &will);
        }
        if paused_until.is_some_and(|p| Instant::now() >= p) {
            paused_until = None;
            session.disconnected();
            if online {
                session.connected(now(), agent);
            }
        }
        if session.poll_timeout().is_some_and(|t| now() >= t) {
            session.handle_timeout(now(), agent);
        }
        if Instant::now() >= next_policy_wake {
            if agent.policy_gated() {
                session.wake();
            }
            next_policy_wake = Instant::now() + POLICY_RECHECK;
        }
        let scan_due = Instant::now() >= next_scan;
        if scan_due || agent.store.rescan {
            match blocking(|| agent.scan_once()) {
                Ok(r) => {
                    if r.changes_recorded > 0 {
                        session.wake();
                    }
                    if let Err(e) = blocking(|| agent.enforce_disk()) {
                        tracing::warn!("disk watermark check failed: {e}");
                    }
                    if is_sync {
                        scans.push(r);
                    }
                }
                Err(e) if is_sync || e.is_poisoned_db() => break Err(e),
                Err(e) => {
                    tracing::error!("scan failed: {e}");
                    agent.store.rescan = false;
                }
            }
            next_scan = Instant::now() + scan_interval;
        }
        if Instant::now() >= next_persist {
            if let Err(e) = agent.store.flush().and_then(|_| agent.write_snapshot()) {
                tracing::warn!("persisting counters: {e}");
                if e.is_poisoned_db() {
                    break Err(e);
                }
            }
            next_persist = Instant::now() + PERSIST_EVERY;
            // Presence follows the backlog: re-published (retained) when what
            // it says changed, at most every PRESENCE_MIN, and at least every
            // PRESENCE_MAX as a heartbeat.
            if online {
                let body = presence(agent, true);
                let key = presence_key(&body);
                let since = last_presence.as_ref().map(|(_, t)| t.elapsed());
                let changed = last_presence.as_ref().is_none_or(|(k, _)| *k != key);
                if since.is_none_or(|d| (changed && d >= PRESENCE_MIN) || d >= PRESENCE_MAX)
                    && conn
                        .client
                        .try_publish(topic::presence(&dev), QoS::AtLeastOnce, true, body)
                        .is_ok()
                {
                    last_presence = Some((key, Instant::now()));
                    if let Ok(mut w) = will.lock() {
                        *w = Bytes::from(presence(agent, false));
                    }
                }
            }
        }
    };

    // Leave cleanly: retained offline presence, MQTT disconnect, counters.
    if online {
        let _ = conn
            .client
            .try_publish(topic::presence(&dev), QoS::AtLeastOnce, true, presence(agent, false));
        let _ = conn.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Some(ev) = conn.rx.recv().await {
                if matches!(ev, NetEvent::Down(_)) {
                    break;
                }
            }
        })
        .await;
    }
    drop(conn);
    agent.store.flush()?;
    let _ = agent.write_snapshot();
    result?;
    let c = &agent.store.counters;
    let wait = match mode {
        Mode::Sync { wait, .. } => wait,
        Mode::Run => WaitLevel::Regional,
    };
    Ok(SyncReport {
        level: wait,
        scans,
        changes_durable: agent.store.next_seq() - 1,
        wire_bytes_sent: c.wire_bytes_sent - start_counters.wire_bytes_sent,
        chunks_sent: c.chunks_sent - start_counters.chunks_sent,
        chunk_bytes_sent: c.chunk_bytes_sent - start_counters.chunk_bytes_sent,
        secs: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        assert_eq!(
            parse_broker("mqtt://127.0.0.1:1884").unwrap(),
            ("127.0.0.1".into(), 1884)
        );
        assert_eq!(parse_broker("tcp://h:1").unwrap(), ("h".into(), 1));
        assert_eq!(parse_broker("broker.local").unwrap(), ("broker.local".into(), 1883));
        assert!(parse_broker("mqtts://x:1").is_err());
        assert!(parse_broker("mqtt://x:notaport").is_err());
    }
}
