//! One direction of the link between a ProducerController and a ConsumerController. Sending
//! never waits: a link may drop, duplicate, delay or reorder frames, and the protocol recovers.
//! [`ChannelLink`] connects two controllers in one process; [`FaultyLink`] wraps any link with
//! seeded faults for tests.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;

/// Carries frames of type `F` towards one controller.
pub trait Link<F>: Send + Sync + 'static {
    /// Hands a frame to the link; never waits, may lose it.
    fn send(&self, frame: F);
}

/// An in-process link: a bounded channel that drops frames when full.
pub struct ChannelLink<F> {
    tx: mpsc::Sender<F>,
}

impl<F> Clone for ChannelLink<F> {
    fn clone(&self) -> Self {
        ChannelLink {
            tx: self.tx.clone(),
        }
    }
}

/// A link and the receiving end its controller reads.
pub fn channel_link<F: Send + 'static>(capacity: usize) -> (ChannelLink<F>, mpsc::Receiver<F>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (ChannelLink { tx }, rx)
}

impl<F: Send + 'static> Link<F> for ChannelLink<F> {
    fn send(&self, frame: F) {
        // A full channel means a slow controller: drop, the protocol resends.
        let _ = self.tx.try_send(frame);
    }
}

/// How often a [`FaultyLink`] misbehaves, per frame.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Faults {
    /// Probability that a frame is lost.
    pub drop: f64,
    /// Probability that a frame arrives twice.
    pub duplicate: f64,
    /// Probability that a frame is held back (and so overtaken by later ones).
    pub delay: f64,
    /// Longest hold-back.
    pub max_delay: Duration,
}

/// Wraps a link with seeded drops, duplicates and delays (delays reorder frames).
pub struct FaultyLink<L> {
    inner: Arc<L>,
    faults: Faults,
    rng: Mutex<SmallRng>,
}

impl<L> FaultyLink<L> {
    /// Faults drawn from `seed`, so a failing run can be replayed.
    pub fn new(inner: L, faults: Faults, seed: u64) -> Self {
        FaultyLink {
            inner: Arc::new(inner),
            faults,
            rng: Mutex::new(SmallRng::seed_from_u64(seed)),
        }
    }
}

impl<F: Clone + Send + 'static, L: Link<F>> Link<F> for FaultyLink<L> {
    fn send(&self, frame: F) {
        let (lost, twice, delay) = {
            let mut rng = self.rng.lock().unwrap_or_else(PoisonError::into_inner);
            let lost = rng.random_bool(self.faults.drop);
            let twice = rng.random_bool(self.faults.duplicate);
            let delay = rng
                .random_bool(self.faults.delay)
                .then(|| self.faults.max_delay.mul_f64(rng.random::<f64>()));
            (lost, twice, delay)
        };
        if lost {
            return;
        }
        let copies = if twice { 2 } else { 1 };
        for _ in 0..copies {
            match delay {
                Some(pause) => {
                    let inner = Arc::clone(&self.inner);
                    let frame = frame.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(pause).await;
                        inner.send(frame);
                    });
                }
                None => self.inner.send(frame.clone()),
            }
        }
    }
}
