// SPDX-License-Identifier: Apache-2.0
//! Upstream faults against the real broker: an upstream that is down,
//! too slow, too big (10 MiB, with and without a `Content-Length`), or
//! closes the connection mid-body. Each is a clear error to the caller,
//! never a partial body, and the broker keeps serving.
#![allow(clippy::unwrap_used)]

use keyward_tests::upstream::Hostile;
use keyward_tests::{assert_no_secret, Broker, PRINCIPAL_UID, SECRET};

fn config(port: u16, down: u16) -> String {
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
may_call = ["ok", "down", "slow", "huge", "huge_chunked", "cut"]

[credential.api]
file = "api.token"

[[tool]]
name = "ok"
kind = "http"
credential = "api"
method = "GET"
url = "http://127.0.0.1:{port}/ok"
auth = {{ bearer = true }}

[[tool]]
name = "down"
kind = "http"
credential = "api"
method = "GET"
url = "http://127.0.0.1:{down}/ok"
auth = {{ bearer = true }}

[[tool]]
name = "slow"
kind = "http"
credential = "api"
method = "GET"
url = "http://127.0.0.1:{port}/slow"
auth = {{ bearer = true }}
timeout = "1s"

[[tool]]
name = "huge"
kind = "http"
credential = "api"
method = "GET"
url = "http://127.0.0.1:{port}/huge"
auth = {{ bearer = true }}

[[tool]]
name = "huge_chunked"
kind = "http"
credential = "api"
method = "GET"
url = "http://127.0.0.1:{port}/huge-chunked"
auth = {{ bearer = true }}

[[tool]]
name = "cut"
kind = "http"
credential = "api"
method = "GET"
url = "http://127.0.0.1:{port}/cut"
auth = {{ bearer = true }}
"#
    )
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn each_fault_is_a_clear_error_and_the_broker_keeps_serving() {
    let hostile = Hostile::start();
    let broker = Broker::start(
        &config(hostile.port, closed_port()),
        &[("api.token", &format!("{SECRET}\n"))],
    );
    let call = |tool: &str| broker.call(PRINCIPAL_UID, &[tool]);
    for (tool, expected) in [
        ("down", "upstream request failed"),
        ("slow", "upstream did not answer within 1s"),
        ("huge", "exceeds the"),
        ("huge_chunked", "exceeds the"),
        ("cut", "upstream request failed"),
    ] {
        let ran = call(tool);
        eprintln!("{tool:<13} {}", ran.stderr.trim_end());
        assert_eq!(ran.code, Some(1), "{tool}: {ran:?}");
        assert!(
            ran.stdout.is_empty(),
            "{tool}: a partial body came back: {ran:?}"
        );
        assert!(ran.stderr.contains(expected), "{tool}: {ran:?}");
        assert_no_secret(tool, &ran.stderr);
        let records = broker.audit_records();
        assert!(
            records
                .iter()
                .any(|r| r["tool"] == tool && r["event"] == "call_failed"),
            "{tool}: {records:?}"
        );
        // The broker is still serving.
        let ran = call("ok");
        assert_eq!(ran.code, Some(0), "after {tool}: {ran:?}");
        assert_eq!(ran.stdout, "legitimate");
    }
    assert_no_secret("audit", &broker.audit());
}
