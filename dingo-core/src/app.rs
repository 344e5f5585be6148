//! [`App`]: registers tasks, runs worker pools, makes calls.

mod builder;
#[path = "app/sending.rs"]
mod sending;

pub use builder::{AppBuilder, BrokerScheme};
pub use sending::CallFuture;

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::broker::kit::lock;
use crate::broker::{Admin, ConsumeSettings, Consumer, DeadLetter, Producer, Reporter, Select, Store};
use crate::codec::{CodecId, Codecs, Encoded};
use crate::context::Context;
use crate::error::{BrokerError, BrokerErrorKind, Error, Role, TaskError, TaskErrorKind};
use crate::event::{Event, EventFilter, EventKind, EventSink, Events, Level, Origin};
use crate::id::{CallKey, IdMaker, TaskId, TaskName};
use crate::limits::TimeLimits;
use crate::message::{Payload, ReplySink, ReplyTo, TaskMessage};
use crate::options::{CallOptions, TaskOptions};
use crate::registry::{self, Handler, RawOutput, Registry, Task, TaskRef};
use crate::result::{self, DecodeFn, Handle, Route, Slot};
use crate::retry::RetryPolicy;
use crate::worker::{Pool, Shared};

/// How many calls of its async tasks a pool runs at once unless told otherwise (see
/// [`App::allocate_concurrent`]).
pub const DEFAULT_CONCURRENCY: usize = 100;

/// A dingo application: the tasks it knows, the broker roles it uses, its worker pools.
///
/// Cheap to clone (all clones are the same app) and `Send + Sync`. One process may hold
/// several apps (a caller and a worker sharing a [`LocalBroker`](crate::LocalBroker), say).
///
/// ```
/// # fn main() -> Result<(), dingo_core::Error> {
/// let app = dingo_core::App::local()?;
/// app.register("add", |(a, b): (i64, i64)| a + b)?;
/// app.allocate("add", 2)?;
/// let sum: i64 = app.call("add", (2i64, 3i64))?.wait()?;
/// assert_eq!(sum, 5);
/// app.close()
/// # }
/// ```
#[derive(Clone)]
pub struct App {
    inner: Arc<Inner>,
}

struct Inner {
    producer: Option<Arc<dyn Producer>>,
    consumer: Option<Arc<dyn Consumer>>,
    reporter: Option<Arc<dyn Reporter>>,
    store: Option<Arc<dyn Store>>,
    /// The operator's role of the task broker (cancels, dead letters, purges).
    admin: Option<Arc<dyn Admin>>,
    /// The store and admin roles, as every handle of this app reaches them.
    route: Arc<Route>,
    /// The producer moves Rust values instead of bytes.
    local_args: bool,
    registry: Registry,
    codecs: Codecs,
    /// The same codecs behind a reference count only callers touch (each call's handle
    /// holds one; workers read `codecs`, whose count then stays still).
    caller_codecs: Arc<Codecs>,
    events: EventSink,
    pools: Mutex<Vec<Pool>>,
    closed: AtomicBool,
    shutdown_grace: Duration,
    worker_spin: Duration,
    /// Where async tasks run (feature `tokio`; `None`: on the pools' threads).
    #[cfg(feature = "tokio")]
    runtime: Option<tokio::runtime::Handle>,
    /// The thread `call_async` calls on, started by the first.
    sending: Mutex<Option<Arc<sending::Sending>>>,
}

impl App {
    /// An app on a new in-process [`LocalBroker`](crate::LocalBroker): no server needed.
    pub fn local() -> Result<App, Error> {
        App::builder().build()
    }

    /// An app on the broker a URL names: `local://` (in-process), `local://?serialized`,
    /// `redis://…` and `amqp://…` where those brokers are compiled in. An unknown scheme is an
    /// error.
    pub fn connect(url: &str) -> Result<App, Error> {
        App::builder().url(url)?.build()
    }

    /// Configures an app.
    pub fn builder() -> AppBuilder {
        AppBuilder::new()
    }

    /// Starts `count` worker threads dedicated to one task (callable again to add more).
    ///
    /// `task` is a `#[dingo::task]` function item (`app.allocate(add, 4)`) or a task name.
    pub fn allocate<M>(&self, task: impl TaskRef<M>, count: usize) -> Result<(), Error> {
        self.allocate_concurrent(task, count, DEFAULT_CONCURRENCY)
    }

    /// Starts `threads` worker threads for one task, which run up to `concurrency` calls of
    /// it at once when it is an `async fn` (a thread drives several futures while they wait;
    /// [`allocate`](App::allocate) allows [`DEFAULT_CONCURRENCY`]). Each thread takes an
    /// equal share (at least one). A blocking task runs one call per thread whatever
    /// `concurrency` says.
    ///
    /// ```
    /// # fn main() -> Result<(), dingo_core::Error> {
    /// let app = dingo_core::App::local()?;
    /// app.register_async("echo", |n: u64| async move { n })?;
    /// app.allocate_concurrent("echo", 2, 500)?; // two threads, up to 500 calls in flight
    /// assert_eq!(app.call::<_, u64>("echo", 7u64)?.wait()?, 7);
    /// # app.close()
    /// # }
    /// ```
    pub fn allocate_concurrent<M>(
        &self,
        task: impl TaskRef<M>,
        threads: usize,
        concurrency: usize,
    ) -> Result<(), Error> {
        let name = task.task_name()?;
        let handler = self
            .inner
            .registry
            .get(name.as_str())
            .and_then(|entry| entry.handler.clone())
            .ok_or_else(|| Error::UnknownTask { name: name.to_string() })?;
        if concurrency == 0 {
            return Err(Error::InvalidConfig("a pool's concurrency must be at least 1".into()));
        }
        self.spawn_pool(&short_label(name.as_str()), threads, concurrency.max(threads), vec![handler])
    }

    /// Starts `count` worker threads that serve every task registered so far, like a Celery
    /// worker with concurrency `count`.
    pub fn allocate_all(&self, count: usize) -> Result<(), Error> {
        let handlers = self.inner.registry.handlers();
        if handlers.is_empty() {
            return Err(Error::InvalidConfig(
                "no task is registered in this app: register closures with `App::register` or define \
                 `#[dingo::task]` functions; tasks in a crate nothing in the binary refers to are not \
                 linked, so not registered (add `use my_tasks as _;` to the binary)"
                    .into(),
            ));
        }
        self.spawn_pool("all", count, DEFAULT_CONCURRENCY.max(count), handlers)
    }

    fn spawn_pool(&self, label: &str, count: usize, concurrency: usize, handlers: Vec<Handler>) -> Result<(), Error> {
        if count == 0 {
            return Err(Error::InvalidConfig("a pool needs at least one worker".into()));
        }
        self.check_open()?;
        let consumer = self.inner.consumer.as_ref().ok_or(Error::MissingRole(Role::Consumer))?;
        let reporter = self.inner.reporter.clone().ok_or(Error::MissingRole(Role::Reporter))?;
        let names: Vec<TaskName> = handlers.iter().map(|h| h.name().clone()).collect();
        // Async tasks run several per thread: the broker may hand out as many at once.
        let any_async = handlers.iter().any(Handler::is_async);
        let mut settings = ConsumeSettings::new(count);
        if any_async {
            settings.prefetch = concurrency.max(count);
        }
        let subscription = consumer.consume(&names, &settings).map_err(broker_error)?;
        let limits = handlers
            .iter()
            .filter_map(|h| {
                let limits = self.inner.registry.with_settings(h.name().as_str(), |s, _| s.defaults.get_time_limits());
                (!limits.is_none()).then(|| (h.name().clone(), limits))
            })
            .collect();
        let shared = Shared {
            handlers: handlers.into_iter().map(|h| (h.name().clone(), h)).collect(),
            reporter,
            producer: self.inner.producer.clone(),
            codecs: self.inner.codecs.clone(),
            events: self.inner.events.clone(),
            spin: self.inner.worker_spin,
            cancels: consumer.cancels(),
            limits,
            written_off: AtomicU64::new(0),
            concurrency: if any_async { concurrency.div_ceil(count).max(1) } else { 1 },
            #[cfg(feature = "tokio")]
            runtime: self.inner.runtime.clone(),
        };
        let pool = Pool::spawn(label, count, subscription, shared)?;
        lock(&self.inner.pools).push(pool);
        // A close that raced with this allocation must not leave the pool running.
        if self.inner.closed.load(Ordering::Acquire) {
            for pool in std::mem::take(&mut *lock(&self.inner.pools)) {
                pool.stop();
            }
            return Err(Error::Shutdown);
        }
        Ok(())
    }

    /// Registers a closure (or any stateful function) as a task: `f` takes the arguments
    /// (the value itself for one, a tuple for several) and returns the result.
    ///
    /// Callers must register nothing to call it; workers must register it before
    /// `allocate`. A name already taken is an error.
    pub fn register<A, R, F>(&self, name: impl Into<String>, f: F) -> Result<(), Error>
    where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(A) -> R + Send + Sync + 'static,
    {
        let name = static_name(name.into());
        let handler = Handler::new(name, registry::fingerprint::<A, R>(), move |_: &Context<'_>, args: A| Ok(f(args)));
        self.add_handler(handler)
    }

    /// Registers a closure that gets the [`Context`] and can fail: an `Err(e)` becomes a
    /// `Failed` report carrying `e`.
    pub fn register_with_context<A, R, E, F>(&self, name: impl Into<String>, f: F) -> Result<(), Error>
    where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        E: Serialize + fmt::Display,
        F: Fn(&Context<'_>, A) -> Result<R, E> + Send + Sync + 'static,
    {
        let name = static_name(name.into());
        let handler = Handler::new(name, registry::fingerprint::<A, R>(), move |ctx: &Context<'_>, args: A| {
            f(ctx, args).map_err(|e| registry::failed(ctx, &e, e.to_string()))
        });
        self.add_handler(handler)
    }

    /// Registers an async closure as a task: `f` takes the arguments and returns a future of
    /// the result. Workers drive such futures concurrently, several per thread (see
    /// [`allocate_concurrent`](App::allocate_concurrent)).
    ///
    /// ```
    /// # fn main() -> Result<(), dingo_core::Error> {
    /// let app = dingo_core::App::local()?;
    /// app.register_async("greet", |name: String| async move { format!("hello, {name}") })?;
    /// app.allocate("greet", 1)?;
    /// let greeting: String = app.call("greet", "dingo".to_string())?.wait()?;
    /// assert_eq!(greeting, "hello, dingo");
    /// # app.close()
    /// # }
    /// ```
    pub fn register_async<A, R, F, Fut>(&self, name: impl Into<String>, f: F) -> Result<(), Error>
    where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
    {
        let name = static_name(name.into());
        let handler = Handler::new_async(name, registry::fingerprint::<A, R>(), move |_ctx, args: A| {
            let future = f(args);
            async move { Ok(future.await) }
        });
        self.add_handler(handler)
    }

    /// Registers an async closure that gets the [`Context`] (owned: the future keeps it) and
    /// can fail: an `Err(e)` becomes a `Failed` report carrying `e`.
    ///
    /// ```
    /// # fn main() -> Result<(), dingo_core::Error> {
    /// use std::sync::Arc;
    /// use dingo_core::{App, Context};
    ///
    /// let app = App::local()?;
    /// app.register_async_with_context("attempt", |ctx: Arc<Context<'static>>, ()| async move {
    ///     Ok::<u32, String>(ctx.attempt())
    /// })?;
    /// app.allocate("attempt", 1)?;
    /// assert_eq!(app.call::<_, u32>("attempt", ())?.wait()?, 1);
    /// # app.close()
    /// # }
    /// ```
    pub fn register_async_with_context<A, R, E, F, Fut>(&self, name: impl Into<String>, f: F) -> Result<(), Error>
    where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        E: Serialize + fmt::Display,
        F: Fn(Arc<Context<'static>>, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, E>> + Send + 'static,
    {
        let name = static_name(name.into());
        let handler = Handler::new_async(name, registry::fingerprint::<A, R>(), move |ctx, args: A| {
            let future = f(ctx.clone(), args);
            async move { future.await.map_err(|e| registry::failed(&ctx, &e, e.to_string())) }
        });
        self.add_handler(handler)
    }

    pub(crate) fn add_handler(&self, handler: Handler) -> Result<(), Error> {
        let name = self.inner.registry.add(handler)?;
        self.declare(&name)
    }

    fn declare(&self, name: &TaskName) -> Result<(), Error> {
        if let Some(producer) = &self.inner.producer {
            producer.declare(name).map_err(broker_error)?;
        }
        if let Some(consumer) = &self.inner.consumer {
            consumer.declare(name).map_err(broker_error)?;
        }
        Ok(())
    }

    /// Sets a task's default call options (a call's own options win, option by option; these
    /// win over the task attribute's, such as `retries = 5`). An explicit id cannot be a
    /// default (every call would share it).
    pub fn set_default_options<M>(&self, task: impl TaskRef<M>, options: CallOptions) -> Result<(), Error> {
        if options.get_id().is_some() {
            return Err(Error::InvalidConfig("an explicit id cannot be a default option".into()));
        }
        let name = task.task_name()?;
        self.inner.registry.update(&name, |s| s.defaults = options.or(&s.declared));
        Ok(())
    }

    /// Sets the id maker of a task's calls.
    pub fn set_id_maker<M>(&self, task: impl TaskRef<M>, maker: impl IdMaker) -> Result<(), Error> {
        let name = task.task_name()?;
        let maker: Arc<dyn IdMaker> = Arc::new(maker);
        self.inner.registry.update(&name, |s| s.id_maker = maker);
        Ok(())
    }

    /// Sets the codec a task's calls encode with (a codec the app knows, see
    /// [`AppBuilder::codec`]).
    pub fn set_codec<M>(&self, task: impl TaskRef<M>, codec: CodecId) -> Result<(), Error> {
        self.inner.codecs.get(codec)?;
        let name = task.task_name()?;
        self.inner.registry.update(&name, |s| s.codec = codec);
        Ok(())
    }

    /// Calls a task by name with typed arguments and result: the value itself for one
    /// argument (a one-element tuple `(x,)` works too), a tuple for several.
    ///
    /// The stubs generated by `#[dingo::task]` (`add::call(&app, 2, 3)`) are the checked
    /// way; this one is for closures registered with [`register`](App::register) and for
    /// tasks whose code the program does not link.
    ///
    /// The types are checked against the task's signature fingerprint. When this app itself
    /// has the task (every app has every linked `#[dingo::task]`; a closure, the app that
    /// registered it), a call with other types fails at once, naming both signatures;
    /// otherwise the worker refuses it, with a `SignatureMismatch` failure.
    ///
    /// ```
    /// # fn main() -> Result<(), dingo_core::Error> {
    /// use dingo_core::{App, TaskErrorKind};
    ///
    /// let app = App::local()?;
    /// app.register("refund", |cents: u64| cents / 2)?;
    /// app.allocate("refund", 1)?;
    /// assert_eq!(app.call::<_, u64>("refund", 700u64)?.wait()?, 350);
    /// assert_eq!(app.call::<_, u64>("refund", (700u64,))?.wait()?, 350);
    ///
    /// let err = app.call::<_, u64>("refund", "700".to_string()).unwrap_err();
    /// assert_eq!(err.task_kind(), Some(TaskErrorKind::SignatureMismatch));
    /// assert_eq!(
    ///     err.to_string(),
    ///     "signature mismatch: task `refund` takes u64 and returns u64; this call passes String and expects u64"
    /// );
    /// app.close()
    /// # }
    /// ```
    pub fn call<A, T>(&self, name: impl AsRef<str>, args: A) -> Result<Handle<T>, Error>
    where
        A: Serialize + Send + 'static,
        T: DeserializeOwned + Send + 'static,
    {
        self.call_with(name, &CallOptions::new(), args)
    }

    /// [`call`](App::call) with options.
    pub fn call_with<A, T>(&self, name: impl AsRef<str>, options: &CallOptions, args: A) -> Result<Handle<T>, Error>
    where
        A: Serialize + Send + 'static,
        T: DeserializeOwned + Send + 'static,
    {
        let name = registry::intern(name.as_ref());
        let fingerprint = registry::fingerprint::<A, T>();
        self.submit(name, fingerprint, Args::Typed(args), options, result::decode_value::<T>, true)
    }

    /// [`call`](App::call) for async code that must never block: the call is made on the
    /// app's sending thread (started by the first such call) and the future gives its
    /// handle. `call` blocks only while the broker pushes back — a full local queue, a
    /// Redis or RabbitMQ send buffer full while the server is away — and at most the
    /// call's [`enqueue_timeout`](CallOptions::enqueue_timeout); this blocks never, at the
    /// cost of a hand-over to another thread (a few microseconds). Nothing is sent until
    /// the future is first polled; dropped before the thread took it, nothing is sent.
    ///
    /// ```
    /// # fn main() -> Result<(), dingo_core::Error> {
    /// let app = dingo_core::App::local()?;
    /// app.register("double", |n: i64| n * 2)?;
    /// app.allocate("double", 1)?;
    /// let doubled = futures::executor::block_on(async {
    ///     let handle = app.call_async::<_, i64>("double", 21i64).await?;
    ///     handle.await
    /// })?;
    /// assert_eq!(doubled, 42);
    /// # app.close()
    /// # }
    /// ```
    pub fn call_async<A, T>(&self, name: impl AsRef<str>, args: A) -> CallFuture<T>
    where
        A: Serialize + Send + 'static,
        T: DeserializeOwned + Send + 'static,
    {
        self.call_async_with(name, &CallOptions::new(), args)
    }

    /// [`call_async`](App::call_async) with options.
    pub fn call_async_with<A, T>(&self, name: impl AsRef<str>, options: &CallOptions, args: A) -> CallFuture<T>
    where
        A: Serialize + Send + 'static,
        T: DeserializeOwned + Send + 'static,
    {
        let name = registry::intern(name.as_ref());
        let options = options.clone();
        CallFuture::new(self, move |app| app.call_with(name, &options, args))
    }

    /// The sending thread of `call_async`, started on first use.
    fn sending(&self) -> Result<Arc<sending::Sending>, Error> {
        self.check_open()?;
        let mut sending = lock(&self.inner.sending);
        if let Some(sending) = &*sending {
            return Ok(sending.clone());
        }
        let started = Arc::new(sending::Sending::start()?);
        *sending = Some(started.clone());
        Ok(started)
    }

    /// Sends a task by name and forgets it: no report is produced. Returns the call's id.
    ///
    /// The argument types are checked as in [`call`](App::call).
    pub fn send<A>(&self, name: impl AsRef<str>, args: A) -> Result<TaskId, Error>
    where
        A: Serialize + Send + 'static,
    {
        let options = CallOptions::new().ignore_report(true);
        let name = registry::intern(name.as_ref());
        let fingerprint = registry::args_fingerprint::<A>();
        let handle =
            self.submit::<A, ()>(name, fingerprint, Args::Typed(args), &options, result::decode_value::<()>, false)?;
        Ok(handle.id().clone())
    }

    /// Calls a task with arguments already encoded (the value itself for one argument, a
    /// tuple for several, by a codec the worker knows) and gets the result as bytes. No
    /// signature check: for tools and bridges.
    pub fn call_raw(
        &self,
        name: impl AsRef<str>,
        options: &CallOptions,
        args: Encoded,
    ) -> Result<Handle<RawOutput>, Error> {
        let name = registry::intern(name.as_ref());
        self.submit::<(), RawOutput>(name, 0, Args::Encoded(args), options, result::decode_raw, true)
    }

    /// Calls a macro-generated task; its stubs reach this through `__private::call`.
    pub(crate) fn call_task<K: Task>(&self, args: K::Args, options: &CallOptions) -> Result<Handle<K::Output>, Error> {
        let name = TaskName::from_static(K::NAME);
        self.submit(name, K::fingerprint(), Args::Typed(args), options, result::decode_value::<K::Output>, true)
    }

    /// Sends a macro-generated task without a report; returns its id (no handle: none to
    /// cancel through, so none is made).
    pub(crate) fn send_task<K: Task>(&self, args: K::Args) -> Result<TaskId, Error> {
        let name = TaskName::from_static(K::NAME);
        let options = CallOptions::new().ignore_report(true);
        let handle =
            self.submit(name, K::fingerprint(), Args::Typed(args), &options, result::decode_value::<()>, false)?;
        Ok(handle.id().clone())
    }

    fn submit<A, T>(
        &self,
        name: TaskName,
        fingerprint: u64,
        args: Args<A>,
        options: &CallOptions,
        decode: DecodeFn<T>,
        // Whether a detached handle (`ignore_report`) may cancel: not for `send`, which
        // keeps only the id (and saves the reference count).
        cancellable: bool,
    ) -> Result<Handle<T>, Error>
    where
        A: Serialize + Send + 'static,
        T: Send + 'static,
    {
        self.check_open()?;
        let inner = &*self.inner;
        let producer = inner.producer.as_ref().ok_or(Error::MissingRole(Role::Producer))?;
        let (plan, id, codec) = inner.registry.with_settings(name.as_str(), |settings, signature| {
            // The app runs this task itself: a call with other types is refused before it
            // is sent, with both signatures spelled out (the worker could only say that the
            // fingerprints differ).
            if let Some(signature) = signature
                && signature.accepts(fingerprint).is_none()
            {
                return Err(self.mismatch_here::<A, T>(&name, fingerprint, signature));
            }
            // Merged only when the task has defaults: most calls read their own options.
            let merged = (!settings.defaults.is_empty()).then(|| options.or(&settings.defaults));
            let options = merged.as_ref().unwrap_or(options);
            let id = match options.get_id() {
                Some(id) => id.clone(),
                None => settings.id_maker.next_id(),
            };
            Ok((Plan::of(options), id, settings.codec))
        })?;
        let key = CallKey { name, id };
        let retry = plan.retry;
        let args = match args {
            // A call that may run again keeps its arguments as bytes: the worker sends them
            // with the next attempt.
            Args::Typed(value) if inner.local_args && retry.retries() == 0 => Payload::Local(Box::new(value)),
            Args::Typed(value) => Payload::Encoded(inner.codecs.encode(codec, &value)?),
            Args::Encoded(encoded) => Payload::Encoded(encoded),
        };

        let (handle, reply_to) = if plan.options.ignore_report {
            (Handle::detached(key.clone(), cancellable.then(|| inner.route.clone())), ReplyTo::None)
        } else {
            let store = inner.store.as_ref().ok_or(Error::MissingRole(Role::Store))?;
            let slot = Arc::new(Slot::new(inner.caller_codecs.clone(), decode));
            let reply_to = store.watch(&key, ReplySink::new(slot.clone())).map_err(broker_error)?;
            let keeps_state = matches!(reply_to, ReplyTo::Address(_));
            (Handle::new(key.clone(), slot, inner.route.clone(), keeps_state), reply_to)
        };

        // Built in place (the builder's moves cost a copy of the message per call here).
        let message = TaskMessage {
            name: key.name.clone(),
            id: key.id.clone(),
            fingerprint,
            options: plan.options,
            reply_to,
            args,
            attempt: 1,
            due: plan.due,
            expires: plan.expires,
            retry,
            limits: plan.limits,
        };
        match producer.send(message, plan.enqueue_timeout) {
            Ok(()) => Ok(handle),
            Err(e) => Err(self.send_failed(&key, e)),
        }
    }

    #[cold]
    fn mismatch_here<A, T>(&self, name: &TaskName, fingerprint: u64, signature: &registry::Signature) -> Error {
        // A zero result half: the call waits for no result (`send`), so it expects none.
        let output = (fingerprint & 0xffff_ffff != 0).then(std::any::type_name::<T>);
        let message = signature.mismatch_here(name.as_str(), std::any::type_name::<A>(), output);
        let error = TaskError::new(TaskErrorKind::SignatureMismatch, message);
        self.inner.events.emit(Event::new(
            Origin::Producer,
            Level::Error,
            EventKind::SignatureMismatch,
            error.message().to_owned(),
        ));
        Error::Task(error)
    }

    fn send_failed(&self, key: &CallKey, error: BrokerError) -> Error {
        match error.kind() {
            BrokerErrorKind::Full => Error::QueueFull { task: key.name.to_string() },
            BrokerErrorKind::Closed => Error::Shutdown,
            BrokerErrorKind::Unroutable => {
                let error = TaskError::new(
                    TaskErrorKind::UnknownTask,
                    format!(
                        "no queue serves task `{}`: no app on this broker has registered it; {}",
                        key.name,
                        crate::error::not_linked_hint(key.name.as_str())
                    ),
                );
                self.inner.events.emit(
                    Event::new(Origin::Producer, Level::Warning, EventKind::UnknownTask, error.message().to_owned())
                        .with_task(key.clone()),
                );
                Error::Task(error)
            }
            _ => Error::Broker(error),
        }
    }

    /// Cancels the call `id` of task `name`, from any process that knows its key (see
    /// [`Admin::cancel`]): a call not started yet never starts (its caller gets a failure of
    /// kind [`Cancelled`](crate::TaskErrorKind::Cancelled)), a running one sees
    /// [`Context::is_cancelled`](crate::Context::is_cancelled). The cancel lasts
    /// [`AppBuilder::cancel_ttl`] (a day by default). An unknown or finished call is not an
    /// error: the cancel is recorded and changes nothing.
    ///
    /// ```
    /// # fn main() -> Result<(), dingo_core::Error> {
    /// use std::time::Duration;
    /// use dingo_core::{App, CallOptions, TaskId};
    ///
    /// let app = App::local()?;
    /// app.register("add", |(a, b): (i64, i64)| a + b)?;
    /// let id = TaskId::new("order-7");
    /// let options = CallOptions::new().id(id.clone()).countdown(Duration::from_secs(60));
    /// let _handle = app.call_with::<_, i64>("add", &options, (2i64, 3i64))?;
    /// app.cancel("add", &id)?; // it will not run
    /// # app.close()
    /// # }
    /// ```
    pub fn cancel(&self, name: impl AsRef<str>, id: &TaskId) -> Result<(), Error> {
        let key = CallKey { name: TaskName::from(name.as_ref()), id: id.clone() };
        self.inner.route.cancel(&key)
    }

    /// The dead letters of a task's queue, oldest first, at most `limit` (see
    /// [`Admin::dead_letters`]).
    ///
    /// ```
    /// # fn main() -> Result<(), dingo_core::Error> {
    /// let app = dingo_core::App::local()?;
    /// app.register("add", |(a, b): (i64, i64)| a + b)?;
    /// assert!(app.dead_letters("add", 100)?.is_empty());
    /// assert_eq!(app.dead_count("add")?, 0);
    /// # app.close()
    /// # }
    /// ```
    pub fn dead_letters(&self, task: impl AsRef<str>, limit: usize) -> Result<Vec<DeadLetter>, Error> {
        self.admin()?.dead_letters(&TaskName::from(task.as_ref()), limit).map_err(broker_error)
    }

    /// How many dead letters a task's queue holds.
    pub fn dead_count(&self, task: impl AsRef<str>) -> Result<usize, Error> {
        self.admin()?.dead_count(&TaskName::from(task.as_ref())).map_err(broker_error)
    }

    /// Sends the selected dead letters of a task back to its queue as fresh attempts, each
    /// once (see [`Admin::replay`]); returns how many.
    pub fn replay_dead(&self, task: impl AsRef<str>, select: &Select) -> Result<usize, Error> {
        self.admin()?.replay(&TaskName::from(task.as_ref()), select).map_err(broker_error)
    }

    /// Deletes the selected dead letters of a task; returns how many.
    pub fn purge_dead(&self, task: impl AsRef<str>, select: &Select) -> Result<usize, Error> {
        self.admin()?.purge_dead(&TaskName::from(task.as_ref()), select).map_err(broker_error)
    }

    /// Deletes the messages waiting in a task's queue (what `celery purge` does); returns
    /// how many. Running and delayed calls are not touched, and callers are not told.
    pub fn purge(&self, task: impl AsRef<str>) -> Result<usize, Error> {
        self.admin()?.purge(&TaskName::from(task.as_ref())).map_err(broker_error)
    }

    fn admin(&self) -> Result<&Arc<dyn Admin>, Error> {
        self.inner.admin.as_ref().ok_or(Error::MissingRole(Role::Admin))
    }

    /// How many worker threads of this app were written off so far: each ran a task past
    /// its hard time limit and was replaced (see [`TimeLimits`]). A number that keeps
    /// growing means tasks that never return, each holding a thread.
    pub fn threads_written_off(&self) -> u64 {
        lock(&self.inner.pools).iter().map(Pool::written_off).sum()
    }

    /// Subscribes to the app's events (see [`event`](crate::event)).
    pub fn events(&self, filter: EventFilter) -> Events {
        self.inner.events.subscribe(filter)
    }

    /// The codecs this app knows.
    pub fn codecs(&self) -> &Codecs {
        &self.inner.codecs
    }

    /// Whether [`close`](App::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// Shuts down gracefully: stops accepting calls, lets running tasks finish (up to the
    /// shutdown grace period, see [`AppBuilder::shutdown_grace`]), then releases the broker
    /// roles. Pending handles of tasks that will not run get a `Shutdown` failure. Calling it
    /// again does nothing.
    pub fn close(&self) -> Result<(), Error> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let pools = std::mem::take(&mut *lock(&self.inner.pools));
        for pool in &pools {
            pool.stop();
        }
        let deadline = result::deadline(self.inner.shutdown_grace);
        if let Some(sending) = lock(&self.inner.sending).take() {
            sending.stop(deadline);
        }
        let mut running = 0;
        for pool in pools {
            let label = pool.label().to_owned();
            let left = pool.join(deadline);
            if left > 0 {
                self.inner.events.emit(Event::new(
                    Origin::App,
                    Level::Error,
                    EventKind::Stopped,
                    format!("workers of {label} still busy after the shutdown grace period"),
                ));
            }
            running += left;
        }
        self.inner.release_roles();
        self.inner.events.emit(Event::new(Origin::App, Level::Info, EventKind::Stopped, "app closed"));
        self.inner.events.close();
        if running > 0 { Err(Error::ShutdownTimeout { running }) } else { Ok(()) }
    }

    fn check_open(&self) -> Result<(), Error> {
        if self.inner.closed.load(Ordering::Acquire) { Err(Error::Shutdown) } else { Ok(()) }
    }
}

impl Inner {
    fn release_roles(&self) {
        if let Some(r) = &self.consumer {
            r.close();
        }
        if let Some(r) = &self.reporter {
            r.close();
        }
        if let Some(r) = &self.producer {
            r.close();
        }
        if let Some(r) = &self.store {
            r.close();
        }
    }
}

impl Drop for Inner {
    /// An app dropped without `close`: stop the workers after their current task and release
    /// the roles, without waiting.
    fn drop(&mut self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            for pool in std::mem::take(&mut *lock(&self.pools)) {
                pool.stop();
            }
            self.release_roles();
            self.events.close();
        }
    }
}

impl fmt::Debug for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("App")
            .field("pools", &lock(&self.inner.pools).iter().map(Pool::label).collect::<Vec<_>>())
            .field("codecs", &self.inner.codecs)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

enum Args<A> {
    Typed(A),
    Encoded(Encoded),
}

fn broker_error(e: BrokerError) -> Error {
    match e.kind() {
        BrokerErrorKind::Closed => Error::Shutdown,
        _ => Error::Broker(e),
    }
}

/// Names registered at run time live as long as the program: leaking them once keeps every
/// later message for them free of reference counting.
fn static_name(name: String) -> TaskName {
    match registry::linked_tasks().find(|d| d.name == name) {
        Some(decl) => TaskName::from_static(decl.name),
        None => TaskName::from_static(Box::leak(name.into_boxed_str())),
    }
}

/// The last path segment of a task name, for thread names.
fn short_label(name: &str) -> String {
    let short = name.rsplit("::").next().unwrap_or(name);
    short.chars().take(24).collect()
}

/// What a call's options (its own over its task's defaults) make of its message: the part
/// of them a submission reads, small enough to move without a copy routine.
struct Plan {
    options: TaskOptions,
    enqueue_timeout: Option<Duration>,
    retry: RetryPolicy,
    due: Option<SystemTime>,
    expires: Option<SystemTime>,
    limits: TimeLimits,
}

impl Plan {
    #[inline]
    fn of(options: &CallOptions) -> Plan {
        let (mut due, mut expires) = (None, None);
        // The clock is read only when a time is set.
        if options.get_delay().is_some() || options.get_expiry().is_some() {
            let now = SystemTime::now();
            due = options.get_delay().map(|when| when.from(now)).filter(|due| *due > now);
            expires = options.get_expiry().map(|when| when.from(now));
        }
        Plan {
            options: options.task_options(),
            enqueue_timeout: options.get_enqueue_timeout(),
            retry: options.retry_policy(),
            due,
            expires,
            limits: options.get_time_limits(),
        }
    }
}
