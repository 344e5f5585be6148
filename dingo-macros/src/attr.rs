//! The keys of `#[dingo::task(...)]`.
//!
//! A key is one row in [`KEYS`] and one parse function; everything else (unknown keys,
//! repeated keys, the list in the error message) follows from the table.

use proc_macro2::TokenStream;
use syn::meta::ParseNestedMeta;
use syn::parse::Parser;
use syn::{Expr, ExprLit, ExprPath, Lit, LitStr, Path};

use crate::errors::Errors;

/// What the attribute asked for.
#[derive(Default)]
pub(crate) struct TaskAttrs {
    /// `name = "…"`; `None` means the module-qualified function name.
    pub(crate) name: Option<LitStr>,
    /// `crate = path`: where the dingo crate is, for programs that rename the dependency;
    /// `None` means `::dingo`.
    pub(crate) krate: Option<Path>,
}

/// Parses one key's value into [`TaskAttrs`]. Problems with the value go to `Errors` (so the
/// other keys are still read); an `Err` is for input that cannot be read past.
type ParseKey = fn(&ParseNestedMeta<'_>, &mut TaskAttrs, &mut Errors) -> syn::Result<()>;

/// Every key the attribute accepts.
const KEYS: &[(&str, ParseKey)] = &[("name", parse_name), ("crate", parse_crate)];

/// Reads the attribute's tokens (`name = "…", …`).
pub(crate) fn parse(tokens: TokenStream, errors: &mut Errors) -> TaskAttrs {
    let mut attrs = TaskAttrs::default();
    let mut seen: Vec<&str> = Vec::new();
    let parser = syn::meta::parser(|meta| {
        let key = KEYS.iter().find(|(key, _)| meta.path.is_ident(key));
        match key {
            Some((key, parse_key)) if seen.contains(key) => {
                errors.at(&meta.path, format_args!("duplicate key `{key}`: it may appear once"));
                // Still read the value, so a mistake in it is reported too.
                parse_key(&meta, &mut TaskAttrs::default(), errors)
            }
            Some((key, parse_key)) => {
                seen.push(*key);
                parse_key(&meta, &mut attrs, errors)
            }
            None => {
                let known: Vec<String> = KEYS.iter().map(|(key, _)| format!("`{key}`")).collect();
                let path = meta.path.segments.iter().map(|s| s.ident.to_string()).collect::<Vec<_>>().join("::");
                errors.at(
                    &meta.path,
                    format_args!("unknown key `{path}`; `#[dingo::task]` accepts {}", known.join(", ")),
                );
                skip_value(&meta)
            }
        }
    });
    if let Err(error) = parser.parse2(tokens) {
        errors.push(error);
    }
    attrs
}

/// `name = "billing.charge"`.
fn parse_name(meta: &ParseNestedMeta<'_>, attrs: &mut TaskAttrs, errors: &mut Errors) -> syn::Result<()> {
    let value: Expr = meta.value()?.parse()?;
    match value {
        Expr::Lit(ExprLit { lit: Lit::Str(name), .. }) if name.suffix().is_empty() => {
            if name.value().is_empty() {
                errors.at(&name, "the task name must not be empty");
            } else {
                attrs.name = Some(name);
            }
        }
        other => errors.at(other, "`name` takes a string literal, e.g. `name = \"billing.charge\"`"),
    }
    Ok(())
}

/// `crate = my_dingo`: the path generated code reaches dingo through.
fn parse_crate(meta: &ParseNestedMeta<'_>, attrs: &mut TaskAttrs, errors: &mut Errors) -> syn::Result<()> {
    let value: Expr = meta.value()?.parse()?;
    match value {
        Expr::Path(ExprPath { attrs: outer, qself: None, path }) if outer.is_empty() => attrs.krate = Some(path),
        other => errors.at(other, "`crate` takes a path, e.g. `crate = my_dingo` or `crate = ::dingo`"),
    }
    Ok(())
}

/// Moves past an unknown key's value (`= expr`, `(…)` or nothing) to reach the next key.
fn skip_value(meta: &ParseNestedMeta<'_>) -> syn::Result<()> {
    if meta.input.peek(syn::Token![=]) {
        meta.value()?.parse::<Expr>()?;
    } else if meta.input.peek(syn::token::Paren) {
        let content;
        syn::parenthesized!(content in meta.input);
        content.parse::<TokenStream>()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use quote::quote;

    use super::*;

    fn parse_ok(tokens: TokenStream) -> TaskAttrs {
        let mut errors = Errors::default();
        let attrs = parse(tokens, &mut errors);
        if let Err(e) = errors.finish() {
            panic!("unexpected error: {e}");
        }
        attrs
    }

    fn messages(tokens: TokenStream) -> Vec<String> {
        let mut errors = Errors::default();
        parse(tokens, &mut errors);
        match errors.finish() {
            Ok(()) => Vec::new(),
            Err(all) => all.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn empty_and_name() {
        assert!(parse_ok(quote!()).name.is_none());
        assert_eq!(parse_ok(quote!(name = "math.add")).name.map(|n| n.value()).as_deref(), Some("math.add"));
    }

    #[test]
    fn crate_path() {
        let path = |attrs: TaskAttrs| attrs.krate.map(|path| quote!(#path).to_string());
        assert!(parse_ok(quote!(name = "a")).krate.is_none());
        assert_eq!(path(parse_ok(quote!(crate = my_dingo))).as_deref(), Some("my_dingo"));
        assert_eq!(path(parse_ok(quote!(name = "a", crate = ::dingo))).as_deref(), Some(":: dingo"));
        assert_eq!(
            path(parse_ok(quote!(crate = crate::reexports::dingo))).as_deref(),
            Some("crate :: reexports :: dingo")
        );
        assert_eq!(
            messages(quote!(crate = "dingo", crate = ::dingo)),
            [
                "`crate` takes a path, e.g. `crate = my_dingo` or `crate = ::dingo`",
                "duplicate key `crate`: it may appear once",
            ]
        );
    }

    #[test]
    fn reports_every_bad_key_in_one_pass() {
        let found = messages(quote!(nmae = "a", name = "b", name = 3, retries(5), name = ""));
        assert_eq!(
            found,
            [
                "unknown key `nmae`; `#[dingo::task]` accepts `name`, `crate`",
                "duplicate key `name`: it may appear once",
                "`name` takes a string literal, e.g. `name = \"billing.charge\"`",
                "unknown key `retries`; `#[dingo::task]` accepts `name`, `crate`",
                "duplicate key `name`: it may appear once",
                "the task name must not be empty",
            ]
        );
    }
}
