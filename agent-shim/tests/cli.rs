// SPDX-License-Identifier: Apache-2.0
//! `agent-shim` exit statuses without a broker: usage errors and an
//! unreachable socket are status 1 with a message; `--help` is status 0.
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn shim(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_agent-shim"))
        .args(args)
        .env("KEYWARD_SOCKET", "/nonexistent/keyward.sock")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_succeeds() {
    assert_eq!(shim(&["--help"]).0, Some(0));
    assert_eq!(shim(&["call", "--help"]).0, Some(0));
}

#[test]
fn unreachable_broker_is_error_1() {
    let (code, stderr) = shim(&["call", "echo", "message=hi"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("/nonexistent/keyward.sock"), "{stderr}");
}

#[test]
fn malformed_parameter_is_error_1() {
    let (code, stderr) = shim(&["call", "echo", "message"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("NAME=VALUE"), "{stderr}");
}
