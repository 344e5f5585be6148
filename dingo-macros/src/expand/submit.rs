//! The link-time registration, so every `App` in the program knows the task.

use proc_macro2::TokenStream;
use quote::quote_spanned;

use super::Generated;

pub(super) fn submit(generated: &Generated<'_>) -> TokenStream {
    let span = generated.span;
    let (ident, cfgs) = (generated.task.ident, &generated.cfgs);
    let private = generated.private();
    quote_spanned! {span=>
        #(#cfgs)*
        #private::inventory::submit! { #private::TaskDecl::of::<#ident>() }
    }
}
