// SPDX-License-Identifier: Apache-2.0
//! The broker process itself: it refuses credentials others could read,
//! and a process of its own uid cannot read its memory or environment.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use keyward_tests::{assert_no_secret, Broker, BrokerSetup, Ran, SECRET};

/// The broker runs as this unprivileged uid in these tests.
const BROKER_UID: u32 = 61100;

const CONFIG: &str = r#"
[broker]
socket = "{socket}"
socket_mode = "0666"
credentials_dir = "{dir}/creds"

[[principal]]
name = "tester"
uids = [0]
may_call = ["echo"]

[credential.api]
file = "api.token"

[[tool]]
name = "echo"
kind = "echo"
params.message = { type = "string", max_len = 100 }
"#;

#[test]
fn group_readable_credentials_directory_is_refused() {
    let mut broker = Broker::spawn(BrokerSetup {
        config: CONFIG,
        credentials: &[("api.token", SECRET)],
        credentials_mode: 0o750,
        ..BrokerSetup::default()
    });
    let status = broker.wait_exit();
    assert_eq!(status.code(), Some(1));
    let output = broker.audit();
    assert!(output.contains("creds"), "{output}");
    assert!(output.contains("0750"), "{output}");
    assert_no_secret("broker output", &output);
    assert!(!broker.socket.exists(), "socket bound despite refusal");
}

#[test]
fn same_uid_process_cannot_read_broker_memory_or_environment() {
    let broker = Broker::start_with(BrokerSetup {
        config: CONFIG,
        credentials: &[("api.token", SECRET)],
        run_as: Some(BROKER_UID),
        ..BrokerSetup::default()
    });
    let pid = broker.pid();
    for file in ["environ", "mem", "maps"] {
        let path = format!("/proc/{pid}/{file}");
        let ran = Ran::from(
            Command::new("head")
                .args(["-c", "64", &path])
                .uid(BROKER_UID)
                .gid(BROKER_UID)
                .output()
                .unwrap(),
        );
        assert_ne!(
            ran.code,
            Some(0),
            "{path} readable by uid {BROKER_UID}: {ran:?}"
        );
        assert!(ran.stderr.contains("Permission denied"), "{path}: {ran:?}");
    }
    // No core dump could carry the secret out either.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(
        core.split_whitespace().collect::<Vec<_>>()[4..6],
        ["0", "0"],
        "{core}"
    );
}

use std::os::unix::process::CommandExt as _;

#[test]
fn secret_pages_are_locked_and_left_out_of_core_dumps() {
    let broker = Broker::start_with(BrokerSetup {
        config: CONFIG,
        credentials: &[("api.token", SECRET)],
        run_as: Some(BROKER_UID),
        ..BrokerSetup::default()
    });
    // Read as root: the broker's own uid cannot (it is not dumpable).
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", broker.pid())).unwrap();
    // The VmFlags line of every mapping ("lo": mlocked, "dd": MADV_DONTDUMP).
    let flags: Vec<&str> = smaps
        .lines()
        .filter_map(|l| l.strip_prefix("VmFlags:"))
        .collect();
    assert!(!flags.is_empty(), "no VmFlags in smaps:\n{smaps}");
    assert!(
        flags
            .iter()
            .any(|f| f.split_whitespace().any(|x| x == "lo")
                && f.split_whitespace().any(|x| x == "dd")),
        "no mapping of the broker is both locked and excluded from core dumps: {flags:?}"
    );
}
