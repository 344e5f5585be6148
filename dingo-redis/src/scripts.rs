//! The Lua scripts that make each step atomic. Every script touches the keys of one queue
//! only (one hash tag), and works on a batch: one script call per batch, never one per
//! message.

use std::sync::LazyLock;

use redis::{Script, Value};

/// Pushes messages onto a queue list (`KEYS[1]`) and leaves a wake token (`KEYS[2]`), once:
/// `KEYS[3]` marks the batch as written (for `ARGV[1]` ms), so a batch sent again after its
/// reply was lost is not queued twice. ARGV[2..]: the messages.
pub(crate) static PUSH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if not redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[1]) then return 0 end
redis.call('LPUSH', KEYS[1], unpack(ARGV, 2))
if redis.call('LLEN', KEYS[2]) == 0 then redis.call('LPUSH', KEYS[2], '1') end
return #ARGV - 1
"#,
    )
});

/// Takes up to `ARGV[1]` messages: at-most-once ones (`KEYS[2]`) as they are, the others
/// (`KEYS[1]`) under a lease of `ARGV[2]` ms each (`KEYS[4]` deadlines, `KEYS[5]` the
/// messages). Lease tokens are `ARGV[3]` (the consumer's own prefix, unique per process
/// run) followed by `ARGV[4]` + 1, + 2, …, so tokens never repeat, not even across server
/// restarts. Returns pairs (token or "", message). Leaves a wake token (`KEYS[3]`) while
/// work remains, so the next idle consumer wakes too.
pub(crate) static FETCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = tonumber(ARGV[1])
local out = {}
local amo = redis.call('RPOP', KEYS[2], n)
if amo then
  for i = 1, #amo do out[#out + 1] = ''; out[#out + 1] = amo[i] end
  n = n - #amo
end
if n > 0 then
  local msgs = redis.call('RPOP', KEYS[1], n)
  if msgs then
    local t = redis.call('TIME')
    local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
    local base = tonumber(ARGV[4])
    local zargs, hargs = {}, {}
    for i = 1, #msgs do
      local token = ARGV[3] .. (base + i)
      zargs[#zargs + 1] = deadline; zargs[#zargs + 1] = token
      hargs[#hargs + 1] = token; hargs[#hargs + 1] = msgs[i]
      out[#out + 1] = token; out[#out + 1] = msgs[i]
    end
    redis.call('ZADD', KEYS[4], unpack(zargs))
    redis.call('HSET', KEYS[5], unpack(hargs))
  end
end
if redis.call('LLEN', KEYS[1]) + redis.call('LLEN', KEYS[2]) > 0 then
  if redis.call('LLEN', KEYS[3]) == 0 then redis.call('LPUSH', KEYS[3], '1') end
else
  redis.call('DEL', KEYS[3])
end
return out
"#,
    )
});

/// Completes calls, once: `KEYS[3]` marks the batch as applied (for `ARGV[1]` ms), so a
/// batch sent again after its reply was lost changes nothing. For each triple (token,
/// reply index, report) in ARGV[3..] — if the token is "" there is no lease (a non-final
/// report, an at-most-once task); otherwise the lease (`KEYS[1]`) must still be this
/// worker's, and it is released with the message (`KEYS[2]`) in the same step as the
/// report is stored. A reply index of 0 stores no report (a fire-and-forget call). Reply
/// index k is the list `KEYS[2 + 2k]` with its notify list `KEYS[3 + 2k]`; each list gets
/// its reports in one push, in order, and both expire `ARGV[2]` ms later. Returns the
/// tokens whose lease was lost (their reports are not stored: fencing).
pub(crate) static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if not redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[1]) then return {} end
local lost = {}
local out = {}
local i = 3
while i <= #ARGV do
  local token, k, report = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local owned = true
  if token ~= '' then
    owned = redis.call('ZREM', KEYS[1], token) == 1
    if owned then redis.call('HDEL', KEYS[2], token) end
  end
  if owned then
    if k > 0 then
      local list = out[k]
      if not list then list = {}; out[k] = list end
      list[#list + 1] = report
    end
  else
    lost[#lost + 1] = token
  end
  i = i + 3
end
for k, reports in pairs(out) do
  local reply, notify = KEYS[2 + 2 * k], KEYS[3 + 2 * k]
  redis.call('RPUSH', reply, unpack(reports))
  redis.call('PEXPIRE', reply, ARGV[2])
  if redis.call('LLEN', notify) == 0 then redis.call('LPUSH', notify, '1') end
  redis.call('PEXPIRE', notify, ARGV[2])
end
return lost
"#,
    )
});

/// Moves messages to the dead letters (`KEYS[3]`, kept to `ARGV[1]` entries): triples
/// (token or "", reason prefix, message) in ARGV[2..]. A token's lease (`KEYS[1]`) and
/// message (`KEYS[2]`) are released; its message is the one kept in `KEYS[2]` (the
/// triple's own is empty then).
pub(crate) static DEAD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local i = 2
while i <= #ARGV do
  local token, prefix, m = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if token ~= '' then
    m = redis.call('HGET', KEYS[2], token) or m
    redis.call('ZREM', KEYS[1], token)
    redis.call('HDEL', KEYS[2], token)
  end
  redis.call('LPUSH', KEYS[3], prefix .. m)
  i = i + 3
end
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[1]) - 1)
return 0
"#,
    )
});

/// Gives back tasks fetched but never started (a consumer stopping): leased tokens in
/// ARGV[1..ARGV[1]+1] go back to the front of `KEYS[3]`; the remaining ARGV are
/// at-most-once messages, back to the front of `KEYS[5]`. `KEYS[4]` gets a wake token.
pub(crate) static REQUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local leased = tonumber(ARGV[1])
for i = 2, leased + 1 do
  local m = redis.call('HGET', KEYS[2], ARGV[i])
  redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[2], ARGV[i])
  if m then redis.call('RPUSH', KEYS[3], m) end
end
for i = leased + 2, #ARGV do redis.call('RPUSH', KEYS[5], ARGV[i]) end
if redis.call('LLEN', KEYS[4]) == 0 then redis.call('LPUSH', KEYS[4], '1') end
return 0
"#,
    )
});

/// Extends the leases (`KEYS[1]`) of the tokens in ARGV[2..] by `ARGV[1]` ms from now.
/// Returns the tokens that no longer hold a lease (taken over: the worker must not
/// complete them).
pub(crate) static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local lost = {}
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', deadline, ARGV[i])
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
"#,
    )
});

/// Returns expired leases (`KEYS[1]`) to the queue (`KEYS[3]`, at the front), marked
/// redelivered (`ARGV[2]` replaces the message's last byte); a message redelivered
/// `ARGV[3]` times already goes to the dead letters (`KEYS[5]`, kept to `ARGV[4]`) with
/// `ARGV[5]` as the reason prefix. At most `ARGV[1]` per call. Returns {requeued, dead}.
pub(crate) static REAP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local mark = ARGV[2]
local body = string.sub(mark, 1, #mark - 1)
local max = tonumber(ARGV[3])
local requeued, dead = 0, 0
for _, token in ipairs(expired) do
  local m = redis.call('HGET', KEYS[2], token)
  redis.call('ZREM', KEYS[1], token)
  redis.call('HDEL', KEYS[2], token)
  if m then
    local count, stop = 0, #m - 1
    while stop >= #body and string.sub(m, stop - #body + 1, stop) == body do
      count = count + 1
      stop = stop - #body
    end
    if count >= max then
      redis.call('LPUSH', KEYS[5], ARGV[5] .. m)
      redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[4]) - 1)
      dead = dead + 1
    else
      redis.call('RPUSH', KEYS[3], string.sub(m, 1, -2) .. mark)
      requeued = requeued + 1
    end
  end
end
if requeued > 0 and redis.call('LLEN', KEYS[4]) == 0 then redis.call('LPUSH', KEYS[4], '1') end
return {requeued, dead}
"#,
    )
});

/// Removes the first `ARGV[1]` reports of a reply list (`KEYS[1]`) — the ones its listener
/// routed — once: `KEYS[2]` marks the trim as done (for `ARGV[2]` ms), so a trim sent
/// again after its reply was lost removes nothing more.
pub(crate) static TRIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('LTRIM', KEYS[1], tonumber(ARGV[1]), -1)
return 1
"#,
    )
});

/// All scripts, to load into a fresh connection's server.
pub(crate) fn all() -> [&'static Script; 8] {
    [&PUSH, &FETCH, &COMPLETE, &DEAD, &REQUEUE, &RENEW, &REAP, &TRIM]
}

/// One script call in a pipelined batch.
#[derive(Clone)]
pub(crate) struct Call {
    pub(crate) script: &'static Script,
    pub(crate) keys: Vec<String>,
    pub(crate) args: Vec<Vec<u8>>,
}

impl Call {
    pub(crate) fn new(script: &'static Script) -> Call {
        Call { script, keys: Vec::new(), args: Vec::new() }
    }

    pub(crate) fn key(mut self, key: impl Into<String>) -> Call {
        self.keys.push(key.into());
        self
    }

    pub(crate) fn arg(mut self, arg: impl Into<Vec<u8>>) -> Call {
        self.args.push(arg.into());
        self
    }
}

/// Runs script calls in one round trip. A call the server does not know (its script cache
/// was flushed) is loaded and sent again; a call that ran is never sent twice.
pub(crate) fn run_batch(conn: &mut redis::Connection, calls: &[Call]) -> redis::RedisResult<Vec<Value>> {
    run_after(conn, None, calls)
}

/// Like [`run_batch`], with a command sent first in the same pipeline — a blocking wait:
/// the server runs the calls the moment the wait ends, without another round trip.
pub(crate) fn run_after(
    conn: &mut redis::Connection,
    first: Option<&redis::Cmd>,
    calls: &[Call],
) -> redis::RedisResult<Vec<Value>> {
    let mut results: Vec<Option<Value>> = vec![None; calls.len()];
    let mut todo: Vec<usize> = (0..calls.len()).collect();
    for attempt in 0..2 {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let first = if attempt == 0 { first } else { None };
        if let Some(first) = first {
            pipe.add_command(first.clone());
        }
        for &i in &todo {
            let call = &calls[i];
            let cmd = pipe.cmd("EVALSHA").arg(call.script.get_hash()).arg(call.keys.len());
            for key in &call.keys {
                cmd.arg(key);
            }
            for arg in &call.args {
                cmd.arg(arg.as_slice());
            }
        }
        let mut replies: Vec<redis::RedisResult<Value>> = pipe.query(conn)?;
        if first.is_some() && !replies.is_empty() {
            replies.remove(0)?;
        }
        let mut missing = Vec::new();
        for (&i, reply) in todo.iter().zip(replies) {
            match reply {
                Ok(value) => results[i] = Some(value),
                Err(e) if e.code() == Some("NOSCRIPT") && attempt == 0 => missing.push(i),
                Err(e) => return Err(e),
            }
        }
        if missing.is_empty() {
            break;
        }
        for script in all() {
            script.load(conn)?;
        }
        todo = missing;
    }
    Ok(results.into_iter().map(|r| r.unwrap_or(Value::Nil)).collect())
}
