//! A handshake probe of a seed, for a node that is still joining: it dials the seed's cluster
//! port, checks the seed's proof of the cluster secret, then closes the connection with a
//! refusal naming itself a probe (the seed never gets a link to a non-member). It tells the three
//! reasons a join can fail apart: unreachable, refused (a wrong secret), or accepted (then
//! whatever blocks the join is in gossip). Used by membership's join rule
//! ([`crate::cluster::membership::join`]).

use std::net::SocketAddr;
use std::time::Duration;

use rand::Rng;
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::cluster::auth::Security;
use crate::cluster::member::NodeAddr;
use crate::cluster::transport::driver::{framed, next_frame, refuse, send_frame};
use crate::cluster::transport::frame::Frame;
use crate::cluster::transport::handshake;
use crate::cluster::transport::tls::{LinkTls, dialled};

/// Largest frame a probe reads: a Welcome is a few hundred bytes.
const PROBE_MAX_FRAME: usize = 64 * 1024;

/// What one probe of a seed found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The seed proved it holds this node's secret.
    Accepted,
    /// The seed answered but one side refused the handshake; the reason says why.
    Refused(String),
    /// The seed could not be reached or did not answer in time.
    Unreachable(String),
}

/// Probes the node listening at `addr` as `me`, within `limit`.
pub async fn probe(
    addr: SocketAddr,
    me: &NodeAddr,
    security: &Security,
    tls: Option<&LinkTls>,
    limit: Duration,
) -> ProbeOutcome {
    let attempt = async {
        let stream = match TcpStream::connect(addr).await {
            Ok(stream) => stream,
            Err(error) => return ProbeOutcome::Unreachable(error.to_string()),
        };
        // A seed that refuses our certificate (or we its) refused us, as a wrong secret would.
        let stream = match dialled(tls, stream, addr).await {
            Ok(stream) => stream,
            Err(failure) if failure.refused => return ProbeOutcome::Refused(failure.reason),
            Err(failure) => return ProbeOutcome::Unreachable(failure.reason),
        };
        let mut link = framed(stream, PROBE_MAX_FRAME);
        let nonce: [u8; 32] = rand::rng().random();
        let hello = match handshake::hello::<()>(security, me, nonce) {
            Ok(hello) => hello,
            Err(refusal) => return ProbeOutcome::Refused(refusal.to_string()),
        };
        if let Err(error) = send_frame(&mut link, hello).await {
            return ProbeOutcome::Unreachable(error);
        }
        let welcome = match next_frame::<()>(&mut link).await {
            Ok(welcome) => welcome,
            // A peer that closes on our Hello refused it without saying why.
            Err(error) => return ProbeOutcome::Refused(error),
        };
        match handshake::answer(security, me, nonce, None, welcome) {
            Ok(_) => {
                // Best effort: the seed learns this was a probe, not a refusal.
                let close: Frame<()> = Frame::Refused {
                    reason: handshake::PROBE_CLOSE.to_owned(),
                };
                let _ = send_frame(&mut link, close).await;
                ProbeOutcome::Accepted
            }
            Err(refusal) => {
                refuse(&mut link, &refusal).await;
                ProbeOutcome::Refused(refusal.to_string())
            }
        }
    };
    timeout(limit, attempt)
        .await
        .unwrap_or_else(|_| ProbeOutcome::Unreachable(format!("no answer within {limit:?}")))
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;
    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::cluster::auth::ClusterSecret;
    use crate::cluster::context::NodeContext;
    use crate::cluster::member::{ClusterView, Member, MemberStatus, NodeId};
    use crate::cluster::metrics::{ClusterMetrics, refusal};
    use crate::cluster::transport::{TransportSettings, start};

    const LIMIT: Duration = Duration::from_secs(5);

    fn secret(text: &str) -> Security {
        Security::Secret(ClusterSecret::new(text).unwrap())
    }

    fn addr(id: &str) -> NodeAddr {
        NodeAddr {
            id: NodeId::new(id),
            generation: 1,
        }
    }

    /// A real transport listening with `security`.
    struct Seed {
        at: SocketAddr,
        metrics: ClusterMetrics,
        stop: CancellationToken,
        /// Kept so the transport's view stays open (the transport stops when it closes).
        _view: watch::Sender<ClusterView>,
    }

    async fn seed(security: Security) -> Seed {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        let me = Member {
            addr: addr("seed"),
            rpc_addr: at,
            roles: Default::default(),
            status: MemberStatus::Up,
            started_at_ms: 1,
        };
        let (view, view_rx) = watch::channel(ClusterView::alone(me.clone()));
        let metrics = ClusterMetrics::unregistered();
        let stop = CancellationToken::new();
        let node = NodeContext {
            me: me.addr,
            view: view_rx,
            metrics: metrics.clone(),
            shutdown: stop.clone(),
        };
        let (_handle, _inbound) = start::<String>(
            &node,
            security,
            None,
            listener,
            TransportSettings::default(),
        );
        // The handle and inbound may go: the listener runs until `stop`.
        Seed {
            at,
            metrics,
            stop,
            _view: view,
        }
    }

    #[tokio::test]
    async fn a_seed_with_the_same_secret_accepts_and_gets_no_link() {
        let seed = seed(secret("the shared cluster secret")).await;
        let (at, metrics) = (seed.at, &seed.metrics);
        let outcome = probe(
            at,
            &addr("joiner"),
            &secret("the shared cluster secret"),
            None,
            LIMIT,
        )
        .await;
        assert_eq!(outcome, ProbeOutcome::Accepted);
        // The seed saw the probe end its handshake: no link to a non-member was made, and it
        // was not counted as a refusal.
        let probes = metrics.refused.with_label_values(&[refusal::PROBE]);
        let deadline = tokio::time::Instant::now() + LIMIT;
        while probes.get() == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the seed kept the probe as a link"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let refusals = metrics.refused.with_label_values(&[refusal::HANDSHAKE]);
        assert_eq!(refusals.get(), 0);
        seed.stop.cancel();
    }

    #[tokio::test]
    async fn a_seed_with_another_secret_or_none_is_told_apart_from_a_dead_one() {
        let seed = seed(secret("the shared cluster secret")).await;
        let at = seed.at;
        let wrong = probe(
            at,
            &addr("joiner"),
            &secret("some other secret value"),
            None,
            LIMIT,
        )
        .await;
        assert!(
            matches!(&wrong, ProbeOutcome::Refused(why) if why.contains("secret")),
            "{wrong:?}"
        );
        let open = probe(at, &addr("joiner"), &Security::Insecure, None, LIMIT).await;
        assert!(matches!(open, ProbeOutcome::Refused(_)), "{open:?}");
        seed.stop.cancel();

        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let nobody = closed.local_addr().unwrap();
        drop(closed);
        let dead = probe(
            nobody,
            &addr("joiner"),
            &secret("the shared cluster secret"),
            None,
            LIMIT,
        )
        .await;
        assert!(matches!(dead, ProbeOutcome::Unreachable(_)), "{dead:?}");
    }
}
