// SPDX-License-Identifier: Apache-2.0
//! One gateway request, upstream and back: the credential header set last
//! (every credential header the program sent dropped first), the request
//! sent with the shared http client (no redirect, no proxy), and the
//! response read piece by piece as it arrives, never whole.
//!
//! Each piece is judged by the leak scanner together with the last
//! [`OVERLAP`] bytes before it ([`StreamJudge`]), so a credential window
//! split across two pieces, in any encoding that spreads a window over at
//! most [`OVERLAP`] bytes, is still seen whole. Material found ends the
//! stream: nothing of that piece is returned, and the caller is told the
//! response was withheld. (What went out before it held no window; the
//! piece that completes one never leaves.)

use std::time::Duration;

use keyward_proto::Header;
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use zeroize::Zeroizing;

use super::Checked;
use crate::credential::Credentials;
use crate::error_chain::error_chain;
use crate::leak::Leak;
use crate::tool::http::HOP_BY_HOP;

/// Bytes of the stream judged again with the next piece: a window is at
/// most 32 bytes, and no decoder the scanner knows spreads one byte over
/// more than 64 (a JSON or HTML escape of a hex digit pair is the most),
/// so 4 KiB covers any window at any supported nesting that stays under
/// that factor overall.
pub const OVERLAP: usize = 4096;

/// Request headers never forwarded: about the connection, set by the
/// broker, or carrying credentials (the broker's own goes in last).
const DROPPED_REQUEST: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "cookie",
    "accept-encoding",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
];

/// Most request headers forwarded.
const MAX_REQUEST_HEADERS: usize = 64;
/// Response header bytes returned; later headers are dropped so the head
/// always fits in a frame.
const MAX_RESPONSE_HEADER_BYTES: usize = 16 * 1024;

/// Why a gateway request failed after policy allowed it. Messages are
/// redacted and safe to return.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("cannot send the request upstream: {0}")]
    Upstream(String),
    #[error("the upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the upstream sent nothing for {0:?}")]
    Idle(Duration),
    #[error("the response is over the {0}-byte limit of the gateway")]
    TooLarge(u64),
    #[error(
        "the response is compressed (content-encoding), which the broker refuses: \
         it asks for identity and judges only what it can read"
    )]
    Compressed,
    #[error("withheld: {0}")]
    Withheld(Leak),
    #[error("internal broker error: {0}")]
    Internal(String),
}

/// The response as it streams.
#[derive(Debug)]
pub struct Opened {
    pub status: u16,
    /// Redacted, judged, without the connection's headers.
    pub headers: Vec<Header>,
    response: reqwest::Response,
    judge: StreamJudge,
    idle: Duration,
    cap: u64,
    /// Body bytes returned so far.
    pub bytes: u64,
}

/// Send `checked` upstream with the program's `headers` (filtered) and
/// `body`, the credential set last; return once the response head is in,
/// judged.
pub async fn open(
    gateway: &super::Gateway,
    credentials: &Credentials,
    checked: &Checked,
    headers: &[Header],
    body: Vec<u8>,
) -> Result<Opened, ForwardError> {
    let mut map = HeaderMap::new();
    let credential_header = gateway.auth().map(|a| a.scheme.header_name());
    for h in headers.iter().take(MAX_REQUEST_HEADERS) {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
            continue;
        };
        if DROPPED_REQUEST.contains(&name.as_str()) || Some(&name) == credential_header.as_ref() {
            continue;
        }
        let Ok(value) = HeaderValue::from_str(&h.value) else {
            continue;
        };
        map.append(name, value);
    }
    map.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    if let Some(auth) = gateway.auth() {
        let secret = credentials.get(&auth.credential).ok_or_else(|| {
            ForwardError::Internal(format!("credential {} is not loaded", auth.credential))
        })?;
        let value = auth.scheme.header_value(secret).ok_or_else(|| {
            ForwardError::Upstream(format!(
                "credential {} cannot be sent in an HTTP header (it contains a control character)",
                auth.credential
            ))
        })?;
        // Last, and `insert`: replaces anything of the same name.
        map.insert(auth.scheme.header_name(), value);
    }
    let client = crate::tool::http::client().map_err(|e| ForwardError::Internal(e.to_string()))?;
    let mut request = reqwest::Request::new(checked.method.clone(), checked.url.clone());
    *request.headers_mut() = map;
    if !body.is_empty() || checked.method != reqwest::Method::GET {
        *request.body_mut() = Some(body.into());
    }
    let response = match tokio::time::timeout(gateway.timeout, client.execute(request)).await {
        Err(_) => return Err(ForwardError::Timeout(gateway.timeout)),
        Ok(Err(e)) => return Err(upstream_error(credentials, error_chain(&e.without_url()))),
        Ok(Ok(response)) => response,
    };
    let encoded = response
        .headers()
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .map(|coding| coding.trim_ascii())
        .any(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case(b"identity"));
    if encoded {
        return Err(ForwardError::Compressed);
    }
    if response
        .content_length()
        .is_some_and(|len| len > gateway.max_response_bytes)
    {
        return Err(ForwardError::TooLarge(gateway.max_response_bytes));
    }
    let mut returned = Vec::new();
    let mut header_bytes = 0;
    for (name, value) in response.headers() {
        // About the connection, or the length (the shim frames the body
        // itself): not returned.
        if HOP_BY_HOP.contains(&name.as_str()) || name == header::CONTENT_LENGTH {
            continue;
        }
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        header_bytes += name.as_str().len() + value.len();
        if header_bytes > MAX_RESPONSE_HEADER_BYTES {
            break;
        }
        returned.push(Header {
            name: name.as_str().to_owned(),
            value,
        });
    }
    credentials
        .scanner()
        .check_response(
            returned
                .iter()
                .map(|h| (h.name.as_bytes(), h.value.as_bytes())),
            b"",
        )
        .map_err(ForwardError::Withheld)?;
    Ok(Opened {
        status: response.status().as_u16(),
        headers: returned,
        response,
        judge: StreamJudge::default(),
        idle: gateway.idle_timeout,
        cap: gateway.max_response_bytes,
        bytes: 0,
    })
}

/// An error of the upstream connection, judged as a response is (its
/// text is the HTTP client's, which could quote what the upstream sent):
/// withheld if it carries credential material, redacted otherwise.
fn upstream_error(credentials: &Credentials, text: String) -> ForwardError {
    let text = Zeroizing::new(text);
    if let Err(leak) = credentials.scanner().check_message(&text) {
        return ForwardError::Withheld(leak);
    }
    ForwardError::Upstream(
        String::from_utf8_lossy(&credentials.redactor().redact_bytes(text.as_bytes())).into_owned(),
    )
}

impl Opened {
    /// The next piece of the body, judged; `None` at the end.
    pub async fn next(
        &mut self,
        credentials: &Credentials,
    ) -> Result<Option<Vec<u8>>, ForwardError> {
        let chunk = match tokio::time::timeout(self.idle, self.response.chunk()).await {
            Err(_) => return Err(ForwardError::Idle(self.idle)),
            Ok(Err(e)) => return Err(upstream_error(credentials, error_chain(&e.without_url()))),
            Ok(Ok(None)) => return Ok(None),
            Ok(Ok(Some(chunk))) => chunk,
        };
        if chunk.len() as u64 > self.cap - self.bytes {
            return Err(ForwardError::TooLarge(self.cap));
        }
        self.judge
            .judge(credentials, &chunk)
            .map_err(ForwardError::Withheld)?;
        self.bytes += chunk.len() as u64;
        Ok(Some(chunk.to_vec()))
    }
}

/// Judges a stream piece by piece, each with the [`OVERLAP`] bytes before
/// it.
#[derive(Debug, Default)]
pub struct StreamJudge {
    tail: Zeroizing<Vec<u8>>,
}

impl StreamJudge {
    /// Judge the next piece; on success it becomes part of the tail.
    pub fn judge(&mut self, credentials: &Credentials, piece: &[u8]) -> Result<(), Leak> {
        // Sized once: no reallocation leaves an unwiped copy behind.
        let mut view = Zeroizing::new(Vec::with_capacity(self.tail.len() + piece.len()));
        view.extend_from_slice(&self.tail);
        view.extend_from_slice(piece);
        let scanner = credentials.scanner();
        if view.len() > 16 * 1024 {
            crate::tool::off_reactor(|| scanner.check_response([], &view))?;
        } else {
            scanner.check_response([], &view)?;
        }
        let keep = view.len().min(OVERLAP);
        let mut tail = Zeroizing::new(Vec::with_capacity(OVERLAP));
        tail.extend_from_slice(&view[view.len() - keep..]);
        self.tail = tail;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use base64::Engine as _;

    const SECRET: &str = "sk-test-Abcdefghijklmnopqrstuvwxyz0123456789";

    fn credentials() -> Credentials {
        Credentials::from_values([("k", SECRET)]).unwrap()
    }

    #[test]
    fn a_window_split_across_pieces_is_caught() {
        let creds = credentials();
        // Raw, split in the middle of a window, with a piece in between.
        let mut judge = StreamJudge::default();
        judge.judge(&creds, b"data: {\"x\": \"sk-test-A").unwrap();
        let caught = judge.judge(&creds, b"bcdefghijk\"}\n\n");
        assert!(caught.is_err(), "split raw window passed");

        // Base64, one character per piece.
        let encoded = base64::engine::general_purpose::STANDARD.encode(SECRET);
        let mut judge = StreamJudge::default();
        let mut found = false;
        for b in encoded.as_bytes() {
            if judge.judge(&creds, &[*b]).is_err() {
                found = true;
                break;
            }
        }
        assert!(found, "base64 one byte a piece passed");
    }

    #[test]
    fn an_upstream_error_quoting_the_credential_is_withheld() {
        let creds = credentials();
        let encoded = base64::engine::general_purpose::STANDARD.encode(&SECRET[4..36]);
        let quoted = format!("error decoding response body: unexpected {encoded:?}");
        assert!(matches!(
            upstream_error(&creds, quoted),
            ForwardError::Withheld(_)
        ));
        assert!(matches!(
            upstream_error(&creds, "connection reset by peer".into()),
            ForwardError::Upstream(m) if m == "connection reset by peer"
        ));
    }

    #[test]
    fn innocent_pieces_pass() {
        let creds = credentials();
        let mut judge = StreamJudge::default();
        for i in 0..200 {
            let piece = format!("data: {{\"delta\": \"token {i} of the answer\"}}\n\n");
            judge.judge(&creds, piece.as_bytes()).unwrap();
        }
        assert!(judge.tail.len() <= OVERLAP);
    }
}
