//! The router of one send shard.
//!
//! At most one node routes a send stream at a time (several routing one
//! consumer group would reorder a user's messages). Every node runs this
//! loop as a candidate: it takes the shard's router lease when it is free,
//! first routes whatever its predecessors left pending (`XAUTOCLAIM`), then
//! reads new entries in batches until it loses the lease, leaves, or its
//! node id changes.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::shutdown::Phase;
use rand::Rng;
use redis::Value;

use super::acker::AckJob;
use crate::backoff::Backoff;
use crate::cluster::Ctx;
use crate::cluster::entry::{self, DeadReason};
use crate::ids::NodeId;
use crate::keys::ROUTER_GROUP;
use crate::message::Message;
use crate::redis::conn::{Batch, Conn};
use crate::redis::lua;
use crate::stream::{self, RawEntry};

/// Most entries read per batch. With a backlog (full rate) a bigger batch
/// puts more of each user's messages in one `ROUTE` call, whose fixed part
/// (look-up, counter, expiry) is then shared: 4,000 → 16,000 took the
/// routed rate from ~30k to ~40k msg/s in the same sitting (issue 14).
/// On Redis Cluster a round reads once, so half of it ([`read_batch`]).
const BATCH_MAX: usize = 16_000;
/// Fewest entries read per batch.
const BATCH_MIN: usize = 64;
/// About how many bytes a batch may hold, judged from the last batch's
/// entries: a backlog of large messages is read in smaller batches.
const BATCH_BYTES: usize = 8 << 20;
/// Entries claimed per `XAUTOCLAIM` step.
const CLAIM_BATCH: usize = 4000;
/// `<p>:dead` keeps about this many entries.
const DEAD_MAX: usize = 100_000;

#[derive(Debug, thiserror::Error)]
enum RouterError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("router lease lost")]
    LeaseLost,
}

pub async fn run(ctx: Arc<Ctx>, shard: u32) {
    let hb = ctx.cfg.heartbeat;
    let mut backoff = Backoff::redis();
    let mut blocking: Option<Conn> = None;
    loop {
        let jitter = rand::rng().random_range(Duration::ZERO..=hb / 4);
        if !ctx.life.sleep(jitter, Phase::Leaving).await {
            return;
        }
        if !ctx.membership.holds_lease() {
            // Not before the node's own lease; tried as soon as it is held
            // (a node is ready only once every shard was tried: below).
            if !ctx.membership.wait_lease(hb).await && ctx.life.at_least(Phase::Leaving) {
                return;
            }
            continue;
        }
        // Spread the shards over the nodes: a node that routes its fair
        // share already lets the others try first (they try within a
        // quarter heartbeat) and tries itself two heartbeats later, so a
        // shard nobody else takes is still routed. It looks again every
        // quarter heartbeat: when a node leaves, the survivors' share grows
        // at their next view of `<p>:nodes` and they take over at once.
        let patient_until = Instant::now() + 2 * hb;
        if ctx.shards.list().len() >= fair_share(&ctx) {
            ctx.shards.tried(shard);
        }
        while ctx.shards.list().len() >= fair_share(&ctx) && Instant::now() < patient_until {
            if !ctx.life.sleep(hb / 4, Phase::Leaving).await {
                return;
            }
        }
        let me = ctx.membership.id();
        let led = lead(&ctx, shard, &me, &mut blocking).await;
        ctx.shards.tried(shard);
        match led {
            Ok(true) => backoff.reset(),
            Ok(false) => {
                // Someone else routes: stand by for a heartbeat.
                if !ctx.life.sleep(hb, Phase::Leaving).await {
                    return;
                }
            }
            Err(e) => {
                if let RouterError::Redis(_) = e {
                    ctx.redis_error();
                    blocking = None;
                }
                let d = backoff.next_delay();
                tracing::warn!(shard, node = %me, error = %e, retry_in_ms = d.as_millis() as u64, "router stopped");
                if !ctx.life.sleep(d, Phase::Leaving).await {
                    return;
                }
            }
        }
        ctx.shards.set(shard, false);
    }
}

/// Try to lead shard `shard`. `Ok(false)`: another node holds the lease.
/// `Ok(true)`: led and stepped down cleanly.
async fn lead(
    ctx: &Arc<Ctx>,
    shard: u32,
    me: &NodeId,
    blocking: &mut Option<Conn>,
) -> Result<bool, RouterError> {
    let lease_key = ctx.keys.router_lease(shard);
    let ttl = ctx.cfg.lease_ttl;
    let hb = ctx.cfg.heartbeat;
    let mut lease_conn = ctx.lease_conn.clone();
    let started = Instant::now();
    let got: i64 = lua::eval_cmd(lua::LEASE_ACQUIRE, &[&lease_key])?
        .arg(me.as_str())
        .arg(ttl.as_millis() as u64)
        .query_async(&mut lease_conn)
        .await?;
    if got != 1 {
        return Ok(false);
    }
    // Fencing by time: we act only while the lease is surely ours, judged
    // from when the request was sent, less a heartbeat of margin.
    let mut lease_until = started + ttl - hb;
    let mut renewed_at = started;
    ctx.shards.set(shard, true);
    let key = ctx.keys.send(shard);
    ensure_group(ctx, &key).await?;
    tracing::info!(shard, node = %me, "routing send shard");

    // Take over what predecessors (or our own earlier incarnation) left
    // pending, before anything new: their order comes first.
    // The router's commands go one batch at a time: on a connection of its
    // own they are exchanged in this task, with no hand-offs (issue 16).
    let mut rconn = ctx.own_conn().await?;
    claim_pending(ctx, &mut rconn, shard, &key, me, 0, lease_until).await?;
    let mut claimed_at = Instant::now();

    let block_ms = (hb / 2).clamp(Duration::from_millis(5), crate::redis::conn::MAX_BLOCK / 2);
    // A batch read but not routed yet: the next read overlaps its routing,
    // so at full rate the router never waits for a read (one batch at a
    // time is still routed, in order). Left pending if we stop: whoever
    // leads next claims it.
    let mut ready: Option<Vec<RawEntry>> = None;
    let mut count = BATCH_MIN;
    loop {
        if ctx.life.at_least(Phase::Leaving) || ctx.membership.id() != *me {
            ctx.acker.flush(ttl / 2).await;
            release(ctx, &lease_key, me).await;
            return Ok(true);
        }
        // Thawed after a freeze past our lease (or too slow to renew): not
        // one more step under it — no claim, no clean-up, no routing — as
        // a successor may lead already (§6: one router per send stream).
        if Instant::now() >= lease_until {
            return Err(RouterError::LeaseLost);
        }
        // A former leader may have read a batch just as its lease lapsed,
        // after our takeover claim: entries idle longer than a lease can
        // only be abandoned. Claim them too, every lease TTL.
        if claimed_at.elapsed() >= ttl {
            claim_pending(
                ctx,
                &mut rconn,
                shard,
                &key,
                me,
                ttl.as_millis() as u64,
                lease_until,
            )
            .await?;
            forget_idle_consumers(ctx, &key, me).await?;
            claimed_at = Instant::now();
        }
        if renewed_at.elapsed() >= hb {
            let started = Instant::now();
            let ok = lua::renew_lease(
                &mut lease_conn,
                &lease_key,
                me.as_str(),
                ttl.as_millis() as u64,
            )
            .await?;
            if ok != 1 {
                tracing::warn!(shard, node = %me, "router lease lost");
                return Ok(true);
            }
            lease_until = started + ttl - hb;
            renewed_at = started;
            if ctx.shards.should_hand_off(shard, fair_share(ctx), ttl) {
                tracing::info!(shard, node = %me, "handing the send shard over (more than a fair share)");
                // What we routed must be acknowledged before the successor
                // claims the pending list, or it routes it again.
                ctx.acker.flush(ttl / 2).await;
                release(ctx, &lease_key, me).await;
                return Ok(true);
            }
        }
        let bconn = match blocking {
            Some(c) => c,
            None => blocking.insert(ctx.blocking_conn().await?),
        };
        // Route what was read last time while reading what comes next.
        let routing = async {
            let Some(entries) = ready.take() else {
                return Ok(());
            };
            if Instant::now() >= lease_until {
                // Frozen past our lease (or too slow to renew): the entries
                // stay pending for whoever leads next.
                return Err(RouterError::LeaseLost);
            }
            route_batch(ctx, &mut rconn, shard, &key, entries, false).await?;
            Ok(())
        };
        let read = read_batch(bconn, &key, me, block_ms, count);
        let (read, routed) = tokio::join!(read, routing);
        routed?;
        match read {
            Ok(entries) if !entries.is_empty() => {
                count = batch_count(&entries);
                ready = Some(entries);
            }
            Ok(_) => {}
            // The group vanished (Redis restarted empty, or the stream was
            // deleted): create it again. (A `BLOCK` that timed out is a nil
            // reply, not this.)
            Err(e) if e.code() == Some("NOGROUP") => ensure_group(ctx, &key).await?,
            // The stream left this Redis while we waited (deleted, or its
            // slot migrated): read again; a redirect then restarts us.
            Err(e) if e.code() == Some("UNBLOCKED") => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// The next batch of new entries of send stream `key` for consumer `me`,
/// waiting up to `block` for the first.
///
/// Redis serves a blocked reader right after the first `XADD` of an app's
/// pipeline, so a lone blocking read gets that entry alone and the rest a
/// routing round later: two rounds (look-ups, inbox adds, inbox reads)
/// where one would do. On a single Redis a second read without `BLOCK`
/// goes in the same write: Redis runs it only once the first is answered,
/// after the app's whole pipeline, so it takes the rest — no extra round
/// trip, and an empty reply when nothing more came (issue 16).
async fn read_batch(
    bconn: &mut Conn,
    key: &str,
    me: &NodeId,
    block: Duration,
    count: usize,
) -> Result<Vec<RawEntry>, redis::RedisError> {
    let read = |count: usize| {
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP")
            .arg(ROUTER_GROUP)
            .arg(me.as_str())
            .arg("COUNT")
            .arg(count);
        read
    };
    let mut first = read(count.div_ceil(2));
    first
        .arg("BLOCK")
        .arg(block.as_millis() as u64)
        .arg("STREAMS")
        .arg(key)
        .arg(">");
    if bconn.is_cluster() {
        let v = bconn.value(&first).await?;
        return Ok(stream::into_entries(v));
    }
    let mut rest = read(count.div_ceil(2));
    rest.arg("STREAMS").arg(key).arg(">");
    let mut entries = Vec::new();
    for v in bconn.values([first, rest]).await? {
        entries.extend(stream::into_entries(v));
    }
    Ok(entries)
}

/// How many entries to read next: [`BATCH_BYTES`] worth at the size of
/// `last`'s entries, within [`BATCH_MIN`]..=[`BATCH_MAX`].
fn batch_count(last: &[RawEntry]) -> usize {
    let bytes: usize = last
        .iter()
        .map(|e| {
            e.id.len()
                + e.fields
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>()
        })
        .sum();
    let each = (bytes / last.len().max(1)).max(1);
    (BATCH_BYTES / each).clamp(BATCH_MIN, BATCH_MAX)
}

/// The send shards this node routes now, for its routers only (and the
/// `/cluster` view).
#[derive(Default)]
pub struct ShardSet {
    routing: Mutex<BTreeSet<u32>>,
    /// Shards whose router has tried for the lease at least once (or left
    /// it to other nodes, holding its fair share): until every one has,
    /// the node is not ready, so `/cluster` is right from the first
    /// `/readyz` 200 (a lone node routes every shard by then).
    tried: Mutex<BTreeSet<u32>>,
    /// When this node last handed a shard over to spread the routers.
    handed_off_at: Mutex<Option<Instant>>,
}

impl ShardSet {
    pub fn list(&self) -> Vec<u32> {
        self.routing
            .lock()
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    fn set(&self, shard: u32, routing: bool) {
        if let Ok(mut s) = self.routing.lock() {
            if routing {
                s.insert(shard);
            } else {
                s.remove(&shard);
            }
        }
        if routing {
            self.tried(shard);
        }
    }

    fn tried(&self, shard: u32) {
        if let Ok(mut t) = self.tried.lock() {
            t.insert(shard);
        }
    }

    /// Every one of `shards` send shards was tried (see `tried`).
    pub fn all_tried(&self, shards: u32) -> bool {
        self.tried
            .lock()
            .map(|t| t.len() >= shards as usize)
            .unwrap_or(false)
    }

    /// True if this node routes more than `fair` shards and `shard` is the
    /// one to give up (its highest), at most once per `every` so views
    /// that briefly disagree cannot make shards flap. What the successor
    /// claims from the pending list is routed again: duplicates with the
    /// same id, never loss.
    fn should_hand_off(&self, shard: u32, fair: usize, every: Duration) -> bool {
        let routed = self.list();
        if routed.len() <= fair || routed.last() != Some(&shard) {
            return false;
        }
        let Ok(mut at) = self.handed_off_at.lock() else {
            return false;
        };
        if at.is_some_and(|t| t.elapsed() < every) {
            return false;
        }
        *at = Some(Instant::now());
        true
    }
}

/// The shards a node should route, spreading them over the live nodes:
/// ceil(shards / live nodes).
fn fair_share(ctx: &Ctx) -> usize {
    let live = ctx.membership.live.live_count().max(1);
    (ctx.cfg.send_shards as usize).div_ceil(live)
}

/// Claim (`XAUTOCLAIM`) and route every entry of the router group idle for
/// at least `min_idle_ms`, whoever holds it.
async fn claim_pending(
    ctx: &Arc<Ctx>,
    rconn: &mut Conn,
    shard: u32,
    key: &str,
    me: &NodeId,
    min_idle_ms: u64,
    lease_until: Instant,
) -> Result<(), RouterError> {
    let mut redis = ctx.redis.clone();
    let mut cursor = "0-0".to_owned();
    loop {
        // Claiming moves entries to us: only while the lease is surely ours.
        if Instant::now() >= lease_until {
            return Err(RouterError::LeaseLost);
        }
        let v: Value = redis::cmd("XAUTOCLAIM")
            .arg(key)
            .arg(ROUTER_GROUP)
            .arg(me.as_str())
            .arg(min_idle_ms)
            .arg(&cursor)
            .arg("COUNT")
            .arg(CLAIM_BATCH)
            .query_async(&mut redis)
            .await?;
        let Value::Array(parts) = v else { break };
        let next = parts.first().and_then(stream::string).unwrap_or_default();
        let claimed = parts.get(1).map(stream::entries).unwrap_or_default();
        // Entries deleted while pending come back in the third part.
        let deleted: Vec<String> = match parts.get(2) {
            Some(Value::Array(ids)) => ids.iter().filter_map(stream::string).collect(),
            _ => Vec::new(),
        };
        if !deleted.is_empty() {
            ctx.acker.send(AckJob::Send {
                key: key.to_owned(),
                ids: deleted,
            });
        }
        if !claimed.is_empty() {
            if Instant::now() >= lease_until {
                return Err(RouterError::LeaseLost);
            }
            route_batch(ctx, rconn, shard, key, claimed, true).await?;
        }
        if next == "0-0" || next.is_empty() {
            break;
        }
        cursor = next;
    }
    Ok(())
}

/// Delete router-group consumers of former leaders (every node id that
/// ever routed leaves one) once they hold nothing and have been idle for
/// two lease TTLs.
async fn forget_idle_consumers(ctx: &Ctx, key: &str, me: &NodeId) -> Result<(), RouterError> {
    let mut redis = ctx.redis.clone();
    let n: i64 = lua::eval_cmd(lua::DEL_IDLE_CONSUMERS, &[key])?
        .arg(ROUTER_GROUP)
        .arg(me.as_str())
        .arg(2 * ctx.ttl_ms())
        .query_async(&mut redis)
        .await?;
    if n > 0 {
        tracing::debug!(stream = key, consumers = n, "idle router consumers deleted");
    }
    Ok(())
}

async fn release(ctx: &Ctx, lease_key: &str, me: &NodeId) {
    let mut redis = ctx.redis.clone();
    // Best effort: an unreleased lease expires within a TTL.
    let _ = lua::release_lease(&mut redis, lease_key, me.as_str()).await;
}

/// Create the router group at the start of the stream (entries added while
/// no node ran are routed), creating the stream if needed.
async fn ensure_group(ctx: &Ctx, key: &str) -> Result<(), redis::RedisError> {
    let mut redis = ctx.redis.clone();
    let r: Result<(), _> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(key)
        .arg(ROUTER_GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut redis)
        .await;
    match r {
        Err(e) if e.code() != Some("BUSYGROUP") => Err(e),
        _ => Ok(()),
    }
}

/// Route one batch read from the send stream, on `redis`: bad entries to
/// `<p>:dead`, the rest through [`super::route_on`]; acknowledge and delete
/// them all once every hand-off is done. `repeat`: claimed from a pending
/// list, so they may have been routed (and numbered) before (`ROUTE` also
/// finds repeats by itself, from their ids).
async fn route_batch(
    ctx: &Arc<Ctx>,
    redis: &mut Conn,
    shard: u32,
    key: &str,
    entries: Vec<RawEntry>,
    repeat: bool,
) -> Result<(), redis::RedisError> {
    let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
    let mut msgs: Vec<Arc<Message>> = Vec::with_capacity(entries.len());
    let mut dead: Vec<(&RawEntry, DeadReason)> = Vec::new();
    for e in &entries {
        if e.fields.is_empty() {
            // Deleted while pending: nothing to route, just acknowledge.
            continue;
        }
        match entry::parse_send(e, shard, ctx.cfg.max_payload_bytes) {
            Ok(mut m) => {
                m.repeat = repeat;
                msgs.push(Arc::new(m));
            }
            Err(r) => dead.push((e, r)),
        }
    }
    if !dead.is_empty() {
        let dead_key = ctx.keys.dead();
        let mut batch = Batch::new();
        for (e, reason) in &dead {
            batch
                .cmd_ignored("XADD", &dead_key)
                .arg("MAXLEN")
                .arg("~")
                .arg(DEAD_MAX)
                .arg("*")
                .arg("reason")
                .arg(reason.code())
                .arg("stream")
                .arg(key)
                .arg("id")
                .arg(&e.id)
                .arg("entry")
                .arg(e.fields_json());
        }
        batch.run(redis).await?;
        ctx.metrics.dead.inc_by(dead.len() as u64);
        for (e, reason) in &dead {
            tracing::warn!(stream = key, id = %e.id, reason = reason.code(), "dead letter");
        }
    }
    let n = msgs.len() as u64;
    let guard = ctx.acker.guard(AckJob::Send {
        key: key.to_owned(),
        ids,
    });
    match super::route_on(ctx, redis, msgs).await {
        Ok(()) => {
            ctx.metrics.routed.inc_by(n);
            Ok(())
        }
        Err(e) => {
            // Leave the batch pending: the next leader (maybe us) claims it.
            guard.disarm();
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::ids::NodeId;
    use crate::redis::conn::Connector;

    /// A batch is sized by its entries' bytes: small messages in big
    /// batches, a backlog of large ones in small batches.
    #[test]
    fn batch_size_follows_entry_size() {
        let entries = |payload: usize, n: usize| -> Vec<crate::stream::RawEntry> {
            (0..n)
                .map(|i| crate::stream::RawEntry {
                    id: format!("1-{i}"),
                    fields: vec![(b"payload".to_vec(), vec![b'1'; payload])],
                })
                .collect()
        };
        assert_eq!(super::batch_count(&entries(150, 1)), super::BATCH_MAX);
        assert_eq!(super::batch_count(&entries(65_536, 500)), 127);
        assert_eq!(super::batch_count(&entries(1 << 20, 3)), super::BATCH_MIN);
        assert_eq!(super::batch_count(&[]), super::BATCH_MAX);
    }

    /// An app's pipeline of `XADD`s reaches a router blocked on the send
    /// stream as one batch, not its first entry alone and the rest a
    /// round later.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pipelined_burst_is_read_in_one_batch() {
        let dir = wscluster_testkit::tmpdir("burst").unwrap();
        let redis = wscluster_testkit::RedisServer::start(&dir).unwrap();
        let client = redis::Client::open(redis.url()).unwrap();
        let mut app = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("XGROUP")
            .arg(&["CREATE", "send", crate::keys::ROUTER_GROUP, "$", "MKSTREAM"])
            .query_async(&mut app)
            .await
            .unwrap();
        let mut conn = Connector::open(&redis.url(), false)
            .unwrap()
            .blocking()
            .await
            .unwrap();
        let me = NodeId::from_redis("router".to_owned());
        let reader = tokio::spawn(async move {
            super::read_batch(&mut conn, "send", &me, Duration::from_secs(5), 64).await
        });
        redis.wait_blocked(1, Duration::from_secs(5));
        let mut pipe = redis::pipe();
        for i in 0..5 {
            pipe.cmd("XADD")
                .arg(&["send", "*", "to", "u", "payload"])
                .arg(i)
                .ignore();
        }
        let _: () = pipe.query_async(&mut app).await.unwrap();
        let read = reader.await.unwrap().unwrap();
        assert_eq!(read.len(), 5, "the whole pipeline in one batch");
    }
}
