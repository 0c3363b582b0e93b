//! Lua scripts: each step that must read and write atomically runs as one script, with the
//! server's clock (`TIME`), so members on machines with skewed clocks agree on due times.
//!
//! Keys a topic uses besides its stream:
//! - `<stream>:delayed`: sorted set of delayed publishes (score = due time in ms), each member
//!   a MessagePack array `[nonce, field, value, …]`;
//! - `<stream>:retry:<group>`: sorted set of entry ids a member of `<group>` nacked with a
//!   delay (score = due time in ms), so they are not redelivered before then.

use std::sync::LazyLock;

use redis::aio::ConnectionLike;
use redis::{Cmd, ErrorKind, FromRedisValue, RedisResult, Script, ServerErrorKind};

/// Publishes with a delay. KEYS: delayed set. ARGV: delay ms, nonce, field, value, …
pub(crate) const PUBLISH_DELAYED: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member = {}
for i = 2, #ARGV do member[#member + 1] = ARGV[i] end
redis.call('ZADD', KEYS[1], string.format('%.0f', now + tonumber(ARGV[1])), cmsgpack.pack(member))
return 1
"#;

/// One fetch step of a member, before it reads new entries.
///
/// KEYS: stream, delayed set, retry set. ARGV: group, consumer, min idle ms (the ack
/// deadline), count, XAUTOCLAIM cursor, max stream length (0 = unbounded), most delayed
/// publishes to move.
///
/// 1. Moves due delayed publishes into the stream.
/// 2. Claims entries idle for at least the ack deadline (dead members, nacks, expired leases);
///    those nacked with a delay that has not passed yet are hidden again until it has.
/// 3. Returns `{next cursor, {{id, fields, delivery count}, …}, ms until the next due time or -1}`.
pub(crate) static FETCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stream, delayed, retry = KEYS[1], KEYS[2], KEYS[3]
local group, consumer, min_idle = ARGV[1], ARGV[2], tonumber(ARGV[3])
local max_len = tonumber(ARGV[6])

for _, member in ipairs(redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, tonumber(ARGV[7]))) do
  local packed = cmsgpack.unpack(member)
  local args = {'XADD', stream}
  if max_len > 0 then
    args[#args + 1] = 'MAXLEN'; args[#args + 1] = '~'; args[#args + 1] = ARGV[6]
  end
  args[#args + 1] = '*'
  for i = 2, #packed do args[#args + 1] = packed[i] end
  redis.call(unpack(args))
  redis.call('ZREM', delayed, member)
end

-- pcall, and the error handed back as it came: before Redis 7.0 an error raised inside a script
-- reaches the client as `ERR Error running script ...`, hiding its code (NOGROUP: recreate the group).
local claimed = redis.pcall('XAUTOCLAIM', stream, group, consumer, min_idle, ARGV[5], 'COUNT', ARGV[4])
if type(claimed) == 'table' and claimed.err then return claimed end
local out = {}
for _, entry in ipairs(claimed[2]) do
  local id, fields = entry[1], entry[2]
  local pending = redis.call('XPENDING', stream, group, id, id, 1)[1]
  if fields and pending then
    local count = pending[4]
    local due = redis.call('ZSCORE', retry, id)
    if due and tonumber(due) > now then
      local at = math.max(1, math.min(now, tonumber(due) - min_idle))
      redis.call('XCLAIM', stream, group, consumer, 0, id, 'TIME', string.format('%.0f', at),
        'RETRYCOUNT', count - 1, 'JUSTID')
    else
      if due then redis.call('ZREM', retry, id) end
      out[#out + 1] = {id, fields, count}
    end
  end
end
for _, id in ipairs(claimed[3] or {}) do redis.call('ZREM', retry, id) end

local wake = -1
local first = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
if first[2] then wake = math.max(0, tonumber(first[2]) - now) end
local next_retry = redis.call('ZRANGEBYSCORE', retry, string.format('(%.0f', now), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
if next_retry[2] then
  local in_ms = tonumber(next_retry[2]) - now
  if wake < 0 or in_ms < wake then wake = in_ms end
end
return {claimed[1], out, wake}
"#,
    )
});

/// Settles a batch of deliveries of one member in one call, each only if this delivery still
/// holds its entry; the acked entries share one `XACK`.
///
/// KEYS: stream, retry set. ARGV: group, consumer, ack deadline ms, number of acks of first
/// deliveries, number of acks in all, lowest and highest entry id of the batch; then the entry
/// id of each ack of a first delivery; then two per other ack (entry id, delivery count); then
/// five per other settle: how (`r` release, `t` touch), entry id, delivery count, delay ms,
/// delivery count to leave on it (the last two only matter to `r`).
///
/// - ack: `XACK` (and forget any delayed-nack due time);
/// - release: hand back to the group, claimable after the delay (0 = at once);
/// - touch: restart its ack deadline (it waited in the member's buffer).
///
/// Who holds what is read with one `XPENDING` of this consumer over the batch's id range;
/// an entry not in it is looked up alone. Returns `{position, outcome, …}` for the settles
/// (counted from 0 in the order given) that did not succeed, each outcome 0 (no longer pending
/// in the group: someone acked it) or -1 (held by another delivery: claimed after the
/// deadline); every other settle succeeded.
pub(crate) static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local stream, retry = KEYS[1], KEYS[2]
local group, consumer, deadline = ARGV[1], ARGV[2], tonumber(ARGV[3])
local firsts_end = 7 + tonumber(ARGV[4])
local acks_end = firsts_end + 2 * (tonumber(ARGV[5]) - tonumber(ARGV[4]))
local settles = tonumber(ARGV[5]) + (#ARGV - acks_end) / 5
local limit = 2 * settles + 16
local held = {}
for _, p in ipairs(redis.call('XPENDING', stream, group, ARGV[6], ARGV[7], limit, consumer)) do
  held[p[1]] = p[4]
end
local function outcome(id, count)
  local c = held[id]
  if not c then
    local p = redis.call('XPENDING', stream, group, id, id, 1)[1]
    if not p then return 0 end
    if p[2] ~= consumer then return -1 end
    c = p[4]
  end
  if c ~= count then return -1 end
  return 1
end

local failed, acked = {}, {}
local position = 0
local function settled(o, id)
  if o == 1 then
    if id then acked[#acked + 1] = id end
  else
    failed[#failed + 1] = position
    failed[#failed + 1] = o
  end
  position = position + 1
end
for i = 8, firsts_end do settled(outcome(ARGV[i], 1), ARGV[i]) end
for i = firsts_end + 1, acks_end, 2 do settled(outcome(ARGV[i], tonumber(ARGV[i + 1])), ARGV[i]) end
if #acked > 0 then
  if redis.call('EXISTS', retry) == 1 then redis.call('ZREM', retry, unpack(acked)) end
  redis.call('XACK', stream, group, unpack(acked))
end

local now
for i = acks_end + 1, #ARGV, 5 do
  local how, id = ARGV[i], ARGV[i + 1]
  local o = outcome(id, tonumber(ARGV[i + 2]))
  if o == 1 and how == 'r' then
    if not now then
      local t = redis.call('TIME')
      now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    end
    local delay = tonumber(ARGV[i + 3])
    local at = 1
    if delay > 0 then
      local due = now + delay
      redis.call('ZADD', retry, string.format('%.0f', due), id)
      at = math.max(1, math.min(now, due - deadline))
    end
    redis.call('XCLAIM', stream, group, consumer, 0, id, 'TIME', string.format('%.0f', at),
      'RETRYCOUNT', ARGV[i + 4], 'JUSTID')
  elseif o == 1 then
    redis.call('XCLAIM', stream, group, consumer, 0, id, 'JUSTID')
  end
  settled(o)
end
return failed
"#,
    )
});

/// Removes a member that holds nothing from its group. KEYS: stream. ARGV: group, consumer.
pub(crate) static FORGET_CONSUMER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"#,
    )
});

/// `EVALSHA <hash of script> <keys>`, to which the caller adds the keys and arguments: built
/// in one buffer, unlike a `ScriptInvocation`, which allocates per argument.
pub(crate) fn evalsha(script: &Script, keys: usize) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys);
    cmd
}

/// Sends `cmd` (made by [`evalsha`] for `script`), loading the script first when the server
/// does not have it (after a restart or `SCRIPT FLUSH`).
pub(crate) async fn run<T: FromRedisValue>(
    script: &Script,
    cmd: &Cmd,
    conn: &mut impl ConnectionLike,
) -> RedisResult<T> {
    match cmd.query_async(conn).await {
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            script.prepare_invoke().load_async(conn).await?;
            cmd.query_async(conn).await
        }
        other => other,
    }
}

/// The delayed-publish set of `stream`.
pub(crate) fn delayed_key(stream: &str) -> String {
    format!("{stream}:delayed")
}

/// The delayed-nack set of `group` on `stream`.
pub(crate) fn retry_key(stream: &str, group: &str) -> String {
    format!("{stream}:retry:{group}")
}
