//! A worker process on Redis: serves the shared tasks with a pool of threads.
//!
//! ```text
//! cargo run --features redis --example redis_worker -- [--threads N] [--tasks N] [--seconds S]
//! ```
//! Without `--tasks` or `--seconds` it serves until SIGINT (Ctrl-C) or SIGTERM; with them it
//! also stops after that many tasks or seconds. Stopping is graceful (a second signal exits
//! at once).
//! Run `redis_caller` in another terminal. The server is
//! `DINGO_REDIS_URL` (default `redis://127.0.0.1:6379`), the namespace `DINGO_NAMESPACE`.

#[allow(dead_code)]
#[path = "shared/tasks.rs"]
mod tasks;

// Each program uses one of its two functions.
#[allow(dead_code)]
#[path = "shared/programs.rs"]
mod programs;

fn main() -> Result<(), dingo::error::MainError> {
    programs::worker(dingo::App::builder().broker(tasks::redis_broker()?))
}
