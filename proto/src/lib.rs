// SPDX-License-Identifier: Apache-2.0
//! keyward's wire protocol: the messages a client and the broker exchange,
//! and the one codec that turns them into bytes and back.
//!
//! Every message travels as one `SOCK_SEQPACKET` record of at most
//! [`MAX_MESSAGE`] bytes, encoded with postcard. A connection starts with a
//! [`Hello`] exchange that fixes the protocol version (the older of the
//! client's and the broker's, at least [`MIN_PROTOCOL_VERSION`]; see
//! `docs/PROTOCOL.md`); after that the client sends one [`Request`] at a
//! time and reads exactly one [`Response`], both of that version.
//!
//! Threat model: the broker decodes bytes written by an untrusted peer.
//! Decoding must never panic, never allocate more than the frame could
//! describe, and must reject trailing bytes and unknown variants with a
//! typed [`DecodeError`] that carries nothing the peer wrote.
//!
//! [`token`] holds the capability-token format: signed, bound to a task,
//! an audience, an expiry and exact tool/parameter constraints.
//!
//! Tests: round trips and golden bytes pin the encoding (a format change is
//! a deliberate act); property tests decode arbitrary bytes, every
//! truncation and every extension of valid frames.
#![forbid(unsafe_code)]

mod bounded;
mod codec;
mod message;
pub mod token;
mod value;
mod version;

pub use codec::{decode, encode, encode_into, DecodeError, EncodeError, MAX_MESSAGE};
pub use message::{
    Attenuate, Bind, Bound, Call, CallResult, Check, CredentialStatus, Denial, ErrorCode,
    ErrorReply, GatewayBody, GatewayChunk, GatewayEnd, GatewayHead, GatewayInfo,
    GatewayInfoRequest, GatewayRequest, Header, Hello, Inspect, Mint, Minted, Param, ParamInfo,
    Request, Response, Revoke, Revoked, StatusReport, TokenInfo, TokenList, TokenSummary, ToolInfo,
    ToolKind, ToolList, UidSessions,
};
pub use value::Value;
pub use version::{
    decode_response, encode_response, negotiate, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

/// The socket path used when `KEYWARD_SOCKET` is not set.
pub const DEFAULT_SOCKET: &str = "/run/keyward/broker.sock";
