//! HTTP client for the cloud-sink (docs/CONTRACTS.md), shared by the
//! forwarder and the MQTT worker.
//!
//! Every request has a deadline: `sink_timeout` plus its body size at
//! `sink_min_rate`. A link that is open but silent (a stalled proxy, a
//! half-dead NAT entry) is therefore noticed within that bound instead of
//! holding the forwarder for minutes; the round fails, backs off and is
//! retried on a fresh connection. Everything sent to the sink is idempotent.

use crate::{AggConfig, AggStats, Error, Result};
use protocol::ids::DeviceRef;
use protocol::knowledge::Knowledge;
use protocol::meta::FleetChanges;
use protocol::msg::{Changes, Hello, Message, MAX_MESSAGE};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub struct SinkHttp {
    http: reqwest::Client,
    base: String,
    peer: String,
    software: String,
    timeout: Duration,
    min_rate: u64,
    stats: Arc<AggStats>,
}

impl SinkHttp {
    pub fn new(cfg: &AggConfig, stats: Arc<AggStats>) -> Result<SinkHttp> {
        let http = reqwest::Client::builder()
            .connect_timeout(cfg.sink_timeout.min(Duration::from_secs(10)))
            // Idle pooled connections may have died silently behind a NAT.
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_keepalive(Duration::from_secs(15))
            .build()?;
        Ok(SinkHttp {
            http,
            base: cfg.sink.trim_end_matches('/').to_string(),
            peer: cfg.id.clone(),
            software: software(cfg),
            timeout: cfg.sink_timeout,
            min_rate: cfg.sink_min_rate.max(1),
            stats,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn software(&self) -> &str {
        &self.software
    }

    /// The deadline of a request carrying `body` bytes.
    pub fn deadline(&self, body: usize) -> Duration {
        deadline(self.timeout, self.min_rate, body)
    }

    fn note(&self, e: reqwest::Error) -> Error {
        if e.is_timeout() {
            AggStats::add(&self.stats.sink_timeouts, 1);
            Error::Sink(format!("no answer within the deadline ({e})"))
        } else {
            Error::from(e)
        }
    }

    /// Sends one request with the deadline its body size earns (capped by
    /// `limit`); a non-2xx answer is an error naming `what` and the reason.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
        limit: Option<Duration>,
        what: &str,
    ) -> Result<bytes::Bytes> {
        let mut t = self.deadline(body.len());
        if let Some(l) = limit {
            t = t.min(l);
        }
        let r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("content-type", content_type)
            // How the sink tells aggregators apart (else by IP address).
            .header("x-ferry-peer", &self.peer)
            .timeout(t)
            .body(body)
            .send()
            .await
            .map_err(|e| self.note(e))?;
        let status = r.status();
        let bytes = r.bytes().await.map_err(|e| self.note(e))?;
        if !status.is_success() {
            return Err(Error::Sink(format!(
                "{what}: {status}: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(500)]).trim()
            )));
        }
        Ok(bytes)
    }

    /// `PUT /v1/packs/{id}`.
    pub async fn put_pack(&self, id_hex: &str, body: Vec<u8>) -> Result<()> {
        let path = format!("/v1/packs/{id_hex}");
        let what = format!("PUT pack {id_hex}");
        self.send(
            reqwest::Method::PUT,
            &path,
            "application/octet-stream",
            body,
            None,
            &what,
        )
        .await
        .map(|_| ())
    }

    /// `POST /v1/sync` with one envelope; a Nack is an error.
    pub async fn sync(&self, m: &Message) -> Result<Message> {
        self.sync_within(m, None).await
    }

    async fn sync_within(&self, m: &Message, limit: Option<Duration>) -> Result<Message> {
        let bytes = self
            .send(
                reqwest::Method::POST,
                "/v1/sync",
                "application/cbor",
                m.encode()?,
                limit,
                m.kind(),
            )
            .await?;
        match Message::decode(&bytes)? {
            Message::Nack(n) => Err(Error::Sink(format!("{} refused: {}", m.kind(), n.reason))),
            reply => Ok(reply),
        }
    }

    /// What the cloud holds of `device`'s replicas: a Hello naming the
    /// device, answered with the sink's knowledge of it. Bounded by `limit`.
    pub async fn cloud_knowledge(&self, device: &DeviceRef, limit: Duration) -> Result<Knowledge> {
        let hello = Message::Hello(Hello {
            proto: protocol::PROTO_VERSION,
            device: Some(device.clone()),
            replica: None,
            software: self.software.clone(),
            server_cursor: None,
        });
        match self.sync_within(&hello, Some(limit)).await? {
            Message::Knowledge(k) => {
                // Only what concerns this device, whatever the sink sent.
                let mut out = k.cloud;
                out.map.retain(|r, _| r.device == *device);
                Ok(out)
            }
            other => Err(Error::Sink(format!("hello answered with {}", other.kind()))),
        }
    }

    /// `GET /v1/changes` for one device: every server change after `after`.
    pub async fn device_changes(&self, device: &DeviceRef, after: u64, limit: Duration) -> Result<Changes> {
        let path = format!(
            "/v1/changes?tenant={}&site={}&device={}&after={after}",
            device.tenant, device.site, device.device
        );
        let bytes = self
            .send(
                reqwest::Method::GET,
                &path,
                "application/cbor",
                Vec::new(),
                Some(limit),
                "GET changes",
            )
            .await?;
        let ch: Changes = protocol::from_cbor(&bytes, MAX_MESSAGE)?;
        for it in &ch.items {
            it.body.validate()?;
        }
        Ok(ch)
    }

    /// `GET /v1/changes` fleet-wide: a page of server changes after `after`.
    pub async fn fleet_changes(&self, after: u64, limit: usize) -> Result<FleetChanges> {
        let path = format!("/v1/changes?after={after}&limit={limit}");
        let bytes = self
            .send(
                reqwest::Method::GET,
                &path,
                "application/cbor",
                Vec::new(),
                None,
                "GET changes",
            )
            .await?;
        Ok(protocol::from_cbor(&bytes, MAX_MESSAGE)?)
    }

    /// `POST /v1/presence` with a JSON array of presence updates (empty: a
    /// probe). Returns the sink's presence view, `None` from a sink that
    /// names none (older) or an answer that does not parse.
    pub async fn post_presence(&self, updates: &[crate::presence::Update]) -> Result<Option<String>> {
        let body = serde_json::to_vec(updates).map_err(|e| Error::Sink(format!("encoding presence: {e}")))?;
        self.send(
            reqwest::Method::POST,
            "/v1/presence",
            "application/json",
            body,
            None,
            "POST presence",
        )
        .await
        .map(|answer| crate::presence::sink_view(&answer))
    }
}

/// What the aggregator calls itself in its Hello to the sink.
pub fn software(cfg: &AggConfig) -> String {
    format!("ferry-aggregator/{} {}", env!("CARGO_PKG_VERSION"), cfg.id)
}

/// `base` plus the time `body` bytes take at `min_rate` bytes/s.
pub fn deadline(base: Duration, min_rate: u64, body: usize) -> Duration {
    base + Duration::from_secs_f64(body as f64 / min_rate.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_grow_with_the_body() {
        let b = Duration::from_secs(2);
        assert_eq!(deadline(b, 1 << 20, 0), b);
        assert_eq!(deadline(b, 1 << 20, 4 << 20), Duration::from_secs(6));
        assert_eq!(deadline(b, 0, 10), Duration::from_secs(12));
    }
}
