//! The task registry: which tasks exist, how to run them, and each task's call settings.
//!
//! `#[dingo::task]` functions register themselves at link time through `inventory`
//! ([`TaskDecl`]); every [`App`](crate::App) knows all of them without a central list.
//! Closures and stateful handlers are added with [`App::register`](crate::App::register).

use std::any::{Any, TypeId};
use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::broker::kit::lock;
use crate::codec::{CodecId, Codecs, Encoded};
use crate::context::Context;
use crate::error::{Error, TaskError, TaskErrorKind};
use crate::hash::FastMap;
use crate::id::{IdMaker, TaskName};
use crate::message::{Payload, Value};
use crate::options::CallOptions;

/// A task defined by `#[dingo::task]`: its name, its wire types and how to run it.
///
/// Implemented by the struct the macro generates next to the function; not meant to be
/// implemented by hand.
pub trait Task: 'static {
    /// The task's name (default: the function's module path and name).
    const NAME: &'static str;
    /// The arguments sent by the caller (the context is not among them): the value itself for
    /// one argument, a tuple for none or several.
    type Args: Serialize + DeserializeOwned + Send + 'static;
    /// The value of a successful call (`T` of a `Result<T, E>` return).
    type Output: Serialize + DeserializeOwned + Send + 'static;
    /// Runs the function (an `async fn` task: to completion, on the calling thread).
    fn run(ctx: &Context<'_>, args: Self::Args) -> Result<Self::Output, TaskError>;
    /// How workers run it: [`Handler::of`] (the default) runs [`run`](Task::run) on a worker
    /// thread; an `async fn` task's is [`Handler::new_async`].
    fn handler() -> Handler
    where
        Self: Sized,
    {
        Handler::of::<Self>()
    }
    /// The signature fingerprint (see [`fingerprint`]).
    fn fingerprint() -> u64;
    /// The `TypeId` of the function item, so `app.allocate(add, 4)` finds the task.
    fn fn_type_id() -> TypeId;
    /// The call options the attribute sets (`#[dingo::task(retries = 5)]`); a call's own
    /// options and [`App::set_default_options`](crate::App::set_default_options) win.
    fn defaults() -> CallOptions {
        CallOptions::new()
    }
}

/// A task known at link time; submitted to `inventory` by `#[dingo::task]`.
#[derive(Debug, Clone, Copy)]
pub struct TaskDecl {
    /// The task's name.
    pub name: &'static str,
    /// Builds the runnable handler.
    pub handler: fn() -> Handler,
    /// The `TypeId` of the function item.
    pub fn_type_id: fn() -> TypeId,
    /// The call option defaults of its attribute.
    pub defaults: fn() -> CallOptions,
}

impl TaskDecl {
    /// The declaration of a macro-generated task.
    pub const fn of<T: Task>() -> TaskDecl {
        TaskDecl { name: T::NAME, handler: T::handler, fn_type_id: T::fn_type_id, defaults: T::defaults }
    }
}

inventory::collect!(TaskDecl);

/// All tasks linked into this program.
pub fn linked_tasks() -> impl Iterator<Item = &'static TaskDecl> {
    inventory::iter::<TaskDecl>.into_iter()
}

/// The signature fingerprint of a task taking `A` and returning `T`: two 32-bit hashes
/// (FNV-1a), of the argument type in the high half and of the result type in the low half,
/// of the type names with module paths removed (`alloc::string::String` counts as `String`).
/// It is the same in every binary built from one codebase, wherever the types live, and
/// catches a different number, order or kind of arguments and a different result type; a
/// struct whose fields changed keeps its name and is caught by the decoder instead. A zero
/// half is not checked (fire-and-forget calls do not know the result type).
///
/// A task of one argument `X` also accepts calls whose arguments are the one-element tuple
/// `(X,)` — how a call by name writes an argument list of one — and the worker, told by the
/// fingerprint which of the two it got, decodes that layout (see [`Handler`]).
pub fn fingerprint<A: ?Sized + 'static, T: ?Sized + 'static>() -> u64 {
    (u64::from(type_hash::<A>()) << 32) | u64::from(type_hash::<T>())
}

/// The fingerprint of a call that only knows its argument type.
pub fn args_fingerprint<A: ?Sized + 'static>() -> u64 {
    u64::from(type_hash::<A>()) << 32
}

/// Whether a message's fingerprint `sent` agrees with a worker's `expected` (zero halves
/// match anything).
pub fn fingerprints_match(sent: u64, expected: u64) -> bool {
    let half = |fp: u64, shift: u32| (fp >> shift) & 0xffff_ffff;
    [32, 0].iter().all(|&shift| half(sent, shift) == 0 || half(sent, shift) == half(expected, shift))
}

fn type_hash<X: ?Sized + 'static>() -> u32 {
    let mut hash = Fnv::new();
    hash.write_type_name(std::any::type_name::<X>());
    // Fold to 32 bits; zero is kept for "unchecked".
    let folded = (hash.0 >> 32) as u32 ^ hash.0 as u32;
    folded.max(1)
}

struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// Hashes a type name without module paths and whitespace.
    fn write_type_name(&mut self, name: &str) {
        let mut segment = Vec::new();
        let bytes = name.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if b == b':' && bytes.get(i + 1) == Some(&b':') {
                segment.clear(); // a path prefix: drop it
                i += 2;
                continue;
            }
            if b.is_ascii_alphanumeric() || b == b'_' {
                segment.push(b);
            } else {
                self.write(&segment);
                segment.clear();
                if !b.is_ascii_whitespace() {
                    self.write(&[b]);
                }
            }
            i += 1;
        }
        self.write(&segment);
    }
}

/// Receives the outcome of a run (called exactly once).
pub(crate) type Done<'d> = &'d mut dyn FnMut(Result<Value<'_>, TaskError>);

type RunFn = dyn Fn(&Context<'_>, Payload, &Invoke<'_>, Done<'_>) + Send + Sync;

/// Starts an async task: decodes the arguments (a panic there is caught) and makes its future.
type StartFn = dyn Fn(Arc<Context<'static>>, Payload, &Invoke<'_>) -> Result<TaskFuture, TaskError> + Send + Sync;

/// A started async task: its value, typed but erased, to be handed over once it is ready.
pub(crate) type TaskFuture = Pin<Box<dyn Future<Output = Result<Box<dyn Produced>, TaskError>> + Send>>;

/// The value an async task produced, handed over like a blocking task's (encoded, or lent).
pub(crate) trait Produced: Send {
    fn hand_over(self: Box<Self>, invoke: &Invoke<'_>, done: Done<'_>);
}

struct Typed<R>(R);

impl<R: Serialize + Send + 'static> Produced for Typed<R> {
    fn hand_over(self: Box<Self>, invoke: &Invoke<'_>, done: Done<'_>) {
        let value = self.0;
        let outcome = catch_unwind(AssertUnwindSafe(|| output(invoke, value)));
        deliver(outcome, done)
    }
}

/// A blocking task's run, or an async task's start.
#[derive(Clone)]
enum Body {
    Blocking(Arc<RunFn>),
    Async(Arc<StartFn>),
}

/// How the worker wants a result encoded.
pub(crate) struct Invoke<'a> {
    pub(crate) codecs: &'a Codecs,
    /// Encode the result with this codec (unless it may stay in process).
    pub(crate) codec: CodecId,
    /// The result may stay an in-process value.
    pub(crate) local: bool,
    /// How the message lays out the arguments.
    pub(crate) layout: Layout,
}

/// How a message lays out the arguments, as its fingerprint tells the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// As the handler declares them (or unknown: a message without a fingerprint).
    Declared,
    /// As a one-element tuple of what the handler declares: a call by name of a task of one
    /// argument, written `(x,)`.
    Tupled,
}

/// What a handler takes and returns: the fingerprints it accepts and, for messages, the
/// type names (known for free: `type_name` is a constant).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Signature {
    fingerprint: u64,
    /// The fingerprint of `(A,)`: the same arguments as a one-element tuple.
    tupled: u64,
    args: &'static str,
    output: &'static str,
}

impl Signature {
    fn of<A: 'static, R: 'static>(fingerprint: u64) -> Signature {
        Signature {
            fingerprint,
            tupled: self::fingerprint::<(A,), R>(),
            args: std::any::type_name::<A>(),
            output: std::any::type_name::<R>(),
        }
    }

    /// How a message of fingerprint `sent` lays out its arguments, or `None` if it does not
    /// match this signature. The first comparison is the one every well-typed call passes.
    pub(crate) fn accepts(&self, sent: u64) -> Option<Layout> {
        if fingerprints_match(sent, self.fingerprint) {
            Some(Layout::Declared)
        } else if fingerprints_match(sent, self.tupled) {
            Some(Layout::Tupled)
        } else {
            None
        }
    }

    /// Why a call in this process, with arguments `args` expecting `output` (`None`: no
    /// result wanted), does not match: both signatures spelled out.
    pub(crate) fn mismatch_here(&self, task: &str, args: &str, output: Option<&str>) -> String {
        let mut message = format!(
            "task `{task}` takes {} and returns {}; this call passes {}",
            short_type_name(self.args),
            short_type_name(self.output),
            short_type_name(args)
        );
        if let Some(output) = output {
            message.push_str(" and expects ");
            message.push_str(&short_type_name(output));
        }
        message
    }

    /// Why a message of fingerprint `sent` does not match, as the worker can tell: its own
    /// types, which half differs, and the likely causes.
    pub(crate) fn mismatch_there(&self, task: &str, sent: u64) -> String {
        let half = |fp: u64, shift: u32| (fp >> shift) & 0xffff_ffff;
        let (sent_args, sent_output) = (half(sent, 32), half(sent, 0));
        let args_differ = sent_args != half(self.fingerprint, 32) && sent_args != half(self.tupled, 32);
        let output_differs = sent_output != 0 && sent_output != half(self.fingerprint, 0);
        let what = match (args_differ, output_differs) {
            (true, true) => "other argument types and expects another result type",
            (false, true) => "the same arguments but expects another result type",
            _ => "other argument types",
        };
        format!(
            "task `{task}` takes {} and returns {} on this worker, but the call passes {what} \
             (signature {sent:016x}, this worker's {:016x}); likely causes: the caller calls it \
             by name with other types, or was built from other code (another version of the task)",
            short_type_name(self.args),
            short_type_name(self.output),
            self.fingerprint,
        )
    }
}

/// A type name without module paths: `alloc::vec::Vec<my::Order>` is `Vec<Order>`.
pub(crate) fn short_type_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut segment_start = 0;
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ':' && chars.peek() == Some(&':') {
            chars.next();
            out.truncate(segment_start); // a path prefix: drop it
            continue;
        }
        out.push(c);
        if !(c.is_alphanumeric() || c == '_') {
            segment_start = out.len();
        }
    }
    out
}

/// A runnable task, type-erased: decodes the arguments, runs (catching panics), and hands
/// the result on — encoded, or lent by reference so an in-process caller takes it without
/// an allocation.
///
/// A handler of `A` takes arguments sent as `A` and, for calls by name of a one-argument
/// task written `(x,)`, as `(A,)` (see [`fingerprint`]): the message's fingerprint says which,
/// and a message without one (a raw call) is read as `A`, else as `(A,)`.
#[derive(Clone)]
pub struct Handler {
    name: TaskName,
    signature: Signature,
    body: Body,
}

impl Handler {
    /// The handler of a macro-generated task.
    pub fn of<T: Task>() -> Handler {
        Handler::new(TaskName::from_static(T::NAME), T::fingerprint(), T::run)
    }

    /// A handler from a function of the context and the arguments.
    pub fn new<A, R, F>(name: TaskName, fingerprint: u64, f: F) -> Handler
    where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(&Context<'_>, A) -> Result<R, TaskError> + Send + Sync + 'static,
    {
        let run = move |ctx: &Context<'_>, args: Payload, invoke: &Invoke<'_>, done: Done<'_>| {
            // Decoding and encoding run user code too (serde impls): all of it is inside the
            // unwind boundary, so a panic anywhere in it is the task's failure.
            let outcome = catch_unwind(AssertUnwindSafe(|| -> Result<Output<R>, TaskError> {
                let value = f(ctx, arguments::<A>(args, invoke)?)?;
                output(invoke, value)
            }));
            deliver(outcome, done)
        };
        Handler { name, signature: Signature::of::<A, R>(fingerprint), body: Body::Blocking(Arc::new(run)) }
    }

    /// A handler of an async task: `f` makes the task's future from its context (owned: the
    /// future keeps it) and the arguments. Workers drive the futures of one pool
    /// concurrently, up to its limit (see [`App::allocate`](crate::App::allocate)); a panic
    /// while polling is the task's failure, and a cancel or a hard time limit drops the
    /// future at its next `.await`.
    pub fn new_async<A, R, F, Fut>(name: TaskName, fingerprint: u64, f: F) -> Handler
    where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(Arc<Context<'static>>, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, TaskError>> + Send + 'static,
    {
        let start =
            move |ctx: Arc<Context<'static>>, args: Payload, invoke: &Invoke<'_>| -> Result<TaskFuture, TaskError> {
                let made = catch_unwind(AssertUnwindSafe(|| arguments::<A>(args, invoke).map(|args| f(ctx, args))));
                let future = match made {
                    Err(panic) => return Err(TaskError::new(TaskErrorKind::Panic, panic_message(&*panic))),
                    Ok(made) => made?,
                };
                Ok(Box::pin(async move { future.await.map(|value| Box::new(Typed(value)) as Box<dyn Produced>) }))
            };
        Handler { name, signature: Signature::of::<A, R>(fingerprint), body: Body::Async(Arc::new(start)) }
    }

    /// The task's name.
    pub fn name(&self) -> &TaskName {
        &self.name
    }

    /// The signature fingerprint the handler checks.
    pub fn fingerprint(&self) -> u64 {
        self.signature.fingerprint
    }

    /// Whether the task is an `async fn` (its handler made by [`new_async`](Handler::new_async)).
    pub fn is_async(&self) -> bool {
        matches!(self.body, Body::Async(_))
    }

    pub(crate) fn signature(&self) -> &Signature {
        &self.signature
    }

    /// Runs a blocking task; starts an async one and runs it to completion on this thread
    /// (only for callers that cannot drive it otherwise).
    #[inline]
    pub(crate) fn run(&self, ctx: &Context<'_>, args: Payload, invoke: &Invoke<'_>, done: Done<'_>) {
        match &self.body {
            Body::Blocking(run) => run(ctx, args, invoke, done),
            Body::Async(_) => done(Err(TaskError::new(
                TaskErrorKind::Other,
                "an async task needs its context owned: it runs through the pool's executor",
            ))),
        }
    }

    /// Starts an async task (`None`: the task is a blocking one).
    pub(crate) fn start(
        &self,
        ctx: Arc<Context<'static>>,
        args: Payload,
        invoke: &Invoke<'_>,
    ) -> Option<Result<TaskFuture, TaskError>> {
        match &self.body {
            Body::Blocking(_) => None,
            Body::Async(start) => Some(start(ctx, args, invoke)),
        }
    }
}

/// The arguments of a call, taken from the process or decoded.
#[inline]
fn arguments<A: DeserializeOwned + 'static>(args: Payload, invoke: &Invoke<'_>) -> Result<A, TaskError> {
    match args {
        Payload::Local(value) => take_local::<A>(value),
        Payload::Encoded(encoded) => decode_args::<A>(invoke, &encoded),
    }
}

/// A task's value as the worker wants it: kept in process, or encoded.
#[inline]
fn output<R: Serialize + 'static>(invoke: &Invoke<'_>, value: R) -> Result<Output<R>, TaskError> {
    if invoke.local {
        return Ok(Output::Local(value));
    }
    invoke.codecs.encode(invoke.codec, &value).map(Output::Encoded).map_err(|e| {
        let message = format!("the result could not be encoded: {}", crate::error::chain(&e));
        TaskError::new(TaskErrorKind::Encode, message)
    })
}

/// Hands a run's outcome (its panic, if it panicked) to `done`.
#[inline]
fn deliver<R: Send + 'static>(outcome: std::thread::Result<Result<Output<R>, TaskError>>, done: Done<'_>) {
    match outcome {
        Err(panic) => done(Err(TaskError::new(TaskErrorKind::Panic, panic_message(&*panic)))),
        Ok(Err(error)) => done(Err(error)),
        Ok(Ok(Output::Local(value))) => {
            let mut value = Some(value);
            done(Ok(Value::Local(&mut value)))
        }
        Ok(Ok(Output::Encoded(encoded))) => done(Ok(Value::Encoded(encoded))),
    }
}

/// An in-process argument value: an `A`, or the one-element tuple `(A,)` of a call by name.
/// Type ids are exact, so trying both cannot mistake one for the other.
fn take_local<A: 'static>(value: Box<dyn Any + Send>) -> Result<A, TaskError> {
    match value.downcast::<A>() {
        Ok(args) => Ok(*args),
        Err(value) => match value.downcast::<(A,)>() {
            Ok(tupled) => Ok(tupled.0),
            Err(_) => Err(TaskError::new(
                TaskErrorKind::SignatureMismatch,
                format!("the arguments are not a `{}`", short_type_name(std::any::type_name::<A>())),
            )),
        },
    }
}

/// Encoded arguments in the layout the fingerprint announced. Without one, `(A,)` is tried
/// only after `A` failed: a well-formed `A` is never read as something else.
fn decode_args<A: DeserializeOwned>(invoke: &Invoke<'_>, encoded: &Encoded) -> Result<A, TaskError> {
    let bad = |e: &crate::codec::CodecError| {
        let message = format!(
            "the arguments do not decode as `{}`: {}",
            short_type_name(std::any::type_name::<A>()),
            crate::error::chain(e)
        );
        TaskError::new(TaskErrorKind::BadPayload, message)
    };
    match invoke.layout {
        Layout::Tupled => invoke.codecs.decode::<(A,)>(encoded).map(|tupled| tupled.0).map_err(|e| bad(&e)),
        Layout::Declared => match invoke.codecs.decode::<A>(encoded) {
            Ok(args) => Ok(args),
            Err(e) => invoke.codecs.decode::<(A,)>(encoded).map(|tupled| tupled.0).map_err(|_| bad(&e)),
        },
    }
}

impl fmt::Debug for Handler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handler").field("name", &self.name).field("fingerprint", &self.signature.fingerprint).finish()
    }
}

enum Output<R> {
    Local(R),
    Encoded(Encoded),
}

pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

/// Turns a task's `Err(e)` into a failure carrying `e`, encoded with the call's codec
/// (callers decode it with [`TaskError::payload`]).
pub fn failed<E: Serialize + ?Sized>(ctx: &Context<'_>, error: &E, message: String) -> TaskError {
    match crate::codec::encode(&*ctx.codec, error) {
        Ok(bytes) => TaskError::with_payload(TaskErrorKind::Failed, message, Encoded::new(ctx.codec.id(), bytes)),
        Err(e) => TaskError::new(
            TaskErrorKind::Failed,
            format!("{message} (the error value could not be encoded: {})", crate::error::chain(&e)),
        ),
    }
}

/// What an app needs to call a task: its default options, id maker and codec.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) defaults: CallOptions,
    /// What the task's attribute sets (under `defaults`, which include it).
    pub(crate) declared: CallOptions,
    pub(crate) id_maker: Arc<dyn IdMaker>,
    pub(crate) codec: CodecId,
}

pub(crate) struct Entry {
    pub(crate) handler: Option<Handler>,
    pub(crate) settings: ArcSwap<Settings>,
}

/// The tasks one app knows, by name. Reads (every call) take no lock.
pub(crate) struct Registry {
    entries: ArcSwap<FastMap<TaskName, Arc<Entry>>>,
    write: Mutex<()>,
    defaults: Settings,
}

impl Registry {
    pub(crate) fn new(defaults: Settings) -> Registry {
        Registry { entries: ArcSwap::from_pointee(FastMap::default()), write: Mutex::new(()), defaults }
    }

    pub(crate) fn get(&self, name: &str) -> Option<Arc<Entry>> {
        self.entries.load().get(name).cloned()
    }

    /// Runs `f` with the settings for calling `name` (the app's defaults for a task it does
    /// not know) and the signature of its handler if this app has one, without cloning them:
    /// every call goes through here.
    pub(crate) fn with_settings<R>(&self, name: &str, f: impl FnOnce(&Settings, Option<&Signature>) -> R) -> R {
        let entries = self.entries.load();
        match entries.get(name) {
            Some(entry) => f(&entry.settings.load(), entry.handler.as_ref().map(Handler::signature)),
            None => f(&self.defaults, None),
        }
    }

    pub(crate) fn handlers(&self) -> Vec<Handler> {
        self.entries.load().values().filter_map(|e| e.handler.clone()).collect()
    }

    /// Adds a runnable task; a second task of the same name is an error.
    pub(crate) fn add(&self, handler: Handler) -> Result<TaskName, Error> {
        let _guard = lock(&self.write);
        let current = self.entries.load();
        let name = handler.name().clone();
        let settings = match current.get(name.as_str()) {
            Some(existing) if existing.handler.is_some() => {
                return Err(Error::DuplicateTask { name: name.to_string() });
            }
            Some(existing) => existing.settings.load_full(),
            None => Arc::new(self.defaults.clone()),
        };
        let entry = Entry { handler: Some(handler), settings: ArcSwap::new(settings) };
        let mut next = FastMap::clone(&current);
        next.insert(name.clone(), Arc::new(entry));
        self.entries.store(Arc::new(next));
        Ok(name)
    }

    /// Changes the settings of `name` (a task this app only calls gets an entry too).
    pub(crate) fn update(&self, name: &TaskName, change: impl FnOnce(&mut Settings)) {
        let _guard = lock(&self.write);
        let current = self.entries.load();
        match current.get(name.as_str()) {
            Some(entry) => {
                let mut settings = Settings::clone(&entry.settings.load());
                change(&mut settings);
                entry.settings.store(Arc::new(settings));
            }
            None => {
                let mut settings = self.defaults.clone();
                change(&mut settings);
                let entry = Entry { handler: None, settings: ArcSwap::from_pointee(settings) };
                let mut next = FastMap::clone(&current);
                next.insert(name.clone(), Arc::new(entry));
                self.entries.store(Arc::new(next));
            }
        }
    }
}

/// Something that names a task: a name (`"billing.charge"`, a [`TaskName`]) or a
/// `#[dingo::task]` function item (`add`). The marker `M` only guides type inference.
pub trait TaskRef<M> {
    /// The task's name.
    fn task_name(self) -> Result<TaskName, Error>;
}

#[doc(hidden)]
#[derive(Debug)]
pub enum ByName {}
#[doc(hidden)]
#[derive(Debug)]
pub enum ByFn {}

impl TaskRef<ByName> for &str {
    fn task_name(self) -> Result<TaskName, Error> {
        Ok(intern(self))
    }
}

impl TaskRef<ByName> for String {
    fn task_name(self) -> Result<TaskName, Error> {
        Ok(intern(&self))
    }
}

impl TaskRef<ByName> for &String {
    fn task_name(self) -> Result<TaskName, Error> {
        Ok(intern(self))
    }
}

impl TaskRef<ByName> for TaskName {
    fn task_name(self) -> Result<TaskName, Error> {
        Ok(self)
    }
}

impl TaskRef<ByName> for &TaskName {
    fn task_name(self) -> Result<TaskName, Error> {
        Ok(self.clone())
    }
}

impl<F: TaskFnItem<M>, M> TaskRef<(ByFn, M)> for F {
    fn task_name(self) -> Result<TaskName, Error> {
        let id = TypeId::of::<F>();
        linked_tasks()
            .find(|decl| (decl.fn_type_id)() == id)
            .map(|decl| TaskName::from_static(decl.name))
            .ok_or_else(|| Error::NotATask { function: std::any::type_name::<F>().to_owned() })
    }
}

/// A linked task's name as `'static` when there is one (no allocation per call).
pub(crate) fn intern(name: &str) -> TaskName {
    linked_tasks().find(|d| d.name == name).map(|d| TaskName::from_static(d.name)).unwrap_or_else(|| name.into())
}

/// A function item (or any `'static` function value) of some arity; see [`TaskRef`].
pub trait TaskFnItem<M>: 'static {}

macro_rules! fn_items {
    ($($arg:ident),*) => {
        impl<F, R, $($arg),*> TaskFnItem<fn($($arg),*) -> R> for F where F: Fn($($arg),*) -> R + 'static {}
    };
}

fn_items!();
fn_items!(A1);
fn_items!(A1, A2);
fn_items!(A1, A2, A3);
fn_items!(A1, A2, A3, A4);
fn_items!(A1, A2, A3, A4, A5);
fn_items!(A1, A2, A3, A4, A5, A6);
fn_items!(A1, A2, A3, A4, A5, A6, A7);
fn_items!(A1, A2, A3, A4, A5, A6, A7, A8);
fn_items!(A1, A2, A3, A4, A5, A6, A7, A8, A9);
fn_items!(A1, A2, A3, A4, A5, A6, A7, A8, A9, A10);
fn_items!(A1, A2, A3, A4, A5, A6, A7, A8, A9, A10, A11);
fn_items!(A1, A2, A3, A4, A5, A6, A7, A8, A9, A10, A11, A12);

/// A raw success payload for untyped calls ([`App::call_raw`](crate::App::call_raw)).
pub type RawOutput = Encoded;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_ignores_paths_and_whitespace() {
        let mut a = Fnv::new();
        a.write_type_name("(alloc::string::String, core::option::Option<my::mod::Order>)");
        let mut b = Fnv::new();
        b.write_type_name("(String,Option<Order>)");
        assert_eq!(a.0, b.0);
    }

    #[test]
    fn fingerprint_halves_are_checked_separately() {
        let full = fingerprint::<(i64, i64), i64>();
        assert!(fingerprints_match(full, full));
        assert!(fingerprints_match(args_fingerprint::<(i64, i64)>(), full));
        assert!(!fingerprints_match(args_fingerprint::<(i64,)>(), full));
        assert!(!fingerprints_match(fingerprint::<(i64, i64), u8>(), full));
        assert!(fingerprints_match(0, full));
    }

    #[test]
    fn one_argument_is_accepted_bare_and_as_a_one_element_tuple() {
        let bare = Signature::of::<u64, u64>(fingerprint::<u64, u64>());
        assert_eq!(bare.accepts(fingerprint::<u64, u64>()), Some(Layout::Declared));
        assert_eq!(bare.accepts(fingerprint::<(u64,), u64>()), Some(Layout::Tupled));
        assert_eq!(bare.accepts(args_fingerprint::<(u64,)>()), Some(Layout::Tupled), "fire-and-forget");
        assert_eq!(bare.accepts(0), Some(Layout::Declared), "a raw call is read as declared");
        // Other arguments, other results, and a tuple of one inside a tuple of one, do not pass.
        assert_eq!(bare.accepts(fingerprint::<(u64, u64), u64>()), None);
        assert_eq!(bare.accepts(fingerprint::<((u64,),), u64>()), None);
        assert_eq!(bare.accepts(fingerprint::<i64, u64>()), None);
        assert_eq!(bare.accepts(fingerprint::<(u64,), String>()), None);

        let vec = Signature::of::<Vec<u64>, ()>(fingerprint::<Vec<u64>, ()>());
        assert_eq!(vec.accepts(fingerprint::<(Vec<u64>,), ()>()), Some(Layout::Tupled));
        assert_eq!(vec.accepts(fingerprint::<u64, ()>()), None);

        let pair = Signature::of::<(u64, u64), u64>(fingerprint::<(u64, u64), u64>());
        assert_eq!(pair.accepts(fingerprint::<(u64, u64), u64>()), Some(Layout::Declared));
        assert_eq!(pair.accepts(fingerprint::<u64, u64>()), None);
        assert_eq!(pair.accepts(fingerprint::<(u64,), u64>()), None);

        // A task whose one argument is itself a one-element tuple: `(x,)` is that argument.
        let nested = Signature::of::<(u64,), u64>(fingerprint::<(u64,), u64>());
        assert_eq!(nested.accepts(fingerprint::<(u64,), u64>()), Some(Layout::Declared));
        assert_eq!(nested.accepts(fingerprint::<((u64,),), u64>()), Some(Layout::Tupled));
        assert_eq!(nested.accepts(fingerprint::<u64, u64>()), None);
    }

    #[test]
    fn type_names_lose_their_paths() {
        assert_eq!(short_type_name("alloc::string::String"), "String");
        assert_eq!(short_type_name("(u64, alloc::vec::Vec<my_crate::orders::Order>)"), "(u64, Vec<Order>)");
        assert_eq!(
            short_type_name("core::option::Option<(i64,)>"),
            "Option<(i64,)>",
            "a one-element tuple keeps its comma"
        );
        assert_eq!(short_type_name("()"), "()");
    }

    #[test]
    fn mismatch_messages_spell_out_the_types() {
        let refund = Signature::of::<u64, u64>(fingerprint::<u64, u64>());
        assert_eq!(
            refund.mismatch_here("refund", "alloc::string::String", Some("u64")),
            "task `refund` takes u64 and returns u64; this call passes String and expects u64"
        );
        assert_eq!(
            refund.mismatch_here("refund", "(i64, i64)", None),
            "task `refund` takes u64 and returns u64; this call passes (i64, i64)"
        );
        let fp = fingerprint::<u64, u64>();
        assert_eq!(
            refund.mismatch_there("refund", fingerprint::<String, u64>()),
            format!(
                "task `refund` takes u64 and returns u64 on this worker, but the call passes other argument \
                 types (signature {:016x}, this worker's {fp:016x}); likely causes: the caller calls it by \
                 name with other types, or was built from other code (another version of the task)",
                fingerprint::<String, u64>()
            )
        );
        assert!(
            refund
                .mismatch_there("refund", fingerprint::<(u64,), i8>())
                .contains("the call passes the same arguments but expects another result type"),
        );
        assert!(
            refund
                .mismatch_there("refund", fingerprint::<i8, i8>())
                .contains("the call passes other argument types and expects another result type"),
        );
    }

    #[test]
    fn fingerprint_tells_signatures_apart() {
        assert_eq!(fingerprint::<(i64, i64), i64>(), fingerprint::<(i64, i64), i64>());
        assert_ne!(fingerprint::<(i64, i64), i64>(), fingerprint::<(i64,), i64>());
        assert_ne!(fingerprint::<(i64, String), i64>(), fingerprint::<(String, i64), i64>());
        assert_ne!(fingerprint::<(i64,), i64>(), fingerprint::<(i64,), u64>());
        assert_ne!(fingerprint::<(Vec<i64>,), ()>(), fingerprint::<(Vec<i32>,), ()>());
    }
}
