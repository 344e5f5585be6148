//! A consumer's subscription. Each worker thread of the pool talks to Redis itself, on a
//! connection of its own, as a consumer with its own processing list and lease per queue:
//! it moves a batch of tasks into its processing list (one `FETCH` script per queue), runs
//! them in order, and settles them in the same order — final report stored and message
//! removed by one `COMPLETE` script — together with its next fetch, in one round trip. A
//! worker whose last fetch drained its queues puts a blocking wait on the queues' wake lists
//! between its settlements (stored at once) and its next fetch (run by the server the
//! moment work arrives): one round trip per task when tasks come one at a time.
//!
//! Settlements wait for the next fetch only while tasks are quick: one older than
//! [`FLUSH_AFTER`], or one of a task that ran longer than that, is written before the worker
//! starts another task; the others are parked while it runs, and stored by the flusher
//! thread if that task runs past [`FLUSH_AFTER`] (see [`super::flusher`]).
//!
//! A thread's state ([`Local`]) is its own, but not thread-local only: it sits in a
//! [`Slot`] (behind a lock nobody else takes on the normal path), which the thread keeps in
//! [`LOCAL`] and the subscription keeps by thread id, and every acknowledgement records the
//! slot of the thread that took its task. That is for hard time limits, where another
//! thread acts for a worker that may never come back:
//!
//! - The watchdog settles the call past its limit ([`RedisAck::settle`] from the watchdog's
//!   thread): the settlement joins the owner's parked ones, after them, due at once, and the
//!   flusher stores them in order — not the background writer, which settles by position
//!   and could remove an earlier, finished task's message in its place.
//! - Then the watchdog calls [`Subscription::release_thread`]: the slot is released as a
//!   stopping thread releases its own (settlements still held stored, tasks fetched but not
//!   started requeued newest first so they keep their order at the front of the queue,
//!   consumers retired, the lease keeper told to forget them) and marked written off.
//! - A written-off slot is fenced: if the thread returns, its settlements, reports and
//!   fetches find it released and do nothing (`detach_worker` included).
//!
//! Should a written-off thread return between the watchdog's claim and its settlement, it
//! releases its own slot first (its task's message stays, the consumer is not retired); the
//! watchdog's settlement then finds no slot and goes to the background writer, which
//! removes that message — the only one left.

use std::any::Any;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use dingo_core::__internal::FastMap;
use dingo_core::broker::support;
use dingo_core::broker::{Ack, Acknowledge, ConsumeSettings, Delivery, Recv, Subscription};
use dingo_core::event::{Event, EventKind, Level, Origin};
use dingo_core::id::{IdMaker, UuidV7};
use dingo_core::message::wire::{self, Known};
use dingo_core::message::{ReplyTo, ReportBody, ReportMessage};
use dingo_core::{BrokerError, CallKey, TaskError, TaskErrorKind, TaskName};
use redis::Value;

use super::settle::{self, FLUSH_AFTER, Kind, Op, Parked, Pending, Plan, QueueConsumer, Settle, settled_by};
use super::{Inner, lock};
use crate::conn::Conn;
use crate::keys::{self, QueueKeys};
use crate::scripts::{self, Call, SEQ_TTL, Sequence};

/// How often a worker thread running async tasks looks for more work (see
/// [`RedisSubscription::recv_or_bell`]).
const LOOK_EVERY: Duration = Duration::from_millis(10);

/// One delivered task's place in its consumer's processing list: settling it stores the
/// final report and removes the message in one step.
pub(crate) struct RedisAck {
    pub(crate) inner: Arc<Inner>,
    pub(crate) queue: Arc<QueueKeys>,
    pub(crate) consumer: Arc<str>,
    /// The subscription whose worker thread took the task.
    pub(crate) subscription: u64,
    /// That thread's state: where the settlement goes, in order, when another thread settles
    /// (the watchdog, for a task past its hard time limit).
    pub(crate) owner: Weak<Slot>,
}

impl RedisAck {
    pub(crate) fn is_from(&self, inner: &Arc<Inner>) -> bool {
        Arc::ptr_eq(&self.inner, inner)
    }

    /// Queues the settlement with the other settlements of the worker thread that took the
    /// task (settlements must keep the order of the processing list). On that thread it
    /// waits for its next round trip; from another thread (the watchdog settling a task past
    /// its hard limit while the thread still runs it) it is parked behind the thread's
    /// parked settlements, for the flusher to store at once. A thread written off settles
    /// nothing (fenced); once a thread released its state, the background writer settles.
    pub(crate) fn settle(self, settle: Settle) -> Result<(), BrokerError> {
        let pending = Pending { queue: self.queue, consumer: self.consumer, settle };
        let left = LOCAL.with(|local| match local.borrow().get(&self.subscription) {
            Some(slot) if std::ptr::eq(Arc::as_ptr(slot), self.owner.as_ptr()) => {
                let mut state = lock(&slot.local);
                if !state.released {
                    state.done.push(pending);
                }
                None
            }
            _ => Some(pending),
        });
        let Some(pending) = left else { return Ok(()) };
        if let Some(slot) = self.owner.upgrade() {
            let mut state = lock(&slot.local);
            if state.written_off {
                return Ok(());
            }
            if !state.released {
                state.settle_elsewhere(&self.inner, pending);
                return Ok(());
            }
        }
        self.inner.completer()?.push(pending.into_op())
    }
}

impl Acknowledge for RedisAck {
    fn ack(self: Box<Self>) -> Result<(), BrokerError> {
        (*self).settle(Settle::Complete { caller: None, bytes: None })
    }

    fn reject(self: Box<Self>, requeue: bool, reason: &str) -> Result<(), BrokerError> {
        let settle = if requeue { Settle::Requeue } else { Settle::Dead { reason: reason.to_owned(), keep: 0 } };
        (*self).settle(settle)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

thread_local! {
    /// Per subscription: this worker thread's connection, fetched tasks and settlements.
    static LOCAL: RefCell<FastMap<u64, Arc<Slot>>> = RefCell::new(FastMap::default());
}

/// One worker thread's state for one subscription. The thread keeps it in [`LOCAL`] and
/// locks it (uncontended) for what it does; the subscription keeps it too, by thread id, so
/// that another thread can reach it: the watchdog that settles the task of a thread past its
/// hard time limit (see [`RedisAck::settle`]) and then writes the thread off
/// ([`Subscription::release_thread`]).
pub(crate) struct Slot {
    /// The broker this state belongs to (its process id).
    process: Arc<str>,
    local: Mutex<Local>,
}

/// What a worker thread took, in the order it took it.
enum Entry {
    Task(Delivery),
    /// A message that does not decode, or is over the size limit: settled to the dead
    /// letters in its turn (with only its first `keep` bytes, if `keep` > 0).
    Malformed {
        queue: Arc<QueueKeys>,
        consumer: Arc<str>,
        reason: String,
        keep: usize,
    },
}

struct Local {
    /// The slot this state is in (for the acknowledgements of the tasks it takes).
    me: Weak<Slot>,
    conn: Conn,
    /// Wakes this thread's blocking wait (a stop).
    control: String,
    /// Per queue (by prefix): this thread's consumer id there, and whether it is registered.
    consumers: FastMap<String, (Arc<str>, bool)>,
    buffer: VecDeque<Entry>,
    done: Vec<Pending>,
    /// Settlements parked while the current task runs (taken back before every round trip).
    parked: Arc<Parked>,
    /// Consumers whose settlements could not be stored: nothing more is settled under them
    /// (see `abandon`).
    abandoned: Vec<Arc<str>>,
    /// When the last task was handed to the worker.
    handed_at: Option<Instant>,
    /// The reply address of the last task decoded.
    last_caller: Option<Arc<str>>,
    /// Numbers this thread's fetches and settlements, so a retry applies each once.
    sequence: Sequence,
    /// After a fetch that drained the queues (no whole batch from any), the next one waits
    /// on the wake lists first, after its settlements.
    idle: bool,
    round: usize,
    /// Settled and given back (the thread stopped, or was written off): it takes, settles and
    /// reports nothing more.
    released: bool,
    /// Released because the thread was written off: what it does if it ever returns is
    /// dropped (fenced).
    written_off: bool,
}

impl Local {
    /// The plan that stores this thread's settlements (taken from `self`): the parked
    /// ones first, if the flusher did not store them — and the consumers whose processing
    /// lists it settles (to abandon if it fails, see [`abandon`](Self::abandon)). Calls added
    /// to the plan afterwards are numbered after it, in the order they run.
    fn settle_plan(&mut self, inner: &Arc<Inner>) -> (Plan, Vec<QueueConsumer>) {
        self.take_back(inner);
        let done = std::mem::take(&mut self.done);
        let settled = settled_by(&done);
        (settle::settle_calls(inner, done, &mut self.sequence), settled)
    }

    /// Takes back what this thread parked (after the flusher stored it, if it is doing so),
    /// abandoning the consumers the flusher could not settle, and drops the settlements of
    /// abandoned consumers.
    fn take_back(&mut self, inner: &Arc<Inner>) {
        let failed = self.parked.reclaim(&mut self.done);
        if !failed.is_empty() {
            self.abandon(inner, failed);
        }
        if !self.abandoned.is_empty() {
            let abandoned = &self.abandoned;
            self.done.retain(|pending| !pending.settle.is_positional() || !abandoned.contains(&pending.consumer));
        }
    }

    /// Gives up consumers whose settlements could not be stored. Settlements remove the
    /// oldest messages of a processing list by position: once one is lost, a later one would
    /// remove another task's message — that task would be lost. So nothing more is settled
    /// under these ids; their leases are no longer renewed, and once they expire the reaper
    /// puts every task of their processing lists back in the queue (at least once: those
    /// that ran run again). This thread fetches under new ids.
    fn abandon(&mut self, inner: &Arc<Inner>, consumers: Vec<QueueConsumer>) {
        for (queue, consumer) in consumers {
            if self.consumers.get(&queue.prefix).is_some_and(|(current, _)| *current == consumer) {
                self.consumers.remove(&queue.prefix);
            }
            inner.forget_consumer(&queue, &consumer);
            if !self.abandoned.contains(&consumer) {
                self.abandoned.push(consumer);
            }
            event(
                inner,
                Level::Warning,
                EventKind::SettlementsLost,
                format!(
                    "settlements on `{}` could not be stored: this worker's tasks there run again once its lease \
                     expires",
                    queue.prefix
                ),
            );
        }
    }

    /// Stores this thread's settlements now.
    fn settle(&mut self, inner: &Arc<Inner>) {
        let (mut plan, settled) = self.settle_plan(inner);
        if !plan.calls.is_empty() && self.round_trip(inner, &mut plan).is_none() {
            self.abandon(inner, settled);
        }
    }

    /// Parks this thread's settlements while it runs its next task: they go with its next
    /// round trip, or the flusher stores them if the task runs long.
    fn park(&mut self, inner: &Arc<Inner>, now: Instant) {
        self.take_back(inner);
        if self.done.is_empty() {
            return;
        }
        if self.parked.park(&mut self.done, now) {
            match inner.flusher() {
                Ok(flusher) => flusher.watch(self.parked.clone()),
                // No flusher (the broker is closing): store them now.
                Err(_) => self.settle(inner),
            }
        }
    }

    /// Runs `plan` on this thread's connection; returns the results of the calls that ran,
    /// with their kinds. Retries give up once the subscription stops: what a stopping worker
    /// cannot store while Redis is away runs again after its lease, rather than hold the
    /// stop up until Redis is back.
    fn round_trip(&mut self, inner: &Arc<Inner>, plan: &mut Plan) -> Option<Vec<(Kind, Value)>> {
        match plan.run(inner, &mut self.conn, &self.parked.stop, &mut self.sequence)? {
            Ok(results) => {
                settle::account(inner, &results);
                Some(results)
            }
            Err(e) => {
                event(inner, Level::Error, EventKind::ReceiveFailed, format!("talking to redis failed: {e}"));
                None
            }
        }
    }

    /// Queues a settlement made on another thread while this one runs the task (the
    /// watchdog's, at a hard time limit): parked behind what this thread parked, due at once,
    /// so the flusher stores it now, in order. This thread takes it back before its next
    /// round trip if the flusher did not store it yet (see [`Parked::reclaim`]).
    fn settle_elsewhere(&mut self, inner: &Arc<Inner>, pending: Pending) {
        self.done.push(pending);
        // The parked ones go first; settlements of abandoned consumers are dropped.
        self.take_back(inner);
        if self.done.is_empty() {
            return;
        }
        let now = Instant::now();
        self.parked.park(&mut self.done, now.checked_sub(FLUSH_AFTER).unwrap_or(now));
        match inner.flusher() {
            // Told even if it watches this worker already: it may be waiting for news.
            Ok(flusher) => flusher.watch(self.parked.clone()),
            Err(_) => self.settle(inner),
        }
    }
}

fn event(inner: &Inner, level: Level, kind: EventKind, message: String) {
    inner.events.emit(Event::new(Origin::Consumer, level, kind, message));
}

pub(crate) struct RedisSubscription {
    /// Keeps the broker up while the subscription lives.
    _broker: super::RedisBroker,
    inner: Arc<Inner>,
    id: u64,
    queues: Vec<(TaskName, Arc<QueueKeys>)>,
    /// How many tasks one worker thread takes at a time.
    per_worker: usize,
    /// Also the flusher's signal to give up storing this subscription's parked settlements.
    stopped: Arc<AtomicBool>,
    /// The control lists of the worker threads, to wake them on stop.
    controls: Mutex<Vec<String>>,
    /// The worker threads' states, for [`Subscription::release_thread`].
    threads: Mutex<FastMap<ThreadId, Arc<Slot>>>,
}

impl RedisSubscription {
    pub(crate) fn start(
        broker: super::RedisBroker,
        tasks: &[TaskName],
        settings: &ConsumeSettings,
    ) -> Result<RedisSubscription, BrokerError> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let inner = broker.inner.clone();
        let queues: Vec<(TaskName, Arc<QueueKeys>)> =
            tasks.iter().map(|t| (t.clone(), inner.queue_keys(t.as_str()))).collect();
        {
            let mut consumed = lock(&inner.consumed);
            for (_, queue) in &queues {
                consumed.entry(queue.prefix.clone()).or_insert_with(|| (queue.clone(), 0)).1 += 1;
            }
        }
        let prefetch = settings.prefetch.max(inner.options.prefetch);
        let per_worker = (prefetch / settings.workers.max(1)).clamp(1, inner.options.batch);
        Ok(RedisSubscription {
            _broker: broker,
            inner,
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            queues,
            per_worker,
            stopped: Arc::new(AtomicBool::new(false)),
            controls: Mutex::new(Vec::new()),
            threads: Mutex::new(FastMap::default()),
        })
    }

    /// Runs `f` with this thread's state for the subscription, created on first use.
    fn with_local<R>(&self, f: impl FnOnce(&mut Local) -> R) -> R {
        LOCAL.with(|local| {
            let mut local = local.borrow_mut();
            let slot = local.entry(self.id).or_insert_with(|| self.new_slot());
            f(&mut lock(&slot.local))
        })
    }

    /// A new state for the calling thread, registered under its id.
    fn new_slot(&self) -> Arc<Slot> {
        let slot =
            Arc::new_cyclic(|me| Slot { process: self.inner.process.clone(), local: Mutex::new(self.new_local(me)) });
        lock(&self.threads).insert(std::thread::current().id(), slot.clone());
        slot
    }

    fn new_local(&self, me: &Weak<Slot>) -> Local {
        let thread = UuidV7.next_id();
        let control = keys::control(&self.inner.options.namespace, thread.as_str());
        lock(&self.controls).push(control.clone());
        Local {
            me: me.clone(),
            conn: self.inner.conn("task fetcher", Origin::Consumer, true),
            control,
            consumers: FastMap::default(),
            buffer: VecDeque::new(),
            done: Vec::new(),
            parked: Arc::new(Parked::new(self.stopped.clone())),
            abandoned: Vec::new(),
            handed_at: None,
            last_caller: None,
            sequence: Sequence::new("work", thread.as_str()),
            idle: false,
            round: 0,
            released: false,
            written_off: false,
        }
    }

    /// This thread's consumer id on `queue`, a new one if it has none.
    fn consumer(&self, local: &mut Local, queue: &Arc<QueueKeys>) -> (Arc<str>, bool) {
        let (id, registered) = local
            .consumers
            .entry(queue.prefix.clone())
            .or_insert_with(|| (Arc::from(UuidV7.next_id().as_str()), false))
            .clone();
        (id, registered)
    }

    /// The next task in this thread's buffer (settling undecodable messages in their turn),
    /// storing settlements that waited too long first.
    fn next_buffered(&self, local: &mut Local) -> Option<Delivery> {
        loop {
            match local.buffer.pop_front()? {
                Entry::Task(delivery) => {
                    // Settlements wait for the next fetch while tasks are quick (parked: the
                    // flusher stores them if the next task runs long); when the task just
                    // finished took long (the next may too), they go now. One clock read
                    // per task: on some VMs a read costs tens of nanoseconds.
                    let now = Instant::now();
                    if !local.done.is_empty() {
                        if local.handed_at.is_some_and(|t| now.duration_since(t) >= FLUSH_AFTER) {
                            local.settle(&self.inner);
                        } else {
                            local.park(&self.inner, now);
                        }
                    }
                    local.handed_at = Some(now);
                    return Some(delivery);
                }
                Entry::Malformed { queue, consumer, reason, keep } => {
                    local.done.push(Pending { queue, consumer, settle: Settle::Dead { reason, keep } });
                }
            }
        }
    }

    /// Fetches into this thread's buffer (waiting on the wake lists first after an empty
    /// fetch); `false` when nothing came. Per queue, one plain `RPOP` of the at-most-once
    /// list and one `FETCH` of the others: up to twice the batch per round trip.
    fn fetch(&self, local: &mut Local, block: Duration) -> bool {
        let lease = self.inner.options.lease.as_millis().to_string();
        local.round = local.round.wrapping_add(1);
        let n = self.queues.len();
        let order: Vec<usize> = (0..n).map(|i| (i + local.round) % n).collect();
        let count = self.per_worker.to_string();
        let mut consumers = Vec::with_capacity(n);
        // Settlements first: batch numbers must rise in the order the calls run. They are
        // stored at once, even when a wait follows them.
        let (mut plan, settled) = local.settle_plan(&self.inner);
        if local.idle && !block.is_zero() {
            // After a fetch that drained the queues, wait for work before fetching again, in
            // the same round trip: the server runs the fetches the moment a wake token
            // comes (at once if one is there: a token stays while work waits). A fetch
            // that must not wait (a thread running async tasks looking for more) does not.
            let mut wait = Call::command("BLPOP").arg(local.control.as_bytes());
            for (_, q) in &self.queues {
                wait = wait.arg(q.wake.as_bytes());
            }
            plan.push(wait.arg(format!("{:.3}", block.as_secs_f64().max(0.001))), Kind::Wait);
        }
        for &i in &order {
            let q = &self.queues[i].1;
            let (consumer, registered) = self.consumer(local, q);
            consumers.push(consumer.clone());
            let (seq_key, seq) = local.sequence.next(q);
            let pop = Call::command("RPOP").arg(q.amo.as_bytes()).arg(count.as_bytes());
            plan.push(pop, Kind::Fetch { at_most_once: true });
            let take = Call::new(&scripts::FETCH)
                .key(q.pending.clone())
                .key(q.amo.clone())
                .key(q.wake.clone())
                .key(q.consumers.clone())
                .key(format!("{}{consumer}", q.processing))
                .key(seq_key)
                .key(q.cancelled_gen.clone())
                .arg(count.as_bytes())
                .arg(lease.clone())
                .arg(consumer.as_bytes())
                .arg(if registered { "0" } else { "1" })
                .numbered(seq)
                .arg(SEQ_TTL)
                .resent_flag();
            plan.push(take, Kind::Fetch { at_most_once: false });
            // What FETCH took, read natively (see `scripts::FETCH`).
            let head = Call::command("LRANGE")
                .arg(format!("{}{consumer}", q.processing))
                .arg("0")
                .arg((self.per_worker.max(1) - 1).to_string());
            plan.push(head, Kind::Head);
        }
        let Some(results) = local.round_trip(&self.inner, &mut plan) else {
            local.abandon(&self.inner, settled);
            if !self.stopped.load(Ordering::SeqCst) {
                // Not a connection problem (those are retried): try again a little later.
                std::thread::sleep(self.inner.options.block_timeout.min(block));
            }
            return false;
        };
        // Per queue in `order`: its at-most-once pop (left out of a retry), its FETCH, and
        // the read of what FETCH took.
        let (mut got, mut full) = (0, false);
        let mut stale = Vec::new();
        let mut queues = order.iter().zip(consumers);
        let (mut popped, mut fetched) = (None, None);
        for (kind, result) in results {
            match kind {
                Kind::Fetch { at_most_once: true } => popped = Some(result),
                Kind::Fetch { at_most_once: false } => fetched = Some(result),
                Kind::Head => {
                    let Some((&i, consumer)) = queues.next() else { break };
                    let (name, queue) = &self.queues[i];
                    let fetched = fetched.take().unwrap_or(Value::Nil);
                    let (taken, generation) = self.take(local, name, queue, consumer, popped.take(), fetched, result);
                    full |= taken >= self.per_worker;
                    got += taken;
                    if generation.is_some_and(|g| g != queue.cancel_gen.load(Ordering::Acquire)) {
                        stale.push(queue.clone());
                    }
                }
                _ => {}
            }
        }
        if !stale.is_empty() {
            self.load_cancels(local, &stale);
        }
        // No queue gave a whole batch: they are drained, and the next fetch waits first — so
        // a lone call costs one round trip of its worker, not a fetch that finds nothing and
        // then a wait.
        local.idle = !full;
        got > 0
    }

    /// Puts one queue's fetched messages into the buffer — the at-most-once ones `popped`
    /// first, then the ones `fetched` into the processing list (in FETCH's reply, or the
    /// first of the processing list's `head`, as FETCH says); returns how many there were,
    /// and the queue's cancel generation FETCH read.
    #[allow(clippy::too_many_arguments)]
    fn take(
        &self,
        local: &mut Local,
        name: &TaskName,
        queue: &Arc<QueueKeys>,
        consumer: Arc<str>,
        popped: Option<Value>,
        fetched: Value,
        head: Value,
    ) -> (usize, Option<u64>) {
        let mut count = 0;
        if let Some(Value::Array(items)) = popped {
            for item in items {
                count += 1;
                self.buffer(local, name, queue, None, item);
            }
        }
        let Value::Array(reply) = fetched else { return (count, None) };
        let mut reply = reply.into_iter();
        let status: String = reply.next().and_then(|v| redis::from_redis_value(v).ok()).unwrap_or_default();
        let taken = reply.next();
        let generation =
            reply.next().and_then(|v| redis::from_redis_value::<String>(v).ok()).and_then(|g| g.parse().ok());
        let items = match (taken, head) {
            (Some(Value::Array(items)), _) => items,
            // The n messages taken are the head of the processing list, newest first.
            (Some(Value::Int(n)), Value::Array(mut newest_first)) => {
                newest_first.truncate(usize::try_from(n).unwrap_or(0));
                newest_first.reverse();
                newest_first
            }
            _ => Vec::new(),
        };
        if status == "again" {
            self.inner.stats.fetches_replayed.fetch_add(1, Ordering::Relaxed);
        }
        if status == "lost" {
            // This consumer's lease expired and its tasks went to others: start over under a
            // new id (what it still settles under the old one is rejected).
            local.consumers.remove(&queue.prefix);
            self.inner.forget_consumer(queue, &consumer);
            self.event(
                Level::Warning,
                EventKind::LeaseLost,
                format!("this worker's lease on `{}` expired (it was stalled): it starts over", queue.prefix),
            );
            return (count, generation);
        }
        if let Some(entry) = local.consumers.get_mut(&queue.prefix)
            && !entry.1
        {
            entry.1 = true;
            self.inner.remember_consumer(queue, &consumer);
        }
        for item in items {
            count += 1;
            self.buffer(local, name, queue, Some(&consumer), item);
        }
        (count, generation)
    }

    /// Loads the cancels of `queues` this process lacks (their fetch read a cancel
    /// generation it has not loaded), before the worker hands out what it fetched: a task
    /// cancelled before its fetch never starts. One round trip, only after a cancel.
    fn load_cancels(&self, local: &mut Local, queues: &[Arc<QueueKeys>]) {
        let calls: Vec<Call> = queues.iter().map(|q| self.inner.cancels_call(q)).collect();
        match local.conn.retry(&self.stopped, &mut |c| scripts::run_batch(c, &calls)) {
            Some(Ok(replies)) => {
                for (queue, reply) in queues.iter().zip(replies) {
                    self.inner.load_cancels(queue, reply);
                }
            }
            // Stopping: what was fetched goes back unstarted.
            None => {}
            // Refused (not a lost connection: that is retried): the keeper tries again within
            // its poll; the tasks fetched are handed out meanwhile.
            Some(Err(e)) => self.event(
                Level::Error,
                EventKind::ReceiveFailed,
                format!("loading the cancels failed (the lease keeper tries again): {e}"),
            ),
        }
    }

    /// Decodes one fetched message into the buffer: `leased` by `consumer` (it sits in that
    /// consumer's processing list) or at most once (`None`).
    fn buffer(
        &self,
        local: &mut Local,
        name: &TaskName,
        queue: &Arc<QueueKeys>,
        leased: Option<&Arc<str>>,
        item: Value,
    ) {
        self.inner.stats.fetched.fetch_add(1, Ordering::Relaxed);
        let Value::BulkString(bytes) = item else { return };
        if bytes.len() > self.inner.options.max_message_size {
            return self.oversize(local, queue, leased, bytes);
        }
        // Most tasks of a fetch come from the caller of the one before: its address is
        // shared, not allocated again.
        let known = Known { name: Some(name), address: local.last_caller.as_ref() };
        match wire::decode_delivery(bytes, &known) {
            Ok((message, redelivered)) => {
                if let ReplyTo::Address(caller) = &message.reply_to
                    && !local.last_caller.as_ref().is_some_and(|last| Arc::ptr_eq(last, caller))
                {
                    local.last_caller = Some(caller.clone());
                }
                let ack = leased.map(|consumer| {
                    Ack::new(RedisAck {
                        inner: self.inner.clone(),
                        queue: queue.clone(),
                        consumer: consumer.clone(),
                        subscription: self.id,
                        owner: local.me.clone(),
                    })
                });
                local.buffer.push_back(Entry::Task(Delivery::new(message).with_ack(ack).with_redelivered(redelivered)));
            }
            Err(malformed) => {
                let reason = self.malformed(queue, &malformed);
                match leased {
                    Some(consumer) => local.buffer.push_back(Entry::Malformed {
                        queue: queue.clone(),
                        consumer: consumer.clone(),
                        reason,
                        keep: 0,
                    }),
                    None => {
                        if let Ok(completer) = self.inner.completer() {
                            let _ = completer.push(Op::Dead { queue: queue.clone(), reason, bytes: malformed.bytes });
                        }
                    }
                }
            }
        }
    }

    /// A fetched message over `max_message_size`, not decoded: to the dead letters with its
    /// first bytes only (cut on the server for a leased one, here for an at-most-once one),
    /// an event, and a failure to its caller if those bytes name it.
    fn oversize(&self, local: &mut Local, queue: &Arc<QueueKeys>, leased: Option<&Arc<str>>, mut bytes: Vec<u8>) {
        let inner = &self.inner;
        inner.stats.oversize.fetch_add(1, Ordering::Relaxed);
        let oversize = support::oversize_task(&bytes, bytes.len(), inner.options.max_message_size);
        bytes.truncate(oversize.kept);
        bytes.shrink_to_fit();
        let mut event = Event::new(
            Origin::Consumer,
            Level::Error,
            EventKind::TooLarge,
            format!("{}; moved to the dead letters of `{}`", oversize.reason, queue.prefix),
        );
        if let Some(key) = &oversize.call {
            event = event.with_task(key.clone());
            if let (Some(caller), Ok(completer)) = (&oversize.reply_to, inner.completer()) {
                let report = ReportMessage {
                    name: key.name.clone(),
                    id: key.id.clone(),
                    body: ReportBody::Failure(oversize.failure()),
                };
                if let Ok(report) = wire::encode_report(&report) {
                    let _ = completer.push(Op::Report {
                        queue: queue.clone(),
                        caller: caller.clone(),
                        bytes: report,
                        then: None,
                    });
                }
            }
        }
        inner.events.emit(event);
        inner.events.emit(support::dead_lettered(
            Origin::Consumer,
            &queue.task,
            &oversize.reason,
            oversize.call.clone(),
        ));
        match leased {
            Some(consumer) => local.buffer.push_back(Entry::Malformed {
                queue: queue.clone(),
                consumer: consumer.clone(),
                reason: oversize.reason,
                keep: oversize.kept,
            }),
            None => {
                if let Ok(completer) = inner.completer() {
                    let _ = completer.push(Op::Dead { queue: queue.clone(), reason: oversize.reason, bytes });
                }
            }
        }
    }

    /// Reports an undecodable message (and tells its caller, if it can be identified);
    /// returns the dead-letter reason.
    fn malformed(&self, queue: &Arc<QueueKeys>, malformed: &wire::MalformedTask) -> String {
        let reason = format!("undecodable message: {}", dingo_core::error::chain(&malformed.error));
        let mut event = Event::new(
            Origin::Consumer,
            Level::Error,
            EventKind::MalformedMessage,
            format!("{reason}; moved to the dead letters of `{}`", queue.prefix),
        );
        let mut call = None;
        if let (Some(name), Some(id)) = (&malformed.name, &malformed.id) {
            event = event.with_task(CallKey { name: name.clone(), id: id.clone() });
            call = Some(CallKey { name: name.clone(), id: id.clone() });
            if let (Some(caller), Ok(completer)) = (&malformed.reply_to, self.inner.completer()) {
                let error =
                    TaskError::new(TaskErrorKind::BadPayload, format!("the task message is malformed: {reason}"));
                let report = ReportMessage { name: name.clone(), id: id.clone(), body: ReportBody::Failure(error) };
                if let Ok(bytes) = wire::encode_report(&report) {
                    let _ =
                        completer.push(Op::Report { queue: queue.clone(), caller: caller.clone(), bytes, then: None });
                }
            }
        }
        self.inner.events.emit(event);
        self.inner.events.emit(support::dead_lettered(Origin::Consumer, &queue.task, &reason, call));
        reason
    }

    /// Settles what this thread holds — settlements not yet stored, tasks taken but not
    /// started (given back) — and forgets its state.
    fn release_local(&self) {
        let slot = LOCAL.with(|local| local.borrow_mut().remove(&self.id));
        let Some(slot) = slot else { return };
        lock(&self.threads).remove(&std::thread::current().id());
        self.release(&mut lock(&slot.local), false);
    }

    /// Settles what a worker thread holds — settlements not yet stored, tasks taken but not
    /// started (given back) — retires its consumers and marks its state released: it takes,
    /// settles and reports nothing more. Runs on the thread itself when it stops, or on the
    /// watchdog's when it is `written_off` (then its connection is closed too).
    fn release(&self, local: &mut Local, written_off: bool) {
        if local.released {
            return;
        }
        local.released = true;
        local.written_off = written_off;
        let mut amo: FastMap<String, (Arc<QueueKeys>, Vec<Vec<u8>>)> = FastMap::default();
        // Given back newest first: the script takes them from the head of the list.
        while let Some(entry) = local.buffer.pop_back() {
            match entry {
                Entry::Task(delivery) => match delivery.ack.map(|ack| ack.downcast::<RedisAck>()) {
                    Some(Ok(lease)) => local.done.push(Pending {
                        queue: lease.queue.clone(),
                        consumer: lease.consumer.clone(),
                        settle: Settle::Requeue,
                    }),
                    _ => {
                        let Some((_, queue)) = self.queues.iter().find(|(n, _)| *n == delivery.message.name) else {
                            continue;
                        };
                        if let Ok(bytes) = wire::encode_task(&delivery.message) {
                            amo.entry(queue.prefix.clone())
                                .or_insert_with(|| (queue.clone(), Vec::new()))
                                .1
                                .push(bytes);
                        }
                    }
                },
                Entry::Malformed { queue, consumer, reason, keep } => {
                    local.done.push(Pending { queue, consumer, settle: Settle::DeadNewest { reason, keep } });
                }
            }
        }
        local.settle(&self.inner);
        if let Ok(completer) = self.inner.completer() {
            for (queue, messages) in amo.into_values() {
                let _ = completer.push(Op::GiveBack { queue, messages });
            }
        }
        let mut retire = Vec::new();
        for (prefix, (consumer, _)) in &local.consumers {
            if let Some((_, queue)) = self.queues.iter().find(|(_, q)| &q.prefix == prefix) {
                self.inner.forget_consumer(queue, consumer);
                retire.push(
                    Call::new(&scripts::RETIRE)
                        .key(queue.consumers.clone())
                        .key(format!("{}{consumer}", queue.processing))
                        .key(local.sequence.key(queue))
                        .arg(consumer.as_bytes()),
                );
            }
        }
        if !retire.is_empty() {
            let _ = local.conn.once(&mut |c| scripts::run_batch(c, &retire));
        }
        local.consumers.clear();
        lock(&self.controls).retain(|c| *c != local.control);
        if written_off {
            // A connection nobody uses any more (the thread may never return): closed now.
            local.conn = self.inner.conn("task fetcher", Origin::Consumer, true);
        }
    }

    fn event(&self, level: Level, kind: EventKind, message: String) {
        event(&self.inner, level, kind, message);
    }
}

/// Stores a report through this thread's own connection, if this thread is a worker of a
/// subscription of `inner` — so a progress report reaches the caller before the final one,
/// which leaves by the same connection. Gives the report back otherwise.
pub(crate) fn report_here(inner: &Inner, report: Op) -> Result<Option<Op>, BrokerError> {
    LOCAL.with(|local| {
        let local = local.borrow();
        let Some(slot) = local.values().find(|slot| Arc::ptr_eq(&slot.process, &inner.process)) else {
            return Ok(Some(report));
        };
        let mut state = lock(&slot.local);
        if state.written_off {
            // Fenced: a thread written off reports nothing.
            return Ok(None);
        }
        let state = &mut *state;
        // A report alone: it removes nothing from a processing list, so it needs no order
        // with the settlements parked or waiting, and losing it loses no task.
        let mut plan = settle::plan(inner, vec![report], &mut state.sequence);
        let sequence = &mut state.sequence;
        // Numbered: a retry applies once.
        let patience = inner.options.command_timeout;
        let stored =
            state.conn.retry_briefly(patience, &mut |c| scripts::run(c, &mut plan.calls, Some(&mut *sequence)));
        stored.map(|_| None).map_err(|e| crate::conn::broker_error("storing a report failed", e))
    })
}

/// Settles a final report on this thread's connection, in order with the other
/// settlements of its consumer, if this thread took the task; gives it back otherwise.
pub(crate) fn finish_here(
    inner: &Inner,
    queue: &Arc<QueueKeys>,
    caller: Arc<str>,
    bytes: Vec<u8>,
) -> Option<(Arc<str>, Vec<u8>)> {
    LOCAL.with(|local| {
        let local = local.borrow();
        let Some(slot) = local.values().find(|slot| Arc::ptr_eq(&slot.process, &inner.process)) else {
            return Some((caller, bytes));
        };
        let mut state = lock(&slot.local);
        if state.written_off {
            // Fenced: a thread written off reports nothing.
            return None;
        }
        let consumer = state.consumers.get(&queue.prefix).map(|(c, _)| c.clone()).unwrap_or_else(|| Arc::from(""));
        let settle = Settle::Report { caller, bytes };
        state.done.push(Pending { queue: queue.clone(), consumer, settle });
        None
    })
}

impl RedisSubscription {
    /// Waits for a delivery at most `timeout`; stopped, gives back what this thread holds
    /// first when `release` says so (not for a thread still running async tasks it took).
    fn recv_until(&self, timeout: Option<Duration>, release: bool) -> Recv {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            if self.stopped.load(Ordering::Acquire) {
                if release {
                    self.release_local();
                }
                return Recv::Stopped;
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let block = left.unwrap_or(self.inner.options.block_timeout).min(self.inner.options.block_timeout);
            let next = self.with_local(|local| {
                if local.released {
                    return Err(());
                }
                if let Some(delivery) = self.next_buffered(local) {
                    return Ok(Some(delivery));
                }
                self.fetch(local, block);
                Ok(self.next_buffered(local))
            });
            match next {
                Ok(Some(delivery)) => return Recv::Delivery(delivery),
                Ok(None) => {}
                // Written off: fenced.
                Err(()) => return Recv::Stopped,
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Recv::Empty;
            }
        }
    }
}

impl Subscription for RedisSubscription {
    fn try_recv(&self) -> Recv {
        if self.stopped.load(Ordering::Acquire) {
            self.release_local();
            return Recv::Stopped;
        }
        match self.with_local(|local| if local.released { Err(()) } else { Ok(self.next_buffered(local)) }) {
            Ok(Some(delivery)) => Recv::Delivery(delivery),
            Ok(None) => Recv::Empty,
            // Written off: fenced.
            Err(()) => Recv::Stopped,
        }
    }

    fn recv(&self, timeout: Option<Duration>) -> Recv {
        self.recv_until(timeout, true)
    }

    fn stop(&self) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        let controls = lock(&self.controls).clone();
        for control in controls {
            self.inner.poke(&control, "stop");
        }
        // This thread's own state, if it served too (a consumer used without a pool).
        self.release_local();
        let mut consumed = lock(&self.inner.consumed);
        for (_, queue) in &self.queues {
            if let Some((_, users)) = consumed.get_mut(&queue.prefix) {
                *users -= 1;
                if *users == 0 {
                    consumed.remove(&queue.prefix);
                }
            }
        }
    }

    fn detach_worker(&self) {
        self.release_local();
    }

    /// A consumer's settled messages leave its processing list from the oldest end.
    fn settles_in_order(&self) -> bool {
        true
    }

    /// A thread cannot wait on its connection and the bell at once: it looks for work
    /// (and stores its settlements) without waiting, then waits on the bell for up to
    /// [`LOOK_EVERY`]. Its woken tasks run at once; a task arriving while it is busy with
    /// async ones waits up to that long (the pool's idle threads block on Redis as usual).
    ///
    /// Stopped, it returns at once and gives nothing back: the thread still runs tasks it
    /// took, and settles them before it detaches.
    fn recv_or_bell(&self, timeout: Option<Duration>, bell: &crossbeam_channel::Receiver<()>) -> Recv {
        match self.recv_until(Some(Duration::ZERO), false) {
            Recv::Empty => {}
            other => return other,
        }
        match timeout.map_or(LOOK_EVERY, |t| t.min(LOOK_EVERY)) {
            wait if wait.is_zero() => {}
            wait => {
                let _ = bell.recv_timeout(wait);
            }
        }
        Recv::Empty
    }

    /// The thread's task was settled already (the watchdog's `TimeLimit` failure, parked
    /// behind the thread's earlier settlements): stores them all, gives back the tasks it
    /// fetched but did not start, retires its consumers and fences the thread (see
    /// [`release`](RedisSubscription::release)).
    fn release_thread(&self, thread: ThreadId) {
        let Some(slot) = lock(&self.threads).remove(&thread) else { return };
        self.release(&mut lock(&slot.local), true);
    }
}

impl Drop for RedisSubscription {
    fn drop(&mut self) {
        self.stop();
        let controls = std::mem::take(&mut *lock(&self.controls));
        for control in controls {
            // Not waited for (the list expires anyway).
            self.inner.command_now(&mut |c| redis::cmd("DEL").arg(&control).query::<()>(c));
        }
    }
}
