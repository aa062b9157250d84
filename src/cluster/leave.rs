//! Leaving the cluster (contract §6, Leave), top to bottom. The node owns
//! the order (see `Node::run`): it moves its [`Lifecycle`] to `Leaving`
//! (not ready, routers, reaper and heartbeat stop), calls [`leave_begin`],
//! drains its sockets, moves to `SelfReaping` (readers stop) and calls
//! [`leave_finish`]; a node that dies midway leaves its reap lock to lapse
//! and a survivor finishes the reap.
//!
//! [`Lifecycle`]: crate::shutdown::Lifecycle

use std::sync::Arc;

use super::Ctx;
use super::reaper::{reap_locked, spawn_lock_renewer};
use crate::redis::lua;
use crate::shutdown::Phase;

/// Leave, first half: take the reap lock on ourselves, expire our lease
/// (routers stop sending to us), release router leases.
pub async fn leave_begin(ctx: &Arc<Ctx>) {
    let me = ctx.membership.id();
    let mut redis = ctx.redis.clone();
    let r: Result<(), redis::RedisError> = async {
        let _: i64 = lua::eval_cmd(lua::LEASE_ACQUIRE, &[&ctx.keys.reap_lock(&me)])?
            .arg(me.as_str())
            .arg(ctx.ttl_ms())
            .query_async(&mut redis)
            .await?;
        // Renewed for the whole drain; a node that dies midway lets it
        // lapse within a lease TTL and a survivor finishes the reap.
        let life = ctx.life.clone();
        spawn_lock_renewer(ctx.clone(), me.clone(), async move {
            life.reached(Phase::SelfReaping).await
        });
        let _: u64 = lua::eval_cmd(lua::EXPIRE_NOW, &[&ctx.keys.nodes()])?
            .arg(me.as_str())
            .query_async(&mut redis)
            .await?;
        for shard in 0..ctx.cfg.send_shards {
            lua::release_lease(&mut redis, &ctx.keys.router_lease(shard), me.as_str()).await?;
        }
        Ok(())
    }
    .await;
    match r {
        Ok(()) => tracing::info!(node = %me, "leaving: lease expired, router leases released"),
        Err(e) => {
            ctx.redis_error();
            tracing::warn!(node = %me, error = %e, "leaving without redis; a survivor will reap this node");
        }
    }
}

/// Leave, second half: reap ourselves as a survivor would.
pub async fn leave_finish(ctx: &Arc<Ctx>) {
    let me = ctx.membership.id();
    // Events of sessions that ended in the drain and failed: last chance.
    super::presence::retry(ctx, &ctx.unsent).await;
    // What the drain delivered leaves the inbox first (the acker lingers),
    // or the self-reap would route it again.
    ctx.acker.flush(ctx.cfg.lease_ttl / 2).await;
    match reap_locked(ctx, &me, &me).await {
        Ok(true) => {
            super::presence::node_event(ctx, "node_left", &me, None, 0).await;
            tracing::info!(node = %me, "left the cluster");
        }
        // Frozen past the reap lock mid-drain: a survivor reaped us and
        // said `node_reaped`; a `node_left` now would contradict it (§10).
        Ok(false) => {
            tracing::info!(node = %me, "left the cluster; a survivor had reaped this node")
        }
        Err(e) => {
            ctx.redis_error();
            tracing::warn!(node = %me, error = %e, "self-reap interrupted; a survivor will finish it");
        }
    }
}
