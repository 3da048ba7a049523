//! Hybrid logical clock: physical milliseconds in the high 48 bits and a
//! counter in the low 16. It never goes backwards even when the wall clock
//! does, and it moves past any timestamp it has observed.

use minicbor::{Decode, Encode};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Default, Encode, Decode)]
#[cbor(transparent)]
pub struct Hlc(#[n(0)] pub u64);

impl Hlc {
    pub fn from_parts(ms: u64, counter: u16) -> Hlc {
        Hlc((ms << 16) | u64::from(counter))
    }
    /// Physical part, milliseconds since the Unix epoch.
    pub fn millis(self) -> u64 {
        self.0 >> 16
    }

    /// Next timestamp for a local event at wall time `now_ms`.
    pub fn tick(&mut self, now_ms: u64) -> Hlc {
        let now = now_ms & ((1 << 48) - 1);
        *self = if now > self.millis() {
            Hlc::from_parts(now, 0)
        } else {
            Hlc(self.0.saturating_add(1))
        };
        *self
    }

    /// Merge a timestamp seen from elsewhere.
    pub fn observe(&mut self, other: Hlc) {
        if other > *self {
            *self = other;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_across_clock_jumps() {
        let mut h = Hlc::default();
        let a = h.tick(1_000);
        let b = h.tick(500); // wall clock jumped back
        let c = h.tick(500);
        assert!(a < b && b < c);
        assert_eq!(c.millis(), 1_000);
        let d = h.tick(2_000);
        assert_eq!(d, Hlc::from_parts(2_000, 0));
        h.observe(Hlc::from_parts(9_000, 3));
        assert!(h.tick(2_001) > Hlc::from_parts(9_000, 3));
    }
}
