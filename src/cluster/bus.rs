//! The Redis back-end: a cluster node.
//!
//! [`RedisBus::spawn`] connects (retrying with backoff while Redis is
//! unreachable), joins, and spawns the node's loops, all sharing one
//! [`Ctx`]:
//! heartbeat ([`cluster::lease`]), reaper ([`cluster::reaper`]), one router
//! candidate per send shard ([`router::send`]), the inbox and topic readers
//! ([`router::inbox`]), the re-route worker, the batching publisher and the
//! acker.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use redis::Value;
use tokio_util::task::TaskTracker;

use crate::ack::AckGuard;
use crate::backoff::Backoff;
use crate::bus::{Bus, BusError, ClusterView, Mailbox, NodeView, Publish, Registered, Resume};
use crate::cluster::route::acker::Acker;
use crate::cluster::route::publish::Publisher;
use crate::cluster::route::send::ShardSet;
use crate::cluster::route::{self as router, Rerouter};
use crate::cluster::sessions::{
    MAILBOX_PAGE, mailbox_page, register_under, take_cmd, unregister_many,
};
use crate::cluster::{self, Ctx, Membership};
use crate::config::{Config, redact_url};
use crate::ids::{NodeId, UserId};
use crate::keys::{Keys, shard_of};
use crate::local::{ConnHandle, Registry};
use crate::message::{Message, Target};
use crate::metrics::Metrics;
use crate::redis::conn::{Batch, Conn, Connector};
use crate::shutdown::{Lifecycle, Phase};
use crate::stream;

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
    life: Lifecycle,
}

impl RedisBus {
    pub fn new(
        cfg: Arc<Config>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        life: Lifecycle,
    ) -> Self {
        RedisBus {
            cfg,
            registry,
            metrics,
            ctx: OnceLock::new(),
            boot_id: NodeId::random(),
            view: tokio::sync::Mutex::new(None),
            life,
        }
    }

    fn ctx(&self) -> Result<&Arc<Ctx>, BusError> {
        self.ctx.get().ok_or(BusError::Unavailable)
    }

    /// Connect (retrying with backoff while Redis is unreachable), join,
    /// and spawn the node's loops on `tracker`; they stop as the node's
    /// [`Lifecycle`] moves on. The handle leaves the cluster.
    pub fn spawn(self: &Arc<Self>, tracker: &TaskTracker) -> ClusterHandle {
        let bus = self.clone();
        let tracker2 = tracker.clone();
        tracker.spawn(async move {
            let Some((connector, redis, lease_conn)) = bus.connect().await else {
                return;
            };
            let (rerouter, reroute_rx) = Rerouter::channel();
            let (acker, ack_rx) = Acker::channel();
            let (publisher, pub_rx) = Publisher::channel();
            let ctx = Arc::new(Ctx {
                cfg: bus.cfg.clone(),
                keys: Keys::new(&bus.cfg.prefix),
                connector,
                redis,
                lease_conn,
                membership: Membership::new(bus.boot_id.clone(), bus.life.clone()),
                registry: bus.registry.clone(),
                metrics: bus.metrics.clone(),
                rerouter,
                acker,
                publisher,
                shards: ShardSet::default(),
                unsent: Default::default(),
                sweep: Default::default(),
                life: bus.life.clone(),
            });
            let _ = bus.ctx.set(ctx.clone());
            // The acker and publisher outlive the loops that feed them:
            // they stop last (`Stopped`) and drain.
            tracker2.spawn(router::acker::run(ctx.clone(), ack_rx));
            tracker2.spawn(router::publish::run(ctx.clone(), pub_rx));
            tracker2.spawn(router::reroute_worker(ctx.clone(), reroute_rx));
            tracker2.spawn(cluster::lease::run(ctx.clone()));
            tracker2.spawn(cluster::reaper::run(ctx.clone()));
            tracker2.spawn(router::inbox::run_inbox(ctx.clone()));
            tracker2.spawn(router::inbox::run_topics(ctx.clone()));
            for shard in 0..bus.cfg.send_shards {
                tracker2.spawn(router::send::run(ctx.clone(), shard));
            }
        });
        ClusterHandle { bus: self.clone() }
    }

    /// Connect, retrying with backoff; `None` if stopped first.
    async fn connect(&self) -> Option<(Connector, Conn, Conn)> {
        let url = self.cfg.redis_url.clone().unwrap_or_default();
        let mut backoff = Backoff::boot();
        loop {
            let attempt = async {
                let connector = Connector::new(&self.cfg)?;
                let redis = connector.shared().await?;
                let lease_conn = connector.shared().await?;
                Ok::<_, redis::RedisError>((connector, redis, lease_conn))
            };
            match attempt.await {
                Ok(c) => return Some(c),
                Err(e) => {
                    self.metrics.redis_errors.inc();
                    let delay = backoff.next_delay();
                    tracing::warn!(redis = %redact_url(&url), error = %e, retry_in_ms = delay.as_millis() as u64, "redis unreachable at boot");
                    if !self.life.sleep(delay, Phase::Leaving).await {
                        return None;
                    }
                }
            }
        }
    }
}

/// Leaves the cluster (see [`cluster::leave`]); the node calls it as its
/// phase moves on.
pub struct ClusterHandle {
    bus: Arc<RedisBus>,
}

impl ClusterHandle {
    /// Leave, first half (the node is `Leaving`): expire the lease, release
    /// router leases. Sockets are still open.
    pub async fn leave_begin(&self) {
        if let Some(ctx) = self.bus.ctx.get() {
            cluster::leave::leave_begin(ctx).await;
        }
    }

    /// Leave, second half (the node is `SelfReaping`), once sockets are
    /// closed: route what is left, delete the inbox, leave `<p>:nodes`.
    pub async fn leave_finish(&self) {
        if let Some(ctx) = self.bus.ctx.get() {
            cluster::leave::leave_finish(ctx).await;
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
        self.ctx
            .get()
            .is_some_and(|c| c.membership.holds_lease() && c.shards.all_tried(c.cfg.send_shards))
    }

    /// Every heartbeat failed for a heartbeat's time: Redis is down or out
    /// of reach, whatever the lease's remaining time says.
    fn cut_off(&self) -> bool {
        self.ctx
            .get()
            .is_some_and(|c| c.membership.cut_off(c.cfg.heartbeat))
    }

    async fn register(
        &self,
        h: &ConnHandle,
        resume: Option<&Resume>,
    ) -> Result<Registered, BusError> {
        let ctx = self.ctx()?;
        // A fresh lease is needed to write under our id; wait a little for
        // one rather than refuse a client during a short Redis hiccup.
        // Retrying is safe: what a lost reply read is still in the mailbox.
        for _ in 0..3 {
            if !ctx.membership.wait_lease(Duration::from_secs(3)).await {
                break;
            }
            let me = ctx.membership.id();
            let page = match register_under(ctx, &me, h, resume).await {
                Ok(page) => page,
                // The scripts are loaded again now: once more.
                Err(e) if e.code() == Some("NOSCRIPT") => continue,
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
        let mut redis = ctx.redis.clone();
        // Safe to replay: deleting the same ids and reading the same page.
        let mut batch = Batch::new();
        take_cmd(ctx, &mut batch, &h.user, written, MAILBOX_PAGE);
        let page = batch.run(&mut redis).await.map_err(|e| {
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
        let mut redis = ctx.redis.clone();
        let mut batch = Batch::new();
        take_cmd(ctx, &mut batch, &h.user, written, 0);
        if let Err(e) = batch.run(&mut redis).await {
            ctx.redis_error();
            // They stay in the mailbox: the next connection gets them again
            // (duplicates with the same id, never loss).
            tracing::warn!(conn = %h.conn, user = %h.user, error = %e, "written mailbox page not deleted");
        }
    }

    async fn unregister(&self, h: &ConnHandle) {
        let Ok(ctx) = self.ctx() else { return };
        let me = ctx.membership.id();
        if let Err(e) = unregister_many(ctx, &me, &[(h.conn.clone(), h.user.clone())]).await {
            ctx.redis_error();
            // Reconciliation removes it within a few heartbeats (a stale
            // field naming a live node would count against the user's limit).
            tracing::warn!(conn = %h.conn, user = %h.user, error = %e, "unregister failed; reconciliation will retry");
        }
    }

    fn hand_back(&self, msg: Arc<Message>, guard: Option<Arc<AckGuard>>) {
        let Ok(ctx) = self.ctx() else { return };
        let guard = guard.unwrap_or_else(|| Arc::new(AckGuard::noop()));
        ctx.rerouter.hand_back(&msg, guard);
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
        // Idempotency (contract §4): a key already holding an id answers
        // with it. Two racing requests may both add an entry: the first id
        // to claim the key wins, here and in the router (which drops the
        // other as a duplicate), so both answer the same id.
        let idem_key = match (&p.target, &p.idem) {
            (Target::User(u), Some(k)) => Some(ctx.keys.idem(u, k)),
            _ => None,
        };
        let mut redis = ctx.redis.clone();
        if let Some(key) = &idem_key {
            let first: Option<String> = redis::cmd("GET").arg(key).query_async(&mut redis).await?;
            if let Some(first) = first {
                ctx.metrics.deduplicated.inc();
                return Ok(first);
            }
            fields.push(("idem", p.idem.clone().unwrap_or_default()));
        }
        let id = ctx.publisher.add(ctx.keys.send(shard), fields).await?;
        let id = crate::cluster::entry::public_id(shard, &id);
        if let Some(key) = &idem_key {
            let set: Option<String> = redis::cmd("SET")
                .arg(key)
                .arg(&id)
                .arg("NX")
                .arg("GET")
                .arg("PX")
                .arg(ctx.cfg.idempotency_ttl.as_millis() as u64)
                .query_async(&mut redis)
                .await?;
            if let Some(first) = set {
                return Ok(first);
            }
        }
        Ok(id)
    }

    /// Counted as `/api/presence` counts (§2: "over the live nodes of the
    /// cluster"): a field naming a node absent from `<p>:nodes`, or whose
    /// lease expired, is not a connection, whether or not this node had
    /// seen that node before.
    async fn user_connections(&self, user: &UserId) -> Result<usize, BusError> {
        let ctx = self.ctx()?;
        let counts = cluster::control::presence(ctx, std::slice::from_ref(user)).await?;
        Ok(counts.first().copied().unwrap_or(0))
    }

    async fn activity(&self) -> Result<crate::bus::Activity, BusError> {
        let ctx = self.ctx()?;
        let (online_users, events) = cluster::presence::activity(ctx, 20).await.map_err(|e| {
            ctx.redis_error();
            BusError::from(e)
        })?;
        Ok(crate::bus::Activity {
            online_users,
            events: events
                .into_iter()
                .map(|f| {
                    f.into_iter()
                        .map(|(k, v)| (k, serde_json::Value::String(v)))
                        .collect()
                })
                .collect(),
        })
    }

    async fn presence(&self, users: &[UserId]) -> Result<Vec<usize>, BusError> {
        let ctx = self.ctx()?;
        cluster::control::presence(ctx, users).await.map_err(|e| {
            ctx.redis_error();
            BusError::from(e)
        })
    }

    async fn disconnect(&self, user: &UserId, code: u16, reason: &str) -> Result<usize, BusError> {
        let ctx = self.ctx()?;
        let close = cluster::entry::Close {
            user: user.clone(),
            conns: Vec::new(),
            code,
            reason: reason.to_owned(),
        };
        cluster::control::close(ctx, &close, None)
            .await
            .map_err(|e| {
                ctx.redis_error();
                BusError::from(e)
            })
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
            v.shards = ctx.shards.list();
            v.router = !v.shards.is_empty();
            return Ok(v);
        }
        let v = read_cluster_view(ctx).await?;
        *cached = Some((std::time::Instant::now(), v.clone()));
        Ok(v)
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
    batch.cmd("HGETALL", &ctx.keys.versions());
    for id in &known {
        hlen(&mut batch, id);
    }
    let mut redis = ctx.redis.clone();
    let mut replies = batch.run(&mut redis).await?.into_iter();
    let nodes: Vec<(String, f64)> =
        redis::from_redis_value(replies.next().unwrap_or(Value::Nil)).unwrap_or_default();
    let versions: std::collections::HashMap<String, String> =
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
        for (id, v) in joined.iter().zip(batch.run(&mut redis).await?) {
            counts.insert((*id).clone(), stream::int(&v).unwrap_or(0).max(0) as u64);
        }
    }
    let shards = ctx.shards.list();
    Ok(ClusterView {
        node: ctx.membership.id().to_string(),
        router: !shards.is_empty(),
        shards,
        nodes: nodes
            .into_iter()
            .map(|(id, score)| NodeView {
                connections: counts.get(&id).copied().unwrap_or(0),
                lease_expires_ms: Some(score as u64),
                // A node of a release before 0.2 writes none.
                version: versions.get(&id).cloned(),
                id,
            })
            .collect(),
    })
}
