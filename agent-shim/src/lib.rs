// SPDX-License-Identifier: Apache-2.0
//! agent-shim: the unprivileged side of keyward.
//!
//! It is the only way a sub-agent reaches the broker: `agent-shim call`
//! asks the broker to perform a tool call and prints the (redacted) result;
//! `agent-shim run` binds a token to a broker connection, then runs the
//! sub-agent in a sandbox ([`sandbox`]: its own namespaces where the kernel
//! allows, [`landlock`] and [`seccomp`] always) whose only way out is that
//! connection.
//!
//! Threat model: the shim runs with the caller's authority and holds no
//! secret. It never sends anything about its own identity: the broker
//! learns who it is from the kernel. The program under `run` is hostile:
//! it may only make the calls the bound token allows, and cannot open
//! another connection, read the broker's files or memory, or act on any
//! process outside the sandbox.
//!
//! Tests: the client is exercised end to end against the real broker in
//! the `tests` package; each sandbox layer is unit-tested in a thread of
//! its own; `tests/tests/attacks.rs` runs hostile programs under `run`.
#![deny(unsafe_code)]

pub mod cli;
pub mod client;
pub mod gateway;
pub mod grant;
pub mod landlock;
pub mod manual;
pub mod mcp;
pub mod sandbox;
pub mod schema;
pub mod seccomp;
mod sys;
