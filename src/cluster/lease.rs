//! The node's lease: join, heartbeat, and a new id after a lost lease.
//!
//! A node that finds its lease gone or expired cannot tell whether it was
//! frozen and reaped, cut off, or Redis was emptied; in every case it does
//! the same thing: it never writes under the old id again, takes a new id,
//! and re-registers its live connections (same connection ids) under it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::shutdown::Phase;
use redis::Value;

use crate::backoff::Backoff;
use crate::bus::Mailbox;
use crate::cluster::Ctx;
use crate::cluster::presence;
use crate::cluster::route::acker::AckJob;
use crate::cluster::sessions::{
    MAILBOX_PAGE, apply_pending_close, mailbox_page, register_cmd, registered_events, take_cmd,
    unregister_many,
};
use crate::ids::{ConnId, NodeId, UserId};
use crate::keys::INBOX_GROUP;
use crate::local::{ConnHandle, Outgoing};
use crate::redis::conn::Batch;
use crate::redis::lua;
use crate::stream;

/// What a renewal found.
enum Renewal {
    Held { expiry: u64, now: u64 },
    Lost,
}

/// Create the inbox and add the node to `<p>:nodes`. Returns the local
/// lease deadline.
pub async fn join(ctx: &Ctx, id: &NodeId) -> Result<Instant, redis::RedisError> {
    let mut redis = ctx.lease_conn.clone();
    // A Redis restarted empty lost its scripts too.
    lua::load_all(&mut redis).await?;
    let started = Instant::now();
    // `XGROUP CREATE … MKSTREAM` is how an empty stream is made.
    let created: Result<(), _> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(ctx.keys.inbox(id))
        .arg(INBOX_GROUP)
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut redis)
        .await;
    if let Err(e) = created
        && e.code() != Some("BUSYGROUP")
    {
        return Err(e);
    }
    let (_exp, now): (u64, u64) = lua::eval_cmd(lua::JOIN, &[&ctx.keys.nodes()])?
        .arg(id.as_str())
        .arg(ctx.ttl_ms())
        .query_async(&mut redis)
        .await?;
    // Our release, where every node reads it with the lease set.
    let _: () = redis::cmd("HSET")
        .arg(ctx.keys.versions())
        .arg(id.as_str())
        .arg(env!("CARGO_PKG_VERSION"))
        .query_async(&mut redis)
        .await?;
    presence::node_event(ctx, "node_joined", id, None, now).await;
    Ok(started + ctx.cfg.lease_ttl)
}

async fn renew(ctx: &Ctx, id: &NodeId) -> Result<Renewal, redis::RedisError> {
    let mut redis = ctx.lease_conn.clone();
    let (expiry, now): (i64, u64) = lua::eval_cmd(lua::RENEW, &[&ctx.keys.nodes()])?
        .arg(id.as_str())
        .arg(ctx.ttl_ms())
        .query_async(&mut redis)
        .await?;
    Ok(if expiry < 0 {
        Renewal::Lost
    } else {
        Renewal::Held {
            expiry: expiry as u64,
            now,
        }
    })
}

/// Refresh the cache of `<p>:nodes`.
async fn refresh_nodes(ctx: &Ctx, redis_now: u64) -> Result<(), redis::RedisError> {
    let mut redis = ctx.lease_conn.clone();
    let v: Value = redis::cmd("ZRANGE")
        .arg(ctx.keys.nodes())
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut redis)
        .await?;
    let mut nodes = Vec::new();
    if let Value::Array(items) = v {
        for pair in items.chunks(2) {
            if let [m, s] = pair
                && let (Some(m), Some(s)) = (stream::string(m), stream::string(s))
            {
                nodes.push((m, s.parse::<f64>().unwrap_or(0.0) as u64));
            }
        }
    }
    ctx.membership.live.refresh(nodes, redis_now);
    Ok(())
}

/// Take a new id and join under it. Its connections are re-registered by
/// [`reregister`] next. `next` keeps the id a failed join chose, so a
/// retry reuses it rather than leave an inbox behind per attempt.
async fn take_new_id(ctx: &Ctx, next: &mut Option<NodeId>) -> Result<(), redis::RedisError> {
    let old = ctx.membership.id();
    let new = next.get_or_insert_with(NodeId::random).clone();
    let until = join(ctx, &new).await?;
    *next = None;
    ctx.membership.set_id(new.clone());
    ctx.membership.set_lease(until);
    tracing::warn!(old = %old, new = %new, "lease lost: joined under a new id");
    Ok(())
}

/// Connections re-registered per round trip after a new id.
const REREGISTER_CHUNK: usize = 500;

/// Re-register every live connection under the current id (same
/// connection ids), [`REREGISTER_CHUNK`] per pipeline, and deliver what
/// their mailboxes gathered while this node was taken for dead. It runs
/// beside the heartbeat, so the new lease is renewed throughout however
/// many sockets there are. Resumable: a connection done under this id is
/// skipped when it runs again after an error; stopping early when the id
/// changes again. Connections that close meanwhile may be left registered:
/// reconciliation ([`reconcile`]) removes them.
async fn reregister(ctx: Arc<Ctx>) -> Result<(), redis::RedisError> {
    let new = ctx.membership.id();
    let todo: Vec<Arc<ConnHandle>> = ctx
        .registry
        .all()
        .into_iter()
        .filter(|h| !h.is_registered_as(&new))
        .collect();
    let mut mailboxed = 0usize;
    for chunk in todo.chunks(REREGISTER_CHUNK) {
        if ctx.membership.id() != new {
            return Ok(());
        }
        let mut redis = ctx.redis.clone();
        // The index first (its slot differs on Redis Cluster), then the
        // user hashes with the first mailbox page of each.
        let mut batch = Batch::new();
        let index = batch.cmd_ignored("HSET", &ctx.keys.node_conns(&new));
        for h in chunk {
            index.arg(h.conn.as_str()).arg(h.user.as_str());
        }
        if redis.is_cluster() {
            std::mem::take(&mut batch).run(&mut redis).await?;
        }
        for h in chunk {
            register_cmd(&ctx, &mut batch, &new, h, None);
        }
        let replies = batch.run(&mut redis).await?;
        let mut more: Vec<(Arc<ConnHandle>, Mailbox)> = Vec::new();
        // A user made online again (reaped meanwhile), or a pending event.
        let events: Vec<_> = chunk
            .iter()
            .zip(&replies)
            .flat_map(|(h, v)| presence::parse(&h.user, registered_events(Some(v))))
            .collect();
        presence::emit_or_keep(&ctx, &ctx.unsent, events).await;
        for (h, v) in chunk.iter().zip(&replies) {
            h.set_registered_as(&new);
            apply_pending_close(h, Some(v));
            let page = mailbox_page(Some(v), None);
            mailboxed += page.msgs.len();
            if let Some(next) = deliver_page(&ctx, h, page) {
                more.push((h.clone(), next));
            }
        }
        // Long mailboxes: the next pages, pipelined too.
        while !more.is_empty() {
            let mut batch = Batch::new();
            for (h, after) in &more {
                take_cmd(&ctx, &mut batch, &h.user, after, MAILBOX_PAGE);
            }
            let replies = batch.run(&mut redis).await?;
            let mut next = Vec::new();
            for ((h, after), v) in more.into_iter().zip(&replies) {
                let page = mailbox_page(Some(v), after.cursor.clone());
                mailboxed += page.msgs.len();
                if let Some(n) = deliver_page(&ctx, &h, page) {
                    next.push((h, n));
                }
            }
            more = next;
        }
    }
    tracing::info!(node = %new, connections = todo.len(), mailbox_messages = mailboxed, "connections re-registered");
    Ok(())
}

/// Queue a mailbox page read by a re-registration on its connection; its
/// entries leave the mailbox once written (or routed again). A connection
/// still writing its own mailbox on connect is left to do so (it reads
/// through to the end). Returns where to read on if more pages wait.
fn deliver_page(ctx: &Ctx, h: &Arc<ConnHandle>, page: Mailbox) -> Option<Mailbox> {
    if !h.is_ready() {
        return None;
    }
    let guard = ctx.acker.guard(AckJob::Mailbox {
        user: h.user.clone(),
        ids: page.ids.clone(),
    });
    for m in &page.msgs {
        let out = Outgoing {
            text: m.frame(),
            msg: Some(m.clone()),
            guard: Some(guard.clone()),
        };
        if !h.push(out) {
            // Outbox full or closed: route it again; its mailbox entry
            // goes once that is done.
            ctx.rerouter.hand_back(m, guard.clone());
        }
    }
    page.more.then(|| Mailbox {
        cursor: page.cursor,
        ..Mailbox::default()
    })
}

/// Heartbeats between two reconciliations.
const RECONCILE_EVERY: u32 = 5;

/// Remove the entries that name this node for connections it does not
/// hold any more: an unregister that failed (a Redis blip), or a
/// re-registration that raced a close. Left alone, such a field would
/// count against the user's `--max-conns-per-user` and cost every message
/// to the user a hop. Reads the node's index with `HSCAN` (about one round
/// trip per thousand connections) and removes what is stale in one
/// pipeline per page. Returns how many were removed.
async fn reconcile(ctx: Arc<Ctx>) -> Result<u64, redis::RedisError> {
    presence::retry(&ctx, &ctx.unsent).await;
    // One node (shard 0's router) settles users left online by nodes that
    // know nothing of presence (a rolling upgrade) or lost events.
    if ctx.shards.list().first() == Some(&0) {
        let n = presence::sweep(&ctx, &ctx.sweep).await?;
        if n > 0 {
            tracing::info!(users = n, "users with no connection left made offline");
        }
    }
    let me = ctx.membership.id();
    let index = ctx.keys.node_conns(&me);
    let mut redis = ctx.redis.clone();
    let mut cursor = "0".to_owned();
    let mut removed = 0u64;
    loop {
        let (next, fields): (String, Vec<(String, String)>) = redis::cmd("HSCAN")
            .arg(&index)
            .arg(&cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut redis)
            .await?;
        let stale = stale_entries(&fields, |c| ctx.registry.get(c).is_some());
        if !stale.is_empty() && ctx.membership.id() == me {
            unregister_many(&ctx, &me, &stale).await?;
            removed += stale.len() as u64;
        }
        if next == "0" {
            break;
        }
        cursor = next;
    }
    Ok(removed)
}

/// The index entries (conn id → user) whose connection `is_here` denies.
fn stale_entries(
    fields: &[(String, String)],
    is_here: impl Fn(&ConnId) -> bool,
) -> Vec<(ConnId, UserId)> {
    fields
        .iter()
        .filter_map(|(c, u)| {
            let c = ConnId::from_redis(c.clone());
            let u = UserId::parse(u).ok()?;
            (!is_here(&c)).then_some((c, u))
        })
        .collect()
}

/// The heartbeat loop: join, then renew every heartbeat; on a lost lease,
/// a new id; on Redis errors, retry with backoff (capped at 2 s, jittered).
pub async fn run(ctx: Arc<Ctx>) {
    let hb = ctx.cfg.heartbeat;
    let mut backoff = Backoff::boot();
    // First join under the boot id.
    loop {
        let id = ctx.membership.id();
        match join(&ctx, &id).await {
            Ok(until) => {
                ctx.membership.set_lease(until);
                let _ = refresh_nodes(&ctx, 0).await;
                tracing::info!(node = %id, "joined");
                break;
            }
            Err(e) => {
                ctx.redis_error();
                let d = backoff.next_delay();
                tracing::warn!(error = %e, retry_in_ms = d.as_millis() as u64, "join failed");
                if !ctx.life.sleep(d, Phase::Leaving).await {
                    return;
                }
            }
        }
    }
    let mut backoff = Backoff::redis();
    let mut delay = Duration::ZERO;
    let mut cut_off = false;
    // Set by a new id until a re-registration under it has completed.
    let mut reregistering = false;
    let mut next_id: Option<NodeId> = None;
    let mut beats = 0u32;
    let mut reconcile_task: Option<tokio::task::JoinHandle<()>> = None;
    let mut rereg_task: Option<tokio::task::JoinHandle<Result<(), redis::RedisError>>> = None;
    loop {
        if !ctx.life.sleep(delay, Phase::Leaving).await {
            return;
        }
        let id = ctx.membership.id();
        let started = Instant::now();
        let result = match renew(&ctx, &id).await {
            Ok(Renewal::Held { expiry, now }) => {
                // Leaving may have begun while the request was in flight.
                if ctx.life.at_least(Phase::Leaving) {
                    return;
                }
                ctx.membership
                    .set_lease(started + Duration::from_millis(expiry.saturating_sub(now)));
                ctx.metrics.lease_renewals.inc();
                refresh_nodes(&ctx, now).await
            }
            Ok(Renewal::Lost) => {
                ctx.membership.clear_lease();
                ctx.metrics.lease_losses.inc();
                if ctx.life.at_least(Phase::Leaving) {
                    return;
                }
                take_new_id(&ctx, &mut next_id)
                    .await
                    .map(|()| reregistering = true)
            }
            Err(e) => Err(e),
        };
        // Connections to re-register after a new id, beside the heartbeat,
        // until it all went through under the current id (an error starts
        // it again on the next beat, resuming where it stopped).
        if rereg_task.as_ref().is_some_and(|t| t.is_finished())
            && let Some(t) = rereg_task.take()
        {
            let under = ctx.membership.id();
            match t.await {
                Ok(Ok(())) => {
                    if ctx
                        .registry
                        .all()
                        .iter()
                        .all(|h| h.is_registered_as(&under))
                    {
                        reregistering = false;
                    }
                }
                Ok(Err(e)) => {
                    ctx.redis_error();
                    tracing::warn!(node = %under, error = %e, "re-registration interrupted; resuming");
                }
                Err(e) => tracing::error!(node = %under, error = %e, "re-registration task failed"),
            }
        }
        if reregistering && rereg_task.is_none() && result.is_ok() {
            rereg_task = Some(tokio::spawn(reregister(ctx.clone())));
        }
        beats = beats.wrapping_add(1);
        if beats.is_multiple_of(RECONCILE_EVERY)
            && !reregistering
            && result.is_ok()
            && reconcile_task.as_ref().is_none_or(|t| t.is_finished())
        {
            let ctx2 = ctx.clone();
            reconcile_task = Some(tokio::spawn(async move {
                match reconcile(ctx2.clone()).await {
                    Ok(0) => {}
                    Ok(n) => {
                        ctx2.metrics.reconciled.inc_by(n);
                        tracing::info!(removed = n, "stale connection entries removed");
                    }
                    Err(e) => {
                        ctx2.redis_error();
                        tracing::debug!(error = %e, "reconciliation failed; next time");
                    }
                }
            }));
        }
        ctx.membership.heartbeat_went_through(result.is_ok());
        match result {
            Ok(()) => {
                if cut_off {
                    tracing::info!(node = %ctx.membership.id(), "redis reachable again");
                    cut_off = false;
                }
                backoff.reset();
                delay = hb;
            }
            Err(e) => {
                ctx.redis_error();
                if !ctx.membership.holds_lease() && !cut_off {
                    cut_off = true;
                    tracing::error!(node = %id, error = %e, "cut off from redis: lease lapsed locally");
                } else if !cut_off {
                    tracing::warn!(node = %id, error = %e, "lease renewal failed");
                }
                // While the local lease holds, retry within a heartbeat;
                // once cut off, back off fully (capped at 2 s, jittered).
                delay = if cut_off {
                    backoff.next_delay()
                } else {
                    backoff.next_delay().min(hb)
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_entries_are_those_not_here() {
        let fields = vec![
            ("c1".to_owned(), "ann".to_owned()),
            ("c2".to_owned(), "bob".to_owned()),
            ("c3".to_owned(), "not a user".to_owned()),
        ];
        let stale = stale_entries(&fields, |c| c.as_str() == "c1");
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].0.as_str(), "c2");
        assert_eq!(stale[0].1.as_str(), "bob");
    }
}
