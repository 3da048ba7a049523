//! Changes and manifests: a file version, a deletion, or a superseded seq,
//! signed by the device's Ed25519 key.

use crate::hlc::Hlc;
use crate::ids::{Hash32, ReplicaId};
use crate::shared::Shared;
use crate::{Error, Result};
use minicbor::{Decode, Encode};
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

/// Longest path accepted in a manifest.
pub const MAX_PATH: usize = 4096;
/// File-type bits of `FileVersion::mode` (as in `st_mode`) for an empty
/// directory: recorded so a restore recreates it (no size, no chunks).
pub const MODE_DIR: u32 = 0o040000;
/// File-type bits for a symbolic link: its content is the link's target.
pub const MODE_LINK: u32 = 0o120000;
const MODE_TYPE: u32 = 0o170000;

/// One chunk of a file version, in file order.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Encode, Decode)]
pub struct ChunkRef {
    #[n(0)]
    pub id: Hash32,
    #[n(1)]
    pub len: u32,
}

/// A file version: everything needed to restore it byte-identical.
#[derive(Clone, PartialEq, Eq, Debug, Encode, Decode)]
pub struct FileVersion {
    /// Relative, `/`-separated; first component is the watch root's label.
    #[n(0)]
    pub path: String,
    #[n(1)]
    pub size: u64,
    #[n(2)]
    pub mtime_ns: i64,
    /// Policy class that matched the path.
    #[n(3)]
    pub class: String,
    #[n(4)]
    pub chunks: Vec<ChunkRef>,
    /// SHA-256 of the whole plaintext file.
    #[n(5)]
    pub sha256: Hash32,
    /// Unix permission bits.
    #[n(6)]
    pub mode: u32,
}

impl FileVersion {
    /// An empty-directory entry (`mode` type bits `MODE_DIR`).
    pub fn is_dir(&self) -> bool {
        self.mode & MODE_TYPE == MODE_DIR
    }
    /// A symbolic link (`mode` type bits `MODE_LINK`); the content is the target.
    pub fn is_link(&self) -> bool {
        self.mode & MODE_TYPE == MODE_LINK
    }
}

#[derive(Clone, PartialEq, Eq, Debug, Encode, Decode)]
pub enum ChangeBody {
    #[n(0)]
    File(#[n(0)] FileVersion),
    #[n(1)]
    Delete(#[n(0)] String),
    /// The seq was assigned to a version whose bytes changed before they could
    /// be sent; a newer version of the same file follows under a later seq.
    #[n(2)]
    Superseded(#[n(0)] String),
}

impl ChangeBody {
    pub fn path(&self) -> &str {
        match self {
            ChangeBody::File(f) => &f.path,
            ChangeBody::Delete(p) | ChangeBody::Superseded(p) => p,
        }
    }
}

/// One change at a replica, signed by the device.
#[derive(Clone, PartialEq, Eq, Debug, Encode, Decode)]
pub struct Change {
    #[n(0)]
    pub replica: ReplicaId,
    #[n(1)]
    pub seq: u64,
    #[n(2)]
    pub hlc: Hlc,
    #[n(3)]
    pub body: ChangeBody,
    #[n(4)]
    #[cbor(with = "minicbor::bytes")]
    pub pubkey: Vec<u8>,
    #[n(5)]
    #[cbor(with = "minicbor::bytes")]
    pub signature: Vec<u8>,
    /// Set when the path's class is shared (several devices write it).
    #[n(6)]
    pub shared: Option<Shared>,
}

/// What the signature covers: everything but the signature itself.
#[derive(Encode)]
struct Signed<'a> {
    #[n(0)]
    domain: &'a str,
    #[n(1)]
    replica: &'a ReplicaId,
    #[n(2)]
    seq: u64,
    #[n(3)]
    hlc: Hlc,
    #[n(4)]
    body: &'a ChangeBody,
    #[n(5)]
    #[cbor(with = "minicbor::bytes")]
    pubkey: &'a [u8],
    /// Trailing and `None` for unshared paths: then encoded as before.
    #[n(6)]
    shared: Option<&'a Shared>,
}

const DOMAIN: &str = "ferry/change/v1";

impl Change {
    fn signed_bytes(&self) -> Vec<u8> {
        crate::to_cbor(&Signed {
            domain: DOMAIN,
            replica: &self.replica,
            seq: self.seq,
            hlc: self.hlc,
            body: &self.body,
            pubkey: &self.pubkey,
            shared: self.shared.as_ref(),
        })
    }

    /// Builds and signs a change.
    pub fn sign(replica: ReplicaId, seq: u64, hlc: Hlc, body: ChangeBody, key: &Ed25519KeyPair) -> Change {
        Change::sign_shared(replica, seq, hlc, body, None, key)
    }

    /// Builds and signs a change of a shared path (`shared` is Some).
    pub fn sign_shared(
        replica: ReplicaId,
        seq: u64,
        hlc: Hlc,
        body: ChangeBody,
        shared: Option<Shared>,
        key: &Ed25519KeyPair,
    ) -> Change {
        let mut c = Change {
            replica,
            seq,
            hlc,
            body,
            pubkey: key.public_key().as_ref().to_vec(),
            signature: Vec::new(),
            shared,
        };
        c.signature = key.sign(&c.signed_bytes()).as_ref().to_vec();
        c
    }

    /// Checks the signature against the embedded public key, and the path.
    /// Whether that key belongs to the device is the caller's (pinning) job.
    pub fn verify(&self) -> Result<()> {
        validate_path(self.body.path())?;
        if let Some(s) = &self.shared {
            s.validate()?;
        }
        if let ChangeBody::File(f) = &self.body {
            let total: u64 = f.chunks.iter().map(|c| u64::from(c.len)).sum();
            if total != f.size {
                return Err(Error::BadSignature(format!(
                    "{} (chunk lengths do not add up to size)",
                    self.label()
                )));
            }
            if f.is_dir() && f.size != 0 {
                return Err(Error::BadSignature(format!(
                    "{} (a directory entry with content)",
                    self.label()
                )));
            }
        }
        UnparsedPublicKey::new(&ED25519, &self.pubkey)
            .verify(&self.signed_bytes(), &self.signature)
            .map_err(|_| Error::BadSignature(self.label()))
    }

    /// `replica seq path`, for logs and errors.
    pub fn label(&self) -> String {
        format!("{}:{} {}", self.replica, self.seq, self.body.path())
    }

    /// Stored (sealed) bytes this change needs; zero for deletions.
    pub fn chunk_refs(&self) -> &[ChunkRef] {
        match &self.body {
            ChangeBody::File(f) => &f.chunks,
            _ => &[],
        }
    }
}

/// A manifest path must be relative, `/`-separated, with no empty, `.` or
/// `..` components and no NUL: then joining it under any directory stays
/// inside that directory. Restore checks again before writing.
pub fn validate_path(p: &str) -> Result<()> {
    let bad = |why| Err(Error::InvalidPath(p.chars().take(200).collect(), why));
    if p.is_empty() {
        return bad("empty");
    }
    if p.len() > MAX_PATH {
        return bad("too long");
    }
    if p.starts_with('/') {
        return bad("absolute");
    }
    if p.contains('\0') || p.contains('\\') {
        return bad("contains NUL or backslash");
    }
    for c in p.split('/') {
        if c.is_empty() || c == "." || c == ".." {
            return bad("empty, '.' or '..' component");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::DeviceRef;
    use ring::rand::SystemRandom;

    fn key() -> Ed25519KeyPair {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map(|d| d.as_ref().to_vec());
        pkcs8
            .ok()
            .and_then(|p| Ed25519KeyPair::from_pkcs8(&p).ok())
            .expect("keygen")
    }

    fn change(path: &str) -> Change {
        let replica = ReplicaId {
            device: DeviceRef::new("t", "s", "d").expect("ids"),
            epoch: 1,
        };
        let body = ChangeBody::File(FileVersion {
            path: path.into(),
            size: 5,
            mtime_ns: 0,
            class: "default".into(),
            chunks: vec![ChunkRef {
                id: Hash32::of(b"x"),
                len: 5,
            }],
            sha256: Hash32::of(b"hello"),
            mode: 0o644,
        });
        Change::sign(replica, 1, Hlc(7), body, &key())
    }

    #[test]
    fn signature_round_trip_and_tamper() {
        let c = change("root/a.csv");
        c.verify().expect("valid");
        let back: Change = crate::from_cbor(&crate::to_cbor(&c), 1 << 20).expect("decode");
        back.verify().expect("valid after round trip");
        let mut t = back.clone();
        t.seq = 2;
        assert!(t.verify().is_err());
        let mut t = back;
        if let ChangeBody::File(f) = &mut t.body {
            f.sha256 = Hash32::of(b"other");
        }
        assert!(t.verify().is_err());
    }

    #[test]
    fn unshared_changes_encode_as_before_and_shared_ones_are_signed() {
        // `shared: None` is a trailing absent field: the change and what its
        // signature covers stay 6-element arrays, as before shared paths.
        let c = change("root/a.csv");
        assert_eq!(crate::to_cbor(&c)[0], 0x86);
        assert_eq!(c.signed_bytes()[0], 0x86);
        let k = key();
        let mut vv = crate::shared::VersionVector::default();
        vv.witness("d", Hlc(7));
        let s = Change::sign_shared(
            c.replica.clone(),
            2,
            Hlc(7),
            c.body.clone(),
            Some(Shared {
                vv,
                policy: crate::shared::ConflictPolicy::AppendMerge,
            }),
            &k,
        );
        s.verify().expect("valid");
        let back: Change = crate::from_cbor(&crate::to_cbor(&s), 1 << 20).expect("decode");
        assert_eq!(back, s);
        let mut t = back;
        if let Some(sh) = &mut t.shared {
            sh.policy = crate::shared::ConflictPolicy::KeepBoth;
        }
        assert!(t.verify().is_err(), "the policy is covered by the signature");
        let mut t = s;
        t.shared = None;
        assert!(t.verify().is_err(), "dropping the vector breaks the signature");
    }

    #[test]
    fn traversal_paths_are_rejected() {
        for p in [
            "../x",
            "a/../../x",
            "/etc/passwd",
            "a//b",
            "a/./b",
            "",
            "a\0b",
            "a\\..\\b",
        ] {
            assert!(validate_path(p).is_err(), "{p:?}");
        }
        assert!(validate_path("line1/logs/a.csv").is_ok());
        // A signed change with a traversal path fails verification.
        assert!(change("../../etc/cron.d/x").verify().is_err());
    }
}
