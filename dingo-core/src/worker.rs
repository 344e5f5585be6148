//! Worker pools: named OS threads sharing one [`Subscription`], each running one task at a
//! time. A panic in a task is caught and reported; the thread goes on.
//!
//! Before a task starts, the worker checks its expiry and the consumer's
//! [`Cancels`]. A task with a hard time limit is watched by the pool's watchdog
//! (`watchdog.rs`): past the limit the watchdog settles the call with `TimeLimit`, writes the
//! thread off (its late outcome is discarded) and starts a fresh thread in its place.

use std::collections::HashSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender};

use crate::broker::kit::lock;
use crate::broker::{Ack, Cancels, Delivery, Producer, Recv, Reporter, Subscription, support};
use crate::codec::{Codecs, Encoded};
use crate::context::{Context, Lent};
use crate::error::{Error, TaskError, TaskErrorKind};
use crate::event::{Event, EventKind, EventSink, Level, Origin};
use crate::hash::FastMap;
use crate::id::{CallKey, TaskId, TaskName};
use crate::limits::TimeLimits;
use crate::message::{Payload, ReplyTo, ReportBody, ReportMessage, TaskMessage, Value};
use crate::options::TaskOptions;
use crate::registry::{Handler, Invoke};
use crate::retry::RetryPolicy;
use executor::Executor;
use watchdog::{Running, Watchdog};

#[path = "worker/executor.rs"]
pub(crate) mod executor;
#[path = "worker/watchdog.rs"]
mod watchdog;

/// What the threads of one pool share.
pub(crate) struct Shared {
    pub(crate) handlers: FastMap<TaskName, Handler>,
    pub(crate) reporter: Arc<dyn Reporter>,
    /// Schedules retries (`None`: the app sends no tasks, so its calls cannot retry).
    pub(crate) producer: Option<Arc<dyn Producer>>,
    pub(crate) codecs: Codecs,
    pub(crate) events: EventSink,
    /// How long an idle worker polls before it sleeps.
    pub(crate) spin: Duration,
    /// The calls not to run (`None`: the consumer knows no cancels).
    pub(crate) cancels: Option<Arc<Cancels>>,
    /// The time limits of each served task that has any (its own, under the call's).
    pub(crate) limits: crate::hash::FastMap<TaskName, TimeLimits>,
    /// How many threads were written off (ran past a hard time limit).
    pub(crate) written_off: AtomicU64,
    /// How many async tasks each thread drives at once (1 for a pool of blocking tasks).
    pub(crate) concurrency: usize,
    /// Where async tasks run (`None`: on the worker threads themselves).
    #[cfg(feature = "tokio")]
    pub(crate) runtime: Option<tokio::runtime::Handle>,
}

/// A group of worker threads started by one `allocate` call.
pub(crate) struct Pool {
    crew: Arc<Crew>,
    /// Every thread sends its id here as it exits (even by unwinding).
    exited: Receiver<ThreadId>,
}

/// What the threads of a pool, and its watchdog, share: how to start one more thread.
pub(crate) struct Crew {
    label: String,
    shared: Arc<Shared>,
    subscription: Arc<dyn Subscription>,
    stopping: Arc<AtomicBool>,
    exit: Sender<ThreadId>,
    /// The threads the pool counts (written-off ones leave it).
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Threads written off: never waited for.
    written_off: Mutex<HashSet<ThreadId>>,
    /// Threads started so far (for their names).
    started: AtomicUsize,
    /// Started by the first task with a hard time limit.
    watchdog: Mutex<Option<Watchdog>>,
    /// Whether starting it failed (then hard limits go unenforced, said once).
    watchdog_failed: AtomicBool,
}

impl Crew {
    /// Starts one more worker thread.
    fn spawn_thread(self: &Arc<Crew>) -> std::io::Result<()> {
        let i = self.started.fetch_add(1, Ordering::Relaxed);
        let worker = Worker { crew: self.clone() };
        let handle =
            std::thread::Builder::new().name(format!("dingo-{}-{i}", self.label)).spawn(move || worker.run())?;
        lock(&self.threads).push(handle);
        Ok(())
    }

    /// The watchdog, started on first use.
    fn watchdog(self: &Arc<Crew>) -> Option<Watchdog> {
        let mut watchdog = lock(&self.watchdog);
        if watchdog.is_none() && !self.watchdog_failed.load(Ordering::Relaxed) && !self.stopping.load(Ordering::Acquire)
        {
            *watchdog = Watchdog::start(self);
            self.watchdog_failed.store(watchdog.is_none(), Ordering::Relaxed);
        }
        watchdog.clone()
    }

    /// Writes off the thread `thread` (it ran past a hard limit): the pool forgets it, and
    /// a fresh thread takes its place unless the pool is stopping.
    fn write_off(self: &Arc<Crew>, thread: ThreadId) {
        lock(&self.written_off).insert(thread);
        lock(&self.threads).retain(|handle| handle.thread().id() != thread);
        self.shared.written_off.fetch_add(1, Ordering::Relaxed);
        if self.stopping.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = self.spawn_thread() {
            self.shared.events.emit(Event::new(
                Origin::Worker,
                Level::Error,
                EventKind::TimeLimitExceeded,
                format!("no thread could replace a written-off one in pool {}: {e}", self.label),
            ));
        }
    }
}

impl Pool {
    pub(crate) fn spawn(
        label: &str,
        count: usize,
        subscription: Box<dyn Subscription>,
        shared: Shared,
    ) -> Result<Pool, Error> {
        let (exit, exited) = crossbeam_channel::unbounded();
        let crew = Arc::new(Crew {
            label: label.to_owned(),
            shared: Arc::new(shared),
            subscription: Arc::from(subscription),
            stopping: Arc::new(AtomicBool::new(false)),
            exit,
            threads: Mutex::new(Vec::with_capacity(count)),
            written_off: Mutex::new(HashSet::new()),
            started: AtomicUsize::new(0),
            watchdog: Mutex::new(None),
            watchdog_failed: AtomicBool::new(false),
        });
        let pool = Pool { crew, exited };
        for _ in 0..count {
            if let Err(e) = pool.crew.spawn_thread() {
                pool.stop();
                pool.join(None);
                return Err(Error::Spawn(e));
            }
        }
        pool.crew.shared.events.emit(Event::new(
            Origin::Worker,
            Level::Info,
            EventKind::Started,
            format!("{count} worker thread(s) started for {label}"),
        ));
        Ok(pool)
    }

    /// Tells the threads to exit after their current task; does not wait.
    pub(crate) fn stop(&self) {
        self.crew.stopping.store(true, Ordering::Release);
        self.crew.subscription.stop();
        if let Some(watchdog) = lock(&self.crew.watchdog).take() {
            watchdog.stop();
        }
    }

    /// Waits for the threads until `deadline` (`None`: no limit) and joins them. Returns
    /// how many were still running when it gave up; those finish on their own. The calling
    /// thread is never waited for (`close` called from inside a task), nor a written-off one.
    pub(crate) fn join(self, deadline: Option<Instant>) -> usize {
        let me = std::thread::current().id();
        let waiting: Vec<JoinHandle<()>> =
            std::mem::take(&mut *lock(&self.crew.threads)).into_iter().filter(|t| t.thread().id() != me).collect();
        let ids: HashSet<ThreadId> = waiting.iter().map(|t| t.thread().id()).collect();
        let mut exited: HashSet<ThreadId> = HashSet::with_capacity(ids.len());
        loop {
            let written_off = lock(&self.crew.written_off).clone();
            if ids.iter().all(|id| exited.contains(id) || written_off.contains(id)) {
                break;
            }
            // A thread written off meanwhile sends nothing: look again now and then.
            let step = Instant::now() + Duration::from_millis(50);
            let until = deadline.map_or(step, |deadline| deadline.min(step));
            match self.exited.recv_deadline(until) {
                Ok(id) => {
                    exited.insert(id);
                }
                Err(_) if deadline.is_some_and(|deadline| Instant::now() >= deadline) => break,
                Err(_) => {}
            }
        }
        let mut running = 0;
        for thread in waiting {
            if exited.contains(&thread.thread().id()) {
                let _ = thread.join();
            } else if !lock(&self.crew.written_off).contains(&thread.thread().id()) {
                running += 1;
            }
        }
        running
    }

    pub(crate) fn label(&self) -> &str {
        &self.crew.label
    }

    /// How many of its threads were written off.
    pub(crate) fn written_off(&self) -> u64 {
        self.crew.shared.written_off.load(Ordering::Relaxed)
    }
}

struct Worker {
    crew: Arc<Crew>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.crew.exit.send(std::thread::current().id());
    }
}

impl Worker {
    fn run(self) {
        let crew = &self.crew;
        // Made by the first async task this thread takes.
        let mut executor: Option<Executor> = None;
        // Whether the subscription said it stopped (then only running futures are driven).
        let mut stopped = false;
        loop {
            if let Some(running) = executor.as_mut().filter(|executor| executor.live() > 0) {
                // As around `execute`: a panic settling a task (a reporter's) must not take
                // the thread down.
                if catch_unwind(AssertUnwindSafe(|| running.turn(crew))).is_err() {
                    recovered(crew);
                }
                if running.live() == 0 {
                    continue;
                }
                // Once stopping, the subscription is not asked again: on some brokers that
                // releases the thread's deliveries, the running ones included.
                let receiving = !stopped && !crew.stopping.load(Ordering::Acquire) && running.has_room();
                if !receiving {
                    running.wait(None);
                    continue;
                }
                // Not `try_recv`: a stopped subscription must not give back what this thread
                // still runs (see `recv_or_bell`).
                let received = match running.look(&*crew.subscription) {
                    Recv::Empty if running.has_news() => continue,
                    Recv::Empty => running.wait(Some(&*crew.subscription)),
                    other => other,
                };
                match received {
                    Recv::Delivery(delivery) => {
                        // An async task's run only starts it; a blocking one among them
                        // holds the others up while it runs (give each its own pool).
                        if let Ran::WrittenOff = self.execute(delivery, &mut executor) {
                            break;
                        }
                    }
                    Recv::Stopped => stopped = true,
                    _ => {}
                }
                continue;
            }
            if stopped || crew.stopping.load(Ordering::Acquire) {
                break;
            }
            let received = match crew.subscription.try_recv() {
                Recv::Empty => self.idle(),
                other => other,
            };
            match received {
                Recv::Delivery(delivery) => match self.execute(delivery, &mut executor) {
                    Ran::Done => {}
                    // Replaced already: this thread only had to come back.
                    Ran::WrittenOff => break,
                },
                Recv::Stopped => break,
                _ => {}
            }
        }
        crew.subscription.detach_worker();
    }

    /// Runs (or starts) one delivery. Task panics are caught closer to the task; this
    /// catches what is left (a panicking reporter, say), so the thread itself never dies.
    #[inline]
    fn execute(&self, delivery: Delivery, executor: &mut Option<Executor>) -> Ran {
        let crew = &self.crew;
        catch_unwind(AssertUnwindSafe(|| execute(crew, delivery, executor))).unwrap_or_else(|_| {
            recovered(crew);
            Ran::Done
        })
    }

    /// Polls for a short while (a task that arrives within microseconds starts without a
    /// wake-up), then blocks.
    fn idle(&self) -> Recv {
        let subscription = &self.crew.subscription;
        if !subscription.prefers_polling() {
            return subscription.recv(None);
        }
        let polled = crate::spin::spin(self.crew.shared.spin, || match subscription.try_recv() {
            Recv::Empty => None,
            other => Some(other),
        });
        polled.unwrap_or_else(|| subscription.recv(None))
    }
}

/// Says that a worker thread caught a panic outside any task.
fn recovered(crew: &Crew) {
    crew.shared.events.emit(Event::new(
        Origin::Worker,
        Level::Error,
        EventKind::WorkerRecovered,
        "a worker recovered from a panic outside the task (in reporting or acknowledging)",
    ));
}

/// How a delivery ended for the thread that ran it.
pub(crate) enum Ran {
    Done,
    /// The task ran past its hard limit: the watchdog settled the call and replaced the
    /// thread, which must exit.
    WrittenOff,
}

/// What a running task has seen ([`Context::is_cancelled`]); an `Err` it returns after
/// is a failure of the matching kind.
pub(crate) const SAW_NOTHING: u8 = 0;
pub(crate) const SAW_TIME_LIMIT: u8 = 1;
pub(crate) const SAW_CANCEL: u8 = 2;

/// What settling an attempt needs to know about its call, beyond its name, id and reply.
#[derive(Clone, Copy)]
pub(crate) struct Facts {
    pub(crate) fingerprint: u64,
    pub(crate) options: TaskOptions,
    pub(crate) attempt: u32,
    pub(crate) expires: Option<SystemTime>,
    pub(crate) retry: RetryPolicy,
    pub(crate) limits: TimeLimits,
}

/// What becomes of an attempt, given its outcome.
pub(crate) enum Verdict<'v> {
    /// The final report: stored, and the delivery settled.
    Finish(ReportBody<'v>),
    /// The message itself is bad, or out of attempts: the caller gets the failure and the
    /// message goes to the dead letters.
    DeadLetter(TaskError),
    /// Another attempt runs after `wait`.
    Retry { args: Encoded, wait: Duration, error: TaskError },
}

/// Decides what an outcome means for the call: the final report, a dead letter, or a
/// retry (which takes the kept arguments `again`), given what the task's context recorded.
// Inlined: on the blocking path it runs once per task, inside the task's outcome closure.
#[inline(always)]
pub(crate) fn judge<'v>(
    shared: &Shared,
    call: &Call<'_>,
    facts: &Facts,
    outcome: Result<Value<'v>, TaskError>,
    ctx: &Context<'_>,
    again: &mut Option<Encoded>,
) -> Verdict<'v> {
    let Facts { attempt, expires, retry, .. } = *facts;
    match outcome {
        Ok(value) => Verdict::Finish(ReportBody::Success(value)),
        // The message itself is bad: it goes to the dead letters, not back to work.
        Err(error) if matches!(error.kind(), TaskErrorKind::BadPayload | TaskErrorKind::SignatureMismatch) => {
            let kind = if error.kind() == TaskErrorKind::BadPayload {
                EventKind::BadPayload
            } else {
                EventKind::SignatureMismatch
            };
            call.event(Level::Error, kind, error.message().to_owned());
            Verdict::DeadLetter(error)
        }
        // The task gave up because it saw its soft limit or a cancel: final, not retried.
        Err(error) if error.kind() == TaskErrorKind::Failed && ctx.saw() != SAW_NOTHING => {
            let (kind, why) = match ctx.saw() {
                SAW_CANCEL => (TaskErrorKind::Cancelled, "cancelled"),
                _ => (TaskErrorKind::TimeLimit, "soft time limit"),
            };
            let message = format!("{why}: {}", error.message());
            Verdict::Finish(ReportBody::Failure(TaskError::new(kind, message).with_attempts(attempt)))
        }
        Err(error) if error.kind() == TaskErrorKind::Failed && retry.retries() > 0 => {
            let wait = ctx.requested_retry().unwrap_or_else(|| retry.get_backoff().delay(attempt));
            let starts_in_time = expires.is_none_or(|expires| SystemTime::now() + wait < expires);
            let can_send = shared.producer.is_some();
            match again.take() {
                Some(args) if starts_in_time && can_send => Verdict::Retry { args, wait, error },
                _ => {
                    // Out of attempts (or of time): the failure is final, and the message
                    // goes to the dead letters, where it can be replayed.
                    let why = match (starts_in_time, can_send) {
                        (false, _) if retry.allows_after(attempt) => {
                            " (no retry: it would start after the call expires)"
                        }
                        (_, false) if retry.allows_after(attempt) => {
                            " (no retry: this worker's app has no producer to send the next attempt)"
                        }
                        _ => "",
                    };
                    let message = format!("after {attempt} attempt(s): {}{why}", error.message());
                    Verdict::DeadLetter(error.renamed(message).with_attempts(attempt))
                }
            }
        }
        Err(error) => {
            let kind = match error.kind() {
                TaskErrorKind::Panic => Some((Level::Warning, EventKind::TaskPanicked)),
                TaskErrorKind::Encode => Some((Level::Error, EventKind::EncodeFailed)),
                _ => None,
            };
            if let Some((level, kind)) = kind {
                let prefix = if kind == EventKind::TaskPanicked { "task panicked: " } else { "" };
                call.event(level, kind, format!("{prefix}{}", error.message()));
            }
            Verdict::Finish(ReportBody::Failure(error.with_attempts(attempt)))
        }
    }
}

/// The next attempt of a call whose attempt failed with arguments `args`.
pub(crate) fn next_attempt(
    name: TaskName,
    id: TaskId,
    reply_to: ReplyTo,
    facts: &Facts,
    args: Encoded,
    wait: Duration,
) -> TaskMessage {
    TaskMessage {
        name,
        id,
        fingerprint: facts.fingerprint,
        options: facts.options,
        reply_to,
        args: Payload::Encoded(args),
        attempt: facts.attempt + 1,
        due: Some(SystemTime::now() + wait),
        expires: facts.expires,
        retry: facts.retry,
        limits: facts.limits,
    }
}

/// Runs one delivery to its final report (or to its next attempt); an async task's is only
/// started, on this thread's executor (made on first use).
pub(crate) fn execute(crew: &Arc<Crew>, delivery: Delivery, executor: &mut Option<Executor>) -> Ran {
    let shared = &*crew.shared;
    let Delivery { message, ack, redelivered } = delivery;
    let TaskMessage { name, id, fingerprint, options, reply_to, args, attempt, due: _, expires, retry, limits } =
        message;
    let call = Call { shared, name: &name, id: &id, reply_to: &reply_to };

    let Some(handler) = shared.handlers.get(name.as_str()) else {
        let error = TaskError::new(TaskErrorKind::UnknownTask, not_served(shared, &name));
        call.event(Level::Error, EventKind::UnknownTask, error.message().to_owned());
        call.dead_letter(error, ack);
        return Ran::Done;
    };
    let Some(layout) = handler.signature().accepts(fingerprint) else {
        let error = TaskError::new(
            TaskErrorKind::SignatureMismatch,
            handler.signature().mismatch_there(name.as_str(), fingerprint),
        );
        call.event(Level::Error, EventKind::SignatureMismatch, error.message().to_owned());
        call.dead_letter(error, ack);
        return Ran::Done;
    };
    if let Some(expires) = expires
        && let Ok(late) = SystemTime::now().duration_since(expires)
    {
        call.expired(late, ack);
        return Ran::Done;
    }
    let cancels = shared.cancels.as_deref();
    if cancels.is_some_and(|cancels| cancels.is_cancelled(&name, &id)) {
        call.cancelled(ack);
        return Ran::Done;
    }
    // The task's own limits under the call's (the map holds only tasks that have some).
    let limits = if shared.limits.is_empty() {
        limits
    } else {
        limits.or(shared.limits.get(name.as_str()).copied().unwrap_or_default())
    };

    if options.monitor_progress && reply_to.wants_reports() {
        call.report(ReportBody::Sent);
        call.report(ReportBody::Progress(None));
    }

    let codec = match &args {
        Payload::Encoded(encoded) if shared.codecs.get(encoded.codec).is_ok() => encoded.codec,
        _ => shared.codecs.default_codec().id(),
    };
    let local = matches!(args, Payload::Local(_)) && shared.reporter.accepts_local();
    // The arguments of the next attempt: only a call that may still retry pays for the copy.
    let again = match &args {
        Payload::Encoded(encoded) if retry.allows_after(attempt) => Some(encoded.clone()),
        _ => None,
    };
    let facts = Facts { fingerprint, options, attempt, expires, retry, limits };
    if handler.is_async() {
        let started = executor::Started { name, id, reply_to, facts, again, ack, redelivered, codec, local, layout };
        executor.get_or_insert_with(|| Executor::new(crew)).start(crew, handler, args, started);
        return Ran::Done;
    }
    let invoke = Invoke { codecs: &shared.codecs, codec, local, layout };
    let mut again = again;
    let mut ack = ack;
    // A hard limit hands the delivery to the watchdog's care: whoever settles first wins.
    let (started, running) = if limits.is_none() {
        (None, None)
    } else {
        let started = Instant::now();
        let running = limits.get_hard().and_then(|hard| {
            let watchdog = crew.watchdog()?;
            let running =
                Arc::new(Running::new(CallKey { name: name.clone(), id: id.clone() }, reply_to.share(), ack.take()));
            watchdog.watch(started + hard, hard, running.clone());
            Some(running)
        });
        (Some(started), running)
    };
    let ctx = Context {
        name: Lent::Borrowed(&name),
        id: Lent::Borrowed(&id),
        options,
        redelivered,
        reply_to: Lent::Borrowed(&reply_to),
        reporter: Lent::Borrowed(&*shared.reporter),
        codec: Lent::Borrowed(shared.codecs.get(codec).map(|c| &**c).unwrap_or(&**shared.codecs.default_codec())),
        events: Lent::Borrowed(&shared.events),
        attempt,
        retry,
        retry_after: AtomicU64::new(u64::MAX),
        cancels: cancels.map(Lent::Borrowed),
        soft_at: started.and_then(|started| limits.get_soft().map(|soft| started + soft)),
        deadline: started.and_then(|started| limits.get_soft().or(limits.get_hard()).map(|limit| started + limit)),
        written_off: running.as_deref().map(Running::written_off_flag).map(Lent::Borrowed),
        saw: AtomicU8::new(SAW_NOTHING),
    };
    let span = tracing::debug_span!(target: "dingo", "task", name = %name, id = %id, attempt);
    let _entered = span.enter();
    let mut finished = false;
    let mut written_off = false;
    let mut next: Option<(Encoded, Duration, TaskError)> = None;
    handler.run(&ctx, args, &invoke, &mut |outcome| {
        finished = true;
        if let Some(running) = &running {
            match running.claim() {
                Some(claimed) => ack = claimed,
                None => {
                    // The watchdog settles the call: this outcome is discarded, and the
                    // thread leaves once the watchdog is done with its state.
                    running.wait_settled(Duration::from_secs(10));
                    written_off = true;
                    return;
                }
            }
        }
        match judge(shared, &call, &facts, outcome, &ctx, &mut again) {
            Verdict::Finish(body) => call.finish(body, ack.take()),
            Verdict::DeadLetter(error) => call.dead_letter(error, ack.take()),
            Verdict::Retry { args, wait, error } => next = Some((args, wait, error)),
        }
    });
    if written_off {
        return Ran::WrittenOff;
    }
    if let Some((args, wait, error)) = next {
        call.retrying(attempt, wait, error, options.monitor_progress);
        drop(ctx);
        schedule(shared, next_attempt(name.clone(), id.clone(), reply_to, &facts, args, wait), ack.take());
        return Ran::Done;
    }
    if !finished {
        // Unreachable with the handlers dingo builds; kept so a delivery is never left open.
        let ack = match &running {
            Some(running) => match running.claim() {
                Some(ack) => ack,
                None => {
                    running.wait_settled(Duration::from_secs(10));
                    return Ran::WrittenOff;
                }
            },
            None => ack.take(),
        };
        let error = TaskError::new(TaskErrorKind::Other, "the task produced no outcome");
        call.finish(ReportBody::Failure(error), ack);
    }
    Ran::Done
}

/// Hands the next attempt of a call to the broker, which settles the failed one. If the
/// broker refuses, the delivery was not settled (it comes back where the broker gives
/// deliveries back); the caller is told the retry failed rather than left waiting (an
/// in-process caller learns it from its reply sink, dropped with the message).
pub(crate) fn schedule(shared: &Shared, next: TaskMessage, ack: Option<Ack>) {
    let key = next.key();
    let reply = match &next.reply_to {
        ReplyTo::Address(address) => Some(ReplyTo::Address(address.clone())),
        _ => None,
    };
    let Some(producer) = &shared.producer else { return };
    let Err(e) = producer.retry(next, ack) else { return };
    let message = format!("retry not scheduled: {}", crate::error::chain(&e));
    shared
        .events
        .emit(Event::new(Origin::Worker, Level::Error, EventKind::RetryFailed, message.clone()).with_task(key.clone()));
    if let Some(reply) = reply {
        let report = ReportMessage {
            name: key.name,
            id: key.id,
            body: ReportBody::Failure(TaskError::new(TaskErrorKind::Failed, message)),
        };
        let _ = shared.reporter.report(&reply, report);
    }
}

/// Why a pool cannot run a message it received. Pools receive only from the queues of the
/// tasks they serve, so the message itself names another task than its queue's (it was not
/// sent by a call of that name): say what this pool serves.
#[cold]
fn not_served(shared: &Shared, name: &TaskName) -> String {
    const LISTED: usize = 5;
    let mut served: Vec<&str> = shared.handlers.keys().map(TaskName::as_str).collect();
    served.sort_unstable();
    let mut list = served.iter().take(LISTED).map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ");
    if served.len() > LISTED {
        list.push_str(&format!(" and {} more", served.len() - LISTED));
    }
    format!("no worker here runs task `{name}` (this pool serves {list}); the message came through one of their queues")
}

pub(crate) struct Call<'a> {
    pub(crate) shared: &'a Shared,
    pub(crate) name: &'a TaskName,
    pub(crate) id: &'a TaskId,
    pub(crate) reply_to: &'a ReplyTo,
}

impl Call<'_> {
    pub(crate) fn key(&self) -> CallKey {
        CallKey { name: self.name.clone(), id: self.id.clone() }
    }

    fn message<'v>(&self, body: ReportBody<'v>) -> ReportMessage<'v> {
        ReportMessage { name: self.name.clone(), id: self.id.clone(), body }
    }

    pub(crate) fn event(&self, level: Level, kind: EventKind, message: String) {
        self.shared.events.emit(Event::new(Origin::Worker, level, kind, message).with_task(self.key()));
    }

    pub(crate) fn report(&self, body: ReportBody<'_>) {
        if let Err(e) = self.shared.reporter.report(self.reply_to, self.message(body)) {
            self.event(Level::Error, EventKind::ReportFailed, format!("report lost: {}", crate::error::chain(&e)));
        }
    }

    /// Tells the caller its message cannot run, then moves the message to the broker's dead
    /// letters (a malformed message must neither be lost silently nor retried forever).
    pub(crate) fn dead_letter(&self, error: TaskError, ack: Option<Ack>) {
        let reason = format!("{}: {}", error.kind(), error.message());
        if self.reply_to.wants_reports() {
            self.report(ReportBody::Failure(error));
        }
        self.bury(&reason, ack);
    }

    /// Moves the message to the broker's dead letters (its caller was told already).
    pub(crate) fn bury(&self, reason: &str, ack: Option<Ack>) {
        let Some(ack) = ack else { return };
        match ack.reject(false, reason) {
            Ok(()) => self.shared.events.emit(support::dead_lettered(
                Origin::Worker,
                self.name.as_str(),
                reason,
                Some(self.key()),
            )),
            Err(e) => self.event(
                Level::Error,
                EventKind::AckFailed,
                format!("dead-lettering failed: {}", crate::error::chain(&e)),
            ),
        }
    }

    /// The call's expiry passed before it started: it fails with `Expired` and its delivery
    /// is settled (running it later would not make it any less late).
    fn expired(&self, late: Duration, ack: Option<Ack>) {
        let message = format!("the call expired {} ms before a worker could start it", late.as_millis());
        self.event(Level::Warning, EventKind::TaskExpired, message.clone());
        self.finish(ReportBody::Failure(TaskError::new(TaskErrorKind::Expired, message)), ack);
    }

    /// The call was cancelled before it started: it fails with `Cancelled` and its delivery
    /// is settled.
    pub(crate) fn cancelled(&self, ack: Option<Ack>) {
        let message = "the call was cancelled before a worker started it".to_owned();
        self.event(Level::Info, EventKind::TaskCancelled, message.clone());
        self.finish(ReportBody::Failure(TaskError::new(TaskErrorKind::Cancelled, message)), ack);
    }

    /// Tells the caller (with `monitor_progress`) and the events that attempt `attempt`
    /// failed and the next one runs after `wait`.
    pub(crate) fn retrying(&self, attempt: u32, wait: Duration, error: TaskError, monitor_progress: bool) {
        self.event(
            Level::Info,
            EventKind::TaskRetrying,
            format!(
                "attempt {attempt} failed ({}); attempt {} in {} ms",
                error.message(),
                attempt + 1,
                wait.as_millis()
            ),
        );
        if monitor_progress && self.reply_to.wants_reports() {
            self.report(ReportBody::Retrying { attempt, after: wait, error });
        }
    }

    /// Stores the final report and acknowledges the delivery (just acknowledges it when the
    /// caller wants no report).
    pub(crate) fn finish(&self, body: ReportBody<'_>, ack: Option<Ack>) {
        let result = if self.reply_to.wants_reports() {
            self.shared.reporter.finish(self.reply_to, self.message(body), ack)
        } else {
            ack.map(Ack::ack).unwrap_or(Ok(()))
        };
        if let Err(e) = result {
            self.event(
                Level::Error,
                EventKind::ReportFailed,
                format!("final report or acknowledgement failed: {}", crate::error::chain(&e)),
            );
        }
    }
}
