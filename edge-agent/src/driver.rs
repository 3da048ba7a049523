//! Driving an agent without the daemon: single-threaded, no tokio, no
//! MQTT, in whatever time the driver chooses (the deterministic simulation
//! in `sim`). The daemon's own loop is [`crate::net`]; this is the same
//! work with the I/O left to the caller, in the shape of quinn-proto.
//!
//! # Setup
//!
//! 1. Build an [`AgentConfig`](crate::AgentConfig) with
//!    - `clock`: the virtual clock (Unix ms). Every time the agent reads —
//!      change stamps (HLC), the racy-mtime check of a scan, policy windows,
//!      budgets, starvation, bandwidth buckets, `keep_local`, flush pacing,
//!      status ages, `DiskStatus::checked_ms` — comes from it;
//!    - `entropy`: a seeded source, so epochs and a new device key are the
//!      same every run (the system RNG otherwise);
//!    - `disk_probe`: a closure reporting the modelled disk usage (a full
//!      disk is a `DiskStat` with little `free`), and `disk` watermarks if
//!      pruning is exercised;
//!    - `watch`: real directories (set file mtimes from virtual time), and
//!      `state`: a real path — it names the device key file
//!      `<state>.device-key` and the status snapshot (set
//!      `status_snapshot = false` to skip that file);
//!    - policy classes with `tz = "utc"` or a fixed offset: `local` runs
//!      `date +%z` (a process and a wall-clock cache).
//! 2. [`Agent::open_with_backend`](crate::Agent::open_with_backend)`(cfg,
//!    Box::new(backend))` on the simulator's redb backend. After a simulated
//!    crash, open again on a backend holding only what was synced: redb
//!    repairs it and the agent checks identity and epoch as with a file.
//! 3. `ClientSession::new(cfg.client.clone(), now)`
//!    (`protocol::client`): `now` also seeds batch ids, so it must differ
//!    across restarts of one device.
//!
//! # Each step (virtual time `now`)
//!
//! - Scan: [`Agent::scan_once`](crate::Agent::scan_once) every
//!   `scan_interval`, and at once when
//!   [`Agent::rescan_needed`](crate::Agent::rescan_needed). If the report's
//!   `changes_recorded > 0`, call `session.wake()`. Directory walks are
//!   sorted; a scan records changes in one deterministic order.
//! - Prune: [`Agent::enforce_disk`](crate::Agent::enforce_disk) after each
//!   scan (it calls `disk_probe` and deletes cloud-durable files).
//! - Link up: `session.connected(now, &agent)`; link down:
//!   `session.disconnected()`.
//! - Send: loop `session.poll_transmit(now, &mut agent)` until `None`. For a
//!   `Message::Data`, take [`Agent::take_charges`](crate::Agent::take_charges)
//!   right after it was produced; if
//!   [`Agent::data_gate`](crate::Agent::data_gate)`(&charges)` is non-zero,
//!   hold the message that long (bandwidth cap, schedule, budget); when it
//!   leaves, call [`Agent::charge`](crate::Agent::charge)`(&charges)`. Publish
//!   each message on `protocol::topic::up(&device, msg.kind())`.
//! - Receive: `session.handle(now, msg, &mut agent)` for every message on the
//!   device's down topics (an `Err` is a store error: pause, then
//!   `disconnected` + `connected`, as the daemon does after 5 s).
//! - Timers: when `now >= session.poll_timeout()`, call
//!   `session.handle_timeout(now, &agent)`. If
//!   [`Agent::policy_gated`](crate::Agent::policy_gated), call
//!   `session.wake()` every 10 s (a window may have opened).
//! - Every few seconds [`Agent::flush`](crate::Agent::flush) (counters; the
//!   daemon does it every 5 s) and, when online, publish
//!   [`Agent::presence`](crate::Agent::presence)`(true, now)` retained.
//! - Crash: make the backend drop unsynced writes and refuse new ones, then
//!   [`Agent::crash`](crate::Agent::crash) (no final flush).
//!
//! # Determinism
//!
//! Nothing on these paths reads the wall clock, spawns a thread or needs a
//! runtime; the only other inputs are the file system (watched folders,
//! key file) and `entropy`. Logs go through `tracing`.
