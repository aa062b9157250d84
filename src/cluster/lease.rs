//! The node's lease: join, heartbeat, and a new id after a lost lease.
//!
//! A node that finds its lease gone or expired cannot tell whether it was
//! frozen and reaped, cut off, or Redis was emptied; in every case it does
//! the same thing: it never writes under the old id again, takes a new id,
//! and re-registers its live connections (same connection ids) under it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Value;
use tokio_util::sync::CancellationToken;

use crate::ack::AckGuard;
use crate::backoff::Backoff;
use crate::bus::redis::{Ctx, register_under, take_page};
use crate::gateway::registry::Outgoing;
use crate::ids::NodeId;
use crate::keys::INBOX_GROUP;
use crate::lua;
use crate::stream;

/// What a renewal found.
enum Renewal {
    Held { expiry: u64, now: u64 },
    Lost,
}

/// Create the inbox and add the node to `<p>:nodes`. Returns the local
/// lease deadline.
pub async fn join(ctx: &Ctx, id: &NodeId) -> Result<Instant, redis::RedisError> {
    let mut conn = ctx.lease_conn.clone();
    let started = Instant::now();
    // `XGROUP CREATE … MKSTREAM` is how an empty stream is made.
    let created: Result<(), _> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(ctx.keys.inbox(id))
        .arg(INBOX_GROUP)
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await;
    if let Err(e) = created
        && e.code() != Some("BUSYGROUP")
    {
        return Err(e);
    }
    let (_exp, _now): (u64, u64) = lua::eval_cmd(lua::JOIN, &[&ctx.keys.nodes()])?
        .arg(id.as_str())
        .arg(ctx.ttl_ms())
        .query_async(&mut conn)
        .await?;
    Ok(started + ctx.cfg.lease_ttl)
}

async fn renew(ctx: &Ctx, id: &NodeId) -> Result<Renewal, redis::RedisError> {
    let mut conn = ctx.lease_conn.clone();
    let (expiry, now): (i64, u64) = lua::eval_cmd(lua::RENEW, &[&ctx.keys.nodes()])?
        .arg(id.as_str())
        .arg(ctx.ttl_ms())
        .query_async(&mut conn)
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
    let mut conn = ctx.lease_conn.clone();
    let v: Value = redis::cmd("ZRANGE")
        .arg(ctx.keys.nodes())
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut conn)
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
/// [`reregister`] next.
async fn take_new_id(ctx: &Ctx) -> Result<(), redis::RedisError> {
    let old = ctx.membership.id();
    let new = NodeId::random();
    let until = join(ctx, &new).await?;
    ctx.membership.set_id(new.clone());
    ctx.membership.set_lease(until);
    tracing::warn!(old = %old, new = %new, "lease lost: joined under a new id");
    Ok(())
}

/// Re-register every live connection under the current id (same
/// connection ids). Idempotent: the heartbeat runs it again until it
/// completes, so a Redis error midway leaves no connection unregistered.
async fn reregister(ctx: &Ctx) -> Result<(), redis::RedisError> {
    let new = ctx.membership.id();
    let conns = ctx.registry.all();
    let mut mailboxed = 0usize;
    for h in &conns {
        // Same connection id, new node id: the field is overwritten, so the
        // old id's entry is removed in the same write.
        let mut page = register_under(ctx, &new, h, false)
            .await
            .inspect_err(|_| ctx.redis_error())?;
        loop {
            for m in page.msgs {
                mailboxed += 1;
                let out = Outgoing {
                    text: m.frame(),
                    msg: Some(m.clone()),
                    guard: None,
                };
                if !h.push(out) {
                    // Outbox full or closed: route it again rather than
                    // lose it (it is no longer in the mailbox).
                    let mut again = (*m).clone();
                    again.hops += 1;
                    let _ = ctx
                        .reroute
                        .send((Arc::new(again), Arc::new(AckGuard::noop())));
                }
            }
            if !page.more {
                break;
            }
            page = take_page(ctx, h, false)
                .await
                .inspect_err(|_| ctx.redis_error())?;
        }
        if ctx.membership.id() != new {
            break;
        }
    }
    tracing::info!(node = %new, connections = conns.len(), mailbox_messages = mailboxed, "connections re-registered");
    Ok(())
}

/// The heartbeat loop: join, then renew every heartbeat; on a lost lease,
/// a new id; on Redis errors, retry with backoff (capped at 2 s, jittered).
pub async fn run(ctx: Arc<Ctx>, stop: CancellationToken) {
    let hb = ctx.cfg.heartbeat;
    let mut backoff = Backoff::redis();
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
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(d) => {}
                }
            }
        }
    }
    backoff.reset();
    let mut delay = Duration::ZERO;
    let mut cut_off = false;
    let mut reregistering = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ctx.leaving.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        let id = ctx.membership.id();
        let started = Instant::now();
        let result = match renew(&ctx, &id).await {
            Ok(Renewal::Held { expiry, now }) => {
                // Leaving may have begun while the request was in flight.
                if ctx.leaving.is_cancelled() {
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
                if ctx.leaving.is_cancelled() {
                    return;
                }
                take_new_id(&ctx).await.map(|()| reregistering = true)
            }
            Err(e) => Err(e),
        };
        // Connections to re-register after a new id, until it all went
        // through (an error retries on the next beat).
        let result = match result {
            Ok(()) if reregistering => reregister(&ctx).await.map(|()| reregistering = false),
            other => other,
        };
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
