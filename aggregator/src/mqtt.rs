//! MQTT side: the rumqttc event loop task owns the socket and never waits on
//! the store; a worker task runs the sans-IO server on the up messages (the
//! store work on the blocking pool) and publishes the replies.
//!
//! Group commit: the worker takes every message already queued (at most
//! [`GROUP_MAX_MESSAGES`] / [`GROUP_MAX_BYTES`]), runs them all through the
//! server in one store [`Group`] (one redb transaction, one pack fsync) and
//! publishes their replies and acks only after the group committed. So no
//! reply that acknowledges durability (Knowledge, Committed, anything
//! computed from the group's writes) leaves before that state is durable,
//! and a crash before the commit loses only messages not acked to the
//! broker, which it delivers again.
//!
//! Flow control: incoming publishes are acked manually after they were
//! handled, and the broker is told a receive maximum, so the queue between
//! the event loop and the worker stays bounded by the broker's in-flight
//! window and a message the aggregator crashed on is redelivered.

use crate::presence::Tracker;
use crate::sink::SinkHttp;
use crate::store::{AggStore, Group};
use crate::{AggConfig, AggStats, Result};
use protocol::knowledge::Knowledge;
use protocol::msg::{Message, Nack, MQTT_MAX_PACKET};
use protocol::server::{Peer, Server, ServerConfig, ServerStats, ServerStore};
use protocol::topic::{self, Dir};
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// Unacked QoS 1 messages the broker may send us at once.
const RECEIVE_MAXIMUM: u16 = 64;
/// Most messages handled in one group commit: all the broker may have in
/// flight to us.
pub const GROUP_MAX_MESSAGES: usize = RECEIVE_MAXIMUM as usize;
/// Most payload bytes in one group commit (the last message may pass it).
pub const GROUP_MAX_BYTES: usize = 64 << 20;
/// Session kept by the broker while we are away: a week, as for agents.
const SESSION_EXPIRY_S: u32 = 7 * 24 * 3600;

pub fn connect(cfg: &AggConfig) -> Result<(AsyncClient, EventLoop)> {
    let (host, port) = crate::parse_mqtt_url(&cfg.broker)?;
    let mut o = MqttOptions::new(format!("ferry-agg-{}", cfg.id), host, port);
    o.set_clean_start(false)
        .set_session_expiry_interval(Some(SESSION_EXPIRY_S))
        .set_max_packet_size(Some(MQTT_MAX_PACKET as u32))
        .set_receive_maximum(Some(RECEIVE_MAXIMUM))
        .set_keep_alive(Duration::from_secs(30))
        .set_manual_acks(true);
    Ok(AsyncClient::new(o, 1024))
}

pub fn subscription(cfg: &AggConfig) -> String {
    topic::up_filter(cfg.share_group.as_deref())
}

/// The presence subscription: never shared (retained messages are not sent
/// on shared subscriptions, and every aggregator should know the whole
/// fleet), QoS 0 (nothing stale is queued while we are away; every
/// re-subscription delivers the retained latest presence). See `presence`.
pub fn presence_subscription() -> String {
    topic::presence_filter()
}

/// Drives the connection forever: reconnects with backoff, subscribes after
/// every ConnAck, hands publishes to the worker.
pub async fn event_loop(
    mut ev: EventLoop,
    client: AsyncClient,
    filter: String,
    to_worker: UnboundedSender<Publish>,
    stats: Arc<AggStats>,
    tracker: Arc<Tracker>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match ev.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                tracing::info!(session_present = ack.session_present, "connected to broker");
                backoff = Duration::from_millis(100);
                // Subscribe from another task: this one drains the request
                // channel the subscribe goes through.
                let (c, f) = (client.clone(), filter.clone());
                tokio::spawn(async move {
                    if let Err(e) = c.subscribe(f.clone(), QoS::AtLeastOnce).await {
                        tracing::error!("subscribing to {f}: {e}");
                    }
                    let pf = presence_subscription();
                    if let Err(e) = c.subscribe(pf.clone(), QoS::AtMostOnce).await {
                        tracing::error!("subscribing to {pf}: {e}");
                    }
                });
            }
            Ok(Event::Incoming(Packet::SubAck(s))) => {
                if s.return_codes
                    .iter()
                    .any(|c| !matches!(c, rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)))
                {
                    tracing::error!(
                        "broker refused a subscription ({filter} or presence): {:?}",
                        s.return_codes
                    );
                } else {
                    tracing::info!("subscribed (pkid {})", s.pkid);
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                AggStats::add(&stats.messages_in, 1);
                if let Some(p) = on_publish(&tracker, p) {
                    if to_worker.send(p).is_err() {
                        return; // worker gone: shutting down
                    }
                }
            }
            Ok(Event::Incoming(Packet::Disconnect(d))) => {
                tracing::warn!("broker disconnected us: {:?}", d.reason_code);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("broker connection: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Notes who sent `p`. Presence is handled here (it is tiny and needs no
/// ack at QoS 0); anything else goes on to the worker.
pub fn on_publish(tracker: &Tracker, p: Publish) -> Option<Publish> {
    let t = String::from_utf8_lossy(&p.topic);
    match topic::parse(&t) {
        Some((device, Dir::Up, kind)) if kind == "presence" => {
            let _ = tracker.on_payload(&device, &p.payload, crate::now_ms());
            if p.qos != QoS::AtMostOnce {
                // Someone subscribed us at QoS 1 (or the broker upgraded): the
                // worker acks it.
                return Some(p);
            }
            None
        }
        Some((device, Dir::Up, _)) => {
            tracker.seen(&device, crate::now_ms());
            Some(p)
        }
        _ => Some(p),
    }
}

/// Asks the sink, at an agent's Hello, what the cloud holds of that device,
/// so an agent that moved here from another aggregator (or whose CloudAck was
/// lost) re-sends nothing the cloud has (DESIGN.md §6: the new aggregator
/// combines its own and the cloud's knowledge).
pub struct CloudLookup {
    pub sink: SinkHttp,
    pub timeout: Duration,
    /// After a failed lookup, Hellos are answered from local knowledge alone
    /// for a while rather than each waiting for a sink that is away.
    quiet_until: Option<Instant>,
}

impl CloudLookup {
    pub fn new(sink: SinkHttp, timeout: Duration) -> CloudLookup {
        CloudLookup {
            sink,
            timeout,
            quiet_until: None,
        }
    }

    /// For every Hello in `group`: asks the sink (concurrently) what the
    /// cloud holds of its device and merges that into the store (one
    /// commit), and stashes the server changes after the Hello's cursor.
    /// Failures only cost the optimisation.
    async fn before_hellos(&mut self, group: &[Publish], store: &Arc<AggStore>, stats: &AggStats) {
        if self.timeout.is_zero() || self.quiet_until.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let mut lookups = tokio::task::JoinSet::new();
        for p in group {
            let t = String::from_utf8_lossy(&p.topic);
            let Some((device, Dir::Up, kind)) = topic::parse(&t) else {
                continue;
            };
            if kind != "hello" {
                continue;
            }
            // Server changes (central metadata, shared-path heads) the agent
            // has not applied yet: answered right after its Knowledge.
            let cursor = match Message::decode(&p.payload) {
                Ok(Message::Hello(h)) => h.server_cursor,
                _ => None,
            };
            let (sink, timeout) = (self.sink.clone(), self.timeout);
            lookups.spawn(async move {
                let started = Instant::now();
                let k = sink.cloud_knowledge(&device, timeout).await;
                let changes = match (&k, cursor) {
                    (Ok(_), Some(after)) => Some(sink.device_changes(&device, after, timeout).await),
                    _ => None,
                };
                (device, k, changes, started.elapsed())
            });
        }
        if lookups.is_empty() {
            return;
        }
        let mut cloud = Knowledge::default();
        let mut failed = false;
        while let Some(r) = lookups.join_next().await {
            let Ok((device, k, changes, took)) = r else {
                continue;
            };
            match k {
                Ok(k) => {
                    AggStats::add(&stats.cloud_lookups, 1);
                    tracing::debug!(%device, ms = took.as_millis() as u64, "cloud knowledge looked up");
                    cloud.union_with(&k);
                }
                Err(e) => {
                    AggStats::add(&stats.cloud_lookup_failures, 1);
                    failed = true;
                    tracing::info!(%device, "cloud knowledge lookup failed: {e}; answering from local knowledge");
                }
            }
            match changes {
                Some(Ok(ch)) => {
                    AggStats::add(&stats.server_changes_relayed, ch.items.len() as u64);
                    store.stash_changes(&device, ch);
                }
                Some(Err(e)) => tracing::info!(%device, "server changes lookup failed: {e}"),
                None => {}
            }
        }
        self.quiet_until = failed.then(|| Instant::now() + LOOKUP_QUIET);
        if cloud.map.is_empty() {
            return;
        }
        let st = store.clone();
        match tokio::task::spawn_blocking(move || st.merge_cloud(&cloud)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!("storing cloud knowledge: {e}"),
            Err(e) => tracing::error!("storing cloud knowledge: {e}"),
        }
    }
}

/// Pushes new server changes to the agents this aggregator has heard from,
/// polling the sink every `poll`. Starts at the sink sequence of "a minute
/// before now" (gseqs are microsecond-based): older changes reach agents at
/// their next Hello, so nothing depends on this push arriving.
pub async fn changes_loop(
    sink: SinkHttp,
    client: AsyncClient,
    tracker: Arc<crate::presence::Tracker>,
    poll: Duration,
    stats: Arc<AggStats>,
) {
    if poll.is_zero() {
        std::future::pending::<()>().await;
    }
    let mut cursor = crate::now_ms().saturating_sub(60_000).saturating_mul(1000);
    loop {
        tokio::time::sleep(poll).await;
        loop {
            let page = match sink.fleet_changes(cursor, 1000).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!("polling server changes: {e}");
                    break;
                }
            };
            let mut per_device: std::collections::BTreeMap<String, (protocol::DeviceRef, Vec<_>)> = Default::default();
            for it in page.items {
                if it.change.body.validate().is_err() || tracker.get(&it.device).is_none() {
                    continue;
                }
                per_device
                    .entry(it.device.key())
                    .or_insert_with(|| (it.device.clone(), Vec::new()))
                    .1
                    .push(it.change);
            }
            for (_, (device, items)) in per_device {
                let n = items.len() as u64;
                let m = Message::Changes(protocol::msg::Changes { items, upto: None });
                if let Some((t, payload)) = encode_reply(&device, &m) {
                    match client.publish(t, QoS::AtLeastOnce, false, payload).await {
                        Ok(()) => AggStats::add(&stats.server_changes_relayed, n),
                        Err(e) => tracing::warn!(%device, "pushing server changes: {e}"),
                    }
                }
            }
            cursor = cursor.max(page.upto);
            if !page.more {
                break;
            }
        }
    }
}

/// How long Hellos skip the cloud lookup after one failed.
const LOOKUP_QUIET: Duration = Duration::from_secs(30);

/// Handles up messages in arrival order (so per device order too), in
/// group commits (module docs).
pub async fn worker(
    mut rx: UnboundedReceiver<Publish>,
    client: AsyncClient,
    store: Arc<AggStore>,
    stats: Arc<AggStats>,
    mut lookup: Option<CloudLookup>,
) {
    let mut server = Some(Server::new(ServerConfig::default()));
    let mut seen = ServerStats::default();
    while let Some(p) = rx.recv().await {
        let mut bytes = p.payload.len();
        let mut group = vec![p];
        while group.len() < GROUP_MAX_MESSAGES && bytes < GROUP_MAX_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.payload.len();
                    group.push(p);
                }
                Err(_) => break,
            }
        }
        if let Some(l) = lookup.as_mut() {
            l.before_hellos(&group, &store, &stats).await;
        }
        let srv = server.take().unwrap_or_else(|| Server::new(ServerConfig::default()));
        let (st, msgs) = (store.clone(), group.clone());
        let out = tokio::task::spawn_blocking(move || {
            let mut srv = srv;
            let items: Vec<(&[u8], &[u8])> = msgs.iter().map(|p| (&p.topic[..], &p.payload[..])).collect();
            let out = handle_group(&mut srv, &st, &items);
            (srv, out)
        })
        .await;
        // Returns only after the group committed (or failed and its
        // replies were replaced by Nacks): publishing is safe from here.
        let replies = match out {
            Ok((srv, out)) => {
                account(&stats, &srv.stats, &mut seen);
                let bad = out.iter().filter(|(_, bad)| *bad).count();
                AggStats::add(&stats.bad_messages, bad as u64);
                server = Some(srv);
                out.into_iter().flat_map(|(r, _)| r).collect()
            }
            Err(e) => {
                // A panic in the server logic: the group was not committed,
                // pending batches are forgotten (clients offer them again),
                // the process keeps serving.
                tracing::error!("message handler panicked: {e}");
                seen = ServerStats::default();
                Vec::new()
            }
        };
        for (t, payload) in replies {
            match client.publish(t.clone(), QoS::AtLeastOnce, false, payload).await {
                Ok(()) => AggStats::add(&stats.messages_out, 1),
                Err(e) => tracing::warn!("publishing to {t}: {e}"),
            }
        }
        for p in &group {
            if let Err(e) = client.ack(p).await {
                tracing::debug!("ack: {e}");
            }
        }
    }
}

/// Adds what the server counted since the last call.
fn account(stats: &AggStats, now: &ServerStats, seen: &mut ServerStats) {
    let d = |a: u64, b: u64| a.saturating_sub(b);
    AggStats::add(&stats.chunks_received, d(now.chunks_received, seen.chunks_received));
    AggStats::add(&stats.chunks_duplicate, d(now.chunks_duplicate, seen.chunks_duplicate));
    let missing = d(now.chunks_base_missing, seen.chunks_base_missing);
    if missing > 0 {
        tracing::warn!(missing, "extension chunks arrived before their base");
        AggStats::add(&stats.chunks_base_missing, missing);
    }
    AggStats::add(
        &stats.bytes_received,
        d(now.chunk_bytes_received, seen.chunk_bytes_received),
    );
    AggStats::add(&stats.changes_applied, d(now.changes_applied, seen.changes_applied));
    AggStats::add(&stats.changes_rejected, d(now.changes_rejected, seen.changes_rejected));
    AggStats::add(&stats.backpressure, d(now.backpressure, seen.backpressure));
    AggStats::add(&stats.bad_messages, d(now.chunks_bad, seen.chunks_bad));
    *seen = now.clone();
}

fn encode_reply(device: &protocol::DeviceRef, m: &Message) -> Option<(String, Vec<u8>)> {
    match m.encode() {
        Ok(b) => Some((topic::down(device, m.kind()), b)),
        Err(e) => {
            tracing::error!(%device, "cannot encode {} reply: {e}", m.kind());
            None
        }
    }
}

fn nack(device: &protocol::DeviceRef, reason: String) -> Vec<(String, Vec<u8>)> {
    encode_reply(device, &Message::Nack(Nack { reason }))
        .into_iter()
        .collect()
}

/// Replies of one message, as (topic, payload), and whether it was bad.
pub type Handled = (Vec<(String, Vec<u8>)>, bool);

/// Runs one up message through the server at the wall clock. Returns the
/// replies as (topic, payload) and whether the input was bad. Never panics
/// on peer input.
pub fn handle_publish(server: &mut Server, store: &AggStore, topic_bytes: &[u8], payload: &[u8]) -> Handled {
    handle_publish_at(server, store, crate::now_ms(), topic_bytes, payload)
}

/// [`handle_publish`] at `now_ms` (a simulator's virtual time): a group
/// commit of one message. Synchronous and single-threaded: the server
/// logic and the store, nothing else. Presence payloads are only
/// acknowledged here (the daemon tracks them in [`on_publish`]); Hellos get
/// no cloud lookup (the daemon's [`CloudLookup`] runs before this, over
/// HTTP) — only changes stashed with [`AggStore::stash_changes`] are relayed.
pub fn handle_publish_at(
    server: &mut Server,
    store: &AggStore,
    now_ms: u64,
    topic_bytes: &[u8],
    payload: &[u8],
) -> Handled {
    handle_group_at(server, store, now_ms, &[(topic_bytes, payload)])
        .pop()
        .unwrap_or_default()
}

/// Runs `msgs` (topic, payload), in order, through the server at the wall
/// clock in one group commit. See [`handle_group_at`].
pub fn handle_group(server: &mut Server, store: &AggStore, msgs: &[(&[u8], &[u8])]) -> Vec<Handled> {
    handle_group_at(server, store, crate::now_ms(), msgs)
}

/// Runs `msgs` (topic, payload), in order, through the server in one store
/// [`Group`] and commits it; returns each message's replies and whether it
/// was bad, in order. Returns only after the commit: the replies may then be
/// published. If the group cannot commit, every message is answered with a
/// Nack instead (its client retries) and nothing of the group is durable.
pub fn handle_group_at(server: &mut Server, store: &AggStore, now_ms: u64, msgs: &[(&[u8], &[u8])]) -> Vec<Handled> {
    let committed = store.group().and_then(|mut g| {
        let out: Vec<Handled> = msgs
            .iter()
            .map(|(t, p)| handle_in(server, &mut g, now_ms, t, p))
            .collect();
        g.commit().map(|()| out)
    });
    match committed {
        Ok(out) => out,
        Err(e) => {
            tracing::error!(messages = msgs.len(), "group commit failed: {e}");
            msgs.iter()
                .map(|(t, _)| {
                    let t = String::from_utf8_lossy(t);
                    match topic::parse(&t) {
                        Some((device, Dir::Up, kind)) if kind != "presence" => {
                            (nack(&device, format!("aggregator error: {e}")), false)
                        }
                        _ => (Vec::new(), false),
                    }
                })
                .collect()
        }
    }
}

/// One message through the server on `store` (a group: nothing it writes is
/// durable before the group commits).
fn handle_in(server: &mut Server, store: &mut Group<'_>, now_ms: u64, topic_bytes: &[u8], payload: &[u8]) -> Handled {
    let t = String::from_utf8_lossy(topic_bytes);
    let Some((device, Dir::Up, kind)) = topic::parse(&t) else {
        tracing::warn!("message on unexpected topic {t:?} ignored");
        return (Vec::new(), true);
    };
    if kind == "presence" {
        // Handled by `on_publish`; a QoS 1 copy only needs its ack.
        return (Vec::new(), false);
    }
    let msg = match Message::decode(payload) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(%device, kind, bytes = payload.len(), "bad message: {e}");
            return (nack(&device, format!("bad {kind} message: {e}")), true);
        }
    };
    if msg.kind() != kind {
        tracing::warn!(%device, "{} message on the {kind} topic", msg.kind());
        return (
            nack(&device, format!("{} message sent on the {kind} topic", msg.kind())),
            true,
        );
    }
    let key = device.key();
    let peer = Peer {
        name: &key,
        device: Some(&device),
    };
    let s: &mut dyn ServerStore = store;
    match server.handle(now_ms, &peer, msg, s) {
        Ok(replies) => {
            let mut bad = false;
            for r in &replies {
                if let Message::Nack(n) = r {
                    tracing::warn!(%device, kind, "refused: {}", n.reason);
                    bad = true;
                }
            }
            (replies.iter().filter_map(|r| encode_reply(&device, r)).collect(), bad)
        }
        Err(e) => {
            tracing::error!(%device, kind, "handling message: {e}");
            (nack(&device, format!("aggregator error: {e}")), false)
        }
    }
}
