// SPDX-License-Identifier: Apache-2.0
//! Protocol versions: what the `Hello` exchange settles, and the older
//! versions' encodings this build still speaks.
//!
//! | version | what it added |
//! | --- | --- |
//! | 1 | the first protocol (refused since 2) |
//! | 2 | `ParamInfo` carries its checks and constraints as data |
//! | 3 | requests `Status`, `Tokens`, `Inspect`, `Gateway`, `GatewayBody`, `GatewayInfo` and their responses; `ToolInfo::kind`, and gateways in `ToolList` |
//!
//! Postcard is positional: a field added to a struct changes the encoding
//! of every message that carries it. So a broker serving a version-2
//! connection encodes `ToolList` without `kind` (and without gateways,
//! which version 2 did not have), and a client on a version-2 connection
//! decodes it that way: [`encode_response`], [`decode_response`]. Every
//! other message of version 2 is encoded in version 3 exactly as it was.

use serde::{Deserialize, Serialize};

use crate::codec::{decode, encode_into, DecodeError, EncodeError};
use crate::message::{
    Bound, CallResult, Denial, ErrorReply, Hello, Minted, ParamInfo, Response, Revoked, ToolInfo,
    ToolKind, ToolList,
};

/// The protocol version this build speaks, and offers in its `Hello`.
pub const PROTOCOL_VERSION: u16 = 3;

/// The oldest version this build still speaks: a `Hello` offering less is
/// refused.
pub const MIN_PROTOCOL_VERSION: u16 = 2;

/// The broker's side of the `Hello`: the version a connection whose
/// client offered `offered` uses (the older of the two), or `None` if it
/// is older than [`MIN_PROTOCOL_VERSION`].
pub fn negotiate(offered: u16) -> Option<u16> {
    (offered >= MIN_PROTOCOL_VERSION).then_some(offered.min(PROTOCOL_VERSION))
}

/// Encode `response` as a connection of protocol `version` reads it, into
/// `out` (as [`encode_into`]). A response that `version` does not have is
/// refused ([`EncodeError::NotInVersion`]); a version-2 `ToolList` is sent
/// without gateways and without `kind`.
pub fn encode_response(
    response: &Response,
    version: u16,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    if response.since() > version {
        out.clear();
        return Err(EncodeError::NotInVersion);
    }
    match response {
        Response::ToolList(list) if version < 3 => encode_into(&V2ToolListOut::new(list), out),
        _ => encode_into(response, out),
    }
}

/// Decode a response read on a connection of protocol `version`.
pub fn decode_response(bytes: &[u8], version: u16) -> Result<Response, DecodeError> {
    if version >= 3 {
        return decode(bytes);
    }
    decode::<V2Response>(bytes).map(Response::from)
}

/// Version 2's `Response`: the same variants in the same order, with its
/// own `ToolList`.
#[derive(Deserialize)]
enum V2Response {
    Hello(Hello),
    Done(CallResult),
    Denied(Denial),
    Error(ErrorReply),
    Bound(Bound),
    Minted(Minted),
    ToolList(V2ToolList),
    Revoked(Revoked),
}

#[derive(Deserialize)]
struct V2ToolList {
    #[serde(deserialize_with = "crate::bounded::vec")]
    tools: Vec<V2ToolInfo>,
}

/// Version 2's `ToolInfo`: no `kind` (every entry was a tool).
#[derive(Deserialize)]
struct V2ToolInfo {
    name: String,
    description: String,
    #[serde(deserialize_with = "crate::bounded::vec")]
    params: Vec<ParamInfo>,
}

impl From<V2Response> for Response {
    fn from(response: V2Response) -> Response {
        match response {
            V2Response::Hello(m) => Response::Hello(m),
            V2Response::Done(m) => Response::Done(m),
            V2Response::Denied(m) => Response::Denied(m),
            V2Response::Error(m) => Response::Error(m),
            V2Response::Bound(m) => Response::Bound(m),
            V2Response::Minted(m) => Response::Minted(m),
            V2Response::ToolList(list) => Response::ToolList(ToolList {
                tools: list
                    .tools
                    .into_iter()
                    .map(|t| ToolInfo {
                        name: t.name,
                        description: t.description,
                        params: t.params,
                        kind: ToolKind::Tool,
                    })
                    .collect(),
            }),
            V2Response::Revoked(m) => Response::Revoked(m),
        }
    }
}

/// `Response::ToolList` as version 2 encodes it (variant 6, then the
/// tools without `kind`), borrowed from a current one, gateways left out.
struct V2ToolListOut<'a> {
    tools: Vec<&'a ToolInfo>,
}

impl<'a> V2ToolListOut<'a> {
    fn new(list: &'a ToolList) -> Self {
        V2ToolListOut {
            tools: list
                .tools
                .iter()
                .filter(|t| t.kind == ToolKind::Tool)
                .collect(),
        }
    }
}

/// `Response::ToolList`'s variant index (pinned by the golden tests).
const RESPONSE_TOOL_LIST: u32 = 6;

impl Serialize for V2ToolListOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_newtype_variant("Response", RESPONSE_TOOL_LIST, "ToolList", &V2Tools(self))
    }
}

struct V2Tools<'r, 'a>(&'r V2ToolListOut<'a>);

impl Serialize for V2Tools<'_, '_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let tools: Vec<V2Tool<'_>> = self.0.tools.iter().map(|t| V2Tool(t)).collect();
        let mut list = s.serialize_struct("ToolList", 1)?;
        list.serialize_field("tools", &tools)?;
        list.end()
    }
}

struct V2Tool<'a>(&'a ToolInfo);

impl Serialize for V2Tool<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut tool = s.serialize_struct("ToolInfo", 3)?;
        tool.serialize_field("name", &self.0.name)?;
        tool.serialize_field("description", &self.0.description)?;
        tool.serialize_field("params", &self.0.params)?;
        tool.end()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::codec::encode;
    use crate::message::{ErrorCode, GatewayEnd, Request};

    fn tool(name: &str, kind: ToolKind) -> ToolInfo {
        ToolInfo {
            name: name.into(),
            description: String::new(),
            params: vec![],
            kind,
        }
    }

    fn tool_list() -> Response {
        Response::ToolList(ToolList {
            tools: vec![tool("e", ToolKind::Tool), tool("g", ToolKind::Gateway)],
        })
    }

    #[test]
    fn negotiation_takes_the_older_version_and_refuses_below_the_oldest() {
        assert_eq!(negotiate(1), None);
        assert_eq!(negotiate(0), None);
        assert_eq!(negotiate(2), Some(2));
        assert_eq!(negotiate(3), Some(3));
        assert_eq!(negotiate(u16::MAX), Some(PROTOCOL_VERSION));
    }

    /// The bytes a version-2 peer (81c7152) wrote and read for a tool
    /// list: no `kind`, no gateway.
    #[test]
    fn golden_tool_list_in_each_version() {
        let mut out = Vec::new();
        encode_response(&tool_list(), 2, &mut out).unwrap();
        assert_eq!(out, [0x06, 0x01, 0x01, b'e', 0x00, 0x00]);
        let v2 = decode_response(&out, 2).unwrap();
        assert_eq!(
            v2,
            Response::ToolList(ToolList {
                tools: vec![tool("e", ToolKind::Tool)]
            })
        );
        // Read as version 3, the version-2 bytes are not a tool list.
        assert!(decode::<Response>(&out).is_err());

        encode_response(&tool_list(), 3, &mut out).unwrap();
        assert_eq!(
            out,
            [0x06, 0x02, 0x01, b'e', 0x00, 0x00, 0x00, 0x01, b'g', 0x00, 0x00, 0x01]
        );
        assert_eq!(out, encode(&tool_list()).unwrap());
        assert_eq!(decode_response(&out, 3).unwrap(), tool_list());
        // Read as version 2, they are not.
        assert!(decode_response(&out, 2).is_err());
    }

    /// Every other message of version 2 is encoded in version 3 as it was.
    #[test]
    fn version_2_messages_keep_their_bytes() {
        let responses = [
            Response::Hello(Hello { version: 2 }),
            Response::Denied(Denial {
                reason: "no".into(),
            }),
            Response::Error(ErrorReply {
                code: ErrorCode::Busy,
                message: "busy".into(),
            }),
            Response::Done(CallResult {
                status: 200,
                headers: vec![],
                body: b"{}".to_vec(),
            }),
        ];
        let mut out = Vec::new();
        for response in responses {
            encode_response(&response, 2, &mut out).unwrap();
            assert_eq!(out, encode(&response).unwrap(), "{response:?}");
            assert_eq!(decode_response(&out, 2).unwrap(), response);
        }
    }

    proptest::proptest! {
        /// Decoding in either version never panics on any bytes.
        #[test]
        fn arbitrary_bytes_never_panic_in_any_version(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)
        ) {
            let _ = decode_response(&bytes, 2);
            let _ = decode_response(&bytes, 3);
        }

        /// Every truncation of a version-2 tool list fails cleanly.
        #[test]
        fn truncated_version_2_tool_lists_fail(cut in 0usize..6) {
            let mut out = Vec::new();
            encode_response(&tool_list(), 2, &mut out).unwrap();
            proptest::prop_assert!(decode_response(&out[..cut], 2).is_err());
        }
    }

    #[test]
    fn newer_messages_have_no_older_encoding() {
        let mut out = vec![1, 2, 3];
        let end = Response::GatewayEnd(GatewayEnd { bytes: 1 });
        assert_eq!(
            encode_response(&end, 2, &mut out),
            Err(EncodeError::NotInVersion)
        );
        assert!(out.is_empty());
        encode_response(&end, 3, &mut out).unwrap();
        // A version-2 reader does not know the variant.
        assert_eq!(decode_response(&out, 2), Err(DecodeError::UnknownVariant));
        assert_eq!(Request::Status.since(), 3);
        assert_eq!(Request::Tools.since(), 2);
    }
}
