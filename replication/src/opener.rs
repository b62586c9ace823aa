//! Assigned openers: for each hosted replica, the one node whose nexus may open it, as the
//! control process assigned it (issue 16, item 2). One small file per replica beside its
//! epoch fence (`<volume id>.opener`), replaced atomically the same way, owner-only.
//!
//! Why durable, not only in memory and re-sent by the control process when it reconnects:
//! between a node's restart and the control process's next call to it (seconds, or as long
//! as the control process is down), a replica with no assignment would accept any node
//! certificate again, which is exactly the window a compromised node waits for. The file
//! closes it; the control process still assigns before every nexus it creates or replica it
//! adds, so a lost or stale file is corrected then (docs/security.md, "Which node may open a
//! replica").
//!
//! The check itself ([`may_open`]) is only as good as the peer's identity: over TLS it is the
//! node id in the peer's certificate; on a plain link there is no identity to check, and an
//! assignment cannot be enforced (the `--insecure` deployment accepts that).
//!
//! File format (`docs/formats.md`, "Replica opener file"), little-endian: magic "CRNA" (u32),
//! version (u32), length of the node id in bytes (u32, 0: no assignment, at most
//! [`cairn_tls::NAME_MAX`]), the node id (UTF-8, a valid identity name), crc32c of every byte
//! before it (u32). A file that exists but does not decode is an error, never "no
//! assignment": reading a damaged record as none would open the replica to every node.

use crate::epoch::{EpochError, EpochStore};
use crate::proto::VolumeId;
use crate::transport::PeerIdentity;
use cairn_tls::Identity;
use parking_lot::Mutex;
use std::fs;
use std::time::{Duration, Instant};

pub const OPENER_FILE_MAGIC: u32 = u32::from_le_bytes(*b"CRNA");
pub const OPENER_FILE_VERSION: u32 = 1;
/// The fixed bytes of an opener file: magic, version, length and crc.
pub const OPENER_FILE_FIXED_BYTES: usize = 16;
/// How often a refused opener is logged with its names; the others of a period are counted
/// and summarised in one line.
pub const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(10);

/// Encodes one opener file; `opener` is a valid identity name (checked by the caller).
pub fn encode(opener: Option<&str>) -> Vec<u8> {
    let id = opener.unwrap_or_default().as_bytes();
    assert!(
        id.len() <= cairn_tls::NAME_MAX,
        "node id of {} bytes",
        id.len()
    );
    let mut b = Vec::with_capacity(OPENER_FILE_FIXED_BYTES + id.len());
    b.extend_from_slice(&OPENER_FILE_MAGIC.to_le_bytes());
    b.extend_from_slice(&OPENER_FILE_VERSION.to_le_bytes());
    b.extend_from_slice(&(id.len() as u32).to_le_bytes());
    b.extend_from_slice(id);
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes one opener file; the error says what is wrong.
pub fn decode(b: &[u8]) -> Result<Option<String>, String> {
    if b.len() < OPENER_FILE_FIXED_BYTES {
        return Err(format!(
            "{} bytes, expected at least {OPENER_FILE_FIXED_BYTES}",
            b.len()
        ));
    }
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    if u32_at(0) != OPENER_FILE_MAGIC {
        return Err(format!("bad magic {:#x}", u32_at(0)));
    }
    if u32_at(4) != OPENER_FILE_VERSION {
        return Err(format!("unsupported version {}", u32_at(4)));
    }
    let len = u32_at(8) as usize;
    if len > cairn_tls::NAME_MAX || b.len() != OPENER_FILE_FIXED_BYTES + len {
        return Err(format!(
            "node id length {len} does not fit the file's {} bytes (at most {})",
            b.len(),
            cairn_tls::NAME_MAX
        ));
    }
    let end = 12 + len;
    let crc = crc32c::crc32c(&b[..end]);
    if crc != u32_at(end) {
        return Err(format!("crc {:#x} != stored {:#x}", crc, u32_at(end)));
    }
    if len == 0 {
        return Ok(None);
    }
    let id = std::str::from_utf8(&b[12..end]).map_err(|e| format!("node id: {e}"))?;
    if !cairn_tls::valid_name(id) {
        return Err(format!("'{id}' is not a valid node id"));
    }
    Ok(Some(id.to_string()))
}

impl EpochStore {
    /// The assigned opener of a replica; `None` when it has none.
    pub fn load_opener(&self, volume: &VolumeId) -> Result<Option<String>, EpochError> {
        let path = self.file(volume, "opener");
        match fs::read(&path) {
            Ok(b) => decode(&b).map_err(|why| EpochError::Damaged {
                path: path.display().to_string(),
                why,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(crate::epoch::io(&path, "read")(e)),
        }
    }

    /// Stores `opener` (None: no assignment) durably: when this returns Ok, a crash cannot
    /// bring back the previous one.
    pub fn store_opener(&self, volume: &VolumeId, opener: Option<&str>) -> Result<(), EpochError> {
        self.replace_durably(&self.file(volume, "opener"), &encode(opener))
    }
}

/// Whether `peer` may open a replica assigned to `opener`: any peer when it has no
/// assignment or the link carries no identity (plain TCP), else only the node named.
pub fn may_open(opener: Option<&str>, peer: &PeerIdentity) -> bool {
    match (opener, peer) {
        (None, _) | (_, PeerIdentity::Unauthenticated) => true,
        (Some(o), PeerIdentity::Certified(Identity::Node(id))) => o == id,
        (Some(_), _) => false,
    }
}

/// The log of refused openers, rate-limited: the first refusal of each
/// [`REFUSAL_LOG_PERIOD`] is logged with the peer, its identity, the replica and the node it
/// is assigned to; the rest are counted into one summary line, so a node that keeps trying
/// cannot flood the log.
#[derive(Debug, Default)]
pub struct RefusalLog {
    state: Mutex<Option<(Instant, u64)>>,
}

impl RefusalLog {
    /// Notes one refusal of `identity` (from `peer`) on `replica`, which `why` explains.
    pub fn refused(&self, peer: &str, identity: &PeerIdentity, replica: &str, why: &str) {
        let now = Instant::now();
        let mut st = self.state.lock();
        if let Some((since, count)) = *st {
            if now.saturating_duration_since(since) < REFUSAL_LOG_PERIOD {
                *st = Some((since, count + 1));
                return;
            }
            if count > 1 {
                tracing::warn!(
                    "{count} replica opens refused by their assigned opener in the last {} s",
                    REFUSAL_LOG_PERIOD.as_secs()
                );
            }
        }
        *st = Some((now, 1));
        tracing::warn!(
            peer,
            identity = %identity,
            replica,
            "replica open refused: {why}; further ones are summarised"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_damage() {
        for opener in [None, Some("n1"), Some("node-with.a_long-name")] {
            let b = encode(opener);
            assert_eq!(decode(&b), Ok(opener.map(str::to_string)));
            for i in 0..b.len() {
                let mut d = b.clone();
                d[i] ^= 0x10;
                assert!(
                    decode(&d).is_err(),
                    "flip at byte {i} of {opener:?} accepted"
                );
            }
            assert!(decode(&b[..b.len() - 1]).is_err());
        }
    }

    /// The layout is pinned: changing a byte of it without bumping `OPENER_FILE_VERSION`
    /// (and docs/formats.md) fails here.
    #[test]
    fn layout_is_guarded() {
        let b = encode(Some("n1"));
        assert_eq!(OPENER_FILE_VERSION, 1, "update the pinned bytes below");
        assert_eq!(
            b[..14],
            [b'C', b'R', b'N', b'A', 1, 0, 0, 0, 2, 0, 0, 0, b'n', b'1']
        );
    }

    #[test]
    fn only_the_assigned_node_may_open() {
        let node = |id: &str| PeerIdentity::Certified(Identity::Node(id.into()));
        assert!(may_open(None, &node("b")));
        assert!(may_open(Some("a"), &node("a")));
        assert!(!may_open(Some("a"), &node("b")));
        assert!(!may_open(
            Some("a"),
            &PeerIdentity::Certified(Identity::Control("a".into()))
        ));
        assert!(!may_open(Some("a"), &PeerIdentity::Unnamed));
        assert!(may_open(Some("a"), &PeerIdentity::Unauthenticated));
    }

    #[test]
    fn stores_durably_and_loads() {
        let dir = std::env::temp_dir().join(format!("cairn-opener-{}", std::process::id()));
        let store = EpochStore::open(&dir).unwrap();
        let v = VolumeId::new([7; 16]).unwrap();
        assert_eq!(store.load_opener(&v).unwrap(), None);
        store.store_opener(&v, Some("n1")).unwrap();
        assert_eq!(store.load_opener(&v).unwrap().as_deref(), Some("n1"));
        store.store_opener(&v, None).unwrap();
        assert_eq!(store.load_opener(&v).unwrap(), None);
        fs::write(store.file(&v, "opener"), b"garbage").unwrap();
        assert!(matches!(
            store.load_opener(&v),
            Err(EpochError::Damaged { .. })
        ));
        fs::remove_dir_all(dir).unwrap();
    }
}
