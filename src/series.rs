//! Registering Prometheus series in a given registry (never the global default, so several
//! nodes in one process stay apart): the few helpers every layer's metrics are built with.
//! Below every layer, so the cluster's, the bridge's and an application's metrics all use them.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Registers an `IntCounter`.
pub fn counter(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let counter = IntCounter::new(name, help)?;
    registry.register(Box::new(counter.clone()))?;
    Ok(counter)
}

/// Registers an `IntCounterVec`.
pub fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let counter = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(counter.clone()))?;
    Ok(counter)
}

/// Registers an `IntGauge`.
pub fn gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let gauge = IntGauge::new(name, help)?;
    registry.register(Box::new(gauge.clone()))?;
    Ok(gauge)
}
