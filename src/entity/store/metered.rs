//! An [`EntityStore`] that times every call and counts its failures by kind, around any other:
//! the store's latency and an outage are what an operator needs to see when entities slow
//! down or wait (`warren_entity_store_seconds{operation}`,
//! `warren_entity_store_errors_total{operation,error}`). While traces are exported, each call
//! is also a `warren.store.<operation>` span, inside the entity's span (`warren.entity.handle`
//! for an append, `warren.entity.recover` for the claim and load when it starts).

use std::sync::Arc;

use async_trait::async_trait;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Registry};
use tracing::Instrument;

use crate::entity::store::{Appended, Claim, EntityStore, StoreError};
use crate::ids::EntityId;
use crate::series::counter_vec;
use crate::telemetry::JOURNEY;

/// The operations timed, as the `operation` label says them.
const OPERATIONS: [&str; 3] = ["claim", "load", "append"];

/// The failure kinds counted, as the `error` label says them.
const ERRORS: [&str; 3] = ["unavailable", "query", "fenced"];

/// The store's series, registered once per node.
#[derive(Clone, Debug)]
pub struct StoreMetrics {
    seconds: HistogramVec,
    errors: IntCounterVec,
}

impl StoreMetrics {
    /// Registers the series in `registry`, every label value resolved, so each is exported
    /// (at 0) before the first call.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let opts = HistogramOpts::new(
            "warren_entity_store_seconds",
            "Time an entity store call takes, failed ones included, by operation.",
        )
        .buckets(vec![
            0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0,
        ]);
        let seconds = HistogramVec::new(opts, &["operation"])?;
        registry.register(Box::new(seconds.clone()))?;
        let errors = counter_vec(
            registry,
            "warren_entity_store_errors_total",
            "Entity store calls that failed, by operation and kind (unavailable: the database cannot answer now).",
            &["operation", "error"],
        )?;
        for operation in OPERATIONS {
            seconds.with_label_values(&[operation]);
            for error in ERRORS {
                errors.with_label_values(&[operation, error]);
            }
        }
        Ok(StoreMetrics { seconds, errors })
    }

    /// `store`, timed and counted in these series.
    pub fn wrap(&self, store: Arc<dyn EntityStore>) -> Arc<dyn EntityStore> {
        Arc::new(MeteredStore {
            inner: store,
            metrics: self.clone(),
        })
    }

    fn observe<T>(&self, operation: &str, result: &Result<T, StoreError>, seconds: f64) {
        self.seconds
            .with_label_values(&[operation])
            .observe(seconds);
        if let Err(error) = result {
            let kind = match error {
                StoreError::Unavailable(_) => "unavailable",
                StoreError::Query(_) => "query",
                StoreError::Fenced { .. } => "fenced",
            };
            self.errors.with_label_values(&[operation, kind]).inc();
        }
    }
}

/// The wrapper [`StoreMetrics::wrap`] returns.
struct MeteredStore {
    inner: Arc<dyn EntityStore>,
    metrics: StoreMetrics,
}

#[async_trait]
impl EntityStore for MeteredStore {
    async fn claim(&self, entity: &EntityId) -> Result<Claim, StoreError> {
        let started = std::time::Instant::now();
        let span = tracing::info_span!(target: JOURNEY, "warren.store.claim");
        let result = self.inner.claim(entity).instrument(span).await;
        let elapsed = started.elapsed().as_secs_f64();
        self.metrics.observe("claim", &result, elapsed);
        result
    }

    async fn load(&self, entity: &EntityId) -> Result<Vec<Vec<u8>>, StoreError> {
        let started = std::time::Instant::now();
        let span = tracing::info_span!(target: JOURNEY, "warren.store.load");
        let result = self.inner.load(entity).instrument(span).await;
        let elapsed = started.elapsed().as_secs_f64();
        self.metrics.observe("load", &result, elapsed);
        result
    }

    async fn append(
        &self,
        claim: &Claim,
        key: &str,
        record: &[u8],
    ) -> Result<Appended, StoreError> {
        let started = std::time::Instant::now();
        let span = tracing::info_span!(target: JOURNEY, "warren.store.append");
        let result = self.inner.append(claim, key, record).instrument(span).await;
        let elapsed = started.elapsed().as_secs_f64();
        self.metrics.observe("append", &result, elapsed);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entity::store::MemoryEntityStore;

    #[tokio::test]
    async fn calls_are_timed_and_a_fenced_append_is_counted() {
        let registry = Registry::new();
        let metrics = StoreMetrics::register(&registry).unwrap();
        let store = metrics.wrap(Arc::new(MemoryEntityStore::default()));
        let entity = EntityId::new("e");
        let stale = store.claim(&entity).await.unwrap();
        let _newer = store.claim(&entity).await.unwrap();
        assert!(store.append(&stale, "k", b"r").await.is_err());
        let seconds = |op: &str| metrics.seconds.with_label_values(&[op]).get_sample_count();
        assert_eq!(seconds("claim"), 2);
        assert_eq!(seconds("append"), 1);
        let errors = |op: &str, kind: &str| metrics.errors.with_label_values(&[op, kind]).get();
        assert_eq!(errors("append", "fenced"), 1);
        assert_eq!(errors("append", "unavailable"), 0);
        assert_eq!(registry.gather().len(), 2);
    }
}
