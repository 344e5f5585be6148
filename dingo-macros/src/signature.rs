//! The annotated function as the generators need it: its wire arguments, where the context
//! goes, and what it returns.
//!
//! Everything a task cannot be is rejected here, at the offending tokens, so the generators
//! only ever see a valid task. Types are judged by their syntax alone (a macro cannot
//! resolve names): a shared reference to a path ending in `Context` is the context, a path
//! ending in `Result` with two type arguments is a fallible return.

use proc_macro2::{Span, TokenStream};
use quote::quote;
use syn::{
    FnArg, GenericArgument, Ident, Pat, PathArguments, ReturnType, Safety, Signature, Token, Type, TypeReference,
    Visibility,
};

use crate::errors::Errors;
use crate::item::TaskItem;

/// A function that can be a task.
pub(crate) struct TaskFn<'a> {
    pub(crate) vis: &'a Visibility,
    pub(crate) ident: &'a Ident,
    /// In declaration order: the generated `run` passes the context where the function wants it.
    pub(crate) params: Vec<Param<'a>>,
    /// The parentheses around the parameters: where "the arguments cannot travel" points.
    pub(crate) params_span: Span,
    pub(crate) output: Output<'a>,
    /// The `async` of an `async fn`: the worker drives its future, and a future that is not
    /// `Send` is reported there.
    pub(crate) asyncness: Option<&'a Token![async]>,
}

/// One parameter of the function.
pub(crate) enum Param<'a> {
    /// The `&Context` the worker passes in; not sent by the caller.
    Context,
    /// An argument the caller sends.
    Wire(Arg<'a>),
}

/// An argument the caller sends, named as in the function (without `mut`).
pub(crate) struct Arg<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) ty: &'a Type,
}

/// What the function returns.
pub(crate) enum Output<'a> {
    /// Nothing, or `()`.
    Unit,
    /// A value, sent to the caller as is.
    Value(&'a Type),
    /// `Result<T, E>`: `T` is sent on success, an `Err` becomes a failure carrying `E`.
    Result { ok: &'a Type, err: &'a Type },
}

impl<'a> TaskFn<'a> {
    /// The arguments the caller sends, in order.
    pub(crate) fn wire_args(&self) -> impl Iterator<Item = &Arg<'a>> {
        self.params.iter().filter_map(|param| match param {
            Param::Wire(arg) => Some(arg),
            Param::Context => None,
        })
    }

    /// The one argument the caller sends, if there is exactly one: it travels as itself,
    /// not as a one-element tuple.
    pub(crate) fn single_wire_arg(&self) -> Option<&Arg<'a>> {
        let mut args = self.wire_args();
        match (args.next(), args.next()) {
            (Some(arg), None) => Some(arg),
            _ => None,
        }
    }

    /// The type the caller receives on success.
    pub(crate) fn output_type(&self) -> TokenStream {
        match self.output {
            Output::Unit => quote!(()),
            Output::Value(ty) | Output::Result { ok: ty, .. } => quote!(#ty),
        }
    }
}

/// Reads `func` as a task; every reason it cannot be one goes to `errors`.
pub(crate) fn analyze<'a>(func: &'a TaskItem, errors: &mut Errors) -> TaskFn<'a> {
    let sig = &func.sig;
    check_qualifiers(sig, errors);
    check_generics(sig, errors);
    TaskFn {
        vis: &func.vis,
        ident: &sig.ident,
        params: params(sig, errors),
        params_span: sig.paren_token.span.join(),
        output: output(&sig.output, errors),
        asyncness: sig.asyncness.as_ref(),
    }
}

fn check_qualifiers(sig: &Signature, errors: &mut Errors) {
    if let Some(constness) = &sig.constness {
        errors.at(constness, "`const fn` cannot be a task; remove `const`");
    }
    if let Safety::Unsafe(safety) = &sig.safety {
        errors.at(safety, "`unsafe fn` cannot be a task: it is called with whatever arguments arrive; remove `unsafe`");
    }
    if let Some(abi) = &sig.abi {
        errors.at(abi, "a task cannot have an `extern` ABI: it is called from Rust; remove the ABI");
    }
    if let Some(variadic) = &sig.variadic {
        errors.at(variadic.dots, "a task cannot be variadic; take a `Vec` instead");
    }
}

fn check_generics(sig: &Signature, errors: &mut Errors) {
    if !sig.generics.params.is_empty() {
        errors.at(&sig.generics, "a task cannot be generic: the worker needs concrete argument and return types");
    }
    if let Some(where_clause) = &sig.generics.where_clause {
        errors.at(where_clause, "a task cannot have a `where` clause: the worker needs concrete types");
    }
}

fn params<'a>(sig: &'a Signature, errors: &mut Errors) -> Vec<Param<'a>> {
    let mut params = Vec::new();
    let mut has_context = false;
    for input in &sig.inputs {
        let typed = match input {
            FnArg::Typed(typed) => typed,
            FnArg::Receiver(receiver) => {
                errors
                    .at(receiver, "a task cannot take `self`: it must be a free function (move it out of the `impl`)");
                continue;
            }
        };
        if let Some(reference) = context_ref(&typed.ty) {
            // The context is passed positionally and never named, so its pattern is free.
            if let Some(mutability) = &reference.mutability {
                let and = &reference.and_token;
                errors.at(quote!(#and #mutability), "the context is shared: take `&Context`, not `&mut Context`");
            } else if has_context {
                errors.at(&typed.ty, "a task takes at most one `&Context` parameter");
            } else {
                has_context = true;
                params.push(Param::Context);
            }
            continue;
        }
        check_travels(&typed.ty, Position::Argument, errors);
        if let Some(ident) = arg_ident(&typed.pat, errors) {
            params.push(Param::Wire(Arg { ident, ty: &typed.ty }));
        }
    }
    params
}

/// The name of an argument bound as `x` or `mut x`; the stubs take the arguments by name.
fn arg_ident<'a>(pat: &'a Pat, errors: &mut Errors) -> Option<&'a Ident> {
    const EXPECTED: &str = "a task argument must be a plain name (`x: T` or `mut x: T`): the stubs take it by name";
    match pat {
        Pat::Ident(binding) => {
            if let Some(by_ref) = &binding.by_ref {
                errors.at(by_ref, "`ref` cannot bind a task argument: it arrives by value; write `x: T`");
            }
            if let Some((at, subpat)) = &binding.subpat {
                errors.at(quote!(#at #subpat), EXPECTED);
            }
            (binding.by_ref.is_none() && binding.subpat.is_none()).then_some(&binding.ident)
        }
        other => {
            errors.at(other, EXPECTED);
            None
        }
    }
}

fn output<'a>(output: &'a ReturnType, errors: &mut Errors) -> Output<'a> {
    let ReturnType::Type(_, ty) = output else {
        return Output::Unit;
    };
    match peel(ty) {
        Type::Tuple(tuple) if tuple.elems.is_empty() => Output::Unit,
        Type::Never(never) => {
            errors.at(never, "a task cannot return `!`: the caller waits for a value; return `()`");
            Output::Unit
        }
        _ => match result_types(ty) {
            // Only `T` travels back as the result; `E` is only serialized into the failure.
            Some((ok, err)) => {
                check_travels(ok, Position::Return, errors);
                Output::Result { ok, err }
            }
            None => {
                check_travels(ty, Position::Return, errors);
                Output::Value(ty)
            }
        },
    }
}

/// The `&Context` parameter: a shared or `mut` reference to a path ending in `Context`.
fn context_ref(ty: &Type) -> Option<&TypeReference> {
    match peel(ty) {
        Type::Reference(reference) if last_segment(&reference.elem).is_some_and(|s| s.ident == "Context") => {
            Some(reference)
        }
        _ => None,
    }
}

/// The `Context` of a `&Context` parameter written without its lifetime (`&Context`, not
/// `&Context<'_>`), to be completed.
pub(crate) fn elided_context(ty: &mut Type) -> Option<&mut syn::PathSegment> {
    let Type::Reference(reference) = peel_mut(ty) else {
        return None;
    };
    if reference.mutability.is_some() {
        return None;
    }
    match peel_mut(&mut reference.elem) {
        Type::Path(path) if path.qself.is_none() => {
            path.path.segments.last_mut().filter(|segment| segment.ident == "Context" && segment.arguments.is_none())
        }
        _ => None,
    }
}

/// The `T` and `E` of `Result<T, E>` (any path ending in `Result` with exactly two type
/// arguments; one-argument aliases such as `io::Result<T>` are plain values).
fn result_types(ty: &Type) -> Option<(&Type, &Type)> {
    let last = last_segment(ty).filter(|s| s.ident == "Result")?;
    let PathArguments::AngleBracketed(generics) = &last.arguments else {
        return None;
    };
    match generics.args.iter().collect::<Vec<_>>()[..] {
        [GenericArgument::Type(ok), GenericArgument::Type(err)] => Some((ok, err)),
        _ => None,
    }
}

fn last_segment(ty: &Type) -> Option<&syn::PathSegment> {
    match peel(ty) {
        Type::Path(path) if path.qself.is_none() => path.path.segments.last(),
        _ => None,
    }
}

/// The type inside parentheses and the invisible groups `macro_rules!` wraps `$t:ty` in.
fn peel(mut ty: &Type) -> &Type {
    loop {
        match ty {
            Type::Paren(inner) => ty = &inner.elem,
            Type::Group(inner) => ty = &inner.elem,
            _ => return ty,
        }
    }
}

/// [`peel`], for changing the type.
fn peel_mut(ty: &mut Type) -> &mut Type {
    match ty {
        Type::Paren(inner) => peel_mut(&mut inner.elem),
        Type::Group(inner) => peel_mut(&mut inner.elem),
        other => other,
    }
}

#[derive(Clone, Copy)]
enum Position {
    Argument,
    Return,
}

/// Rejects what cannot cross a process boundary or be named by the worker: borrows
/// (references, lifetimes other than `'static`) and `impl Trait`, anywhere inside `ty`.
fn check_travels(ty: &Type, position: Position, errors: &mut Errors) {
    match ty {
        Type::Reference(reference) => match position {
            Position::Argument => errors.at(reference, borrowed_argument(reference)),
            Position::Return => errors.at(reference, "borrowed return types cannot travel; return an owned type"),
        },
        Type::ImplTrait(impl_trait) => match position {
            Position::Argument => errors
                .at(impl_trait, "`impl Trait` arguments make a task generic: the worker needs concrete argument types"),
            Position::Return if is_future(impl_trait) => errors.at(
                impl_trait,
                "a task cannot return `impl Future`; make it an `async fn` returning the future's output",
            ),
            Position::Return => {
                errors.at(impl_trait, "a task cannot return `impl Trait`: the caller needs a concrete type to decode")
            }
        },
        Type::Path(path) => {
            if let Some(qself) = &path.qself {
                check_travels(&qself.ty, position, errors);
            }
            for segment in &path.path.segments {
                let PathArguments::AngleBracketed(generics) = &segment.arguments else {
                    continue;
                };
                for arg in &generics.args {
                    match arg {
                        GenericArgument::Type(ty) => check_travels(ty, position, errors),
                        GenericArgument::AssocType(assoc) => check_travels(&assoc.ty, position, errors),
                        GenericArgument::Lifetime(lifetime) if lifetime.ident != "static" => match position {
                            Position::Argument => {
                                errors.at(lifetime, "borrowed argument types cannot travel; take an owned type")
                            }
                            Position::Return => {
                                errors.at(lifetime, "borrowed return types cannot travel; return an owned type")
                            }
                        },
                        _ => {}
                    }
                }
            }
        }
        Type::Tuple(tuple) => tuple.elems.iter().for_each(|elem| check_travels(elem, position, errors)),
        Type::Array(array) => check_travels(&array.elem, position, errors),
        Type::Slice(slice) => check_travels(&slice.elem, position, errors),
        Type::Paren(paren) => check_travels(&paren.elem, position, errors),
        Type::Group(group) => check_travels(&group.elem, position, errors),
        _ => {}
    }
}

/// Whether `impl …` names a trait ending in `Future` (a hand-written `async fn`).
fn is_future(impl_trait: &syn::TypeImplTrait) -> bool {
    impl_trait.bounds.iter().any(|bound| match bound {
        syn::TypeParamBound::Trait(bound) => bound.path.segments.last().is_some_and(|s| s.ident == "Future"),
        _ => false,
    })
}

/// The message for a borrowed argument, with the owned type to use where it is obvious.
fn borrowed_argument(reference: &TypeReference) -> String {
    const MESSAGE: &str = "borrowed argument types cannot travel; take an owned type";
    match peel(&reference.elem) {
        Type::Path(path) if path.path.is_ident("str") => format!("{MESSAGE}: `String`"),
        Type::Slice(slice) => {
            let elem = &slice.elem;
            format!("{MESSAGE}: `Vec<{}>`", quote!(#elem))
        }
        _ => MESSAGE.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use syn::parse_quote;

    use super::*;

    /// The analysis of `func`, or the error messages.
    fn analyze_ok(func: &TaskItem) -> Result<TaskFn<'_>, Vec<String>> {
        let mut errors = Errors::default();
        let task = analyze(func, &mut errors);
        match errors.finish() {
            Ok(()) => Ok(task),
            Err(all) => Err(all.into_iter().map(|e| e.to_string()).collect()),
        }
    }

    fn output_of(ret: Type) -> String {
        // The body is never looked at: only the signature is analysed.
        let func: TaskItem = parse_quote!(fn f() -> #ret { f() });
        match analyze_ok(&func).map(|task| task.output) {
            Ok(Output::Unit) => "unit".to_owned(),
            Ok(Output::Value(ty)) => format!("value {}", quote!(#ty)),
            Ok(Output::Result { ok, err }) => format!("result {} / {}", quote!(#ok), quote!(#err)),
            Err(errors) => errors.join("; "),
        }
    }

    #[test]
    fn detects_result_returns() {
        assert_eq!(output_of(parse_quote!(Result<i64, String>)), "result i64 / String");
        assert_eq!(output_of(parse_quote!(std::result::Result<(), E>)), "result () / E");
        assert_eq!(output_of(parse_quote!(::core::result::Result<Vec<u8>, E>)), "result Vec < u8 > / E");
        assert_eq!(output_of(parse_quote!(io::Result<i64>)), "value io :: Result < i64 >");
        assert_eq!(output_of(parse_quote!(Result)), "value Result");
        assert_eq!(output_of(parse_quote!(Results<i64, E>)), "value Results < i64 , E >");
        assert_eq!(output_of(parse_quote!(<T as X>::Result<i64, E>)), "value < T as X > :: Result < i64 , E >");
    }

    #[test]
    fn detects_unit_and_values() {
        let func: TaskItem = parse_quote!(
            fn f() {}
        );
        assert!(matches!(analyze_ok(&func).map(|t| t.output), Ok(Output::Unit)));
        assert_eq!(output_of(parse_quote!(())), "unit");
        assert_eq!(output_of(parse_quote!((i64, String))), "value (i64 , String)");
        assert_eq!(output_of(parse_quote!(&'static str)), "borrowed return types cannot travel; return an owned type");
    }

    /// The parameters as `ctx` or `name: type`.
    fn params_of(func: TaskItem) -> Result<Vec<String>, Vec<String>> {
        analyze_ok(&func).map(|task| {
            task.params
                .iter()
                .map(|param| match param {
                    Param::Context => "ctx".to_owned(),
                    Param::Wire(Arg { ident, ty }) => format!("{ident}: {}", quote!(#ty)),
                })
                .collect()
        })
    }

    #[test]
    fn detects_the_context_anywhere() {
        assert_eq!(
            params_of(parse_quote!(
                fn f(ctx: &Context) {}
            )),
            Ok(vec!["ctx".to_owned()])
        );
        assert_eq!(
            params_of(parse_quote!(
                fn f(a: i64, _: &dingo::Context<'_>, mut b: String) {}
            )),
            Ok(vec!["a: i64".to_owned(), "ctx".to_owned(), "b: String".to_owned()])
        );
        assert_eq!(
            params_of(parse_quote!(
                fn f(c: &'static ::dingo::Context) {}
            )),
            Ok(vec!["ctx".to_owned()])
        );
        assert_eq!(
            params_of(parse_quote!(
                fn f(c: Context) {}
            )),
            Ok(vec!["c: Context".to_owned()])
        );
        assert_eq!(
            params_of(parse_quote!(
                fn f(c: &mut Context) {}
            )),
            Err(vec!["the context is shared: take `&Context`, not `&mut Context`".to_owned()])
        );
        assert_eq!(
            params_of(parse_quote!(
                fn f(c: &Context, d: &Context) {}
            )),
            Err(vec!["a task takes at most one `&Context` parameter".to_owned()])
        );
    }

    #[test]
    fn accepts_async_fns_like_plain_ones() {
        let func: TaskItem = parse_quote!(
            async fn f(ctx: &Context, a: i64) -> Result<i64, String> {
                Ok(a)
            }
        );
        let task = analyze_ok(&func).unwrap_or_else(|errors| panic!("{errors:?}"));
        assert!(task.asyncness.is_some());
        assert!(matches!(task.output, Output::Result { .. }));
        assert_eq!(task.params.len(), 2);
        let plain: TaskItem = parse_quote!(
            fn f() {}
        );
        assert!(analyze_ok(&plain).unwrap_or_else(|errors| panic!("{errors:?}")).asyncness.is_none());
    }

    #[test]
    fn an_impl_future_return_is_told_to_be_an_async_fn() {
        assert_eq!(
            output_of(parse_quote!(impl std::future::Future<Output = i64> + Send)),
            "a task cannot return `impl Future`; make it an `async fn` returning the future's output"
        );
        assert_eq!(
            output_of(parse_quote!(impl Iterator<Item = i64>)),
            "a task cannot return `impl Trait`: the caller needs a concrete type to decode"
        );
    }

    #[test]
    fn finds_a_context_written_without_its_lifetime() {
        let completed = |mut ty: Type| elided_context(&mut ty).map(|segment| segment.ident.to_string());
        assert_eq!(completed(parse_quote!(&Context)).as_deref(), Some("Context"));
        assert_eq!(completed(parse_quote!(&dingo::Context)).as_deref(), Some("Context"));
        assert_eq!(completed(parse_quote!(&'static ::dingo::Context)).as_deref(), Some("Context"));
        assert_eq!(completed(parse_quote!(&Context<'_>)), None);
        assert_eq!(completed(parse_quote!(&mut Context)), None);
        assert_eq!(completed(parse_quote!(Context)), None);
        assert_eq!(completed(parse_quote!(&Contexts)), None);
    }

    #[test]
    fn rejects_borrows_anywhere_in_arguments() {
        assert_eq!(
            params_of(parse_quote!(
                fn f(a: &str, b: Vec<&[u8]>, c: Cow<'a, str>, d: Cow<'static, str>) {}
            )),
            Err(vec![
                "borrowed argument types cannot travel; take an owned type: `String`".to_owned(),
                "borrowed argument types cannot travel; take an owned type: `Vec<u8>`".to_owned(),
                "borrowed argument types cannot travel; take an owned type".to_owned(),
            ])
        );
    }
}
