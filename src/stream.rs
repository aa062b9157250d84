//! Reading Redis stream replies.
//!
//! We parse `redis::Value` ourselves instead of redis-rs's stream types so
//! that field names and values stay raw bytes: a bad entry must reach
//! `<p>:dead` with what it held, not fail to decode.

use redis::Value;

/// One stream entry: its id and its field/value pairs in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawEntry {
    pub id: String,
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
}

impl RawEntry {
    /// The first value of field `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The fields as a JSON object (non-UTF-8 bytes become U+FFFD), for
    /// dead letters.
    pub fn fields_json(&self) -> String {
        let mut map = serde_json::Map::new();
        for (k, v) in &self.fields {
            map.insert(
                String::from_utf8_lossy(k).into_owned(),
                serde_json::Value::String(String::from_utf8_lossy(v).into_owned()),
            );
        }
        serde_json::Value::Object(map).to_string()
    }
}

pub fn bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.as_bytes().to_vec()),
        Value::VerbatimString { text, .. } => Some(text.as_bytes().to_vec()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        Value::Okay => Some(b"OK".to_vec()),
        _ => None,
    }
}

pub fn string(v: &Value) -> Option<String> {
    bytes(v).and_then(|b| String::from_utf8(b).ok())
}

pub fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => string(other).and_then(|s| s.parse().ok()),
    }
}

/// A list of entries: `[[id, [f, v, ...]], ...]`. Entries whose fields are
/// nil (deleted while pending) come back with no fields.
pub fn entries(v: &Value) -> Vec<RawEntry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items.iter().filter_map(entry).collect()
}

fn entry(v: &Value) -> Option<RawEntry> {
    let Value::Array(pair) = v else { return None };
    let id = string(pair.first()?)?;
    let mut fields = Vec::new();
    match pair.get(1) {
        Some(Value::Array(kv)) => {
            for chunk in kv.chunks(2) {
                if let [k, val] = chunk {
                    fields.push((bytes(k)?, bytes(val)?));
                }
            }
        }
        Some(Value::Map(kv)) => {
            for (k, val) in kv {
                fields.push((bytes(k)?, bytes(val)?));
            }
        }
        _ => {}
    }
    Some(RawEntry { id, fields })
}

/// An `XREAD`/`XREADGROUP` reply: `[[key, entries], ...]` (or a RESP3
/// map). Nil (timeout) gives nothing.
pub fn read_reply(v: &Value) -> Vec<(String, Vec<RawEntry>)> {
    match v {
        Value::Array(streams) => streams
            .iter()
            .filter_map(|s| match s {
                Value::Array(kv) if kv.len() == 2 => Some((string(&kv[0])?, entries(&kv[1]))),
                _ => None,
            })
            .collect(),
        Value::Map(kv) => kv
            .iter()
            .filter_map(|(k, e)| Some((string(k)?, entries(e))))
            .collect(),
        _ => Vec::new(),
    }
}

/// The entries of an `XREAD`/`XREADGROUP` reply, every stream's in turn
/// (our reads name one stream).
pub fn read_entries(v: &Value) -> Vec<RawEntry> {
    read_reply(v).into_iter().flat_map(|(_, e)| e).collect()
}

/// [`read_entries`] of a reply we own: its ids and fields are moved out,
/// not copied (the hot path: every routed and every delivered message is
/// read this way, with half a dozen fields each).
pub fn into_entries(v: Value) -> Vec<RawEntry> {
    let streams = match v {
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(kv) if kv.len() == 2 => kv.into_iter().nth(1),
                _ => None,
            })
            .collect(),
        Value::Map(kv) => kv.into_iter().map(|(_, e)| e).collect(),
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for s in streams {
        if let Value::Array(items) = s {
            out.extend(items.into_iter().filter_map(into_entry));
        }
    }
    out
}

fn into_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        other => bytes(&other),
    }
}

fn into_entry(v: Value) -> Option<RawEntry> {
    let Value::Array(pair) = v else { return None };
    let mut pair = pair.into_iter();
    let id = String::from_utf8(into_bytes(pair.next()?)?).ok()?;
    let mut fields = Vec::new();
    match pair.next() {
        Some(Value::Array(kv)) => {
            fields.reserve(kv.len() / 2);
            let mut kv = kv.into_iter();
            while let (Some(k), Some(val)) = (kv.next(), kv.next()) {
                fields.push((into_bytes(k)?, into_bytes(val)?));
            }
        }
        Some(Value::Map(kv)) => {
            for (k, val) in kv {
                fields.push((into_bytes(k)?, into_bytes(val)?));
            }
        }
        _ => {}
    }
    Some(RawEntry { id, fields })
}

/// The millisecond part of a stream id.
pub fn id_ms(id: &str) -> u64 {
    id.split('-')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A message id as its send stream's prefix (`""` or `"<shard>/"`) and
/// its stream position (ms, seq), compared as numbers; None if it is not
/// one.
fn id_parts(id: &str) -> Option<(&str, (u64, u64))> {
    let (head, seq) = id.rsplit_once('-')?;
    let digits = head.len() - head.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (pre, ms) = head.split_at(head.len() - digits);
    Some((pre, (ms.parse().ok()?, seq.parse().ok()?)))
}

/// Whether message id `next` comes after `prev` in the same send stream.
pub fn id_follows(prev: &str, next: &str) -> bool {
    match (id_parts(prev), id_parts(next)) {
        (Some((pa, a)), Some((pb, b))) => pa == pb && b > a,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn id_parts() {
        assert_eq!(super::id_parts("17-3"), Some(("", (17, 3))));
        assert_eq!(super::id_parts("3/17-3"), Some(("3/", (17, 3))));
        assert_eq!(super::id_parts("17"), None);
        assert_eq!(super::id_parts("-3"), None);
        assert_eq!(super::id_parts("a-b"), None);
        assert!(super::id_follows("17-3", "18-0"));
        assert!(super::id_follows("3/9-3", "3/10-0"));
        assert!(!super::id_follows("17-3", "17-3"));
        assert!(!super::id_follows("17-3", "3/18-0"));
        assert!(!super::id_follows("17-3", "x"));
    }

    #[test]
    fn parses_read_reply() {
        let v = Value::Array(vec![Value::Array(vec![
            b("wsc:send"),
            Value::Array(vec![
                Value::Array(vec![
                    b("1-0"),
                    Value::Array(vec![b("to"), b("al"), b("payload"), b("1")]),
                ]),
                Value::Array(vec![b("2-0"), Value::Nil]),
            ]),
        ])]);
        let r = read_reply(&v);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, "wsc:send");
        assert_eq!(r[0].1[0].get_str("to"), Some("al"));
        assert_eq!(r[0].1[1].fields.len(), 0);
        assert_eq!(id_ms("1700-3"), 1700);
    }

    /// Moving a reply's entries out gives what copying them gives, for
    /// every shape a reply takes: RESP2 arrays and RESP3 maps, entries
    /// deleted while pending (nil fields), non-bulk values, a bad entry
    /// (dropped), a timeout (nil).
    #[test]
    fn owned_and_borrowed_reads_agree() {
        let entries = Value::Array(vec![
            Value::Array(vec![
                b("1-0"),
                Value::Array(vec![b("to"), b("al"), b("payload"), b("1")]),
            ]),
            Value::Array(vec![b("2-0"), Value::Nil]),
            Value::Array(vec![
                b("3-0"),
                Value::Array(vec![b("n"), Value::Int(7), b("odd")]),
            ]),
            Value::Array(vec![b("4-0"), Value::Array(vec![b("bad"), Value::Nil])]),
            Value::Array(vec![
                b("5-0"),
                Value::Map(vec![(b("to"), b("bo")), (b("payload"), b("{}"))]),
            ]),
        ]);
        let replies = [
            Value::Array(vec![Value::Array(vec![b("s"), entries.clone()])]),
            Value::Map(vec![(b("s"), entries)]),
            Value::Nil,
        ];
        for v in replies {
            let copied = read_entries(&v);
            assert_eq!(into_entries(v), copied);
        }
        let v = Value::Array(vec![Value::Array(vec![
            b("s"),
            Value::Array(vec![Value::Array(vec![
                b("9-0"),
                Value::Array(vec![b("k"), b("v")]),
            ])]),
        ])]);
        let e = into_entries(v);
        assert_eq!((e[0].id.as_str(), e[0].get_str("k")), ("9-0", Some("v")));
    }

    #[test]
    fn lossy_json() {
        let e = RawEntry {
            id: "1-0".into(),
            fields: vec![(b"to".to_vec(), vec![0xff, b'a'])],
        };
        assert_eq!(e.fields_json(), "{\"to\":\"\u{fffd}a\"}");
    }
}
