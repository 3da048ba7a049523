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
//! compression: 0 = stored, 1 = zstd, 2 = extension. An extension chunk's
//! plaintext is the plaintext of an earlier chunk (its base) followed by a
//! suffix, and only the suffix is stored, zstd-compressed with the base as
//! reference prefix: a growing file's tail costs the appended bytes, not
//! the whole re-cut chunk. Its header is 44 bytes:
//! ```text
//! 0 .. 7 as above (compression = 2) | base_id[32] | base_len u32 | depth u8 |
//! ```
//! compression 3 = delta: the same 44-byte header, but the base is only
//! the reference: the plaintext is the stored payload decompressed with
//! the base's plaintext as zstd reference prefix. The edge sends a changed
//! database page this way, against the page's previous version, so an edit
//! of a few rows costs about the edit, not the page.
//! `depth` is 1 + the base's depth (a full chunk has depth 0), at most
//! [`MAX_DEPTH`], so decoding any chunk needs at most `MAX_DEPTH` other
//! objects. The header (7 or 44 bytes) is authenticated as AAD. The nonce is
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
/// Header of an extension chunk: the base reference follows the 7 bytes.
pub const EXT_HEADER_LEN: usize = HEADER_LEN + 32 + 4 + 1;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Bytes a sealed chunk adds to its payload.
pub const OVERHEAD: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;
const VERSION: u8 = 1;
const C_STORED: u8 = 0;
const C_ZSTD: u8 = 1;
const C_EXTENSION: u8 = 2;
const C_DELTA: u8 = 3;
/// Longest chain of extension chunks: bounds what one restore must fetch.
pub const MAX_DEPTH: u8 = 8;

/// The base an extension or delta chunk refers to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct BaseRef {
    pub id: Hash32,
    /// Plaintext length of the base (for an extension: the first `len`
    /// bytes of this chunk).
    pub len: u32,
    /// This chunk's depth: 1 + the base's depth.
    pub depth: u8,
    /// false: an extension (the base is a prefix of this chunk); true: a
    /// delta (the base is only the compression reference).
    pub delta: bool,
}

/// The base of stored bytes, from their (not yet authenticated) header; None
/// for a full chunk. [`Sealer::open_with_base`] authenticates it.
pub fn base_of(stored: &[u8]) -> Result<Option<BaseRef>> {
    let bad = |why| Error::CorruptChunk(Hash32::of(stored).to_hex(), why);
    if stored.len() < OVERHEAD || stored[0] != VERSION {
        return Err(bad("too short or unknown version"));
    }
    if stored[6] != C_EXTENSION && stored[6] != C_DELTA {
        return Ok(None);
    }
    if stored.len() < EXT_HEADER_LEN + NONCE_LEN + TAG_LEN {
        return Err(bad("extension header cut short"));
    }
    let mut id = [0u8; 32];
    id.copy_from_slice(&stored[HEADER_LEN..HEADER_LEN + 32]);
    let len = u32::from_be_bytes([stored[39], stored[40], stored[41], stored[42]]);
    let depth = stored[43];
    if depth == 0 || depth > MAX_DEPTH || len == 0 {
        return Err(bad("bad extension depth or base length"));
    }
    Ok(Some(BaseRef {
        id: Hash32(id),
        len,
        depth,
        delta: stored[6] == C_DELTA,
    }))
}

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

/// HKDF label of the index-tag key, and the name of the tag function: a
/// state file whose known chunks were tagged otherwise (HMAC-SHA-256 under
/// the label `index`, before 2026-12-06) drops them (`edge_agent::store`).
pub const INDEX_TAG_LABEL: &str = "index-blake3";

/// [`Sealer::index_tag`] without the sealer.
#[derive(Clone, Copy)]
pub struct Tagger([u8; 32]);

impl Tagger {
    pub fn tag(&self, plain: &[u8]) -> Hash32 {
        Hash32(*blake3::keyed_hash(&self.0, plain).as_bytes())
    }
}

impl std::fmt::Debug for Tagger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tagger(..)")
    }
}

/// Seals and opens chunks for one tenant key. Holds reusable zstd contexts,
/// so it is `&mut` and per-thread.
pub struct Sealer {
    key_id: u32,
    cipher: Cipher,
    /// Keyed-BLAKE3 key of the index tags.
    k_index: [u8; 32],
    /// HMAC-SHA-256 key of the index tags before 2026-12-06 (label `index`).
    k_index_v1: hmac::Key,
    k_nonce: hmac::Key,
    aes: LessSafeKey,
    chacha: LessSafeKey,
    compressor: Option<(i32, zstd::zstd_safe::CCtx<'static>)>,
    decompressor: Option<zstd::zstd_safe::DCtx<'static>>,
    scratch: Vec<u8>,
    /// `scratch` holds the last seal's plaintext as one zstd frame of its
    /// own (see [`Sealer::last_frame`]).
    scratch_is_frame: bool,
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
            k_index: key.derive(INDEX_TAG_LABEL),
            k_index_v1: hmac::Key::new(hmac::HMAC_SHA256, &key.derive("index")),
            k_nonce: hmac::Key::new(hmac::HMAC_SHA256, &key.derive("nonce")),
            aes: LessSafeKey::new(aes),
            chacha: LessSafeKey::new(chacha),
            compressor: None,
            decompressor: None,
            scratch: Vec::new(),
            scratch_is_frame: false,
        })
    }

    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// Keyed tag of a plaintext chunk: the key of the edge's known-chunk
    /// table. Keyed so the table reveals nothing about content. Keyed
    /// BLAKE3 ([`INDEX_TAG_LABEL`]); it never leaves the gateway.
    pub fn index_tag(&self, plain: &[u8]) -> Hash32 {
        self.tagger().tag(plain)
    }

    /// The index tag agents gave a plaintext before 2026-12-06
    /// (HMAC-SHA-256): only to find chunks their state files recorded.
    pub fn legacy_index_tag(&self, plain: &[u8]) -> Hash32 {
        let t = hmac::sign(&self.k_index_v1, plain);
        let mut out = [0u8; 32];
        out.copy_from_slice(t.as_ref());
        Hash32(out)
    }

    /// The index-tag function alone, to use while the sealer is borrowed.
    pub fn tagger(&self) -> Tagger {
        Tagger(self.k_index)
    }

    /// Seals `plain` at zstd `level` (0 = store uncompressed) into `out`
    /// (cleared first). Returns the chunk id, SHA-256 of the stored bytes.
    pub fn seal(&mut self, plain: &[u8], level: i32, out: &mut Vec<u8>) -> Result<Hash32> {
        self.seal_with_base(plain, level, None, out)
    }

    /// Like [`Sealer::seal`]; with `base`, seals an extension chunk: the
    /// first `base.len` bytes of `plain` must be the base's plaintext, and
    /// only the rest is stored, compressed against them. Deterministic like
    /// `seal`: the same plaintext, level and base give the same bytes.
    pub fn seal_with_base(
        &mut self,
        plain: &[u8],
        level: i32,
        base: Option<BaseRef>,
        out: &mut Vec<u8>,
    ) -> Result<Hash32> {
        match base {
            Some(b) => {
                let n = b.len as usize;
                if b.delta || b.depth == 0 || b.depth > MAX_DEPTH || n == 0 || n >= plain.len() {
                    return Err(Error::Invalid(
                        "extension base must be a proper prefix, depth 1..=MAX_DEPTH".into(),
                    ));
                }
                self.seal_inner(&plain[..n], &plain[n..], level, base, out)
            }
            None => self.seal_inner(&[], plain, level, None, out),
        }
    }

    /// The plaintext of the last seal as a standalone zstd frame (what
    /// [`zstd::bulk::decompress`] opens), if that seal compressed it alone:
    /// not for a stored, extension or delta chunk. Valid until the next
    /// seal; a caller that keeps a compressed copy of the plaintext (the
    /// agent's page-delta bases) reuses it instead of compressing again.
    pub fn last_frame(&self) -> Option<&[u8]> {
        self.scratch_is_frame.then_some(self.scratch.as_slice())
    }

    /// Seals a delta chunk: `plain` compressed with `base_plain`, the
    /// plaintext of the chunk `base` names, as reference. Deterministic like
    /// `seal`. Opening it needs the same base plaintext.
    pub fn seal_delta(
        &mut self,
        plain: &[u8],
        level: i32,
        base: BaseRef,
        base_plain: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Hash32> {
        if !base.delta || base.depth == 0 || base.depth > MAX_DEPTH || base_plain.is_empty() || plain.is_empty() {
            return Err(Error::Invalid("delta base: non-empty, depth 1..=MAX_DEPTH".into()));
        }
        if base_plain.len() != base.len as usize {
            return Err(Error::Invalid(
                "delta base plaintext length differs from its reference".into(),
            ));
        }
        self.seal_inner(base_plain, plain, level, Some(base), out)
    }

    /// Seals `body`: compressed against `prefix` when `base` is set,
    /// otherwise alone (or stored, when that is not smaller).
    fn seal_inner(
        &mut self,
        prefix: &[u8],
        body: &[u8],
        level: i32,
        base: Option<BaseRef>,
        out: &mut Vec<u8>,
    ) -> Result<Hash32> {
        let plain = body;
        let mut kind = C_STORED;
        self.scratch.clear();
        self.scratch_is_frame = false;
        if let Some(b) = base {
            // Always compressed: the reference prefix is what makes it small.
            // A fresh context: a referenced prefix must outlive the context.
            use zstd::zstd_safe::{CCtx, CParameter};
            let mut c = CCtx::try_create().ok_or_else(|| Error::Compress("zstd context".into()))?;
            c.set_parameter(CParameter::CompressionLevel(level.max(1)))
                .map_err(|e| Error::Compress(zstd_err(e)))?;
            if b.delta {
                // Long-distance matching, as `zstd --patch-from` uses: in
                // self-similar data (table rows) the regular match finder
                // fills its tables from the body's own repeats and misses the
                // long match into the base; a one-row edit of a 64 KiB page
                // group then cost 2–3.6 KB instead of about 100 bytes.
                // Extensions keep the old parameters, so the ones agents
                // recorded still reseal to the same bytes.
                c.set_parameter(CParameter::EnableLongDistanceMatching(true))
                    .map_err(|e| Error::Compress(zstd_err(e)))?;
            }
            c.ref_prefix(prefix).map_err(|e| Error::Compress(zstd_err(e)))?;
            self.scratch.reserve(zstd::zstd_safe::compress_bound(body.len()));
            c.compress2(&mut self.scratch, body)
                .map_err(|e| Error::Compress(zstd_err(e)))?;
            kind = if b.delta { C_DELTA } else { C_EXTENSION };
        } else if level > 0 && plain.len() > 64 {
            let c = cctx_for(&mut self.compressor, level)?;
            self.scratch.reserve(zstd::zstd_safe::compress_bound(plain.len()));
            let n = c
                .compress2(&mut self.scratch, plain)
                .map_err(|e| Error::Compress(zstd_err(e)))?;
            // Keep the compressed form only when it saves something.
            if n < plain.len() {
                kind = C_ZSTD;
                self.scratch_is_frame = true;
            }
        }
        let payload: &[u8] = if kind == C_STORED { plain } else { &self.scratch };
        out.clear();
        out.reserve(OVERHEAD + (EXT_HEADER_LEN - HEADER_LEN) + payload.len());
        out.push(VERSION);
        out.push(self.cipher as u8);
        out.extend_from_slice(&self.key_id.to_be_bytes());
        out.push(kind);
        if let Some(b) = base {
            out.extend_from_slice(&b.id.0);
            out.extend_from_slice(&b.len.to_be_bytes());
            out.push(b.depth);
        }
        let hlen = out.len();
        let mut ctx = hmac::Context::with_key(&self.k_nonce);
        ctx.update(&out[..hlen]);
        ctx.update(payload);
        let tag = ctx.sign();
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&tag.as_ref()[..NONCE_LEN]);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(payload);
        // The AAD is a copy of the header: `out` is borrowed mutably below.
        // On the stack, as sealing is on the scan's hot path.
        let mut header = [0u8; EXT_HEADER_LEN];
        header[..hlen].copy_from_slice(&out[..hlen]);
        let key = match self.cipher {
            Cipher::Aes256Gcm => &self.aes,
            Cipher::ChaCha20Poly1305 => &self.chacha,
        };
        let aead_tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&header[..hlen]),
                &mut out[hlen + NONCE_LEN..],
            )
            .map_err(|_| Error::Crypto("seal"))?;
        out.extend_from_slice(aead_tag.as_ref());
        Ok(Hash32::of(out))
    }

    /// Opens stored bytes of a full chunk (any cipher this key knows),
    /// refusing plaintext larger than `max_plain`. Callers check `chunk_id`
    /// separately. An extension chunk needs [`Sealer::open_with_base`].
    pub fn open(&mut self, stored: &[u8], max_plain: usize) -> Result<Vec<u8>> {
        self.open_with_base(stored, max_plain, None)
    }

    /// Opens stored bytes; an extension chunk (see [`base_of`]) needs its
    /// base's plaintext, which must be exactly `base.len` bytes.
    pub fn open_with_base(&mut self, stored: &[u8], max_plain: usize, base: Option<&[u8]>) -> Result<Vec<u8>> {
        let id = || Hash32::of(stored).to_hex();
        let ext = base_of(stored)?;
        let hlen = if ext.is_some() { EXT_HEADER_LEN } else { HEADER_LEN };
        let key_id = u32::from_be_bytes([stored[2], stored[3], stored[4], stored[5]]);
        if key_id != self.key_id {
            return Err(Error::CorruptChunk(id(), "sealed with another tenant key"));
        }
        let key = match stored[1] {
            1 => &self.aes,
            2 => &self.chacha,
            _ => return Err(Error::CorruptChunk(id(), "unknown cipher")),
        };
        if stored.len() < hlen + NONCE_LEN + TAG_LEN {
            return Err(Error::CorruptChunk(id(), "too short"));
        }
        let header = &stored[..hlen];
        let nonce: [u8; NONCE_LEN] = stored[hlen..hlen + NONCE_LEN]
            .try_into()
            .map_err(|_| Error::Crypto("nonce"))?;
        let mut buf = stored[hlen + NONCE_LEN..].to_vec();
        let plain_len = key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(header), &mut buf)
            .map_err(|_| Error::CorruptChunk(id(), "authentication failed"))?
            .len();
        buf.truncate(plain_len);
        match (header[6], ext) {
            (C_STORED, _) if buf.len() <= max_plain => Ok(buf),
            (C_STORED, _) => Err(Error::CorruptChunk(id(), "larger than its manifest says")),
            (C_ZSTD, _) => {
                let mut out = Vec::with_capacity(max_plain);
                self.dctx()?
                    .decompress(&mut out, &buf)
                    .map_err(|_| Error::CorruptChunk(id(), "bad or oversized zstd payload"))?;
                Ok(out)
            }
            (C_DELTA, Some(b)) => {
                let Some(base) = base.filter(|p| p.len() == b.len as usize) else {
                    return Err(Error::CorruptChunk(id(), "delta chunk opened without its base"));
                };
                decompress_against(base, &buf, max_plain).map_err(|why| Error::CorruptChunk(id(), why))
            }
            (C_EXTENSION, Some(b)) => {
                let Some(base) = base.filter(|p| p.len() == b.len as usize) else {
                    return Err(Error::CorruptChunk(id(), "extension chunk opened without its base"));
                };
                let room = max_plain
                    .checked_sub(base.len())
                    .ok_or(Error::CorruptChunk(id(), "base larger than its manifest says"))?;
                let suffix = decompress_against(base, &buf, room).map_err(|why| Error::CorruptChunk(id(), why))?;
                let mut out = Vec::with_capacity(base.len() + suffix.len());
                out.extend_from_slice(base);
                out.extend_from_slice(&suffix);
                Ok(out)
            }
            _ => Err(Error::CorruptChunk(id(), "unknown compression")),
        }
    }

    fn dctx(&mut self) -> Result<&mut zstd::zstd_safe::DCtx<'static>> {
        if self.decompressor.is_none() {
            let d = zstd::zstd_safe::DCtx::try_create().ok_or_else(|| Error::Compress("zstd context".into()))?;
            self.decompressor = Some(d);
        }
        match &mut self.decompressor {
            Some(d) => Ok(d),
            None => Err(Error::Compress("zstd context".into())),
        }
    }
}

/// zstd-decompresses `payload` (at most `cap` bytes) with `base` as the
/// reference prefix; the error is the reason, for `CorruptChunk`.
fn decompress_against(base: &[u8], payload: &[u8], cap: usize) -> std::result::Result<Vec<u8>, &'static str> {
    let mut out = Vec::with_capacity(cap);
    // A fresh context: the referenced prefix must outlive it.
    let mut d = zstd::zstd_safe::DCtx::try_create().ok_or("zstd context")?;
    d.ref_prefix(base).map_err(|_| "zstd reference prefix")?;
    d.decompress(&mut out, payload)
        .map_err(|_| "bad or oversized zstd payload")?;
    Ok(out)
}

/// A compression context at `level`, kept across calls.
type Cctx = zstd::zstd_safe::CCtx<'static>;

fn cctx_for(slot: &mut Option<(i32, Cctx)>, level: i32) -> Result<&mut Cctx> {
    use zstd::zstd_safe::{CCtx, CParameter};
    if slot.as_ref().is_none_or(|(l, _)| *l != level) {
        let mut c = CCtx::try_create().ok_or_else(|| Error::Compress("zstd context".into()))?;
        c.set_parameter(CParameter::CompressionLevel(level))
            .map_err(|e| Error::Compress(zstd_err(e)))?;
        *slot = Some((level, c));
    }
    match slot {
        Some((_, c)) => Ok(c),
        None => Err(Error::Compress("zstd context".into())),
    }
}

fn zstd_err(code: usize) -> String {
    zstd::zstd_safe::get_error_name(code).to_string()
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
    fn extension_chunks_store_only_the_suffix_and_need_their_base() {
        let rows: Vec<u8> = (0..3000u32)
            .flat_map(|i| {
                format!(
                    "2026-11-29T10:{:02}:{:02}Z,line1,{}.{}\n",
                    i / 60 % 60,
                    i % 60,
                    20 + i % 7,
                    i % 10
                )
                .into_bytes()
            })
            .collect();
        let (old, new) = (&rows[..40_000], &rows[..46_000]);
        for c in [Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305] {
            let mut s = sealer(c);
            let mut b = Vec::new();
            let base_id = s.seal(old, 3, &mut b).expect("seal base");
            let base = BaseRef {
                id: base_id,
                len: old.len() as u32,
                depth: 1,
                delta: false,
            };
            let (mut x, mut y, mut full) = (Vec::new(), Vec::new(), Vec::new());
            let id = s.seal_with_base(new, 3, Some(base), &mut x).expect("seal ext");
            assert_eq!(id, s.seal_with_base(new, 3, Some(base), &mut y).expect("again"));
            assert_eq!(x, y, "deterministic");
            assert_eq!(id, Hash32::of(&x));
            assert_eq!(base_of(&x).expect("header"), Some(base));
            assert_eq!(base_of(&b).expect("header"), None);
            s.seal(new, 3, &mut full).expect("full");
            // 6,000 appended bytes cost far less than the whole chunk again.
            assert!(x.len() * 4 < full.len(), "extension {} vs full {}", x.len(), full.len());
            assert_eq!(s.open_with_base(&x, new.len(), Some(old)).expect("open"), new);
            assert!(s.open(&x, new.len()).is_err(), "needs its base");
            assert!(
                s.open_with_base(&x, new.len(), Some(&old[1..])).is_err(),
                "base of the wrong length"
            );
            let mut wrong = old.to_vec();
            wrong[100] ^= 1;
            // A wrong base of the right length yields wrong bytes, which the
            // caller's SHA-256 of the file catches; it must not panic.
            if let Ok(p) = s.open_with_base(&x, new.len(), Some(&wrong)) {
                assert_ne!(p, new);
            }
            assert!(
                s.open_with_base(&x, new.len() - 1, Some(old)).is_err(),
                "plaintext bound"
            );
            // The base reference is authenticated.
            let mut bad = x.clone();
            bad[HEADER_LEN] ^= 1;
            assert!(s.open_with_base(&bad, new.len(), Some(old)).is_err());
            let mut deep = x.clone();
            deep[EXT_HEADER_LEN - 1] = MAX_DEPTH + 1;
            assert!(base_of(&deep).is_err());
            assert!(base_of(&x[..20]).is_err());
        }
    }

    #[test]
    fn extension_base_must_be_a_proper_prefix_within_depth() {
        let mut s = sealer(Cipher::Aes256Gcm);
        let mut out = Vec::new();
        let base = |len, depth| {
            Some(BaseRef {
                id: Hash32([1; 32]),
                len,
                depth,
                delta: false,
            })
        };
        assert!(s.seal_with_base(b"abcdef", 3, base(6, 1), &mut out).is_err());
        assert!(s.seal_with_base(b"abcdef", 3, base(0, 1), &mut out).is_err());
        assert!(s.seal_with_base(b"abcdef", 3, base(3, 0), &mut out).is_err());
        assert!(s
            .seal_with_base(b"abcdef", 3, base(3, MAX_DEPTH + 1), &mut out)
            .is_err());
        assert!(s.seal_with_base(b"abcdef", 0, base(3, MAX_DEPTH), &mut out).is_ok());
        assert_eq!(s.open_with_base(&out, 6, Some(b"abc")).expect("open"), b"abcdef");
    }

    /// A page of fixed-width rows, with `edits` rows rewritten.
    fn page(edits: &[usize], salt: u32) -> Vec<u8> {
        let mut p: Vec<u8> = (0..4096u32)
            .map(|i| b"row,sensor,temp=21.5;"[(i % 21) as usize])
            .collect();
        for &e in edits {
            let at = (e * 37) % 4000;
            p[at..at + 8].copy_from_slice(&(salt.wrapping_mul(2654435761) as u64 | 1 << 40).to_le_bytes());
        }
        p
    }

    #[test]
    fn a_one_row_edit_in_self_similar_rows_is_a_small_delta() {
        // 128 KiB of table rows that repeat with small differences, as in
        // a SQLite page group: without long-distance matching zstd's match
        // finder missed the long match into the base (2–3.6 KB deltas).
        let mut old = Vec::new();
        let mut r = 0u32;
        while old.len() < 128 << 10 {
            old.extend_from_slice(format!("row {r},sensor {},temp 21.{},ok;", r % 17, (r * 7) % 10).as_bytes());
            r += 1;
        }
        old.truncate(128 << 10);
        let mut s = sealer(Cipher::Aes256Gcm);
        for at in [394, 40_000, 100_000] {
            let mut new = old.clone();
            new[at..at + 8].copy_from_slice(&0x9E37_79B9_7F4A_7C15u64.to_le_bytes());
            let base = BaseRef {
                id: Hash32::of(&old),
                len: old.len() as u32,
                depth: 1,
                delta: true,
            };
            let mut x = Vec::new();
            s.seal_delta(&new, 3, base, &old, &mut x).expect("seal delta");
            assert!(x.len() < 200, "edit at {at}: delta of {} bytes", x.len());
            assert_eq!(s.open_with_base(&x, new.len(), Some(&old)).expect("open"), new);
        }
    }

    #[test]
    fn the_last_frame_is_the_plaintext_compressed_alone() {
        let text = page(&[1, 2, 3], 1);
        let mut s = sealer(Cipher::ChaCha20Poly1305);
        let mut out = Vec::new();
        s.seal(&text, 3, &mut out).expect("seal");
        let f = s.last_frame().expect("compressed alone").to_vec();
        assert_eq!(zstd::bulk::decompress(&f, text.len()).expect("a zstd frame"), text);
        // It declares its size (the agent checks it before keeping it).
        let declared = zstd::zstd_safe::get_frame_content_size(&f).ok().flatten();
        assert_eq!(declared, Some(text.len() as u64));
        // Not for stored bytes, extensions or deltas.
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        s.seal(&noise, 3, &mut out).expect("seal");
        assert!(s.last_frame().is_none(), "stored raw");
        let base = BaseRef {
            id: Hash32::of(&text[..1000]),
            len: 1000,
            depth: 1,
            delta: false,
        };
        s.seal_with_base(&text, 3, Some(base), &mut out).expect("extension");
        assert!(s.last_frame().is_none(), "extension");
        s.seal_delta(&text, 3, BaseRef { delta: true, ..base }, &text[..1000], &mut out)
            .expect("delta");
        assert!(s.last_frame().is_none(), "delta");
    }

    #[test]
    fn delta_chunks_cost_the_edit_and_need_their_base() {
        let old = page(&[1, 2, 3], 1);
        let new = page(&[1, 2, 3, 50, 90], 2);
        for c in [Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305] {
            let mut s = sealer(c);
            let (mut b, mut x, mut y, mut full) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let base_id = s.seal(&old, 3, &mut b).expect("seal base");
            let base = BaseRef {
                id: base_id,
                len: old.len() as u32,
                depth: 1,
                delta: true,
            };
            let id = s.seal_delta(&new, 3, base, &old, &mut x).expect("seal delta");
            assert_eq!(id, s.seal_delta(&new, 3, base, &old, &mut y).expect("again"));
            assert_eq!(x, y, "deterministic");
            assert_eq!(id, Hash32::of(&x));
            assert_eq!(base_of(&x).expect("header"), Some(base));
            s.seal(&new, 3, &mut full).expect("full");
            assert!(x.len() < full.len(), "delta {} vs full {}", x.len(), full.len());
            assert_eq!(s.open_with_base(&x, new.len(), Some(&old)).expect("open"), new);
            assert!(s.open(&x, new.len()).is_err(), "needs its base");
            assert!(
                s.open_with_base(&x, new.len(), Some(&old[1..])).is_err(),
                "wrong length"
            );
            assert!(
                s.open_with_base(&x, new.len() - 1, Some(&old)).is_err(),
                "plaintext bound"
            );
            let mut bad = x.clone();
            bad[HEADER_LEN + 3] ^= 1;
            assert!(
                s.open_with_base(&bad, new.len(), Some(&old)).is_err(),
                "base reference authenticated"
            );
            // Kind and reference are both in the AAD: the same payload
            // relabelled as an extension does not open.
            let mut relabel = x.clone();
            relabel[6] = C_EXTENSION;
            assert!(s.open_with_base(&relabel, new.len() + old.len(), Some(&old)).is_err());
            // Misuse is refused, not sealed wrongly.
            assert!(s.seal_delta(&new, 3, base, &old[1..], &mut y).is_err());
            assert!(s
                .seal_delta(&new, 3, BaseRef { delta: false, ..base }, &old, &mut y)
                .is_err());
            assert!(s
                .seal_with_base(&new, 3, Some(BaseRef { len: 10, ..base }), &mut y)
                .is_err());
        }
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
