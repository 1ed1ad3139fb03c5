// SPDX-License-Identifier: Apache-2.0
//! `kind = "echo"`: returns its parameters as a JSON object. No network
//! and no credential; it exists to check wiring and to benchmark the
//! broker's own overhead.

use keyward_proto::CallResult;
use serde::Deserialize;

use super::{Action, Context, Definition, Invocation, Kind, Running};

pub const KIND: Kind = Kind {
    name: "echo",
    compile,
};

/// An echo tool has no fields of its own.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EchoFields {}

/// A compiled echo tool.
#[derive(Debug)]
pub struct Echo;

fn compile(def: &Definition<'_>) -> Result<Box<dyn Action>, Vec<String>> {
    let mut errors = Vec::new();
    if def.credential.is_some() {
        errors.push("credential: not allowed for kind \"echo\"".to_owned());
    }
    if let Err(e) = def.fields::<EchoFields>() {
        errors.extend(e);
    }
    if errors.is_empty() {
        Ok(Box::new(Echo))
    } else {
        Err(errors)
    }
}

impl Action for Echo {
    fn kind(&self) -> &'static str {
        KIND.name
    }

    fn run<'a>(&'a self, call: Invocation<'a>, _context: Context<'a>) -> Running<'a> {
        Box::pin(async move { Ok(execute(call)) })
    }
}

/// The parameters as a JSON object.
pub fn execute(call: Invocation<'_>) -> CallResult {
    let body: serde_json::Map<String, serde_json::Value> = call
        .params
        .iter()
        .map(|(name, value)| (name.clone(), value.to_json()))
        .collect();
    CallResult {
        status: 200,
        headers: Vec::new(),
        body: serde_json::Value::Object(body).to_string().into_bytes(),
    }
}
