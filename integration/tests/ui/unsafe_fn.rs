#[dingo::task]
unsafe fn double(n: i64) -> i64 {
    n * 2
}

fn main() {
    assert_eq!(unsafe { double(2) }, 4);
}
