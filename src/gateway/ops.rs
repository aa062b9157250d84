//! Operations endpoints (contract §8): health, readiness, metrics, and the
//! cluster view.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::Shared;

/// 200 while the process runs.
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// 200 only while the node holds its lease, is not draining and reaches
/// Redis (§8: 503 once its heartbeats have failed for a heartbeat, before
/// the lease itself lapses).
pub async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    if !s.is_draining() && s.bus.is_ready() && !s.bus.cut_off() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

pub async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

pub async fn cluster(State(s): State<Arc<Shared>>) -> Response {
    match s.bus.cluster_view().await {
        Ok(v) => Json(v).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}
