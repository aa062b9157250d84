//! The Lua scripts: everything that must be atomic.
//!
//! Each script touches keys of one hash slot only (contract §5), so the same
//! scripts serve Redis Cluster. Scripts that keep the cluster alive or only
//! free memory (leases, locks, registering, deleting) carry `allow-oom`: with
//! Redis at `maxmemory` and `noeviction` they still run, while adding
//! messages fails and is retried (nothing accepted is dropped). Time always
//! comes from Redis `TIME`, never a node's clock. Scripts are sent with
//! `EVAL` (Redis caches the compiled script by its hash), which keeps
//! pipelines simple and survives a Redis restart that emptied the script
//! cache. Pipelined scripts (the hot path, [`Batch::eval`]) go by `EVALSHA`:
//! Redis neither receives nor hashes the body per call. Every script is
//! loaded when a connection is made and when the node joins (a Redis
//! restarted empty makes it join again); a batch that still meets `NOSCRIPT`
//! (a failover to a replica) loads them and fails once, like any Redis error,
//! for its caller to retry.
//!
//! [`Batch::eval`]: super::conn::Batch::eval

/// Join: `KEYS[1]` = nodes; `ARGV` = node id, lease ttl ms.
/// Returns `{expiry, now}`.
pub const JOIN: &str = r#"#!lua flags=allow-oom
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
pub const RENEW: &str = r#"#!lua flags=allow-oom
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
pub const EXPIRE_NOW: &str = r#"#!lua flags=allow-oom
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], 'XX', now - 1, ARGV[1])
end
return now
"#;

/// Remove a node's member, only if its lease has expired (a reaper never
/// removes a live node). `KEYS[1]` = nodes; `ARGV[1]` = node id.
pub const REMOVE_IF_EXPIRED: &str = r#"#!lua flags=allow-oom
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
pub const IS_EXPIRED: &str = r#"#!lua flags=allow-oom
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) <= now then return 1 end
return 0
"#;

/// Take or renew a named lease (router lease, reap lock).
/// `KEYS[1]` = lease key; `ARGV` = holder, ttl ms. Returns 1 if held.
pub const LEASE_ACQUIRE: &str = r#"#!lua flags=allow-oom
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
pub const LEASE_RENEW: &str = r#"#!lua flags=allow-oom
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// Release a named lease if held. `KEYS[1]` = key; `ARGV[1]` = holder.
pub const LEASE_RELEASE: &str = r#"#!lua flags=allow-oom
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// Helpers shared by the mailbox scripts. A mailbox (`KEYS[2]`) is a stream
/// of internal entries; `KEYS[3]` counts the payload bytes it holds, so
/// `--mailbox-max-bytes` can be kept without reading the whole stream.
/// `trim` drops expired entries (older than `minid` ms), then the oldest
/// while over `max` entries or `maxbytes`; it returns how many it dropped
/// for the caps (expiry is not counted). An empty mailbox leaves no key.
macro_rules! mailbox_lib {
    () => {
        r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function payload_len(f)
  for i = 1, #f, 2 do
    if f[i] == 'payload' then return #f[i + 1] end
  end
  return 0
end
local function trim(minid, max, maxbytes)
  local bytes = tonumber(redis.call('GET', KEYS[3]) or '0') or 0
  local len = redis.call('XLEN', KEYS[2])
  if bytes > maxbytes then
    -- Count again before dropping anything: a node of the previous
    -- release takes entries without keeping the count (rolling upgrade).
    bytes = 0
    for _, e in ipairs(redis.call('XRANGE', KEYS[2], '-', '+')) do
      bytes = bytes + payload_len(e[2])
    end
    redis.call('SET', KEYS[3], bytes, 'KEEPTTL')
  end
  local dropped, freed = 0, 0
  while len > 0 do
    local e = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
    if not e then break end
    local ms = tonumber(string.match(e[1], '^(%d+)')) or 0
    if not (ms < minid or len > max or bytes > maxbytes) then break end
    redis.call('XDEL', KEYS[2], e[1])
    local n = payload_len(e[2])
    bytes = bytes - n
    freed = freed + n
    len = len - 1
    if ms >= minid then dropped = dropped + 1 end
  end
  if len == 0 then
    redis.call('DEL', KEYS[2], KEYS[3])
  elseif freed > 0 then
    if bytes < 0 then bytes = 0 end
    redis.call('SET', KEYS[3], bytes, 'KEEPTTL')
  end
  return dropped
end
-- Delete entries a connection has written: ids in ARGV[from..].
local function forget(from)
  local bytes = tonumber(redis.call('GET', KEYS[3]) or '0') or 0
  local freed = 0
  for i = from, #ARGV do
    local e = redis.call('XRANGE', KEYS[2], ARGV[i], ARGV[i])[1]
    if e then
      redis.call('XDEL', KEYS[2], ARGV[i])
      freed = freed + payload_len(e[2])
    end
  end
  if redis.call('XLEN', KEYS[2]) == 0 then
    redis.call('DEL', KEYS[2], KEYS[3])
  elseif freed > 0 then
    bytes = bytes - freed
    if bytes < 0 then bytes = 0 end
    redis.call('SET', KEYS[3], bytes, 'KEEPTTL')
  end
end
-- One page after `after` ('-' for the start, else '(<id>'), and whether
-- more follow. Entries stay in the mailbox until written (see `forget`).
local function page(after, size, ttl)
  trim(now_ms() - ttl, math.huge, math.huge)
  local e = redis.call('XRANGE', KEYS[2], after, '+', 'COUNT', size + 1)
  local more = 0
  if #e > size then
    more = 1
    e[#e] = nil
  end
  return {more, e}
end
"#
    };
}

/// The user's history position (contract §9), used by [`REGISTER`] and
/// [`ROUTE`]: `KEYS[sk]` is the seq hash (`epoch`, `seq`), `KEYS[hk]` the
/// history. A missing hash means the counter starts again: a new epoch
/// (the caller's random `candidate`) and no history from before it. The
/// hash lives `ttl` ms past the last message or connect.
macro_rules! history_lib {
    () => {
        r#"
local function position(sk, hk, candidate, ttl, more)
  local p = redis.call('HMGET', KEYS[sk], 'epoch', 'seq', more or 'seq')
  local epoch, seq = p[1], tonumber(p[2] or '0') or 0
  if not epoch or epoch == '' then
    epoch, seq, p[3] = candidate, 0, false
    redis.call('DEL', KEYS[hk])
    redis.call('HSET', KEYS[sk], 'epoch', epoch, 'seq', 0)
  end
  redis.call('PEXPIRE', KEYS[sk], ttl)
  return epoch, seq, p[3]
end
"#
    };
}

/// A user's presence (contract §10) in `KEYS[pk]`: the last transition
/// (`state` on/off, its `n`, `conn`, `node`, `at`) and `pend` until its
/// event is known to be in `<p>:events` ([`CONFIRM_EVENT`]). Deciding the
/// transition here, in the user's slot, makes online/offline alternate per
/// user whichever nodes race; whoever decides the next transition while
/// one is pending emits the pending one again first, so the first copy of
/// each event always precedes the next (repeats are harmless: same `n`).
/// `n` grows by at least one per transition and is at least Redis `TIME`
/// in ms, so it keeps growing even after the hash expired.
/// `presence(pk, on, conn, node, ttl)` returns the events to emit, flat:
/// type, conn, node, at, n for each.
macro_rules! presence_lib {
    () => {
        r#"
local function pending_event(p)
  if p[6] ~= '1' then return {} end
  return {p[1] == 'on' and 'online' or 'offline', p[3] or '', p[4] or '', p[5] or '0', p[2] or '0'}
end
local function presence(pk, on, conn, node, ttl)
  local p = redis.call('HMGET', KEYS[pk], 'state', 'n', 'conn', 'node', 'at', 'pend')
  local out = pending_event(p)
  if (p[1] == 'on') == on then return out end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local n = string.format('%.0f', math.max((tonumber(p[2] or '0') or 0) + 1, now))
  local at = string.format('%.0f', now)
  local state = on and 'on' or 'off'
  redis.call('HSET', KEYS[pk], 'state', state, 'n', n, 'conn', conn, 'node', node, 'at', at, 'pend', '1')
  if on then redis.call('PERSIST', KEYS[pk]) else redis.call('PEXPIRE', KEYS[pk], ttl) end
  for _, v in ipairs({on and 'online' or 'offline', conn, node, at, n}) do out[#out + 1] = v end
  return out
end
"#
    };
}

/// The event of transition `n` is in the events stream: clear `pend`,
/// unless a later transition was decided meanwhile (it has its own).
/// `KEYS[1]` = presence; `ARGV[1]` = n.
pub const CONFIRM_EVENT: &str = r#"#!lua flags=allow-oom
if redis.call('HGET', KEYS[1], 'n') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'pend')
end
return 0
"#;

/// A user marked online with no connection left (its last one was removed
/// by a node of an earlier release, which knows nothing of presence, or
/// an event was lost with every node that knew of it): offline now, with
/// the recorded connection. `KEYS` = user hash, presence; `ARGV[1]` =
/// presence ttl ms. Returns the events to emit.
pub const SETTLE_PRESENCE: &str = concat!(
    "#!lua flags=allow-oom\n",
    presence_lib!(),
    r#"
local p = redis.call('HMGET', KEYS[2], 'state', 'n', 'conn', 'node', 'at', 'pend')
if p[1] ~= 'on' or redis.call('EXISTS', KEYS[1]) == 1 then return pending_event(p) end
return presence(2, false, p[3] or '', p[4] or '', tonumber(ARGV[1]) or 86400000)
"#
);

/// Keep a user's state in the online set from one of its events, unless a
/// later one is already there (events from several nodes may arrive out
/// of order; `n` orders them). Offline members older than a day go.
/// `KEYS[1]` = online set; `ARGV` = user, n, 1 (online) or 0.
pub const ONLINE_MARK: &str = r#"#!lua flags=allow-oom
local n = tonumber(ARGV[2])
local cur = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if cur and math.abs(cur) >= n then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3] == '1' and ARGV[2] or ('-' .. ARGV[2]), ARGV[1])
local t = redis.call('TIME')
local day_ago = tonumber(t[1]) * 1000 - 86400000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '(-' .. string.format('%.0f', day_ago), '-1')
return 1
"#;

/// Register a connection and read the first page of the user's mailbox, in
/// one step: any message routed after this finds the connection, and every
/// message mailboxed before it is in the mailbox this reads. Read entries
/// stay in the mailbox until the connection has written them
/// ([`TAKE_MAILBOX`] deletes them then), so no lost reply, closed socket or
/// dead node can lose them. Pages keep replies small.
///
/// With history on it also reads the user's position, and answers a resume
/// (contract §9) in the same step: every message after `since` from the
/// history, or why not. A message routed after this step has a higher
/// `seq` and reaches the connection live; one before it is in the replay.
/// The user's first connection makes it online (contract §10).
/// A close the app asked for while the connection's node was being reaped
/// waits in the closes hash (until it expires); registering that
/// connection again returns it, as often as it is registered.
/// `KEYS` = user hash, mailbox, mailbox bytes, seq hash, history, presence,
/// closes;
/// `ARGV` = conn id, node id, mailbox ttl ms, page size, candidate epoch
/// (`''`: history off), since (`''`: no resume), epoch asked.
/// Returns `{more, entries, epoch, seq, recovered, replay, events, close}`
/// (close: `"code:reason"` or `''`):
/// recovered is -1 (no resume asked), 0 or 1; events as `presence` gives
/// them.
pub const REGISTER: &str = concat!(
    "#!lua flags=allow-oom\n",
    mailbox_lib!(),
    history_lib!(),
    presence_lib!(),
    r#"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local events = presence(6, true, ARGV[1], ARGV[2], tonumber(ARGV[3]))
local pg = page('-', tonumber(ARGV[4]), tonumber(ARGV[3]))
local epoch, seq = '', 0
if ARGV[5] ~= '' then
  epoch, seq = position(4, 5, ARGV[5], tonumber(ARGV[3]))
end
local rec, replay = -1, {}
if ARGV[6] ~= '' then
  rec = 0
  local since = tonumber(ARGV[6])
  if epoch ~= '' and since and ARGV[7] == epoch and since <= seq then
    if since == seq then
      rec = 1
    else
      local h = redis.call('XRANGE', KEYS[5], '0-' .. (since + 1), '+')
      if #h > 0 and h[1][1] == '0-' .. (since + 1) and h[#h][1] == '0-' .. seq then
        rec, replay = 1, h
      end
    end
  end
end
-- Left in place (it expires): if this reply is lost, the registration
-- is sent again and must find the close again.
local close = redis.call('HGET', KEYS[7], ARGV[1]) or ''
return {pg[1], pg[2], epoch, seq, rec, replay, events, close}
"#
);

/// Delete the mailbox entries a connection has written, then read the next
/// page after the last one it read (page size 0: only delete).
/// `KEYS` = user hash (unused; it keeps the call in the user's slot),
/// mailbox, mailbox bytes; `ARGV` = ttl ms, page size, after ('-' or
/// '(<id>'), then the ids to delete. Returns `{more, entries}`.
pub const TAKE_MAILBOX: &str = concat!(
    "#!lua flags=allow-oom\n",
    mailbox_lib!(),
    "forget(4)\n",
    "if tonumber(ARGV[2]) == 0 then return {0, {}} end\n",
    "return page(ARGV[3], tonumber(ARGV[2]), tonumber(ARGV[1]))\n"
);

/// Add to the mailbox only if the user has no live connection: "no live
/// connection" and "add" are one step, so a message can never land in the
/// mailbox of a user who has just connected. The oldest entries go first
/// when over `--mailbox-max` entries or `--mailbox-max-bytes`.
/// `KEYS` = user hash, mailbox, mailbox bytes; `ARGV` = force (1: add even
/// if online), max, ttl ms, max bytes, n, n non-live node ids, then the
/// entry's field/value pairs. Returns `{1, dropped, node, ...}` when added
/// (forced while the user is online: the nodes to tell), or
/// `{0, node, ...}`: the live nodes found.
pub const MAILBOX: &str = concat!(
    mailbox_lib!(),
    r#"
local force = ARGV[1] == '1'
local n = tonumber(ARGV[5])
local dead = {}
for i = 1, n do dead[ARGV[5 + i]] = true end
local conns = redis.call('HGETALL', KEYS[1])
local live, seen = {}, {}
for i = 2, #conns, 2 do
  local node = conns[i]
  if not dead[node] and not seen[node] then
    seen[node] = true
    live[#live + 1] = node
  end
end
if not force and #live > 0 then return {0, unpack(live)} end
-- An empty mailbox holds no bytes, whatever a count left by a node of the
-- previous release (which deletes entries without counting) says.
if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('DEL', KEYS[3]) end
local args = {'XADD', KEYS[2], '*'}
local size = 0
for i = 6 + n, #ARGV, 2 do
  args[#args + 1] = ARGV[i]
  args[#args + 1] = ARGV[i + 1]
  if ARGV[i] == 'payload' then size = #ARGV[i + 1] end
end
redis.call(unpack(args))
local ttl = tonumber(ARGV[3])
redis.call('INCRBY', KEYS[3], size)
local dropped = trim(now_ms() - ttl, tonumber(ARGV[2]), tonumber(ARGV[4]))
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
return {1, dropped, unpack(live)}
"#
);

/// Number a user's messages and find the user's connections, in one step
/// (contract §9): each message gets the next `seq` of the user's epoch and
/// joins the capped, expiring history; the reply names the connections a
/// message with that `seq` must reach. An `idem` key already holding
/// another message's id makes the message a duplicate (contract §4). A
/// message that may have been routed before gets the `seq` it was given
/// then, found in the history: a message never has two. "May have been":
/// claimed from a pending list (`repeat`), or not newer than the newest
/// send-stream id numbered from its stream (`last<shard prefix>` in the seq
/// hash). The second catches what no flag can: a router frozen between
/// reading a batch and numbering it, whose successor claimed and numbered
/// the batch meanwhile, and a batch sent again after a lost reply.
/// `KEYS` = user hash, seq hash, history, then one idem key per message
/// that has one; `ARGV` = candidate epoch, history size, history ttl ms,
/// seq ttl ms, idem ttl ms, n, then per message: id, its flags (8 × field
/// count + 4 if it follows the previous message in its send stream + 2 if
/// it has an idem key + 1 if it may be a repeat: one argument, not four —
/// every argument is a Lua string to make), its fields but the id (the
/// script adds it). "Follows": same stream, a greater id, neither a
/// repeat; such a message is newer than every numbered id whenever the
/// previous one was, so only the first of a run is parsed and compared
/// (issue 14: the comparison per message was a quarter of its cost).
/// Returns `{conns, results, epoch}`: conns as `HGETALL` gives them; per
/// message its `seq` (0: history off) or -1 (a duplicate).
pub const ROUTE: &str = concat!(
    history_lib!(),
    r#"
local conns = redis.call('HGETALL', KEYS[1])
local size = tonumber(ARGV[2])
local epoch, seq = '', 0
-- The newest stream id numbered per stream (shard prefix), as
-- {ms, seq} digit strings, compared as numbers of any length; the first
-- message's stream read with the position (all of a batch's, usually).
local lasts, moved = {}, {}
local function parse_last(l)
  local ms, sq = string.match(l or '', '^(%d+)%-(%d+)$')
  return ms and {ms, sq} or false
end
if size > 0 then
  local pre = string.match(ARGV[7] or '', '^(.-)%d+%-%d+$') or ''
  local l
  epoch, seq, l = position(2, 3, ARGV[1], tonumber(ARGV[4]), 'last' .. pre)
  lasts[pre] = parse_last(l)
end
local seen = nil
local function routed_before(id)
  if not seen then
    seen = {}
    for _, e in ipairs(redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', size)) do
      local f = e[2]
      for j = 1, #f, 2 do
        if f[j] == 'id' then seen[f[j + 1]] = tonumber(string.match(e[1], '%-(%d+)$')) end
      end
    end
  end
  return seen[id]
end
local function newest(pre)
  if lasts[pre] == nil then
    lasts[pre] = parse_last(redis.call('HGET', KEYS[2], 'last' .. pre))
  end
  return lasts[pre]
end
local function greater(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
-- Whether `id` is newer than every id numbered from its stream; if so it
-- becomes the newest.
local function fresh(id)
  local pre, ms, sq = string.match(id, '^(.-)(%d+)%-(%d+)$')
  if not pre then return true end
  local l = newest(pre)
  if l and not (greater(ms, l[1]) or (ms == l[1] and greater(sq, l[2]))) then
    return false
  end
  lasts[pre] = {ms, sq}
  moved[pre] = true
  return true
end
-- The newest id of a run judged fresh by order alone: `lasts` moves to
-- it before the next comparison and at the end.
local tail = nil
local function settle()
  if tail then
    local t = tail
    tail = nil
    fresh(t)
  end
end
local res = {}
local i, k, added, prev_fresh = 7, 4, false, false
for m = 1, tonumber(ARGV[6]) do
  local id, flags = ARGV[i], tonumber(ARGV[i + 1])
  local rep, has_idem, nf = flags % 2 == 1, flags % 4 >= 2, math.floor(flags / 8)
  local follows = prev_fresh and flags % 8 >= 4
  prev_fresh = false
  local from = i + 2
  i = from + nf
  local out = nil
  if has_idem then
    local prev = redis.call('GET', KEYS[k])
    if prev and prev ~= id then
      out = -1
    elseif not prev then
      redis.call('SET', KEYS[k], id, 'PX', ARGV[5])
    else
      rep = true
    end
    k = k + 1
  end
  if not out and size > 0 then
    if follows then
      tail = id
    else
      settle()
      if not fresh(id) then rep = true end
    end
    prev_fresh = not rep
    if rep then out = routed_before(id) end
  end
  if not out then
    if size > 0 then
      seq = seq + 1
      out = seq
      -- Capped in the same call; the fields straight from ARGV. Numbers
      -- as strings made once: each number Redis gets from Lua is a printf.
      local s = tostring(seq)
      local hid = '0-' .. s
      local r = redis.pcall('XADD', KEYS[3], 'MAXLEN', ARGV[2], hid, 'seq', s, 'epoch', epoch, 'id', id, unpack(ARGV, from, i - 1))
      if type(r) == 'table' and r.err then
        -- Ids out of step with the counter (Redis lost writes): the
        -- history cannot be trusted any more; start it again.
        redis.call('DEL', KEYS[3])
        redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[2], hid, 'seq', s, 'epoch', epoch, 'id', id, unpack(ARGV, from, i - 1))
      end
      added = true
    else
      out = 0
    end
  end
  res[m] = out
end
settle()
if added then
  local f = {'seq', seq}
  for pre in pairs(moved) do
    f[#f + 1] = 'last' .. pre
    f[#f + 1] = lasts[pre][1] .. '-' .. lasts[pre][2]
  end
  redis.call('HSET', KEYS[2], unpack(f))
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
end
return {conns, res, epoch}
"#
);

/// Remove a connection from its user's hash only if it still names this
/// node (it may have been re-registered under a node's new id). The last
/// connection gone makes the user offline (contract §10); connections on
/// nodes not yet reaped still count, until their reaper removes them.
/// `KEYS` = user hash, presence; `ARGV` = conn id, node id, presence ttl
/// ms. Returns the events to emit (see `presence`).
pub const UNREGISTER_IF: &str = concat!(
    "#!lua flags=allow-oom\n",
    presence_lib!(),
    r#"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return presence(2, false, ARGV[1], ARGV[2], tonumber(ARGV[3]) or 86400000)
end
return pending_event(redis.call('HMGET', KEYS[2], 'state', 'n', 'conn', 'node', 'at', 'pend'))
"#
);

/// Delete the consumers of a group that hold nothing pending and have been
/// idle at least `ARGV[3]` ms, but `ARGV[2]` (the caller): every node id
/// that ever routed leaves one. Checked and deleted in one step, so a
/// consumer's pending entries are never dropped with it (they would be
/// stranded: never claimed, never acknowledged).
/// `KEYS[1]` = stream; `ARGV` = group, keep, min idle ms. Returns how many.
pub const DEL_IDLE_CONSUMERS: &str = r#"
local n = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['name'] ~= ARGV[2] and tonumber(f['pending']) == 0
      and tonumber(f['idle']) >= tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    n = n + 1
  end
end
return n
"#;

/// Delete an inbox (and its connection index) only when it is drained, in
/// the same step that finds it empty: routing never recreates an inbox
/// (`NOMKSTREAM`), so nothing can be left in a deleted one.
/// `KEYS` = inbox, node conns index. Returns 1 if deleted, 0 if not empty.
pub const DELETE_IF_DRAINED: &str = r#"#!lua flags=allow-oom
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('XLEN', KEYS[1]) > 0 then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"#;

/// Delete every routed entry of a send stream: those older than both the
/// oldest entry still pending in the router group and the first the group
/// has not read. Run after `XACK`: one trim instead of an `XDEL` per id,
/// each of which seeks its id and walks its stream node (issue 16); and
/// it decides from the group's state alone, so a trim that failed is made
/// up by the next. Entries a router still holds and unread ones stay.
/// `KEYS[1]` = send stream; `ARGV[1]` = group. Returns how many went.
pub const TRIM_ROUTED: &str = r#"#!lua flags=allow-oom
-- No stream or no group (Redis emptied, the router not back yet): nothing
-- to trim, and no error to fail the acknowledgement round it is part of.
local p = redis.pcall('XPENDING', KEYS[1], ARGV[1])
if p.err then return 0 end
local keep = nil
if tonumber(p[1]) > 0 then
  keep = p[2]
else
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local f = {}
    for j = 1, #g, 2 do f[g[j]] = g[j + 1] end
    if f['name'] == ARGV[1] then
      local ms, sq = string.match(f['last-delivered-id'] or '', '^(%d+)%-(%d+)$')
      local n = tonumber(sq or '')
      if n and n < 2^53 then keep = ms .. '-' .. string.format('%.0f', n + 1) end
    end
  end
end
if keep then return redis.call('XTRIM', KEYS[1], 'MINID', keep) end
return 0
"#;

/// Add a batch's entries to one inbox in one step. Redis serves a reader
/// blocked on a stream after each command of a pipeline, so pipelined
/// `XADD`s wake the node's inbox reader for the first entry alone and again
/// for the rest; added together, they are read in one wake-up (issue 16).
/// Never creates the inbox (`NOMKSTREAM`, contract §6): a missing inbox adds
/// nothing. `KEYS[1]` = inbox; `ARGV` = per entry its field count, then its
/// fields. Returns 1 if added, 0 if the inbox is gone.
pub const INBOX_ADD: &str = r#"
local i = 1
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  if not redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', unpack(ARGV, i + 1, i + n)) then
    return 0
  end
  i = i + n + 1
end
return 1
"#;

/// Every script, for [`load_all`].
pub const ALL: &[&str] = &[
    INBOX_ADD,
    TRIM_ROUTED,
    JOIN,
    RENEW,
    EXPIRE_NOW,
    REMOVE_IF_EXPIRED,
    IS_EXPIRED,
    LEASE_ACQUIRE,
    LEASE_RENEW,
    LEASE_RELEASE,
    CONFIRM_EVENT,
    SETTLE_PRESENCE,
    ONLINE_MARK,
    REGISTER,
    TAKE_MAILBOX,
    MAILBOX,
    ROUTE,
    UNREGISTER_IF,
    DEL_IDLE_CONSUMERS,
    DELETE_IF_DRAINED,
];

/// The SHA1 Redis knows `script` by, computed once per script: the hot
/// path sends one `EVALSHA` per user per batch, and hashing (or even
/// looking up by) a 2 KB body each time was ~3 % of a node's instructions
/// (issue 16). Scripts are `'static`, so their address is their key: the
/// same address always holds the same text. The map holds one entry per
/// script constant, leaked once each.
pub fn sha(script: &'static str) -> &'static str {
    use std::collections::HashMap;
    use std::sync::{OnceLock, RwLock};
    type Shas = RwLock<HashMap<(usize, usize), &'static str>>;
    static SHAS: OnceLock<Shas> = OnceLock::new();
    let key = (script.as_ptr() as usize, script.len());
    let map = SHAS.get_or_init(Shas::default);
    if let Some(s) = map.read().ok().and_then(|m| m.get(&key).copied()) {
        return s;
    }
    let s: &'static str = Box::leak(
        sha1_smol::Sha1::from(script)
            .digest()
            .to_string()
            .into_boxed_str(),
    );
    match map.write() {
        Ok(mut m) => m.entry(key).or_insert(s),
        Err(_) => s,
    }
}

/// Load every script into Redis (every primary of a cluster), so that
/// `EVALSHA` finds them.
pub async fn load_all(conn: &mut impl redis::aio::ConnectionLike) -> Result<(), redis::RedisError> {
    for script in ALL {
        let _: redis::Value = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(*script)
            .query_async(conn)
            .await?;
    }
    Ok(())
}

/// An `EVAL` command to send alone (in a pipeline: [`Batch::eval`]).
/// Refused if its keys span hash slots, on a single Redis too, so no such
/// call can pass the tests and then fail on Redis Cluster.
///
/// [`Batch::eval`]: super::conn::Batch::eval
pub fn eval_cmd(script: &str, keys: &[&str]) -> Result<redis::Cmd, redis::RedisError> {
    if !super::slots::one_slot(keys) {
        return Err(super::slots::cross_slot(keys));
    }
    let mut c = redis::cmd("EVAL");
    c.arg(script).arg(keys.len()).arg(keys);
    Ok(c)
}

/// Release a named lease (router, reap lock) if `holder` holds it. 1 if
/// released.
pub async fn release_lease(
    conn: &mut impl redis::aio::ConnectionLike,
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
    conn: &mut impl redis::aio::ConnectionLike,
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

#[cfg(test)]
mod tests {
    /// A fresh `redis-server` (stopped when the first value drops) and a
    /// connection to it.
    async fn redis_conn(
        name: &str,
    ) -> (
        wscluster_testkit::RedisServer,
        redis::aio::MultiplexedConnection,
    ) {
        let dir = wscluster_testkit::tmpdir(name).unwrap();
        let redis = wscluster_testkit::RedisServer::start(&dir).unwrap();
        let client = redis::Client::open(redis.url()).unwrap();
        let c = client.get_multiplexed_async_connection().await.unwrap();
        (redis, c)
    }

    /// Run a command whose reply does not matter.
    async fn run(c: &mut redis::aio::MultiplexedConnection, args: &[&str]) {
        let mut cmd = redis::cmd(args[0]);
        cmd.arg(&args[1..]);
        let _: redis::Value = cmd.query_async(c).await.unwrap();
    }

    /// `ROUTE` on messages `(id, repeat)` of user `{a}`: their seqs.
    async fn route(c: &mut redis::aio::MultiplexedConnection, msgs: &[(&str, bool)]) -> Vec<i64> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(super::ROUTE)
            .arg(3)
            .arg(&["u:{a}", "s:{a}", "h:{a}"])
            .arg(&["epoch-1", "200", "60000", "60000", "60000"])
            .arg(msgs.len());
        let mut prev: Option<(&str, bool)> = None;
        for &(id, repeat) in msgs {
            // Two fields (8 × 2), no idem key, maybe a repeat, "follows"
            // as the router judges it.
            let follows =
                prev.is_some_and(|(p, prep)| !prep && !repeat && crate::stream::id_follows(p, id));
            cmd.arg(id)
                .arg(16 + 4 * u8::from(follows) + u8::from(repeat))
                .arg(&["payload", "1"]);
            prev = Some((id, repeat));
        }
        let (_, seqs, _): (redis::Value, Vec<i64>, String) = cmd.query_async(c).await.unwrap();
        seqs
    }

    /// Acknowledging trims exactly what is routed: never an entry still
    /// pending (a frozen router's batch) or not read yet.
    #[tokio::test]
    async fn acknowledging_trims_only_what_is_routed() {
        let (_redis, mut c) = redis_conn("lua-ack").await;
        let ids: Vec<String> = (1..=6).map(|i| format!("5-{i}")).collect();
        for id in &ids {
            let _: String = redis::cmd("XADD")
                .arg("s")
                .arg(id)
                .arg("f")
                .arg("v")
                .query_async(&mut c)
                .await
                .unwrap();
        }
        // No group yet: nothing trimmed, no error.
        let trimmed: i64 = redis::cmd("EVAL")
            .arg(super::TRIM_ROUTED)
            .arg(1)
            .arg("s")
            .arg("g")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(trimmed, 0);
        run(&mut c, &["XGROUP", "CREATE", "s", "g", "0"]).await;
        let read = |consumer: &'static str, n: usize| {
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg("g")
                .arg(consumer)
                .arg("COUNT")
                .arg(n)
                .arg("STREAMS")
                .arg("s")
                .arg(">");
            cmd
        };
        let remaining = |c: &mut redis::aio::MultiplexedConnection| {
            let mut c = c.clone();
            async move {
                let v: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                    .arg("s")
                    .arg("-")
                    .arg("+")
                    .query_async(&mut c)
                    .await
                    .unwrap();
                v.into_iter().map(|(id, _)| id).collect::<Vec<_>>()
            }
        };
        let ack = |ids: &[&str]| {
            let mut pipe = redis::pipe();
            pipe.cmd("XACK").arg("s").arg("g").arg(ids).ignore();
            pipe.cmd("EVAL")
                .arg(super::TRIM_ROUTED)
                .arg(1)
                .arg("s")
                .arg("g");
            pipe
        };
        // A frozen router holds 5-1; the live one reads 5-2..5-4.
        let _: redis::Value = read("frozen", 1).query_async(&mut c).await.unwrap();
        let _: redis::Value = read("live", 3).query_async(&mut c).await.unwrap();
        let _: (i64,) = ack(&["5-2", "5-3", "5-4"])
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(remaining(&mut c).await, ids);
        // Claimed and routed: everything read goes, the unread stay.
        let _: (i64,) = ack(&["5-1"]).query_async(&mut c).await.unwrap();
        assert_eq!(remaining(&mut c).await, ["5-5", "5-6"]);
        // Read both, route the newer first: the older still holds both.
        let _: redis::Value = read("live", 2).query_async(&mut c).await.unwrap();
        let _: (i64,) = ack(&["5-6"]).query_async(&mut c).await.unwrap();
        assert_eq!(remaining(&mut c).await, ["5-5", "5-6"]);
        let _: (i64,) = ack(&["5-5"]).query_async(&mut c).await.unwrap();
        assert!(remaining(&mut c).await.is_empty());
    }

    /// A close waiting for a connection's re-registration survives a lost
    /// reply: the registration sent again gets it too.
    #[tokio::test]
    async fn a_pending_close_outlives_a_lost_register_reply() {
        let (_redis, mut c) = redis_conn("lua-register").await;
        run(&mut c, &["HSET", "closes:{a}", "conn-1", "4003:bye"]).await;
        for _ in 0..2 {
            let reply: Vec<redis::Value> = redis::cmd("EVAL")
                .arg(super::REGISTER)
                .arg(7)
                .arg(&[
                    "user:{a}",
                    "mailbox:{a}",
                    "bytes:{a}",
                    "seq:{a}",
                    "history:{a}",
                    "presence:{a}",
                    "closes:{a}",
                ])
                .arg(&["conn-1", "node-2", "60000", "100", "epoch-1", "", ""])
                .query_async(&mut c)
                .await
                .unwrap();
            assert_eq!(
                reply.get(7),
                Some(&redis::Value::BulkString(b"4003:bye".to_vec()))
            );
        }
    }

    /// A message numbered once keeps its `seq` when numbered again without
    /// the `repeat` flag: a frozen router that wakes after its successor
    /// numbered its batch, or a batch sent again after a lost reply (seen
    /// on Redis Cluster in the chaos soak: one message at seq 30 and 77).
    #[tokio::test]
    async fn a_message_is_never_numbered_twice() {
        let (_redis, mut c) = redis_conn("lua-route").await;
        assert_eq!(
            route(&mut c, &[("100-1", false), ("100-2", false)]).await,
            [1, 2]
        );
        assert_eq!(route(&mut c, &[("100-3", false)]).await, [3]);
        // Numbered again, no flag: same seqs; a new one in the same call
        // goes on from the counter.
        assert_eq!(
            route(
                &mut c,
                &[("100-1", false), ("100-2", false), ("101-0", false)]
            )
            .await,
            [1, 2, 4]
        );
        // Claimed (flagged) as before.
        assert_eq!(route(&mut c, &[("100-3", true)]).await, [3]);
        // Another send shard's ids are compared with that shard's only.
        assert_eq!(route(&mut c, &[("3/50-1", false)]).await, [5]);
        assert_eq!(
            route(&mut c, &[("3/50-1", false), ("99-9", false)]).await,
            [5, 6]
        );
        // Ids of any length compare as numbers: 999-5 is older than
        // 1000-0, whatever their text says.
        assert_eq!(route(&mut c, &[("999-5", false)]).await, [7]);
        run(&mut c, &["HSET", "s:{a}", "last", "1000-0"]).await;
        assert_eq!(
            route(&mut c, &[("999-5", false), ("1000-1", false)]).await,
            [7, 8]
        );
        // A seq hash written by a release that kept no `last`: numbered as
        // then, from the flag alone.
        run(&mut c, &["HDEL", "s:{a}", "last", "last3/"]).await;
        assert_eq!(route(&mut c, &[("1000-2", false)]).await, [9]);
        assert_eq!(route(&mut c, &[("1000-2", false)]).await, [9]);
        // A run judged fresh by order alone still moves `last` to its
        // newest id: any of it sent again keeps its seq.
        assert_eq!(
            route(
                &mut c,
                &[("2000-1", false), ("2000-2", false), ("2000-3", false)]
            )
            .await,
            [10, 11, 12]
        );
        assert_eq!(route(&mut c, &[("2000-2", false)]).await, [11]);
        assert_eq!(
            route(&mut c, &[("2000-3", false), ("2001-0", false)]).await,
            [12, 13]
        );
        // A run whose first was numbered before: each compared again.
        assert_eq!(
            route(
                &mut c,
                &[
                    ("2000-2", false),
                    ("2000-3", false),
                    ("2001-0", false),
                    ("2001-1", false)
                ]
            )
            .await,
            [11, 12, 13, 14]
        );
    }

    #[test]
    fn sha_is_what_redis_computes() {
        // `redis-cli SCRIPT LOAD "return 1"`.
        assert_eq!(
            super::sha("return 1"),
            "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"
        );
    }

    /// `INBOX_ADD` adds every entry, in order, in one step: a reader blocked
    /// on the inbox gets them in one read (pipelined `XADD`s would wake it
    /// for the first alone). A missing inbox is never created.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_inbox_reader_wakes_once_for_a_batch() {
        let (redis, mut c) = redis_conn("inbox-add").await;
        run(&mut c, &["XADD", "in:{n}", "1-0", "k", "v"]).await;
        let client = redis::Client::open(redis.url()).unwrap();
        let mut r = client.get_multiplexed_async_connection().await.unwrap();
        let reader = tokio::spawn(async move {
            let v: redis::Value = redis::cmd("XREAD")
                .arg(&["COUNT", "100", "BLOCK", "5000", "STREAMS", "in:{n}", "1-0"])
                .query_async(&mut r)
                .await
                .unwrap();
            crate::stream::read_entries(&v)
        });
        redis.wait_blocked(1, std::time::Duration::from_secs(5));
        let mut add = redis::cmd("EVALSHA");
        add.arg(super::sha(super::INBOX_ADD)).arg(1).arg("in:{n}");
        for i in 0..3 {
            add.arg(4).arg(&["id", &format!("m{i}"), "payload", "1"]);
        }
        super::load_all(&mut c).await.unwrap();
        let added: i64 = add.query_async(&mut c).await.unwrap();
        assert_eq!(added, 1);
        let read = reader.await.unwrap();
        let ids: Vec<&str> = read
            .iter()
            .map(|e| std::str::from_utf8(e.get("id").unwrap()).unwrap())
            .collect();
        assert_eq!(ids, ["m0", "m1", "m2"], "one read, in order");

        let mut gone = redis::cmd("EVALSHA");
        gone.arg(super::sha(super::INBOX_ADD))
            .arg(1)
            .arg("in:{gone}")
            .arg(2)
            .arg(&["id", "x"]);
        let added: i64 = gone.query_async(&mut c).await.unwrap();
        assert_eq!(added, 0);
        let exists: i64 = redis::cmd("EXISTS")
            .arg("in:{gone}")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(exists, 0, "a missing inbox is not created");
    }
}
