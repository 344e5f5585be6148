//! The keys of `#[dingo::task(...)]`.
//!
//! A key is one row in [`KEYS`] and one parse function; everything else (unknown keys,
//! repeated keys, the list in the error message) follows from the table.

use proc_macro2::TokenStream;
use syn::meta::ParseNestedMeta;
use syn::parse::Parser;
use syn::{Expr, ExprLit, ExprPath, Lit, LitBool, LitStr, Path};

use crate::errors::Errors;

/// What the attribute asked for.
#[derive(Default)]
pub(crate) struct TaskAttrs {
    /// `name = "…"`; `None` means the module-qualified function name.
    pub(crate) name: Option<LitStr>,
    /// `crate = path`: where the dingo crate is, for programs that rename the dependency;
    /// `None` means `::dingo`.
    pub(crate) krate: Option<Path>,
    /// `retries = 5`: attempts after the first for a call that returns `Err`.
    pub(crate) retries: Option<u32>,
    /// `retry_backoff = "2s"`: the first wait between attempts, in milliseconds.
    pub(crate) retry_backoff: Option<u64>,
    /// `retry_backoff_max = "10m"`: the longest wait, in milliseconds.
    pub(crate) retry_backoff_max: Option<u64>,
    /// `retry_jitter = false`: full jitter on the waits (on by default).
    pub(crate) retry_jitter: Option<bool>,
    /// `time_limit = "30s"`: the hard time limit, in milliseconds.
    pub(crate) time_limit: Option<u64>,
    /// `soft_time_limit = "25s"`: the soft time limit, in milliseconds.
    pub(crate) soft_time_limit: Option<u64>,
}

impl TaskAttrs {
    /// Whether any key sets a call option default.
    pub(crate) fn sets_defaults(&self) -> bool {
        self.retries.is_some()
            || self.retry_backoff.is_some()
            || self.retry_backoff_max.is_some()
            || self.retry_jitter.is_some()
            || self.time_limit.is_some()
            || self.soft_time_limit.is_some()
    }
}

/// Parses one key's value into [`TaskAttrs`]. Problems with the value go to `Errors` (so the
/// other keys are still read); an `Err` is for input that cannot be read past.
type ParseKey = fn(&ParseNestedMeta<'_>, &mut TaskAttrs, &mut Errors) -> syn::Result<()>;

/// Every key the attribute accepts.
const KEYS: &[(&str, ParseKey)] = &[
    ("name", parse_name),
    ("crate", parse_crate),
    ("retries", parse_retries),
    ("retry_backoff", parse_retry_backoff),
    ("retry_backoff_max", parse_retry_backoff_max),
    ("retry_jitter", parse_retry_jitter),
    ("time_limit", parse_time_limit),
    ("soft_time_limit", parse_soft_time_limit),
];

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

/// `retries = 5`.
fn parse_retries(meta: &ParseNestedMeta<'_>, attrs: &mut TaskAttrs, errors: &mut Errors) -> syn::Result<()> {
    let value: Expr = meta.value()?.parse()?;
    match &value {
        Expr::Lit(ExprLit { lit: Lit::Int(n), .. }) => match n.base10_parse::<u32>() {
            Ok(n) => attrs.retries = Some(n),
            Err(_) => errors.at(n, "`retries` takes a whole number from 0 to 4294967295"),
        },
        other => errors.at(other, "`retries` takes a whole number, e.g. `retries = 5`"),
    }
    Ok(())
}

/// `retry_backoff = "2s"`.
fn parse_retry_backoff(meta: &ParseNestedMeta<'_>, attrs: &mut TaskAttrs, errors: &mut Errors) -> syn::Result<()> {
    attrs.retry_backoff = duration_value(meta, "retry_backoff", errors)?;
    Ok(())
}

/// `retry_backoff_max = "10m"`.
fn parse_retry_backoff_max(meta: &ParseNestedMeta<'_>, attrs: &mut TaskAttrs, errors: &mut Errors) -> syn::Result<()> {
    attrs.retry_backoff_max = duration_value(meta, "retry_backoff_max", errors)?;
    Ok(())
}

/// `time_limit = "30s"`.
fn parse_time_limit(meta: &ParseNestedMeta<'_>, attrs: &mut TaskAttrs, errors: &mut Errors) -> syn::Result<()> {
    attrs.time_limit = duration_value(meta, "time_limit", errors)?;
    Ok(())
}

/// `soft_time_limit = "25s"`.
fn parse_soft_time_limit(meta: &ParseNestedMeta<'_>, attrs: &mut TaskAttrs, errors: &mut Errors) -> syn::Result<()> {
    attrs.soft_time_limit = duration_value(meta, "soft_time_limit", errors)?;
    Ok(())
}

/// `retry_jitter = false`.
fn parse_retry_jitter(meta: &ParseNestedMeta<'_>, attrs: &mut TaskAttrs, errors: &mut Errors) -> syn::Result<()> {
    let value: Expr = meta.value()?.parse()?;
    match value {
        Expr::Lit(ExprLit { lit: Lit::Bool(LitBool { value, .. }), .. }) => attrs.retry_jitter = Some(value),
        other => errors.at(other, "`retry_jitter` takes `true` or `false`"),
    }
    Ok(())
}

/// A duration string (`"500ms"`, `"2s"`, `"1.5s"`, `"10m"`, `"1h"`) in milliseconds.
fn duration_value(meta: &ParseNestedMeta<'_>, key: &str, errors: &mut Errors) -> syn::Result<Option<u64>> {
    let value: Expr = meta.value()?.parse()?;
    let hint = format!("`{key}` takes a duration string such as \"500ms\", \"2s\", \"10m\" or \"1h\"");
    match &value {
        Expr::Lit(ExprLit { lit: Lit::Str(text), .. }) => match parse_millis(&text.value()) {
            Some(ms) => return Ok(Some(ms)),
            None => errors.at(text, hint),
        },
        other => errors.at(other, hint),
    }
    Ok(None)
}

/// `"1.5s"` → 1500. Units: ms, s, m, h; a number without a unit is not accepted.
pub(crate) fn parse_millis(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let scale = match unit.trim() {
        "ms" => 1.0,
        "s" => 1_000.0,
        "m" | "min" => 60_000.0,
        "h" => 3_600_000.0,
        _ => return None,
    };
    let number: f64 = number.parse().ok()?;
    let millis = (number * scale).round();
    (millis.is_finite() && millis >= 0.0 && millis < u64::MAX as f64).then_some(millis as u64)
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
    fn retry_keys() {
        let attrs =
            parse_ok(quote!(retries = 5, retry_backoff = "1.5s", retry_backoff_max = "10m", retry_jitter = false));
        assert_eq!(attrs.retries, Some(5));
        assert_eq!(attrs.retry_backoff, Some(1_500));
        assert_eq!(attrs.retry_backoff_max, Some(600_000));
        assert_eq!(attrs.retry_jitter, Some(false));
        assert!(attrs.sets_defaults() && !parse_ok(quote!(name = "a")).sets_defaults());
        assert_eq!(parse_millis("250ms"), Some(250));
        assert_eq!(parse_millis("2 s"), Some(2_000));
        assert_eq!(parse_millis("1h"), Some(3_600_000));
        assert_eq!(parse_millis("10"), None);
        assert_eq!(parse_millis("5 days"), None);
        assert_eq!(
            messages(quote!(retries = "5", retry_backoff = 2, retry_jitter = "no")),
            [
                "`retries` takes a whole number, e.g. `retries = 5`",
                "`retry_backoff` takes a duration string such as \"500ms\", \"2s\", \"10m\" or \"1h\"",
                "`retry_jitter` takes `true` or `false`",
            ]
        );
    }

    #[test]
    fn reports_every_bad_key_in_one_pass() {
        let found = messages(quote!(nmae = "a", name = "b", name = 3, retry(5), name = ""));
        assert_eq!(
            found,
            [
                "unknown key `nmae`; `#[dingo::task]` accepts `name`, `crate`, `retries`, `retry_backoff`, \
                 `retry_backoff_max`, `retry_jitter`, `time_limit`, `soft_time_limit`",
                "duplicate key `name`: it may appear once",
                "`name` takes a string literal, e.g. `name = \"billing.charge\"`",
                "unknown key `retry`; `#[dingo::task]` accepts `name`, `crate`, `retries`, `retry_backoff`, \
                 `retry_backoff_max`, `retry_jitter`, `time_limit`, `soft_time_limit`",
                "duplicate key `name`: it may appear once",
                "the task name must not be empty",
            ]
        );
    }
}
