//! The consumer's HTTP endpoint: `/metrics` (Prometheus text), `/health` (200 while consuming,
//! 503 otherwise) and `GET /products/{id}` (the product entity's state, 404 if unknown here).

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::IntGauge;
use serde_json::json;
use warren::entity::{EntityId, EntityQueries};

use crate::product::ProductActor;

#[derive(Clone)]
struct AppState {
    products: EntityQueries<ProductActor>,
    amqp_connected: IntGauge,
}

/// All routes, `/metrics` included.
pub fn router(
    metrics: Router,
    products: EntityQueries<ProductActor>,
    amqp_connected: IntGauge,
) -> Router {
    let state = AppState {
        products,
        amqp_connected,
    };
    Router::new()
        .route("/health", get(health))
        .route("/products/{id}", get(product))
        .with_state(state)
        .merge(metrics)
}

async fn health(State(state): State<AppState>) -> Response {
    let connected = state.amqp_connected.get() == 1;
    let status = if connected {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if connected { "ok" } else { "degraded" },
        "amqp_connected": connected,
    });
    (status, axum::Json(body)).into_response()
}

async fn product(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.products.query(&EntityId::new(id.as_str())).await {
        Some(snapshot) => axum::Json(snapshot).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({ "error": "unknown product", "product_id": id })),
        )
            .into_response(),
    }
}
