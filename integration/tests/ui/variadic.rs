#[dingo::task]
fn sum(first: i64, _: ...) -> i64 {
    first
}

fn main() {}
