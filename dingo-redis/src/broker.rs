//! [`RedisBroker`]: the four roles over Redis. Each role runs on threads and connections
//! of its own (blocking waits never share a connection):
//!
//! | thread | role | does |
//! | --- | --- | --- |
//! | `dingo-redis-send` ([`writer`]) | producer | pipelines queued task messages, one transaction of plain pushes per batch; reads the replies to what lone callers wrote themselves |
//! | the app's worker threads ([`fetcher`]) | consumer | each a consumer of its own: takes batches into its processing list, settles them with its next fetch; blocks on the queues' wake lists when idle |
//! | `dingo-redis-done` ([`completer`]) | reporter | stores what does not come from a worker thread of this broker (mixed transports, dead letters, give-backs) |
//! | `dingo-redis-leases` ([`keeper`]) | consumer | renews the consumers' leases, returns the tasks of expired ones to their queue |
//! | `dingo-redis-delay` ([`promoter`]) | consumer | moves delayed tasks and retries to their queue once due, sleeping until the next is |
//! | `dingo-redis-delay-wake` ([`promoter`]) | consumer | blocks on the queues' `delayed:wake` lists: a task due sooner than the others wakes the promoter |
//! | `dingo-redis-reply` ([`listener`]) | store | blocks on this process's reply lists and routes reports to handles |
//!
//! The threads that settle (the worker threads, the [`flusher`], the report writer) share one
//! vocabulary and planner, [`settle`], and none of them imports another.
//!
//! A connection that blocks (an idle worker's, the listener's) has a socket read timeout
//! above the server-side block timeout, and its wait is pipelined behind the last
//! non-blocking command, so an idle worker costs no extra round trip.

mod completer;
mod fetcher;
mod flusher;
mod keeper;
mod listener;
mod promoter;
mod settle;
mod writer;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use dingo_core::__internal::FastMap;
use dingo_core::broker::kit::{Lazy, Lifecycle, Shutdown, ShutdownOnDrop};
pub(crate) use dingo_core::broker::kit::{Thread, lock};
use dingo_core::broker::router::{ReportRouter, UnclaimedLimit};
use dingo_core::broker::support::{check_size, connect_retrying, redact_url, reply_address};
use dingo_core::broker::{
    Ack, Admin, Cancels, ConsumeSettings, Consumer, Producer, Reporter, Select, Store, Subscription,
};
use dingo_core::event::{EventSink, EventSinks, Origin};
use dingo_core::id::UuidV7;
use dingo_core::message::{ReplySink, ReplyTo, ReportMessage, TaskMessage, wire};
use dingo_core::{BrokerError, BrokerErrorKind, CallKey, DeadLetter, IdMaker, TaskName};

use crate::conn::{Conn, broker_error};
use crate::keys::{self, QueueKeys};
use crate::options::RedisOptions;
use crate::scripts::Sequence;

use completer::Completer;
use flusher::Flusher;
use keeper::Keeper;
use listener::Listener;
use promoter::Promoter;
use settle::{Op, Settle};
use writer::{Outgoing, Writer};

pub(crate) use fetcher::RedisAck;

/// What errors call the broker.
pub(crate) const NAME: &str = "the redis broker";

/// The Redis broker: task transport and report transport, usable for either role alone.
///
/// Cheap to clone; clones share connections and threads. Apps that use it release it on
/// close; when the last one has, its threads finish their queued work (sends, reports) and
/// stop, and calls still waiting for reports get a `Shutdown` failure.
#[derive(Clone)]
pub struct RedisBroker {
    pub(crate) inner: Arc<Inner>,
    /// Shared by the clones: when the last goes, the broker shuts down (its threads hold
    /// `inner`, not this).
    _last: Arc<ShutdownOnDrop<Inner>>,
}

dingo_core::counters! {
    /// Counters of what happened, for monitoring and tests.
    pub struct Stats / Counters {
        /// Task messages written to Redis.
        sent,
        /// Task messages taken by this process's consumers.
        fetched,
        /// Fetches sent again after their reply was lost, answered with the tasks they had
        /// taken (0 unless connections broke).
        fetches_replayed,
        /// Final reports stored (with their leases released).
        completed,
        /// Settlements stored by the flusher thread because the task after theirs ran long (a
        /// part of `completed`, `dead_lettered`, …; the others ride with their worker's next
        /// fetch).
        flushed,
        /// Late reports (and retries) rejected because the lease had been taken over
        /// (fencing).
        rejected_reports,
        /// Task messages sent with a due time in the future: kept in their queue's delayed set
        /// until due (a part of `sent`).
        delayed,
        /// Delayed messages (sent delayed, or retries) this process's promoter moved to their
        /// queue once due.
        promoted,
        /// Retries queued in the same step that settled the failed attempt (the next
        /// attempt's message, due after its backoff).
        retried,
        /// Leases this process renewed.
        renewed,
        /// Expired leases this process returned to their queue.
        requeued_expired,
        /// Messages moved to the dead letters.
        dead_lettered,
        /// Dead letters dropped, oldest first, to keep a dead-letter list within
        /// `max_dead_letters` and `max_dead_letter_bytes` (by this process's scripts).
        dead_letters_dropped,
        /// Received messages over `max_message_size`, not decoded: task messages dead-lettered
        /// (their first 4 KiB kept), reports dropped.
        oversize,
    }
}

/// The actors a broker has one of (see `scripts::Sequence`), by role: their sequence keys
/// are named by the broker's process id.
pub(crate) mod actor {
    pub(crate) const SEND: &str = "send";
    pub(crate) const DONE: &str = "done";
    pub(crate) const FLUSH: &str = "flush";
    pub(crate) const RECV: &str = "recv";
    /// The sender's delayed sends (numbered by the sender, under a key of their own).
    pub(crate) const DELAY: &str = "delay";
    pub(crate) const ALL: [&str; 5] = [SEND, DONE, FLUSH, RECV, DELAY];
}

/// A queue and the consumers of this process holding a lease on it.
pub(crate) type Leases = (Arc<QueueKeys>, HashSet<Arc<str>>);

pub(crate) struct Inner {
    pub(crate) client: redis::Client,
    pub(crate) options: RedisOptions,
    /// This broker instance's id: names its reply lists, its listener's control list and
    /// the sequence keys of its one-per-broker actors.
    pub(crate) process: Arc<str>,
    pub(crate) events: EventSinks,
    pub(crate) stats: Counters,
    pub(crate) router: ReportRouter,
    /// Keys per task, read on every call (without a lock), written once per task.
    queues: ArcSwap<FastMap<TaskName, Arc<QueueKeys>>>,
    known: Mutex<HashSet<String>>,
    misc: Mutex<Conn>,
    life: Lifecycle,
    writer: Lazy<Writer>,
    completer: Lazy<Completer>,
    flusher: Lazy<Flusher>,
    listener: Lazy<Listener>,
    keeper: Lazy<Keeper>,
    promoter: Lazy<Promoter>,
    /// The consumers (worker threads) of this process, by queue prefix: whose leases the
    /// keeper renews.
    pub(crate) leases: Mutex<HashMap<String, Leases>>,
    /// Queues this process consumes, by prefix (with how many subscriptions): what the
    /// keeper reaps.
    pub(crate) consumed: Mutex<HashMap<String, (Arc<QueueKeys>, usize)>>,
    /// The cancels this process's workers honour, loaded from the queues' cancelled sets
    /// (see [`Inner::load_cancels`]).
    pub(crate) cancels: Arc<Cancels>,
}

impl RedisBroker {
    /// Connects with default options: `redis://[user][:password@]host[:port][/db]`, or
    /// `rediss://…` with the `tls` feature. The server is checked at once: one older than
    /// Redis 7.0, bad credentials, a user denied a command dingo needs (see
    /// [`acl_rules`](crate::acl_rules)) or a bad URL are an error; a server that cannot be reached
    /// yet is tried again for [`connect_retry`](RedisOptions::connect_retry) (30 s), then
    /// the error says which URL and why.
    ///
    /// The URL's query may set options: `namespace`, `lease_ms`, `prefetch`, `batch`,
    /// `result_ttl_s`, `block_timeout_ms`, `max_redeliveries`, `wait_spin_us`,
    /// `connect_retry_s`, `max_unclaimed`, `max_unclaimed_bytes`, `max_message_size`,
    /// `max_dead_letters`, `max_dead_letter_bytes`, and for `rediss://` the TLS files
    /// `cacertfile`, `certfile`, `keyfile` (see [TLS](crate#tls))
    /// (`redis://127.0.0.1:6379/0?namespace=shop&lease_ms=30000`); they override the options
    /// given to [`connect_with`](RedisBroker::connect_with).
    pub fn connect(url: &str) -> Result<RedisBroker, BrokerError> {
        RedisBroker::connect_with(url, RedisOptions::default())
    }

    /// Connects with these options.
    pub fn connect_with(url: &str, options: RedisOptions) -> Result<RedisBroker, BrokerError> {
        let config =
            |e: String| BrokerError::new(BrokerErrorKind::Config, format!("redis URL {}: {e}", redact_url(url)));
        let (url, options) = options.apply_url(url).map_err(config)?;
        let client = crate::tls::client(&url, &options)?;
        let server = format!("redis at {}", redact_url(&url));
        if crate::tls::unverified(&client) {
            // No app is attached yet: this goes to `tracing`; each connection opened later
            // warns the apps' subscribers too (`conn.rs`).
            tracing::warn!(target: "dingo", "{server}: `#insecure` turns TLS certificate and host name checks off");
        }
        connect_retrying(&server, options.connect_retry, options.reconnect_backoff, || {
            check_server(&client, &options, &server)
        })?;
        let events = EventSinks::new();
        let misc = Conn::new(
            client.clone(),
            "command",
            Origin::Producer,
            options.command_timeout,
            options.command_timeout,
            options.reconnect_backoff,
            events.clone(),
        );
        let process: Arc<str> = Arc::from(UuidV7.next_id().as_str());
        let misc = misc.named(&client_name(&options.namespace, &process, "command"));
        let limit = UnclaimedLimit::new(options.max_unclaimed, options.max_unclaimed_bytes);
        let router = ReportRouter::new(options.result_ttl, limit, events.clone());
        let inner = Arc::new(Inner {
            client,
            process,
            events: events.clone(),
            stats: Counters::default(),
            router,
            queues: ArcSwap::default(),
            known: Mutex::new(HashSet::new()),
            misc: Mutex::new(misc),
            life: Lifecycle::new(NAME, events),
            writer: Lazy::new(),
            completer: Lazy::new(),
            flusher: Lazy::new(),
            listener: Lazy::new(),
            keeper: Lazy::new(),
            promoter: Lazy::new(),
            leases: Mutex::new(HashMap::new()),
            consumed: Mutex::new(HashMap::new()),
            cancels: Arc::new(Cancels::new()),
            options,
        });
        Ok(RedisBroker { _last: ShutdownOnDrop::new(inner.clone()), inner })
    }

    /// The options in use.
    pub fn options(&self) -> &RedisOptions {
        &self.inner.options
    }

    /// What happened so far: a snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.inner.stats.snapshot()
    }

    /// The dead letters of a task's queue, oldest first (what [`Admin::dead_letters`]
    /// returns without a limit): at most
    /// [`max_dead_letters`](RedisOptions::max_dead_letters) of them, in at most
    /// [`max_dead_letter_bytes`](RedisOptions::max_dead_letter_bytes) (the oldest are dropped
    /// past either). The dead letter of a message over
    /// [`max_message_size`](RedisOptions::max_message_size) holds its first 4 KiB only; its
    /// reason gives its length.
    pub fn dead_letters(&self, task: &str) -> Result<Vec<DeadLetter>, BrokerError> {
        Admin::dead_letters(self, &TaskName::from(task), usize::MAX)
    }

    /// How many messages wait in a task's queue (both delivery modes).
    pub fn queue_len(&self, task: &str) -> Result<usize, BrokerError> {
        let keys = self.inner.queue_keys(task);
        let (a, b): (usize, usize) = self
            .inner
            .command(&mut |c| redis::pipe().cmd("LLEN").arg(&keys.pending).cmd("LLEN").arg(&keys.amo).query(c))
            .map_err(|e| broker_error("reading the queue length failed", e))?;
        Ok(a + b)
    }

    /// How many messages wait in a task's delayed set: sent with a due time not reached yet,
    /// and retries waiting out their backoff (see [Delays](crate#guarantees)).
    pub fn delayed_len(&self, task: &str) -> Result<usize, BrokerError> {
        let keys = self.inner.queue_keys(task);
        self.inner
            .command(&mut |c| redis::cmd("ZCARD").arg(&keys.delayed).query(c))
            .map_err(|e| broker_error("reading the delayed set's length failed", e))
    }

    /// Pushes raw bytes into a task's queue, as a foreign or broken producer would (for tests
    /// and repair tools).
    pub fn push_raw(&self, task: &str, bytes: Vec<u8>) -> Result<(), BrokerError> {
        let keys = self.inner.queue_keys(task);
        // An actor of its own for this one push: a retry of it applies once.
        let (seq_key, seq) = Sequence::new("raw", UuidV7.next_id().as_str()).next(&keys);
        self.inner
            .command(&mut |c| {
                crate::scripts::PUSH
                    .key(&keys.pending)
                    .key(&keys.wake)
                    .key(&seq_key)
                    .arg(&seq)
                    .arg("60000")
                    .arg(bytes.as_slice())
                    .invoke::<i64>(c)
            })
            .map(|_| ())
            .map_err(|e| broker_error("pushing raw bytes failed", e))
    }

    /// Deletes every key of the namespace (all queues, leases, dead letters and replies). For
    /// tests and tools; never while apps use it.
    pub fn purge_namespace(&self) -> Result<usize, BrokerError> {
        let pattern = format!("{}:*", self.inner.options.namespace);
        let mut deleted = 0;
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = self
                .inner
                .command(&mut |c| {
                    redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(500).query(c)
                })
                .map_err(|e| broker_error("scanning the namespace failed", e))?;
            if !keys.is_empty() {
                deleted += self
                    .inner
                    .command(&mut |c| redis::cmd("UNLINK").arg(&keys).query::<usize>(c))
                    .map_err(|e| broker_error("deleting keys failed", e))?;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    /// Shuts the broker down for every app that uses it: queued sends and reports are
    /// written first, then the threads stop; pending calls get a `Shutdown` failure.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

impl fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBroker")
            .field("namespace", &self.inner.options.namespace)
            .field("process", &self.inner.process)
            .field("closed", &self.inner.life.is_closed())
            .finish_non_exhaustive()
    }
}

/// How often the lease keeper looks for new cancels of the queues a process consumes: what
/// bounds the time a running (or already fetched) task takes to see its cancel.
pub(crate) const CANCEL_POLL: Duration = Duration::from_millis(100);

/// Dead letters sent back (or purged) per script call: at most this many, in at most
/// [`UNBURY_BYTES`] of arguments.
const UNBURY_BATCH: usize = 100;
const UNBURY_BYTES: usize = 1 << 20;

impl Inner {
    /// The call that loads the cancels of `queue` this process does not know yet (see
    /// `scripts::CANCELS`).
    pub(crate) fn cancels_call(&self, queue: &QueueKeys) -> crate::scripts::Call {
        crate::scripts::Call::new(&crate::scripts::CANCELS)
            .key(queue.cancelled.clone())
            .key(queue.cancelled_gen.clone())
            .key(queue.cancelled_log.clone())
            .arg(queue.cancel_gen.load(std::sync::atomic::Ordering::Acquire).to_string())
    }

    /// Takes in the reply of a [`cancels_call`](Inner::cancels_call): the cancels go into the
    /// set first, then the generation they stand for is recorded (a worker that reads the
    /// generation finds its cancels in the set).
    pub(crate) fn load_cancels(&self, queue: &QueueKeys, reply: redis::Value) {
        use std::sync::atomic::Ordering;
        let redis::Value::Array(mut parts) = reply else { return };
        let members = if parts.len() > 1 { parts.pop() } else { None };
        let Some(generation) = parts.pop().and_then(|g| redis::from_redis_value::<String>(g).ok()) else {
            return;
        };
        let generation: u64 = generation.parse().unwrap_or(0);
        if let Some(members) = members {
            let pairs: Vec<(String, f64)> = redis::from_redis_value(members).unwrap_or_default();
            let name = TaskName::from(queue.task.as_str());
            for (id, until) in pairs {
                // Scores are whole milliseconds.
                let until = wire::time(until.max(0.0) as u64);
                self.cancels.insert(CallKey::new(name.clone(), dingo_core::TaskId::new(&id)), until);
            }
        }
        queue.cancel_gen.store(generation, Ordering::Release);
    }

    pub(crate) fn queue_keys(&self, task: &str) -> Arc<QueueKeys> {
        if let Some(keys) = self.queues.load().get(task) {
            return keys.clone();
        }
        let keys = Arc::new(QueueKeys::new(&self.options.namespace, task, &self.process));
        let mut added = None;
        self.queues.rcu(|queues| {
            let mut queues = FastMap::clone(queues);
            added = Some(queues.entry(TaskName::from(task)).or_insert_with(|| keys.clone()).clone());
            queues
        });
        added.unwrap_or(keys)
    }

    /// A short command on the shared command connection; a connection that turns out to
    /// be broken is replaced and the command tried once more, and a server that is not
    /// ready (loading its data after a restart, …) is waited for, up to the command timeout.
    pub(crate) fn command<T>(
        &self,
        f: &mut dyn FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, redis::RedisError> {
        lock(&self.misc).retry_briefly(self.options.command_timeout, f)
    }

    /// A short command on the shared command connection, not waited for: tried once, and
    /// once more on a new connection if the open one was broken (wake-ups, clean-up).
    pub(crate) fn command_now(&self, f: &mut dyn FnMut(&mut redis::Connection) -> redis::RedisResult<()>) {
        let _ = lock(&self.misc).once_more(f);
    }

    pub(crate) fn conn(&self, role: &'static str, origin: Origin, blocking: bool) -> Conn {
        let read_timeout = if blocking { self.options.blocking_read_timeout() } else { self.options.command_timeout };
        Conn::new(
            self.client.clone(),
            role,
            origin,
            read_timeout,
            self.options.command_timeout,
            self.options.reconnect_backoff,
            self.events.clone(),
        )
        .named(&client_name(&self.options.namespace, &self.process, role))
    }

    fn declare(&self, task: &TaskName) -> Result<(), BrokerError> {
        if lock(&self.known).contains(task.as_str()) {
            return Ok(());
        }
        let set = keys::tasks(&self.options.namespace);
        self.command(&mut |c| redis::cmd("SADD").arg(&set).arg(task.as_str()).query::<i64>(c))
            .map_err(|e| broker_error("declaring the task failed", e))?;
        lock(&self.known).insert(task.as_str().to_owned());
        Ok(())
    }

    /// Whether some app declared `task` (else nobody can ever run it).
    fn is_declared(&self, task: &str) -> Result<bool, BrokerError> {
        if lock(&self.known).contains(task) {
            return Ok(true);
        }
        let set = keys::tasks(&self.options.namespace);
        let member: bool = self
            .command(&mut |c| redis::cmd("SISMEMBER").arg(&set).arg(task).query(c))
            .map_err(|e| broker_error("checking the task failed", e))?;
        if member {
            lock(&self.known).insert(task.to_owned());
        }
        Ok(member)
    }

    pub(crate) fn completer(self: &Arc<Inner>) -> Result<&Completer, BrokerError> {
        self.completer.get_or_start(|| Completer::start(self.clone()))
    }

    pub(crate) fn flusher(self: &Arc<Inner>) -> Result<&Flusher, BrokerError> {
        // Not started anew by a worker of a broker that shut down (nobody would stop it).
        self.life.check_open()?;
        self.flusher.get_or_start(|| Flusher::start(self.clone()))
    }

    pub(crate) fn keeper(self: &Arc<Inner>) -> Result<&Keeper, BrokerError> {
        self.keeper.get_or_start(|| Keeper::start(self.clone()))
    }

    pub(crate) fn promoter(self: &Arc<Inner>) -> Result<&Promoter, BrokerError> {
        self.promoter.get_or_start(|| Promoter::start(self.clone()))
    }

    /// A consumer of this process registered a lease on `queue`: keep renewing it.
    pub(crate) fn remember_consumer(&self, queue: &Arc<QueueKeys>, consumer: &Arc<str>) {
        let mut leases = lock(&self.leases);
        leases
            .entry(queue.prefix.clone())
            .or_insert_with(|| (queue.clone(), HashSet::new()))
            .1
            .insert(consumer.clone());
    }

    /// A consumer of this process is gone (or lost its lease): stop renewing it.
    pub(crate) fn forget_consumer(&self, queue: &QueueKeys, consumer: &str) {
        if let Some((_, consumers)) = lock(&self.leases).get_mut(&queue.prefix) {
            consumers.remove(consumer);
        }
    }

    /// Leaves `token` in a control list, waking the connection blocked on it (its thread
    /// re-reads what to wait for, or stops). The list expires: a token nobody was blocked to
    /// take (its thread busy, or its process gone) must not stay forever.
    pub(crate) fn poke(&self, control: &str, token: &str) {
        let ttl = keys::CONTROL_TTL.as_millis().to_string();
        // Not waited for: a server that is not ready has nobody blocked to wake.
        self.command_now(&mut |c| {
            redis::pipe()
                .cmd("LPUSH")
                .arg(control)
                .arg(token)
                .ignore()
                .cmd("PEXPIRE")
                .arg(control)
                .arg(&ttl)
                .query::<()>(c)
        });
    }

    /// Removes the keys that belong to this broker instance alone, now that none of its
    /// threads uses them (each also expires, should a process die without this): its reply
    /// and notify lists (nobody else reads them: reports still in them are for calls nobody
    /// waits for any more), its listener's control list, and the sequence keys of its one-per-
    /// broker actors (the sender, the report writer, the flusher, the listener) — each
    /// numbers batches that will never come again. Worker threads remove their own when they
    /// retire.
    fn remove_own_keys(&self) {
        let mut own = vec![
            keys::control(&self.options.namespace, &format!("{}:reply", self.process)),
            keys::control(&self.options.namespace, &format!("{}:delay", self.process)),
        ];
        for queue in self.queues.load().values() {
            own.extend([queue.reply_here.clone(), queue.notify_here.clone()]);
            own.extend(actor::ALL.iter().map(|role| queue.seq(&format!("{role}.{}", self.process))));
        }
        // Best effort, not waited for (each key expires anyway): shutting down must not wait
        // for a server that is not ready.
        for keys in own.chunks(512) {
            self.command_now(&mut |c| redis::cmd("UNLINK").arg(keys).query::<()>(c));
        }
    }
}

/// One start-up attempt: a connection of its own (the broker's connections open when their
/// threads first need them), the server's version, and whether the user may run what dingo
/// needs (see [`access`](crate::access)).
fn check_server(client: &redis::Client, options: &RedisOptions, server: &str) -> Result<(), BrokerError> {
    let (mut conn, identity) = client
        .get_connection_with_timeout(options.command_timeout)
        .and_then(|mut conn| {
            conn.set_read_timeout(Some(options.command_timeout))?;
            conn.set_write_timeout(Some(options.command_timeout))?;
            let identity = server_identity(&mut conn)?;
            // HELLO and INFO are answered while the server loads its data; PING is not
            // (`LOADING`): a server still loading is waited for like one not up yet.
            redis::cmd("PING").query::<()>(&mut conn)?;
            Ok((conn, identity))
        })
        .map_err(|e| start_up_error(server, e))?;
    let Identity { version, role } = identity;
    if role.as_deref() == Some("replica") {
        // Every write would be refused (`READONLY`). Waited for like a server not up yet: a
        // replica being promoted (a failover) becomes the primary within the wait.
        let message = "the server is a replica, which refuses writes: dingo needs the primary";
        return Err(BrokerError::new(BrokerErrorKind::Connection, message));
    }
    check_version(version.as_deref())?;
    crate::access::check(&mut conn, &options.namespace, server)
}

/// What the start-up check learns of the server.
struct Identity {
    /// Its version (`None`: the user may not ask).
    version: Option<String>,
    /// `master` or `replica` (`None`: not said).
    role: Option<String>,
}

/// The server's version and role: from `HELLO` (in `@connection`, and allowed to every
/// user), or `INFO server` (in `@dangerous`) where the server does not answer `HELLO` (older
/// than 6.0, or the command is renamed away); `None` when the user may not run `INFO` either.
fn server_identity(conn: &mut redis::Connection) -> redis::RedisResult<Identity> {
    let refused = |e: &redis::RedisError| e.code().is_some() && !crate::conn::is_not_ready(e);
    match redis::cmd("HELLO").query::<redis::Value>(conn) {
        Ok(hello) => {
            let fields = hello_fields(hello);
            let field = |name: &str| fields.iter().find(|(key, _)| key == name).map(|(_, value)| value.clone());
            return Ok(Identity { version: field("version"), role: field("role") });
        }
        Err(e) if refused(&e) => {}
        Err(e) => return Err(e),
    }
    match redis::cmd("INFO").arg("server").query::<String>(conn) {
        Ok(info) => {
            let version =
                info.lines().find_map(|line| line.strip_prefix("redis_version:")).map(|v| v.trim().to_owned());
            Ok(Identity { version, role: None })
        }
        Err(e) if refused(&e) => Ok(Identity { version: None, role: None }),
        Err(e) => Err(e),
    }
}

/// The string fields of a `HELLO` reply (pairs in a RESP2 array, or a RESP3 map).
fn hello_fields(hello: redis::Value) -> Vec<(String, String)> {
    use redis::Value;
    let pairs: Vec<(Value, Value)> = match hello {
        Value::Map(pairs) => pairs,
        Value::Array(items) => {
            let mut items = items.into_iter();
            std::iter::from_fn(|| Some((items.next()?, items.next()?))).collect()
        }
        _ => return Vec::new(),
    };
    pairs
        .into_iter()
        .filter_map(|(key, value)| Some((redis::from_redis_value(key).ok()?, redis::from_redis_value(value).ok()?)))
        .collect()
}

/// What a failed start-up attempt means: the server is not there yet (a
/// [`BrokerErrorKind::Connection`] with a short reason, tried again) or something waiting
/// cannot fix (bad credentials, a TLS certificate refused, not a Redis server, …).
fn start_up_error(server: &str, e: redis::RedisError) -> BrokerError {
    use redis::{ErrorKind, RetryMethod, ServerErrorKind};
    if e.kind() == ErrorKind::AuthenticationFailed || matches!(e.code(), Some("NOAUTH" | "WRONGPASS")) {
        let message = format!("{server} refused the credentials: check the user and password in the URL");
        return BrokerError::with_source(BrokerErrorKind::Config, message, e);
    }
    if let Some(message) = crate::tls::refusal(server, &e) {
        return BrokerError::with_source(BrokerErrorKind::Config, message, e);
    }
    if e.is_io_error() || matches!(e.retry_method(), RetryMethod::WaitAndRetry) {
        let reason = if e.is_connection_refusal() {
            "connection refused".to_owned()
        } else if e.is_timeout() {
            "timed out".to_owned()
        } else if e.kind() == ErrorKind::Server(ServerErrorKind::BusyLoading) {
            "the server is still loading its data".to_owned()
        } else if e.is_connection_dropped() {
            "the connection was closed".to_owned()
        } else {
            e.to_string()
        };
        return BrokerError::with_source(BrokerErrorKind::Connection, reason, e);
    }
    if e.kind() == ErrorKind::Parse {
        let message = format!("{server} does not answer as Redis does: is that the port of a Redis server?");
        return BrokerError::with_source(BrokerErrorKind::Config, message, e);
    }
    BrokerError::with_source(BrokerErrorKind::Protocol, format!("{server} refused the start-up check (HELLO, PING)"), e)
}

fn check_version(version: Option<&str>) -> Result<(), BrokerError> {
    let Some(version) = version else {
        return Err(BrokerError::new(
            BrokerErrorKind::Config,
            "cannot learn the redis server's version: it does not answer HELLO, and the user may not run INFO \
             (grant `+info`)",
        ));
    };
    let major: u32 = version.split('.').next().and_then(|m| m.parse().ok()).unwrap_or(0);
    if major < 7 {
        return Err(BrokerError::new(
            BrokerErrorKind::Config,
            format!("redis {version} is too old: dingo needs 7.0 or later (BLMPOP, RPOP with a count)"),
        ));
    }
    Ok(())
}

impl Shutdown for Inner {
    fn shutdown(&self) {
        if !self.life.close() {
            return;
        }
        // Queued work is written before the threads stop.
        if let Some(writer) = self.writer.get() {
            writer.stop();
        }
        if let Some(completer) = self.completer.get() {
            completer.stop();
        }
        if let Some(flusher) = self.flusher.get() {
            flusher.stop();
        }
        if let Some(keeper) = self.keeper.get() {
            keeper.stop();
        }
        if let Some(promoter) = self.promoter.get() {
            promoter.stop();
        }
        if let Some(listener) = self.listener.get() {
            listener.stop();
        }
        self.router.close();
        self.remove_own_keys();
    }
}

impl Producer for RedisBroker {
    fn attach(&self, events: &EventSink) {
        self.inner.life.attach(events);
    }

    fn declare(&self, task: &TaskName) -> Result<(), BrokerError> {
        self.inner.declare(task)
    }

    fn send(&self, message: TaskMessage, timeout: Option<Duration>) -> Result<(), BrokerError> {
        let inner = &self.inner;
        inner.life.check_open()?;
        if !inner.is_declared(message.name.as_str())? {
            return Err(BrokerError::new(
                BrokerErrorKind::Unroutable,
                format!("no app declared task `{}` in namespace `{}`", message.name, inner.options.namespace),
            ));
        }
        let bytes = wire::encode_task(&message)?;
        check_size("task message", bytes.len(), inner.options.max_message_size)?;
        let queue = inner.queue_keys(message.name.as_str());
        let reply = match &message.reply_to {
            ReplyTo::Address(caller) => Some(caller.clone()),
            _ => None,
        };
        let due = message.due.filter(|due| *due > SystemTime::now()).map(wire::millis);
        let at_most_once = message.options.at_most_once;
        let outgoing = Outgoing { queue, at_most_once, bytes, due, key: message.key(), reply };
        let writer = inner.writer.get_or_start(|| Writer::start(inner.clone()))?;
        writer.send(outgoing, timeout)
    }

    fn retry(&self, message: TaskMessage, ack: Option<Ack>) -> Result<(), BrokerError> {
        let (ours, other) = match ack.map(|ack| ack.downcast::<RedisAck>()) {
            Some(Ok(ours)) if ours.is_from(&self.inner) && ours.queue.task == message.name.as_str() => {
                (Some(ours), None)
            }
            Some(Ok(foreign)) => (None, Some(Ack::new(*foreign))),
            Some(Err(ack)) => (None, Some(ack)),
            None => (None, None),
        };
        let Some(ours) = ours else {
            // Another broker's delivery, or one without a lease: sent, then settled.
            self.send(message, None)?;
            return other.map_or(Ok(()), Ack::ack);
        };
        // Our own delivery: its message leaves the processing list in the step that queues
        // the next attempt (with the worker's next fetch), so a crash between the two
        // cannot leave both, or neither. Not checked against `max_message_size`: the
        // attempt was taken within it, and one a few bytes over is dead-lettered on receipt.
        self.inner.life.check_open()?;
        match wire::encode_task(&message) {
            Ok(bytes) => {
                let due = wire::millis(message.due.unwrap_or_else(SystemTime::now));
                (*ours).settle(Settle::Retry { due, bytes })
            }
            Err(e) => {
                // Settled all the same (settlements are positional: one skipped would settle
                // another task's message), to the dead letters, where it can be replayed.
                let reason = format!("its retry could not be encoded: {}", dingo_core::error::chain(&e));
                (*ours).settle(Settle::Dead { reason, keep: 0 })?;
                Err(e)
            }
        }
    }

    fn close(&self) {
        self.inner.life.release(&*self.inner);
    }
}

impl Consumer for RedisBroker {
    fn attach(&self, events: &EventSink) {
        self.inner.life.attach(events);
    }

    fn declare(&self, task: &TaskName) -> Result<(), BrokerError> {
        self.inner.declare(task)
    }

    fn consume(&self, tasks: &[TaskName], settings: &ConsumeSettings) -> Result<Box<dyn Subscription>, BrokerError> {
        self.inner.life.check_open()?;
        if tasks.is_empty() {
            return Err(BrokerError::new(BrokerErrorKind::Config, "a subscription needs at least one task"));
        }
        self.inner.keeper()?;
        self.inner.completer()?;
        let subscription = fetcher::RedisSubscription::start(self.clone(), tasks, settings)?;
        // Its queues are consumed now: the promoter takes them on.
        self.inner.promoter()?.refresh();
        Ok(Box::new(subscription))
    }

    /// Kept current two ways (see [Cancellation](crate#guarantees)): every fetch returns its
    /// queue's cancel generation, and a worker loads the cancels it lacks before it hands out
    /// what it took; the lease keeper polls the generations of the queues this process
    /// consumes every 100 ms, for the tasks running or fetched already.
    fn cancels(&self) -> Option<Arc<Cancels>> {
        Some(self.inner.cancels.clone())
    }

    fn close(&self) {
        self.inner.life.release(&*self.inner);
    }
}

impl Reporter for RedisBroker {
    fn attach(&self, events: &EventSink) {
        self.inner.life.attach(events);
    }

    fn report(&self, to: &ReplyTo, report: ReportMessage<'_>) -> Result<(), BrokerError> {
        let Some(caller) = caller(to)? else {
            return Ok(());
        };
        let queue = self.inner.queue_keys(report.name.as_str());
        let op = Op::Report { queue, caller, bytes: wire::encode_report(&report)?, then: None };
        match fetcher::report_here(&self.inner, op)? {
            None => Ok(()),
            Some(op) => self.inner.completer()?.push(op),
        }
    }

    fn finish(&self, to: &ReplyTo, report: ReportMessage<'_>, ack: Option<Ack>) -> Result<(), BrokerError> {
        let caller = caller(to)?;
        let bytes = match caller {
            Some(_) => Some(wire::encode_report(&report)?),
            None => None,
        };
        match ack.map(|ack| ack.downcast::<RedisAck>()) {
            // Our own delivery: its message leaves the processing list in the step that
            // stores the report, with the worker's next fetch.
            Some(Ok(ours)) if ours.is_from(&self.inner) => (*ours).settle(Settle::Complete { caller, bytes }),
            other => {
                // A delivery of another broker or transport: acknowledged once the report is
                // stored (at least once across transports).
                let then = match other {
                    Some(Ok(foreign)) => Some(Ack::new(*foreign)),
                    Some(Err(ack)) => Some(ack),
                    None => None,
                };
                let (Some(caller), Some(bytes)) = (caller, bytes) else {
                    return then.map_or(Ok(()), Ack::ack);
                };
                let queue = self.inner.queue_keys(report.name.as_str());
                if then.is_some() {
                    return self.inner.completer()?.push(Op::Report { queue, caller, bytes, then });
                }
                // A task without a lease (at most once): on the worker's connection, in order
                // with its progress, when this is a worker thread of ours.
                match fetcher::finish_here(&self.inner, &queue, caller, bytes) {
                    None => Ok(()),
                    Some((caller, bytes)) => {
                        self.inner.completer()?.push(Op::Report { queue, caller, bytes, then: None })
                    }
                }
            }
        }
    }

    fn close(&self) {
        self.inner.life.release(&*self.inner);
    }
}

/// What a process's connections are called at the server (`CLIENT LIST`):
/// `dingo:NAMESPACE:PROCESS:ROLE`.
fn client_name(namespace: &str, process: &str, role: &str) -> String {
    format!("dingo:{namespace}:{process}:{role}")
}

/// The caller process a report goes to.
fn caller(to: &ReplyTo) -> Result<Option<Arc<str>>, BrokerError> {
    Ok(reply_address(to, "redis")?.cloned())
}

impl Store for RedisBroker {
    fn attach(&self, events: &EventSink) {
        self.inner.life.attach(events);
    }

    fn watch(&self, key: &CallKey, sink: ReplySink) -> Result<ReplyTo, BrokerError> {
        let inner = &self.inner;
        inner.life.check_open()?;
        let listener = inner.listener.get_or_start(|| Listener::start(inner.clone()))?;
        match inner.queues.load().get(key.name.as_str()) {
            // Borrowed: cloning the shared `Arc` on every call costs a contended counter.
            Some(queue) => listener.listen_to(queue),
            None => listener.listen_to(&inner.queue_keys(key.name.as_str())),
        }
        inner.router.watch(key, sink);
        Ok(ReplyTo::Address(inner.process.clone()))
    }

    fn forget(&self, key: &CallKey) {
        self.inner.router.forget(key);
    }

    fn wait_spin(&self) -> Duration {
        self.inner.router.wait_spin(self.inner.options.wait_spin)
    }

    fn close(&self) {
        self.inner.life.release(&*self.inner);
    }
}

/// The operator's role: cancels in the queues' cancelled sets, dead letters and purges
/// with scripts that each take what they change in one step (see the key layout).
impl Admin for RedisBroker {
    /// One `CANCEL` script on the queue's keys, which also prunes the cancels that lapsed.
    /// Workers of every process learn of it from their next fetch (before they hand out what
    /// it took) and from their lease keeper's poll (within 100 ms, for tasks
    /// running or fetched already): see [Cancellation](crate#guarantees).
    fn cancel(&self, key: &CallKey, until: SystemTime) -> Result<(), BrokerError> {
        self.inner.life.check_open()?;
        let queue = self.inner.queue_keys(key.name.as_str());
        let until = wire::millis(until).to_string();
        self.inner
            .command(&mut |c| {
                crate::scripts::CANCEL
                    .key(&queue.cancelled)
                    .key(&queue.cancelled_gen)
                    .key(&queue.cancelled_log)
                    .arg(&until)
                    .arg(key.id.as_str())
                    .invoke::<i64>(c)
            })
            .map(|_| ())
            .map_err(|e| broker_error("recording the cancel failed", e))
    }

    fn dead_letters(&self, queue: &TaskName, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let keys = self.inner.queue_keys(queue.as_str());
        // The oldest are at the tail.
        let from = -i64::try_from(limit).unwrap_or(i64::MAX);
        let entries: Vec<Vec<u8>> = self
            .inner
            .command(&mut |c| redis::cmd("LRANGE").arg(&keys.dead).arg(from).arg(-1).query(c))
            .map_err(|e| broker_error("reading dead letters failed", e))?;
        Ok(entries.iter().rev().filter_map(|entry| dead_entry::decode(queue, entry)).collect())
    }

    fn dead_count(&self, queue: &TaskName) -> Result<usize, BrokerError> {
        let keys = self.inner.queue_keys(queue.as_str());
        self.inner
            .command(&mut |c| redis::cmd("LLEN").arg(&keys.dead).query(c))
            .map_err(|e| broker_error("counting dead letters failed", e))
    }

    /// In batches (up to 100 letters, 1 MiB), oldest first, each one `UNBURY` script that
    /// removes the exact entries it sends back (see the key layout): a process killed
    /// half-way leaves every letter either sent back or still dead, and a replay after it
    /// (in any process) sends the rest. Letters buried while it runs wait for the next.
    fn replay(&self, queue: &TaskName, select: &Select) -> Result<usize, BrokerError> {
        self.inner.life.check_open()?;
        self.unbury(queue, select, true)
    }

    fn purge_dead(&self, queue: &TaskName, select: &Select) -> Result<usize, BrokerError> {
        if *select == Select::All {
            let keys = self.inner.queue_keys(queue.as_str());
            // One transaction: the count is of what it deleted.
            let (count,): (usize,) = self
                .inner
                .command(&mut |c| {
                    redis::pipe()
                        .atomic()
                        .cmd("LLEN")
                        .arg(&keys.dead)
                        .cmd("DEL")
                        .arg(&keys.dead)
                        .arg(&keys.dead_bytes)
                        .ignore()
                        .query(c)
                })
                .map_err(|e| broker_error("purging dead letters failed", e))?;
            return Ok(count);
        }
        self.unbury(queue, select, false)
    }

    /// One transaction: both lists of waiting messages (at least and at most once) and the
    /// wake token go; delayed messages and the processing lists of running tasks stay.
    fn purge(&self, queue: &TaskName) -> Result<usize, BrokerError> {
        let keys = self.inner.queue_keys(queue.as_str());
        let (pending, amo): (usize, usize) = self
            .inner
            .command(&mut |c| {
                redis::pipe()
                    .atomic()
                    .cmd("LLEN")
                    .arg(&keys.pending)
                    .cmd("LLEN")
                    .arg(&keys.amo)
                    .cmd("DEL")
                    .arg(&keys.pending)
                    .arg(&keys.amo)
                    .arg(&keys.wake)
                    .ignore()
                    .query(c)
            })
            .map_err(|e| broker_error("purging the queue failed", e))?;
        Ok(pending + amo)
    }
}

impl RedisBroker {
    /// Takes the selected dead letters of `queue` out, oldest first, sending each back
    /// (`replay`) or not; returns how many it took.
    fn unbury(&self, queue: &TaskName, select: &Select, replay: bool) -> Result<usize, BrokerError> {
        let keys = self.inner.queue_keys(queue.as_str());
        let entries: Vec<Vec<u8>> = self
            .inner
            .command(&mut |c| redis::cmd("LRANGE").arg(&keys.dead).arg(0).arg(-1).query(c))
            .map_err(|e| broker_error("reading dead letters failed", e))?;
        // An actor of its own for this replay: a batch sent again applies once.
        let mut sequence = Sequence::new(if replay { "replay" } else { "purge" }, UuidV7.next_id().as_str());
        let mode = if replay { "replay" } else { "purge" };
        let mut taken = 0;
        let mut batch: Vec<Vec<u8>> = Vec::new();
        let (mut letters, mut bytes) = (0, 0);
        let run = |batch: &mut Vec<Vec<u8>>, sequence: &mut Sequence| -> Result<usize, BrokerError> {
            let (seq_key, seq) = sequence.next(&keys);
            let mut call = crate::scripts::Call::new(&crate::scripts::UNBURY)
                .key(keys.dead.clone())
                .key(keys.dead_bytes.clone())
                .key(keys.pending.clone())
                .key(keys.amo.clone())
                .key(keys.wake.clone())
                .key(seq_key)
                .numbered(seq)
                .arg("60000")
                .arg(mode);
            call.args.append(batch);
            let calls = [call];
            let result = self
                .inner
                .command(&mut |c| crate::scripts::run_batch(c, &calls))
                .map_err(|e| broker_error("taking dead letters out failed", e))?;
            let n: usize = result.into_iter().next().and_then(|v| redis::from_redis_value(v).ok()).unwrap_or(0);
            Ok(n)
        };
        for entry in entries.iter().rev() {
            let Some(letter) = dead_entry::decode(queue, entry) else { continue };
            if !letter.is_selected(select) {
                continue;
            }
            let message = if replay { Some(letter.replay_bytes()) } else { None };
            let size = entry.len() + message.as_ref().map_or(0, Vec::len);
            if letters > 0 && (letters >= UNBURY_BATCH || bytes + size > UNBURY_BYTES) {
                taken += run(&mut batch, &mut sequence)?;
                (letters, bytes) = (0, 0);
            }
            batch.push(entry.clone());
            if let Some(message) = message {
                batch.push(message);
            }
            letters += 1;
            bytes += size;
        }
        if letters > 0 {
            taken += run(&mut batch, &mut sequence)?;
        }
        Ok(taken)
    }
}

/// How a dead letter is kept in a queue's dead-letter list: a 4-byte little-endian word —
/// the reason's length, with the top bit set — the time it was buried (8 bytes little
/// endian, ms since the Unix epoch, by the burying process's clock), the reason, the
/// message. Entries written before the time was recorded have the top bit clear and no
/// time (still read).
pub(crate) mod dead_entry {
    use std::time::SystemTime;

    use dingo_core::message::wire;
    use dingo_core::{DeadLetter, TaskName};

    /// The top bit of the first word: a time follows.
    const TIMED: u32 = 1 << 31;

    /// The part before the message, stamped now.
    pub(crate) fn prefix(reason: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + reason.len());
        let len = u32::try_from(reason.len()).unwrap_or(u32::MAX) & !TIMED;
        out.extend_from_slice(&(len | TIMED).to_le_bytes());
        out.extend_from_slice(&wire::millis(SystemTime::now()).to_le_bytes());
        out.extend_from_slice(&reason.as_bytes()[..len as usize]);
        out
    }

    /// A dead letter of `queue` (`None`: not an entry of this layout).
    pub(crate) fn decode(queue: &TaskName, entry: &[u8]) -> Option<DeadLetter> {
        let word = u32::from_le_bytes(entry.get(..4)?.try_into().ok()?);
        let (len, at, start) = if word & TIMED != 0 {
            let millis = u64::from_le_bytes(entry.get(4..12)?.try_into().ok()?);
            ((word & !TIMED) as usize, Some(wire::time(millis)), 12)
        } else {
            (word as usize, None, 4)
        };
        let reason = std::str::from_utf8(entry.get(start..start + len)?).ok()?.to_owned();
        let bytes = entry.get(start + len..)?.to_vec();
        Some(DeadLetter::new(queue.clone(), reason, bytes).with_time(at))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn entries_are_read_with_and_without_a_time() {
            let queue = TaskName::from("q");
            let mut entry = prefix("why");
            entry.extend_from_slice(b"message");
            let letter = decode(&queue, &entry).expect("an entry");
            assert_eq!((letter.reason.as_str(), letter.bytes.as_slice()), ("why", &b"message"[..]));
            let at = letter.at.expect("a time");
            assert!(SystemTime::now().duration_since(at).expect("in the past").as_secs() < 60);
            // The layout before times were recorded.
            let mut old = 3u32.to_le_bytes().to_vec();
            old.extend_from_slice(b"whymessage");
            let letter = decode(&queue, &old).expect("an old entry");
            assert_eq!((letter.reason.as_str(), letter.bytes.as_slice(), letter.at), ("why", &b"message"[..], None));
            assert!(decode(&queue, &[1, 2]).is_none());
        }
    }
}
