// SPDX-License-Identifier: Apache-2.0
//! Tool kinds: what a `[[tool]]` entry does, one home per kind.
//!
//! A kind is three things in its own file (or folder): its configuration
//! (a `serde` struct of the fields it adds to a `[[tool]]` entry, parsed
//! with `deny_unknown_fields` by [`Definition::fields`]), its compiled form
//! (a type implementing [`Action`]), and its execution
//! ([`Action::run`]). The policy compiler looks the entry's `kind` up in
//! [`KINDS`] and calls its [`Kind::compile`]; the executor calls
//! [`Action::run`] on a call the policy allowed. Adding a kind is its own
//! module here plus one line in [`KINDS`]: nothing in policy, executor or
//! session names a kind.
//!
//! The contract of [`Action::run`]:
//! - every parameter in [`Invocation::params`] is declared, typed and has
//!   passed its rules, and none carries credential material (the executor
//!   checked); a kind places each value as data (one URL segment, one
//!   argv element, one bind value), never as code;
//! - the kind alone touches the credential's value ([`Context::credentials`]),
//!   bounds its own time and output, and judges what it returns with the
//!   leak scanner (`Context::credentials.scanner()`): material found is
//!   [`ExecError::Withheld`], never a partial redaction;
//! - errors are messages safe to return to the caller (redacted).
//!
//! Layering: kinds import templates, parameters, credentials and the leak
//! scanner below them; policy imports kinds (to compile), the executor
//! imports both. Nothing here imports policy or executor.

pub mod aws_sts;
pub mod echo;
pub mod exec;
pub mod http;
pub mod sql;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use keyward_proto::CallResult;
use serde::de::DeserializeOwned;

use crate::credential::Credentials;
use crate::param::{ParamSpec, TypedValue};

/// Every kind of tool the broker can perform: one line each.
pub const KINDS: &[Kind] = &[echo::KIND, http::KIND, exec::KIND, sql::KIND, aws_sts::KIND];

/// A kind by its `kind = "..."` name.
pub fn kind(name: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.name == name)
}

/// The names of every kind, for an error message.
pub fn kind_names() -> String {
    KINDS
        .iter()
        .map(|k| format!("{:?}", k.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One kind of tool: its name in the configuration and its compiler.
pub struct Kind {
    pub name: &'static str,
    /// Check and compile a `[[tool]]` entry of this kind. Errors are
    /// messages that start with the field they are about
    /// (`url: placeholder {x} names no parameter`), so that the policy
    /// compiler can locate them on the line that sets the field.
    pub compile: Compile,
}

impl fmt::Debug for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kind").field("name", &self.name).finish()
    }
}

/// A kind's compiler: a definition to its compiled tool, or the messages
/// of every error found.
pub type Compile = fn(&Definition<'_>) -> Result<Box<dyn Action>, Vec<String>>;

/// A compiled tool of some kind: performs a call the policy allowed.
pub trait Action: fmt::Debug + Send + Sync {
    /// The kind's name, as in [`Kind::name`].
    fn kind(&self) -> &'static str;

    /// Perform one call. See the module documentation for the contract.
    fn run<'a>(&'a self, call: Invocation<'a>, context: Context<'a>) -> Running<'a>;

    /// `(credential, user)` when the tool sends its credential as an HTTP
    /// Basic `user:secret` pair, which redaction must know as a whole.
    fn basic_user(&self) -> Option<(&str, &str)> {
        None
    }

    /// Whether the tool's credential must be an AWS key
    /// (`kind = "aws"`), which it signs with rather than sends.
    fn uses_aws_key(&self) -> bool {
        false
    }
}

/// A call in progress.
pub type Running<'a> = Pin<Box<dyn Future<Output = Result<CallResult, ExecError>> + Send + 'a>>;

/// A `[[tool]]` entry as its kind's compiler sees it: the common fields,
/// the compiled parameters, and its own fields still to parse.
#[derive(Debug)]
pub struct Definition<'a> {
    pub name: &'a str,
    pub kind: &'a str,
    /// The `[credential.NAME]` it uses (checked to exist by the policy).
    pub credential: Option<&'a str>,
    pub params: &'a BTreeMap<String, ParamSpec>,
    /// The entry's other fields.
    pub fields: &'a toml::Table,
    pub defaults: Defaults,
}

/// Broker-wide defaults a kind may use.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    /// `broker.call_timeout`.
    pub timeout: Duration,
    /// `broker.max_response_bytes`.
    pub max_response_bytes: usize,
}

impl Definition<'_> {
    /// Parse the kind's own fields. A field the kind does not have is
    /// `FIELD: not allowed for kind "KIND"`; a value of the wrong type is
    /// `FIELD: invalid type ...`. Every field of a kind must be optional
    /// (an `Option` or `#[serde(default)]`), and required ones checked by
    /// its compiler, so that each field can be judged alone.
    pub fn fields<T: DeserializeOwned>(&self) -> Result<T, Vec<String>> {
        toml::Value::Table(self.fields.clone())
            .try_into()
            .map_err(|e: toml::de::Error| {
                let message = e.message().trim().to_owned();
                match message
                    .strip_prefix("unknown field `")
                    .and_then(|rest| rest.split_once('`'))
                {
                    Some((field, _)) => {
                        vec![format!("{field}: not allowed for kind {:?}", self.kind)]
                    }
                    None => vec![self.field_error::<T>(&message)],
                }
            })
    }
}

impl Definition<'_> {
    /// A type error, put on the field it is about when one field alone
    /// shows it (a kind's fields are all optional, so each parses alone).
    fn field_error<T: DeserializeOwned>(&self, message: &str) -> String {
        for (key, value) in self.fields {
            let mut alone = toml::Table::new();
            alone.insert(key.clone(), value.clone());
            if let Err(e) = toml::Value::Table(alone).try_into::<T>() {
                return format!("{key}: {}", e.message().trim());
            }
        }
        format!("{message} (in a tool of kind {:?})", self.kind)
    }
}

/// One call to perform.
#[derive(Debug, Clone, Copy)]
pub struct Invocation<'a> {
    /// The tool's name, for messages.
    pub tool: &'a str,
    /// Every declared parameter, typed, validated, defaults filled in.
    pub params: &'a BTreeMap<String, TypedValue>,
}

/// What a kind may use while it runs.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub credentials: &'a Credentials,
    /// Who the call is made for: the principal, and the bound token when
    /// the call comes through one.
    pub caller: CallerScope<'a>,
}

/// Who a call is made for, for kinds whose result outlives the call
/// (`aws_sts`: credentials no longer-lived than the token, named after it).
#[derive(Debug, Clone, Copy, Default)]
pub struct CallerScope<'a> {
    pub principal: &'a str,
    /// The bound token's id (hex), when the call comes through one.
    pub token_id: Option<&'a str>,
    /// The bound token's expiry (unix seconds).
    pub token_expires: Option<u64>,
}

/// Why a call that policy allowed still failed. Messages are already
/// redacted and safe to return to the caller.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// A parameter value is not acceptable where the template places it
    /// (e.g. a header value with a newline, a `..` path segment). This is a
    /// denial, reported to the caller as such.
    #[error("{0}")]
    Rejected(String),
    #[error("upstream request failed: {0}")]
    Upstream(String),
    /// The response carries credential material (or cannot be checked
    /// for it): nothing of it is returned.
    #[error("withheld: {0}")]
    Withheld(crate::leak::Leak),
    #[error("upstream did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("upstream response exceeds the {0}-byte limit")]
    TooLarge(usize),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    /// The broker itself is at fault (e.g. a credential the policy names
    /// was not loaded), not the upstream or the caller.
    #[error("internal broker error: {0}")]
    Internal(String),
    /// The credential cannot be used now (e.g. an OAuth credential whose
    /// refresh token was rejected); the message says why and what to do.
    #[error("{0}")]
    Credential(String),
}

/// Run CPU-bound `op` where it does not stall other sessions' I/O: on a
/// multi-threaded runtime the worker hands its other tasks off first.
pub(crate) fn off_reactor<T>(op: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(op),
        _ => op(),
    }
}
