#[dingo::task(retries = -1, retry_backoff = "soon", retry_backoff_max = 60, retry_jitter = 1)]
fn flaky() -> Result<(), String> {
    Ok(())
}

fn main() {}
