//! Redis Cluster hash slots: which slot a key is in, and which primary
//! serves each slot as far as this node last heard.
//!
//! redis-rs routes a pipeline by its first key and refuses one whose keys
//! span slots, though a primary serves thousands of slots and would take
//! such a pipeline. [`SlotMap`] lets [`Batch`](super::conn::Batch) group
//! commands by primary instead: a router batch for 1,000 users is then one
//! pipeline per primary, not 1,000 requests. The map is only a hint: a
//! command sent to the wrong primary gets `MOVED`, and the batch falls back
//! to sending that part command by command and drops the map, which is
//! fetched again (`CLUSTER SLOTS`) on next use.

use std::sync::{Arc, RwLock};

use redis::Value;

/// Number of hash slots in a Redis Cluster.
pub const SLOTS: usize = 16384;

/// The hash slot of `key`: CRC16 (XMODEM) of its hash tag (the part between
/// the first `{` and the next `}`, if non-empty) or of the whole key.
pub fn slot_of(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(tagged) % SLOTS as u16
}

/// Slot → index of the primary serving it (`u16::MAX`: unknown).
pub struct SlotMap {
    owner: Vec<u16>,
}

impl SlotMap {
    /// From a `CLUSTER SLOTS` reply: `[[start, end, [host, port, …], …], …]`.
    pub fn parse(v: &Value) -> Option<SlotMap> {
        let Value::Array(ranges) = v else { return None };
        let mut owner = vec![u16::MAX; SLOTS];
        let mut primaries: Vec<String> = Vec::new();
        for r in ranges {
            let Value::Array(parts) = r else { continue };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(node))) =
                (parts.first(), parts.get(1), parts.get(2))
            else {
                continue;
            };
            let host = node.first().and_then(crate::stream::string)?;
            let port = node.get(1).and_then(crate::stream::int)?;
            let addr = format!("{host}:{port}");
            let idx = match primaries.iter().position(|p| *p == addr) {
                Some(i) => i,
                None => {
                    primaries.push(addr);
                    primaries.len() - 1
                }
            };
            let (start, end) = (*start as usize, *end as usize);
            if start <= end && end < SLOTS {
                owner[start..=end].fill(idx as u16);
            }
        }
        Some(SlotMap { owner })
    }

    /// The primary serving `slot`, if known.
    pub fn owner(&self, slot: u16) -> Option<u16> {
        self.owner
            .get(slot as usize)
            .copied()
            .filter(|&o| o != u16::MAX)
    }
}

/// The shared, replaceable slot map of a cluster connection.
#[derive(Default)]
pub struct SlotCache {
    map: RwLock<Option<Arc<SlotMap>>>,
}

impl SlotCache {
    pub fn get(&self) -> Option<Arc<SlotMap>> {
        self.map.read().ok().and_then(|m| m.clone())
    }

    pub fn set(&self, map: SlotMap) {
        if let Ok(mut m) = self.map.write() {
            *m = Some(Arc::new(map));
        }
    }

    /// Forget the map (the topology changed): it is fetched again.
    pub fn invalidate(&self) {
        if let Ok(mut m) = self.map.write() {
            *m = None;
        }
    }
}

/// The error for script keys that span hash slots (a bug: Redis Cluster
/// would refuse the script, so it is refused everywhere).
pub fn cross_slot(keys: &[&str]) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Client,
        "script keys span hash slots",
        keys.join(" "),
    ))
}

/// True if every key hashes to the same Redis Cluster slot.
pub fn one_slot(keys: &[&str]) -> bool {
    let mut slots = keys.iter().map(|k| slot_of(k.as_bytes()));
    match slots.next() {
        Some(first) => slots.all(|s| s == first),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::cluster_routing::Slot;

    #[test]
    fn known_slots() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"{user1000}.following"), 3443);
        assert_eq!(slot_of(b"{}x"), slot_of(b"{}x")); // empty tag: whole key
        assert_ne!(slot_of(b"{}a"), slot_of(b"{}b"));
    }

    proptest::proptest! {
        #[test]
        fn same_slot_as_redis_rs(key in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40)) {
            proptest::prop_assert_eq!(Slot::new(slot_of(&key)), Some(Slot::for_key(&key)));
        }
    }

    #[test]
    fn parses_cluster_slots() {
        let node = |port| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let v = Value::Array(vec![
            Value::Array(vec![Value::Int(0), Value::Int(5460), node(7000)]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(16383),
                node(7001),
                node(7004),
            ]),
        ]);
        let m = SlotMap::parse(&v).expect("parsed");
        assert_eq!(m.owner(0), Some(0));
        assert_eq!(m.owner(5460), Some(0));
        assert_eq!(m.owner(5461), Some(1));
        assert_eq!(m.owner(16383), Some(1));
        let partial = SlotMap::parse(&Value::Array(vec![Value::Array(vec![
            Value::Int(0),
            Value::Int(10),
            node(7000),
        ])]))
        .expect("parsed");
        assert_eq!(partial.owner(11), None);
    }
}
