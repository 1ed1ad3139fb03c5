// SPDX-License-Identifier: Apache-2.0
//! Gateways: an HTTP API that a sandboxed program reaches by base URL,
//! with the broker's credential and none of its own.
//!
//! A `[[gateway]]` names an upstream (`https://api.openai.com`), a
//! credential and how it is sent (as an http tool's `auth`), and the
//! requests allowed: exact method and path pairs. `agent-shim run
//! --gateway NAME` gives the program a loopback endpoint and sets the
//! variables the SDKs read (`OPENAI_BASE_URL`, and a placeholder in
//! `OPENAI_API_KEY`); the shim relays each HTTP request to the broker as a
//! `Gateway` message on a channel of its bound session. The broker checks
//! method, path, body size and the token (a gateway is granted like a tool
//! of the same name, with two parameters, `method` and `path`; one use per
//! request), replaces every credential header the program sent with the
//! real one, forwards the request, and streams the response back as it
//! arrives ([`forward`]), each piece judged by the leak scanner with the
//! bytes before it.
//!
//! Threat model: the program is hostile and may send any bytes; it must
//! not reach another path or host, learn the credential, or make more
//! requests than its token allows. Tests: unit tests here for the checks,
//! `tests/tests/gateway.rs` for the whole path with the official SDKs.

pub mod forward;

use std::collections::BTreeMap;
use std::time::Duration;

use keyward_proto::GatewayInfo;
use reqwest::{Method, Url};

use crate::config::{GatewayConfig, ParamType};
use crate::param::{path, ParamSpec};
use crate::tool::http::{compile_auth, Auth, AuthConfig, HttpFields};
use crate::tool::{Action, Context, ExecError, Invocation, Running};

/// The value the program finds in `api_key_env`: not a secret, and
/// replaced on every request.
pub const PLACEHOLDER: &str = "keyward-gateway-placeholder-not-a-secret";

/// Default `max_request_bytes`.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1 << 20;
/// Largest `max_request_bytes` a gateway may set (the broker holds a
/// request body whole before sending it).
pub const MAX_REQUEST_BYTES_LIMIT: usize = 16 << 20;
/// Default `max_response_bytes` (the response streams; this bounds it).
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 64 << 20;
/// Default `timeout`: until the response head.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// Default `idle_timeout`: between two pieces of a streaming response.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// The parameter names a gateway's grant is checked on.
pub const METHOD_PARAM: &str = "method";
pub const PATH_PARAM: &str = "path";

/// A compiled `[[gateway]]`.
#[derive(Debug)]
pub struct Gateway {
    pub name: String,
    /// Scheme, host, port and path prefix (no trailing `/`).
    upstream: Url,
    auth: Option<Auth>,
    allow: Vec<Allowed>,
    pub max_request_bytes: usize,
    pub max_response_bytes: u64,
    pub timeout: Duration,
    pub idle_timeout: Duration,
    base_url_env: Vec<String>,
    base_path: String,
    api_key_env: Vec<String>,
}

#[derive(Debug)]
struct Allowed {
    method: Method,
    path: String,
    query: bool,
}

/// A request that passed the gateway's own checks.
#[derive(Debug, Clone)]
pub struct Checked {
    pub method: Method,
    /// The path alone.
    pub path: String,
    /// The URL to send to.
    pub url: Url,
}

impl Gateway {
    /// Check and compile one `[[gateway]]`. Errors start with the field
    /// they are about.
    pub fn compile(cfg: &GatewayConfig) -> Result<Gateway, Vec<String>> {
        let mut errors = Vec::new();
        let upstream = compile_upstream(&cfg.upstream)
            .map_err(|e| errors.push(e))
            .ok();
        let auth = compile_gateway_auth(cfg, &mut errors);
        let mut allow = Vec::new();
        if cfg.allow.is_empty() {
            errors.push("allow: list at least one { method, path } the gateway allows".to_owned());
        }
        for (i, entry) in cfg.allow.iter().enumerate() {
            let method = entry.method.to_ascii_uppercase();
            let method = match method.as_str() {
                "GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" => {
                    Method::from_bytes(method.as_bytes()).ok()
                }
                _ => {
                    errors.push(format!(
                        "allow[{i}].method: {:?} is not one of GET, POST, PUT, PATCH, DELETE, HEAD",
                        entry.method
                    ));
                    None
                }
            };
            if let Err(e) = check_allowed_path(&entry.path) {
                errors.push(format!("allow[{i}].path: {e}"));
            } else if let Some(method) = method {
                allow.push(Allowed {
                    method,
                    path: entry.path.clone(),
                    query: entry.query,
                });
            }
        }
        let max_request_bytes = cfg.max_request_bytes.unwrap_or(DEFAULT_MAX_REQUEST_BYTES);
        if max_request_bytes > MAX_REQUEST_BYTES_LIMIT {
            errors.push(format!(
                "max_request_bytes: {max_request_bytes} is more than {MAX_REQUEST_BYTES_LIMIT}"
            ));
        }
        let max_response_bytes = cfg.max_response_bytes.unwrap_or(DEFAULT_MAX_RESPONSE_BYTES);
        if max_response_bytes == 0 {
            errors.push("max_response_bytes: must be more than zero".to_owned());
        }
        let timeout = cfg.timeout.unwrap_or(DEFAULT_TIMEOUT);
        let idle_timeout = cfg.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT);
        if timeout.is_zero() || idle_timeout.is_zero() {
            errors.push("timeout, idle_timeout: must be longer than zero".to_owned());
        }
        for (field, names) in [
            ("base_url_env", &cfg.base_url_env),
            ("api_key_env", &cfg.api_key_env),
        ] {
            for name in names {
                if let Err(e) = check_env_name(name) {
                    errors.push(format!("{field}: {name:?} {e}"));
                }
            }
        }
        if !cfg.base_path.is_empty() {
            if let Err(e) = check_allowed_path(&cfg.base_path) {
                errors.push(format!("base_path: {e}"));
            }
        }
        match upstream {
            Some(upstream) if errors.is_empty() => Ok(Gateway {
                name: cfg.name.clone(),
                upstream,
                auth,
                allow,
                max_request_bytes,
                max_response_bytes,
                timeout,
                idle_timeout,
                base_url_env: cfg.base_url_env.clone(),
                base_path: cfg.base_path.trim_end_matches('/').to_owned(),
                api_key_env: cfg.api_key_env.clone(),
            }),
            _ => Err(errors),
        }
    }

    /// The parameters a gateway's grant is checked on: `method` and `path`,
    /// both strings (a token may constrain them: `--param path=...`).
    pub fn params() -> BTreeMap<String, ParamSpec> {
        [METHOD_PARAM, PATH_PARAM]
            .into_iter()
            .map(|name| {
                let spec = ParamSpec {
                    ty: ParamType::String,
                    rules: Vec::new(),
                    default: None,
                    secret: false,
                };
                (name.to_owned(), spec)
            })
            .collect()
    }

    /// What a program needs to reach this gateway.
    pub fn info(&self) -> GatewayInfo {
        GatewayInfo {
            gateway: self.name.clone(),
            base_url_env: self.base_url_env.clone(),
            base_path: self.base_path.clone(),
            api_key_env: self.api_key_env.clone(),
            placeholder: PLACEHOLDER.to_owned(),
        }
    }

    /// The credential it sends and how.
    pub(crate) fn auth(&self) -> Option<&Auth> {
        self.auth.as_ref()
    }

    /// `(credential, user)` when the gateway sends an HTTP Basic pair.
    pub fn basic_user(&self) -> Option<(&str, &str)> {
        match &self.auth {
            Some(Auth {
                credential,
                scheme: crate::tool::http::AuthScheme::Basic { user },
            }) => Some((credential, user)),
            _ => None,
        }
    }

    /// Check one request against the gateway's allow list and size cap.
    /// The error completes "gateway request denied: ".
    pub fn check(&self, method: &str, target: &str, body_len: u64) -> Result<Checked, String> {
        let shown = |s: &str| -> String {
            let mut t: String = s.chars().take(80).collect();
            if t.len() < s.len() {
                t.push('…');
            }
            t.escape_default().to_string()
        };
        let (path, query) = match target.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (target, None),
        };
        let allowed = self
            .allow
            .iter()
            .find(|a| a.method.as_str() == method && a.path == path)
            .ok_or_else(|| {
                format!(
                    "{} {} is not in the allow list of gateway {:?}",
                    shown(method),
                    shown(path),
                    self.name
                )
            })?;
        if let Some(query) = query {
            if !allowed.query {
                return Err(format!(
                    "{method} {path} takes no query string at gateway {:?}",
                    self.name
                ));
            }
            if !query.bytes().all(is_query_byte) {
                return Err(format!(
                    "the query string of {method} {path} has a character that must be percent-encoded"
                ));
            }
        }
        if body_len > self.max_request_bytes as u64 {
            return Err(format!(
                "the request body of {body_len} bytes is over the {} bytes gateway {:?} allows",
                self.max_request_bytes, self.name
            ));
        }
        let mut url = self.upstream.clone();
        url.set_path(&format!(
            "{}{path}",
            self.upstream.path().trim_end_matches('/')
        ));
        url.set_query(query);
        // The URL parser must not have changed the path: no dot segment,
        // no encoding it would resolve (the allowed paths have neither).
        if !url.path().ends_with(path) {
            return Err(format!("{} is not a plain path", shown(path)));
        }
        Ok(Checked {
            method: allowed.method.clone(),
            path: path.to_owned(),
            url,
        })
    }
}

/// Scheme http or https, a host, no user, query or fragment.
fn compile_upstream(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| format!("upstream: {text:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("upstream: {text:?} is not an http or https URL"));
    }
    if url.host().is_none() || !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "upstream: {text:?} must name a host and carry no user or password"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("upstream: {text:?} must have no query or fragment"));
    }
    let prefix = url.path().trim_end_matches('/');
    if !prefix.is_empty() {
        check_allowed_path(prefix).map_err(|e| format!("upstream: {e}"))?;
    }
    Ok(url)
}

fn compile_gateway_auth(cfg: &GatewayConfig, errors: &mut Vec<String>) -> Option<Auth> {
    let auth = match &cfg.auth {
        None => None,
        Some(value) => match value.clone().try_into::<AuthConfig>() {
            Ok(auth) => Some(auth),
            Err(e) => {
                errors.push(format!("auth: {}", e.message().trim()));
                return None;
            }
        },
    };
    let fields = HttpFields {
        auth,
        ..HttpFields::default()
    };
    compile_auth(&fields, cfg.credential.as_deref(), errors)
}

/// An allowed path: starts with `/`, segments of unreserved characters
/// and sub-delimiters only (nothing percent-encoded), none empty, `.` or
/// `..`, and each a safe segment by [`path::check_segment`].
fn check_allowed_path(text: &str) -> Result<(), String> {
    let Some(rest) = text.strip_prefix('/') else {
        return Err(format!("{text:?} must start with /"));
    };
    if !rest
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/".contains(&b))
    {
        return Err(format!(
            "{text:?} may hold only letters, digits and -._~!$&'()*+,;=:@ between slashes"
        ));
    }
    if rest.is_empty() {
        return Ok(());
    }
    for segment in rest.split('/') {
        path::check_segment(segment)
            .map_err(|fault| format!("{text:?}: segment {segment:?} {}", fault.describe(false)))?;
    }
    Ok(())
}

/// A byte that may stand in a query string as sent.
fn is_query_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

/// `^[A-Z_][A-Z0-9_]*$`, and none the shim or the dynamic loader owns.
fn check_env_name(name: &str) -> Result<(), &'static str> {
    let mut bytes = name.bytes();
    let ok = matches!(bytes.next(), Some(b'A'..=b'Z' | b'_'))
        && bytes.all(|b| matches!(b, b'A'..=b'Z' | b'0'..=b'9' | b'_'))
        && name.len() <= 64;
    if !ok {
        return Err("is not a variable name (A-Z, 0-9 and _, not starting with a digit)");
    }
    if name.starts_with("KEYWARD_")
        || name.starts_with("LD_")
        || matches!(
            name,
            "PATH" | "HOME" | "TMPDIR" | "PYTHONPATH" | "NODE_OPTIONS"
        )
    {
        return Err("is a variable the sandbox or the loader owns");
    }
    Ok(())
}

/// The tool entry of a gateway: its grants are checked like a tool's, but
/// it is reached over HTTP, not called.
#[derive(Debug)]
pub struct GatewayTool {
    basic: Option<(String, String)>,
}

impl GatewayTool {
    pub fn new(gateway: &Gateway) -> GatewayTool {
        GatewayTool {
            basic: gateway
                .basic_user()
                .map(|(c, u)| (c.to_owned(), u.to_owned())),
        }
    }
}

impl Action for GatewayTool {
    fn kind(&self) -> &'static str {
        "gateway"
    }

    fn run<'a>(&'a self, call: Invocation<'a>, _: Context<'a>) -> Running<'a> {
        let message = format!(
            "{:?} is a gateway: a program reaches it over HTTP through \
             agent-shim run --gateway {}, not as a tool call",
            call.tool, call.tool
        );
        Box::pin(async move { Err(ExecError::Rejected(message)) })
    }

    fn basic_user(&self) -> Option<(&str, &str)> {
        self.basic.as_ref().map(|(c, u)| (c.as_str(), u.as_str()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn gateway(extra: &str) -> Result<Gateway, Vec<String>> {
        let text = format!(
            "name = \"openai\"\nupstream = \"https://api.example.com/base\"\n\
             credential = \"k\"\nauth = {{ bearer = true }}\n{extra}"
        );
        let cfg: GatewayConfig = toml::from_str(&text).unwrap();
        Gateway::compile(&cfg)
    }

    const ALLOW: &str = r#"allow = [ { method = "POST", path = "/v1/chat/completions" },
                                     { method = "get", path = "/v1/models", query = true } ]"#;

    #[test]
    fn only_allowed_method_and_exact_path_pass() {
        let g = gateway(ALLOW).unwrap();
        let ok = g.check("POST", "/v1/chat/completions", 10).unwrap();
        assert_eq!(
            ok.url.as_str(),
            "https://api.example.com/base/v1/chat/completions"
        );
        let ok = g.check("GET", "/v1/models?limit=2&x=%20", 0).unwrap();
        assert_eq!(ok.url.query(), Some("limit=2&x=%20"));
        for (method, target) in [
            ("GET", "/v1/chat/completions"),
            ("POST", "/v1/chat/completions/"),
            ("POST", "/v1/chat/../chat/completions"),
            ("POST", "/v1/chat/%2e%2e/completions"),
            ("POST", "/v1%2Fchat/completions"),
            ("POST", "/v1/chat/completions;x"),
            ("POST", "//v1/chat/completions"),
            ("POST", "/V1/chat/completions"),
            ("post", "/v1/chat/completions"),
            ("POST", "/v1/chat/completions?x=1"),
            ("GET", "/v1/models?a#b"),
            ("GET", "/v1/models?a b"),
            ("DELETE", "/v1/models"),
        ] {
            assert!(g.check(method, target, 0).is_err(), "{method} {target}");
        }
        let too_big = g
            .check("POST", "/v1/chat/completions", 2 << 20)
            .unwrap_err();
        assert!(too_big.contains("over the 1048576 bytes"), "{too_big}");
    }

    #[test]
    fn compile_errors_name_the_field() {
        for (extra, expected) in [
            ("", "allow: list at least one"),
            (
                r#"allow = [ { method = "TRACE", path = "/x" } ]"#,
                "allow[0].method",
            ),
            (
                r#"allow = [ { method = "GET", path = "x" } ]"#,
                "allow[0].path",
            ),
            (
                r#"allow = [ { method = "GET", path = "/a/../b" } ]"#,
                "allow[0].path",
            ),
            (
                r#"allow = [ { method = "GET", path = "/a%2fb" } ]"#,
                "allow[0].path",
            ),
            (
                "allow = [ { method = \"GET\", path = \"/x\" } ]\nbase_url_env = [\"LD_PRELOAD\"]",
                "base_url_env",
            ),
            (
                "allow = [ { method = \"GET\", path = \"/x\" } ]\napi_key_env = [\"a-b\"]",
                "api_key_env",
            ),
            (
                "allow = [ { method = \"GET\", path = \"/x\" } ]\nmax_request_bytes = 99999999999",
                "max_request_bytes",
            ),
        ] {
            let errors = gateway(extra).unwrap_err();
            assert!(
                errors.iter().any(|e| e.starts_with(expected)),
                "{extra}: {errors:?}"
            );
        }
        let cfg: GatewayConfig = toml::from_str(
            "name = \"g\"\nupstream = \"ftp://x\"\nallow = [ { method = \"GET\", path = \"/x\" } ]",
        )
        .unwrap();
        let errors = Gateway::compile(&cfg).unwrap_err();
        assert!(errors[0].starts_with("upstream:"), "{errors:?}");
    }
}
