//! The consumer's HTTP endpoint: `/metrics` (Prometheus text), `/health`, `GET /products/{id}`
//! (the product's state, answered by the product wherever its shard lives; 404 if it has no
//! order) and `GET /cluster` (members, where each singleton runs, shards per node).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::IntGauge;
use serde_json::json;
use warren::entity::EntityId;
use warren::node::{ClusterNode, QueryError};
use warren::order::CreateOrder;

use warren::bridge::BRIDGE_SINGLETON;

/// Longest wait for a product's answer (its node may have just died: the shard moves first).
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct AppState {
    node: Arc<ClusterNode<CreateOrder>>,
    amqp_connected: IntGauge,
}

/// All routes, `/metrics` included.
pub fn router(
    metrics: Router,
    node: Arc<ClusterNode<CreateOrder>>,
    amqp_connected: IntGauge,
) -> Router {
    let state = AppState {
        node,
        amqp_connected,
    };
    Router::new()
        .route("/health", get(health))
        .route("/products/{id}", get(product))
        .route("/cluster", get(cluster))
        .with_state(state)
        .merge(metrics)
}

/// 200 while this node is Up, some node holds the bridge, and, if that is this node, it is
/// connected to the broker.
async fn health(State(state): State<AppState>) -> Response {
    let status = state.node.status();
    let up = status
        .members
        .iter()
        .any(|m| m.node == status.node && m.status == "up");
    let bridge_node = status.singletons.get(BRIDGE_SINGLETON).cloned().flatten();
    let consuming_here = bridge_node.as_deref() == Some(status.node.as_str());
    let connected = state.amqp_connected.get() == 1;
    let healthy = up && bridge_node.is_some() && (connected || !consuming_here);
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if healthy { "ok" } else { "degraded" },
        "node": status.node,
        "bridge_node": bridge_node,
        "amqp_connected": connected,
    });
    (code, axum::Json(body)).into_response()
}

async fn product(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let answer = state
        .node
        .query(EntityId::new(id.as_str()), QUERY_TIMEOUT)
        .await;
    match answer {
        // A product that never had an order is not a product (its entity only just started).
        Ok(snapshot) if snapshot["orders"].as_array().is_some_and(Vec::is_empty) => (
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

/// Longest wait for the other nodes to say which shards they host.
const SHARDS_TIMEOUT: Duration = Duration::from_secs(1);

async fn cluster(State(state): State<AppState>) -> axum::Json<warren::node::ClusterStatus> {
    axum::Json(state.node.cluster_status(SHARDS_TIMEOUT).await)
}
