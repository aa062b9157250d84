//! The app's view and control of users (contract §10): presence counts and
//! closing a user's connections through the nodes' inboxes.

use std::collections::HashMap;

use redis::Value;

use super::entry::{self, Close};
use super::{Ctx, NodeStatus};
use crate::ids::{NodeId, UserId};
use crate::redis::conn::{Batch, Conn};

/// How long a close waits for its connection to be registered again.
const CLOSE_WAIT_MS: u64 = 600_000;

/// Each user's connections (conn id, node id), one pipeline.
async fn connections(
    ctx: &Ctx,
    redis: &mut Conn,
    users: &[UserId],
) -> Result<Vec<Vec<(String, String)>>, redis::RedisError> {
    let mut batch = Batch::new();
    for u in users {
        batch.cmd("HGETALL", &ctx.keys.user(u));
    }
    Ok(redis::from_redis_value(Value::Array(
        batch.run(redis).await?,
    ))?)
}

/// Ask Redis about the nodes among `nodes` this node has not seen, or
/// believes expired (its view may be stale), in one `ZMSCORE`, so that
/// [`super::LiveNodes::status`] answers for them. Shared with routing.
pub(crate) async fn learn(
    ctx: &Ctx,
    redis: &mut Conn,
    nodes: &[&str],
) -> Result<(), redis::RedisError> {
    let me = ctx.membership.id();
    let live = &ctx.membership.live;
    let mut unknown: Vec<&str> = nodes
        .iter()
        .copied()
        .filter(|n| {
            *n != me.as_str() && matches!(live.status(n), NodeStatus::Unknown | NodeStatus::Expired)
        })
        .collect();
    unknown.sort_unstable();
    unknown.dedup();
    if unknown.is_empty() {
        return Ok(());
    }
    let scores: Vec<Option<f64>> = redis::cmd("ZMSCORE")
        .arg(ctx.keys.nodes())
        .arg(&unknown)
        .query_async(redis)
        .await?;
    for (node, score) in unknown.iter().zip(scores) {
        live.learn(node, score.map(|s| s as u64));
    }
    Ok(())
}

fn is_live(ctx: &Ctx, node: &str) -> bool {
    if node == ctx.membership.id().as_str() {
        return ctx.membership.holds_lease();
    }
    matches!(ctx.membership.live.status(node), NodeStatus::Live)
}

/// Live connections of each user: those on nodes whose lease is live.
pub async fn presence(ctx: &Ctx, users: &[UserId]) -> Result<Vec<usize>, redis::RedisError> {
    let mut redis = ctx.redis.clone();
    let found = connections(ctx, &mut redis, users).await?;
    let nodes: Vec<&str> = found.iter().flatten().map(|(_, n)| n.as_str()).collect();
    learn(ctx, &mut redis, &nodes).await?;
    Ok(found
        .iter()
        .map(|f| f.iter().filter(|(_, n)| is_live(ctx, n)).count())
        .collect())
}

/// Close the user's connections with `code`/`reason`: every one it has now
/// (`conns` empty), or those of `conns` (a close routed again by a
/// reaper). Each node holding some gets one inbox entry naming them, so a
/// connection opened later is never closed by it. Returns how many of them
/// are on live nodes. `reaping`: the node whose inbox this close was found
/// in by its reaper; its connections are about to be removed, so their
/// close waits in the user's closes hash for a re-registration (the node
/// may be frozen, and come back under a new id with the same connections).
pub async fn close(
    ctx: &Ctx,
    c: &Close,
    reaping: Option<&NodeId>,
) -> Result<usize, redis::RedisError> {
    let mut redis = ctx.redis.clone();
    let found = connections(ctx, &mut redis, std::slice::from_ref(&c.user))
        .await?
        .pop()
        .unwrap_or_default();
    let found: Vec<(String, String)> = found
        .into_iter()
        .filter(|(id, _)| c.conns.is_empty() || c.conns.contains(id))
        .collect();
    let nodes: Vec<&str> = found.iter().map(|(_, n)| n.as_str()).collect();
    learn(ctx, &mut redis, &nodes).await?;
    let live = found.iter().filter(|(_, n)| is_live(ctx, n)).count();
    let mut by_node: HashMap<&str, Vec<String>> = HashMap::new();
    let mut batch = Batch::new();
    let waiting: Vec<&String> = found
        .iter()
        .filter(|(_, n)| reaping.is_some_and(|r| r.as_str() == n))
        .map(|(id, _)| id)
        .collect();
    if !waiting.is_empty() {
        let key = ctx.keys.closes(&c.user);
        let cmd = batch.cmd_ignored("HSET", &key);
        for id in &waiting {
            cmd.arg(id.as_str()).arg(format!("{}:{}", c.code, c.reason));
        }
        batch.cmd_ignored("PEXPIRE", &key).arg(CLOSE_WAIT_MS);
    }
    for (id, node) in &found {
        if reaping.is_some_and(|r| r.as_str() == node) {
            continue;
        }
        // A gone node's connections went with it; an expired one may come
        // back under a new id, and its reaper routes this again if not.
        if !matches!(ctx.membership.live.status(node), NodeStatus::Gone) {
            by_node.entry(node).or_default().push(id.clone());
        }
    }
    for (node, conns) in by_node {
        let entry = Close { conns, ..c.clone() };
        batch
            .cmd_ignored(
                "XADD",
                &ctx.keys.inbox(&NodeId::from_redis(node.to_owned())),
            )
            .arg("NOMKSTREAM")
            .arg("*")
            .arg(entry::close_fields(&entry));
    }
    batch.run(&mut redis).await?;
    Ok(live)
}
