// Deriving through `dingo::serde` without `#[serde(crate = "dingo::serde")]` looks for a
// crate named `serde`, which a program that depends only on dingo does not have (nor does
// this test: serde is not among the `dingo` package's dependencies, so this also guards that
// `pass/derive_through_dingo_serde.rs` proves what it claims).
#[derive(dingo::serde::Serialize)]
struct Order {
    id: u64,
}

fn main() {}
