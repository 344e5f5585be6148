use dingo::Context;

#[dingo::task]
fn work(ctx: &Context<'_>, n: i64, again: &dingo::Context<'_>) -> i64 {
    ctx.progress(n);
    again.progress(n);
    n
}

fn main() {}
