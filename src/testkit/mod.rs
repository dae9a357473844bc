//! Test support: a discrete-event simulation of a producer and a consumer controller over a
//! seeded faulty link (and, optionally, a flaky durable queue), and small helpers. Compiled for
//! tests and behind the `testkit` feature; nothing here runs in production.

pub mod simulation;

use crate::delivery::{ConsumerFrame, SeqNr};

pub use simulation::{Outcome, RandomRun, simulate};

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
