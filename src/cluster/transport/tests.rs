//! The transport on real loopback sockets, real time, short timeouts.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::codec::LengthDelimitedCodec;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::cluster::auth::{ClusterSecret, Security};
use crate::cluster::context::NodeContext;
use crate::cluster::member::{ClusterView, Member, MemberStatus, NodeAddr, NodeId};
use crate::cluster::metrics::{ClusterMetrics, refusal};
use crate::cluster::transport::frame::{Frame, decode, encode};

const SECRET: &str = "the transport test secret";

fn secret(text: &str) -> Security {
    Security::Secret(ClusterSecret::new(text).unwrap())
}

fn settings() -> TransportSettings {
    TransportSettings {
        heartbeat_interval: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(600),
        handshake_timeout: Duration::from_millis(600),
        reconnect_min: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(200),
        max_frame_bytes: 4096,
        send_queue: 16,
        ..TransportSettings::default()
    }
}

struct Node {
    member: Member,
    handle: TransportHandle<String>,
    inbound: mpsc::Receiver<Inbound<String>>,
    view: watch::Sender<ClusterView>,
    metrics: ClusterMetrics,
    stop: CancellationToken,
}

fn member(id: &str, generation: u64, rpc_addr: SocketAddr) -> Member {
    Member {
        addr: NodeAddr {
            id: NodeId::new(id),
            generation,
        },
        rpc_addr,
        roles: BTreeSet::new(),
        status: MemberStatus::Up,
        started_at_ms: generation,
    }
}

async fn node_on(listener: TcpListener, id: &str, security: Security) -> Node {
    let me = member(id, 1, listener.local_addr().unwrap());
    let (view, view_rx) = watch::channel(ClusterView::alone(me.clone()));
    let metrics = ClusterMetrics::unregistered();
    let stop = CancellationToken::new();
    let node = NodeContext {
        me: me.addr.clone(),
        view: view_rx,
        metrics: metrics.clone(),
        shutdown: stop.clone(),
    };
    let (handle, inbound) = start(&node, security, None, listener, settings());
    Node {
        member: me,
        handle,
        inbound,
        view,
        metrics,
        stop,
    }
}

async fn node(id: &str, security: Security) -> Node {
    node_on(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        id,
        security,
    )
    .await
}

/// Makes each node's view hold all the others.
fn introduce(nodes: &[&Node]) {
    for node in nodes {
        node.view.send_modify(|view| {
            for other in nodes {
                view.members
                    .insert(other.member.addr.id.clone(), other.member.clone());
            }
        });
    }
}

async fn receive(node: &mut Node) -> Inbound<String> {
    tokio::time::timeout(Duration::from_secs(5), node.inbound.recv())
        .await
        .expect("a message within 5 s")
        .expect("transport running")
}

/// Sends until one arrives (the link may still be forming), then returns what arrived.
async fn send_until_linked(from: &Node, to: &mut Node, text: &str) -> Inbound<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        from.handle.send(&to.member.addr, text.to_owned());
        if let Ok(Some(got)) =
            tokio::time::timeout(Duration::from_millis(100), to.inbound.recv()).await
        {
            return got;
        }
        assert!(tokio::time::Instant::now() < deadline, "no link formed");
    }
}

#[tokio::test]
async fn two_nodes_with_the_secret_exchange_messages_in_order_both_ways() {
    let mut a = node("a", secret(SECRET)).await;
    let mut b = node("b", secret(SECRET)).await;
    introduce(&[&a, &b]);
    let first = send_until_linked(&a, &mut b, "hello").await;
    assert_eq!(first.from, a.member.addr);
    while let Ok(extra) = b.inbound.try_recv() {
        assert_eq!(extra.message, "hello");
    }
    for n in 0..10 {
        assert_eq!(
            a.handle.send(&b.member.addr, n.to_string()),
            SendOutcome::Queued
        );
    }
    for n in 0..10 {
        assert_eq!(receive(&mut b).await.message, n.to_string());
    }
    b.handle.send(&a.member.addr, "back".to_owned());
    let back = loop {
        let got = receive(&mut a).await;
        if got.message == "back" {
            break got;
        }
    };
    assert_eq!(back.from, b.member.addr);
    assert_eq!(a.metrics.links.get(), 1);
    assert_eq!(b.metrics.links.get(), 1, "one link per pair");
    // A message to oneself takes the short way.
    a.handle.send(&a.member.addr.clone(), "self".to_owned());
    assert_eq!(receive(&mut a).await.message, "self");
}

#[tokio::test]
async fn a_node_with_another_secret_is_refused_both_ways() {
    let mut a = node("a", secret(SECRET)).await;
    let mut x = node("x", secret("somebody else's secret")).await;
    let mut i = node("i", Security::Insecure).await;
    introduce(&[&a, &x, &i]);
    let refused = |n: &Node| {
        n.metrics
            .refused
            .with_label_values(&[refusal::HANDSHAKE])
            .get()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while refused(&a) + refused(&x) < 2 || refused(&a) + refused(&i) < 2 {
        a.handle.send(&x.member.addr, "to x".to_owned());
        x.handle.send(&a.member.addr, "to a".to_owned());
        i.handle.send(&a.member.addr, "to a".to_owned());
        a.handle.send(&i.member.addr, "to i".to_owned());
        assert!(tokio::time::Instant::now() < deadline, "refusals not seen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(a.inbound.try_recv().is_err());
    assert!(x.inbound.try_recv().is_err());
    assert!(i.inbound.try_recv().is_err());
    assert_eq!(a.metrics.links.get(), 0);
}

#[tokio::test]
async fn garbage_and_oversize_frames_close_only_their_own_connection() {
    let a = node("a", secret(SECRET)).await;
    let mut b = node("b", secret(SECRET)).await;
    introduce(&[&a, &b]);
    send_until_linked(&a, &mut b, "before").await;
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0xff; 64][..],
        &[0, 0, 0, 3, 1, 2, 3][..],
    ] {
        let mut raw = TcpStream::connect(b.member.rpc_addr).await.unwrap();
        raw.write_all(garbage).await.unwrap();
        drop(raw);
    }
    // b read each one and refused it (a stuck or dead acceptor would not count them).
    let refused = || {
        [refusal::HANDSHAKE, refusal::BAD_FRAME]
            .iter()
            .map(|reason| b.metrics.refused.with_label_values(&[reason]).get())
            .sum::<u64>()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while refused() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "refused {}",
            refused()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An oversize message is dropped by its sender; the link stays up.
    a.handle.send(&b.member.addr, "x".repeat(10_000));
    a.handle.send(&b.member.addr, "after".to_owned());
    loop {
        let got = receive(&mut b).await.message;
        assert!(got.len() < 10, "the oversize message never arrives");
        if got == "after" {
            break;
        }
    }
    assert_eq!(a.metrics.dropped.get(), 1);
    assert_eq!(b.metrics.links.get(), 1);
}

#[tokio::test]
async fn a_silent_peer_is_dropped_after_the_idle_timeout() {
    let a = node("a", secret(SECRET)).await;
    // "z" (above "a", so it accepts) completes the handshake and then says nothing at all.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let z = member("z", 1, listener.local_addr().unwrap());
    introduce(&[&a]);
    a.view.send_modify(|v| {
        v.members.insert(z.addr.id.clone(), z.clone());
    });
    let security = secret(SECRET);
    let (stream, _) = listener.accept().await.unwrap();
    let mut link = LengthDelimitedCodec::builder().new_framed(stream);
    let hello: Frame<String> = decode(&link.next().await.unwrap().unwrap()).unwrap();
    let (welcome, accepting) =
        super::handshake::welcome(&security, &z.addr, hello, [9; 32]).unwrap();
    link.send(encode(&welcome).unwrap()).await.unwrap();
    let proof: Frame<String> = decode(&link.next().await.unwrap().unwrap()).unwrap();
    assert_eq!(
        super::handshake::verify(&security, &z.addr, accepting, proof),
        Ok(a.member.addr.clone())
    );
    let idle = || a.metrics.refused.with_label_values(&[refusal::IDLE]).get();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while idle() == 0 {
        // Keep reading its pings, never answering.
        let _ = tokio::time::timeout(Duration::from_millis(50), link.next()).await;
        assert!(tokio::time::Instant::now() < deadline, "never timed out");
    }
    // And it dials again.
    tokio::time::timeout(Duration::from_secs(5), listener.accept())
        .await
        .expect("re-dialed")
        .unwrap();
}

#[tokio::test]
async fn a_restarted_peer_is_linked_again_and_the_queue_to_a_dead_one_is_bounded() {
    let a = node("a", secret(SECRET)).await;
    let mut b = node("b", secret(SECRET)).await;
    introduce(&[&a, &b]);
    send_until_linked(&a, &mut b, "first").await;
    let b_addr = b.member.rpc_addr;
    b.stop.cancel();
    drop(b);
    // Nobody listens: the queue to b fills and then refuses more.
    let outcomes: Vec<SendOutcome> = (0..100)
        .map(|n| a.handle.send(&member("b", 1, b_addr).addr, n.to_string()))
        .collect();
    assert!(outcomes.contains(&SendOutcome::QueueFull));
    assert!(
        outcomes
            .iter()
            .filter(|o| **o == SendOutcome::Queued)
            .count()
            <= 17
    );
    // b comes back on the same address (once the old socket has let go of it).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let listener = loop {
        match TcpListener::bind(b_addr).await {
            Ok(listener) => break listener,
            Err(error) => assert!(
                tokio::time::Instant::now() < deadline,
                "{b_addr} not free again within 5 s: {error}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut b = node_on(listener, "b", secret(SECRET)).await;
    introduce(&[&a, &b]);
    let got = send_until_linked(&a, &mut b, "again").await;
    assert_eq!(got.from, a.member.addr);
    assert!(a.metrics.reconnects.get() >= 1);
}
