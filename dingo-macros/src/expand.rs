//! `#[dingo::task]` from tokens to tokens: parse the attribute and the function, check
//! them, then generate one item per generator in `expand/`.
//!
//! Generated code names only `::dingo::__private::…` (never `::std`, `::serde` or the
//! prelude), so it compiles under `#![no_implicit_prelude]` and in crates that depend on
//! neither serde nor inventory; with `crate = path`, `path::__private::…` instead.

mod function;
mod stub;
mod submit;
mod task_impl;

use proc_macro2::{Delimiter, Group, Span, TokenStream};
use quote::{ToTokens, quote, quote_spanned};
use syn::Attribute;
use syn::ext::IdentExt;

use crate::attr::{self, TaskAttrs};
use crate::errors::Errors;
use crate::item;
use crate::signature::{self, TaskFn};

/// The expansion of `#[dingo::task(attr)] item`.
pub(crate) fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let attrs = attr::parse(attr, &mut errors);
    let func = match item::parse(item.clone()) {
        Ok(func) => func,
        Err(error) => {
            errors.push(error);
            return unchanged(item, errors);
        }
    };
    let task = signature::analyze(&func, &mut errors);
    let function = function::function(item, &func);
    if !errors.is_empty() {
        return unchanged(function, errors);
    }

    let span = task.ident.span();
    let private = match &attrs.krate {
        Some(krate) => quote_spanned!(span=> #krate::__private),
        None => quote_spanned!(span=> ::dingo::__private),
    };
    let generated = Generated {
        task: &task,
        name: name_expr(&attrs, &task, &private),
        defaults: defaults_expr(&attrs, &private, span),
        cfgs: func.attrs.iter().filter(|attr| attr.path().is_ident("cfg")).collect(),
        private,
        span,
    };
    let stub = stub::stub(&generated);
    let task_impl = task_impl::task_impl(&generated);
    let submit = submit::submit(&generated);
    quote! {
        #function
        #stub
        #task_impl
        #submit
    }
}

/// The function (as written, or as `function` emits it) plus the errors: it still compiles
/// on its own, so one mistake does not turn every call of it into "cannot find function".
fn unchanged(item: TokenStream, errors: Errors) -> TokenStream {
    let errors = errors.finish().err().map(syn::Error::into_compile_error);
    quote!(#item #errors)
}

/// What every generator needs.
struct Generated<'a> {
    task: &'a TaskFn<'a>,
    /// The task's name, as a `&'static str` constant expression.
    name: TokenStream,
    /// The function's `#[cfg]`s: what exists only with the function is generated only with it.
    cfgs: Vec<&'a Attribute>,
    /// `::dingo::__private` (or `<crate>::__private` with `crate = …`), the only path
    /// generated code names.
    private: TokenStream,
    /// The function's name: generated items point there in diagnostics.
    span: Span,
    /// The call option defaults the attribute sets (`retries = …`), as a `CallOptions`
    /// expression; `None` when it sets none.
    defaults: Option<TokenStream>,
}

impl Generated<'_> {
    /// The `__private` module of the dingo crate, the only path generated code names.
    fn private(&self) -> TokenStream {
        self.private.clone()
    }

    /// The wire arguments' type: the argument's own for one (`T`, as a closure registered
    /// by name takes it), else a tuple, `()` or `(A, B,)`, whose parentheses are the
    /// function's, so an argument type that cannot travel is reported at the parameters.
    fn args_type(&self) -> TokenStream {
        if let Some(arg) = self.task.single_wire_arg() {
            return arg.ty.to_token_stream();
        }
        let types = self.task.wire_args().map(|arg| arg.ty);
        let mut tuple = Group::new(Delimiter::Parenthesis, quote_spanned!(self.span=> #(#types,)*));
        tuple.set_span(self.task.params_span);
        tuple.into_token_stream()
    }

    /// The value of the wire arguments from their names, as `args_type` lays them out: `x`
    /// for one, else `(a, b,)`.
    fn args_value(&self) -> TokenStream {
        if let Some(arg) = self.task.single_wire_arg() {
            return arg.ident.to_token_stream();
        }
        let idents = self.task.wire_args().map(|arg| arg.ident);
        quote_spanned!(self.span=> (#(#idents,)*))
    }
}

/// `name = "…"`, else the module-qualified function name.
fn defaults_expr(attrs: &TaskAttrs, private: &TokenStream, span: Span) -> Option<TokenStream> {
    if !attrs.sets_defaults() {
        return None;
    }
    let option = |value: Option<TokenStream>| match value {
        Some(value) => quote_spanned!(span=> #private::Some(#value)),
        None => quote_spanned!(span=> #private::None),
    };
    let retries = option(attrs.retries.map(|n| quote!(#n)));
    let backoff = option(attrs.retry_backoff.map(|ms| quote!(#ms)));
    let max = option(attrs.retry_backoff_max.map(|ms| quote!(#ms)));
    let jitter = option(attrs.retry_jitter.map(|on| quote!(#on)));
    let hard = option(attrs.time_limit.map(|ms| quote!(#ms)));
    let soft = option(attrs.soft_time_limit.map(|ms| quote!(#ms)));
    Some(quote_spanned!(span=> #private::task_defaults(#retries, #backoff, #max, #jitter, #soft, #hard)))
}

fn name_expr(attrs: &TaskAttrs, task: &TaskFn<'_>, private: &TokenStream) -> TokenStream {
    match &attrs.name {
        Some(name) => quote!(#name),
        None => {
            let span = task.ident.span();
            let ident = task.ident.unraw().to_string();
            // Qualified, so a user's own `concat!` or `module_path!` macro cannot interfere.
            quote_spanned!(span=> #private::concat!(#private::module_path!(), "::", #ident))
        }
    }
}

#[cfg(test)]
mod tests {
    use quote::quote;

    use super::*;

    #[test]
    fn every_generated_path_goes_through_the_crate_key() {
        let item = quote!(
            fn add(ctx: &Context, a: i64, b: i64) -> Result<i64, String> {
                Ok(a + b)
            }
        );
        let renamed = task(quote!(crate = renamed), item.clone()).to_string();
        assert!(renamed.contains("renamed :: __private"), "{renamed}");
        assert!(!renamed.contains("dingo ::"), "a path not through `crate`: {renamed}");

        let default = task(TokenStream::new(), item).to_string();
        assert!(default.contains(":: dingo :: __private"), "{default}");
        assert!(!default.contains("renamed"), "{default}");

        let async_item = quote!(
            async fn add(ctx: &Context, a: i64) -> Result<i64, String> {
                Ok(a)
            }
        );
        let renamed = task(quote!(crate = renamed), async_item).to_string();
        assert!(renamed.contains("renamed :: __private :: async_handler"), "{renamed}");
        assert!(!renamed.contains("dingo ::"), "a path not through `crate`: {renamed}");
    }

    #[test]
    fn an_async_fn_gets_a_handler_and_a_blocking_run() {
        let expanded = task(
            TokenStream::new(),
            quote!(
                async fn add(ctx: &Context, a: i64) -> i64 {
                    a
                }
            ),
        )
        .to_string();
        assert!(expanded.starts_with("async fn add (ctx : & Context < '_ > , a : i64) -> i64 { a }"), "{expanded}");
        assert!(expanded.contains("fn handler ()"), "{expanded}");
        assert!(expanded.contains(":: dingo :: __private :: async_handler :: < Self , _ , _ >"), "{expanded}");
        assert!(expanded.contains(":: dingo :: __private :: block_on (async move"), "{expanded}");
        assert!(expanded.contains("__dingo_send_add (__dingo_future) . await"), "{expanded}");

        let plain = quote!(
            fn add(ctx: &Context, a: i64) -> i64 {
                a
            }
        );
        let expanded = task(TokenStream::new(), plain.clone()).to_string();
        assert!(expanded.starts_with(&plain.to_string()), "emitted as written: {expanded}");
        assert!(!expanded.contains("fn handler") && !expanded.contains("block_on"), "{expanded}");
    }
}
