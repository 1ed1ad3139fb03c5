// SPDX-License-Identifier: Apache-2.0
//! The message types. Variant order is part of the wire format: append new
//! variants at the end, never reorder or remove.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What a client sends.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub enum Request {
    /// First message on every connection.
    Hello(Hello),
    /// Perform a tool call with the caller's authority.
    Call(Call),
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
}

/// Version exchange.
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

/// A parameter value. Clients that do not know a tool's types send
/// [`Value::Str`]; the broker converts according to the tool's policy.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
}

impl Value {
    /// The type name, for messages that must not show the value itself.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Str(_) => "string",
            Value::Int(_) => "int",
            Value::Bool(_) => "bool",
        }
    }
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{}>", self.kind())
    }
}

/// The result of a performed call, already redacted by the broker.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallResult {
    /// Upstream status (HTTP status for `http` tools, 200 for built-ins).
    pub status: u16,
    #[serde(deserialize_with = "crate::bounded::vec")]
    pub headers: Vec<Header>,
    #[serde(deserialize_with = "crate::bounded::bytes")]
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
