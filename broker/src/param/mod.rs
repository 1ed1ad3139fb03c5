// SPDX-License-Identifier: Apache-2.0
//! Parameters below policy and tools: a value typed as its parameter
//! declares ([`TypedValue`]), the compiled declaration ([`ParamSpec`],
//! [`Rule`]) and the URL path segment rules ([`path`]). Templates, tool
//! kinds and the policy engine all build on these; nothing here imports
//! them back.

use crate::config::ParamType;

pub mod path;

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
    /// A `path` parameter's value is a relative path of plain segments
    /// ([`path::check_path`]); always its first rule.
    Segments,
    /// A `path` parameter's prefix: whole segments ([`path::has_prefix`]),
    /// in [`path::canonical_prefix`] form.
    PathPrefix(String),
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
    /// The value on the wire.
    pub fn to_wire(&self) -> keyward_proto::Value {
        match self {
            TypedValue::Str(s) => keyward_proto::Value::Str(s.clone()),
            TypedValue::Int(i) => keyward_proto::Value::Int(*i),
            TypedValue::Bool(b) => keyward_proto::Value::Bool(*b),
        }
    }

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
