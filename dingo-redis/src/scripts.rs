//! The Lua scripts that make each step atomic, and the pipeline that runs them. Every
//! script touches the keys of one queue only (one hash tag), and works on a batch: one
//! script call per batch, never one per message.
//!
//! Each script is a file, `lua/NAME.lua`, put together at compile time with the shared
//! pieces it calls, `lua/includes/NAME.lua` (see `lua!`):
//!
//! - **`SEEN`** (`includes/seen.lua`): exactly once for retried batches. Every actor (a
//!   sender, a worker thread, a listener) numbers its batches ([`Sequence`]), and a script
//!   records the number of the batch it applies in the actor's sequence key of the queue
//!   (`NS:{T}:seq:ACTOR`; `N.C` after a fetch that took C tasks). `seen(key, n, ttl)`
//!   records batch `n` and tells whether it was applied already (a retry after its reply
//!   was lost) — then the record stays as it was, and the count of tasks that fetch took
//!   comes back too. One `SET … GET` in the usual case; one key per actor and queue, never
//!   one per batch.
//! - **`BURY`** (`includes/bury.lua`): dead letters bounded by count and bytes.
//!   `bury(list, size, entry, max, max_bytes)` pushes `entry` at the head of the
//!   dead-letter list `list` and drops its oldest entries (the tail) while it holds more
//!   than `max` entries or more than `max_bytes` bytes (0: no bound of that kind); an entry
//!   larger than `max_bytes` alone is dropped itself, before it is pushed (the older
//!   entries stay). The byte count lives in `size` (a
//!   string beside the list): read, not recounted, in the usual case; recounted once where
//!   it is missing (a list written before it existed) and taken as zero while the list is
//!   empty (the list was removed without it). Returns how many entries were dropped. Only
//!   dead-letter paths call it: a completion pays nothing for it.
//!
//! Calls go out as RESP written by [`resp`], numbered by [`sequence`].

mod resp;
mod sequence;

use std::sync::LazyLock;

use redis::{Script, Value};

pub(crate) use resp::pack;
use resp::pack_into;
pub(crate) use sequence::{SEQ_TTL, Sequence};

/// A script's text, put together at compile time from files of `lua/` (its includes, then
/// its body), each starting on a line of its own.
macro_rules! lua {
    ($($file:literal),+) => {
        concat!($("\n", include_str!(concat!("lua/", $file))),+)
    };
}

/// Pushes messages onto a queue list (`KEYS[1]`) and leaves a wake token (`KEYS[2]`), once:
/// batch number `ARGV[1]` of the sender whose sequence key is `KEYS[3]` (kept `ARGV[2]`
/// ms), so a batch sent again after its reply was lost is not queued twice. ARGV[3..]:
/// the messages. Only for sends again (see [`Redo`]) and one-off pushes: the writer's
/// first attempt is a transaction of plain commands, which costs Redis less.
pub(crate) static PUSH: LazyLock<Script> = LazyLock::new(|| Script::new(lua!("includes/seen.lua", "push.lua")));

/// Takes up to `ARGV[1]` messages (`KEYS[1]`) for consumer `ARGV[3]`, moved to its
/// processing list (`KEYS[5]`, newest first), where they stay until settled. The consumer
/// holds one lease (`KEYS[4]`, deadline `ARGV[2]` ms from now) for all of them: registered
/// when `ARGV[4]` is 1, renewed otherwise (when half of it is gone) — and if it expired and
/// was reaped meanwhile,
/// nothing is taken and the reply is `{'lost'}` (the consumer must start over under a new
/// id). Leaves a wake token (`KEYS[3]`) while work remains in the queue or its at-most-once
/// list (`KEYS[2]`, popped by a plain `RPOP` just before), so the next idle consumer wakes
/// too.
///
/// Returns `{'ok', n, generation}`: the n messages taken are the head of the processing list, for an
/// `LRANGE` right after the script to read. One message is moved with `LMOVE`; more pass
/// through no Lua, which hashes every byte it is handed: into an empty processing list (the
/// usual case: the worker's
/// settlements run just before) they are copied by `SORT … BY nosort LIMIT … STORE`, a
/// range copy in Redis's C code. Only into a list that still holds messages (or where ACL
/// rules forbid `SORT`, a `@dangerous` command) are they popped into Lua and pushed. With `ARGV[7]` = 1 (the call was sent again after
/// `NOSCRIPT`, so a read sent after it may have run before it) the reply carries the
/// messages themselves, oldest first: `{'ok', {messages…}}`.
///
/// Batch number `ARGV[5]` of the worker thread whose sequence key is `KEYS[6]` (kept
/// `ARGV[6]` ms): sent again after its reply was lost, the fetch takes nothing new and
/// returns `{'again', {messages…}, generation}`: what it moved the first time (the head of
/// the processing list) — else those messages would sit in the processing list unknown to
/// their worker.
///
/// `generation` is the queue's cancel generation (`KEYS[7]`, see [`CANCEL`]; `0`: none):
/// a worker that has not loaded that one loads the queue's cancels ([`CANCELS`]) before it
/// hands out what it took. One `GET` per fetch: a queue nobody cancels costs nothing more.
pub(crate) static FETCH: LazyLock<Script> = LazyLock::new(|| Script::new(lua!("fetch.lua")));

/// Settles, in order, what one consumer (`ARGV[3]`) did with its messages — once: batch
/// number `ARGV[1]` of the actor whose sequence key is `KEYS[3]` (kept `ARGV[5]` ms), so a
/// batch sent again after its reply was lost changes nothing. From `ARGV[7]`, runs of one
/// operation: (op, reply index k, count n), then the run's data: one item for `r` and for
/// `c` with k > 0 (the run's reports back to back, stored as one list element: one Lua
/// string and one element per run, not per report), n items for `d` and `x`, 2n for `z`,
/// none else:
/// - `r`: store the n reports `data` (no lease involved: progress, at-most-once tasks);
/// - `c`: settle the n oldest messages of the processing list (`KEYS[2]`) and store their
///   final reports `data` (k 0: none, fire-and-forget calls; empty `data`: none either);
/// - `d`: settle the oldest message to the dead letters (`KEYS[4]`, its byte count
///   `KEYS[7]`, bounded by `ARGV[4]` entries and `ARGV[6]` bytes, see `BURY`) with the
///   reason prefix `data`, n times; k > 0 keeps only the message's first k bytes (it was
///   over the size limit);
/// - `q`: give the newest message back to the front of its queue (`KEYS[5]`, wake `KEYS[6]`),
///   n times;
/// - `x`: settle the newest message to the dead letters, as `d`;
/// - `z`: settle the n oldest messages and queue their next attempts (retries), in the same
///   step: 2n items, a due time (ms since the Unix epoch) and the next attempt's message
///   each. One due by the server's clock goes to the back of its queue (`KEYS[5]`, wake
///   `KEYS[6]`), the others into the delayed set (`KEYS[8]`, see [`DELAY`]), waking a
///   promoter (`KEYS[9]`) when one is due before every task already there.
///
/// Runs keep the work in Redis's C code: a run of completions is one `LTRIM` and one `RPUSH`
/// of one element, with no Lua loop over its tasks (each Lua step per task costs more than
/// the push itself, and every string Lua receives is hashed whole).
///
/// The consumer's lease (`KEYS[1]`) must still stand: if it expired and was reaped, its
/// messages went back to the queue for others, and nothing of `c`, `d`, `q` is applied
/// (fencing). Reply index k is the list `KEYS[8 + 2k]` with its notify list `KEYS[9 + 2k]`;
/// each gets its reports in order, and both expire `ARGV[2]` ms later. Returns {1 if the
/// lease stood else 0, how many final reports and retries were rejected, how many dead
/// letters were dropped to keep the bounds}.
pub(crate) static COMPLETE: LazyLock<Script> =
    LazyLock::new(|| Script::new(lua!("includes/seen.lua", "includes/bury.lua", "complete.lua")));

/// Adds delayed messages to a queue's delayed set (`KEYS[1]`, scored by due time: ms since the
/// Unix epoch), once: batch number `ARGV[1]` of the sender whose sequence key is `KEYS[3]`
/// (kept `ARGV[2]` ms), so a batch sent again after its reply was lost adds nothing a
/// promoter may have moved meanwhile. ARGV[3..]: pairs (due time, message). Leaves a token in
/// the promoters' wake list (`KEYS[2]`, at most one) when a message is due before every one
/// the set held: promoters sleep until the earliest due time they know of, so only an
/// earlier one needs to wake them. Returns how many messages it added.
///
/// A member is the message's bytes, unique per call and attempt (they hold the id, the
/// attempt and the due time): the same message sent twice is one task, not two.
pub(crate) static DELAY: LazyLock<Script> = LazyLock::new(|| Script::new(lua!("includes/seen.lua", "delay.lua")));

/// Moves the due messages of a delayed set (`KEYS[1]`: a score below the server's `TIME` in
/// ms — a due time is rounded down to the millisecond, so one in the current millisecond
/// waits for the next, never early),
/// oldest due first, at most `ARGV[1]` of them, where an immediate send would have put each:
/// at-most-once messages (their options field says so) to the back of the at-most-once list
/// (`KEYS[3]`), all others to the back of the queue (`KEYS[2]`) — a member that is no message
/// of ours too, so a fetch dead-letters it. Leaves a wake token for idle consumers (`KEYS[4]`)
/// as a send does. One script: two promoters running at once move each message once.
///
/// Returns {how many it moved, the due time of the earliest message left (`-1`: none), the
/// server's time}: the promoter sleeps for the difference, so its own clock never matters;
/// when it moved `ARGV[1]`, more may be due at once.
pub(crate) static PROMOTE: LazyLock<Script> = LazyLock::new(|| Script::new(lua!("promote.lua")));

/// Moves messages that never had a lease (at-most-once or undecodable ones) to the dead
/// letters (`KEYS[1]`, its byte count `KEYS[2]`, bounded by `ARGV[1]` entries and `ARGV[2]`
/// bytes: see `BURY`): pairs (reason prefix, message) in ARGV[3..]. Returns how many dead
/// letters were dropped to keep the bounds.
pub(crate) static DEAD: LazyLock<Script> = LazyLock::new(|| Script::new(lua!("includes/bury.lua", "dead.lua")));

/// Gives at-most-once messages (ARGV) taken but never started back to the front of their
/// list (`KEYS[1]`), leaving a wake token (`KEYS[2]`).
pub(crate) static GIVE_BACK: LazyLock<Script> = LazyLock::new(|| Script::new(lua!("give_back.lua")));

/// Retires consumer `ARGV[1]` (a worker thread that stopped): its worker's sequence key
/// (`KEYS[3]`) goes, its lease (`KEYS[1]`) ends, and its processing list (`KEYS[2]`) goes
/// if empty. Anything still in it stays there for the reaper, to run again elsewhere.
pub(crate) static RETIRE: LazyLock<Script> = LazyLock::new(|| Script::new(lua!("retire.lua")));

/// Renews the leases (`KEYS[1]`) of the consumers in ARGV[2..] by `ARGV[1]` ms from now.
/// Returns the consumers whose lease is gone (reaped: their messages went to others).
pub(crate) static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(lua!("renew.lua")));

/// Reaps consumers whose lease expired (`KEYS[1]`, at most `ARGV[1]` per call): their
/// processing lists (`ARGV[6]` + consumer id, in the queue's slot) go back to the front of
/// the queue (`KEYS[2]`, wake `KEYS[3]`) in their order, each message marked redelivered
/// (`ARGV[2]` replaces its last byte); a message redelivered `ARGV[3]` times already goes to
/// the dead letters (`KEYS[4]`, its byte count `KEYS[5]`, bounded by `ARGV[4]` entries and
/// `ARGV[8]` bytes: see `BURY`) with `ARGV[5]` as the reason prefix. Returns {requeued,
/// dead, heads, dropped}: heads holds the first `ARGV[7]` bytes of each message
/// dead-lettered (where its name, id and caller are), so its caller can be told; dropped
/// counts the dead letters dropped to keep the bounds.
pub(crate) static REAP: LazyLock<Script> = LazyLock::new(|| Script::new(lua!("includes/bury.lua", "reap.lua")));

/// Removes the first `ARGV[1]` reports of a reply list (`KEYS[1]`) — the ones its listener
/// routed — once: batch number `ARGV[2]` of the listener whose sequence key is `KEYS[2]`
/// (kept `ARGV[3]` ms), so a trim sent again after its reply was lost removes nothing more.
pub(crate) static TRIM: LazyLock<Script> = LazyLock::new(|| Script::new(lua!("includes/seen.lua", "trim.lua")));

/// Records cancels of the calls with ids ARGV[2..] of a queue until `ARGV[1]` (ms since the
/// Unix epoch) in its cancelled set (`KEYS[1]`, id → until; a cancel already there is only
/// extended), prunes the cancels that lapsed (up to 1,000 per call), and moves the queue's
/// cancel generation (`KEYS[2]`) on: to the server's time in µs, or one above the last if
/// that is higher — so a generation is never one a process loaded before the keys
/// expired. Both keys expire with the cancel that lapses last. A cancel that lapsed already
/// records nothing. Idempotent: a call sent again changes nothing more (no batch number).
pub(crate) static CANCEL: LazyLock<Script> = LazyLock::new(|| Script::new(lua!("cancel.lua")));

/// The cancels of a queue a process does not know yet: `{generation}` when the queue's
/// cancel generation (`KEYS[2]`) is still `ARGV[1]` (what the process loaded), else
/// `{generation, {id, until, …}}` — every cancel of the cancelled set (`KEYS[1]`) that has
/// not lapsed by the server's clock. One read: the set is the one of that generation.
pub(crate) static CANCELS: LazyLock<Script> = LazyLock::new(|| Script::new(lua!("cancels.lua")));

/// Takes exact entries out of a queue's dead letters (`KEYS[1]`, its byte count `KEYS[2]`),
/// each once (`LREM … -1`: from the tail, where the oldest are) — and with `ARGV[3]` =
/// `replay`, sends each one removed back, in the same step: ARGV[4..] are then pairs (entry,
/// message to send), the message going where a send would put it (at-most-once ones to
/// `KEYS[4]`, the others to the queue `KEYS[3]`, waking a consumer `KEYS[5]`); with
/// `purge`, ARGV[4..] are entries only. A letter is thus either still dead or sent back,
/// never both, never twice: an entry already gone (taken by another replay) sends nothing.
/// Batch number `ARGV[1]` of the actor whose sequence key is `KEYS[6]` (kept `ARGV[2]` ms):
/// sent again after its reply was lost, it changes nothing and returns what the first
/// attempt did. Returns how many letters it took.
pub(crate) static UNBURY: LazyLock<Script> = LazyLock::new(|| Script::new(lua!("includes/seen.lua", "unbury.lua")));

/// Which of the commands in ARGV the user may run, as it gives them (see `access`): ARGV
/// holds, per command, its name, its argument count and its arguments; returns the
/// positions (from 1) of those denied. Changes nothing; `KEYS[1]` is a key of the namespace, so that `EVALSHA`
/// itself is checked against the user's key patterns. Where the server lacks
/// `redis.acl_check_cmd` (Redis has it from 7.0; some compatible servers do not), nothing is
/// checked. Not among [`all`]: it runs once per broker, when it connects.
pub(crate) static PROBE: LazyLock<Script> = LazyLock::new(|| Script::new(lua!("probe.lua")));

/// All scripts, to load into a fresh connection's server.
pub(crate) fn all() -> [&'static Script; 14] {
    [
        &PUSH, &FETCH, &COMPLETE, &DEAD, &GIVE_BACK, &RETIRE, &RENEW, &REAP, &TRIM, &DELAY, &PROMOTE, &CANCEL,
        &CANCELS, &UNBURY,
    ]
}

/// One step of a pipelined batch: a script call, or a plain command (`keys` empty, the
/// command's arguments in `args`).
#[derive(Clone)]
pub(crate) struct Call {
    pub(crate) script: Option<&'static Script>,
    /// Which of `args` is the call's batch number (see `SEEN`), if it has one.
    pub(crate) seq: Option<usize>,
    /// The plain command's name (with `script` `None`).
    pub(crate) command: &'static str,
    pub(crate) keys: Vec<String>,
    pub(crate) args: Vec<Vec<u8>>,
    /// For a plain `LPUSH` of at-least-once messages in a transaction: how to send it again
    /// if the transaction's outcome is unknown.
    pub(crate) redo: Option<Redo>,
    /// Which of `args` becomes `1` when the call is sent again after `NOSCRIPT`: it then
    /// runs after calls that followed it, and must not count on them (see `FETCH`).
    pub(crate) resent: Option<usize>,
    /// Its reply, once it ran in a round trip that a server not ready refused in part: it is
    /// not sent again (see [`run`]).
    pub(crate) done: Option<Value>,
}

/// How a transaction's `LPUSH` of at-least-once messages (`LPUSH list m…`) is sent again
/// when the connection broke before `EXEC` answered: as a numbered [`PUSH`] of the same
/// messages. The transaction recorded the batch number with a plain `SET` of the sequence
/// key, so `PUSH` skips a batch the transaction applied (see `SEEN`).
#[derive(Clone)]
pub(crate) struct Redo {
    pub(crate) list: String,
    pub(crate) wake: String,
    pub(crate) seq_key: String,
    pub(crate) seq: String,
}

impl Call {
    pub(crate) fn new(script: &'static Script) -> Call {
        Call {
            script: Some(script),
            seq: None,
            command: "",
            keys: Vec::new(),
            args: Vec::new(),
            redo: None,
            resent: None,
            done: None,
        }
    }

    /// A plain command: not atomic with anything, so only for steps that need no script.
    pub(crate) fn command(name: &'static str) -> Call {
        Call {
            script: None,
            seq: None,
            command: name,
            keys: Vec::new(),
            args: Vec::new(),
            redo: None,
            resent: None,
            done: None,
        }
    }

    /// This transaction step as the numbered `PUSH` that sends its messages again (`None`:
    /// the step is not to be sent again).
    pub(crate) fn redone(self) -> Option<Call> {
        let Redo { list, wake, seq_key, seq } = self.redo?;
        let mut call = Call::new(&PUSH).key(list).key(wake).key(seq_key).numbered(seq).arg(SEQ_TTL);
        call.args.extend(self.args.into_iter().skip(1)); // the list, then the messages
        Some(call)
    }

    pub(crate) fn key(mut self, key: impl Into<String>) -> Call {
        self.keys.push(key.into());
        self
    }

    pub(crate) fn arg(mut self, arg: impl Into<Vec<u8>>) -> Call {
        self.args.push(arg.into());
        self
    }

    /// The batch number, as the next argument.
    pub(crate) fn numbered(mut self, seq: String) -> Call {
        self.seq = Some(self.args.len());
        self.args.push(seq.into_bytes());
        self
    }

    /// Whether it is the plain command `name`.
    pub(crate) fn is(&self, name: &str) -> bool {
        self.script.is_none() && self.command == name
    }

    /// A flag, `0` as the next argument, that is `1` when the call is sent again after
    /// `NOSCRIPT` (see [`Call::resent`]).
    pub(crate) fn resent_flag(mut self) -> Call {
        self.resent = Some(self.args.len());
        self.args.push(b"0".to_vec());
        self
    }
}

/// Runs calls without batch numbers in one round trip (see [`run`]).
pub(crate) fn run_batch(conn: &mut redis::Connection, calls: &[Call]) -> redis::RedisResult<Vec<Value>> {
    run(conn, &mut calls.to_vec(), None)
}

/// Runs calls in one round trip. A blocking wait among them (a plain `BLPOP`) holds back
/// the calls after it at the server, which runs them the moment the wait ends, without
/// another round trip; the calls before it run at once.
///
/// A script the server does not know (its script cache was flushed) is loaded and its call
/// sent again; a call that ran is never sent twice. A numbered call sent again that way
/// runs after calls that followed it, so it takes a new number from `sequence` (in place,
/// for any later retry): under its old one it would look applied already (`SEEN` keeps
/// the highest number) and be skipped.
///
/// A server that is not ready and refused the whole round trip ran none of it: its
/// refusal comes back, and the calls can go again as they are. One that refused only part
/// of it (it finished loading, or began to, midway) ran the rest: those calls keep their
/// replies ([`Call::done`]) and are not sent again, and the refused ones take new numbers,
/// as after `NOSCRIPT`; the refusal comes back all the same, so the caller waits for the
/// server before it runs the calls again. A refused wait is not waited again.
pub(crate) fn run(
    conn: &mut redis::Connection,
    calls: &mut [Call],
    mut sequence: Option<&mut Sequence>,
) -> redis::RedisResult<Vec<Value>> {
    let mut results: Vec<Option<Value>> = calls.iter().map(|call| call.done.clone()).collect();
    let mut todo: Vec<usize> = (0..calls.len()).filter(|&i| calls[i].done.is_none()).collect();
    for attempt in 0..2 {
        if todo.is_empty() {
            break;
        }
        let mut packed = Vec::new();
        pack_into(&mut packed, todo.iter().map(|&i| &calls[i]));
        let replies = redis::ConnectionLike::req_packed_commands(conn, &packed, 0, todo.len())?;
        match readiness(todo.iter().map(|&i| &calls[i]), &replies) {
            Readiness::Ready => {}
            Readiness::Refused(e) => return Err(e),
            Readiness::Partly(e) => {
                keep_what_ran(calls, &todo, replies, sequence);
                return Err(e);
            }
        }
        let replies = replies.into_iter().map(|value| match value {
            Value::ServerError(e) => Err(redis::RedisError::from(e)),
            value => Ok(value),
        });
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
        for &i in &missing {
            resend(calls, i, sequence.as_deref_mut());
        }
        todo = missing;
    }
    let mut values = Vec::with_capacity(results.len());
    for result in results {
        match result {
            // An error reply of a call that ran in a partly refused round trip.
            Some(Value::ServerError(e)) => return Err(e.into()),
            result => values.push(result.unwrap_or(Value::Nil)),
        }
    }
    Ok(values)
}

/// Readies call `i` to be sent again after calls that followed it ran: a new number (and, for
/// the `SET` that numbers a transaction's push, its redo too), and the resent flag.
fn resend(calls: &mut [Call], i: usize, sequence: Option<&mut Sequence>) {
    if let (Some(at), Some(sequence)) = (calls[i].seq, sequence) {
        let number = sequence.next_number();
        calls[i].args[at] = number.clone().into_bytes();
        if calls[i].is("SET")
            && let Some(redo) = calls.get_mut(i + 1).and_then(|next| next.redo.as_mut())
        {
            redo.seq = number;
        }
    }
    if let Some(at) = calls[i].resent {
        calls[i].args[at] = b"1".to_vec();
    }
}

/// After a round trip a server not ready refused in part: the calls of `todo` that ran keep
/// their replies; those it refused (or that met a flushed script cache) are readied to go
/// again (see [`resend`]). A transaction (`MULTI` … `EXEC`) ran whole or not at all, as its
/// `EXEC` says; a refused wait is marked done (it is not waited again: the fetch after it
/// runs either way).
pub(crate) fn keep_what_ran(
    calls: &mut [Call],
    todo: &[usize],
    replies: Vec<Value>,
    mut sequence: Option<&mut Sequence>,
) {
    let mut replies: Vec<Option<Value>> = replies.into_iter().map(Some).collect();
    let mut at = 0;
    while at < todo.len() {
        let i = todo[at];
        if calls[i].is("MULTI")
            && let Some(end) = (at..todo.len()).find(|&j| calls[todo[j]].is("EXEC"))
        {
            let ran = matches!(replies[end], Some(Value::Array(_)));
            for j in at..=end {
                if ran {
                    calls[todo[j]].done = replies[j].take();
                } else {
                    resend(calls, todo[j], sequence.as_deref_mut());
                }
            }
            at = end + 1;
            continue;
        }
        match replies[at].take() {
            Some(Value::ServerError(e))
                if e.code() == "NOSCRIPT" || crate::conn::is_not_ready(&redis::RedisError::from(e.clone())) =>
            {
                if calls[i].is("BLPOP") {
                    calls[i].done = Some(Value::Nil);
                } else {
                    resend(calls, i, sequence.as_deref_mut());
                }
            }
            reply => calls[i].done = reply,
        }
        at += 1;
    }
}

/// What the replies to a round trip say about the server's readiness (see [`readiness`]).
#[derive(Debug)]
pub(crate) enum Readiness {
    /// It was ready (any error is of another kind).
    Ready,
    /// It refused the whole round trip as not ready: nothing ran.
    Refused(redis::RedisError),
    /// It refused part of it as not ready, and ran the rest.
    Partly(redis::RedisError),
}

/// Checks the replies to one round trip for a server that was not ready (see
/// [`conn::is_not_ready`](crate::conn::is_not_ready)): whether it refused the round trip and
/// ran none of it — every reply a refusal, or an effect-free step (`MULTI`, a `QUEUED` step,
/// `EXECABORT`, a wait that timed out) — or refused only part of it (it became ready, or
/// stopped being, midway).
pub(crate) fn readiness<'a>(calls: impl Iterator<Item = &'a Call>, replies: &[Value]) -> Readiness {
    let mut refused = None;
    let mut ran = false;
    for (call, reply) in calls.zip(replies) {
        match reply {
            Value::ServerError(e) => {
                let e = redis::RedisError::from(e.clone());
                if refused.is_none() && crate::conn::is_not_ready(&e) {
                    refused = Some(e);
                }
            }
            Value::Okay if call.is("MULTI") => {}
            Value::SimpleString(status) if status == "QUEUED" => {}
            Value::Nil if call.is("BLPOP") => {}
            _ => ran = true,
        }
    }
    match refused {
        None => Readiness::Ready,
        Some(e) if !ran => Readiness::Refused(e),
        Some(e) => Readiness::Partly(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The test server (`DINGO_REDIS_URL`, default `redis://127.0.0.1:6379`), or `None` to
    /// skip — unless `DINGO_REQUIRE_SERVICES=1`, which makes its absence a failure.
    fn server() -> Option<redis::Connection> {
        let url = std::env::var("DINGO_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
        let conn = redis::Client::open(url.as_str()).and_then(|c| c.get_connection());
        match conn {
            Ok(conn) => Some(conn),
            Err(e) if std::env::var("DINGO_REQUIRE_SERVICES").is_ok_and(|v| v == "1") => {
                panic!("{url} is unreachable and DINGO_REQUIRE_SERVICES=1: {e}")
            }
            Err(_) => None,
        }
    }

    /// A round trip refused whole by a server that is not ready ran nothing and may go again
    /// as it is; one refused in part comes back as a broken connection (what ran is not known
    /// to the caller); other refusals are not a readiness matter.
    #[test]
    fn readiness_tells_a_whole_refusal_from_a_partial_one() {
        let reply = |resp: &str| redis::parse_redis_value(resp.as_bytes()).expect("a reply");
        let loading = || reply("-LOADING Redis is loading the dataset in memory\r\n");
        let transaction = [
            Call::command("MULTI"),
            Call::command("SET").arg("k").arg("1"),
            Call::command("LPUSH").arg("q").arg("m"),
            Call::command("EXEC"),
        ];
        let check = |replies: &[Value]| readiness(transaction.iter(), replies);
        let refused = |r: Readiness| matches!(r, Readiness::Refused(e) if crate::conn::is_not_ready(&e));
        let partly = |r: Readiness| matches!(r, Readiness::Partly(e) if crate::conn::is_not_ready(&e));

        assert!(refused(check(&[reply("+OK\r\n"), loading(), loading(), reply("-EXECABORT discarded\r\n")])));
        assert!(refused(check(&[reply("+OK\r\n"), reply("+QUEUED\r\n"), loading(), reply("-EXECABORT x\r\n")])));

        // A settlement refused, a wait that timed out (it took nothing), a fetch refused.
        let fetch = [
            Call::command("RPUSH").arg("r").arg("x"),
            Call::command("BLPOP").arg("w").arg("1"),
            Call::command("LRANGE").arg("p").arg("0").arg("0"),
        ];
        assert!(refused(readiness(fetch.iter(), &[loading(), reply("*-1\r\n"), loading()])));
        let woke = [loading(), reply("*2\r\n$1\r\nw\r\n$1\r\n1\r\n"), loading()];
        assert!(partly(readiness(fetch.iter(), &woke)), "the wait took a token");

        // A plain `OK` of anything but MULTI is a step that ran.
        let plain = [Call::command("LTRIM").arg("k").arg("0").arg("0"), Call::command("LPUSH").arg("q").arg("m")];
        assert!(partly(readiness(plain.iter(), &[reply("+OK\r\n"), loading()])));

        let applied = [reply("+OK\r\n"), reply("+QUEUED\r\n"), reply("+QUEUED\r\n"), reply("*2\r\n+OK\r\n:1\r\n")];
        assert!(matches!(check(&applied), Readiness::Ready));
        let other = [reply("+OK\r\n"), reply("-WRONGTYPE no\r\n"), reply("+QUEUED\r\n"), reply("-EXECABORT x\r\n")];
        assert!(matches!(check(&other), Readiness::Ready), "not a readiness matter: the caller handles it");
    }

    /// A round trip refused in part: what ran keeps its reply and is not sent again; what was
    /// refused takes new numbers (a transaction whose `EXEC` was refused: its numbering `SET`
    /// and the redo of its push); a refused wait is not waited again. Then `run` sends only
    /// the refused calls, and returns every reply.
    #[test]
    fn a_partly_refused_round_trip_sends_again_only_what_was_refused() {
        let reply = |resp: &str| redis::parse_redis_value(resp.as_bytes()).expect("a reply");
        let loading = || reply("-LOADING Redis is loading the dataset in memory\r\n");
        let mut sequence = Sequence::new("test", "partly");
        let numbered = |n: &str| Call::command("ECHO").numbered(n.to_owned());
        let redo = Redo { list: "q".into(), wake: "w".into(), seq_key: "s".into(), seq: "3".into() };
        let mut push = Call::command("LPUSH").arg("q").arg("m");
        push.redo = Some(redo);
        let mut calls = vec![
            numbered("1"),
            Call::command("BLPOP").arg("w").arg("1"),
            numbered("2"),
            Call::command("MULTI"),
            Call::command("SET").arg("s").numbered("3".into()),
            push,
            Call::command("EXEC"),
        ];
        for _ in 0..4 {
            sequence.next_number(); // numbers 1 to 4 are taken
        }
        let replies = vec![
            loading(),
            loading(),
            reply(":1\r\n"),
            reply("+OK\r\n"),
            loading(),
            loading(),
            reply("-EXECABORT Transaction discarded\r\n"),
        ];
        assert!(matches!(readiness(calls.iter(), &replies), Readiness::Partly(_)));
        let todo: Vec<usize> = (0..calls.len()).collect();
        keep_what_ran(&mut calls, &todo, replies, Some(&mut sequence));
        assert_eq!(calls[0].args[0], b"5", "refused: a new number");
        assert!(calls[0].done.is_none());
        assert_eq!(calls[1].done, Some(Value::Nil), "a refused wait is not waited again");
        assert_eq!(calls[2].done, Some(Value::Int(1)), "ran: kept");
        assert!(calls[3..].iter().all(|call| call.done.is_none()), "the transaction did not run");
        assert_eq!(calls[4].args[1], b"6", "its numbering SET: a new number");
        assert_eq!(calls[5].redo.as_ref().map(|r| r.seq.as_str()), Some("6"), "its redo follows");

        // Sent again: only what was refused runs (a done `LPUSH` would leave an element).
        let Some(mut conn) = server() else { return };
        let key = format!("dingo-test-partly-{}", std::process::id());
        let mut done = Call::command("LPUSH").arg(key.as_bytes()).arg("twice");
        done.done = Some(Value::Int(7));
        let mut calls = vec![done, Call::command("LPUSH").arg(key.as_bytes()).arg("once")];
        let results = run(&mut conn, &mut calls, None).expect("runs");
        assert_eq!(results, [Value::Int(7), Value::Int(1)]);
        let list: Vec<String> = redis::cmd("LRANGE").arg(&key).arg(0).arg(-1).query(&mut conn).expect("LRANGE");
        let _: () = redis::cmd("DEL").arg(&key).query(&mut conn).expect("DEL");
        assert_eq!(list, ["once"]);
    }

    /// `COMPLETE` applies its runs in order on the lists themselves: two completions with
    /// reports for one caller (one element), one without a report, a report that settles
    /// nothing, the oldest and the newest message
    /// dead-lettered, a message given back; a
    /// batch sent again changes nothing; once the lease is gone, completions are rejected
    /// and nothing is stored.
    #[test]
    fn complete_applies_its_runs_in_order() {
        let Some(mut conn) = server() else { return };
        let prefix = format!("dingo-test-complete-{}", std::process::id());
        let key = |name: &str| format!("{prefix}:{{q}}:{name}");
        let names = [
            "consumers",
            "processing",
            "seq",
            "dead",
            "pending",
            "wake",
            "dead:bytes",
            "delayed",
            "delayed:wake",
            "reply",
            "notify",
        ];
        let keys: Vec<String> = names.iter().map(|n| key(n)).collect();
        let _: () = redis::cmd("DEL").arg(&keys).query(&mut conn).expect("DEL");
        // The processing list holds m1 (oldest) … m6 (newest, at its head).
        let messages = ["m1", "m2", "m3", "m4", "m5", "m6"];
        let _: () = redis::cmd("LPUSH").arg(&keys[1]).arg(&messages).query(&mut conn).expect("LPUSH");
        let _: () = redis::cmd("ZADD").arg(&keys[0]).arg(i64::MAX).arg("c1").query(&mut conn).expect("ZADD");
        let call = |seq: &str, runs: &[&str]| {
            let mut call = Call::new(&COMPLETE);
            call.keys = keys.clone();
            call = call.numbered(seq.to_owned()).arg("60000").arg("c1").arg("100").arg(SEQ_TTL).arg("0");
            for arg in runs {
                call = call.arg(*arg);
            }
            call
        };
        let runs = [
            "c", "1", "2", "r1r2", "c", "0", "1", "r", "1", "1", "p3", "d", "0", "1", "why:", "x", "0", "1", "new:",
            "q", "0", "1",
        ];
        let list = |conn: &mut redis::Connection, i: usize| -> Vec<String> {
            redis::cmd("LRANGE").arg(&keys[i]).arg(0).arg(-1).query(conn).expect("LRANGE")
        };
        for attempt in ["first", "sent again"] {
            let result = run_batch(&mut conn, &[call("1", &runs)]).expect("COMPLETE runs");
            let (owned, rejected, dropped): (i64, i64, i64) = redis::from_redis_value(result[0].clone()).expect("3");
            assert_eq!((owned, rejected, dropped), (1, 0, 0), "{attempt}");
            assert_eq!(list(&mut conn, 9), ["r1r2", "p3"], "the reports, in order, a run per element ({attempt})");
            assert!(list(&mut conn, 1).is_empty(), "every message settled ({attempt})");
            assert_eq!(list(&mut conn, 3), ["new:m6", "why:m4"], "m4, then m6, dead-lettered ({attempt})");
            assert_eq!(list(&mut conn, 4), ["m5"], "m5 back in its queue ({attempt})");
            let size: usize = redis::cmd("GET").arg(&keys[6]).query(&mut conn).expect("GET");
            assert_eq!(size, "new:m6why:m4".len(), "the dead letters' bytes are counted ({attempt})");
            assert_eq!(list(&mut conn, 10), ["1"], "one wake token for the caller ({attempt})");
        }
        let _: () = redis::cmd("LPUSH").arg(&keys[1]).arg("m6").query(&mut conn).expect("LPUSH");
        let _: () = redis::cmd("ZREM").arg(&keys[0]).arg("c1").query(&mut conn).expect("ZREM");
        let result = run_batch(&mut conn, &[call("2", &["c", "1", "1", "r3"])]).expect("COMPLETE runs");
        let (owned, rejected, dropped): (i64, i64, i64) = redis::from_redis_value(result[0].clone()).expect("3");
        assert_eq!((owned, rejected, dropped), (0, 1, 0), "fenced out: the completion is rejected");
        assert_eq!(list(&mut conn, 9), ["r1r2", "p3"], "its report is not stored");
        assert_eq!(list(&mut conn, 1), ["m6"], "its message stays for the reaper");
        let _: () = redis::cmd("DEL").arg(&keys).query(&mut conn).expect("DEL");
    }

    /// Dead letters stay within both bounds, the oldest dropped first, and the script says
    /// how many it dropped; the byte count is kept beside the list, recounted when missing
    /// (a list written before it existed) and started over when the list was removed; an
    /// entry larger than the byte bound alone is dropped itself; 0 is no bound.
    #[test]
    fn dead_letters_keep_their_bounds_oldest_dropped_first() {
        let Some(mut conn) = server() else { return };
        let prefix = format!("dingo-test-bury-{}", std::process::id());
        let (list, size) = (format!("{prefix}:{{q}}:dead"), format!("{prefix}:{{q}}:dead:bytes"));
        let _: () = redis::cmd("DEL").arg(&list).arg(&size).query(&mut conn).expect("DEL");
        let dead = |conn: &mut redis::Connection, max: &str, max_bytes: &str, entries: &[&str]| -> i64 {
            let mut call = Call::new(&DEAD).key(list.clone()).key(size.clone()).arg(max).arg(max_bytes);
            for entry in entries {
                call = call.arg("r:").arg(*entry);
            }
            let result = run_batch(conn, &[call]).expect("DEAD");
            redis::from_redis_value(result[0].clone()).expect("a count")
        };
        let state = |conn: &mut redis::Connection| -> (Vec<String>, Option<usize>) {
            let entries = redis::cmd("LRANGE").arg(&list).arg(0).arg(-1).query(conn).expect("LRANGE");
            (entries, redis::cmd("GET").arg(&size).query(conn).expect("GET"))
        };
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();

        // By count: 3 kept of 5, the two oldest dropped.
        assert_eq!(dead(&mut conn, "3", "0", &["a1", "a2", "a3", "a4", "a5"]), 2);
        assert_eq!(state(&mut conn), (strings(&["r:a5", "r:a4", "r:a3"]), Some(12)));
        // By bytes: 10 bytes hold two 4-byte entries, not three.
        assert_eq!(dead(&mut conn, "100", "10", &["b1"]), 2);
        assert_eq!(state(&mut conn), (strings(&["r:b1", "r:a5"]), Some(8)));
        // An entry over the byte bound alone is dropped itself; the older letters stay.
        assert_eq!(dead(&mut conn, "100", "10", &["too-long-entry"]), 1);
        assert_eq!(state(&mut conn), (strings(&["r:b1", "r:a5"]), Some(8)));
        // Written before the count existed: recounted once.
        let _: () = redis::cmd("DEL").arg(&list).arg(&size).query(&mut conn).expect("DEL");
        let _: () = redis::cmd("LPUSH").arg(&list).arg("r:o1").arg("r:o2").query(&mut conn).expect("LPUSH");
        assert_eq!(dead(&mut conn, "0", "0", &["c1"]), 0, "0: no bound");
        assert_eq!(state(&mut conn), (strings(&["r:c1", "r:o2", "r:o1"]), Some(12)));
        // The list removed without its count: the count starts over.
        let _: () = redis::cmd("DEL").arg(&list).query(&mut conn).expect("DEL");
        assert_eq!(dead(&mut conn, "10", "100", &["d1"]), 0);
        assert_eq!(state(&mut conn), (strings(&["r:d1"]), Some(4)));
        let _: () = redis::cmd("DEL").arg(&list).arg(&size).query(&mut conn).expect("DEL");
    }

    /// `FETCH` takes the oldest messages, newest of them at the head of the processing list,
    /// and says how many (the caller reads them there): into an empty processing list by a
    /// range copy — taking the whole queue too, which must leave it empty — and into one
    /// that holds messages by popping; with the resent flag it returns them itself, oldest
    /// first; sent again under its number, it returns what it took the first time.
    #[test]
    fn fetch_takes_the_oldest_and_leaves_them_at_the_head() {
        let Some(mut conn) = server() else { return };
        let prefix = format!("dingo-test-fetch-{}", std::process::id());
        let key = |name: &str| format!("{prefix}:{{q}}:{name}");
        let names = ["pending", "amo", "wake", "consumers", "processing", "seq", "cancelled:gen"];
        let keys: Vec<String> = names.iter().map(|n| key(n)).collect();
        let _: () = redis::cmd("DEL").arg(&keys).query(&mut conn).expect("DEL");
        // Queued oldest first: m1 is the oldest, at the tail.
        let _: () =
            redis::cmd("LPUSH").arg(&keys[0]).arg(&["m1", "m2", "m3", "m4", "m5"]).query(&mut conn).expect("LPUSH");
        let fetch = |seq: &str, count: &str, register: &str, resent: &str| {
            let mut call = Call::new(&FETCH);
            call.keys = keys.clone();
            call.arg(count).arg("60000").arg("c1").arg(register).numbered(seq.to_owned()).arg(SEQ_TTL).arg(resent)
        };
        let list = |conn: &mut redis::Connection, i: usize| -> Vec<String> {
            redis::cmd("LRANGE").arg(&keys[i]).arg(0).arg(-1).query(conn).expect("LRANGE")
        };
        let reply = |conn: &mut redis::Connection, call: Call| -> (String, Value) {
            let result = run_batch(conn, &[call]).expect("FETCH");
            let (status, value, generation): (String, Value, String) =
                redis::from_redis_value(result[0].clone()).expect("a status, a value and a generation");
            assert_eq!(generation, "0", "nobody cancelled");
            (status, value)
        };

        let (status, taken) = reply(&mut conn, fetch("1", "2", "1", "0"));
        assert_eq!((status.as_str(), taken), ("ok", Value::Int(2)));
        assert_eq!(list(&mut conn, 4), ["m2", "m1"], "the two oldest, newest of them at the head");
        assert_eq!(list(&mut conn, 0), ["m5", "m4", "m3"]);

        let (status, taken) = reply(&mut conn, fetch("2", "1", "0", "0"));
        assert_eq!((status.as_str(), taken), ("ok", Value::Int(1)), "into a list that holds messages");
        assert_eq!(list(&mut conn, 4), ["m3", "m2", "m1"]);

        let (status, again) = reply(&mut conn, fetch("2", "1", "0", "0"));
        let again: Vec<String> = redis::from_redis_value(again).expect("messages");
        assert_eq!((status.as_str(), again), ("again", vec!["m3".to_owned()]), "what the first attempt took");

        let _: () = redis::cmd("DEL").arg(&keys[4]).query(&mut conn).expect("DEL");
        let (status, taken) = reply(&mut conn, fetch("3", "10", "0", "1"));
        let taken: Vec<String> = redis::from_redis_value(taken).expect("messages");
        assert_eq!((status.as_str(), taken), ("ok", vec!["m4".to_owned(), "m5".to_owned()]), "resent: inline");
        assert_eq!(list(&mut conn, 4), ["m5", "m4"]);
        assert!(list(&mut conn, 0).is_empty(), "the whole queue was taken");

        let (status, taken) = reply(&mut conn, fetch("4", "10", "0", "0"));
        assert_eq!((status.as_str(), taken), ("ok", Value::Int(0)), "nothing left");
        let _: () = redis::cmd("DEL").arg(&keys).query(&mut conn).expect("DEL");
    }

    /// A numbered call refused with NOSCRIPT while a later call of the same sender ran is
    /// sent again under a new number; under its old one `seen` would skip it (the later
    /// number is higher), and its messages would be lost although the sender was told they
    /// were queued.
    #[test]
    fn a_call_sent_again_after_noscript_gets_a_new_number() {
        let Some(mut conn) = server() else { return };
        // A script the server has not seen (unique body), loaded by the pipeline itself
        // between its two calls, as a script cache flushed and refilled would be.
        let body = format!(
            "\n{}\n-- {}\nif seen(KEYS[2], ARGV[1], 60000) then return 0 end\nreturn redis.call('LPUSH', KEYS[1], ARGV[2])",
            include_str!("lua/includes/seen.lua"),
            std::process::id()
        );
        let script: &'static Script = Box::leak(Box::new(Script::new(&body)));
        let prefix = format!("dingo-test-noscript-{}-{}", std::process::id(), script.get_hash());
        let (list, seq_key) = (format!("{prefix}:{{q}}:list"), format!("{prefix}:{{q}}:seq"));
        let mut sequence = Sequence::new("test", "noscript");
        let call = |sequence: &mut Sequence, message: &str| {
            Call::new(script).key(list.clone()).key(seq_key.clone()).numbered(sequence.next_number()).arg(message)
        };
        let first = call(&mut sequence, "first");
        let load = Call::command("SCRIPT").arg("LOAD").arg(body.as_bytes());
        let second = call(&mut sequence, "second");
        let mut calls = vec![first, load, second];
        run(&mut conn, &mut calls, Some(&mut sequence)).expect("the batch runs");
        let queued: Vec<String> = redis::cmd("LRANGE").arg(&list).arg(0).arg(-1).query(&mut conn).expect("LRANGE");
        let _: () = redis::cmd("DEL").arg(&list).arg(&seq_key).query(&mut conn).expect("DEL");
        assert_eq!(queued, ["first", "second"], "both messages are queued (the first sent again, last)");
        assert_eq!(calls[0].args[0], b"3", "the call sent again took a new number");
    }

    /// The server's clock, in ms since the Unix epoch (what the scripts compare due times to).
    fn server_now(conn: &mut redis::Connection) -> i64 {
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query(conn).expect("TIME");
        secs * 1000 + micros / 1000
    }

    /// A message as the wire ends it: `4, 1, flags, 0` (flag 4: at most once).
    fn message(body: &str, at_most_once: bool) -> Vec<u8> {
        let mut m = body.as_bytes().to_vec();
        m.extend_from_slice(&[4, 1, if at_most_once { 4 | 2 } else { 2 }, 0]);
        m
    }

    /// `DELAY` adds its messages once (sent again under its number, it adds nothing), and
    /// wakes a promoter only for a message due before everything the set held.
    #[test]
    fn delay_adds_once_and_wakes_for_an_earlier_message() {
        let Some(mut conn) = server() else { return };
        let prefix = format!("dingo-test-delay-{}", std::process::id());
        let keys: Vec<String> =
            ["delayed", "delayed:wake", "seq"].iter().map(|n| format!("{prefix}:{{q}}:{n}")).collect();
        let _: () = redis::cmd("DEL").arg(&keys).query(&mut conn).expect("DEL");
        let delay = |conn: &mut redis::Connection, seq: &str, pairs: &[(&str, &str)]| -> i64 {
            let mut call = Call::new(&DELAY);
            call.keys = keys.clone();
            call = call.numbered(seq.to_owned()).arg(SEQ_TTL);
            for (due, m) in pairs {
                call = call.arg(*due).arg(*m);
            }
            redis::from_redis_value(run_batch(conn, &[call]).expect("DELAY")[0].clone()).expect("a count")
        };
        let wake =
            |conn: &mut redis::Connection| -> i64 { redis::cmd("LLEN").arg(&keys[1]).query(conn).expect("LLEN") };
        let members = |conn: &mut redis::Connection| -> Vec<(String, i64)> {
            redis::cmd("ZRANGEBYSCORE")
                .arg(&keys[0])
                .arg("-inf")
                .arg("+inf")
                .arg("WITHSCORES")
                .query(conn)
                .expect("ZRANGE")
        };

        assert_eq!(delay(&mut conn, "1", &[("2000", "b"), ("1000", "a")]), 2);
        assert_eq!(members(&mut conn), [("a".to_owned(), 1000), ("b".to_owned(), 2000)]);
        assert_eq!(wake(&mut conn), 1, "the first ones wake a promoter");
        let _: () = redis::cmd("DEL").arg(&keys[1]).query(&mut conn).expect("DEL");
        assert_eq!(delay(&mut conn, "1", &[("10", "x")]), 0, "sent again: nothing added");
        assert_eq!(delay(&mut conn, "2", &[("1500", "c")]), 1);
        assert_eq!(wake(&mut conn), 0, "due after the earliest: nobody to wake");
        assert_eq!(delay(&mut conn, "3", &[("500", "d"), ("3000", "e")]), 2);
        assert_eq!(wake(&mut conn), 1, "due before the earliest: a promoter wakes");
        assert_eq!(delay(&mut conn, "4", &[("400", "f")]), 1);
        assert_eq!(wake(&mut conn), 1, "at most one token");
        assert_eq!(delay(&mut conn, "5", &[("400", "f")]), 1);
        assert_eq!(members(&mut conn).len(), 6, "the same message twice is one");
        let _: () = redis::cmd("DEL").arg(&keys).query(&mut conn).expect("DEL");
    }

    /// `PROMOTE` moves what is due by the server's clock, oldest due first and at most its
    /// batch, where a send would have put each (at-most-once messages to their list, the
    /// rest — a member that is no message too — to the queue), leaves a wake token, and
    /// says when the next is due and what time it is.
    #[test]
    fn promote_moves_what_is_due_where_a_send_would() {
        let Some(mut conn) = server() else { return };
        let prefix = format!("dingo-test-promote-{}", std::process::id());
        let keys: Vec<String> =
            ["delayed", "pending", "amo", "wake"].iter().map(|n| format!("{prefix}:{{q}}:{n}")).collect();
        let _: () = redis::cmd("DEL").arg(&keys).query(&mut conn).expect("DEL");
        let now = server_now(&mut conn);
        let later = now + 60_000;
        let entries: [(i64, Vec<u8>); 5] = [
            (now - 30, message("m1", false)),
            (now - 20, message("m2", true)),
            (now - 10, b"garbage".to_vec()),
            (now - 5, message("m3", false)),
            (later, message("m4", false)),
        ];
        for (due, m) in &entries {
            let _: () = redis::cmd("ZADD").arg(&keys[0]).arg(*due).arg(m.as_slice()).query(&mut conn).expect("ZADD");
        }
        let promote = |conn: &mut redis::Connection, batch: &str| -> (i64, i64, i64) {
            let mut call = Call::new(&PROMOTE).arg(batch);
            call.keys = keys.clone();
            redis::from_redis_value(run_batch(conn, &[call]).expect("PROMOTE")[0].clone()).expect("three numbers")
        };
        let list = |conn: &mut redis::Connection, i: usize| -> Vec<Vec<u8>> {
            redis::cmd("LRANGE").arg(&keys[i]).arg(0).arg(-1).query(conn).expect("LRANGE")
        };

        let (moved, next, at) = promote(&mut conn, "2");
        assert_eq!((moved, next), (2, now - 10), "the batch's worth, the next due at once");
        assert!(at >= now, "the server's time");
        assert_eq!(list(&mut conn, 1), [message("m1", false)]);
        assert_eq!(list(&mut conn, 2), [message("m2", true)], "at most once: its own list");
        assert_eq!(list(&mut conn, 3), [b"1".to_vec()], "idle consumers are woken");
        let (moved, next, _) = promote(&mut conn, "100");
        assert_eq!((moved, next), (2, later));
        assert_eq!(list(&mut conn, 1), [message("m3", false), b"garbage".to_vec(), message("m1", false)], "FIFO");
        assert_eq!(list(&mut conn, 3), [b"1".to_vec()], "one token");
        let (moved, next, _) = promote(&mut conn, "100");
        assert_eq!((moved, next), (0, later), "nothing due");
        let _: () = redis::cmd("ZREM").arg(&keys[0]).arg(message("m4", false)).query(&mut conn).expect("ZREM");
        let (moved, next, _) = promote(&mut conn, "100");
        assert_eq!((moved, next), (0, -1), "nothing left");
        let _: () = redis::cmd("DEL").arg(&keys).query(&mut conn).expect("DEL");
    }

    /// A retry (`z` in `COMPLETE`) settles the oldest message and queues the next attempt in
    /// the same step — into the delayed set, waking a promoter when it is the earliest, or
    /// straight into the queue when it is due already; under a lease taken over, neither.
    #[test]
    fn complete_retries_in_the_step_that_settles() {
        let Some(mut conn) = server() else { return };
        let prefix = format!("dingo-test-retry-{}", std::process::id());
        let names = [
            "consumers",
            "processing",
            "seq",
            "dead",
            "pending",
            "wake",
            "dead:bytes",
            "delayed",
            "delayed:wake",
            "reply",
            "notify",
        ];
        let keys: Vec<String> = names.iter().map(|n| format!("{prefix}:{{q}}:{n}")).collect();
        let _: () = redis::cmd("DEL").arg(&keys).query(&mut conn).expect("DEL");
        let _: () = redis::cmd("LPUSH").arg(&keys[1]).arg(&["m1", "m2", "m3"]).query(&mut conn).expect("LPUSH");
        let _: () = redis::cmd("ZADD").arg(&keys[0]).arg(i64::MAX).arg("c1").query(&mut conn).expect("ZADD");
        let now = server_now(&mut conn);
        let call = |seq: &str, runs: &[String]| {
            let mut call = Call::new(&COMPLETE);
            call.keys = keys.clone();
            call = call.numbered(seq.to_owned()).arg("60000").arg("c1").arg("100").arg(SEQ_TTL).arg("0");
            for arg in runs {
                call = call.arg(arg.as_str());
            }
            call
        };
        let list = |conn: &mut redis::Connection, i: usize| -> Vec<String> {
            redis::cmd("LRANGE").arg(&keys[i]).arg(0).arg(-1).query(conn).expect("LRANGE")
        };
        let delayed = |conn: &mut redis::Connection| -> Vec<(String, i64)> {
            redis::cmd("ZRANGEBYSCORE")
                .arg(&keys[7])
                .arg("-inf")
                .arg("+inf")
                .arg("WITHSCORES")
                .query(conn)
                .expect("ZRANGE")
        };
        let result = |conn: &mut redis::Connection, call: Call| -> (i64, i64, i64) {
            redis::from_redis_value(run_batch(conn, &[call]).expect("COMPLETE")[0].clone()).expect("3")
        };
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (later, past) = ((now + 60_000).to_string(), (now - 1).to_string());

        // m1 retried later, m2 completed, m3 retried due already.
        let runs = strings(&["z", "0", "1", &later, "m1.2", "c", "0", "1", "z", "0", "1", &past, "m3.2"]);
        assert_eq!(result(&mut conn, call("1", &runs)), (1, 0, 0));
        assert!(list(&mut conn, 1).is_empty(), "all three settled");
        assert_eq!(delayed(&mut conn), [("m1.2".to_owned(), now + 60_000)]);
        assert_eq!(list(&mut conn, 8), ["1"], "the earliest: a promoter is woken");
        assert_eq!(list(&mut conn, 4), ["m3.2"], "due already: straight to the queue");
        assert_eq!(list(&mut conn, 5), ["1"], "and a consumer is woken");
        assert_eq!(result(&mut conn, call("1", &runs)), (1, 0, 0), "sent again");
        assert_eq!(delayed(&mut conn).len(), 1, "nothing twice");

        // Fenced: the lease is gone, nothing is settled or retried.
        let _: () = redis::cmd("LPUSH").arg(&keys[1]).arg("m4").query(&mut conn).expect("LPUSH");
        let _: () = redis::cmd("ZREM").arg(&keys[0]).arg("c1").query(&mut conn).expect("ZREM");
        let runs = strings(&["z", "0", "1", &later, "m4.2"]);
        assert_eq!(result(&mut conn, call("2", &runs)), (0, 1, 0), "rejected");
        assert_eq!(list(&mut conn, 1), ["m4"], "its message stays for the reaper");
        assert_eq!(delayed(&mut conn).len(), 1, "no next attempt");
        let _: () = redis::cmd("DEL").arg(&keys).query(&mut conn).expect("DEL");
    }

    /// `CANCEL` records a cancel (extending, never shortening one), prunes lapsed ones,
    /// moves the generation on and sets both keys to expire with the last cancel; `CANCELS`
    /// answers with the generation alone while it is the one given, else with the live
    /// cancels.
    #[test]
    fn cancels_are_recorded_pruned_and_loaded_by_generation() {
        let Some(mut conn) = server() else { return };
        let prefix = format!("dingo-test-cancel-{}", std::process::id());
        let keys: Vec<String> =
            ["cancelled", "cancelled:gen", "cancelled:log"].iter().map(|n| format!("{prefix}:{{q}}:{n}")).collect();
        let _: () = redis::cmd("DEL").arg(&keys).query(&mut conn).expect("DEL");
        let now = server_now(&mut conn);
        let cancel = |conn: &mut redis::Connection, until: i64, id: &str| {
            let mut call = Call::new(&CANCEL).arg(until.to_string()).arg(id);
            call.keys = keys.clone();
            run_batch(conn, &[call]).expect("CANCEL");
        };
        let load = |conn: &mut redis::Connection, known: &str| -> Vec<Value> {
            let mut call = Call::new(&CANCELS).arg(known);
            call.keys = keys.clone();
            redis::from_redis_value(run_batch(conn, &[call]).expect("CANCELS")[0].clone()).expect("an array")
        };
        let generation = |conn: &mut redis::Connection| -> u64 {
            redis::cmd("GET").arg(&keys[1]).query::<String>(conn).expect("GET").parse().expect("a number")
        };
        assert_eq!(load(&mut conn, "0"), [Value::BulkString(b"0".to_vec())], "nothing cancelled");

        cancel(&mut conn, now + 60_000, "a");
        let first = generation(&mut conn);
        assert!(first > 1_000_000_000_000_000, "µs of the server's clock: {first}");
        cancel(&mut conn, now + 30_000, "a");
        cancel(&mut conn, now + 50, "b");
        let second = generation(&mut conn);
        assert!(second > first);
        let reply = load(&mut conn, &first.to_string());
        let members: Vec<(String, i64)> = redis::from_redis_value(reply[1].clone()).expect("pairs");
        // Both were touched after `first`: in the order of their last cancel.
        assert_eq!(members, [("a".to_owned(), now + 60_000), ("b".to_owned(), now + 50)], "never shortened");
        cancel(&mut conn, now + 60_000, "d");
        let reply = load(&mut conn, &second.to_string());
        let members: Vec<(String, i64)> = redis::from_redis_value(reply[1].clone()).expect("pairs");
        assert_eq!(members, [("d".to_owned(), now + 60_000)], "only what is newer than the caller's");
        let second = generation(&mut conn);
        assert_eq!(load(&mut conn, &second.to_string()).len(), 1, "known: the generation alone");
        // A look behind the scripts (not a command dingo runs: kept out of the access scan).
        let pttl = |conn: &mut redis::Connection, key: &str| -> i64 {
            redis::Cmd::new().arg("PTTL").arg(key).query(conn).expect("PTTL")
        };
        let ttl = pttl(&mut conn, &keys[0]);
        assert!(ttl > 59_000 && ttl <= 60_000, "the set expires with its last cancel: {ttl}");
        let ttl = pttl(&mut conn, &keys[1]);
        assert!(ttl > 59_000 && ttl <= 60_000, "the generation too: {ttl}");
        let ttl = pttl(&mut conn, &keys[2]);
        assert!(ttl > 59_000 && ttl <= 60_000, "the log too: {ttl}");

        // `b` lapses; the next cancel prunes it, and one that lapsed already records nothing.
        std::thread::sleep(Duration::from_millis(100));
        cancel(&mut conn, now - 1, "c");
        let members: Vec<String> =
            redis::cmd("ZRANGEBYSCORE").arg(&keys[0]).arg("-inf").arg("+inf").query(&mut conn).expect("ZRANGE");
        assert_eq!(members, ["a", "d"]);
        let logged: Vec<String> =
            redis::cmd("ZRANGEBYSCORE").arg(&keys[2]).arg("-inf").arg("+inf").query(&mut conn).expect("ZRANGE");
        assert_eq!(logged, ["a", "d"], "lapsed ids leave the log too");
        let _: () = redis::cmd("DEL").arg(&keys).query(&mut conn).expect("DEL");
    }

    /// `UNBURY` takes exact entries once: replayed ones go where a send would put them, in
    /// their order, with a wake token and the byte count kept; an entry gone already sends
    /// nothing; sent again under its number it changes nothing and says what it did.
    #[test]
    fn unbury_takes_each_letter_once() {
        let Some(mut conn) = server() else { return };
        let prefix = format!("dingo-test-unbury-{}", std::process::id());
        let names = ["dead", "dead:bytes", "pending", "amo", "wake", "seq"];
        let keys: Vec<String> = names.iter().map(|n| format!("{prefix}:{{q}}:{n}")).collect();
        let _: () = redis::cmd("DEL").arg(&keys).query(&mut conn).expect("DEL");
        // Newest first, as `bury` leaves them: e1 is the oldest.
        let _: () = redis::cmd("LPUSH").arg(&keys[0]).arg(&["e1", "e2", "e3", "e4"]).query(&mut conn).expect("LPUSH");
        let _: () = redis::cmd("SET").arg(&keys[1]).arg(8).query(&mut conn).expect("SET");
        let unbury = |conn: &mut redis::Connection, seq: &str, mode: &str, items: &[&[u8]]| -> i64 {
            let mut call = Call::new(&UNBURY).numbered(seq.to_owned()).arg(SEQ_TTL).arg(mode);
            call.keys = keys.clone();
            call.args.extend(items.iter().map(|i| i.to_vec()));
            redis::from_redis_value(run_batch(conn, &[call]).expect("UNBURY")[0].clone()).expect("a count")
        };
        let list = |conn: &mut redis::Connection, i: usize| -> Vec<Vec<u8>> {
            redis::cmd("LRANGE").arg(&keys[i]).arg(0).arg(-1).query(conn).expect("LRANGE")
        };
        let (m1, m3) = (message("m1", false), message("m3", true));
        let items: [&[u8]; 6] = [b"e1", &m1, b"gone", b"x", b"e3", &m3];
        assert_eq!(unbury(&mut conn, "1", "replay", &items), 2);
        assert_eq!(list(&mut conn, 0), [b"e4".to_vec(), b"e2".to_vec()]);
        assert_eq!(list(&mut conn, 2), std::slice::from_ref(&m1), "to the queue");
        assert_eq!(list(&mut conn, 3), std::slice::from_ref(&m3), "at most once: its own list");
        assert_eq!(list(&mut conn, 4), [b"1".to_vec()], "a consumer is woken");
        let bytes: i64 = redis::cmd("GET").arg(&keys[1]).query(&mut conn).expect("GET");
        assert_eq!(bytes, 4);
        assert_eq!(unbury(&mut conn, "1", "replay", &items), 2, "sent again: what it did");
        assert_eq!(list(&mut conn, 2).len() + list(&mut conn, 3).len(), 2, "nothing twice");
        assert_eq!(unbury(&mut conn, "2", "replay", &items), 0, "gone already: nothing sent");
        assert_eq!(unbury(&mut conn, "3", "purge", &[b"e2", b"e4", b"e9"]), 2);
        assert!(list(&mut conn, 0).is_empty());
        let bytes: Option<i64> = redis::cmd("GET").arg(&keys[1]).query(&mut conn).expect("GET");
        assert_eq!(bytes, None, "the byte count goes with the last letter");
        let _: () = redis::cmd("DEL").arg(&keys).query(&mut conn).expect("DEL");
    }
}
