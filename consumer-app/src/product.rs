//! The ProductActor of the original sample: per product, the orders applied (in application
//! order) and the total quantity. A redelivered order is recognised by its id and ignored, so
//! at-least-once delivery has an exactly-once effect. Each applied order is stored (an entity
//! store record keyed by the order id) before it is confirmed, and a product loads its records
//! when it starts, so its state and its deduplication survive a move to another node or a
//! crash. Simulated transient failures and a processing delay make retries and backpressure
//! visible. Its per-order lines are DEBUG: at INFO a busy node would log every order.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounter, Registry};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tracing::debug;
use warren::entity::store::{Appended, Claim, EntityStore};
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
    /// Applied order ids, in application order.
    pub orders: Vec<OrderId>,
}

/// What a product stores per applied order.
#[derive(Debug, Serialize, Deserialize)]
struct AppliedOrder {
    order_id: OrderId,
    quantity: u32,
}

/// One product's state.
pub struct ProductActor {
    store: Arc<dyn EntityStore>,
    id: EntityId,
    /// This incarnation's claim on the product, taken when it recovers.
    claim: Option<Claim>,
    orders: Vec<OrderId>,
    applied: HashSet<OrderId>,
    previously_failed: HashSet<OrderId>,
    total_quantity: u64,
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
        if self.applied.contains(&order.order_id) {
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
        let record = AppliedOrder {
            order_id: order.order_id.clone(),
            quantity: order.quantity,
        };
        let record = serde_json::to_vec(&record)
            .map_err(|e| EntityError::new(format!("order does not serialize: {e}")))?;
        // The store key is the id's text; a UUID's is written without allocating.
        let mut buffer = OrderId::text_buffer();
        let key = order.order_id.as_text(&mut buffer);
        let Some(claim) = &self.claim else {
            return Err(EntityError::unavailable(
                "the product has not loaded its state",
            ));
        };
        let appended = self.store.append(claim, key, &record).await?;
        if appended == Appended::Duplicate {
            // An earlier attempt stored it, and only its answer was lost (the connection
            // dropped after the commit): take the store's word for everything.
            self.load().await?;
            self.metrics.duplicates.inc();
            debug!(
                "Ignoring order {order} for product [{}]: already stored",
                self.id
            );
            return Ok(());
        }
        self.apply(order.order_id.clone(), order.quantity);
        self.metrics.applied.inc();
        debug!(
            "Added order {order} for product [{}] - {} total quantity ordered",
            self.id, self.total_quantity
        );
        Ok(())
    }

    fn snapshot(&self) -> ProductSnapshot {
        ProductSnapshot {
            product_id: self.id.to_string(),
            total_quantity: self.total_quantity,
            orders: self.orders.clone(),
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
    async fn load(&mut self) -> Result<(), EntityError> {
        let records = self.store.load(&self.id).await?;
        self.orders.clear();
        self.applied.clear();
        self.total_quantity = 0;
        for record in records {
            let order: AppliedOrder = serde_json::from_slice(&record)
                .map_err(|e| EntityError::new(format!("unreadable stored order: {e}")))?;
            self.apply(order.order_id, order.quantity);
        }
        Ok(())
    }

    fn apply(&mut self, order_id: OrderId, quantity: u32) {
        if self.applied.insert(order_id.clone()) {
            self.orders.push(order_id);
            self.total_quantity += u64::from(quantity);
        }
    }
}

/// Creates a ProductActor for each product on its first order.
pub struct ProductFactory {
    /// Simulation settings shared by all products.
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
            orders: Vec::new(),
            applied: HashSet::new(),
            previously_failed: HashSet::new(),
            total_quantity: 0,
            rng: SmallRng::from_rng(&mut rand::rng()),
            settings: Arc::clone(&self.settings),
            metrics: self.metrics.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;
    use warren::entity::store::MemoryEntityStore;

    use super::*;

    fn factory(failure_rate: f64) -> ProductFactory {
        ProductFactory {
            settings: Arc::new(ProductSettings {
                failure_rate,
                processing_delay_ms: 0,
            }),
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
        assert_eq!(
            snapshot.orders,
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
        assert_eq!(again.snapshot().orders, vec![text_id.order_id]);
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
            again.snapshot().orders,
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
        assert!(product.snapshot().orders.is_empty());
    }
}
