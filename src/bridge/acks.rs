//! Writes acks and nacks to the broker from one task, in the order the bridge decided them.
//! Handing a frame to lapin's I/O thread costs a thread round trip; awaiting that inside the
//! bridge loop would stall every delivery behind every ack, and awaiting each in turn here
//! capped single acks at one per round trip: frames are handed over in order, and their
//! round trips overlap. Order matters: a `multiple` ack
//! must never overtake the nack of a tag it covers, and consecutive `multiple` acks on one
//! channel collapse into the last one (never across a single ack, whose tag may be higher).
//!
//! The queue cannot grow without bound: each command settles at least one delivery, and the
//! broker never has more than `prefetch` deliveries unacked.

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use lapin::Acker;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::metrics::BridgeMetrics;

/// One decision for the broker.
enum Command {
    /// Ack with `multiple` up to this acker's tag.
    Ack {
        generation: u64,
        acker: Acker,
        acked: u64,
        dead_lettered: u64,
    },
    /// Ack this acker's delivery only.
    AckOne {
        generation: u64,
        acker: Acker,
        dead_lettered: bool,
    },
    /// Return one delivery to the queue.
    Nack { acker: Acker },
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

    /// Nacks one delivery with requeue.
    pub fn nack(&self, acker: Acker) {
        let _ = self.commands.send(Command::Nack { acker });
    }

    /// Sends everything still queued, then stops.
    pub async fn close(self) {
        drop(self.commands);
        let _ = self.task.await;
    }
}

async fn write(mut rx: mpsc::UnboundedReceiver<Command>, metrics: BridgeMetrics) {
    let mut batch = Vec::new();
    let mut sending = FuturesUnordered::new();
    loop {
        tokio::select! {
            received = rx.recv_many(&mut batch, 1024) => {
                if received == 0 {
                    break;
                }
                for command in coalesce(batch.drain(..)) {
                    // The first poll hands the frame to lapin, in decision order; only the
                    // wait for lapin's I/O thread to write it runs alongside the others.
                    let mut send = Box::pin(send(command, metrics.clone()));
                    if send.as_mut().now_or_never().is_none() {
                        sending.push(send);
                    }
                }
            }
            Some(()) = sending.next(), if !sending.is_empty() => {}
        }
    }
    while sending.next().await.is_some() {}
}

/// Merges each run of `multiple` acks on one channel into its last one.
fn coalesce(commands: impl Iterator<Item = Command>) -> Vec<Command> {
    let mut merged: Vec<Command> = Vec::new();
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
/// counts as requeued: the broker requeues it with the channel).
async fn send(command: Command, metrics: BridgeMetrics) {
    match command {
        Command::Ack {
            generation,
            acker,
            acked,
            dead_lettered,
        } => {
            let sent = matches!(
                acker.ack(BasicAckOptions { multiple: true }).await,
                Ok(true)
            );
            if sent {
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
            let sent = matches!(
                acker.ack(BasicAckOptions { multiple: false }).await,
                Ok(true)
            );
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
        Command::Nack { acker } => {
            let nack = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            // Requeued either way: by this nack, or by the broker when the channel died.
            let _ = acker.nack(nack).await;
            metrics.deliveries.requeued.inc();
        }
    }
}
