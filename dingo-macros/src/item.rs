//! The annotated item, read only as far as the macro needs it: attributes, visibility and
//! signature. The body stays tokens (as in tokio-macros): it is emitted as written, so a
//! syntax error in it is reported by rustc at its place, not as "not a function".

use proc_macro2::{Group, Span, TokenStream};
use syn::parse::{Parse, ParseStream};
use syn::{Abi, Attribute, Signature, Token, Visibility};

/// A free function with its body left unparsed.
pub(crate) struct TaskItem {
    pub(crate) attrs: Vec<Attribute>,
    pub(crate) vis: Visibility,
    pub(crate) sig: Signature,
    /// The body, braces included, as written.
    pub(crate) body: Group,
}

impl Parse for TaskItem {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let attrs = input.call(Attribute::parse_outer)?;
        let vis: Visibility = input.parse()?;
        if !starts_fn(input) {
            return Err(not_a_fn());
        }
        // An error in the signature is syn's own, at its place.
        let sig: Signature = input.parse()?;
        if !input.peek(syn::token::Brace) {
            return Err(not_a_fn());
        }
        // Taken as tokens, unread.
        let body: Group = input.parse()?;
        if !input.is_empty() {
            return Err(not_a_fn());
        }
        Ok(TaskItem { attrs, vis, sig, body })
    }
}

/// Whether the next tokens begin a function: `fn`, after any of `const`, `async`, `unsafe`
/// and `extern "ABI"` (`signature` rejects all but `async`), as syn itself looks.
fn starts_fn(input: ParseStream<'_>) -> bool {
    let ahead = input.fork();
    ahead.parse::<Option<Token![const]>>().is_ok()
        && ahead.parse::<Option<Token![async]>>().is_ok()
        && ahead.parse::<Option<Token![unsafe]>>().is_ok()
        && ahead.parse::<Option<Abi>>().is_ok()
        && ahead.peek(Token![fn])
}

fn not_a_fn() -> syn::Error {
    syn::Error::new(Span::call_site(), "`#[dingo::task]` goes on a free function (`fn`)")
}

/// Reads `item` as a task function.
pub(crate) fn parse(item: TokenStream) -> syn::Result<TaskItem> {
    syn::parse2(item)
}
