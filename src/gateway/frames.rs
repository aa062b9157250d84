//! Client → server frames (contract §3), parsed without panics: anything
//! gives a frame or a typed error with the code the client gets.

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::ids::{Topic, UserId};
use crate::message::json_problem;

#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    Send {
        to: UserId,
        payload: String,
        r#ref: Option<Value>,
    },
    /// A topic, and the frame's `ref` for an error about it.
    Subscribe(Topic, Option<Value>),
    Unsubscribe(Topic),
    Ping,
    /// A new token for the same user (contract §3).
    Refresh(String),
}

/// A refused frame: the `error` frame's code, message and `ref`.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameError {
    pub code: &'static str,
    pub message: String,
    pub r#ref: Option<Value>,
}

impl FrameError {
    fn new(code: &'static str, message: impl Into<String>, r#ref: Option<Value>) -> Self {
        FrameError {
            code,
            message: message.into(),
            r#ref,
        }
    }
}

#[derive(Deserialize)]
struct Raw<'a> {
    #[serde(rename = "type")]
    kind: Option<Value>,
    to: Option<Value>,
    topic: Option<Value>,
    token: Option<Value>,
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    #[serde(rename = "ref")]
    r#ref: Option<Value>,
}

/// A field that is there, whatever it holds: `"payload": null` is a JSON
/// payload like any other (contract §4: RFC 8259), not a missing one
/// (serde alone reads a `null` into `None`).
pub(super) fn present<'de, D>(d: D) -> Result<Option<&'de RawValue>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    <&RawValue as serde::Deserialize>::deserialize(d).map(Some)
}

pub fn parse(text: &str, max_payload: usize) -> Result<ClientFrame, FrameError> {
    let raw: Raw = serde_json::from_str(text).map_err(|e| {
        if e.is_data() {
            FrameError::new("bad_frame", "a frame must be a JSON object", None)
        } else {
            FrameError::new("bad_json", format!("not JSON: {e}"), None)
        }
    })?;
    let r#ref = raw.r#ref.clone();
    let kind = match &raw.kind {
        Some(Value::String(s)) => s.as_str(),
        _ => {
            return Err(FrameError::new(
                "unknown_type",
                "missing or non-string \"type\"",
                r#ref,
            ));
        }
    };
    let topic = |r: &Raw| -> Result<Topic, FrameError> {
        match &r.topic {
            Some(Value::String(t)) => Topic::parse(t)
                .map_err(|e| FrameError::new("bad_frame", format!("topic {e}"), r#ref.clone())),
            _ => Err(FrameError::new(
                "bad_frame",
                "\"topic\" must be a string",
                r#ref.clone(),
            )),
        }
    };
    match kind {
        "send" => {
            let to = match &raw.to {
                Some(Value::String(u)) => UserId::parse(u).map_err(|e| {
                    FrameError::new("bad_frame", format!("recipient {e}"), r#ref.clone())
                })?,
                _ => {
                    return Err(FrameError::new(
                        "bad_frame",
                        "\"to\" must be a user id",
                        r#ref,
                    ));
                }
            };
            let payload = raw
                .payload
                .ok_or_else(|| {
                    FrameError::new("bad_frame", "\"payload\" is required", r#ref.clone())
                })?
                .get();
            if payload.len() > max_payload {
                return Err(FrameError::new(
                    "bad_frame",
                    format!("payload is over {max_payload} bytes"),
                    r#ref,
                ));
            }
            if let Some(why) = json_problem(payload) {
                return Err(FrameError::new("bad_frame", why, r#ref));
            }
            Ok(ClientFrame::Send {
                to,
                payload: payload.to_owned(),
                r#ref,
            })
        }
        "subscribe" => Ok(ClientFrame::Subscribe(topic(&raw)?, r#ref)),
        "unsubscribe" => Ok(ClientFrame::Unsubscribe(topic(&raw)?)),
        "ping" => Ok(ClientFrame::Ping),
        "refresh" => match raw.token {
            Some(Value::String(t)) => Ok(ClientFrame::Refresh(t)),
            _ => Err(FrameError::new(
                "bad_frame",
                "\"token\" must be a string",
                r#ref,
            )),
        },
        other => Err(FrameError::new(
            "unknown_type",
            format!(
                "unknown type {:?}",
                other.chars().take(32).collect::<String>()
            ),
            r#ref,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames() {
        assert_eq!(parse(r#"{"type":"ping"}"#, 10).unwrap(), ClientFrame::Ping);
        match parse(
            r#"{"type":"send","to":"bob","payload":{"a":[1]},"ref":7}"#,
            100,
        )
        .unwrap()
        {
            ClientFrame::Send { to, payload, r#ref } => {
                assert_eq!(to.as_str(), "bob");
                assert_eq!(payload, r#"{"a":[1]}"#);
                assert_eq!(r#ref, Some(Value::from(7)));
            }
            f => panic!("{f:?}"),
        }
        assert!(matches!(
            parse(r#"{"type":"subscribe","topic":"a/b"}"#, 1).unwrap(),
            ClientFrame::Subscribe(..)
        ));
        // `null` is a payload (RFC 8259), not a missing one.
        match parse(r#"{"type":"send","to":"bob","payload":null}"#, 100).unwrap() {
            ClientFrame::Send { payload, .. } => assert_eq!(payload, "null"),
            f => panic!("{f:?}"),
        }
    }

    #[test]
    fn errors() {
        let code = |s: &str| parse(s, 16).unwrap_err().code;
        assert_eq!(code("{nope"), "bad_json");
        assert_eq!(code(""), "bad_json");
        assert_eq!(code("[1]"), "bad_frame");
        assert_eq!(code("{}"), "unknown_type");
        assert_eq!(code(r#"{"type":"dance"}"#), "unknown_type");
        assert_eq!(code(r#"{"type":"send","payload":1}"#), "bad_frame");
        assert_eq!(
            code(r#"{"type":"send","to":"a b","payload":1}"#),
            "bad_frame"
        );
        assert_eq!(code(r#"{"type":"send","to":"a"}"#), "bad_frame");
        assert_eq!(
            code(r#"{"type":"send","to":"a","payload":"0123456789abcdef"}"#),
            "bad_frame"
        );
        assert_eq!(
            code(r#"{"type":"send","to":"a","payload":1e400}"#),
            "bad_frame"
        );
        assert_eq!(code(r#"{"type":"subscribe","topic":"a b"}"#), "bad_frame");
        // The reason names what is wrong (a lone surrogate: not a number).
        let e = parse(r#"{"type":"send","to":"a","payload":"\ud800"}"#, 16).unwrap_err();
        assert_eq!(e.code, "bad_frame");
        assert!(e.message.contains("escape"), "{}", e.message);
        let e = parse(r#"{"type":"send","to":"a b","payload":1,"ref":"r1"}"#, 16).unwrap_err();
        assert_eq!(e.r#ref, Some(Value::from("r1")));
    }
}
