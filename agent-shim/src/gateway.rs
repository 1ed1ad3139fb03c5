// SPDX-License-Identifier: Apache-2.0
//! `agent-shim run --gateway NAME`: the relay between the program's HTTP
//! requests and the broker's gateways.
//!
//! The sandbox's init listens on 127.0.0.1 inside the sandbox's own
//! network namespace (only loopback, nothing else) and hands the listening
//! socket to the shim outside. The shim accepts there and serves HTTP/1.1
//! with hyper (no HTTP is parsed by hand). Each request's first path
//! segment names the gateway (`/openai/v1/chat/completions`); the rest of
//! it, the method, the headers and the body go to the broker as a
//! `Gateway` request on a channel of its own over the bound session. The
//! broker decides (method, exact path, size, token), adds the credential,
//! and streams the answer back, which the shim writes out frame by frame
//! as it comes.
//!
//! Threat model: the program is hostile. It reaches nothing here but what
//! its token already allows through the broker; the shim holds no
//! credential, only the bound connection the program already has on fd 3.
//! A denial is a 403, a broker or upstream failure a 502, both with a JSON
//! body naming why. A response that fails mid-stream (withheld for
//! credential material, the upstream broke off) ends, for a server-sent
//! event stream, with an `event: error` both SDKs raise on, and any other
//! body breaks off (no terminating chunk), so no client takes it for a
//! complete answer.

use std::convert::Infallible;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Request as HttpRequest, Response as HttpResponse, StatusCode};
use keyward_proto::{
    GatewayBody, GatewayInfo, GatewayInfoRequest, GatewayRequest, Header, Request, Response,
};
use tokio::sync::mpsc;

use crate::client::{Client, ClientError};

/// Largest request body the relay takes (the broker's gateway has its own,
/// usually smaller, cap).
pub const MAX_REQUEST_BODY: usize = 16 << 20;

/// Body bytes per `Gateway`/`GatewayBody` message (a frame is 64 KiB).
const BODY_PART: usize = 48 * 1024;

/// Broker responses queued between the blocking reader and the HTTP side.
const QUEUE: usize = 8;

/// Requests the relay serves at once (each holds its body, a thread and a
/// broker channel); more wait for a slot. The broker caps a session's
/// channels as well.
const MAX_IN_FLIGHT: usize = 32;

/// The body type of every answer.
type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// Why `--gateway` could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("--gateway {0}: the broker refused it: {1}")]
    Denied(String, String),
    #[error("--gateway {0}: {1}")]
    Broker(String, ClientError),
    #[error("--gateway {0}: unexpected reply from the broker")]
    Unexpected(String),
    #[error("--gateway needs a token: the relay acts with the bound token's authority")]
    NoToken,
    #[error(
        "--gateway needs user namespaces (a private network namespace whose only way \
         out is the relay), which are unavailable here: {0}"
    )]
    NoNamespaces(String),
    #[error("cannot start the gateway relay: {0}")]
    Start(#[source] std::io::Error),
}

/// Ask the broker, over the bound connection `shared`, how to reach each
/// gateway (and whether the token grants it).
pub fn describe(shared: &OwnedFd, names: &[String]) -> Result<Vec<GatewayInfo>, GatewayError> {
    let mut client =
        Client::open_channel(shared).map_err(|e| GatewayError::Broker(names.join(", "), e))?;
    let mut infos = Vec::new();
    for name in names {
        let request = Request::GatewayInfo(GatewayInfoRequest {
            gateway: name.clone(),
        });
        match client.request(&request) {
            Ok(Response::GatewayInfo(info)) if info.gateway == *name => infos.push(info),
            Ok(Response::Denied(d)) => return Err(GatewayError::Denied(name.clone(), d.reason)),
            Ok(Response::Error(e)) => return Err(GatewayError::Denied(name.clone(), e.message)),
            Ok(_) => return Err(GatewayError::Unexpected(name.clone())),
            Err(e) => return Err(GatewayError::Broker(name.clone(), e)),
        }
    }
    Ok(infos)
}

/// Serve the endpoint `listener` (a listening TCP socket in the sandbox's
/// network namespace) on a thread of its own, relaying to the broker over
/// `shared` for the gateways `names`. Runs until the process exits.
pub fn spawn(listener: OwnedFd, shared: OwnedFd, names: Vec<String>) -> Result<(), GatewayError> {
    let listener = std::net::TcpListener::from(listener);
    listener
        .set_nonblocking(true)
        .map_err(GatewayError::Start)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(GatewayError::Start)?;
    let relay = Arc::new(Relay {
        shared,
        names,
        slots: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
    });
    std::thread::Builder::new()
        .name("gateway-relay".to_owned())
        .spawn(move || runtime.block_on(serve(listener, relay)))
        .map_err(GatewayError::Start)?;
    Ok(())
}

#[derive(Debug)]
struct Relay {
    shared: OwnedFd,
    names: Vec<String>,
    slots: Arc<tokio::sync::Semaphore>,
}

async fn serve(listener: std::net::TcpListener, relay: Arc<Relay>) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        eprintln!("agent-shim: gateway relay: cannot register the endpoint");
        return;
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // Each event goes out as it comes: no waiting to coalesce small
        // writes (Nagle's algorithm against a delayed ACK costs 40 ms).
        let _ = stream.set_nodelay(true);
        let relay = Arc::clone(&relay);
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(request, Arc::clone(&relay)));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One HTTP request, relayed.
async fn handle(
    request: HttpRequest<Incoming>,
    relay: Arc<Relay>,
) -> Result<HttpResponse<Body>, Infallible> {
    // Held until the answer has streamed to its end.
    let Ok(slot) = Arc::clone(&relay.slots).acquire_owned().await else {
        return Ok(error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            "keyward: the relay is shutting down",
        ));
    };
    let (parts, body) = request.into_parts();
    let path = parts.uri.path();
    let (name, rest) = match path.strip_prefix('/').and_then(|p| p.split_once('/')) {
        Some((name, rest)) => (name, format!("/{rest}")),
        None => (path.trim_start_matches('/'), "/".to_owned()),
    };
    if !relay.names.iter().any(|n| n == name) {
        return Ok(error_response(
            StatusCode::NOT_FOUND,
            "not_found_error",
            &format!(
                "no gateway here is named {name:?}: the path starts with the gateway's name \
                 (use the base URL the sandbox set)"
            ),
        ));
    }
    let target = match parts.uri.query() {
        Some(query) => format!("{rest}?{query}"),
        None => rest,
    };
    let body = match Limited::new(body, MAX_REQUEST_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Ok(error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                &format!(
                    "the request body is over the relay's {MAX_REQUEST_BODY} bytes, or broken"
                ),
            ))
        }
    };
    let headers = parts
        .headers
        .iter()
        .filter_map(|(name, value)| {
            Some(Header {
                name: name.as_str().to_owned(),
                value: value.to_str().ok()?.to_owned(),
            })
        })
        .collect();
    let head = GatewayRequest {
        gateway: name.to_owned(),
        method: parts.method.as_str().to_owned(),
        path: target,
        headers,
        body_len: body.len() as u64,
        body: Vec::new(),
    };
    let (tx, mut rx) = mpsc::channel(QUEUE);
    let exchanging = Arc::clone(&relay);
    tokio::task::spawn_blocking(move || exchange(&exchanging.shared, head, &body, &tx));
    let first = match rx.recv().await {
        Some(Ok(response)) => response,
        Some(Err(e)) => {
            return Ok(error_response(
                StatusCode::BAD_GATEWAY,
                "api_error",
                &format!("keyward: the broker could not be reached: {e}"),
            ))
        }
        None => {
            return Ok(error_response(
                StatusCode::BAD_GATEWAY,
                "api_error",
                "keyward: the broker sent no answer",
            ))
        }
    };
    let head = match first {
        Response::GatewayHead(head) => head,
        Response::Denied(denial) => {
            return Ok(error_response(
                StatusCode::FORBIDDEN,
                "permission_error",
                &format!("keyward: {}", denial.reason),
            ))
        }
        Response::Error(e) => {
            return Ok(error_response(
                StatusCode::BAD_GATEWAY,
                "api_error",
                &format!("keyward: {}", e.message),
            ))
        }
        _ => {
            return Ok(error_response(
                StatusCode::BAD_GATEWAY,
                "api_error",
                "keyward: unexpected reply from the broker",
            ))
        }
    };
    let event_stream = head.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("content-type")
            && h.value.trim_start().starts_with("text/event-stream")
    });
    let (mut sender, channel) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(1);
    tokio::spawn(async move {
        let _slot = slot;
        while let Some(next) = rx.recv().await {
            match next {
                Ok(Response::GatewayChunk(chunk)) => {
                    if sender.send_data(Bytes::from(chunk.data)).await.is_err() {
                        return;
                    }
                }
                Ok(Response::GatewayEnd(_)) => return,
                Ok(Response::Error(e)) if event_stream => {
                    // An event stream ends with an error event both SDKs
                    // raise on (after a blank line, so that it is an
                    // event of its own whatever came before).
                    let event = serde_json::json!({
                        "type": "error",
                        "error": { "type": "keyward_error", "message": e.message },
                    });
                    let frame = format!("\n\nevent: error\ndata: {event}\n\n");
                    let _ = sender.send_data(Bytes::from(frame)).await;
                    return;
                }
                Ok(Response::Error(e)) => {
                    // Any other body breaks off: never taken for complete.
                    sender.abort(std::io::Error::other(e.message));
                    return;
                }
                Ok(_) | Err(_) => {
                    sender.abort(std::io::Error::other("the broker stream broke off"));
                    return;
                }
            }
        }
        sender.abort(std::io::Error::other("the broker stream ended early"));
    });
    let mut response = HttpResponse::new(channel.boxed());
    *response.status_mut() = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    for h in head.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_str(&h.value),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    Ok(response)
}

/// The blocking side: a channel of its own to the broker, the request,
/// and every response until the stream ends, into `tx`.
fn exchange(
    shared: &OwnedFd,
    head: GatewayRequest,
    body: &[u8],
    tx: &mpsc::Sender<Result<Response, ClientError>>,
) {
    let mut client = match Client::open_channel(shared) {
        Ok(client) => client,
        Err(e) => {
            let _ = tx.blocking_send(Err(e));
            return;
        }
    };
    let (first, rest) = body.split_at(body.len().min(BODY_PART));
    let head = GatewayRequest {
        body: first.to_vec(),
        ..head
    };
    if let Err(e) = client.send(&Request::Gateway(head)) {
        let _ = tx.blocking_send(Err(e));
        return;
    }
    for part in rest.chunks(BODY_PART) {
        // A broker that refused the head has answered already and closes
        // on the rest: its answer is read below.
        if client
            .send(&Request::GatewayBody(GatewayBody {
                data: part.to_vec(),
            }))
            .is_err()
        {
            break;
        }
    }
    loop {
        let response = client.recv_response();
        let last = !matches!(
            response,
            Ok(Response::GatewayHead(_) | Response::GatewayChunk(_))
        );
        if tx.blocking_send(response).is_err() || last {
            return;
        }
    }
}

/// An error answer in the shape both OpenAI's and Anthropic's SDKs read.
fn error_response(status: StatusCode, kind: &str, message: &str) -> HttpResponse<Body> {
    let body = serde_json::json!({
        "type": "error",
        "error": { "type": kind, "message": message },
    });
    let mut response = HttpResponse::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
