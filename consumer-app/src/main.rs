//! `warren-consumer`: one node of a Warren cluster. The oldest Up node with the bridge role
//! consumes the order queue (a singleton) and sends each order through sharded reliable
//! delivery to its ProductActor, on whichever node hosts that product's shard, acking RabbitMQ
//! only after the product confirmed. Alone (no seeds) it is a cluster of one. Wiring only: the
//! work happens in the `warren` library and in [`product`].

mod dlq;
mod http;
mod product;
mod settings;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tikv_jemallocator::Jemalloc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use warren::entity::store::{EntityStore, StoreLocation, StoreMetrics};
use warren::metrics;
use warren::order::CreateOrder;
use warren::shutdown::watch_signals;
use warren::{ClusterNode, Metrics, ShardingProducerHandle, SingletonSpec};
use warren::{bridge_singleton_name, bridge_singletons};

use crate::product::{ProductFactory, ProductMetrics};
use crate::settings::{Cli, Command, ConsumerConfig};

/// Frees pages after a burst of entities passivates, which glibc's malloc kept.
#[global_allocator]
static ALLOCATOR: Jemalloc = Jemalloc;

/// How much longer than the bridge's own drain a leave may take (hand-offs, gossip).
const LEAVE_MARGIN: Duration = Duration::from_secs(10);

/// Exit status of bad configuration (clap's own code for usage errors, too).
const EXIT_BAD_CONFIG: u8 = 2;
/// Exit status of a node that gave up joining its cluster (`cluster.give_up_joining_after`):
/// a supervisor can tell "could not reach the cluster" from a crash.
const EXIT_GAVE_UP_JOINING: u8 = 3;
/// Exit status of a node that downed itself (`cluster.downing`: it was on the losing side of a
/// partition, or the cluster declared it down). A supervisor may start it again: the new run
/// joins as a new member with no entities.
const EXIT_DOWNED: u8 = 4;

/// How a run ended, when it did not fail.
enum Ended {
    /// Stopped by a signal, after leaving.
    Stopped,
    /// Never joined the cluster; stopped without consuming anything.
    GaveUpJoining,
}

fn main() -> ExitCode {
    backtraces_for_panics_only();
    let cli = Cli::parse();
    let config = match cli.load() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("warren-consumer: {error}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let _telemetry = warren::telemetry::init_with_traces(
        config.log.json,
        &config.tracing,
        "warren-consumer",
        &config.cluster.node_id,
    );
    for name in warren::config::skipped_env_vars(settings::PRODUCER_SECTIONS) {
        debug!(%name, "ignored: a warren-producer setting");
    }
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
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            error!("starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::Dlq(command)) = &cli.command {
        return match runtime.block_on(dlq::run(command, &config)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                error!("{error:#}");
                ExitCode::FAILURE
            }
        };
    }
    let result = runtime.block_on(run(config));
    match result {
        Ok(Ended::Stopped) => ExitCode::SUCCESS,
        Ok(Ended::GaveUpJoining) => ExitCode::from(EXIT_GAVE_UP_JOINING),
        Err(error) => {
            error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

/// With `RUST_BACKTRACE=1`, anyhow (inside chitchat) captures a backtrace for every error, and
/// chitchat logs every failed gossip send with it: hundreds of lines a second while a seed is
/// unreachable. `RUST_LIB_BACKTRACE=0`, unless set otherwise, keeps backtraces for panics only.
fn backtraces_for_panics_only() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: the first thing `main` does; no other thread exists yet that could read or
        // write the environment at the same time.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
}

async fn run(config: ConsumerConfig) -> anyhow::Result<Ended> {
    let metrics = Metrics::new().context("registering metrics")?;
    // Cancelled when this node can no longer do its part: it leaves, so another takes over.
    let broken = CancellationToken::new();
    let listener = TcpListener::bind(config.http.addr)
        .await
        .with_context(|| format!("cannot listen on http.addr {}", config.http.addr))?;
    let addr = listener.local_addr()?;
    // The one line on stdout: scripts and tests read the address from it.
    println!("warren-consumer listening on http://{addr}");
    let (node, store) = start_node(config.clone(), &metrics, &broken).await?;
    let node = Arc::new(node);

    let http_stop = CancellationToken::new();
    let routes = http::router(
        metrics::router(metrics.registry().clone()),
        Arc::clone(&node),
        bridge_gauges(&config, &metrics),
        store,
    );
    let server = tokio::spawn(metrics::serve(listener, routes, http_stop.clone()));
    info!(%addr, queue = %config.amqp.queue, "serving /metrics, /health, /cluster, /products/{{id}} and its /orders");

    let (graceful, immediate) = (CancellationToken::new(), CancellationToken::new());
    tokio::spawn(watch_signals(graceful.clone(), immediate.clone()));
    tokio::spawn(async move {
        immediate.cancelled().await;
        warn!("second signal: exiting without draining");
        std::process::exit(130);
    });
    let gave_up = node.until_gave_up_joining();
    let downed = node.until_downed();
    let failed = tokio::select! {
        _ = graceful.cancelled() => false,
        _ = broken.cancelled() => {
            error!("this node cannot deliver to products any more; leaving the cluster");
            true
        }
        Some(reason) = downed => {
            // No drain and no hand-over: the surviving side takes this node's products and the
            // queue over once its margin has passed, so everything here stops now. Unacked
            // deliveries return to the queue when the broker sees the connection close.
            error!("this node downed itself ({reason}); exiting with status {EXIT_DOWNED}");
            std::process::exit(i32::from(EXIT_DOWNED));
        }
        true = gave_up => {
            error!(
                "this node never joined the cluster; exiting with status {EXIT_GAVE_UP_JOINING}"
            );
            http_stop.cancel();
            let _ = server.await;
            node.stop().await;
            return Ok(Ended::GaveUpJoining);
        }
    };

    // Nothing asks a node that is handing its work over.
    http_stop.cancel();
    match server.await {
        Ok(Err(error)) => warn!(%error, "http server failed"),
        Err(error) => warn!(%error, "http server task failed"),
        Ok(Ok(())) => {}
    }
    let report = node.leave().await;
    info!(
        shards = report.shards,
        handed_over = report.handed_over,
        took = ?report.took,
        "stopped"
    );
    if failed {
        anyhow::bail!("the node's sharding producer controller stopped");
    }
    Ok(Ended::Stopped)
}

/// Starts this node: products from the configured store (returned too, for reading their
/// orders), and the bridge among its singletons.
async fn start_node(
    mut config: ConsumerConfig,
    metrics: &Metrics,
    broken: &CancellationToken,
) -> anyhow::Result<(ClusterNode<CreateOrder>, Arc<dyn EntityStore>)> {
    let product_metrics =
        ProductMetrics::register(metrics.registry()).context("registering metrics")?;
    let store_location = config.store_location()?;
    let store = store_location
        .open("product")
        .context("opening the entity store")?;
    if let StoreLocation::Embedded(dir) = &store_location {
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone());
        info!(data_dir = %dir.display(), "products' state is kept in this node's own file");
    }
    let store = StoreMetrics::register(metrics.registry())
        .context("registering metrics")?
        .wrap(store);
    let runner = config
        .bridge
        .runner(config.delivery.consumer_controller.clone());
    let factory = Arc::new(ProductFactory {
        settings: Arc::new(config.product.clone()),
        metrics: product_metrics,
        store: Arc::clone(&store),
    });
    // A leaving node first lets its bridge finish in-flight work.
    config.cluster.leave_timeout = config
        .cluster
        .leave_timeout
        .max(config.bridge.shutdown_timeout + LEAVE_MARGIN);
    let node = ClusterNode::start_with_singletons(
        &config.cluster,
        &config.delivery,
        runner,
        factory,
        metrics,
        |producer| bridges(&config, producer, metrics, broken.clone()),
    )
    .await
    .context("starting the cluster node")?;
    if !store_location.is_shared() {
        tokio::spawn(warn_when_joined_with_a_store_of_its_own(node.view()));
    }
    Ok((node, store))
}

/// Product state in memory or in this node's own file stays behind when a product moves to
/// another node, which rebalancing does as soon as a node joins: say so loudly once.
async fn warn_when_joined_with_a_store_of_its_own(
    mut view: tokio::sync::watch::Receiver<warren::cluster::ClusterView>,
) {
    if view.wait_for(|v| v.members.len() > 1).await.is_ok() {
        warn!(
            "this node has joined a cluster but keeps product state to itself (entity_store \
             memory or embedded): a product that moves to another node starts empty there; \
             give every node the same --entity-store postgres://… URL"
        );
    }
}

/// The bridge singletons with this node's settings: the queues' consumers, one per partition,
/// spread over the Up nodes with the bridge role.
fn bridges(
    config: &ConsumerConfig,
    producer: ShardingProducerHandle<CreateOrder>,
    metrics: &Metrics,
    broken: CancellationToken,
) -> Vec<SingletonSpec> {
    bridge_singletons(
        config.bridge.clone(),
        config.amqp.clone(),
        config.amqp.connection_name_or("warren-consumer"),
        producer,
        metrics.bridge.clone(),
        broken,
    )
}

/// Each bridge singleton's name with its consumer's connected gauge, for readiness.
fn bridge_gauges(config: &ConsumerConfig, metrics: &Metrics) -> Vec<http::BridgeGauge> {
    let partitions = config.amqp.partitions;
    (0..partitions.max(1))
        .map(|partition| {
            (
                bridge_singleton_name(partitions, partition),
                metrics.bridge.partition(partition).source.connected,
            )
        })
        .collect()
}
