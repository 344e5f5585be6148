//! Tasks through RabbitMQ, reports through Redis: each role of a broker is separate, so a
//! deployment can pick the best transport for each (durable, routed queues for tasks; a
//! fast store for results).
//!
//! ```text
//! cargo run --features amqp,redis --example mixed_transports
//! ```
//! Needs RabbitMQ (`DINGO_AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`) and
//! Redis (`DINGO_REDIS_URL`, default `redis://127.0.0.1:6379`); the namespace is
//! `DINGO_NAMESPACE` (default `dingo-example`).

use std::time::Duration;

#[allow(dead_code)]
#[path = "shared/tasks.rs"]
mod tasks;

use tasks::{Order, add, total};

fn main() -> Result<(), dingo::error::MainError> {
    // The worker side: takes tasks from RabbitMQ, stores reports in Redis (and acknowledges
    // each task to RabbitMQ only once Redis has its report).
    let worker = dingo::App::builder().tasks(tasks::amqp_broker()?).reports(tasks::redis_broker()?).build()?;
    worker.allocate_all(2)?;

    // The caller side (another process in a real deployment): the same pairing.
    let caller = dingo::App::builder().tasks(tasks::amqp_broker()?).reports(tasks::redis_broker()?).build()?;
    let patience = Duration::from_secs(30);
    let handles: Vec<_> = (0..5i64).map(|i| add::call(&caller, i, 100)).collect::<Result<_, _>>()?;
    for (i, mut handle) in handles.into_iter().enumerate() {
        println!("add({i}, 100) = {}", handle.wait_timeout(patience)?);
    }
    let order = Order { id: 1, items: vec!["bread".into()], cents_each: 250 };
    println!("total = {:?}", total::call(&caller, order)?.wait_timeout(patience)?);

    caller.close()?;
    worker.close()?;
    Ok(())
}
