//! Links and the broker model.
//!
//! A link is an agent's path to the regional broker: up or down over time
//! by its profile and scheduled outages, with latency, jitter, a bandwidth
//! (transmissions queue behind each other), and per-message loss,
//! duplication and reordering. The broker keeps a QoS 1 persistent session
//! per client: messages for an offline client wait in its session queue (up
//! to a bound; beyond it the oldest are dropped, as Mosquitto's
//! `max_queued_messages` does), and it can lose every session at once (a
//! broker restart: clients reconnect with `session_present = 0`).

use super::core::{Ms, DAY};
use super::scenario::{Faults, LinkKind, LinkSpec};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::VecDeque;

/// Exponentially distributed time with the given mean (at least 1 ms).
pub fn exp_ms(rng: &mut ChaCha8Rng, mean: Ms) -> Ms {
    let u: f64 = rng.gen_range(f64::EPSILON..1.0);
    ((-u.ln()) * mean as f64).clamp(1.0, 1e15) as Ms
}

/// Per-agent link state.
pub struct Link {
    pub spec: LinkSpec,
    /// Up by the profile (cellular drops, nightly windows).
    pub profile_up: bool,
    /// Scheduled outages covering now.
    pub outages: u32,
    /// Sender side: when the link is free to start the next transmission.
    busy_until: Ms,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub msgs_up: u64,
    pub msgs_down: u64,
    pub dropped: u64,
}

/// What happens to one transmitted message.
pub struct Fate {
    /// Arrival times (empty: lost; two: duplicated).
    pub arrivals: Vec<Ms>,
    /// Lost with its connection: the connection breaks at this time.
    pub reset: Option<Ms>,
}

impl Link {
    pub fn new(spec: LinkSpec) -> Link {
        let profile_up = !matches!(spec.kind, LinkKind::Nightly);
        Link {
            spec,
            profile_up,
            outages: 0,
            busy_until: 0,
            bytes_up: 0,
            bytes_down: 0,
            msgs_up: 0,
            msgs_down: 0,
            dropped: 0,
        }
    }

    pub fn is_up(&self) -> bool {
        self.profile_up && self.outages == 0
    }

    /// Next profile transition after `now`: (time, up?). None: never changes.
    pub fn next_profile_change(&self, now: Ms, rng: &mut ChaCha8Rng) -> Option<(Ms, bool)> {
        match self.spec.kind {
            LinkKind::Always | LinkKind::Satellite => None,
            LinkKind::Cellular => {
                let mean = if self.profile_up {
                    self.spec.mean_up.0
                } else {
                    self.spec.mean_down.0
                };
                Some((now + exp_ms(rng, mean), !self.profile_up))
            }
            LinkKind::Nightly => {
                let day = now / DAY * DAY;
                let (s, e) = (
                    self.spec.window_start.0,
                    self.spec.window_start.0 + self.spec.window_len.0,
                );
                let t = now - day;
                if self.profile_up {
                    // Close at the end of the window we are in.
                    let end = if t < e.saturating_sub(DAY) {
                        day + e - DAY
                    } else {
                        day + e
                    };
                    Some((end.max(now + 1), false))
                } else if t < s {
                    Some((day + s, true))
                } else {
                    Some((day + DAY + s, true))
                }
            }
        }
    }

    /// Whether a nightly link is inside its window at `now`.
    pub fn nightly_open(&self, now: Ms) -> bool {
        let t = now % DAY;
        let (s, e) = (
            self.spec.window_start.0,
            self.spec.window_start.0 + self.spec.window_len.0,
        );
        (t >= s && t < e) || (e > DAY && t < e - DAY)
    }

    /// Sends `len` bytes at `now` in one direction: when it arrives, if at
    /// all. Faults apply only while `faults` is Some (not while healing).
    pub fn transmit(&mut self, now: Ms, len: usize, up: bool, faults: Option<&Faults>, rng: &mut ChaCha8Rng) -> Fate {
        let start = now.max(self.busy_until);
        let tx_ms = if self.spec.bandwidth > 0 {
            (len as u64 * 1000).div_ceil(self.spec.bandwidth)
        } else {
            0
        };
        self.busy_until = start + tx_ms;
        if up {
            self.bytes_up += len as u64;
            self.msgs_up += 1;
        } else {
            self.bytes_down += len as u64;
            self.msgs_down += 1;
        }
        let jitter = if self.spec.jitter.0 > 0 {
            rng.gen_range(0..=self.spec.jitter.0)
        } else {
            0
        };
        let at = self.busy_until + self.spec.latency.0 + jitter;
        let Some(f) = faults else {
            return Fate {
                arrivals: vec![at],
                reset: None,
            };
        };
        if f.loss > 0.0 && rng.gen_bool(f.loss) {
            self.dropped += 1;
            return Fate {
                arrivals: vec![],
                reset: Some(at),
            };
        }
        if f.silent_loss > 0.0 && rng.gen_bool(f.silent_loss) {
            self.dropped += 1;
            return Fate {
                arrivals: vec![],
                reset: None,
            };
        }
        let at = if f.reorder > 0.0 && rng.gen_bool(f.reorder) {
            at + rng.gen_range(1..=f.reorder_delay.0.max(1))
        } else {
            at
        };
        let mut arrivals = vec![at];
        if f.dup > 0.0 && rng.gen_bool(f.dup) {
            arrivals.push(at + rng.gen_range(0..=f.reorder_delay.0.max(1)));
        }
        Fate { arrivals, reset: None }
    }
}

/// One client's persistent session at the broker.
#[derive(Default)]
pub struct Session {
    pub exists: bool,
    /// Messages for the client while it is offline (oldest first).
    pub queue: VecDeque<Vec<u8>>,
    pub dropped: u64,
    pub peak: usize,
}

impl Session {
    /// Queues a message for an offline client; returns false if an old one
    /// had to be dropped to stay within `bound`.
    pub fn enqueue(&mut self, msg: Vec<u8>, bound: usize) -> bool {
        self.exists = true;
        self.queue.push_back(msg);
        let mut ok = true;
        while self.queue.len() > bound {
            self.queue.pop_front();
            self.dropped += 1;
            ok = false;
        }
        self.peak = self.peak.max(self.queue.len());
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dst::core::{stream, HOUR};
    use crate::dst::scenario::Dur;

    #[test]
    fn nightly_windows_alternate() {
        let spec = LinkSpec {
            kind: LinkKind::Nightly,
            window_start: Dur(HOUR),
            window_len: Dur(4 * HOUR),
            ..LinkSpec::default()
        };
        let mut l = Link::new(spec);
        let mut rng = stream(1, "t", 0);
        let mut now = 0;
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (t, up) = l.next_profile_change(now, &mut rng).unwrap();
            seen.push((t, up));
            now = t;
            l.profile_up = up;
            assert_eq!(l.nightly_open(now), up, "at {now}");
        }
        assert_eq!(seen[0], (HOUR, true));
        assert_eq!(seen[1], (5 * HOUR, false));
        assert_eq!(seen[2], (DAY + HOUR, true));
    }

    #[test]
    fn session_queue_is_bounded() {
        let mut s = Session::default();
        for i in 0..10u8 {
            s.enqueue(vec![i], 4);
        }
        assert_eq!(s.queue.len(), 4);
        assert_eq!(s.dropped, 6);
        assert_eq!(s.queue.front(), Some(&vec![6]));
    }
}
