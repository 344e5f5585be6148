//! A caller process on Redis: calls the shared tasks and prints the typed results. Start
//! `redis_worker` first (in another terminal or in the background).
//!
//! ```text
//! cargo run --features redis --example redis_caller -- [--calls N]
//! ```

use std::time::Duration;

#[path = "shared/tasks.rs"]
mod tasks;

use tasks::{Order, add, slow_echo, total};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut calls = 10u64;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--calls" => calls = value.parse()?,
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let app = dingo::App::builder().broker(tasks::broker()?).build()?;
    let patience = Duration::from_secs(30);

    // Many calls in flight, then their results, in order.
    let handles: Vec<_> = (0..calls as i64).map(|i| add::call(&app, i, 1000)).collect::<Result<_, _>>()?;
    for (i, mut handle) in handles.into_iter().enumerate() {
        println!("add({i}, 1000) = {}", handle.wait_timeout(patience)?);
    }

    // Structs travel; an Err arrives as a failure carrying its value.
    let order = Order { id: 7, items: vec!["tea".into(), "cake".into()], cents_each: 350 };
    println!("total = {:?}", total::call(&app, order)?.wait_timeout(patience)?);
    let empty = Order { id: 8, items: vec![], cents_each: 100 };
    match total::call(&app, empty)?.wait_timeout(patience) {
        Err(dingo::Error::Task(e)) => println!("total failed: {} (payload {:?})", e.message(), e.payload::<String>()),
        other => println!("total: unexpected {other:?}"),
    }
    println!("slow_echo = {}", slow_echo::call(&app, 42, 50)?.wait_timeout(patience)?);
    app.close()?;
    Ok(())
}
