//! The app's HTTP API: `POST /api/send` (contract §4), `GET /api/presence`
//! and `POST /api/disconnect` (§10).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::{ApiKey, Shared};
use crate::bus::Publish;
use crate::ids::{Topic, UserId};
use crate::message::{Target, json_problem};

#[derive(Deserialize)]
struct Body<'a> {
    to: Option<String>,
    topic: Option<String>,
    from: Option<String>,
    #[serde(borrow, default, deserialize_with = "super::frames::present")]
    payload: Option<&'a RawValue>,
    idempotency_key: Option<String>,
}

fn bad(status: StatusCode, reason: impl Into<String>) -> Response {
    (status, Json(json!({"error": reason.into()}))).into_response()
}

pub async fn send(_: ApiKey, State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let b: Body = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return bad(StatusCode::BAD_REQUEST, format!("bad JSON body: {e}")),
    };
    let target = match (&b.to, &b.topic) {
        (Some(u), None) => match UserId::parse(u) {
            Ok(u) => Target::User(u),
            Err(e) => return bad(StatusCode::BAD_REQUEST, format!("bad recipient: {e}")),
        },
        (None, Some(t)) => match Topic::parse(t) {
            Ok(t) => Target::Topic(t),
            Err(e) => return bad(StatusCode::BAD_REQUEST, format!("bad topic: {e}")),
        },
        _ => {
            return bad(
                StatusCode::BAD_REQUEST,
                "exactly one of \"to\" and \"topic\" is required",
            );
        }
    };
    let from = match b.from.as_deref().map(UserId::parse) {
        None => None,
        Some(Ok(f)) => Some(f),
        Some(Err(e)) => return bad(StatusCode::BAD_REQUEST, format!("bad from: {e}")),
    };
    // Same alphabet as `idem` in the send stream (contract §4).
    if let Some(k) = &b.idempotency_key
        && UserId::parse(k).is_err()
    {
        return bad(
            StatusCode::BAD_REQUEST,
            "bad idempotency_key: 1-128 characters of A-Z a-z 0-9 _ - . @ : + =",
        );
    }
    let Some(payload) = b.payload.map(RawValue::get) else {
        return bad(StatusCode::BAD_REQUEST, "\"payload\" is required");
    };
    if payload.len() > s.cfg.max_payload_bytes {
        return bad(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("payload is over {} bytes", s.cfg.max_payload_bytes),
        );
    }
    if let Some(why) = json_problem(payload) {
        return bad(StatusCode::BAD_REQUEST, why);
    }
    match s
        .bus
        .publish(Publish {
            target,
            payload: payload.to_owned(),
            from,
            idem: b.idempotency_key,
        })
        .await
    {
        Ok(id) => (StatusCode::ACCEPTED, Json(json!({"id": id}))).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "api send failed");
            bad(StatusCode::SERVICE_UNAVAILABLE, "not accepted, try again")
        }
    }
}

/// Users one presence request may ask about.
const PRESENCE_MAX: usize = 1000;

/// `GET /api/presence?user=a&user=b`: live connections per user.
pub async fn presence(_: ApiKey, State(s): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
    let mut users: Vec<UserId> = Vec::new();
    for (k, v) in url::form_urlencoded::parse(q.unwrap_or_default().as_bytes()) {
        if k != "user" {
            continue;
        }
        match UserId::parse(&v) {
            Ok(u) if !users.contains(&u) => users.push(u),
            Ok(_) => {}
            Err(e) => return bad(StatusCode::BAD_REQUEST, format!("bad user {v:?}: {e}")),
        }
    }
    if users.is_empty() || users.len() > PRESENCE_MAX {
        return bad(
            StatusCode::BAD_REQUEST,
            format!("ask about 1 to {PRESENCE_MAX} users: ?user=a&user=b"),
        );
    }
    match s.bus.presence(&users).await {
        Ok(counts) => {
            let map: serde_json::Map<String, serde_json::Value> = users
                .iter()
                .zip(counts)
                .map(|(u, n)| (u.to_string(), json!({"online": n > 0, "connections": n})))
                .collect();
            (StatusCode::OK, Json(json!({"users": map}))).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "presence failed");
            bad(StatusCode::SERVICE_UNAVAILABLE, "not available, try again")
        }
    }
}

#[derive(Deserialize)]
struct DisconnectBody {
    user: Option<String>,
    code: Option<serde_json::Value>,
    reason: Option<String>,
}

/// `POST /api/disconnect {"user","code","reason"}`: close the user's
/// connections on every node (contract §10).
pub async fn disconnect(_: ApiKey, State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let b: DisconnectBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return bad(StatusCode::BAD_REQUEST, format!("bad JSON body: {e}")),
    };
    let user = match b.user.as_deref().map(UserId::parse) {
        Some(Ok(u)) => u,
        Some(Err(e)) => return bad(StatusCode::BAD_REQUEST, format!("bad user: {e}")),
        None => return bad(StatusCode::BAD_REQUEST, "\"user\" is required"),
    };
    let code = match &b.code {
        None => 4000,
        Some(v) => match v.as_u64() {
            Some(c @ 4000..=4099) => c as u16,
            _ => {
                return bad(
                    StatusCode::BAD_REQUEST,
                    "\"code\" must be an integer from 4000 to 4099",
                );
            }
        },
    };
    let reason = b.reason.unwrap_or_default();
    if reason.len() > 120 {
        return bad(StatusCode::BAD_REQUEST, "\"reason\" is over 120 bytes");
    }
    match s.bus.disconnect(&user, code, &reason).await {
        Ok(n) => (StatusCode::ACCEPTED, Json(json!({"connections": n}))).into_response(),
        Err(e) => {
            tracing::warn!(user = %user, error = %e, "disconnect failed");
            bad(StatusCode::SERVICE_UNAVAILABLE, "not accepted, try again")
        }
    }
}
