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

use crate::ack::AckGuard;
use crate::backoff::Backoff;
use crate::bus::{Bus, BusError, ClusterView, Mailbox, NodeView, Publish};
use crate::cluster::route::{self as router, publish::PublishReq};
use crate::cluster::sessions::{
    MAILBOX_PAGE, mailbox_page, register_under, take_cmd, unregister_under,
};
use crate::cluster::{self, Ctx, Membership};
use crate::config::{Config, redact_url};
use crate::ids::{NodeId, UserId};
use crate::keys::{Keys, shard_of};
use crate::local::{ConnHandle, Registry};
use crate::message::{Message, Target};
use crate::metrics::Metrics;
use crate::redis::conn::{Batch, Conn, Connector};
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
        Ok(crate::cluster::entry::public_id(shard, &id))
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
