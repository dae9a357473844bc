//! `warren-producer`: publishes CreateOrder messages into the order queue, persistent and
//! confirmed, at a steady rate or as fast as confirms allow. Wiring only: the publisher is
//! `warren::amqp::ConfirmedPublisher`.

mod orders;
mod progress;
mod settings;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};
use warren::amqp::{ConfirmedPublisher, OutgoingMessage, PublisherSettings};
use warren::metrics;
use warren::shutdown::watch_signals;
use warren::telemetry::{JOURNEY, traceparent};

use crate::orders::{OrderGenerator, Pacer};
use crate::progress::{ProducerMetrics, Progress};
use crate::settings::{Cli, ProducerConfig};

/// How long the final flush may wait for outstanding confirms.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.load() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("warren-producer: {error}");
            return ExitCode::from(2);
        }
    };
    let connection_name = config.amqp.connection_name_or("warren-producer");
    let _telemetry = warren::telemetry::init_with_traces(
        config.log.json,
        &config.tracing,
        "warren-producer",
        &connection_name,
    );
    for name in warren::config::skipped_env_vars(settings::CONSUMER_SECTIONS) {
        debug!(%name, "ignored: a warren-consumer setting");
    }
    match run(config).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Publishes, then reports; `Ok(false)` when something was returned or left unconfirmed.
async fn run(config: ProducerConfig) -> anyhow::Result<bool> {
    let http_stop = CancellationToken::new();
    let producer_metrics = match config.http.addr {
        Some(addr) => {
            let registry = prometheus::Registry::new();
            let producer_metrics =
                ProducerMetrics::register(&registry).context("registering metrics")?;
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on http.addr {addr}"))?;
            // On stdout, before the summary: scripts read the address from it.
            println!(
                "warren-producer serving metrics on http://{}",
                listener.local_addr()?
            );
            tokio::spawn(metrics::serve(
                listener,
                metrics::router(registry),
                http_stop.clone(),
            ));
            Some(producer_metrics)
        }
        None => None,
    };

    let shutdown = CancellationToken::new();
    let force = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone(), force.clone()));

    let mut publisher = ConfirmedPublisher::new(PublisherSettings {
        amqp: config.amqp.clone(),
        max_outstanding: config.publish.max_outstanding,
        connection_name: config.amqp.connection_name_or("warren-producer"),
    });
    tokio::select! {
        _ = shutdown.cancelled() => return Ok(false),
        connected = publisher.connect() => connected.context("declaring the queues")?,
    }
    let mut generator = OrderGenerator::new(config.publish.products.ids());
    let pacer = Pacer::new(config.publish.rate);
    let mut progress = Progress::new(producer_metrics);
    info!(
        queue = %config.amqp.queue,
        count = config.publish.count,
        rate = config.publish.rate,
        "publishing orders"
    );

    let mut sent = 0u64;
    while config.publish.count == 0 || sent < config.publish.count {
        if let Some(due) = pacer.due(sent) {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(due) => {}
            }
        }
        let order = generator.next_order();
        // Each order starts a trace (when traces are exported) that the consumers continue.
        let span = tracing::info_span!(
            target: JOURNEY,
            "warren.publish",
            otel.kind = "producer",
            entity = order.product_id.as_str(),
        );
        let message = OutgoingMessage {
            body: serde_json::to_vec(&order).context("encoding an order")?,
            message_id: Some(order.order_id.to_string()),
            partition_key: order.product_id.clone(),
            traceparent: traceparent(&span),
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = publisher.publish(message).instrument(span) => {}
        }
        sent += 1;
        progress.tick(&publisher.stats());
    }

    tokio::select! {
        _ = publisher.flush() => {}
        _ = force.cancelled() => warn!("interrupted again: not waiting for confirms"),
        _ = tokio::time::sleep(FLUSH_TIMEOUT) => warn!(timeout = ?FLUSH_TIMEOUT, "gave up waiting for confirms"),
    }
    let stats = publisher.stats();
    progress.finish(&stats);
    publisher.close().await;
    http_stop.cancel();
    Ok(stats.returned == 0 && stats.confirmed == stats.accepted)
}
