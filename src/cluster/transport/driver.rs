//! The transport's tasks. One driver task accepts connections (each handshake in a task of its
//! own, a bounded number at a time) and keeps one peer task per known node in step with the
//! membership view. A peer task owns the peer's bounded send queue across links: of each pair,
//! the node with the lower address dials (re-dialing with backoff), the other accepts. A link
//! runs a reader (frames in, an idle timeout) and a writer (the queue out, a ping when idle)
//! side by side; either failing closes the link. A full inbound queue stops the readers, so a
//! slow node pushes back on its peers through TCP instead of growing memory.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use prometheus::IntCounter;
use rand::Rng;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cluster::auth::Security;
use crate::cluster::context::NodeContext;
use crate::cluster::member::{ClusterView, MemberStatus, NodeAddr};
use crate::cluster::metrics::{ClusterMetrics, refusal};
use crate::cluster::transport::frame::{Frame, decode, encode};
use crate::cluster::transport::handshake::{self, Refusal};
use crate::cluster::transport::link_error::LinkError;
use crate::cluster::transport::tls::{LinkStream, LinkTls, accepted, dialled};
use crate::cluster::transport::{Outbox, TransportSettings};

/// Handshakes in progress at most; more connections wait to be accepted.
const MAX_HANDSHAKES: usize = 64;

/// A link that lasted this long resets its peer's backoff.
const STABLE_LINK: Duration = Duration::from_secs(10);

/// Most frames written with one flush; bounds the latency of the first behind a burst.
const WRITE_BATCH: usize = 64;

type Link = Framed<LinkStream, LengthDelimitedCodec>;
type Routes<T> = Arc<RwLock<HashMap<NodeAddr, mpsc::Sender<T>>>>;

/// A message that arrived for this node's services.
#[derive(Debug)]
pub struct Inbound<T> {
    /// Who sent it.
    pub from: NodeAddr,
    /// What it is.
    pub message: T,
}

/// What became of a message handed to [`TransportHandle::send`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// Queued for the peer's link (it may still be lost with the link).
    Queued,
    /// The peer is not a known, live node.
    NoRoute,
    /// The peer's send queue is full; the message was dropped.
    QueueFull,
}

/// Sends messages to other nodes (and to this one); cheap to clone.
pub struct TransportHandle<T> {
    me: NodeAddr,
    routes: Routes<T>,
    local: mpsc::Sender<Inbound<T>>,
    dropped: IntCounter,
}

impl<T> Clone for TransportHandle<T> {
    fn clone(&self) -> Self {
        TransportHandle {
            me: self.me.clone(),
            routes: Arc::clone(&self.routes),
            local: self.local.clone(),
            dropped: self.dropped.clone(),
        }
    }
}

impl<T> TransportHandle<T> {
    /// This node.
    pub fn me(&self) -> &NodeAddr {
        &self.me
    }

    /// Queues `message` for `to` without waiting; a message to this node goes straight to its
    /// inbound queue.
    pub fn send(&self, to: &NodeAddr, message: T) -> SendOutcome {
        let outcome = if to == &self.me {
            match self.local.try_send(Inbound {
                from: self.me.clone(),
                message,
            }) {
                Ok(()) => SendOutcome::Queued,
                Err(mpsc::error::TrySendError::Full(_)) => SendOutcome::QueueFull,
                Err(mpsc::error::TrySendError::Closed(_)) => SendOutcome::NoRoute,
            }
        } else {
            let routes = self.routes.read().unwrap_or_else(PoisonError::into_inner);
            match routes.get(to).map(|queue| queue.try_send(message)) {
                None => SendOutcome::NoRoute,
                Some(Ok(())) => SendOutcome::Queued,
                Some(Err(mpsc::error::TrySendError::Full(_))) => SendOutcome::QueueFull,
                Some(Err(mpsc::error::TrySendError::Closed(_))) => SendOutcome::NoRoute,
            }
        };
        if outcome == SendOutcome::QueueFull {
            self.dropped.inc();
        }
        outcome
    }

    /// An [`Outbox`] for one kind of message, wrapped into this transport's type by `wrap`.
    pub fn outbox<M: 'static>(&self, wrap: fn(M) -> T) -> Outbox<M>
    where
        T: Send + 'static,
    {
        let handle = self.clone();
        Arc::new(move |to: &NodeAddr, message: M| handle.send(to, wrap(message)))
    }
}

/// Starts the node's transport on `listener`, following the node's view for whom to link
/// with. Runs until the node stops; returns the handle and the queue of messages for this node.
pub fn start<T>(
    node: &NodeContext,
    security: Security,
    tls: Option<Arc<LinkTls>>,
    listener: TcpListener,
    settings: TransportSettings,
) -> (TransportHandle<T>, mpsc::Receiver<Inbound<T>>)
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    let (me, view, metrics) = (node.me.clone(), node.view.clone(), node.metrics.clone());
    let (inbound, inbound_rx) = mpsc::channel(settings.inbound_queue.max(1));
    let routes: Routes<T> = Arc::default();
    let handle = TransportHandle {
        me: me.clone(),
        routes: Arc::clone(&routes),
        local: inbound.clone(),
        dropped: metrics.dropped.clone(),
    };
    let local_ip = listener.local_addr().ok().map(|a| a.ip());
    let shared = Arc::new(Shared {
        me,
        local_ip,
        security,
        tls,
        counters: Counters::new(&metrics),
        metrics,
        settings,
        inbound,
    });
    tokio::spawn(
        Driver {
            shared,
            routes,
            peers: HashMap::new(),
            shutdown: node.part_shutdown(),
        }
        .run(listener, view),
    );
    (handle, inbound_rx)
}

/// What every task of one transport shares.
struct Shared<T> {
    me: NodeAddr,
    /// The address this node listens on; links are dialled from it too.
    local_ip: Option<std::net::IpAddr>,
    security: Security,
    /// TLS around every link, when `[cluster.tls]` is set.
    tls: Option<Arc<LinkTls>>,
    settings: TransportSettings,
    metrics: ClusterMetrics,
    counters: Counters,
    inbound: mpsc::Sender<Inbound<T>>,
}

/// Per-direction counters, resolved once.
struct Counters {
    frames_in: IntCounter,
    frames_out: IntCounter,
    bytes_in: IntCounter,
    bytes_out: IntCounter,
}

impl Counters {
    fn new(metrics: &ClusterMetrics) -> Self {
        Counters {
            frames_in: metrics.frames.with_label_values(&["in"]),
            frames_out: metrics.frames.with_label_values(&["out"]),
            bytes_in: metrics.bytes.with_label_values(&["in"]),
            bytes_out: metrics.bytes.with_label_values(&["out"]),
        }
    }
}

struct Peer {
    cancel: CancellationToken,
    /// Connections accepted from this peer, handed to its task.
    conns: mpsc::Sender<Link>,
    /// Where to dial it, once membership says.
    dial_addr: watch::Sender<Option<SocketAddr>>,
}

struct Driver<T> {
    shared: Arc<Shared<T>>,
    routes: Routes<T>,
    peers: HashMap<NodeAddr, Peer>,
    shutdown: CancellationToken,
}

impl<T: Serialize + DeserializeOwned + Send + 'static> Driver<T> {
    async fn run(mut self, listener: TcpListener, mut view: watch::Receiver<ClusterView>) {
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let (accepted_tx, mut accepted) = mpsc::channel::<(NodeAddr, Link)>(16);
        self.reconcile(&view.borrow_and_update().clone());
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                incoming = listener.accept() => {
                    let Ok((stream, from)) = incoming else {
                        continue;
                    };
                    // A flood of connections is cut off here, not queued.
                    let Ok(permit) = Arc::clone(&handshakes).try_acquire_owned() else {
                        self.shared.metrics.refused.with_label_values(&[refusal::HANDSHAKE]).inc();
                        continue;
                    };
                    let shared = Arc::clone(&self.shared);
                    let accepted_tx = accepted_tx.clone();
                    tokio::spawn(async move {
                        match accept(&shared, stream).await {
                            Ok((peer, link)) => {
                                let _ = accepted_tx.send((peer, link)).await;
                            }
                            Err(Refused { probe: true, .. }) => {
                                shared.metrics.refused.with_label_values(&[refusal::PROBE]).inc();
                                debug!(%from, "probed by a joining node");
                            }
                            Err(Refused { reason, .. }) => {
                                shared.metrics.refused.with_label_values(&[refusal::HANDSHAKE]).inc();
                                debug!(%from, %reason, "incoming link refused");
                            }
                        }
                        drop(permit);
                    });
                }
                Some((peer, link)) = accepted.recv() => {
                    if !self.peers.contains_key(&peer) {
                        self.add_peer(peer.clone(), None);
                    }
                    if let Some(entry) = self.peers.get(&peer) {
                        let _ = entry.conns.try_send(link);
                    }
                }
                changed = view.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let current = view.borrow_and_update().clone();
                    self.reconcile(&current);
                }
            }
        }
        for (_, peer) in self.peers.drain() {
            peer.cancel.cancel();
        }
        self.routes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Links with every live member; drops peers membership says are down or replaced.
    fn reconcile(&mut self, view: &ClusterView) {
        for member in view.members.values() {
            if member.addr == self.shared.me || member.status == MemberStatus::Down {
                continue;
            }
            match self.peers.get(&member.addr) {
                Some(peer) => {
                    peer.dial_addr.send_if_modified(|addr| {
                        let changed = *addr != Some(member.rpc_addr);
                        *addr = Some(member.rpc_addr);
                        changed
                    });
                }
                None => self.add_peer(member.addr.clone(), Some(member.rpc_addr)),
            }
        }
        let gone: Vec<NodeAddr> = self
            .peers
            .keys()
            .filter(|addr| match view.members.get(&addr.id) {
                Some(member) => member.addr != **addr || member.status == MemberStatus::Down,
                // Not (yet) gossiped about: keep what its own link brought.
                None => false,
            })
            .cloned()
            .collect();
        let mut routes = self.routes.write().unwrap_or_else(PoisonError::into_inner);
        for addr in gone {
            if let Some(peer) = self.peers.remove(&addr) {
                peer.cancel.cancel();
            }
            routes.remove(&addr);
            debug!(peer = %addr, "peer dropped");
        }
    }

    fn add_peer(&mut self, addr: NodeAddr, dial_addr: Option<SocketAddr>) {
        let (queue_tx, queue) = mpsc::channel(self.shared.settings.send_queue.max(1));
        let (conns_tx, conns) = mpsc::channel(2);
        let (dial_tx, dial_rx) = watch::channel(dial_addr);
        let cancel = self.shutdown.child_token();
        self.routes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(addr.clone(), queue_tx);
        let task = PeerTask {
            shared: Arc::clone(&self.shared),
            dials: self.shared.me < addr,
            peer: addr.clone(),
            dial_addr: dial_rx,
            cancel: cancel.clone(),
        };
        tokio::spawn(task.run(queue, conns));
        self.peers.insert(
            addr,
            Peer {
                cancel,
                conns: conns_tx,
                dial_addr: dial_tx,
            },
        );
    }
}

/// How a link's run ended.
enum LinkEnd {
    /// The node is stopping.
    Cancelled,
    /// The peer dialled again: the new connection takes over.
    Replaced(Link),
    /// The link failed.
    Failed(LinkError),
}

/// Runs one write on the link, failing it when the write fails or stalls past the idle
/// timeout.
async fn within_idle_timeout<E: Into<std::io::Error>>(
    settings: &TransportSettings,
    write: impl Future<Output = Result<(), E>>,
) -> Result<(), LinkError> {
    match timeout(settings.idle_timeout, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(LinkError::Write(error.into())),
        Err(_) => Err(LinkError::WriteStalled),
    }
}

struct PeerTask<T> {
    shared: Arc<Shared<T>>,
    dials: bool,
    peer: NodeAddr,
    dial_addr: watch::Receiver<Option<SocketAddr>>,
    cancel: CancellationToken,
}

impl<T: Serialize + DeserializeOwned + Send + 'static> PeerTask<T> {
    async fn run(self, mut queue: mpsc::Receiver<T>, mut conns: mpsc::Receiver<Link>) {
        let settings = &self.shared.settings;
        let fresh_backoff =
            || crate::backoff::jittered(settings.reconnect_min, settings.reconnect_max);
        let mut backoff = fresh_backoff();
        let mut linked_before = false;
        let mut next: Option<Link> = None;
        loop {
            let link = match next.take() {
                Some(link) => link,
                None => tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    Some(link) = conns.recv() => link,
                    dialed = self.dial(), if self.dials => match dialed {
                        Ok(link) => link,
                        Err(reason) => {
                            debug!(peer = %self.peer, %reason, "dial failed");
                            let pause = backoff.next().unwrap_or(settings.reconnect_max);
                            tokio::select! {
                                _ = self.cancel.cancelled() => return,
                                _ = sleep(pause) => continue,
                            }
                        }
                    },
                },
            };
            if linked_before {
                self.shared.metrics.reconnects.inc();
            }
            linked_before = true;
            info!(peer = %self.peer, "link up");
            self.shared.metrics.links.inc();
            let started = Instant::now();
            let end = self.run_link(link, &mut queue, &mut conns).await;
            self.shared.metrics.links.dec();
            match end {
                LinkEnd::Cancelled => return,
                LinkEnd::Replaced(link) => next = Some(link),
                LinkEnd::Failed(reason) => {
                    info!(peer = %self.peer, %reason, "link down");
                    if started.elapsed() >= STABLE_LINK {
                        backoff = fresh_backoff();
                    }
                    if self.dials {
                        let pause = backoff.next().unwrap_or(settings.reconnect_max);
                        tokio::select! {
                            _ = self.cancel.cancelled() => return,
                            _ = sleep(pause) => {}
                        }
                    }
                }
            }
        }
    }

    async fn dial(&self) -> Result<Link, String> {
        let Some(addr) = *self.dial_addr.borrow() else {
            // Not gossiped about yet: wait to be told where it is.
            return std::future::pending().await;
        };
        let settings = &self.shared.settings;
        timeout(settings.handshake_timeout, async {
            let stream = connect_from(self.shared.local_ip, addr)
                .await
                .map_err(|e| format!("connect {addr}: {e}"))?;
            let _ = stream.set_nodelay(true);
            let stream = dialled(self.shared.tls.as_deref(), stream, addr)
                .await
                .map_err(|failure| failure.reason)?;
            let mut link = framed(stream, settings.max_frame_bytes);
            let nonce: [u8; 32] = rand::rng().random();
            let hello = handshake::hello::<T>(&self.shared.security, &self.shared.me, nonce)
                .map_err(|r| r.to_string())?;
            send_frame(&mut link, hello).await?;
            let welcome = next_frame::<T>(&mut link).await?;
            match handshake::answer(
                &self.shared.security,
                &self.shared.me,
                nonce,
                Some(&self.peer),
                welcome,
            ) {
                Ok((proof, _)) => {
                    send_frame(&mut link, proof).await?;
                    Ok(link)
                }
                Err(refusal) => {
                    refuse(&mut link, &refusal).await;
                    self.shared
                        .metrics
                        .refused
                        .with_label_values(&[refusal::HANDSHAKE])
                        .inc();
                    Err(refusal.to_string())
                }
            }
        })
        .await
        .map_err(|_| "handshake timed out".to_owned())?
    }

    async fn run_link(
        &self,
        link: Link,
        queue: &mut mpsc::Receiver<T>,
        conns: &mut mpsc::Receiver<Link>,
    ) -> LinkEnd {
        let (sink, stream) = link.split();
        let (pong_tx, pong_rx) = mpsc::channel::<()>(1);
        let failed = tokio::select! {
            _ = self.cancel.cancelled() => return LinkEnd::Cancelled,
            Some(link) = conns.recv() => return LinkEnd::Replaced(link),
            error = self.read_frames(stream, pong_tx) => error,
            error = self.write_frames(sink, queue, pong_rx) => error,
        };
        if let Some(label) = failed.refusal() {
            self.refused(label);
        }
        LinkEnd::Failed(failed)
    }

    /// Reads frames until the link fails: messages go to this node, pings are answered.
    async fn read_frames(
        &self,
        mut stream: SplitStream<Link>,
        pong: mpsc::Sender<()>,
    ) -> LinkError {
        let (settings, counters) = (&self.shared.settings, &self.shared.counters);
        loop {
            let bytes = match timeout(settings.idle_timeout, stream.next()).await {
                Err(_) => return LinkError::Idle,
                Ok(None) => return LinkError::Closed,
                Ok(Some(Err(error))) => return LinkError::BadFrame(error.to_string()),
                Ok(Some(Ok(bytes))) => bytes,
            };
            counters.frames_in.inc();
            counters.bytes_in.inc_by(bytes.len() as u64);
            match decode::<T>(&bytes) {
                Ok(Frame::Message(message)) => {
                    let inbound = Inbound {
                        from: self.peer.clone(),
                        message,
                    };
                    if self.shared.inbound.send(inbound).await.is_err() {
                        return LinkError::Stopping;
                    }
                }
                Ok(Frame::Ping) => {
                    let _ = pong.try_send(());
                }
                Ok(Frame::Pong) => {}
                Ok(Frame::Refused { reason }) => return LinkError::RefusedByPeer(reason),
                Ok(_) => return LinkError::HandshakeOnOpenLink,
                Err(error) => return LinkError::BadFrame(error.to_string()),
            }
        }
    }

    /// Writes queued messages (a burst in one write), pongs, and a ping when nothing else went
    /// out for a heartbeat interval, until the link fails.
    async fn write_frames(
        &self,
        mut sink: SplitSink<Link, Bytes>,
        queue: &mut mpsc::Receiver<T>,
        mut pong: mpsc::Receiver<()>,
    ) -> LinkError {
        let (settings, counters) = (&self.shared.settings, &self.shared.counters);
        let mut last_sent = Instant::now();
        loop {
            let frame = tokio::select! {
                message = queue.recv() => match message {
                    Some(message) => Frame::Message(message),
                    None => return LinkError::QueueClosed,
                },
                Some(()) = pong.recv() => Frame::Pong,
                _ = sleep_until(last_sent + settings.heartbeat_interval) => Frame::Ping,
            };
            // Whatever else is queued goes out in the same write: one syscall for a burst.
            let (mut next, mut taken, mut count, mut len) = (Some(frame), 1, 0, 0);
            while let Some(frame) = next.take() {
                if taken < WRITE_BATCH {
                    next = queue.try_recv().ok().map(Frame::Message);
                    taken += 1;
                }
                let Some(bytes) = self.encode_for_link(&frame) else {
                    continue;
                };
                len += bytes.len() as u64;
                count += 1;
                if let Err(error) = within_idle_timeout(settings, sink.feed(bytes)).await {
                    return error;
                }
            }
            if let Err(error) = within_idle_timeout(settings, sink.flush()).await {
                return error;
            }
            counters.frames_out.inc_by(count);
            counters.bytes_out.inc_by(len);
            last_sent = Instant::now();
        }
    }

    /// The frame's bytes, or `None` (counted as dropped) when it is too large or cannot be
    /// encoded: one bad message must not end the link.
    fn encode_for_link(&self, frame: &Frame<T>) -> Option<Bytes> {
        match encode(frame) {
            Ok(bytes) if bytes.len() <= self.shared.settings.max_frame_bytes => Some(bytes),
            Ok(bytes) => {
                self.shared.metrics.dropped.inc();
                warn!(peer = %self.peer, bytes = bytes.len(), "message larger than max_frame_bytes dropped");
                None
            }
            Err(error) => {
                self.shared.metrics.dropped.inc();
                warn!(peer = %self.peer, %error, "message not encodable; dropped");
                None
            }
        }
    }

    fn refused(&self, reason: &str) {
        self.shared
            .metrics
            .refused
            .with_label_values(&[reason])
            .inc();
    }
}

pub(super) fn framed(stream: LinkStream, max_frame_bytes: usize) -> Link {
    LengthDelimitedCodec::builder()
        .max_frame_length(max_frame_bytes)
        .new_framed(stream)
}

pub(super) async fn send_frame<T: Serialize>(
    link: &mut Link,
    frame: Frame<T>,
) -> Result<(), String> {
    let bytes = encode(&frame).map_err(|e| e.to_string())?;
    drop(frame);
    link.send(bytes).await.map_err(|e| e.to_string())
}

pub(super) async fn next_frame<T: DeserializeOwned>(link: &mut Link) -> Result<Frame<T>, String> {
    match link.next().await {
        Some(Ok(bytes)) => decode(&bytes).map_err(|e| e.to_string()),
        Some(Err(error)) => Err(error.to_string()),
        None => Err("closed during the handshake".to_owned()),
    }
}

/// Connects to `addr` from `local` (port chosen by the kernel): a node speaks from the address
/// it listens on, so on a host with several addresses its peers, and any firewall between
/// them, see one address per node.
async fn connect_from(
    local: Option<std::net::IpAddr>,
    addr: SocketAddr,
) -> std::io::Result<TcpStream> {
    let Some(local) = local.filter(|ip| !ip.is_unspecified() && ip.is_ipv4() == addr.is_ipv4())
    else {
        return TcpStream::connect(addr).await;
    };
    let socket = if local.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(local, 0))?;
    socket.connect(addr).await
}

/// Tells the peer why, best effort, before the connection closes.
pub(super) async fn refuse(link: &mut Link, refusal: &Refusal) {
    let frame: Frame<()> = Frame::Refused {
        reason: refusal.to_string(),
    };
    if let Ok(bytes) = encode(&frame) {
        let _ = timeout(Duration::from_secs(1), link.send(bytes)).await;
    }
}

/// The acceptor's side of a handshake on a new connection.
/// Why an incoming handshake did not make a link.
struct Refused {
    reason: String,
    /// The dialer was a join probe ([`super::probe`]), which closes on purpose.
    probe: bool,
}

impl From<String> for Refused {
    fn from(reason: String) -> Self {
        Refused {
            reason,
            probe: false,
        }
    }
}

async fn accept<T: Serialize + DeserializeOwned>(
    shared: &Shared<T>,
    stream: TcpStream,
) -> Result<(NodeAddr, Link), Refused> {
    let _ = stream.set_nodelay(true);
    timeout(shared.settings.handshake_timeout, async {
        let stream = accepted(shared.tls.as_deref(), stream).await?;
        let mut link = framed(stream, shared.settings.max_frame_bytes);
        let hello = next_frame::<T>(&mut link).await?;
        let nonce: [u8; 32] = rand::rng().random();
        let (welcome, accepting) =
            match handshake::welcome(&shared.security, &shared.me, hello, nonce) {
                Ok(answer) => answer,
                Err(refusal) => {
                    refuse(&mut link, &refusal).await;
                    return Err(refusal.to_string().into());
                }
            };
        send_frame(&mut link, welcome).await?;
        let proof = next_frame::<T>(&mut link).await?;
        match handshake::verify(&shared.security, &shared.me, accepting, proof) {
            Ok(peer) => Ok((peer, link)),
            Err(refusal) if refusal.is_probe() => Err(Refused {
                reason: refusal.to_string(),
                probe: true,
            }),
            Err(refusal) => {
                refuse(&mut link, &refusal).await;
                Err(refusal.to_string().into())
            }
        }
    })
    .await
    .map_err(|_| Refused::from("handshake timed out".to_owned()))?
}
