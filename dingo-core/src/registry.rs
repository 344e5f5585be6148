//! The task registry: which tasks exist, how to run them, and each task's call settings.
//!
//! `#[dingo::task]` functions register themselves at link time through `inventory`
//! ([`TaskDecl`]); every [`App`](crate::App) knows all of them without a central list.
//! Closures and stateful handlers are added with [`App::register`](crate::App::register).

use std::any::{Any, TypeId};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{CodecId, Codecs, Encoded};
use crate::context::Context;
use crate::error::{Error, TaskError, TaskErrorKind};
use crate::id::{FastMap, IdMaker, TaskName};
use crate::message::{Payload, Value};
use crate::options::CallOptions;

/// A task defined by `#[dingo::task]`: its name, its wire types and how to run it.
///
/// Implemented by the struct the macro generates next to the function; not meant to be
/// implemented by hand.
pub trait Task: 'static {
    /// The task's name (default: the function's module path and name).
    const NAME: &'static str;
    /// The arguments sent by the caller, as a tuple (the context is not among them).
    type Args: Serialize + DeserializeOwned + Send + 'static;
    /// The value of a successful call (`T` of a `Result<T, E>` return).
    type Output: Serialize + DeserializeOwned + Send + 'static;
    /// Runs the function.
    fn run(ctx: &Context<'_>, args: Self::Args) -> Result<Self::Output, TaskError>;
    /// The signature fingerprint (see [`fingerprint`]).
    fn fingerprint() -> u64;
    /// The `TypeId` of the function item, so `app.allocate(add, 4)` finds the task.
    fn fn_type_id() -> TypeId;
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
}

impl TaskDecl {
    /// The declaration of a macro-generated task.
    pub const fn of<T: Task>() -> TaskDecl {
        TaskDecl { name: T::NAME, handler: Handler::of::<T>, fn_type_id: T::fn_type_id }
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

/// How the worker wants a result encoded.
pub(crate) struct Invoke<'a> {
    pub(crate) codecs: &'a Codecs,
    /// Encode the result with this codec (unless it may stay in process).
    pub(crate) codec: CodecId,
    /// The result may stay an in-process value.
    pub(crate) local: bool,
}

/// A runnable task, type-erased: decodes the arguments, runs (catching panics), and hands
/// the result on — encoded, or lent by reference so an in-process caller takes it without
/// an allocation.
#[derive(Clone)]
pub struct Handler {
    name: TaskName,
    fingerprint: u64,
    run: Arc<RunFn>,
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
                let args: A = match args {
                    Payload::Local(value) => *value.downcast::<A>().map_err(|_| {
                        let message = format!("the arguments are not a `{}`", std::any::type_name::<A>());
                        TaskError::new(TaskErrorKind::SignatureMismatch, message)
                    })?,
                    Payload::Encoded(encoded) => invoke.codecs.decode(&encoded).map_err(|e| {
                        let message = format!(
                            "the arguments do not decode as `{}`: {}",
                            std::any::type_name::<A>(),
                            crate::error::chain(&e)
                        );
                        TaskError::new(TaskErrorKind::BadPayload, message)
                    })?,
                };
                let value = f(ctx, args)?;
                if invoke.local {
                    return Ok(Output::Local(value));
                }
                invoke.codecs.encode(invoke.codec, &value).map(Output::Encoded).map_err(|e| {
                    let message = format!("the result could not be encoded: {}", crate::error::chain(&e));
                    TaskError::new(TaskErrorKind::Encode, message)
                })
            }));
            match outcome {
                Err(panic) => done(Err(TaskError::new(TaskErrorKind::Panic, panic_message(&*panic)))),
                Ok(Err(error)) => done(Err(error)),
                Ok(Ok(Output::Local(value))) => {
                    let mut value = Some(value);
                    done(Ok(Value::Local(&mut value)))
                }
                Ok(Ok(Output::Encoded(encoded))) => done(Ok(Value::Encoded(encoded))),
            }
        };
        Handler { name, fingerprint, run: Arc::new(run) }
    }

    /// The task's name.
    pub fn name(&self) -> &TaskName {
        &self.name
    }

    /// The signature fingerprint the handler checks.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    pub(crate) fn run(&self, ctx: &Context<'_>, args: Payload, invoke: &Invoke<'_>, done: Done<'_>) {
        (self.run)(ctx, args, invoke, done)
    }
}

impl fmt::Debug for Handler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handler").field("name", &self.name).field("fingerprint", &self.fingerprint).finish()
    }
}

enum Output<R> {
    Local(R),
    Encoded(Encoded),
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
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
    match crate::codec::encode(ctx.codec, error) {
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
    /// not know), without cloning them: every call goes through here.
    pub(crate) fn with_settings<R>(&self, name: &str, f: impl FnOnce(&Settings) -> R) -> R {
        let entries = self.entries.load();
        match entries.get(name) {
            Some(entry) => f(&entry.settings.load()),
            None => f(&self.defaults),
        }
    }

    pub(crate) fn handlers(&self) -> Vec<Handler> {
        self.entries.load().values().filter_map(|e| e.handler.clone()).collect()
    }

    /// Adds a runnable task; a second task of the same name is an error.
    pub(crate) fn add(&self, handler: Handler) -> Result<TaskName, Error> {
        let _guard = self.write.lock().unwrap_or_else(|e| e.into_inner());
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
        let _guard = self.write.lock().unwrap_or_else(|e| e.into_inner());
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
            .ok_or_else(|| Error::UnknownTask { name: std::any::type_name::<F>().to_owned() })
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
    fn fingerprint_tells_signatures_apart() {
        assert_eq!(fingerprint::<(i64, i64), i64>(), fingerprint::<(i64, i64), i64>());
        assert_ne!(fingerprint::<(i64, i64), i64>(), fingerprint::<(i64,), i64>());
        assert_ne!(fingerprint::<(i64, String), i64>(), fingerprint::<(String, i64), i64>());
        assert_ne!(fingerprint::<(i64,), i64>(), fingerprint::<(i64,), u64>());
        assert_ne!(fingerprint::<(Vec<i64>,), ()>(), fingerprint::<(Vec<i32>,), ()>());
    }
}
