//! One Redis connection type for a single Redis and for Redis Cluster, and
//! [`Batch`], the pipeline that works on both.
//!
//! The node talks to Redis through [`Conn`] only, so the same code serves
//! both deployments (`--redis-cluster` picks one at start). What differs is
//! pipelining: a single Redis takes any pipeline, while redis-rs sends a
//! cluster pipeline to one slot's node and refuses one that spans slots.
//! [`Batch`] therefore splits itself by hash slot on a cluster (order is
//! kept within a slot, which is all the routing needs: one user's, or one
//! inbox's, commands share a slot) and runs the parts concurrently.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{AsyncConnectionConfig, Cmd, ErrorKind, RedisError, RedisFuture, RedisResult, Value};

use crate::config::{Config, split_urls};

/// How long to wait for a TCP connection to a Redis node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long to wait for a reply on shared connections.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a blocking read may wait for its reply: well over the longest
/// `BLOCK` the readers use (1 s), so only a Redis that stopped answering
/// (frozen, or cut off without a reset) trips it, and the reader reconnects.
const BLOCKING_RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `BLOCK` a reader may ask for on a blocking connection.
pub const MAX_BLOCK: Duration = Duration::from_secs(1);

/// A connection to a single Redis or to a Redis Cluster.
#[derive(Clone)]
pub enum Conn {
    /// Single Redis, multiplexed and reconnecting by itself.
    Managed(ConnectionManager),
    /// Single Redis, for a blocking reader (reconnected by its owner).
    Direct(MultiplexedConnection),
    /// Redis Cluster: follows `MOVED`/`ASK` and failovers, refreshes slots.
    Cluster(ClusterConnection),
}

impl Conn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Managed(c) => c.req_packed_command(cmd),
            Conn::Direct(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Managed(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Direct(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Managed(c) => c.get_db(),
            Conn::Direct(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Makes connections: to one Redis, or to a Redis Cluster from its seeds.
// One per node, made once: the size of its variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Connector {
    Single(redis::Client),
    Cluster(ClusterClient),
}

impl Connector {
    /// From `--redis-url` / `--redis-cluster` (already validated).
    pub fn new(cfg: &Config) -> RedisResult<Connector> {
        Connector::open(
            cfg.redis_url.as_deref().unwrap_or_default(),
            cfg.redis_cluster,
        )
    }

    /// From a URL, or with `cluster` a comma list of seed URLs.
    pub fn open(url: &str, cluster: bool) -> RedisResult<Connector> {
        if cluster {
            let client = ClusterClientBuilder::new(split_urls(url))
                // Retries cover MOVED/ASK and a failover; the response
                // timeout bounds the whole attempt.
                .retries(8)
                .min_retry_wait(50)
                .max_retry_wait(1000)
                .build()?;
            Ok(Connector::Cluster(client))
        } else {
            Ok(Connector::Single(redis::Client::open(url)?))
        }
    }

    /// A shared, multiplexed, self-healing connection for non-blocking
    /// commands.
    pub async fn shared(&self) -> RedisResult<Conn> {
        match self {
            Connector::Single(client) => {
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_number_of_retries(1);
                Ok(Conn::Managed(
                    ConnectionManager::new_with_config(client.clone(), cfg).await?,
                ))
            }
            Connector::Cluster(client) => {
                let cfg = ClusterConfig::new()
                    .set_connection_timeout(CONNECT_TIMEOUT)
                    .set_response_timeout(RESPONSE_TIMEOUT);
                Ok(Conn::Cluster(
                    client.get_async_connection_with_config(cfg).await?,
                ))
            }
        }
    }

    /// A connection for blocking reads (`BLOCK` up to [`MAX_BLOCK`]): a
    /// response timeout far above that, and not a shared connection, which
    /// a blocking command would stall.
    pub async fn blocking(&self) -> RedisResult<Conn> {
        match self {
            Connector::Single(client) => {
                let cfg = AsyncConnectionConfig::new()
                    .set_response_timeout(Some(BLOCKING_RESPONSE_TIMEOUT))
                    .set_connection_timeout(Some(CONNECT_TIMEOUT));
                Ok(Conn::Direct(
                    client
                        .get_multiplexed_async_connection_with_config(&cfg)
                        .await?,
                ))
            }
            Connector::Cluster(client) => {
                let cfg = ClusterConfig::new()
                    .set_connection_timeout(CONNECT_TIMEOUT)
                    .set_response_timeout(BLOCKING_RESPONSE_TIMEOUT);
                Ok(Conn::Cluster(
                    client.get_async_connection_with_config(cfg).await?,
                ))
            }
        }
    }
}

/// The error for script keys that span hash slots (a bug: Redis Cluster
/// would refuse the script, so it is refused everywhere).
pub fn cross_slot(keys: &[&str]) -> RedisError {
    RedisError::from((
        ErrorKind::Client,
        "script keys span hash slots",
        keys.join(" "),
    ))
}

/// True if every key hashes to the same Redis Cluster slot.
pub fn one_slot(keys: &[&str]) -> bool {
    let mut slots = keys.iter().map(Slot::for_key);
    match slots.next() {
        Some(first) => slots.all(|s| s == first),
        None => true,
    }
}

struct Entry {
    slot: Slot,
    cmd: Cmd,
    keep: bool,
}

/// Pipelined commands that also run on Redis Cluster.
///
/// Each command names its first key up front: that is the key Redis
/// Cluster routes by. On a single Redis the batch is one pipeline; on a
/// cluster it is one pipeline per slot, sent concurrently, with the replies
/// put back in the order the commands were added.
#[derive(Default)]
pub struct Batch {
    entries: Vec<Entry>,
    /// A script whose keys span slots: `run` refuses the whole batch.
    error: Option<RedisError>,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn push(&mut self, name: &str, key: &str, keep: bool) -> &mut Cmd {
        let mut cmd = redis::cmd(name);
        cmd.arg(key);
        self.entries.push(Entry {
            slot: Slot::for_key(key),
            cmd,
            keep,
        });
        let last = self.entries.len() - 1;
        &mut self.entries[last].cmd
    }

    /// Add `name key …`; its reply is among those `run` returns.
    pub fn cmd(&mut self, name: &str, key: &str) -> &mut Cmd {
        self.push(name, key, true)
    }

    /// Add `name key …` whose reply is not wanted (an error still fails
    /// the batch).
    pub fn cmd_ignored(&mut self, name: &str, key: &str) -> &mut Cmd {
        self.push(name, key, false)
    }

    /// Add an `EVAL` of `script` on `keys` (which must share a slot); the
    /// caller adds `ARGV`.
    pub fn eval(&mut self, script: &str, keys: &[&str], keep: bool) -> &mut Cmd {
        if !one_slot(keys) && self.error.is_none() {
            self.error = Some(cross_slot(keys));
        }
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(script).arg(keys.len()).arg(keys);
        self.entries.push(Entry {
            slot: Slot::for_key(keys.first().copied().unwrap_or_default()),
            cmd,
            keep,
        });
        let last = self.entries.len() - 1;
        &mut self.entries[last].cmd
    }

    /// Run the batch; the replies of the kept commands, in order.
    pub async fn run(self, conn: &mut Conn) -> RedisResult<Vec<Value>> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.entries.is_empty() {
            return Ok(Vec::new());
        }
        if !conn.is_cluster() {
            return pipeline(self.entries.into_iter().map(|e| (e.cmd, e.keep)))
                .query_async(conn)
                .await;
        }
        // Split by slot, keeping each slot's commands in order.
        let mut groups: Vec<Vec<Entry>> = Vec::new();
        let mut group_of: HashMap<Slot, usize> = HashMap::new();
        let mut order: Vec<(usize, bool)> = Vec::with_capacity(self.entries.len());
        for e in self.entries {
            let g = *group_of.entry(e.slot).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            order.push((g, e.keep));
            groups[g].push(e);
        }
        let runs = groups.into_iter().map(|g| {
            let mut c = conn.clone();
            async move { run_slot(g, &mut c).await.map(Vec::into_iter) }
        });
        let mut replies = futures::future::try_join_all(runs).await?;
        let mut out = Vec::new();
        for (g, keep) in order {
            if keep {
                out.push(replies[g].next().unwrap_or(Value::Nil));
            }
        }
        Ok(out)
    }
}

/// Run one slot's commands on a cluster connection; the kept replies.
///
/// A pipeline that meets a slot being migrated is not safe to retry: on
/// `ASK` redis-rs resends the whole pipeline after a single `ASKING`, which
/// covers only its first command, so the first runs again and the rest
/// bounce back until the retries run out. Then the slot's commands are sent
/// again one by one, in order (redis-rs follows redirects correctly for a
/// single command). What had run is run again: routing is at-least-once,
/// and clients drop duplicates by message id.
async fn run_slot(entries: Vec<Entry>, conn: &mut Conn) -> RedisResult<Vec<Value>> {
    if entries.len() > 1 {
        let pipe = pipeline(entries.iter().map(|e| (e.cmd.clone(), e.keep)));
        match pipe.query_async::<Vec<Value>>(conn).await {
            Err(e) if e.is_cluster_error() => {
                tracing::debug!(error = %e, commands = entries.len(), "slot moving: pipeline sent again command by command");
            }
            done => return done,
        }
    }
    let mut out = Vec::new();
    for e in entries {
        let v: Value = e.cmd.query_async(conn).await?;
        if e.keep {
            out.push(v);
        }
    }
    Ok(out)
}

fn pipeline(entries: impl IntoIterator<Item = (Cmd, bool)>) -> redis::Pipeline {
    let mut pipe = redis::Pipeline::new();
    for (cmd, keep) in entries {
        pipe.add_command(cmd);
        if !keep {
            pipe.ignore();
        }
    }
    pipe
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_hash_tags() {
        assert!(one_slot(&["a:{u1}", "b:{u1}:c"]));
        assert!(!one_slot(&["a:{u1}", "a:{u2}"]));
        assert!(one_slot(&[]));
    }

    #[test]
    fn a_cross_slot_script_fails_the_batch() {
        let mut b = Batch::new();
        b.eval("return 1", &["x:{a}", "y:{b}"], true);
        assert!(b.error.is_some());
        let mut ok = Batch::new();
        ok.eval("return 1", &["x:{a}", "y:{a}"], true);
        assert!(ok.error.is_none());
    }
}
