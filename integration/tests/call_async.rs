//! `call_async`: calls from async code that never block the executor, even when the broker
//! pushes back. A local queue of four with no worker yet is as full as a send buffer during
//! an outage: a current-thread runtime making 50 calls through it keeps ticking, while one
//! plain `call` blocks its thread.
#![cfg(feature = "tokio")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dingo::{App, CallOptions, Error, LocalBroker, LocalOptions};

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a runtime")
}

fn full_queue_app() -> (App, LocalBroker) {
    let broker = LocalBroker::with_options(LocalOptions::new().capacity(4));
    let app = App::builder().broker(broker.clone()).build().expect("app");
    app.register("tripled", |n: u64| n * 3).expect("register");
    (app, broker)
}

/// Records the longest gap between 1 ms ticks of the runtime: how long its thread was held.
async fn ticker(longest: Arc<AtomicU64>, until: Instant) {
    let mut last = Instant::now();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let gap = last.elapsed().as_micros() as u64;
        longest.fetch_max(gap, Ordering::Relaxed);
        last = Instant::now();
    }
}

#[test]
fn calls_through_a_full_queue_never_block_the_runtime() {
    let (app, broker) = full_queue_app();
    let runtime = current_thread();
    let longest = Arc::new(AtomicU64::new(0));
    // Workers come only after 300 ms: until then the queue (4) is full.
    let late = app.clone();
    let starter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        late.allocate("tripled", 2).expect("allocate");
    });
    let values = runtime.block_on(async {
        let tick = tokio::spawn(ticker(longest.clone(), Instant::now() + Duration::from_millis(400)));
        let calls: Vec<_> = (0..50u64)
            .map(|n| {
                let app = app.clone();
                tokio::spawn(async move { app.call_async::<_, u64>("tripled", n).await?.await })
            })
            .collect();
        let mut values = Vec::new();
        for call in calls {
            values.push(call.await.expect("joined").expect("a value"));
        }
        tick.await.expect("ticker");
        values
    });
    starter.join().expect("starter");
    assert_eq!(values, (0..50u64).map(|n| n * 3).collect::<Vec<_>>());
    let held = Duration::from_micros(longest.load(Ordering::Relaxed));
    eprintln!("call_async through a full queue: the runtime's thread was held at most {held:?}");
    assert!(held < Duration::from_millis(100), "the runtime was blocked {held:?}");
    assert_eq!(broker.queue_len("tripled"), 0);
    app.close().expect("close");
}

#[test]
fn a_plain_call_into_a_full_queue_blocks_until_its_enqueue_timeout() {
    // The contrast, and the bound: `call` holds the thread for its enqueue timeout, then
    // says the queue is full (nothing is sent).
    let (app, broker) = full_queue_app();
    for n in 0..4u64 {
        drop(app.call::<_, u64>("tripled", n).expect("room"));
    }
    let options = CallOptions::new().enqueue_timeout(Duration::from_millis(150));
    let started = Instant::now();
    let result = app.call_with::<_, u64>("tripled", &options, 9u64);
    let held = started.elapsed();
    assert!(matches!(result, Err(Error::QueueFull { .. })), "{result:?}");
    assert!(held >= Duration::from_millis(150) && held < Duration::from_millis(1_000), "held {held:?}");
    assert_eq!(broker.queue_len("tripled"), 4);
    app.close().expect("close");
}

#[test]
fn a_call_future_dropped_unpolled_sends_nothing() {
    let (app, broker) = full_queue_app();
    drop(app.call_async::<_, u64>("tripled", 1u64));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(broker.queue_len("tripled"), 0);
    app.allocate("tripled", 1).expect("allocate");
    let value = current_thread().block_on(async { app.call_async::<_, u64>("tripled", 2u64).await?.await });
    assert_eq!(value.expect("a value"), 6);
    app.close().expect("close");
}

#[test]
fn after_close_a_call_future_fails_with_shutdown() {
    let (app, _broker) = full_queue_app();
    app.close().expect("close");
    let result = current_thread().block_on(app.call_async::<_, u64>("tripled", 2u64));
    assert!(matches!(result, Err(Error::Shutdown)), "{result:?}");
}
