//! What `#[dingo::task]` expands to refers to, and nothing else. Not a public API: it may
//! change in any release.

use std::any::TypeId;
use std::fmt;

pub use core::{concat, module_path};
pub use inventory;
pub use serde;
pub use std::any::TypeId as __TypeId;
pub use std::future::Future;
pub use std::marker::Send;
pub use std::option::Option::{self, None, Some};
pub use std::result::Result::{self, Err, Ok};
pub use std::sync::{Arc, OnceLock};

pub use crate::app::{App, CallFuture};
pub use crate::context::Context;
pub use crate::error::{Error, TaskError};
pub use crate::id::{TaskId, TaskName};
pub use crate::options::CallOptions;
pub use crate::registry::{Handler, Task, TaskDecl, failed, fingerprint};
pub use crate::result::Handle;

/// Calls a macro-generated task.
pub fn call<K: Task>(app: &App, args: K::Args, options: &CallOptions) -> Result<Handle<K::Output>, Error> {
    app.call_task::<K>(args, options)
}

/// Calls a macro-generated task without blocking (see [`App::call_async`]).
pub fn call_async<K: Task>(app: &App, args: K::Args, options: &CallOptions) -> CallFuture<K::Output> {
    let options = options.clone();
    CallFuture::new(app, move |app| app.call_task::<K>(args, &options))
}

/// Sends a macro-generated task without a report.
pub fn send<K: Task>(app: &App, args: K::Args) -> Result<TaskId, Error> {
    app.send_task::<K>(args)
}

/// Runs an `async fn` task's future to completion on the calling thread (its
/// [`Task::run`]: the task called outside a worker pool).
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    crate::worker::executor::block_on(future)
}

/// The handler of an `async fn` task: `start` makes the future from the owned context and
/// the arguments.
pub fn async_handler<K, F, Fut>(start: F) -> Handler
where
    K: Task,
    F: Fn(Arc<Context<'static>>, K::Args) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<K::Output, TaskError>> + Send + 'static,
{
    Handler::new_async(TaskName::from_static(K::NAME), K::fingerprint(), start)
}

/// The `TypeId` of a function item.
pub fn type_id_of<F: 'static>(_: &F) -> TypeId {
    TypeId::of::<F>()
}

/// The signature fingerprint of a task, computed once.
pub fn cached_fingerprint<K: Task>(cell: &OnceLock<u64>) -> u64 {
    *cell.get_or_init(fingerprint::<K::Args, K::Output>)
}

/// Describes a task's error value for the failure message: its `Display`, else its `Debug`,
/// else its type name (autoref specialization: `(&&&Message(&e)).dingo_message()`).
#[allow(missing_debug_implementations)]
pub struct Message<'a, E: ?Sized>(pub &'a E);

/// Highest priority: `Display`.
pub trait ViaDisplay {
    /// The message.
    fn dingo_message(&self) -> String;
}

impl<E: fmt::Display + ?Sized> ViaDisplay for &&Message<'_, E> {
    fn dingo_message(&self) -> String {
        self.0.to_string()
    }
}

/// Second: `Debug`.
pub trait ViaDebug {
    /// The message.
    fn dingo_message(&self) -> String;
}

impl<E: fmt::Debug + ?Sized> ViaDebug for &Message<'_, E> {
    fn dingo_message(&self) -> String {
        format!("{:?}", self.0)
    }
}

/// Last: the type's name.
pub trait ViaTypeName {
    /// The message.
    fn dingo_message(&self) -> String;
}

impl<E: ?Sized> ViaTypeName for Message<'_, E> {
    fn dingo_message(&self) -> String {
        format!("the task returned an error of type `{}`", std::any::type_name::<E>())
    }
}

/// The call option defaults of `#[dingo::task(retries = …, retry_backoff = …, …)]`
/// (durations in milliseconds).
pub fn task_defaults(
    retries: Option<u32>,
    backoff_ms: Option<u64>,
    max_ms: Option<u64>,
    jitter: Option<bool>,
    soft_ms: Option<u64>,
    hard_ms: Option<u64>,
) -> CallOptions {
    let mut options = CallOptions::new();
    if let Some(soft) = soft_ms {
        options = options.soft_time_limit(std::time::Duration::from_millis(soft));
    }
    if let Some(hard) = hard_ms {
        options = options.time_limit(std::time::Duration::from_millis(hard));
    }
    if let Some(retries) = retries {
        options = options.retries(retries);
    }
    if backoff_ms.is_some() || max_ms.is_some() || jitter.is_some() {
        let default = crate::retry::Backoff::DEFAULT;
        let base = backoff_ms.map_or(default.get_base(), std::time::Duration::from_millis);
        let mut backoff = crate::retry::Backoff::exponential(base);
        if let Some(max) = max_ms {
            backoff = backoff.cap(std::time::Duration::from_millis(max));
        }
        if let Some(jitter) = jitter {
            backoff = backoff.jitter(jitter);
        }
        options = options.backoff(backoff);
    }
    options
}
