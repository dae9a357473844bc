//! Writes acks and nacks to the broker from one task, in the order the bridge decided them.
//! Handing a frame to lapin's I/O thread costs a thread round trip; awaiting that inside the
//! bridge loop would stall every delivery behind every ack, and awaiting each in turn here
//! capped single acks at one per round trip, so single acks and nacks overlap (their tags are
//! distinct, so their order does not matter).
//!
//! A `multiple` ack is different: it must reach the broker after every single ack or nack
//! decided before it on its channel, since it may cover their tags, and the broker closes the
//! channel on an ack of a tag that is no longer unacked ("unknown delivery tag"), requeueing
//! everything. lapin runs every ack as a task of its own, so handing frames over in order does
//! not keep them in order: a `multiple` ack first waits until everything before it on its
//! channel is written. Only on its channel: a send on a channel that died may never complete,
//! and waiting for it stopped every ack on the next channel, whose window then stayed full.
//! Every send is bounded by [`SEND_TIMEOUT`] all the same. Consecutive `multiple` acks on one
//! channel collapse into the last one (never across a single ack, whose tag may be higher).
//!
//! The queue cannot grow without bound: each command settles at least one delivery, and the
//! broker never has more than `prefetch` deliveries unacked.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use lapin::Acker;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::metrics::BridgeMetrics;

/// Longest wait for lapin to write one ack or nack; past it the channel is taken for dead (its
/// deliveries come back from the broker) and the send counts as not made.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Settles one delivery at the broker: lapin's [`Acker`], or a recording fake in tests.
trait Settle: Clone + Send + Sync + 'static {
    /// Acks the delivery (and, with `multiple`, every unacked one before it); false when the
    /// channel is gone.
    fn ack(&self, multiple: bool) -> impl Future<Output = bool> + Send;
    /// Returns the delivery to the queue.
    fn nack(&self) -> impl Future<Output = ()> + Send;
}

impl Settle for Acker {
    async fn ack(&self, multiple: bool) -> bool {
        matches!(
            Acker::ack(self, BasicAckOptions { multiple }).await,
            Ok(true)
        )
    }

    async fn nack(&self) {
        let nack = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        // Requeued either way: by this nack, or by the broker when the channel died.
        let _ = Acker::nack(self, nack).await;
    }
}

/// One decision for the broker.
enum Command<A = Acker> {
    /// Ack with `multiple` up to this acker's tag.
    Ack {
        generation: u64,
        acker: A,
        acked: u64,
        dead_lettered: u64,
    },
    /// Ack this acker's delivery only.
    AckOne {
        generation: u64,
        acker: A,
        dead_lettered: bool,
    },
    /// Return one delivery to the queue.
    Nack { generation: u64, acker: A },
}

impl<A> Command<A> {
    /// The channel it is about.
    fn generation(&self) -> u64 {
        match self {
            Command::Ack { generation, .. }
            | Command::AckOne { generation, .. }
            | Command::Nack { generation, .. } => *generation,
        }
    }

    /// Whether it must wait until every earlier command on its channel is written: a
    /// `multiple` ack may cover their tags.
    fn waits_for_earlier(&self) -> bool {
        matches!(self, Command::Ack { .. })
    }
}

/// Handle to the ack-writing task.
pub struct AckWriter {
    commands: mpsc::UnboundedSender<Command>,
    task: JoinHandle<()>,
}

impl AckWriter {
    /// Starts the task; it counts each settled delivery in `warren_deliveries_total` once the
    /// broker has been told (an ack that could not be sent counts as requeued).
    pub fn spawn(metrics: BridgeMetrics) -> Self {
        let (commands, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(write(rx, metrics));
        AckWriter { commands, task }
    }

    /// Acks, with `multiple`, everything on `generation`'s channel up to `acker`'s delivery.
    pub fn ack(&self, generation: u64, acker: Acker, acked: u64, dead_lettered: u64) {
        let _ = self.commands.send(Command::Ack {
            generation,
            acker,
            acked,
            dead_lettered,
        });
    }

    /// Acks `acker`'s delivery alone, without `multiple` (it sits behind an unsettled one).
    pub fn ack_one(&self, generation: u64, acker: Acker, dead_lettered: bool) {
        let _ = self.commands.send(Command::AckOne {
            generation,
            acker,
            dead_lettered,
        });
    }

    /// Nacks one delivery of `generation`'s channel with requeue.
    pub fn nack(&self, generation: u64, acker: Acker) {
        let _ = self.commands.send(Command::Nack { generation, acker });
    }

    /// Sends everything still queued, then stops.
    pub async fn close(self) {
        drop(self.commands);
        let _ = self.task.await;
    }
}

async fn write<A: Settle>(mut rx: mpsc::UnboundedReceiver<Command<A>>, metrics: BridgeMetrics) {
    let mut batch = Vec::new();
    let mut sending = FuturesUnordered::new();
    // Sends not yet written, per channel.
    let mut unwritten: HashMap<u64, usize> = HashMap::new();
    loop {
        tokio::select! {
            received = rx.recv_many(&mut batch, 1024) => {
                if received == 0 {
                    break;
                }
                for command in coalesce(batch.drain(..)) {
                    let generation = command.generation();
                    if command.waits_for_earlier() {
                        while unwritten.get(&generation).is_some_and(|n| *n > 0) {
                            match sending.next().await {
                                Some(written) => forget(&mut unwritten, written),
                                None => break,
                            }
                        }
                    }
                    let mut send = Box::pin(send(command, &metrics));
                    if send.as_mut().now_or_never().is_none() {
                        *unwritten.entry(generation).or_default() += 1;
                        sending.push(send);
                    }
                }
            }
            Some(written) = sending.next(), if !sending.is_empty() => forget(&mut unwritten, written),
        }
    }
    while sending.next().await.is_some() {}
}

/// One send of `generation`'s channel is written (or given up on).
fn forget(unwritten: &mut HashMap<u64, usize>, generation: u64) {
    if let Some(count) = unwritten.get_mut(&generation) {
        *count -= 1;
        if *count == 0 {
            unwritten.remove(&generation);
        }
    }
}

/// `settle`, or false once [`SEND_TIMEOUT`] has passed.
async fn within_timeout(generation: u64, settle: impl Future<Output = bool>) -> bool {
    match tokio::time::timeout(SEND_TIMEOUT, settle).await {
        Ok(sent) => sent,
        Err(_) => {
            warn!(generation, timeout = ?SEND_TIMEOUT, "an ack or nack was not written in time; taking its channel for dead");
            false
        }
    }
}

/// Merges each run of `multiple` acks on one channel into its last one.
fn coalesce<A: Clone>(commands: impl Iterator<Item = Command<A>>) -> Vec<Command<A>> {
    let mut merged: Vec<Command<A>> = Vec::new();
    for command in commands {
        if let (
            Some(Command::Ack {
                generation,
                acker,
                acked,
                dead_lettered,
            }),
            Command::Ack {
                generation: next_generation,
                acker: next_acker,
                acked: next_acked,
                dead_lettered: next_dead_lettered,
            },
        ) = (merged.last_mut(), &command)
            && *generation == *next_generation
        {
            // A later multiple ack on the same channel covers this one.
            *acker = next_acker.clone();
            *acked += next_acked;
            *dead_lettered += next_dead_lettered;
            continue;
        }
        merged.push(command);
    }
    merged
}

/// Hands one decision to lapin and counts it once written (an ack that could not be sent
/// counts as requeued: the broker requeues it with the channel); returns its channel.
async fn send<A: Settle>(command: Command<A>, metrics: &BridgeMetrics) -> u64 {
    let generation = command.generation();
    match command {
        Command::Ack {
            generation,
            acker,
            acked,
            dead_lettered,
        } => {
            if within_timeout(generation, acker.ack(true)).await {
                metrics.acks_sent.inc();
                metrics.deliveries.acked.inc_by(acked);
                metrics.deliveries.dead_lettered.inc_by(dead_lettered);
            } else {
                debug!(generation, "ack not sent: the channel is gone");
                metrics.deliveries.requeued.inc_by(acked + dead_lettered);
            }
        }
        Command::AckOne {
            generation,
            acker,
            dead_lettered,
        } => {
            let sent = within_timeout(generation, acker.ack(false)).await;
            let outcome = match (sent, dead_lettered) {
                (false, _) => &metrics.deliveries.requeued,
                (true, false) => &metrics.deliveries.acked,
                (true, true) => &metrics.deliveries.dead_lettered,
            };
            outcome.inc();
            if sent {
                metrics.acks_sent.inc();
            } else {
                debug!(generation, "ack not sent: the channel is gone");
            }
        }
        Command::Nack { acker, .. } => {
            within_timeout(generation, async {
                acker.nack().await;
                true
            })
            .await;
            metrics.deliveries.requeued.inc();
        }
    }
    generation
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;
    use crate::metrics::Metrics;

    /// A delivery whose settlement reaches the "broker" (the log) after its own delay, the way
    /// lapin's separately scheduled acks can overtake each other.
    #[derive(Clone)]
    struct Slow {
        tag: u64,
        delay: Duration,
        broker: Arc<Mutex<Vec<(u64, &'static str)>>>,
    }

    impl Settle for Slow {
        async fn ack(&self, multiple: bool) -> bool {
            tokio::time::sleep(self.delay).await;
            let kind = if multiple { "multiple" } else { "one" };
            self.broker.lock().unwrap().push((self.tag, kind));
            true
        }

        async fn nack(&self) {
            tokio::time::sleep(self.delay).await;
            self.broker.lock().unwrap().push((self.tag, "nack"));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_multiple_ack_reaches_the_broker_after_the_single_acks_and_nacks_before_it() {
        let broker = Arc::new(Mutex::new(Vec::new()));
        let slow = |tag, millis| Slow {
            tag,
            delay: Duration::from_millis(millis),
            broker: Arc::clone(&broker),
        };
        let metrics = Metrics::new().unwrap().bridge;
        let (commands, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write(rx, metrics));
        // Tags 3 and 4 settle ahead of the unsettled head (acked alone, nacked); then the
        // whole run up to 6 is settled and acked with `multiple`, which is quick to write.
        let decided = [
            Command::AckOne {
                generation: 1,
                acker: slow(3, 50),
                dead_lettered: false,
            },
            Command::Nack {
                generation: 1,
                acker: slow(4, 30),
            },
            Command::Ack {
                generation: 1,
                acker: slow(6, 1),
                acked: 4,
                dead_lettered: 0,
            },
            Command::AckOne {
                generation: 1,
                acker: slow(8, 1),
                dead_lettered: false,
            },
        ];
        for command in decided {
            commands.send(command).unwrap();
        }
        drop(commands);
        writer.await.unwrap();
        let arrived = broker.lock().unwrap().clone();
        let multiple_at = arrived.iter().position(|(_, kind)| *kind == "multiple");
        let covered_before: Vec<u64> = arrived[..multiple_at.unwrap()]
            .iter()
            .map(|(tag, _)| *tag)
            .collect();
        assert!(
            covered_before.contains(&3) && covered_before.contains(&4),
            "the multiple ack overtook a single ack or nack it covers: {arrived:?}"
        );
        assert_eq!(arrived.len(), 4, "{arrived:?}");
    }

    /// A send that is never written (its channel died under it) holds back neither the next
    /// channel's `multiple` acks nor, past the send timeout, its own channel's.
    #[tokio::test(start_paused = true)]
    async fn a_send_never_written_holds_back_no_other_channel_and_its_own_only_until_the_timeout() {
        let broker = Arc::new(Mutex::new(Vec::new()));
        let slow = |tag, delay| Slow {
            tag,
            delay,
            broker: Arc::clone(&broker),
        };
        let never = Duration::from_secs(3600);
        let quick = Duration::from_millis(1);
        let start = tokio::time::Instant::now();
        let (commands, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write(rx, Metrics::new().unwrap().bridge));
        let multiple = |generation, acker| Command::Ack {
            generation,
            acker,
            acked: 1,
            dead_lettered: 0,
        };
        let stuck = |tag| Command::AckOne {
            generation: 1,
            acker: slow(tag, never),
            dead_lettered: false,
        };
        commands.send(stuck(3)).unwrap();
        commands.send(multiple(2, slow(7, quick))).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            *broker.lock().unwrap(),
            vec![(7, "multiple")],
            "the next channel waited"
        );

        commands.send(stuck(4)).unwrap();
        commands.send(multiple(1, slow(6, quick))).unwrap();
        drop(commands);
        writer.await.unwrap();
        assert_eq!(
            *broker.lock().unwrap(),
            vec![(7, "multiple"), (6, "multiple")]
        );
        let took = start.elapsed();
        assert!(
            took >= SEND_TIMEOUT && took < SEND_TIMEOUT + Duration::from_secs(2),
            "the writer took {took:?}"
        );
    }
}
