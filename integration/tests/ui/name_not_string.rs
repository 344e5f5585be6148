const NAME: &str = "math.add";

#[dingo::task(name = NAME)]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[dingo::task(name = 42)]
fn sub(a: i64, b: i64) -> i64 {
    a - b
}

fn main() {
    assert_eq!(add(1, 2), 3);
    assert_eq!(sub(1, 2), -1);
}
