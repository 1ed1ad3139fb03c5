// SPDX-License-Identifier: Apache-2.0
//! `agent-shim call` against the real broker and a real loopback upstream:
//! the credential is injected, the result comes back, the secret never
//! does; every denial is a clear sentence and exit status 3.
#![allow(clippy::unwrap_used)]

use keyward_tests::upstream::Upstream;
use keyward_tests::{assert_no_secret, Broker, Ran, PRINCIPAL_UID, SECRET, STRANGER_UID};

fn config(port: u16) -> String {
    format!(
        r#"
[broker]
socket = "{{socket}}"
socket_mode = "0666"
credentials_dir = "{{dir}}/creds"
call_timeout = "5s"

[[principal]]
name = "orchestrator"
uids = [{PRINCIPAL_UID}]
may_call = ["protected", "echo_headers", "echo_basic", "echo_key", "send_email", "echo", "big", "slow"]

[credential.api]
file = "api.token"

[[tool]]
name = "protected"
kind = "http"
credential = "api"
method = "GET"
url = "http://127.0.0.1:{port}/protected"
auth = {{ bearer = true }}

[[tool]]
name = "echo_headers"
kind = "http"
credential = "api"
method = "POST"
url = "http://127.0.0.1:{port}/echo/{{path}}?q={{q}}"
auth = {{ bearer = true }}
headers = {{ "X-Note" = "{{note}}" }}
body_json = {{ text = "{{text}}", count = "{{count}}" }}
params.path = {{ type = "string", max_len = 100, default = "p" }}
params.q = {{ type = "string", max_len = 100, default = "" }}
params.note = {{ type = "string", max_len = 100, default = "" }}
params.text = {{ type = "string", max_len = 1000, default = "" }}
params.count = {{ type = "int", min = 0, max = 10, default = 1 }}

[[tool]]
name = "echo_basic"
kind = "http"
credential = "api"
method = "GET"
url = "http://127.0.0.1:{port}/echo/basic"
auth = {{ basic = "user" }}

[[tool]]
name = "echo_key"
kind = "http"
credential = "api"
method = "GET"
url = "http://127.0.0.1:{port}/echo/key"
auth = {{ header = "X-Api-Key" }}

[[tool]]
name = "send_email"
kind = "http"
credential = "api"
method = "POST"
url = "http://127.0.0.1:{port}/echo/send"
auth = {{ bearer = true }}
body_json = {{ to = "{{to}}", subject = "{{subject}}" }}
params.to = {{ type = "string", pattern = '^[a-z0-9._-]+@example\.com$' }}
params.subject = {{ type = "string", max_len = 200 }}

[[tool]]
name = "big"
kind = "http"
method = "GET"
url = "http://127.0.0.1:{port}/big"

[[tool]]
name = "slow"
kind = "http"
method = "GET"
url = "http://127.0.0.1:{port}/slow"

[[tool]]
name = "echo"
kind = "echo"
params.message = {{ type = "string", max_len = 200 }}
"#
    )
}

struct Fixture {
    upstream: Upstream,
    broker: Broker,
}

fn fixture() -> Fixture {
    let upstream = Upstream::start();
    let broker = Broker::start(
        &config(upstream.port),
        &[("api.token", &format!("{SECRET}\n"))],
    );
    Fixture { upstream, broker }
}

impl Fixture {
    fn call(&self, uid: u32, args: &[&str]) -> Ran {
        let mut full = vec!["call"];
        full.extend_from_slice(args);
        Ran::from(self.broker.shim(uid, &full))
    }

    /// Nothing the caller saw and nothing the broker logged has the secret.
    fn assert_clean(&self, ran: &Ran) {
        assert_no_secret("stdout", &ran.stdout);
        assert_no_secret("stderr", &ran.stderr);
        assert_no_secret("audit", &self.broker.audit());
    }
}

#[test]
fn bearer_call_succeeds_and_returns_the_body() {
    let f = fixture();
    let ran = f.call(PRINCIPAL_UID, &["protected"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert_eq!(ran.stdout, "hello from upstream");
    // The upstream really required and got the credential.
    assert_eq!(
        f.upstream.last().header("Authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    f.assert_clean(&ran);
    let records = f.broker.audit_records();
    assert!(records.iter().any(|r| r["event"] == "call"
        && r["decision"] == "allow"
        && r["tool"] == "protected"
        && r["peer_uid"] == PRINCIPAL_UID));
}

#[test]
fn echoed_credentials_are_redacted_everywhere() {
    let f = fixture();
    for tool in ["echo_headers", "echo_basic", "echo_key"] {
        let ran = f.call(PRINCIPAL_UID, &["--json", tool]);
        assert_eq!(ran.code, Some(0), "{tool}: {ran:?}");
        // The upstream got the credential, and echoed it back...
        let seen = f.upstream.last();
        assert!(
            seen.headers.iter().any(|(_, v)| v.contains(SECRET))
                || seen
                    .header("Authorization")
                    .is_some_and(|v| v.starts_with("Basic ")),
            "{tool}: upstream did not receive the credential: {seen:?}"
        );
        // ...and the caller sees only [REDACTED], in body and headers.
        let envelope: serde_json::Value = serde_json::from_str(&ran.stdout).unwrap();
        let body = envelope["body"].as_str().unwrap();
        assert!(body.contains("[REDACTED]"), "{tool}: {body}");
        let headers = envelope["headers"].to_string();
        assert!(headers.contains("[REDACTED]"), "{tool}: {headers}");
        f.assert_clean(&ran);
    }
}

#[test]
fn stranger_uid_is_denied() {
    let f = fixture();
    let ran = f.call(STRANGER_UID, &["protected"]);
    assert_eq!(ran.code, Some(3), "{ran:?}");
    assert!(ran.stderr.contains("not a principal"), "{ran:?}");
    assert!(
        f.upstream.seen().is_empty(),
        "a denied call reached upstream"
    );
    let records = f.broker.audit_records();
    assert!(records
        .iter()
        .any(|r| r["decision"] == "deny" && r["peer_uid"] == STRANGER_UID));
}

#[test]
fn parameter_outside_its_pattern_is_denied() {
    let f = fixture();
    let ran = f.call(
        PRINCIPAL_UID,
        &["send_email", "to=mallory@evil.com", "subject=hi"],
    );
    assert_eq!(ran.code, Some(3), "{ran:?}");
    assert!(ran.stderr.contains("\"to\""), "{ran:?}");
    assert!(ran.stderr.contains("pattern"), "{ran:?}");
    assert!(ran.stderr.contains("send_email"), "{ran:?}");
    assert!(f.upstream.seen().is_empty());
    // The allowed value goes through.
    let ran = f.call(
        PRINCIPAL_UID,
        &["send_email", "to=alice@example.com", "subject=hi"],
    );
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let sent: serde_json::Value = serde_json::from_str(&f.upstream.last().body).unwrap();
    assert_eq!(sent["to"], "alice@example.com");
}

#[test]
fn unknown_missing_and_ill_typed_parameters_are_denied() {
    let f = fixture();
    for (args, expect) in [
        (
            vec![
                "send_email",
                "to=a@example.com",
                "subject=s",
                "cc=x@evil.com",
            ],
            "\"cc\"",
        ),
        (vec!["send_email", "to=a@example.com"], "\"subject\""),
        (vec!["echo_headers", "count=many"], "\"count\""),
        (vec!["echo_headers", "count=11"], "\"count\""),
        (vec!["no_such_tool"], "no_such_tool"),
    ] {
        let ran = f.call(PRINCIPAL_UID, &args);
        assert_eq!(ran.code, Some(3), "{args:?}: {ran:?}");
        assert!(ran.stderr.contains(expect), "{args:?}: {ran:?}");
        assert_eq!(
            ran.stderr.trim().lines().count(),
            1,
            "one sentence: {ran:?}"
        );
    }
    assert!(f.upstream.seen().is_empty());
}

#[test]
fn path_and_query_injection_is_encoded() {
    let f = fixture();
    let ran = f.call(
        PRINCIPAL_UID,
        &["echo_headers", "path=..admin?x=1#f", "q=a&admin=1 b"],
    );
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let url = f.upstream.last().url;
    assert_eq!(url, "/echo/..admin%3Fx%3D1%23f?q=a%26admin%3D1%20b");
}

#[test]
fn dot_segment_is_denied() {
    let f = fixture();
    for path in ["..", "."] {
        let ran = f.call(PRINCIPAL_UID, &["echo_headers", &format!("path={path}")]);
        assert_eq!(ran.code, Some(3), "{path}: {ran:?}");
        assert!(ran.stderr.contains("\"path\""), "{ran:?}");
    }
    assert!(f.upstream.seen().is_empty());
}

#[test]
fn json_body_injection_stays_a_string() {
    let f = fixture();
    let hostile = "x\", \"admin\": true, \"y\": \"\n";
    let ran = f.call(PRINCIPAL_UID, &["echo_headers", &format!("text={hostile}")]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let body: serde_json::Value = serde_json::from_str(&f.upstream.last().body).unwrap();
    assert_eq!(body["text"], hostile);
    assert_eq!(body["count"], 1, "typed default is a JSON number");
    assert!(body.get("admin").is_none());
}

#[test]
fn header_injection_is_denied() {
    let f = fixture();
    let ran = f.call(
        PRINCIPAL_UID,
        &["echo_headers", "note=x\r\nAuthorization: Bearer stolen"],
    );
    assert_eq!(ran.code, Some(3), "{ran:?}");
    assert!(ran.stderr.contains("\"note\""), "{ran:?}");
    assert!(f.upstream.seen().is_empty());
}

#[test]
fn oversized_response_is_an_error_not_a_truncation() {
    let f = fixture();
    let ran = f.call(PRINCIPAL_UID, &["big"]);
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stdout.is_empty(), "no partial body: {ran:?}");
    assert!(ran.stderr.contains("limit"), "{ran:?}");
}

#[test]
fn echo_tool_round_trips_parameters() {
    let f = fixture();
    let ran = f.call(PRINCIPAL_UID, &["echo", "message=hello"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert_eq!(ran.stdout, r#"{"message":"hello"}"#);
}

#[test]
fn sigterm_lets_the_in_flight_call_finish() {
    let mut f = fixture();
    let child = keyward_tests::shim_command(&f.broker.socket, PRINCIPAL_UID, &["call", "slow"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the upstream has the request, then stop the broker.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while f.upstream.seen().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "call never reached upstream"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let status = f.broker.stop();
    let ran = Ran::from(child.wait_with_output().unwrap());
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert_eq!(ran.stdout, "slow but done");
    assert!(status.success(), "broker exit: {status}");
    let records = f.broker.audit_records();
    assert_eq!(records.last().unwrap()["event"], "stop", "{records:?}");
    assert!(!f.broker.socket.exists(), "socket file left behind");
}
