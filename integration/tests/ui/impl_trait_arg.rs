#[dingo::task]
fn describe(value: impl std::fmt::Display) -> String {
    value.to_string()
}

fn main() {
    assert_eq!(describe(1), "1");
}
