//! An async web service on dingo: [axum] handlers that enqueue tasks on the app's broker
//! and `.await` their typed results (a [`dingo::Handle`] is `IntoFuture`: no thread blocks
//! while a request waits), or relay a call's progress reports as server-sent events (its
//! [`dingo::ReportStream`]). The tasks run on worker threads, in this process or in others
//! sharing the broker — `sum_squares`, an `async fn`, many at once per thread on the
//! server's tokio runtime; they are all in [`tasks`].
//!
//! | route | reply |
//! | --- | --- |
//! | `GET /add?a=2&b=3` | `{"sum":5}` |
//! | `GET /squares?n=3` | `{"n":3,"sum":14}` (`&pause_ms=…` between steps) |
//! | `GET /squares/stream?n=3&pause_ms=100` | events `sent`, `started`, `progress` ×3 (`{"done":1,"of":3}`, …), then `result` (`{"n":3,"sum":14}`) or `failure` |
//!
//! A call that fails answers `{"error": message, "kind": kind}` with the status of
//! [`Failure`]: 422 for the task's own `Err`, 504 past the deadline, 503 when the queue is
//! full or the app closed, 500 otherwise. A request that goes away (past its deadline, or
//! its client disconnected, mid-stream too) cancels its call; so does [`Service::stop`],
//! for the streams it ends.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use dingo_axum_example::Service;
//!
//! let runtime = tokio::runtime::Runtime::new()?;
//! let broker = dingo::redis::RedisBroker::connect_with(
//!     "redis://127.0.0.1:6379",
//!     dingo::redis::RedisOptions::new().namespace("shop"),
//! )?;
//! // The async task sleeps on tokio's timer: it runs on the server's runtime.
//! let app = dingo::App::builder().broker(broker).tokio_runtime(runtime.handle().clone()).build()?;
//! dingo_axum_example::tasks::serve(&app, 4)?; // worker threads in this process
//! let service = Service::new(app.clone()).deadline(Duration::from_secs(30));
//! runtime.block_on(async {
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//!     let router = service.router();
//!     axum::serve(listener, router)
//!         .with_graceful_shutdown(async move {
//!             let _ = tokio::signal::ctrl_c().await;
//!             service.stop(); // open event streams end, so the shutdown does not wait for them
//!         })
//!         .await
//! })?;
//! app.close()?; // blocking: outside the runtime's tasks, before the runtime goes
//! # Ok(())
//! # }
//! ```

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use axum::{Json, Router};
use dingo::{App, CallOptions, Handle};
use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

mod cancel;
mod events;
mod failure;
pub mod tasks;

pub use failure::Failure;

use cancel::CancelOnDrop;
use tasks::{Squares, Step};

/// The service: its routes on an app, and the switch that ends its event streams when
/// the server stops.
#[derive(Debug, Clone)]
pub struct Service {
    app: App,
    deadline: Duration,
    stopping: Arc<watch::Sender<bool>>,
}

impl Service {
    /// The service on `app`, with a deadline of 30 s.
    pub fn new(app: App) -> Service {
        Service { app, deadline: Duration::from_secs(30), stopping: Arc::new(watch::Sender::new(false)) }
    }

    /// A call whose value is awaited and has not arrived within `deadline` is answered 504
    /// and cancelled. Event streams have no deadline: they last as long as their call.
    #[must_use]
    pub fn deadline(mut self, deadline: Duration) -> Service {
        self.deadline = deadline;
        self
    }

    /// The routes (see the crate docs).
    pub fn router(&self) -> Router {
        // A full queue is a 503 at once, not a runtime thread blocked until there is room.
        let now_or_never = CallOptions::new().enqueue_timeout(Duration::ZERO);
        let state = Routes {
            app: self.app.clone(),
            deadline: self.deadline,
            stopping: self.stopping.clone(),
            streamed: now_or_never.clone().monitor_progress(true),
            now_or_never,
        };
        Router::new()
            .route("/add", get(add))
            .route("/squares", get(squares))
            .route("/squares/stream", get(squares_stream))
            .with_state(state)
    }

    /// Ends the open event streams, each with a `failure` event of kind `shutdown`, and
    /// cancels their calls; new streams are refused (503). Call it when the server starts
    /// its graceful shutdown, which would otherwise wait for every stream to finish.
    /// Awaited calls go on: the deadline bounds them.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }
}

#[derive(Clone)]
struct Routes {
    app: App,
    deadline: Duration,
    /// Turns true when the service stops.
    stopping: Arc<watch::Sender<bool>>,
    /// Options of the calls a handler awaits.
    now_or_never: CallOptions,
    /// Options of the calls whose reports are streamed.
    streamed: CallOptions,
}

#[derive(Deserialize)]
struct AddQuery {
    a: i64,
    b: i64,
}

#[derive(Serialize)]
struct Sum {
    sum: i64,
}

async fn add(State(routes): State<Routes>, Query(q): Query<AddQuery>) -> Result<Json<Sum>, Failure> {
    let call = tasks::add::call_with(&routes.app, &routes.now_or_never, q.a, q.b);
    let sum = routes.result_of(call).await?;
    Ok(Json(Sum { sum }))
}

#[derive(Deserialize)]
struct SquaresQuery {
    n: u32,
    #[serde(default)]
    pause_ms: u64,
}

async fn squares(State(routes): State<Routes>, Query(q): Query<SquaresQuery>) -> Result<Json<Squares>, Failure> {
    let call = tasks::sum_squares::call_with(&routes.app, &routes.now_or_never, q.n, q.pause_ms);
    Ok(Json(routes.result_of(call).await?))
}

async fn squares_stream(
    State(routes): State<Routes>,
    Query(q): Query<SquaresQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Failure> {
    if *routes.stopping.borrow() {
        return Err(Failure::new(StatusCode::SERVICE_UNAVAILABLE, "shutdown", STOPPING));
    }
    let handle = tasks::sum_squares::call_with(&routes.app, &routes.streamed, q.n, q.pause_ms)?;
    let events = events::report_events::<Squares, Step>(&routes.app, handle, routes.stopping.subscribe());
    // Comments every 15 s keep proxies from closing a quiet stream.
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

pub(crate) const STOPPING: &str = "the service is stopping";

impl Routes {
    /// Awaits a call's value for at most the deadline; the call is cancelled if the request
    /// goes first (the deadline passed, or the client disconnected and axum dropped this).
    async fn result_of<T: Send + 'static>(&self, call: Result<Handle<T>, dingo::Error>) -> Result<T, Failure> {
        let mut handle = call?;
        let abandoned = CancelOnDrop::new(&self.app, handle.key());
        // `&mut handle`: the handle stays ours if the timeout wins.
        match tokio::time::timeout(self.deadline, &mut handle).await {
            Ok(outcome) => {
                abandoned.disarm();
                Ok(outcome?)
            }
            Err(_) => Err(Failure::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!("no result within {:?}: the call was cancelled", self.deadline),
            )),
        }
    }
}
