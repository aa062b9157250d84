//! A connection's entries in Redis: registering it (with the first page
//! of its user's mailbox, in one step), reading and deleting mailbox pages,
//! and unregistering it. Shared by the gateway's sessions (through
//! [`super::bus::RedisBus`]), re-registration and the acker.

use std::sync::Arc;

use redis::Value;

use super::Ctx;
use super::presence;
use crate::bus::{Mailbox, Registered, Resume};
use crate::ids::{ConnId, NodeId, UserId};
use crate::local::ConnHandle;
use crate::message::Position;
use crate::redis::conn::Batch;
use crate::redis::lua;
use crate::stream;

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
    resume: Option<&Resume>,
) -> Result<Registered, redis::RedisError> {
    let mut redis = ctx.redis.clone();
    let mut batch = Batch::new();
    batch
        .cmd_ignored("HSET", &ctx.keys.node_conns(me))
        .arg(h.conn.as_str())
        .arg(h.user.as_str());
    if redis.is_cluster() {
        std::mem::take(&mut batch).run(&mut redis).await?;
    }
    register_cmd(ctx, &mut batch, me, h, resume);
    let replies = batch.run(&mut redis).await?;
    let events = presence::parse(&h.user, registered_events(replies.last()));
    presence::emit_or_keep(ctx, &ctx.unsent, events).await;
    apply_pending_close(h, replies.last());
    Ok(registered(replies.last()))
}

/// Close `h` if its `REGISTER` reply carries a close the app asked for
/// while its node was being reaped (contract §10).
pub fn apply_pending_close(h: &ConnHandle, v: Option<&Value>) {
    let Some(Value::Array(parts)) = v else { return };
    let Some(c) = parts.get(7).and_then(stream::string) else {
        return;
    };
    if let Some((code, reason)) = c.split_once(':')
        && let Ok(code) = code.parse::<u16>()
    {
        h.close_with(code, reason);
    }
}

/// The presence events in a `REGISTER` reply.
pub fn registered_events(v: Option<&Value>) -> Option<&Value> {
    match v {
        Some(Value::Array(parts)) => parts.get(6),
        _ => None,
    }
}

/// Add the `REGISTER` script for `h` under `me` to `batch`, answering
/// `resume` too (its reply: [`registered`]; its first page alone:
/// [`mailbox_page`]).
pub fn register_cmd(
    ctx: &Ctx,
    batch: &mut Batch,
    me: &NodeId,
    h: &ConnHandle,
    resume: Option<&Resume>,
) {
    let k = user_keys(ctx, &h.user);
    let history = ctx.cfg.history_size > 0;
    batch
        .eval(
            lua::REGISTER,
            &[
                &k[0],
                &k[1],
                &k[2],
                &ctx.keys.seq(&h.user),
                &ctx.keys.history(&h.user),
                &ctx.keys.presence(&h.user),
                &ctx.keys.closes(&h.user),
            ],
            true,
        )
        .arg(h.conn.as_str())
        .arg(me.as_str())
        .arg(ctx.cfg.mailbox_ttl.as_millis() as u64)
        .arg(MAILBOX_PAGE)
        .arg(if history {
            crate::ids::new_epoch()
        } else {
            String::new()
        })
        .arg(resume.map_or_else(String::new, |r| r.since.to_string()))
        .arg(resume.map_or("", |r| r.epoch.as_str()));
}

/// Read a `REGISTER` reply.
pub fn registered(v: Option<&Value>) -> Registered {
    let mailbox = mailbox_page(v, None);
    let Some(Value::Array(parts)) = v else {
        return Registered {
            mailbox,
            ..Registered::default()
        };
    };
    let replay = parts
        .get(5)
        .map(stream::entries)
        .unwrap_or_default()
        .iter()
        .filter_map(crate::cluster::entry::parse_internal)
        .map(Arc::new)
        .collect();
    Registered {
        mailbox,
        pos: Position {
            epoch: parts.get(2).and_then(stream::string).unwrap_or_default(),
            seq: parts.get(3).and_then(stream::int).unwrap_or(0).max(0) as u64,
        },
        recovered: match parts.get(4).and_then(stream::int) {
            Some(1) => Some(true),
            Some(0) => Some(false),
            _ => None,
        },
        replay,
    }
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

/// Remove connections (conn id, user) registered under node id `node`:
/// each user's field (only if it still names `node`) and the user's
/// presence transition first; the events; and only then the entries of
/// the node's index, so until the events are out a reaper or
/// reconciliation finds the connections and emits them again.
pub async fn unregister_many(
    ctx: &Ctx,
    node: &NodeId,
    conns: &[(ConnId, UserId)],
) -> Result<(), redis::RedisError> {
    if conns.is_empty() {
        return Ok(());
    }
    let mut redis = ctx.redis.clone();
    let mut batch = Batch::new();
    for (c, u) in conns {
        batch
            .eval(
                lua::UNREGISTER_IF,
                &[&ctx.keys.user(u), &ctx.keys.presence(u)],
                true,
            )
            .arg(c.as_str())
            .arg(node.as_str())
            .arg(ctx.cfg.mailbox_ttl.as_millis() as u64);
    }
    let replies = batch.run(&mut redis).await?;
    let events: Vec<_> = conns
        .iter()
        .zip(&replies)
        .flat_map(|((_, u), v)| presence::parse(u, Some(v)))
        .collect();
    presence::emit(ctx, &events).await?;
    let mut batch = Batch::new();
    let del = batch.cmd_ignored("HDEL", &ctx.keys.node_conns(node));
    for (c, _) in conns {
        del.arg(c.as_str());
    }
    batch.run(&mut redis).await?;
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
            let m = crate::cluster::entry::parse_internal(e);
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
