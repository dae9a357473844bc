//! `warren-consumer`: consumes the order queue and applies each order to its ProductActor
//! through reliable delivery, acking RabbitMQ only after the product confirmed. Wiring only:
//! the work happens in the `warren` library and in [`product`].

mod http;
mod product;
mod settings;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use warren::amqp::{AmqpSource, SourceSettings};
use warren::bridge::Bridge;
use warren::entity::{LocalEntityHost, RunnerSettings};
use warren::metrics::{self, Metrics};
use warren::shutdown::watch_signals;

use crate::product::{ProductFactory, ProductMetrics};
use crate::settings::{Cli, ConsumerConfig};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.load() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("warren-consumer: {error}");
            return ExitCode::from(2);
        }
    };
    warren::telemetry::init(config.log.json);
    // One thread by default: the work per message is small and every cross-thread wake-up costs
    // CPU the broker (usually on the same few cores) would rather have. More threads pay off
    // only for entities that do real computation.
    let runtime = match config.runtime.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    };
    let result = match runtime {
        Ok(runtime) => runtime.block_on(run(config)),
        Err(error) => Err(anyhow::Error::new(error).context("starting the async runtime")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: ConsumerConfig) -> anyhow::Result<()> {
    let metrics = Metrics::new().context("registering metrics")?;
    let product_metrics =
        ProductMetrics::register(metrics.registry()).context("registering metrics")?;

    let listener = TcpListener::bind(config.http.addr)
        .await
        .with_context(|| format!("cannot listen on http.addr {}", config.http.addr))?;
    let addr = listener.local_addr()?;
    // The one line on stdout: scripts and tests read the address from it.
    println!("warren-consumer listening on http://{addr}");

    let runner = RunnerSettings {
        consumer: config.delivery.consumer_controller.clone(),
        max_attempts: config.bridge.max_attempts,
        retry_backoff_min: config.bridge.retry_backoff_min,
        retry_backoff_max: config.bridge.retry_backoff_max,
    };
    let factory = ProductFactory {
        settings: Arc::new(config.product.clone()),
        metrics: product_metrics,
    };
    let (host, replies) = LocalEntityHost::new(factory, runner, metrics.entities.clone());
    let products = host.queries();

    let source = AmqpSource::spawn(
        SourceSettings {
            amqp: config.amqp.clone(),
            prefetch: config.bridge.effective_prefetch(),
            connection_name: config.amqp.connection_name_or("warren-consumer"),
        },
        metrics.bridge.source.clone(),
    );
    let bridge = Bridge::new(
        config.bridge.clone(),
        config.delivery.clone(),
        source,
        host,
        replies,
        metrics.bridge.clone(),
    );

    let http_stop = CancellationToken::new();
    let routes = http::router(
        metrics::router(metrics.registry().clone()),
        products,
        metrics.bridge.source.connected.clone(),
    );
    let server = tokio::spawn(metrics::serve(listener, routes, http_stop.clone()));
    info!(%addr, queue = %config.amqp.queue, "serving /metrics, /health and /products/{{id}}");

    let (shutdown, immediate) = (CancellationToken::new(), CancellationToken::new());
    tokio::spawn(watch_signals(shutdown.clone(), immediate.clone()));
    tokio::spawn(async move {
        immediate.cancelled().await;
        warn!("second signal: exiting without draining");
        std::process::exit(130);
    });
    let result = bridge.run(shutdown).await;

    http_stop.cancel();
    match server.await {
        Ok(Err(error)) => warn!(%error, "http server failed"),
        Err(error) => warn!(%error, "http server task failed"),
        Ok(Ok(())) => {}
    }
    result.context("bridge stopped")?;
    info!("stopped");
    Ok(())
}
