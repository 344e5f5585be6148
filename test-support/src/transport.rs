//! Task transport rules (Go dingo's `BrokerTestSuite`): byte-exact delivery; 256 tasks over 5
//! named queues, each delivered once to the listener of its name, in FIFO order; with 5
//! competing listeners per name, every task delivered exactly once in total.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dingo::broker::{ConsumeSettings, Consumer, Delivery, Producer, Recv, Subscription};
use dingo::message::{Payload, ReplyTo, TaskMessage};
use dingo::{Encoded, TaskId, TaskName, TaskOptions};

use crate::PATIENCE;
use dingo::broker::kit::lock;

/// One connection to the task transport under test.
#[derive(Clone)]
pub struct TaskTransport {
    /// Sends.
    pub producer: Arc<dyn Producer>,
    /// Receives.
    pub consumer: Arc<dyn Consumer>,
}

impl TaskTransport {
    /// Both roles from one broker value.
    pub fn of<B: Producer + Consumer>(broker: B) -> TaskTransport {
        let broker = Arc::new(broker);
        TaskTransport { producer: broker.clone(), consumer: broker }
    }
}

/// Opens connections to one fresh broker (or namespace) per test.
pub trait TransportSetup {
    /// A new connection; all connections of one setup reach the same queues.
    fn connect(&self) -> TaskTransport;
}

impl<F: Fn() -> TaskTransport> TransportSetup for F {
    fn connect(&self) -> TaskTransport {
        self()
    }
}

/// The id of the i-th of the 256 tasks (Go dingo's format).
pub fn test_id(i: usize) -> TaskId {
    TaskId::new(&format!("00000000-0000-0000-0000-000000000{i:03x}"))
}

fn message(name: &str, id: TaskId, bytes: &[u8]) -> TaskMessage {
    TaskMessage::new(TaskName::from(name), id, 0x0123_4567_89ab_cdef, Payload::Encoded(Encoded::new(1, bytes.to_vec())))
        .with_options(TaskOptions::new())
        .with_reply_to(ReplyTo::Address(Arc::from("reply.address")))
}

/// Receives one delivery or fails the test after [`PATIENCE`].
pub fn recv(subscription: &dyn Subscription) -> Delivery {
    match subscription.recv(Some(PATIENCE)) {
        Recv::Delivery(d) => d,
        Recv::Empty => panic!("no delivery within {PATIENCE:?}"),
        Recv::Stopped => panic!("the subscription stopped"),
        other => panic!("an unexpected {other:?}"),
    }
}

fn ack(delivery: Delivery) {
    if let Some(ack) = delivery.ack {
        ack.ack().expect("ack");
    }
}

/// A task message arrives byte for byte as it was sent.
pub fn byte_exact_delivery(setup: &dyn TransportSetup) {
    let worker = setup.connect();
    let caller = setup.connect();
    let name = TaskName::from("");
    worker.consumer.declare(&name).expect("declare on the consumer");
    caller.producer.declare(&name).expect("declare on the producer");
    let subscription = worker.consumer.consume(std::slice::from_ref(&name), &ConsumeSettings::new(1)).expect("consume");

    let bytes = b"test byte array\x00\xff\x80 with every kind of byte";
    let mut options = TaskOptions::new();
    options.monitor_progress = true;
    let mut sent = message("", test_id(1), bytes);
    sent.options = options;
    caller.producer.send(sent, None).expect("send");

    let got = recv(&*subscription);
    let m = &got.message;
    assert_eq!(m.name, "");
    assert_eq!(m.id, test_id(1));
    assert_eq!(m.fingerprint, 0x0123_4567_89ab_cdef);
    assert_eq!(m.options, options);
    assert!(matches!(&m.reply_to, ReplyTo::Address(a) if &**a == "reply.address"), "{:?}", m.reply_to);
    assert_eq!(m.args.encoded(), Some(&Encoded::new(1, bytes.to_vec())));
    assert!(!got.redelivered);
    ack(got);
    subscription.stop();
    assert!(matches!(subscription.recv(Some(Duration::from_secs(1))), Recv::Stopped));
}

/// 256 tasks over 5 queues: each received exactly once by the listener of its queue, in
/// the order it was sent.
pub fn fifo_per_queue_256_over_5(setup: &dyn TransportSetup) {
    let names: Vec<TaskName> = (0..5).map(|i| TaskName::from(format!("named.{i}"))).collect();
    let caller = setup.connect();
    for name in &names {
        caller.producer.declare(name).expect("declare");
    }
    // Outstanding ids per name, oldest first.
    let outstanding: Arc<Mutex<HashMap<String, Vec<TaskId>>>> = Arc::default();
    let listeners: Vec<_> = names
        .iter()
        .map(|name| {
            let connection = setup.connect();
            connection.consumer.declare(name).expect("declare");
            let subscription =
                connection.consumer.consume(std::slice::from_ref(name), &ConsumeSettings::new(1)).expect("consume");
            (name.clone(), Arc::<dyn Subscription>::from(subscription))
        })
        .collect();

    for i in 0..256 {
        let name = &names[i % 5];
        lock(&outstanding).entry(name.to_string()).or_default().push(test_id(i));
        caller.producer.send(message(name.as_str(), test_id(i), b""), None).expect("send");
    }

    std::thread::scope(|s| {
        for (name, subscription) in &listeners {
            let outstanding = outstanding.clone();
            s.spawn(move || {
                for _ in 0..(256 / 5 + usize::from(names_index(name) < 256 % 5)) {
                    let delivery = recv(&**subscription);
                    assert_eq!(&delivery.message.name, name, "delivered to the listener of another queue");
                    let mut outstanding = lock(&outstanding);
                    let queue = outstanding.get_mut(name.as_str()).expect("known queue");
                    assert!(!queue.is_empty(), "more deliveries than sends on {name}");
                    let oldest = queue.remove(0);
                    assert_eq!(delivery.message.id, oldest, "not FIFO on {name}");
                    drop(outstanding);
                    ack(delivery);
                }
            });
        }
    });
    assert!(lock(&outstanding).values().all(Vec::is_empty));
    for (_, subscription) in &listeners {
        assert!(matches!(subscription.try_recv(), Recv::Empty), "an extra delivery");
        subscription.stop();
    }
}

fn names_index(name: &TaskName) -> usize {
    name.as_str().rsplit('.').next().and_then(|i| i.parse().ok()).unwrap_or(0)
}

/// With 5 competing listeners on each of 5 queues, each of 256 tasks is delivered exactly
/// once in total.
pub fn competing_consumers_exactly_once(setup: &dyn TransportSetup) {
    let names: Vec<TaskName> = (0..5).map(|i| TaskName::from(format!("duplicated.{i}"))).collect();
    let caller = setup.connect();
    for name in &names {
        caller.producer.declare(name).expect("declare");
    }
    let counts: Arc<Mutex<HashMap<TaskId, usize>>> = Arc::default();
    let mut subscriptions: Vec<Arc<dyn Subscription>> = Vec::new();
    for name in &names {
        for _ in 0..5 {
            let connection = setup.connect();
            subscriptions.push(Arc::from(
                connection.consumer.consume(std::slice::from_ref(name), &ConsumeSettings::new(1)).expect("consume"),
            ));
        }
    }
    for i in 0..256 {
        lock(&counts).insert(test_id(i), 0);
    }
    std::thread::scope(|s| {
        for subscription in &subscriptions {
            let counts = counts.clone();
            s.spawn(move || {
                loop {
                    match subscription.recv(Some(Duration::from_millis(50))) {
                        Recv::Delivery(delivery) => {
                            *lock(&counts).get_mut(&delivery.message.id).expect("a task that was sent") += 1;
                            ack(delivery);
                        }
                        Recv::Empty => {}
                        Recv::Stopped => break,
                        other => panic!("an unexpected {other:?}"),
                    }
                }
            });
        }
        for i in 0..256 {
            caller.producer.send(message(names[i % 5].as_str(), test_id(i), b""), None).expect("send");
        }
        let deadline = Instant::now() + PATIENCE;
        while lock(&counts).values().sum::<usize>() < 256 {
            assert!(Instant::now() < deadline, "not every task was delivered in time");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Give duplicates a chance to show up before stopping.
        std::thread::sleep(Duration::from_millis(200));
        for subscription in &subscriptions {
            subscription.stop();
        }
    });
    let counts = lock(&counts);
    let wrong: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(wrong.is_empty(), "tasks not delivered exactly once: {wrong:?}");
}
