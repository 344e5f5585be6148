//! The quick demo of Go dingo, in Rust: a local app, a task, two workers, a typed call, a
//! callback, close.
//!
//! Run it with `cargo run --example quickstart`.

/// A task: an ordinary function, still callable as `add(2, 3)`; `add::call` is its stub.
#[dingo::task]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

fn main() -> Result<(), dingo::Error> {
    // An app on the embedded broker: no server needed.
    let app = dingo::App::local()?;

    // Two worker threads for `add`.
    app.allocate(add, 2)?;

    // A typed call: `add::call(&app, "2", 3)` would not compile.
    let handle = add::call(&app, 2, 3)?;

    // A callback, run when the result arrives (or at once if it already has).
    handle.on_ok(|sum| println!("result is: {sum}"));

    // Or simply wait for the value.
    let sum = handle.wait()?;
    assert_eq!(sum, 5);

    // Graceful: running tasks finish, then the workers stop.
    app.close()
}
