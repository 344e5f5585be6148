//! `#[dingo::task]` expands to code that names only `::dingo::__private`, so it compiles
//! without the prelude and in a crate that depends on neither serde nor inventory; and the
//! generated tasks run.

use std::time::{Duration, Instant};

use dingo::{App, CallOptions, Task, TaskErrorKind};

/// A custom error type, serialized through dingo's own serde.
#[derive(Debug, Clone, PartialEq, dingo::serde::Serialize, dingo::serde::Deserialize)]
#[serde(crate = "dingo::serde")]
pub(crate) enum DivError {
    ByZero { dividend: i64 },
}

impl std::fmt::Display for DivError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DivError::ByZero { dividend } => write!(f, "cannot divide {dividend} by zero"),
        }
    }
}

mod hygienic {
    #![no_implicit_prelude]

    use ::std::convert::From;
    use ::std::string::String;
    use ::std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

    /// Documented like any function; the docs stay on it.
    #[::dingo::task]
    #[inline]
    pub(crate) fn add(a: i64, mut b: i64) -> i64 {
        b += a;
        b
    }

    #[::dingo::task]
    pub(crate) fn answer() -> i64 {
        42
    }

    #[::dingo::task(name = "hygiene.whoami")]
    pub(crate) fn whoami(ctx: &::dingo::Context<'_>) -> String {
        String::from(ctx.name().as_str())
    }

    /// The context in the middle, written without its lifetime: the caller sends only
    /// `factor` and `value`.
    #[::dingo::task]
    #[allow(elided_lifetimes_in_paths)]
    pub(crate) fn scale(factor: i64, ctx: &::dingo::Context, value: i64) -> (i64, String) {
        (factor * value, String::from(ctx.name().as_str()))
    }

    #[::dingo::task]
    pub(crate) fn checked_div(a: i64, b: i64) -> ::core::result::Result<i64, super::DivError> {
        if b == 0 {
            ::core::result::Result::Err(super::DivError::ByZero { dividend: a })
        } else {
            ::core::result::Result::Ok(a / b)
        }
    }

    pub(crate) static RECORDED: AtomicI64 = AtomicI64::new(0);

    #[::dingo::task]
    pub(crate) fn record(value: i64) {
        RECORDED.store(value, Ordering::SeqCst);
    }

    /// Generated only where the function exists.
    #[::dingo::task]
    #[cfg(any())]
    pub(crate) fn never(missing: super::DoesNotExist) {}

    /// Still a task, without warnings from the generated code.
    #[::dingo::task]
    #[deprecated = "use `add`"]
    pub(crate) fn old_add(a: i64, b: i64) -> i64 {
        a + b
    }

    /// One argument travels as itself, here named like the generated locals.
    #[::dingo::task]
    pub(crate) fn negate(__dingo_args: i64) -> i64 {
        -__dingo_args
    }

    /// An `async fn`, with the context held across an `.await` and arguments named like
    /// the generated locals.
    #[::dingo::task(name = "hygiene.async_scale", retries = 1)]
    pub(crate) async fn async_scale(
        ctx: &::dingo::Context<'_>,
        __dingo_args: i64,
        __dingo_future: i64,
    ) -> ::core::result::Result<(i64, String), super::DivError> {
        ::core::future::ready(()).await;
        if __dingo_future == 0 {
            return ::core::result::Result::Err(super::DivError::ByZero { dividend: __dingo_args });
        }
        ::core::result::Result::Ok((__dingo_args * __dingo_future, String::from(ctx.name().as_str())))
    }

    pub(crate) static RAN: AtomicBool = AtomicBool::new(false);

    /// An `async fn` of no arguments and no result, named like the generated assertion's
    /// prefix, its context written without the lifetime (the macro writes it).
    #[::dingo::task]
    pub(crate) async fn __dingo_send(_ctx: &::dingo::Context) {
        RAN.store(true, Ordering::SeqCst);
    }

    /// Arguments named like the stubs' own parameters, the generated locals and the task.
    #[::dingo::task]
    pub(crate) fn clash(app: i64, options: i64, clash: i64, __dingo_args: i64, ctx: i64) -> i64 {
        app * 10_000 + options * 1000 + clash * 100 + __dingo_args * 10 + ctx
    }
}

/// `crate = path`, for a program that names dingo otherwise: generated code goes through
/// the path given (a unit test of dingo-macros checks that no path bypasses it).
mod renamed {
    #![no_implicit_prelude]

    use ::dingo as renamed;
    use ::std::convert::From;
    use ::std::string::String;

    /// Only `__private`, as a re-export of dingo's facade would have it.
    pub(crate) mod reexport {
        pub(crate) use ::dingo::__private;
    }

    #[renamed::task(crate = renamed)]
    pub(crate) fn triple(x: i64) -> i64 {
        x * 3
    }

    #[renamed::task(crate = self::reexport, name = "renamed.whoami")]
    pub(crate) fn whoami(ctx: &renamed::Context<'_>) -> String {
        String::from(ctx.name().as_str())
    }
}

/// Runs the async tasks through `Task::run` (their future driven on this worker's thread),
/// lending this blocking task's context.
#[dingo::task]
fn drive_async(ctx: &dingo::Context, a: i64, b: i64) -> Result<(i64, String), String> {
    <hygienic::__dingo_send as Task>::run(ctx, ()).map_err(|e| e.to_string())?;
    <hygienic::async_scale as Task>::run(ctx, (a, b)).map_err(|e| {
        let payload: DivError = e.payload().unwrap().unwrap();
        format!("{}: {} ({payload:?})", e.kind(), e.message())
    })
}

fn app() -> App {
    let app = App::local().unwrap();
    app.allocate_all(2).unwrap();
    app
}

#[test]
fn generated_stubs_run_the_functions() {
    let app = App::local().unwrap();
    app.allocate(hygienic::add, 1).unwrap();
    app.allocate_all(1).unwrap();

    assert_eq!(hygienic::add::call(&app, 2, 3).unwrap().wait().unwrap(), 5);
    assert_eq!(hygienic::add::call_with(&app, &CallOptions::new(), 4, 5).unwrap().wait().unwrap(), 9);
    assert_eq!(hygienic::answer::call(&app).unwrap().wait().unwrap(), 42);
    assert_eq!(hygienic::clash::call(&app, 1, 2, 3, 4, 5).unwrap().wait().unwrap(), 12_345);
    assert_eq!(hygienic::old_add::call(&app, 1, 1).unwrap().wait().unwrap(), 2);
    app.close().unwrap();
}

/// A one-argument task's wire type is its argument's, as for a closure registered by name,
/// so the stub and a call by name with the bare value agree; by name, `(x,)` works too.
#[test]
fn one_argument_travels_as_itself() {
    fn wire_types<K: Task>() -> (&'static str, &'static str) {
        (std::any::type_name::<K::Args>(), std::any::type_name::<K::Output>())
    }
    assert_eq!(wire_types::<hygienic::negate>(), ("i64", "i64"));
    assert_eq!(wire_types::<hygienic::add>(), ("(i64, i64)", "i64"));
    assert_eq!(wire_types::<hygienic::answer>(), ("()", "i64"));

    let app = App::local().unwrap();
    app.allocate(hygienic::negate, 1).unwrap();
    assert_eq!(hygienic::negate::call(&app, 4).unwrap().wait().unwrap(), -4);
    assert_eq!(app.call::<_, i64>(hygienic::negate::NAME, 5i64).unwrap().wait().unwrap(), -5);
    assert_eq!(app.call::<_, i64>(hygienic::negate::NAME, (6i64,)).unwrap().wait().unwrap(), -6);
    app.close().unwrap();
}

#[test]
fn the_functions_stay_callable() {
    assert_eq!(hygienic::add(2, 3), 5);
    assert_eq!(hygienic::answer(), 42);
    assert_eq!(hygienic::clash(1, 2, 3, 4, 5), 12_345);
    assert_eq!(hygienic::negate(1), -1);
}

#[test]
fn names_default_to_the_module_path() {
    assert!(<hygienic::add as Task>::NAME.ends_with("hygiene::hygienic::add"), "{}", <hygienic::add as Task>::NAME);
    assert_eq!(hygienic::add::NAME, <hygienic::add as Task>::NAME);
    assert_eq!(hygienic::whoami::NAME, "hygiene.whoami");
    assert_eq!(<hygienic::whoami as Task>::NAME, "hygiene.whoami");
}

#[test]
fn the_context_is_injected_where_the_function_wants_it() {
    let app = app();
    assert_eq!(hygienic::whoami::call(&app).unwrap().wait().unwrap(), "hygiene.whoami");
    let (scaled, name) = hygienic::scale::call(&app, 3, 7).unwrap().wait().unwrap();
    assert_eq!(scaled, 21);
    assert_eq!(name, hygienic::scale::NAME);
    app.close().unwrap();
}

#[test]
fn an_err_arrives_as_a_failure_carrying_the_error() {
    let app = app();
    assert_eq!(hygienic::checked_div::call(&app, 7, 2).unwrap().wait().unwrap(), 3);

    let err = hygienic::checked_div::call(&app, 7, 0).unwrap().wait().unwrap_err();
    assert_eq!(err.task_kind(), Some(TaskErrorKind::Failed));
    let task_error = err.task_error().unwrap();
    assert_eq!(task_error.message(), "cannot divide 7 by zero");
    let payload: DivError = task_error.payload().unwrap().unwrap();
    assert_eq!(payload, DivError::ByZero { dividend: 7 });
    app.close().unwrap();
}

#[test]
fn unit_tasks_run_and_send_returns_an_id() {
    let app = app();
    hygienic::record::call(&app, 1).unwrap().wait().unwrap();
    assert_eq!(hygienic::RECORDED.load(std::sync::atomic::Ordering::SeqCst), 1);

    hygienic::record::send(&app, 2).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while hygienic::RECORDED.load(std::sync::atomic::Ordering::SeqCst) != 2 {
        assert!(Instant::now() < deadline, "the sent task did not run");
        std::thread::sleep(Duration::from_millis(5));
    }
    app.close().unwrap();
}

#[test]
fn a_renamed_crate_path_generates_working_tasks() {
    let app = app();
    assert!(renamed::triple::NAME.ends_with("hygiene::renamed::triple"), "{}", renamed::triple::NAME);
    assert_eq!(renamed::triple::call(&app, 4).unwrap().wait().unwrap(), 12);
    assert_eq!(renamed::whoami::call(&app).unwrap().wait().unwrap(), "renamed.whoami");
    app.close().unwrap();
}

#[test]
fn async_tasks_expand_hygienically_and_run() {
    assert!(<hygienic::async_scale as Task>::handler().is_async());
    assert!(<hygienic::__dingo_send as Task>::handler().is_async());
    assert_eq!(hygienic::async_scale::NAME, "hygiene.async_scale");
    assert_eq!(<hygienic::async_scale as Task>::defaults(), CallOptions::new().retries(1));

    let app = App::local().unwrap();
    app.allocate(drive_async, 1).unwrap();
    let (scaled, name) = drive_async::call(&app, 6, 7).unwrap().wait().unwrap();
    assert_eq!((scaled, name.as_str()), (42, drive_async::NAME));
    assert!(hygienic::RAN.load(std::sync::atomic::Ordering::SeqCst));
    let failure = drive_async::call(&app, 6, 0).unwrap().wait().unwrap_err();
    assert_eq!(failure.task_error().unwrap().message(), "failed: cannot divide 6 by zero (ByZero { dividend: 6 })");
    app.close().unwrap();
}
