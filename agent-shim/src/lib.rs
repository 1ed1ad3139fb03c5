// SPDX-License-Identifier: Apache-2.0
//! agent-shim: the unprivileged side of keyward.
//!
//! It is the only way a sub-agent reaches the broker: `agent-shim call`
//! asks the broker to perform a tool call and prints the (redacted) result;
//! the sandboxing `run` command comes with its own module.
//!
//! Threat model: the shim runs with the caller's authority and holds no
//! secret. It never sends anything about its own identity: the broker
//! learns who it is from the kernel.
//!
//! Tests: the client is exercised end to end against the real broker in
//! the `tests` package.
#![deny(unsafe_code)]

pub mod client;
