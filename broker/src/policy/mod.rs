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

mod compile;

pub(crate) use compile::compile_pattern;

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
    /// Uids allowed to revoke any token (root always may).
    pub admin_uids: Vec<u32>,
    /// Credential holding the token-signing key, instead of a generated
    /// one in the state directory.
    pub signing_key: Option<String>,
    /// Per-uid caps of the token state.
    pub token_limits: crate::state::Limits,
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
// One per tool, behind the tool's `Arc`: the size of the `Echo` variant
// costs nothing worth a `Box` and the churn it would cause in executors.
#[allow(clippy::large_enum_variant)]
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
    pub fn compile(src: &Source) -> Result<Policy, Vec<Located>> {
        compile::compile(src)
    }

    /// Decide one call on the caller's kernel identity.
    pub fn authorize(&self, caller: &Caller, call: &Call) -> Result<AuthorizedCall, Denial> {
        let matching: Vec<&Principal> = self.principals_of(caller).collect();
        if matching.is_empty() {
            return Err(deny(format_args!(
                "uid {} (gid {}) is not a principal in the broker policy",
                caller.uid, caller.gid
            )));
        }
        let tool = self
            .tools
            .get(call.tool.as_str())
            .ok_or_else(|| deny(format_args!("unknown tool {}", show_str(&call.tool))))?;
        let principal = matching
            .iter()
            .find(|p| p.may_call.iter().any(|t| *t == tool.name))
            .ok_or_else(|| {
                let names: Vec<String> = matching.iter().map(|p| format!("{:?}", p.name)).collect();
                let noun = if names.len() == 1 {
                    "principal"
                } else {
                    "principals"
                };
                deny(format_args!(
                    "{noun} {} may not call tool {:?}",
                    names.join(", "),
                    tool.name
                ))
            })?;
        let params = tool.check_params(&call.params)?;
        Ok(AuthorizedCall {
            tool: Arc::clone(tool),
            principal: principal.name.clone(),
            params,
        })
    }

    /// A tool by name.
    pub fn tool(&self, name: &str) -> Option<&Arc<Tool>> {
        self.tools.get(name)
    }

    /// A principal by name.
    pub fn principal(&self, name: &str) -> Option<&Principal> {
        self.principals.iter().find(|p| p.name == name)
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

/// Largest `max_response_bytes`: a response must fit, with its framing, in
/// one [`keyward_proto::MAX_MESSAGE`] (64 KiB) wire message.
pub const MAX_RESPONSE_BYTES_LIMIT: usize = 60 * 1024;

/// How much of a peer-supplied string a denial shows, in chars.
const SHOWN_CHARS: usize = 64;

impl Tool {
    /// Convert and validate one parameter value: the parameter must exist,
    /// the value must have its type and pass its rules. Returns the
    /// declared name and the typed value.
    pub fn check_param<'t>(
        &'t self,
        name: &str,
        value: &keyward_proto::Value,
    ) -> Result<(&'t str, TypedValue), Denial> {
        let Some((name, spec)) = self.params.get_key_value(name) else {
            return Err(deny(format_args!(
                "tool {:?} has no parameter {}",
                self.name,
                show_str(name)
            )));
        };
        let value = convert(spec.ty, value).ok_or_else(|| {
            deny(format_args!(
                "parameter {name:?} of tool {:?} must be {}",
                self.name,
                type_with_article(spec.ty)
            ))
        })?;
        check_value(&spec.rules, &value).map_err(|failure| match failure {
            Failure::Nul => deny(format_args!(
                "parameter {name:?} of tool {} contains a NUL byte",
                self.name
            )),
            Failure::Rule(rule) => deny(format_args!(
                "parameter {name:?} = {} {} of tool {}",
                show_value(&value, spec.secret),
                describe_rule(rule, spec.secret),
                self.name
            )),
        })?;
        Ok((name.as_str(), value))
    }

    /// Convert and validate a call's parameters against this tool: every
    /// parameter declared, known, given once, of the right type and passing
    /// its rules; defaults filled in. Never shows a secret parameter's value.
    pub fn check_params(
        &self,
        given: &[keyward_proto::Param],
    ) -> Result<BTreeMap<String, TypedValue>, Denial> {
        let mut params = BTreeMap::new();
        for param in given {
            let (name, value) = self.check_param(&param.name, &param.value)?;
            if params.contains_key(name) {
                return Err(deny(format_args!(
                    "parameter {name:?} of tool {:?} is given more than once",
                    self.name
                )));
            }
            params.insert(name.to_owned(), value);
        }
        let mut missing = Vec::new();
        for (name, spec) in &self.params {
            if params.contains_key(name) {
                continue;
            }
            match &spec.default {
                Some(default) => {
                    params.insert(name.clone(), default.clone());
                }
                None => missing.push(format!("{name:?}")),
            }
        }
        match missing.len() {
            0 => Ok(params),
            1 => Err(deny(format_args!(
                "parameter {} of tool {:?} is required",
                missing.join(""),
                self.name
            ))),
            _ => Err(deny(format_args!(
                "parameters {} of tool {:?} are required",
                missing.join(", "),
                self.name
            ))),
        }
    }
}

fn deny(reason: std::fmt::Arguments<'_>) -> Denial {
    Denial {
        reason: format!("call denied: {reason}"),
    }
}

/// A peer-supplied string for a message: escaped (no newline or control
/// character gets through) and cut to [`SHOWN_CHARS`] chars.
pub(crate) fn show_str(s: &str) -> String {
    match s.char_indices().nth(SHOWN_CHARS) {
        // `cut` is a char boundary: it comes from `char_indices`.
        Some((cut, _)) => format!("{:?}...", s.get(..cut).unwrap_or_default()),
        None => format!("{s:?}"),
    }
}

fn show_value(value: &TypedValue, secret: bool) -> String {
    if secret {
        return "[secret]".to_owned();
    }
    match value {
        TypedValue::Str(s) => show_str(s),
        TypedValue::Int(i) => i.to_string(),
        TypedValue::Bool(b) => b.to_string(),
    }
}

pub(crate) fn type_name(ty: ParamType) -> &'static str {
    match ty {
        ParamType::String => "string",
        ParamType::Int => "int",
        ParamType::Bool => "bool",
    }
}

fn type_with_article(ty: ParamType) -> &'static str {
    match ty {
        ParamType::String => "a string",
        ParamType::Int => "an int",
        ParamType::Bool => "a bool (true or false)",
    }
}

/// A wire value as the declared type. Clients that do not know the types
/// send strings: an int is accepted as strict decimal text (optional `-`,
/// digits only), a bool as `"true"` or `"false"`.
fn convert(ty: ParamType, value: &keyward_proto::Value) -> Option<TypedValue> {
    use keyward_proto::Value;
    match (ty, value) {
        (ParamType::String, Value::Str(s)) => Some(TypedValue::Str(s.clone())),
        (ParamType::Int, Value::Int(i)) => Some(TypedValue::Int(*i)),
        (ParamType::Int, Value::Str(s)) => parse_int(s).map(TypedValue::Int),
        (ParamType::Bool, Value::Bool(b)) => Some(TypedValue::Bool(*b)),
        (ParamType::Bool, Value::Str(s)) => match s.as_str() {
            "true" => Some(TypedValue::Bool(true)),
            "false" => Some(TypedValue::Bool(false)),
            _ => None,
        },
        _ => None,
    }
}

/// Strict decimal i64: `-?[0-9]+`, no `+`, no whitespace, no overflow.
fn parse_int(s: &str) -> Option<i64> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Why a value failed its parameter's checks.
#[derive(Debug)]
enum Failure<'a> {
    /// A string with a NUL byte: refused for every parameter.
    Nul,
    Rule(&'a Rule),
}

fn check_value<'a>(rules: &'a [Rule], value: &TypedValue) -> Result<(), Failure<'a>> {
    if let TypedValue::Str(s) = value {
        if s.contains('\0') {
            return Err(Failure::Nul);
        }
    }
    for rule in rules {
        let ok = match (rule, value) {
            (Rule::Pattern(re), TypedValue::Str(s)) => re.is_match(s),
            (Rule::MaxLen(n), TypedValue::Str(s)) => s.len() <= *n,
            (Rule::Prefix(p), TypedValue::Str(s)) => s.starts_with(p.as_str()),
            (Rule::OneOf(values), v) => values.contains(v),
            (Rule::Min(min), TypedValue::Int(i)) => i >= min,
            (Rule::Max(max), TypedValue::Int(i)) => i <= max,
            // A rule that does not fit the value's type cannot come out of
            // `compile`; should one be built by hand, it denies.
            _ => false,
        };
        if !ok {
            return Err(Failure::Rule(rule));
        }
    }
    Ok(())
}

/// The failed rule as the end of a sentence about the value, e.g.
/// `does not match the pattern`. Admin-written rule text (prefix, allowed
/// values) is left out for a secret parameter, since it reveals the value.
pub(crate) fn describe_rule(rule: &Rule, secret: bool) -> String {
    match rule {
        Rule::Pattern(_) => "does not match the pattern".to_owned(),
        Rule::MaxLen(n) => format!("is longer than the max_len of {n} bytes"),
        Rule::Min(min) => format!("is less than the min of {min}"),
        Rule::Max(max) => format!("is greater than the max of {max}"),
        Rule::Prefix(_) if secret => "does not start with the required prefix".to_owned(),
        Rule::Prefix(p) => format!("does not start with the prefix {}", show_str(p)),
        Rule::OneOf(_) if secret => "is not one of the allowed values".to_owned(),
        Rule::OneOf(values) => {
            const LISTED: usize = 10;
            let mut shown: Vec<String> = values
                .iter()
                .take(LISTED)
                .map(|v| show_value(v, false))
                .collect();
            if values.len() > LISTED {
                shown.push("...".to_owned());
            }
            format!("is not one of the allowed values ({})", shown.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use keyward_proto::{Param, Value};

    use super::compile::{parse_mode, valid_param_name, valid_tool_name};
    use super::*;

    const BROKER: &str = "[broker]\nsocket = \"/tmp/k.sock\"\n";

    /// A policy with echo tools only (the http compiler is tested in its
    /// own module).
    const POLICY: &str = r#"[broker]
socket = "/tmp/k.sock"

[[principal]]
name = "orchestrator"
uids = [1000]
may_call = ["mail", "count", "flags"]

[[principal]]
name = "ops"
gids = [50]
may_call = ["count"]

[[principal]]
name = "nobody-special"
uids = [2000]

[[tool]]
name = "mail"
kind = "echo"
params.to = { type = "string", pattern = '[a-z0-9._-]+@example\.com' }
params.subject = { type = "string", max_len = 10, default = "hi" }
params.key = { type = "string", prefix = "sk-", secret = true }
params.kind = { type = "string", one_of = ["plain", "html"], default = "plain" }

[[tool]]
name = "count"
kind = "echo"
params.n = { type = "int", min = -5, max = 100 }
params.unit = { type = "int", one_of = [1, 10], default = 1 }

[[tool]]
name = "flags"
kind = "echo"
params.on = { type = "bool", default = false }
params.code = { type = "string", one_of = ["a1", "b2"], secret = true, default = "a1" }

[[tool]]
name = "unlisted"
kind = "echo"
"#;

    fn source(text: &str) -> Source {
        Source::parse("t.toml", text.to_owned()).expect("test config parses")
    }

    fn policy() -> Policy {
        Policy::compile(&source(POLICY)).expect("test policy compiles")
    }

    fn errors(text: &str) -> Vec<Located> {
        match Policy::compile(&source(text)) {
            Ok(_) => panic!("expected errors for:\n{text}"),
            Err(e) => e,
        }
    }

    /// The single error of a config, as `line: entry: message`.
    fn one_error(text: &str) -> Located {
        let mut errs = errors(text);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        errs.remove(0)
    }

    fn call(tool: &str, params: &[(&str, Value)]) -> Call {
        Call {
            tool: tool.to_owned(),
            params: params
                .iter()
                .map(|(name, value)| Param {
                    name: (*name).to_owned(),
                    value: value.clone(),
                })
                .collect(),
        }
    }

    fn s(v: &str) -> Value {
        Value::Str(v.to_owned())
    }

    const ORCH: Caller = Caller {
        uid: 1000,
        gid: 1000,
    };

    fn denied(caller: &Caller, c: &Call) -> String {
        match policy().authorize(caller, c) {
            Ok(ok) => panic!("expected a denial, got {ok:?}"),
            Err(d) => d.reason,
        }
    }

    fn allowed(caller: &Caller, c: &Call) -> AuthorizedCall {
        match policy().authorize(caller, c) {
            Ok(ok) => ok,
            Err(d) => panic!("expected success, got {d}"),
        }
    }

    fn mail(to: &str, key: &str) -> Vec<(&'static str, Value)> {
        vec![("to", s(to)), ("key", s(key))]
    }

    // ----- compile ------------------------------------------------------

    #[test]
    fn compiles_with_defaults() {
        let p = Policy::compile(&source(BROKER)).expect("minimal config compiles");
        assert_eq!(p.broker.socket_mode, 0o660);
        assert_eq!(p.broker.max_token_ttl, Duration::from_secs(900));
        assert_eq!(p.broker.call_timeout, Duration::from_secs(30));
        assert_eq!(p.broker.max_response_bytes, 60_000);
        assert_eq!(p.broker.max_connections_per_uid, 32);
        assert_eq!(p.tools().count(), 0);
    }

    #[test]
    fn compiles_the_test_policy() {
        let p = policy();
        let mail = p.tool("mail").expect("mail tool");
        assert!(matches!(mail.action, Action::Echo));
        assert!(mail.params["key"].secret);
        assert_eq!(
            mail.params["subject"].default,
            Some(TypedValue::Str("hi".into()))
        );
        assert_eq!(p.tools().count(), 4);
    }

    #[test]
    fn all_errors_are_collected_and_located() {
        let text = r#"[broker]
socket = "/tmp/k.sock"
socket_mode = "0999"

[[principal]]
name = "a"
uids = [1]
may_call = ["nope"]

[[tool]]
name = "t"
kind = "echo"
params.n = { type = "int", pattern = "x" }
"#;
        let errs = errors(text);
        let got: Vec<(Option<usize>, &str)> =
            errs.iter().map(|e| (e.line, e.entry.as_str())).collect();
        assert_eq!(
            got,
            [
                (Some(3), "broker"),
                (Some(8), "principal \"a\""),
                (Some(13), "tool \"t\""),
            ],
            "{errs:#?}"
        );
        assert!(errs[0].message.starts_with("socket_mode: "), "{}", errs[0]);
        assert!(errs[1].message.contains("\"nope\""), "{}", errs[1]);
        assert!(
            errs[2].message.starts_with("params.n.pattern: "),
            "{}",
            errs[2]
        );
        assert_eq!(errs[2].file, "t.toml");
        assert_eq!(
            errs[2].to_string(),
            "t.toml:13: tool \"t\": params.n.pattern: not allowed for a parameter of type int"
        );
    }

    /// Table test: (config after `[broker]`, expected line, expected entry,
    /// text the message must contain).
    #[test]
    fn compile_errors() {
        let cases: &[(&str, usize, &str, &str)] = &[
            // broker
            ("socket_mode = \"660x\"", 3, "broker", "socket_mode: \"660x\" is not an octal"),
            ("socket_mode = \"\"", 3, "broker", "socket_mode:"),
            ("socket_mode = \"4755\"", 3, "broker", "beyond 0777"),
            ("max_response_bytes = 0", 3, "broker", "max_response_bytes: 0 is out of range"),
            ("max_response_bytes = 61441", 3, "broker", "max_response_bytes: 61441"),
            ("max_connections_per_uid = 0", 3, "broker", "max_connections_per_uid:"),
            ("max_token_ttl = \"0s\"", 3, "broker", "max_token_ttl:"),
            ("call_timeout = \"0s\"", 3, "broker", "call_timeout:"),
            // principals
            ("[[principal]]\nname = \"\"\nuids = [1]", 4, "principal #1", "name: must not be empty"),
            ("[[principal]]\nname = \"p\"", 3, "principal \"p\"", "at least one uid or gid"),
            (
                "[[principal]]\nname = \"p\"\nuids = [1]\n[[principal]]\nname = \"p\"\ngids = [1]",
                7,
                "principal \"p\"",
                "already defined on line 3",
            ),
            ("[[principal]]\nname = \"p\"\nuids = [1]\nmay_delegate = [\"x\"]", 6, "principal \"p\"", "may_delegate: \"x\" is not a defined tool"),
            // credentials
            ("[credential.c]\nfile = \"../x\"", 4, "credential \"c\"", "file: \"../x\" must be a plain file name"),
            ("[credential.c]\nfile = \"/etc/shadow\"", 4, "credential \"c\"", "plain file name"),
            ("[credential.c]\nfile = \"..\"", 4, "credential \"c\"", "plain file name"),
            ("[credential.c]\nfile = \"\"", 4, "credential \"c\"", "plain file name"),
            // tools
            ("[[tool]]\nname = \"Bad\"\nkind = \"echo\"", 4, "tool \"Bad\"", "name: \"Bad\" is not a valid tool name"),
            ("[[tool]]\nname = \"\"\nkind = \"echo\"", 4, "tool #1", "name:"),
            (
                "[[tool]]\nname = \"t\"\nkind = \"echo\"\n[[tool]]\nname = \"t\"\nkind = \"echo\"",
                7,
                "tool \"t\"",
                "already defined on line 3",
            ),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\ncredential = \"c\"", 6, "tool \"t\"", "credential: not allowed for kind \"echo\""),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nurl = \"https://x\"", 6, "tool \"t\"", "url: not allowed for kind \"echo\""),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nheaders = { a = \"b\" }", 6, "tool \"t\"", "headers: not allowed"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\ntimeout = \"1s\"", 6, "tool \"t\"", "timeout: not allowed"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nmax_response_bytes = 5", 6, "tool \"t\"", "max_response_bytes: not allowed"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nmethod = \"GET\"", 6, "tool \"t\"", "method: not allowed"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nauth = { bearer = true }", 6, "tool \"t\"", "auth: not allowed"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nbody_json = { a = 1 }", 6, "tool \"t\"", "body_json: not allowed"),
            // params
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.Bad = { type = \"string\" }", 6, "tool \"t\"", "params.\"Bad\": not a valid parameter name"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.9a = { type = \"string\" }", 6, "tool \"t\"", "not a valid parameter name"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"string\", min = 1 }", 6, "tool \"t\"", "params.a.min: not allowed for a parameter of type string"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"int\", max_len = 1 }", 6, "tool \"t\"", "params.a.max_len: not allowed"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"int\", prefix = \"x\" }", 6, "tool \"t\"", "params.a.prefix: not allowed"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"bool\", one_of = [true] }", 6, "tool \"t\"", "params.a.one_of: not allowed for a parameter of type bool"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"bool\", max = 1 }", 6, "tool \"t\"", "params.a.max: not allowed"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"int\", min = 5, max = 1 }", 6, "tool \"t\"", "params.a.min: 5 is greater than max 1"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"int\", one_of = [1, \"2\"] }", 6, "tool \"t\"", "params.a.one_of[1]: must be an int"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"string\", one_of = [] }", 6, "tool \"t\"", "params.a.one_of: must list at least one value"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"string\", pattern = \"a)(\" }", 6, "tool \"t\"", "params.a.pattern: invalid regex"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"string\", pattern = '\\w{1000}{1000}' }", 6, "tool \"t\"", "params.a.pattern: invalid regex"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"int\", default = \"1\" }", 6, "tool \"t\"", "params.a.default: must be an int"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"int\", max = 3, default = 4 }", 6, "tool \"t\"", "params.a.default: 4 is greater than the max of 3"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"string\", pattern = \"[a-z]+\", default = \"A\" }", 6, "tool \"t\"", "params.a.default: \"A\" does not match the pattern"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"string\", default = \"a\\u0000\" }", 6, "tool \"t\"", "params.a.default: contains a NUL byte"),
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = { type = \"string\", one_of = [\"x\"], default = \"hunter2\", secret = true }", 6, "tool \"t\"", "params.a.default: [secret] is not one of the allowed values"),
            // A key outside the entry's own lines: the error is on the entry.
            ("[[tool]]\nname = \"t\"\nkind = \"echo\"\n[tool.params.a]\ntype = \"bool\"\nmin = 1", 3, "tool \"t\"", "params.a.min"),
        ];
        for (body, line, entry, needle) in cases {
            let text = format!("{BROKER}{body}\n");
            let e = one_error(&text);
            assert!(
                e.line == Some(*line) && e.entry == *entry && e.message.contains(needle),
                "for config:\n{text}\ngot: {e}\nwant: line {line}, {entry}, containing {needle:?}"
            );
        }
    }

    #[test]
    fn example_compiles() {
        let src = source(crate::config::EXAMPLE);
        let p = Policy::compile(&src).unwrap_or_else(|e| panic!("{e:#?}"));
        let weather = p.tool("weather").expect("weather tool");
        assert!(matches!(weather.action, Action::Http(_)));
        assert_eq!(weather.credential.as_deref(), Some("example_api"));
    }

    #[test]
    fn http_errors_are_located_on_their_field() {
        let text = format!(
            "{BROKER}[credential.api]\nfile = \"api.token\"\n\
             [[tool]]\nname = \"h\"\nkind = \"http\"\ncredential = \"nope\"\n\
             method = \"GET\"\nurl = \"https://example.com/{{missing}}\"\n\
             auth = {{ bearer = true }}\nparams.a = {{ type = \"int\", max_len = 3 }}\n"
        );
        let errs = errors(&text);
        let got: Vec<(Option<usize>, &str)> = errs
            .iter()
            .map(|e| (e.line, e.message.split(':').next().unwrap_or_default()))
            .collect();
        assert_eq!(
            got,
            [
                (Some(8), "credential"),
                (Some(10), "url"),
                (Some(12), "params.a.max_len"),
            ],
            "{errs:#?}"
        );
        assert!(errs.iter().all(|e| e.entry == "tool \"h\""), "{errs:#?}");
    }

    #[test]
    fn secret_default_is_never_shown() {
        let text = format!(
            "{BROKER}[[tool]]\nname = \"t\"\nkind = \"echo\"\n\
             params.a = {{ type = \"string\", prefix = \"sk-\", default = \"hunter2\", secret = true }}\n"
        );
        let e = one_error(&text).to_string();
        assert!(!e.contains("hunter2") && !e.contains("sk-"), "{e}");
    }

    #[test]
    fn pattern_is_anchored() {
        let text = format!(
            "{BROKER}[[principal]]\nname = \"p\"\nuids = [1]\nmay_call = [\"t\"]\n\
             [[tool]]\nname = \"t\"\nkind = \"echo\"\nparams.a = {{ type = \"string\", pattern = \"b|c\" }}\n"
        );
        let p = Policy::compile(&source(&text)).expect("compiles");
        let caller = Caller { uid: 1, gid: 1 };
        for (value, ok) in [
            ("b", true),
            ("c", true),
            ("abc", false),
            ("bc", false),
            ("", false),
        ] {
            let r = p.authorize(&caller, &call("t", &[("a", s(value))]));
            assert_eq!(r.is_ok(), ok, "{value:?}: {r:?}");
        }
    }

    #[test]
    fn mode_parsing() {
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert_eq!(parse_mode("0777"), Ok(0o777));
        for bad in [
            "",
            "0o660",
            "+660",
            "-660",
            " 660",
            "8",
            "1777",
            "077777777777777",
        ] {
            assert!(parse_mode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn name_rules() {
        assert!(valid_tool_name("send_email.v2-x"));
        assert!(valid_tool_name(&"a".repeat(64)));
        assert!(!valid_tool_name(&"a".repeat(65)));
        for bad in ["", "A", "a b", "a/b", "é"] {
            assert!(!valid_tool_name(bad), "{bad:?}");
        }
        assert!(valid_param_name("_x9"));
        assert!(valid_param_name(&"a".repeat(64)));
        for bad in ["", "9a", "a-b", "a.b", "A", &"a".repeat(65)] {
            assert!(!valid_param_name(bad), "{bad:?}");
        }
    }

    // ----- authorize ----------------------------------------------------

    #[test]
    fn allows_and_fills_defaults() {
        let ok = allowed(&ORCH, &call("mail", &mail("bob@example.com", "sk-1")));
        assert_eq!(ok.principal, "orchestrator");
        assert_eq!(ok.tool.name, "mail");
        let want: BTreeMap<String, TypedValue> = [
            ("to", TypedValue::Str("bob@example.com".into())),
            ("key", TypedValue::Str("sk-1".into())),
            ("subject", TypedValue::Str("hi".into())),
            ("kind", TypedValue::Str("plain".into())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(ok.params, want);
    }

    #[test]
    fn matches_on_gid_and_picks_the_allowing_principal() {
        // uid 2000 is "nobody-special" (no tools); gid 50 is "ops".
        let caller = Caller { uid: 2000, gid: 50 };
        let ok = allowed(&caller, &call("count", &[("n", s("3"))]));
        assert_eq!(ok.principal, "ops");
        assert_eq!(
            denied(&caller, &call("flags", &[])),
            "call denied: principals \"ops\", \"nobody-special\" may not call tool \"flags\""
        );
    }

    #[test]
    fn denials() {
        let long = "x".repeat(500);
        let cases: Vec<(Caller, Call, String)> = vec![
            (
                Caller { uid: 1001, gid: 1001 },
                call("mail", &[]),
                "call denied: uid 1001 (gid 1001) is not a principal in the broker policy".into(),
            ),
            (ORCH, call("x", &[]), "call denied: unknown tool \"x\"".into()),
            (
                ORCH,
                call("evil\n\u{1b}[2Jtool", &[]),
                "call denied: unknown tool \"evil\\n\\u{1b}[2Jtool\"".into(),
            ),
            (
                ORCH,
                call(&long, &[]),
                format!("call denied: unknown tool \"{}\"...", "x".repeat(64)),
            ),
            (
                ORCH,
                call("unlisted", &[]),
                "call denied: principal \"orchestrator\" may not call tool \"unlisted\"".into(),
            ),
            (
                Caller { uid: 2000, gid: 2000 },
                call("count", &[("n", s("1"))]),
                "call denied: principal \"nobody-special\" may not call tool \"count\"".into(),
            ),
            (
                ORCH,
                call("count", &[("n", s("1")), ("n", s("2"))]),
                "call denied: parameter \"n\" of tool \"count\" is given more than once".into(),
            ),
            (
                ORCH,
                call("count", &[("n", s("1")), ("cc", s("2"))]),
                "call denied: tool \"count\" has no parameter \"cc\"".into(),
            ),
            (
                ORCH,
                call("count", &[("c\nc", s("2"))]),
                "call denied: tool \"count\" has no parameter \"c\\nc\"".into(),
            ),
            (
                ORCH,
                call("count", &[]),
                "call denied: parameter \"n\" of tool \"count\" is required".into(),
            ),
            (
                ORCH,
                call("mail", &[]),
                "call denied: parameters \"key\", \"to\" of tool \"mail\" are required".into(),
            ),
            (
                ORCH,
                call("count", &[("n", s("1x"))]),
                "call denied: parameter \"n\" of tool \"count\" must be an int".into(),
            ),
            (
                ORCH,
                call("flags", &[("on", s("yes"))]),
                "call denied: parameter \"on\" of tool \"flags\" must be a bool (true or false)".into(),
            ),
            (
                ORCH,
                call("mail", &[("to", Value::Int(1))]),
                "call denied: parameter \"to\" of tool \"mail\" must be a string".into(),
            ),
            (
                ORCH,
                call("mail", &mail("x@evil.com", "sk-1")),
                "call denied: parameter \"to\" = \"x@evil.com\" does not match the pattern of tool mail".into(),
            ),
            (
                ORCH,
                call("mail", &[("to", s("a@example.com")), ("key", s("sk-1")), ("subject", s("12345678901"))]),
                "call denied: parameter \"subject\" = \"12345678901\" is longer than the max_len of 10 bytes of tool mail".into(),
            ),
            (
                ORCH,
                call("mail", &[("to", s("a@example.com")), ("key", s("sk-1")), ("kind", s("pdf"))]),
                "call denied: parameter \"kind\" = \"pdf\" is not one of the allowed values (\"plain\", \"html\") of tool mail".into(),
            ),
            (
                ORCH,
                call("count", &[("n", s("-6"))]),
                "call denied: parameter \"n\" = -6 is less than the min of -5 of tool count".into(),
            ),
            (
                ORCH,
                call("count", &[("n", Value::Int(101))]),
                "call denied: parameter \"n\" = 101 is greater than the max of 100 of tool count".into(),
            ),
            (
                ORCH,
                call("count", &[("n", s("1")), ("unit", s("5"))]),
                "call denied: parameter \"unit\" = 5 is not one of the allowed values (1, 10) of tool count".into(),
            ),
            (
                ORCH,
                call("mail", &[("to", s("a@example.com\0")), ("key", s("sk-1"))]),
                "call denied: parameter \"to\" of tool mail contains a NUL byte".into(),
            ),
            (
                ORCH,
                call("mail", &[("to", s(&format!("{}\n@example.com", "é".repeat(100)))), ("key", s("sk-1"))]),
                format!(
                    "call denied: parameter \"to\" = \"{}\"... does not match the pattern of tool mail",
                    "é".repeat(64)
                ),
            ),
        ];
        for (caller, c, want) in cases {
            assert_eq!(denied(&caller, &c), want, "for {c:?}");
        }
    }

    #[test]
    fn secret_values_are_never_shown() {
        let secret = "hunter2-secret";
        let cases = [
            call("mail", &mail("a@example.com", secret)),
            call("mail", &mail("a@example.com", &format!("sk-{secret}\0"))),
            call("flags", &[("code", s(secret))]),
            call("flags", &[("code", s("a1")), ("code", s(secret))]),
            call("flags", &[("code", Value::Int(7))]),
        ];
        for c in &cases {
            let reason = denied(&ORCH, c);
            assert!(!reason.contains("hunter2"), "{reason}");
            assert!(!reason.contains("sk-"), "prefix rule text leaks: {reason}");
            assert!(!reason.contains("a1"), "one_of values leak: {reason}");
        }
        assert_eq!(
            denied(&ORCH, &cases[0]),
            "call denied: parameter \"key\" = [secret] does not start with the required prefix of tool mail"
        );
        assert_eq!(
            denied(&ORCH, &cases[2]),
            "call denied: parameter \"code\" = [secret] is not one of the allowed values of tool flags"
        );
        // Debug of an authorized call does not show string values either.
        let ok = allowed(&ORCH, &call("mail", &mail("a@example.com", "sk-hunter2")));
        assert!(!format!("{ok:?}").contains("hunter2"));
    }

    #[test]
    fn conversions() {
        let int_ok: &[(Value, i64)] = &[
            (s("0"), 0),
            (s("-0"), 0),
            (s("007"), 7),
            (s("-5"), -5),
            (s("100"), 100),
            (Value::Int(42), 42),
        ];
        for (v, want) in int_ok {
            let ok = allowed(&ORCH, &call("count", &[("n", v.clone())]));
            assert_eq!(ok.params["n"], TypedValue::Int(*want), "{v:?}");
            assert_eq!(ok.params["unit"], TypedValue::Int(1));
        }
        let int_bad = [
            s(""),
            s("-"),
            s("+1"),
            s(" 1"),
            s("1 "),
            s("1.0"),
            s("0x10"),
            s("١"),
            s("99999999999999999999"),
            Value::Bool(true),
        ];
        for v in int_bad {
            let reason = denied(&ORCH, &call("count", &[("n", v.clone())]));
            assert!(reason.ends_with("must be an int"), "{v:?}: {reason}");
        }
        assert_eq!(parse_int("-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_int("9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_int("9223372036854775808"), None);

        for (v, want) in [
            (s("true"), true),
            (s("false"), false),
            (Value::Bool(true), true),
        ] {
            let ok = allowed(&ORCH, &call("flags", &[("on", v)]));
            assert_eq!(ok.params["on"], TypedValue::Bool(want));
        }
        for v in [s("True"), s("1"), s(""), Value::Int(1)] {
            let reason = denied(&ORCH, &call("flags", &[("on", v.clone())]));
            assert!(
                reason.ends_with("must be a bool (true or false)"),
                "{v:?}: {reason}"
            );
        }
        let ok = allowed(&ORCH, &call("flags", &[]));
        assert_eq!(ok.params["on"], TypedValue::Bool(false));
        assert_eq!(ok.params["code"], TypedValue::Str("a1".into()));
    }

    #[test]
    fn hostile_calls_do_not_panic() {
        let p = policy();
        let weird = [
            String::new(),
            "\0".into(),
            "é".repeat(10_000),
            "\u{202e}".into(),
            "mail\0".into(),
        ];
        for tool in weird
            .iter()
            .map(String::as_str)
            .chain(["mail", "count", "flags"])
        {
            for name in weird
                .iter()
                .map(String::as_str)
                .chain(["to", "n", "on", "code"])
            {
                for value in [
                    s(""),
                    s("\0"),
                    s(&"é".repeat(10_000)),
                    Value::Int(i64::MIN),
                    Value::Bool(false),
                ] {
                    let c = call(tool, &[(name, value.clone()), (name, value)]);
                    if let Err(d) = p.authorize(&ORCH, &c) {
                        assert!(d.reason.len() < 1024, "{}", d.reason.len());
                        assert!(!d.reason.contains('\n') && !d.reason.contains('\0'));
                    }
                }
            }
        }
    }

    #[test]
    fn show_str_cuts_on_char_boundaries() {
        assert_eq!(show_str("a\"b"), "\"a\\\"b\"");
        let cut = show_str(&"日".repeat(65));
        assert_eq!(cut, format!("\"{}\"...", "日".repeat(64)));
        assert_eq!(
            show_str(&"日".repeat(64)),
            format!("\"{}\"", "日".repeat(64))
        );
    }
}
