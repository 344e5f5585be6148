//! Running `async fn` tasks on a pool's own threads. Each worker thread that takes an async
//! task becomes an executor for the tasks it took: it keeps their futures, polls one when
//! its waker fires, and goes on receiving while it has room (its share of the pool's
//! concurrency). No async runtime: a waker is a `std::task::Wake` handle that queues its
//! task and rings the thread's bell, and the thread waits on the bell and its subscription
//! at once ([`Subscription::recv_or_bell`]). With the `tokio` feature and a runtime given
//! to the app, the futures run on that runtime and the thread awaits their join handles.
//!
//! A finished task is settled as a blocking one is ([`judge`], then the final report and
//! its acknowledgement in one step) — except that on a broker that settles a thread's
//! deliveries in the order it received them ([`Subscription::settles_in_order`]), a task
//! that finishes before an earlier one reports at once and leaves its acknowledgement
//! (or its dead-lettering, or its next attempt) for when the earlier ones are settled.
//!
//! A task's progress goes through the thread too (`Relay`): wherever its future runs, the
//! thread reports it, before the task's final report.
//!
//! A hard time limit or a cancel drops the task's future (at its next `.await`, as it
//! were: a future is only ever dropped between polls) and fails the call with `TimeLimit`
//! or `Cancelled`; nothing is written off, the thread goes on.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as PollContext, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::{Call, Crew, Facts, SAW_NOTHING, Shared, Verdict, judge, next_attempt, schedule};
use crate::broker::kit::lock;
use crate::broker::{Ack, Cancels, Recv, Reporter, Subscription};
use crate::codec::{CodecId, Encoded};
use crate::context::{Context, Lent};
use crate::error::{BrokerError, BrokerErrorKind, TaskError, TaskErrorKind};
use crate::event::{Event, EventKind, Level, Origin};
use crate::id::{TaskId, TaskName};
use crate::message::{Payload, ReplyTo, ReportBody, ReportMessage, TaskMessage};
use crate::registry::{Handler, Invoke, Layout, Produced, TaskFuture, panic_message};

/// Runs `future` to completion on the calling thread (an `async fn` task called through
/// [`Task::run`](crate::Task::run), outside any worker).
pub(crate) fn block_on<F: std::future::Future>(future: F) -> F::Output {
    struct Unpark(Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = PollContext::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        // A wake before this park leaves the token set: park returns at once.
        thread::park();
    }
}

/// A delivery of an async task, checked and about to start.
pub(crate) struct Started {
    pub(crate) name: TaskName,
    pub(crate) id: TaskId,
    pub(crate) reply_to: ReplyTo,
    pub(crate) facts: Facts,
    pub(crate) again: Option<Encoded>,
    pub(crate) ack: Option<Ack>,
    pub(crate) redelivered: bool,
    pub(crate) codec: CodecId,
    pub(crate) local: bool,
    pub(crate) layout: Layout,
}

/// One thread's async tasks.
pub(crate) struct Executor {
    tasks: Vec<Option<InFlight>>,
    free: Vec<usize>,
    live: usize,
    /// How many may run at once on this thread.
    room: usize,
    woken: Arc<Woken>,
    bell: Receiver<()>,
    /// The progress of the tasks, to report from this thread.
    relay: Arc<Relay>,
    /// Hard time limits: when, which slot, which task.
    deadlines: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    /// Counts the tasks started, so a slot's task is told from the one before it.
    serial: u64,
    /// Whether the broker settles this thread's deliveries in the order received.
    in_order: bool,
    /// In order only: the tasks not settled yet, oldest first, with what is left to do for
    /// those that finished (`None`: still running).
    unsettled: BTreeMap<u64, Option<Deferred>>,
    /// The consumer's cancels, and their generation when the running tasks were last
    /// checked.
    cancels: Option<Arc<Cancels>>,
    cancels_seen: u64,
}

struct InFlight {
    serial: u64,
    future: TaskFuture,
    /// What its waker queues, and the waker itself.
    wakes: Arc<TaskWaker>,
    waker: Waker,
    ctx: Arc<Context<'static>>,
    name: TaskName,
    id: TaskId,
    reply_to: ReplyTo,
    facts: Facts,
    again: Option<Encoded>,
    ack: Option<Ack>,
    codec: CodecId,
    local: bool,
    layout: Layout,
    hard: Option<Duration>,
    span: tracing::Span,
}

/// What a task that finished before an earlier one still has to do, once that one is
/// settled (its report went out when it finished).
enum Deferred {
    Ack(Option<Ack>),
    Bury { reason: String, ack: Option<Ack>, name: TaskName, id: TaskId },
    Retry(TaskMessage, Option<Ack>),
}

/// Where an async task's context sends its progress: queued for the executor's thread,
/// which reports it in order with the task's final report. A future may run on another
/// thread (a tokio runtime's, or one the task handed its context to), and a broker may
/// report from a worker thread on another path than from elsewhere (Redis: the thread's
/// own connection, in order with its settlements, against a background writer's).
struct Relay {
    queue: Mutex<Vec<(ReplyTo, ReportMessage<'static>)>>,
    woken: Arc<Woken>,
}

impl Reporter for Relay {
    fn report(&self, to: &ReplyTo, report: ReportMessage<'_>) -> Result<(), BrokerError> {
        let ReportMessage { name, id, body } = report;
        let body = match body {
            ReportBody::Progress(progress) => ReportBody::Progress(progress),
            ReportBody::Sent => ReportBody::Sent,
            // A context sends nothing else.
            _ => return Err(BrokerError::new(BrokerErrorKind::Other, "only progress is relayed")),
        };
        lock(&self.queue).push((to.lend(), ReportMessage { name, id, body }));
        self.woken.ring();
        Ok(())
    }
}

/// The tasks woken since the thread last looked, and its bell.
struct Woken {
    queue: Mutex<Vec<(usize, u64)>>,
    bell: Sender<()>,
}

impl Woken {
    fn ring(&self) {
        // Full: the thread has a ring pending already, one is enough.
        let _ = self.bell.try_send(());
    }
}

struct TaskWaker {
    slot: usize,
    serial: u64,
    woken: Arc<Woken>,
    /// Whether the task is queued already (many wakes before a poll queue it once).
    queued: AtomicBool,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            lock(&self.woken.queue).push((self.slot, self.serial));
            self.woken.ring();
        }
    }
}

impl Executor {
    pub(crate) fn new(crew: &Crew) -> Executor {
        let (bell_tx, bell) = crossbeam_channel::bounded(1);
        if let Some(cancels) = &crew.shared.cancels {
            cancels.ring_on_insert(bell_tx.clone());
        }
        let woken = Arc::new(Woken { queue: Mutex::new(Vec::new()), bell: bell_tx });
        Executor {
            tasks: Vec::new(),
            free: Vec::new(),
            live: 0,
            room: crew.shared.concurrency.max(1),
            relay: Arc::new(Relay { queue: Mutex::new(Vec::new()), woken: woken.clone() }),
            woken,
            bell,
            deadlines: BinaryHeap::new(),
            serial: 0,
            in_order: crew.subscription.settles_in_order(),
            unsettled: BTreeMap::new(),
            cancels: crew.shared.cancels.clone(),
            cancels_seen: crew.shared.cancels.as_ref().map_or(0, |c| c.generation()),
        }
    }

    /// How many tasks run.
    pub(crate) fn live(&self) -> usize {
        self.live
    }

    /// Whether another task may start.
    pub(crate) fn has_room(&self) -> bool {
        self.live < self.room
    }

    /// Whether a task was woken and waits to be polled, or a cancel came (the bell that
    /// told of it may have been taken by a look for deliveries).
    pub(crate) fn has_news(&self) -> bool {
        !lock(&self.woken.queue).is_empty()
            || !lock(&self.relay.queue).is_empty()
            || self.cancels.as_ref().is_some_and(|cancels| cancels.generation() != self.cancels_seen)
    }

    /// A delivery if one is there, without waiting.
    pub(crate) fn look(&self, subscription: &dyn Subscription) -> Recv {
        subscription.recv_or_bell(Some(Duration::ZERO), &self.bell)
    }

    /// Starts a task and polls it once.
    pub(crate) fn start(&mut self, crew: &Crew, handler: &Handler, args: Payload, started: Started) {
        let shared = &*crew.shared;
        let Started { name, id, reply_to, facts, again, ack, redelivered, codec, local, layout } = started;
        let now = Instant::now();
        let limits = facts.limits;
        let ctx = Arc::new(Context {
            name: Lent::Shared(Arc::new(name.clone())),
            id: Lent::Shared(Arc::new(id.clone())),
            options: facts.options,
            redelivered,
            reply_to: Lent::Shared(Arc::new(reply_to.lend())),
            reporter: Lent::Shared(self.relay.clone()),
            codec: Lent::Shared(
                shared.codecs.get(codec).cloned().unwrap_or_else(|_| shared.codecs.default_codec().clone()),
            ),
            events: Lent::Shared(Arc::new(shared.events.clone())),
            attempt: facts.attempt,
            retry: facts.retry,
            retry_after: AtomicU64::new(u64::MAX),
            cancels: shared.cancels.clone().map(Lent::Shared),
            soft_at: limits.get_soft().map(|soft| now + soft),
            deadline: limits.get_soft().or(limits.get_hard()).map(|limit| now + limit),
            written_off: None,
            saw: AtomicU8::new(SAW_NOTHING),
        });
        self.serial += 1;
        let serial = self.serial;
        if self.in_order {
            self.unsettled.insert(serial, None);
        }
        let span = tracing::debug_span!(target: "dingo", "task", name = %name, id = %id, attempt = facts.attempt);
        let invoke = Invoke { codecs: &shared.codecs, codec, local, layout };
        let made = {
            let _entered = span.enter();
            handler.start(ctx.clone(), args, &invoke)
        };
        let slot = self.free.pop().unwrap_or_else(|| {
            self.tasks.push(None);
            self.tasks.len() - 1
        });
        let wakes = Arc::new(TaskWaker { slot, serial, woken: self.woken.clone(), queued: AtomicBool::new(false) });
        let waker = Waker::from(wakes.clone());
        let hard = limits.get_hard();
        let task = |future: TaskFuture| InFlight {
            serial,
            future,
            wakes,
            waker,
            ctx,
            name,
            id,
            reply_to,
            facts,
            again,
            ack,
            codec,
            local,
            layout,
            hard,
            span,
        };
        let future = match made {
            Some(Ok(future)) => on_runtime(shared, future),
            // Arguments that did not decode, a panic making the future: the outcome is here.
            Some(Err(error)) => Box::pin(std::future::ready(Err(error))),
            None => Box::pin(std::future::ready(Err(TaskError::new(
                TaskErrorKind::Other,
                "a blocking task was started as an async one",
            )))),
        };
        self.tasks[slot] = Some(task(future));
        self.live += 1;
        if let Some(hard) = hard {
            // The limits of tasks that finished stay until they pass: dropped here once they
            // outnumber the running tasks, so a long limit on quick tasks keeps no backlog.
            if self.deadlines.len() >= 64 && self.deadlines.len() > 2 * self.live {
                let tasks = &self.tasks;
                self.deadlines.retain(|Reverse((_, slot, serial))| {
                    tasks.get(*slot).and_then(Option::as_ref).is_some_and(|task| task.serial == *serial)
                });
            }
            self.deadlines.push(Reverse((now + hard, slot, serial)));
        }
        self.poll(crew, slot);
    }

    /// Reports the progress the tasks sent, in order (before any of them settles).
    fn relay(&self, shared: &Shared) {
        let relayed = std::mem::take(&mut *lock(&self.relay.queue));
        for (to, report) in relayed {
            if let Err(e) = shared.reporter.report(&to, report) {
                let message = format!("progress report lost: {}", crate::error::chain(&e));
                shared.events.emit(Event::new(Origin::Worker, Level::Warning, EventKind::ReportFailed, message));
            }
        }
    }

    /// Polls the woken tasks, then fails those past their hard limit or cancelled.
    pub(crate) fn turn(&mut self, crew: &Crew) {
        self.relay(&crew.shared);
        let woken = std::mem::take(&mut *lock(&self.woken.queue));
        for (slot, serial) in woken {
            if self.tasks.get(slot).and_then(Option::as_ref).is_some_and(|task| task.serial == serial) {
                self.poll(crew, slot);
            }
        }
        let now = Instant::now();
        while let Some(&Reverse((at, slot, serial))) = self.deadlines.peek() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            let Some(task) = self.tasks.get(slot).and_then(Option::as_ref).filter(|task| task.serial == serial) else {
                continue;
            };
            let limit = task.hard.unwrap_or_default();
            let message =
                format!("the task ran past its hard time limit of {} ms: its future was dropped", limit.as_millis());
            self.abandon(crew, slot, TaskErrorKind::TimeLimit, EventKind::TimeLimitExceeded, Level::Warning, message);
        }
        if let Some(cancels) = self.cancels.clone() {
            let generation = cancels.generation();
            if generation != self.cancels_seen {
                self.cancels_seen = generation;
                let cancelled: Vec<usize> = (self.tasks.iter().enumerate())
                    .filter_map(|(slot, task)| {
                        task.as_ref().filter(|task| cancels.is_cancelled(&task.name, &task.id)).map(|_| slot)
                    })
                    .collect();
                for slot in cancelled {
                    let message = "the call was cancelled while it ran: its future was dropped".to_owned();
                    self.abandon(crew, slot, TaskErrorKind::Cancelled, EventKind::TaskCancelled, Level::Info, message);
                }
            }
        }
    }

    /// Waits until a task is woken, the next hard limit passes, or (given the
    /// subscription, while there is room) a delivery arrives.
    pub(crate) fn wait(&self, subscription: Option<&dyn Subscription>) -> Recv {
        if self.has_news() {
            return Recv::Empty;
        }
        let timeout = self
            .deadlines
            .peek()
            .map(|Reverse((at, _, _))| at.saturating_duration_since(Instant::now()) + Duration::from_micros(100));
        match subscription {
            Some(subscription) => subscription.recv_or_bell(timeout, &self.bell),
            None => {
                let _ = match timeout {
                    Some(timeout) => self.bell.recv_timeout(timeout).map_err(|_| ()),
                    None => self.bell.recv().map_err(|_| ()),
                };
                Recv::Empty
            }
        }
    }

    fn poll(&mut self, crew: &Crew, slot: usize) {
        let Some(task) = self.tasks[slot].as_mut() else { return };
        // Cleared before the poll: a wake during it queues the task again.
        task.wakes.queued.store(false, Ordering::Release);
        let mut cx = PollContext::from_waker(&task.waker);
        let polled = {
            let _entered = task.span.enter();
            catch_unwind(AssertUnwindSafe(|| task.future.as_mut().poll(&mut cx)))
        };
        let outcome = match polled {
            Ok(Poll::Pending) => return,
            Ok(Poll::Ready(outcome)) => outcome,
            Err(panic) => Err(TaskError::new(TaskErrorKind::Panic, panic_message(&*panic))),
        };
        if let Some(task) = self.take(slot) {
            self.settle(crew, task, outcome);
        }
    }

    /// Removes a task, dropping its future (a panic in its drop is the task's, not the
    /// thread's: caught).
    fn take(&mut self, slot: usize) -> Option<InFlight> {
        let mut task = self.tasks.get_mut(slot)?.take()?;
        self.free.push(slot);
        self.live -= 1;
        let future = std::mem::replace(&mut task.future, Box::pin(std::future::pending()));
        if catch_unwind(AssertUnwindSafe(move || drop(future))).is_err() {
            tracing::warn!(target: "dingo", "an async task's future panicked when dropped");
        }
        Some(task)
    }

    /// Drops a running task's future and fails its call with `kind`.
    fn abandon(
        &mut self,
        crew: &Crew,
        slot: usize,
        kind: TaskErrorKind,
        event: EventKind,
        level: Level,
        message: String,
    ) {
        let Some(task) = self.take(slot) else { return };
        let shared = &*crew.shared;
        let call = Call { shared, name: &task.name, id: &task.id, reply_to: &task.reply_to };
        call.event(level, event, message.clone());
        let error = TaskError::new(kind, message).with_attempts(task.facts.attempt);
        let verdict = Verdict::Finish(ReportBody::Failure(error));
        self.conclude(shared, task, verdict);
    }

    /// Hands a finished task's outcome over (encoded, or lent to an in-process caller) and
    /// settles it.
    fn settle(&mut self, crew: &Crew, mut task: InFlight, outcome: Result<Box<dyn Produced>, TaskError>) {
        let shared = &*crew.shared;
        // Its progress first (it may have sent some in the poll that finished it).
        self.relay(shared);
        let ctx = task.ctx.clone();
        let mut again = task.again.take();
        let facts = task.facts;
        let _entered = task.span.clone().entered();
        match outcome {
            Ok(produced) => {
                let invoke =
                    Invoke { codecs: &shared.codecs, codec: task.codec, local: task.local, layout: task.layout };
                let mut task = Some(task);
                produced.hand_over(&invoke, &mut |outcome| {
                    let Some(task) = task.take() else { return };
                    let verdict = {
                        let call = Call { shared, name: &task.name, id: &task.id, reply_to: &task.reply_to };
                        judge(shared, &call, &facts, outcome, &ctx, &mut again)
                    };
                    self.conclude(shared, task, verdict);
                });
            }
            Err(error) => {
                let verdict = {
                    let call = Call { shared, name: &task.name, id: &task.id, reply_to: &task.reply_to };
                    judge(shared, &call, &facts, Err(error), &ctx, &mut again)
                };
                self.conclude(shared, task, verdict);
            }
        }
    }

    /// Acts on a verdict: at once, or — a task finishing before an earlier one, on a broker
    /// that settles in order — reporting now and settling later.
    fn conclude(&mut self, shared: &Shared, task: InFlight, verdict: Verdict<'_>) {
        let InFlight { serial, name, id, reply_to, facts, mut ack, .. } = task;
        let call = Call { shared, name: &name, id: &id, reply_to: &reply_to };
        let first = self.unsettled.keys().next().copied();
        let now = !self.in_order || first == Some(serial);
        let deferred = match verdict {
            Verdict::Finish(body) if now => {
                call.finish(body, ack.take());
                None
            }
            Verdict::Finish(body) => {
                if reply_to.wants_reports() {
                    call.report(body);
                }
                Some(Deferred::Ack(ack.take()))
            }
            Verdict::DeadLetter(error) if now => {
                call.dead_letter(error, ack.take());
                None
            }
            Verdict::DeadLetter(error) => {
                let reason = format!("{}: {}", error.kind(), error.message());
                if reply_to.wants_reports() {
                    call.report(ReportBody::Failure(error));
                }
                Some(Deferred::Bury { reason, ack: ack.take(), name: name.clone(), id: id.clone() })
            }
            Verdict::Retry { args, wait, error } => {
                call.retrying(facts.attempt, wait, error, facts.options.monitor_progress);
                let next = next_attempt(name.clone(), id.clone(), reply_to, &facts, args, wait);
                if now {
                    schedule(shared, next, ack.take());
                    None
                } else {
                    Some(Deferred::Retry(next, ack.take()))
                }
            }
        };
        if !self.in_order {
            return;
        }
        match deferred {
            Some(deferred) => {
                self.unsettled.insert(serial, Some(deferred));
            }
            None => {
                self.unsettled.remove(&serial);
                // The tasks after it that finished already can settle now, in order.
                while let Some(mut entry) = self.unsettled.first_entry() {
                    let Some(deferred) = entry.get_mut().take() else { break };
                    entry.remove();
                    run_deferred(shared, deferred);
                }
            }
        }
    }
}

fn run_deferred(shared: &Shared, deferred: Deferred) {
    match deferred {
        Deferred::Ack(ack) => {
            if let Some(Err(e)) = ack.map(Ack::ack) {
                tracing::error!(target: "dingo", "acknowledging an async task failed: {}", crate::error::chain(&e));
            }
        }
        Deferred::Bury { reason, ack, name, id } => {
            let reply_to = ReplyTo::None;
            Call { shared, name: &name, id: &id, reply_to: &reply_to }.bury(&reason, ack);
        }
        Deferred::Retry(next, ack) => schedule(shared, next, ack),
    }
}

/// Where a task's future runs: on the app's tokio runtime when it has one (the thread then
/// drives the join handle; dropping it aborts the task), else on this thread.
fn on_runtime(shared: &Shared, future: TaskFuture) -> TaskFuture {
    #[cfg(feature = "tokio")]
    if let Some(runtime) = &shared.runtime {
        return on_tokio(runtime, future);
    }
    let _ = shared;
    future
}

#[cfg(feature = "tokio")]
fn on_tokio(runtime: &tokio::runtime::Handle, future: TaskFuture) -> TaskFuture {
    struct AbortOnDrop(tokio::task::AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let join = runtime.spawn(future);
    let guard = AbortOnDrop(join.abort_handle());
    Box::pin(async move {
        let _guard = guard;
        match join.await {
            Ok(outcome) => outcome,
            Err(e) if e.is_panic() => Err(TaskError::new(TaskErrorKind::Panic, panic_message(&*e.into_panic()))),
            Err(e) => Err(TaskError::new(TaskErrorKind::Other, format!("the task was stopped on its runtime: {e}"))),
        }
    })
}
