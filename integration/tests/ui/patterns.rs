#[dingo::task]
fn tuple((a, b): (i64, i64)) -> i64 {
    a + b
}

#[dingo::task]
fn wildcard(_: i64) -> i64 {
    0
}

#[dingo::task]
fn by_ref(ref text: String) -> usize {
    text.len()
}

#[dingo::task]
fn binding(pair @ (a, b): (i64, i64)) -> i64 {
    pair.0 + a + b
}

fn main() {
    assert_eq!(tuple((1, 2)), 3);
    assert_eq!(wildcard(1), 0);
    assert_eq!(by_ref("a".to_string()), 1);
    assert_eq!(binding((1, 2)), 6);
}
