//! The ProductActor of the original sample: per product, the total quantity ordered, the
//! number of orders applied and the newest order ids. A redelivered order is recognised and
//! ignored, so at-least-once delivery has an exactly-once effect: a recent one by the ids the
//! product keeps, an older one by the entity store, which keeps every applied order as a
//! record keyed by the order id and refuses a second. Each applied order is stored before it
//! is confirmed, and every `snapshot_every` orders the product also saves a snapshot of its
//! state; when it starts it loads the newest snapshot and the orders after it, so its state
//! and its deduplication survive a move to another node or a crash, and neither its memory nor
//! its recovery grows with its history. Simulated transient failures and a processing delay
//! make retries and backpressure visible. Its per-order lines are DEBUG: at INFO a busy node
//! would log every order.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounter, Registry};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};
use warren::entity::store::{Appended, Claim, EntityStore, Record, Snapshot};
use warren::entity::{Entity, EntityError, EntityFactory, EntityId};
use warren::metrics::counter;
use warren::order::{CreateOrder, OrderId};

use crate::settings::ProductSettings;

/// Domain counters.
#[derive(Clone)]
pub struct ProductMetrics {
    /// `warren_entity_duplicates_total`: redelivered orders recognised and ignored.
    pub duplicates: IntCounter,
    /// `warren_orders_applied_total`: orders applied for the first time.
    pub applied: IntCounter,
}

impl ProductMetrics {
    /// Registers the domain series.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        Ok(ProductMetrics {
            duplicates: counter(
                registry,
                "warren_entity_duplicates_total",
                "Redelivered messages an entity recognised and ignored.",
            )?,
            applied: counter(
                registry,
                "warren_orders_applied_total",
                "Orders applied to their product for the first time.",
            )?,
        })
    }
}

/// What `GET /products/{id}` returns.
#[derive(Clone, Debug, Serialize)]
pub struct ProductSnapshot {
    /// The product.
    pub product_id: String,
    /// Sum of the quantities of the applied orders.
    pub total_quantity: u64,
    /// How many orders were applied.
    pub order_count: u64,
    /// The newest applied order ids (at most `product.recent_orders`), oldest first; every
    /// order is in the store (`GET /products/{id}/orders`).
    pub recent_orders: Vec<OrderId>,
}

/// What a product stores per applied order.
#[derive(Debug, Serialize, Deserialize)]
pub struct AppliedOrder {
    /// The order.
    pub order_id: OrderId,
    /// Its quantity.
    pub quantity: u32,
}

impl AppliedOrder {
    /// A stored record, read back.
    pub fn decode(record: &Record) -> Result<Self, EntityError> {
        serde_json::from_slice(&record.data)
            .map_err(|e| EntityError::new(format!("unreadable stored order: {e}")))
    }
}

/// A product's state: what its snapshots hold.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct ProductState {
    total_quantity: u64,
    order_count: u64,
    /// The newest order ids, oldest first.
    recent_orders: VecDeque<OrderId>,
}

impl ProductState {
    fn apply(&mut self, order: AppliedOrder, keep: usize) {
        self.total_quantity += u64::from(order.quantity);
        self.order_count += 1;
        self.recent_orders.push_back(order.order_id);
        while self.recent_orders.len() > keep {
            self.recent_orders.pop_front();
        }
    }
}

/// One product.
pub struct ProductActor {
    store: Arc<dyn EntityStore>,
    id: EntityId,
    /// This incarnation's claim on the product, taken when it recovers.
    claim: Option<Claim>,
    state: ProductState,
    /// The newest stored record `state` includes.
    last_seq: Option<u64>,
    /// Records `state` includes that the newest snapshot does not.
    unsnapshotted: u64,
    /// An append failed without saying whether it stored the order (the connection may have
    /// dropped after the commit): the state may lack a stored order until it loads again.
    unsure: bool,
    previously_failed: HashSet<OrderId>,
    rng: SmallRng,
    settings: Arc<ProductSettings>,
    metrics: ProductMetrics,
}

impl Entity for ProductActor {
    type Message = CreateOrder;
    type Snapshot = ProductSnapshot;

    async fn handle(&mut self, order: &CreateOrder) -> Result<(), EntityError> {
        if self.settings.processing_delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.settings.processing_delay_ms)).await;
        }
        if self.settings.failure_rate > 0.0 && self.rng.random_bool(self.settings.failure_rate) {
            debug!(
                "Network failure! Dropping order {order} from product [{}]",
                self.id
            );
            self.previously_failed.insert(order.order_id.clone());
            return Err(EntityError::new("simulated transient failure"));
        }
        if self.unsure {
            self.load().await?;
        }
        if self.state.recent_orders.contains(&order.order_id) {
            self.metrics.duplicates.inc();
            debug!(
                "Ignoring redelivered order {order} for product [{}]",
                self.id
            );
            return Ok(());
        }
        if self.previously_failed.remove(&order.order_id) {
            debug!(
                "Previously failed order {order} for product [{}] can now be successfully processed",
                self.id
            );
        }
        let applied = AppliedOrder {
            order_id: order.order_id.clone(),
            quantity: order.quantity,
        };
        let record = serde_json::to_vec(&applied)
            .map_err(|e| EntityError::new(format!("order does not serialize: {e}")))?;
        // The store key is the id's text; a UUID's is written without allocating.
        let mut buffer = OrderId::text_buffer();
        let key = order.order_id.as_text(&mut buffer);
        let Some(claim) = &self.claim else {
            return Err(EntityError::unavailable(
                "the product has not loaded its state",
            ));
        };
        let appended = self.store.append(claim, key, &record).await;
        let Appended::New { seq } = appended.inspect_err(|_| self.unsure = true)? else {
            // Applied before the ids kept reach back: the state, complete since it loaded (or
            // it would be unsure), has it.
            self.metrics.duplicates.inc();
            debug!(
                "Ignoring order {order} for product [{}]: already stored",
                self.id
            );
            return Ok(());
        };
        self.apply(seq, applied);
        self.metrics.applied.inc();
        debug!(
            "Added order {order} for product [{}] - {} total quantity ordered",
            self.id, self.state.total_quantity
        );
        self.snapshot_if_due().await
    }

    fn snapshot(&self) -> ProductSnapshot {
        ProductSnapshot {
            product_id: self.id.to_string(),
            total_quantity: self.state.total_quantity,
            order_count: self.state.order_count,
            recent_orders: self.state.recent_orders.iter().cloned().collect(),
        }
    }

    /// Claims the product (older incarnations can no longer store anything), then loads
    /// what was stored before.
    async fn recover(&mut self) -> Result<(), EntityError> {
        self.claim = Some(self.store.claim(&self.id).await?);
        self.load().await
    }
}

impl ProductActor {
    /// The newest snapshot, then the orders stored after it. Only a complete load replaces
    /// the state: half of one would be saved in the next snapshot, for good.
    async fn load(&mut self) -> Result<(), EntityError> {
        let recovery = self.store.recover(&self.id).await?;
        let keep = self.settings.recent_orders;
        let (mut state, mut last_seq) = match recovery.snapshot {
            Some(snapshot) => {
                let mut state: ProductState = serde_json::from_slice(&snapshot.data)
                    .map_err(|e| EntityError::new(format!("unreadable snapshot: {e}")))?;
                state
                    .recent_orders
                    .drain(..state.recent_orders.len().saturating_sub(keep));
                (state, Some(snapshot.seq))
            }
            None => (ProductState::default(), None),
        };
        for record in &recovery.records {
            state.apply(AppliedOrder::decode(record)?, keep);
            last_seq = Some(record.seq);
        }
        self.state = state;
        self.last_seq = last_seq;
        self.unsnapshotted = recovery.records.len() as u64;
        self.unsure = false;
        Ok(())
    }

    fn apply(&mut self, seq: u64, order: AppliedOrder) {
        self.state.apply(order, self.settings.recent_orders);
        self.last_seq = Some(seq);
        self.unsnapshotted += 1;
    }

    /// Saves a snapshot once `snapshot_every` orders came since the last. A snapshot only
    /// shortens recovery, so one that cannot be saved now is tried again after the next
    /// order; only a newer incarnation's claim stops this one.
    async fn snapshot_if_due(&mut self) -> Result<(), EntityError> {
        let every = self.settings.snapshot_every;
        let (Some(claim), Some(seq)) = (&self.claim, self.last_seq) else {
            return Ok(());
        };
        if every == 0 || self.unsnapshotted < every {
            return Ok(());
        }
        let data = serde_json::to_vec(&self.state)
            .map_err(|e| EntityError::new(format!("state does not serialize: {e}")))?;
        match self
            .store
            .save_snapshot(claim, &Snapshot { seq, data })
            .await
        {
            Ok(()) => self.unsnapshotted = 0,
            Err(error) if error.is_fenced() => return Err(error.into()),
            Err(error) => {
                warn!(product = %self.id, %error, "cannot save a snapshot; trying again later")
            }
        }
        Ok(())
    }
}

/// Creates a ProductActor for each product on its first order.
pub struct ProductFactory {
    /// Settings shared by all products.
    pub settings: Arc<ProductSettings>,
    /// Domain counters.
    pub metrics: ProductMetrics,
    /// Where products keep their applied orders.
    pub store: Arc<dyn EntityStore>,
}

impl EntityFactory for ProductFactory {
    type Entity = ProductActor;

    fn create(&self, id: &EntityId) -> ProductActor {
        ProductActor {
            store: Arc::clone(&self.store),
            id: id.clone(),
            claim: None,
            state: ProductState::default(),
            last_seq: None,
            unsnapshotted: 0,
            unsure: false,
            previously_failed: HashSet::new(),
            rng: SmallRng::from_rng(&mut rand::rng()),
            settings: Arc::clone(&self.settings),
            metrics: self.metrics.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;
    use warren::entity::store::{MemoryEntityStore, StoreError};

    use super::*;

    fn factory(failure_rate: f64) -> ProductFactory {
        factory_with(ProductSettings {
            failure_rate,
            ..ProductSettings::default()
        })
    }

    fn factory_with(settings: ProductSettings) -> ProductFactory {
        ProductFactory {
            settings: Arc::new(settings),
            metrics: ProductMetrics::register(&Registry::new()).unwrap(),
            store: Arc::new(MemoryEntityStore::default()),
        }
    }

    /// A product as the runner starts it: recovered before its first message.
    async fn started(factory: &ProductFactory, id: &str) -> ProductActor {
        let mut product = factory.create(&EntityId::new(id));
        product.recover().await.unwrap();
        product
    }

    fn order(product: &str, quantity: u32) -> CreateOrder {
        CreateOrder {
            order_id: Uuid::new_v4().into(),
            customer_id: "c".into(),
            product_id: product.into(),
            quantity,
            trace_context: None,
        }
    }

    #[tokio::test]
    async fn applies_orders_in_order_and_ignores_a_redelivered_one() {
        let factory = factory(0.0);
        let mut product = started(&factory, "7").await;
        let first = order("7", 3);
        let second = order("7", 4);
        product.handle(&first).await.unwrap();
        product.handle(&second).await.unwrap();
        product.handle(&first).await.unwrap();
        let snapshot = product.snapshot();
        assert_eq!(snapshot.total_quantity, 7);
        assert_eq!(snapshot.order_count, 2);
        assert_eq!(
            snapshot.recent_orders,
            vec![first.order_id.clone(), second.order_id.clone()]
        );
        assert_eq!(factory.metrics.duplicates.get(), 1);
        assert_eq!(factory.metrics.applied.get(), 2);
    }

    /// Most producers' order ids are not UUIDs: such an order is applied, stored under its id,
    /// and recognised when it comes again, also after a restart.
    #[tokio::test]
    async fn an_order_whose_id_is_not_a_uuid_is_applied_once_and_survives_a_restart() {
        let factory = factory(0.0);
        let text_id = CreateOrder {
            order_id: "ORD-1001".parse().unwrap(),
            ..order("7", 5)
        };
        let mut product = started(&factory, "7").await;
        product.handle(&text_id).await.unwrap();
        product.handle(&text_id).await.unwrap();
        let mut again = started(&factory, "7").await;
        again.handle(&text_id).await.unwrap();
        assert_eq!(again.snapshot().total_quantity, 5);
        assert_eq!(again.snapshot().recent_orders, vec![text_id.order_id]);
        assert_eq!(factory.metrics.duplicates.get(), 2);
    }

    #[tokio::test]
    async fn a_product_started_again_loads_its_orders_and_still_ignores_them() {
        let factory = factory(0.0);
        let first = order("7", 3);
        let second = order("7", 4);
        let mut product = started(&factory, "7").await;
        product.handle(&first).await.unwrap();
        product.handle(&second).await.unwrap();
        // Elsewhere, later: the same product from the same store.
        let mut again = started(&factory, "7").await;
        assert_eq!(again.snapshot().total_quantity, 7);
        assert_eq!(
            again.snapshot().recent_orders,
            vec![first.order_id.clone(), second.order_id.clone()]
        );
        again.handle(&first).await.unwrap();
        assert_eq!(again.snapshot().total_quantity, 7);
        assert_eq!(factory.metrics.duplicates.get(), 1);
    }

    #[tokio::test]
    async fn a_stale_incarnation_cannot_store_and_is_told_to_stop() {
        let factory = factory(0.0);
        let mut stale = started(&factory, "7").await;
        stale.handle(&order("7", 1)).await.unwrap();
        // The product starts elsewhere (its shard moved while the old node still runs).
        let mut newer = started(&factory, "7").await;
        let late = order("7", 5);
        let refused = stale.handle(&late).await.unwrap_err();
        assert!(refused.is_fenced(), "{refused}");
        assert_eq!(stale.snapshot().total_quantity, 1, "nothing applied");
        newer.handle(&late).await.unwrap();
        assert_eq!(newer.snapshot().total_quantity, 6);
        assert_eq!(factory.metrics.applied.get(), 2);
    }

    #[tokio::test]
    async fn a_simulated_failure_applies_nothing() {
        let factory = factory(1.0 - f64::EPSILON);
        let mut product = started(&factory, "7").await;
        let failing = order("7", 3);
        assert!(product.handle(&failing).await.is_err());
        assert_eq!(product.snapshot().total_quantity, 0);
        assert!(product.snapshot().recent_orders.is_empty());
    }

    #[tokio::test]
    async fn an_order_older_than_the_ids_kept_is_recognised_by_the_store() {
        let factory = factory_with(ProductSettings {
            recent_orders: 2,
            snapshot_every: 2,
            ..ProductSettings::default()
        });
        let mut product = started(&factory, "7").await;
        let orders: Vec<CreateOrder> = (1..=5).map(|q| order("7", q)).collect();
        for order in &orders {
            product.handle(order).await.unwrap();
        }
        let kept = product.snapshot().recent_orders;
        assert_eq!(kept, [&orders[3], &orders[4]].map(|o| o.order_id.clone()));
        product.handle(&orders[0]).await.unwrap();
        let snapshot = product.snapshot();
        assert_eq!((snapshot.total_quantity, snapshot.order_count), (15, 5));
        assert_eq!(
            snapshot.recent_orders, kept,
            "an old order is not applied again"
        );
        assert_eq!(factory.metrics.duplicates.get(), 1);
        assert_eq!(factory.metrics.applied.get(), 5);
    }

    #[tokio::test]
    async fn a_product_recovers_from_its_newest_snapshot_and_the_orders_after_it() {
        let factory = factory_with(ProductSettings {
            snapshot_every: 3,
            recent_orders: 4,
            ..ProductSettings::default()
        });
        let mut product = started(&factory, "7").await;
        let orders: Vec<CreateOrder> = (1..=7).map(|q| order("7", q)).collect();
        for order in &orders {
            product.handle(order).await.unwrap();
        }
        let id = EntityId::new("7");
        let stored = factory.store.records(&id, 0, usize::MAX).await.unwrap();
        let recovery = factory.store.recover(&id).await.unwrap();
        let snapshot = recovery.snapshot.expect("a snapshot after 6 orders");
        assert_eq!(snapshot.seq, stored[5].seq, "as of the sixth order");
        assert_eq!(recovery.records, stored[6..], "only the seventh after it");

        let again = started(&factory, "7").await;
        let (before, after) = (product.snapshot(), again.snapshot());
        assert_eq!(after.total_quantity, 28);
        assert_eq!(after.order_count, 7);
        assert_eq!(after.recent_orders, before.recent_orders);
        assert_eq!(after.recent_orders.len(), 4);
    }

    #[tokio::test]
    async fn a_stale_incarnation_cannot_save_a_snapshot() {
        let factory = factory_with(ProductSettings {
            snapshot_every: 2,
            ..ProductSettings::default()
        });
        let mut stale = started(&factory, "7").await;
        stale.handle(&order("7", 1)).await.unwrap();
        let _newer = started(&factory, "7").await;
        // Due for a snapshot as if a second order had been applied just before the claim.
        stale.unsnapshotted = 2;
        assert!(stale.snapshot_if_due().await.unwrap_err().is_fenced());
        let kept = factory.store.latest_snapshot(&EntityId::new("7")).await;
        assert_eq!(kept.unwrap(), None);
    }

    /// Stores appends in a memory store, but loses the answer to the next one.
    #[derive(Default)]
    struct LosingAnswers {
        store: MemoryEntityStore,
        lose_next: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl EntityStore for LosingAnswers {
        async fn claim(&self, entity: &EntityId) -> Result<Claim, StoreError> {
            self.store.claim(entity).await
        }
        async fn records(
            &self,
            e: &EntityId,
            from: u64,
            n: usize,
        ) -> Result<Vec<Record>, StoreError> {
            self.store.records(e, from, n).await
        }
        async fn append(&self, c: &Claim, k: &str, r: &[u8]) -> Result<Appended, StoreError> {
            let appended = self.store.append(c, k, r).await?;
            if self
                .lose_next
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                return Err(StoreError::Unavailable("connection lost".into()));
            }
            Ok(appended)
        }
        async fn latest_snapshot(&self, e: &EntityId) -> Result<Option<Snapshot>, StoreError> {
            self.store.latest_snapshot(e).await
        }
        async fn save_snapshot(&self, c: &Claim, s: &Snapshot) -> Result<(), StoreError> {
            self.store.save_snapshot(c, s).await
        }
    }

    #[tokio::test]
    async fn an_order_stored_but_not_answered_is_applied_once_when_it_comes_again() {
        let store = Arc::new(LosingAnswers::default());
        let factory = ProductFactory {
            store: store.clone(),
            ..factory_with(ProductSettings {
                recent_orders: 1,
                ..ProductSettings::default()
            })
        };
        let mut product = started(&factory, "7").await;
        let (first, second) = (order("7", 3), order("7", 4));
        store
            .lose_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(product.handle(&first).await.unwrap_err().is_unavailable());
        assert_eq!(product.snapshot().total_quantity, 0, "not applied yet");
        // The retry finds it stored: the product loads it instead of counting it twice or never.
        product.handle(&first).await.unwrap();
        product.handle(&second).await.unwrap();
        let snapshot = product.snapshot();
        assert_eq!((snapshot.total_quantity, snapshot.order_count), (7, 2));
        assert_eq!(
            factory.metrics.applied.get(),
            1,
            "the first was applied by loading it"
        );
    }
}
