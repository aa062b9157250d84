//! Presence events (contract §10): `online`/`offline` per user, decided in
//! the user's slot by the register and unregister scripts
//! ([`lua::REGISTER`], [`lua::UNREGISTER_IF`]), and node events.
//!
//! A user's transition is decided atomically and marked pending; its event
//! is then added to `<p>:events` and confirmed ([`lua::CONFIRM_EVENT`]).
//! Until confirmed, whoever touches the user next emits it again: the next
//! transition's decider, this node's reconciliation (events that failed
//! here are kept and retried), or the reaper of this node if it dies (its
//! connections stay in its index until their events are confirmed). So
//! delivery is at least once; a repeat carries the same `n`.

use std::sync::Mutex;

use redis::Value;

use super::Ctx;
use crate::ids::{NodeId, UserId};
use crate::redis::conn::Batch;
use crate::redis::lua;
use crate::stream;

/// An `online`/`offline` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEvent {
    pub kind: String,
    pub user: UserId,
    pub conn: String,
    pub node: String,
    pub at_ms: String,
    /// Grows with each transition of the user: apps drop an event whose
    /// `n` is not above the last they applied (a repeat).
    pub n: String,
}

/// The events in a script's reply (flat: type, conn, node, at, n).
pub fn parse(user: &UserId, v: Option<&Value>) -> Vec<UserEvent> {
    let Some(Value::Array(items)) = v else {
        return Vec::new();
    };
    let s: Vec<String> = items
        .iter()
        .map(|x| stream::string(x).unwrap_or_default())
        .collect();
    s.chunks_exact(5)
        .filter(|c| c[0] == "online" || c[0] == "offline")
        .map(|c| UserEvent {
            kind: c[0].clone(),
            user: user.clone(),
            conn: c[1].clone(),
            node: c[2].clone(),
            at_ms: c[3].clone(),
            n: c[4].clone(),
        })
        .collect()
}

/// Events whose emission failed here, retried by reconciliation.
#[derive(Default)]
pub struct Unsent(Mutex<Vec<UserEvent>>);

impl Unsent {
    fn keep(&self, events: Vec<UserEvent>) {
        if let Ok(mut v) = self.0.lock() {
            v.extend(events);
            // Bounded: the pending marks in Redis still hold them.
            let over = v.len().saturating_sub(100_000);
            v.drain(..over);
        }
    }

    fn take(&self) -> Vec<UserEvent> {
        self.0
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }
}

/// Add `events` to `<p>:events`, in order, then confirm them.
pub async fn emit(ctx: &Ctx, events: &[UserEvent]) -> Result<(), redis::RedisError> {
    if events.is_empty() {
        return Ok(());
    }
    let mut redis = ctx.redis.clone();
    let key = ctx.keys.events();
    let mut batch = Batch::new();
    for e in events {
        batch
            .cmd_ignored("XADD", &key)
            // Exact: the contract's "keeps its newest --events-max" (§10).
            .arg("MAXLEN")
            .arg(ctx.cfg.events_max)
            .arg("*")
            .arg("type")
            .arg(&e.kind)
            .arg("at_ms")
            .arg(&e.at_ms)
            .arg("user")
            .arg(e.user.as_str())
            .arg("node")
            .arg(&e.node)
            .arg("conn")
            .arg(&e.conn)
            .arg("n")
            .arg(&e.n);
    }
    batch.run(&mut redis).await?;
    let mut batch = Batch::new();
    let online = ctx.keys.online();
    for e in events {
        batch
            .eval(lua::ONLINE_MARK, &[&online], false)
            .arg(e.user.as_str())
            .arg(&e.n)
            .arg(if e.kind == "online" { "1" } else { "0" });
        batch
            .eval(lua::CONFIRM_EVENT, &[&ctx.keys.presence(&e.user)], false)
            .arg(&e.n);
    }
    batch.run(&mut redis).await?;
    Ok(())
}

/// Users checked per sweep.
const SWEEP_PAGE: usize = 1000;

/// Where the online sweep goes on (the lowest score not yet checked).
#[derive(Default)]
pub struct Sweep(Mutex<Option<String>>);

/// Check a page of the users marked online: any without a connection is
/// made offline ([`lua::SETTLE_PRESENCE`]). One node sweeps (the router of
/// shard 0), a page per reconciliation, round and round.
pub async fn sweep(ctx: &Ctx, at: &Sweep) -> Result<usize, redis::RedisError> {
    let from =
        at.0.lock()
            .ok()
            .and_then(|g| g.clone())
            .unwrap_or_else(|| "0".to_owned());
    let mut redis = ctx.redis.clone();
    let page: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(ctx.keys.online())
        .arg(&from)
        .arg("+inf")
        .arg("BYSCORE")
        .arg("LIMIT")
        .arg(0)
        .arg(SWEEP_PAGE)
        .arg("WITHSCORES")
        .query_async(&mut redis)
        .await?;
    let next = if page.len() < SWEEP_PAGE {
        None
    } else {
        page.last().map(|(_, s)| format!("({s:.0}"))
    };
    if let Ok(mut g) = at.0.lock() {
        *g = next;
    }
    let users: Vec<UserId> = page
        .iter()
        .filter_map(|(u, _)| UserId::parse(u).ok())
        .collect();
    if users.is_empty() {
        return Ok(0);
    }
    let mut batch = Batch::new();
    for u in &users {
        batch
            .eval(
                lua::SETTLE_PRESENCE,
                &[&ctx.keys.user(u), &ctx.keys.presence(u)],
                true,
            )
            .arg(ctx.cfg.mailbox_ttl.as_millis() as u64);
    }
    let replies = batch.run(&mut redis).await?;
    let events: Vec<UserEvent> = users
        .iter()
        .zip(&replies)
        .flat_map(|(u, v)| parse(u, Some(v)))
        .collect();
    let settled = events.iter().filter(|e| e.kind == "offline").count();
    emit(ctx, &events).await?;
    Ok(settled)
}

/// For `/admin`: users online now, and the newest `last` events.
pub async fn activity(
    ctx: &Ctx,
    last: usize,
) -> Result<(u64, Vec<Vec<(String, String)>>), redis::RedisError> {
    let mut redis = ctx.redis.clone();
    let mut batch = Batch::new();
    batch.cmd("ZCOUNT", &ctx.keys.online()).arg(0).arg("+inf");
    batch
        .cmd("XREVRANGE", &ctx.keys.events())
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(last);
    let r = batch.run(&mut redis).await?;
    let online = r.first().and_then(stream::int).unwrap_or(0).max(0) as u64;
    let events = r
        .get(1)
        .map(stream::entries)
        .unwrap_or_default()
        .into_iter()
        .map(|e| {
            let mut f: Vec<(String, String)> = vec![("id".into(), e.id.clone())];
            f.extend(e.fields.iter().map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            }));
            f
        })
        .collect();
    Ok((online, events))
}

/// [`emit`], keeping what fails for [`retry`].
pub async fn emit_or_keep(ctx: &Ctx, unsent: &Unsent, events: Vec<UserEvent>) {
    if let Err(e) = emit(ctx, &events).await {
        ctx.redis_error();
        tracing::warn!(events = events.len(), error = %e, "presence events not added; will retry");
        unsent.keep(events);
    }
}

/// Emit again what failed before.
pub async fn retry(ctx: &Ctx, unsent: &Unsent) {
    let events = unsent.take();
    if !events.is_empty() {
        emit_or_keep(ctx, unsent, events).await;
    }
}

/// A node event: `node_joined`, `node_left`, `node_reaped` (with `by`).
/// One try: it tells apps about capacity, not users, and must not hold up
/// a join or a reap when Redis falters.
/// `at_ms`: Redis time, 0 for this node's latest view of it.
pub async fn node_event(ctx: &Ctx, kind: &str, node: &NodeId, by: Option<&NodeId>, at_ms: u64) {
    let at_ms = if at_ms == 0 {
        ctx.membership.live.redis_now()
    } else {
        at_ms
    };
    let mut redis = ctx.redis.clone();
    let mut cmd = redis::cmd("XADD");
    cmd.arg(ctx.keys.events())
        .arg("MAXLEN")
        .arg(ctx.cfg.events_max)
        .arg("*")
        .arg("type")
        .arg(kind)
        .arg("at_ms")
        .arg(at_ms)
        .arg("node")
        .arg(node.as_str());
    if let Some(by) = by {
        cmd.arg("by").arg(by.as_str());
    }
    if let Err(e) = cmd.query_async::<()>(&mut redis).await {
        ctx.redis_error();
        tracing::warn!(kind, node = %node, error = %e, "node event not added");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flat_events() {
        let u = UserId::parse("ann").unwrap();
        let b = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let v = Value::Array(vec![
            b("online"),
            b("c1"),
            b("n1"),
            b("17"),
            b("17"),
            b("offline"),
            b("c1"),
            b("n1"),
            b("18"),
            b("18"),
        ]);
        let e = parse(&u, Some(&v));
        assert_eq!(e.len(), 2);
        assert_eq!((e[0].kind.as_str(), e[1].n.as_str()), ("online", "18"));
        assert!(parse(&u, Some(&Value::Array(vec![]))).is_empty());
        assert!(parse(&u, None).is_empty());
    }
}
