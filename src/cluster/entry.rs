//! Send-stream entries and the internal entry format.
//!
//! [`parse_send`] turns what an app added to `<p>:send` into a [`Message`]
//! or a dead-letter reason. Inboxes and mailboxes hold the internal format
//! written by [`fields`] and read back by [`parse_internal`].

use crate::ids::{Topic, UserId};
use crate::message::{MAX_HOPS, Message, Target, is_json};
use crate::stream::{RawEntry, id_ms};

/// Why an entry went to `<p>:dead` (the `reason` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    NotUtf8,
    NoTarget,
    BothTargets,
    BadUser,
    BadTopic,
    BadFrom,
    NoPayload,
    TooLarge,
    BadJson,
    BadIdem,
}

impl DeadReason {
    pub fn code(self) -> &'static str {
        match self {
            DeadReason::NotUtf8 => "not_utf8",
            DeadReason::NoTarget => "no_target",
            DeadReason::BothTargets => "both_targets",
            DeadReason::BadUser => "bad_user",
            DeadReason::BadTopic => "bad_topic",
            DeadReason::BadFrom => "bad_from",
            DeadReason::NoPayload => "no_payload",
            DeadReason::TooLarge => "too_large",
            DeadReason::BadJson => "bad_json",
            DeadReason::BadIdem => "bad_idem",
        }
    }
}

/// The public id of entry `id` of send shard `shard`.
pub fn public_id(shard: u32, id: &str) -> String {
    if shard == 0 {
        id.to_owned()
    } else {
        format!("{shard}/{id}")
    }
}

/// Parse an app's entry. Never panics, whatever the bytes.
pub fn parse_send(e: &RawEntry, shard: u32, max_payload: usize) -> Result<Message, DeadReason> {
    if e.fields
        .iter()
        .any(|(k, v)| std::str::from_utf8(k).is_err() || std::str::from_utf8(v).is_err())
    {
        return Err(DeadReason::NotUtf8);
    }
    let target = match (e.get_str("to"), e.get_str("topic")) {
        (None, None) => return Err(DeadReason::NoTarget),
        (Some(_), Some(_)) => return Err(DeadReason::BothTargets),
        (Some(u), None) => Target::User(UserId::parse(u).map_err(|_| DeadReason::BadUser)?),
        (None, Some(t)) => Target::Topic(Topic::parse(t).map_err(|_| DeadReason::BadTopic)?),
    };
    let from = match e.get_str("from") {
        Some(f) => Some(UserId::parse(f).map_err(|_| DeadReason::BadFrom)?),
        None => None,
    };
    let payload = e.get_str("payload").ok_or(DeadReason::NoPayload)?;
    if payload.len() > max_payload {
        return Err(DeadReason::TooLarge);
    }
    if !is_json(payload) {
        return Err(DeadReason::BadJson);
    }
    // An idempotency key has the user-id alphabet (contract §4); it only
    // means something for a user-addressed message.
    let idem = match e.get_str("idem") {
        Some(k) if UserId::parse(k).is_err() => return Err(DeadReason::BadIdem),
        Some(k) if matches!(target, Target::User(_)) => Some(k.to_owned()),
        _ => None,
    };
    let mut m = Message::new(
        public_id(shard, &e.id),
        target,
        from,
        payload.to_owned(),
        id_ms(&e.id),
    );
    m.idem = idem;
    Ok(m)
}

/// The fields of a user message in an inbox or mailbox.
pub fn fields(m: &Message) -> Vec<(&'static str, String)> {
    let mut f = Vec::with_capacity(6);
    f.push(("id", m.id.clone()));
    if let Target::User(u) = &m.target {
        f.push(("to", u.to_string()));
    }
    if let Some(from) = &m.from {
        f.push(("from", from.to_string()));
    }
    f.push(("payload", m.payload.clone()));
    f.push(("hops", m.hops.to_string()));
    f.push(("t", m.sent_ms.to_string()));
    if m.seq > 0 {
        // Contract §9: a message keeps its seq through re-routes, reaps
        // and mailboxes. (A node of the previous release ignores both.)
        f.push(("seq", m.seq.to_string()));
        f.push(("epoch", m.epoch.to_string()));
    }
    f
}

/// The fields a message keeps in its user's history, but the three
/// `ROUTE` adds (`seq`, `epoch`, `id`): what a replay needs, read by [`parse_internal`] on
/// any node, this release's or the previous one's. Hops and send time stay
/// out (both optional there; a replayed message counts no routing latency):
/// every argument costs Redis a Lua string and an object in the `XADD`
/// that numbers the message (issue 14's cost).
pub fn history_fields(m: &Message) -> Vec<(&'static str, &str)> {
    let mut f = Vec::with_capacity(3);
    if let Target::User(u) = &m.target {
        f.push(("to", u.as_str()));
    }
    if let Some(from) = &m.from {
        f.push(("from", from.as_str()));
    }
    f.push(("payload", m.payload.as_str()));
    f
}

/// An inbox entry that is not a message: "the mailbox of this user got a
/// message while the user was connected here; read it". (A node of the
/// previous release skips it as unreadable: it only delays.)
pub fn mailbox_nudge_fields(user: &UserId) -> [(&'static str, &str); 2] {
    [("kind", "mailbox"), ("to", user.as_str())]
}

/// The user of a mailbox nudge ([`mailbox_nudge_fields`]).
pub fn parse_mailbox_nudge(e: &RawEntry) -> Option<UserId> {
    if e.get_str("kind")? != "mailbox" {
        return None;
    }
    UserId::parse(e.get_str("to")?).ok()
}

/// A close the app asked for (`POST /api/disconnect`, contract §10): the
/// user's connections `conns` are closed with `code` and `reason` wherever
/// they are when this is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub user: UserId,
    pub conns: Vec<String>,
    pub code: u16,
    pub reason: String,
}

/// An inbox entry that closes connections. (A node of the previous
/// release skips it as unreadable.)
pub fn close_fields(c: &Close) -> Vec<(&'static str, String)> {
    vec![
        ("kind", "close".to_owned()),
        ("to", c.user.to_string()),
        ("conns", c.conns.join(",")),
        ("code", c.code.to_string()),
        ("reason", c.reason.clone()),
    ]
}

/// Read back what [`close_fields`] wrote.
pub fn parse_close(e: &RawEntry) -> Option<Close> {
    if e.get_str("kind")? != "close" {
        return None;
    }
    Some(Close {
        user: UserId::parse(e.get_str("to")?).ok()?,
        conns: e
            .get_str("conns")?
            .split(',')
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect(),
        code: e.get_str("code")?.parse().ok()?,
        reason: e.get_str("reason").unwrap_or_default().to_owned(),
    })
}

/// Read back what [`fields`] wrote. `None` for an entry that is not ours.
pub fn parse_internal(e: &RawEntry) -> Option<Message> {
    let mut m = Message::new(
        e.get_str("id")?.to_owned(),
        Target::User(UserId::parse(e.get_str("to")?).ok()?),
        e.get_str("from").and_then(|f| UserId::parse(f).ok()),
        e.get_str("payload")?.to_owned(),
        e.get_str("t").and_then(|t| t.parse().ok()).unwrap_or(0),
    );
    m.hops = e
        .get_str("hops")
        .and_then(|h| h.parse().ok())
        .unwrap_or(0)
        .min(MAX_HOPS + 1);
    // Entries of the previous release, or of history-off nodes: no seq.
    if let (Some(seq), Some(epoch)) = (
        e.get_str("seq").and_then(|s| s.parse::<u64>().ok()),
        e.get_str("epoch"),
    ) && !epoch.is_empty()
    {
        m.seq = seq;
        m.epoch = std::sync::Arc::from(epoch);
    }
    Some(m)
}

/// Topic messages in the shared topic stream.
pub fn topic_fields(m: &Message) -> Vec<(&'static str, String)> {
    let mut f = vec![("id", m.id.clone())];
    if let Target::Topic(t) = &m.target {
        f.push(("topic", t.to_string()));
    }
    if let Some(from) = &m.from {
        f.push(("from", from.to_string()));
    }
    f.push(("payload", m.payload.clone()));
    f.push(("t", m.sent_ms.to_string()));
    f
}

pub fn parse_topic(e: &RawEntry) -> Option<Message> {
    Some(Message::new(
        e.get_str("id")?.to_owned(),
        Target::Topic(Topic::parse(e.get_str("topic")?).ok()?),
        e.get_str("from").and_then(|f| UserId::parse(f).ok()),
        e.get_str("payload")?.to_owned(),
        e.get_str("t").and_then(|t| t.parse().ok()).unwrap_or(0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fields: &[(&[u8], &[u8])]) -> RawEntry {
        RawEntry {
            id: "1700000000000-0".into(),
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect(),
        }
    }

    #[test]
    fn good_entries() {
        let m = parse_send(
            &entry(&[(b"to", b"bob"), (b"payload", b"{\"a\":1}")]),
            0,
            100,
        )
        .unwrap();
        assert_eq!(m.id, "1700000000000-0");
        assert_eq!(m.sent_ms, 1700000000000);
        let m = parse_send(&entry(&[(b"topic", b"news/x"), (b"payload", b"1")]), 2, 100).unwrap();
        assert_eq!(m.id, "2/1700000000000-0");
        let back = parse_internal(&RawEntry {
            id: "9-0".into(),
            fields: fields(&Message {
                target: Target::User(UserId::parse("bob").unwrap()),
                from: Some(UserId::parse("al").unwrap()),
                seq: 4,
                epoch: std::sync::Arc::from("ep"),
                ..m.clone()
            })
            .into_iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.into_bytes()))
            .collect(),
        })
        .unwrap();
        assert_eq!(back.id, m.id);
        assert_eq!(back.from.unwrap().as_str(), "al");
        assert_eq!((back.seq, &*back.epoch), (4, "ep"));
        // A history entry: its fields and the seq ROUTE adds are enough.
        let hist = Message {
            target: Target::User(UserId::parse("bob").unwrap()),
            from: Some(UserId::parse("al").unwrap()),
            hops: 2,
            ..m.clone()
        };
        let mut f: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (b"seq".to_vec(), b"7".to_vec()),
            (b"epoch".to_vec(), b"ep".to_vec()),
            (b"id".to_vec(), m.id.clone().into_bytes()),
        ];
        f.extend(
            history_fields(&hist)
                .into_iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())),
        );
        let back = parse_internal(&RawEntry {
            id: "0-7".into(),
            fields: f,
        })
        .unwrap();
        assert_eq!(
            (
                back.id.as_str(),
                back.user().map(|u| u.as_str()),
                back.payload.as_str()
            ),
            (m.id.as_str(), Some("bob"), m.payload.as_str())
        );
        assert_eq!(
            (back.seq, &*back.epoch, back.hops, back.sent_ms),
            (7, "ep", 0, 0)
        );
    }

    #[test]
    fn bad_entries() {
        type Fields<'a> = &'a [(&'a [u8], &'a [u8])];
        let cases: &[(Fields, DeadReason)] = &[
            (&[(b"payload", b"1")], DeadReason::NoTarget),
            (
                &[(b"to", b"a"), (b"topic", b"t"), (b"payload", b"1")],
                DeadReason::BothTargets,
            ),
            (&[(b"to", b"a b"), (b"payload", b"1")], DeadReason::BadUser),
            (
                &[(b"topic", b"t t"), (b"payload", b"1")],
                DeadReason::BadTopic,
            ),
            (
                &[(b"to", b"a"), (b"from", b"}"), (b"payload", b"1")],
                DeadReason::BadFrom,
            ),
            (&[(b"to", b"a")], DeadReason::NoPayload),
            (&[(b"to", b"a"), (b"payload", b"NaN")], DeadReason::BadJson),
            (
                &[(b"to", b"a"), (b"payload", b"[1,2,3,4,5,6,7,8,9,10]")],
                DeadReason::TooLarge,
            ),
            (&[(b"to", &[0xff]), (b"payload", b"1")], DeadReason::NotUtf8),
            (
                &[(b"to", b"a"), (b"payload", b"1"), (b"idem", b"a b")],
                DeadReason::BadIdem,
            ),
        ];
        for (fields, reason) in cases {
            assert_eq!(parse_send(&entry(fields), 0, 16).unwrap_err(), *reason);
        }
    }
}
