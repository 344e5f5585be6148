//! Running `async fn` tasks on a pool's own threads: each worker thread drives the futures
//! of the deliveries it took, up to its share of the pool's concurrency, and wakes when one
//! of them is woken. No async runtime: wakers are `std::task::Wake` handles that queue the
//! task and ring the thread's bell.

use std::sync::Arc;
use std::task::{Context as Poll_, Poll, Wake, Waker};
use std::thread::{self, Thread};

/// Runs `future` to completion on the calling thread (an `async fn` task called through
/// [`Task::run`](crate::Task::run), outside any worker).
pub(crate) fn block_on<F: std::future::Future>(future: F) -> F::Output {
    struct Unpark(Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = Poll_::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        // A wake before this park leaves the token set: park returns at once.
        thread::park();
    }
}
