// SPDX-License-Identifier: Apache-2.0
//! `keyward-broker check`: accepts the shipped example and explains every
//! error of a broken configuration with its location.
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn check(config: &str) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keyward-broker"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn example_config_checks_out() {
    let (code, stdout, stderr) = check(keyward_broker::config::EXAMPLE);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("ok"), "{stdout}");
}

#[test]
fn every_error_is_reported_with_its_line() {
    let config = r#"[broker]
socket = "/tmp/x.sock"

[[principal]]
name = "p"
uids = [1000]
may_call = ["nope"]

[[tool]]
name = "t"
kind = "echo"
params.n = { type = "int", pattern = "x" }

[[tool]]
name = "u"
kind = "echo"
params.s = { type = "string", pattern = "(" }
"#;
    let (code, _, stderr) = check(config);
    assert_eq!(code, Some(1), "{stderr}");
    // Three distinct mistakes, each on the line that sets the key.
    assert!(stderr.contains(":7: principal \"p\": may_call"), "{stderr}");
    assert!(
        stderr.contains(":12: tool \"t\": params.n.pattern"),
        "{stderr}"
    );
    assert!(
        stderr.contains(":17: tool \"u\": params.s.pattern: invalid regex: unclosed group"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 4, "one line per error: {stderr}");
}

#[test]
fn syntax_error_is_located() {
    let (code, _, stderr) = check("[broker]\nsocket = \n");
    assert_eq!(code, Some(1));
    assert!(stderr.contains("line 2"), "{stderr}");
}

#[test]
fn missing_file_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_keyward-broker"))
        .args(["check", "--config", "/nonexistent/broker.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/broker.toml"));
}
