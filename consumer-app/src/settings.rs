//! The consumer's configuration: every key, its default, its flag and its environment twin.
//! Layering (defaults, `--config` TOML, `WARREN_` environment, flags) is `warren::config`'s.

use std::net::SocketAddr;

use clap::Parser;
use serde::{Deserialize, Serialize};
use warren::amqp::AmqpSettings;
use warren::bridge::BridgeSettings;
use warren::config::cli::CommonArgs;
use warren::config::{ConfigError, check};
use warren::delivery::DeliverySettings;
use warren::entity::store::StoreLocation;
use warren::node::ClusterSettings;
use warren::node::settings::StrategyName;
use warren::telemetry::TracingSettings;

/// `warren-producer`'s own sections: their `WARREN_` variables are skipped here (with a debug
/// line), so one environment can serve both binaries.
pub const PRODUCER_SECTIONS: &[&str] = &["publish"];

/// Everything the consumer can be configured with.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerConfig {
    /// `[amqp]`: broker and queue.
    pub amqp: AmqpSettings,
    /// `[bridge]`: in-flight bound, prefetch, retries, deadlines.
    pub bridge: BridgeSettings,
    /// `[delivery]`: the reliable-delivery protocol.
    pub delivery: DeliverySettings,
    /// `[cluster]`: this node, whom it joins, and how the cluster behaves.
    pub cluster: ClusterSettings,
    /// Where products keep their state: `embedded` (the default: a file in `data_dir`, this
    /// node only, survives a crash), `memory` (this process only: tests and demos) or a
    /// `postgres://` URL (shared, so state survives a node's loss; what a multi-node cluster
    /// needs).
    pub entity_store: String,
    /// The folder of this node's own files (the `embedded` entity store).
    pub data_dir: std::path::PathBuf,
    /// `[product]`: the ProductActor's simulation knobs.
    pub product: ProductSettings,
    /// `[http]`: where `/metrics`, `/health` and `/products/{id}` are served.
    pub http: HttpSettings,
    /// `[log]`: log format.
    pub log: LogSettings,
    /// `[tracing]`: where traces go (off unless an OTLP endpoint is set).
    pub tracing: TracingSettings,
    /// `[runtime]`: threads.
    pub runtime: RuntimeSettings,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            amqp: AmqpSettings::default(),
            bridge: BridgeSettings::default(),
            delivery: DeliverySettings::default(),
            cluster: ClusterSettings::default(),
            entity_store: "embedded".to_owned(),
            data_dir: warren::entity::store::DEFAULT_DATA_DIR.into(),
            product: ProductSettings::default(),
            http: HttpSettings::default(),
            log: LogSettings::default(),
            tracing: TracingSettings::default(),
            runtime: RuntimeSettings::default(),
        }
    }
}

/// The async runtime.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeSettings {
    /// Worker threads; 1 runs everything on one thread (the most efficient for light entities).
    pub worker_threads: usize,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        RuntimeSettings { worker_threads: 1 }
    }
}

/// The ProductActor: what it keeps, and its simulation knobs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProductSettings {
    /// Probability that an attempt fails as a simulated transient failure.
    pub failure_rate: f64,
    /// Simulated processing time per attempt.
    pub processing_delay_ms: u64,
    /// A product saves a snapshot of its state every this many applied orders, so it recovers
    /// from the snapshot and at most this many orders instead of its whole history; 0 never
    /// saves one.
    pub snapshot_every: u64,
    /// The newest order ids a product keeps in memory (and shows): they recognise a
    /// redelivered order without asking the store, which recognises older ones.
    pub recent_orders: usize,
}

impl Default for ProductSettings {
    fn default() -> Self {
        ProductSettings {
            failure_rate: 0.0,
            processing_delay_ms: 0,
            snapshot_every: 100,
            recent_orders: 20,
        }
    }
}

/// The HTTP endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Listen address; port 0 picks a free port (printed on stdout at start).
    pub addr: SocketAddr,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            addr: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

/// Logging.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// JSON lines instead of text (the filter is `RUST_LOG`).
    pub json: bool,
}

impl ConsumerConfig {
    /// Rejects values Warren cannot run with, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.amqp.validate("amqp")?;
        self.bridge.validate("bridge")?;
        self.delivery.validate("delivery")?;
        self.cluster.validate("cluster")?;
        self.tracing.validate("tracing")?;
        self.store_location()?;
        check(
            usize::from(self.bridge.max_in_flight)
                <= self.delivery.sharding.producer_controller.buffer_size,
            "bridge",
            "max_in_flight",
            "must not exceed delivery.sharding.producer_controller.buffer_size",
        )?;
        check(
            self.runtime.worker_threads >= 1,
            "runtime",
            "worker_threads",
            "must be at least 1",
        )?;
        check(
            (0.0..=1.0).contains(&self.product.failure_rate),
            "product",
            "failure_rate",
            "must be between 0 and 1",
        )
    }
}

impl ConsumerConfig {
    /// The entity store, parsed.
    pub fn store_location(&self) -> Result<StoreLocation, ConfigError> {
        StoreLocation::parse(&self.entity_store)
            .map(|location| location.in_data_dir(&self.data_dir))
            .map_err(|reason| ConfigError::OutOfRange {
                key: "entity_store".to_owned(),
                reason,
            })
    }
}

/// Consumes orders from RabbitMQ and applies each to its product entity, acking only after the
/// entity confirmed. Every flag also reads its environment twin; the TOML file given with
/// --config sits below both.
#[derive(Debug, Parser)]
#[command(name = "warren-consumer", version)]
pub struct Cli {
    /// A one-off operation instead of running a node.
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub common: CommonArgs,
    /// Quorum queues: deliveries after which the broker itself dead-letters a message.
    #[arg(
        long,
        env = "WARREN_AMQP__DELIVERY_LIMIT",
        value_name = "N",
        global = true
    )]
    pub delivery_limit: Option<u32>,
    /// Unacked deliveries the broker may push (default: ten times --max-in-flight).
    #[arg(long, env = "WARREN_BRIDGE__PREFETCH", value_name = "N")]
    pub prefetch: Option<u16>,
    /// Most deliveries with the entities at once (default 100).
    #[arg(long, env = "WARREN_BRIDGE__MAX_IN_FLIGHT", value_name = "N")]
    pub max_in_flight: Option<u16>,
    /// Bodies above this many bytes are dead-lettered undecoded (default 65536).
    #[arg(
        long,
        env = "WARREN_BRIDGE__MAX_MESSAGE_BYTES",
        value_name = "BYTES",
        global = true
    )]
    pub max_message_bytes: Option<usize>,
    /// Processing attempts per message before it is dead-lettered (default 5).
    #[arg(long, env = "WARREN_BRIDGE__MAX_ATTEMPTS", value_name = "N")]
    pub max_attempts: Option<u32>,
    /// Nack a delivery back to the queue if unsettled this long, e.g. "60s" (default 60s).
    #[arg(
        long,
        env = "WARREN_BRIDGE__PROCESSING_DEADLINE",
        value_name = "DURATION"
    )]
    pub processing_deadline: Option<String>,
    /// On SIGINT/SIGTERM, how long in-flight work may finish, e.g. "30s" (default 30s).
    #[arg(long, env = "WARREN_BRIDGE__SHUTDOWN_TIMEOUT", value_name = "DURATION")]
    pub shutdown_timeout: Option<String>,
    /// Serve /metrics, /health and /products/{id} here (default 127.0.0.1:9464).
    #[arg(long, env = "WARREN_HTTP__ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<String>,
    /// Probability that a processing attempt fails (simulated), 0 to 1 (default 0).
    #[arg(long, env = "WARREN_PRODUCT__FAILURE_RATE", value_name = "P")]
    pub failure_rate: Option<f64>,
    /// Simulated processing time per attempt in milliseconds (default 0).
    #[arg(long, env = "WARREN_PRODUCT__PROCESSING_DELAY_MS", value_name = "MS")]
    pub processing_delay_ms: Option<u64>,
    /// Async runtime worker threads; 1 (the default) runs everything on one thread.
    #[arg(long, env = "WARREN_RUNTIME__WORKER_THREADS", value_name = "N")]
    pub worker_threads: Option<usize>,
    /// This node's name, unique in the cluster (default node-1).
    #[arg(long, env = "WARREN_CLUSTER__NODE_ID", value_name = "NAME")]
    pub node_id: Option<String>,
    /// Cluster address, TCP and UDP on one port (default 127.0.0.1:0: a node nobody joins).
    #[arg(long, env = "WARREN_CLUSTER__LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Cluster addresses to join through, comma-separated; none forms a new cluster.
    #[arg(
        long,
        env = "WARREN_CLUSTER__SEEDS",
        value_name = "ADDRS",
        value_delimiter = ','
    )]
    pub seeds: Option<Vec<String>>,
    /// A node that is not the first of its seeds and has not joined by then exits with
    /// status 3: a duration such as 5m, or off to keep trying (default 5m).
    #[arg(
        long,
        env = "WARREN_CLUSTER__GIVE_UP_JOINING_AFTER",
        value_name = "DURATION"
    )]
    pub give_up_joining_after: Option<String>,
    /// Which side of a network partition survives: keep-majority (the default),
    /// static-quorum (with --quorum-size), keep-oldest, lease-majority (a lease in the
    /// PostgreSQL entity store), or off (unsafe). The losing side exits with status 4.
    #[arg(
        long,
        env = "WARREN_CLUSTER__DOWNING__STRATEGY",
        value_name = "STRATEGY"
    )]
    pub downing: Option<String>,
    /// Members a side needs to survive under static-quorum (more than half the cluster).
    #[arg(long, env = "WARREN_CLUSTER__DOWNING__QUORUM_SIZE", value_name = "N")]
    pub quorum_size: Option<usize>,
    /// How long the set of unreachable members must stay the same before the downing
    /// strategy decides (default 5s).
    #[arg(
        long,
        env = "WARREN_CLUSTER__DOWNING__STABLE_AFTER",
        value_name = "DURATION"
    )]
    pub stable_after: Option<String>,
    /// How much longer the surviving side waits before it takes over the losing side's
    /// products and queue, so the losers have stopped (default 3s).
    #[arg(
        long,
        env = "WARREN_CLUSTER__DOWNING__DOWN_REMOVAL_MARGIN",
        value_name = "DURATION"
    )]
    pub down_removal_margin: Option<String>,
    /// Roles, comma-separated: shard-host hosts products, bridge may consume the queue
    /// (default both).
    #[arg(
        long,
        env = "WARREN_CLUSTER__ROLES",
        value_name = "ROLES",
        value_delimiter = ','
    )]
    pub roles: Option<Vec<String>>,
    /// Shared secret of the cluster, 16 bytes or more (needed to join one).
    #[arg(
        long,
        env = "WARREN_CLUSTER__SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub cluster_secret: Option<String>,
    /// Join a cluster without a shared secret: gossip is then not authenticated, nor are links
    /// unless --cluster-ca-file sets mutual TLS; only on a network every host of which is
    /// trusted.
    #[arg(
        long,
        env = "WARREN_CLUSTER__INSECURE",
        num_args = 0..=1,
        default_missing_value = "true",
        value_name = "BOOL"
    )]
    pub insecure: Option<bool>,
    /// Mutual TLS on links between nodes: the PEM CA that signs every node's certificate.
    #[arg(long, env = "WARREN_CLUSTER__TLS__CA_FILE", value_name = "FILE")]
    pub cluster_ca_file: Option<std::path::PathBuf>,
    /// This node's PEM certificate, signed by --cluster-ca-file (server and client alike).
    #[arg(long, env = "WARREN_CLUSTER__TLS__CERT_FILE", value_name = "FILE")]
    pub cluster_cert_file: Option<std::path::PathBuf>,
    /// The PEM private key of --cluster-cert-file.
    #[arg(long, env = "WARREN_CLUSTER__TLS__KEY_FILE", value_name = "FILE")]
    pub cluster_key_file: Option<std::path::PathBuf>,
    /// Where products keep their state: embedded (a file in --data-dir, the default), memory,
    /// or a postgres:// URL shared by all nodes.
    #[arg(long, env = "WARREN_ENTITY_STORE", value_name = "STORE")]
    pub entity_store: Option<String>,
    /// The folder of this node's own files, such as the embedded entity store (default
    /// warren-data in the working directory).
    #[arg(long, env = "WARREN_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<std::path::PathBuf>,
}

/// One-off operations.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// The dead-letter queue (`<queue>.dlq`): list it, or replay from it.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

/// What to do with the dead-letter queue.
#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first, with their reasons; all stay in place.
    Inspect {
        /// List at most this many.
        #[arg(long, default_value_t = 1000, value_name = "N")]
        limit: usize,
        /// One JSON object per dead letter instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Publish copies of selected dead letters where a producer would publish them, each
    /// removed from the dead-letter queue only after the broker confirmed its copy. Those the
    /// consumer would dead-letter again as undecodable stay, unless --force.
    #[command(group(
        clap::ArgGroup::new("selection")
            .required(true)
            .multiple(true)
            .args(["all", "reason", "count"])
    ))]
    Replay {
        /// Every dead letter (or every one --reason selects).
        #[arg(long)]
        all: bool,
        /// Only dead letters whose reason contains this text.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        /// At most this many.
        #[arg(long, value_name = "N")]
        count: Option<usize>,
        /// Replay undecodable ones too (to their source queue), e.g. for a fixed consumer.
        #[arg(long)]
        force: bool,
    },
}

impl Cli {
    /// All layers merged and validated.
    pub fn load(&self) -> Result<ConsumerConfig, ConfigError> {
        let mut config: ConsumerConfig = self
            .common
            .loader::<ConsumerConfig>(PRODUCER_SECTIONS)?
            .flag("amqp.delivery_limit", self.delivery_limit)
            .flag("bridge.prefetch", self.prefetch)
            .flag("bridge.max_in_flight", self.max_in_flight)
            .flag("bridge.max_message_bytes", self.max_message_bytes)
            .flag("bridge.max_attempts", self.max_attempts)
            .flag(
                "bridge.processing_deadline",
                self.processing_deadline.clone(),
            )
            .flag("bridge.shutdown_timeout", self.shutdown_timeout.clone())
            .flag("http.addr", self.metrics_addr.clone())
            .flag("product.failure_rate", self.failure_rate)
            .flag("product.processing_delay_ms", self.processing_delay_ms)
            .flag("runtime.worker_threads", self.worker_threads)
            .flag("cluster.node_id", self.node_id.clone())
            .flag("cluster.listen", self.listen.clone())
            .flag("cluster.seeds", self.seeds.clone())
            .flag("cluster.roles", self.roles.clone())
            .flag(
                "cluster.give_up_joining_after",
                self.give_up_joining_after.clone(),
            )
            .flag("cluster.downing.strategy", self.downing.clone())
            .flag("cluster.downing.quorum_size", self.quorum_size)
            .flag("cluster.downing.stable_after", self.stable_after.clone())
            .flag(
                "cluster.downing.down_removal_margin",
                self.down_removal_margin.clone(),
            )
            .flag("cluster.secret", self.cluster_secret.clone())
            .flag("cluster.insecure", self.insecure)
            .flag("cluster.tls.ca_file", self.cluster_ca_file.clone())
            .flag("cluster.tls.cert_file", self.cluster_cert_file.clone())
            .flag("cluster.tls.key_file", self.cluster_key_file.clone())
            .flag("entity_store", self.entity_store.clone())
            .flag("data_dir", self.data_dir.clone())
            .extract()?;
        // The lease lives in the database the products live in, unless told otherwise.
        let downing = &mut config.cluster.downing;
        if downing.strategy == StrategyName::LeaseMajority
            && downing.lease_url.is_none()
            && let Ok(StoreLocation::Postgres(url)) = StoreLocation::parse(&config.entity_store)
        {
            downing.lease_url = Some(url);
        }
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        ConsumerConfig::default().validate().unwrap();
    }

    /// The refusal names the flag, and the flag exists.
    #[test]
    fn joining_without_a_secret_needs_the_insecure_flag() {
        let joining = [
            "warren-consumer",
            "--seeds",
            "127.0.0.1:7355",
            "--listen",
            "127.0.0.1:7356",
        ];
        let refused = Cli::parse_from(joining).load().unwrap_err().to_string();
        assert!(refused.contains("--insecure"), "{refused}");
        let insecure = Cli::parse_from(joining.iter().copied().chain(["--insecure"]))
            .load()
            .unwrap();
        assert!(insecure.cluster.insecure);
    }

    #[test]
    fn the_producers_sections_are_none_of_ours() {
        let ours = serde_json::to_value(ConsumerConfig::default()).unwrap();
        for section in PRODUCER_SECTIONS {
            assert!(
                ours.get(section).is_none(),
                "{section} is the consumer's too"
            );
        }
    }

    /// The README's `warren.toml` says it shows every default: it loads, and to exactly them.
    #[test]
    fn the_readme_config_example_loads_to_the_defaults() {
        let readme = include_str!("../../README.md");
        let example = readme
            .split("```toml\n")
            .find(|block| block.starts_with("# warren.toml"))
            .and_then(|block| block.split("```").next())
            .expect("the README has a warren.toml example");
        let file = std::env::temp_dir().join(format!("warren-readme-{}.toml", std::process::id()));
        std::fs::write(&file, example).unwrap();
        let path = file.to_string_lossy().into_owned();
        let loaded = Cli::parse_from(["warren-consumer", "--config", path.as_str()]).load();
        let _ = std::fs::remove_file(&file);
        let loaded = loaded.unwrap_or_else(|error| panic!("the README's example: {error}"));
        assert_eq!(
            serde_json::to_value(&loaded).unwrap(),
            serde_json::to_value(ConsumerConfig::default()).unwrap()
        );
    }

    #[test]
    fn cluster_flags_land_on_their_keys() {
        let cli = Cli::parse_from([
            "warren-consumer",
            "--node-id",
            "n2",
            "--listen",
            "127.0.0.1:7352",
            "--seeds",
            "127.0.0.1:7351,127.0.0.1:7353",
            "--roles",
            "shard-host",
            "--cluster-secret",
            "0123456789abcdef0123",
            "--entity-store",
            "postgres://warren:warren@127.0.0.1:5432/warren",
            "--downing",
            "static-quorum",
            "--quorum-size",
            "2",
            "--stable-after",
            "7s",
            "--down-removal-margin",
            "2s",
        ]);
        let config = cli.load().unwrap();
        let downing = config.cluster.downing.settings();
        assert_eq!(
            downing.strategy,
            warren::cluster::membership::downing::Strategy::StaticQuorum { quorum_size: 2 }
        );
        assert_eq!(downing.stable_after, std::time::Duration::from_secs(7));
        assert_eq!(
            downing.down_removal_margin,
            std::time::Duration::from_secs(2)
        );
        assert_eq!(config.cluster.node_id, "n2");
        assert_eq!(config.cluster.listen.port(), 7352);
        assert_eq!(config.cluster.seeds.len(), 2);
        assert_eq!(config.cluster.roles, vec!["shard-host".to_owned()]);
        assert!(config.cluster.secret.is_some());
        assert!(matches!(
            config.store_location().unwrap(),
            StoreLocation::Postgres(_)
        ));
    }

    #[test]
    fn the_lease_lives_in_the_postgres_entity_store_unless_told_otherwise() {
        let store = "postgres://warren:warren@127.0.0.1:5432/warren";
        let cli = Cli::parse_from([
            "warren-consumer",
            "--downing",
            "lease-majority",
            "--entity-store",
            store,
        ]);
        let config = cli.load().unwrap();
        assert_eq!(config.cluster.downing.lease_url.as_deref(), Some(store));
        let without_a_database =
            Cli::parse_from(["warren-consumer", "--downing", "lease-majority"]);
        let error = without_a_database.load().unwrap_err().to_string();
        assert!(error.contains("cluster.downing.lease_url"), "{error}");
    }

    #[test]
    fn flags_land_on_their_keys() {
        let cli = Cli::parse_from([
            "warren-consumer",
            "--queue",
            "q1",
            "--max-in-flight",
            "7",
            "--processing-deadline",
            "5s",
            "--metrics-addr",
            "127.0.0.1:0",
            "--entity-store",
            "embedded",
            "--data-dir",
            "/var/lib/warren",
        ]);
        let config = cli.load().unwrap();
        assert_eq!(
            config.store_location().unwrap(),
            StoreLocation::Embedded("/var/lib/warren".into())
        );
        assert_eq!(config.amqp.queue, "q1");
        assert_eq!(config.bridge.max_in_flight, 7);
        assert_eq!(config.bridge.effective_prefetch(), 70);
        assert_eq!(
            config.bridge.processing_deadline,
            std::time::Duration::from_secs(5)
        );
        assert_eq!(config.http.addr.port(), 0);
    }

    #[test]
    fn an_invalid_value_names_its_key() {
        let cli = Cli::parse_from(["warren-consumer", "--failure-rate", "1.5"]);
        let err = cli.load().unwrap_err().to_string();
        assert!(err.contains("product.failure_rate"), "{err}");
        let cli = Cli::parse_from(["warren-consumer", "--processing-deadline", "soon"]);
        let err = cli.load().unwrap_err().to_string();
        assert!(err.contains("processing_deadline"), "{err}");
        let cli = Cli::parse_from(["warren-consumer", "--entity-store", "redis://x"]);
        let err = cli.load().unwrap_err().to_string();
        assert!(err.contains("entity_store"), "{err}");
        let cli = Cli::parse_from(["warren-consumer", "--seeds", "127.0.0.1:7351"]);
        let err = cli.load().unwrap_err().to_string();
        assert!(err.contains("cluster.listen"), "{err}");
    }
}
