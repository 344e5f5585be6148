#[dingo::task]
async fn fetch(url: String) -> usize {
    url.len()
}

fn main() {
    let _ = fetch("x".to_string());
}
