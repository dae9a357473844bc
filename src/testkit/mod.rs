//! Test support: a discrete-event simulation of a producer and a consumer controller over a
//! seeded faulty link (and, optionally, a flaky durable queue), and small helpers. Compiled for
//! tests and behind the `testkit` feature; nothing here runs in production.

pub mod clock;
pub mod network;
pub mod simulation;
pub mod store_contract;

use crate::delivery::{ConsumerFrame, SeqNr};

pub use clock::Clock;
pub use simulation::{Leftover, Outcome, RandomRun, simulate};

/// A loopback port free for both TCP and UDP right now (a cluster node listens on both),
/// picked below the kernel's ephemeral range: a port from that range (what binding port 0
/// gives) can be taken by any outgoing connection, such as one node dialing or probing
/// another, before the node meant to listen on it binds it.
pub fn free_port() -> u16 {
    use rand::Rng;
    let below = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let mut rng = rand::rng();
    loop {
        let port = rng.random_range(10_000..below.max(10_001));
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let tcp = std::net::TcpListener::bind(addr);
        if tcp.is_ok() && std::net::UdpSocket::bind(addr).is_ok() {
            return port;
        }
    }
}

/// `Request(confirmed, up_to)` with resending supported and not via timeout: the frame most
/// protocol tests exchange.
pub fn request(confirmed: u64, up_to: u64) -> ConsumerFrame {
    ConsumerFrame::Request {
        confirmed: SeqNr(confirmed),
        request_up_to: SeqNr(up_to),
        support_resend: true,
        via_timeout: false,
    }
}

#[cfg(test)]
mod random_suite;
