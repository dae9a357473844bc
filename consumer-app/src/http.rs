//! The consumer's HTTP endpoint: `/metrics` (Prometheus text), `/livez` and `/readyz` (for
//! an orchestrator's probes), `/health` (the cluster consumes every queue), `GET /products/{id}`
//! (the product's state, answered by the product wherever its shard lives; 404 if it has no
//! order), `GET /products/{id}/orders?from=SEQ&limit=N` (its applied orders a page at a time,
//! read from the entity store this node uses) and `GET /cluster` (members, where each
//! singleton runs, shards per node).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::IntGauge;
use serde::Deserialize;
use serde_json::json;
use warren::entity::EntityId;
use warren::entity::store::EntityStore;
use warren::node::{ClusterNode, QueryError};
use warren::order::CreateOrder;

use crate::product::AppliedOrder;

/// Longest wait for a product's answer (its node may have just died: the shard moves first).
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// One bridge singleton: its name and the gauge that says its consumer is connected.
pub type BridgeGauge = (String, IntGauge);

/// Orders per page of `/products/{id}/orders` unless `limit` says otherwise.
const PAGE: usize = 100;
/// The most orders one page holds, whatever `limit` asks: a page is read into memory whole.
const MAX_PAGE: usize = 1000;

#[derive(Clone)]
struct AppState {
    node: Arc<ClusterNode<CreateOrder>>,
    bridges: Arc<[BridgeGauge]>,
    store: Arc<dyn EntityStore>,
}

/// All routes, `/metrics` included; `bridges` are the bridge singletons, one per partition,
/// and `store` is where products keep their orders.
pub fn router(
    metrics: Router,
    node: Arc<ClusterNode<CreateOrder>>,
    bridges: Vec<BridgeGauge>,
    store: Arc<dyn EntityStore>,
) -> Router {
    let state = AppState {
        node,
        bridges: bridges.into(),
        store,
    };
    Router::new()
        .route("/livez", get(live))
        .route("/readyz", get(ready))
        .route("/health", get(health))
        .route("/products/{id}", get(product))
        .route("/products/{id}/orders", get(orders))
        .route("/cluster", get(cluster))
        .with_state(state)
        .merge(metrics)
}

/// Always 200: answering at all shows the process and its runtime run. A liveness probe must
/// not depend on other nodes or the broker, or their outage would restart every node.
async fn live() -> Response {
    axum::Json(json!({ "status": "live" })).into_response()
}

/// What readiness and health are judged on.
struct Standing {
    node: String,
    /// This node is an Up member.
    up: bool,
    /// Each bridge singleton and the node that holds it, if any.
    bridge_nodes: BTreeMap<String, Option<String>>,
    /// This node holds some bridge.
    consuming_here: bool,
    /// Every bridge this node holds is connected to the broker.
    amqp_connected: bool,
}

impl Standing {
    fn of(state: &AppState) -> Standing {
        let status = state.node.status();
        let up = status
            .members
            .iter()
            .any(|m| m.node == status.node && m.status == "up");
        let held_here = |name: &str| {
            status.singletons.get(name).cloned().flatten().as_deref() == Some(status.node.as_str())
        };
        let consuming_here = state.bridges.iter().any(|(name, _)| held_here(name));
        let amqp_connected = state
            .bridges
            .iter()
            .filter(|(name, _)| held_here(name))
            .all(|(_, connected)| connected.get() == 1);
        let bridge_nodes = state
            .bridges
            .iter()
            .map(|(name, _)| (name.clone(), status.singletons.get(name).cloned().flatten()))
            .collect();
        Standing {
            consuming_here,
            up,
            bridge_nodes,
            node: status.node,
            amqp_connected: consuming_here && amqp_connected,
        }
    }

    /// The node holding the first (or only) bridge, if any.
    fn bridge_node(&self) -> Option<String> {
        self.bridge_nodes.values().next().cloned().flatten()
    }

    /// Every bridge is held by some node.
    fn every_bridge_held(&self) -> bool {
        self.bridge_nodes.values().all(Option::is_some)
    }

    /// Up, and connected to the broker if it consumes the queue.
    fn ready(&self) -> bool {
        self.up && (self.amqp_connected || !self.consuming_here)
    }
}

fn answer(ok: bool, body: serde_json::Value) -> Response {
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

/// 200 while this node is Up in its cluster and, if it consumes the queue, connected to the
/// broker: it may take traffic. 503 while it joins, leaves, or has lost the broker it needs.
async fn ready(State(state): State<AppState>) -> Response {
    let standing = Standing::of(&state);
    let ready = standing.ready();
    let body = json!({
        "status": if ready { "ready" } else { "not ready" },
        "node": standing.node,
        "up": standing.up,
        "consuming_here": standing.consuming_here,
        "amqp_connected": standing.amqp_connected,
    });
    answer(ready, body)
}

/// 200 while this node is ready ([`ready`]) and every bridge is held by some node: the
/// cluster consumes every queue (each partition's).
async fn health(State(state): State<AppState>) -> Response {
    let standing = Standing::of(&state);
    let healthy = standing.ready() && standing.every_bridge_held();
    let body = json!({
        "status": if healthy { "ok" } else { "degraded" },
        "node": standing.node,
        "bridge_node": standing.bridge_node(),
        "bridge_nodes": standing.bridge_nodes,
        "amqp_connected": standing.amqp_connected,
    });
    answer(healthy, body)
}

async fn product(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let answer = state
        .node
        .query(EntityId::new(id.as_str()), QUERY_TIMEOUT)
        .await;
    match answer {
        // A product that never had an order is not a product (its entity only just started).
        Ok(snapshot) if snapshot["order_count"] == 0 => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({ "error": "unknown product", "product_id": id })),
        )
            .into_response(),
        Ok(snapshot) => axum::Json(snapshot).into_response(),
        Err(error @ QueryError::Timeout(..)) => (
            StatusCode::GATEWAY_TIMEOUT,
            axum::Json(json!({ "error": error.to_string() })),
        )
            .into_response(),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "error": error.to_string() })),
        )
            .into_response(),
    }
}

/// Which page of a product's orders.
#[derive(Debug, Deserialize)]
struct Page {
    /// The first `seq` to include (a page's `next`).
    #[serde(default)]
    from: u64,
    limit: Option<usize>,
}

/// A page of the product's applied orders in the order applied, each with its `seq`, and
/// `next` (the `from` of the next page) unless it is the last; 404 for a product without
/// orders, as `/products/{id}`. Read from the store, not the
/// product, so the whole history is there however little the product keeps in memory; a
/// store of this node's own (`memory`, `embedded`) holds only the products that ran here.
async fn orders(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(page): Query<Page>,
) -> Response {
    let limit = page.limit.unwrap_or(PAGE).clamp(1, MAX_PAGE);
    let entity = EntityId::new(id.as_str());
    let mut records = match state.store.records(&entity, page.from, limit + 1).await {
        Ok(records) => records,
        Err(error) => {
            let code = if error.is_unavailable() {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            return (code, axum::Json(json!({ "error": error.to_string() }))).into_response();
        }
    };
    if records.is_empty() && page.from == 0 {
        let body = json!({ "error": "unknown product", "product_id": id });
        return (StatusCode::NOT_FOUND, axum::Json(body)).into_response();
    }
    let next = (records.len() > limit).then(|| records[limit].seq);
    records.truncate(limit);
    let mut orders = Vec::with_capacity(records.len());
    for record in &records {
        match AppliedOrder::decode(record) {
            Ok(order) => orders.push(json!({
                "seq": record.seq,
                "order_id": order.order_id,
                "quantity": order.quantity,
            })),
            Err(error) => {
                let body = json!({ "error": error.to_string(), "seq": record.seq });
                return (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(body)).into_response();
            }
        }
    }
    axum::Json(json!({ "product_id": id, "orders": orders, "next": next })).into_response()
}

/// Longest wait for the other nodes to say which shards they host.
const SHARDS_TIMEOUT: Duration = Duration::from_secs(1);

async fn cluster(State(state): State<AppState>) -> axum::Json<warren::node::ClusterStatus> {
    axum::Json(state.node.cluster_status(SHARDS_TIMEOUT).await)
}
