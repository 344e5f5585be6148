//! [`AppBuilder`]: which broker plays which role, codecs, ids, shutdown.

use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{App, Inner};
use crate::broker::local::{LocalBroker, LocalOptions};
use crate::broker::support::redact_url;
use crate::broker::{Admin, Consumer, DEFAULT_CANCEL_TTL, Producer, Reporter, Store};
use crate::codec::{Codec, CodecId, Codecs};
use crate::error::Error;
use crate::event::{Event, EventKind, EventSink, Level, Origin};
use crate::id::{IdMaker, TaskName, UuidV7};
use crate::options::CallOptions;
use crate::registry::{self, Registry, Settings};
use crate::result::Route;

/// A broker reachable by URL, registered by a broker crate (`redis`, `amqp`, …) through
/// `inventory`, so [`App::connect`] knows every broker compiled into the program.
#[derive(Debug)]
pub struct BrokerScheme {
    /// The URL scheme, e.g. `"redis"`.
    pub scheme: &'static str,
    /// Configures the builder for the URL (connecting to the server).
    pub configure: fn(url: &str, builder: AppBuilder) -> Result<AppBuilder, Error>,
}

inventory::collect!(BrokerScheme);

/// Configures an [`App`]: the broker roles, codecs, id maker and shutdown behaviour.
///
/// With no broker set, the app uses a new in-process [`LocalBroker`].
///
/// ```
/// # fn main() -> Result<(), dingo_core::Error> {
/// use std::time::Duration;
/// use dingo_core::{App, LocalBroker, Sequential};
///
/// let broker = LocalBroker::serialized(); // every message through MessagePack
/// let app = App::builder()
///     .broker(broker)
///     .id_maker(Sequential::new())
///     .shutdown_grace(Duration::from_secs(5))
///     .build()?;
/// # app.close()
/// # }
/// ```
#[must_use = "an app builder does nothing until `build` is called"]
pub struct AppBuilder {
    producer: Option<Arc<dyn Producer>>,
    consumer: Option<Arc<dyn Consumer>>,
    reporter: Option<Arc<dyn Reporter>>,
    store: Option<Arc<dyn Store>>,
    admin: Option<Arc<dyn Admin>>,
    cancel_ttl: Duration,
    codecs: Codecs,
    id_maker: Arc<dyn IdMaker>,
    shutdown_grace: Duration,
    worker_spin: Duration,
    #[cfg(feature = "tokio")]
    runtime: Option<tokio::runtime::Handle>,
}

impl AppBuilder {
    pub(crate) fn new() -> AppBuilder {
        AppBuilder {
            producer: None,
            consumer: None,
            reporter: None,
            store: None,
            admin: None,
            cancel_ttl: DEFAULT_CANCEL_TTL,
            codecs: Codecs::new(),
            id_maker: Arc::new(UuidV7),
            shutdown_grace: Duration::from_secs(30),
            worker_spin: Duration::from_micros(50),
            #[cfg(feature = "tokio")]
            runtime: None,
        }
    }

    /// One broker for every role (the four and [`Admin`]).
    pub fn broker<B>(self, broker: B) -> AppBuilder
    where
        B: Producer + Consumer + Reporter + Store + Admin,
    {
        let broker = Arc::new(broker);
        self.producer(broker.clone())
            .consumer(broker.clone())
            .reporter(broker.clone())
            .store(broker.clone())
            .admin(broker)
    }

    /// One broker for the task transport (producer, consumer, and the [`Admin`] role:
    /// cancels and dead letters belong to the tasks' queues).
    pub fn tasks<B>(self, broker: B) -> AppBuilder
    where
        B: Producer + Consumer + Admin,
    {
        let broker = Arc::new(broker);
        self.producer(broker.clone()).consumer(broker.clone()).admin(broker)
    }

    /// One broker for the report transport (reporter and store).
    pub fn reports<B>(self, broker: B) -> AppBuilder
    where
        B: Reporter + Store,
    {
        let broker = Arc::new(broker);
        self.reporter(broker.clone()).store(broker)
    }

    /// The producer (needed to call).
    pub fn producer(mut self, producer: Arc<dyn Producer>) -> AppBuilder {
        self.producer = Some(producer);
        self
    }

    /// The operator's role: cancels, dead letters, purges (set by [`broker`](AppBuilder::broker)
    /// and [`tasks`](AppBuilder::tasks); use the task broker's).
    pub fn admin(mut self, admin: Arc<dyn Admin>) -> AppBuilder {
        self.admin = Some(admin);
        self
    }

    /// How long a cancel lasts ([`App::cancel`], [`Handle::cancel`](crate::Handle::cancel)):
    /// a call whose message a worker takes later than that after the cancel runs. Default:
    /// [`DEFAULT_CANCEL_TTL`] (a day); keep it above the longest delay of a call you may
    /// cancel.
    ///
    /// ```
    /// # fn main() -> Result<(), dingo_core::Error> {
    /// use std::time::Duration;
    /// let app = dingo_core::App::builder().cancel_ttl(Duration::from_secs(3600)).build()?;
    /// # app.close()
    /// # }
    /// ```
    pub fn cancel_ttl(mut self, ttl: Duration) -> AppBuilder {
        self.cancel_ttl = ttl;
        self
    }

    /// The consumer (needed to run workers).
    pub fn consumer(mut self, consumer: Arc<dyn Consumer>) -> AppBuilder {
        self.consumer = Some(consumer);
        self
    }

    /// The reporter (needed to run workers).
    pub fn reporter(mut self, reporter: Arc<dyn Reporter>) -> AppBuilder {
        self.reporter = Some(reporter);
        self
    }

    /// The store (needed to get results).
    pub fn store(mut self, store: Arc<dyn Store>) -> AppBuilder {
        self.store = Some(store);
        self
    }

    /// The broker a URL names (see [`App::connect`]).
    pub fn url(self, url: &str) -> Result<AppBuilder, Error> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(invalid_url(url, "expected scheme://…"));
        };
        if scheme == "local" {
            let serialized = match rest.strip_prefix('?').unwrap_or(rest) {
                "" => false,
                "serialized" | "serialized=true" => true,
                other => return Err(invalid_url(url, format!("unknown local broker option `{other}`"))),
            };
            return Ok(self.broker(LocalBroker::with_options(LocalOptions::new().serialized(serialized))));
        }
        match inventory::iter::<BrokerScheme>.into_iter().find(|s| s.scheme == scheme) {
            Some(found) => (found.configure)(url, self),
            None => Err(invalid_url(url, unknown_scheme(scheme))),
        }
    }

    /// Registers a codec and makes it the one new calls encode with.
    pub fn codec(mut self, codec: impl Codec) -> Result<AppBuilder, Error> {
        let id = codec.id();
        self.codecs = self.codecs.with(Arc::new(codec))?.with_default(id)?;
        Ok(self)
    }

    /// Registers a codec that workers can decode, without making it the default.
    pub fn add_codec(mut self, codec: impl Codec) -> Result<AppBuilder, Error> {
        self.codecs = self.codecs.with(Arc::new(codec))?;
        Ok(self)
    }

    /// Makes a known codec (e.g. [`codec::JSON`](crate::codec::JSON)) the default.
    pub fn default_codec(mut self, id: CodecId) -> Result<AppBuilder, Error> {
        self.codecs = self.codecs.with_default(id)?;
        Ok(self)
    }

    /// The id maker of every task that has none of its own (default [`UuidV7`]).
    pub fn id_maker(mut self, maker: impl IdMaker) -> AppBuilder {
        self.id_maker = Arc::new(maker);
        self
    }

    /// How long [`App::close`] waits for running tasks (default 30 s).
    pub fn shutdown_grace(mut self, grace: Duration) -> AppBuilder {
        self.shutdown_grace = grace;
        self
    }

    /// How long an idle worker keeps polling before it sleeps (default 50 µs). Polling picks
    /// up a task in well under a microsecond instead of the tens a wake-up costs, at the
    /// price of that much CPU after each burst of work; `Duration::ZERO` never polls.
    pub fn worker_spin(mut self, spin: Duration) -> AppBuilder {
        self.worker_spin = spin;
        self
    }

    /// Runs the app's `async fn` tasks on a tokio runtime (feature `tokio`): a task that
    /// needs a tokio context (reqwest, sqlx, `tokio::time`) gets one. The pool's threads
    /// still take the deliveries, settle the calls and enforce time limits and cancels
    /// (dropping a task's future aborts it on the runtime); the runtime only polls. Without
    /// one, the pool's threads poll the futures themselves.
    ///
    /// ```
    /// # fn main() -> Result<(), dingo_core::Error> {
    /// let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_time().build().unwrap();
    /// let app = dingo_core::App::builder().tokio_runtime(runtime.handle().clone()).build()?;
    /// app.register_async("nap", |ms: u64| async move {
    ///     tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    ///     ms
    /// })?;
    /// app.allocate("nap", 1)?;
    /// assert_eq!(app.call::<_, u64>("nap", 5u64)?.wait()?, 5);
    /// # app.close()
    /// # }
    /// ```
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub fn tokio_runtime(mut self, runtime: tokio::runtime::Handle) -> AppBuilder {
        self.runtime = Some(runtime);
        self
    }

    /// Builds the app: attaches the roles, registers every linked `#[dingo::task]` and
    /// declares their queues.
    pub fn build(self) -> Result<App, Error> {
        let mut this = self;
        if this.producer.is_none() && this.consumer.is_none() && this.reporter.is_none() && this.store.is_none() {
            this = this.broker(LocalBroker::new());
        }
        let events = EventSink::new();
        if let Some(r) = &this.producer {
            r.attach(&events);
        }
        if let Some(r) = &this.consumer {
            r.attach(&events);
        }
        if let Some(r) = &this.reporter {
            r.attach(&events);
        }
        if let Some(r) = &this.store {
            r.attach(&events);
        }
        let defaults = Settings {
            defaults: CallOptions::new(),
            declared: CallOptions::new(),
            id_maker: this.id_maker.clone(),
            codec: this.codecs.default_codec().id(),
        };
        let app = App {
            inner: Arc::new(Inner {
                local_args: this.producer.as_ref().is_some_and(|p| p.accepts_local()),
                producer: this.producer,
                consumer: this.consumer,
                reporter: this.reporter,
                route: Arc::new(Route {
                    store: this.store.clone(),
                    admin: this.admin.clone(),
                    cancel_ttl: this.cancel_ttl,
                }),
                store: this.store,
                admin: this.admin,
                registry: Registry::new(defaults),
                caller_codecs: Arc::new(this.codecs.clone()),
                codecs: this.codecs,
                events,
                pools: Mutex::new(Vec::new()),
                closed: AtomicBool::new(false),
                shutdown_grace: this.shutdown_grace,
                worker_spin: this.worker_spin,
                #[cfg(feature = "tokio")]
                runtime: this.runtime,
                sending: Mutex::new(None),
            }),
        };
        for decl in registry::linked_tasks() {
            app.add_handler((decl.handler)())?;
            let declared = (decl.defaults)();
            if declared != CallOptions::new() {
                let name = TaskName::from_static(decl.name);
                app.inner.registry.update(&name, |s| {
                    s.defaults = declared.or(&s.defaults);
                    s.declared = declared;
                });
            }
        }
        app.inner.events.emit(Event::new(Origin::App, Level::Debug, EventKind::Started, "app started"));
        Ok(app)
    }
}

impl fmt::Debug for AppBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppBuilder")
            .field("producer", &self.producer.is_some())
            .field("consumer", &self.consumer.is_some())
            .field("reporter", &self.reporter.is_some())
            .field("store", &self.store.is_some())
            .field("codecs", &self.codecs)
            .field("shutdown_grace", &self.shutdown_grace)
            .finish_non_exhaustive()
    }
}

fn invalid_url(url: &str, reason: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::InvalidUrl { url: redact_url(url), reason: reason.into() }
}

/// Why a scheme names no broker, and what to do: the schemes this build knows, and the
/// feature of dingo that brings the broker of a scheme it knows of.
fn unknown_scheme(scheme: &str) -> String {
    let mut known: Vec<&str> = inventory::iter::<BrokerScheme>.into_iter().map(|s| s.scheme).collect();
    known.sort_unstable();
    known.insert(0, "local");
    let known = known.join(", ");
    let feature = match scheme {
        "redis" | "redis+unix" => "redis",
        "rediss" => "redis-tls",
        "amqp" => "amqp",
        "amqps" => "amqp-tls",
        _ => return format!("no broker for `{scheme}://` in this build (it knows {known})"),
    };
    format!("no broker for `{scheme}://` in this build (it knows {known}): enable the `{feature}` feature of dingo")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// dingo-core alone links no broker crate: only `local` is known.
    #[test]
    fn an_unknown_scheme_says_what_this_build_knows_and_which_feature_to_enable() {
        let error = AppBuilder::new().url("rediss://:secret@host:6380").expect_err("no redis broker here");
        assert_eq!(
            error.to_string(),
            "unsupported broker URL `rediss://:***@host:6380`: no broker for `rediss://` in this build (it knows \
             local): enable the `redis-tls` feature of dingo"
        );
        let error = AppBuilder::new().url("nope://host").expect_err("no such broker");
        assert_eq!(
            error.to_string(),
            "unsupported broker URL `nope://host`: no broker for `nope://` in this build (it knows local)"
        );
    }
}
