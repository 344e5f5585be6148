//! Calls from async code that must not block their executor ([`App::call_async`]): the call
//! is made on the app's sending thread, and the caller's task awaits its handle.
//!
//! `call` itself blocks only while the broker pushes back (a full local queue, a Redis or
//! RabbitMQ send buffer full during an outage), at most the call's `enqueue_timeout`; a
//! call through here never blocks: when even the sending thread's queue is full, the task
//! waits, woken as the thread takes the next call.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::App;
use crate::broker::kit::lock;
use crate::error::Error;
use crate::result::Handle;

/// How many calls may wait for the sending thread before callers wait too.
const QUEUED: usize = 1024;

type Job = Box<dyn FnOnce() + Send>;

/// The sending thread of one app, started by its first `call_async`.
pub(crate) struct Sending {
    tx: Mutex<Option<Sender<Job>>>,
    /// Tasks waiting for room in the queue.
    waiting: Arc<Mutex<VecDeque<Waker>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Sending {
    pub(crate) fn start() -> Result<Sending, Error> {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(QUEUED);
        let waiting = Arc::new(Mutex::new(VecDeque::new()));
        let room = waiting.clone();
        let thread = std::thread::Builder::new()
            .name("dingo-sender".into())
            .spawn(move || run(&rx, &room))
            .map_err(Error::Spawn)?;
        Ok(Sending { tx: Mutex::new(Some(tx)), waiting, thread: Mutex::new(Some(thread)) })
    }

    /// Stops taking calls; the thread makes those queued (they fail: the app is closed)
    /// and exits. Waits for it until `deadline`.
    pub(crate) fn stop(&self, deadline: Option<Instant>) {
        drop(lock(&self.tx).take());
        for waker in lock(&self.waiting).drain(..) {
            waker.wake();
        }
        let Some(thread) = lock(&self.thread).take() else { return };
        while !thread.is_finished() {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return; // it ends on its own once the calls it makes return
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let _ = thread.join();
    }
}

fn run(rx: &Receiver<Job>, waiting: &Mutex<VecDeque<Waker>>) {
    while let Ok(job) = rx.recv() {
        // A place freed: the tasks that found the queue full try again.
        let woken: Vec<Waker> = lock(waiting).drain(..).collect();
        for waker in woken {
            waker.wake();
        }
        job();
    }
}

/// The future of a call made without blocking (see [`App::call_async`]): its handle, once
/// the sending thread made the call. Dropped before the thread took it, the call is never
/// made; after, it is made and its handle dropped (as dropping a handle does).
#[must_use = "futures do nothing unless you `.await` or poll them; the call is not made until then"]
pub struct CallFuture<T> {
    job: Option<Job>,
    app: App,
    done: Arc<Done<T>>,
}

struct Done<T> {
    state: Mutex<DoneState<T>>,
}

/// The call's outcome once made, and the task to wake then.
struct DoneState<T> {
    outcome: Option<Result<Handle<T>, Error>>,
    waker: Option<Waker>,
}

impl<T> std::fmt::Debug for CallFuture<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallFuture").field("sent", &self.job.is_none()).finish()
    }
}

impl<T: Send + 'static> CallFuture<T> {
    pub(crate) fn new(
        app: &App,
        call: impl FnOnce(&App) -> Result<Handle<T>, Error> + Send + 'static,
    ) -> CallFuture<T> {
        let done = Arc::new(Done { state: Mutex::new(DoneState { outcome: None, waker: None }) });
        let (ours, caller) = (done.clone(), app.clone());
        let job: Job = Box::new(move || {
            let handle = call(&caller);
            let mut state = lock(&ours.state);
            state.outcome = Some(handle);
            if let Some(waker) = state.waker.take() {
                waker.wake();
            }
        });
        CallFuture { job: Some(job), app: app.clone(), done }
    }
}

impl<T: Send + 'static> Future for CallFuture<T> {
    type Output = Result<Handle<T>, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Handle<T>, Error>> {
        if let Some(job) = self.job.take() {
            let sending = match self.app.sending() {
                Ok(sending) => sending,
                Err(e) => return Poll::Ready(Err(e)),
            };
            let tx = lock(&sending.tx).clone();
            let Some(tx) = tx else { return Poll::Ready(Err(Error::Shutdown)) };
            match tx.try_send(job) {
                Ok(()) => {}
                Err(TrySendError::Disconnected(_)) => return Poll::Ready(Err(Error::Shutdown)),
                Err(TrySendError::Full(job)) => {
                    lock(&sending.waiting).push_back(cx.waker().clone());
                    // Taken meanwhile: the thread may have woken the waiters already.
                    match tx.try_send(job) {
                        Ok(()) => {}
                        Err(TrySendError::Full(job)) => {
                            self.job = Some(job);
                            return Poll::Pending;
                        }
                        Err(TrySendError::Disconnected(_)) => return Poll::Ready(Err(Error::Shutdown)),
                    }
                }
            }
        }
        let mut state = lock(&self.done.state);
        match state.outcome.take() {
            Some(result) => Poll::Ready(result),
            None => {
                state.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}
