//! What the node's Redis loops share.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Membership;
use super::route::{Reroute, acker::AckJob, publish::PublishReq};
use crate::config::Config;
use crate::keys::Keys;
use crate::local::Registry;
use crate::metrics::Metrics;
use crate::redis::conn::{Conn, Connector};

/// Everything the node's Redis loops share.
pub struct Ctx {
    pub cfg: Arc<Config>,
    pub keys: Keys,
    /// Makes connections: single Redis or Redis Cluster.
    pub connector: Connector,
    /// Multiplexed, auto-reconnecting connection for every non-blocking
    /// command. Blocking reads get connections of their own.
    pub conn: Conn,
    /// A connection of its own for leases (node, router, reap lock): a
    /// renewal must never queue behind a large pipeline or reply.
    pub lease_conn: Conn,
    pub membership: Membership,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub reroute: mpsc::UnboundedSender<Reroute>,
    pub acks: mpsc::UnboundedSender<AckJob>,
    pub publisher: mpsc::Sender<PublishReq>,
    /// Send shards this node routes now.
    pub routing: Mutex<BTreeSet<u32>>,
    /// When this node last handed a shard over to spread the routers.
    pub handed_off_at: Mutex<Option<std::time::Instant>>,
    /// Cancelled when the node starts to leave: routers and the reaper stop.
    pub leaving: CancellationToken,
    /// Cancelled when a leaving node starts to reap itself: its readers
    /// stop so they do not race the self-reap.
    pub readers_stop: CancellationToken,
}

impl Ctx {
    pub fn ttl_ms(&self) -> u64 {
        self.cfg.lease_ttl.as_millis() as u64
    }

    /// A connection for blocking reads (see [`Connector::blocking`]).
    pub async fn blocking_conn(&self) -> Result<Conn, redis::RedisError> {
        self.connector.blocking().await
    }

    /// The shards a node should route, spreading them over the live
    /// nodes: ceil(shards / live nodes).
    pub fn fair_share(&self) -> usize {
        let live = self.membership.live.live_count().max(1);
        (self.cfg.send_shards as usize).div_ceil(live)
    }

    pub fn shards_routed(&self) -> Vec<u32> {
        self.routing
            .lock()
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Count a Redis error (logging is left to the caller, once).
    pub fn redis_error(&self) {
        self.metrics.redis_errors.inc();
    }
}
