//! The user's function, emitted as written (still callable and unit-testable), but for one
//! thing rustc requires of an `async fn`: a lifetime written on its context's type. Tasks
//! take `ctx: &dingo::Context`, and in an `async fn` that elision is an error (E0726), so
//! `&Context` becomes `&Context<'_>` there: what the elision means, the same type.

use proc_macro2::TokenStream;
use quote::quote;
use syn::FnArg;

use crate::item::TaskItem;
use crate::signature;

/// `item`, the function's tokens, or the function with its context's lifetime written.
pub(super) fn function(item: TokenStream, func: &TaskItem) -> TokenStream {
    if func.sig.asyncness.is_none() {
        return item;
    }
    let mut sig = func.sig.clone();
    let mut completed = false;
    for input in &mut sig.inputs {
        let FnArg::Typed(typed) = input else {
            continue;
        };
        if let Some(segment) = signature::elided_context(&mut typed.ty) {
            let span = segment.ident.span();
            segment.arguments = syn::PathArguments::AngleBracketed(syn::parse_quote_spanned!(span=> <'_>));
            completed = true;
        }
    }
    if !completed {
        return item;
    }
    let TaskItem { attrs, vis, body, .. } = func;
    quote!(#(#attrs)* #vis #sig #body)
}
