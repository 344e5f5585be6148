//! `impl Task for <stub>`: the wire types, how the worker runs the function, and the
//! signature fingerprint.
//!
//! A plain `fn` is run by `run`. An `async fn` gets two ways in: `handler`, whose future the
//! worker drives (it owns the context), and `run`, which drives the same code to completion
//! on the calling thread. Both share what the function's return becomes, so an `Err` fails
//! the same way whichever way the task ran.

use proc_macro2::{Ident, Span, TokenStream};
use quote::{format_ident, quote_spanned};
use syn::Token;

use super::Generated;
use crate::signature::{Output, Param};

pub(super) fn task_impl(generated: &Generated<'_>) -> TokenStream {
    let span = generated.span;
    let task = generated.task;
    let (ident, name, cfgs) = (task.ident, &generated.name, &generated.cfgs);
    let private = generated.private();
    let args_type = generated.args_type();
    let output = task.output_type();
    let locals = Locals::new(span);
    let (ctx, args) = (&locals.ctx, &locals.args);

    let (run, handler) = match task.asyncness {
        None => (outcome(generated, &locals, call(generated, &locals)), None),
        Some(asyncness) => {
            let (run, handler) = async_bodies(generated, &locals, asyncness);
            (run, Some(handler))
        }
    };

    let defaults = generated.defaults.as_ref().map(|defaults| {
        quote_spanned! {span=>
            fn defaults() -> #private::CallOptions {
                #defaults
            }
        }
    });

    quote_spanned! {span=>
        #(#cfgs)*
        // Calling a `#[deprecated]` task function is the macro's doing, not the user's.
        #[allow(deprecated)]
        impl #private::Task for #ident {
            const NAME: &'static str = #name;
            type Args = #args_type;
            type Output = #output;

            fn run(#ctx: &#private::Context<'_>, #args: Self::Args)
                -> #private::Result<Self::Output, #private::TaskError>
            {
                #run
            }

            #handler

            fn fingerprint() -> u64 {
                static FINGERPRINT: #private::OnceLock<u64> = #private::OnceLock::new();
                #private::cached_fingerprint::<Self>(&FINGERPRINT)
            }

            fn fn_type_id() -> #private::__TypeId {
                #private::type_id_of(&#ident)
            }

            #defaults
        }
    }
}

/// The generated code's own locals. Mixed-site, they can neither shadow nor be shadowed by
/// the user's names; the arguments are taken out of the tuple by position for the same reason.
struct Locals {
    span: Span,
    ctx: Ident,
    args: Ident,
}

impl Locals {
    fn new(span: Span) -> Locals {
        Locals { span, ctx: Locals::local("__dingo_ctx", span), args: Locals::local("__dingo_args", span) }
    }

    fn local(name: &str, span: Span) -> Ident {
        Ident::new(name, Span::mixed_site().located_at(span))
    }
}

/// The call of the user's function with the context and the arguments where it wants them.
fn call(generated: &Generated<'_>, locals: &Locals) -> TokenStream {
    let span = generated.span;
    let task = generated.task;
    let (ident, ctx, args) = (task.ident, &locals.ctx, &locals.args);
    let single = task.single_wire_arg().is_some();
    let mut wire_index = 0;
    let call_args = task.params.iter().map(|param| match param {
        Param::Context => quote_spanned!(span=> #ctx),
        // One argument travels as itself (see `Generated::args_type`).
        Param::Wire(_) if single => quote_spanned!(span=> #args),
        Param::Wire(_) => {
            let index = syn::Index { index: wire_index, span };
            wire_index += 1;
            quote_spanned!(span=> #args.#index)
        }
    });
    quote_spanned!(span=> #ident(#(#call_args),*))
}

/// What the function's return `value` becomes: `Result<Output, TaskError>`, an `Err(e)` a
/// failure carrying `e`. Plain and `async fn` tasks alike (`value` is the call, or the call
/// `.await`ed), with `ctx` the `&Context` in scope.
fn outcome(generated: &Generated<'_>, locals: &Locals, value: TokenStream) -> TokenStream {
    let span = generated.span;
    let private = generated.private();
    let ctx = &locals.ctx;
    match generated.task.output {
        // Not `Ok(f())`: passing a unit value is a lint in the user's crate.
        Output::Unit => quote_spanned!(span=> #value; #private::Ok(())),
        Output::Value(_) => quote_spanned!(span=> #private::Ok(#value)),
        Output::Result { err, .. } => {
            let local = |name| Locals::local(name, locals.span);
            let (ok, error, message) = (local("__dingo_value"), local("__dingo_error"), local("__dingo_message"));
            quote_spanned! {span=>
                match #value {
                    #private::Ok(#ok) => #private::Ok(#ok),
                    #private::Err(#error) => {
                        // The error's `Display`, else its `Debug`, else its type name: only
                        // one of the three traits is used.
                        #[allow(unused_imports)]
                        use #private::{ViaDebug as _, ViaDisplay as _, ViaTypeName as _};
                        let #message = (&&&#private::Message(&#error)).dingo_message();
                        // Naming `E` puts "`E` is not `Serialize`" at the user's `E`.
                        #private::Err(#private::failed::<#err>(#ctx, &#error, #message))
                    }
                }
            }
        }
    }
}

/// The bodies of `run` and `handler` for an `async fn`: the same future, driven on the
/// calling thread by `run` and by the worker through `handler`.
fn async_bodies(generated: &Generated<'_>, locals: &Locals, asyncness: &Token![async]) -> (TokenStream, TokenStream) {
    let span = generated.span;
    let private = generated.private();
    let (ctx, args) = (&locals.ctx, &locals.args);
    let at_async = asyncness.span;

    // The worker may move the future between threads, so it must be `Send`. Checked on the
    // function's own future, at its `async`: rustc then names the value held across an
    // `.await` in the user's body. The opaque return is `Send` by its bound, so the worker's
    // own bound does not fail a second time.
    let send = format_ident!("__dingo_send_{}", task_ident(generated), span = at_async);
    let send_fn = quote_spanned! {at_async=>
        // Named after the task, so it cannot shadow the function it checks (`__dingo_send_x`
        // is not snake case when `x` begins with an underscore).
        #[allow(non_snake_case)]
        fn #send<F: #private::Future + #private::Send>(future: F)
            -> impl #private::Future<Output = F::Output> + #private::Send
        {
            future
        }
    };
    let call = call(generated, locals);
    // At the `async` itself (not mixed-site): rustc reports the bound at the argument and
    // again where the opaque type is used, and one span makes the two one error.
    let future = Ident::new("__dingo_future", at_async);
    let sent = quote_spanned!(at_async=> #send(#future).await);
    let handler_outcome = outcome(generated, locals, sent);
    let run_outcome = outcome(generated, locals, quote_spanned!(at_async=> #call.await));

    let run = quote_spanned! {span=>
        #private::block_on(async move { #run_outcome })
    };
    let handler = quote_spanned! {span=>
        fn handler() -> #private::Handler {
            #send_fn
            #private::async_handler::<Self, _, _>(
                |#ctx: #private::Arc<#private::Context<'static>>, #args: Self::Args| async move {
                    // The future owns the context; the function borrows it, as `run` lends it.
                    let #ctx: &#private::Context<'_> = &#ctx;
                    let #future = #call;
                    #handler_outcome
                },
            )
        }
    };
    (run, handler)
}

fn task_ident(generated: &Generated<'_>) -> String {
    use syn::ext::IdentExt;
    generated.task.ident.unraw().to_string()
}
