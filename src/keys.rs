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

    /// `<p>:<kind>:{<tag>}[:<suffix>]`, built in one allocation: the
    /// routing path makes several per message (issue 16).
    fn tagged(&self, kind: &str, tag: &str, suffix: Option<&str>) -> String {
        let extra = suffix.map_or(0, |x| x.len() + 1);
        let mut k = String::with_capacity(self.prefix.len() + kind.len() + tag.len() + extra + 4);
        k.push_str(&self.prefix);
        k.push(':');
        k.push_str(kind);
        k.push_str(":{");
        k.push_str(tag);
        k.push('}');
        if let Some(x) = suffix {
            k.push(':');
            k.push_str(x);
        }
        k
    }

    /// ZSET of live nodes, score = lease expiry (Unix ms, Redis clock).
    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    /// The node's inbox stream.
    pub fn inbox(&self, node: &NodeId) -> String {
        self.tagged("inbox", node.as_str(), None)
    }

    /// Per-node index of its connections (conn id → user id), so a reaper
    /// finds a dead node's sessions without `SCAN`. Same slot as the inbox.
    pub fn node_conns(&self, node: &NodeId) -> String {
        self.tagged("conns", node.as_str(), None)
    }

    /// Reap lock on a node; same slot as the node's inbox.
    pub fn reap_lock(&self, node: &NodeId) -> String {
        self.tagged("reaping", node.as_str(), None)
    }

    /// Each node's release (node id → version), written when it joins and
    /// removed when it is reaped, so a mixed cluster is visible (rolling
    /// upgrades).
    pub fn versions(&self) -> String {
        format!("{}:versions", self.prefix)
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
        self.tagged("user", user.as_str(), None)
    }

    /// Offline messages of a user.
    pub fn mailbox(&self, user: &UserId) -> String {
        self.tagged("mailbox", user.as_str(), None)
    }

    /// Payload bytes held by a user's mailbox (`--mailbox-max-bytes`).
    pub fn mailbox_bytes(&self, user: &UserId) -> String {
        self.tagged("mailbox-bytes", user.as_str(), None)
    }

    /// A user's history (contract §9): the newest messages, stream ids
    /// `0-<seq>`.
    pub fn history(&self, user: &UserId) -> String {
        self.tagged("history", user.as_str(), None)
    }

    /// A user's history position: hash `epoch`, `seq` (contract §9).
    pub fn seq(&self, user: &UserId) -> String {
        self.tagged("seq", user.as_str(), None)
    }

    /// An idempotency key of a user's (contract §4): holds the id of the
    /// first message sent with it.
    pub fn idem(&self, user: &UserId, key: &str) -> String {
        self.tagged("idem", user.as_str(), Some(key))
    }

    /// A user's presence (contract §10): hash `state` (on/off), `n`,
    /// `conn`, `node`, `at` of the last transition, `pend` while its event
    /// is not known to be in the events stream.
    pub fn presence(&self, user: &UserId) -> String {
        self.tagged("presence", user.as_str(), None)
    }

    /// Closes the app asked for that wait for a connection to be
    /// registered again (its node was being reaped): conn id → "code:reason".
    pub fn closes(&self, user: &UserId) -> String {
        self.tagged("closes", user.as_str(), None)
    }

    /// Users online (score: the `n` of their last transition) and offline
    /// (score: minus it), kept from the presence events for `/admin`.
    pub fn online(&self) -> String {
        format!("{}:online", self.prefix)
    }

    /// Cluster and presence events for apps (contract §10).
    pub fn events(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// Mailbox pages an earlier release moved aside per connection until
    /// written. This release never writes them (a mailbox entry now stays
    /// in the mailbox until written); its reaper still routes what a node
    /// of the previous release left there.
    pub fn taking(&self, user: &UserId, conn: &ConnId) -> String {
        self.tagged("taking", user.as_str(), Some(conn.as_str()))
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

    // Every script and transaction touches one slot (contract §5). The
    // scripts get their keys from these groups; `lua::eval_cmd` and
    // `Batch::eval` refuse keys that span slots at run time as well.
    proptest::proptest! {
        #[test]
        fn script_key_groups_share_a_slot(
            prefix in "[a-z0-9:_.-]{1,12}",
            user in "[A-Za-z0-9_.@:+=-]{1,128}",
            conn in "[A-Za-z0-9-]{1,40}",
        ) {
            use crate::redis::conn::one_slot;
            let k = Keys::new(&prefix);
            let u = UserId::parse(&user).unwrap();
            let c = ConnId::from_redis(conn);
            let n = NodeId::random();
            // REGISTER / TAKE_MAILBOX, MAILBOX, UNREGISTER_IF.
            proptest::prop_assert!(one_slot(&[&k.user(&u), &k.mailbox(&u), &k.mailbox_bytes(&u), &k.taking(&u, &c)]));
            // ROUTE and REGISTER with history and idempotency keys.
            proptest::prop_assert!(one_slot(&[&k.user(&u), &k.seq(&u), &k.history(&u), &k.idem(&u, &user), &k.presence(&u), &k.closes(&u)]));
            // DELETE_IF_DRAINED, and the reap lock in the node's slot.
            proptest::prop_assert!(one_slot(&[&k.inbox(&n), &k.node_conns(&n), &k.reap_lock(&n)]));
        }
    }

    #[test]
    fn a_script_spanning_slots_is_refused() {
        let k = Keys::new("wsc");
        let a = UserId::parse("alice").unwrap();
        let b = UserId::parse("bob").unwrap();
        let e =
            crate::redis::lua::eval_cmd(crate::redis::lua::MAILBOX, &[&k.user(&a), &k.mailbox(&b)]);
        assert!(e.is_err());
        assert!(
            crate::redis::lua::eval_cmd(crate::redis::lua::MAILBOX, &[&k.user(&a), &k.mailbox(&a)])
                .is_ok()
        );
    }

    #[test]
    fn shards() {
        assert_eq!(shard_of("anything", 1), 0);
        // CRC32("alice") = 0x3B2B2D8F... the rule is the public one: crc32 mod K.
        assert_eq!(shard_of("alice", 4), crc32fast::hash(b"alice") % 4);
    }
}
