// SPDX-License-Identifier: Apache-2.0
//! A loopback stand-in for OpenAI's and Anthropic's HTTP APIs, enough for
//! their official SDKs: chat completions and messages, plain and streamed
//! as server-sent events.
//!
//! A streamed answer's first event is sent at once; the rest only after
//! the program has said (by creating `first-<api>` in the marker
//! directory) that it received the first, or after ten seconds. The server
//! records whether the marker was there before it produced the last
//! event: proof that the stream reached the program before it was
//! complete, without timing anything. `/v1/completions` streams two
//! events, then one carrying the credential split over two writes.
//!
//! Every request is recorded (method, path, credential headers, body) so
//! tests can see the key the upstream received.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request as the upstream saw it.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub x_api_key: Option<String>,
    pub body: String,
}

/// What the upstream recorded.
#[derive(Debug, Default)]
pub struct Log {
    pub seen: Vec<Seen>,
    /// For each streamed answer: whether the program's marker was there
    /// before the last event was produced.
    pub first_before_last: Vec<(String, bool)>,
}

/// A running upstream; its thread ends with the test process.
pub struct Llm {
    pub port: u16,
    pub log: Arc<Mutex<Log>>,
}

impl Llm {
    /// Start on 127.0.0.1 (any port). `markers`: where the program says it
    /// has the first event; `None` streams without waiting. `secret`: what
    /// `/v1/completions` leaks.
    pub fn start(markers: Option<PathBuf>, secret: &str) -> Llm {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Log::default()));
        let shared = Arc::clone(&log);
        let secret = secret.to_owned();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let log = Arc::clone(&shared);
                let markers = markers.clone();
                let secret = secret.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &log, markers.as_deref(), &secret);
                });
            }
        });
        Llm { port, log }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.log.lock().unwrap().seen.clone()
    }

    pub fn first_before_last(&self) -> Vec<(String, bool)> {
        self.log.lock().unwrap().first_before_last.clone()
    }
}

fn serve(
    stream: TcpStream,
    log: &Mutex<Log>,
    markers: Option<&std::path::Path>,
    secret: &str,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_owned();
        let path = parts.next().unwrap_or_default().to_owned();
        let mut seen = Seen {
            method,
            path,
            ..Seen::default()
        };
        let mut length = 0;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header)?;
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            let Some((name, value)) = header.split_once(':') else {
                continue;
            };
            let value = value.trim().to_owned();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse().unwrap_or(0),
                "authorization" => seen.authorization = Some(value),
                "x-api-key" => seen.x_api_key = Some(value),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        seen.body = String::from_utf8_lossy(&body).into_owned();
        let streamed = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("stream").and_then(|s| s.as_bool()))
            .unwrap_or(false);
        let path = seen.path.clone();
        log.lock().unwrap().seen.push(seen);
        match (path.as_str(), streamed) {
            ("/v1/chat/completions", false) => json(&mut out, OPENAI_CHAT)?,
            ("/v1/messages", false) => json(&mut out, ANTHROPIC_MESSAGE)?,
            ("/v1/chat/completions", true) => {
                let events: Vec<String> = ["one ", "two ", "three"]
                    .iter()
                    .map(|t| openai_chunk(t))
                    .chain(std::iter::once("data: [DONE]\n\n".to_owned()))
                    .collect();
                stream_events(&mut out, log, markers, "openai", 1, &events)?;
            }
            ("/v1/messages", true) => {
                let mut events = vec![
                    sse("message_start", ANTHROPIC_START),
                    sse(
                        "content_block_start",
                        r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
                    ),
                ];
                for text in ["one ", "two ", "three"] {
                    events.push(sse(
                        "content_block_delta",
                        &format!(
                            r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":"{text}"}}}}"#
                        ),
                    ));
                }
                events.push(sse(
                    "content_block_stop",
                    r#"{"type":"content_block_stop","index":0}"#,
                ));
                events.push(sse(
                    "message_delta",
                    r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":3}}"#,
                ));
                events.push(sse("message_stop", r#"{"type":"message_stop"}"#));
                stream_events(&mut out, log, markers, "anthropic", 3, &events)?;
            }
            ("/v1/completions", _) => {
                // The key in pieces shorter than any window of it, each
                // its own write: only judged together are they caught.
                let mut events = vec![
                    openai_chunk("fine "),
                    openai_chunk("still fine "),
                    "data: {\"text\": \"the key is ".to_owned(),
                ];
                events.extend(
                    secret
                        .as_bytes()
                        .chunks(8)
                        .map(|piece| String::from_utf8_lossy(piece).into_owned()),
                );
                events.push("\"}\n\n".to_owned());
                events.push(openai_chunk("after"));
                stream_events(&mut out, log, None, "leak", 0, &events)?;
            }
            _ => {
                let body = r#"{"error":{"message":"no such route","type":"not_found"}}"#;
                write!(
                    out,
                    "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\n\r\n{body}",
                    body.len()
                )?;
            }
        }
        out.flush()?;
    }
}

fn json(out: &mut TcpStream, body: &str) -> std::io::Result<()> {
    write!(
        out,
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A chunked event stream: `events[..first]` at once, the rest after the
/// marker (or ten seconds).
fn stream_events(
    out: &mut TcpStream,
    log: &Mutex<Log>,
    markers: Option<&std::path::Path>,
    api: &str,
    first: usize,
    events: &[String],
) -> std::io::Result<()> {
    write!(
        out,
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
         transfer-encoding: chunked\r\n\r\n"
    )?;
    out.flush()?;
    let chunk = |out: &mut TcpStream, data: &str| -> std::io::Result<()> {
        write!(out, "{:x}\r\n{data}\r\n", data.len())?;
        out.flush()
    };
    for event in &events[..first] {
        chunk(out, event)?;
    }
    let mut arrived = false;
    if let Some(dir) = markers {
        let marker = dir.join(format!("first-{api}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if marker.exists() {
                arrived = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        log.lock()
            .unwrap()
            .first_before_last
            .push((api.to_owned(), arrived));
    }
    for event in &events[first..] {
        chunk(out, event)?;
        std::thread::sleep(Duration::from_millis(2));
    }
    write!(out, "0\r\n\r\n")?;
    out.flush()
}

fn sse(event: &str, data: &str) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

fn openai_chunk(text: &str) -> String {
    format!(
        "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":0,\
         \"model\":\"gpt-test\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}},\
         \"finish_reason\":null}}]}}\n\n"
    )
}

const OPENAI_CHAT: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":0,"model":"gpt-test","choices":[{"index":0,"message":{"role":"assistant","content":"hello from the model"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":4,"total_tokens":5}}"#;

const ANTHROPIC_MESSAGE: &str = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-test","content":[{"type":"text","text":"hello from claude"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":1,"output_tokens":3}}"#;

const ANTHROPIC_START: &str = r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-test","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":1,"output_tokens":1}}}"#;
