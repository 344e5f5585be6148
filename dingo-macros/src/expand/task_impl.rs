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

    // Mixed-site locals can neither shadow nor be shadowed by the user's names; the
    // arguments are taken out of the tuple by position for the same reason.
    let local = |name: &str| Ident::new(name, Span::mixed_site().located_at(span));
    let (ctx, args) = (local("__dingo_ctx"), local("__dingo_args"));
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
    let call = quote_spanned!(span=> #ident(#(#call_args),*));

    let body = match task.output {
        // Not `Ok(f())`: passing a unit value is a lint in the user's crate.
        Output::Unit => quote_spanned!(span=> #call; #private::Ok(())),
        Output::Value(_) => quote_spanned!(span=> #private::Ok(#call)),
        Output::Result { err, .. } => {
            let (value, error, message) = (local("__dingo_value"), local("__dingo_error"), local("__dingo_message"));
            quote_spanned! {span=>
                match #call {
                    #private::Ok(#value) => #private::Ok(#value),
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
                #body
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
