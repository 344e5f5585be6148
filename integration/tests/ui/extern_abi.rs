#[dingo::task]
extern "C" fn double(n: i64) -> i64 {
    n * 2
}

fn main() {
    assert_eq!(double(2), 4);
}
