//! This node's readers: its inbox (messages for users connected here) and
//! the shared topic stream.
//!
//! Each blocks on a connection of its own. The inbox is read with plain
//! `XREAD` from the last id seen; an entry is deleted (trimmed, see the
//! acker) only once its frames are written to the sockets, so whatever is
//! left in an inbox when its node dies was maybe not delivered, and the
//! reaper routes it again.

use std::sync::Arc;
use std::time::Duration;

use crate::shutdown::Phase;
use redis::Value;

use super::acker::AckJob;
use crate::backoff::Backoff;
use crate::cluster::Ctx;
use crate::cluster::entry;
use crate::ids::NodeId;
use crate::local::Outgoing;
use crate::redis::conn::Conn;
use crate::stream;

const BATCH: usize = 512;

fn block_ms(ctx: &Ctx) -> u64 {
    (ctx.cfg.heartbeat / 2)
        .clamp(Duration::from_millis(5), crate::redis::conn::MAX_BLOCK)
        .as_millis() as u64
}

async fn xread(
    ctx: &Ctx,
    redis: &mut Option<Conn>,
    key: &str,
    last: &str,
) -> Result<Vec<stream::RawEntry>, redis::RedisError> {
    let c = match redis {
        Some(c) => c,
        None => redis.insert(ctx.blocking_conn().await?),
    };
    let mut read = redis::cmd("XREAD");
    read.arg("COUNT")
        .arg(BATCH)
        .arg("BLOCK")
        .arg(block_ms(ctx))
        .arg("STREAMS")
        .arg(key)
        .arg(last);
    let v = c.value(&read).await?;
    Ok(stream::into_entries(v))
}

/// Read the inbox and hand messages to local connections; a message whose
/// user is no longer here is routed again (hops + 1).
pub async fn run_inbox(ctx: Arc<Ctx>) {
    let mut redis = None;
    let mut backoff = Backoff::redis();
    let mut reading: Option<NodeId> = None;
    let mut last = "0-0".to_owned();
    // Read batches of this inbox, numbered for the acker's trims.
    let mut batch = 0;
    loop {
        if ctx.life.at_least(Phase::SelfReaping) {
            return;
        }
        let me = ctx.membership.id();
        if reading.as_ref() != Some(&me) {
            // A new id has a new inbox, read from its start.
            reading = Some(me.clone());
            last = "0-0".to_owned();
            batch = 0;
        }
        let key = ctx.keys.inbox(&me);
        let read = tokio::select! {
            _ = ctx.life.reached(Phase::SelfReaping) => return,
            r = xread(&ctx, &mut redis, &key, &last) => r,
        };
        let entries = match read {
            Ok(e) => {
                backoff.reset();
                e
            }
            Err(e) => {
                ctx.redis_error();
                redis = None;
                let d = backoff.next_delay();
                tracing::debug!(error = %e, retry_in_ms = d.as_millis() as u64, "inbox read failed");
                if !ctx.life.sleep(d, Phase::SelfReaping).await {
                    return;
                }
                continue;
            }
        };
        let Some(tail) = entries.last() else { continue };
        last = tail.id.clone();
        let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
        let guard = ctx.acker.guard(AckJob::Inbox {
            key: key.clone(),
            ids,
            batch,
        });
        batch += 1;
        for e in &entries {
            if let Some(user) = entry::parse_mailbox_nudge(e) {
                for h in ctx.registry.user_conns(&user) {
                    h.want_mailbox();
                }
                continue;
            }
            if let Some(c) = entry::parse_close(e) {
                // Only the connections named: one opened since stays.
                for id in &c.conns {
                    if let Some(h) = ctx
                        .registry
                        .get(&crate::ids::ConnId::from_redis(id.clone()))
                    {
                        h.close_with(c.code, &c.reason);
                    }
                }
                continue;
            }
            let Some(m) = entry::parse_internal(e) else {
                tracing::warn!(inbox = %key, id = %e.id, "unreadable inbox entry dropped");
                continue;
            };
            let m = Arc::new(m);
            let Some(user) = m.user() else { continue };
            let out = Outgoing {
                text: m.frame(),
                msg: Some(m.clone()),
                guard: Some(guard.clone()),
            };
            if ctx.registry.deliver_user(user, &out).queued == 0 {
                // The user is not (or no longer) here.
                ctx.rerouter.hand_back(&m, guard.clone());
            }
        }
    }
}

/// Read the shared topic stream and hand each message to this node's
/// subscribers of its topic. At-most-once: nothing is kept or re-sent.
pub async fn run_topics(ctx: Arc<Ctx>) {
    let key = ctx.keys.topics();
    let mut redis = None;
    let mut backoff = Backoff::redis();
    // Start after the newest entry: history is not replayed.
    let mut last: Option<String> = None;
    loop {
        if ctx.life.at_least(Phase::SelfReaping) {
            return;
        }
        if last.is_none() {
            let mut c = ctx.redis.clone();
            let r: Result<Value, _> = redis::cmd("XREVRANGE")
                .arg(&key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut c)
                .await;
            match r {
                Ok(v) => {
                    last = Some(
                        stream::entries(&v)
                            .first()
                            .map(|e| e.id.clone())
                            .unwrap_or_else(|| "0-0".to_owned()),
                    )
                }
                Err(_) => {
                    ctx.redis_error();
                    let d = backoff.next_delay();
                    if !ctx.life.sleep(d, Phase::SelfReaping).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let from = last.clone().unwrap_or_else(|| "0-0".to_owned());
        let read = tokio::select! {
            _ = ctx.life.reached(Phase::SelfReaping) => return,
            r = xread(&ctx, &mut redis, &key, &from) => r,
        };
        match read {
            Ok(entries) => {
                backoff.reset();
                for e in &entries {
                    if let Some(m) = entry::parse_topic(e)
                        && let crate::message::Target::Topic(t) = &m.target
                    {
                        let (_, dropped) =
                            ctx.registry.deliver_topic(t, &Outgoing::control(m.frame()));
                        ctx.metrics.dropped_topic.inc_by(dropped as u64);
                    }
                }
                if let Some(tail) = entries.last() {
                    last = Some(tail.id.clone());
                }
            }
            Err(_) => {
                ctx.redis_error();
                redis = None;
                // After an outage Redis may have restarted empty: find the
                // stream's end again.
                last = None;
                let d = backoff.next_delay();
                if !ctx.life.sleep(d, Phase::SelfReaping).await {
                    return;
                }
            }
        }
    }
}
