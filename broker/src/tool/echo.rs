// SPDX-License-Identifier: Apache-2.0
//! `kind = "echo"`: returns its parameters as a JSON object. No network
//! and no credential; it exists to check wiring and to benchmark the
//! broker's own overhead.

use keyward_proto::CallResult;
use serde::Deserialize;

use crate::param::TypedValue;

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

/// The parameters as a JSON object, keys in order: byte for byte what
/// serde_json prints for them as a `serde_json::Value` object (a test
/// compares the two), written straight into the body instead of through a
/// map of cloned strings (this is the benchmarked call).
pub fn execute(call: Invocation<'_>) -> CallResult {
    let size: usize = call
        .params
        .iter()
        .map(|(name, value)| {
            name.len()
                + 4
                + match value {
                    TypedValue::Str(s) => s.len() + 2,
                    TypedValue::Int(_) | TypedValue::Bool(_) => 20,
                }
        })
        .sum();
    let mut body = Vec::with_capacity(size + 2);
    body.push(b'{');
    for (i, (name, value)) in call.params.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        json_string(&mut body, name);
        body.push(b':');
        match value {
            TypedValue::Str(s) => json_string(&mut body, s),
            // Writing into a Vec cannot fail.
            TypedValue::Int(n) => {
                let _ = serde_json::to_writer(&mut body, n);
            }
            TypedValue::Bool(b) => body.extend_from_slice(if *b { b"true" } else { b"false" }),
        }
    }
    body.push(b'}');
    CallResult {
        status: 200,
        headers: Vec::new(),
        body,
    }
}

/// A JSON string, escaped as serde_json escapes it.
fn json_string(out: &mut Vec<u8>, s: &str) {
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// What `execute` printed before: the parameters as a
    /// `serde_json::Value` object.
    fn through_serde(params: &BTreeMap<String, TypedValue>) -> Vec<u8> {
        let body: serde_json::Map<String, serde_json::Value> = params
            .iter()
            .map(|(name, value)| (name.clone(), value.to_json()))
            .collect();
        serde_json::Value::Object(body).to_string().into_bytes()
    }

    #[test]
    fn the_body_is_what_serde_json_prints() {
        let cases: Vec<Vec<(&str, TypedValue)>> = vec![
            vec![],
            vec![("message", TypedValue::Str("ping".into()))],
            vec![
                ("z", TypedValue::Int(i64::MIN)),
                ("a", TypedValue::Bool(true)),
                ("m", TypedValue::Int(0)),
                ("b", TypedValue::Bool(false)),
                ("n", TypedValue::Int(i64::MAX)),
            ],
            vec![
                (
                    "q\"uote\\",
                    TypedValue::Str("\u{0}\u{1f}\n\t\"\\/é😀\u{7f}".into()),
                ),
                ("é", TypedValue::Str(String::new())),
                ("K", TypedValue::Str("</script>&amp;".into())),
            ],
        ];
        for case in cases {
            let params: BTreeMap<String, TypedValue> =
                case.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            let body = execute(Invocation {
                tool: "echo",
                params: &params,
            })
            .body;
            assert_eq!(
                String::from_utf8(body).unwrap(),
                String::from_utf8(through_serde(&params)).unwrap()
            );
        }
    }
}
