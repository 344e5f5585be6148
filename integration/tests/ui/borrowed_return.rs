#[dingo::task]
fn greeting(loud: bool) -> &'static str {
    if loud { "HELLO" } else { "hello" }
}

fn main() {
    assert_eq!(greeting(false), "hello");
}
