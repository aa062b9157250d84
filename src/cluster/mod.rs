//! The Redis back-end: a cluster node.
//!
//! - [`bus`]: [`bus::RedisBus`], the [`Bus`](crate::bus::Bus) the gateway
//!   uses; it connects, joins and starts every loop below, which share one
//!   [`Ctx`].
//! - [`sessions`]: a connection's entries in Redis (register with the first
//!   mailbox page, mailbox pages, unregister).
//! - [`entry`]: the send-stream entries apps write, and the inbox/mailbox
//!   format.
//! - [`lease`]: join, heartbeat, a new id after a lost lease, pipelined
//!   re-registration, reconciliation of stale entries.
//! - [`presence`]: online/offline and node events for apps.
//! - [`control`]: presence counts and closing a user's connections.
//! - [`reaper`]: reaping nodes whose lease expired.
//! - [`leave`]: leaving (SIGTERM), top to bottom.
//! - [`route`]: routing, the send-shard router, the inbox and topic
//!   readers, batched publishing and acknowledging.
//! - [`Membership`]: this node's identity and lease, and its view of the
//!   other nodes, which those loops keep up to date.

pub mod bus;
pub mod control;
mod ctx;
pub mod entry;
pub mod lease;
pub mod leave;
pub mod presence;
pub mod reaper;
pub mod route;
pub mod sessions;

pub use ctx::Ctx;

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::ids::NodeId;
use crate::shutdown::{Lifecycle, Phase};

/// This node's identity and lease, as known locally.
pub struct Membership {
    id: RwLock<NodeId>,
    /// Local deadline of the lease: the instant the renewal request was
    /// sent plus the TTL, never later than the expiry Redis holds.
    lease_until: Mutex<Option<Instant>>,
    /// When the renewals in a row that failed began (None: the last one
    /// went through).
    failing_since: Mutex<Option<Instant>>,
    life: Lifecycle,
    acquired: Notify,
    pub live: LiveNodes,
}

impl Membership {
    pub fn new(id: NodeId, life: Lifecycle) -> Self {
        Membership {
            id: RwLock::new(id),
            lease_until: Mutex::new(None),
            failing_since: Mutex::new(None),
            life,
            acquired: Notify::new(),
            live: LiveNodes::default(),
        }
    }

    pub fn id(&self) -> NodeId {
        match self.id.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub(crate) fn set_id(&self, id: NodeId) {
        match self.id.write() {
            Ok(mut g) => *g = id,
            Err(p) => *p.into_inner() = id,
        }
    }

    /// True while the node may act under its id: lease held, not leaving.
    pub fn holds_lease(&self) -> bool {
        !self.is_leaving()
            && self
                .lease_until
                .lock()
                .map(|g| g.is_some_and(|t| Instant::now() < t))
                .unwrap_or(false)
    }

    /// A heartbeat reached Redis (`true`) or failed.
    pub(crate) fn heartbeat_went_through(&self, ok: bool) {
        if let Ok(mut g) = self.failing_since.lock() {
            match (ok, *g) {
                (true, _) => *g = None,
                (false, None) => *g = Some(Instant::now()),
                (false, Some(_)) => {}
            }
        }
    }

    /// Whether every heartbeat for at least `after` failed: the node is
    /// cut off from Redis, though its lease may not have lapsed yet.
    pub fn cut_off(&self, after: Duration) -> bool {
        self.failing_since
            .lock()
            .map(|g| g.is_some_and(|t| t.elapsed() >= after))
            .unwrap_or(false)
    }

    pub(crate) fn set_lease(&self, until: Instant) {
        if let Ok(mut g) = self.lease_until.lock() {
            *g = Some(until);
        }
        self.acquired.notify_waiters();
    }

    pub(crate) fn clear_lease(&self) {
        if let Ok(mut g) = self.lease_until.lock() {
            *g = None;
        }
    }

    pub fn is_leaving(&self) -> bool {
        self.life.at_least(Phase::Leaving)
    }

    /// Wait until the lease is held, at most `timeout`.
    pub async fn wait_lease(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.acquired.notified();
            if self.holds_lease() {
                return true;
            }
            if self.is_leaving() {
                return false;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => return self.holds_lease(),
            }
        }
    }
}

/// What this node knows of a node id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeStatus {
    /// In `<p>:nodes` with a lease unexpired by the estimated Redis clock.
    Live,
    /// In `<p>:nodes`, lease expired: skip it, a reaper will come.
    Expired,
    /// Not in `<p>:nodes`: connections naming it are stale.
    Gone,
    /// Not seen yet (maybe it joined after the last refresh): ask Redis.
    Unknown,
}

/// A cache of `<p>:nodes`, refreshed every heartbeat, with an estimate of
/// the Redis clock so lease expiry is judged by Redis `TIME`.
#[derive(Default)]
pub struct LiveNodes {
    snap: RwLock<Snapshot>,
}

#[derive(Default)]
struct Snapshot {
    expiry: HashMap<String, u64>,
    gone: HashSet<String>,
    redis_now: u64,
    at: Option<Instant>,
}

impl Snapshot {
    fn now(&self) -> u64 {
        self.redis_now + self.at.map_or(0, |a| a.elapsed().as_millis() as u64)
    }
}

impl LiveNodes {
    /// Estimated Redis time, Unix ms.
    pub fn redis_now(&self) -> u64 {
        self.snap.read().map(|s| s.now()).unwrap_or(0)
    }

    pub fn status(&self, node: &str) -> NodeStatus {
        let Ok(s) = self.snap.read() else {
            return NodeStatus::Unknown;
        };
        if s.gone.contains(node) {
            return NodeStatus::Gone;
        }
        match s.expiry.get(node) {
            Some(&exp) if exp > s.now() => NodeStatus::Live,
            Some(_) => NodeStatus::Expired,
            None => NodeStatus::Unknown,
        }
    }

    /// Replace the view with a fresh `ZRANGE … WITHSCORES` read at `redis_now`.
    pub fn refresh(&self, nodes: Vec<(String, u64)>, redis_now: u64) {
        if let Ok(mut s) = self.snap.write() {
            s.expiry = nodes.into_iter().collect();
            s.gone.clear();
            s.redis_now = redis_now;
            s.at = Some(Instant::now());
        }
    }

    /// Learn one node's score (`None`: absent from `<p>:nodes`).
    pub fn learn(&self, node: &str, expiry: Option<u64>) {
        if let Ok(mut s) = self.snap.write() {
            match expiry {
                Some(e) => {
                    s.expiry.insert(node.to_owned(), e);
                }
                None => {
                    s.expiry.remove(node);
                    s.gone.insert(node.to_owned());
                }
            }
        }
    }

    pub fn mark_gone(&self, node: &str) {
        self.learn(node, None);
    }

    /// Nodes whose lease has expired, by the estimated Redis clock.
    pub fn expired(&self) -> Vec<NodeId> {
        let Ok(s) = self.snap.read() else {
            return Vec::new();
        };
        let now = s.now();
        s.expiry
            .iter()
            .filter(|(_, e)| **e <= now)
            .map(|(n, _)| NodeId::from_redis(n.clone()))
            .collect()
    }

    /// How many nodes hold an unexpired lease, by the estimated Redis clock.
    pub fn live_count(&self) -> usize {
        let Ok(s) = self.snap.read() else { return 0 };
        let now = s.now();
        s.expiry.values().filter(|e| **e > now).count()
    }

    /// Every known node with its lease expiry.
    pub fn all(&self) -> Vec<(String, u64)> {
        self.snap
            .read()
            .map(|s| s.expiry.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let l = LiveNodes::default();
        l.refresh(vec![("a".into(), 2_000), ("b".into(), 500)], 1_000);
        assert_eq!(l.status("a"), NodeStatus::Live);
        assert_eq!(l.status("b"), NodeStatus::Expired);
        assert_eq!(l.status("c"), NodeStatus::Unknown);
        l.mark_gone("c");
        assert_eq!(l.status("c"), NodeStatus::Gone);
        assert_eq!(l.expired(), vec![NodeId::from_redis("b".into())]);
        assert_eq!(l.live_count(), 1);
    }
}
