//! `#[dingo::task]` from tokens to tokens: parse the attribute and the function, check
//! them, then generate one item per generator in `expand/`.
//!
//! Generated code names only `::dingo::__private::…` (never `::std`, `::serde` or the
//! prelude), so it compiles under `#![no_implicit_prelude]` and in crates that depend on
//! neither serde nor inventory.

mod stub;
mod submit;
mod task_impl;

use proc_macro2::{Delimiter, Group, Span, TokenStream};
use quote::{ToTokens, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::{Attribute, ItemFn};

use crate::attr::{self, TaskAttrs};
use crate::errors::Errors;
use crate::signature::{self, TaskFn};

/// The expansion of `#[dingo::task(attr)] item`.
pub(crate) fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let attrs = attr::parse(attr, &mut errors);
    let func = match syn::parse2::<ItemFn>(item.clone()) {
        Ok(func) => func,
        Err(_) => {
            errors.push(syn::Error::new(Span::call_site(), "`#[dingo::task]` goes on a free function (`fn`)"));
            return unchanged(item, errors);
        }
    };
    let task = signature::analyze(&func, &mut errors);
    if !errors.is_empty() {
        return unchanged(item, errors);
    }

    let generated = Generated {
        task: &task,
        name: name_expr(&attrs, &task),
        cfgs: func.attrs.iter().filter(|attr| attr.path().is_ident("cfg")).collect(),
        span: task.ident.span(),
    };
    let stub = stub::stub(&generated);
    let task_impl = task_impl::task_impl(&generated);
    let submit = submit::submit(&generated);
    quote! {
        #item
        #stub
        #task_impl
        #submit
    }
}

/// The item as written plus the errors: the function still compiles on its own, so one
/// mistake does not turn every call of it into "cannot find function".
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
    /// The function's name: generated items point there in diagnostics.
    span: Span,
}

impl Generated<'_> {
    /// `::dingo::__private`, the only path generated code names.
    fn private(&self) -> TokenStream {
        quote_spanned!(self.span=> ::dingo::__private)
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
fn name_expr(attrs: &TaskAttrs, task: &TaskFn<'_>) -> TokenStream {
    match &attrs.name {
        Some(name) => quote!(#name),
        None => {
            let span = task.ident.span();
            let ident = task.ident.unraw().to_string();
            // Qualified, so a user's own `concat!` or `module_path!` macro cannot interfere.
            quote_spanned!(span=> ::dingo::__private::concat!(::dingo::__private::module_path!(), "::", #ident))
        }
    }
}
