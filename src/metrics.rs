//! Prometheus metrics: one registry per node, passed explicitly (never the global default), so
//! several nodes in one test process stay apart. Names start with `warren_`, counters end in
//! `_total`, durations in `_seconds`, and no label holds an unbounded value. Also serves the
//! registry over HTTP.

use std::io;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use crate::series::{counter, counter_vec, gauge};

use crate::amqp::source::SourceMetrics;
use crate::cluster::ClusterMetrics;
use crate::entity::{EntityMetrics, InvalidMessage};

/// Outcome label values of `warren_deliveries_total`.
pub mod outcome {
    /// Processed by its entity and acked.
    pub const ACKED: &str = "acked";
    /// Copied to the dead-letter queue with a reason, then acked.
    pub const DEAD_LETTERED: &str = "dead_lettered";
    /// Returned to the queue: processing deadline passed, or its channel was lost.
    pub const REQUEUED: &str = "requeued";
}

/// `warren_deliveries_total`, one counter per outcome.
#[derive(Clone, Debug)]
pub struct Outcomes {
    /// `outcome="acked"`.
    pub acked: IntCounter,
    /// `outcome="dead_lettered"`.
    pub dead_lettered: IntCounter,
    /// `outcome="requeued"`.
    pub requeued: IntCounter,
}

/// The label that tells the bridges of a partitioned queue apart: the partition's number.
pub const PARTITION_LABEL: &str = "partition";

/// One bridge's series: those of its partition (`partition="0"` without partitions).
#[derive(Clone, Debug)]
pub struct BridgeMetrics {
    /// `warren_deliveries_total{outcome}`: deliveries settled, by outcome.
    pub deliveries: Outcomes,
    /// `warren_in_flight`: deliveries taken from the broker and still with the entities.
    pub in_flight: IntGauge,
    /// `warren_entities_with_work`: entities the bridge has deliveries out to. Each handles one
    /// at a time, so next to `warren_entities_processing` (summed over the nodes) it tells
    /// whether the entities or the way to them hold throughput back.
    pub entities_with_work: IntGauge,
    /// `warren_redelivered_total`: deliveries the broker flagged as redelivered.
    pub redelivered: IntCounter,
    /// `warren_invalid_messages_total{kind}`: messages rejected before reaching an entity.
    pub invalid_messages: IntCounterVec,
    /// `warren_ack_latency_seconds`: from delivery to ack.
    pub ack_latency: Histogram,
    /// `warren_amqp_acks_total`: ack frames sent (each may cover many deliveries).
    pub acks_sent: IntCounter,
    /// AMQP connection state and reconnects.
    pub source: SourceMetrics,
}

/// The bridges' series, labelled by partition; each bridge takes its own with
/// [`BridgeSeries::partition`].
#[derive(Clone, Debug)]
pub struct BridgeSeries {
    deliveries: IntCounterVec,
    in_flight: IntGaugeVec,
    entities_with_work: IntGaugeVec,
    redelivered: IntCounterVec,
    invalid_messages: IntCounterVec,
    ack_latency: HistogramVec,
    acks_sent: IntCounterVec,
    reconnects: IntCounterVec,
    connected: IntGaugeVec,
}

impl BridgeSeries {
    /// The series of the bridge of `partition`, exported (as zeros) from this call on.
    pub fn partition(&self, partition: u16) -> BridgeMetrics {
        let label = partition.to_string();
        let one = [label.as_str()];
        // Resolved once: a label lookup hashes and locks, and settling happens per message.
        let outcome = |name| self.deliveries.with_label_values(&[name, label.as_str()]);
        BridgeMetrics {
            deliveries: Outcomes {
                acked: outcome(outcome::ACKED),
                dead_lettered: outcome(outcome::DEAD_LETTERED),
                requeued: outcome(outcome::REQUEUED),
            },
            in_flight: self.in_flight.with_label_values(&one),
            entities_with_work: self.entities_with_work.with_label_values(&one),
            redelivered: self.redelivered.with_label_values(&one),
            invalid_messages: self.invalid_messages.clone(),
            ack_latency: self.ack_latency.with_label_values(&one),
            acks_sent: self.acks_sent.with_label_values(&one),
            source: SourceMetrics {
                reconnects: self.reconnects.with_label_values(&one),
                connected: self.connected.with_label_values(&one),
            },
        }
    }
}

/// Every series of one node.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    /// The bridges' series.
    pub bridge: BridgeSeries,
    /// The entities' series.
    pub entities: EntityMetrics,
    /// Membership, transport, singleton and sharding series.
    pub cluster: ClusterMetrics,
}

impl Metrics {
    /// Registers every series in a fresh registry, with process metrics (memory, CPU).
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        registry.register(Box::new(crate::telemetry::invalid_gossip_datagrams()))?;
        let bridge = register_bridge(&registry)?;
        let entities = register_entities(&registry)?;
        Ok(Metrics {
            cluster: ClusterMetrics::register(&registry)?,
            registry,
            bridge,
            entities,
        })
    }

    /// The registry, for registering application series and for serving.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// The bridges' series; a bridge's label values are exported once it takes its series.
fn register_bridge(registry: &Registry) -> Result<BridgeSeries, prometheus::Error> {
    let by_partition = [PARTITION_LABEL];
    let gauge_vec = |name: &str, help: &str| -> Result<IntGaugeVec, prometheus::Error> {
        let gauge = IntGaugeVec::new(Opts::new(name, help), &by_partition)?;
        registry.register(Box::new(gauge.clone()))?;
        Ok(gauge)
    };
    let series = BridgeSeries {
        deliveries: counter_vec(
            registry,
            "warren_deliveries_total",
            "Deliveries settled, by outcome.",
            &["outcome", PARTITION_LABEL],
        )?,
        in_flight: gauge_vec(
            "warren_in_flight",
            "Deliveries taken from the broker and still with the entities.",
        )?,
        entities_with_work: gauge_vec(
            "warren_entities_with_work",
            "Entities the bridge has deliveries out to.",
        )?,
        redelivered: counter_vec(
            registry,
            "warren_redelivered_total",
            "Deliveries the broker flagged as redelivered.",
            &by_partition,
        )?,
        invalid_messages: counter_vec(
            registry,
            "warren_invalid_messages_total",
            "Messages dead-lettered before reaching an entity, by kind.",
            &["kind"],
        )?,
        ack_latency: {
            let opts =
                HistogramOpts::new("warren_ack_latency_seconds", "Time from delivery to ack.")
                    .buckets(vec![
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0, 30.0, 60.0,
                    ]);
            let histogram = HistogramVec::new(opts, &by_partition)?;
            registry.register(Box::new(histogram.clone()))?;
            histogram
        },
        acks_sent: counter_vec(
            registry,
            "warren_amqp_acks_total",
            "Ack frames sent to the broker; each may cover many deliveries.",
            &by_partition,
        )?,
        reconnects: counter_vec(
            registry,
            "warren_amqp_reconnects_total",
            "AMQP sessions opened after the first one.",
            &by_partition,
        )?,
        connected: gauge_vec(
            "warren_amqp_connected",
            "1 while the AMQP consumer is consuming.",
        )?,
    };
    // Export every label value from the start, so dashboards and alerts see zeros.
    for kind in InvalidMessage::KINDS {
        series.invalid_messages.with_label_values(&[kind]);
    }
    Ok(series)
}

/// The entities' series.
fn register_entities(registry: &Registry) -> Result<EntityMetrics, prometheus::Error> {
    Ok(EntityMetrics {
        retries: counter(
            registry,
            "warren_entity_retries_total",
            "Processing attempts beyond the first.",
        )?,
        active: gauge(
            registry,
            "warren_entities_active",
            "Entity tasks running (dormant entities have none).",
        )?,
        processing: gauge(
            registry,
            "warren_entities_processing",
            "Entities handling a message right now.",
        )?,
        handle_seconds: {
            let opts = HistogramOpts::new(
                "warren_entity_handle_seconds",
                "Time an entity takes to handle one message, retries and storing included.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ]);
            let histogram = Histogram::with_opts(opts)?;
            registry.register(Box::new(histogram.clone()))?;
            histogram
        },
    })
}

/// The value of `wanted` (`name` or `name{label="value",…}`) in a page of Prometheus text:
/// the sum over the series of that name that carry at least `wanted`'s labels, so
/// `warren_in_flight` adds up every partition's. `None` if no series matches.
pub fn sum_series(page: &str, wanted: &str) -> Option<f64> {
    let (wanted_name, wanted_labels) = split_series(wanted);
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .filter(|(series, _)| {
            let (name, labels) = split_series(series);
            name == wanted_name && wanted_labels.iter().all(|label| labels.contains(label))
        })
        .map(|(_, value)| value.parse::<f64>().unwrap_or(f64::NAN))
        .fold(None, |sum, value| Some(sum.unwrap_or(0.0) + value))
}

/// A series' name and its `label="value"` pairs, as written.
fn split_series(series: &str) -> (&str, Vec<&str>) {
    match series.split_once('{') {
        Some((name, labels)) => (
            name,
            labels
                .trim_end_matches('}')
                .split(',')
                .filter(|label| !label.is_empty())
                .collect(),
        ),
        None => (series, Vec::new()),
    }
}

/// The registry in Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap_or_else(|error| format!("# encoding failed: {error}\n"))
}

/// A router serving `GET /metrics` from `registry`; merge application routes into it.
pub fn router(registry: Registry) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    encode(&registry),
                )
                    .into_response()
            }
        }),
    )
}

/// Serves `router` on an already bound listener until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_registered_with_its_contract_name() {
        let metrics = Metrics::new().unwrap();
        let bridge = metrics.bridge.partition(0);
        bridge.ack_latency.observe(0.01);
        bridge.redelivered.inc();
        metrics.bridge.partition(2).redelivered.inc_by(2);
        let text = encode(metrics.registry());
        for name in [
            "warren_deliveries_total{outcome=\"acked\",partition=\"0\"}",
            "warren_deliveries_total{outcome=\"dead_lettered\",partition=\"0\"}",
            "warren_deliveries_total{outcome=\"requeued\",partition=\"0\"}",
            "warren_in_flight{partition=\"0\"}",
            "warren_redelivered_total{partition=\"0\"} 1",
            "warren_redelivered_total{partition=\"2\"} 2",
            "warren_ack_latency_seconds_bucket",
            "warren_amqp_reconnects_total",
            "warren_amqp_connected",
            "warren_entities_active",
            "warren_gossip_invalid_datagrams_total",
        ] {
            assert!(text.contains(name), "missing {name}");
        }
    }

    #[test]
    fn a_series_sums_over_the_label_sets_that_carry_its_labels() {
        let page = "# HELP x\nx{outcome=\"acked\",partition=\"0\"} 3\n\
                    x{outcome=\"acked\",partition=\"1\"} 4\n\
                    x{outcome=\"requeued\",partition=\"0\"} 100\nxy 9\ny 1\n";
        assert_eq!(sum_series(page, "x{outcome=\"acked\"}"), Some(7.0));
        assert_eq!(sum_series(page, "x"), Some(107.0));
        assert_eq!(sum_series(page, "x{partition=\"0\"}"), Some(103.0));
        assert_eq!(sum_series(page, "z"), None);
    }
}
