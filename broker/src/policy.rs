// SPDX-License-Identifier: Apache-2.0
//! The policy engine: who may call which tool with which parameters.
//!
//! [`Policy::compile`] turns a parsed [`crate::config::Source`] into a
//! checked policy (every error located), and [`Policy::authorize`] decides
//! one call on the caller's kernel-supplied uid/gid alone. Deny by default:
//! a caller no principal lists, an unknown tool, an unknown, missing or
//! ill-typed parameter, or a failed validator is a [`Denial`] that names the
//! tool, the parameter and the rule in one sentence.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use keyward_proto::Call;

use crate::config::{Located, ParamType, Source};
use crate::executor::http::HttpTool;

/// The compiled policy.
#[derive(Debug)]
pub struct Policy {
    pub broker: BrokerSettings,
    principals: Vec<Principal>,
    tools: BTreeMap<String, Arc<Tool>>,
}

/// `[broker]` with defaults applied and values checked.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub socket: PathBuf,
    pub socket_mode: u32,
    pub socket_group: Option<String>,
    pub credentials_dir: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub max_token_ttl: Duration,
    pub call_timeout: Duration,
    pub max_response_bytes: usize,
    pub max_connections_per_uid: usize,
}

/// A principal: a set of uids/gids and what they may do.
#[derive(Debug)]
pub struct Principal {
    pub name: String,
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    pub may_call: Vec<String>,
    pub may_delegate: Vec<String>,
}

/// A compiled tool.
#[derive(Debug)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// Name of the credential it uses, if any.
    pub credential: Option<String>,
    pub params: BTreeMap<String, ParamSpec>,
    pub action: Action,
}

/// What performing the tool means.
#[derive(Debug)]
pub enum Action {
    /// Return the parameters as a JSON object (no network, no credential).
    Echo,
    Http(HttpTool),
}

/// A parameter's type, validators, default and secrecy.
#[derive(Debug)]
pub struct ParamSpec {
    pub ty: ParamType,
    pub rules: Vec<Rule>,
    pub default: Option<TypedValue>,
    pub secret: bool,
}

/// A validator.
#[derive(Debug)]
pub enum Rule {
    /// Anchored regex over the whole string.
    Pattern(regex::Regex),
    MaxLen(usize),
    OneOf(Vec<TypedValue>),
    Min(i64),
    Max(i64),
    Prefix(String),
}

/// A parameter value after conversion to the declared type. `Debug` never
/// shows a string's content.
#[derive(Clone, PartialEq, Eq)]
pub enum TypedValue {
    Str(String),
    Int(i64),
    Bool(bool),
}

impl std::fmt::Debug for TypedValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TypedValue::Str(s) => write!(f, "<string, {} bytes>", s.len()),
            TypedValue::Int(i) => write!(f, "{i}"),
            TypedValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

impl TypedValue {
    /// The value as text, for templates that interpolate into a string.
    pub fn to_text(&self) -> String {
        match self {
            TypedValue::Str(s) => s.clone(),
            TypedValue::Int(i) => i.to_string(),
            TypedValue::Bool(b) => b.to_string(),
        }
    }

    /// The value as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            TypedValue::Str(s) => serde_json::Value::String(s.clone()),
            TypedValue::Int(i) => serde_json::Value::from(*i),
            TypedValue::Bool(b) => serde_json::Value::Bool(*b),
        }
    }
}

/// The caller as the kernel reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// A call that passed policy: the tool and every declared parameter,
/// typed, validated, defaults filled in.
#[derive(Debug, Clone)]
pub struct AuthorizedCall {
    pub tool: Arc<Tool>,
    pub principal: String,
    pub params: BTreeMap<String, TypedValue>,
}

/// A policy denial: one sentence, safe to show the caller and to audit
/// (secret parameter values never appear in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub reason: String,
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl Policy {
    /// Check and compile a parsed configuration. Returns every error found,
    /// each with its file, line and entry.
    pub fn compile(_src: &Source) -> Result<Policy, Vec<Located>> {
        todo!("policy compile")
    }

    /// Decide one call on the caller's kernel identity.
    pub fn authorize(&self, _caller: &Caller, _call: &Call) -> Result<AuthorizedCall, Denial> {
        todo!("policy authorize")
    }

    /// A tool by name.
    pub fn tool(&self, name: &str) -> Option<&Arc<Tool>> {
        self.tools.get(name)
    }

    /// Every tool, by name.
    pub fn tools(&self) -> impl Iterator<Item = &Arc<Tool>> {
        self.tools.values()
    }

    /// The principals that match a caller.
    pub fn principals_of<'a>(&'a self, caller: &'a Caller) -> impl Iterator<Item = &'a Principal> {
        self.principals
            .iter()
            .filter(move |p| p.uids.contains(&caller.uid) || p.gids.contains(&caller.gid))
    }
}
