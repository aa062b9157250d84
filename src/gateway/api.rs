//! `POST /api/send` (contract §4): the HTTP way for apps to add a message.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::{ApiKey, Shared};
use crate::bus::Publish;
use crate::ids::{Topic, UserId};
use crate::message::{Target, is_json};

#[derive(Deserialize)]
struct Body<'a> {
    to: Option<String>,
    topic: Option<String>,
    from: Option<String>,
    #[serde(borrow)]
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
    if !is_json(payload) {
        return bad(
            StatusCode::BAD_REQUEST,
            "payload has a number that does not fit a double",
        );
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
