//! The link handshake, as pure steps: the dialer says Hello with a challenge; the acceptor
//! answers Welcome with its proof and its own challenge; the dialer checks that proof and
//! answers with its own. A proof is an HMAC with the cluster secret over everything both ends
//! said (version, both addresses, both challenges) plus the prover's role, so a proof cannot
//! be replayed to another link or reflected back. Insecure nodes skip proofs, and only talk to
//! insecure nodes; standalone nodes refuse everyone.

use crate::cluster::auth::Security;
use crate::cluster::member::NodeAddr;
use crate::cluster::transport::frame::{AuthMode, Frame, PROTOCOL_VERSION};

/// Why a handshake failed; the link is closed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// This node accepts no peers.
    #[error("this node runs standalone and accepts no peers")]
    Standalone,
    /// The peer speaks another protocol version.
    #[error("protocol version {0} is not {PROTOCOL_VERSION}")]
    Version(u16),
    /// One end has a secret and the other runs insecure.
    #[error("authentication modes differ")]
    AuthMode,
    /// The peer's proof is wrong: it does not hold the cluster secret.
    #[error("the peer does not hold the cluster secret")]
    BadProof,
    /// The peer is not the node this one meant to reach (it restarted, or the address moved).
    #[error("expected {expected}, reached {got}")]
    WrongPeer {
        /// Whom this node dialed.
        expected: NodeAddr,
        /// Who answered.
        got: NodeAddr,
    },
    /// The peer sent something other than the next handshake step.
    #[error("unexpected frame during the handshake")]
    Unexpected,
    /// The peer refused the link.
    #[error("refused by the peer: {0}")]
    ByPeer(String),
}

/// What a probe says when it closes a handshake it only made to check the peer's proof.
pub const PROBE_CLOSE: &str = "a join probe, not a link";

impl Refusal {
    /// Whether the peer ended the handshake as a probe does, rather than refusing it.
    pub fn is_probe(&self) -> bool {
        matches!(self, Refusal::ByPeer(reason) if reason == PROBE_CLOSE)
    }
}

fn mode(security: &Security) -> Result<AuthMode, Refusal> {
    match security {
        Security::Secret(_) => Ok(AuthMode::Secret),
        Security::Insecure => Ok(AuthMode::Insecure),
        Security::Standalone => Err(Refusal::Standalone),
    }
}

fn transcript(
    role: &'static [u8],
    dialer: &NodeAddr,
    acceptor: &NodeAddr,
    dialer_nonce: &[u8; 32],
    acceptor_nonce: &[u8; 32],
) -> Vec<Vec<u8>> {
    vec![
        role.to_vec(),
        PROTOCOL_VERSION.to_le_bytes().to_vec(),
        dialer.id.as_str().as_bytes().to_vec(),
        dialer.generation.to_le_bytes().to_vec(),
        acceptor.id.as_str().as_bytes().to_vec(),
        acceptor.generation.to_le_bytes().to_vec(),
        dialer_nonce.to_vec(),
        acceptor_nonce.to_vec(),
    ]
}

fn prove(security: &Security, parts: &[Vec<u8>]) -> Vec<u8> {
    let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    security
        .secret()
        .map(|s| s.link_proof(&parts).to_vec())
        .unwrap_or_default()
}

fn check(security: &Security, parts: &[Vec<u8>], proof: &[u8]) -> Result<(), Refusal> {
    let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    match security.secret() {
        Some(secret) if secret.verify_link_proof(&parts, proof) => Ok(()),
        Some(_) => Err(Refusal::BadProof),
        None => Ok(()),
    }
}

/// The dialer's first frame.
pub fn hello<T>(security: &Security, me: &NodeAddr, nonce: [u8; 32]) -> Result<Frame<T>, Refusal> {
    Ok(Frame::Hello {
        version: PROTOCOL_VERSION,
        auth: mode(security)?,
        from: me.clone(),
        nonce,
    })
}

/// What the acceptor remembers between its Welcome and the dialer's Proof.
#[derive(Debug)]
pub struct Accepting {
    dialer: NodeAddr,
    dialer_nonce: [u8; 32],
    nonce: [u8; 32],
}

/// The acceptor's answer to `frame` (which must be a Hello).
pub fn welcome<T>(
    security: &Security,
    me: &NodeAddr,
    frame: Frame<T>,
    nonce: [u8; 32],
) -> Result<(Frame<T>, Accepting), Refusal> {
    let Frame::Hello {
        version,
        auth,
        from,
        nonce: dialer_nonce,
    } = frame
    else {
        return Err(Refusal::Unexpected);
    };
    if version != PROTOCOL_VERSION {
        return Err(Refusal::Version(version));
    }
    if auth != mode(security)? {
        return Err(Refusal::AuthMode);
    }
    let proof = prove(
        security,
        &transcript(b"acceptor", &from, me, &dialer_nonce, &nonce),
    );
    let welcome = Frame::Welcome {
        from: me.clone(),
        nonce,
        proof,
    };
    Ok((
        welcome,
        Accepting {
            dialer: from,
            dialer_nonce,
            nonce,
        },
    ))
}

/// The dialer checks the acceptor's Welcome and answers with its Proof; returns the peer.
pub fn answer<T>(
    security: &Security,
    me: &NodeAddr,
    nonce: [u8; 32],
    expected: Option<&NodeAddr>,
    frame: Frame<T>,
) -> Result<(Frame<T>, NodeAddr), Refusal> {
    let (acceptor, acceptor_nonce, proof) = match frame {
        Frame::Welcome { from, nonce, proof } => (from, nonce, proof),
        Frame::Refused { reason } => return Err(Refusal::ByPeer(reason)),
        _ => return Err(Refusal::Unexpected),
    };
    check(
        security,
        &transcript(b"acceptor", me, &acceptor, &nonce, &acceptor_nonce),
        &proof,
    )?;
    if let Some(expected) = expected
        && *expected != acceptor
    {
        return Err(Refusal::WrongPeer {
            expected: expected.clone(),
            got: acceptor,
        });
    }
    let proof = prove(
        security,
        &transcript(b"dialer", me, &acceptor, &nonce, &acceptor_nonce),
    );
    Ok((Frame::Proof { proof }, acceptor))
}

/// The acceptor checks the dialer's Proof; returns the peer.
pub fn verify<T>(
    security: &Security,
    me: &NodeAddr,
    accepting: Accepting,
    frame: Frame<T>,
) -> Result<NodeAddr, Refusal> {
    let proof = match frame {
        Frame::Proof { proof } => proof,
        Frame::Refused { reason } => return Err(Refusal::ByPeer(reason)),
        _ => return Err(Refusal::Unexpected),
    };
    check(
        security,
        &transcript(
            b"dialer",
            &accepting.dialer,
            me,
            &accepting.dialer_nonce,
            &accepting.nonce,
        ),
        &proof,
    )?;
    Ok(accepting.dialer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::auth::ClusterSecret;
    use crate::cluster::member::NodeId;

    fn addr(id: &str) -> NodeAddr {
        NodeAddr {
            id: NodeId::new(id),
            generation: 1,
        }
    }

    fn secret(text: &str) -> Security {
        Security::Secret(ClusterSecret::new(text).unwrap())
    }

    /// Runs the three steps between a dialer `a` and an acceptor `b`.
    fn run(dialer: &Security, acceptor: &Security) -> Result<(NodeAddr, NodeAddr), Refusal> {
        let (a, b) = (addr("a"), addr("b"));
        let hello: Frame<()> = hello(dialer, &a, [1; 32])?;
        let (welcome, accepting) = welcome(acceptor, &b, hello, [2; 32])?;
        let (proof, peer_of_a) = answer(dialer, &a, [1; 32], Some(&b), welcome)?;
        let peer_of_b = verify(acceptor, &b, accepting, proof)?;
        Ok((peer_of_a, peer_of_b))
    }

    #[test]
    fn two_nodes_with_the_secret_learn_each_other() {
        let s = secret("the shared cluster secret");
        assert_eq!(run(&s, &s), Ok((addr("b"), addr("a"))));
        assert_eq!(
            run(&Security::Insecure, &Security::Insecure),
            Ok((addr("b"), addr("a")))
        );
    }

    #[test]
    fn a_wrong_secret_fails_on_whichever_side_checks_first() {
        let ours = secret("the shared cluster secret");
        let theirs = secret("somebody else's secret");
        assert_eq!(
            run(&theirs, &ours),
            Err(Refusal::BadProof),
            "dialer checks the acceptor"
        );
        assert_eq!(run(&ours, &theirs), Err(Refusal::BadProof));
    }

    #[test]
    fn insecure_and_secured_nodes_and_standalone_ones_never_link() {
        let s = secret("the shared cluster secret");
        assert_eq!(run(&Security::Insecure, &s), Err(Refusal::AuthMode));
        assert_eq!(run(&s, &Security::Insecure), Err(Refusal::AuthMode));
        assert_eq!(run(&Security::Standalone, &s), Err(Refusal::Standalone));
        assert_eq!(run(&s, &Security::Standalone), Err(Refusal::Standalone));
    }

    #[test]
    fn a_proof_cannot_be_replayed_by_the_dialer_as_its_own() {
        let s = secret("the shared cluster secret");
        let (a, b) = (addr("a"), addr("b"));
        let hello: Frame<()> = hello(&s, &a, [1; 32]).unwrap();
        let (welcome, accepting) = welcome(&s, &b, hello, [2; 32]).unwrap();
        let Frame::Welcome { proof, .. } = welcome else {
            panic!("a welcome")
        };
        // Reflecting the acceptor's proof back does not pass as the dialer's.
        assert_eq!(
            verify(&s, &b, accepting, Frame::<()>::Proof { proof }),
            Err(Refusal::BadProof)
        );
    }

    #[test]
    fn reaching_another_run_than_expected_is_refused() {
        let s = secret("the shared cluster secret");
        let a = addr("a");
        let hello: Frame<()> = hello(&s, &a, [1; 32]).unwrap();
        let restarted = NodeAddr {
            id: NodeId::new("b"),
            generation: 2,
        };
        let (welcome, _) = welcome(&s, &restarted, hello, [2; 32]).unwrap();
        assert!(matches!(
            answer(&s, &a, [1; 32], Some(&addr("b")), welcome),
            Err(Refusal::WrongPeer { .. })
        ));
    }
}
