//! How a scenario waits for its calls: [`Waiter`] blocks (`wait`, `reports()`) or `.await`s
//! (the handle as a `Future`, `report_stream()` as a `Stream`) on one of three executors. The
//! App-level scenarios are written once against it and instantiated with each (see
//! [`app_suite`](crate::app_suite)), so the blocking and the awaiting paths pass the same rules.

use std::future::{Future, IntoFuture};
use std::sync::mpsc;
use std::time::Duration;

use dingo::{Error, Handle, Report, ReportStream};
use futures::StreamExt;
use tokio::runtime::Runtime;

/// Blocking, or awaiting on an executor. Made fresh for each test (a runtime of its own).
pub enum Waiter {
    /// `wait`, `wait_timeout`, `next_report`, `reports()`: the thread blocks.
    Blocking,
    /// `.await` and `report_stream()`, run by `executor`.
    Awaiting(Executor),
}

/// What runs the futures of an awaiting [`Waiter`].
pub enum Executor {
    /// A current-thread tokio runtime: `Runtime::block_on` on the scenario's thread.
    CurrentThread(Runtime),
    /// A multi-thread tokio runtime (two workers): each future is spawned as a task, so it
    /// runs, and is woken, on a worker thread.
    MultiThread(Runtime),
    /// `futures::executor::block_on`: no tokio at all (timeouts from a timer thread).
    BlockOn,
}

impl Waiter {
    /// Blocking waits.
    pub fn blocking() -> Waiter {
        Waiter::Blocking
    }

    /// `.await` on a current-thread tokio runtime.
    pub fn current_thread() -> Waiter {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a tokio runtime");
        Waiter::Awaiting(Executor::CurrentThread(runtime))
    }

    /// `.await` in tasks of a multi-thread tokio runtime.
    pub fn multi_thread() -> Waiter {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("dingo-test-tokio")
            .enable_time()
            .build()
            .expect("a tokio runtime");
        Waiter::Awaiting(Executor::MultiThread(runtime))
    }

    /// `.await` under `futures::executor::block_on`.
    pub fn block_on() -> Waiter {
        Waiter::Awaiting(Executor::BlockOn)
    }

    /// Takes `handle` to wait on (several times, or for its reports one by one).
    pub fn on<T: Send + 'static>(&self, handle: Handle<T>) -> Waiting<'_, T> {
        Waiting { waiter: self, call: Some(Call::Handle(handle)) }
    }

    /// The call's result: `handle.wait()`, or `handle.await`.
    pub fn wait<T: Send + 'static>(&self, handle: Handle<T>) -> Result<T, Error> {
        self.on(handle).wait()
    }

    /// The call's result within `timeout`: `handle.wait_timeout(timeout)`, or the handle
    /// awaited under a timeout (`Error::Timeout(timeout)` when it passes).
    pub fn wait_timeout<T: Send + 'static>(&self, handle: Handle<T>, timeout: Duration) -> Result<T, Error> {
        self.on(handle).wait_timeout(timeout)
    }

    /// Every report of the call, the final one last: `handle.reports()` collected, or
    /// `handle.report_stream()` collected.
    pub fn reports<T: Send + 'static>(&self, handle: Handle<T>) -> Vec<Report<T>> {
        match self {
            Waiter::Blocking => handle.reports().collect(),
            Waiter::Awaiting(executor) => executor.run(handle.report_stream().collect()),
        }
    }
}

impl Executor {
    /// Runs `future` to its end, the way this executor does.
    pub fn run<F>(&self, future: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self {
            Executor::CurrentThread(runtime) => runtime.block_on(future),
            Executor::MultiThread(runtime) => match runtime.block_on(runtime.spawn(future)) {
                Ok(output) => output,
                Err(error) => std::panic::resume_unwind(error.into_panic()),
            },
            Executor::BlockOn => futures::executor::block_on(future),
        }
    }

    fn timer(&self) -> Timer {
        match self {
            Executor::CurrentThread(_) | Executor::MultiThread(_) => Timer::Tokio,
            Executor::BlockOn => Timer::Thread,
        }
    }
}

/// Where an awaiting timeout's clock comes from.
#[derive(Clone, Copy)]
enum Timer {
    /// `tokio::time::timeout` (the future runs inside a runtime with time enabled).
    Tokio,
    /// A thread of its own per timeout, gone as soon as the timeout is dropped.
    Thread,
}

impl Timer {
    /// `future`'s output, or `None` once `after` has passed.
    async fn within<F: IntoFuture>(self, after: Duration, future: F) -> Option<F::Output> {
        let future = future.into_future();
        match self {
            Timer::Tokio => tokio::time::timeout(after, future).await.ok(),
            Timer::Thread => {
                let (future, sleep) = (std::pin::pin!(future), std::pin::pin!(sleep(after)));
                match futures::future::select(future, sleep).await {
                    futures::future::Either::Left((output, _)) => Some(output),
                    futures::future::Either::Right(((), _)) => None,
                }
            }
        }
    }
}

/// A future ready after `after`, for executors without a timer: a thread sleeps, then wakes
/// it; dropping the future ends the thread at once.
fn sleep(after: Duration) -> impl Future<Output = ()> + Send {
    let (fire, fired) = futures::channel::oneshot::channel::<()>();
    let (stop, stopped) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("dingo-test-timer".into())
        .spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(after) {
                let _ = fire.send(());
            }
        })
        .expect("spawn a timer thread");
    async move {
        let _stop = stop; // dropped with the future: the thread's wait ends
        let _ = fired.await;
    }
}

/// One call a [`Waiter`] waits on: its result, with or without a timeout, or its reports
/// one at a time.
pub struct Waiting<'w, T> {
    waiter: &'w Waiter,
    /// Taken out while a future that owns it runs (a spawned task must own what it awaits).
    call: Option<Call<T>>,
}

/// The handle, or (once an awaiting waiter was asked for a report) its report stream.
enum Call<T> {
    Handle(Handle<T>),
    Stream(ReportStream<T>),
}

impl<T: Send + 'static> Waiting<'_, T> {
    /// The result: `wait()`, or `.await` (after reports were taken one by one: the rest of the
    /// stream, ending with the final report).
    pub fn wait(mut self) -> Result<T, Error> {
        match self.waiter {
            Waiter::Blocking => match self.take() {
                Call::Handle(handle) => handle.wait(),
                Call::Stream(_) => unreachable!("a blocking waiter keeps the handle"),
            },
            Waiter::Awaiting(executor) => self.await_result(executor, None),
        }
    }

    /// The result within `timeout`; on `Error::Timeout` nothing is lost, wait again:
    /// `wait_timeout`, or `tokio::time::timeout(timeout, &mut handle)` (a timer thread's
    /// under `block_on`).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<T, Error> {
        match self.waiter {
            Waiter::Blocking => self.handle().wait_timeout(timeout),
            Waiter::Awaiting(executor) => self.await_result(executor, Some(timeout)),
        }
    }

    /// The next report within `timeout` (`None`: no limit), `Ok(None)` after the final one:
    /// `next_report`, or the next item of `report_stream()`.
    pub fn next_report(&mut self, timeout: Option<Duration>) -> Result<Option<Report<T>>, Error> {
        let Waiter::Awaiting(executor) = self.waiter else {
            return self.handle().next_report(timeout);
        };
        let timer = executor.timer();
        let mut stream = match self.take() {
            Call::Handle(handle) => handle.report_stream(),
            Call::Stream(stream) => stream,
        };
        let (stream, next) = executor.run(async move {
            let next = match timeout {
                None => Some(stream.next().await),
                Some(timeout) => timer.within(timeout, stream.next()).await,
            };
            (stream, next)
        });
        self.call = Some(Call::Stream(stream));
        next.ok_or(Error::Timeout(timeout.unwrap_or_default()))
    }

    fn await_result(&mut self, executor: &Executor, timeout: Option<Duration>) -> Result<T, Error> {
        let timer = executor.timer();
        let (call, outcome) = match self.take() {
            Call::Handle(mut handle) => {
                let (handle, outcome) = executor.run(async move {
                    let outcome = match timeout {
                        None => Some((&mut handle).await),
                        Some(timeout) => timer.within(timeout, &mut handle).await,
                    };
                    (handle, outcome)
                });
                (Call::Handle(handle), outcome)
            }
            Call::Stream(mut stream) => {
                let (stream, outcome) = executor.run(async move {
                    let last = async {
                        while let Some(report) = stream.next().await {
                            match report {
                                Report::Success(value) => return Ok(value),
                                Report::Failure(error) => return Err(Error::Task(error)),
                                _ => {}
                            }
                        }
                        Err(Error::ResultTaken) // the final report was returned already
                    };
                    let outcome = match timeout {
                        None => Some(last.await),
                        Some(timeout) => timer.within(timeout, last).await,
                    };
                    (stream, outcome)
                });
                (Call::Stream(stream), outcome)
            }
        };
        self.call = Some(call);
        outcome.unwrap_or(Err(Error::Timeout(timeout.unwrap_or_default())))
    }

    fn take(&mut self) -> Call<T> {
        // Put back by every method that takes it; a panic in between fails the test anyway.
        self.call.take().expect("the call is put back after every wait")
    }

    /// The handle of a blocking waiter (which never turns it into a stream).
    fn handle(&mut self) -> &mut Handle<T> {
        match &mut self.call {
            Some(Call::Handle(handle)) => handle,
            _ => unreachable!("a blocking waiter keeps the handle"),
        }
    }
}
