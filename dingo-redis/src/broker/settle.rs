//! The settlement vocabulary and its planner, shared by the threads that settle: worker
//! threads ([`fetcher`](super::fetcher)) store their own settlements with their next fetch,
//! the [`flusher`](super::flusher) stores those a worker parked while it runs a long task,
//! and the [`completer`](super::completer) stores what does not come from a worker thread
//! of this broker. Each depends on this module, none on another.
//!
//! A settlement ([`Settle`]) waits for its worker's next round trip as a [`Pending`];
//! [`plan`] turns settlements and other operations ([`Op`]) into the script calls of one
//! round trip ([`Plan`]), each call with what to do with its result ([`Kind`], counted by
//! [`account`]).
//!
//! Consecutive settlements of one consumer on one queue share one `COMPLETE` script, in
//! order: final reports stored with their messages removed from the processing list in
//! the same step. Reports of one call keep their order: they leave in order, by one channel
//! or one connection. A batch of reports stored in one step is one list element, the
//! reports back to back (each is self-delimiting), so Redis stores and the listener reads
//! one value per batch, not per report.
//!
//! Settlements wait for the next fetch only while tasks are quick: a worker *parks* what it
//! holds before it starts a task ([`Parked`]); if that task runs past [`FLUSH_AFTER`], the
//! flusher stores them, so a quick task's result never waits for a slow task behind it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dingo_core::broker::Ack;
use dingo_core::event::{Event, EventKind, Level, Origin};
use redis::Value;

use super::{Inner, dead_entry};
use crate::conn::Conn;
use crate::keys::QueueKeys;
use crate::scripts::{self, Call, SEQ_TTL, Sequence};
use dingo_core::broker::kit::{lock, wait};

/// The most bytes of reports joined into one list element (a report larger than this is
/// an element of its own): far below Redis's 512 MB limit on a value, and small enough that
/// one element never holds up a listener for long.
const MAX_JOINED: usize = 1 << 20;

/// What to do with one message of a consumer's processing list (or one report).
pub(crate) enum Settle {
    /// The oldest message is done: remove it, storing its final report for `caller`, if any.
    Complete { caller: Option<Arc<str>>, bytes: Option<Vec<u8>> },
    /// The final report of an at-most-once task this worker thread ran: stored with plain
    /// commands, not sent again after a broken connection (at most once).
    Report { caller: Arc<str>, bytes: Vec<u8> },
    /// The oldest message cannot run: to the dead letters, whole, or (`keep` > 0) only its
    /// first `keep` bytes (it is over the size limit).
    Dead { reason: String, keep: usize },
    /// The newest message was never started: back to the front of its queue.
    Requeue,
    /// The newest message cannot run: to the dead letters, as [`Settle::Dead`].
    DeadNewest { reason: String, keep: usize },
    /// The oldest message failed and is tried again: remove it, and queue `bytes` (its next
    /// attempt) for `due` (ms since the Unix epoch) in the same step.
    Retry { due: u64, bytes: Vec<u8> },
}

impl Settle {
    /// Whether it removes a message from its consumer's processing list (by position): all
    /// but reports, which settle nothing.
    pub(crate) fn is_positional(&self) -> bool {
        !matches!(self, Settle::Report { .. })
    }
}

/// One thing for the background writer.
pub(crate) enum Op {
    /// A report for caller process `caller` (stored once, however often it is retried),
    /// then the delivery `then` is acknowledged: a task from another transport or broker
    /// counts as done only once its final report is stored.
    Report { queue: Arc<QueueKeys>, caller: Arc<str>, bytes: Vec<u8>, then: Option<Ack> },
    /// Settlements of one consumer, in order.
    Settle { queue: Arc<QueueKeys>, consumer: Arc<str>, settles: Vec<Settle> },
    /// A message without a lease (at-most-once, undecodable) to the dead letters.
    Dead { queue: Arc<QueueKeys>, reason: String, bytes: Vec<u8> },
    /// At-most-once messages given back unstarted.
    GiveBack { queue: Arc<QueueKeys>, messages: Vec<Vec<u8>> },
}

/// A settlement waiting for the worker's next round trip.
pub(crate) struct Pending {
    pub(crate) queue: Arc<QueueKeys>,
    pub(crate) consumer: Arc<str>,
    pub(crate) settle: Settle,
}

impl Pending {
    pub(crate) fn into_op(self) -> Op {
        Op::Settle { queue: self.queue, consumer: self.consumer, settles: vec![self.settle] }
    }
}

/// A consumer of a worker thread on one queue: the queue's keys and the consumer's id.
pub(crate) type QueueConsumer = (Arc<QueueKeys>, Arc<str>);

/// The consumers whose processing lists `done` settles (see `Settle::is_positional`).
pub(crate) fn settled_by(done: &[Pending]) -> Vec<QueueConsumer> {
    let mut consumers: Vec<QueueConsumer> = Vec::new();
    for pending in done {
        if pending.settle.is_positional() && !consumers.iter().any(|(_, c)| *c == pending.consumer) {
            consumers.push((pending.queue.clone(), pending.consumer.clone()));
        }
    }
    consumers
}

/// How long a finished task's settlement may wait to ride along with its worker's next
/// round trip.
pub(crate) const FLUSH_AFTER: Duration = Duration::from_micros(200);

/// One worker thread's parked settlements.
pub(crate) struct Parked {
    state: Mutex<ParkedState>,
    /// Notified when the flusher is done storing (see [`ParkedState::storing`]).
    pub(crate) stored: Condvar,
    /// Its subscription stopped: storing gives up on an unreachable Redis (the tasks run
    /// again after their lease) instead of holding the worker's stop up.
    pub(crate) stop: Arc<AtomicBool>,
}

/// What a worker parked, and the flusher's hold on it.
#[derive(Default)]
pub(crate) struct ParkedState {
    /// Oldest first.
    pub(crate) done: Vec<Pending>,
    /// Consumers whose parked settlements the flusher could not store, for the worker to
    /// abandon.
    pub(crate) failed: Vec<QueueConsumer>,
    /// When the oldest was parked.
    pub(crate) since: Option<Instant>,
    /// The flusher is storing what was parked.
    pub(crate) storing: bool,
    /// The flusher watches this worker.
    pub(crate) watched: bool,
}

impl Parked {
    pub(crate) fn new(stop: Arc<AtomicBool>) -> Parked {
        Parked { state: Mutex::default(), stored: Condvar::new(), stop }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, ParkedState> {
        lock(&self.state)
    }

    /// Parks `done` at `now` (the worker took back what it parked before, see
    /// [`reclaim`](Parked::reclaim)); `true` when the flusher must be told to watch this
    /// worker.
    pub(crate) fn park(&self, done: &mut Vec<Pending>, now: Instant) -> bool {
        let mut state = self.lock();
        debug_assert!(state.done.is_empty(), "parked settlements are taken back before the next park");
        // Swapped, not moved: the worker's and the parked vectors keep their capacity.
        std::mem::swap(&mut state.done, done);
        state.since = Some(now);
        !std::mem::replace(&mut state.watched, true)
    }

    /// Takes the parked settlements back, to go before `done` — after the flusher stored
    /// them, if it is doing so (then there is nothing left to take). Returns the consumers
    /// whose settlements the flusher could not store. The worker calls this before every
    /// round trip and every park.
    pub(crate) fn reclaim(&self, done: &mut Vec<Pending>) -> Vec<QueueConsumer> {
        let mut state = self.lock();
        while state.storing {
            state = wait(&self.stored, state);
        }
        state.since = None;
        if !state.done.is_empty() {
            state.done.append(done);
            std::mem::swap(done, &mut state.done);
        }
        std::mem::take(&mut state.failed)
    }
}

/// The plan for a worker thread's settlements, in order.
pub(crate) fn settle_calls(inner: &Inner, done: Vec<Pending>, sequence: &mut Sequence) -> Plan {
    let mut ops: Vec<Op> = Vec::new();
    for pending in done {
        match ops.last_mut() {
            Some(Op::Settle { queue, consumer, settles })
                if queue.prefix == pending.queue.prefix && *consumer == pending.consumer =>
            {
                settles.push(pending.settle);
            }
            _ => {
                ops.push(Op::Settle { queue: pending.queue, consumer: pending.consumer, settles: vec![pending.settle] })
            }
        }
    }
    plan(inner, ops, sequence)
}

/// The calls for some operations, with what to do with their results.
#[derive(Default)]
pub(crate) struct Plan {
    pub(crate) calls: Vec<Call>,
    pub(crate) kinds: Vec<Kind>,
    /// The reply list the last call pushes reports to, while it is the last call: the
    /// next report for that list joins it.
    open_report: Option<String>,
}

#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A `COMPLETE` with this many final reports (its result: how many of them and of the
    /// retries were rejected), retries and dead letters (and, with some, the prefix of their
    /// queue).
    Complete { finals: usize, retries: usize, dead: usize, queue: Option<Arc<str>> },
    /// A `DEAD` of `count` messages of queue (prefix) `queue`.
    Dead { queue: Arc<str>, count: usize },
    /// A plain command of storing reports that settle nothing (progress, at-most-once
    /// tasks); `reports` is how many it stores. Not repeated (see [`Kind::repeatable`]).
    Report { reports: usize },
    /// A worker's fetch: the `FETCH` script, or (`at_most_once`) a plain pop of the
    /// at-most-once list, not repeated.
    Fetch { at_most_once: bool },
    /// At-most-once tasks given back unstarted (`GIVE_BACK`), not repeated.
    GiveBack,
    /// The read of the head of a processing list after its `FETCH` (what it took).
    Head,
    /// A worker's blocking wait for work (on its queues' wake lists and its control list),
    /// after its settlements and before its fetches: not repeated (it may have taken the
    /// wake-up a retried fetch finds work by anyway).
    Wait,
}

impl Kind {
    /// Whether the call may be sent again after the connection broke with it on its way.
    /// Scripts apply once (numbered batches); the plain commands of the at-most-once path
    /// are left out of the retry — what they carried may be lost, never doubled.
    pub(crate) fn repeatable(&self) -> bool {
        !matches!(self, Kind::Report { .. } | Kind::Fetch { at_most_once: true } | Kind::GiveBack | Kind::Wait)
    }
}

impl Plan {
    /// Keeps only the repeatable calls, for a retry after the connection broke with the
    /// plan on its way; returns how many reports, and how many commands taking or giving
    /// back at-most-once tasks, that leaves out.
    fn keep_repeatable(&mut self) -> (usize, usize) {
        let (mut reports, mut commands) = (0, 0);
        // A call that ran already (see `Call::done`) keeps its place: it is not sent again,
        // and its reply counts.
        let keep: Vec<bool> = self
            .calls
            .iter()
            .zip(&self.kinds)
            .map(|(call, kind)| {
                let keep = kind.repeatable() || call.done.is_some();
                match *kind {
                    Kind::Report { reports: n } if !keep => reports += n,
                    Kind::Fetch { at_most_once: true } | Kind::GiveBack if !keep => commands += 1,
                    _ => {}
                }
                keep
            })
            .collect();
        let mut flags = keep.iter();
        self.calls.retain(|_| flags.next().copied().unwrap_or(false));
        let mut flags = keep.iter();
        self.kinds.retain(|_| flags.next().copied().unwrap_or(false));
        (reports, commands)
    }

    pub(crate) fn push(&mut self, call: Call, kind: Kind) {
        self.calls.push(call);
        self.kinds.push(kind);
        self.open_report = None;
    }

    /// Stores a report that settles nothing (progress, at-most-once tasks) with plain
    /// commands — no script: these are the at-most-once path's whole cost. Consecutive
    /// reports for one reply list share one push, back to back in one list element.
    fn report(&mut self, inner: &Inner, queue: &QueueKeys, caller: &str, bytes: Vec<u8>) {
        if self.open_report.as_deref().is_some_and(|open| queue.is_reply(open, caller)) {
            // The push is followed by four calls (expiry, notify token, …).
            let at = self.calls.len() - 5;
            let args = &mut self.calls[at].args;
            match args.last_mut() {
                Some(joined) if joined.len() + bytes.len() <= MAX_JOINED => joined.extend_from_slice(&bytes),
                _ => args.push(bytes),
            }
            if let Kind::Report { reports } = &mut self.kinds[at] {
                *reports += 1;
            }
            return;
        }
        let reply = queue.reply(caller);
        let ttl = inner.options.result_ttl.as_millis().to_string();
        let notify = queue.notify(caller);
        let none = || Kind::Report { reports: 0 };
        self.push(Call::command("RPUSH").arg(reply.as_bytes()).arg(bytes), Kind::Report { reports: 1 });
        self.push(Call::command("PEXPIRE").arg(reply.as_bytes()).arg(ttl.as_bytes()), none());
        self.push(Call::command("LPUSH").arg(notify.as_bytes()).arg("1"), none());
        self.push(Call::command("LTRIM").arg(notify.as_bytes()).arg("0").arg("0"), none());
        self.push(Call::command("PEXPIRE").arg(notify.as_bytes()).arg(ttl), none());
        self.open_report = Some(reply);
    }

    /// Runs the plan in one round trip until it goes through: reconnecting with backoff,
    /// and leaving out of a retry what must not run twice (saying so in an event) — and a
    /// wait, which may have taken the wake-up the retried fetch needs. `None` when `stop`
    /// ended the retries. Each call that ran comes back with its kind and result.
    /// `sequence` numbers calls sent again (see `scripts::run`).
    pub(crate) fn run(
        &mut self,
        inner: &Inner,
        conn: &mut Conn,
        stop: &AtomicBool,
        sequence: &mut Sequence,
    ) -> Option<redis::RedisResult<Vec<(Kind, Value)>>> {
        let (mut reports, mut tasks) = (0, 0);
        let mut retrying = false;
        let result = conn.retry_tracked(stop, &mut |c, again| {
            if again && !retrying {
                retrying = true;
                (reports, tasks) = self.keep_repeatable();
            }
            scripts::run(c, &mut self.calls, Some(&mut *sequence))
        });
        if reports > 0 {
            inner.events.emit(Event::new(
                Origin::Reporter,
                Level::Warning,
                EventKind::ReportFailed,
                format!(
                    "the connection broke while {reports} report(s) of at-most-once tasks were on their way: they \
                     are not sent twice, and may be lost"
                ),
            ));
        }
        if tasks > 0 {
            // Usually nothing: most fetches find no at-most-once task.
            inner.events.emit(Event::new(
                Origin::Consumer,
                Level::Info,
                EventKind::InDoubt,
                format!(
                    "the connection broke while {tasks} command(s) taking or giving back at-most-once tasks were on \
                     their way: they are not sent twice, and the tasks they carried, if any, are lost"
                ),
            ));
        }
        let kinds = std::mem::take(&mut self.kinds);
        result.map(|r| r.map(|values| kinds.into_iter().zip(values).collect()))
    }
}

/// The calls for some operations, in order; report bytes move into the calls.
pub(crate) fn plan(inner: &Inner, ops: Vec<Op>, sequence: &mut Sequence) -> Plan {
    let mut plan = Plan::default();
    for op in ops {
        match op {
            Op::Report { queue, caller, bytes, then: _ } => {
                let (call, kind) = complete(inner, &queue, "", vec![Settle::Report { caller, bytes }], sequence);
                plan.push(call, kind);
            }
            Op::Settle { queue, consumer, settles } => {
                // Final reports of at-most-once tasks leave as plain commands, in order with
                // the settlements around them.
                let mut run = Vec::new();
                for settle in settles {
                    match settle {
                        Settle::Report { caller, bytes } => {
                            if !run.is_empty() {
                                let (call, kind) =
                                    complete(inner, &queue, &consumer, std::mem::take(&mut run), sequence);
                                plan.push(call, kind);
                            }
                            plan.report(inner, &queue, &caller, bytes);
                        }
                        other => run.push(other),
                    }
                }
                if !run.is_empty() {
                    let (call, kind) = complete(inner, &queue, &consumer, run, sequence);
                    plan.push(call, kind);
                }
            }
            Op::Dead { queue, reason, bytes } => {
                let call = Call::new(&scripts::DEAD)
                    .key(queue.dead.clone())
                    .key(queue.dead_bytes.clone())
                    .arg(inner.options.max_dead_letters.to_string())
                    .arg(inner.options.max_dead_letter_bytes.to_string())
                    .arg(dead_entry::prefix(&reason))
                    .arg(bytes);
                plan.push(call, Kind::Dead { queue: Arc::from(queue.prefix.as_str()), count: 1 });
            }
            Op::GiveBack { queue, messages } => {
                let mut call = Call::new(&scripts::GIVE_BACK).key(queue.amo.clone()).key(queue.wake.clone());
                call.args.extend(messages);
                plan.push(call, Kind::GiveBack);
            }
        }
    }
    plan
}

/// A `COMPLETE` call for one consumer's settlements.
fn complete(
    inner: &Inner,
    queue: &QueueKeys,
    consumer: &str,
    settles: Vec<Settle>,
    sequence: &mut Sequence,
) -> (Call, Kind) {
    let (seq_key, seq) = sequence.next(queue);
    let mut call = Call::new(&scripts::COMPLETE)
        .key(queue.consumers.clone())
        .key(format!("{}{consumer}", queue.processing))
        .key(seq_key)
        .key(queue.dead.clone())
        .key(queue.pending.clone())
        .key(queue.wake.clone())
        .key(queue.dead_bytes.clone())
        .key(queue.delayed.clone())
        .key(queue.delayed_wake.clone())
        .numbered(seq)
        .arg(inner.options.result_ttl.as_millis().to_string())
        .arg(consumer)
        .arg(inner.options.max_dead_letters.to_string())
        .arg(SEQ_TTL)
        .arg(inner.options.max_dead_letter_bytes.to_string());
    let mut callers: Vec<Arc<str>> = Vec::new();
    let (mut finals, mut retries, mut dead) = (0, 0, 0);
    let mut runs = Runs::default();
    for settle in settles {
        match settle {
            Settle::Complete { caller, bytes } => {
                finals += 1;
                match caller {
                    Some(caller) => {
                        let k = reply_index(&mut callers, &mut call, queue, caller);
                        runs.add(&mut call, "c", k, Some(bytes.unwrap_or_default()));
                    }
                    None => runs.add(&mut call, "c", 0, None),
                }
            }
            // Planned as plain commands by `plan`; stored by the script all the same.
            Settle::Report { caller, bytes } => {
                let k = reply_index(&mut callers, &mut call, queue, caller);
                runs.add(&mut call, "r", k, Some(bytes));
            }
            // k: how many of the message's first bytes to keep (0: all of them).
            Settle::Dead { reason, keep } => {
                dead += 1;
                runs.add(&mut call, "d", keep, Some(dead_entry::prefix(&reason)));
            }
            Settle::DeadNewest { reason, keep } => {
                dead += 1;
                runs.add(&mut call, "x", keep, Some(dead_entry::prefix(&reason)));
            }
            Settle::Requeue => runs.add(&mut call, "q", 0, None),
            Settle::Retry { due, bytes } => {
                retries += 1;
                runs.add(&mut call, "z", 0, Some(due.to_string().into_bytes()));
                // Its second item: `z` reads a due time and a message per retry.
                call.args.push(bytes);
            }
        }
    }
    runs.close(&mut call);
    let queue = (dead > 0).then(|| Arc::from(queue.prefix.as_str()));
    (call, Kind::Complete { finals, retries, dead, queue })
}

/// Groups a `COMPLETE`'s settlements into runs of one operation and reply list: a header
/// (op, k, n) in the call's arguments, its data after it — the run's reports back to back
/// in one argument (`r`, `c` with k > 0), or one item each (dead-letter reasons).
#[derive(Default)]
struct Runs {
    /// The open run: its op, k, and where its header's count goes in the arguments.
    open: Option<(&'static str, usize, usize)>,
    count: usize,
}

impl Runs {
    /// Longest run: bounds the dead letters a script loop moves at once.
    const MAX: usize = 1000;

    fn add(&mut self, call: &mut Call, op: &'static str, k: usize, data: Option<Vec<u8>>) {
        let reports = op == "r" || (op == "c" && k > 0);
        let room = !reports || call.args.last().map_or(0, Vec::len) + data.as_ref().map_or(0, Vec::len) <= MAX_JOINED;
        let joins = matches!(self.open, Some((o, j, _)) if o == op && j == k) && self.count < Runs::MAX && room;
        if !joins {
            self.close(call);
            call.args.extend([op.as_bytes().to_vec(), k.to_string().into_bytes(), Vec::new()]);
            self.open = Some((op, k, call.args.len() - 1));
            self.count = 0;
            if reports {
                call.args.push(Vec::new());
            }
        }
        self.count += 1;
        match (data, call.args.last_mut()) {
            (Some(data), Some(joined)) if reports => joined.extend_from_slice(&data),
            (Some(data), _) => call.args.push(data),
            (None, _) => {}
        }
    }

    fn close(&mut self, call: &mut Call) {
        if let Some((_, _, at)) = self.open.take() {
            call.args[at] = self.count.to_string().into_bytes();
        }
    }
}

/// The 1-based index of `caller`'s reply list among a `COMPLETE`'s (`KEYS[6 + 2k]`, its
/// notify list `KEYS[7 + 2k]`), added if new.
fn reply_index(callers: &mut Vec<Arc<str>>, call: &mut Call, queue: &QueueKeys, caller: Arc<str>) -> usize {
    if let Some(i) = callers.iter().position(|c| *c == caller) {
        return i + 1;
    }
    call.keys.push(queue.reply(&caller));
    call.keys.push(queue.notify(&caller));
    callers.push(caller);
    callers.len()
}

/// Counts what a batch did, and warns about reports rejected by fencing.
pub(crate) fn account(inner: &Inner, results: &[(Kind, Value)]) {
    for (kind, result) in results {
        match kind {
            Kind::Complete { finals, retries, dead, queue } => {
                let (owned, rejected, dropped): (i64, usize, u64) =
                    redis::from_redis_value(result.clone()).unwrap_or((1, 0, 0));
                // Rejected: all of them or none (the lease stood or it did not).
                inner.stats.completed.fetch_add((finals - rejected.min(*finals)) as u64, Ordering::Relaxed);
                if owned == 1 {
                    inner.stats.dead_lettered.fetch_add(*dead as u64, Ordering::Relaxed);
                    inner.stats.retried.fetch_add(*retries as u64, Ordering::Relaxed);
                }
                if let Some(queue) = queue {
                    dropped_dead_letters(inner, queue, dropped);
                }
                if rejected > 0 {
                    inner.stats.rejected_reports.fetch_add(rejected as u64, Ordering::Relaxed);
                    inner.events.emit(Event::new(
                        Origin::Reporter,
                        Level::Warning,
                        EventKind::ReportFailed,
                        format!(
                            "{rejected} late report(s) or retries rejected: this worker's lease had expired and its \
                             tasks were handed to other workers"
                        ),
                    ));
                }
            }
            Kind::Dead { queue, count } => {
                inner.stats.dead_lettered.fetch_add(*count as u64, Ordering::Relaxed);
                let dropped: u64 = redis::from_redis_value(result.clone()).unwrap_or(0);
                dropped_dead_letters(inner, queue, dropped);
            }
            Kind::Report { .. } | Kind::Fetch { .. } | Kind::GiveBack | Kind::Head | Kind::Wait => {}
        }
    }
}

/// Counts dead letters a script dropped (`dropped`, oldest first) to keep the dead-letter
/// list of queue `prefix` within its bounds, with an event.
pub(crate) fn dropped_dead_letters(inner: &Inner, prefix: &str, dropped: u64) {
    if dropped == 0 {
        return;
    }
    inner.stats.dead_letters_dropped.fetch_add(dropped, Ordering::Relaxed);
    let options = &inner.options;
    inner.events.emit(Event::new(
        Origin::Consumer,
        Level::Warning,
        EventKind::DeadLettersDropped,
        format!(
            "{dropped} dead letter(s) of `{prefix}` dropped, oldest first: a queue keeps at most {} dead letters \
             (max_dead_letters) in {} bytes (max_dead_letter_bytes; 0: no bound)",
            options.max_dead_letters, options.max_dead_letter_bytes
        ),
    ));
}
