// SPDX-License-Identifier: Apache-2.0
//! The bounded postcard codec.

use serde::{de::DeserializeOwned, Serialize};

/// Hard cap on one encoded message, in bytes, in both directions.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Why untrusted bytes were rejected. Carries no peer-supplied data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("message is empty")]
    Empty,
    #[error("message exceeds {MAX_MESSAGE} bytes")]
    TooLarge,
    #[error("message is truncated")]
    Truncated,
    #[error("message has trailing bytes")]
    TrailingBytes,
    #[error("message has an unknown variant")]
    UnknownVariant,
    #[error("message is malformed")]
    Malformed,
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    #[error("encoded message would exceed {MAX_MESSAGE} bytes")]
    TooLarge,
    #[error("message could not be serialized")]
    Serialize,
    #[error("message does not exist in the connection's protocol version")]
    NotInVersion,
}

/// What [`encode`] allocates first.
const ENCODE_CAPACITY: usize = 256;

/// Encode one message, refusing anything larger than [`MAX_MESSAGE`].
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, EncodeError> {
    // Most messages are small: start with room for one, instead of growing
    // an empty vector a few bytes at a time.
    let bytes = postcard::to_extend(msg, Vec::with_capacity(ENCODE_CAPACITY))
        .map_err(|_| EncodeError::Serialize)?;
    if bytes.len() > MAX_MESSAGE {
        return Err(EncodeError::TooLarge);
    }
    Ok(bytes)
}

/// Encode one message into `out`, replacing what it held and reusing its
/// allocation (for a connection's outgoing buffer); refuses anything
/// larger than [`MAX_MESSAGE`], leaving `out` empty.
pub fn encode_into<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let mut buf = std::mem::take(out);
    buf.clear();
    if buf.capacity() < ENCODE_CAPACITY {
        buf.reserve(ENCODE_CAPACITY);
    }
    let mut bytes = postcard::to_extend(msg, buf).map_err(|_| EncodeError::Serialize)?;
    if bytes.len() > MAX_MESSAGE {
        bytes.clear();
        bytes.shrink_to(ENCODE_CAPACITY);
        *out = bytes;
        return Err(EncodeError::TooLarge);
    }
    *out = bytes;
    Ok(())
}

/// Decode exactly one message from untrusted bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    if bytes.len() > MAX_MESSAGE {
        return Err(DecodeError::TooLarge);
    }
    let (msg, rest) = postcard::take_from_bytes(bytes).map_err(classify)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes);
    }
    Ok(msg)
}

fn classify(err: postcard::Error) -> DecodeError {
    match err {
        postcard::Error::DeserializeUnexpectedEnd => DecodeError::Truncated,
        // serde's derive reports an out-of-range variant index through
        // `de::Error::custom`; for the types of this crate that is the only
        // custom error decoding can raise (strings, bools and varints have
        // their own postcard errors).
        postcard::Error::DeserializeBadEnum | postcard::Error::SerdeDeCustom => {
            DecodeError::UnknownVariant
        }
        _ => DecodeError::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::*;
    use crate::Value;
    use proptest::prelude::*;

    fn sample_call() -> Request {
        Request::Call(Call {
            tool: "send_email".into(),
            params: vec![
                Param {
                    name: "to".into(),
                    value: Value::Str("a@example.com".into()),
                },
                Param {
                    name: "n".into(),
                    value: Value::Int(-2),
                },
                Param {
                    name: "ok".into(),
                    value: Value::Bool(true),
                },
            ],
        })
    }

    #[test]
    fn encode_into_reuses_the_buffer_and_matches_encode() {
        let mut out = Vec::new();
        encode_into(&sample_call(), &mut out).unwrap();
        assert_eq!(out, encode(&sample_call()).unwrap());
        let hello = Request::Hello(Hello { version: 1 });
        let at = out.as_ptr();
        encode_into(&hello, &mut out).unwrap();
        assert_eq!(out, [0x00, 0x01]);
        assert_eq!(out.as_ptr(), at, "the allocation was not reused");
        let huge = Request::Bind(Bind {
            token: "x".repeat(MAX_MESSAGE),
        });
        assert_eq!(encode_into(&huge, &mut out), Err(EncodeError::TooLarge));
        assert!(out.is_empty());
    }

    #[test]
    fn golden_hello() {
        let bytes = encode(&Request::Hello(Hello { version: 1 })).unwrap();
        assert_eq!(bytes, [0x00, 0x01]);
    }

    #[test]
    fn golden_call() {
        let bytes = encode(&sample_call()).unwrap();
        let expected: &[u8] = &[
            0x01, // Request::Call
            0x0a, b's', b'e', b'n', b'd', b'_', b'e', b'm', b'a', b'i', b'l', //
            0x03, // three params
            0x02, b't', b'o', 0x00, 0x0d, b'a', b'@', b'e', b'x', b'a', b'm', b'p', b'l', b'e',
            b'.', b'c', b'o', b'm', //
            0x01, b'n', 0x01, 0x03, // Int(-2), zigzag
            0x02, b'o', b'k', 0x02, 0x01, // Bool(true)
        ];
        assert_eq!(bytes, expected);
        assert_eq!(decode::<Request>(expected).unwrap(), sample_call());
    }

    #[test]
    fn golden_hello_current_version() {
        let bytes = encode(&Request::Hello(Hello {
            version: crate::PROTOCOL_VERSION,
        }))
        .unwrap();
        assert_eq!(bytes, [0x00, 0x03]);
    }

    #[test]
    fn golden_tool_list() {
        use crate::token::Constraint;
        let list = Response::ToolList(ToolList {
            tools: vec![ToolInfo {
                name: "t".into(),
                description: String::new(),
                params: vec![ParamInfo {
                    name: "n".into(),
                    ty: "int".into(),
                    required: false,
                    rules: vec![],
                    default: Some(Value::Int(3)),
                    checks: vec![Check::Max(9), Check::Pattern("a".into())],
                    constraints: vec![Constraint::Range { min: 1, max: 2 }],
                }],
                kind: ToolKind::Gateway,
            }],
        });
        let expected: &[u8] = &[
            0x06, // Response::ToolList
            0x01, 0x01, b't', 0x00, // one tool "t", no description
            0x01, 0x01, b'n', 0x03, b'i', b'n', b't', 0x00,
            0x00, // param "n" int, optional, no rules
            0x01, 0x01, 0x06, // default Some(Int(3))
            0x02, 0x04, 0x12, 0x00, 0x01, b'a', // checks: Max(9), Pattern("a")
            0x01, 0x04, 0x02, 0x04, // constraints: Range { 1, 2 }
            0x01, // kind: Gateway (since version 3)
        ];
        assert_eq!(encode(&list).unwrap(), expected);
        assert_eq!(decode::<Response>(expected).unwrap(), list);
    }

    #[test]
    fn golden_denied() {
        let resp = Response::Denied(Denial {
            reason: "no".into(),
        });
        assert_eq!(encode(&resp).unwrap(), [0x02, 0x02, b'n', b'o']);
    }

    #[test]
    fn rejects_empty_trailing_unknown_and_oversized() {
        assert_eq!(decode::<Request>(&[]), Err(DecodeError::Empty));
        assert_eq!(
            decode::<Request>(&[0x00, 0x01, 0x00]),
            Err(DecodeError::TrailingBytes)
        );
        assert_eq!(
            decode::<Request>(&[0x7f, 0x01]),
            Err(DecodeError::UnknownVariant)
        );
        assert_eq!(
            decode::<Request>(&vec![0u8; MAX_MESSAGE + 1]),
            Err(DecodeError::TooLarge)
        );
        // Unknown nested variant: a Value tag of 9.
        assert_eq!(
            decode::<Request>(&[0x01, 0x01, b'x', 0x01, 0x01, b'n', 0x09, 0x00]),
            Err(DecodeError::UnknownVariant)
        );
        // Invalid UTF-8 in the tool name.
        assert_eq!(
            decode::<Request>(&[0x01, 0x01, 0xff, 0x00]),
            Err(DecodeError::Malformed)
        );
    }

    #[test]
    fn huge_length_prefix_does_not_allocate() {
        // Call with a tool name, then a parameter count of u32::MAX: must
        // fail as truncated, not try to reserve billions of elements.
        let bytes = [0x01, 0x01, b'x', 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert_eq!(decode::<Request>(&bytes), Err(DecodeError::Truncated));
        let body = [0x01, 0xc8, 0x01, 0x00, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert_eq!(decode::<Response>(&body), Err(DecodeError::Truncated));
    }

    #[test]
    fn every_truncation_fails() {
        let bytes = encode(&sample_call()).unwrap();
        for len in 0..bytes.len() {
            assert!(decode::<Request>(&bytes[..len]).is_err(), "prefix {len}");
        }
    }

    #[test]
    fn encode_refuses_oversized() {
        let resp = Response::Done(CallResult {
            status: 200,
            headers: vec![],
            body: vec![0; MAX_MESSAGE],
        });
        assert_eq!(encode(&resp), Err(EncodeError::TooLarge));
    }

    #[test]
    fn debug_hides_values() {
        let shown = format!("{:?}", sample_call());
        assert!(!shown.contains("example.com"), "{shown}");
        assert!(shown.contains("string"), "{shown}");
    }

    fn value() -> impl Strategy<Value = crate::Value> {
        prop_oneof![
            any::<String>().prop_map(crate::Value::Str),
            any::<i64>().prop_map(crate::Value::Int),
            any::<bool>().prop_map(crate::Value::Bool),
        ]
    }

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            any::<u16>().prop_map(|version| Request::Hello(Hello { version })),
            (
                any::<String>(),
                proptest::collection::vec((any::<String>(), value()), 0..8)
            )
                .prop_map(|(tool, params)| Request::Call(Call {
                    tool,
                    params: params
                        .into_iter()
                        .map(|(name, value)| Param { name, value })
                        .collect(),
                })),
        ]
    }

    proptest! {
        #[test]
        fn request_round_trips(req in request()) {
            let bytes = encode(&req).unwrap();
            prop_assert_eq!(decode::<Request>(&bytes).unwrap(), req);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<Request>(&bytes);
            let _ = decode::<Response>(&bytes);
        }

        #[test]
        fn truncations_and_extensions_fail(req in request(), extra in 1u8..=255) {
            let bytes = encode(&req).unwrap();
            for len in 0..bytes.len() {
                prop_assert!(decode::<Request>(&bytes[..len]).is_err());
            }
            let mut longer = bytes.clone();
            longer.push(extra);
            prop_assert_eq!(decode::<Request>(&longer), Err(DecodeError::TrailingBytes));
        }
    }
}
