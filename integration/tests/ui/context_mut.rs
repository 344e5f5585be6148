use dingo::Context;

#[dingo::task]
fn work(ctx: &mut Context<'_>, n: i64) -> i64 {
    ctx.progress(n);
    n
}

fn main() {}
