//! The HTTP side of a node: the WebSocket gateway, the app API and the ops
//! endpoints, on one port.
//!
//! - [`auth`]: tokens and `?user=` (dev).
//! - [`frames`]: client → server frames.
//! - [`session`]: one WebSocket connection.
//! - [`registry`]: the connections of this node.
//! - [`api`]: `POST /api/send`.

pub mod api;
pub mod auth;
pub mod frames;
pub mod registry;
pub mod session;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{Query, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use tokio_util::task::TaskTracker;

use crate::bus::Bus;
use crate::config::{Config, Origins};
use crate::ops;
use crate::ops::metrics::Metrics;
use auth::Auth;
use registry::Registry;

/// Read buffer per WebSocket: tungstenite's default (128 KiB) would cost
/// ~137 KB per idle connection; 4 KiB costs ~6 KB.
const READ_BUFFER: usize = 4096;

/// State shared by every handler and session of a node.
pub struct Shared {
    pub cfg: Arc<Config>,
    pub registry: Arc<Registry>,
    pub bus: Arc<dyn Bus>,
    pub metrics: Arc<Metrics>,
    pub auth: Auth,
    /// WebSocket sessions (axum's graceful shutdown does not wait for
    /// upgraded connections).
    pub sessions: TaskTracker,
    pub draining: AtomicBool,
}

impl Shared {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

pub fn router(shared: Arc<Shared>) -> Router {
    let mut r = Router::new()
        .route("/ws", get(ws))
        .route("/api/send", post(api::send))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/cluster", get(ops::cluster));
    if shared.cfg.dev {
        r = r.route("/", get(demo));
    }
    r.with_state(shared)
}

async fn demo() -> Html<&'static str> {
    Html(include_str!("demo.html"))
}

fn origin_allowed(origins: &Origins, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        // Not a browser: cross-site hijacking needs one.
        return true;
    };
    match origins {
        Origins::Any => true,
        Origins::List(list) => origin
            .to_str()
            .map(|o| list.iter().any(|a| a == o.trim_end_matches('/')))
            .unwrap_or(false),
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

async fn ws(
    State(s): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if !origin_allowed(&s.cfg.origins, &headers) {
        return (StatusCode::FORBIDDEN, "origin not allowed\n").into_response();
    }
    let token = q
        .get("token")
        .map(String::as_str)
        .or_else(|| bearer(&headers));
    let who = match s
        .auth
        .authenticate(token, q.get("user").map(String::as_str))
    {
        Ok(p) => p,
        Err(e) => {
            tracing::info!(error = %e, "websocket refused: 401");
            return (StatusCode::UNAUTHORIZED, "unauthorized\n").into_response();
        }
    };
    if s.is_draining() || !s.bus.is_ready() {
        return (StatusCode::SERVICE_UNAVAILABLE, "node not ready\n").into_response();
    }
    if s.registry.len() >= s.cfg.max_connections {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections\n").into_response();
    }
    match s.bus.user_connections(&who.user).await {
        Ok(n) if n >= s.cfg.max_conns_per_user => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                "too many connections for this user\n",
            )
                .into_response();
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(user = %who.user, error = %e, "connection count failed");
            return (StatusCode::SERVICE_UNAVAILABLE, "node not ready\n").into_response();
        }
    }
    let max = s.cfg.max_frame_bytes;
    let sessions = s.sessions.clone();
    upgrade
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| sessions.track_future(session::run(s, socket, who)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let mut h = HeaderMap::new();
        let list = Origins::List(vec!["https://a.com".into()]);
        assert!(origin_allowed(&list, &h));
        assert!(origin_allowed(&Origins::List(vec![]), &h));
        h.insert(header::ORIGIN, "https://a.com".parse().unwrap());
        assert!(origin_allowed(&list, &h));
        assert!(origin_allowed(&Origins::Any, &h));
        assert!(!origin_allowed(&Origins::List(vec![]), &h));
        h.insert(header::ORIGIN, "https://evil.com".parse().unwrap());
        assert!(!origin_allowed(&list, &h));
    }
}
