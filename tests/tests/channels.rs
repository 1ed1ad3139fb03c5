// SPDX-License-Identifier: Apache-2.0
//! Channels of a bound session: several processes in one sandbox call the
//! broker at once, each over a channel of its own passed over fd 3, and
//! each gets its own reply; a session's channels are capped.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use keyward_tests::{binary, Broker, Ran, PRINCIPAL_UID};

const CONFIG: &str = r#"
[broker]
socket = "{socket}"
socket_mode = "0666"
state_dir = "{dir}/state"

[[principal]]
name = "orchestrator"
uids = [61000]
may_call = ["echo"]
may_delegate = ["echo"]

[[tool]]
name = "echo"
kind = "echo"
params.message = { type = "string", max_len = 100 }
"#;

/// A broker and a token for the orchestrator's own sandbox, in a file it
/// alone can read.
fn setup() -> (Broker, std::path::PathBuf) {
    let broker = Broker::start(CONFIG, &[]);
    let ran = Ran::from(broker.shim(PRINCIPAL_UID, &["mint", "--tool", "echo"]));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let file = broker.dir.path().join("token");
    std::fs::write(&file, ran.stdout.trim()).unwrap();
    std::os::unix::fs::chown(&file, Some(PRINCIPAL_UID), Some(PRINCIPAL_UID)).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    (broker, file)
}

/// `agent-shim run --token-file F -- ARGS` as the orchestrator.
fn run_sandboxed(broker: &Broker, token_file: &std::path::Path, args: &[&str]) -> Ran {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(binary("agent-shim"));
    cmd.arg("run")
        .arg("--token-file")
        .arg(token_file)
        .arg("--allow-exec")
        .arg(binary("agent-shim"))
        .arg("--allow-exec")
        .arg(binary("kw-test-peer"))
        .arg("--")
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("KEYWARD_SOCKET", &broker.socket)
        .uid(PRINCIPAL_UID)
        .gid(PRINCIPAL_UID);
    Ran::from(cmd.output().unwrap())
}

#[test]
fn concurrent_calls_in_one_sandbox_each_get_their_own_reply() {
    let (broker, token) = setup();
    let shim = binary("agent-shim");
    let script = format!(
        "for i in $(seq 1 16); do \
           (r=$({} call echo message=m$i) && echo \"$i $r\") & \
         done; wait",
        shim.display()
    );
    let ran = run_sandboxed(&broker, &token, &["/bin/sh", "-c", &script]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let mut seen = 0;
    for line in ran.stdout.lines() {
        let (i, reply) = line.split_once(' ').unwrap();
        assert_eq!(reply, format!(r#"{{"message":"m{i}"}}"#), "{ran:?}");
        seen += 1;
    }
    assert_eq!(seen, 16, "{ran:?}");
    // Each call came through a channel of the bound session: audited under
    // the token, from the sandboxed processes' own pids.
    let records = broker.audit_records();
    let calls: Vec<_> = records
        .iter()
        .filter(|r| r["event"] == "call" && r["decision"] == "allow")
        .collect();
    assert_eq!(calls.len(), 16, "{records:?}");
    assert!(calls.iter().all(|r| r["token_id"].is_string()));
}

#[test]
fn a_session_cannot_open_unbounded_channels() {
    let (broker, token) = setup();
    let ran = run_sandboxed(
        &broker,
        &token,
        &[binary("kw-test-peer").to_str().unwrap(), "channels", "24"],
    );
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert_eq!(ran.stdout.trim(), "16", "{ran:?}");
    let records = broker.audit_records();
    assert!(
        records.iter().any(|r| r["reason"]
            .as_str()
            .is_some_and(|s| s.contains("already has 16 channels"))),
        "{records:?}"
    );
}
