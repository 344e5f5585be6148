//! Problems found while reading the attribute and the function, reported together so that
//! fixing one mistake does not merely reveal the next (serde_derive's `Ctxt`).

use std::fmt::Display;

use quote::ToTokens;

/// Collects every error of one expansion.
#[derive(Default)]
pub(crate) struct Errors {
    all: Option<syn::Error>,
}

impl Errors {
    pub(crate) fn push(&mut self, error: syn::Error) {
        match &mut self.all {
            Some(all) => all.combine(error),
            None => self.all = Some(error),
        }
    }

    /// An error at `tokens` (their first to last span).
    pub(crate) fn at(&mut self, tokens: impl ToTokens, message: impl Display) {
        self.push(syn::Error::new_spanned(tokens, message));
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.all.is_none()
    }

    pub(crate) fn finish(self) -> syn::Result<()> {
        match self.all {
            Some(all) => Err(all),
            None => Ok(()),
        }
    }
}
