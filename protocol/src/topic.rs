//! MQTT topic layout (DESIGN.md §4):
//! `ferry/v1/{tenant}/{site}/{device}/up/{kind}` agent → region,
//! `ferry/v1/{tenant}/{site}/{device}/down/{kind}` region → agent,
//! `ferry/v1/{tenant}/{site}/{device}/presence` retained presence + last will.

use crate::ids::DeviceRef;

pub const PREFIX: &str = "ferry/v1";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Dir {
    Up,
    Down,
}

pub fn up(d: &DeviceRef, kind: &str) -> String {
    format!("{PREFIX}/{}/up/{kind}", d.key())
}
pub fn down(d: &DeviceRef, kind: &str) -> String {
    format!("{PREFIX}/{}/down/{kind}", d.key())
}
/// What an agent subscribes to.
pub fn down_filter(d: &DeviceRef) -> String {
    format!("{PREFIX}/{}/down/+", d.key())
}
pub fn presence(d: &DeviceRef) -> String {
    format!("{PREFIX}/{}/presence", d.key())
}
/// What an aggregator subscribes to; with `share`, an MQTT v5 shared
/// subscription so several aggregator processes split the load.
pub fn up_filter(share: Option<&str>) -> String {
    match share {
        Some(g) => format!("$share/{g}/{PREFIX}/+/+/+/up/+"),
        None => format!("{PREFIX}/+/+/+/up/+"),
    }
}
pub fn presence_filter() -> String {
    format!("{PREFIX}/+/+/+/presence")
}

/// Parses an up/down topic into (device, direction, kind). Presence topics
/// give kind "presence" and `Dir::Up`. Anything else is `None`.
pub fn parse(topic: &str) -> Option<(DeviceRef, Dir, String)> {
    let rest = topic.strip_prefix(PREFIX)?.strip_prefix('/')?;
    let parts: Vec<&str> = rest.split('/').collect();
    let dev = |p: &[&str]| DeviceRef::new(p[0], p[1], p[2]).ok();
    match parts.as_slice() {
        [_, _, _, "up", kind] => Some((dev(&parts)?, Dir::Up, (*kind).to_string())),
        [_, _, _, "down", kind] => Some((dev(&parts)?, Dir::Down, (*kind).to_string())),
        [_, _, _, "presence"] => Some((dev(&parts)?, Dir::Up, "presence".into())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let d = DeviceRef::new("acme", "plant-1", "gw-07").expect("ids");
        assert_eq!(up(&d, "batch"), "ferry/v1/acme/plant-1/gw-07/up/batch");
        assert_eq!(parse(&up(&d, "batch")), Some((d.clone(), Dir::Up, "batch".into())));
        assert_eq!(
            parse(&down(&d, "prepare")),
            Some((d.clone(), Dir::Down, "prepare".into()))
        );
        assert_eq!(parse(&presence(&d)).map(|p| p.2), Some("presence".into()));
        assert!(parse("ferry/v1/ACME/p/d/up/x").is_none());
        assert!(parse("ferry/v1/a/b/up/x").is_none());
        assert!(parse("other/v1/a/b/c/up/x").is_none());
    }
}
