// Every problem is reported in one pass, and calls of the function still compile.
#[dingo::task(nmae = "math.add")]
async fn add<T>(a: &str, (b, c): (usize, usize)) -> usize {
    a.len() + b + c
}

fn main() {
    let _ = add::<u8>("1", (2, 3));
}
