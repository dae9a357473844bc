//! Test support: a discrete-event simulation of a producer and a consumer controller over a
//! seeded faulty link (and, optionally, a flaky durable queue), and small helpers. Compiled for
//! tests and behind the `testkit` feature; nothing here runs in production.

pub mod network;
pub mod simulation;

use crate::delivery::{ConsumerFrame, SeqNr};

pub use simulation::{Outcome, RandomRun, simulate};

/// A loopback port free for both TCP and UDP right now (a cluster node listens on both).
/// Another process may take it before it is used; tests that cannot afford that bind port 0.
pub fn free_port() -> u16 {
    loop {
        let Ok(tcp) = std::net::TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(addr) = tcp.local_addr() else {
            continue;
        };
        if std::net::UdpSocket::bind(addr).is_ok() {
            return addr.port();
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
