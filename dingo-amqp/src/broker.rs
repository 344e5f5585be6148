//! [`AmqpBroker`]: the four roles over RabbitMQ, and the operator's ([`admin`]). One connection per broker; a channel used
//! by several threads sits behind a lock (amiquip's channels are not `Sync`):
//!
//! | thread | role | does |
//! | --- | --- | --- |
//! | the app's callers and workers ([`publisher`]) | producer, reporter | publish task messages and reports themselves, on the broker's one confirmed channel (under a lock, in order) |
//! | `dingo-amqp-confirm` ([`publisher`]) | producer, reporter | acts on each confirm (acknowledges the task a report finishes, on its pool's channel) and on returns (unroutable messages); replaces the channel when it breaks and publishes again what was not confirmed |
//! | the app's worker threads ([`subscription`]) | consumer | take deliveries straight from amiquip's consumer channels; settle them on the pool's channel (under its lock): acknowledge at-most-once tasks, requeue, dead-letter |
//! | `dingo-amqp-consume` ([`subscription`]), one per worker pool | consumer | opens the pool's channel, declares and consumes the pool's queues with per-consumer prefetch; replaces the channel when a worker finds it broken; pauses the pool (cancels its consumers, hands back what waits) while its threads are all busy, resumes it when one is free; at stop cancels the consumers, hands back what they delivered, waits for outstanding settlements, then closes the channel |
//! | `dingo-amqp-reply` ([`listener`]) | store | consumes this process's reply queue and routes reports to handles |
//! | `dingo-amqp-cancels` ([`cancels`]), one per broker that consumes | consumer | reads the namespace's cancel stream from its first message, then live, into the broker's cancel set; tells subscriptions when their markers arrive |
//!
//! Declarations, queue inspection, cancels and markers (published with a confirm each) use a
//! control channel under a lock; dead-letter replays and selective purges ([`admin`]) a
//! channel of their own each.

mod ack;
mod admin;
mod cancels;
mod listener;
mod publisher;
mod subscription;

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use amiquip::{Channel, FieldTable, QueueDeleteOptions};
use dingo_core::broker::kit::{Lazy, Lifecycle, Shutdown, ShutdownOnDrop};
pub(crate) use dingo_core::broker::kit::{Stop, Thread, lock};
use dingo_core::broker::router::{ReportRouter, UnclaimedLimit};
use dingo_core::broker::support::{check_size, redact_url, reply_address};
use dingo_core::broker::{Ack, Cancels, ConsumeSettings, Consumer, Producer, Reporter, Store, Subscription};
use dingo_core::event::{EventSink, EventSinks};
use dingo_core::id::UuidV7;
use dingo_core::message::{ReplySink, ReplyTo, ReportBody, ReportMessage, TaskMessage, wire};
use dingo_core::{BrokerError, BrokerErrorKind, CallKey, IdMaker, TaskError, TaskErrorKind, TaskName};

use crate::conn::{self, Address, Opened, Session, amqp_error};
use crate::options::AmqpOptions;
use crate::topology::{self, Names};

use cancels::CancelWatch;
use listener::Listener;
use publisher::{Delay, Outgoing, Publisher, Sent, Then};

/// What errors call the broker.
pub(crate) const NAME: &str = "the RabbitMQ broker";

/// The RabbitMQ broker: task transport and report transport, usable for either role alone.
///
/// Cheap to clone; clones share the connection and threads. Apps that use it release it on
/// close; when the last one has, its threads publish what is queued (and wait for the
/// confirms) and stop, and calls still waiting for reports get a `Shutdown` failure.
#[derive(Clone)]
pub struct AmqpBroker {
    pub(crate) inner: Arc<Inner>,
    /// Shared by the clones: when the last goes, the broker shuts down (its threads hold
    /// `inner`, not this).
    _last: Arc<ShutdownOnDrop<Inner>>,
}

dingo_core::counters! {
    /// Counters of what happened, for monitoring and tests.
    pub struct Stats / Counters {
        /// Task messages RabbitMQ confirmed.
        sent,
        /// Of those, task messages sent into the delay queues (due later: delayed calls,
        /// retries after a backoff, and tasks that arrived before their due time and went
        /// round again).
        delayed,
        /// Messages RabbitMQ returned as unroutable (their queue is gone).
        returned,
        /// Task messages delivered to this process's subscriptions.
        fetched,
        /// Deliveries that RabbitMQ had delivered before (a consumer died or gave them back).
        redelivered,
        /// Deliveries acknowledged (their final report confirmed first).
        acked,
        /// Deliveries given back to their queue unstarted (by a stopping pool, or one whose
        /// threads were all busy), and redelivered ones published again with their count.
        requeued,
        /// Times a pool handed back its prefetched tasks and paused because every one of its
        /// threads stayed busy ([`hand_back_after`](AmqpOptions::hand_back_after)).
        pauses,
        /// Messages moved to the dead letters.
        dead_lettered,
        /// Reports RabbitMQ confirmed.
        reports,
        /// Messages published again on a new channel because the one they went out on broke
        /// before RabbitMQ confirmed them (at least once: RabbitMQ may have stored some twice).
        republished,
        /// Received messages over `max_message_size`, not decoded: task messages dead-lettered
        /// (a copy of their first 4 KiB), reports dropped.
        oversize,
    }
}

pub(crate) struct Inner {
    pub(crate) options: AmqpOptions,
    pub(crate) names: Names,
    /// This broker instance's reply queue (its address in task messages).
    pub(crate) reply_queue: Arc<str>,
    pub(crate) session: Session,
    pub(crate) events: EventSinks,
    pub(crate) stats: Counters,
    pub(crate) router: ReportRouter,
    /// Tasks whose queues are known to exist.
    known: Mutex<HashSet<String>>,
    /// How many levels of the namespace's delay chain this broker declared (from level 0).
    delay_levels: AtomicU32,
    control: Mutex<Option<Opened>>,
    /// The connection of the cancel stream (declaring, publishing, reading it), apart from
    /// the tasks': RabbitMQ 3.10 closes a connection whose channel writes into a stream
    /// whose writer is not up yet (see [Cancels](crate#cancels)); then only this one goes.
    streams: Lazy<Session>,
    /// The control channel on `streams`.
    stream_control: Mutex<Option<Opened>>,
    life: Lifecycle,
    publisher: Lazy<Publisher>,
    listener: Lazy<Listener>,
    /// The cancels this broker's workers honour (see [Cancels](crate#cancels)).
    pub(crate) cancels: Arc<Cancels>,
    /// Whether this broker declared the cancel stream.
    cancels_declared: AtomicBool,
    /// Reads the cancel stream into `cancels`: started with the first subscription.
    cancel_watch: Lazy<CancelWatch>,
}

impl AmqpBroker {
    /// Connects with default options: `amqp://user:pass@host:port/vhost` (`%2f` is the
    /// default vhost `/`), or `amqps://…` with the `tls` feature. The server is reached at
    /// once: bad credentials, a virtual host the user may not use or a bad URL are an error;
    /// a server that cannot be reached yet is tried again for
    /// [`connect_retry`](AmqpOptions::connect_retry) (30 s), then the error says which URL
    /// and why.
    ///
    /// The URL's query may set options: `namespace`, `durable`, `quorum`,
    /// `persistent_reports`, `prefetch`, `hand_back_after_ms` (0: off), `max_redeliveries`,
    /// `max_unconfirmed`, `heartbeat` (s), `connection_timeout` (ms), `result_ttl_s`,
    /// `wait_spin_us`, `connect_retry_s`, and for `amqps://` the TLS files `cacertfile`,
    /// `certfile`, `keyfile` (see [TLS](crate#tls))
    /// (`amqp://guest:guest@127.0.0.1:5672/%2f?namespace=shop&prefetch=256`); they override
    /// the options given to [`connect_with`](AmqpBroker::connect_with).
    pub fn connect(url: &str) -> Result<AmqpBroker, BrokerError> {
        AmqpBroker::connect_with(url, AmqpOptions::default())
    }

    /// Connects with these options.
    pub fn connect_with(url: &str, options: AmqpOptions) -> Result<AmqpBroker, BrokerError> {
        let config =
            |e: String| BrokerError::new(BrokerErrorKind::Config, format!("AMQP URL {}: {e}", redact_url(url)));
        let (url, options) = options.apply_url(url).map_err(config)?;
        if options.quorum && !options.durable {
            return Err(BrokerError::new(BrokerErrorKind::Config, "quorum queues are always durable"));
        }
        let address = Address::parse(&url)?.with_tls(&options)?;
        let events = EventSinks::new();
        let session = Session::connect(address, options.clone(), events.clone())?;
        let names = Names::new(&options.namespace);
        let reply_queue: Arc<str> = Arc::from(names.reply_queue(UuidV7.next_id().as_str()));
        let inner = Arc::new(Inner {
            router: ReportRouter::new(
                options.result_ttl,
                UnclaimedLimit::new(options.max_unclaimed, options.max_unclaimed_bytes),
                events.clone(),
            ),
            names,
            reply_queue,
            session,
            events: events.clone(),
            stats: Counters::default(),
            known: Mutex::new(HashSet::new()),
            delay_levels: AtomicU32::new(0),
            control: Mutex::new(None),
            streams: Lazy::new(),
            stream_control: Mutex::new(None),
            life: Lifecycle::new(NAME, events),
            publisher: Lazy::new(),
            listener: Lazy::new(),
            cancels: Arc::new(Cancels::new()),
            cancels_declared: AtomicBool::new(false),
            cancel_watch: Lazy::new(),
            options,
        });
        Ok(AmqpBroker { _last: ShutdownOnDrop::new(inner.clone()), inner })
    }

    /// The options in use.
    pub fn options(&self) -> &AmqpOptions {
        &self.inner.options
    }

    /// What happened so far: a snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.inner.stats.snapshot()
    }

    /// The queue a task's messages wait in (`NAMESPACE.task.NAME`).
    pub fn task_queue(&self, task: &str) -> Result<String, BrokerError> {
        self.inner.names.task_queue(task)
    }

    /// How many messages wait in a task's queue (not counting those delivered and not yet
    /// acknowledged).
    pub fn queue_len(&self, task: &str) -> Result<usize, BrokerError> {
        self.inner.queue_len(&self.inner.names.task_queue(task)?)
    }

    /// How many messages wait in the namespace's delay queues, for all its tasks (see
    /// [Delays](crate#delays)); levels not declared yet (no delay reached them) count 0.
    pub fn delayed_len(&self) -> Result<usize, BrokerError> {
        let (queues, _) = topology::delay_names(&self.inner.names);
        let mut total = 0;
        for queue in queues {
            total += match self.inner.with_control("reading the delay queues' lengths", |channel| {
                channel.queue_declare_passive(queue.clone()).map(|q| q.declared_message_count().unwrap_or(0) as usize)
            }) {
                Ok(len) => len,
                Err(e) if is_not_found(&e) => 0,
                Err(e) => return Err(e),
            };
        }
        Ok(total)
    }

    /// Publishes raw bytes into a task's queue, as a foreign or broken producer would (for
    /// tests and repair tools). Waits for the confirm.
    pub fn publish_raw(&self, task: &str, bytes: Vec<u8>) -> Result<(), BrokerError> {
        self.publish_raw_to(&self.inner.names.task_queue(task)?, bytes)
    }

    /// Publishes raw bytes into the queue named `queue` (a task's, a dead-letter queue, a
    /// caller's reply queue), as anyone allowed to write there could: for tests (forged
    /// reports) and repair tools. Waits for the confirm.
    pub fn publish_raw_to(&self, queue: &str, bytes: Vec<u8>) -> Result<(), BrokerError> {
        // Not twice: the first attempt may have been stored.
        self.inner.publish_confirmed("publishing raw bytes", queue, &bytes, None, false)
    }

    /// This broker's reply queue (its address in the task messages it sends).
    pub fn reply_queue(&self) -> &str {
        &self.inner.reply_queue
    }

    /// The tasks whose queues this broker declared or found.
    pub fn known_tasks(&self) -> Vec<String> {
        lock(&self.inner.known).iter().cloned().collect()
    }

    /// Deletes the queues of these tasks (with their dead letters), these reply queues, the
    /// namespace's dead-letter exchange, its delay queues and exchanges (with the delayed
    /// messages of every task) and its cancel stream (with every cancel), with whatever they
    /// hold. For tests and tools; never while
    /// apps use them.
    pub fn delete_topology(&self, tasks: &[String], reply_queues: &[String]) -> Result<(), BrokerError> {
        let mut queues = reply_queues.to_vec();
        for task in tasks {
            queues.push(self.inner.names.task_queue(task)?);
            queues.push(self.inner.names.dead_queue(task)?);
        }
        let (delay_queues, mut exchanges) = topology::delay_names(&self.inner.names);
        queues.extend(delay_queues);
        queues.push(self.inner.names.cancel_stream());
        exchanges.push(self.inner.names.dead_exchange());
        self.inner.with_control("deleting the topology", |channel| {
            for queue in &queues {
                channel.queue_delete(queue.clone(), QueueDeleteOptions::default())?;
            }
            for exchange in &exchanges {
                channel.exchange_delete(exchange.clone(), false)?;
            }
            Ok(())
        })?;
        self.inner.delay_levels.store(0, Ordering::Release);
        self.inner.forget_cancels();
        let mut known = lock(&self.inner.known);
        for task in tasks {
            known.remove(task);
        }
        Ok(())
    }

    /// Shuts the broker down for every app that uses it: queued messages are published and
    /// confirmed first, then the threads stop; pending calls get a `Shutdown` failure.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

impl fmt::Debug for AmqpBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpBroker")
            .field("namespace", &self.inner.options.namespace)
            .field("reply_queue", &self.inner.reply_queue)
            .field("closed", &self.inner.life.is_closed())
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// Runs `f` on the control channel; a channel the server closed (say, a passive
    /// declaration of a missing queue) is replaced, and a broken connection is reconnected
    /// and `f` tried once more.
    fn with_control<T>(
        &self,
        what: &str,
        f: impl FnMut(&Channel) -> Result<T, amiquip::Error>,
    ) -> Result<T, BrokerError> {
        self.with_channel(&self.session, &self.control, what, f)
    }

    /// [`with_control`](Inner::with_control) on the cancel stream's connection.
    pub(crate) fn with_stream<T>(
        &self,
        what: &str,
        f: impl FnMut(&Channel) -> Result<T, amiquip::Error>,
    ) -> Result<T, BrokerError> {
        self.with_channel(self.streams()?, &self.stream_control, what, f)
    }

    /// The cancel stream's connection, made at its first use.
    pub(crate) fn streams(&self) -> Result<&Session, BrokerError> {
        self.streams.get_or_start(|| self.session.sibling())
    }

    fn with_channel<T>(
        &self,
        session: &Session,
        slot: &Mutex<Option<Opened>>,
        what: &str,
        mut f: impl FnMut(&Channel) -> Result<T, amiquip::Error>,
    ) -> Result<T, BrokerError> {
        let mut control = lock(slot);
        let mut last = None;
        for _ in 0..2 {
            let opened = match control.take() {
                Some(opened) => opened,
                None => {
                    let give_up = AtomicBool::new(false);
                    let deadline = Instant::now() + self.options.connect_timeout;
                    match session.channel_until("control channel", &give_up, Some(deadline)) {
                        Some(opened) => opened,
                        None => {
                            return Err(BrokerError::new(
                                BrokerErrorKind::Connection,
                                format!("{what} failed: RabbitMQ unreachable"),
                            ));
                        }
                    }
                }
            };
            match f(&opened.channel) {
                Ok(value) => {
                    *control = Some(opened);
                    return Ok(value);
                }
                Err(e @ amiquip::Error::ServerClosedChannel { .. }) => {
                    // The server refused; the connection is fine.
                    return Err(amqp_error(&format!("{what} failed"), e));
                }
                Err(e) => {
                    session.channel_failed(opened.generation, "control channel", &e.to_string());
                    last = Some(e);
                }
            }
        }
        Err(amqp_error(&format!("{what} failed"), last.unwrap_or(amiquip::Error::ClientException)))
    }

    fn declare(&self, task: &TaskName) -> Result<(), BrokerError> {
        if lock(&self.known).contains(task.as_str()) {
            return Ok(());
        }
        let queues = topology::TaskQueues::of(&self.names, task.as_str())?;
        self.with_control("declaring the task's queues", |channel| {
            topology::declare_task(channel, &self.options, &queues)
        })?;
        lock(&self.known).insert(task.as_str().to_owned());
        Ok(())
    }

    /// Whether some app declared `task` (its queue exists), else nobody can ever run it.
    fn is_declared(&self, task: &str) -> Result<bool, BrokerError> {
        if lock(&self.known).contains(task) {
            return Ok(true);
        }
        let queue = self.names.task_queue(task)?;
        let exists = match self.with_control("checking the task's queue", |channel| {
            channel.queue_declare_passive(queue.clone()).map(|_| ())
        }) {
            Ok(()) => true,
            // RabbitMQ answers a passive declaration of a missing queue by closing the channel.
            Err(e) if is_not_found(&e) => false,
            Err(e) => return Err(e),
        };
        if exists {
            lock(&self.known).insert(task.to_owned());
        }
        Ok(exists)
    }

    /// Publishes `body` (with `headers`) into the queue named `queue` through the default
    /// exchange, `mandatory`, on the control channel, and waits for RabbitMQ's confirm: a
    /// message no queue took is an `Unroutable` error. `again`: it may be published once more
    /// on a new channel if the first broke before the confirm (it may then be stored twice).
    pub(crate) fn publish_confirmed(
        &self,
        what: &str,
        queue: &str,
        body: &[u8],
        headers: Option<FieldTable>,
        again: bool,
    ) -> Result<(), BrokerError> {
        self.publish_confirmed_on(false, what, queue, body, headers, again)
    }

    /// [`publish_confirmed`](Inner::publish_confirmed), on the cancel stream's connection
    /// when `stream`.
    fn publish_confirmed_on(
        &self,
        stream: bool,
        what: &str,
        queue: &str,
        body: &[u8],
        headers: Option<FieldTable>,
        again: bool,
    ) -> Result<(), BrokerError> {
        let mut published = false;
        let mut returned = false;
        let publish_once = |channel: &Channel| {
            if published && !again {
                return Err(amiquip::Error::ClientException);
            }
            published = true;
            channel.enable_publisher_confirms()?;
            let confirms = channel.listen_for_publisher_confirms()?;
            let returns = channel.listen_for_returns()?;
            let mut properties = amiquip::AmqpProperties::default().with_delivery_mode(2);
            if let Some(headers) = &headers {
                properties = properties.with_headers(headers.clone());
            }
            let publish =
                amiquip::Publish { body, routing_key: queue.to_owned(), mandatory: true, immediate: false, properties };
            channel.basic_publish("", publish)?;
            match confirms.recv_timeout(self.options.connect_timeout) {
                Ok(amiquip::Confirm::Ack(_)) => {
                    // A return comes before its confirm.
                    returned = returns.try_recv().is_ok();
                    Ok(())
                }
                _ => Err(amiquip::Error::ClientException),
            }
        };
        let result = if stream { self.with_stream(what, publish_once) } else { self.with_control(what, publish_once) };
        result?;
        if returned {
            return Err(BrokerError::new(
                BrokerErrorKind::Unroutable,
                format!("{what} failed: RabbitMQ has no queue `{queue}`"),
            ));
        }
        Ok(())
    }

    /// Publishes a message with `headers` into the cancel stream (declared first), confirmed.
    pub(crate) fn publish_to_cancels(&self, what: &str, headers: FieldTable) -> Result<(), BrokerError> {
        self.declare_cancels()?;
        // A cancel or a marker stored twice changes nothing.
        self.publish_confirmed_on(true, what, &self.names.cancel_stream(), &[], Some(headers), true)
    }

    /// Declares the cancel stream (once per broker, again after
    /// [`forget_cancels`](Inner::forget_cancels)) and waits until RabbitMQ can take messages
    /// into it: a stream just declared has no writer for a few milliseconds, and a message
    /// published then crashes RabbitMQ 3.10's channel process, and with it the whole
    /// connection (`INTERNAL_ERROR`, an `osiris_writer:write(none, …)` function clause). So
    /// a consumer is attached (and cancelled) first, which RabbitMQ refuses (`does not have a
    /// replica on the local node`, closing only the channel) until the stream is up.
    pub(crate) fn declare_cancels(&self) -> Result<(), BrokerError> {
        if self.cancels_declared.load(Ordering::Acquire) {
            return Ok(());
        }
        let stream = self.names.cancel_stream();
        let deadline = Instant::now() + self.options.connect_timeout * 2;
        loop {
            let ready = self.with_stream("declaring the cancel stream", |channel| {
                topology::declare_cancels(channel, &self.options, &self.names)?;
                // Stream consumers need a prefetch (it applies to consumers made after it).
                channel.qos(0, 1, false)?;
                let mut arguments = FieldTable::new();
                arguments.insert("x-stream-offset".into(), amiquip::AmqpValue::LongString("next".into()));
                let options = amiquip::ConsumerOptions { arguments, ..amiquip::ConsumerOptions::default() };
                let probe = channel.basic_consume(stream.clone(), options)?;
                conn::cancelled(&probe, drop);
                Ok(())
            });
            match ready {
                Ok(()) => break,
                Err(e) if is_starting(&e) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        }
        self.cancels_declared.store(true, Ordering::Release);
        Ok(())
    }

    /// The cancel stream may be gone (deleted): declared again before the next use.
    pub(crate) fn forget_cancels(&self) {
        self.cancels_declared.store(false, Ordering::Release);
    }

    /// The cancel stream's consumer, started at the first call.
    pub(crate) fn cancel_watch(self: &Arc<Inner>) -> Result<&CancelWatch, BrokerError> {
        self.cancel_watch.get_or_start(|| CancelWatch::start(self.clone()))
    }

    pub(crate) fn publisher(self: &Arc<Inner>) -> Result<&Publisher, BrokerError> {
        self.publisher.get_or_start(|| Publisher::start(self.clone()))
    }

    /// Declares the namespace's delay chain up to `levels` levels, those this broker has not
    /// declared yet (see [`topology::declare_delays`]).
    fn declare_delays(&self, levels: u32) -> Result<(), BrokerError> {
        if self.delay_levels.load(Ordering::Acquire) >= levels {
            return Ok(());
        }
        self.with_control("declaring the delay queues", |channel| {
            // Under the control channel's lock: read again, another thread may have been first.
            let from = self.delay_levels.load(Ordering::Acquire);
            topology::declare_delays(channel, &self.options, &self.names, from, levels)?;
            self.delay_levels.fetch_max(levels, Ordering::AcqRel);
            Ok(())
        })
    }

    /// Publishes a task message (`body`: its encoding, when the caller has it): straight to
    /// its queue, or, when it is due later, into the delay chain (the remaining delay
    /// counted from now, rounded up to the unit). With `ack` (a retry, or a message sent
    /// round the chain again), that delivery is acknowledged once RabbitMQ confirmed the
    /// message, and given back if it refused it.
    pub(crate) fn send_task(
        self: &Arc<Inner>,
        message: &TaskMessage,
        body: Option<Vec<u8>>,
        ack: Option<Ack>,
        redeliveries: u32,
        timeout: Option<Duration>,
    ) -> Result<(), BrokerError> {
        self.life.check_open()?;
        if !self.is_declared(message.name.as_str())? {
            return Err(BrokerError::new(
                BrokerErrorKind::Unroutable,
                format!("no app declared task `{}` in namespace `{}`", message.name, self.options.namespace),
            ));
        }
        let body = match body {
            Some(body) => body,
            None => wire::encode_task(message)?,
        };
        check_size("task message", body.len(), self.options.max_message_size)?;
        let reply = match &message.reply_to {
            ReplyTo::Address(caller) => Some(caller.clone()),
            _ => None,
        };
        let queue = self.names.task_queue(message.name.as_str())?;
        let (exchange, routing_key, delay) = match (delay_of(message), message.due) {
            (Some(units), Some(due)) => {
                let route = topology::delay_route(&self.names, units);
                self.declare_delays(route.levels)?;
                (route.exchange, route.routing_key, Some(Delay { queue, due, levels: route.levels }))
            }
            _ => (String::new(), queue, None),
        };
        let delayed = delay.is_some();
        let outgoing = Outgoing {
            exchange,
            routing_key,
            delay,
            body,
            persistent: self.options.durable && !message.options.at_most_once,
            correlation: None,
            reason: None,
            redeliveries,
            once: message.options.at_most_once,
            then: Then::Task { key: message.key(), reply, ack },
        };
        if self.publisher()?.send(outgoing, timeout)? == Sent::Unconfirmed {
            self.stats.sent.fetch_add(1, Ordering::Relaxed);
            if delayed {
                self.stats.delayed.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// How many delay units a message still has to wait (rounded up), by this process's clock:
/// `None` when it is due now.
pub(crate) fn delay_of(message: &TaskMessage) -> Option<u64> {
    topology::delay_units(message.wait_at(SystemTime::now())?)
}

impl Shutdown for Inner {
    fn shutdown(&self) {
        if !self.life.close() {
            return;
        }
        // Queued messages are published and confirmed before the threads stop.
        if let Some(publisher) = self.publisher.get() {
            publisher.stop();
        }
        if let Some(listener) = self.listener.get() {
            listener.stop();
        }
        if let Some(watch) = self.cancel_watch.get() {
            watch.stop();
        }
        self.router.close();
        *lock(&self.control) = None;
        *lock(&self.stream_control) = None;
        if let Some(streams) = self.streams.get() {
            streams.close();
        }
        self.session.close();
    }
}

impl Producer for AmqpBroker {
    fn attach(&self, events: &EventSink) {
        self.inner.life.attach(events);
    }

    fn declare(&self, task: &TaskName) -> Result<(), BrokerError> {
        self.inner.declare(task)
    }

    fn send(&self, message: TaskMessage, timeout: Option<Duration>) -> Result<(), BrokerError> {
        self.inner.send_task(&message, None, None, 0, timeout)
    }

    /// The next attempt is published (confirmed) first, and `ack` settled once RabbitMQ
    /// confirmed it, whichever broker the delivery came from: a refused or lost publish
    /// leaves the delivery unacknowledged, and it comes back (the same attempt runs again).
    fn retry(&self, message: TaskMessage, ack: Option<Ack>) -> Result<(), BrokerError> {
        self.inner.send_task(&message, None, ack, 0, None)
    }

    fn close(&self) {
        self.inner.life.release(&*self.inner);
    }
}

impl Consumer for AmqpBroker {
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
        for task in tasks {
            self.inner.declare(task)?;
        }
        self.inner.publisher()?;
        self.inner.cancel_watch()?;
        Ok(Box::new(subscription::AmqpSubscription::start(self.inner.clone(), tasks, settings)?))
    }

    /// Filled by the cancel stream's consumer; a subscription reads the stream up to its end
    /// before it consumes (at start and after every reconnection), and cancels this broker
    /// records go in at once (see [Cancels](crate#cancels)).
    fn cancels(&self) -> Option<Arc<Cancels>> {
        Some(self.inner.cancels.clone())
    }

    fn close(&self) {
        self.inner.life.release(&*self.inner);
    }
}

impl Reporter for AmqpBroker {
    fn attach(&self, events: &EventSink) {
        self.inner.life.attach(events);
    }

    fn report(&self, to: &ReplyTo, report: ReportMessage<'_>) -> Result<(), BrokerError> {
        let Some(queue) = reply_address(to, "RabbitMQ")? else {
            return Ok(());
        };
        self.inner.publish_report(queue, &report, None, false)
    }

    fn finish(&self, to: &ReplyTo, report: ReportMessage<'_>, ack: Option<Ack>) -> Result<(), BrokerError> {
        match reply_address(to, "RabbitMQ")? {
            // Acknowledged once RabbitMQ confirmed the report (whichever broker the
            // delivery came from). The report of an at-most-once task this thread took from
            // RabbitMQ is at most once too.
            Some(queue) => {
                let once = ack.is_none() && subscription::took_at_most_once(&report.key());
                self.inner.publish_report(queue, &report, ack, once)
            }
            None => ack.map_or(Ok(()), Ack::ack),
        }
    }

    fn close(&self) {
        self.inner.life.release(&*self.inner);
    }
}

impl Inner {
    fn publish_report(
        self: &Arc<Inner>,
        queue: &Arc<str>,
        report: &ReportMessage<'_>,
        ack: Option<Ack>,
        once: bool,
    ) -> Result<(), BrokerError> {
        self.life.check_open()?;
        // AMQP short strings (routing key, correlation id) hold 255 bytes; a longer one would
        // corrupt the frame and cost the whole connection.
        for (what, text) in [("reply queue", &**queue), ("task id", report.id.as_str())] {
            if text.len() > 255 {
                return Err(BrokerError::new(
                    BrokerErrorKind::Config,
                    format!("the {what} `{text}` is longer than AMQP's 255 bytes"),
                ));
            }
        }
        let mut body = wire::encode_report(report)?;
        if let Err(too_large) = check_size("report", body.len(), self.options.max_message_size) {
            if !report.body.is_final() {
                return Err(too_large);
            }
            // The caller must not wait for a result that cannot travel: it gets a failure.
            let message = format!("the result could not be sent: {too_large} (`max_message_size`)");
            let failure = ReportMessage {
                name: report.name.clone(),
                id: report.id.clone(),
                body: ReportBody::Failure(TaskError::new(TaskErrorKind::Encode, message)),
            };
            body = wire::encode_report(&failure)?;
        }
        let outgoing = Outgoing {
            exchange: String::new(),
            routing_key: queue.to_string(),
            delay: None,
            body,
            persistent: self.options.persistent_reports,
            correlation: Some(report.id.as_str().to_owned()),
            reason: None,
            redeliveries: 0,
            once,
            then: Then::Report { key: report.key(), ack, final_report: report.body.is_final() },
        };
        if self.publisher()?.send(outgoing, None)? == Sent::Unconfirmed {
            self.stats.reports.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl Store for AmqpBroker {
    fn attach(&self, events: &EventSink) {
        self.inner.life.attach(events);
    }

    fn watch(&self, key: &CallKey, sink: ReplySink) -> Result<ReplyTo, BrokerError> {
        let inner = &self.inner;
        inner.life.check_open()?;
        inner.listener.get_or_start(|| Listener::start(inner.clone()))?;
        inner.router.watch(key, sink);
        Ok(ReplyTo::Address(inner.reply_queue.clone()))
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

/// Whether RabbitMQ refused to attach to a stream it is still starting (406, "does not have
/// a replica on the local node").
fn is_starting(error: &BrokerError) -> bool {
    let source = std::error::Error::source(error).and_then(|s| s.downcast_ref::<amiquip::Error>());
    matches!(source, Some(amiquip::Error::ServerClosedChannel { code: 406, message, .. }) if message.contains("replica"))
}

/// Whether RabbitMQ answered "not found" (404).
fn is_not_found(error: &BrokerError) -> bool {
    let source = std::error::Error::source(error).and_then(|s| s.downcast_ref::<amiquip::Error>());
    matches!(source, Some(amiquip::Error::ServerClosedChannel { code: 404, .. }))
}
