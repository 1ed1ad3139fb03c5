// SPDX-License-Identifier: Apache-2.0
//! `kind = "http"`: an HTTP request with the credential injected.
//!
//! A tool's URL, headers and JSON body are templates compiled with the
//! policy; a call renders them from its validated parameters, injects the
//! credential as a header last (so nothing else can set or override it),
//! and sends the request with one shared client that follows no redirect
//! (a redirect would carry a named credential header to another host) and
//! uses no proxy. The whole exchange runs under the tool's timeout, the
//! body is read up to the tool's cap and refused beyond it (a truncated
//! body could end in half a secret, which redaction would miss), a
//! response with any `Content-Encoding` but identity is refused, whole
//! credentials in their common encodings are redacted from headers and
//! body, and then what would be returned is judged by the leak scanner
//! ([`crate::leak`]): any fragment of a credential left, in any encoding
//! it normalises, and the whole response is withheld.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;
use keyward_proto::{CallResult, Header};
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use reqwest::Method;
use zeroize::Zeroizing;

use serde::Deserialize;

use super::{off_reactor, Action, Context, Definition, ExecError, Invocation, Kind, Running};
use crate::config::{duration_opt, ParamType};
use crate::credential::{basic_pair, CredentialError, Credentials, Secret};
use crate::error_chain::error_chain;
use crate::param::TypedValue;
use crate::redact::Redactor;
use crate::template::{BodyTemplate, HeaderTemplate, Rejection, UrlTemplate, RESERVED_HEADERS};

/// Largest response body any tool may ask for: a reply frame is at most
/// 64 KiB and the headers need room too.
pub const MAX_RESPONSE_CAP: usize = 60 * 1024;

/// Response headers kept, in bytes of name and value; later headers are
/// dropped so the reply always fits in a frame.
const MAX_RESPONSE_HEADER_BYTES: usize = 3 * 1024;

/// Time to establish a TCP (and TLS) connection; the tool's timeout
/// bounds the whole exchange as well.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Response headers about the connection, not the content.
pub(crate) const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

pub const KIND: Kind = Kind {
    name: "http",
    compile: compile_action,
};

fn compile_action(def: &Definition<'_>) -> Result<Box<dyn Action>, Vec<String>> {
    let fields = def.fields::<HttpFields>()?;
    HttpTool::compile(def, &fields).map(|tool| Box::new(tool) as Box<dyn Action>)
}

/// The fields `kind = "http"` adds to a `[[tool]]` entry.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HttpFields {
    pub method: Option<String>,
    /// URL template: `{name}` placeholders in the path and query only.
    pub url: Option<String>,
    /// Header templates: fixed names, `{name}` placeholders in values.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// JSON body template; strings that are exactly `"{name}"` become the
    /// typed value, other strings interpolate.
    pub body_json: Option<toml::Value>,
    pub auth: Option<AuthConfig>,
    #[serde(default, with = "duration_opt")]
    pub timeout: Option<Duration>,
    pub max_response_bytes: Option<usize>,
}

/// How the credential is injected into an HTTP request. Exactly one field
/// must be set.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `Authorization: Bearer <secret>`.
    #[serde(default)]
    pub bearer: bool,
    /// `Authorization: Basic base64(<user>:<secret>)`.
    pub basic: Option<String>,
    /// `<header>: <secret>`.
    pub header: Option<String>,
    /// SigV4-sign the request with an AWS key (`kind = "aws"`).
    pub aws_sigv4: Option<SigV4Config>,
}

/// `auth = { aws_sigv4 = { service = "s3", region = "us-east-1" } }`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SigV4Config {
    pub service: Option<String>,
    /// Default: the credential's region.
    pub region: Option<String>,
}

/// A compiled `kind = "http"` tool.
#[derive(Debug)]
pub struct HttpTool {
    method: Method,
    /// Boxed to keep `policy::Action` small.
    url: Box<UrlTemplate>,
    headers: Vec<HeaderTemplate>,
    body: Option<BodyTemplate>,
    auth: Option<Auth>,
    timeout: Duration,
    max_response_bytes: usize,
}

/// How the credential goes into the request (also a gateway's).
#[derive(Debug)]
pub(crate) struct Auth {
    pub(crate) credential: String,
    pub(crate) scheme: AuthScheme,
}

#[derive(Debug)]
pub(crate) enum AuthScheme {
    Bearer,
    Basic {
        user: String,
    },
    Header(HeaderName),
    /// Signed with SigV4 ([`crate::credential::aws::sign`]); `region`
    /// `None` is the credential's.
    AwsSigV4 {
        service: String,
        region: Option<String>,
    },
}

impl AuthScheme {
    pub(crate) fn header_name(&self) -> HeaderName {
        match self {
            AuthScheme::Bearer | AuthScheme::Basic { .. } | AuthScheme::AwsSigV4 { .. } => {
                header::AUTHORIZATION
            }
            AuthScheme::Header(name) => name.clone(),
        }
    }

    /// The header value carrying `secret`, built in zeroizing buffers and
    /// marked sensitive. (The `HeaderValue` itself is not zeroized on drop:
    /// the HTTP stack owns it.)
    pub(crate) fn header_value(&self, secret: &Secret) -> Option<HeaderValue> {
        let bytes: Zeroizing<Vec<u8>> = match self {
            AuthScheme::Bearer => {
                let mut v = Zeroizing::new(Vec::with_capacity(7 + secret.expose().len()));
                v.extend_from_slice(b"Bearer ");
                v.extend_from_slice(secret.expose());
                v
            }
            AuthScheme::Basic { user } => {
                let pair = basic_pair(user, secret);
                let mut text =
                    Zeroizing::new(String::with_capacity(6 + pair.len().div_ceil(3) * 4));
                text.push_str("Basic ");
                base64::engine::general_purpose::STANDARD.encode_string(pair.as_slice(), &mut text);
                Zeroizing::new(text.as_bytes().to_vec())
            }
            AuthScheme::Header(_) => Zeroizing::new(secret.expose().to_vec()),
            AuthScheme::AwsSigV4 { .. } => return None,
        };
        let mut value = HeaderValue::from_bytes(&bytes).ok()?;
        value.set_sensitive(true);
        Some(value)
    }
}

impl HttpTool {
    /// Compile the http fields of a tool. Errors are messages relative to
    /// the tool (e.g. `url: placeholder {x} names no parameter`).
    pub fn compile(def: &Definition<'_>, tool: &HttpFields) -> Result<HttpTool, Vec<String>> {
        let params = def.params;
        let declared = |name: &str| params.contains_key(name);
        let mut errors = Vec::new();

        let method = match tool
            .method
            .as_deref()
            .map(str::to_ascii_uppercase)
            .as_deref()
        {
            Some(m @ ("GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD")) => {
                Method::from_bytes(m.as_bytes()).ok()
            }
            Some(other) => {
                errors.push(format!(
                    "method: {other} is not one of GET, POST, PUT, PATCH, DELETE, HEAD"
                ));
                None
            }
            None => {
                errors.push("method: is required for an http tool".to_owned());
                None
            }
        };

        let url = match tool.url.as_deref() {
            Some(text) => UrlTemplate::compile(text, &declared, &|name| {
                params.get(name).is_some_and(|p| p.ty == ParamType::Path)
            })
            .map_err(|e| errors.push(format!("url: {e}")))
            .ok(),
            None => {
                errors.push("url: is required for an http tool".to_owned());
                None
            }
        };

        let auth = compile_auth(tool, def.credential, &mut errors);
        let credential_header = auth.as_ref().map(|a| a.scheme.header_name());

        let mut headers = Vec::new();
        for (name, value) in &tool.headers {
            match HeaderTemplate::compile(name, value, &declared, credential_header.as_ref()) {
                Ok(t) => headers.push(t),
                Err(e) => errors.push(format!("headers.{name}: {e}")),
            }
        }

        let body = match &tool.body_json {
            Some(_) if matches!(method, Some(Method::GET | Method::HEAD)) => {
                errors.push(format!(
                    "body_json: a {} request has no body",
                    method.as_ref().map_or("", Method::as_str)
                ));
                None
            }
            Some(value) => BodyTemplate::compile(value, &declared)
                .map_err(|e| errors.extend(e))
                .ok(),
            None => None,
        };

        let timeout = tool.timeout.unwrap_or(def.defaults.timeout);
        if timeout.is_zero() {
            errors.push("timeout: must be longer than zero".to_owned());
        }
        let max_response_bytes = tool
            .max_response_bytes
            .unwrap_or(def.defaults.max_response_bytes);
        if max_response_bytes == 0 || max_response_bytes > MAX_RESPONSE_CAP {
            let from = if tool.max_response_bytes.is_some() {
                "max_response_bytes"
            } else {
                "max_response_bytes (from broker.max_response_bytes)"
            };
            errors.push(format!(
                "{from}: {max_response_bytes} is not between 1 and {MAX_RESPONSE_CAP}"
            ));
        }

        match (method, url) {
            (Some(method), Some(url)) if errors.is_empty() => Ok(HttpTool {
                method,
                url: Box::new(url),
                headers,
                body,
                auth,
                timeout,
                max_response_bytes,
            }),
            _ => Err(errors),
        }
    }

    /// `(credential, user)` when the tool uses HTTP Basic auth: pass it to
    /// [`Credentials::register_basic_user`] so redaction covers the pair.
    pub fn basic_user(&self) -> Option<(&str, &str)> {
        match &self.auth {
            Some(Auth {
                credential,
                scheme: AuthScheme::Basic { user },
            }) => Some((credential, user)),
            _ => None,
        }
    }

    /// The upstream timeout of one call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The cap on the response body, in bytes.
    pub fn max_response_bytes(&self) -> usize {
        self.max_response_bytes
    }
}

pub(crate) fn compile_auth(
    tool: &HttpFields,
    credential: Option<&str>,
    errors: &mut Vec<String>,
) -> Option<Auth> {
    let (config, credential) = match (&tool.auth, credential) {
        (None, None) => return None,
        (Some(_), None) => {
            errors.push("auth: needs a credential (credential = \"NAME\")".to_owned());
            return None;
        }
        (None, Some(name)) => {
            errors.push(format!(
                "credential: {name} is set but auth is not; say how to inject it \
                 (auth = {{ bearer = true }}, {{ basic = \"USER\" }}, {{ header = \"NAME\" }} \
                 or {{ aws_sigv4 = {{ service = \"s3\" }} }})"
            ));
            return None;
        }
        (Some(config), Some(credential)) => (config, credential.to_owned()),
    };
    let set = usize::from(config.bearer)
        + usize::from(config.basic.is_some())
        + usize::from(config.header.is_some())
        + usize::from(config.aws_sigv4.is_some());
    if set != 1 {
        errors.push("auth: set exactly one of bearer, basic, header and aws_sigv4".to_owned());
        return None;
    }
    let scheme = if let Some(sigv4) = &config.aws_sigv4 {
        use crate::credential::aws::{valid_region, valid_service};
        let service = match sigv4.service.as_deref() {
            Some(service) if valid_service(service) => service.to_owned(),
            Some(service) => {
                errors.push(format!(
                    "auth.aws_sigv4.service: {service:?} is not an AWS service name (like \"s3\")"
                ));
                return None;
            }
            None => {
                errors.push("auth.aws_sigv4.service: is required (like \"s3\")".to_owned());
                return None;
            }
        };
        if let Some(region) = sigv4.region.as_deref().filter(|r| !valid_region(r)) {
            errors.push(format!(
                "auth.aws_sigv4.region: {region:?} is not an AWS region name (like \"us-east-1\")"
            ));
            return None;
        }
        AuthScheme::AwsSigV4 {
            service,
            region: sigv4.region.clone(),
        }
    } else if config.bearer {
        AuthScheme::Bearer
    } else if let Some(user) = &config.basic {
        if user.contains(':') || user.chars().any(char::is_control) {
            errors.push(
                "auth.basic: the user name cannot contain `:` or control characters".to_owned(),
            );
            return None;
        }
        AuthScheme::Basic { user: user.clone() }
    } else {
        let name = config.header.as_deref().unwrap_or_default();
        let Ok(header) = HeaderName::from_bytes(name.as_bytes()) else {
            errors.push(format!("auth.header: {name:?} is not a valid header name"));
            return None;
        };
        if RESERVED_HEADERS.contains(&header.as_str()) || header == header::CONTENT_TYPE {
            errors.push(format!("auth.header: {name} cannot carry a credential"));
            return None;
        }
        AuthScheme::Header(header)
    };
    Some(Auth { credential, scheme })
}

/// The one HTTP client every http tool shares, built on first use.
static CLIENT: OnceLock<Result<reqwest::Client, String>> = OnceLock::new();

/// How fetching failed, before redaction.
enum FetchError {
    Upstream(String),
    TooLarge,
}

/// The shared client: no redirects, no proxy. The daemon calls this at
/// start so that a client that cannot be built fails the start.
pub fn client() -> Result<&'static reqwest::Client, ExecError> {
    CLIENT
        .get_or_init(build_client)
        .as_ref()
        .map_err(|e| ExecError::Client(e.clone()))
}

fn build_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .connect_timeout(CONNECT_TIMEOUT)
        .referer(false)
        // Tests talk plain HTTP on loopback; the scheme of each tool is
        // the admin's choice, checked when the URL is rendered.
        .https_only(false)
        .user_agent(concat!("keyward/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| error_chain(&e))
}

impl Action for HttpTool {
    fn kind(&self) -> &'static str {
        KIND.name
    }

    fn run<'a>(&'a self, call: Invocation<'a>, context: Context<'a>) -> Running<'a> {
        Box::pin(self.execute(call.tool, call.params, context.credentials))
    }

    fn basic_user(&self) -> Option<(&str, &str)> {
        HttpTool::basic_user(self)
    }

    fn uses_aws_key(&self) -> bool {
        matches!(
            self.auth,
            Some(Auth {
                scheme: AuthScheme::AwsSigV4 { .. },
                ..
            })
        )
    }
}

impl HttpTool {
    async fn execute(
        &self,
        tool_name: &str,
        params: &BTreeMap<String, TypedValue>,
        credentials: &Credentials,
    ) -> Result<CallResult, ExecError> {
        let tool = self;
        let reject = |r: Rejection| ExecError::Rejected(r.sentence(tool_name));
        let url = tool.url.render(params).map_err(reject)?;
        let mut headers = HeaderMap::new();
        for template in &tool.headers {
            let value = template.render(params).map_err(reject)?;
            headers.insert(template.name().clone(), value);
        }
        let body = match &tool.body {
            Some(template) => {
                let json = template.render(params).map_err(reject)?;
                if !headers.contains_key(header::CONTENT_TYPE) {
                    headers.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                }
                Some(json.to_string().into_bytes())
            }
            None => None,
        };
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );

        // The credential's value now: a static secret, or an OAuth access
        // token (refreshed first if due, and once more on a 401).
        let mut current = None;
        if let Some(auth) = &tool.auth {
            if !credentials.contains(&auth.credential) {
                return Err(ExecError::Internal(format!(
                    "credential {} is not loaded",
                    auth.credential
                )));
            }
            current = Some(
                credentials
                    .current(&auth.credential)
                    .await
                    .map_err(|e| credential_error(credentials, &e))?,
            );
        }
        // SigV4 signs the finished request instead of sending the secret.
        let sigv4 = match &tool.auth {
            Some(Auth {
                credential,
                scheme: AuthScheme::AwsSigV4 { service, region },
            }) => {
                let (key, secret) = credentials.aws(credential).ok_or_else(|| {
                    ExecError::Internal(format!("AWS credential {credential} is not loaded"))
                })?;
                let region = region.as_deref().unwrap_or(&key.region);
                Some((key, secret, service.as_str(), region))
            }
            _ => None,
        };
        let mut retried = false;
        let fetched = loop {
            let mut request = reqwest::Request::new(tool.method.clone(), url.clone());
            *request.headers_mut() = headers.clone();
            if let (None, Some(auth), Some(current)) = (&sigv4, &tool.auth, &current) {
                let value = auth.scheme.header_value(&current.secret).ok_or_else(|| {
                    ExecError::Upstream(format!(
                        "credential {} cannot be sent in an HTTP header (it contains a control character)",
                        auth.credential
                    ))
                })?;
                // Last, and `insert`: replaces anything of the same name.
                request
                    .headers_mut()
                    .insert(auth.scheme.header_name(), value);
            }
            if let Some((key, secret, service, region)) = sigv4 {
                // Last: nothing after it may change what was signed.
                let payload = body.as_deref().unwrap_or_default();
                crate::credential::aws::sign(&mut request, payload, key, secret, service, region)
                    .map_err(|e| {
                    ExecError::Upstream(credentials.redactor().redact_str(&e.to_string()))
                })?;
            }
            if let Some(body) = &body {
                *request.body_mut() = Some(body.clone().into());
            }
            let fetched = tokio::time::timeout(
                tool.timeout,
                fetch(client()?, request, tool.max_response_bytes),
            )
            .await
            .map_err(|_| ExecError::Timeout(tool.timeout))?;
            let unauthorized = matches!(&fetched, Ok((401, _, _)));
            if let (true, false, Some(auth), Some(used)) =
                (unauthorized, retried, &tool.auth, &current)
            {
                let renewed = credentials
                    .rejected(&auth.credential, used)
                    .await
                    .map_err(|e| credential_error(credentials, &e))?;
                if let Some(renewed) = renewed {
                    current = Some(renewed);
                    retried = true;
                    continue;
                }
            }
            break fetched;
        };

        // Redaction of a Basic pair nobody registered: built for this call.
        let mut pair_redactor = None;
        if let (Some(auth), Some(current)) = (&tool.auth, &current) {
            if let AuthScheme::Basic { user } = &auth.scheme {
                if !credentials.has_basic_user(&auth.credential, user) {
                    let pair = basic_pair(user, &current.secret);
                    pair_redactor = Some(
                        Redactor::new([pair.as_slice()])
                            .map_err(|e| ExecError::Client(e.to_string()))?,
                    );
                }
            }
        }
        // Taken after the credential's value is known: it covers it.
        let redactor = credentials.redactor();
        let redact_bytes = |bytes: &[u8]| match &pair_redactor {
            Some(pair) => redactor.redact_bytes(&pair.redact_bytes(bytes)),
            None => redactor.redact_bytes(bytes),
        };
        let redact_text =
            |text: &str| String::from_utf8_lossy(&redact_bytes(text.as_bytes())).into_owned();

        let (status, response_headers, raw_body) = fetched.map_err(|e| match e {
            FetchError::TooLarge => ExecError::TooLarge(tool.max_response_bytes),
            FetchError::Upstream(message) => ExecError::Upstream(redact_text(&message)),
        })?;

        let body = redact_bytes(&raw_body);
        drop(raw_body);
        if body.len() > tool.max_response_bytes {
            // Redaction can lengthen a body; the frame must still fit.
            return Err(ExecError::TooLarge(tool.max_response_bytes));
        }
        let mut headers = Vec::new();
        let mut header_bytes = 0;
        for (name, value) in &response_headers {
            if HOP_BY_HOP.contains(&name.as_str()) {
                continue;
            }
            let name = match &pair_redactor {
                Some(pair) => {
                    redactor.redact_str_any_case(&pair.redact_str_any_case(name.as_str()))
                }
                None => redactor.redact_str_any_case(name.as_str()),
            };
            let value = String::from_utf8_lossy(&redact_bytes(value.as_bytes())).into_owned();
            header_bytes += name.len() + value.len();
            if header_bytes > MAX_RESPONSE_HEADER_BYTES {
                break;
            }
            headers.push(Header { name, value });
        }
        // The status is a number; the reason phrase is not returned. The
        // judgement is CPU work (milliseconds for a full body, more for a
        // hostile one): off the reactor.
        off_reactor(|| {
            credentials.scanner().check_response(
                headers
                    .iter()
                    .map(|h| (h.name.as_bytes(), h.value.as_bytes())),
                &body,
            )
        })
        .map_err(ExecError::Withheld)?;
        Ok(CallResult {
            status,
            headers,
            body,
        })
    }
}

/// A credential that cannot be used now, as the caller's error (redacted,
/// though the message is built to name no value).
fn credential_error(credentials: &Credentials, error: &CredentialError) -> ExecError {
    ExecError::Credential(credentials.redactor().redact_str(&error.to_string()))
}

/// Send the request and read the response, refusing a body over `cap`
/// and one the upstream compressed (which could not be redacted).
async fn fetch(
    client: &reqwest::Client,
    request: reqwest::Request,
    cap: usize,
) -> Result<(u16, HeaderMap, Zeroizing<Vec<u8>>), FetchError> {
    let upstream = |e: reqwest::Error| FetchError::Upstream(error_chain(&e.without_url()));
    let mut response = client.execute(request).await.map_err(upstream)?;
    if response
        .content_length()
        .is_some_and(|len| len > cap as u64)
    {
        return Err(FetchError::TooLarge);
    }
    // Every Content-Encoding header, every coding listed in each: the
    // first saying `identity` must not hide a second saying `gzip`.
    let encoded = response
        .headers()
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .map(|coding| coding.trim_ascii())
        .any(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case(b"identity"));
    if encoded {
        return Err(FetchError::Upstream(
            "the response is compressed (content-encoding), which the broker refuses: \
                 it asks for identity and judges only what it can read"
                .to_owned(),
        ));
    }
    // Sized once: no reallocation leaves an unzeroized copy behind.
    let mut body = Zeroizing::new(Vec::with_capacity(cap));
    while let Some(chunk) = response.chunk().await.map_err(upstream)? {
        if chunk.len() > cap - body.len() {
            return Err(FetchError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    let status = response.status().as_u16();
    let headers = std::mem::take(response.headers_mut());
    Ok((status, headers, body))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::mpsc;

    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

    use super::*;
    use crate::config::ToolConfig;
    use crate::param::ParamSpec;
    use crate::tool::Defaults;

    const SECRET: &str = "tok_Secr3tValue+/=0123456789";

    fn config(text: &str) -> ToolConfig {
        toml::from_str(&format!("name = \"t\"\nkind = \"http\"\n{text}")).unwrap()
    }

    fn params_of(config: &ToolConfig) -> BTreeMap<String, ParamSpec> {
        config
            .params
            .iter()
            .map(|(name, p)| {
                let spec = ParamSpec {
                    ty: p.ty,
                    rules: Vec::new(),
                    default: None,
                    secret: false,
                };
                (name.clone(), spec)
            })
            .collect()
    }

    fn compile(text: &str) -> Result<HttpTool, Vec<String>> {
        let config = config(text);
        let params = params_of(&config);
        let def = Definition {
            name: &config.name,
            kind: "http",
            credential: config.credential.as_deref(),
            params: &params,
            fields: &config.fields,
            defaults: Defaults {
                timeout: Duration::from_secs(10),
                max_response_bytes: 60_000,
            },
        };
        HttpTool::compile(&def, &def.fields::<HttpFields>()?)
    }

    fn compile_err(text: &str) -> Vec<String> {
        compile(text).unwrap_err()
    }

    fn tool(text: &str) -> HttpTool {
        compile(text).unwrap()
    }

    fn credentials() -> Credentials {
        Credentials::from_values([("api", SECRET)]).unwrap()
    }

    async fn run(
        tool: &HttpTool,
        params: &[(&str, &str)],
        credentials: &Credentials,
    ) -> Result<CallResult, ExecError> {
        let params: BTreeMap<String, TypedValue> = params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), TypedValue::Str((*v).to_owned())))
            .collect();
        tool.execute("t", &params, credentials).await
    }

    /// What the upstream saw.
    #[derive(Debug)]
    struct Seen {
        method: String,
        url: String,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Seen {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// A loopback upstream: reports each request, then answers with
    /// `respond`.
    fn upstream(
        respond: impl Fn(&Seen) -> tiny_http::ResponseBox + Send + 'static,
    ) -> (SocketAddr, mpsc::Receiver<Seen>) {
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let addr = server.server_addr().to_ip().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for mut request in server.incoming_requests() {
                let mut body = String::new();
                request.as_reader().read_to_string(&mut body).unwrap();
                let seen = Seen {
                    method: request.method().to_string(),
                    url: request.url().to_owned(),
                    headers: request
                        .headers()
                        .iter()
                        .map(|h| (h.field.to_string(), h.value.to_string()))
                        .collect(),
                    body,
                };
                let response = respond(&seen);
                let _ = tx.send(seen);
                let _ = request.respond(response);
            }
        });
        (addr, rx)
    }

    /// Echoes every request header in a JSON body and in response headers
    /// (one of them named after the credential header's value).
    fn echo(seen: &Seen) -> tiny_http::ResponseBox {
        let headers: serde_json::Map<String, serde_json::Value> = seen
            .headers
            .iter()
            .map(|(n, v)| (n.clone(), serde_json::Value::String(v.clone())))
            .collect();
        let body = serde_json::json!({"url": seen.url, "headers": headers, "body": seen.body});
        let mut response = tiny_http::Response::from_string(body.to_string());
        for (name, value) in &seen.headers {
            let echoed = format!("X-Echo-{name}");
            response.add_header(
                tiny_http::Header::from_bytes(echoed.as_bytes(), value.as_bytes()).unwrap(),
            );
        }
        if let Some(key) = seen.header("x-api-key") {
            let name = format!("X-Leak-{key}");
            if let Ok(h) = tiny_http::Header::from_bytes(name.as_bytes(), &b"1"[..]) {
                response.add_header(h);
            }
        }
        response.boxed()
    }

    fn assert_no_secret(result: &CallResult, extra: &[&str]) {
        assert_no_value(result, SECRET, extra);
    }

    fn assert_no_value(result: &CallResult, secret: &str, extra: &[&str]) {
        let mut text = String::from_utf8_lossy(&result.body).into_owned();
        for h in &result.headers {
            text.push_str(&format!("\n{}: {}", h.name, h.value));
        }
        let lower = secret.to_ascii_lowercase();
        let mut needles = vec![
            secret.to_owned(),
            lower,
            STANDARD.encode(secret),
            URL_SAFE_NO_PAD.encode(secret),
            serde_json::to_string(secret)
                .unwrap()
                .trim_matches('"')
                .to_owned(),
        ];
        needles.extend(extra.iter().map(|s| (*s).to_owned()));
        for needle in needles {
            assert!(!text.contains(&needle), "{needle} leaked in:\n{text}");
        }
        assert!(text.contains("[REDACTED]"), "{text}");
    }

    fn url_tool(addr: SocketAddr, extra: &str) -> String {
        format!(
            "params.a = {{ type = \"string\" }}\nmethod = \"POST\"\n\
             url = \"http://{addr}/v1/{{a}}/x?q=lit\"\ncredential = \"api\"\n{extra}"
        )
    }

    #[tokio::test]
    async fn bearer_is_injected_and_echo_is_redacted() {
        let (addr, seen) = upstream(echo);
        let tool = tool(&url_tool(
            addr,
            "auth = { bearer = true }\nbody_json = { v = \"{a}\" }",
        ));
        let result = run(&tool, &[("a", "item")], &credentials()).await.unwrap();
        let seen = seen.recv().unwrap();
        assert_eq!(seen.method, "POST");
        assert_eq!(seen.url, "/v1/item/x?q=lit");
        assert_eq!(
            seen.header("authorization"),
            Some(format!("Bearer {SECRET}").as_str())
        );
        assert_eq!(seen.header("content-type"), Some("application/json"));
        assert_eq!(seen.header("accept-encoding"), Some("identity"));
        assert_eq!(seen.body, r#"{"v":"item"}"#);
        assert_eq!(result.status, 200);
        assert_no_secret(&result, &[]);
        let body: serde_json::Value = serde_json::from_slice(&result.body).unwrap();
        assert_eq!(body["headers"]["authorization"], "Bearer [REDACTED]");
        let echoed = result
            .headers
            .iter()
            .find(|h| h.name == "x-echo-authorization")
            .unwrap();
        assert_eq!(echoed.value, "Bearer [REDACTED]");
    }

    #[tokio::test]
    async fn basic_is_injected_and_echo_is_redacted() {
        let pair = STANDARD.encode(format!("alice:{SECRET}"));
        for register in [false, true] {
            let (addr, seen) = upstream(echo);
            let tool = tool(&url_tool(addr, "auth = { basic = \"alice\" }"));
            let mut credentials = credentials();
            if register {
                let (credential, user) = tool.basic_user().unwrap();
                credentials.register_basic_user(credential, user).unwrap();
            }
            let result = run(&tool, &[("a", "x")], &credentials).await.unwrap();
            let seen = seen.recv().unwrap();
            assert_eq!(
                seen.header("authorization"),
                Some(format!("Basic {pair}").as_str())
            );
            assert_no_secret(&result, &[&pair, &pair[8..]]);
            let body: serde_json::Value = serde_json::from_slice(&result.body).unwrap();
            assert_eq!(body["headers"]["authorization"], "Basic [REDACTED]");
        }
    }

    #[tokio::test]
    async fn header_auth_overrides_and_is_redacted_in_names_too() {
        let (addr, seen) = upstream(echo);
        let tool = tool(&url_tool(
            addr,
            "auth = { header = \"X-Api-Key\" }\nheaders = { \"X-Source\" = \"keyward {a}\" }",
        ));
        // Only token characters, so the echo can put it in a header name.
        let secret = "Tok_NameSafe+Secret.0123";
        let credentials = Credentials::from_values([("api", secret)]).unwrap();
        let result = run(&tool, &[("a", "z")], &credentials).await.unwrap();
        let seen = seen.recv().unwrap();
        assert_eq!(seen.header("x-api-key"), Some(secret));
        assert_eq!(seen.header("x-source"), Some("keyward z"));
        assert!(seen.header("authorization").is_none());
        assert_no_value(&result, secret, &[]);
        assert!(
            result.headers.iter().any(|h| h.name == "x-leak-[REDACTED]"),
            "{:?}",
            result.headers
        );
    }

    #[tokio::test]
    async fn injection_attempts_are_encoded_or_rejected() {
        let (addr, seen) = upstream(|_| tiny_http::Response::from_string("ok").boxed());
        let tool = tool(&url_tool(
            addr,
            "auth = { bearer = true }\nheaders = { \"X-Note\" = \"{a}\" }",
        ));
        let creds = credentials();
        for (value, path) in [
            ("?x=1&q=2#f", "/v1/%3Fx%3D1%26q%3D2%23f/x?q=lit"),
            ("\"quoted\"", "/v1/%22quoted%22/x?q=lit"),
        ] {
            run(&tool, &[("a", value)], &creds).await.unwrap();
            assert_eq!(seen.recv().unwrap().url, path);
        }
        for (value, needle) in [
            ("..", "URL path"),
            (".", "URL path"),
            ("../admin", "one URL path segment"),
            ("a\r\nX-Evil: 1", "control"),
        ] {
            let err = run(&tool, &[("a", value)], &creds).await.unwrap_err();
            match err {
                ExecError::Rejected(reason) => {
                    assert!(reason.starts_with("parameter \"a\" of tool t "), "{reason}");
                    assert!(reason.contains(needle), "{reason}");
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(
            seen.try_recv().is_err(),
            "a rejected call reached the upstream"
        );
    }

    #[tokio::test]
    async fn oversized_responses_are_refused_not_truncated() {
        let big = "A".repeat(70 * 1024);
        let (addr, _seen) = upstream(move |seen| {
            if seen.url.contains("chunked") {
                let data = std::io::Cursor::new(big.clone().into_bytes());
                tiny_http::Response::new(tiny_http::StatusCode(200), vec![], data, None, None)
                    .boxed()
            } else {
                tiny_http::Response::from_string(big.clone()).boxed()
            }
        });
        let tool = tool(&url_tool(
            addr,
            "auth = { bearer = true }\nmax_response_bytes = 1000",
        ));
        for a in ["sized", "chunked"] {
            let err = run(&tool, &[("a", a)], &credentials()).await.unwrap_err();
            assert!(matches!(err, ExecError::TooLarge(1000)), "{a}: {err:?}");
        }
    }

    #[tokio::test]
    async fn slow_upstream_times_out() {
        let (addr, _seen) = upstream(|_| {
            std::thread::sleep(Duration::from_secs(2));
            tiny_http::Response::from_string("late").boxed()
        });
        let tool = tool(&url_tool(
            addr,
            "auth = { bearer = true }\ntimeout = \"200ms\"",
        ));
        let err = run(&tool, &[("a", "x")], &credentials()).await.unwrap_err();
        assert!(
            matches!(err, ExecError::Timeout(d) if d == Duration::from_millis(200)),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn redirects_are_not_followed() {
        let (target, target_seen) = upstream(echo);
        let (addr, _seen) = upstream(move |_| {
            let location = format!("http://{target}/stolen");
            tiny_http::Response::from_string("")
                .with_status_code(302)
                .with_header(
                    tiny_http::Header::from_bytes(&b"Location"[..], location.as_bytes()).unwrap(),
                )
                .boxed()
        });
        let tool = tool(&url_tool(addr, "auth = { header = \"X-Api-Key\" }"));
        let result = run(&tool, &[("a", "x")], &credentials()).await.unwrap();
        assert_eq!(result.status, 302);
        assert!(target_seen.try_recv().is_err());
    }

    #[tokio::test]
    async fn compressed_responses_are_refused() {
        let (addr, _seen) = upstream(|_| {
            tiny_http::Response::from_string("\u{1f}\u{8b}...")
                .with_header(
                    tiny_http::Header::from_bytes(&b"Content-Encoding"[..], &b"gzip"[..]).unwrap(),
                )
                .boxed()
        });
        let tool = tool(&url_tool(addr, "auth = { bearer = true }"));
        let err = run(&tool, &[("a", "x")], &credentials()).await.unwrap_err();
        assert!(err.to_string().contains("compressed"), "{err}");
    }

    /// The line between redact and withhold: a whole credential echoed in
    /// a plain form is redacted and the rest returned; a fragment, or the
    /// whole one in a form redaction does not know, withholds everything.
    #[tokio::test]
    async fn a_fragment_is_withheld_where_a_whole_echo_is_redacted() {
        let (addr, _seen) = upstream(|seen| {
            let body = match seen.url.as_str() {
                u if u.contains("/whole/") => format!("key={SECRET}"),
                u if u.contains("/part/") => format!("bad key {}", &SECRET[..SECRET.len() - 2]),
                _ => SECRET.bytes().map(|b| format!("{b:02x} ")).collect(),
            };
            tiny_http::Response::from_string(body).boxed()
        });
        let tool = tool(&url_tool(addr, "auth = { bearer = true }"));
        let result = run(&tool, &[("a", "whole")], &credentials()).await.unwrap();
        assert_eq!(result.body, b"key=[REDACTED]");
        for a in ["part", "spaced-hex"] {
            let err = run(&tool, &[("a", a)], &credentials()).await.unwrap_err();
            assert!(matches!(err, ExecError::Withheld(_)), "{a}: {err:?}");
            assert!(
                err.to_string()
                    .starts_with("withheld: the response contains credential material"),
                "{err}"
            );
        }
    }

    #[tokio::test]
    async fn upstream_errors_carry_no_url_or_secret() {
        // Bind then drop a listener: the port refuses connections.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let tool = tool(&url_tool(addr, "auth = { bearer = true }"));
        let err = run(&tool, &[("a", "private-path-value")], &credentials())
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ExecError::Upstream(_)), "{text}");
        assert!(!text.contains("private-path-value"), "{text}");
        assert!(!text.contains(SECRET), "{text}");
    }

    #[test]
    fn compile_errors() {
        let base = "params.a = { type = \"string\" }\nmethod = \"POST\"\ncredential = \"api\"\n";
        let err = compile_err(&format!(
            "{base}url = \"https://h/{{x}}\"\nauth = {{ bearer = true }}"
        ));
        assert_eq!(err, vec!["url: placeholder {x} names no parameter"]);
        let err = compile_err(&format!(
            "{base}url = \"https://h/\"\nauth = {{ bearer = true }}\nheaders = {{ Authorization = \"Bearer {{a}}\" }}"
        ));
        assert_eq!(
            err,
            vec!["headers.Authorization: is the header the credential is injected as"]
        );
        let err = compile_err(&format!(
            "{base}url = \"https://h/\"\nauth = {{ header = \"X-Key\" }}\nheaders = {{ \"x-key\" = \"a\" }}"
        ));
        assert!(err[0].contains("credential is injected"), "{err:?}");
        let err = compile_err(&format!("{base}url = \"https://h/\""));
        assert!(
            err[0].starts_with("credential: api is set but auth is not"),
            "{err:?}"
        );
        let err = compile_err("method = \"GET\"\nurl = \"https://h/\"\nauth = { bearer = true }");
        assert!(err[0].starts_with("auth: needs a credential"), "{err:?}");
        let err = compile_err(&format!(
            "{base}url = \"https://h/\"\nauth = {{ bearer = true, header = \"X\" }}"
        ));
        assert_eq!(
            err,
            vec!["auth: set exactly one of bearer, basic, header and aws_sigv4"]
        );
        let err = compile_err(&format!(
            "{base}url = \"https://h/\"\nauth = {{ aws_sigv4 = {{ region = \"us-east-1\" }} }}"
        ));
        assert_eq!(
            err,
            vec!["auth.aws_sigv4.service: is required (like \"s3\")"]
        );
        let err = compile_err(&format!(
            "{base}url = \"https://h/\"\nauth = {{ aws_sigv4 = {{ service = \"S3\" }} }}"
        ));
        assert!(
            err[0].starts_with("auth.aws_sigv4.service: \"S3\""),
            "{err:?}"
        );
        let err = compile_err(&format!(
            "{base}url = \"https://h/\"\nauth = {{ aws_sigv4 = {{ service = \"s3\", region = \"x y\" }} }}"
        ));
        assert!(err[0].starts_with("auth.aws_sigv4.region:"), "{err:?}");
        let err = compile_err(&format!(
            "{base}url = \"https://h/\"\nauth = {{ aws_sigv4 = {{ service = \"s3\", bucket = \"b\" }} }}"
        ));
        assert!(err[0].contains("bucket"), "{err:?}");
        let err = compile_err(&format!("{base}url = \"https://h/\"\nauth = {{}}"));
        assert_eq!(
            err,
            vec!["auth: set exactly one of bearer, basic, header and aws_sigv4"]
        );
        let err = compile_err(
            "params.a = { type = \"string\" }\nmethod = \"GET\"\nurl = \"https://h/\"\nbody_json = { a = \"{a}\" }",
        );
        assert_eq!(err, vec!["body_json: a GET request has no body"]);
        let err = compile_err("url = \"https://h/\"");
        assert_eq!(err, vec!["method: is required for an http tool"]);
        let err =
            compile_err("method = \"TRACE\"\nurl = \"https://h/\"\nmax_response_bytes = 100000");
        assert_eq!(err.len(), 2, "{err:?}");
        assert!(err[1].contains("not between 1 and 61440"), "{err:?}");
        let err = compile_err("method = \"GET\"\nurl = \"https://h/\"\nheaders = { Host = \"x\" }");
        assert!(err[0].starts_with("headers.Host:"), "{err:?}");
        let err = compile_err(&format!(
            "{base}url = \"https://h/\"\nauth = {{ basic = \"a:b\" }}"
        ));
        assert!(err[0].starts_with("auth.basic:"), "{err:?}");
        compile("method = \"get\"\nurl = \"https://h/\"").unwrap();
    }
}
