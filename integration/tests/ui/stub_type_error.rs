#[dingo::task]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

fn main() -> Result<(), dingo::Error> {
    let app = dingo::App::local()?;
    let sum = add::call(&app, "2", 3)?.wait()?;
    assert_eq!(sum, 5);
    app.close()
}
