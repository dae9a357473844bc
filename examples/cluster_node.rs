//! `warren-cluster-node`: one node of a Warren cluster hosting demo counter entities, for
//! trying the cluster out and for the multi-process tests (`cargo build --example
//! warren-cluster-node` puts it in `target/debug/examples/`). It joins through `--seeds`,
//! hosts shards, and with `--produce N` sends N numbered messages round-robin over `--entities`
//! counters through sharded reliable delivery.
//!
//! HTTP: `GET /cluster` (members, coordinator, shards here), `GET /progress` (what this node
//! produced), `GET /entities/{id}` (a counter's state, from wherever it lives), `/metrics`.
//! The first stdout line names the HTTP address.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use clap::Parser;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use warren::cluster::MemberStatus;
use warren::cluster::transport::ClusterTlsSettings;
use warren::delivery::settings::DeliverySettings;
use warren::delivery::sharding::driver::AskOutcome;
use warren::entity::{
    Entity, EntityError, EntityFactory, EntityId, EntityMessage, InvalidMessage, RunnerSettings,
};
use warren::metrics::{self, Metrics};
use warren::node::{ClusterNode, ClusterSettings};
use warren::shutdown::watch_signals;

#[derive(Parser, Debug)]
#[command(name = "warren-cluster-node", version, about)]
struct Cli {
    /// This node's name, unique in the cluster.
    #[arg(long)]
    node_id: String,
    /// Cluster address (TCP links and UDP gossip on the same port).
    #[arg(long)]
    listen: SocketAddr,
    /// Cluster addresses to join through, comma-separated; none forms a new cluster.
    #[arg(long, value_delimiter = ',')]
    seeds: Vec<String>,
    /// Roles, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "shard-host")]
    roles: Vec<String>,
    /// Shared cluster secret (16 bytes or more).
    #[arg(long, env = "WARREN_CLUSTER__SECRET", hide_env_values = true)]
    cluster_secret: Option<String>,
    /// Accept peers without a secret (trusted networks only).
    #[arg(long)]
    insecure: bool,
    /// Mutual TLS on links: the PEM CA that signs every node's certificate.
    #[arg(long, env = "WARREN_CLUSTER__TLS__CA_FILE")]
    cluster_ca_file: Option<std::path::PathBuf>,
    /// This node's PEM certificate, signed by --cluster-ca-file.
    #[arg(long, env = "WARREN_CLUSTER__TLS__CERT_FILE")]
    cluster_cert_file: Option<std::path::PathBuf>,
    /// The PEM private key of --cluster-cert-file.
    #[arg(long, env = "WARREN_CLUSTER__TLS__KEY_FILE")]
    cluster_key_file: Option<std::path::PathBuf>,
    /// HTTP address for /cluster, /progress, /entities/{id} and /metrics.
    #[arg(long, default_value = "127.0.0.1:0")]
    http: SocketAddr,
    /// Number of shards (the same on every node).
    #[arg(long, default_value_t = 50)]
    shards: u32,
    /// A silent member is down after this many milliseconds.
    #[arg(long, default_value_t = 1500)]
    down_after_ms: u64,
    /// Messages to produce from this node.
    #[arg(long, default_value_t = 0)]
    produce: u64,
    /// Counters the messages go to, round-robin.
    #[arg(long, default_value_t = 100)]
    entities: u64,
    /// Start producing once this many members are Up.
    #[arg(long, default_value_t = 1)]
    wait_members: usize,
    /// Messages in flight (sent, not confirmed) at most.
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    /// Processing time per message, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

/// "Add `n` to counter `counter`", the `n`-th message of `producer` to it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Add {
    counter: String,
    producer: String,
    n: u64,
}

impl EntityMessage for Add {
    fn decode(body: &[u8]) -> Result<Self, InvalidMessage> {
        serde_json::from_slice(body).map_err(|e| InvalidMessage::Malformed(e.to_string()))
    }

    fn entity_id(&self) -> EntityId {
        EntityId::new(self.counter.as_str())
    }
}

/// A counter's state since it started here (it keeps nothing across restarts).
#[derive(Clone, Debug, Default, Serialize)]
struct CounterSnapshot {
    /// Messages applied.
    applied: u64,
    /// Messages seen again (at-least-once delivery).
    duplicates: u64,
    /// Messages that skipped a number of their producer: lost or out of order.
    gaps: u64,
    /// Highest number applied per producer.
    last: HashMap<String, u64>,
}

struct Counter {
    state: CounterSnapshot,
    delay: Duration,
}

impl Entity for Counter {
    type Message = Add;
    type Snapshot = CounterSnapshot;

    async fn handle(&mut self, message: &Add) -> Result<(), EntityError> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let last = self.state.last.entry(message.producer.clone()).or_insert(0);
        if message.n <= *last {
            self.state.duplicates += 1;
            return Ok(());
        }
        // The first message a fresh counter sees may be any (earlier ones were confirmed by
        // an incarnation that is gone); after that, numbers must follow each other.
        if *last != 0 && message.n != *last + 1 {
            self.state.gaps += 1;
        }
        *last = message.n;
        self.state.applied += 1;
        Ok(())
    }

    fn snapshot(&self) -> CounterSnapshot {
        self.state.clone()
    }
}

struct Counters {
    delay: Duration,
}

impl EntityFactory for Counters {
    type Entity = Counter;

    fn create(&self, _id: &EntityId) -> Counter {
        Counter {
            state: CounterSnapshot::default(),
            delay: self.delay,
        }
    }
}

#[derive(Default, Serialize)]
struct Progress {
    target: u64,
    sent: AtomicU64,
    confirmed: AtomicU64,
    rejected: AtomicU64,
}

#[derive(Clone)]
struct App {
    node: Arc<ClusterNode<Add>>,
    progress: Arc<Progress>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    warren::telemetry::init(false);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    let result = match runtime {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(error) => Err(anyhow::Error::new(error).context("starting the async runtime")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("warren-cluster-node: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut settings = ClusterSettings {
        node_id: cli.node_id.clone(),
        listen: cli.listen,
        seeds: cli.seeds.clone(),
        roles: cli.roles.clone(),
        secret: cli.cluster_secret.clone(),
        insecure: cli.insecure,
        down_after: Duration::from_millis(cli.down_after_ms),
        ..ClusterSettings::default()
    };
    settings.region.shards = cli.shards;
    settings.tls = ClusterTlsSettings {
        ca_file: cli.cluster_ca_file.clone(),
        cert_file: cli.cluster_cert_file.clone(),
        key_file: cli.cluster_key_file.clone(),
    };
    let delivery = DeliverySettings::default();
    let runner = RunnerSettings {
        consumer: delivery.consumer_controller.clone(),
        max_attempts: 3,
        retry_backoff_min: Duration::from_millis(50),
        retry_backoff_max: Duration::from_secs(1),
    };
    let metrics = Metrics::new().context("registering metrics")?;
    let factory = Arc::new(Counters {
        delay: Duration::from_millis(cli.delay_ms),
    });
    let node = ClusterNode::start(&settings, &delivery, runner, factory, &metrics).await?;
    let node = Arc::new(node);
    let progress = Arc::new(Progress {
        target: cli.produce,
        ..Progress::default()
    });

    let listener = TcpListener::bind(cli.http)
        .await
        .with_context(|| format!("cannot listen on --http {}", cli.http))?;
    let http_addr = listener.local_addr()?;
    println!("warren-cluster-node {} http://{http_addr}", cli.node_id);
    let app = App {
        node: Arc::clone(&node),
        progress: Arc::clone(&progress),
    };
    let routes = metrics::router(metrics.registry().clone()).merge(
        axum::Router::new()
            .route("/cluster", get(cluster))
            .route("/progress", get(progress_page))
            .route("/entities/{id}", get(entity))
            .with_state(app),
    );
    let http_stop = CancellationToken::new();
    let server = tokio::spawn(metrics::serve(listener, routes, http_stop.clone()));

    let producing = (cli.produce > 0)
        .then(|| tokio::spawn(produce(Arc::clone(&node), cli, Arc::clone(&progress))));

    let (graceful, immediate) = (CancellationToken::new(), CancellationToken::new());
    tokio::spawn(watch_signals(graceful.clone(), immediate.clone()));
    let gave_up = node.until_gave_up_joining();
    let downed = node.until_downed();
    tokio::select! {
        _ = graceful.cancelled() => {}
        _ = immediate.cancelled() => {}
        true = gave_up => {
            anyhow::bail!("gave up joining the cluster (cluster.give_up_joining_after)")
        }
        // The node has stopped its parts already; nothing is handed over.
        Some(reason) = downed => anyhow::bail!("this node downed itself: {reason}"),
    }
    // Nothing asks or produces through a node that is handing its work over.
    http_stop.cancel();
    let _ = server.await;
    if let Some(producing) = producing {
        producing.abort();
        let _ = producing.await;
    }
    tokio::select! {
        report = node.leave() => {
            // The last stdout line, for scripts and tests.
            println!(
                "left the cluster: {} shards, handed over: {}, in {:?}",
                report.shards, report.handed_over, report.took
            );
        }
        _ = immediate.cancelled() => warn!("second signal: exiting without handing over"),
    }
    Ok(())
}

async fn produce(node: Arc<ClusterNode<Add>>, cli: Cli, progress: Arc<Progress>) {
    let mut view = node.view();
    let up = |v: &warren::cluster::ClusterView| {
        v.count_by_status()
            .get(&MemberStatus::Up)
            .copied()
            .unwrap_or(0)
    };
    if view
        .wait_for(|v| up(v) >= cli.wait_members)
        .await
        .map(|_| ())
        .is_err()
    {
        return;
    }
    info!(messages = cli.produce, entities = cli.entities, "producing");
    let producer = node.producer();
    let entities = cli.entities.max(1);
    let mut pending = VecDeque::new();
    for i in 0..cli.produce {
        let message = Add {
            counter: format!("counter-{}", i % entities),
            producer: cli.node_id.clone(),
            n: i / entities + 1,
        };
        let entity = EntityId::new(message.counter.as_str());
        let Ok(outcome) = producer.submit(entity, message).await else {
            warn!("producer stopped");
            return;
        };
        progress.sent.fetch_add(1, Ordering::Relaxed);
        pending.push_back(outcome);
        while pending.len() >= cli.in_flight.max(1) {
            if let Some(outcome) = pending.pop_front() {
                settle(outcome.await, &progress);
            }
        }
    }
    while let Some(outcome) = pending.pop_front() {
        settle(outcome.await, &progress);
    }
    info!("all messages confirmed");
}

fn settle(
    outcome: Result<AskOutcome, warren::delivery::sharding::driver::AskError>,
    progress: &Progress,
) {
    match outcome {
        Ok(AskOutcome::Confirmed) => {
            progress.confirmed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(AskOutcome::Rejected(_)) => {
            progress.rejected.fetch_add(1, Ordering::Relaxed);
        }
        Err(error) => warn!(%error, "message without outcome"),
    }
}

async fn cluster(State(app): State<App>) -> Json<warren::node::ClusterStatus> {
    Json(app.node.cluster_status(Duration::from_secs(1)).await)
}

async fn progress_page(State(app): State<App>) -> Json<serde_json::Value> {
    let p = &app.progress;
    let confirmed = p.confirmed.load(Ordering::Relaxed);
    let rejected = p.rejected.load(Ordering::Relaxed);
    Json(serde_json::json!({
        "target": p.target,
        "sent": p.sent.load(Ordering::Relaxed),
        "confirmed": confirmed,
        "rejected": rejected,
        "done": confirmed + rejected >= p.target,
    }))
}

async fn entity(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, (StatusCode, String)> {
    app.node
        .query(EntityId::new(id), Duration::from_secs(5))
        .await
        .map(Json)
        .map_err(|error| (StatusCode::GATEWAY_TIMEOUT, error.to_string()))
}
