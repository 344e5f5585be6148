//! Every form `#[dingo::task]` rejects, and a mistyped stub call, with the compiler's
//! output pinned in `tests/ui/*.stderr` (regenerate with `TRYBUILD=overwrite`); and what
//! compiles and runs in a crate that depends on dingo alone (`tests/ui/pass/`). Also that a
//! builder call whose result is dropped warns (`tests/ui/must_use_*`).

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
    #[cfg(all(feature = "redis", feature = "amqp"))]
    t.compile_fail("tests/ui/must_use_brokers/*.rs");
    t.pass("tests/ui/pass/*.rs");
}
