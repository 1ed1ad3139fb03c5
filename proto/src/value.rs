// SPDX-License-Identifier: Apache-2.0
//! A parameter value: what a call carries and what a token constraint
//! names. Below both [`crate::message`] and [`crate::token`], so neither
//! imports the other for it.

use std::fmt;

use serde::{Deserialize, Serialize};

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
