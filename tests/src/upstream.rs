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
//! - `/huge`: a [`HUGE`]-byte body (more than every socket buffer between
//!   the broker and a client holds).
//!
//! Every request is recorded so tests can see exactly what arrived.
//!
//! [`Hostile`] is the other kind: a raw TCP server whose routes leak the
//! credential in every encoding an upstream can choose, or misbehave.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::SECRET;

/// Bytes of the `/huge` body.
pub const HUGE: usize = 4 << 20;

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
    } else if url == "/huge" {
        tiny_http::Response::from_string("x".repeat(HUGE))
    } else if let Some(code) = url
        .strip_prefix("/status/")
        .and_then(|c| c.parse::<u16>().ok())
    {
        // `/status/NNN`: that status, with a body naming it.
        tiny_http::Response::from_string(format!("status {code}")).with_status_code(code)
    } else {
        tiny_http::Response::from_string("not found").with_status_code(404)
    };
    let _ = request.respond(response);
}

/// A hostile upstream on loopback that speaks raw HTTP/1.1 over TCP, so
/// it can answer what no server library lets one write: two
/// `Content-Encoding` headers, a body shorter than its `Content-Length`,
/// a connection closed mid-body. Each route performs one leak or fault of
/// the table in `tests/tests/leaks.rs` and `upstream_faults.rs`; `/ok`
/// answers 200 "legitimate" for the call that must keep working.
pub struct Hostile {
    pub port: u16,
    stop: Arc<std::sync::atomic::AtomicBool>,
    requests: Arc<std::sync::atomic::AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Hostile {
    pub fn start() -> Hostile {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicUsize::new(0));
        let thread = {
            let stop = Arc::clone(&stop);
            let requests = Arc::clone(&requests);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            requests.fetch_add(1, Ordering::Relaxed);
                            std::thread::spawn(move || serve_hostile(stream));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        Hostile {
            port,
            stop,
            requests,
            thread: Some(thread),
        }
    }

    /// Connections accepted so far.
    pub fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The body a careless upstream would echo: the request's credential in a
/// JSON debug document.
/// (Long and repetitive enough that gzip Huffman-codes it rather than
/// storing it raw.)
pub fn debug_document() -> String {
    format!(
        r#"{{"debug":{{"authorization":"Bearer {SECRET}"}},"status":"ok","padding":"{}"}}"#,
        "status ok ".repeat(30)
    )
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

/// Base64 of `prefix + secret + suffix`, wrapped at 76 columns with CRLF,
/// with the secret's encoding split by a line break.
pub fn wrapped_base64_across_a_break() -> String {
    use base64::Engine as _;
    // 48 bytes of prefix = 64 characters: the secret's encoding starts at
    // column 64, so only its first 9 bytes are on the first line.
    let data = format!("{}{SECRET} and more text after it", "p".repeat(48));
    let encoded = base64::engine::general_purpose::STANDARD.encode(data);
    let lines: Vec<&str> = encoded
        .as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    assert!(!lines
        .iter()
        .any(|l| { l.contains(&base64::engine::general_purpose::STANDARD.encode(&SECRET[..12])) }));
    lines.join("\r\n")
}

/// Base64 of the secret wrapped at 8 columns: no line holds a window of
/// it (6 bytes a line, the window is 9), only the joined text does.
pub fn narrow_base64() -> String {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(SECRET);
    let lines: Vec<&str> = encoded
        .as_bytes()
        .chunks(8)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    lines.join("\n")
}

/// Base64 of `k` and the first 30 bytes of the secret: no whole-value
/// form redaction knows, so only the leak scanner can catch it.
pub fn smuggled_base64() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("k{}", &SECRET[..30]))
}

/// Hex of the first 30 bytes of the secret (60 digits).
pub fn smuggled_hex() -> String {
    SECRET[..30].bytes().map(|b| format!("{b:02x}")).collect()
}

/// Every character of `text` as a JSON `\uXXXX` escape.
pub fn json_u(text: &str) -> String {
    text.chars()
        .map(|c| format!("\\u{:04x}", c as u32))
        .collect()
}

fn serve_hostile(mut stream: std::net::TcpStream) {
    use std::io::{BufRead, BufReader, Write};
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    // Skip the request headers, and the body if one is announced (an
    // STS or token request is a POST): unread bytes would reset the
    // connection before the answer is read.
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => {
                if let Some((name, value)) = line.split_once(':') {
                    if name.trim().eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
            }
        }
    }
    {
        use std::io::Read;
        let mut body = vec![0u8; length.min(1 << 20)];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
    }
    let target = request_line.split(' ').nth(1).unwrap_or("/");
    let path = target.split('?').next().unwrap_or("/").to_owned();
    let respond = |stream: &mut std::net::TcpStream,
                   status: &str,
                   headers: &[(&str, String)],
                   body: &[u8]| {
        let mut head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(body);
        let _ = stream.flush();
    };
    let json = ("Content-Type", "application/json".to_owned());
    let doc = debug_document();
    match path.as_str() {
        "/ok" => respond(&mut stream, "200 OK", &[], b"legitimate"),
        "/two-encodings" => respond(
            &mut stream,
            "200 OK",
            &[
                json,
                ("Content-Encoding", "identity".to_owned()),
                ("Content-Encoding", "gzip".to_owned()),
            ],
            &gzip(doc.as_bytes()),
        ),
        "/gzip-bare" => respond(
            &mut stream,
            "200 OK",
            &[("Content-Type", "application/octet-stream".to_owned())],
            &gzip(doc.as_bytes()),
        ),
        "/base64-wrapped" => respond(
            &mut stream,
            "200 OK",
            &[("Content-Type", "text/plain".to_owned())],
            wrapped_base64_across_a_break().as_bytes(),
        ),
        "/base64-narrow" => respond(
            &mut stream,
            "200 OK",
            &[("Content-Type", "text/plain".to_owned())],
            narrow_base64().as_bytes(),
        ),
        "/split-headers" => {
            let (a, b) = SECRET.split_at(SECRET.len() / 2);
            respond(
                &mut stream,
                "200 OK",
                &[("X-Part", a.to_owned()), ("X-Part", b.to_owned())],
                b"{}",
            )
        }
        "/split-headers-short" => {
            // A 16-byte fragment in two 8-byte pieces, each shorter than
            // the scanner's window: only the joined value shows it.
            respond(
                &mut stream,
                "200 OK",
                &[
                    ("X-Part", SECRET[..8].to_owned()),
                    ("X-Part", SECRET[8..16].to_owned()),
                ],
                b"{}",
            )
        }
        "/json-u" => respond(
            &mut stream,
            "200 OK",
            &[json],
            format!(r#"{{"debug":"{}"}}"#, json_u(&format!("Bearer {SECRET}"))).as_bytes(),
        ),
        "/json-in-json" => {
            let inner = format!(
                r#"{{"authorization":"{}"}}"#,
                json_u(&format!("Bearer {SECRET}"))
            );
            let outer = serde_json::json!({ "data": inner }).to_string();
            respond(&mut stream, "200 OK", &[json], outer.as_bytes())
        }
        "/hex-colons" => {
            let hex: Vec<String> = SECRET.bytes().map(|b| format!("{b:02x}")).collect();
            respond(
                &mut stream,
                "200 OK",
                &[("Content-Type", "text/plain".to_owned())],
                format!("fingerprint {}", hex.join(":")).as_bytes(),
            )
        }
        "/partial-401" => respond(
            &mut stream,
            "401 Unauthorized",
            &[json],
            format!(
                r#"{{"error":"invalid api key {}"}}"#,
                &SECRET[..SECRET.len() - 2]
            )
            .as_bytes(),
        ),
        // An STS endpoint (`endpoint = ".../sts-error"`) refusing with a
        // message that carries base64 of a fragment of the secret.
        "/sts-error/" => respond(
            &mut stream,
            "403 Forbidden",
            &[("Content-Type", "text/xml".to_owned())],
            format!(
                "<ErrorResponse><Error><Type>Sender</Type><Code>SignatureDoesNotMatch</Code>\
                 <Message>signature mismatch for {}</Message></Error></ErrorResponse>",
                smuggled_base64()
            )
            .as_bytes(),
        ),
        // A token endpoint refusing with an RFC 6749 "error code" that is
        // the hex of a fragment of the secret (short, printable: quoted).
        "/oauth-error" => respond(
            &mut stream,
            "400 Bad Request",
            &[json],
            format!(r#"{{"error":"{}"}}"#, smuggled_hex()).as_bytes(),
        ),
        "/slow" => {
            std::thread::sleep(Duration::from_secs(3));
            respond(&mut stream, "200 OK", &[], b"too late");
        }
        "/huge" => {
            let body = vec![b'x'; 10 << 20];
            respond(&mut stream, "200 OK", &[], &body);
        }
        "/huge-chunked" => {
            // No Content-Length: the cap must hold while streaming.
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            );
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..160 {
                let _ = stream.write_all(format!("{:x}\r\n", chunk.len()).as_bytes());
                if stream.write_all(&chunk).is_err() || stream.write_all(b"\r\n").is_err() {
                    return;
                }
            }
            let _ = stream.write_all(b"0\r\n\r\n");
        }
        "/cut" => {
            // Promise 1000 bytes, send 100, close.
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n");
            let _ = stream.write_all(&[b'y'; 100]);
            let _ = stream.flush();
        }
        _ => respond(&mut stream, "404 Not Found", &[], b"not found"),
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}
