//! The producer's configuration: every key, its default, its flag and its environment twin.

use std::net::SocketAddr;

use clap::Parser;
use serde::{Deserialize, Serialize};
use warren::amqp::AmqpSettings;
use warren::config::cli::CommonArgs;
use warren::config::{ConfigError, check};
use warren::telemetry::TracingSettings;

/// `warren-consumer`'s own sections: their `WARREN_` variables (`WARREN_CLUSTER__SECRET`, …)
/// are skipped here (with a debug line), so one environment can serve both binaries.
pub const CONSUMER_SECTIONS: &[&str] = &[
    "bridge",
    "delivery",
    "cluster",
    "data_dir",
    "entity_store",
    "product",
    "runtime",
];

/// Everything the producer can be configured with.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProducerConfig {
    /// `[amqp]`: broker and queue (declared exactly as the consumer declares it).
    pub amqp: AmqpSettings,
    /// `[publish]`: what and how fast.
    pub publish: PublishSettings,
    /// `[http]`: optional `/metrics` endpoint.
    pub http: HttpSettings,
    /// `[log]`: log format.
    pub log: LogSettings,
    /// `[tracing]`: where traces go (off unless an OTLP endpoint is set).
    pub tracing: TracingSettings,
}

/// What to publish and how fast.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PublishSettings {
    /// Orders to publish; 0 publishes until interrupted.
    pub count: u64,
    /// Orders per second; 0 publishes as fast as confirms allow.
    pub rate: u64,
    /// Product ids: a number N for "0".."N-1", or a comma-separated list.
    pub products: ProductIds,
    /// Most messages published and not yet confirmed.
    pub max_outstanding: usize,
}

impl Default for PublishSettings {
    fn default() -> Self {
        PublishSettings {
            count: 0,
            rate: 10,
            products: ProductIds::Count(100),
            max_outstanding: 1000,
        }
    }
}

/// Product ids to draw from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ProductIds {
    /// "0" to "N-1".
    Count(u32),
    /// A number (as text) or comma-separated ids.
    List(String),
}

impl ProductIds {
    /// The ids, never empty once validated.
    pub fn ids(&self) -> Vec<String> {
        let count = match self {
            ProductIds::Count(n) => Some(*n),
            ProductIds::List(text) => text.trim().parse().ok(),
        };
        match (count, self) {
            (Some(n), _) => (0..n).map(|i| i.to_string()).collect(),
            (None, ProductIds::List(text)) => text
                .split(',')
                .map(str::trim)
                .filter(|id| !id.is_empty())
                .map(str::to_owned)
                .collect(),
            (None, ProductIds::Count(_)) => Vec::new(),
        }
    }
}

/// The optional HTTP endpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Serve `/metrics` here when set.
    pub addr: Option<SocketAddr>,
}

/// Logging.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// JSON lines instead of text.
    pub json: bool,
}

impl ProducerConfig {
    /// Rejects values the producer cannot run with, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.amqp.validate("amqp")?;
        self.tracing.validate("tracing")?;
        check(
            !self.publish.products.ids().is_empty(),
            "publish",
            "products",
            "must name at least one product (a count or a comma-separated list)",
        )?;
        check(
            self.publish.max_outstanding >= 1,
            "publish",
            "max_outstanding",
            "must be at least 1",
        )
    }
}

/// Publishes CreateOrder messages to RabbitMQ: persistent, mandatory, with publisher confirms
/// pipelined. Nacked or unconfirmed messages are republished after reconnecting; unroutable
/// (returned) ones are reported and make the exit status non-zero. Every flag also reads its
/// environment twin; the TOML file given with --config sits below both.
#[derive(Debug, Parser)]
#[command(name = "warren-producer", version)]
pub struct Cli {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Orders to publish; 0 publishes until interrupted (default 0).
    #[arg(long, env = "WARREN_PUBLISH__COUNT", value_name = "N")]
    pub count: Option<u64>,
    /// Orders per second; 0 means as fast as confirms allow (default 10).
    #[arg(long, env = "WARREN_PUBLISH__RATE", value_name = "PER_SECOND")]
    pub rate: Option<u64>,
    /// Product ids: N for "0".."N-1", or a comma-separated list (default 100).
    #[arg(long, env = "WARREN_PUBLISH__PRODUCTS", value_name = "N|IDS")]
    pub products: Option<String>,
    /// Most messages published and not yet confirmed (default 1000).
    #[arg(long, env = "WARREN_PUBLISH__MAX_OUTSTANDING", value_name = "N")]
    pub max_outstanding: Option<usize>,
    /// Serve /metrics here (off by default).
    #[arg(long, env = "WARREN_HTTP__ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<String>,
}

impl Cli {
    /// All layers merged and validated.
    pub fn load(&self) -> Result<ProducerConfig, ConfigError> {
        let config: ProducerConfig = self
            .common
            .loader::<ProducerConfig>(CONSUMER_SECTIONS)?
            .flag("publish.count", self.count)
            .flag("publish.rate", self.rate)
            .flag("publish.products", self.products.clone())
            .flag("publish.max_outstanding", self.max_outstanding)
            .flag("http.addr", self.metrics_addr.clone())
            .extract()?;
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_consumers_sections_are_none_of_ours() {
        let ours = serde_json::to_value(ProducerConfig::default()).unwrap();
        for section in CONSUMER_SECTIONS {
            assert!(
                ours.get(section).is_none(),
                "{section} is the producer's too"
            );
        }
    }

    #[test]
    fn products_are_a_count_or_a_list() {
        assert_eq!(ProductIds::Count(3).ids(), vec!["0", "1", "2"]);
        assert_eq!(ProductIds::List("2".into()).ids(), vec!["0", "1"]);
        assert_eq!(
            ProductIds::List("a, b,,c".into()).ids(),
            vec!["a", "b", "c"]
        );
    }

    #[test]
    fn an_empty_product_list_is_refused_naming_the_key() {
        let cli = Cli::parse_from(["warren-producer", "--products", " , "]);
        let err = cli.load().unwrap_err().to_string();
        assert!(err.contains("publish.products"), "{err}");
    }
}
