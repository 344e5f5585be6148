// Every accepted form of `async fn` task compiles, in a crate that depends on dingo alone:
// with and without the context, with arguments, `Result` and unit returns, attribute keys.
// Callers use the same stubs as for a plain `fn`, and `Task::run` drives the future to the
// end on the calling thread (here inside a blocking task, which has a context to lend).
use dingo::{App, Context, Error, Handle, Task, TaskId};

#[dingo::task]
async fn ping() -> String {
    "pong".to_string()
}

#[dingo::task]
pub async fn add(a: i64, mut b: i64) -> i64 {
    b += a;
    b
}

/// The context, held across an `.await`: the future stays `Send`.
#[dingo::task(name = "async.greet")]
async fn greet(ctx: &Context, name: String) -> String {
    ctx.progress("greeting");
    std::future::ready(()).await;
    format!("hello, {name}, from {}", ctx.name())
}

#[dingo::task(retries = 2, retry_backoff = "5ms", retry_backoff_max = "1s", retry_jitter = false)]
async fn checked_div(a: i64, b: i64) -> Result<i64, String> {
    if b == 0 { Err(format!("cannot divide {a} by zero")) } else { Ok(a / b) }
}

#[dingo::task(time_limit = "2s", soft_time_limit = "1s")]
pub(crate) async fn record(_ctx: &dingo::Context<'_>, value: u64) {
    let _ = value;
}

/// Runs async tasks through `Task::run`, lending its own context.
#[dingo::task]
fn drive(ctx: &Context, a: i64, b: i64) -> Result<(i64, String, String), String> {
    let sum = <add as Task>::run(ctx, (a, b)).map_err(|e| e.to_string())?;
    let greeting = <greet as Task>::run(ctx, "ann".to_string()).map_err(|e| e.to_string())?;
    <record as Task>::run(ctx, 7).map_err(|e| e.to_string())?;
    let failure = <checked_div as Task>::run(ctx, (a, 0)).unwrap_err();
    Ok((sum, greeting, failure.message().to_string()))
}

// The stubs have the same types as a plain `fn`'s.
const _: fn(&App) -> Result<Handle<String>, Error> = ping::call;
const _: fn(&App, i64, i64) -> Result<Handle<i64>, Error> = add::call;
const _: fn(&App, &dingo::CallOptions, String) -> Result<Handle<String>, Error> = greet::call_with;
const _: fn(&App, i64, i64) -> Result<TaskId, Error> = checked_div::send;
const _: fn(&App, u64) -> Result<Handle<()>, Error> = record::call;

fn main() {
    for handler in [<ping as Task>::handler(), add::handler(), greet::handler(), checked_div::handler()] {
        assert!(handler.is_async(), "{}", handler.name());
    }
    assert!(!<drive as Task>::handler().is_async());
    assert_eq!(greet::NAME, "async.greet");
    assert!(add::NAME.ends_with("::add"), "{}", add::NAME);

    let app = App::local().unwrap();
    app.allocate(drive, 1).unwrap();
    let (sum, greeting, failure) = drive::call(&app, 2, 3).unwrap().wait().unwrap();
    assert_eq!(sum, 5);
    assert_eq!(greeting, format!("hello, ann, from {}", drive::NAME));
    assert_eq!(failure, "cannot divide 2 by zero");
    app.close().unwrap();
}
