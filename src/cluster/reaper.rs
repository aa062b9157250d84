//! Reaping: finishing the work of a node whose lease expired.
//!
//! Any live node may reap; one works on a dead node at a time, under a lock
//! in the dead node's slot that it renews while it works. Every step is
//! idempotent, so a reaper that dies midway leaves work the next one
//! finishes. The order is the contract's: route again everything left in
//! the inbox, remove the node's connections from the users' hashes, delete
//! the inbox in the step that finds it drained, and last leave `<p>:nodes`.
//!
//! A leaving node reaps itself the same way (see [`super::leave`]).

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use redis::Value;
use tokio_util::sync::CancellationToken;

use crate::cluster::Ctx;
use crate::cluster::route as router;
use crate::cluster::sessions::unregister_many;
use crate::ids::{ConnId, NodeId, UserId};
use crate::message::Message;
use crate::redis::conn::Batch;
use crate::redis::lua;
use crate::shutdown::Phase;
use crate::stream;

/// Entries re-routed per round while reaping.
const REAP_BATCH: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum ReapError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("lost the reap lock")]
    LostLock,
}

/// The reaper loop: every half heartbeat (jittered), reap expired nodes.
/// Looking costs nothing (the cached view of `<p>:nodes` holds a dead
/// node's exact expiry); Redis is asked only when one has expired.
pub async fn run(ctx: Arc<Ctx>) {
    let hb = ctx.cfg.heartbeat;
    loop {
        let jitter = rand::rng().random_range(Duration::ZERO..=hb / 4);
        if !ctx.life.sleep(hb / 2 + jitter, Phase::Leaving).await {
            return;
        }
        // A node cut off from Redis, or without a lease, does not reap.
        if !ctx.membership.holds_lease() {
            continue;
        }
        let me = ctx.membership.id();
        for dead in ctx.membership.live.expired() {
            if dead == me || ctx.life.at_least(Phase::Leaving) {
                continue;
            }
            match try_reap(&ctx, &dead, &me).await {
                Ok(true) => {
                    ctx.metrics.reaped.inc();
                    tracing::info!(node = %me, reaped = %dead, "reaped node");
                }
                Ok(false) => {}
                Err(e) => {
                    ctx.redis_error();
                    tracing::warn!(node = %me, dead = %dead, error = %e, "reap interrupted; it will be retried");
                }
            }
        }
    }
}

/// Reap `dead` if its lock can be taken. True if this call finished it.
async fn try_reap(ctx: &Arc<Ctx>, dead: &NodeId, me: &NodeId) -> Result<bool, ReapError> {
    let mut redis = ctx.redis.clone();
    // Our view of `<p>:nodes` may be stale: confirm by Redis `TIME` before
    // touching a node's work. An expired lease can never come back.
    let expired: i64 = lua::eval_cmd(lua::IS_EXPIRED, &[&ctx.keys.nodes()])?
        .arg(dead.as_str())
        .query_async(&mut redis)
        .await?;
    if expired != 1 {
        return Ok(false);
    }
    let got: i64 = lua::eval_cmd(lua::LEASE_ACQUIRE, &[&ctx.keys.reap_lock(dead)])?
        .arg(me.as_str())
        .arg(ctx.ttl_ms())
        .query_async(&mut redis)
        .await?;
    if got != 1 {
        return Ok(false);
    }
    // Only the reap that removed the member says so (a leaving node that
    // woke may have finished its own reap meanwhile: then it says `node_left`).
    if !reap_locked(ctx, dead, me).await? {
        return Ok(false);
    }
    crate::cluster::presence::node_event(ctx, "node_reaped", dead, Some(me), 0).await;
    Ok(true)
}

/// Reap `dead` while holding its lock as `holder` (renewed meanwhile).
/// True if this call removed its `<p>:nodes` member (false: another
/// reaper finished first).
pub(super) async fn reap_locked(
    ctx: &Arc<Ctx>,
    dead: &NodeId,
    holder: &NodeId,
) -> Result<bool, ReapError> {
    let done = CancellationToken::new();
    let lock_lost = spawn_lock_renewer(ctx.clone(), dead.clone(), done.clone().cancelled_owned());
    let result = reap_steps(ctx, dead, &lock_lost).await;
    done.cancel();
    let mut redis = ctx.redis.clone();
    // Best effort: an unreleased lock expires within a TTL.
    let _ = lua::release_lease(&mut redis, &ctx.keys.reap_lock(dead), holder.as_str()).await;
    result
}

/// Renew the reap lock on `node` (held as this node's id) every third of
/// a TTL until `done` resolves. Cancels the returned token if the lock is
/// lost.
pub(super) fn spawn_lock_renewer(
    ctx: Arc<Ctx>,
    node: NodeId,
    done: impl std::future::Future<Output = ()> + Send + 'static,
) -> CancellationToken {
    let lost = CancellationToken::new();
    let lost2 = lost.clone();
    let holder = ctx.membership.id();
    tokio::spawn(async move {
        let key = ctx.keys.reap_lock(&node);
        let every = ctx.cfg.lease_ttl / 3;
        tokio::pin!(done);
        loop {
            tokio::select! {
                _ = &mut done => return,
                _ = tokio::time::sleep(every) => {}
            }
            let mut redis = ctx.lease_conn.clone();
            let r = lua::renew_lease(&mut redis, &key, holder.as_str(), ctx.ttl_ms()).await;
            if !matches!(r, Ok(1)) {
                lost2.cancel();
                return;
            }
        }
    });
    lost
}

async fn reap_steps(
    ctx: &Arc<Ctx>,
    dead: &NodeId,
    lock_lost: &CancellationToken,
) -> Result<bool, ReapError> {
    let inbox = ctx.keys.inbox(dead);
    let index = ctx.keys.node_conns(dead);
    let mut redis = ctx.redis.clone();
    loop {
        // 1. Route again everything left in the inbox: delivered or not,
        //    read or not (a live node deletes what it delivered).
        loop {
            if lock_lost.is_cancelled() {
                return Err(ReapError::LostLock);
            }
            let v: Value = redis::cmd("XRANGE")
                .arg(&inbox)
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(REAP_BATCH)
                .query_async(&mut redis)
                .await?;
            let entries = stream::entries(&v);
            if entries.is_empty() {
                break;
            }
            let msgs: Vec<Arc<Message>> = entries
                .iter()
                .filter_map(crate::cluster::entry::parse_internal)
                .map(|m| Arc::new(router::again(&m)))
                .collect();
            router::route(ctx, msgs.clone()).await?;
            // Closes the app asked for: to wherever those connections are
            // now (a node back under a new id keeps its connection ids).
            for c in entries
                .iter()
                .filter_map(crate::cluster::entry::parse_close)
            {
                crate::cluster::control::close(ctx, &c, Some(dead)).await?;
            }
            ctx.metrics.rerouted.inc_by(msgs.len() as u64);
            let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
            let _: i64 = redis::cmd("XDEL")
                .arg(&inbox)
                .arg(&ids)
                .query_async(&mut redis)
                .await?;
        }
        // 2. Remove its connections from the users' hashes (only fields
        //    that still name it: a woken node may have re-registered them).
        let conns: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(&index)
            .query_async(&mut redis)
            .await?;
        // Mailbox pages its connections had taken but maybe not written
        // (only a node of the previous release moves them aside).
        for chunk in conns.chunks(REAP_BATCH) {
            let keys: Vec<String> = chunk
                .iter()
                .filter_map(|(c, u)| {
                    let u = UserId::parse(u).ok()?;
                    Some(ctx.keys.taking(&u, &ConnId::from_redis(c.clone())))
                })
                .collect();
            if keys.is_empty() {
                continue;
            }
            let mut batch = Batch::new();
            for k in &keys {
                batch.cmd("XRANGE", k).arg("-").arg("+");
            }
            let pages: Vec<Value> = batch.run(&mut redis).await?;
            let msgs: Vec<Arc<Message>> = pages
                .iter()
                .flat_map(stream::entries)
                .filter_map(|e| crate::cluster::entry::parse_internal(&e))
                .map(|m| Arc::new(router::again(&m)))
                .collect();
            if !msgs.is_empty() {
                let n = msgs.len() as u64;
                router::route(ctx, msgs).await?;
                ctx.metrics.rerouted.inc_by(n);
            }
            // One `DEL` per key: they are in their users' slots.
            let mut batch = Batch::new();
            for k in &keys {
                batch.cmd_ignored("DEL", k);
            }
            batch.run(&mut redis).await?;
        }
        // Their users' offline events go out before the index goes.
        let entries: Vec<(ConnId, UserId)> = conns
            .iter()
            .filter_map(|(c, u)| Some((ConnId::from_redis(c.clone()), UserId::parse(u).ok()?)))
            .collect();
        for chunk in entries.chunks(REAP_BATCH) {
            if lock_lost.is_cancelled() {
                return Err(ReapError::LostLock);
            }
            unregister_many(ctx, dead, chunk).await?;
        }
        let deleted: i64 = lua::eval_cmd(lua::DELETE_IF_DRAINED, &[&inbox, &index])?
            .query_async(&mut redis)
            .await?;
        if deleted == 1 {
            break;
        }
    }
    // 4. Last, leave `<p>:nodes`.
    let removed: i64 = lua::eval_cmd(lua::REMOVE_IF_EXPIRED, &[&ctx.keys.nodes()])?
        .arg(dead.as_str())
        .query_async(&mut redis)
        .await?;
    let _: i64 = redis::cmd("HDEL")
        .arg(ctx.keys.versions())
        .arg(dead.as_str())
        .query_async(&mut redis)
        .await?;
    ctx.membership.live.mark_gone(dead.as_str());
    Ok(removed == 1)
}
