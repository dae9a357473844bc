//! The cluster's series: membership, the transport, singletons and sharding. Registered once per
//! node in its registry; every label value is bounded (statuses, directions, reasons, and
//! singleton names from configuration).

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::cluster::member::{ClusterView, MemberStatus};
use crate::series::{counter, counter_vec, gauge};

/// Reasons a transport link was refused or closed by this node.
pub mod refusal {
    /// The peer could not prove it holds the cluster secret (or did not speak the protocol).
    pub const HANDSHAKE: &str = "handshake";
    /// A frame could not be decoded, or was larger than the maximum.
    pub const BAD_FRAME: &str = "bad_frame";
    /// Nothing was heard from the peer within the idle timeout.
    pub const IDLE: &str = "idle";
    /// A joining node checked this node's proof of the secret and closed, as a probe does (not
    /// a refusal: counted apart so that refusals stay meaningful).
    pub const PROBE: &str = "probe";
    /// Every reason, for exporting zeros.
    pub const ALL: [&str; 4] = [HANDSHAKE, BAD_FRAME, IDLE, PROBE];
}

/// Every cluster series of one node.
#[derive(Clone, Debug)]
pub struct ClusterMetrics {
    /// `warren_cluster_members{status}`: members in this node's view, by status.
    pub members: IntGaugeVec,
    /// `warren_cluster_unreachable_members`: members this node's failure detector cannot
    /// reach now (the downing strategy decides about them once the set is stable).
    pub unreachable: IntGauge,
    /// `warren_gossip_untrusted_records`: gossiped member records ignored now (unsigned,
    /// forged or malformed).
    pub gossip_untrusted: IntGauge,
    /// `warren_transport_frames_total{direction}`: frames sent and received.
    pub frames: IntCounterVec,
    /// `warren_transport_bytes_total{direction}`: frame bytes sent and received.
    pub bytes: IntCounterVec,
    /// `warren_transport_reconnects_total`: links opened to a peer after the first.
    pub reconnects: IntCounter,
    /// `warren_transport_links`: links open now.
    pub links: IntGauge,
    /// `warren_transport_refused_total{reason}`: links refused or closed by this node.
    pub refused: IntCounterVec,
    /// `warren_transport_dropped_total`: frames dropped at a full send queue (protocols resend).
    pub dropped: IntCounter,
    /// `warren_singleton_active{singleton}`: 1 where a singleton runs.
    pub singleton_active: IntGaugeVec,
    /// `warren_shards_hosted`: shards this node hosts.
    pub shards_hosted: IntGauge,
    /// `warren_delivery_resends_total`: messages re-sent by reliable delivery (lost, or woken).
    pub delivery_resends: IntCounter,
}

impl ClusterMetrics {
    /// Registers every series in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = ClusterMetrics {
            members: gauge_vec(
                registry,
                "warren_cluster_members",
                "Members in this node's view, by status.",
                &["status"],
            )?,
            unreachable: gauge(
                registry,
                "warren_cluster_unreachable_members",
                "Members this node cannot reach now.",
            )?,
            gossip_untrusted: gauge(
                registry,
                "warren_gossip_untrusted_records",
                "Gossiped member records ignored: unsigned, forged or malformed.",
            )?,
            frames: counter_vec(
                registry,
                "warren_transport_frames_total",
                "Cluster transport frames, by direction.",
                &["direction"],
            )?,
            bytes: counter_vec(
                registry,
                "warren_transport_bytes_total",
                "Cluster transport frame bytes, by direction.",
                &["direction"],
            )?,
            reconnects: counter(
                registry,
                "warren_transport_reconnects_total",
                "Transport links opened to a peer after the first.",
            )?,
            links: gauge(registry, "warren_transport_links", "Transport links open.")?,
            refused: counter_vec(
                registry,
                "warren_transport_refused_total",
                "Transport links refused or closed by this node, by reason.",
                &["reason"],
            )?,
            dropped: counter(
                registry,
                "warren_transport_dropped_total",
                "Frames dropped at a full send queue; the protocols resend them.",
            )?,
            singleton_active: gauge_vec(
                registry,
                "warren_singleton_active",
                "1 while the named singleton runs on this node.",
                &["singleton"],
            )?,
            shards_hosted: gauge(registry, "warren_shards_hosted", "Shards this node hosts.")?,
            delivery_resends: counter(
                registry,
                "warren_delivery_resends_total",
                "Messages re-sent by reliable delivery.",
            )?,
        };
        for status in MemberStatus::ALL {
            metrics.members.with_label_values(&[status.as_str()]);
        }
        for direction in ["in", "out"] {
            metrics.frames.with_label_values(&[direction]);
            metrics.bytes.with_label_values(&[direction]);
        }
        for reason in refusal::ALL {
            metrics.refused.with_label_values(&[reason]);
        }
        Ok(metrics)
    }

    /// Series for tests and tools that do not serve them.
    pub fn unregistered() -> Self {
        // Registering in a fresh registry cannot collide.
        Self::register(&Registry::new()).unwrap_or_else(|_| unreachable!())
    }

    /// Records the members of `view` by status, and how many it cannot reach.
    pub fn observe_view(&self, view: &ClusterView) {
        for (status, count) in view.count_by_status() {
            self.members
                .with_label_values(&[status.as_str()])
                .set(count as i64);
        }
        self.unreachable.set(view.unreachable.len() as i64);
    }
}

fn gauge_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    let gauge = IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(gauge.clone()))?;
    Ok(gauge)
}
