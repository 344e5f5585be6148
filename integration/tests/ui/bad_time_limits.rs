#[dingo::task(time_limit = 30, soft_time_limit = "fast")]
fn slow() -> u64 {
    0
}

fn main() {}
