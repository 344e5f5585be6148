//! `impl Task for <stub>`: the wire types, how the worker runs the function, and the
//! signature fingerprint.

use proc_macro2::{Ident, Span, TokenStream};
use quote::quote_spanned;

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

    let run = outcome(generated, &locals, call(generated, &locals));

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

/// What the function's return `value` (its call) becomes: `Result<Output, TaskError>`, an
/// `Err(e)` a failure carrying `e`, with `ctx` the `&Context` in scope.
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
