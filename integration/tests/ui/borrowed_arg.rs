#[dingo::task]
fn count(text: &str) -> usize {
    text.len()
}

#[dingo::task]
fn push(items: &mut Vec<i64>) {
    items.push(1);
}

#[dingo::task]
fn total(parts: Vec<&[u8]>) -> usize {
    parts.iter().map(|p| p.len()).sum()
}

fn main() {
    assert_eq!(count("abc"), 3);
    push(&mut Vec::new());
    assert_eq!(total(vec![b"ab"]), 2);
}
