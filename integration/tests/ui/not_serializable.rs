// Argument, result and error types must be serializable: the compiler says so at them.
struct Point {
    x: i64,
}

#[derive(Debug)]
struct Overflow;

#[dingo::task]
fn norm(p: Point, scale: i64) -> Point {
    Point { x: p.x * scale }
}

#[dingo::task]
fn double(n: i64) -> Result<i64, Overflow> {
    n.checked_mul(2).ok_or(Overflow)
}

fn main() {}
