// SPDX-License-Identifier: Apache-2.0
//! A real HTTP server on loopback, standing in for an upstream API.
//!
//! Routes:
//! - `/protected`: 200 "hello from upstream" only with
//!   `Authorization: Bearer <SECRET>`, else 401.
//! - `/echo...`: 200 with every request header, the URL and the body
//!   echoed back as JSON, and the Authorization and X-Api-Key headers
//!   echoed in response headers: the hostile upstream redaction must defeat.
//! - `/slow`: answers after one second.
//! - `/big`: a 100 000-byte body.
//!
//! Every request is recorded so tests can see exactly what arrived.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::SECRET;

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A running upstream; stops on drop.
pub struct Upstream {
    pub port: u16,
    server: Arc<tiny_http::Server>,
    seen: Arc<Mutex<Vec<Seen>>>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    pub fn start() -> Upstream {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let server = Arc::clone(&server);
            let seen = Arc::clone(&seen);
            std::thread::spawn(move || {
                for request in server.incoming_requests() {
                    let seen = Arc::clone(&seen);
                    // One thread per request so /slow does not block others.
                    std::thread::spawn(move || respond(request, &seen));
                }
            })
        };
        Upstream {
            port,
            server,
            seen,
            thread: Some(thread),
        }
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The last request received.
    pub fn last(&self) -> Seen {
        self.seen().pop().expect("upstream saw no request")
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn respond(mut request: tiny_http::Request, seen: &Mutex<Vec<Seen>>) {
    let mut body = String::new();
    let _ = request.as_reader().read_to_string(&mut body);
    let record = Seen {
        method: request.method().to_string(),
        url: request.url().to_owned(),
        headers: request
            .headers()
            .iter()
            .map(|h| (h.field.to_string(), h.value.to_string()))
            .collect(),
        body,
    };
    seen.lock().unwrap().push(record.clone());
    let header =
        |n: &str, v: &str| tiny_http::Header::from_bytes(n.as_bytes(), v.as_bytes()).unwrap();
    let url = record.url.clone();
    let response = if url == "/protected" {
        if record.header("Authorization") == Some(&format!("Bearer {SECRET}")) {
            tiny_http::Response::from_string("hello from upstream")
        } else {
            tiny_http::Response::from_string("unauthorized").with_status_code(401)
        }
    } else if url.starts_with("/echo") {
        let echoed = serde_json::json!({
            "method": record.method,
            "url": record.url,
            "headers": record.headers,
            "body": record.body,
        });
        let mut response = tiny_http::Response::from_string(echoed.to_string())
            .with_header(header("Content-Type", "application/json"));
        for name in ["Authorization", "X-Api-Key"] {
            if let Some(v) = record.header(name) {
                response.add_header(header(&format!("X-Echo-{name}"), v));
            }
        }
        response
    } else if url == "/slow" {
        std::thread::sleep(Duration::from_secs(1));
        tiny_http::Response::from_string("slow but done")
    } else if url == "/big" {
        tiny_http::Response::from_string("x".repeat(100_000))
    } else {
        tiny_http::Response::from_string("not found").with_status_code(404)
    };
    let _ = request.respond(response);
}
