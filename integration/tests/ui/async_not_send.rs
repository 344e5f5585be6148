// The worker may move an `async fn` task's future between threads: a future that holds
// something not `Send` across an `.await` is an error at the function, naming the value.
use std::rc::Rc;

#[dingo::task]
async fn count(n: u64) -> u64 {
    let shared = Rc::new(n);
    std::future::ready(()).await;
    *shared
}

fn main() {}
