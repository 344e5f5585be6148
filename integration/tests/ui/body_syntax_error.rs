// A syntax error in the body is rustc's, at its place; the task is still generated, so its
// callers see no follow-on errors.
#[dingo::task]
fn add(a: i64, b: i64) -> i64 {
    let sum = a + ;
    sum + b
}

fn main() {
    let app = dingo::App::local().unwrap();
    let _ = add::call(&app, 1, 2);
    let _ = add(1, 2);
}
