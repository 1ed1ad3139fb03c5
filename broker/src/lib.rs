// SPDX-License-Identifier: Apache-2.0
//! keyward-broker: the privileged daemon that alone holds secrets.
//!
//! Clients connect over an AF_UNIX `SOCK_SEQPACKET` socket; every message
//! carries kernel-verified `SCM_CREDENTIALS`, which are checked against the
//! peer pinned (by pidfd) at connect time. The policy engine authorizes
//! each call on that kernel identity alone, an executor performs it with
//! the credential injected, and the result is redacted before it leaves
//! (or withheld whole if a fragment of a credential remains in it).
//! Every decision is an audit record.
//!
//! Threat model: peers are untrusted local processes. They must not get a
//! credential (directly, echoed by an upstream, or in an encoded form), act
//! outside policy, or stall the broker for others.
//!
//! Tests: unit tests beside each module; end-to-end tests in the `tests`
//! package start the real binary and attack it.
#![deny(unsafe_code)]

pub mod access;
pub mod admin;
pub mod audit;
pub mod broker;
pub mod config;
pub mod config_doc;
pub mod credential;
pub mod daemon;
pub mod error_chain;
pub mod executor;
pub mod gateway;
pub mod journal;
pub mod keys;
pub mod leak;
pub mod limits;
pub mod listener;
pub mod manual;
pub mod notify;
pub mod param;
pub mod peer;
pub mod percent;
pub mod policy;
pub mod redact;
pub mod reload;
pub mod server;
pub mod session;
pub mod state;
pub mod status;
pub mod sys;
pub mod template;
pub mod token;
pub mod tool;
pub mod unit;
pub mod warnings;

pub use broker::Broker;
pub use server::serve;

/// Everything that can stop the broker from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Policy(Vec<config::Located>),
    #[error(transparent)]
    Credential(#[from] credential::CredentialError),
    #[error(transparent)]
    Listener(#[from] listener::ListenerError),
    #[error(transparent)]
    Executor(#[from] executor::ExecError),
    #[error(transparent)]
    Limits(#[from] limits::LimitsError),
    #[error(transparent)]
    Sys(#[from] sys::SysError),
    #[error(transparent)]
    Tokens(#[from] token::TokenSetupError),
    #[error(transparent)]
    Pinning(#[from] peer::PinSetupError),
    #[error(transparent)]
    UnitFile(#[from] unit::UnitError),
    #[error("the configuration cannot work as installed:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Unit(Vec<String>),
}
