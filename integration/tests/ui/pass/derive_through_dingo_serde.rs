// Argument, result and error types derived through `dingo::serde`, in a crate that does not
// depend on serde (this one: serde is not among the `dingo` package's dependencies): each
// type says `#[serde(crate = "dingo::serde")]`, so the derives find serde there.
use dingo::serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(crate = "dingo::serde")]
struct Order {
    id: u64,
    lines: Vec<Line>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(crate = "dingo::serde")]
struct Line {
    sku: String,
    cents: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(crate = "dingo::serde", tag = "status")]
enum Invoice {
    Empty,
    Due { order: u64, total_cents: u64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(crate = "dingo::serde")]
enum InvoiceError {
    TooLarge(u64),
}

impl std::fmt::Display for InvoiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InvoiceError::TooLarge(cents) => write!(f, "{cents} cents is too large"),
        }
    }
}

#[dingo::task]
fn invoice(order: Order) -> Result<Invoice, InvoiceError> {
    let total_cents: u64 = order.lines.iter().map(|line| line.cents).sum();
    match total_cents {
        0 => Ok(Invoice::Empty),
        1_000_000.. => Err(InvoiceError::TooLarge(total_cents)),
        _ => Ok(Invoice::Due { order: order.id, total_cents }),
    }
}

fn main() {
    // Serialized: every value goes through the codec, as on Redis or RabbitMQ.
    let app = dingo::App::builder().broker(dingo::LocalBroker::serialized()).build().unwrap();
    app.allocate(invoice, 1).unwrap();
    let line = |cents| Line { sku: "tea".to_string(), cents };

    let order = Order { id: 7, lines: vec![line(250), line(450)] };
    let due = invoice::call(&app, order).unwrap().wait().unwrap();
    assert_eq!(due, Invoice::Due { order: 7, total_cents: 700 });
    let empty = invoice::call(&app, Order { id: 8, lines: Vec::new() }).unwrap().wait().unwrap();
    assert_eq!(empty, Invoice::Empty);

    let err = invoice::call(&app, Order { id: 9, lines: vec![line(1_000_000)] }).unwrap().wait().unwrap_err();
    let payload: InvoiceError = err.task_error().unwrap().payload().unwrap().unwrap();
    assert_eq!(payload, InvoiceError::TooLarge(1_000_000));
    app.close().unwrap();
}
