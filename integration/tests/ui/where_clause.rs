#[dingo::task]
fn double(n: i64) -> i64
where
    i64: Copy,
{
    n * 2
}

fn main() {
    assert_eq!(double(2), 4);
}
