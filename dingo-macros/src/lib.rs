//! The `#[dingo::task]` attribute macro; use it through the `dingo` crate, whose
//! `dingo::__private` module is all the generated code refers to.
//!
//! The expansion runs in three steps: `attr` reads the attribute's keys, `item` and
//! `signature` read and check the function (its body stays tokens), and the generators in
//! `expand` write one item each.
#![deny(missing_docs)]

mod attr;
mod errors;
mod expand;
mod item;
mod signature;

use proc_macro::TokenStream;

/// Turns a function into a task: a function that workers run and callers invoke through a
/// typed stub.
///
/// ```
/// /// Adds two numbers (on a worker).
/// #[dingo::task]
/// pub fn add(a: i64, b: i64) -> i64 {
///     a + b
/// }
///
/// # fn main() -> Result<(), dingo::Error> {
/// let app = dingo::App::local()?;
/// app.allocate(add, 1)?;
/// assert_eq!(add::call(&app, 2, 3)?.wait()?, 5); // the stub
/// assert_eq!(add(2, 3), 5); // the function, unchanged
/// # app.close()
/// # }
/// ```
///
/// # Attribute keys
///
/// | key | default | meaning |
/// | --- | --- | --- |
/// | `name = "…"` | `module_path!()::function` | the task's name on the wire (a non-empty string literal) |
/// | `crate = path` | `::dingo` | where generated code finds the `dingo` crate, for a program that renames the dependency (`crate = my_dingo`) or re-exports it |
/// | `retries = n` | `0` | a call that returns `Err` runs up to `n` more times (see `dingo::retry`) |
/// | `retry_backoff = "1s"` | `"1s"` | the first wait between attempts; it doubles each time |
/// | `retry_backoff_max = "10m"` | `"10m"` | the longest wait |
/// | `retry_jitter = bool` | `true` | full jitter: each wait is random between zero and the above |
/// | `time_limit = "30s"` | none | the hard time limit: the call fails with `TimeLimit`, its thread is written off and replaced (see `dingo::TimeLimits`) |
/// | `soft_time_limit = "25s"` | none | the soft time limit: `ctx.is_cancelled()` turns true |
///
/// Durations are strings of a number and a unit: `ms`, `s`, `m`, `h` (`"1.5s"`). The retry
/// and time-limit keys are defaults: a call's `CallOptions` and `App::set_default_options` win. Unknown and
/// repeated keys are errors.
///
/// ```
/// use std::sync::atomic::{AtomicU32, Ordering};
///
/// static RUNS: AtomicU32 = AtomicU32::new(0);
///
/// /// Fails twice, then charges.
/// #[dingo::task(retries = 3, retry_backoff = "5ms", retry_jitter = false)]
/// fn charge(cents: u64) -> Result<String, String> {
///     match RUNS.fetch_add(1, Ordering::SeqCst) {
///         0 | 1 => Err("gateway timeout".to_string()),
///         _ => Ok(format!("charged {cents}")),
///     }
/// }
///
/// # fn main() -> Result<(), dingo::Error> {
/// let app = dingo::App::local()?;
/// app.allocate(charge, 1)?;
/// assert_eq!(charge::call(&app, 250)?.wait()?, "charged 250");
/// assert_eq!(RUNS.load(Ordering::SeqCst), 3);
/// # app.close()
/// # }
/// ```
///
/// ```
/// // A program that names dingo otherwise (`my_dingo = { package = "dingo", … }` in its
/// // Cargo.toml, or a re-export) says where it is.
/// use dingo as my_dingo;
///
/// #[my_dingo::task(crate = my_dingo, name = "ping")]
/// fn ping() -> String {
///     "pong".to_string()
/// }
///
/// assert_eq!(ping::NAME, "ping");
/// ```
///
/// # Generated items
///
/// The function is emitted unchanged (but for an `async fn`'s context lifetime, see below):
/// still callable and unit-testable. Next to it, with the function's visibility, comes a
/// struct of the same name (a braced struct, so it lives only in the type namespace and
/// `add(2, 3)` still calls the function) with:
///
/// | item | what |
/// | --- | --- |
/// | `add::NAME` | the task's name |
/// | `add::call(&app, a, b)` | calls the task: `Result<Handle<T>, Error>` |
/// | `add::call_with(&app, &options, a, b)` | the same with `CallOptions` |
/// | `add::call_async(&app, a, b)` | from async code, never blocking: a `CallFuture<T>` of the handle |
/// | `add::call_async_with(&app, &options, a, b)` | the same with `CallOptions` |
/// | `add::send(&app, a, b)` | fire-and-forget (`ignore_report`): `Result<TaskId, Error>` |
/// | `impl Task for add` | the wire types (`Args`, `Output`), how a worker runs it (`run`; for an `async fn` also `handler`), the signature fingerprint |
///
/// and an `inventory` submission of its `TaskDecl`, so every `App` in the program knows the
/// task. The stubs take the arguments in the function's order and types, so a wrong
/// argument is an ordinary type error at the call.
///
/// # `async fn` tasks
///
/// An `async fn` is a task too, with the same keys, signatures and stubs: callers cannot
/// tell. Workers drive its future, several calls at once per thread while they wait
/// (`App::allocate` lets a pool run up to 100 calls at once, `App::allocate_concurrent`
/// sets the number), and the future owns its context, so `ctx` stays usable across
/// `.await`s.
///
/// ```
/// use dingo::Context;
///
/// /// Looks a price up (the `.await` lets the worker drive other calls meanwhile).
/// #[dingo::task(name = "shop.price", time_limit = "5s")]
/// async fn price(ctx: &Context, sku: String) -> Result<u64, String> {
///     ctx.progress("looking up");
///     let cents = lookup(&sku).await?;
///     ctx.progress("found");
///     Ok(cents)
/// }
///
/// async fn lookup(sku: &str) -> Result<u64, String> {
///     match sku {
///         "tea" => Ok(350),
///         _ => Err(format!("no price for {sku}")),
///     }
/// }
///
/// # fn main() -> Result<(), dingo::Error> {
/// let app = dingo::App::local()?;
/// app.allocate(price, 1)?; // one thread, many calls of `price` at once
/// let calls = [price::call(&app, "tea".to_string())?, price::call(&app, "tea".to_string())?];
/// for call in calls {
///     assert_eq!(call.wait()?, 350);
/// }
/// let err = price::call(&app, "mate".to_string())?.wait().unwrap_err();
/// assert_eq!(err.task_error().unwrap().message(), "no price for mate");
/// # app.close()
/// # }
/// ```
///
/// - The future must be `Send` (a worker may move it between threads); one that holds,
///   say, an `Rc` across an `.await` is a compile error at the function, naming the value.
/// - The context is written `&Context` as in a plain `fn`: in an `async fn` rustc wants its
///   lifetime spelled out, so the macro emits `&Context<'_>`, the same type. That is the
///   only change to the function, which stays callable (`price(ctx, sku).await`).
/// - `Task::run` (a call outside any worker) drives the future to the end on the calling
///   thread.
/// - A hard time limit or a cancel drops the future at its next `.await`; a panic while it
///   is polled is the call's failure, as for a plain `fn`.
///
/// # Linking
///
/// The submission takes effect when the function is linked into the program, and Rust links
/// a dependency only if the code refers to it: the tasks of a crate the binary never names
/// are not registered (`allocate`, `allocate_all` and calls by name then fail, saying so).
/// A worker binary whose tasks live in a crate of their own names it once, with
/// `use my_tasks as _;`.
///
/// # Signatures
///
/// - Arguments are bound by name (`x: T` or `mut x: T`) and owned: they are sent to the
///   worker, so they must be `Serialize + DeserializeOwned + Send + 'static`. Without a
///   serde dependency of its own, a program derives them through `dingo::serde` and adds
///   `#[serde(crate = "dingo::serde")]` to each type (see the crate docs' "Defining tasks").
/// - One argument travels as itself (the task's `Args` is its type `T`, not `(T,)`), as it
///   does for a closure registered by name: a call by name sends the value, or `(value,)`.
/// - One parameter may be the context, `&Context` (any path ending in `Context`, e.g.
///   `&dingo::Context<'_>`), anywhere in the list: the worker passes it in and the caller
///   does not send it.
/// - The return is nothing, `()`, any such type (a tuple too), or `Result<T, E>` (any path
///   ending in `Result` with two type arguments; `io::Result<T>` counts as a plain value).
///   An `Err(e)` becomes a `Failed` task error whose message is `e`'s `Display` (else its
///   `Debug`, else its type name) and whose payload decodes into `E` (which must be
///   `Serialize`).
///
/// ```
/// use dingo::Context;
///
/// #[dingo::task(name = "text.count_words")]
/// fn count_words(ctx: &Context<'_>, text: String) -> Result<usize, String> {
///     ctx.progress("counting");
///     if text.is_empty() { Err("no text".to_string()) } else { Ok(text.split_whitespace().count()) }
/// }
///
/// assert_eq!(count_words::NAME, "text.count_words");
/// ```
///
/// Rejected, each with an error at the offending tokens (all of them in one pass, and the
/// function is still emitted so its callers see no follow-on errors): generic parameters
/// (types, lifetimes, consts), `impl Trait` arguments and returns (`impl Future`: write an
/// `async fn`), `where` clauses, `self`, `const fn`, `unsafe fn`, `extern` ABIs, variadics,
/// patterns other than a name, borrowed argument or return types, `&mut Context`, a second
/// context, unknown or repeated keys, a `name` that is not a non-empty string literal, a
/// `crate` that is not a path. A syntax error in the function's body is rustc's own, at its place: the body is
/// emitted as written, never parsed by the macro.
#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::task(attr.into(), item.into()).into()
}
