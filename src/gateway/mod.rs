//! The HTTP side of a node: the WebSocket gateway, the app API and the ops
//! endpoints, on one port.
//!
//! - [`auth`]: tokens and `?user=` (dev).
//! - [`frames`]: client → server frames.
//! - [`session`]: one WebSocket connection.
//! - [`api`]: `POST /api/send`.
//! - [`ops`]: health, readiness, metrics and the cluster view (contract §8).
//! - [`listener`]: the TCP listener, with a handshake deadline.

pub mod api;
pub mod auth;
pub mod frames;
pub mod listener;
pub mod ops;
pub mod session;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use tokio_util::task::TaskTracker;

use crate::bus::{Bus, Resume};
use crate::config::{Config, Origins};
use crate::local::Registry;
use crate::metrics::Metrics;
use crate::shutdown::{Lifecycle, Phase};
use auth::Auth;

/// Read buffer per WebSocket: tungstenite's default (128 KiB) would cost
/// ~137 KB per idle connection. It is only the read chunk, allocated for
/// the connection's life: larger frames (up to --max-frame-bytes) still
/// arrive whole, the buffer growing as they do. Client frames are small (a
/// `send` of a typical payload, a pong); 256 bytes rather than 1 KiB saves
/// ~1.1 KB per idle connection (S2, issue 16).
const READ_BUFFER: usize = 256;
/// Frames gather up to this many bytes before a write; the session flushes
/// after each batch, so a batch (its frames and the ping that follows
/// them) is one write, not one per frame (0, which wrote every frame at
/// once, cost a second write per message at everyday rates: issue 16).
/// The buffer keeps its size after use; an idle connection that only got
/// `welcome` keeps a few hundred bytes.
const WRITE_BUFFER: usize = 8 * 1024;

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
    /// The node's phase: from `Leaving` on, not ready and no upgrades.
    pub life: Lifecycle,
    /// `--max-connections` slots; a session holds one for its whole life.
    pub conn_slots: Arc<tokio::sync::Semaphore>,
}

impl Shared {
    pub fn is_draining(&self) -> bool {
        self.life.at_least(Phase::Leaving)
    }
}

/// The clock of every session's rate limiter, shared: a clock of its own
/// per connection (governor's default) runs quanta's CPU detection — a
/// dozen `cpuid` instructions, each a trap to the hypervisor on a virtual
/// machine — in every upgrade (~1 % of a node's samples at full rate).
static CLOCK: std::sync::LazyLock<governor::clock::DefaultClock> =
    std::sync::LazyLock::new(governor::clock::DefaultClock::default);

pub fn routes(shared: Arc<Shared>) -> Router {
    // Calibrated (~5 ms of CPU) at start, not in the first client's upgrade.
    std::sync::LazyLock::force(&CLOCK);
    let mut r = Router::new()
        .route("/ws", get(ws))
        .route("/api/send", post(api::send))
        .route("/api/presence", get(api::presence))
        .route("/api/disconnect", post(api::disconnect))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/cluster", get(ops::cluster))
        .route("/client.js", get(client_js))
        .route("/admin", get(admin))
        .route("/admin/api/cluster", get(admin_cluster));
    if shared.cfg.dev || shared.cfg.demo {
        r = r.route("/", get(demo));
    }
    r.with_state(shared)
}

async fn demo() -> Html<&'static str> {
    Html(include_str!("demo.html"))
}

/// The JavaScript client library (an ES module, no dependencies).
async fn client_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("client.js"),
    )
        .into_response()
}

/// The operator page: static; it asks for the API key itself. 404 when no
/// `--api-key` is configured.
async fn admin(State(s): State<Arc<Shared>>) -> Response {
    if s.cfg.api_key.is_none() {
        return StatusCode::NOT_FOUND.into_response();
    }
    Html(include_str!("admin.html")).into_response()
}

/// The app's API key (bearer), checked before a handler runs: 404 when no
/// `--api-key` is configured, 401 when the key is wrong.
pub struct ApiKey;

impl axum::extract::FromRequestParts<Arc<Shared>> for ApiKey {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        s: &Arc<Shared>,
    ) -> Result<Self, Response> {
        let Some(key) = &s.cfg.api_key else {
            return Err(StatusCode::NOT_FOUND.into_response());
        };
        let given = bearer(&parts.headers).unwrap_or("");
        if constant_time_eq::constant_time_eq(given.as_bytes(), key.as_bytes()) {
            Ok(ApiKey)
        } else {
            Err((
                StatusCode::UNAUTHORIZED,
                axum::Json(serde_json::json!({"error": "bad api key"})),
            )
                .into_response())
        }
    }
}

/// `GET /admin/api/cluster`: the `/cluster` view plus this node's counters,
/// behind the API key (bearer).
async fn admin_cluster(_: ApiKey, State(s): State<Arc<Shared>>) -> Response {
    let view = match s.bus.cluster_view().await {
        Ok(v) => v,
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    };
    let mut v = match serde_json::to_value(&view) {
        Ok(v) => v,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    };
    v["counters"] = s
        .metrics
        .overview()
        .into_iter()
        .map(|(k, n)| (k.to_owned(), serde_json::Value::from(n)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    // Best effort: the page still shows the nodes without it.
    if let Ok(a) = s.bus.activity().await {
        v["online_users"] = serde_json::json!(a.online_users);
        v["events"] = serde_json::json!(a.events);
    }
    v["now_ms"] = serde_json::json!(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    );
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(v)).into_response()
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

/// `Authorization: Bearer <credentials>`; the scheme in any case (RFC 7235).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
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
    let resume = match resume_request(&q) {
        Ok(r) => r,
        Err(why) => return (StatusCode::BAD_REQUEST, why).into_response(),
    };
    if s.is_draining() || !s.bus.is_ready() {
        return (StatusCode::SERVICE_UNAVAILABLE, "node not ready\n").into_response();
    }
    // A slot is taken before the upgrade and held by the session, so
    // concurrent upgrades cannot overshoot --max-connections.
    let Ok(slot) = s.conn_slots.clone().try_acquire_owned() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections\n").into_response();
    };
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
    let start = Box::new(session::Start {
        shared: s,
        who,
        resume,
        slot,
    });
    upgrade
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| sessions.track_future(session::run(start, socket)))
}

/// `since` and `epoch` (contract §9): both or neither; `since` a
/// non-negative integer, `epoch` at most 128 characters and no control
/// character (empty is the epoch of history off). An epoch is "a random
/// string": any other one is another epoch (`recovered:false`), not a
/// malformed value.
fn resume_request(q: &HashMap<String, String>) -> Result<Option<Resume>, &'static str> {
    match (q.get("since"), q.get("epoch")) {
        (None, None) => Ok(None),
        (Some(since), Some(epoch)) => {
            // Digits only: `parse` would also take a leading `+`.
            let since = Some(since)
                .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or("since must be a non-negative integer\n")?;
            if epoch.len() > 128 || epoch.chars().any(char::is_control) {
                return Err("epoch is malformed\n");
            }
            Ok(Some(Resume {
                since,
                epoch: epoch.clone(),
            }))
        }
        _ => Err("since and epoch go together\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_in_any_case() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::AUTHORIZATION, v.parse().unwrap());
            m
        };
        assert_eq!(bearer(&h("Bearer k")), Some("k"));
        assert_eq!(bearer(&h("bearer k")), Some("k"));
        assert_eq!(bearer(&h("BEARER  k ")), Some("k"));
        assert_eq!(bearer(&h("Basic k")), None);
        assert_eq!(bearer(&h("Bearerk")), None);
    }

    #[test]
    fn resume_requests() {
        let q = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(resume_request(&q(&[])), Ok(None));
        assert_eq!(
            resume_request(&q(&[("since", "4"), ("epoch", "ab-1")])),
            Ok(Some(Resume {
                since: 4,
                epoch: "ab-1".into()
            }))
        );
        assert!(resume_request(&q(&[("since", "4")])).is_err());
        assert!(resume_request(&q(&[("epoch", "e")])).is_err());
        assert!(resume_request(&q(&[("since", "-1"), ("epoch", "e")])).is_err());
        assert!(resume_request(&q(&[("since", "x"), ("epoch", "e")])).is_err());
        assert!(resume_request(&q(&[("since", "+3"), ("epoch", "e")])).is_err());
        assert!(resume_request(&q(&[("since", ""), ("epoch", "e")])).is_err());
        assert!(resume_request(&q(&[("since", "1"), ("epoch", "e\n")])).is_err());
        assert!(
            resume_request(&q(&[("since", "1"), ("epoch", "e".repeat(129).as_str())])).is_err()
        );
        // Another epoch, however it looks: recovered:false, not 400.
        assert!(resume_request(&q(&[("since", "1"), ("epoch", "old epoch:1.2/x")])).is_ok());
    }

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
