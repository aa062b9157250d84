//! What the node's Redis loops share.

use std::sync::Arc;

use super::Membership;
use super::presence::{Sweep, Unsent};
use super::route::{Rerouter, acker::Acker, publish::Publisher, send::ShardSet};
use crate::config::Config;
use crate::keys::Keys;
use crate::local::Registry;
use crate::metrics::Metrics;
use crate::redis::conn::{Conn, Connector};
use crate::shutdown::Lifecycle;

/// Everything the node's Redis loops share: read-only handles.
pub struct Ctx {
    pub cfg: Arc<Config>,
    pub keys: Keys,
    /// Makes connections: single Redis or Redis Cluster.
    pub connector: Connector,
    /// The Redis connection (multiplexed, auto-reconnecting) for every
    /// non-blocking command; `conn` names connection ids elsewhere.
    /// Blocking reads get connections of their own.
    pub redis: Conn,
    /// A connection of its own for leases (node, router, reap lock): a
    /// renewal must never queue behind a large pipeline or reply.
    pub lease_conn: Conn,
    pub membership: Membership,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub rerouter: Rerouter,
    pub acker: Acker,
    pub publisher: Publisher,
    /// Send shards this node routes now (its routers keep it).
    pub shards: ShardSet,
    /// Presence events whose emission failed, retried by reconciliation.
    pub unsent: Unsent,
    /// Where the sweep of online users goes on.
    pub sweep: Sweep,
    /// The node's phase: `Leaving` stops routers, the reaper and the
    /// heartbeat; `SelfReaping` the readers; `Stopped` the rest.
    pub life: Lifecycle,
}

impl Ctx {
    pub fn ttl_ms(&self) -> u64 {
        self.cfg.lease_ttl.as_millis() as u64
    }

    /// A connection for blocking reads (see [`Connector::blocking`]).
    pub async fn blocking_conn(&self) -> Result<Conn, redis::RedisError> {
        self.connector.blocking().await
    }

    /// A connection for one loop's sequential commands (see
    /// [`Connector::own`]), or the node's shared one.
    pub async fn own_conn(&self) -> Result<Conn, redis::RedisError> {
        Ok(self
            .connector
            .own()
            .await?
            .unwrap_or_else(|| self.redis.clone()))
    }

    /// Count a Redis error (logging is left to the caller, once).
    pub fn redis_error(&self) {
        self.metrics.redis_errors.inc();
    }
}
