// SPDX-License-Identifier: Apache-2.0
//! A gateway stream and a program that pauses reading it: the broker waits
//! for the program as long as it waits for the upstream (the gateway's
//! `idle_timeout`), not the 10 s any other reply gets. An agent that stops
//! reading a model's stream for a while (it is busy with what came so far)
//! keeps it; one that stops for longer than `idle_timeout` loses it, and
//! the outcome record says why.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use agent_shim::client::Client;
use keyward_proto::{GatewayRequest, Request, Response};
use keyward_tests::upstream::{Upstream, HUGE};
use keyward_tests::{Broker, SECRET};

/// Root (the test) may use the gateway directly; `{idle}` is its
/// `idle_timeout`.
fn config(port: u16, idle: &str) -> String {
    format!(
        r#"
[broker]
socket = "{{socket}}"
socket_mode = "0666"
credentials_dir = "{{dir}}/creds"

[[principal]]
name = "root"
uids = [0]
may_call = ["files"]

[credential.key]
file = "key"

[[gateway]]
name = "files"
upstream = "http://127.0.0.1:{port}"
credential = "key"
auth = {{ bearer = true }}
allow = [ {{ method = "GET", path = "/huge" }} ]
idle_timeout = "{idle}"
"#
    )
}

/// Ask for `/huge`, read the head, pause `pause`, then read the rest:
/// the bytes that came and whether the stream ended whole.
fn read_with_a_pause(broker: &Broker, pause: Duration) -> (usize, bool) {
    let mut client = Client::connect(&broker.socket).unwrap();
    client
        .send(&Request::Gateway(GatewayRequest {
            gateway: "files".into(),
            method: "GET".into(),
            path: "/huge".into(),
            headers: vec![],
            body_len: 0,
            body: vec![],
        }))
        .unwrap();
    match client.recv_response().unwrap() {
        Response::GatewayHead(head) => assert_eq!(head.status, 200),
        other => panic!("{other:?}"),
    }
    // The broker fills every buffer between it and us meanwhile, then
    // waits for us.
    std::thread::sleep(pause);
    let mut bytes = 0;
    loop {
        match client.recv_response() {
            Ok(Response::GatewayChunk(chunk)) => bytes += chunk.data.len(),
            Ok(Response::GatewayEnd(end)) => {
                assert_eq!(end.bytes as usize, bytes);
                return (bytes, true);
            }
            // An error, or the connection closed under us.
            _ => return (bytes, false),
        }
    }
}

fn outcome_reason(broker: &Broker) -> String {
    let records = broker.audit_records();
    let outcome = records
        .iter()
        .rev()
        .find(|r| r["event"] == "outcome" && r["tool"] == "files")
        .unwrap_or_else(|| panic!("no outcome: {records:?}"));
    outcome["reason"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn a_reader_pausing_within_idle_timeout_keeps_its_stream() {
    let upstream = Upstream::start();
    let broker = Broker::start(&config(upstream.port, "20s"), &[("key", SECRET)]);
    // Longer than the 10 s any other reply must be taken within.
    let (bytes, whole) = read_with_a_pause(&broker, Duration::from_secs(12));
    assert!(whole, "the stream was dropped after {bytes} bytes");
    assert_eq!(bytes, HUGE);
    assert_eq!(outcome_reason(&broker), "");
}

#[test]
fn a_reader_pausing_past_idle_timeout_loses_it_and_the_record_says_why() {
    let upstream = Upstream::start();
    let broker = Broker::start(&config(upstream.port, "1s"), &[("key", SECRET)]);
    let (bytes, whole) = read_with_a_pause(&broker, Duration::from_secs(4));
    assert!(!whole, "the whole stream came ({bytes} bytes)");
    assert!(bytes < HUGE, "{bytes}");
    let reason = outcome_reason(&broker);
    assert!(reason.contains("did not read it for 1s"), "{reason}");
}
