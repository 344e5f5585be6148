#[dingo::task]
fn sum<const N: usize>(values: [i64; N]) -> i64 {
    values.iter().sum()
}

fn main() {
    assert_eq!(sum([1, 2]), 3);
}
