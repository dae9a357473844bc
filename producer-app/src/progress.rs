//! What the producer shows while it runs: a live line on a terminal, a log line every five
//! seconds otherwise, and the same totals as Prometheus counters when `/metrics` is served.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use prometheus::{IntCounter, Registry};
use tokio::time::Instant;
use tracing::info;
use warren::amqp::PublisherStats;
use warren::metrics::counter;

/// The producer's counters, fed from the publisher's totals.
pub struct ProducerMetrics {
    published: IntCounter,
    confirmed: IntCounter,
    returned: IntCounter,
    nacked: IntCounter,
    republished: IntCounter,
    reconnects: IntCounter,
}

impl ProducerMetrics {
    /// Registers the producer series.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        Ok(ProducerMetrics {
            published: counter(
                registry,
                "warren_producer_published_total",
                "Orders handed to the publisher.",
            )?,
            confirmed: counter(
                registry,
                "warren_producer_confirmed_total",
                "Orders confirmed by the broker and routed to the queue.",
            )?,
            returned: counter(
                registry,
                "warren_producer_returned_total",
                "Orders returned as unroutable.",
            )?,
            nacked: counter(
                registry,
                "warren_producer_nacked_total",
                "Publisher nacks (each is republished).",
            )?,
            republished: counter(
                registry,
                "warren_producer_republished_total",
                "Publications beyond the first.",
            )?,
            reconnects: counter(
                registry,
                "warren_producer_reconnects_total",
                "Broker connections opened after the first.",
            )?,
        })
    }

    fn update(&self, stats: &PublisherStats) {
        for (counter, total) in [
            (&self.published, stats.accepted),
            (&self.confirmed, stats.confirmed),
            (&self.returned, stats.returned),
            (&self.nacked, stats.nacked),
            (&self.republished, stats.republished),
            (&self.reconnects, stats.reconnects),
        ] {
            counter.inc_by(total.saturating_sub(counter.get()));
        }
    }
}

/// Progress reporting.
pub struct Progress {
    started: Instant,
    terminal: bool,
    every: Duration,
    last: Instant,
    metrics: Option<ProducerMetrics>,
}

impl Progress {
    /// Starts the clock.
    pub fn new(metrics: Option<ProducerMetrics>) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let now = Instant::now();
        Progress {
            started: now,
            terminal,
            every: if terminal {
                Duration::from_millis(250)
            } else {
                Duration::from_secs(5)
            },
            last: now,
            metrics,
        }
    }

    /// Reports if it is time to.
    pub fn tick(&mut self, stats: &PublisherStats) {
        if let Some(metrics) = &self.metrics {
            metrics.update(stats);
        }
        let now = Instant::now();
        if now - self.last < self.every {
            return;
        }
        self.last = now;
        let line = self.line(stats);
        if self.terminal {
            eprint!("\r{line}   ");
            let _ = std::io::stderr().flush();
        } else {
            info!("{line}");
        }
    }

    /// The final summary, on stdout.
    pub fn finish(&mut self, stats: &PublisherStats) {
        if let Some(metrics) = &self.metrics {
            metrics.update(stats);
        }
        if self.terminal {
            eprintln!();
        }
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = stats.confirmed as f64 / elapsed.max(f64::EPSILON);
        println!(
            "warren-producer: published {} orders: {} confirmed, {} returned, {} nacked, {} republished, {} reconnects, {} unconfirmed, in {elapsed:.2} s ({rate:.0} msg/s)",
            stats.accepted,
            stats.confirmed,
            stats.returned,
            stats.nacked,
            stats.republished,
            stats.reconnects,
            stats.outstanding
        );
    }

    fn line(&self, stats: &PublisherStats) -> String {
        let elapsed = self.started.elapsed().as_secs_f64();
        format!(
            "published {} | confirmed {} | outstanding {} | returned {} | republished {} | {:.0} msg/s",
            stats.accepted,
            stats.confirmed,
            stats.outstanding,
            stats.returned,
            stats.republished,
            stats.confirmed as f64 / elapsed.max(f64::EPSILON)
        )
    }
}
