#[dingo::task]
fn first<T>(items: Vec<T>) -> usize {
    items.len()
}

fn main() {
    assert_eq!(first(vec![1, 2]), 2);
}
