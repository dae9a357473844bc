//! The cluster secret. Every node of a cluster holds it. Gossip is keyed by it twice: the
//! cluster id nodes gossip under is derived from it (a node with another secret is answered
//! "wrong cluster" and learns nothing), and every member record is signed with it (a record
//! forged without the secret is ignored). A transport link only opens after both ends proved
//! they hold it. Separate keys are derived for gossip and links, so a value seen in one can
//! never be replayed in the other.
//!
//! Running without a secret is possible only when asked for explicitly ([`Security::Insecure`]);
//! insecure nodes and nodes with a secret never accept each other. A node given neither runs
//! [`Security::Standalone`]: alone, accepting nobody.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of a gossip signature (a truncated HMAC-SHA256).
pub const GOSSIP_TAG_LEN: usize = 16;

/// Bytes of a link handshake proof (a full HMAC-SHA256).
pub const PROOF_LEN: usize = 32;

/// The shortest secret accepted: anything shorter is guessable.
pub const MIN_SECRET_LEN: usize = 16;

/// Why a secret was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    /// Shorter than [`MIN_SECRET_LEN`] bytes.
    #[error("the cluster secret must be at least {MIN_SECRET_LEN} bytes long")]
    TooShort,
}

/// Keys derived from the shared secret; the secret itself is not kept.
#[derive(Clone)]
pub struct ClusterSecret {
    gossip_key: [u8; 32],
    link_key: [u8; 32],
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    /// Derives the keys from `secret`.
    pub fn new(secret: &str) -> Result<Self, SecretError> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(SecretError::TooShort);
        }
        Ok(ClusterSecret {
            gossip_key: mac(secret.as_bytes(), &[b"warren gossip key v1"]),
            link_key: mac(secret.as_bytes(), &[b"warren link key v1"]),
        })
    }

    /// The signature of a gossiped record.
    pub fn gossip_tag(&self, payload: &[u8]) -> [u8; GOSSIP_TAG_LEN] {
        let full = mac(&self.gossip_key, &[payload]);
        let mut tag = [0; GOSSIP_TAG_LEN];
        tag.copy_from_slice(&full[..GOSSIP_TAG_LEN]);
        tag
    }

    /// Checks a gossip signature in constant time.
    pub fn verify_gossip_tag(&self, payload: &[u8], tag: &[u8]) -> bool {
        tag.len() == GOSSIP_TAG_LEN
            && keyed(&self.gossip_key, &[payload])
                .is_some_and(|check| check.verify_truncated_left(tag).is_ok())
    }

    /// A link handshake proof over `parts` (the role and everything both ends said).
    pub fn link_proof(&self, parts: &[&[u8]]) -> [u8; PROOF_LEN] {
        mac(&self.link_key, parts)
    }

    /// Checks a link handshake proof in constant time.
    pub fn verify_link_proof(&self, parts: &[&[u8]], proof: &[u8]) -> bool {
        keyed(&self.link_key, parts).is_some_and(|check| check.verify_slice(proof).is_ok())
    }
}

/// An HMAC-SHA256 fed with `parts`, each prefixed with its length so that no two different
/// lists of parts give the same input. `None` cannot happen (HMAC takes keys of any length).
fn keyed(key: &[u8], parts: &[&[u8]]) -> Option<HmacSha256> {
    let mut mac = HmacSha256::new_from_slice(key).ok()?;
    for part in parts {
        mac.update(&(part.len() as u64).to_le_bytes());
        mac.update(part);
    }
    Some(mac)
}

fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut out = [0; 32];
    if let Some(mac) = keyed(key, parts) {
        out.copy_from_slice(&mac.finalize().into_bytes());
    }
    out
}

/// How a node authenticates its peers.
#[derive(Clone, Debug)]
pub enum Security {
    /// Peers must hold the same secret.
    Secret(ClusterSecret),
    /// No authentication: anyone who can reach the ports is a member. Only when asked for.
    Insecure,
    /// Neither a secret nor `insecure`: the node forms a cluster of one and refuses every peer.
    Standalone,
}

impl Security {
    /// The id nodes gossip under: nodes with different ids ignore each other, so it carries
    /// a fingerprint of the secret (never the secret), and a standalone node gets one nobody
    /// else has.
    pub fn gossip_cluster_id(&self, cluster_name: &str) -> String {
        match self {
            Security::Secret(secret) => {
                let fingerprint = secret.gossip_tag(b"warren cluster id");
                let hex: String = fingerprint[..8]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                format!("{cluster_name}-{hex}")
            }
            Security::Insecure => cluster_name.to_owned(),
            Security::Standalone => format!("{cluster_name}-standalone-{}", uuid::Uuid::new_v4()),
        }
    }

    /// The secret, unless insecure.
    pub fn secret(&self) -> Option<&ClusterSecret> {
        match self {
            Security::Secret(secret) => Some(secret),
            Security::Insecure | Security::Standalone => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "correct horse battery staple";

    #[test]
    fn a_short_secret_is_refused() {
        assert_eq!(
            ClusterSecret::new("short").map(|_| ()),
            Err(SecretError::TooShort)
        );
    }

    #[test]
    fn gossip_tags_verify_only_with_the_same_secret_and_payload() {
        let ours = ClusterSecret::new(SECRET).unwrap();
        let theirs = ClusterSecret::new("another secret entirely").unwrap();
        let tag = ours.gossip_tag(b"payload");
        assert!(ours.verify_gossip_tag(b"payload", &tag));
        assert!(!ours.verify_gossip_tag(b"payloaD", &tag));
        assert!(!theirs.verify_gossip_tag(b"payload", &tag));
        assert!(!ours.verify_gossip_tag(b"payload", &tag[..8]));
    }

    #[test]
    fn link_proofs_bind_every_part_and_differ_from_gossip_tags() {
        let secret = ClusterSecret::new(SECRET).unwrap();
        let proof = secret.link_proof(&[b"dialer", b"nonce"]);
        assert!(secret.verify_link_proof(&[b"dialer", b"nonce"], &proof));
        assert!(!secret.verify_link_proof(&[b"dialernonce"], &proof));
        assert!(!secret.verify_link_proof(&[b"acceptor", b"nonce"], &proof));
        assert_ne!(&secret.gossip_tag(b"nonce")[..], &proof[..GOSSIP_TAG_LEN]);
    }

    #[test]
    fn only_nodes_with_the_same_secret_gossip_under_the_same_cluster_id() {
        let ours = Security::Secret(ClusterSecret::new(SECRET).unwrap());
        let same = Security::Secret(ClusterSecret::new(SECRET).unwrap());
        let theirs = Security::Secret(ClusterSecret::new("another secret entirely").unwrap());
        let id = ours.gossip_cluster_id("warren");
        assert_eq!(id, same.gossip_cluster_id("warren"));
        assert_ne!(id, theirs.gossip_cluster_id("warren"));
        assert_ne!(id, Security::Insecure.gossip_cluster_id("warren"));
        assert!(!id.contains(SECRET));
        assert_ne!(
            Security::Standalone.gossip_cluster_id("warren"),
            Security::Standalone.gossip_cluster_id("warren")
        );
    }

    #[test]
    fn debug_output_hides_the_keys() {
        let secret = ClusterSecret::new(SECRET).unwrap();
        assert_eq!(format!("{secret:?}"), "ClusterSecret(..)");
    }
}
