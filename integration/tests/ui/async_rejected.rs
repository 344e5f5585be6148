// An `async fn` is held to the same rules as a plain `fn`: each of these is rejected at the
// offending tokens, with the message a plain `fn` gets, and the functions still compile.
struct Counter(i64);

impl Counter {
    #[dingo::task]
    async fn add(&self, n: i64) -> i64 {
        self.0 + n
    }
}

#[dingo::task]
async fn first<T: Send>(items: Vec<T>) -> usize {
    items.len()
}

/// The context's lifetime may stay unwritten, as in a plain `fn`: only the argument is wrong.
#[dingo::task]
async fn count(ctx: &dingo::Context, text: &str) -> usize {
    ctx.progress(1);
    text.len()
}

#[dingo::task]
async fn sum(numbers: impl Iterator<Item = i64>) -> i64 {
    numbers.sum()
}

#[dingo::task]
async unsafe fn raw(n: u64) -> u64 {
    n
}

/// A hand-written future is a plain `fn`, told to become an `async fn`.
#[dingo::task]
fn fetch(url: String) -> impl std::future::Future<Output = usize> {
    async move { url.len() }
}

fn main() {
    let _ = Counter(1).add(2);
    let _ = first(vec![1, 2]);
    let _ = count; // no context to lend outside a worker
    let _ = sum([1, 2].into_iter());
    let _ = unsafe { raw(1) };
    let _ = fetch("x".to_string());
}
