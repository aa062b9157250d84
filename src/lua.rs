//! The Lua scripts: everything that must be atomic.
//!
//! Each script touches keys of one hash slot only (contract §5), so the same
//! scripts serve Redis Cluster. Time always comes from Redis `TIME`, never a
//! node's clock. Scripts are sent with `EVAL` (Redis caches the compiled
//! script by its hash), which keeps pipelines simple and survives a Redis
//! restart that emptied the script cache.

/// Join: `KEYS[1]` = nodes; `ARGV` = node id, lease ttl ms.
/// Returns `{expiry, now}`.
pub const JOIN: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local exp = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], exp, ARGV[1])
return {exp, now}
"#;

/// Renew: extend the lease only if this node still holds it, unexpired.
/// `KEYS[1]` = nodes; `ARGV` = node id, ttl ms. Returns `{expiry, now}`, or
/// `{-1, now}` when the lease is gone or expired (the caller must then never
/// write under this id again).
pub const RENEW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not s or tonumber(s) <= now then
  return {-1, now}
end
local exp = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], 'XX', exp, ARGV[1])
return {exp, now}
"#;

/// Expire a lease now (a leaving node, so no router sends to it any more).
/// `KEYS[1]` = nodes; `ARGV[1]` = node id.
pub const EXPIRE_NOW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], 'XX', now - 1, ARGV[1])
end
return now
"#;

/// Remove a node's member, only if its lease has expired (a reaper never
/// removes a live node). `KEYS[1]` = nodes; `ARGV[1]` = node id.
pub const REMOVE_IF_EXPIRED: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) <= now then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
"#;

/// Is a node's lease expired by Redis `TIME`? 1 if expired (and present).
/// An expired lease is never renewed (see [`RENEW`]), so a reaper that saw
/// 1 here can go on safely. `KEYS[1]` = nodes; `ARGV[1]` = node id.
pub const IS_EXPIRED: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) <= now then return 1 end
return 0
"#;

/// Take or renew a named lease (router lease, reap lock).
/// `KEYS[1]` = lease key; `ARGV` = holder, ttl ms. Returns 1 if held.
pub const LEASE_ACQUIRE: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
elseif v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// Renew a named lease only if still held. Returns 1 if renewed.
pub const LEASE_RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// Release a named lease if held. `KEYS[1]` = key; `ARGV[1]` = holder.
pub const LEASE_RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// The body shared by [`REGISTER`] and [`TAKE_MAILBOX`]: take one page of
/// the mailbox (`KEYS[2]`; `ARGV[3]` = ttl ms, `ARGV[4]` = page size).
/// Taken entries move to the connection's taking stream (`KEYS[3]`) until
/// it has written them; the mailbox key goes when empty; expired entries
/// are dropped. `ARGV[5]` = 1: return what the taking stream already held
/// first (see the script). Returns `{more, entries}`.
macro_rules! take_page {
    () => {
        r#"
-- With ARGV[5] = 1, what an earlier take moved to KEYS[3] and the
-- connection has not written yet comes back too: that take's reply may have
-- been lost (a dropped connection), and a page must not vanish with it.
-- Clients drop duplicates by id.
local prior = {}
if ARGV[5] == '1' then prior = redis.call('XRANGE', KEYS[3], '-', '+') end
local entries = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', tonumber(ARGV[4]))
if #entries == 0 then return {0, prior} end
local ids = {}
for i, e in ipairs(entries) do ids[i] = e[1] end
redis.call('XDEL', KEYS[2], unpack(ids))
-- Keep a copy until the connection has written them (KEYS[3]).
for _, e in ipairs(entries) do
  redis.call('XADD', KEYS[3], '*', unpack(e[2]))
end
redis.call('PEXPIRE', KEYS[3], ARGV[3])
local more = 1
if redis.call('XLEN', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[2])
  more = 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local min = now - tonumber(ARGV[3])
local out = prior
for _, e in ipairs(entries) do
  local ms = tonumber(string.match(e[1], '^(%d+)'))
  if ms and ms >= min then out[#out + 1] = e end
end
return {more, out}
"#
    };
}

/// Register a connection and take the first page of the user's mailbox, in
/// one step: any message routed after this finds the connection, and every
/// message mailboxed before it is taken (once) here or by [`TAKE_MAILBOX`].
/// Pages keep replies small: a huge reply would stall the shared connection.
/// `KEYS` = user hash, mailbox, taking; `ARGV` = conn id, node id, ttl ms,
/// page size, include earlier takes (1/0).
pub const REGISTER: &str = concat!(
    "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])\n",
    take_page!()
);

/// Take the next page of a mailbox. `KEYS` = user hash (unused; it keeps
/// the call in the user's slot), mailbox, taking; `ARGV` = -, -, ttl ms,
/// page size, include earlier takes (1/0).
pub const TAKE_MAILBOX: &str = take_page!();

/// Add to the mailbox only if the user has no live connection: "no live
/// connection" and "add" are one step, so a message can never land in the
/// mailbox of a user who has just connected.
/// `KEYS` = user hash, mailbox; `ARGV` = force (1: add even if online),
/// max, ttl ms, n, n non-live node ids, then the entry's field/value pairs.
/// Returns `{1}` when added, or `{0, node, ...}`: the live nodes found.
pub const MAILBOX: &str = r#"
local force = ARGV[1] == '1'
local n = tonumber(ARGV[4])
if not force then
  local dead = {}
  for i = 1, n do dead[ARGV[4 + i]] = true end
  local conns = redis.call('HGETALL', KEYS[1])
  local live, seen = {0}, {}
  for i = 2, #conns, 2 do
    local node = conns[i]
    if not dead[node] and not seen[node] then
      seen[node] = true
      live[#live + 1] = node
    end
  end
  if #live > 1 then return live end
end
local args = {'XADD', KEYS[2], 'MAXLEN', ARGV[2], '*'}
for i = 5 + n, #ARGV do args[#args + 1] = ARGV[i] end
redis.call(unpack(args))
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('XTRIM', KEYS[2], 'MINID', tostring(now - tonumber(ARGV[3])))
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return {1}
"#;

/// Remove a connection from its user's hash only if it still names this
/// node (it may have been re-registered under a node's new id).
/// `KEYS[1]` = user hash; `ARGV` = conn id, node id.
pub const UNREGISTER_IF: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"#;

/// Delete an inbox (and its connection index) only when it is drained, in
/// the same step that finds it empty: routing never recreates an inbox
/// (`NOMKSTREAM`), so nothing can be left in a deleted one.
/// `KEYS` = inbox, node conns index. Returns 1 if deleted, 0 if not empty.
pub const DELETE_IF_DRAINED: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('XLEN', KEYS[1]) > 0 then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"#;

/// An `EVAL` command to send alone (in a pipeline: [`Batch::eval`]).
/// Refused if its keys span hash slots, on a single Redis too, so no such
/// call can pass the tests and then fail on Redis Cluster.
///
/// [`Batch::eval`]: crate::bus::conn::Batch::eval
pub fn eval_cmd(script: &str, keys: &[&str]) -> Result<redis::Cmd, redis::RedisError> {
    if !crate::bus::conn::one_slot(keys) {
        return Err(crate::bus::conn::cross_slot(keys));
    }
    let mut c = redis::cmd("EVAL");
    c.arg(script).arg(keys.len()).arg(keys);
    Ok(c)
}

/// Release a named lease (router, reap lock) if `holder` holds it. 1 if
/// released.
pub async fn release_lease(
    conn: &mut crate::bus::conn::Conn,
    key: &str,
    holder: &str,
) -> Result<i64, redis::RedisError> {
    eval_cmd(LEASE_RELEASE, &[key])?
        .arg(holder)
        .query_async(conn)
        .await
}

/// Renew a named lease if `holder` holds it. 1 if renewed.
pub async fn renew_lease(
    conn: &mut crate::bus::conn::Conn,
    key: &str,
    holder: &str,
    ttl_ms: u64,
) -> Result<i64, redis::RedisError> {
    eval_cmd(LEASE_RENEW, &[key])?
        .arg(holder)
        .arg(ttl_ms)
        .query_async(conn)
        .await
}
