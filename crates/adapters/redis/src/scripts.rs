//! Lua scripts: each step that must read and write atomically runs as one script, with the
//! server's clock (`TIME`), so members on machines with skewed clocks agree on due times.
//!
//! Keys a topic uses besides its stream:
//! - `<stream>:delayed`: sorted set of delayed publishes (score = due time in ms), each member
//!   a MessagePack array `[nonce, field, value, …]`;
//! - `<stream>:retry:<group>`: sorted set of entry ids a member of `<group>` nacked with a
//!   delay (score = due time in ms), so they are not redelivered before then.

use std::sync::LazyLock;

use redis::Script;

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

local claimed = redis.call('XAUTOCLAIM', stream, group, consumer, min_idle, ARGV[5], 'COUNT', ARGV[4])
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

/// The start of every script that settles one delivery. KEYS[1]: stream. ARGV: group,
/// consumer, entry id, delivery count. Returns 0 when the entry is no longer pending in the
/// group (someone acked it), -1 when another delivery holds it (claimed after the deadline).
macro_rules! held_by_this_delivery {
    () => {
        r#"
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)[1]
if not pending then return 0 end
if pending[2] ~= ARGV[2] or pending[4] ~= tonumber(ARGV[4]) then return -1 end
"#
    };
}

/// Acks an entry this delivery holds. KEYS: stream, retry set. ARGV: group, consumer, id,
/// delivery count. Returns 1 when acked (see `held_by_this_delivery` for 0 and -1).
pub(crate) static ACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        held_by_this_delivery!(),
        r#"
redis.call('ZREM', KEYS[2], ARGV[3])
return redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
"#
    ))
});

/// Hands an entry this delivery holds back to the group, to be claimed after a delay (0 = at
/// once). KEYS: stream, retry set. ARGV: group, consumer, id, delivery count, delay ms, ack
/// deadline ms, delivery count to leave on it. Returns 1 (see `held_by_this_delivery`).
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        held_by_this_delivery!(),
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local delay = tonumber(ARGV[5])
local at = 1
if delay > 0 then
  local due = now + delay
  redis.call('ZADD', KEYS[2], string.format('%.0f', due), ARGV[3])
  at = math.max(1, math.min(now, due - tonumber(ARGV[6])))
end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'TIME', string.format('%.0f', at),
  'RETRYCOUNT', ARGV[7], 'JUSTID')
return 1
"#
    ))
});

/// Restarts the ack deadline of an entry this delivery holds (it waited in the member's
/// buffer). KEYS: stream. ARGV: group, consumer, id, delivery count. Returns 1 (see
/// `held_by_this_delivery`).
pub(crate) static TOUCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        held_by_this_delivery!(),
        r#"
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"#
    ))
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

/// The delayed-publish set of `stream`.
pub(crate) fn delayed_key(stream: &str) -> String {
    format!("{stream}:delayed")
}

/// The delayed-nack set of `group` on `stream`.
pub(crate) fn retry_key(stream: &str, group: &str) -> String {
    format!("{stream}:retry:{group}")
}
