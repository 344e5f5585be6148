//! A caller process on RabbitMQ: calls the shared tasks and prints the typed results. Start
//! `amqp_worker` first (in another terminal or in the background).
//!
//! ```text
//! cargo run --features amqp --example amqp_caller -- [--calls N]
//! ```

#[allow(dead_code)]
#[path = "shared/tasks.rs"]
mod tasks;

// Each program uses one of its two functions.
#[allow(dead_code)]
#[path = "shared/programs.rs"]
mod programs;

fn main() -> Result<(), dingo::error::MainError> {
    programs::caller(dingo::App::builder().broker(tasks::amqp_broker()?))
}
