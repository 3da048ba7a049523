//! Identifiers: tenant/site/device ids, replicas, 32-byte hashes.

use crate::{Error, Result};
use minicbor::{decode, encode, Decode, Decoder, Encode, Encoder};
use std::fmt;

/// A validated id: `[a-z0-9][a-z0-9_-]{0,63}`. Validation happens on
/// construction and on decode, so an `Id` from the wire is always safe to use
/// in topics, object keys and file names.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Id(String);

impl Id {
    pub fn new(s: &str) -> Result<Id> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 64
            && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-');
        if ok {
            Ok(Id(s.to_string()))
        } else {
            Err(Error::InvalidId(s.chars().take(80).collect()))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl<C> Encode<C> for Id {
    fn encode<W: encode::Write>(&self, e: &mut Encoder<W>, _: &mut C) -> Result<(), encode::Error<W::Error>> {
        e.str(&self.0)?;
        Ok(())
    }
}
impl<'b, C> Decode<'b, C> for Id {
    fn decode(d: &mut Decoder<'b>, _: &mut C) -> Result<Self, decode::Error> {
        let s = d.str()?;
        Id::new(s).map_err(|_| decode::Error::message("invalid id"))
    }
}

/// A device: tenant, site and device ids.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Encode, Decode)]
pub struct DeviceRef {
    #[n(0)]
    pub tenant: Id,
    #[n(1)]
    pub site: Id,
    #[n(2)]
    pub device: Id,
}

impl DeviceRef {
    pub fn new(tenant: &str, site: &str, device: &str) -> Result<DeviceRef> {
        Ok(DeviceRef {
            tenant: Id::new(tenant)?,
            site: Id::new(site)?,
            device: Id::new(device)?,
        })
    }
    /// `tenant/site/device`: used in topics, object keys and table keys.
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.tenant, self.site, self.device)
    }
}

impl fmt::Display for DeviceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.tenant, self.site, self.device)
    }
}

/// A replica: one device's history under one epoch. A device whose state is
/// lost or restored from an old copy starts a new epoch, so `(replica, seq)`
/// never names two different changes.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Encode, Decode)]
pub struct ReplicaId {
    #[n(0)]
    pub device: DeviceRef,
    #[n(1)]
    pub epoch: u32,
}

impl ReplicaId {
    /// `tenant/site/device/epoch`, zero-padded so keys sort by epoch.
    pub fn key(&self) -> String {
        format!("{}/{:010}", self.device.key(), self.epoch)
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.device, self.epoch)
    }
}

/// A SHA-256 value: chunk ids, pack ids, whole-file digests.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hash32(pub [u8; 32]);

impl Hash32 {
    pub fn of(data: &[u8]) -> Hash32 {
        let d = ring::digest::digest(&ring::digest::SHA256, data);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Hash32(out)
    }
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
    pub fn from_hex(s: &str) -> Result<Hash32> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return Err(Error::Decode(format!(
                "hash must be 64 hex digits, got {} chars",
                b.len()
            )));
        }
        let mut out = [0u8; 32];
        for (i, pair) in b.chunks(2).enumerate() {
            let hex = |c: u8| match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                b'A'..=b'F' => Some(c - b'A' + 10),
                _ => None,
            };
            match (hex(pair[0]), hex(pair[1])) {
                (Some(h), Some(l)) => out[i] = (h << 4) | l,
                _ => return Err(Error::Decode("hash has a non-hex digit".into())),
            }
        }
        Ok(Hash32(out))
    }
}

impl fmt::Debug for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}
impl fmt::Display for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl<C> Encode<C> for Hash32 {
    fn encode<W: encode::Write>(&self, e: &mut Encoder<W>, _: &mut C) -> Result<(), encode::Error<W::Error>> {
        e.bytes(&self.0)?;
        Ok(())
    }
}
impl<'b, C> Decode<'b, C> for Hash32 {
    fn decode(d: &mut Decoder<'b>, _: &mut C) -> Result<Self, decode::Error> {
        let b = d.bytes()?;
        let arr: [u8; 32] = b
            .try_into()
            .map_err(|_| decode::Error::message("hash must be 32 bytes"))?;
        Ok(Hash32(arr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated() {
        assert!(Id::new("plant-7_a").is_ok());
        assert!(Id::new("").is_err());
        assert!(Id::new("-x").is_err());
        assert!(Id::new("A").is_err());
        assert!(Id::new("a/b").is_err());
        assert!(Id::new("+").is_err());
        assert!(Id::new(&"a".repeat(65)).is_err());
        assert!(Id::new(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn invalid_id_on_the_wire_is_a_decode_error() {
        let bytes = crate::to_cbor(&"../etc");
        assert!(crate::from_cbor::<Id>(&bytes, 1024).is_err());
    }

    #[test]
    fn hash_hex_round_trip() {
        let h = Hash32::of(b"abc");
        assert_eq!(
            h.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(Hash32::from_hex(&h.to_hex()).ok(), Some(h));
        assert!(Hash32::from_hex("zz").is_err());
    }
}
