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
use redis::Value;
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
    /// The last `/cluster` view and when it was read: however often it is
    /// polled, it costs Redis at most one read per heartbeat (concurrent
    /// polls wait for one read).
    view: tokio::sync::Mutex<Option<(std::time::Instant, ClusterView)>>,
}

impl RedisBus {
    pub fn new(cfg: Arc<Config>, registry: Arc<Registry>, metrics: Arc<Metrics>) -> Self {
        RedisBus {
            cfg,
            registry,
            metrics,
            ctx: OnceLock::new(),
            boot_id: NodeId::random(),
            view: tokio::sync::Mutex::new(None),
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
        // A fresh lease is needed to write under our id; wait a little for
        // one rather than refuse a client during a short Redis hiccup.
        // Retrying is safe: what a lost reply read is still in the mailbox.
        for _ in 0..3 {
            if !ctx.membership.wait_lease(Duration::from_secs(3)).await {
                break;
            }
            let me = ctx.membership.id();
            let page = match register_under(ctx, &me, h).await {
                Ok(page) => page,
                Err(e) => {
                    ctx.redis_error();
                    tracing::warn!(conn = %h.conn, user = %h.user, error = %e, "register failed");
                    break;
                }
            };
            // If the id changed meanwhile, the re-registration may have run
            // before our write: register again under the new id.
            if ctx.membership.id() == me {
                h.set_registered_as(&me);
                return Ok(page);
            }
        }
        Err(BusError::Unavailable)
    }

    async fn take_mailbox(&self, h: &ConnHandle, written: &Mailbox) -> Result<Mailbox, BusError> {
        let ctx = self.ctx()?;
        let mut conn = ctx.conn.clone();
        // Safe to replay: deleting the same ids and reading the same page.
        let mut batch = Batch::new();
        take_cmd(ctx, &mut batch, &h.user, written, MAILBOX_PAGE);
        let page = batch.run(&mut conn).await.map_err(|e| {
            ctx.redis_error();
            BusError::from(e)
        })?;
        Ok(mailbox_page(page.first(), written.cursor.clone()))
    }

    async fn mailbox_written(&self, h: &ConnHandle, written: &Mailbox) {
        let Ok(ctx) = self.ctx() else { return };
        if written.ids.is_empty() {
            return;
        }
        let mut conn = ctx.conn.clone();
        let mut batch = Batch::new();
        take_cmd(ctx, &mut batch, &h.user, written, 0);
        if let Err(e) = batch.run(&mut conn).await {
            ctx.redis_error();
            // They stay in the mailbox: the next connection gets them again
            // (duplicates with the same id, never loss).
            tracing::warn!(conn = %h.conn, user = %h.user, error = %e, "written mailbox page not deleted");
        }
    }

    async fn unregister(&self, h: &ConnHandle) {
        let Ok(ctx) = self.ctx() else { return };
        let me = ctx.membership.id();
        if let Err(e) = unregister_under(ctx, &me, h).await {
            ctx.redis_error();
            // Reconciliation removes it within a few heartbeats (a stale
            // field naming a live node would count against the user's limit).
            tracing::warn!(conn = %h.conn, user = %h.user, error = %e, "unregister failed; reconciliation will retry");
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
        let mut cached = self.view.lock().await;
        if let Some((at, v)) = cached.as_ref()
            && at.elapsed() < ctx.cfg.heartbeat
        {
            // Our own part is always current.
            let mut v = v.clone();
            v.node = ctx.membership.id().to_string();
            v.shards = ctx.shards_routed();
            v.router = !v.shards.is_empty();
            return Ok(v);
        }
        let v = read_cluster_view(ctx).await?;
        *cached = Some((std::time::Instant::now(), v.clone()));
        Ok(v)
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

/// Read the `/cluster` view: the lease set and the connection count of
/// every node, in one round trip for the nodes this node knows of (and a
/// second only when one joined since its last heartbeat).
async fn read_cluster_view(ctx: &Ctx) -> Result<ClusterView, BusError> {
    let known: Vec<String> = ctx
        .membership
        .live
        .all()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let hlen = |batch: &mut Batch, id: &str| {
        batch.cmd(
            "HLEN",
            &ctx.keys.node_conns(&NodeId::from_redis(id.to_owned())),
        );
    };
    let mut batch = Batch::new();
    batch
        .cmd("ZRANGE", &ctx.keys.nodes())
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES");
    for id in &known {
        hlen(&mut batch, id);
    }
    let mut conn = ctx.conn.clone();
    let mut replies = batch.run(&mut conn).await?.into_iter();
    let nodes: Vec<(String, f64)> =
        redis::from_redis_value(replies.next().unwrap_or(Value::Nil)).unwrap_or_default();
    let mut counts: std::collections::HashMap<String, u64> = known
        .into_iter()
        .zip(replies.map(|v| stream::int(&v).unwrap_or(0).max(0) as u64))
        .collect();
    let joined: Vec<&String> = nodes
        .iter()
        .map(|(id, _)| id)
        .filter(|id| !counts.contains_key(*id))
        .collect();
    if !joined.is_empty() {
        let mut batch = Batch::new();
        for id in &joined {
            hlen(&mut batch, id);
        }
        for (id, v) in joined.iter().zip(batch.run(&mut conn).await?) {
            counts.insert((*id).clone(), stream::int(&v).unwrap_or(0).max(0) as u64);
        }
    }
    let shards = ctx.shards_routed();
    Ok(ClusterView {
        node: ctx.membership.id().to_string(),
        router: !shards.is_empty(),
        shards,
        nodes: nodes
            .into_iter()
            .map(|(id, score)| NodeView {
                connections: counts.get(&id).copied().unwrap_or(0),
                lease_expires_ms: Some(score as u64),
                id,
            })
            .collect(),
    })
}

/// Messages per mailbox page.
pub const MAILBOX_PAGE: usize = 100;

/// Register `h` under node id `me` and read the first page of the user's
/// mailbox, in one script in the user's slot. The per-node index entry goes
/// first, so a reaper always finds what the user hash may name (on Redis
/// Cluster the two are in different slots: two steps, in that order).
pub async fn register_under(
    ctx: &Ctx,
    me: &NodeId,
    h: &ConnHandle,
) -> Result<Mailbox, redis::RedisError> {
    let mut conn = ctx.conn.clone();
    let mut batch = Batch::new();
    batch
        .cmd_ignored("HSET", &ctx.keys.node_conns(me))
        .arg(h.conn.as_str())
        .arg(h.user.as_str());
    if conn.is_cluster() {
        std::mem::take(&mut batch).run(&mut conn).await?;
    }
    register_cmd(ctx, &mut batch, me, h);
    let replies = batch.run(&mut conn).await?;
    Ok(mailbox_page(replies.last(), None))
}

/// Add the `REGISTER` script for `h` under `me` to `batch` (its reply is a
/// mailbox page: [`mailbox_page`]).
pub fn register_cmd(ctx: &Ctx, batch: &mut Batch, me: &NodeId, h: &ConnHandle) {
    let k = user_keys(ctx, &h.user);
    batch
        .eval(lua::REGISTER, &[&k[0], &k[1], &k[2]], true)
        .arg(h.conn.as_str())
        .arg(me.as_str())
        .arg(ctx.cfg.mailbox_ttl.as_millis() as u64)
        .arg(MAILBOX_PAGE);
}

/// Add the `TAKE_MAILBOX` script to `batch`: delete `written` from the
/// mailbox of `h`'s user, then read `page` entries after it (0: none).
pub fn take_cmd(ctx: &Ctx, batch: &mut Batch, user: &UserId, written: &Mailbox, page: usize) {
    let after = written
        .cursor
        .as_ref()
        .map_or_else(|| "-".to_owned(), |c| format!("({c}"));
    let k = user_keys(ctx, user);
    batch
        .eval(lua::TAKE_MAILBOX, &[&k[0], &k[1], &k[2]], page > 0)
        .arg(ctx.cfg.mailbox_ttl.as_millis() as u64)
        .arg(page)
        .arg(after)
        .arg(&written.ids);
}

/// The keys of a user's mailbox scripts, all in the user's slot.
pub fn user_keys(ctx: &Ctx, user: &UserId) -> [String; 3] {
    [
        ctx.keys.user(user),
        ctx.keys.mailbox(user),
        ctx.keys.mailbox_bytes(user),
    ]
}

/// Remove `h`'s entry under node id `me`: the user's field first (only if
/// it still names `me`), then the per-node index, so the index always
/// holds whatever the user hash may name (reconciliation and reapers work
/// from it).
pub async fn unregister_under(
    ctx: &Ctx,
    me: &NodeId,
    h: &ConnHandle,
) -> Result<(), redis::RedisError> {
    let mut conn = ctx.conn.clone();
    let mut batch = Batch::new();
    batch
        .eval(lua::UNREGISTER_IF, &[&ctx.keys.user(&h.user)], false)
        .arg(h.conn.as_str())
        .arg(me.as_str());
    if conn.is_cluster() {
        std::mem::take(&mut batch).run(&mut conn).await?;
    }
    batch
        .cmd_ignored("HDEL", &ctx.keys.node_conns(me))
        .arg(h.conn.as_str());
    batch.run(&mut conn).await?;
    Ok(())
}

/// Read a `{more, entries}` reply; `cursor`: where the page before ended.
pub fn mailbox_page(v: Option<&Value>, cursor: Option<String>) -> Mailbox {
    let Some(Value::Array(parts)) = v else {
        return Mailbox {
            cursor,
            ..Mailbox::default()
        };
    };
    let entries = parts.get(1).map(stream::entries).unwrap_or_default();
    let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
    let msgs = entries
        .iter()
        .filter_map(|e| {
            let m = router::entry::parse_internal(e);
            if m.is_none() {
                tracing::warn!(id = %e.id, "unreadable mailbox entry dropped");
            }
            m
        })
        .map(Arc::new)
        .collect();
    Mailbox {
        cursor: ids.last().cloned().or(cursor),
        more: parts.first().and_then(stream::int) == Some(1),
        msgs,
        ids,
    }
}
