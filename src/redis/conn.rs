//! One Redis connection type for a single Redis and for Redis Cluster, and
//! [`Batch`], the pipeline that works on both.
//!
//! The node talks to Redis through [`Conn`] only, so the same code serves
//! both deployments (`--redis-cluster` picks one at start). What differs is
//! pipelining: a single Redis takes any pipeline, while on a cluster each
//! primary takes only commands for its own slots. [`Batch`] therefore
//! splits itself by primary on a cluster (see [`super::slots`]) and sends
//! the parts concurrently. Order is kept within a part, which is all the
//! routing needs: one user's, one inbox's or one send shard's commands
//! share a slot.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use redis::{AsyncConnectionConfig, Cmd, ErrorKind, RedisError, RedisFuture, RedisResult, Value};

use super::mux::{Mux, Solo};
use super::slots::{SlotCache, SlotMap, slot_of};
pub use super::slots::{cross_slot, one_slot};
use crate::config::{Config, split_urls};

/// Sends of a wholly redirected part of a `once` batch (a slot moving:
/// `MOVED`, or `ASK`/`TRYAGAIN` while it migrates; backing off 20 ms … 1.3 s).
const ONCE_ATTEMPTS: u32 = 7;
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
    /// Single Redis over plain TCP: multiplexed, reconnecting by itself,
    /// with a reply reader of our own (see [`super::mux`]).
    Mux(Mux),
    /// Single Redis over plain TCP, one owner's: a blocking reader's or
    /// the router's (see [`super::mux::Solo`]).
    Solo(Solo),
    /// Single Redis over TLS or a Unix socket, multiplexed and reconnecting
    /// by itself.
    Managed(ConnectionManager),
    /// Single Redis over TLS or a Unix socket, for a blocking reader
    /// (reconnected by its owner).
    Direct(MultiplexedConnection),
    /// Redis Cluster.
    Cluster(ClusterConn),
}

/// A Redis Cluster connection.
#[derive(Clone)]
pub struct ClusterConn {
    /// Single commands: follows `MOVED`/`ASK` and failovers, retrying.
    conn: ClusterConnection,
    /// Whole-primary pipelines of a [`Batch`], not retried by redis-rs (a
    /// retried pipeline would run its commands again after a redirect; the
    /// batch handles that itself). None on blocking connections.
    pipes: Option<ClusterConnection>,
    slots: Arc<SlotCache>,
}

impl Conn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    /// Run a command whose reply is wanted as a [`Value`] as it is (a
    /// stream read): only an error reply is an error. redis-rs's
    /// `query_async` would walk and rebuild the whole reply looking for
    /// nested errors, which only transactions have (issue 16).
    pub async fn value(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        match self.req_packed_command(cmd).await? {
            Value::ServerError(e) => Err(e.into()),
            v => Ok(v),
        }
    }

    /// Commands in one write, their replies as they are (see [`Conn::value`]);
    /// an error reply fails them all. Not for a cluster (which would route
    /// them by the first one's key only).
    pub async fn values(&mut self, cmds: impl IntoIterator<Item = Cmd>) -> RedisResult<Vec<Value>> {
        let pipe = pipeline(cmds.into_iter().map(|c| (c, true)));
        let n = pipe.cmd_iter().count();
        let values = self.req_packed_commands(&pipe, 0, n).await?;
        if let Some(Value::ServerError(e)) =
            values.iter().find(|v| matches!(v, Value::ServerError(_)))
        {
            return Err(e.clone().into());
        }
        Ok(values)
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Mux(c) => c.req_packed_command(cmd),
            Conn::Solo(c) => c.req_packed_command(cmd),
            Conn::Managed(c) => c.req_packed_command(cmd),
            Conn::Direct(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Mux(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Solo(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Managed(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Direct(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Mux(c) => c.get_db(),
            Conn::Solo(c) => c.get_db(),
            Conn::Managed(c) => c.get_db(),
            Conn::Direct(c) => c.get_db(),
            Conn::Cluster(c) => c.conn.get_db(),
        }
    }
}

/// Makes connections: to one Redis, or to a Redis Cluster from its seeds.
// One per node, made once: the size of its variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Connector {
    Single(redis::Client),
    Cluster {
        client: ClusterClient,
        /// The same cluster, no retries: for a batch's pipelines.
        once: ClusterClient,
    },
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
            let seeds = split_urls(url);
            let client = ClusterClientBuilder::new(seeds.clone())
                // Retries cover MOVED/ASK and a failover; the response
                // timeout bounds the whole attempt.
                .retries(8)
                .min_retry_wait(50)
                .max_retry_wait(1000)
                .build()?;
            let once = ClusterClientBuilder::new(seeds).retries(0).build()?;
            Ok(Connector::Cluster { client, once })
        } else {
            Ok(Connector::Single(redis::Client::open(url)?))
        }
    }

    /// A shared, multiplexed, self-healing connection for non-blocking
    /// commands.
    pub async fn shared(&self) -> RedisResult<Conn> {
        match self {
            Connector::Single(client) if super::mux::supports(client.get_connection_info()) => {
                let info = client.get_connection_info();
                with_scripts(Conn::Mux(
                    Mux::connect(info, CONNECT_TIMEOUT, RESPONSE_TIMEOUT).await?,
                ))
                .await
            }
            Connector::Single(client) => {
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_number_of_retries(1);
                with_scripts(Conn::Managed(
                    ConnectionManager::new_with_config(client.clone(), cfg).await?,
                ))
                .await
            }
            Connector::Cluster { client, once } => {
                let cfg = || {
                    ClusterConfig::new()
                        .set_connection_timeout(CONNECT_TIMEOUT)
                        .set_response_timeout(RESPONSE_TIMEOUT)
                };
                with_scripts(Conn::Cluster(ClusterConn {
                    conn: client.get_async_connection_with_config(cfg()).await?,
                    pipes: Some(once.get_async_connection_with_config(cfg()).await?),
                    slots: Arc::default(),
                }))
                .await
            }
        }
    }

    /// A connection of one owner's, for a loop that sends one command or
    /// batch at a time (the router): on a single Redis over plain TCP the
    /// exchange then happens in the owner's task (see
    /// [`super::mux::Solo`]); elsewhere `None`, and the owner shares the
    /// node's connection.
    pub async fn own(&self) -> RedisResult<Option<Conn>> {
        match self {
            Connector::Single(client) if super::mux::supports(client.get_connection_info()) => {
                let info = client.get_connection_info();
                let solo = Solo::connect(info, CONNECT_TIMEOUT, RESPONSE_TIMEOUT).await?;
                Ok(Some(with_scripts(Conn::Solo(solo)).await?))
            }
            _ => Ok(None),
        }
    }

    /// A connection for blocking reads (`BLOCK` up to [`MAX_BLOCK`]): a
    /// response timeout far above that, and not a shared connection, which
    /// a blocking command would stall.
    pub async fn blocking(&self) -> RedisResult<Conn> {
        match self {
            Connector::Single(client) if super::mux::supports(client.get_connection_info()) => {
                Ok(Conn::Solo(
                    Solo::connect(
                        client.get_connection_info(),
                        CONNECT_TIMEOUT,
                        BLOCKING_RESPONSE_TIMEOUT,
                    )
                    .await?,
                ))
            }
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
            // Not retried by redis-rs: a read whose reply was lost must not
            // be sent again (its entries are pending; the router restarts
            // and claims them first), and the reader reconnects itself.
            Connector::Cluster { once, .. } => {
                let client = once;
                let cfg = ClusterConfig::new()
                    .set_connection_timeout(CONNECT_TIMEOUT)
                    .set_response_timeout(BLOCKING_RESPONSE_TIMEOUT);
                Ok(Conn::Cluster(ClusterConn {
                    conn: client.get_async_connection_with_config(cfg).await?,
                    pipes: None,
                    slots: Arc::default(),
                }))
            }
        }
    }
}

/// `conn` with every script loaded (a batch's `EVALSHA` then finds them).
async fn with_scripts(mut conn: Conn) -> RedisResult<Conn> {
    crate::redis::lua::load_all(&mut conn).await?;
    Ok(conn)
}

struct Entry {
    slot: u16,
    cmd: Cmd,
    keep: bool,
}

/// Pipelined commands that also run on Redis Cluster.
///
/// Each command names its first key up front: that is the key Redis
/// Cluster routes by. On a single Redis the batch is one pipeline; on a
/// cluster it is one pipeline per primary, sent concurrently, with the
/// replies put back in the order the commands were added.
#[derive(Default)]
pub struct Batch {
    entries: Vec<Entry>,
    /// A script whose keys span slots: `run` refuses the whole batch.
    error: Option<RedisError>,
    /// Never send a command twice (see [`Batch::once`]).
    once: bool,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// For commands that must not run twice (an `XADD` whose stream id is
    /// the message id, a script that takes a mailbox page): on a cluster
    /// each slot's part is sent without redis-rs retries and never
    /// replayed after it may have run. A part wholly redirected (`MOVED`,
    /// `ASK`: it did not run) is sent again, a few times; a lost reply
    /// comes back as an error.
    pub fn once(mut self) -> Batch {
        self.once = true;
        self
    }

    fn push(&mut self, name: &str, key: &str, keep: bool) -> &mut Cmd {
        let mut cmd = new_cmd(name);
        cmd.arg(key);
        self.entries.push(Entry {
            slot: slot_of(key.as_bytes()),
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
    pub fn eval(&mut self, script: &'static str, keys: &[&str], keep: bool) -> &mut Cmd {
        if !one_slot(keys) && self.error.is_none() {
            self.error = Some(cross_slot(keys));
        }
        let mut cmd = new_cmd("EVALSHA");
        cmd.arg(crate::redis::lua::sha(script))
            .arg(keys.len())
            .arg(keys);
        self.entries.push(Entry {
            slot: slot_of(keys.first().copied().unwrap_or_default().as_bytes()),
            cmd,
            keep,
        });
        let last = self.entries.len() - 1;
        &mut self.entries[last].cmd
    }

    /// Run the batch; the replies of the kept commands, in order. A script
    /// Redis does not know (`NOSCRIPT`: restarted, or failed over to a
    /// replica) makes it load them all; the batch fails this once.
    pub async fn run(self, conn: &mut Conn) -> RedisResult<Vec<Value>> {
        let r = self.run_once(conn).await;
        if let Err(e) = &r
            && e.code() == Some("NOSCRIPT")
            && let Err(e) = crate::redis::lua::load_all(conn).await
        {
            tracing::warn!(error = %e, "loading the scripts failed");
        }
        r
    }

    async fn run_once(self, conn: &mut Conn) -> RedisResult<Vec<Value>> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.entries.is_empty() {
            return Ok(Vec::new());
        }
        if !conn.is_cluster() {
            // Straight to the connection: `Pipeline::query_async` would walk
            // and rebuild every reply looking for nested errors, which only
            // transactions have (issue 16: 7 % of a node's instructions).
            let keep: Vec<bool> = self.entries.iter().map(|e| e.keep).collect();
            let n = keep.len();
            let pipe = pipeline(self.entries.into_iter().map(|e| (e.cmd, true)));
            let values = conn.req_packed_commands(&pipe, 0, n).await?;
            return replies_of(values, keep);
        }
        let Conn::Cluster(cc) = conn else {
            return Ok(Vec::new()); // not reached: checked above
        };
        run_cluster(self.entries, cc, self.once).await
    }
}

/// Run a batch on a cluster: one part per primary (or per slot while the
/// slot map is unknown), each in order, all concurrently.
async fn run_cluster(
    entries: Vec<Entry>,
    cc: &mut ClusterConn,
    once: bool,
) -> RedisResult<Vec<Value>> {
    let map = match (&cc.pipes, cc.slots.get()) {
        (None, _) => None,
        // Parts of one slot only: a redirect then covers the whole part.
        _ if once => None,
        (Some(_), Some(m)) => Some(m),
        (Some(_), None) => match fetch_slot_map(&mut cc.conn).await {
            Ok(m) => {
                cc.slots.set(m);
                cc.slots.get()
            }
            Err(e) => {
                tracing::debug!(error = %e, "no slot map: batch sent per slot");
                None
            }
        },
    };
    // Part key: the primary's index, or `SLOTS + slot` when not known.
    let mut parts: Vec<(bool, Vec<Entry>)> = Vec::new();
    let mut part_of: HashMap<u32, usize> = HashMap::new();
    let mut order: Vec<(usize, bool)> = Vec::with_capacity(entries.len());
    for e in entries {
        let owner = map.as_ref().and_then(|m| m.owner(e.slot));
        let key = owner.map_or(SLOTS_U32 + u32::from(e.slot), u32::from);
        let p = *part_of.entry(key).or_insert_with(|| {
            parts.push((owner.is_some(), Vec::new()));
            parts.len() - 1
        });
        order.push((p, e.keep));
        parts[p].1.push(e);
    }
    let runs = parts.into_iter().map(|(whole_primary, part)| {
        let mut c = cc.clone();
        async move {
            run_part(part, &mut c, whole_primary, once)
                .await
                .map(Vec::into_iter)
        }
    });
    let mut replies = futures::future::try_join_all(runs).await?;
    let mut out = Vec::new();
    for (p, keep) in order {
        if keep {
            // A part returns one reply per kept command (checked there).
            out.push(replies[p].next().ok_or_else(short_reply)?);
        }
    }
    Ok(out)
}

const SLOTS_U32: u32 = super::slots::SLOTS as u32;

async fn fetch_slot_map(conn: &mut ClusterConnection) -> RedisResult<SlotMap> {
    let v: Value = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
    SlotMap::parse(&v)
        .ok_or_else(|| RedisError::from((ErrorKind::Parse, "unreadable CLUSTER SLOTS reply")))
}

/// Run one part of a cluster batch, in order; the kept replies.
/// `whole_primary`: the part holds the commands of one primary's slots, as
/// the slot map says; otherwise of one slot.
///
/// A part is first sent as one pipeline. If that meets a redirect (the slot
/// map is stale, or a slot is migrating) the part is sent again command by
/// command, in order, on the retrying connection, which follows `MOVED` and
/// `ASK` for single commands. Pipelines are not left to redis-rs's retries:
/// on `ASK` it resends the whole pipeline after one `ASKING`, which covers
/// only the first command, so the first runs again and the rest bounce until
/// the retries run out. What had run is run again: routing is
/// at-least-once, clients drop duplicates by message id, and `ROUTE` gives
/// a message it numbered before the same `seq` (see `lua::ROUTE`).
async fn run_part(
    entries: Vec<Entry>,
    cc: &mut ClusterConn,
    whole_primary: bool,
    once: bool,
) -> RedisResult<Vec<Value>> {
    let mut attempt = 0;
    while entries.len() > 1 || once {
        let sent = match &mut cc.pipes {
            // Routed to the primary of the part's (first) slot, not
            // retried by redis-rs.
            Some(pipes) => {
                // Raw replies, every one (`replies_of` drops the unkept).
                let pipe = pipeline(entries.iter().map(|e| (e.cmd.clone(), true)));
                let route = SingleNodeRoutingInfo::SpecificNode(Route::new(
                    entries[0].slot,
                    SlotAddr::Master,
                ));
                pipes
                    .route_pipeline(pipe, 0, entries.len(), route)
                    .await
                    .and_then(|values| replies_of(values, entries.iter().map(|e| e.keep)))
            }
            // A blocking connection (no batches run there in practice).
            None => {
                pipeline(entries.iter().map(|e| (e.cmd.clone(), e.keep)))
                    .query_async::<Vec<Value>>(&mut cc.conn)
                    .await
            }
        };
        match sent {
            // Wholly redirected, so it did not run (a part of a `once`
            // batch is one slot's): send it again, to the new owner.
            Err(e) if once && e.is_cluster_error() && attempt < ONCE_ATTEMPTS => {
                cc.slots.invalidate();
                attempt += 1;
                tracing::debug!(error = %e, attempt, "redirected: sent again");
                tokio::time::sleep(Duration::from_millis(10 << attempt)).await;
                continue;
            }
            Err(e) if is_redirect_or_lost(&e) => {
                cc.slots.invalidate();
                if once {
                    return Err(e);
                }
                tracing::debug!(error = %e, commands = entries.len(), whole_primary, "redirected: batch part sent again command by command");
                break;
            }
            done => return done,
        }
    }
    let mut out = Vec::new();
    for e in entries {
        let v: Value = e.cmd.query_async(&mut cc.conn).await?;
        if e.keep {
            out.push(v);
        }
    }
    Ok(out)
}

/// The kept replies of a routed pipeline's raw replies; the first error
/// reply as an error.
fn replies_of(
    values: Vec<Value>,
    keep: impl IntoIterator<Item = bool, IntoIter: ExactSizeIterator>,
) -> RedisResult<Vec<Value>> {
    let keep = keep.into_iter();
    if values.len() != keep.len() {
        return Err(short_reply());
    }
    let mut out = Vec::with_capacity(values.len());
    for (v, keep) in values.into_iter().zip(keep) {
        if let Value::ServerError(err) = v {
            return Err(err.into());
        }
        if keep {
            out.push(v);
        }
    }
    Ok(out)
}

/// A command with room for a typical routing command's arguments, so
/// adding them does not grow its buffers step by step (issue 16).
fn new_cmd(name: &str) -> Cmd {
    let mut cmd = Cmd::with_capacity(16, 256);
    cmd.arg(name);
    cmd
}

/// A redirect (`MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`) or a lost reply:
/// what the part did is unknown or partial, and sending it again may help.
/// Any other error the commands caused themselves (a script error, a wrong
/// type): sending them again would only repeat it.
fn is_redirect_or_lost(e: &RedisError) -> bool {
    e.is_cluster_error() || e.is_io_error() || e.is_timeout() || e.is_connection_dropped()
}

fn short_reply() -> RedisError {
    RedisError::from((
        ErrorKind::Client,
        "a pipeline returned fewer replies than commands",
    ))
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
