//! Routing: getting each message to the inbox of every node that holds a
//! connection of its user, or into the user's mailbox.
//!
//! - [`route`]: the routing step for a batch — pipelined look-ups, each
//!   inbox's entries added in one step (`XADD … NOMKSTREAM`, or
//!   `INBOX_ADD` for a few), the atomic mailbox script; no round trip per
//!   message.
//! - [`send`]: the router of a send shard (one node at a time, by lease).
//! - [`inbox`]: the readers of this node's inbox and the topic stream.
//! - [`publish`]: batched `XADD`s for client sends and the HTTP API.
//! - [`acker`]: batched acknowledgements once hand-offs are done (`XACK`
//!   and trims of what is done; `XDEL` for what is done out of order).

pub mod acker;
pub mod inbox;
pub mod publish;
pub mod send;

use std::collections::HashMap;
use std::sync::Arc;

use crate::shutdown::Phase;
use redis::Value;
use tokio::sync::mpsc;

use crate::ack::AckGuard;
use crate::backoff::Backoff;
use crate::cluster::Ctx;
use crate::cluster::NodeStatus;
use crate::cluster::entry;
use crate::cluster::sessions::user_keys;
use crate::ids::{NodeId, UserId};
use crate::message::{MAX_HOPS, Message, Target};
use crate::redis::conn::{Batch, Conn};
use crate::redis::lua;
use crate::stream;

/// A message to route again, with the guard of whatever it came from.
pub type Reroute = (Arc<Message>, Arc<AckGuard>);

/// `m` routed once more: the one place a message's hop count goes up
/// (contract §6: at most 3 re-routes, then the mailbox).
pub fn again(m: &Message) -> Message {
    let mut m = m.clone();
    m.hops += 1;
    m
}

/// Hands messages to the re-route worker ([`reroute_worker`]).
#[derive(Clone)]
pub struct Rerouter(mpsc::UnboundedSender<Reroute>);

impl Rerouter {
    pub fn channel() -> (Rerouter, mpsc::UnboundedReceiver<Reroute>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Rerouter(tx), rx)
    }

    /// Route `m` again, one hop more; `guard` (what it came from) is
    /// released once that is done.
    pub fn hand_back(&self, m: &Message, guard: Arc<AckGuard>) {
        let _ = self.0.send((Arc::new(again(m)), guard));
    }
}

/// Most entries added to one inbox in one step ([`lua::INBOX_ADD`]): the
/// wake-up it saves matters at everyday rates, where a batch holds a few
/// entries per node; at full rate an `XADD` costs Redis less from a
/// pipeline than from Lua (measured: −10 % throughput with 64 per step).
const INBOX_ADD_MAX: usize = 16;

/// Largest batch the re-route worker takes at once.
const REROUTE_BATCH: usize = 256;

/// Approximate cap of the shared topic stream, in entries…
const TOPIC_STREAM_MAX: usize = 100_000;
/// …and in age (ms).
const TOPIC_STREAM_AGE_MS: u64 = 60_000;

/// Where one user's connections are, as far as routing is concerned.
#[derive(Default)]
struct UserRoute {
    /// Live nodes holding a connection, this one included: a message for a
    /// user connected here goes through this node's own inbox too, so a
    /// slow local client holds an inbox entry, never the acknowledgement
    /// of a send-stream batch (which a successor would route again).
    nodes: Vec<NodeId>,
    /// Nodes named by the user's hash that are not live (expired or gone):
    /// the mailbox script ignores them.
    not_live: Vec<String>,
}

enum Op {
    /// Messages (positions in the round) added to one node's inbox.
    Inbox(Vec<usize>, NodeId),
    Mailbox(usize),
}

/// Route a batch of messages. Returns once each is handed off durably:
/// added to an inbox, to a mailbox or to the topic stream. Order is kept
/// per user.
pub async fn route(ctx: &Ctx, msgs: Vec<Arc<Message>>) -> Result<(), redis::RedisError> {
    route_on(ctx, &mut ctx.redis.clone(), msgs).await
}

/// [`route`] on a given connection (the router's own).
pub async fn route_on(
    ctx: &Ctx,
    redis: &mut Conn,
    msgs: Vec<Arc<Message>>,
) -> Result<(), redis::RedisError> {
    let (topics, mut pending): (Vec<_>, Vec<_>) = msgs
        .into_iter()
        .partition(|m| matches!(m.target, Target::Topic(_)));
    if !topics.is_empty() {
        let key = ctx.keys.topics();
        let mut batch = Batch::new();
        for m in &topics {
            batch
                .cmd_ignored("XADD", &key)
                .arg("MAXLEN")
                .arg("~")
                .arg(TOPIC_STREAM_MAX)
                .arg("*")
                .arg(entry::topic_fields(m));
        }
        // Readers follow it live; older entries only cost memory (and
        // bytes: a count alone would let big payloads pile up).
        let horizon = ctx
            .membership
            .live
            .redis_now()
            .saturating_sub(TOPIC_STREAM_AGE_MS);
        batch
            .cmd_ignored("XTRIM", &key)
            .arg("MINID")
            .arg("~")
            .arg(horizon);
        batch.run(redis).await?;
    }
    // Each round routes what the previous one could not (a node found gone,
    // a user who just connected, a connection that just closed); the last
    // round puts whatever is left in the mailbox.
    for round in 0..=MAX_HOPS {
        if pending.is_empty() {
            break;
        }
        let force_mailbox = round == MAX_HOPS;
        pending = route_round(ctx, redis, pending, force_mailbox).await?;
    }
    Ok(())
}

async fn route_round(
    ctx: &Ctx,
    redis: &mut Conn,
    pending: Vec<Arc<Message>>,
    force_mailbox: bool,
) -> Result<Vec<Arc<Message>>, redis::RedisError> {
    let me = ctx.membership.id();
    let me_live = ctx.membership.holds_lease();
    // 1. Look up every distinct user once, pipelined, numbering the
    //    user's new messages in the same script (contract §9).
    let mut users: Vec<UserId> = Vec::new();
    let mut index: HashMap<UserId, usize> = HashMap::new();
    for m in &pending {
        if let Some(u) = m.user()
            && !index.contains_key(u)
        {
            index.insert(u.clone(), users.len());
            users.push(u.clone());
        }
    }
    let (pending, lookups) = if force_mailbox || users.is_empty() {
        let n = users.len();
        (pending, vec![Vec::new(); n])
    } else {
        look_up(ctx, redis, &users, &index, pending).await?
    };
    // 2. Ask Redis about nodes this node has not seen yet, and about those
    //    it believes expired (its view may be stale; skipping a live node
    //    would mailbox a message for a user who is online).
    let live = &ctx.membership.live;
    let nodes: Vec<&str> = lookups.iter().flatten().map(|(_, n)| n.as_str()).collect();
    crate::cluster::control::learn(ctx, redis, &nodes).await?;
    // 3. Classify each user's connections; stale fields are removed.
    let mut routes: Vec<UserRoute> = Vec::with_capacity(users.len());
    let mut batch = Batch::new();
    for (u, fields) in users.iter().zip(&lookups) {
        let mut r = UserRoute::default();
        for (conn_id, node) in fields {
            let status = if node == me.as_str() {
                if me_live {
                    NodeStatus::Live
                } else {
                    NodeStatus::Expired
                }
            } else {
                live.status(node)
            };
            match status {
                NodeStatus::Live => {
                    let n = NodeId::from_redis(node.clone());
                    if !r.nodes.contains(&n) {
                        r.nodes.push(n);
                    }
                }
                NodeStatus::Gone => {
                    batch.cmd_ignored("HDEL", &ctx.keys.user(u)).arg(conn_id);
                    r.not_live.push(node.clone());
                }
                NodeStatus::Expired | NodeStatus::Unknown => r.not_live.push(node.clone()),
            }
        }
        routes.push(r);
    }
    // 4. One pipeline: each inbox's messages in order, added in one step
    //    when there are several (see `lua::INBOX_ADD`: its reader then wakes
    //    once for them all); then the mailbox scripts, in message order.
    let mut ops: Vec<Op> = Vec::new();
    let mut inboxes: Vec<(&NodeId, Vec<usize>)> = Vec::new();
    let mut mailboxed: Vec<usize> = Vec::new();
    for (i, m) in pending.iter().enumerate() {
        let Some(u) = m.user() else { continue };
        let r = &routes[index[u]];
        if force_mailbox || m.hops > MAX_HOPS || r.nodes.is_empty() {
            mailboxed.push(i);
            continue;
        }
        for node in &r.nodes {
            match inboxes.iter_mut().find(|(n, _)| *n == node) {
                Some((_, v)) => v.push(i),
                None => inboxes.push((node, vec![i])),
            }
        }
    }
    for (node, msgs) in &inboxes {
        let key = ctx.keys.inbox(node);
        if msgs.len() == 1 || msgs.len() > INBOX_ADD_MAX {
            // One entry, or so many that a reader's extra wake-up is cheap
            // beside them, and `XADD`s from Lua would cost Redis more.
            for &i in msgs {
                batch
                    .cmd("XADD", &key)
                    .arg("NOMKSTREAM")
                    .arg("*")
                    .arg(entry::fields(&pending[i]));
                ops.push(Op::Inbox(vec![i], (*node).clone()));
            }
            continue;
        }
        let cmd = batch.eval(lua::INBOX_ADD, &[&key], true);
        for &i in msgs {
            let f = entry::fields(&pending[i]);
            cmd.arg(2 * f.len()).arg(f);
        }
        ops.push(Op::Inbox(msgs.clone(), (*node).clone()));
    }
    for i in mailboxed {
        let m = &pending[i];
        let Some(u) = m.user() else { continue };
        let force = force_mailbox || m.hops > MAX_HOPS;
        mailbox_cmd(ctx, &mut batch, m, u, force, &routes[index[u]].not_live);
        ops.push(Op::Mailbox(i));
    }
    let replies: Vec<Value> = batch.run(redis).await?;
    // 5. Read the results; collect what must go round again.
    let mut ok = vec![false; pending.len()];
    let mut nudges: Vec<(String, &UserId)> = Vec::new();
    let mut replies = replies.into_iter();
    for op in ops {
        match op {
            Op::Inbox(msgs, node) => match replies.next() {
                Some(Value::Nil | Value::Int(0)) => {
                    // NOMKSTREAM found no inbox: the node is gone.
                    live.mark_gone(node.as_str());
                }
                Some(_) => msgs.iter().for_each(|&i| ok[i] = true),
                None => {}
            },
            Op::Mailbox(i) => {
                if let Some(Value::Array(r)) = replies.next()
                    && r.first().and_then(stream::int) == Some(1)
                {
                    ok[i] = true;
                    ctx.metrics.mailboxed.inc();
                    let dropped = r.get(1).and_then(stream::int).unwrap_or(0);
                    ctx.metrics.mailbox_dropped.inc_by(dropped.max(0) as u64);
                    // Forced in while the user is online: tell its nodes,
                    // or it would wait there for the next connect.
                    if let Some(u) = pending[i].user() {
                        for node in r.iter().skip(2).filter_map(stream::string) {
                            if !nudges.iter().any(|(n, v)| *n == node && *v == u) {
                                nudges.push((node, u));
                            }
                        }
                    }
                }
                // Otherwise the user has a live connection we did not know
                // of: the next round looks it up again.
            }
        }
    }
    if !nudges.is_empty() {
        let mut batch = Batch::new();
        for (node, u) in &nudges {
            batch
                .cmd_ignored("XADD", &ctx.keys.inbox(&NodeId::from_redis(node.clone())))
                .arg("NOMKSTREAM")
                .arg("*")
                .arg(&entry::mailbox_nudge_fields(u));
        }
        // Best effort: the message is safe in the mailbox either way.
        if let Err(e) = batch.run(redis).await {
            tracing::debug!(error = %e, "mailbox nudge failed");
        }
    }
    Ok(pending
        .into_iter()
        .zip(ok)
        .filter_map(|(m, ok)| (!ok).then_some(m))
        .collect())
}

/// Connections (conn id, node id) of each user, in order, and `pending`
/// with its new messages numbered and its duplicates (an `idem` key seen
/// before, contract §4) gone. One pipeline: `HGETALL` for a user with
/// nothing to number, the `ROUTE` script otherwise.
async fn look_up(
    ctx: &Ctx,
    redis: &mut Conn,
    users: &[UserId],
    index: &HashMap<UserId, usize>,
    pending: Vec<Arc<Message>>,
) -> Result<(Vec<Arc<Message>>, Vec<Vec<(String, String)>>), redis::RedisError> {
    let history = ctx.cfg.history_size > 0;
    let needs_number = |m: &Message| m.seq == 0 && (history || m.idem.is_some());
    // Per user, the positions in `pending` of the messages to number.
    let mut todo: Vec<Vec<usize>> = vec![Vec::new(); users.len()];
    for (i, m) in pending.iter().enumerate() {
        if let Some(u) = m.user()
            && needs_number(m)
            && let Some(&j) = index.get(u)
        {
            todo[j].push(i);
        }
    }
    let mut batch = Batch::new();
    for (u, msgs) in users.iter().zip(&todo) {
        if msgs.is_empty() {
            batch.cmd("HGETALL", &ctx.keys.user(u));
            continue;
        }
        let mut keys = vec![ctx.keys.user(u), ctx.keys.seq(u), ctx.keys.history(u)];
        for &i in msgs {
            if let Some(k) = &pending[i].idem {
                keys.push(ctx.keys.idem(u, k));
            }
        }
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let cmd = batch
            .eval(lua::ROUTE, &keys, true)
            .arg(crate::ids::new_epoch())
            .arg(ctx.cfg.history_size)
            .arg(ctx.cfg.history_ttl.as_millis() as u64)
            .arg(ctx.cfg.mailbox_ttl.as_millis() as u64)
            .arg(ctx.cfg.idempotency_ttl.as_millis() as u64)
            .arg(msgs.len());
        let mut prev: Option<&Message> = None;
        for &i in msgs {
            let m = &pending[i];
            let f = entry::history_fields(m);
            let follows = prev.is_some_and(|p| follows(p, m));
            let flags = 8 * 2 * f.len()
                + 4 * usize::from(follows)
                + 2 * usize::from(m.idem.is_some())
                + usize::from(m.repeat);
            cmd.arg(&m.id).arg(flags).arg(f);
            prev = Some(m);
        }
    }
    let replies = batch.run(redis).await?;
    let mut lookups = Vec::with_capacity(users.len());
    // Per message: None (untouched), Some(seq) or Some(-1) (duplicate).
    let mut results: Vec<Option<(i64, Arc<str>)>> = vec![None; pending.len()];
    for (reply, msgs) in replies.into_iter().zip(&todo) {
        if msgs.is_empty() {
            lookups.push(redis::from_redis_value(reply)?);
            continue;
        }
        let Value::Array(mut parts) = reply else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Parse,
                "ROUTE reply is not an array",
            )));
        };
        let epoch: Arc<str> = parts
            .get(2)
            .and_then(stream::string)
            .unwrap_or_default()
            .into();
        let seqs: Vec<i64> = match parts.get(1) {
            Some(Value::Array(v)) => v.iter().map(|x| stream::int(x).unwrap_or(0)).collect(),
            _ => Vec::new(),
        };
        for (&i, seq) in msgs.iter().zip(seqs) {
            results[i] = Some((seq, epoch.clone()));
        }
        lookups.push(redis::from_redis_value(parts.swap_remove(0))?);
    }
    let mut out = Vec::with_capacity(pending.len());
    for (mut m, r) in pending.into_iter().zip(results) {
        match r {
            None => out.push(m),
            Some((-1, _)) => {
                ctx.metrics.deduplicated.inc();
                tracing::debug!(id = %m.id, "duplicate (idempotency key seen before)");
            }
            Some((seq, epoch)) => {
                let mm = Arc::make_mut(&mut m);
                if seq > 0 {
                    mm.seq = seq as u64;
                    mm.epoch = epoch;
                }
                mm.idem = None;
                mm.repeat = false;
                out.push(m);
            }
        }
    }
    Ok((out, lookups))
}

/// Whether `m` comes after `prev` in the same send stream and neither may
/// have been routed before: what lets `ROUTE` skip comparing `m`'s id.
fn follows(prev: &Message, m: &Message) -> bool {
    !prev.repeat && !m.repeat && stream::id_follows(&prev.id, &m.id)
}

fn mailbox_cmd(
    ctx: &Ctx,
    batch: &mut Batch,
    m: &Message,
    u: &UserId,
    force: bool,
    not_live: &[String],
) {
    let k = user_keys(ctx, u);
    batch
        .eval(lua::MAILBOX, &[&k[0], &k[1], &k[2]], true)
        .arg(if force { "1" } else { "0" })
        .arg(ctx.cfg.mailbox_max)
        .arg(ctx.cfg.mailbox_ttl.as_millis() as u64)
        .arg(ctx.cfg.mailbox_max_bytes)
        .arg(not_live.len())
        .arg(not_live)
        .arg(entry::fields(m));
}

/// Routes messages that reached this node after their user left it (and
/// queued messages of connections that closed), in batches.
pub async fn reroute_worker(ctx: Arc<Ctx>, mut rx: mpsc::UnboundedReceiver<Reroute>) {
    let mut batch: Vec<Reroute> = Vec::new();
    loop {
        tokio::select! {
            _ = ctx.life.reached(Phase::Stopped) => return,
            n = rx.recv_many(&mut batch, REROUTE_BATCH) => if n == 0 { return },
        }
        let msgs: Vec<Arc<Message>> = batch.iter().map(|(m, _)| m.clone()).collect();
        let n = msgs.len() as u64;
        // The originals' guards are released once this batch is handed
        // off, not before: until then their entries stay put.
        let held: Vec<Arc<AckGuard>> = batch.drain(..).map(|(_, g)| g).collect();
        let mut backoff = Backoff::redis();
        loop {
            match route(&ctx, msgs.clone()).await {
                Ok(()) => {
                    tracing::debug!(messages = n, "re-routed");
                    ctx.metrics.rerouted.inc_by(n);
                    drop(held);
                    break;
                }
                Err(e) => {
                    ctx.redis_error();
                    let d = backoff.next_delay();
                    tracing::warn!(error = %e, messages = n, retry_in_ms = d.as_millis() as u64, "re-route failed");
                    if !ctx.life.sleep(d, Phase::Stopped).await {
                        // Not handed off: their entries must stay (a
                        // reaper, or our own leave, routes them again).
                        held.iter().for_each(|g| g.disarm());
                        return;
                    }
                }
            }
        }
    }
}

/// Routing in-process against a real redis-server, without a node: the
/// routing step's three outcomes (an inbox, the mailbox, a gone node's
/// stale field skipped) and the hop bound.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Membership;
    use crate::cluster::route::acker::Acker;
    use crate::cluster::route::publish::Publisher;
    use crate::cluster::route::send::ShardSet;
    use crate::config::Config;
    use crate::keys::Keys;
    use crate::local::Registry;
    use crate::metrics::Metrics;
    use crate::redis::conn::Connector;
    use crate::shutdown::Lifecycle;

    async fn ctx(url: &str) -> Ctx {
        let cfg = Arc::new(
            Config::try_parse_from(["wscluster", "--dev", "--redis-url", url]).expect("config"),
        );
        let connector = Connector::new(&cfg).expect("connector");
        let redis = connector.shared().await.expect("redis");
        let lease_conn = connector.shared().await.expect("redis");
        let life = Lifecycle::new();
        Ctx {
            keys: Keys::new(&cfg.prefix),
            membership: Membership::new(crate::ids::NodeId::random(), life.clone()),
            registry: Arc::new(Registry::new()),
            metrics: Arc::new(Metrics::new()),
            rerouter: Rerouter::channel().0,
            acker: Acker::channel().0,
            publisher: Publisher::channel().0,
            shards: ShardSet::default(),
            unsent: Default::default(),
            sweep: Default::default(),
            cfg,
            connector,
            redis,
            lease_conn,
            life,
        }
    }

    fn msg(id: &str, to: &str, hops: u32) -> Arc<Message> {
        let mut m = Message::new(
            id.into(),
            Target::User(UserId::parse(to).unwrap()),
            None,
            "1".into(),
            0,
        );
        m.hops = hops;
        Arc::new(m)
    }

    #[tokio::test]
    async fn route_to_inbox_mailbox_and_past_stale_fields() {
        let dir = std::env::temp_dir().join(format!("wsc-route-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let redis = wscluster_testkit::RedisServer::start(&dir).expect("redis-server");
        let ctx = ctx(&redis.url()).await;
        let mut c = ctx.redis.clone();
        // A live node "n1" with an inbox, holding ann's connection; bob is
        // offline; cy's only field names a node that is gone.
        let now: u64 = redis::cmd("TIME")
            .query_async::<(u64, u64)>(&mut c)
            .await
            .map(|(s, _)| s * 1000)
            .unwrap();
        let n1 = NodeId::from_redis("n1".into());
        let _: () = redis::cmd("ZADD")
            .arg(ctx.keys.nodes())
            .arg(now + 60_000)
            .arg("n1")
            .query_async(&mut c)
            .await
            .unwrap();
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(ctx.keys.inbox(&n1))
            .arg("node")
            .arg("$")
            .arg("MKSTREAM")
            .query_async(&mut c)
            .await
            .unwrap();
        for (user, node) in [("ann", "n1"), ("cy", "gone")] {
            let _: () = redis::cmd("HSET")
                .arg(ctx.keys.user(&UserId::parse(user).unwrap()))
                .arg(format!("c-{user}"))
                .arg(node)
                .query_async(&mut c)
                .await
                .unwrap();
        }
        route(
            &ctx,
            vec![
                msg("1-1", "ann", 0),
                msg("1-2", "bob", 0),
                msg("1-3", "cy", 0),
                msg("1-4", "ann", MAX_HOPS + 1),
            ],
        )
        .await
        .expect("routed");
        let xlen = |key: String| {
            let mut c = ctx.redis.clone();
            async move {
                redis::cmd("XLEN")
                    .arg(key)
                    .query_async::<usize>(&mut c)
                    .await
                    .unwrap()
            }
        };
        let user = |u: &str| UserId::parse(u).unwrap();
        // ann's message, and a nudge to read the mailbox for the one past
        // the hop bound (she is online there).
        assert_eq!(xlen(ctx.keys.inbox(&n1)).await, 2, "n1's inbox");
        assert_eq!(
            xlen(ctx.keys.mailbox(&user("bob"))).await,
            1,
            "bob offline: mailbox"
        );
        assert_eq!(
            xlen(ctx.keys.mailbox(&user("cy"))).await,
            1,
            "cy's node is gone: mailbox"
        );
        assert_eq!(
            xlen(ctx.keys.mailbox(&user("ann"))).await,
            1,
            "past the hop bound: mailbox"
        );
        let cy: usize = redis::cmd("HLEN")
            .arg(ctx.keys.user(&user("cy")))
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(cy, 0, "the stale field is removed");
        drop(redis);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
