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
pub use crate::param::{path, ParamSpec, Rule, TypedValue};
use crate::tool::Action;

mod compile;
mod denial;
#[cfg(test)]
pub(crate) mod test_util;

pub(crate) use compile::compile_pattern;
pub use denial::{Denial, Denied};

/// The compiled policy.
#[derive(Debug)]
pub struct Policy {
    pub broker: BrokerSettings,
    principals: Vec<Principal>,
    tools: BTreeMap<String, Arc<Tool>>,
    /// blake3 of the configuration text it was compiled from.
    pub source_hash: [u8; 32],
    /// When it was compiled (loaded), in unix seconds.
    pub loaded_at: u64,

    /// `[[gateway]]`s by name; each also has an entry in `tools` (its
    /// grants are checked as a tool's, on `method` and `path`).
    gateways: BTreeMap<String, Arc<crate::gateway::Gateway>>,
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
    /// What performing it means: its kind, compiled ([`crate::tool`]).
    pub action: Box<dyn Action>,
}

/// The caller as the kernel reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (`SO_PEERGROUPS`); a principal's `gids` match
    /// these as well as `gid`.
    pub groups: Vec<u32>,
}

impl Caller {
    /// A caller with no supplementary groups.
    pub const fn new(uid: u32, gid: u32) -> Caller {
        Caller {
            uid,
            gid,
            groups: Vec::new(),
        }
    }

    /// Whether the caller is in group `gid`, primary or supplementary.
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// A call that passed policy: the tool and every declared parameter,
/// typed, validated, defaults filled in.
#[derive(Debug, Clone)]
pub struct AuthorizedCall {
    pub tool: Arc<Tool>,
    pub principal: String,
    pub params: BTreeMap<String, TypedValue>,
}

/// The hash `status` shows of a configuration file's text: blake3.
pub fn source_hash(text: &[u8]) -> [u8; 32] {
    *blake3::hash(text).as_bytes()
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

    /// A gateway by name.
    pub fn gateway(&self, name: &str) -> Option<&Arc<crate::gateway::Gateway>> {
        self.gateways.get(name)
    }

    /// A principal by name.
    pub fn principal(&self, name: &str) -> Option<&Principal> {
        self.principals.iter().find(|p| p.name == name)
    }

    /// Every tool, by name.
    pub fn tools(&self) -> impl Iterator<Item = &Arc<Tool>> {
        self.tools.values()
    }

    /// `(credential, user)` of every tool that sends its credential as an
    /// HTTP Basic pair, for [`crate::credential::Credentials::register_basic_user`].
    pub fn basic_users(&self) -> impl Iterator<Item = (&str, &str)> {
        self.tools.values().filter_map(|t| t.action.basic_user())
    }

    /// The principals that match a caller.
    pub fn principals_of<'a>(&'a self, caller: &'a Caller) -> impl Iterator<Item = &'a Principal> {
        self.principals.iter().filter(move |p| {
            p.uids.contains(&caller.uid) || p.gids.iter().any(|&g| caller.in_group(g))
        })
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
            Failure::Path(fault) => deny(format_args!(
                "parameter {name:?} = {} of tool {} {}",
                show_value(&value, spec.secret),
                self.name,
                fault.describe(true)
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

fn deny(why: std::fmt::Arguments<'_>) -> Denial {
    Denial::new(Denied::Call, why.to_string())
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
        ParamType::Path => "path",
    }
}

fn type_with_article(ty: ParamType) -> &'static str {
    match ty {
        ParamType::String => "a string",
        ParamType::Int => "an int",
        ParamType::Bool => "a bool (true or false)",
        ParamType::Path => "a path (a string)",
    }
}

/// A wire value as the declared type. Clients that do not know the types
/// send strings: an int is accepted as strict decimal text (optional `-`,
/// digits only), a bool as `"true"` or `"false"`.
fn convert(ty: ParamType, value: &keyward_proto::Value) -> Option<TypedValue> {
    use keyward_proto::Value;
    match (ty, value) {
        (ParamType::String | ParamType::Path, Value::Str(s)) => Some(TypedValue::Str(s.clone())),
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
    /// A `path` value that is not a relative path of plain segments.
    Path(path::SegmentFault),
    Rule(&'a Rule),
}

fn check_value<'a>(rules: &'a [Rule], value: &TypedValue) -> Result<(), Failure<'a>> {
    if let TypedValue::Str(s) = value {
        if s.contains('\0') {
            return Err(Failure::Nul);
        }
    }
    for rule in rules {
        if let (Rule::Segments, TypedValue::Str(s)) = (rule, value) {
            path::check_path(s).map_err(Failure::Path)?;
            continue;
        }
        let ok = match (rule, value) {
            (Rule::Pattern(re), TypedValue::Str(s)) => re.is_match(s),
            (Rule::MaxLen(n), TypedValue::Str(s)) => s.len() <= *n,
            (Rule::Prefix(p), TypedValue::Str(s)) => s.starts_with(p.as_str()),
            (Rule::PathPrefix(p), TypedValue::Str(s)) => path::has_prefix(s, p),
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
        Rule::Segments => "is not a relative path of plain segments".to_owned(),
        Rule::PathPrefix(_) if secret => {
            "is not under the required path prefix (whole segments)".to_owned()
        }
        Rule::PathPrefix(p) => format!(
            "is not under the path prefix {} (whole segments)",
            show_str(p)
        ),
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
    use keyward_proto::Value;

    use super::test_util::{call, policy, s, source, BROKER};
    use super::*;

    const ORCH: Caller = Caller::new(1000, 1000);

    fn denied(caller: &Caller, c: &Call) -> String {
        match policy().authorize(caller, c) {
            Ok(ok) => panic!("expected a denial, got {ok:?}"),
            Err(d) => d.to_string(),
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
        let caller = Caller::new(2000, 50);
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
                Caller::new(1001, 1001),
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
                Caller::new(2000, 2000),
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
                        let reason = d.to_string();
                        assert!(reason.len() < 1024, "{}", reason.len());
                        assert!(!reason.contains('\n') && !reason.contains('\0'));
                    }
                }
            }
        }
    }

    #[test]
    fn path_params_are_plain_relative_paths() {
        let text = format!(
            "{BROKER}[[principal]]\nname = \"p\"\nuids = [1]\nmay_call = [\"files\"]\n\
             [[tool]]\nname = \"files\"\nkind = \"echo\"\n\
             params.file = {{ type = \"path\", prefix = \"reports\" }}\n\
             params.key = {{ type = \"path\", default = \"k/1\", secret = true }}\n"
        );
        let p = Policy::compile(&source(&text)).expect("compiles");
        let caller = Caller::new(1, 1);
        let run = |file: &str| p.authorize(&caller, &call("files", &[("file", s(file))]));
        for ok in ["reports", "reports/q1.txt", "reports/2024/a b.txt"] {
            let got = run(ok).unwrap_or_else(|d| panic!("{ok:?}: {d}"));
            assert_eq!(got.params["file"], TypedValue::Str(ok.to_owned()));
        }
        for (bad, why) in [
            (
                "reports/../../private/admin.txt",
                "has a \".\" or \"..\" segment",
            ),
            ("reports/./x", "has a \".\" or \"..\" segment"),
            ("reports//x", "empty"),
            ("reports/x/", "empty"),
            ("reports/a%2F..%2F..%2Fb", "encoded \"/\""),
            ("reports/..%00", "control character"),
            ("reports\\..\\x", "\"\\\""),
            (
                "reports-evil/x",
                "is not under the path prefix \"reports/\" (whole segments)",
            ),
            ("reportsx", "is not under the path prefix"),
            ("/reports/x", "empty"),
        ] {
            let reason = run(bad).unwrap_err().to_string();
            assert!(reason.contains(why), "{bad:?}: {reason}");
            assert!(
                reason.starts_with("call denied: parameter \"file\" = "),
                "{reason}"
            );
            assert!(reason.contains(" of tool files"), "{reason}");
        }
        // A secret path's value is never shown.
        let reason = p
            .authorize(
                &caller,
                &call("files", &[("file", s("reports/a")), ("key", s("sk/../x"))]),
            )
            .unwrap_err()
            .to_string();
        assert!(!reason.contains("sk/"), "{reason}");
        assert!(reason.contains("[secret]"), "{reason}");
    }

    #[test]
    fn path_max_len_is_judged_before_the_segments() {
        // The segment rules decode and normalise the value many times over;
        // max_len bounds that work, so it is judged first.
        let text = format!(
            "{BROKER}[[principal]]\nname = \"p\"\nuids = [1]\nmay_call = [\"files\"]\n\
             [[tool]]\nname = \"files\"\nkind = \"echo\"\n\
             params.file = {{ type = \"path\", max_len = 64 }}\n"
        );
        let p = Policy::compile(&source(&text)).expect("compiles");
        let caller = Caller::new(1, 1);
        let long = format!("../{}", "\u{FF21}%2525252541".repeat(1000));
        let reason = p
            .authorize(&caller, &call("files", &[("file", s(&long))]))
            .unwrap_err()
            .to_string();
        assert!(reason.contains("max_len of 64"), "{reason}");
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
