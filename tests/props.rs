//! Hostile input (issue 6, item 4): property tests over the client-frame
//! parser and the send-stream entry parser. Whatever the bytes, each gives a
//! frame or a typed error, never a panic; what is accepted is always within
//! the contract (valid ids, JSON payloads no larger than the limit).

use proptest::prelude::*;
use serde_json::{Value, json};
use wscluster::frames::{self, ClientFrame};
use wscluster::ids::{Topic, UserId};
use wscluster::stream::RawEntry;
use wscluster::{DeadReason, parse_send};

/// The contract's user id: ^[A-Za-z0-9_\-.@:+=]{1,128}$ (written here
/// independently of `src/ids.rs`).
fn contract_user(s: &str) -> bool {
    let n = s.chars().count();
    (1..=128).contains(&n)
        && s.chars().all(|c| {
            c.is_ascii_uppercase()
                || c.is_ascii_lowercase()
                || c.is_ascii_digit()
                || "_-.@:+=".contains(c)
        })
}

/// A topic name: the same set plus '/'.
fn contract_topic(s: &str) -> bool {
    let n = s.chars().count();
    (1..=128).contains(&n) && s.chars().all(|c| c == '/' || contract_user(&c.to_string()))
}

const CODES: &[&str] = &[
    "bad_json",
    "bad_frame",
    "unknown_type",
    "forbidden_topic",
    "rate_limited",
    "unavailable",
];

/// Check one `frames::parse` result against the contract.
fn check_frame(text: &str, max: usize) -> Result<(), TestCaseError> {
    match frames::parse(text, max) {
        Ok(ClientFrame::Send { to, payload, .. }) => {
            prop_assert!(contract_user(to.as_str()), "accepted recipient {to:?}");
            prop_assert!(
                payload.len() <= max,
                "payload over {max}: {}",
                payload.len()
            );
            prop_assert!(
                serde_json::from_str::<Value>(&payload).is_ok(),
                "payload is JSON: {payload:?}"
            );
        }
        Ok(ClientFrame::Subscribe(t, _)) | Ok(ClientFrame::Unsubscribe(t)) => {
            prop_assert!(contract_topic(t.as_str()), "accepted topic {t:?}");
        }
        Ok(ClientFrame::Ping) | Ok(ClientFrame::Refresh(_)) => {}
        Err(e) => {
            prop_assert!(CODES.contains(&e.code), "unknown code {}", e.code);
        }
    }
    Ok(())
}

/// Strings that look like ids, with hostile characters mixed in.
fn id_like() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9_.@:+=/-]{0,140}",
        "[a-z{}* \\n\\t\"/\\\\]{0,12}",
        any::<String>(),
        Just("x".repeat(128)),
        Just("x".repeat(129)),
        Just("é".to_owned()),
    ]
}

/// Arbitrary JSON values (bounded depth).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Frame-shaped JSON objects with arbitrary members.
fn frame_like() -> impl Strategy<Value = String> {
    let kind = prop_oneof![
        Just(json!("send")),
        Just(json!("subscribe")),
        Just(json!("unsubscribe")),
        Just(json!("ping")),
        any::<String>().prop_map(Value::from),
        Just(json!(7)),
        Just(Value::Null),
    ];
    (
        prop::option::of(kind),
        prop::option::of(prop_oneof![id_like().prop_map(Value::from), json_value()]),
        prop::option::of(prop_oneof![id_like().prop_map(Value::from), json_value()]),
        prop::option::of(json_value()),
        prop::option::of(json_value()),
    )
        .prop_map(|(kind, to, topic, payload, r)| {
            let mut m = serde_json::Map::new();
            for (k, v) in [
                ("type", kind),
                ("to", to),
                ("topic", topic),
                ("payload", payload),
                ("ref", r),
            ] {
                if let Some(v) = v {
                    m.insert(k.to_owned(), v);
                }
            }
            Value::Object(m).to_string()
        })
}

fn entry_fields() -> impl Strategy<Value = Vec<(Vec<u8>, Vec<u8>)>> {
    let name = prop_oneof![
        Just(b"to".to_vec()),
        Just(b"topic".to_vec()),
        Just(b"payload".to_vec()),
        Just(b"from".to_vec()),
        prop::collection::vec(any::<u8>(), 0..12),
    ];
    let value = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..80),
        id_like().prop_map(String::into_bytes),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        Just(b"NaN".to_vec()),
        Just(b"1e400".to_vec()),
        Just(vec![b'['; 10_000]),
    ];
    prop::collection::vec((name, value), 0..7)
}

fn deep(open: &str, n: usize) -> String {
    open.repeat(n)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, .. ProptestConfig::default() })]

    #[test]
    fn frames_any_string(s in any::<String>(), max in 0usize..200) {
        check_frame(&s, max)?;
    }

    #[test]
    fn frames_any_bytes(b in prop::collection::vec(any::<u8>(), 0..300), max in 0usize..200) {
        check_frame(&String::from_utf8_lossy(&b), max)?;
    }

    #[test]
    fn frames_shaped(s in frame_like(), max in 0usize..300) {
        check_frame(&s, max)?;
    }

    /// A `send` whose payload text is over the limit is always refused with
    /// `bad_frame`, whatever the recipient or payload.
    #[test]
    fn frames_oversized_payload_refused(
        to in "[A-Za-z0-9_.@:+=-]{1,128}",
        payload in json_value(),
        max in 0usize..64,
    ) {
        let p = payload.to_string();
        prop_assume!(p.len() > max);
        let text = json!({"type":"send","to":to,"payload":payload}).to_string();
        let e = frames::parse(&text, max).expect_err("oversized payload accepted");
        prop_assert_eq!(e.code, "bad_frame");
    }

    #[test]
    fn entries_any_fields(
        fields in entry_fields(),
        id in any::<String>(),
        shard in 0u32..4,
        max in 0usize..200,
    ) {
        let e = RawEntry { id, fields };
        match parse_send(&e, shard, max) {
            Ok(m) => {
                prop_assert!(m.payload.len() <= max);
                prop_assert!(serde_json::from_str::<Value>(&m.payload).is_ok());
                match &m.target {
                    wscluster::message::Target::User(u) => prop_assert!(contract_user(u.as_str())),
                    wscluster::message::Target::Topic(t) => prop_assert!(contract_topic(t.as_str())),
                }
                if let Some(f) = &m.from {
                    prop_assert!(contract_user(f.as_str()));
                }
            }
            Err(r) => {
                // A typed reason with a short code for <p>:dead.
                prop_assert!(!r.code().is_empty());
            }
        }
    }

    /// An otherwise valid entry whose payload is over the limit is always
    /// `too_large`.
    #[test]
    fn entries_oversized_payload_refused(
        to in "[A-Za-z0-9_.@:+=-]{1,128}",
        payload in json_value(),
        max in 0usize..64,
    ) {
        let p = payload.to_string();
        prop_assume!(p.len() > max);
        let e = RawEntry {
            id: "1-0".into(),
            fields: vec![(b"to".to_vec(), to.into_bytes()), (b"payload".to_vec(), p.into_bytes())],
        };
        prop_assert_eq!(parse_send(&e, 0, max).unwrap_err(), DeadReason::TooLarge);
    }

    #[test]
    fn user_ids(s in id_like()) {
        match UserId::parse(&s) {
            Ok(u) => {
                prop_assert!(contract_user(u.as_str()), "accepted {s:?}");
                prop_assert_eq!(u.as_str(), s.as_str());
            }
            Err(_) => prop_assert!(!contract_user(&s), "refused a valid id {s:?}"),
        }
    }

    #[test]
    fn topics(s in id_like()) {
        match Topic::parse(&s) {
            Ok(t) => {
                prop_assert!(contract_topic(t.as_str()), "accepted {s:?}");
                prop_assert_eq!(t.as_str(), s.as_str());
            }
            Err(_) => prop_assert!(!contract_topic(&s), "refused a valid topic {s:?}"),
        }
    }
}

/// Deep nesting and huge inputs: a typed error, no stack overflow.
#[test]
fn frames_deep_nesting() {
    for n in [100, 1_000, 100_000] {
        for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
            let nested = format!("{}1{}", deep(open, n), deep(close, n));
            for text in [
                nested.clone(),
                format!(r#"{{"type":"send","to":"bob","payload":{nested}}}"#),
                format!(r#"{{"type":"ping","ref":{nested}}}"#),
                format!(r#"{{"type":"subscribe","topic":{nested}}}"#),
                format!(r#"{{"type":{nested}}}"#),
            ] {
                check_frame(&text, 1 << 20).unwrap();
            }
        }
    }
    for payload in ["NaN", "0x10", "1e400", "-Infinity", "'a'", "01"] {
        let text = format!(r#"{{"type":"send","to":"bob","payload":{payload}}}"#);
        assert!(frames::parse(&text, 1000).is_err(), "{payload} refused");
        let e = RawEntry {
            id: "1-0".into(),
            fields: vec![
                (b"to".to_vec(), b"bob".to_vec()),
                (b"payload".to_vec(), payload.as_bytes().to_vec()),
            ],
        };
        assert!(parse_send(&e, 0, 1000).is_err(), "{payload} refused");
    }
    let e = RawEntry {
        id: "1-0".into(),
        fields: vec![
            (b"to".to_vec(), b"bob".to_vec()),
            (
                b"payload".to_vec(),
                format!("{}1{}", deep("[", 100_000), deep("]", 100_000)).into_bytes(),
            ),
        ],
    };
    // Valid JSON deeper than the parser goes: refused or accepted, never a
    // panic or a stack overflow.
    if let Ok(m) = parse_send(&e, 0, 1 << 20) {
        assert!(serde_json::from_str::<Value>(&m.payload).is_ok());
    }
}
