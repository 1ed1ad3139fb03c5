// SPDX-License-Identifier: Apache-2.0
//! `kind = "aws_sts"`: short-lived AWS credentials derived per call.
//!
//! For transfers too large to proxy, the broker asks STS for credentials
//! scoped to the call and returns those (never its own key):
//!
//! - `role_arn` set: `AssumeRole`; otherwise `GetFederationToken` (which
//!   grants nothing without a policy, so `session_policy` is then required).
//! - `session_policy`: a JSON policy template; `{name}` in a string value
//!   is replaced by the call's validated parameter, and the result is
//!   serialized by `serde_json`, so a value is always data inside one JSON
//!   string. A value carrying an IAM wildcard (`*`, `?`) or a policy
//!   variable (`$`) is refused: it would widen the policy the token pinned.
//! - Duration: `min(max_duration, the token's remaining life - 30 s)` (the
//!   margin covers the difference between STS's clock and ours). STS
//!   issues nothing shorter than 900 s, so a call whose token has less than
//!   930 s left is refused, saying so (the credentials would outlive the
//!   token); mint a longer-lived token. A direct call without a token gets
//!   `max_duration`.
//! - Naming: `RoleSessionName` and `SourceIdentity` (AssumeRole) or `Name`
//!   (GetFederationToken) carry the token's id (`kw-<id>`; the 32 hex
//!   digits alone for a federation name, which allows 32 characters), so a
//!   CloudTrail event joins the journald audit record with
//!   `KEYWARD_TOKEN_ID=<id>`.
//!
//! The result is a JSON object in the `credential_process` format
//! (`Version`, `AccessKeyId`, `SecretAccessKey`, `SessionToken`,
//! `Expiration`) plus `Region` and, when the credential has an endpoint,
//! `EndpointUrl`. It is judged by the leak scanner like every result: the
//! admin key never leaves.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyward_proto::CallResult;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::{
    off_reactor, Action, CallerScope, Context, Definition, ExecError, Invocation, Kind, Running,
};
use crate::config::duration_opt;
use crate::credential::aws::{self, StsAction, StsRequest};
use crate::param::TypedValue;

pub const KIND: Kind = Kind {
    name: "aws_sts",
    compile,
};

/// The shortest credentials STS issues, in seconds.
pub const STS_MIN_SECONDS: u64 = 900;

/// The longest `max_duration` accepted: AssumeRole's ceiling (12 h).
pub const STS_MAX_SECONDS: u64 = 12 * 3600;

/// The longest session policy STS accepts, in characters.
pub const MAX_POLICY_LEN: usize = 2048;

/// Largest STS reply read, in bytes (a real one is about 2 KiB).
const MAX_REPLY: usize = 64 * 1024;

/// Subtracted from the token's remaining life, for the difference
/// between STS's clock and the broker's.
pub const CLOCK_MARGIN: u64 = 30;

/// Default `max_duration`.
const DEFAULT_MAX_DURATION: Duration = Duration::from_secs(15 * 60);

/// The fields `kind = "aws_sts"` adds to a `[[tool]]` entry.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StsFields {
    role_arn: Option<String>,
    session_policy: Option<String>,
    #[serde(default, with = "duration_opt")]
    max_duration: Option<Duration>,
    #[serde(default, with = "duration_opt")]
    timeout: Option<Duration>,
}

/// A compiled `kind = "aws_sts"` tool.
#[derive(Debug)]
pub struct StsTool {
    credential: String,
    role_arn: Option<String>,
    policy: Option<PolicyTemplate>,
    max_duration: u64,
    timeout: Duration,
}

fn compile(def: &Definition<'_>) -> Result<Box<dyn Action>, Vec<String>> {
    let fields = def.fields::<StsFields>()?;
    let mut errors = Vec::new();
    let credential = def.credential.map(str::to_owned);
    if credential.is_none() {
        errors.push(
            "credential: is required for kind \"aws_sts\" (a [credential.NAME] of kind \"aws\")"
                .to_owned(),
        );
    }
    if let Some(arn) = &fields.role_arn {
        if !valid_role_arn(arn) {
            errors.push(format!(
                "role_arn: {arn:?} is not an IAM role ARN (arn:PARTITION:iam::ACCOUNT:role/NAME)"
            ));
        }
    }
    let policy = match &fields.session_policy {
        Some(text) => match PolicyTemplate::compile(text, &|name| def.params.contains_key(name)) {
            Ok(policy) => Some(policy),
            Err(e) => {
                errors.push(format!("session_policy: {e}"));
                None
            }
        },
        None if fields.role_arn.is_none() => {
            errors.push(
                "session_policy: is required without role_arn (GetFederationToken grants \
                 nothing without a policy)"
                    .to_owned(),
            );
            None
        }
        None => None,
    };
    let max_duration = fields
        .max_duration
        .unwrap_or(DEFAULT_MAX_DURATION)
        .as_secs();
    if !(STS_MIN_SECONDS..=STS_MAX_SECONDS).contains(&max_duration) {
        errors.push(format!(
            "max_duration: {max_duration} s is not between STS's {STS_MIN_SECONDS} s and \
             {STS_MAX_SECONDS} s"
        ));
    }
    let timeout = fields.timeout.unwrap_or(def.defaults.timeout);
    if timeout.is_zero() {
        errors.push("timeout: must be longer than zero".to_owned());
    }
    match credential {
        Some(credential) if errors.is_empty() => Ok(Box::new(StsTool {
            credential,
            role_arn: fields.role_arn,
            policy,
            max_duration,
            timeout,
        })),
        _ => Err(errors),
    }
}

/// `arn:PARTITION:iam::ACCOUNT:role/PATH/NAME`.
fn valid_role_arn(arn: &str) -> bool {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    matches!(
        parts.as_slice(),
        ["arn", partition, "iam", "", account, resource]
            if !partition.is_empty()
                && account.len() == 12
                && account.bytes().all(|b| b.is_ascii_digit())
                && resource.strip_prefix("role/").is_some_and(|name| {
                    !name.is_empty()
                        && name.len() <= 512
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-/".contains(&b))
                })
    )
}

impl Action for StsTool {
    fn kind(&self) -> &'static str {
        KIND.name
    }

    fn run<'a>(&'a self, call: Invocation<'a>, context: Context<'a>) -> Running<'a> {
        Box::pin(self.execute(call, context))
    }

    fn uses_aws_key(&self) -> bool {
        true
    }
}

impl StsTool {
    /// How long the derived credentials live: `max_duration`, cut to the
    /// token's remaining life; refused when that is under STS's minimum.
    fn duration(&self, tool: &str, caller: &CallerScope<'_>, now: u64) -> Result<u64, ExecError> {
        let Some(expires) = caller.token_expires else {
            return Ok(self.max_duration);
        };
        // STS's clock and ours differ by a little: keep a margin so that
        // the credentials' expiration is not after the token's.
        let left = expires.saturating_sub(now).saturating_sub(CLOCK_MARGIN);
        if left < STS_MIN_SECONDS {
            return Err(ExecError::Rejected(format!(
                "tool {tool} cannot derive AWS credentials: the token expires in {} s, \
                 sooner than the {STS_MIN_SECONDS} s STS credentials live at least (plus a \
                 {CLOCK_MARGIN} s margin for clock differences), so they would outlive it; \
                 mint a token that lives longer",
                expires.saturating_sub(now)
            )));
        }
        Ok(self.max_duration.min(left))
    }

    async fn execute(
        &self,
        call: Invocation<'_>,
        context: Context<'_>,
    ) -> Result<CallResult, ExecError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let duration_seconds = self.duration(call.tool, &context.caller, now)?;
        let policy = match &self.policy {
            Some(template) => Some(template.render(call.tool, call.params)?),
            None => None,
        };
        let (session_name, federation_name) = session_names(&context.caller);
        let action = match &self.role_arn {
            Some(role_arn) => StsAction::AssumeRole {
                role_arn,
                session_name: &session_name,
                source_identity: &session_name,
            },
            None => StsAction::GetFederationToken {
                name: &federation_name,
            },
        };
        let request = StsRequest {
            action,
            policy: policy.as_deref(),
            duration_seconds,
        };
        let credentials = context.credentials;
        let redact = |text: &str| credentials.redactor().redact_str(text);
        let (key, secret) = credentials.aws(&self.credential).ok_or_else(|| {
            ExecError::Internal(format!("AWS credential {} is not loaded", self.credential))
        })?;
        let http = aws::sts_request(key, secret, &request)
            .map_err(|e| ExecError::Upstream(redact(&e.to_string())))?;
        let client = super::http::client()?;
        let exchange = async {
            let upstream = |e: reqwest::Error| {
                ExecError::Upstream(redact(&crate::error_chain::error_chain(&e.without_url())))
            };
            let mut response = client.execute(http).await.map_err(upstream)?;
            let status = response.status().as_u16();
            let mut reply = Zeroizing::new(Vec::new());
            while let Some(chunk) = response.chunk().await.map_err(upstream)? {
                if reply.len() + chunk.len() > MAX_REPLY {
                    return Err(ExecError::TooLarge(MAX_REPLY));
                }
                reply.extend_from_slice(&chunk);
            }
            Ok((status, reply))
        };
        let (status, reply) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ExecError::Timeout(self.timeout))??;
        let text = String::from_utf8_lossy(&reply);
        if !(200..300).contains(&status) {
            let why = match aws::parse_error(&text) {
                Some((code, message)) => format!("STS refused ({status}): {code}: {message}"),
                None => format!("STS answered status {status}"),
            };
            return Err(ExecError::Upstream(redact(&why)));
        }
        let derived =
            aws::parse_reply(&text).map_err(|e| ExecError::Upstream(redact(&e.to_string())))?;
        let mut body = serde_json::json!({
            "Version": 1,
            "AccessKeyId": derived.access_key_id,
            "SecretAccessKey": derived.secret_access_key.as_str(),
            "SessionToken": derived.session_token.as_str(),
            "Expiration": derived.expiration,
            "Region": key.region,
        });
        if let (Some(endpoint), Some(object)) = (&key.endpoint, body.as_object_mut()) {
            object.insert("EndpointUrl".to_owned(), endpoint.clone().into());
        }
        let body = Zeroizing::new(body.to_string().into_bytes());
        off_reactor(|| {
            credentials
                .scanner()
                .check_response(std::iter::empty(), &body)
        })
        .map_err(ExecError::Withheld)?;
        Ok(CallResult {
            status: 200,
            headers: Vec::new(),
            body: body.to_vec(),
        })
    }
}

/// `(RoleSessionName / SourceIdentity, GetFederationToken Name)`: the
/// token's id, or for a direct call the principal's name.
fn session_names(caller: &CallerScope<'_>) -> (String, String) {
    match caller.token_id {
        Some(id) => {
            let id: String = id
                .chars()
                .filter(char::is_ascii_hexdigit)
                .take(32)
                .collect();
            (format!("kw-{id}"), id)
        }
        None => {
            let principal: String = caller
                .principal
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "+=,.@_-".contains(c) {
                        c
                    } else {
                        '-'
                    }
                })
                .collect();
            let name = format!("kw-direct-{principal}");
            (
                name.chars().take(64).collect(),
                name.chars().take(32).collect(),
            )
        }
    }
}

/// A JSON policy whose string values may hold `{name}` placeholders.
#[derive(Debug)]
struct PolicyTemplate {
    json: serde_json::Value,
}

/// One part of a string value of the template.
#[derive(Debug, PartialEq)]
enum Piece<'a> {
    Text(&'a str),
    Param(&'a str),
}

/// Split a string into text and `{name}` placeholders (`name` an ASCII
/// identifier). Any other brace is text, so IAM's own `${aws:username}`
/// stays as written.
fn pieces(text: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let name_len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let name = &after[..name_len];
        let is_param = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && after[name_len..].starts_with('}')
            && !rest[..open].ends_with('$');
        if is_param {
            if open > 0 {
                out.push(Piece::Text(&rest[..open]));
            }
            out.push(Piece::Param(name));
            rest = &after[name_len + 1..];
        } else {
            out.push(Piece::Text(&rest[..=open]));
            rest = after;
        }
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    out
}

impl PolicyTemplate {
    fn compile(text: &str, declared: &dyn Fn(&str) -> bool) -> Result<PolicyTemplate, String> {
        let json: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("is not JSON: {e}"))?;
        if !json.is_object() {
            return Err("must be a JSON object (an IAM policy document)".to_owned());
        }
        let mut undeclared = Vec::new();
        visit_strings(&json, &mut |s| {
            for piece in pieces(s) {
                if let Piece::Param(name) = piece {
                    if !declared(name) {
                        undeclared.push(name.to_owned());
                    }
                }
            }
        });
        if let Some(name) = undeclared.first() {
            return Err(format!("placeholder {{{name}}} names no parameter"));
        }
        Ok(PolicyTemplate { json })
    }

    /// The policy for one call, compact JSON.
    fn render(
        &self,
        tool: &str,
        params: &BTreeMap<String, TypedValue>,
    ) -> Result<String, ExecError> {
        let rendered = render_value(&self.json, tool, params)?;
        let text = rendered.to_string();
        if text.chars().count() > MAX_POLICY_LEN {
            return Err(ExecError::Rejected(format!(
                "tool {tool}: the session policy would be longer than STS's {MAX_POLICY_LEN} \
                 characters"
            )));
        }
        Ok(text)
    }
}

fn visit_strings(value: &serde_json::Value, f: &mut dyn FnMut(&str)) {
    match value {
        serde_json::Value::String(s) => f(s),
        serde_json::Value::Array(items) => items.iter().for_each(|v| visit_strings(v, f)),
        serde_json::Value::Object(map) => map.values().for_each(|v| visit_strings(v, f)),
        _ => {}
    }
}

fn render_value(
    value: &serde_json::Value,
    tool: &str,
    params: &BTreeMap<String, TypedValue>,
) -> Result<serde_json::Value, ExecError> {
    Ok(match value {
        serde_json::Value::String(s) => {
            let mut out = String::with_capacity(s.len());
            for piece in pieces(s) {
                match piece {
                    Piece::Text(text) => out.push_str(text),
                    Piece::Param(name) => out.push_str(&policy_value(tool, name, params)?),
                }
            }
            serde_json::Value::String(out)
        }
        serde_json::Value::Array(items) => serde_json::Value::Array(
            items
                .iter()
                .map(|v| render_value(v, tool, params))
                .collect::<Result<_, _>>()?,
        ),
        serde_json::Value::Object(map) => serde_json::Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), render_value(v, tool, params)?)))
                .collect::<Result<_, ExecError>>()?,
        ),
        other => other.clone(),
    })
}

/// A parameter's text inside a policy string, refused when it would act
/// as more than a literal there: an IAM wildcard (`*`, `?`) or policy
/// variable (`$`) would widen what the token pinned; a control character
/// has no place in an ARN.
fn policy_value(
    tool: &str,
    name: &str,
    params: &BTreeMap<String, TypedValue>,
) -> Result<String, ExecError> {
    let text = match params.get(name) {
        Some(TypedValue::Str(s)) => s.clone(),
        Some(TypedValue::Int(i)) => i.to_string(),
        Some(TypedValue::Bool(b)) => b.to_string(),
        None => {
            return Err(ExecError::Internal(format!(
                "tool {tool}: parameter {name} has no value"
            )))
        }
    };
    if let Some(bad) = text
        .chars()
        .find(|c| matches!(c, '*' | '?' | '$') || c.is_control())
    {
        return Err(ExecError::Rejected(format!(
            "parameter \"{name}\" of tool {tool} contains {bad:?}, which an IAM policy reads as \
             a wildcard, variable or control character, not as a literal"
        )));
    }
    Ok(text)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const POLICY: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:GetObject","Resource":"arn:aws:s3:::bucket/analysis/{key}"},{"Effect":"Deny","Action":"s3:*","Resource":"arn:aws:s3:::bucket/home/${aws:username}/*"}]}"#;

    fn params(key: &str) -> BTreeMap<String, TypedValue> {
        BTreeMap::from([("key".to_owned(), TypedValue::Str(key.to_owned()))])
    }

    fn template() -> PolicyTemplate {
        PolicyTemplate::compile(POLICY, &|n| n == "key").unwrap()
    }

    fn tool(max: u64) -> StsTool {
        StsTool {
            credential: "aws".to_owned(),
            role_arn: None,
            policy: None,
            max_duration: max,
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn renders_values_as_json_data() {
        let rendered = template().render("t", &params("a.txt")).unwrap();
        let json: serde_json::Value = serde_json::from_str(&rendered).unwrap();
        assert_eq!(
            json["Statement"][0]["Resource"],
            "arn:aws:s3:::bucket/analysis/a.txt"
        );
        // IAM's own variables are left alone.
        assert_eq!(
            json["Statement"][1]["Resource"],
            "arn:aws:s3:::bucket/home/${aws:username}/*"
        );
        // A quote cannot close the string and add a statement.
        let evil = r#"x","Resource":"arn:aws:s3:::*"#;
        let rendered = template()
            .render("t", &params(evil))
            .unwrap_err()
            .to_string();
        assert!(rendered.contains("wildcard"), "{rendered}");
        let evil =
            r#"x"},{"Effect":"Allow","Action":"s3:PutObject","Resource":"arn:aws:s3:::bucket/x"#;
        let rendered = template().render("t", &params(evil)).unwrap();
        let json: serde_json::Value = serde_json::from_str(&rendered).unwrap();
        assert_eq!(json["Statement"].as_array().unwrap().len(), 2, "{rendered}");
        assert_eq!(
            json["Statement"][0]["Resource"],
            format!("arn:aws:s3:::bucket/analysis/{evil}")
        );
    }

    #[test]
    fn refuses_wildcards_and_variables() {
        for value in ["*", "a?.txt", "${aws:username}", "a\nb"] {
            let err = template().render("t", &params(value)).unwrap_err();
            assert!(matches!(err, ExecError::Rejected(_)), "{value}: {err}");
            assert!(
                err.to_string().contains("parameter \"key\" of tool t"),
                "{err}"
            );
        }
    }

    #[test]
    fn compile_checks_placeholders() {
        let err = PolicyTemplate::compile(POLICY, &|_| false).unwrap_err();
        assert!(
            err.contains("placeholder {key} names no parameter"),
            "{err}"
        );
        assert!(PolicyTemplate::compile("[1]", &|_| true).is_err());
        assert!(PolicyTemplate::compile("{", &|_| true).is_err());
        assert_eq!(
            pieces("a{b}c{1}{d"),
            vec![
                Piece::Text("a"),
                Piece::Param("b"),
                Piece::Text("c{"),
                Piece::Text("1}{"),
                Piece::Text("d")
            ]
        );
    }

    #[test]
    fn duration_is_cut_to_the_token_and_refused_under_the_minimum() {
        let tool = tool(3600);
        let scope = |expires| CallerScope {
            principal: "p",
            token_id: Some("00ff"),
            token_expires: expires,
        };
        assert_eq!(tool.duration("t", &scope(None), 1000).unwrap(), 3600);
        assert_eq!(
            tool.duration("t", &scope(Some(1000 + 1200)), 1000).unwrap(),
            1200 - CLOCK_MARGIN
        );
        assert_eq!(
            tool.duration("t", &scope(Some(1000 + 7200)), 1000).unwrap(),
            3600
        );
        let err = tool
            .duration("t", &scope(Some(1000 + 929)), 1000)
            .unwrap_err()
            .to_string();
        assert!(err.contains("expires in 929 s"), "{err}");
        assert_eq!(
            tool.duration("t", &scope(Some(1000 + 930)), 1000).unwrap(),
            STS_MIN_SECONDS
        );
        assert!(tool.duration("t", &scope(Some(10)), 1000).is_err());
    }

    #[test]
    fn names_carry_the_token_id() {
        let id = "0123456789abcdef0123456789abcdef";
        let (session, federation) = session_names(&CallerScope {
            principal: "p",
            token_id: Some(id),
            token_expires: None,
        });
        assert_eq!(session, format!("kw-{id}"));
        assert_eq!(federation, id);
        let (session, federation) = session_names(&CallerScope {
            principal: "an orchestrator with a very long name indeed, more than sixty-four",
            token_id: None,
            token_expires: None,
        });
        assert!(
            session.starts_with("kw-direct-an-orchestrator"),
            "{session}"
        );
        assert!(session.len() <= 64 && federation.len() <= 32);
    }

    #[test]
    fn role_arns() {
        assert!(valid_role_arn(
            "arn:aws:iam::123456789012:role/agent-reader"
        ));
        assert!(valid_role_arn("arn:aws-cn:iam::123456789012:role/path/r"));
        assert!(!valid_role_arn("arn:aws:iam::123456789012:user/u"));
        assert!(!valid_role_arn("arn:aws:iam::1234:role/r"));
        assert!(!valid_role_arn("arn:aws:s3:::bucket"));
    }
}
