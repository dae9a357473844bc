//! An [`EntityStore`] that times every call and counts its failures by kind, around any other:
//! the store's latency and an outage are what an operator needs to see when entities slow
//! down or wait (`warren_entity_store_seconds{operation}`,
//! `warren_entity_store_errors_total{operation,error}`). While traces are exported, each call
//! is also a `warren.store.<operation>` span, inside the entity's span (`warren.entity.handle`
//! for an append, `warren.entity.recover` for the claim and load when it starts).

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Registry};
use tracing::Instrument;

use crate::entity::store::{Appended, Claim, EntityStore, Record, Snapshot, StoreError};
use crate::ids::EntityId;
use crate::series::counter_vec;
use crate::telemetry::JOURNEY;

/// The failure kinds counted, as the `error` label says them, in [`error_index`] order.
const ERRORS: [&str; 3] = ["unavailable", "query", "fenced"];

fn error_index(error: &StoreError) -> usize {
    match error {
        StoreError::Unavailable(_) => 0,
        StoreError::Query(_) => 1,
        StoreError::Fenced { .. } => 2,
    }
}

/// One operation's series, resolved once: a call then costs an atomic update, not a label
/// lookup (every applied order appends).
#[derive(Clone, Debug)]
struct OperationSeries {
    seconds: Histogram,
    errors: [IntCounter; ERRORS.len()],
}

impl OperationSeries {
    fn resolve(seconds: &HistogramVec, errors: &IntCounterVec, operation: &str) -> Self {
        OperationSeries {
            seconds: seconds.with_label_values(&[operation]),
            errors: ERRORS.map(|error| errors.with_label_values(&[operation, error])),
        }
    }

    /// Runs `call` inside `span`, timing it and counting its failure.
    async fn time<T>(
        &self,
        span: tracing::Span,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = std::time::Instant::now();
        let result = call.instrument(span).await;
        self.seconds.observe(started.elapsed().as_secs_f64());
        if let Err(error) = &result {
            self.errors[error_index(error)].inc();
        }
        result
    }
}

/// The store's series, registered once per node.
#[derive(Clone, Debug)]
pub struct StoreMetrics {
    claim: OperationSeries,
    load: OperationSeries,
    append: OperationSeries,
    load_snapshot: OperationSeries,
    save_snapshot: OperationSeries,
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
        let operation = |name| OperationSeries::resolve(&seconds, &errors, name);
        Ok(StoreMetrics {
            claim: operation("claim"),
            load: operation("load"),
            append: operation("append"),
            load_snapshot: operation("load_snapshot"),
            save_snapshot: operation("save_snapshot"),
        })
    }

    /// `store`, timed and counted in these series.
    pub fn wrap(&self, store: Arc<dyn EntityStore>) -> Arc<dyn EntityStore> {
        Arc::new(MeteredStore {
            inner: store,
            metrics: self.clone(),
        })
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
        let span = tracing::info_span!(target: JOURNEY, "warren.store.claim");
        self.metrics
            .claim
            .time(span, self.inner.claim(entity))
            .await
    }

    async fn records(
        &self,
        entity: &EntityId,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let span = tracing::info_span!(target: JOURNEY, "warren.store.load");
        let load = self.inner.records(entity, from, limit);
        self.metrics.load.time(span, load).await
    }

    async fn latest_snapshot(&self, entity: &EntityId) -> Result<Option<Snapshot>, StoreError> {
        let span = tracing::info_span!(target: JOURNEY, "warren.store.load_snapshot");
        let load = self.inner.latest_snapshot(entity);
        self.metrics.load_snapshot.time(span, load).await
    }

    async fn save_snapshot(&self, claim: &Claim, snapshot: &Snapshot) -> Result<(), StoreError> {
        let span = tracing::info_span!(target: JOURNEY, "warren.store.save_snapshot");
        let save = self.inner.save_snapshot(claim, snapshot);
        self.metrics.save_snapshot.time(span, save).await
    }

    async fn append(
        &self,
        claim: &Claim,
        key: &str,
        record: &[u8],
    ) -> Result<Appended, StoreError> {
        let span = tracing::info_span!(target: JOURNEY, "warren.store.append");
        let append = self.inner.append(claim, key, record);
        self.metrics.append.time(span, append).await
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
        assert_eq!(metrics.claim.seconds.get_sample_count(), 2);
        assert_eq!(metrics.append.seconds.get_sample_count(), 1);
        let [unavailable, _, fenced] = &metrics.append.errors;
        assert_eq!(fenced.get(), 1);
        assert_eq!(unavailable.get(), 0);
        // The series are the registered ones, not copies.
        let page = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        assert!(
            page.contains(
                "warren_entity_store_errors_total{error=\"fenced\",operation=\"append\"} 1"
            )
        );
        assert_eq!(registry.gather().len(), 2);
    }
}
