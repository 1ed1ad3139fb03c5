// SPDX-License-Identifier: Apache-2.0
//! Hostile and broken clients: garbage, truncated, oversized and
//! wrong-version messages get an error reply or a closed connection, a
//! connection handed to another process is not trusted, and through all of
//! it the broker keeps serving everyone else.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use keyward_proto::{encode, ErrorCode, Hello, Request, Response, MAX_MESSAGE};
use keyward_tests::{echo_request, Broker, Ran, RawConn, PRINCIPAL_UID, STRANGER_UID};

const CONFIG: &str = r#"
[broker]
socket = "{socket}"
socket_mode = "0666"
max_connections_per_uid = 4

[[principal]]
name = "tester"
uids = [0, 61000]
may_call = ["echo"]

[[tool]]
name = "echo"
kind = "echo"
params.message = { type = "string", max_len = 100 }
"#;

fn error_code(reply: Option<Response>) -> ErrorCode {
    match reply {
        Some(Response::Error(e)) => e.code,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

/// A well-behaved client is still served.
fn assert_serving(broker: &Broker) {
    let conn = RawConn::connect(&broker.socket);
    conn.hello();
    assert!(
        matches!(
            conn.request(&echo_request("still here")),
            Some(Response::Done(_))
        ),
        "broker stopped serving"
    );
}

#[test]
fn garbage_gets_an_error_and_a_close() {
    let broker = Broker::start(CONFIG, &[]);
    for garbage in [
        &b"\xff\xfe\xfdnot postcard"[..],
        b"\x00",
        b"\x00\x01\x02",
        b"\x07\x01",
    ] {
        let conn = RawConn::connect(&broker.socket);
        conn.send(garbage).unwrap();
        assert_eq!(error_code(conn.recv()), ErrorCode::Malformed, "{garbage:?}");
        assert!(conn.recv().is_none(), "connection left open");
    }
    assert_serving(&broker);
}

#[test]
fn empty_message_is_malformed() {
    let broker = Broker::start(CONFIG, &[]);
    let conn = RawConn::connect(&broker.socket);
    conn.send(b"").unwrap();
    assert_eq!(error_code(conn.recv()), ErrorCode::Malformed);
    assert_serving(&broker);
}

#[test]
fn truncated_call_is_rejected() {
    let broker = Broker::start(CONFIG, &[]);
    let call = encode(&echo_request("hello")).unwrap();
    for cut in [1, call.len() / 2, call.len() - 1] {
        let conn = RawConn::connect(&broker.socket);
        conn.hello();
        conn.send(&call[..cut]).unwrap();
        assert_eq!(
            error_code(conn.recv()),
            ErrorCode::Malformed,
            "cut at {cut}"
        );
        assert!(conn.recv().is_none());
    }
    assert_serving(&broker);
}

#[test]
fn oversized_message_is_rejected() {
    let broker = Broker::start(CONFIG, &[]);
    let conn = RawConn::connect(&broker.socket);
    conn.hello();
    conn.send(&vec![0x01; MAX_MESSAGE + 1]).unwrap();
    assert_eq!(error_code(conn.recv()), ErrorCode::TooLarge);
    assert!(conn.recv().is_none());
    // Exactly at the cap is not "too large" (it is garbage, though).
    let conn = RawConn::connect(&broker.socket);
    conn.send(&vec![0xff; MAX_MESSAGE]).unwrap();
    assert_eq!(error_code(conn.recv()), ErrorCode::Malformed);
    assert_serving(&broker);
}

#[test]
fn wrong_version_and_missing_hello_are_refused() {
    let broker = Broker::start(CONFIG, &[]);
    let conn = RawConn::connect(&broker.socket);
    // Older than the oldest version the broker speaks (a newer one gets
    // the broker's own: tests/versions.rs).
    let reply = conn.request(&Request::Hello(Hello { version: 1 }));
    assert_eq!(error_code(reply), ErrorCode::VersionMismatch);
    assert!(conn.recv().is_none());

    let conn = RawConn::connect(&broker.socket);
    assert_eq!(
        error_code(conn.request(&echo_request("x"))),
        ErrorCode::HelloRequired
    );
    assert!(conn.recv().is_none());
    assert_serving(&broker);
}

#[test]
fn connection_cap_per_uid_does_not_starve_others() {
    use std::io::BufRead;
    let broker = Broker::start(CONFIG, &[]);
    // uid 61001 opens its four connections; the fifth is refused...
    let mut holder = Command::new(env!("CARGO_BIN_EXE_kw-test-peer"))
        .args([
            "hold",
            broker.socket.to_str().unwrap(),
            &STRANGER_UID.to_string(),
            "4",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "busy\n");
    // ...while another uid is still served, with those four held open.
    assert_serving(&broker);
    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());
}

#[test]
fn idle_connection_without_hello_is_closed() {
    let broker = Broker::start(CONFIG, &[]);
    let conn = RawConn::connect(&broker.socket);
    // The broker closes it after its Hello deadline (10 s); recv times out
    // after 15 s, so a broker that never closes fails here.
    assert!(conn.recv().is_none());
    assert_serving(&broker);
}

#[test]
fn connection_handed_to_another_process_is_unauthenticated() {
    let broker = Broker::start(CONFIG, &[]);
    let peer = env!("CARGO_BIN_EXE_kw-test-peer");
    for who in ["same".to_owned(), PRINCIPAL_UID.to_string()] {
        let ran = Ran::from(
            Command::new(peer)
                .arg("handoff")
                .arg(&broker.socket)
                .arg(&who)
                .output()
                .unwrap(),
        );
        assert_eq!(ran.code, Some(0), "{ran:?}");
        // The connecting process is served; the process it handed the
        // connection to is not, even with the same uid (or a principal's).
        assert_eq!(ran.stdout, "ok\nunauthenticated\n", "{who}: {ran:?}");
    }
    let records = broker.audit_records();
    assert!(
        records
            .iter()
            .any(|r| r["event"] == "refused" && r["reason"].as_str().unwrap().contains("differ")),
        "{records:?}"
    );
    assert_serving(&broker);
}
