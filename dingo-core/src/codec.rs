//! Codecs turn arguments and results into bytes for brokers that carry bytes.
//!
//! [`MsgPack`] (MessagePack, structs as maps so fields can be added and reordered) is the
//! default; [`Json`] comes with the `json` feature; anything else implements [`Codec`] and
//! is registered with [`AppBuilder::codec`](crate::AppBuilder::codec). Every encoded value
//! carries its codec's id, so a worker answers in the codec the caller used.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use erased_serde;

/// Identifies a codec on the wire. Ids below 128 are reserved for dingo's own codecs.
pub type CodecId = u8;

/// The id of [`MsgPack`].
pub const MSGPACK: CodecId = 1;
/// The id of [`Json`].
pub const JSON: CodecId = 2;
/// The first id a custom codec may use.
pub const FIRST_CUSTOM: CodecId = 128;

/// Bytes produced by a codec, tagged with the codec's id.
#[derive(Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The codec that produced `bytes`.
    pub codec: CodecId,
    /// The encoded value.
    pub bytes: Vec<u8>,
}

impl Encoded {
    /// Bytes tagged with a codec id.
    pub fn new(codec: CodecId, bytes: Vec<u8>) -> Encoded {
        Encoded { codec, bytes }
    }
}

impl fmt::Debug for Encoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Encoded(codec {}, {} bytes)", self.codec, self.bytes.len())
    }
}

/// A way to turn serde values into bytes and back.
///
/// The trait is object-safe (through `erased_serde`), so an app can hold codecs chosen at
/// run time. Implementations must be deterministic about what they accept: a value encoded
/// by one process must decode in another.
///
/// ```
/// use dingo_core::codec::{self, Codec, CodecError, CodecId, erased_serde};
///
/// /// MessagePack with structs as arrays: smaller, but fields cannot move.
/// struct CompactMsgPack;
///
/// impl Codec for CompactMsgPack {
///     fn id(&self) -> CodecId { 200 }
///     fn name(&self) -> &str { "msgpack-compact" }
///     fn encode(&self, value: &dyn erased_serde::Serialize, out: &mut Vec<u8>) -> Result<(), CodecError> {
///         rmp_serde::encode::write(out, value).map_err(|e| CodecError::encode(self.name(), e))
///     }
///     fn decode_with(
///         &self,
///         bytes: &[u8],
///         visit: &mut dyn FnMut(&mut dyn erased_serde::Deserializer<'_>) -> Result<(), erased_serde::Error>,
///     ) -> Result<(), CodecError> {
///         let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
///         visit(&mut <dyn erased_serde::Deserializer>::erase(&mut de)).map_err(|e| CodecError::decode(self.name(), e))
///     }
/// }
///
/// let bytes = codec::encode(&CompactMsgPack, &(1u8, "two")).unwrap();
/// let back: (u8, String) = codec::decode(&CompactMsgPack, &bytes).unwrap();
/// assert_eq!(back, (1, "two".to_string()));
/// ```
pub trait Codec: Send + Sync + 'static {
    /// The id written next to every value this codec encodes (≥ 128 for custom codecs).
    fn id(&self) -> CodecId;
    /// A short name for messages and events.
    fn name(&self) -> &str;
    /// Appends the encoding of `value` to `out`.
    fn encode(&self, value: &dyn erased_serde::Serialize, out: &mut Vec<u8>) -> Result<(), CodecError>;
    /// Builds a deserializer over `bytes` and hands it to `visit`.
    fn decode_with(
        &self,
        bytes: &[u8],
        visit: &mut dyn FnMut(&mut dyn erased_serde::Deserializer<'_>) -> Result<(), erased_serde::Error>,
    ) -> Result<(), CodecError>;
}

impl fmt::Debug for dyn Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Codec({} #{})", self.name(), self.id())
    }
}

/// Encodes `value` with `codec`.
pub fn encode<T: Serialize + ?Sized>(codec: &dyn Codec, value: &T) -> Result<Vec<u8>, CodecError> {
    // Most arguments and results are small: one allocation rather than a growth per doubling.
    let mut out = Vec::with_capacity(32);
    match codec.id() {
        // Built-in ids are reserved, so these are our own codecs: skip the type erasure.
        MSGPACK => rmp_serde::encode::write_named(&mut out, value).map_err(|e| CodecError::encode("msgpack", e))?,
        #[cfg(feature = "json")]
        JSON => serde_json::to_writer(&mut out, value).map_err(|e| CodecError::encode("json", e))?,
        _ => codec.encode(&value as &dyn erased_serde::Serialize, &mut out)?,
    }
    Ok(out)
}

/// Decodes a `T` from `bytes` with `codec`.
pub fn decode<T: DeserializeOwned>(codec: &dyn Codec, bytes: &[u8]) -> Result<T, CodecError> {
    match codec.id() {
        MSGPACK => rmp_serde::from_slice(bytes).map_err(|e| CodecError::decode("msgpack", e)),
        #[cfg(feature = "json")]
        JSON => serde_json::from_slice(bytes).map_err(|e| CodecError::decode("json", e)),
        _ => {
            let mut out = None;
            codec.decode_with(bytes, &mut |de| {
                out = Some(erased_serde::deserialize::<T>(de)?);
                Ok(())
            })?;
            out.ok_or_else(|| CodecError::new(CodecErrorKind::Decode, codec.name(), "the codec produced no value"))
        }
    }
}

/// MessagePack with structs encoded as maps (field names kept), the default codec.
#[derive(Debug, Default, Clone, Copy)]
pub struct MsgPack;

impl Codec for MsgPack {
    fn id(&self) -> CodecId {
        MSGPACK
    }

    fn name(&self) -> &str {
        "msgpack"
    }

    fn encode(&self, value: &dyn erased_serde::Serialize, out: &mut Vec<u8>) -> Result<(), CodecError> {
        rmp_serde::encode::write_named(out, value).map_err(|e| CodecError::encode("msgpack", e))
    }

    fn decode_with(
        &self,
        bytes: &[u8],
        visit: &mut dyn FnMut(&mut dyn erased_serde::Deserializer<'_>) -> Result<(), erased_serde::Error>,
    ) -> Result<(), CodecError> {
        let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
        visit(&mut <dyn erased_serde::Deserializer<'_>>::erase(&mut de)).map_err(|e| CodecError::decode("msgpack", e))
    }
}

/// JSON (`serde_json`): larger and slower than MessagePack, readable in `redis-cli`.
#[cfg(feature = "json")]
#[derive(Debug, Default, Clone, Copy)]
pub struct Json;

#[cfg(feature = "json")]
impl Codec for Json {
    fn id(&self) -> CodecId {
        JSON
    }

    fn name(&self) -> &str {
        "json"
    }

    fn encode(&self, value: &dyn erased_serde::Serialize, out: &mut Vec<u8>) -> Result<(), CodecError> {
        serde_json::to_writer(out, value).map_err(|e| CodecError::encode("json", e))
    }

    fn decode_with(
        &self,
        bytes: &[u8],
        visit: &mut dyn FnMut(&mut dyn erased_serde::Deserializer<'_>) -> Result<(), erased_serde::Error>,
    ) -> Result<(), CodecError> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        visit(&mut <dyn erased_serde::Deserializer<'_>>::erase(&mut de)).map_err(|e| CodecError::decode("json", e))?;
        de.end().map_err(|e| CodecError::decode("json", e))
    }
}

/// The codecs an app knows, by id, plus the one it encodes with.
#[derive(Clone)]
pub struct Codecs {
    inner: Arc<CodecTable>,
}

struct CodecTable {
    by_id: Vec<Option<Arc<dyn Codec>>>,
    default: Arc<dyn Codec>,
}

impl Codecs {
    /// The built-in codecs, MessagePack by default.
    pub fn new() -> Codecs {
        let mut by_id: Vec<Option<Arc<dyn Codec>>> = vec![None; 256];
        let msgpack: Arc<dyn Codec> = Arc::new(MsgPack);
        by_id[MSGPACK as usize] = Some(msgpack.clone());
        #[cfg(feature = "json")]
        {
            by_id[JSON as usize] = Some(Arc::new(Json));
        }
        Codecs { inner: Arc::new(CodecTable { by_id, default: msgpack }) }
    }

    /// Adds (or replaces) a codec. Built-in ids cannot be taken by custom codecs.
    pub fn with(&self, codec: Arc<dyn Codec>) -> Result<Codecs, CodecError> {
        let id = codec.id();
        let builtin = id < FIRST_CUSTOM;
        let known_builtin = self.inner.by_id[id as usize].as_ref().map(|c| c.name() == codec.name()).unwrap_or(false);
        if builtin && !known_builtin {
            return Err(CodecError::new(
                CodecErrorKind::Unknown,
                codec.name(),
                format!("codec id {id} is reserved for dingo's codecs; custom codecs use {FIRST_CUSTOM}..=255"),
            ));
        }
        let mut by_id = self.inner.by_id.clone();
        let default = if self.inner.default.id() == id { codec.clone() } else { self.inner.default.clone() };
        by_id[id as usize] = Some(codec);
        Ok(Codecs { inner: Arc::new(CodecTable { by_id, default }) })
    }

    /// Makes the codec with this id the one new calls encode with.
    pub fn with_default(&self, id: CodecId) -> Result<Codecs, CodecError> {
        let default = self.get(id)?.clone();
        Ok(Codecs { inner: Arc::new(CodecTable { by_id: self.inner.by_id.clone(), default }) })
    }

    /// The codec with this id.
    pub fn get(&self, id: CodecId) -> Result<&Arc<dyn Codec>, CodecError> {
        self.inner.by_id[id as usize].as_ref().ok_or_else(|| {
            CodecError::new(CodecErrorKind::Unknown, "?", format!("no codec with id {id} is registered"))
        })
    }

    /// The codec new calls encode with.
    pub fn default_codec(&self) -> &Arc<dyn Codec> {
        &self.inner.default
    }

    /// Encodes with the codec of id `codec`.
    pub fn encode<T: Serialize + ?Sized>(&self, codec: CodecId, value: &T) -> Result<Encoded, CodecError> {
        Ok(Encoded::new(codec, encode(&**self.get(codec)?, value)?))
    }

    /// Decodes with the codec the bytes were encoded with.
    pub fn decode<T: DeserializeOwned>(&self, encoded: &Encoded) -> Result<T, CodecError> {
        decode(&**self.get(encoded.codec)?, &encoded.bytes)
    }
}

impl Default for Codecs {
    fn default() -> Codecs {
        Codecs::new()
    }
}

impl fmt::Debug for Codecs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<(u8, &str)> =
            self.inner.by_id.iter().enumerate().filter_map(|(i, c)| c.as_ref().map(|c| (i as u8, c.name()))).collect();
        f.debug_struct("Codecs").field("codecs", &names).field("default", &self.inner.default.name()).finish()
    }
}

/// What a codec failure was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CodecErrorKind {
    /// A value could not be encoded.
    Encode,
    /// Bytes could not be decoded into the expected type.
    Decode,
    /// No codec with that id is registered.
    Unknown,
}

/// A value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[error("{codec}: {message}")]
pub struct CodecError {
    kind: CodecErrorKind,
    codec: String,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl CodecError {
    /// A new error without source.
    pub fn new(kind: CodecErrorKind, codec: &str, message: impl Into<String>) -> CodecError {
        CodecError { kind, codec: codec.to_owned(), message: message.into(), source: None }
    }

    /// An encoding failure caused by `source`.
    pub fn encode(codec: &str, source: impl std::error::Error + Send + Sync + 'static) -> CodecError {
        CodecError {
            kind: CodecErrorKind::Encode,
            codec: codec.to_owned(),
            message: "could not encode".to_owned(),
            source: Some(Box::new(source)),
        }
    }

    /// A decoding failure caused by `source`.
    pub fn decode(codec: &str, source: impl std::error::Error + Send + Sync + 'static) -> CodecError {
        CodecError {
            kind: CodecErrorKind::Decode,
            codec: codec.to_owned(),
            message: "could not decode".to_owned(),
            source: Some(Box::new(source)),
        }
    }

    /// What failed.
    pub fn kind(&self) -> CodecErrorKind {
        self.kind
    }
}
