//! Chunk sealing: zstd, then AEAD with a deterministic nonce, so equal
//! plaintext gives equal stored bytes across a tenant's devices (dedup
//! without the aggregator holding keys), and `chunk_id = SHA-256(stored)`
//! is checkable by anyone.
//!
//! Stored layout (all integers big-endian):
//! ```text
//! 0      1        2          6            7        19
//! | ver=1 | cipher | key_id u32 | compression | nonce[12] | ciphertext ... | tag[16] |
//! ```
//! The 7-byte header is authenticated as AAD. The nonce is
//! `HMAC(k_nonce, header || payload)[..12]`, where payload is the (possibly
//! compressed) plaintext: a nonce repeats only for an identical payload,
//! which is the deterministic-AEAD (SIV-style) construction — never two
//! different messages under one nonce, whatever zstd level or version.

use crate::ids::Hash32;
use crate::{Error, Result};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};
use ring::hkdf::{KeyType, Salt, HKDF_SHA256};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

pub const HEADER_LEN: usize = 7;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Bytes a sealed chunk adds to its payload.
pub const OVERHEAD: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;
const VERSION: u8 = 1;

/// AEAD algorithm, recorded in every sealed object so it can change per gateway.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Cipher {
    Aes256Gcm = 1,
    ChaCha20Poly1305 = 2,
}

impl Cipher {
    /// AES-GCM where the CPU has AES instructions, ChaCha20-Poly1305 elsewhere
    /// (Raspberry Pi 4 class gateways).
    pub fn for_this_cpu() -> Cipher {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq") {
                return Cipher::Aes256Gcm;
            }
            Cipher::ChaCha20Poly1305
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("aes") {
                return Cipher::Aes256Gcm;
            }
            Cipher::ChaCha20Poly1305
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        Cipher::ChaCha20Poly1305
    }
    pub fn parse(s: &str) -> Result<Cipher> {
        match s {
            "aes-256-gcm" | "aes" => Ok(Cipher::Aes256Gcm),
            "chacha20-poly1305" | "chacha" => Ok(Cipher::ChaCha20Poly1305),
            "auto" => Ok(Cipher::for_this_cpu()),
            _ => Err(Error::KeyFile(format!(
                "unknown cipher {s:?} (aes-256-gcm, chacha20-poly1305, auto)"
            ))),
        }
    }
}

/// The tenant master key; every other key derives from it by HKDF.
#[derive(Clone)]
pub struct TenantKey {
    pub key_id: u32,
    master: [u8; 32],
}

const KEY_FILE_HEADER: &str = "ferry-tenant-key v1";

impl TenantKey {
    pub fn generate() -> Result<TenantKey> {
        let rng = SystemRandom::new();
        let mut master = [0u8; 32];
        let mut id = [0u8; 4];
        rng.fill(&mut master)
            .map_err(|_| Error::Crypto("no system randomness"))?;
        rng.fill(&mut id).map_err(|_| Error::Crypto("no system randomness"))?;
        Ok(TenantKey {
            key_id: u32::from_be_bytes(id),
            master,
        })
    }
    pub fn from_bytes(key_id: u32, master: [u8; 32]) -> TenantKey {
        TenantKey { key_id, master }
    }
    /// Text form written by `edge-agent keygen`.
    pub fn to_file_string(&self) -> String {
        format!(
            "{KEY_FILE_HEADER}\nkey-id {:08x}\nkey {}\n",
            self.key_id,
            Hash32(self.master).to_hex()
        )
    }
    pub fn parse(s: &str) -> Result<TenantKey> {
        let mut lines = s
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'));
        if lines.next() != Some(KEY_FILE_HEADER) {
            return Err(Error::KeyFile(format!(
                "not a Ferry tenant key (first line must be {KEY_FILE_HEADER:?})"
            )));
        }
        let (mut id, mut key) = (None, None);
        for l in lines {
            match l.split_once(' ') {
                Some(("key-id", v)) => {
                    id = Some(u32::from_str_radix(v.trim(), 16).map_err(|_| Error::KeyFile("bad key-id".into()))?)
                }
                Some(("key", v)) => {
                    key = Some(Hash32::from_hex(v.trim()).map_err(|_| Error::KeyFile("bad key".into()))?)
                }
                _ => {
                    return Err(Error::KeyFile(format!(
                        "unexpected line {:?}",
                        l.chars().take(40).collect::<String>()
                    )))
                }
            }
        }
        match (id, key) {
            (Some(key_id), Some(k)) => Ok(TenantKey { key_id, master: k.0 }),
            _ => Err(Error::KeyFile("key file needs key-id and key lines".into())),
        }
    }
    fn derive(&self, info: &str) -> [u8; 32] {
        struct Len32;
        impl KeyType for Len32 {
            fn len(&self) -> usize {
                32
            }
        }
        let mut out = [0u8; 32];
        let prk = Salt::new(HKDF_SHA256, b"ferry/v1").extract(&self.master);
        // expand/fill fail only for lengths > 255*32; 32 is always valid.
        if let Ok(okm) = prk.expand(&[info.as_bytes()], Len32) {
            let _ = okm.fill(&mut out);
        }
        out
    }
}

/// Seals and opens chunks for one tenant key. Holds reusable zstd contexts,
/// so it is `&mut` and per-thread.
pub struct Sealer {
    key_id: u32,
    cipher: Cipher,
    k_index: hmac::Key,
    k_nonce: hmac::Key,
    aes: LessSafeKey,
    chacha: LessSafeKey,
    compressor: Option<(i32, zstd::bulk::Compressor<'static>)>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    scratch: Vec<u8>,
}

impl Sealer {
    pub fn new(key: &TenantKey, cipher: Cipher) -> Result<Sealer> {
        let aes =
            UnboundKey::new(&AES_256_GCM, &key.derive("enc-aes-256-gcm")).map_err(|_| Error::Crypto("aes key"))?;
        let chacha = UnboundKey::new(&CHACHA20_POLY1305, &key.derive("enc-chacha20"))
            .map_err(|_| Error::Crypto("chacha key"))?;
        Ok(Sealer {
            key_id: key.key_id,
            cipher,
            k_index: hmac::Key::new(hmac::HMAC_SHA256, &key.derive("index")),
            k_nonce: hmac::Key::new(hmac::HMAC_SHA256, &key.derive("nonce")),
            aes: LessSafeKey::new(aes),
            chacha: LessSafeKey::new(chacha),
            compressor: None,
            decompressor: None,
            scratch: Vec::new(),
        })
    }

    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// Keyed tag of a plaintext chunk: the key of the edge's known-chunk
    /// table. Keyed so the table reveals nothing about content.
    pub fn index_tag(&self, plain: &[u8]) -> Hash32 {
        let t = hmac::sign(&self.k_index, plain);
        let mut out = [0u8; 32];
        out.copy_from_slice(t.as_ref());
        Hash32(out)
    }

    /// Seals `plain` at zstd `level` (0 = store uncompressed) into `out`
    /// (cleared first). Returns the chunk id, SHA-256 of the stored bytes.
    pub fn seal(&mut self, plain: &[u8], level: i32, out: &mut Vec<u8>) -> Result<Hash32> {
        let mut compressed = false;
        self.scratch.clear();
        if level > 0 && plain.len() > 64 {
            let c = match &mut self.compressor {
                Some((l, c)) if *l == level => c,
                slot => {
                    let c = zstd::bulk::Compressor::new(level).map_err(|e| Error::Compress(e.to_string()))?;
                    &mut slot.insert((level, c)).1
                }
            };
            self.scratch.reserve(zstd::zstd_safe::compress_bound(plain.len()));
            let n = c
                .compress_to_buffer(plain, &mut self.scratch)
                .map_err(|e| Error::Compress(e.to_string()))?;
            // Keep the compressed form only when it saves something.
            compressed = n < plain.len();
        }
        let payload: &[u8] = if compressed { &self.scratch } else { plain };
        out.clear();
        out.reserve(OVERHEAD + payload.len());
        out.push(VERSION);
        out.push(self.cipher as u8);
        out.extend_from_slice(&self.key_id.to_be_bytes());
        out.push(u8::from(compressed));
        let mut ctx = hmac::Context::with_key(&self.k_nonce);
        ctx.update(&out[..HEADER_LEN]);
        ctx.update(payload);
        let tag = ctx.sign();
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&tag.as_ref()[..NONCE_LEN]);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(payload);
        let header: [u8; HEADER_LEN] = out[..HEADER_LEN].try_into().map_err(|_| Error::Crypto("header"))?;
        let key = match self.cipher {
            Cipher::Aes256Gcm => &self.aes,
            Cipher::ChaCha20Poly1305 => &self.chacha,
        };
        let aead_tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(header),
                &mut out[HEADER_LEN + NONCE_LEN..],
            )
            .map_err(|_| Error::Crypto("seal"))?;
        out.extend_from_slice(aead_tag.as_ref());
        Ok(Hash32::of(out))
    }

    /// Opens stored bytes (any cipher this key knows), refusing plaintext
    /// larger than `max_plain`. Callers check `chunk_id` separately.
    pub fn open(&mut self, stored: &[u8], max_plain: usize) -> Result<Vec<u8>> {
        let id = || Hash32::of(stored).to_hex();
        if stored.len() < OVERHEAD || stored[0] != VERSION {
            return Err(Error::CorruptChunk(id(), "too short or unknown version"));
        }
        let key_id = u32::from_be_bytes([stored[2], stored[3], stored[4], stored[5]]);
        if key_id != self.key_id {
            return Err(Error::CorruptChunk(id(), "sealed with another tenant key"));
        }
        let key = match stored[1] {
            1 => &self.aes,
            2 => &self.chacha,
            _ => return Err(Error::CorruptChunk(id(), "unknown cipher")),
        };
        let header: [u8; HEADER_LEN] = stored[..HEADER_LEN].try_into().map_err(|_| Error::Crypto("header"))?;
        let nonce: [u8; NONCE_LEN] = stored[HEADER_LEN..HEADER_LEN + NONCE_LEN]
            .try_into()
            .map_err(|_| Error::Crypto("nonce"))?;
        let mut buf = stored[HEADER_LEN + NONCE_LEN..].to_vec();
        let plain_len = key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(header), &mut buf)
            .map_err(|_| Error::CorruptChunk(id(), "authentication failed"))?
            .len();
        buf.truncate(plain_len);
        match header[6] {
            0 if buf.len() <= max_plain => Ok(buf),
            0 => Err(Error::CorruptChunk(id(), "larger than its manifest says")),
            1 => {
                let d = match &mut self.decompressor {
                    Some(d) => d,
                    slot => slot.insert(zstd::bulk::Decompressor::new().map_err(|e| Error::Compress(e.to_string()))?),
                };
                d.decompress(&buf, max_plain)
                    .map_err(|_| Error::CorruptChunk(id(), "bad or oversized zstd payload"))
            }
            _ => Err(Error::CorruptChunk(id(), "unknown compression")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(c: Cipher) -> Sealer {
        Sealer::new(&TenantKey::from_bytes(7, [9; 32]), c).expect("sealer")
    }

    #[test]
    fn round_trip_both_ciphers_and_determinism() {
        let text = b"timestamp,sensor,value\n".repeat(500);
        let noise: Vec<u8> = (0..5000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        for c in [Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305] {
            let mut s = sealer(c);
            for plain in [&text[..], &noise[..], b"tiny"] {
                let mut a = Vec::new();
                let mut b = Vec::new();
                let ia = s.seal(plain, 3, &mut a).expect("seal");
                let ib = s.seal(plain, 3, &mut b).expect("seal");
                assert_eq!(ia, ib);
                assert_eq!(a, b, "deterministic");
                assert_eq!(ia, Hash32::of(&a));
                assert_eq!(s.open(&a, plain.len()).expect("open"), plain);
                assert!(s.open(&a, plain.len() - 1).is_err(), "plaintext bound enforced");
            }
            let mut a = Vec::new();
            s.seal(&text, 3, &mut a).expect("seal");
            assert!(a.len() < text.len() / 4, "text compresses");
        }
    }

    #[test]
    fn other_devices_same_key_dedup_and_tamper_fails() {
        let mut a = sealer(Cipher::Aes256Gcm);
        let mut b = sealer(Cipher::Aes256Gcm);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        assert_eq!(
            a.seal(b"same bytes here", 1, &mut x).ok(),
            b.seal(b"same bytes here", 1, &mut y).ok()
        );
        let mut bad = x.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(a.open(&bad, 100).is_err());
        let mut other = Sealer::new(&TenantKey::from_bytes(7, [1; 32]), Cipher::Aes256Gcm).expect("sealer");
        assert!(other.open(&x, 100).is_err());
        assert!(a.open(&x[..10], 100).is_err());
    }

    #[test]
    fn key_file_round_trip() {
        let k = TenantKey::generate().expect("key");
        let p = TenantKey::parse(&k.to_file_string()).expect("parse");
        assert_eq!((p.key_id, p.master), (k.key_id, k.master));
        assert!(TenantKey::parse("hello").is_err());
        assert!(TenantKey::parse("ferry-tenant-key v1\nkey-id zz\nkey 00\n").is_err());
    }
}
