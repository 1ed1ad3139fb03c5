// SPDX-License-Identifier: Apache-2.0
//! The message types. Variant order is part of the wire format: append new
//! variants at the end, never reorder or remove.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::codec::DecodeError;
use crate::token::{Audience, Constraint, ParamConstraint, TokenId};
use crate::value::Value;

/// What a client sends.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub enum Request {
    /// First message on every connection.
    Hello(Hello),
    /// Perform a tool call: with the caller's principal authority, or on a
    /// bound connection with the bound token's authority alone.
    Call(Call),
    /// Bind a token to this connection: from now on it (and every channel
    /// passed over it) acts only with that token's authority.
    Bind(Bind),
    /// Carries exactly one connected `SOCK_SEQPACKET` socket (`SCM_RIGHTS`)
    /// that the broker serves as a new channel of this connection's bound
    /// session. No reply is sent on this connection.
    Channel,
    /// Mint a token (principals only, on an unbound connection).
    Mint(Mint),
    /// Mint a strict subset of this connection's bound token.
    Attenuate(Attenuate),
    /// List the tools this connection may call, with their constraints.
    Tools,
    /// Revoke a token and all its descendants.
    Revoke(Revoke),
    /// The broker's state for an admin (root or `admin_uids`): uptime,
    /// policy, sessions, tokens, credential names and states (never a
    /// value).
    Status,
    /// Every live token this broker issued (root or `admin_uids`).
    Tokens,
    /// What a token allows and how much of it is left: the given token, or
    /// on a bound connection (with `None`) the bound one.
    Inspect(Inspect),

    /// One HTTP request through a `[[gateway]]`: its head and the first
    /// part of its body. The rest of the body follows in
    /// [`Request::GatewayBody`] messages; the broker answers with a
    /// stream ([`Response::GatewayHead`], [`Response::GatewayChunk`]s,
    /// [`Response::GatewayEnd`]), or one `Denied`/`Error`. A connection
    /// carries one gateway request at a time (the shim opens a channel per
    /// request).
    Gateway(GatewayRequest),
    /// More of the body of the [`Request::Gateway`] in progress.
    GatewayBody(GatewayBody),
    /// What a program needs to reach a gateway: its environment variables
    /// (answered with [`Response::GatewayInfo`] if the connection may use
    /// the gateway).
    GatewayInfo(GatewayInfoRequest),
}

/// What the broker answers; exactly one per request.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub enum Response {
    /// The broker's half of the version exchange.
    Hello(Hello),
    /// The call was performed; this is its (redacted) result.
    Done(CallResult),
    /// Policy refused the request.
    Denied(Denial),
    /// The request could not be served; see the code.
    Error(ErrorReply),
    /// The token is bound to this connection.
    Bound(Bound),
    /// A new token (from `Mint` or `Attenuate`).
    Minted(Minted),
    /// The answer to `Tools`.
    ToolList(ToolList),
    /// The token is revoked.
    Revoked(Revoked),
    /// The answer to `Status`.
    Status(StatusReport),
    /// The answer to `Tokens`.
    TokenList(TokenList),
    /// The answer to `Inspect`.
    TokenInfo(TokenInfo),

    /// A gateway request's upstream answered: status and headers (already
    /// judged for credential material).
    GatewayHead(GatewayHead),
    /// The next bytes of the response body, as they arrived (each judged
    /// for credential material with the bytes before it).
    GatewayChunk(GatewayChunk),
    /// The response body is complete.
    GatewayEnd(GatewayEnd),
    /// The answer to [`Request::GatewayInfo`].
    GatewayInfo(GatewayInfo),
}

impl Request {
    /// The protocol version that introduced this request: a connection
    /// that negotiated an older one may not send it.
    pub fn since(&self) -> u16 {
        match self {
            Request::Hello(_)
            | Request::Call(_)
            | Request::Bind(_)
            | Request::Channel
            | Request::Mint(_)
            | Request::Attenuate(_)
            | Request::Tools
            | Request::Revoke(_) => 2,
            Request::Status
            | Request::Tokens
            | Request::Inspect(_)
            | Request::Gateway(_)
            | Request::GatewayBody(_)
            | Request::GatewayInfo(_) => 3,
        }
    }

    /// The request's name, for messages (`Status`).
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello(_) => "Hello",
            Request::Call(_) => "Call",
            Request::Bind(_) => "Bind",
            Request::Channel => "Channel",
            Request::Mint(_) => "Mint",
            Request::Attenuate(_) => "Attenuate",
            Request::Tools => "Tools",
            Request::Revoke(_) => "Revoke",
            Request::Status => "Status",
            Request::Tokens => "Tokens",
            Request::Inspect(_) => "Inspect",
            Request::Gateway(_) => "Gateway",
            Request::GatewayBody(_) => "GatewayBody",
            Request::GatewayInfo(_) => "GatewayInfo",
        }
    }
}

impl Response {
    /// The protocol version that introduced this response (it is only
    /// ever the answer to a request of that version or later).
    pub fn since(&self) -> u16 {
        match self {
            Response::Hello(_)
            | Response::Done(_)
            | Response::Denied(_)
            | Response::Error(_)
            | Response::Bound(_)
            | Response::Minted(_)
            | Response::ToolList(_)
            | Response::Revoked(_) => 2,
            Response::Status(_)
            | Response::TokenList(_)
            | Response::TokenInfo(_)
            | Response::GatewayHead(_)
            | Response::GatewayChunk(_)
            | Response::GatewayEnd(_)
            | Response::GatewayInfo(_) => 3,
        }
    }
}

/// Version exchange. The client offers the newest version it speaks; the
/// broker answers with the version the connection then uses (see
/// [`crate::negotiate`]), or refuses with `VersionMismatch`.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct Hello {
    pub version: u16,
}

/// A tool call: the tool's name and its parameters.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct Call {
    pub tool: String,
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub params: Vec<Param>,
}

/// One named parameter. Its `Debug` output never shows the value: policy
/// may mark a parameter secret, and the protocol cannot know which.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Param {
    pub name: String,
    pub value: Value,
}

impl fmt::Debug for Param {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Param")
            .field("name", &self.name)
            .field("value", &self.value.kind())
            .finish()
    }
}

/// The result of a performed call, already redacted by the broker.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallResult {
    /// Upstream status (HTTP status for `http` tools, 200 for built-ins).
    pub status: u16,
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub headers: Vec<Header>,
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub body: Vec<u8>,
}

impl fmt::Debug for CallResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallResult")
            .field("status", &self.status)
            .field("headers", &self.headers.len())
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// A response header, already redacted.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// A policy denial: one sentence naming what was denied and why.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct Denial {
    pub reason: String,
}

/// A failure that is not a policy decision.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

/// Machine-readable failure classes.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Debug)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The message could not be decoded.
    Malformed,
    /// The message exceeded [`crate::MAX_MESSAGE`].
    TooLarge,
    /// The client speaks another protocol version.
    VersionMismatch,
    /// A request came before the `Hello` exchange.
    HelloRequired,
    /// The kernel-supplied credentials did not authenticate the message.
    Unauthenticated,
    /// The upstream (HTTP server, ...) failed or timed out.
    Upstream,
    /// The broker failed internally.
    Internal,
    /// The broker is shutting down and takes no new requests.
    ShuttingDown,
    /// The peer exceeded a concurrency or rate limit.
    Busy,
}

impl DecodeError {
    /// The wire error code reported to the peer, as rustls maps parse
    /// failures to alerts. It lives beside [`ErrorCode`], not in the
    /// codec, so the codec stays the bottom layer that imports nothing.
    pub fn code(self) -> ErrorCode {
        match self {
            DecodeError::TooLarge => ErrorCode::TooLarge,
            DecodeError::Empty
            | DecodeError::Truncated
            | DecodeError::TrailingBytes
            | DecodeError::UnknownVariant
            | DecodeError::Malformed => ErrorCode::Malformed,
        }
    }
}

impl From<DecodeError> for ErrorCode {
    fn from(err: DecodeError) -> ErrorCode {
        err.code()
    }
}

/// `Bind`: the token string. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    pub token: String,
}

impl fmt::Debug for Bind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Bind { token: [token] }")
    }
}

/// `Mint`: what the new token may do, for whom, for how long.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct Mint {
    /// The tools the token may call.
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub tools: Vec<String>,
    /// Constraints, each applied to every listed tool that has the
    /// parameter (at least one must).
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub params: Vec<ParamConstraint>,
    /// Lifetime in seconds; the broker's default when `None`. Never more
    /// than the policy's `max_token_ttl`.
    pub ttl_secs: Option<u64>,
    pub max_uses: Option<u32>,
    /// The task description; its blake3 hash goes in the token.
    pub task: String,
    /// Who may present it; the minting caller's uid when `None`.
    pub audience: Option<Audience>,
    /// Pin the token to exactly the one call its `Exact` constraints
    /// describe (sets `call_hash`).
    pub exact_call: bool,
}

/// `Attenuate`: how to narrow the bound token. Everything is optional; the
/// child keeps the parent's constraints (and task) and adds these.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct Attenuate {
    /// Keep only these tools (all of the parent's when empty).
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub tools: Vec<String>,
    /// Further constraints, applied to every kept tool that has the
    /// parameter.
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub params: Vec<ParamConstraint>,
    pub ttl_secs: Option<u64>,
    pub max_uses: Option<u32>,
}

/// `Revoke`: the token id.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct Revoke {
    pub id: TokenId,
}

/// `Bound`: the bound token's id, task hash and expiry.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct Bound {
    pub id: TokenId,
    pub task: [u8; 32],
    pub expires: u64,
}

/// `Minted`: a new token. `Debug` never shows the token string.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Minted {
    pub token: String,
    pub id: TokenId,
    pub expires: u64,
}

impl fmt::Debug for Minted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Minted")
            .field("token", &"[token]")
            .field("id", &self.id)
            .field("expires", &self.expires)
            .finish()
    }
}

/// `Revoked`: the id now revoked.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct Revoked {
    pub id: TokenId,
}

/// `ToolList`: every tool the connection may call.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct ToolList {
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub tools: Vec<ToolInfo>,
}

/// One entry of the policy a connection may use, and what its parameters
/// must satisfy.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct ToolInfo {
    pub name: String,
    pub description: String,
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub params: Vec<ParamInfo>,
    /// What it is: a tool to `Call`, or a gateway to reach over HTTP
    /// (since protocol version 3; a version-2 peer gets neither the field
    /// nor any gateway).
    pub kind: ToolKind,
}

/// What a [`ToolInfo`] describes.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Debug, Default)]
pub enum ToolKind {
    /// A tool: performed by the broker on a `Call`.
    #[default]
    Tool,
    /// A `[[gateway]]`: an HTTP API a program reaches through `agent-shim
    /// run --gateway NAME` (its `method` and `path` are what a grant
    /// constrains); a `Call` of it is refused.
    Gateway,
}

/// One parameter: type, whether required, and every rule that applies
/// (policy first, then the token's), in words for people and as data for
/// programs (`checks`, `constraints`: what JSON Schemas are built from;
/// since protocol version 2). A secret parameter's default, and every
/// check or constraint that would show a value of it, are left out.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct ParamInfo {
    pub name: String,
    /// `string`, `int`, `bool` or `path`.
    pub ty: String,
    pub required: bool,
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub rules: Vec<String>,
    /// The value used when the call leaves the parameter out.
    pub default: Option<Value>,
    /// The policy's checks.
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub checks: Vec<Check>,
    /// The token's constraints on this parameter.
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub constraints: Vec<Constraint>,
}

/// `Inspect`: the token string to inspect (`Debug` never shows it), or
/// `None` for the connection's bound token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inspect {
    pub token: Option<String>,
}

impl fmt::Debug for Inspect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = self.token.as_ref().map(|_| "[token]");
        f.debug_struct("Inspect").field("token", &shown).finish()
    }
}

/// `Status`: what an admin asks of a running broker. Never a credential
/// value.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct StatusReport {
    /// The broker's version.
    pub version: String,
    /// Unix seconds it started at, and seconds since.
    pub started_at: u64,
    pub uptime_secs: u64,
    /// The configuration file and the socket served.
    pub config: String,
    pub socket: String,
    /// Unix seconds the policy in force was loaded (start or reload) at,
    /// and the blake3 hash of its file's text.
    pub policy_loaded_at: u64,
    pub policy_hash: [u8; 32],
    /// Open sessions (connections and channels), per uid.
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub sessions: Vec<UidSessions>,
    /// Live tokens recorded; `None` when tokens are disabled.
    pub live_tokens: Option<u64>,
    /// Every credential the configuration names, with its state.
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub credentials: Vec<CredentialStatus>,
    /// Calls allowed, denied and failed, and refusals, since start.
    pub calls_allowed: u64,
    pub calls_denied: u64,
    pub calls_failed: u64,
    pub refused: u64,
}

/// Open sessions of one uid.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct UidSessions {
    pub uid: u32,
    pub sessions: u64,
}

/// A credential's name and state (`loaded`, `not loaded`, ...), never
/// its value.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct CredentialStatus {
    pub name: String,
    pub state: String,
}

/// `Tokens`: the live tokens this broker issued.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct TokenList {
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub tokens: Vec<TokenSummary>,
}

/// One issued token, as `Tokens` lists it. `audience`, `task` and
/// `parent` are known for tokens issued since the broker started.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct TokenSummary {
    pub id: TokenId,
    pub issuer: String,
    /// The uid whose request created it.
    pub owner: u32,
    pub audience: Option<Audience>,
    pub task: Option<[u8; 32]>,
    pub parent: Option<TokenId>,
    pub uses: u32,
    pub max_uses: Option<u32>,
    pub expires: u64,
    pub revoked: bool,
}

/// `Inspect`: one token, what it allows and how much is left.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct TokenInfo {
    pub id: TokenId,
    pub issuer: String,
    pub task: [u8; 32],
    pub audience: Audience,
    pub not_before: u64,
    pub expires: u64,
    /// The broker's clock when it answered (for "in 4m 12s").
    pub now: u64,
    pub max_uses: Option<u32>,
    /// Uses counted so far.
    pub uses: u32,
    /// Ancestors, root first.
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub lineage: Vec<TokenId>,
    /// Good for exactly one call.
    pub exact_call: bool,
    /// Why it cannot be used now (expired, revoked, ...), if so.
    pub unusable: Option<String>,
    /// Its grants as the policy in force reads them.
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub tools: Vec<ToolInfo>,
}

/// One of the policy's checks on a parameter, as data.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub enum Check {
    /// A regex the whole value must match (as the policy wrote it,
    /// unanchored: the broker anchors it).
    Pattern(String),
    /// At most this many bytes.
    MaxLen(u64),
    /// One of these values.
    OneOf(#[serde(deserialize_with = "crate::bounded::vec")] Vec<Value>),
    /// An int of at least this.
    Min(i64),
    /// An int of at most this.
    Max(i64),
    /// A string starting with this.
    Prefix(String),
    /// A `path` starting with these whole segments (`reports/` admits
    /// `reports` and `reports/a`, not `reports-evil`).
    PathPrefix(String),
}

/// `Gateway`: one HTTP request for the gateway `gateway`. `Debug` shows
/// no header value and no body.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayRequest {
    pub gateway: String,
    pub method: String,
    /// Path and query, as the program sent them (`/v1/models?limit=2`).
    pub path: String,
    /// The program's request headers (the broker drops the ones about the
    /// connection and every credential header, and sets its own).
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub headers: Vec<Header>,
    /// Length of the whole body.
    pub body_len: u64,
    /// The first bytes of the body; the rest follow in `GatewayBody`.
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub body: Vec<u8>,
}

impl fmt::Debug for GatewayRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayRequest")
            .field("gateway", &self.gateway)
            .field("method", &self.method)
            .field("headers", &self.headers.len())
            .field("body_len", &self.body_len)
            .finish_non_exhaustive()
    }
}

/// `GatewayBody`: more request body.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayBody {
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub data: Vec<u8>,
}

impl fmt::Debug for GatewayBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayBody")
            .field("len", &self.data.len())
            .finish()
    }
}

/// `GatewayInfo`: which gateway.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct GatewayInfoRequest {
    pub gateway: String,
}

/// `GatewayHead`: the upstream's status and response headers.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct GatewayHead {
    pub status: u16,
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub headers: Vec<Header>,
}

/// `GatewayChunk`: response body bytes.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayChunk {
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub data: Vec<u8>,
}

impl fmt::Debug for GatewayChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayChunk")
            .field("len", &self.data.len())
            .finish()
    }
}

/// `GatewayEnd`: the body is complete; its length.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct GatewayEnd {
    pub bytes: u64,
}

/// `GatewayInfo`: how a program finds a gateway. Nothing in it is secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct GatewayInfo {
    pub gateway: String,
    /// Variables to set to the local endpoint's URL followed by
    /// `base_path` (`OPENAI_BASE_URL`).
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub base_url_env: Vec<String>,
    /// Appended to the local URL (`/v1`).
    pub base_path: String,
    /// Variables to set to `placeholder` (`OPENAI_API_KEY`).
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub api_key_env: Vec<String>,
    /// A value that is not a secret, for SDKs that insist on a key.
    pub placeholder: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_errors_map_to_wire_codes() {
        assert_eq!(DecodeError::TooLarge.code(), ErrorCode::TooLarge);
        for err in [
            DecodeError::Empty,
            DecodeError::Truncated,
            DecodeError::TrailingBytes,
            DecodeError::UnknownVariant,
            DecodeError::Malformed,
        ] {
            assert_eq!(ErrorCode::from(err), ErrorCode::Malformed, "{err:?}");
        }
    }
}
