//! The Redis back-end: a cluster node.
//!
//! [`RedisBus::start`] connects (retrying with backoff while Redis is
//! unreachable), joins, and spawns the node's loops, all sharing one
//! [`Ctx`]:
//! heartbeat ([`cluster::lease`]), reaper ([`cluster::reaper`]), one router
//! candidate per send shard ([`router::send`]), the inbox and topic readers
//! ([`router::inbox`]), the re-route worker, the batching publisher and the
//! acker.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use redis::{AsyncCommands, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::conn::{Batch, Conn, Connector};
use super::{Bus, BusError, ClusterView, Mailbox, NodeView, Publish};
use crate::ack::AckGuard;
use crate::backoff::Backoff;
use crate::cluster::{self, Membership};
use crate::config::{Config, redact_url};
use crate::gateway::registry::{ConnHandle, Registry};
use crate::ids::{NodeId, UserId};
use crate::keys::{Keys, shard_of};
use crate::lua;
use crate::message::{Message, Target};
use crate::ops::metrics::Metrics;
use crate::router::{self, Reroute, acker::AckJob, publish::PublishReq};
use crate::stream;

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

/// The Redis bus handle.
pub struct RedisBus {
    cfg: Arc<Config>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    ctx: OnceLock<Arc<Ctx>>,
    /// The id shown before the first join.
    boot_id: NodeId,
}

impl RedisBus {
    pub fn new(cfg: Arc<Config>, registry: Arc<Registry>, metrics: Arc<Metrics>) -> Self {
        RedisBus {
            cfg,
            registry,
            metrics,
            ctx: OnceLock::new(),
            boot_id: NodeId::random(),
        }
    }

    fn ctx(&self) -> Result<&Arc<Ctx>, BusError> {
        self.ctx.get().ok_or(BusError::Unavailable)
    }

    /// Connect, retrying with backoff; `None` if stopped first.
    async fn connect(&self, stop: &CancellationToken) -> Option<(Connector, Conn, Conn)> {
        let url = self.cfg.redis_url.clone().unwrap_or_default();
        let mut backoff = Backoff::redis();
        loop {
            let attempt = async {
                let connector = Connector::new(&self.cfg)?;
                let conn = connector.shared().await?;
                let lease_conn = connector.shared().await?;
                Ok::<_, redis::RedisError>((connector, conn, lease_conn))
            };
            match attempt.await {
                Ok(c) => return Some(c),
                Err(e) => {
                    self.metrics.redis_errors.inc();
                    let delay = backoff.next_delay();
                    tracing::warn!(redis = %redact_url(&url), error = %e, retry_in_ms = delay.as_millis() as u64, "redis unreachable at boot");
                    tokio::select! {
                        _ = stop.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

#[async_trait]
impl Bus for RedisBus {
    fn node_id(&self) -> NodeId {
        match self.ctx.get() {
            Some(c) => c.membership.id(),
            None => self.boot_id.clone(),
        }
    }

    fn is_ready(&self) -> bool {
        self.ctx.get().is_some_and(|c| c.membership.holds_lease())
    }

    fn start(self: Arc<Self>, tracker: &TaskTracker, stop: CancellationToken) {
        let tracker2 = tracker.clone();
        tracker.spawn(async move {
            let Some((connector, conn, lease_conn)) = self.connect(&stop).await else {
                return;
            };
            let (reroute_tx, reroute_rx) = mpsc::unbounded_channel();
            let (ack_tx, ack_rx) = mpsc::unbounded_channel();
            let (pub_tx, pub_rx) = mpsc::channel(4096);
            let membership = Membership::new();
            membership.set_id(self.boot_id.clone());
            let ctx = Arc::new(Ctx {
                cfg: self.cfg.clone(),
                keys: Keys::new(&self.cfg.prefix),
                connector,
                conn,
                lease_conn,
                membership,
                registry: self.registry.clone(),
                metrics: self.metrics.clone(),
                reroute: reroute_tx,
                acks: ack_tx,
                publisher: pub_tx,
                routing: Mutex::new(BTreeSet::new()),
                handed_off_at: Mutex::new(None),
                leaving: CancellationToken::new(),
                readers_stop: CancellationToken::new(),
            });
            let _ = self.ctx.set(ctx.clone());
            // Stop order matters: the acker and publisher outlive the
            // loops that feed them, so they stop on `stop` and drain.
            tracker2.spawn(router::acker::run(ctx.clone(), ack_rx, stop.clone()));
            tracker2.spawn(router::publish::run(ctx.clone(), pub_rx, stop.clone()));
            tracker2.spawn(router::reroute_worker(
                ctx.clone(),
                reroute_rx,
                stop.clone(),
            ));
            tracker2.spawn(cluster::lease::run(ctx.clone(), stop.clone()));
            tracker2.spawn(cluster::reaper::run(ctx.clone(), stop.clone()));
            tracker2.spawn(router::inbox::run_inbox(ctx.clone(), stop.clone()));
            tracker2.spawn(router::inbox::run_topics(ctx.clone(), stop.clone()));
            for shard in 0..self.cfg.send_shards {
                tracker2.spawn(router::send::run(ctx.clone(), shard, stop.clone()));
            }
        });
    }

    async fn register(&self, h: &ConnHandle) -> Result<Mailbox, BusError> {
        let ctx = self.ctx()?;
        // What earlier attempts took from the mailbox is kept: Redis has
        // already deleted it.
        let mut taken = Mailbox::default();
        // A fresh lease is needed to write under our id; wait a little for
        // one rather than refuse a client during a short Redis hiccup.
        for _ in 0..3 {
            if !ctx.membership.wait_lease(Duration::from_secs(3)).await {
                break;
            }
            let me = ctx.membership.id();
            match register_under(ctx, &me, h, true).await {
                Ok(page) => {
                    // A second attempt returns the first one's page again
                    // (still unwritten): keep one copy of each message.
                    for m in page.msgs {
                        if !taken.msgs.iter().any(|t| t.id == m.id) {
                            taken.msgs.push(m);
                        }
                    }
                    taken.more = page.more;
                }
                Err(e) => {
                    ctx.redis_error();
                    tracing::warn!(conn = %h.conn, user = %h.user, error = %e, "register failed");
                    break;
                }
            }
            // If the id changed meanwhile, the re-registration may have run
            // before our write: register again under the new id.
            if ctx.membership.id() == me {
                return Ok(taken);
            }
        }
        // Not registered: whatever was taken goes back to be routed again
        // (the connection is about to close).
        for m in taken.msgs {
            self.hand_back(m, None);
        }
        Err(BusError::Unavailable)
    }

    async fn take_mailbox(&self, h: &ConnHandle) -> Result<Mailbox, BusError> {
        let ctx = self.ctx()?;
        take_page(ctx, h, true).await.map_err(|e| {
            ctx.redis_error();
            e.into()
        })
    }

    async fn mailbox_written(&self, h: &ConnHandle) {
        let Ok(ctx) = self.ctx() else { return };
        let mut conn = ctx.conn.clone();
        let r: Result<(), _> = conn.del(ctx.keys.taking(&h.user, &h.conn)).await;
        if let Err(e) = r {
            ctx.redis_error();
            // Left behind, it only expires (or is routed again, as
            // duplicates, if this node dies first).
            tracing::warn!(conn = %h.conn, user = %h.user, error = %e, "taken mailbox not cleared");
        }
    }

    async fn unregister(&self, h: &ConnHandle) {
        let Ok(ctx) = self.ctx() else { return };
        let me = ctx.membership.id();
        let mut batch = Batch::new();
        batch
            .cmd_ignored("HDEL", &ctx.keys.user(&h.user))
            .arg(h.conn.as_str());
        batch
            .cmd_ignored("HDEL", &ctx.keys.node_conns(&me))
            .arg(h.conn.as_str());
        // Taken mailbox pages are written or handed back by now.
        batch.cmd_ignored("DEL", &ctx.keys.taking(&h.user, &h.conn));
        let mut conn = ctx.conn.clone();
        if let Err(e) = batch.run(&mut conn).await {
            ctx.redis_error();
            // The reaper removes it when this node goes; a stale field is
            // skipped by routing meanwhile.
            tracing::warn!(conn = %h.conn, user = %h.user, error = %e, "unregister failed");
        }
    }

    fn hand_back(&self, msg: Arc<Message>, guard: Option<Arc<AckGuard>>) {
        let Ok(ctx) = self.ctx() else { return };
        let mut again = (*msg).clone();
        again.hops += 1;
        let guard = guard.unwrap_or_else(|| Arc::new(AckGuard::noop()));
        let _ = ctx.reroute.send((Arc::new(again), guard));
    }

    async fn publish(&self, p: Publish) -> Result<String, BusError> {
        let ctx = self.ctx()?;
        let (name, mut fields) = match &p.target {
            Target::User(u) => (u.as_str(), vec![("to", u.to_string())]),
            Target::Topic(t) => (t.as_str(), vec![("topic", t.to_string())]),
        };
        let shard = shard_of(name, ctx.cfg.send_shards);
        fields.push(("payload", p.payload));
        if let Some(f) = p.from {
            fields.push(("from", f.to_string()));
        }
        let (tx, rx) = oneshot::channel();
        ctx.publisher
            .send(PublishReq {
                key: ctx.keys.send(shard),
                fields,
                reply: tx,
            })
            .await
            .map_err(|_| BusError::Unavailable)?;
        let id = rx.await.map_err(|_| BusError::Unavailable)??;
        Ok(router::entry::public_id(shard, &id))
    }

    async fn user_connections(&self, user: &UserId) -> Result<usize, BusError> {
        let ctx = self.ctx()?;
        let mut conn = ctx.conn.clone();
        let fields: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(ctx.keys.user(user))
            .query_async(&mut conn)
            .await?;
        Ok(fields
            .iter()
            .filter(|(_, node)| {
                !matches!(
                    ctx.membership.live.status(node),
                    cluster::NodeStatus::Expired | cluster::NodeStatus::Gone
                )
            })
            .count())
    }

    async fn cluster_view(&self) -> Result<ClusterView, BusError> {
        let ctx = self.ctx()?;
        let mut conn = ctx.conn.clone();
        let nodes: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(ctx.keys.nodes())
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await?;
        let mut batch = Batch::new();
        for (id, _) in &nodes {
            batch.cmd(
                "HLEN",
                &ctx.keys.node_conns(&NodeId::from_redis(id.clone())),
            );
        }
        let counts: Vec<u64> = batch
            .run(&mut conn)
            .await?
            .iter()
            .map(|v| stream::int(v).unwrap_or(0).max(0) as u64)
            .collect();
        let shards = ctx.shards_routed();
        Ok(ClusterView {
            node: ctx.membership.id().to_string(),
            router: !shards.is_empty(),
            shards,
            nodes: nodes
                .into_iter()
                .zip(counts)
                .map(|((id, score), connections)| NodeView {
                    id,
                    lease_expires_ms: Some(score as u64),
                    connections,
                })
                .collect(),
        })
    }

    async fn leave_begin(&self) {
        let Some(ctx) = self.ctx.get() else { return };
        cluster::reaper::leave_begin(ctx).await;
    }

    async fn leave_finish(&self) {
        let Some(ctx) = self.ctx.get() else { return };
        cluster::reaper::leave_finish(ctx).await;
    }
}

/// Messages per mailbox page.
const MAILBOX_PAGE: usize = 100;

/// Register `h` under node id `me` and take the first page of the user's
/// mailbox, in one script in the user's slot. The per-node index entry goes
/// first, so a reaper always finds what the user hash may name (on Redis
/// Cluster the two are in different slots: two steps, in that order).
///
/// `again`: also return what an earlier take left unwritten in the
/// connection's taking stream (its reply may have been lost). The session
/// clears that stream after each page it writes; a re-registration after a
/// lost lease does not, so it passes false.
pub async fn register_under(
    ctx: &Ctx,
    me: &NodeId,
    h: &ConnHandle,
    again: bool,
) -> Result<Mailbox, redis::RedisError> {
    let mut conn = ctx.conn.clone();
    let mut index = Batch::new();
    index
        .cmd_ignored("HSET", &ctx.keys.node_conns(me))
        .arg(h.conn.as_str())
        .arg(h.user.as_str());
    // Never replayed: the script takes a page (see `Batch::once`).
    let batch = if conn.is_cluster() {
        index.run(&mut conn).await?;
        Batch::new().once()
    } else {
        index.once()
    };
    let take = (lua::REGISTER, h.conn.as_str(), me.as_str());
    run_take(ctx, &mut conn, batch, h, take, again).await
}

/// Take the next page of the mailbox of connection `h`'s user (`again`:
/// see [`register_under`]).
pub async fn take_page(
    ctx: &Ctx,
    h: &ConnHandle,
    again: bool,
) -> Result<Mailbox, redis::RedisError> {
    let mut conn = ctx.conn.clone();
    let take = (lua::TAKE_MAILBOX, "-", "-");
    run_take(ctx, &mut conn, Batch::new().once(), h, take, again).await
}

/// Add a mailbox-taking script (`REGISTER` or `TAKE_MAILBOX` with its first
/// two `ARGV`) on `h`'s user keys to `batch`, run it, read the page.
async fn run_take(
    ctx: &Ctx,
    conn: &mut Conn,
    mut batch: Batch,
    h: &ConnHandle,
    (script, arg1, arg2): (&str, &str, &str),
    again: bool,
) -> Result<Mailbox, redis::RedisError> {
    batch
        .eval(
            script,
            &[
                &ctx.keys.user(&h.user),
                &ctx.keys.mailbox(&h.user),
                &ctx.keys.taking(&h.user, &h.conn),
            ],
            true,
        )
        .arg(arg1)
        .arg(arg2)
        .arg(ctx.cfg.mailbox_ttl.as_millis() as u64)
        .arg(MAILBOX_PAGE)
        .arg(if again { "1" } else { "0" });
    let page = batch.run(conn).await?;
    Ok(page.first().map(mailbox_page).unwrap_or_default())
}

/// Read a `{more, entries}` reply.
fn mailbox_page(v: &Value) -> Mailbox {
    let Value::Array(parts) = v else {
        return Mailbox::default();
    };
    Mailbox {
        more: parts.first().and_then(stream::int) == Some(1),
        msgs: parts
            .get(1)
            .map(stream::entries)
            .unwrap_or_default()
            .iter()
            .filter_map(router::entry::parse_internal)
            .map(Arc::new)
            .collect(),
    }
}
