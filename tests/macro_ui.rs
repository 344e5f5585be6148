//! Every form `#[dingo::task]` rejects, and a mistyped stub call, with the compiler's
//! output pinned in `tests/ui/*.stderr` (regenerate with `TRYBUILD=overwrite`); and what
//! compiles and runs in a crate that depends on dingo alone (`tests/ui/pass/`).

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
    t.pass("tests/ui/pass/*.rs");
}
