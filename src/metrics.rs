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
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Registry, TextEncoder,
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

/// The bridge's series.
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

/// Every series of one node.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    /// The bridge's series.
    pub bridge: BridgeMetrics,
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

/// The bridge's series, every label value exported from the start.
fn register_bridge(registry: &Registry) -> Result<BridgeMetrics, prometheus::Error> {
    let bridge = BridgeMetrics {
        deliveries: {
            let by_outcome = counter_vec(
                registry,
                "warren_deliveries_total",
                "Deliveries settled, by outcome.",
                &["outcome"],
            )?;
            // Resolved once (and exported from the start, so dashboards see zeros): a
            // label lookup hashes and locks, and settling happens for every message.
            Outcomes {
                acked: by_outcome.with_label_values(&[outcome::ACKED]),
                dead_lettered: by_outcome.with_label_values(&[outcome::DEAD_LETTERED]),
                requeued: by_outcome.with_label_values(&[outcome::REQUEUED]),
            }
        },
        in_flight: gauge(
            registry,
            "warren_in_flight",
            "Deliveries taken from the broker and still with the entities.",
        )?,
        entities_with_work: gauge(
            registry,
            "warren_entities_with_work",
            "Entities the bridge has deliveries out to.",
        )?,
        redelivered: counter(
            registry,
            "warren_redelivered_total",
            "Deliveries the broker flagged as redelivered.",
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
            let histogram = Histogram::with_opts(opts)?;
            registry.register(Box::new(histogram.clone()))?;
            histogram
        },
        acks_sent: counter(
            registry,
            "warren_amqp_acks_total",
            "Ack frames sent to the broker; each may cover many deliveries.",
        )?,
        source: SourceMetrics {
            reconnects: counter(
                registry,
                "warren_amqp_reconnects_total",
                "AMQP sessions opened after the first one.",
            )?,
            connected: gauge(
                registry,
                "warren_amqp_connected",
                "1 while the AMQP consumer is consuming.",
            )?,
        },
    };
    // Export every label value from the start, so dashboards and alerts see zeros.
    for kind in InvalidMessage::KINDS {
        bridge.invalid_messages.with_label_values(&[kind]);
    }
    Ok(bridge)
}

/// The entities' series.
fn register_entities(registry: &Registry) -> Result<EntityMetrics, prometheus::Error> {
    Ok(EntityMetrics {
        retries: counter(
            registry,
            "warren_entity_retries_total",
            "Processing attempts beyond the first.",
        )?,
        active: gauge(registry, "warren_entities_active", "Entities running.")?,
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
        metrics.bridge.ack_latency.observe(0.01);
        metrics.bridge.redelivered.inc();
        let text = encode(metrics.registry());
        for name in [
            "warren_deliveries_total{outcome=\"acked\"}",
            "warren_deliveries_total{outcome=\"dead_lettered\"}",
            "warren_deliveries_total{outcome=\"requeued\"}",
            "warren_in_flight",
            "warren_redelivered_total 1",
            "warren_ack_latency_seconds_bucket",
            "warren_amqp_reconnects_total",
            "warren_amqp_connected",
            "warren_entities_active",
            "warren_gossip_invalid_datagrams_total",
        ] {
            assert!(text.contains(name), "missing {name}");
        }
    }
}
