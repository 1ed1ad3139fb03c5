// SPDX-License-Identifier: Apache-2.0
//! URL, header and JSON-body templates.
//!
//! A template is admin-written text with `{name}` placeholders (`name` is
//! `[a-z_][a-z0-9_]*`; `{{` and `}}` are literal braces). Templates are
//! checked when the policy is compiled and *place* parameter values, never
//! splice them: in a URL every value is percent-encoded with a strict set
//! and may appear only in the path and query, and a value in the path is
//! exactly one segment (whole segments for a parameter of type `path`) as
//! a server that percent-decodes it any number of times reads it
//! ([`crate::policy::path`]); in a header a value with a control character
//! is refused; in a JSON body a value becomes a JSON value or is
//! interpolated into a string that serde_json encodes.
//!
//! A value that cannot be placed safely is a [`Rejection`]: the call is
//! denied with one sentence naming the parameter (never its value).

use std::collections::BTreeMap;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::header::{HeaderName, HeaderValue};
use reqwest::Url;

use crate::param::{path, TypedValue};

/// Everything except ALPHA DIGIT `-` `.` `_` `~` (RFC 3986 unreserved).
const STRICT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Headers a template may never set: the framing and routing of the
/// request belong to the HTTP client, and hop-by-hop headers to the
/// connection. (The credential header is refused separately.)
pub const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
    // The broker asks for an uncompressed response: it cannot redact a
    // compressed one.
    "accept-encoding",
];

/// A parameter value that cannot be placed where the template puts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The parameter's name.
    pub param: String,
    /// Why, completing "parameter X of tool T ...".
    pub reason: String,
}

impl Rejection {
    fn new(param: &str, reason: impl Into<String>) -> Rejection {
        Rejection {
            param: param.to_owned(),
            reason: reason.into(),
        }
    }

    /// The denial reason for `tool` (the session prefixes "call denied: ").
    pub fn sentence(&self, tool: &str) -> String {
        format!(
            "parameter \"{}\" of tool {} {}",
            self.param, tool, self.reason
        )
    }
}

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Lit(String),
    Param(String),
}

/// Split `text` into literals and placeholders.
pub fn parse(text: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut lit = String::new();
    let mut chars = text.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        match c {
            '{' if chars.peek().map(|&(_, n)| n) == Some('{') => {
                chars.next();
                lit.push('{');
            }
            '}' if chars.peek().map(|&(_, n)| n) == Some('}') => {
                chars.next();
                lit.push('}');
            }
            '}' => {
                return Err(format!(
                    "unbalanced `}}` at byte {at} (write `}}}}` for a literal brace)"
                ))
            }
            '{' => {
                let rest = &text[at + 1..];
                let Some(close) = rest
                    .find(['}', '{'])
                    .filter(|&i| rest[i..].starts_with('}'))
                else {
                    return Err(format!(
                        "unbalanced `{{` at byte {at} (write `{{{{` for a literal brace)"
                    ));
                };
                let name = &rest[..close];
                if !is_param_name(name) {
                    return Err(format!(
                        "placeholder {{{name}}} is not a parameter name ([a-z_][a-z0-9_]*)"
                    ));
                }
                if !lit.is_empty() {
                    parts.push(Part::Lit(std::mem::take(&mut lit)));
                }
                parts.push(Part::Param(name.to_owned()));
                for _ in 0..=close {
                    chars.next();
                }
            }
            c => lit.push(c),
        }
    }
    if !lit.is_empty() {
        parts.push(Part::Lit(lit));
    }
    Ok(parts)
}

/// `[a-z_][a-z0-9_]*`.
pub fn is_param_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'_'))
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
}

fn check_declared(parts: &[Part], declared: &dyn Fn(&str) -> bool) -> Result<(), String> {
    for part in parts {
        if let Part::Param(name) = part {
            if !declared(name) {
                return Err(format!("placeholder {{{name}}} names no parameter"));
            }
        }
    }
    Ok(())
}

fn value_of<'a>(
    values: &'a BTreeMap<String, TypedValue>,
    name: &str,
) -> Result<&'a TypedValue, Rejection> {
    values
        .get(name)
        .ok_or_else(|| Rejection::new(name, "has no value"))
}

// ---------------------------------------------------------------- URL

/// Where in a URL a placeholder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UrlContext {
    Authority,
    Path,
    Query,
    Fragment,
}

/// One piece of a compiled URL template.
#[derive(Debug)]
enum UrlPart {
    Lit(String),
    /// A value in the path: exactly one segment, or, for a parameter of
    /// type `path` (`multi`), whole segments.
    Path {
        name: String,
        multi: bool,
    },
    /// A value in the query.
    Query(String),
}

/// A compiled URL template.
#[derive(Debug)]
pub struct UrlTemplate {
    parts: Vec<UrlPart>,
    scheme: String,
    host: String,
    port: Option<u16>,
}

impl UrlTemplate {
    /// Check and compile `text`. `declared` says whether a parameter
    /// exists, `multi_segment` whether it is of type `path`.
    pub fn compile(
        text: &str,
        declared: &dyn Fn(&str) -> bool,
        multi_segment: &dyn Fn(&str) -> bool,
    ) -> Result<UrlTemplate, String> {
        let parts = parse(text)?;
        check_declared(&parts, declared)?;
        match parts.first() {
            Some(Part::Lit(first)) if first.contains("://") => {}
            _ => return Err("must start with http:// or https://".to_owned()),
        }
        let mut ctx = UrlContext::Authority;
        let mut after_scheme = false;
        let mut url_parts = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            match part {
                Part::Lit(lit) => {
                    let mut scan = lit.as_str();
                    if !after_scheme {
                        if let Some(i) = scan.find("://") {
                            after_scheme = true;
                            scan = &scan[i + 3..];
                        }
                    }
                    for c in scan.chars() {
                        ctx = match (ctx, c) {
                            (UrlContext::Authority, '/') => UrlContext::Path,
                            (UrlContext::Authority | UrlContext::Path, '?') => UrlContext::Query,
                            (_, '#') => UrlContext::Fragment,
                            (ctx, _) => ctx,
                        };
                    }
                    url_parts.push(UrlPart::Lit(lit.clone()));
                }
                Part::Param(name) => match ctx {
                    UrlContext::Path => {
                        let multi = multi_segment(name);
                        if multi && !stands_alone(&parts, i) {
                            return Err(format!(
                                "placeholder {{{name}}} is a path of whole segments and must \
                                 stand between \"/\"s (as in /files/{{{name}}} or \
                                 /files/{{{name}}}/raw)"
                            ));
                        }
                        url_parts.push(UrlPart::Path {
                            name: name.clone(),
                            multi,
                        });
                    }
                    UrlContext::Query => url_parts.push(UrlPart::Query(name.clone())),
                    UrlContext::Authority => {
                        return Err(format!(
                            "placeholder {{{name}}} is in the scheme, user info, host or port; \
                             placeholders may appear only in the path and query"
                        ))
                    }
                    UrlContext::Fragment => {
                        return Err(format!(
                            "placeholder {{{name}}} is in the fragment; \
                             placeholders may appear only in the path and query"
                        ))
                    }
                },
            }
        }
        // The literal skeleton, with every placeholder as a plain segment.
        let skeleton: String = parts
            .iter()
            .map(|p| match p {
                Part::Lit(l) => l.as_str(),
                Part::Param(_) => "x",
            })
            .collect();
        if has_dot_segment(&skeleton) {
            return Err(
                "has a dot segment (\".\" or \"..\") in its path, which the URL parser \
                 resolves, dropping or climbing past the segments before it; write the \
                 path it resolves to"
                    .to_owned(),
            );
        }
        let url = Url::parse(&skeleton).map_err(|e| format!("not a valid URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("scheme {} is not http or https", url.scheme()));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(
                "must not contain user info; inject a credential with auth.basic instead"
                    .to_owned(),
            );
        }
        let Some(host) = url.host_str() else {
            return Err("has no host".to_owned());
        };
        Ok(UrlTemplate {
            scheme: url.scheme().to_owned(),
            host: host.to_owned(),
            port: url.port_or_known_default(),
            parts: url_parts,
        })
    }

    /// The URL for these values.
    pub fn render(&self, values: &BTreeMap<String, TypedValue>) -> Result<Url, Rejection> {
        let mut out = String::new();
        // Where each path value landed in `out`.
        let mut spans: Vec<Span<'_>> = Vec::new();
        let mut first = None;
        for part in &self.parts {
            match part {
                UrlPart::Lit(lit) => out.push_str(lit),
                UrlPart::Query(name) => {
                    first.get_or_insert(name.as_str());
                    out.extend(utf8_percent_encode(
                        &value_of(values, name)?.to_text(),
                        STRICT,
                    ));
                }
                UrlPart::Path { name, multi } => {
                    first.get_or_insert(name.as_str());
                    let text = value_of(values, name)?.to_text();
                    let start = out.len();
                    if *multi {
                        // Each segment encoded, a literal `/` between them.
                        for (i, segment) in text.split('/').enumerate() {
                            if i > 0 {
                                out.push('/');
                            }
                            out.extend(utf8_percent_encode(segment, STRICT));
                        }
                    } else {
                        out.extend(utf8_percent_encode(&text, STRICT));
                    }
                    spans.push(Span {
                        range: start..out.len(),
                        name,
                        multi: *multi,
                    });
                }
            }
        }
        check_path_segments(&out, &spans)?;
        let first = first.unwrap_or("url");
        let url = Url::parse(&out)
            .map_err(|e| Rejection::new(first, format!("does not make a valid URL ({e})")))?;
        // Defence in depth: a value must never move the request elsewhere.
        if url.scheme() != self.scheme
            || url.host_str() != Some(self.host.as_str())
            || url.port_or_known_default() != self.port
        {
            return Err(Rejection::new(
                first,
                "would change the scheme, host or port of the URL",
            ));
        }
        Ok(url)
    }

    /// The host every rendered URL goes to.
    pub fn host(&self) -> &str {
        &self.host
    }
}

/// Whether the path of a URL has a segment the URL parser resolves as
/// `.` or `..` (also `%2e` forms, and `\` as a separator, as it reads
/// them in http and https URLs).
fn has_dot_segment(url: &str) -> bool {
    let Some(after_scheme) = url.find("://").map(|i| i + 3) else {
        return false;
    };
    let rest = &url[after_scheme..];
    let Some(path_start) = rest.find(['/', '\\', '?', '#']) else {
        return false;
    };
    let path = &rest[path_start..];
    let path = &path[..path.find(['?', '#']).unwrap_or(path.len())];
    path.split(['/', '\\']).any(|segment| {
        // Only `%2e` can decode to a dot: one round, as the parser reads it.
        let decoded = crate::percent::percent_decode(segment.as_bytes());
        let dotted = decoded.as_deref().unwrap_or(segment.as_bytes());
        dotted == b"." || dotted == b".."
    })
}

/// Whether the placeholder at `i` fills whole path segments: a `/` right
/// before it, and right after it a `/`, `?`, `#` or the end.
fn stands_alone(parts: &[Part], i: usize) -> bool {
    let before = i
        .checked_sub(1)
        .and_then(|b| parts.get(b))
        .is_some_and(|p| matches!(p, Part::Lit(l) if l.ends_with('/')));
    let after = match parts.get(i + 1) {
        None => true,
        Some(Part::Lit(l)) => l.starts_with(['/', '?', '#']),
        Some(Part::Param(_)) => false,
    };
    before && after
}

/// Where a value landed in a rendered URL.
struct Span<'a> {
    range: std::ops::Range<usize>,
    name: &'a str,
    multi: bool,
}

/// Judge every path segment that holds any part of a value as a server
/// that decodes it any number of times would read it
/// ([`path::check_wire_segment`]): one segment, never `.`, `..` or empty.
/// Checked on the rendered text, so that values side by side, or a value
/// beside the template's own text, are judged together.
fn check_path_segments(url: &str, spans: &[Span<'_>]) -> Result<(), Rejection> {
    // Placeholders are never in the authority, and values never contain a
    // raw `?` or `#` (nor a raw `/`, except between the segments of a
    // `path` value), so these positions are the template's own.
    let Some(after_scheme) = url.find("://").map(|i| i + 3) else {
        return Ok(());
    };
    let Some(path_start) = url[after_scheme..]
        .find(['/', '?', '#'])
        .map(|i| i + after_scheme)
    else {
        return Ok(());
    };
    if !url[path_start..].starts_with('/') {
        // No path: every placeholder is in the query.
        return Ok(());
    }
    let path_end = url[path_start..]
        .find(['?', '#'])
        .map_or(url.len(), |i| i + path_start);
    let mut seg_start = path_start + 1;
    for (i, c) in url[path_start..path_end].char_indices().skip(1) {
        let at = path_start + i;
        if c == '/' {
            check_segment(url, seg_start..at, spans)?;
            seg_start = at + 1;
        }
    }
    check_segment(url, seg_start..path_end, spans)
}

fn check_segment(
    url: &str,
    segment: std::ops::Range<usize>,
    spans: &[Span<'_>],
) -> Result<(), Rejection> {
    // Inclusive: an empty value is an empty range at its segment's edge.
    let Some(span) = spans
        .iter()
        .find(|s| s.range.start <= segment.end && segment.start <= s.range.end)
    else {
        return Ok(());
    };
    path::check_wire_segment(&url[segment])
        .map_err(|fault| Rejection::new(span.name, fault.describe(span.multi)))
}

// ------------------------------------------------------------ headers

/// A compiled header template: a fixed name, a value with placeholders.
#[derive(Debug)]
pub struct HeaderTemplate {
    name: HeaderName,
    parts: Vec<Part>,
}

impl HeaderTemplate {
    /// Check and compile one `name = "value"` entry. `credential_header`
    /// is the header the credential is injected as, which no template may
    /// set.
    pub fn compile(
        name: &str,
        value: &str,
        declared: &dyn Fn(&str) -> bool,
        credential_header: Option<&HeaderName>,
    ) -> Result<HeaderTemplate, String> {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| "is not a valid header name".to_owned())?;
        if RESERVED_HEADERS.contains(&header.as_str()) {
            return Err("is set by the HTTP client and cannot be templated".to_owned());
        }
        if credential_header == Some(&header) {
            return Err("is the header the credential is injected as".to_owned());
        }
        let parts = parse(value)?;
        check_declared(&parts, declared)?;
        for part in &parts {
            if let Part::Lit(lit) = part {
                if lit.chars().any(char::is_control) {
                    return Err("contains a control character".to_owned());
                }
            }
        }
        Ok(HeaderTemplate {
            name: header,
            parts,
        })
    }

    pub fn name(&self) -> &HeaderName {
        &self.name
    }

    /// The value for these values.
    pub fn render(&self, values: &BTreeMap<String, TypedValue>) -> Result<HeaderValue, Rejection> {
        let mut out = String::new();
        let mut last = None;
        for part in &self.parts {
            match part {
                Part::Lit(lit) => out.push_str(lit),
                Part::Param(name) => {
                    let text = value_of(values, name)?.to_text();
                    // CR and LF would split the header; NUL and the other
                    // controls are refused by servers or mangled by proxies.
                    if text.chars().any(char::is_control) {
                        return Err(Rejection::new(
                            name,
                            format!(
                                "contains a control character, which header {} cannot carry",
                                self.name
                            ),
                        ));
                    }
                    out.push_str(&text);
                    last = Some(name.as_str());
                }
            }
        }
        HeaderValue::from_bytes(out.as_bytes()).map_err(|_| {
            Rejection::new(
                last.unwrap_or("header"),
                format!("is not a valid value for header {}", self.name),
            )
        })
    }
}

// ---------------------------------------------------------------- body

/// A compiled JSON body template.
#[derive(Debug)]
pub enum BodyTemplate {
    /// No placeholder inside.
    Literal(serde_json::Value),
    /// A string that is exactly `"{name}"`: the typed value.
    Param(String),
    /// A string with placeholders among text: the values as text.
    Text(Vec<Part>),
    Array(Vec<BodyTemplate>),
    Object(Vec<(String, BodyTemplate)>),
}

impl BodyTemplate {
    /// Check and compile a TOML value. Errors are prefixed with where in
    /// the body they are (`body_json.a[2]: ...`).
    pub fn compile(
        value: &toml::Value,
        declared: &dyn Fn(&str) -> bool,
    ) -> Result<BodyTemplate, Vec<String>> {
        let mut errors = Vec::new();
        let template = compile_body(value, "body_json", declared, &mut errors);
        if errors.is_empty() {
            Ok(template)
        } else {
            Err(errors)
        }
    }

    /// The JSON value for these values.
    pub fn render(
        &self,
        values: &BTreeMap<String, TypedValue>,
    ) -> Result<serde_json::Value, Rejection> {
        Ok(match self {
            BodyTemplate::Literal(v) => v.clone(),
            BodyTemplate::Param(name) => value_of(values, name)?.to_json(),
            BodyTemplate::Text(parts) => {
                let mut out = String::new();
                for part in parts {
                    match part {
                        Part::Lit(lit) => out.push_str(lit),
                        Part::Param(name) => out.push_str(&value_of(values, name)?.to_text()),
                    }
                }
                serde_json::Value::String(out)
            }
            BodyTemplate::Array(items) => serde_json::Value::Array(
                items
                    .iter()
                    .map(|t| t.render(values))
                    .collect::<Result<_, _>>()?,
            ),
            BodyTemplate::Object(fields) => serde_json::Value::Object(
                fields
                    .iter()
                    .map(|(k, t)| Ok((k.clone(), t.render(values)?)))
                    .collect::<Result<_, Rejection>>()?,
            ),
        })
    }
}

fn compile_body(
    value: &toml::Value,
    at: &str,
    declared: &dyn Fn(&str) -> bool,
    errors: &mut Vec<String>,
) -> BodyTemplate {
    let literal = BodyTemplate::Literal;
    match value {
        toml::Value::String(s) => match parse(s).and_then(|parts| {
            check_declared(&parts, declared)?;
            Ok(parts)
        }) {
            Ok(parts) => match parts.as_slice() {
                [] => literal(serde_json::Value::String(String::new())),
                [Part::Param(name)] => BodyTemplate::Param(name.clone()),
                [Part::Lit(text)] => literal(serde_json::Value::String(text.clone())),
                _ => BodyTemplate::Text(parts),
            },
            Err(e) => {
                errors.push(format!("{at}: {e}"));
                literal(serde_json::Value::Null)
            }
        },
        toml::Value::Integer(i) => literal(serde_json::Value::from(*i)),
        toml::Value::Boolean(b) => literal(serde_json::Value::Bool(*b)),
        toml::Value::Float(f) => match serde_json::Number::from_f64(*f) {
            Some(n) => literal(serde_json::Value::Number(n)),
            None => {
                errors.push(format!("{at}: {f} has no JSON representation"));
                literal(serde_json::Value::Null)
            }
        },
        toml::Value::Datetime(_) => {
            errors.push(format!(
                "{at}: TOML dates have no JSON form; write the date as a string"
            ));
            literal(serde_json::Value::Null)
        }
        toml::Value::Array(items) => {
            let items: Vec<BodyTemplate> = items
                .iter()
                .enumerate()
                .map(|(i, v)| compile_body(v, &format!("{at}[{i}]"), declared, errors))
                .collect();
            collapse(BodyTemplate::Array(items))
        }
        toml::Value::Table(table) => {
            let fields: Vec<(String, BodyTemplate)> = table
                .iter()
                .map(|(k, v)| {
                    let t = compile_body(v, &format!("{at}.{k}"), declared, errors);
                    (k.clone(), t)
                })
                .collect();
            collapse(BodyTemplate::Object(fields))
        }
    }
}

/// An array or object without any placeholder becomes one literal.
fn collapse(template: BodyTemplate) -> BodyTemplate {
    let empty = BTreeMap::new();
    let is_literal = match &template {
        BodyTemplate::Array(items) => items.iter().all(|t| matches!(t, BodyTemplate::Literal(_))),
        BodyTemplate::Object(fields) => fields
            .iter()
            .all(|(_, t)| matches!(t, BodyTemplate::Literal(_))),
        _ => false,
    };
    if is_literal {
        if let Ok(value) = template.render(&empty) {
            return BodyTemplate::Literal(value);
        }
    }
    template
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn declared(name: &str) -> bool {
        ["a", "b", "n", "flag", "user_id", "p", "q"].contains(&name)
    }

    fn values(pairs: &[(&str, TypedValue)]) -> BTreeMap<String, TypedValue> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    fn s(text: &str) -> TypedValue {
        TypedValue::Str(text.to_owned())
    }

    #[test]
    fn parses_placeholders_and_escapes() {
        assert_eq!(
            parse("x{a}{{y}}{b}").unwrap(),
            vec![
                Part::Lit("x".into()),
                Part::Param("a".into()),
                Part::Lit("{y}".into()),
                Part::Param("b".into()),
            ]
        );
        assert!(parse("{a").unwrap_err().contains("unbalanced `{`"));
        assert!(parse("a}").unwrap_err().contains("unbalanced `}`"));
        assert!(parse("{a{b}").unwrap_err().contains("unbalanced"));
        assert!(parse("{A}").unwrap_err().contains("not a parameter name"));
        assert!(parse("{}").unwrap_err().contains("not a parameter name"));
        assert!(parse("{1a}").is_err());
        assert_eq!(parse("{{}}").unwrap(), vec![Part::Lit("{}".into())]);
    }

    /// `p` and `q` are parameters of type `path`.
    fn multi(name: &str) -> bool {
        ["p", "q"].contains(&name)
    }

    fn compile_url(text: &str) -> UrlTemplate {
        UrlTemplate::compile(text, &declared, &multi).unwrap()
    }

    #[test]
    fn url_compile_errors() {
        let err = |t: &str| UrlTemplate::compile(t, &declared, &multi).unwrap_err();
        assert_eq!(err("https://h/{x}"), "placeholder {x} names no parameter");
        assert!(err("https://{a}/x").contains("host or port"));
        assert!(err("https://h:{a}/x").contains("host or port"));
        assert!(err("https://{a}@h/x").contains("host or port"));
        assert!(err("{a}://h/x").contains("must start with"));
        assert!(err("https://h/x#{a}").contains("fragment"));
        assert!(err("ftp://h/{a}").contains("not http or https"));
        assert!(err("https://u:p@h/{a}").contains("user info"));
        assert!(err("https://h/{a").contains("unbalanced"));
        compile_url("https://h?q={a}");
        compile_url("http://h:8080/p/{a}/x?q={b}&r=lit#frag");
        // A path parameter fills whole segments.
        for bad in [
            "https://h/files/x{p}",
            "https://h/files/{p}.json",
            "https://h/files/{p}{a}",
            "https://h/files/{a}{p}/x",
            "https://h/files{p}",
        ] {
            assert!(err(bad).contains("stand between \"/\"s"), "{bad}");
        }
        // The URL parser resolves the template's own dot segments, which
        // would drop values or climb out of where a `path` value was put
        // (`/files/{p}/..` with p = `reports` is `/files/`).
        for bad in [
            "https://h/files/{p}/..",
            "https://h/files/{p}/../../admin",
            "https://h/files/./{a}",
            "https://h/a/%2E%2e/{a}",
            "https://h/a/.%2E/{a}?q=1",
            "https://h/a\\..\\{a}",
            "https://h/../{a}",
        ] {
            assert!(err(bad).contains("dot segment"), "{bad}");
        }
        for good in [
            "https://h/files/{p}",
            "https://h/files/{p}/raw",
            "https://h/{p}?x=1",
            "https://h/files/{p}#f",
            "https://h/files/{p}/{q}",
            // In the query it is text.
            "https://h/files?path={p}x",
            "https://h/files/{a}?up=../..",
            "https://h/v1/{a}..json",
            "https://h/v1/..{a}",
        ] {
            compile_url(good);
        }
    }

    #[test]
    fn url_values_are_strictly_encoded() {
        let t = compile_url("https://api.example.com:8443/v1/{a}/x?q={b}&r=lit");
        let url = t
            .render(&values(&[
                ("a", s("a b?é#")),
                ("b", s("?x=1&y=\"z\"\n#f/..")),
            ]))
            .unwrap();
        assert_eq!(
            url.as_str(),
            "https://api.example.com:8443/v1/a%20b%3F%C3%A9%23/x?q=%3Fx%3D1%26y%3D%22z%22%0A%23f%2F..&r=lit"
        );
        let url = t
            .render(&values(&[("a", s("-")), ("b", TypedValue::Int(-3))]))
            .unwrap();
        assert_eq!(url.path(), "/v1/-/x");
        assert_eq!(url.query(), Some("q=-3&r=lit"));
        // `@` and `:` cannot reach the authority.
        let url = t
            .render(&values(&[("a", s("@evil.com:1")), ("b", s("%2e"))]))
            .unwrap();
        assert_eq!(url.host_str(), Some("api.example.com"));
        assert_eq!(url.path(), "/v1/%40evil.com%3A1/x");
        assert_eq!(url.query(), Some("q=%252e&r=lit"));
    }

    #[test]
    fn query_values_cannot_add_parameters_or_lines() {
        let t = compile_url("https://h/search?q={a}&limit=10");
        for hostile in [
            "x&limit=100000",
            "x&admin=1",
            "x=1",
            "x#frag",
            "x\r\nHost: evil",
            "x\nlimit=9",
            "x%26admin%3D1",
            "x;limit=5",
            "x+y",
        ] {
            let url = t.render(&values(&[("a", s(hostile))])).unwrap();
            let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
            assert_eq!(
                pairs,
                [
                    ("q".to_owned(), hostile.to_owned()),
                    ("limit".to_owned(), "10".to_owned())
                ],
                "{hostile:?} -> {url}"
            );
            assert_eq!(url.fragment(), None);
            assert!(!url.as_str().contains(['\r', '\n', ' ']), "{url}");
        }
    }

    #[test]
    fn url_path_params_are_one_segment() {
        let t = compile_url("https://h/public/{a}?q={b}");
        let deny = |value: &str| {
            t.render(&values(&[("a", s(value)), ("b", s("ok"))]))
                .unwrap_err()
        };
        let cases: &[(&str, &str)] = &[
            ("../private/admin.txt", "contains \"/\""),
            ("..%2Fprivate%2Fadmin.txt", "contains \"/\""),
            ("..%2fprivate", "contains \"/\""),
            ("..%252Fprivate", "contains \"/\""),
            ("..%u002fprivate", "contains \"/\""),
            ("..\\private\\admin.txt", "contains \"\\\""),
            ("..%5Cprivate", "contains \"\\\""),
            ("..%5cprivate", "contains \"\\\""),
            (".", "\".\" or \"..\""),
            ("..", "\".\" or \"..\""),
            ("%2e%2E", "\".\" or \"..\""),
            (".%2e", "\".\" or \"..\""),
            ("%252e%252e", "\".\" or \"..\""),
            ("..;", "\".\" or \"..\""),
            ("..;jsessionid=x", "\".\" or \"..\""),
            ("...", "\".\" or \"..\""),
            ("", "empty"),
            (";x", "empty"),
            ("..%00.txt", "control character"),
            ("%C0%AF", "not UTF-8"),
            ("..\u{FF0F}private", "normalisation"),
            ("\u{FF0E}\u{FF0E}", "normalisation"),
            ("..\u{2215}private", "normalisation"),
        ];
        for (value, why) in cases {
            let err = deny(value);
            assert_eq!(err.param, "a", "{value:?}");
            assert!(err.reason.contains(why), "{value:?}: {}", err.reason);
        }
        assert_eq!(
            deny("../x").sentence("fetch"),
            "parameter \"a\" of tool fetch contains \"/\" or an encoding of it, \
             but is one URL path segment"
        );
        // The same values are plain text in the query.
        for value in ["..", "../x", "%2e%2e", ""] {
            let url = t
                .render(&values(&[("a", s("ok")), ("b", s(value))]))
                .unwrap();
            assert_eq!(url.path(), "/public/ok");
        }
        // Legitimate names.
        for value in [
            "hello.txt",
            "a..b",
            ".hidden",
            "100%",
            "r\u{e9}sum\u{e9}.pdf",
        ] {
            t.render(&values(&[("a", s(value)), ("b", s("ok"))]))
                .unwrap();
        }
    }

    #[test]
    fn url_segments_are_judged_with_their_neighbours() {
        // Two values that together make `..`, or `%2F` once decoded.
        let t = compile_url("https://h/v1/{a}{b}/x");
        assert!(t.render(&values(&[("a", s(".")), ("b", s("."))])).is_err());
        assert!(t.render(&values(&[("a", s("%2")), ("b", s("F"))])).is_err());
        assert!(t.render(&values(&[("a", s("")), ("b", s(""))])).is_err());
        // A dot inside a longer segment is harmless.
        let url = t
            .render(&values(&[("a", s("..")), ("b", s(".txt"))]))
            .unwrap();
        assert_eq!(url.path(), "/v1/...txt/x");
        // A value beside the template's own text.
        let t = compile_url("https://h/v1/%2E{a}");
        assert!(t.render(&values(&[("a", s("."))])).is_err());
        let t = compile_url("https://h/v1/{a}.json");
        assert_eq!(
            t.render(&values(&[("a", s(""))])).unwrap().path(),
            "/v1/.json"
        );
        assert!(t.render(&values(&[("a", s("%2e"))])).is_ok());
        // The last segment, and the only one.
        assert!(compile_url("https://h/{a}")
            .render(&values(&[("a", s(".."))]))
            .is_err());
        assert!(compile_url("https://h/{a}")
            .render(&values(&[("a", s(""))]))
            .is_err());
    }

    #[test]
    fn url_path_params_of_type_path_are_whole_segments() {
        let t = compile_url("https://h/files/{p}/raw?x={a}");
        let render = |p: &str| t.render(&values(&[("p", s(p)), ("a", s("1"))]));
        let url = render("reports/2024/q1 final.txt").unwrap();
        assert_eq!(url.path(), "/files/reports/2024/q1%20final.txt/raw");
        let url = render("a").unwrap();
        assert_eq!(url.path(), "/files/a/raw");
        for (bad, why) in [
            ("reports/../../private/admin.txt", "\".\" or \"..\""),
            ("reports/./x", "\".\" or \"..\""),
            ("../x", "\".\" or \"..\""),
            ("a//b", "empty"),
            ("/etc/passwd", "empty"),
            ("a/", "empty"),
            ("", "empty"),
            ("a/b%2F..%2F..%2Fc", "encoded \"/\""),
            ("a/%2e%2e/b", "\".\" or \"..\""),
            ("a\\..\\b", "\"\\\""),
            ("a/..;/b", "\".\" or \"..\""),
        ] {
            let err = render(bad).unwrap_err();
            assert_eq!(err.param, "p", "{bad:?}");
            assert!(err.reason.contains(why), "{bad:?}: {}", err.reason);
        }
    }

    #[test]
    fn url_missing_value_is_rejected() {
        let t = compile_url("https://h/{a}");
        assert_eq!(t.render(&BTreeMap::new()).unwrap_err().param, "a");
    }

    /// What a server that percent-decodes `times` times (`%XX` only, as
    /// most do) sees of one encoded segment.
    fn server_decode(segment: &str, times: usize) -> String {
        let mut text = segment.to_owned();
        for _ in 0..times {
            text = percent_encoding::percent_decode_str(&text)
                .decode_utf8_lossy()
                .into_owned();
        }
        text
    }

    /// Whether `text` reads as exactly one segment that is neither `.`
    /// nor `..`, nor empty, also after NFKC and a `;` path parameter.
    fn one_plain_segment(text: &str) -> bool {
        use unicode_normalization::UnicodeNormalization;
        let nfkc: String = text.nfkc().collect();
        [text, nfkc.as_str()].iter().all(|t| {
            let core = t.split(';').next().unwrap_or_default();
            !t.contains(['/', '\\', '\0']) && !core.trim_end_matches(['.', ' ']).is_empty()
        })
    }

    /// Text made of the pieces an attacker builds path escapes from.
    fn hostile_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let atoms = prop::sample::select(vec![
            "a", "b", ".", "..", "/", "\\", "%", "2", "5", "e", "E", "f", "F", "c", "C", ";", "u",
            "0", "%2e", "%2E", "%2f", "%2F", "%5c", "%25", "%u002f", "%u002e", "%00", "%c0%af",
            "%C0%AE", "\u{FF0F}", "\u{FF0E}", "\u{2024}", "\u{FF05}", " ", "é", "x",
        ]);
        prop::collection::vec(atoms, 0..10).prop_map(|v| v.concat())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 2000,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Any value accepted for a one-segment parameter is, however many
        /// times the server percent-decodes it, exactly one segment that
        /// is not `.` or `..`.
        #[test]
        fn accepted_one_segment_values_stay_one_segment(value in hostile_text()) {
            let t = compile_url("https://h/v1/{a}/x");
            if let Ok(rendered) = t.render(&values(&[("a", s(&value))])) {
                let segments: Vec<&str> = rendered.path().split('/').collect();
                proptest::prop_assert_eq!(segments.len(), 4, "{}", rendered);
                proptest::prop_assert_eq!(segments[1], "v1");
                proptest::prop_assert_eq!(segments[3], "x");
                for times in 0..=MAX_DECODES_CHECKED {
                    let seen = server_decode(segments[2], times);
                    proptest::prop_assert!(
                        one_plain_segment(&seen),
                        "{value:?} -> {rendered} -> {seen:?} after {times} decodes"
                    );
                }
            }
        }

        /// Any value accepted for a `path` parameter keeps its own segments,
        /// each plain, however many times the server decodes them.
        #[test]
        fn accepted_paths_keep_their_segments(value in hostile_text()) {
            let t = compile_url("https://h/files/{p}/raw");
            if let Ok(rendered) = t.render(&values(&[("p", s(&value))])) {
                let segments: Vec<&str> = rendered.path().split('/').collect();
                let n = value.split('/').count();
                proptest::prop_assert_eq!(segments.len(), n + 3, "{}", rendered);
                proptest::prop_assert_eq!(segments[n + 2], "raw");
                for segment in &segments[2..n + 2] {
                    for times in 0..=MAX_DECODES_CHECKED {
                        let seen = server_decode(segment, times);
                        proptest::prop_assert!(
                            one_plain_segment(&seen),
                            "{value:?} -> {rendered} -> {seen:?} after {times} decodes"
                        );
                    }
                }
            }
        }
    }

    /// Decodes the property tests apply: more than any value survives.
    const MAX_DECODES_CHECKED: usize = 12;

    #[test]
    fn header_compile_and_render() {
        let t = HeaderTemplate::compile("X-User", "id={user_id}; v=1", &declared, None).unwrap();
        assert_eq!(t.name().as_str(), "x-user");
        let v = t
            .render(&values(&[("user_id", TypedValue::Int(7))]))
            .unwrap();
        assert_eq!(v.to_str().unwrap(), "id=7; v=1");
        for bad in ["a\r\nX-Evil: 1", "a\nb", "a\0b", "a\tb", "a\u{7f}"] {
            let err = t.render(&values(&[("user_id", s(bad))])).unwrap_err();
            assert_eq!(err.param, "user_id");
            assert!(err.reason.contains("control character"), "{}", err.reason);
        }
        let v = t.render(&values(&[("user_id", s("é \"q\""))])).unwrap();
        assert_eq!(v.as_bytes(), "id=é \"q\"; v=1".as_bytes());
    }

    #[test]
    fn header_compile_refusals() {
        let auth = HeaderName::from_static("authorization");
        let err =
            |n: &str, v: &str| HeaderTemplate::compile(n, v, &declared, Some(&auth)).unwrap_err();
        assert!(err("Authorization", "x").contains("credential"));
        assert!(err("AUTHORIZATION", "{a}").contains("credential"));
        for name in ["Host", "content-length", "Transfer-Encoding", "CONNECTION"] {
            assert!(err(name, "x").contains("cannot be templated"), "{name}");
        }
        assert!(err("Bad Name", "x").contains("not a valid header name"));
        assert!(err("X-A", "{nope}").contains("names no parameter"));
        assert!(err("X-A", "a\nb").contains("control"));
        HeaderTemplate::compile("Authorization", "x", &declared, None).unwrap();
    }

    #[test]
    fn body_places_typed_values() {
        let toml: toml::Value = toml::from_str(
            r#"
            to = "{a}"
            count = "{n}"
            on = "{flag}"
            text = "Hello {a}, {{literal}} #{n}"
            fixed = { x = 1, y = [true, 2.5, "z"] }
            list = ["{a}", { inner = "{b}" }]
            "#,
        )
        .unwrap();
        let t = BodyTemplate::compile(&toml, &declared).unwrap();
        let body = t
            .render(&values(&[
                ("a", s("x\", \"admin\": true, \"y\": \"")),
                ("b", s("\n")),
                ("n", TypedValue::Int(42)),
                ("flag", TypedValue::Bool(false)),
            ]))
            .unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "to": "x\", \"admin\": true, \"y\": \"",
                "count": 42,
                "on": false,
                "text": "Hello x\", \"admin\": true, \"y\": \", {literal} #42",
                "fixed": {"x": 1, "y": [true, 2.5, "z"]},
                "list": ["x\", \"admin\": true, \"y\": \"", {"inner": "\n"}],
            })
        );
        let text = serde_json::to_string(&body).unwrap();
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(back.get("admin").is_none());
    }

    #[test]
    fn body_compile_errors() {
        let toml: toml::Value = toml::from_str(
            r#"
            a = "{missing}"
            b = ["ok", "{also_missing} x"]
            c = 1979-05-27
            d = "{unbalanced"
            "#,
        )
        .unwrap();
        let errors = BodyTemplate::compile(&toml, &declared).unwrap_err();
        assert_eq!(
            errors,
            vec![
                "body_json.a: placeholder {missing} names no parameter".to_owned(),
                "body_json.b[1]: placeholder {also_missing} names no parameter".to_owned(),
                "body_json.c: TOML dates have no JSON form; write the date as a string".to_owned(),
                "body_json.d: unbalanced `{` at byte 0 (write `{{` for a literal brace)".to_owned(),
            ]
        );
        let literal = toml::Value::Float(f64::NAN);
        assert!(BodyTemplate::compile(&literal, &declared).unwrap_err()[0].contains("NaN"));
    }
}
