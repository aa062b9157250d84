//! The app's view and control of users (contract §10): presence counts and
//! closing a user's connections through the nodes' inboxes.

use std::collections::HashMap;

use redis::Value;

use super::entry::{self, Close};
use super::{Ctx, NodeStatus};
use crate::ids::{NodeId, UserId};
use crate::redis::conn::{Batch, Conn};

/// Each user's connections (conn id, node id), one pipeline.
async fn connections(
    ctx: &Ctx,
    conn: &mut Conn,
    users: &[UserId],
) -> Result<Vec<Vec<(String, String)>>, redis::RedisError> {
    let mut batch = Batch::new();
    for u in users {
        batch.cmd("HGETALL", &ctx.keys.user(u));
    }
    Ok(redis::from_redis_value(Value::Array(
        batch.run(conn).await?,
    ))?)
}

/// Is `node` live? Nodes this node has not seen, or believes expired, are
/// asked about first (one `ZMSCORE` for all of them).
async fn learn(ctx: &Ctx, conn: &mut Conn, nodes: &[&str]) -> Result<(), redis::RedisError> {
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
        .query_async(conn)
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
    let mut conn = ctx.conn.clone();
    let found = connections(ctx, &mut conn, users).await?;
    let nodes: Vec<&str> = found.iter().flatten().map(|(_, n)| n.as_str()).collect();
    learn(ctx, &mut conn, &nodes).await?;
    Ok(found
        .iter()
        .map(|f| f.iter().filter(|(_, n)| is_live(ctx, n)).count())
        .collect())
}

/// Close the user's connections with `code`/`reason`: every one it has now
/// (`conns` empty), or those of `conns` (a close routed again by a
/// reaper). Each node holding some gets one inbox entry naming them, so a
/// connection opened later is never closed by it. Returns how many of them
/// are on live nodes.
pub async fn close(ctx: &Ctx, c: &Close) -> Result<usize, redis::RedisError> {
    let mut conn = ctx.conn.clone();
    let found = connections(ctx, &mut conn, std::slice::from_ref(&c.user))
        .await?
        .pop()
        .unwrap_or_default();
    let found: Vec<(String, String)> = found
        .into_iter()
        .filter(|(id, _)| c.conns.is_empty() || c.conns.contains(id))
        .collect();
    let nodes: Vec<&str> = found.iter().map(|(_, n)| n.as_str()).collect();
    learn(ctx, &mut conn, &nodes).await?;
    let live = found.iter().filter(|(_, n)| is_live(ctx, n)).count();
    let mut by_node: HashMap<&str, Vec<String>> = HashMap::new();
    for (id, node) in &found {
        // A gone node's connections went with it; an expired one may come
        // back under a new id, and its reaper routes this again if not.
        if !matches!(ctx.membership.live.status(node), NodeStatus::Gone) {
            by_node.entry(node).or_default().push(id.clone());
        }
    }
    let mut batch = Batch::new();
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
    batch.run(&mut conn).await?;
    Ok(live)
}
