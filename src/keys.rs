//! Redis key names: the only place they are built.
//!
//! Braces are Redis Cluster hash tags. Every script and transaction touches
//! keys of one slot only: one node's keys (`{<node id>}`) or one user's keys
//! (`{<user>}`). The shared keys (`nodes`, `send`, `dead`, `topics`, router
//! leases) are each used alone.

use crate::ids::{ConnId, NodeId, UserId};

/// Key builder for one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// ZSET of live nodes, score = lease expiry (Unix ms, Redis clock).
    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    /// The node's inbox stream.
    pub fn inbox(&self, node: &NodeId) -> String {
        format!("{}:inbox:{{{}}}", self.prefix, node)
    }

    /// Per-node index of its connections (conn id → user id), so a reaper
    /// finds a dead node's sessions without `SCAN`. Same slot as the inbox.
    pub fn node_conns(&self, node: &NodeId) -> String {
        format!("{}:conns:{{{}}}", self.prefix, node)
    }

    /// Reap lock on a node; same slot as the node's inbox.
    pub fn reap_lock(&self, node: &NodeId) -> String {
        format!("{}:reaping:{{{}}}", self.prefix, node)
    }

    /// Send stream shard `n` (shard 0 is the bare `<p>:send`).
    pub fn send(&self, shard: u32) -> String {
        if shard == 0 {
            format!("{}:send", self.prefix)
        } else {
            format!("{}:send:{}", self.prefix, shard)
        }
    }

    /// Router lease for send shard `n`.
    pub fn router_lease(&self, shard: u32) -> String {
        format!("{}:router:{}", self.prefix, shard)
    }

    /// Connections of a user: conn id → node id.
    pub fn user(&self, user: &UserId) -> String {
        format!("{}:user:{{{}}}", self.prefix, user)
    }

    /// Offline messages of a user.
    pub fn mailbox(&self, user: &UserId) -> String {
        format!("{}:mailbox:{{{}}}", self.prefix, user)
    }

    /// Mailbox messages taken by a connection and not yet written to its
    /// socket: a reaper routes them again if the node dies meanwhile.
    pub fn taking(&self, user: &UserId, conn: &ConnId) -> String {
        format!("{}:taking:{{{}}}:{}", self.prefix, user, conn)
    }

    /// Dead letters.
    pub fn dead(&self) -> String {
        format!("{}:dead", self.prefix)
    }

    /// The shared topic stream every node reads (at-most-once fan-out).
    pub fn topics(&self) -> String {
        format!("{}:topics", self.prefix)
    }
}

/// Consumer group of the routers on a send stream.
pub const ROUTER_GROUP: &str = "router";
/// Consumer group created with a node's inbox. Creating a group is the way to
/// create an empty stream; nodes read their inbox with plain `XREAD`.
pub const INBOX_GROUP: &str = "node";

/// The send shard of a user or topic name: CRC32(x) mod K.
pub fn shard_of(name: &str, shards: u32) -> u32 {
    if shards <= 1 {
        0
    } else {
        crc32fast::hash(name.as_bytes()) % shards
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let k = Keys::new("wsc");
        let u = UserId::parse("bob").unwrap();
        assert_eq!(k.user(&u), "wsc:user:{bob}");
        assert_eq!(k.mailbox(&u), "wsc:mailbox:{bob}");
        assert_eq!(k.send(0), "wsc:send");
        assert_eq!(k.send(3), "wsc:send:3");
        let n = NodeId::from_redis("n1".into());
        assert_eq!(k.inbox(&n), "wsc:inbox:{n1}");
        assert_eq!(k.node_conns(&n), "wsc:conns:{n1}");
    }

    #[test]
    fn shards() {
        assert_eq!(shard_of("anything", 1), 0);
        // CRC32("alice") = 0x3B2B2D8F... the rule is the public one: crc32 mod K.
        assert_eq!(shard_of("alice", 4), crc32fast::hash(b"alice") % 4);
    }
}
