//! Fleet health (DESIGN.md §5): presence forwarded by aggregators
//! (`POST /v1/presence`) merged with the catalog's per-device counts into
//! one row per device (`GET /v1/fleet`, `cloud-sink fleet`).
//!
//! Presence lives in the catalog's `presence` table. It is live state, not
//! history: `rebuild` does not recreate it (nothing in the objects holds
//! it); each answer names the sink process's presence `view`, new at
//! every start, and an aggregator answered a new view re-sends every
//! device's presence. Aggregators post at least every `REFRESH_EVERY`
//! (5 min; an empty array when nothing changed) to learn the view, and
//! re-send everything after their own restart.

use crate::{Error, Result};
use protocol::DeviceRef;
use serde::{Deserialize, Serialize};

/// Largest `POST /v1/presence` body.
pub const MAX_PRESENCE_BODY: usize = 4 << 20;
/// Most entries in one `POST /v1/presence`.
pub const MAX_PRESENCE_ENTRIES: usize = 10_000;
/// Largest `disk` object kept, serialized.
pub const MAX_DISK_JSON: usize = 2 << 10;
/// Longest agent version / aggregator name kept.
pub const MAX_NAME: usize = 64;
/// Times this far ahead of the sink's clock are refused (a broken
/// aggregator clock must not pin a device's presence forever).
pub const MAX_FUTURE_MS: u64 = 5 * 60 * 1000;

/// The presence payload an agent published, as an aggregator forwards it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PresenceInfo {
    /// `online` or `offline`.
    pub state: String,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub epoch: Option<u32>,
    #[serde(default)]
    pub backlog_bytes: Option<u64>,
    #[serde(default)]
    pub backlog_changes: Option<u64>,
    #[serde(default)]
    pub oldest_unsynced_age_secs: Option<u64>,
    /// The agent's clock when it built the payload (stale in a last will).
    #[serde(default)]
    pub ts_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<serde_json::Value>,
    /// When the aggregator received it (aggregator clock): presence of a
    /// device is ordered by this.
    pub observed_ms: u64,
}

/// One element of the `POST /v1/presence` body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PresenceUpdate {
    pub tenant: String,
    pub site: String,
    pub device: String,
    /// Latest arrival (aggregator clock) of any message from the device; 0 = none.
    #[serde(default)]
    pub last_seen_ms: u64,
    #[serde(default)]
    pub presence: Option<PresenceInfo>,
    #[serde(default)]
    pub aggregator: Option<String>,
}

/// What the sink keeps per device (JSON in the `presence` table).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PresenceRecord {
    pub last_seen_ms: u64,
    pub presence: Option<PresenceInfo>,
    /// The aggregator that sent the current presence.
    pub aggregator: Option<String>,
}

impl PresenceRecord {
    /// Merges `u` in: `last_seen_ms` is the maximum, presence the one
    /// observed last (ties: the newer message wins, identical copies from
    /// several aggregators change nothing). Idempotent and commutative
    /// except for exact ties. Returns whether anything changed.
    pub fn merge(&mut self, u: &PresenceUpdate) -> bool {
        let mut changed = false;
        if u.last_seen_ms > self.last_seen_ms {
            self.last_seen_ms = u.last_seen_ms;
            changed = true;
        }
        if let Some(p) = &u.presence {
            let newer = match &self.presence {
                None => true,
                Some(old) => p.observed_ms > old.observed_ms || (p.observed_ms == old.observed_ms && p != old),
            };
            if newer {
                self.presence = Some(p.clone());
                self.aggregator = u.aggregator.clone();
                changed = true;
            }
        }
        changed
    }
}

/// Parses and validates a `POST /v1/presence` body. Any bad entry refuses
/// the whole body (400): a sender that builds one wrong builds them all.
pub fn parse_updates(body: &[u8], now_ms: u64) -> Result<Vec<(DeviceRef, PresenceUpdate)>> {
    if body.len() > MAX_PRESENCE_BODY {
        return Err(Error::BadRequest(format!(
            "presence body of {} bytes exceeds {MAX_PRESENCE_BODY}",
            body.len()
        )));
    }
    let updates: Vec<PresenceUpdate> = serde_json::from_slice(body)
        .map_err(|e| Error::BadRequest(format!("presence body is not a JSON array of updates: {e}")))?;
    if updates.len() > MAX_PRESENCE_ENTRIES {
        return Err(Error::BadRequest(format!(
            "{} presence entries, at most {MAX_PRESENCE_ENTRIES} per request",
            updates.len()
        )));
    }
    let limit = now_ms.saturating_add(MAX_FUTURE_MS);
    let mut out = Vec::with_capacity(updates.len());
    for (i, mut u) in updates.into_iter().enumerate() {
        let bad = |why: String| Error::BadRequest(format!("presence entry {i}: {why}"));
        let d = DeviceRef::new(&u.tenant, &u.site, &u.device).map_err(|e| bad(e.to_string()))?;
        if u.last_seen_ms > limit {
            return Err(bad(format!("last_seen_ms {} is in the future", u.last_seen_ms)));
        }
        if let Some(a) = &u.aggregator {
            if a.len() > MAX_NAME {
                return Err(bad("aggregator name too long".into()));
            }
        }
        if let Some(p) = &mut u.presence {
            if p.state != "online" && p.state != "offline" {
                return Err(bad(format!("state {:?} is neither online nor offline", p.state)));
            }
            if p.observed_ms > limit {
                return Err(bad(format!("observed_ms {} is in the future", p.observed_ms)));
            }
            if let Some(v) = &mut p.version {
                *v = v.chars().filter(|c| !c.is_control()).take(MAX_NAME).collect();
            }
            match &p.disk {
                None | Some(serde_json::Value::Null) => p.disk = None,
                Some(v @ serde_json::Value::Object(_)) => {
                    let n = v.to_string().len();
                    if n > MAX_DISK_JSON {
                        return Err(bad(format!("disk object of {n} bytes, limit {MAX_DISK_JSON}")));
                    }
                }
                Some(_) => return Err(bad("disk is not an object".into())),
            }
        }
        out.push((d, u));
    }
    Ok(out)
}

/// The answer to `POST /v1/presence`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceAck {
    /// Entries that changed what the sink holds.
    pub applied: usize,
    /// Entries that changed nothing (older or duplicate).
    pub unchanged: usize,
    /// Names the presence this sink process holds; a new one at every start.
    /// An aggregator that was answered another view before re-sends every
    /// entry: what it sent may be lost (presence commits are not fsynced,
    /// `rebuild` starts empty). Empty from sinks older than this field.
    #[serde(default)]
    pub view: String,
}

/// One row of `GET /v1/fleet`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FleetRow {
    pub tenant: String,
    pub site: String,
    pub device: String,
    /// `online`, `offline`, or `unknown` (no presence received yet).
    pub state: String,
    pub online: bool,
    /// Last message from the device at an aggregator (else the last change
    /// the catalog applied), RFC 3339 / Unix ms; null if never seen.
    pub last_seen: Option<String>,
    pub last_seen_ms: Option<u64>,
    pub last_seen_age_secs: Option<u64>,
    /// Changes recorded at the edge and not yet cloud-durable, as of the
    /// last presence (null: unknown).
    pub backlog_bytes: Option<u64>,
    pub backlog_changes: Option<u64>,
    /// Age now of the oldest change not cloud-durable (the presence's
    /// figure plus the time since it was received); null when none.
    pub oldest_unsynced_age_secs: Option<u64>,
    /// The agent's current epoch (from presence).
    pub epoch: Option<u32>,
    /// Every epoch the catalog holds changes of.
    pub epochs: Vec<u32>,
    /// Conflicts on shared paths that one of this device's versions is part
    /// of, whatever the policy (see `cloud-sink conflicts --device`).
    pub conflict_count: u64,
    pub changes: u64,
    pub files: u64,
    pub logical_bytes: u64,
    pub agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<serde_json::Value>,
    /// The agent's own timestamp in its last presence.
    pub presence_ts_ms: Option<u64>,
    /// When an aggregator received that presence (aggregator clock).
    pub presence_observed_ms: Option<u64>,
    pub aggregator: Option<String>,
}

/// What the catalog knows of a device, for [`row`].
#[derive(Clone, Debug, Default)]
pub struct CatalogCounts {
    pub last_seen_ms: u64,
    pub changes: u64,
    pub files: u64,
    pub logical_bytes: u64,
    pub epochs: Vec<u32>,
}

/// Builds a fleet row from what the catalog and presence hold.
pub fn row(d: &DeviceRef, cat: Option<&CatalogCounts>, pres: Option<&PresenceRecord>, now_ms: u64) -> FleetRow {
    let p = pres.and_then(|r| r.presence.as_ref());
    let state = p.map_or("unknown", |p| p.state.as_str()).to_string();
    // The region's view when there is one; the catalog's (time a change was
    // applied, or its HLC after a rebuild) otherwise.
    let last_seen_ms = match pres.map(|r| r.last_seen_ms).filter(|&ms| ms > 0) {
        Some(ms) => Some(ms),
        None => cat.map(|c| c.last_seen_ms).filter(|&ms| ms > 0),
    };
    let oldest = p.and_then(|p| {
        let age = p.oldest_unsynced_age_secs?;
        if p.backlog_changes == Some(0) {
            return None;
        }
        Some(age + now_ms.saturating_sub(p.observed_ms) / 1000)
    });
    FleetRow {
        tenant: d.tenant.to_string(),
        site: d.site.to_string(),
        device: d.device.to_string(),
        online: state == "online",
        state,
        last_seen: last_seen_ms.map(crate::format_ms),
        last_seen_ms,
        last_seen_age_secs: last_seen_ms.map(|ms| now_ms.saturating_sub(ms) / 1000),
        backlog_bytes: p.and_then(|p| p.backlog_bytes),
        backlog_changes: p.and_then(|p| p.backlog_changes),
        oldest_unsynced_age_secs: oldest,
        epoch: p.and_then(|p| p.epoch),
        epochs: cat.map(|c| c.epochs.clone()).unwrap_or_default(),
        conflict_count: 0,
        changes: cat.map_or(0, |c| c.changes),
        files: cat.map_or(0, |c| c.files),
        logical_bytes: cat.map_or(0, |c| c.logical_bytes),
        agent_version: p.and_then(|p| p.version.clone()),
        disk: p.and_then(|p| p.disk.clone()),
        presence_ts_ms: p.and_then(|p| p.ts_ms),
        presence_observed_ms: p.map(|p| p.observed_ms),
        aggregator: pres.and_then(|r| r.aggregator.clone()),
    }
}

/// Why a row deserves attention in `cloud-sink fleet`.
pub fn flags(r: &FleetRow, backlog_bytes_warn: u64, backlog_age_warn_secs: u64) -> Vec<&'static str> {
    let mut f = Vec::new();
    match r.state.as_str() {
        "offline" => f.push("OFFLINE"),
        "unknown" => f.push("NO-PRESENCE"),
        _ => {}
    }
    if r.backlog_bytes.is_some_and(|b| b >= backlog_bytes_warn) {
        f.push("BACKLOG-LARGE");
    }
    if r.oldest_unsynced_age_secs.is_some_and(|a| a >= backlog_age_warn_secs) {
        f.push("BACKLOG-OLD");
    }
    if r.conflict_count > 0 {
        f.push("CONFLICTS");
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upd(state: &str, observed: u64, seen: u64) -> PresenceUpdate {
        PresenceUpdate {
            tenant: "acme".into(),
            site: "p".into(),
            device: "d".into(),
            last_seen_ms: seen,
            presence: Some(PresenceInfo {
                state: state.into(),
                version: Some("0.1.0".into()),
                epoch: Some(3),
                backlog_bytes: Some(10),
                backlog_changes: Some(1),
                oldest_unsynced_age_secs: Some(5),
                ts_ms: Some(1),
                disk: None,
                observed_ms: observed,
            }),
            aggregator: Some("a".into()),
        }
    }

    #[test]
    fn merge_is_ordered_by_observation_and_idempotent() {
        let mut r = PresenceRecord {
            last_seen_ms: 0,
            presence: None,
            aggregator: None,
        };
        assert!(r.merge(&upd("online", 100, 100)));
        assert!(!r.merge(&upd("online", 100, 100)), "a replay changes nothing");
        assert!(r.merge(&upd("offline", 200, 90)));
        assert!(!r.merge(&upd("online", 150, 100)), "older presence is ignored");
        let p = r.presence.as_ref().expect("presence");
        assert_eq!((p.state.as_str(), r.last_seen_ms), ("offline", 100));
    }

    #[test]
    fn rows_age_the_backlog_and_flag() {
        let d = DeviceRef::new("acme", "p", "d").expect("ids");
        let mut r = PresenceRecord {
            last_seen_ms: 0,
            presence: None,
            aggregator: None,
        };
        r.merge(&upd("offline", 10_000, 9_000));
        let row = row(&d, None, Some(&r), 70_000);
        assert_eq!(row.oldest_unsynced_age_secs, Some(65));
        assert_eq!(row.last_seen_age_secs, Some(61));
        assert!(!row.online);
        assert_eq!(flags(&row, 5, 60), vec!["OFFLINE", "BACKLOG-LARGE", "BACKLOG-OLD"]);
        let none = super::row(&d, None, None, 1);
        assert_eq!((none.state.as_str(), none.last_seen_ms), ("unknown", None));
    }

    #[test]
    fn bad_bodies_are_refused() {
        let now = 1_000_000;
        for b in [
            &b"{"[..],
            b"{}",
            b"[1]",
            b"[{\"tenant\":\"A\",\"site\":\"p\",\"device\":\"d\"}]",
            b"[{\"tenant\":\"a\",\"site\":\"p\",\"device\":\"../x\"}]",
            b"[{\"tenant\":\"a\",\"site\":\"p\",\"device\":\"d\",\"last_seen_ms\":-1}]",
            b"[{\"tenant\":\"a\",\"site\":\"p\",\"device\":\"d\",\"last_seen_ms\":99999999999}]",
            b"[{\"tenant\":\"a\",\"site\":\"p\",\"device\":\"d\",\"presence\":{\"state\":\"up\",\"observed_ms\":1}}]",
            b"[{\"tenant\":\"a\",\"site\":\"p\",\"device\":\"d\",\"presence\":{\"state\":\"online\"}}]",
            b"[{\"tenant\":\"a\",\"site\":\"p\",\"device\":\"d\",\"presence\":{\"state\":\"online\",\"observed_ms\":1,\"disk\":[]}}]",
        ] {
            assert!(parse_updates(b, now).is_err(), "{}", String::from_utf8_lossy(b));
        }
        let ok = parse_updates(
            b"[{\"tenant\":\"a\",\"site\":\"p\",\"device\":\"d\",\"last_seen_ms\":5,\"presence\":{\"state\":\"online\",\"observed_ms\":5,\"disk\":{\"free\":1}}}]",
            now,
        )
        .expect("valid");
        assert_eq!(ok.len(), 1);
        assert_eq!(parse_updates(b"[]", now).expect("empty").len(), 0);
    }
}
