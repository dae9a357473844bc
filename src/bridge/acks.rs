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
//! channel is written. Only on its channel, and only while that channel lives: lapin never
//! completes a send whose channel died under it, and waiting for one stopped every ack on the
//! next channel, whose window then stayed full. A send or wait on a dead channel is given up
//! (the broker requeued its deliveries); one on a live channel is never cut short, since a
//! frame written late could land after a `multiple` ack that covers it. Consecutive `multiple`
//! acks on one channel collapse into the last one (never across a single ack, whose tag may be
//! higher).
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
use tracing::debug;

use crate::metrics::BridgeMetrics;

/// How often a send or a `multiple` ack's wait that is taking long checks whether its channel
/// died.
const CHANNEL_CHECK: Duration = Duration::from_millis(50);

/// Settles one delivery at the broker: lapin's [`Acker`], or a recording fake in tests.
trait Settle: Clone + Send + Sync + 'static {
    /// Acks the delivery (and, with `multiple`, every unacked one before it); false when the
    /// channel is gone.
    fn ack(&self, multiple: bool) -> impl Future<Output = bool> + Send;
    /// Returns the delivery to the queue.
    fn nack(&self) -> impl Future<Output = ()> + Send;
    /// True once its channel is closed: nothing sent for it will be written any more.
    fn gone(&self) -> bool;
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

    fn gone(&self) -> bool {
        self.poisoned()
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
    /// The delivery it settles.
    fn acker(&self) -> &A {
        match self {
            Command::Ack { acker, .. }
            | Command::AckOne { acker, .. }
            | Command::Nack { acker, .. } => acker,
        }
    }

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
                        // Ends when the channel's earlier sends are written, or it died.
                        while unwritten.get(&generation).is_some_and(|n| *n > 0)
                            && !command.acker().gone()
                        {
                            match tokio::time::timeout(CHANNEL_CHECK, sending.next()).await {
                                Ok(Some(written)) => forget(&mut unwritten, written),
                                Ok(None) => break,
                                Err(_) => {}
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

/// Waits for `settle` while `acker`'s channel lives; false once it is found dead first.
async fn unless_gone<A: Settle>(acker: &A, settle: impl Future<Output = bool>) -> bool {
    let mut settle = std::pin::pin!(settle);
    loop {
        match tokio::time::timeout(CHANNEL_CHECK, settle.as_mut()).await {
            Ok(sent) => return sent,
            Err(_) if acker.gone() => return false,
            Err(_) => {}
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
            if unless_gone(&acker, acker.ack(true)).await {
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
            let sent = unless_gone(&acker, acker.ack(false)).await;
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
            unless_gone(&acker, async {
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
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;
    use crate::metrics::Metrics;

    type Log = Arc<Mutex<Vec<(u64, &'static str)>>>;

    /// A delivery whose settlement reaches the "broker" (the log) after its own delay, the way
    /// lapin's separately scheduled acks can overtake each other. Once its channel is `gone`,
    /// nothing it sends arrives, and a send under way never completes (as lapin's do not).
    #[derive(Clone)]
    struct Slow {
        tag: u64,
        delay: Duration,
        broker: Log,
        gone: Arc<AtomicBool>,
    }

    impl Slow {
        async fn arrive(&self, kind: &'static str) -> bool {
            if self.gone() {
                return false;
            }
            tokio::time::sleep(self.delay).await;
            if self.gone() {
                std::future::pending::<()>().await;
            }
            self.broker.lock().unwrap().push((self.tag, kind));
            true
        }
    }

    impl Settle for Slow {
        async fn ack(&self, multiple: bool) -> bool {
            self.arrive(if multiple { "multiple" } else { "one" }).await
        }

        async fn nack(&self) {
            self.arrive("nack").await;
        }

        fn gone(&self) -> bool {
            self.gone.load(Ordering::SeqCst)
        }
    }

    /// Makes deliveries of one channel that reach `broker`.
    fn channel(broker: &Log) -> impl Fn(u64, Duration) -> Slow + use<> {
        let (broker, gone) = (Arc::clone(broker), Arc::new(AtomicBool::new(false)));
        move |tag, delay| Slow {
            tag,
            delay,
            broker: Arc::clone(&broker),
            gone: Arc::clone(&gone),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_multiple_ack_reaches_the_broker_after_the_single_acks_and_nacks_before_it() {
        let broker = Log::default();
        let delivery = channel(&broker);
        let slow = |tag, millis| delivery(tag, Duration::from_millis(millis));
        let metrics = Metrics::new().unwrap().bridge.partition(0);
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

    /// A send that is not written holds back the next channel's `multiple` ack not at all, and
    /// its own channel's for as long as that channel lives, however long (a late frame could
    /// land after it); once its channel is found dead, it and what waited behind it are given
    /// up, counted as requeued.
    #[tokio::test(start_paused = true)]
    async fn an_unwritten_send_holds_back_only_its_own_channel_and_only_while_it_lives() {
        let broker = Log::default();
        let (old, new) = (channel(&broker), channel(&broker));
        let (never, quick) = (Duration::from_secs(3600), Duration::from_millis(1));
        let start = tokio::time::Instant::now();
        let metrics = Metrics::new().unwrap().bridge.partition(0);
        let (commands, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write(rx, metrics.clone()));
        let multiple = |generation, acker| Command::Ack {
            generation,
            acker,
            acked: 1,
            dead_lettered: 0,
        };
        let stuck = old(3, never);
        let gone = Arc::clone(&stuck.gone);
        commands
            .send(Command::AckOne {
                generation: 1,
                acker: stuck,
                dead_lettered: false,
            })
            .unwrap();
        commands.send(multiple(2, new(7, quick))).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            *broker.lock().unwrap(),
            vec![(7, "multiple")],
            "the next channel waited"
        );

        commands.send(multiple(1, old(6, quick))).unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            *broker.lock().unwrap(),
            vec![(7, "multiple")],
            "a multiple ack went out before an earlier send on its live channel"
        );

        gone.store(true, Ordering::SeqCst);
        commands.send(multiple(2, new(9, quick))).unwrap();
        drop(commands);
        writer.await.unwrap();
        assert_eq!(
            *broker.lock().unwrap(),
            vec![(7, "multiple"), (9, "multiple")]
        );
        assert_eq!(metrics.deliveries.requeued.get(), 2);
        let took = start.elapsed();
        assert!(took < Duration::from_secs(62), "{took:?}");
    }
}
