//! A message on its way to users, and the server → client frames.
//!
//! Frames are serialized once per message per node and shared (cheaply
//! cloned bytes) between every connection that gets them.

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::ids::{ConnId, NodeId, Topic, UserId};

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    User(UserId),
    Topic(Topic),
}

/// A routed message. `payload` is JSON text already checked by
/// [`is_json`]; it is embedded verbatim into frames.
#[derive(Debug, Clone)]
pub struct Message {
    /// Public id: the send-stream entry id, `n/`-prefixed for shard n ≥ 1.
    pub id: String,
    pub target: Target,
    pub from: Option<UserId>,
    pub payload: String,
    /// How many times this message was routed again after reaching a node
    /// where its user no longer was (contract §6: at most 3).
    pub hops: u32,
    /// Unix ms when it entered the send stream (for the latency histogram).
    pub sent_ms: u64,
    /// Position in the user's history (contract §9): 0 until the router
    /// numbers it (and with history off); never changed once set.
    pub seq: u64,
    /// The user's epoch `seq` counts in (empty while `seq` is 0).
    pub epoch: Arc<str>,
    /// The app's idempotency key (`idem`, contract §4), until routed.
    pub idem: Option<String>,
    /// May have been routed before (read again from a pending list after a
    /// router stopped): the router looks for the `seq` it was given then.
    pub repeat: bool,
}

/// Re-route bound (contract §6): past it, the message goes to the mailbox.
pub const MAX_HOPS: u32 = 3;

#[derive(Serialize)]
struct MessageFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    from: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'a str>,
    payload: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<&'a str>,
}

impl Message {
    /// A message not yet routed: no hops, no `seq`.
    pub fn new(
        id: String,
        target: Target,
        from: Option<UserId>,
        payload: String,
        sent_ms: u64,
    ) -> Message {
        Message {
            id,
            target,
            from,
            payload,
            hops: 0,
            sent_ms,
            seq: 0,
            epoch: Arc::from(""),
            idem: None,
            repeat: false,
        }
    }

    pub fn user(&self) -> Option<&UserId> {
        match &self.target {
            Target::User(u) => Some(u),
            Target::Topic(_) => None,
        }
    }

    /// The `message` frame for clients.
    pub fn frame(&self) -> Utf8Bytes {
        // The payload was validated when the message was parsed; if it were
        // not JSON, embed it as a JSON string rather than corrupt the frame.
        let quoted;
        let raw: &RawValue = match serde_json::from_str::<&RawValue>(&self.payload) {
            Ok(r) => r,
            Err(_) => {
                quoted = RawValue::from_string(
                    serde_json::to_string(&self.payload).unwrap_or_else(|_| "null".into()),
                )
                .unwrap_or_else(|_| RawValue::NULL.to_owned());
                &quoted
            }
        };
        let frame = MessageFrame {
            kind: "message",
            id: &self.id,
            from: self.from.as_ref().map(UserId::as_str),
            topic: match &self.target {
                Target::Topic(t) => Some(t.as_str()),
                Target::User(_) => None,
            },
            payload: raw,
            seq: (self.seq > 0).then_some(self.seq),
            epoch: (self.seq > 0).then_some(&*self.epoch),
        };
        Utf8Bytes::from(serde_json::to_string(&frame).unwrap_or_default())
    }
}

/// True if `s` is one JSON text as RFC 8259 defines it, with numbers that
/// fit a double (serde_json refuses `NaN`, hex and out-of-range numbers).
pub fn is_json(s: &str) -> bool {
    json_problem(s).is_none()
}

/// Why `s` is not a payload [`is_json`] accepts, for the sender: serde_json's
/// account (a bad number, a lone surrogate escape, trailing text…).
pub fn json_problem(s: &str) -> Option<String> {
    serde_json::from_str::<AnyJson>(s).err().map(|e| {
        format!("payload is not JSON as RFC 8259 defines it (numbers must fit a double): {e}")
    })
}

/// Any JSON value, checked and not built: serde_json checks the syntax,
/// number ranges and nesting depth as it does for a `serde_json::Value`,
/// without allocating its nodes (every payload is checked once on the
/// routing path; building a `Value` was ~3,600 instructions a message).
struct AnyJson;

impl<'de> serde::Deserialize<'de> for AnyJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<AnyJson, D::Error> {
        d.deserialize_any(AnyJson)
    }
}

impl<'de> serde::de::Visitor<'de> for AnyJson {
    type Value = AnyJson;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<AnyJson, E> {
        Ok(AnyJson)
    }

    fn visit_i64<E>(self, _: i64) -> Result<AnyJson, E> {
        Ok(AnyJson)
    }

    fn visit_u64<E>(self, _: u64) -> Result<AnyJson, E> {
        Ok(AnyJson)
    }

    fn visit_f64<E>(self, _: f64) -> Result<AnyJson, E> {
        Ok(AnyJson)
    }

    fn visit_str<E>(self, _: &str) -> Result<AnyJson, E> {
        Ok(AnyJson)
    }

    fn visit_unit<E>(self) -> Result<AnyJson, E> {
        Ok(AnyJson)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<AnyJson, A::Error> {
        while a.next_element::<AnyJson>()?.is_some() {}
        Ok(AnyJson)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<AnyJson, A::Error> {
        while a.next_key::<serde::de::IgnoredAny>()?.is_some() {
            a.next_value::<AnyJson>()?;
        }
        Ok(AnyJson)
    }
}

/// A user's history position (contract §9): the epoch and the last `seq`
/// given under it. History off: `""` and 0.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    pub epoch: String,
    pub seq: u64,
}

/// The `welcome` frame; `recovered` answers a resume request (§9).
pub fn welcome(
    node: &NodeId,
    conn: &ConnId,
    user: &UserId,
    pos: &Position,
    recovered: Option<bool>,
) -> Utf8Bytes {
    json_frame(serde_json::json!({
        "type": "welcome", "node": node.as_str(), "conn": conn.as_str(), "user": user.as_str(),
        "epoch": pos.epoch, "seq": pos.seq, "recovered": recovered
    }))
}

/// An `error` frame.
pub fn error(code: &str, message: &str, r#ref: Option<&serde_json::Value>) -> Utf8Bytes {
    json_frame(serde_json::json!({
        "type": "error", "code": code, "message": message, "ref": r#ref
    }))
}

/// The `sent` acknowledgement of a client `send`.
pub fn sent(r#ref: Option<&serde_json::Value>, id: &str) -> Utf8Bytes {
    json_frame(serde_json::json!({"type": "sent", "ref": r#ref, "id": id}))
}

/// `subscribed` / `unsubscribed`.
pub fn topic_ack(kind: &str, topic: &Topic) -> Utf8Bytes {
    json_frame(serde_json::json!({"type": kind, "topic": topic.as_str()}))
}

/// `refreshed`: a `refresh` was accepted; the connection now lasts until
/// `exp` (Unix s) plus the leeway.
pub fn refreshed(exp: u64) -> Utf8Bytes {
    json_frame(serde_json::json!({"type": "refreshed", "exp": exp}))
}

pub fn pong() -> Utf8Bytes {
    Utf8Bytes::from_static(r#"{"type":"pong"}"#)
}

fn json_frame(v: serde_json::Value) -> Utf8Bytes {
    Utf8Bytes::from(v.to_string())
}

/// Unix time in ms from the local clock (latency figures only; leases use
/// Redis `TIME`).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_rules() {
        assert!(is_json(r#"{"a":[1,2.5,"x",null,true]}"#));
        assert!(is_json("3"));
        assert!(is_json(" \"s\" "));
        assert!(is_json(
            r#"{"k\u00e9":{"a":[[],{}],"b":-1.5e300,"c":18446744073709551615}}"#
        ));
        assert!(is_json(&("[".repeat(100) + &"]".repeat(100))));
        for bad in [
            "NaN",
            "0x10",
            "1e400",
            "{",
            "",
            "{'a':1}",
            "[1,]",
            "1 2",
            "Infinity",
            "{\"a\"}",
            "{1:2}",
            "\"\\x\"",
            "-1e999",
            "[1e400]",
            "{\"a\":1e400}",
        ] {
            assert!(!is_json(bad), "{bad:?}");
        }
        // As deep as a `serde_json::Value` may be, and no deeper.
        let deep = |n: usize| "[".repeat(n) + &"]".repeat(n);
        for n in [127, 128, 129, 200] {
            assert_eq!(
                is_json(&deep(n)),
                serde_json::from_str::<serde_json::Value>(&deep(n)).is_ok(),
                "depth {n}"
            );
        }
    }

    proptest::proptest! {
        /// Accepts exactly what `serde_json::Value` accepts.
        #[test]
        fn is_json_agrees_with_serde_json(s in r#"[\[\]{}:,"\\ 0-9eE.+\-a-z]{0,24}"#) {
            proptest::prop_assert_eq!(
                is_json(&s),
                serde_json::from_str::<serde_json::Value>(&s).is_ok()
            );
        }
    }

    #[test]
    fn message_frame() {
        let m = Message::new(
            "1-0".into(),
            Target::User(UserId::parse("bob").unwrap()),
            Some(UserId::parse("al").unwrap()),
            r#"{"x": 1}"#.into(),
            0,
        );
        let v: serde_json::Value = serde_json::from_str(m.frame().as_str()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"message","id":"1-0","from":"al","payload":{"x":1}})
        );
        let numbered = Message {
            seq: 7,
            epoch: Arc::from("e1"),
            ..m.clone()
        };
        let v: serde_json::Value = serde_json::from_str(numbered.frame().as_str()).unwrap();
        assert_eq!(
            (v["seq"].as_u64(), v["epoch"].as_str()),
            (Some(7), Some("e1"))
        );
        let t = Message {
            target: Target::Topic(Topic::parse("news").unwrap()),
            from: None,
            ..m
        };
        let v: serde_json::Value = serde_json::from_str(t.frame().as_str()).unwrap();
        assert_eq!(v["topic"], "news");
        assert_eq!(v["from"], serde_json::Value::Null);
    }
}
