//! Values of every shape make the round trip caller → worker → caller unchanged, through
//! every codec (MessagePack, JSON, a custom one) and without serialization.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::atomic::{AtomicU32, Ordering};

use dingo::codec::{self, Codec, CodecError, CodecId, MsgPack, erased_serde};
use dingo::serde::de::DeserializeOwned;
use dingo::serde::{Deserialize, Serialize};
use dingo::{App, LocalBroker};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(crate = "dingo::serde")]
struct Point {
    x: i32,
    y: i32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(crate = "dingo::serde")]
struct Shape {
    name: String,
    corners: Vec<Point>,
    center: Option<Point>,
    tags: BTreeMap<String, u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(crate = "dingo::serde")]
enum Command {
    Stop,
    Move(i32, i32),
    Draw { shape: Shape, fill: bool },
}

/// MessagePack with a trailing checksum byte: a custom codec, reached through the trait
/// object path (ids from 128 up).
struct Checksummed;

impl Codec for Checksummed {
    fn id(&self) -> CodecId {
        200
    }

    fn name(&self) -> &str {
        "msgpack+checksum"
    }

    fn encode(&self, value: &dyn erased_serde::Serialize, out: &mut Vec<u8>) -> Result<(), CodecError> {
        let start = out.len();
        MsgPack.encode(value, out)?;
        let sum = out[start..].iter().fold(0u8, |a, b| a ^ b);
        out.push(sum);
        Ok(())
    }

    fn decode_with(
        &self,
        bytes: &[u8],
        visit: &mut dyn FnMut(&mut dyn erased_serde::Deserializer<'_>) -> Result<(), erased_serde::Error>,
    ) -> Result<(), CodecError> {
        let Some((sum, body)) = bytes.split_last() else {
            return Err(CodecError::new(codec::CodecErrorKind::Decode, self.name(), "empty"));
        };
        if body.iter().fold(0u8, |a, b| a ^ b) != *sum {
            return Err(CodecError::new(codec::CodecErrorKind::Decode, self.name(), "checksum mismatch"));
        }
        MsgPack.decode_with(body, visit)
    }
}

fn apps() -> Vec<(&'static str, App)> {
    vec![
        ("in-memory", App::builder().broker(LocalBroker::new()).build().unwrap()),
        ("msgpack", App::builder().broker(LocalBroker::serialized()).build().unwrap()),
        ("json", App::builder().broker(LocalBroker::serialized()).default_codec(codec::JSON).unwrap().build().unwrap()),
        ("custom", App::builder().broker(LocalBroker::serialized()).codec(Checksummed).unwrap().build().unwrap()),
    ]
}

fn echo<T>(app: &App, name: &str, value: T)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug + Clone + Send + Sync + 'static,
{
    let task = format!("echo.{name}");
    app.register(task.clone(), |v: T| v).unwrap();
    app.allocate(&task, 1).unwrap();
    let back: T = app.call(&task, value.clone()).unwrap().wait().unwrap();
    assert_eq!(back, value, "{name}");
}

fn shape() -> Shape {
    Shape {
        name: "triangle".into(),
        corners: vec![Point { x: 0, y: 0 }, Point { x: 4, y: 0 }, Point { x: 0, y: -3 }],
        center: None,
        tags: [("red".to_string(), 1), ("big".to_string(), 2)].into(),
    }
}

#[test]
fn every_shape_of_value_round_trips_through_every_codec() {
    for (codec, app) in apps() {
        let _ = codec;
        echo(&app, "struct", Point { x: 1, y: -2 });
        echo(&app, "nested", shape());
        echo(&app, "enum.unit", Command::Stop);
        echo(&app, "enum.tuple", Command::Move(3, -4));
        echo(&app, "enum.struct", Command::Draw { shape: shape(), fill: true });
        echo(&app, "map", HashMap::from([(1u32, "one".to_string()), (2, "two".to_string())]));
        echo(&app, "vec", vec![u64::MAX, 0, 1 << 40]);
        echo(&app, "option.some", Some("x".to_string()));
        echo(&app, "option.none", None::<String>);
        echo(&app, "unit", ());
        echo(&app, "tuple", (1u8, "two".to_string(), 3.5f64, false));
        echo(&app, "result.ok", Ok::<u32, String>(7));
        echo(&app, "result.err", Err::<u32, String>("bad".into()));
        echo(&app, "bytes", (0..=255u8).collect::<Vec<u8>>());
        echo(&app, "unicode", "dingo 🐕 ünïcødé".to_string());
        app.close().unwrap();
    }
}

#[test]
fn closures_with_state_count_through_every_codec() {
    for (_, app) in apps() {
        let counter = AtomicU32::new(0);
        app.register("count", move |()| counter.fetch_add(1, Ordering::SeqCst) + 1).unwrap();
        app.allocate("count", 1).unwrap();
        let counts: Vec<u32> = (0..3).map(|_| app.call::<_, u32>("count", ()).unwrap().wait().unwrap()).collect();
        assert_eq!(counts, [1, 2, 3]);
        app.close().unwrap();
    }
}

#[test]
fn codecs_encode_and_decode_directly() {
    let codecs = dingo::codec::Codecs::new().with(std::sync::Arc::new(Checksummed)).unwrap();
    for id in [codec::MSGPACK, codec::JSON, 200] {
        let encoded = codecs.encode(id, &shape()).unwrap();
        assert_eq!(encoded.codec, id);
        assert_eq!(codecs.decode::<Shape>(&encoded).unwrap(), shape());
        let mut corrupt = encoded.clone();
        corrupt.bytes.truncate(corrupt.bytes.len() / 2);
        let err = codecs.decode::<Shape>(&corrupt).unwrap_err();
        assert_eq!(err.kind(), codec::CodecErrorKind::Decode, "{id}");
    }
    // MessagePack keeps field names (structs as maps), so fields may be added and reordered.
    let bytes = codec::encode(&MsgPack, &Point { x: 1, y: 2 }).unwrap();
    assert!(bytes.windows(1).any(|w| w == b"x") && bytes.windows(1).any(|w| w == b"y"));
    assert_eq!(codecs.get(99).unwrap_err().kind(), codec::CodecErrorKind::Unknown);
    // Built-in ids are reserved.
    struct Impostor;
    impl Codec for Impostor {
        fn id(&self) -> CodecId {
            codec::MSGPACK
        }
        fn name(&self) -> &str {
            "impostor"
        }
        fn encode(&self, _: &dyn erased_serde::Serialize, _: &mut Vec<u8>) -> Result<(), CodecError> {
            Ok(())
        }
        fn decode_with(
            &self,
            _: &[u8],
            _: &mut dyn FnMut(&mut dyn erased_serde::Deserializer<'_>) -> Result<(), erased_serde::Error>,
        ) -> Result<(), CodecError> {
            Ok(())
        }
    }
    assert!(App::builder().codec(Impostor).is_err());
}

#[test]
fn a_worker_answers_in_the_callers_codec() {
    // The caller encodes with JSON; the worker's default is MessagePack but it replies in
    // the codec the arguments came in, so raw callers can read the bytes.
    let broker = LocalBroker::serialized();
    let worker = App::builder().broker(broker.clone()).build().unwrap();
    worker.register("len", |s: String| s.len()).unwrap();
    worker.allocate("len", 1).unwrap();
    let caller = App::builder().broker(broker).default_codec(codec::JSON).unwrap().build().unwrap();
    let args = dingo::Encoded::new(codec::JSON, br#""four""#.to_vec());
    let out = caller.call_raw("len", &dingo::CallOptions::new(), args).unwrap().wait().unwrap();
    assert_eq!(out, dingo::Encoded::new(codec::JSON, b"4".to_vec()));
    caller.close().unwrap();
    worker.close().unwrap();
}
