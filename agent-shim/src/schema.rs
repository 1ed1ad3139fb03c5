// SPDX-License-Identifier: Apache-2.0
//! JSON Schemas of the tools a caller may use, built from the broker's
//! structured description ([`ToolInfo`]: the policy's checks and the token's
//! constraints as data), for `agent-shim mcp` and `tools --json-schema`.
//!
//! The schema narrows like the broker does: the token's pinned value is a
//! `const`, its prefix a `pattern`, its `one_of` an `enum` (intersected
//! with the policy's), its range `minimum`/`maximum` (intersected). More
//! than one pattern on a parameter go in an `allOf`. A value the schema
//! refuses the broker refuses too, and for ASCII values the converse holds
//! for type, pattern, length, enum and range; the broker stays the judge
//! (`maxLength` counts characters where the broker counts bytes, and the
//! path segment rules are stricter than the schema's pattern).
//!
//! Regexes are passed on as the policy wrote them (Rust `regex` syntax),
//! anchored; prefixes are escaped with the syntax characters that
//! ECMA-262, Python and Rust all accept escaped.

use keyward_proto::token::Constraint;
use keyward_proto::{Check, ParamInfo, ToolInfo, ToolKind, Value};
use serde_json::{json, Map, Value as Json};

/// A `path` value: one or more non-empty segments joined by `/`.
const PATH_PATTERN: &str = "^[^/]+(?:/[^/]+)*$";

/// The input schema of `tool`: an object of its parameters.
pub fn input_schema(tool: &ToolInfo) -> Map<String, Json> {
    let mut properties = Map::new();
    let mut required = Vec::new();
    for param in &tool.params {
        properties.insert(param.name.clone(), Json::Object(param_schema(param)));
        if param.required {
            required.push(Json::String(param.name.clone()));
        }
    }
    let mut schema = Map::new();
    schema.insert("type".into(), "object".into());
    schema.insert("properties".into(), Json::Object(properties));
    schema.insert("required".into(), Json::Array(required));
    schema.insert("additionalProperties".into(), false.into());
    schema
}

/// `tools --json-schema`: every tool with its name, description and
/// input schema, as MCP lists them (gateways left out).
pub fn tools_json(tools: &[ToolInfo]) -> Json {
    Json::Array(
        callable(tools)
            .map(|tool| {
                json!({
                    "name": tool.name,
                    "description": tool.description,
                    "inputSchema": input_schema(tool),
                })
            })
            .collect(),
    )
}

/// The entries a `Call` can perform: tools, not gateways (a program
/// reaches those over HTTP through `agent-shim run --gateway`).
pub fn callable(tools: &[ToolInfo]) -> impl Iterator<Item = &ToolInfo> {
    tools.iter().filter(|t| t.kind == ToolKind::Tool)
}

/// A wire value as JSON.
pub fn value_json(value: &Value) -> Json {
    match value {
        Value::Str(s) => Json::String(s.clone()),
        Value::Int(i) => Json::from(*i),
        Value::Bool(b) => Json::Bool(*b),
    }
}

/// What the schema of one parameter says, gathered before it is written.
#[derive(Default)]
struct Narrowing {
    patterns: Vec<String>,
    max_len: Option<u64>,
    min: Option<i64>,
    max: Option<i64>,
    one_of: Option<Vec<Value>>,
    exact: Option<Value>,
}

impl Narrowing {
    fn one_of(&mut self, values: &[Value]) {
        self.one_of = Some(match self.one_of.take() {
            None => values.to_vec(),
            Some(old) => old.into_iter().filter(|v| values.contains(v)).collect(),
        });
    }
    fn min(&mut self, n: i64) {
        self.min = Some(self.min.map_or(n, |m| m.max(n)));
    }
    fn max(&mut self, n: i64) {
        self.max = Some(self.max.map_or(n, |m| m.min(n)));
    }
}

fn param_schema(param: &ParamInfo) -> Map<String, Json> {
    let is_path = param.ty == "path";
    let ty = match param.ty.as_str() {
        "int" => "integer",
        "bool" => "boolean",
        _ => "string",
    };
    let mut n = Narrowing::default();
    if is_path {
        n.patterns.push(PATH_PATTERN.to_owned());
    }
    for check in &param.checks {
        match check {
            Check::Pattern(p) => n.patterns.push(anchored(p)),
            Check::MaxLen(len) => n.max_len = Some(n.max_len.map_or(*len, |m| m.min(*len))),
            Check::OneOf(values) => n.one_of(values),
            Check::Min(v) => n.min(*v),
            Check::Max(v) => n.max(*v),
            Check::Prefix(p) => n.patterns.push(prefix_pattern(p)),
            Check::PathPrefix(p) => n.patterns.push(path_prefix_pattern(p)),
        }
    }
    for constraint in &param.constraints {
        match constraint {
            Constraint::Exact(v) => n.exact = Some(v.clone()),
            Constraint::OneOf(values) => n.one_of(values),
            Constraint::Prefix(p) if is_path => n.patterns.push(path_prefix_pattern(p)),
            Constraint::Prefix(p) => n.patterns.push(prefix_pattern(p)),
            Constraint::Pattern(p) => n.patterns.push(anchored(p)),
            Constraint::Range { min, max } => {
                n.min(*min);
                n.max(*max);
            }
            Constraint::Any => {}
        }
    }

    let mut s = Map::new();
    s.insert("type".into(), ty.into());
    if !param.rules.is_empty() {
        s.insert("description".into(), param.rules.join("; ").into());
    }
    if let Some(v) = &n.exact {
        s.insert("const".into(), value_json(v));
    }
    if let Some(values) = &n.one_of {
        s.insert("enum".into(), values.iter().map(value_json).collect());
    }
    if let Some(len) = n.max_len {
        s.insert("maxLength".into(), len.into());
    }
    if let Some(v) = n.min {
        s.insert("minimum".into(), v.into());
    }
    if let Some(v) = n.max {
        s.insert("maximum".into(), v.into());
    }
    let mut patterns = n.patterns.into_iter();
    if let Some(first) = patterns.next() {
        s.insert("pattern".into(), first.into());
        let rest: Vec<Json> = patterns.map(|p| json!({ "pattern": p })).collect();
        if !rest.is_empty() {
            s.insert("allOf".into(), rest.into());
        }
    }
    if let Some(v) = &param.default {
        s.insert("default".into(), value_json(v));
    }
    s
}

/// JSON Schema's `pattern` matches anywhere; the broker's whole value.
fn anchored(pattern: &str) -> String {
    format!("^(?:{pattern})$")
}

fn prefix_pattern(prefix: &str) -> String {
    format!("^{}", escape(prefix))
}

/// Whole segments: `reports/` admits `reports` and `reports/a`, not
/// `reports-evil`.
fn path_prefix_pattern(prefix: &str) -> String {
    let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
    if trimmed.is_empty() {
        return "^".to_owned();
    }
    format!("^{}(?:/|$)", escape(trimmed))
}

/// Escape the regex syntax characters, and only those (ECMA-262 in
/// unicode mode refuses other escapes).
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "^$\\.*+?()[]{}|/".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn param(ty: &str, checks: Vec<Check>, constraints: Vec<Constraint>) -> ParamInfo {
        ParamInfo {
            name: "p".into(),
            ty: ty.into(),
            required: true,
            rules: vec![],
            default: None,
            checks,
            constraints,
        }
    }

    #[test]
    fn token_constraints_narrow_the_policy() {
        let s = param_schema(&param(
            "int",
            vec![
                Check::Min(0),
                Check::Max(100),
                Check::OneOf(vec![Value::Int(1), Value::Int(5), Value::Int(50)]),
            ],
            vec![
                Constraint::Range { min: 2, max: 60 },
                Constraint::OneOf(vec![Value::Int(5), Value::Int(50), Value::Int(7)]),
            ],
        ));
        assert_eq!(s["type"], "integer");
        assert_eq!(s["minimum"], 2);
        assert_eq!(s["maximum"], 60);
        assert_eq!(s["enum"], json!([5, 50]));
    }

    #[test]
    fn pinned_value_is_const_and_patterns_all_apply() {
        let s = param_schema(&param(
            "string",
            vec![Check::Pattern("[a-z.]+".into()), Check::MaxLen(9)],
            vec![
                Constraint::Exact(Value::Str("a.b".into())),
                Constraint::Prefix("a.(".into()),
            ],
        ));
        assert_eq!(s["const"], "a.b");
        assert_eq!(s["pattern"], "^(?:[a-z.]+)$");
        assert_eq!(s["allOf"], json!([{ "pattern": "^a\\.\\(" }]));
        assert_eq!(s["maxLength"], 9);
    }

    #[test]
    fn path_prefix_is_whole_segments() {
        let s = param_schema(&param(
            "path",
            vec![],
            vec![Constraint::Prefix("reports/".into())],
        ));
        assert_eq!(s["type"], "string");
        assert_eq!(s["allOf"], json!([{ "pattern": "^reports(?:/|$)" }]));
        let re = regex::Regex::new("^reports(?:/|$)").unwrap();
        assert!(re.is_match("reports") && re.is_match("reports/a"));
        assert!(!re.is_match("reports-evil/a"));
    }
}
