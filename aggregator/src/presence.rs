//! Presence and last-seen per device, forwarded to the cloud-sink's fleet
//! view (docs/CONTRACTS.md, "Presence").
//!
//! Agents publish a retained JSON presence on `topic::presence(device)` and
//! leave a retained last will `offline` there. The aggregator:
//!
//! - subscribes to `topic::presence_filter()` **without** the share group and
//!   at QoS 0. Every aggregator of a region therefore sees all presence
//!   (it is a few small messages per device and connection), including the
//!   retained copies, which MQTT v5 (§4.8.2) never sends on a shared
//!   subscription. Because the subscription is renewed at every ConnAck, each
//!   reconnect delivers the retained (= latest) presence of every device;
//!   at QoS 0 nothing stale is queued in the persistent session meanwhile.
//! - parses each payload defensively ([`parse`]): bounded size, JSON object,
//!   known fields type-checked, the device taken from the topic only.
//! - orders presence by when it arrived here (`observed_ms`), never by the
//!   payload's `ts_ms`: the agent computes its last will once, when it starts,
//!   so the will's `ts_ms` is *older* than the `online` it follows.
//! - records `last_seen_ms` when any up message or `online` presence arrives.
//! - keeps only the latest entry per device (bounded by [`MAX_DEVICES`]) and
//!   sends what changed to `POST /v1/presence` at most every second, in
//!   bodies of at most [`MAX_POST`] entries; failures are retried with
//!   back-off (entries stay dirty), and the sink merges idempotently.
//! - re-sends every entry when the sink answers with a presence `view`
//!   other than the one it answered before: a restarted sink may have lost
//!   presence (not fsynced) and a rebuilt catalog has none. To learn the
//!   view while nothing changes, it posts an empty array every
//!   [`REFRESH_EVERY`]. A sink that names no view (older) is sent
//!   everything every [`REFRESH_EVERY`] instead.

use crate::sink::SinkHttp;
use crate::AggStats;
use protocol::DeviceRef;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest presence payload accepted (the agent's is about 250 bytes).
pub const MAX_PRESENCE: usize = 8 << 10;
/// Largest `disk` object accepted, serialized.
pub const MAX_DISK_JSON: usize = 2 << 10;
/// Longest agent version string kept.
pub const MAX_VERSION: usize = 64;
/// Devices tracked; presence of further devices is dropped (and counted).
pub const MAX_DEVICES: usize = 200_000;
/// Entries per `POST /v1/presence`.
pub const MAX_POST: usize = 1_000;
/// How often changed entries are sent.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// A device's `last_seen_ms` alone is re-sent only once it moved this much.
pub const LAST_SEEN_STEP_MS: u64 = 2_000;
/// The sink is posted to at least this often (an empty array when nothing
/// changed) to learn its presence view; a sink that names no view is sent
/// everything again this often instead.
pub const REFRESH_EVERY: Duration = Duration::from_secs(300);
/// Longest sink view accepted; a longer one counts as none.
pub const MAX_VIEW: usize = 128;

/// Why a presence payload was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PresenceError {
    #[error("presence of {0} bytes exceeds the limit of {MAX_PRESENCE}")]
    TooLarge(usize),
    #[error("presence is not valid JSON: {0}")]
    Json(String),
    #[error("presence state {0:?} is neither online nor offline")]
    State(String),
    #[error("presence field {0}: {1}")]
    Field(&'static str, String),
}

/// A validated presence payload (docs/design.md §5 shape). Unknown fields
/// are ignored; device ids in the payload, if any, are never used.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Presence {
    /// `online` or `offline`.
    pub state: String,
    pub version: Option<String>,
    pub epoch: Option<u32>,
    pub backlog_bytes: Option<u64>,
    pub backlog_changes: Option<u64>,
    pub oldest_unsynced_age_secs: Option<u64>,
    /// The agent's clock when it built the payload (stale in a last will).
    pub ts_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Raw {
    state: serde_json::Value,
    #[serde(default)]
    version: serde_json::Value,
    #[serde(default)]
    epoch: serde_json::Value,
    #[serde(default)]
    backlog_bytes: serde_json::Value,
    #[serde(default)]
    backlog_changes: serde_json::Value,
    #[serde(default)]
    oldest_unsynced_age_secs: serde_json::Value,
    #[serde(default)]
    ts_ms: serde_json::Value,
    #[serde(default)]
    disk: serde_json::Value,
}

fn opt_u64(v: &serde_json::Value, name: &'static str) -> Result<Option<u64>, PresenceError> {
    match v {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::Number(n) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| PresenceError::Field(name, format!("{n} is not a non-negative integer"))),
        other => Err(PresenceError::Field(name, format!("{other} is not a number"))),
    }
}

/// Parses and validates one presence payload. `Ok(None)` for an empty
/// payload (a retained message being cleared).
pub fn parse(payload: &[u8]) -> Result<Option<Presence>, PresenceError> {
    if payload.len() > MAX_PRESENCE {
        return Err(PresenceError::TooLarge(payload.len()));
    }
    if payload.is_empty() {
        return Ok(None);
    }
    let raw: Raw = serde_json::from_slice(payload).map_err(|e| PresenceError::Json(e.to_string()))?;
    let state = match &raw.state {
        serde_json::Value::String(s) if s == "online" || s == "offline" => s.clone(),
        other => return Err(PresenceError::State(other.to_string())),
    };
    let version = match &raw.version {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => {
            let clean: String = s.chars().filter(|c| !c.is_control()).take(MAX_VERSION).collect();
            Some(clean)
        }
        other => return Err(PresenceError::Field("version", format!("{other} is not a string"))),
    };
    let epoch = match opt_u64(&raw.epoch, "epoch")? {
        None => None,
        Some(e) => Some(u32::try_from(e).map_err(|_| PresenceError::Field("epoch", format!("{e} is not a u32")))?),
    };
    let disk = match raw.disk {
        serde_json::Value::Null => None,
        v @ serde_json::Value::Object(_) => {
            let n = v.to_string().len();
            if n > MAX_DISK_JSON {
                return Err(PresenceError::Field(
                    "disk",
                    format!("{n} bytes, limit {MAX_DISK_JSON}"),
                ));
            }
            Some(v)
        }
        other => return Err(PresenceError::Field("disk", format!("{other} is not an object"))),
    };
    Ok(Some(Presence {
        state,
        version,
        epoch,
        backlog_bytes: opt_u64(&raw.backlog_bytes, "backlog_bytes")?,
        backlog_changes: opt_u64(&raw.backlog_changes, "backlog_changes")?,
        oldest_unsynced_age_secs: opt_u64(&raw.oldest_unsynced_age_secs, "oldest_unsynced_age_secs")?,
        ts_ms: opt_u64(&raw.ts_ms, "ts_ms")?,
        disk,
    }))
}

/// Presence as forwarded: the payload plus when this aggregator received it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Observed {
    #[serde(flatten)]
    pub presence: Presence,
    /// This aggregator's clock when the presence arrived: the sink orders
    /// presence of a device by it.
    pub observed_ms: u64,
}

/// One element of the `POST /v1/presence` body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Update {
    pub tenant: String,
    pub site: String,
    pub device: String,
    /// Latest time (aggregator clock) a message from the device arrived; 0 if none yet.
    pub last_seen_ms: u64,
    pub presence: Option<Observed>,
    /// Which aggregator saw it (`--id`).
    pub aggregator: String,
}

struct Entry {
    device: DeviceRef,
    last_seen_ms: u64,
    sent_last_seen_ms: u64,
    presence: Option<Observed>,
}

#[derive(Default)]
struct Inner {
    devices: HashMap<String, Entry>,
    dirty: BTreeSet<String>,
    /// The presence view the sink last answered (None: none yet, or a sink
    /// that names none).
    sink_view: Option<String>,
    /// Whether the sink answered a post yet.
    answered: bool,
}

impl Inner {
    fn mark_all_dirty(&mut self) {
        let keys: Vec<String> = self.devices.keys().cloned().collect();
        self.dirty.extend(keys);
    }
}

/// The `view` of a `POST /v1/presence` answer; None if there is none or the
/// answer is not the expected JSON.
pub fn sink_view(answer: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Ack {
        #[serde(default)]
        view: String,
    }
    let ack: Ack = serde_json::from_slice(answer).ok()?;
    (!ack.view.is_empty() && ack.view.len() <= MAX_VIEW).then_some(ack.view)
}

/// Latest presence and last-seen per device, and which entries the sink
/// has not been sent yet.
pub struct Tracker {
    aggregator: String,
    stats: Arc<AggStats>,
    inner: Mutex<Inner>,
}

impl Tracker {
    pub fn new(aggregator: &str, stats: Arc<AggStats>) -> Tracker {
        Tracker {
            aggregator: aggregator.to_string(),
            stats,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind: keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with_entry(&self, device: &DeviceRef, f: impl FnOnce(&mut Entry) -> bool) {
        let key = device.key();
        let mut g = self.lock();
        let inner = &mut *g;
        if !inner.devices.contains_key(&key) {
            if inner.devices.len() >= MAX_DEVICES {
                AggStats::add(&self.stats.presence_dropped, 1);
                return;
            }
            inner.devices.insert(
                key.clone(),
                Entry {
                    device: device.clone(),
                    last_seen_ms: 0,
                    sent_last_seen_ms: 0,
                    presence: None,
                },
            );
        }
        if let Some(e) = inner.devices.get_mut(&key) {
            if f(e) {
                inner.dirty.insert(key);
            }
        }
    }

    /// A message from `device` arrived at `now_ms`.
    pub fn seen(&self, device: &DeviceRef, now_ms: u64) {
        self.with_entry(device, |e| {
            e.last_seen_ms = e.last_seen_ms.max(now_ms);
            e.sent_last_seen_ms == 0 || e.last_seen_ms >= e.sent_last_seen_ms + LAST_SEEN_STEP_MS
        });
    }

    /// A raw payload arrived on `device`'s presence topic at `now_ms`:
    /// parsed, kept if valid, counted either way. Never panics.
    pub fn on_payload(&self, device: &DeviceRef, payload: &[u8], now_ms: u64) -> Result<(), PresenceError> {
        AggStats::add(&self.stats.presence_in, 1);
        match parse(payload) {
            Ok(Some(p)) => {
                self.update(device, p, now_ms);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => {
                AggStats::add(&self.stats.presence_bad, 1);
                tracing::warn!(%device, bytes = payload.len(), "presence ignored: {e}");
                Err(e)
            }
        }
    }

    /// Keeps `p` as `device`'s latest presence. `online` also counts as seen;
    /// an `offline` (usually the broker's last will) does not.
    pub fn update(&self, device: &DeviceRef, p: Presence, now_ms: u64) {
        self.with_entry(device, |e| {
            if p.state == "online" {
                e.last_seen_ms = e.last_seen_ms.max(now_ms);
            }
            e.presence = Some(Observed {
                presence: p,
                observed_ms: now_ms,
            });
            true
        });
    }

    /// The latest presence of `device`, if any.
    pub fn get(&self, device: &DeviceRef) -> Option<(u64, Option<Observed>)> {
        let g = self.lock();
        g.devices
            .get(&device.key())
            .map(|e| (e.last_seen_ms, e.presence.clone()))
    }

    /// Entries changed since they were last sent, at most `max`; they stay
    /// pending until [`Tracker::sent`] or go back with [`Tracker::retry`].
    pub fn take_dirty(&self, max: usize) -> Vec<Update> {
        let mut g = self.lock();
        let inner = &mut *g;
        let mut out = Vec::new();
        while out.len() < max {
            let Some(key) = inner.dirty.pop_first() else { break };
            if let Some(e) = inner.devices.get(&key) {
                out.push(Update {
                    tenant: e.device.tenant.to_string(),
                    site: e.device.site.to_string(),
                    device: e.device.device.to_string(),
                    last_seen_ms: e.last_seen_ms,
                    presence: e.presence.clone(),
                    aggregator: self.aggregator.clone(),
                });
            }
        }
        out
    }

    /// `updates` reached the sink.
    pub fn sent(&self, updates: &[Update]) {
        let mut g = self.lock();
        for u in updates {
            let key = format!("{}/{}/{}", u.tenant, u.site, u.device);
            if let Some(e) = g.devices.get_mut(&key) {
                e.sent_last_seen_ms = e.sent_last_seen_ms.max(u.last_seen_ms).max(1);
            }
        }
    }

    /// `updates` did not reach the sink: send them again later.
    pub fn retry(&self, updates: &[Update]) {
        let mut g = self.lock();
        for u in updates {
            g.dirty.insert(format!("{}/{}/{}", u.tenant, u.site, u.device));
        }
    }

    /// Marks every entry to be sent again.
    pub fn refresh_all(&self) {
        self.lock().mark_all_dirty();
    }

    /// The sink answered a post with `view`. If it answered another view
    /// before (or none: a sink upgraded to name one restarted to do so), it
    /// may lack what was sent to it: every entry is marked to be sent again
    /// and true is returned.
    pub fn sink_view(&self, view: Option<String>) -> bool {
        let mut g = self.lock();
        let changed = g.answered && g.sink_view != view;
        g.answered = true;
        g.sink_view = view;
        if changed {
            g.mark_all_dirty();
        }
        changed
    }

    /// At each [`REFRESH_EVERY`]: whether a post is due even with nothing
    /// changed (a probe for the sink's view). A sink that names no view is
    /// sent every entry again instead.
    pub fn refresh_due(&self) -> bool {
        let mut g = self.lock();
        if g.sink_view.is_some() {
            return true;
        }
        g.mark_all_dirty();
        false
    }

    pub fn pending(&self) -> usize {
        self.lock().dirty.len()
    }

    pub fn devices(&self) -> usize {
        self.lock().devices.len()
    }
}

/// Sends changed entries to the sink at most every [`FLUSH_EVERY`], and
/// posts at least every `refresh` ([`REFRESH_EVERY`]), forever.
pub async fn forward_loop(tracker: Arc<Tracker>, sink: SinkHttp, retry_max: Duration, refresh: Duration) {
    let first = Duration::from_millis(500).min(retry_max);
    let mut backoff = first;
    let mut next_refresh = tokio::time::Instant::now() + refresh;
    // A post is due even if nothing changed: it tells the sink's view.
    let mut probe = false;
    loop {
        tokio::time::sleep(FLUSH_EVERY).await;
        if tokio::time::Instant::now() >= next_refresh {
            probe |= tracker.refresh_due();
            next_refresh = tokio::time::Instant::now() + refresh;
        }
        loop {
            let batch = tracker.take_dirty(MAX_POST);
            if batch.is_empty() && !probe {
                backoff = first;
                break;
            }
            match sink.post_presence(&batch).await {
                Ok(view) => {
                    probe = false;
                    AggStats::add(&tracker.stats.presence_forwarded, batch.len() as u64);
                    tracker.sent(&batch);
                    if tracker.sink_view(view) {
                        AggStats::add(&tracker.stats.presence_resends, 1);
                        tracing::info!(
                            devices = tracker.pending(),
                            "{} answers a new presence view (restarted or rebuilt): re-sending all presence",
                            sink.base()
                        );
                    }
                }
                Err(e) => {
                    AggStats::add(&tracker.stats.presence_forward_errors, 1);
                    tracker.retry(&batch);
                    tracing::warn!(
                        pending = tracker.pending(),
                        "sending presence to {}: {e}; retrying in {backoff:?}",
                        sink.base()
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(retry_max);
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(name: &str) -> DeviceRef {
        DeviceRef::new("acme", "plant-1", name).expect("ids")
    }

    #[test]
    fn parses_the_agent_payload_and_ignores_payload_ids() {
        let p = parse(
            br#"{"state":"online","version":"0.1.0","epoch":7,"backlog_bytes":10,
                "backlog_changes":2,"oldest_unsynced_age_secs":null,"ts_ms":5,
                "device":"someone-else","disk":{"free_bytes":1}}"#,
        )
        .expect("valid")
        .expect("not empty");
        assert_eq!(p.state, "online");
        assert_eq!(p.epoch, Some(7));
        assert_eq!(p.backlog_changes, Some(2));
        assert_eq!(p.oldest_unsynced_age_secs, None);
        assert_eq!(p.disk, Some(serde_json::json!({"free_bytes": 1})));
        assert_eq!(parse(b""), Ok(None));
    }

    #[test]
    fn refuses_bad_payloads() {
        let big = vec![b' '; MAX_PRESENCE + 1];
        let big_disk = format!(r#"{{"state":"online","disk":{{"x":"{}"}}}}"#, "a".repeat(MAX_DISK_JSON));
        let cases: Vec<&[u8]> = vec![
            b"\xff\xfe",
            b"null",
            b"[]",
            b"{}",
            b"{\"state\":\"sleeping\"}",
            b"{\"state\":1}",
            b"{\"state\":\"online\",\"epoch\":-1}",
            b"{\"state\":\"online\",\"epoch\":4294967296}",
            b"{\"state\":\"online\",\"backlog_bytes\":1.5}",
            b"{\"state\":\"online\",\"backlog_bytes\":\"1\"}",
            b"{\"state\":\"online\",\"version\":[1]}",
            b"{\"state\":\"online\",\"disk\":3}",
            b"{\"state\":\"online\"",
            &big,
            big_disk.as_bytes(),
        ];
        for c in cases {
            assert!(
                parse(c).is_err(),
                "{:?}",
                String::from_utf8_lossy(&c[..c.len().min(80)])
            );
        }
        // Deep nesting is refused by serde_json's recursion limit, not a stack overflow.
        let deep = format!(
            "{{\"state\":\"online\",\"disk\":{{\"a\":{}1{}}}}}",
            "[".repeat(4000),
            "]".repeat(4000)
        );
        assert!(parse(deep.as_bytes()).is_err());
    }

    #[test]
    fn tracker_keeps_latest_by_arrival_and_counts_bad_input() {
        let stats = Arc::new(AggStats::default());
        let t = Tracker::new("agg", stats.clone());
        let d = dev("gw-1");
        t.on_payload(&d, br#"{"state":"online","ts_ms":2000}"#, 10_000)
            .expect("ok");
        // A last will carries the ts of the agent's start: older, but later.
        t.on_payload(&d, br#"{"state":"offline","ts_ms":1000}"#, 20_000)
            .expect("ok");
        assert!(t.on_payload(&d, b"garbage", 30_000).is_err());
        let (seen, p) = t.get(&d).expect("tracked");
        assert_eq!(seen, 10_000, "offline does not count as seen");
        let p = p.expect("presence");
        assert_eq!((p.presence.state.as_str(), p.observed_ms), ("offline", 20_000));
        let s = stats.snapshot();
        assert_eq!((s.presence_in, s.presence_bad), (3, 1));

        let batch = t.take_dirty(10);
        assert_eq!(batch.len(), 1);
        assert_eq!(t.take_dirty(10).len(), 0);
        t.retry(&batch);
        assert_eq!(t.take_dirty(10), batch);
        t.sent(&batch);
        // last_seen alone is re-sent only once it moved by the step.
        t.seen(&d, 10_500);
        assert_eq!(t.pending(), 0);
        t.seen(&d, 10_000 + LAST_SEEN_STEP_MS);
        assert_eq!(t.pending(), 1);
        t.refresh_all();
        assert_eq!(t.take_dirty(1).len(), 1);
        // Posts are bounded.
        for i in 0..5 {
            t.seen(&dev(&format!("gw-x{i}")), 1);
        }
        assert_eq!(t.take_dirty(3).len(), 3);
        assert_eq!(t.take_dirty(MAX_POST).len(), 2);
    }

    #[test]
    fn a_new_sink_view_marks_everything_to_be_sent_again() {
        let t = Tracker::new("agg", Arc::new(AggStats::default()));
        for i in 0..3 {
            t.seen(&dev(&format!("gw-{i}")), 1);
        }
        let batch = t.take_dirty(MAX_POST);
        t.sent(&batch);
        // No answer yet: the refresh sends everything.
        assert!(!t.refresh_due());
        assert_eq!(t.take_dirty(MAX_POST), batch);
        // The first view learned, then the same again: nothing to re-send.
        assert!(!t.sink_view(Some("v1".into())));
        assert!(!t.sink_view(Some("v1".into())));
        assert!(t.refresh_due(), "a probe, not a re-send");
        assert_eq!(t.pending(), 0);
        // The sink restarted.
        assert!(t.sink_view(Some("v2".into())));
        assert_eq!(t.take_dirty(MAX_POST), batch);
        assert_eq!(t.pending(), 0);
        // A sink that names no view (older): counted as another view, and
        // the periodic refresh takes over.
        assert!(t.sink_view(None));
        assert_eq!(t.take_dirty(MAX_POST).len(), 3);
        assert!(!t.sink_view(None));
        assert_eq!(t.pending(), 0);
        assert!(!t.refresh_due());
        assert_eq!(t.pending(), 3);
        assert_eq!(t.take_dirty(MAX_POST).len(), 3);
        // Upgraded: the restart that brought the first view may have lost
        // presence.
        assert!(t.sink_view(Some("v3".into())));
        assert_eq!(t.take_dirty(MAX_POST).len(), 3);
        assert!(t.refresh_due());
        assert_eq!(t.pending(), 0);

        assert_eq!(
            sink_view(br#"{"applied":1,"unchanged":0,"view":"ab12"}"#),
            Some("ab12".into())
        );
        assert_eq!(sink_view(br#"{"applied":1,"unchanged":0}"#), None);
        assert_eq!(sink_view(br#"{"view":""}"#), None);
        assert_eq!(sink_view(br#"{"view":7}"#), None);
        assert_eq!(sink_view(b"\xff"), None);
        let long = format!(r#"{{"view":"{}"}}"#, "a".repeat(MAX_VIEW + 1));
        assert_eq!(sink_view(long.as_bytes()), None);
    }
}
