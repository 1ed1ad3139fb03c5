// SPDX-License-Identifier: Apache-2.0
//! The broker as systemd runs it: socket activation (and the strict checks
//! on what it inherits), the sd_notify lifecycle (`READY=1` only once it
//! serves, a watchdog fed while the accept loop runs, `STOPPING=1`), and
//! SIGHUP policy reloads that never replace a working policy with a broken
//! one.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;

use keyward_tests::{binary, shim_command, Broker, BrokerSetup, Ran, PRINCIPAL_UID};

const CONFIG: &str = r#"
[broker]
socket = "{socket}"
socket_mode = "0666"
credentials_dir = "{dir}/creds"

[[principal]]
name = "tester"
uids = [61000]
may_call = ["echo"]

[[tool]]
name = "echo"
kind = "echo"
params.message = { type = "string", max_len = 100 }
"#;

/// The same policy, except that the principal may call `shout` instead.
const RELOADED: &str = r#"
[broker]
socket = "{socket}"
socket_mode = "0666"

[[principal]]
name = "tester"
uids = [61000]
may_call = ["shout"]

[[tool]]
name = "echo"
kind = "echo"
params.message = { type = "string", max_len = 100 }

[[tool]]
name = "shout"
kind = "echo"
params.message = { type = "string", max_len = 100 }
"#;

fn call(socket: &std::path::Path, tool: &str) -> Ran {
    Ran::from(
        shim_command(socket, PRINCIPAL_UID, &["call", tool, "message=hi"])
            .output()
            .unwrap(),
    )
}

const LONG: Duration = Duration::from_secs(20);

#[test]
fn socket_activated_broker_serves_the_socket_it_is_handed() {
    let mut service = Broker::spawn(BrokerSetup {
        config: CONFIG,
        args: &["--audit", "stderr"],
        socket_activated: true,
        ..BrokerSetup::default()
    });
    let activated = service.activated.clone();
    // systemd-socket-activate binds first and starts the broker on the
    // first connection, as systemd does.
    let deadline = std::time::Instant::now() + LONG;
    while !activated.exists() {
        assert!(std::time::Instant::now() < deadline, "{}", service.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    // What SocketMode= does in the real unit.
    std::fs::set_permissions(&activated, std::fs::Permissions::from_mode(0o666)).unwrap();
    let ran = call(&activated, "echo");
    assert_eq!(ran.code, Some(0), "{ran:?}\n{}", service.stderr());
    assert_eq!(ran.stdout.trim(), r#"{"message":"hi"}"#, "{ran:?}");
    // It served the inherited socket and never bound the configured one.
    assert!(!service.socket.exists(), "the broker bound its own socket");
    // SIGTERM: it stops; the socket belongs to the activator, not to it.
    service.signal(Signal::SIGTERM);
    assert!(service.wait_exit().success(), "{}", service.stderr());
    let records = service.audit_records();
    assert!(
        records
            .iter()
            .any(|r| r["event"] == "call" && r["decision"] == "allow"),
        "{records:?}"
    );
}

/// Run the broker through `sh` so the test controls fd 3 and
/// `LISTEN_PID`/`LISTEN_FDS` exactly, as a confused or hostile launcher
/// could. Returns (exit code, stderr).
fn start_with_activation_env(script: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("broker.sock");
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        CONFIG.replace("{socket}", socket.to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .arg(binary("keyward-broker"))
        .arg(&config)
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    assert!(!socket.exists(), "bound its own socket instead of refusing");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn activation_variables_are_checked_strictly() {
    // For another process.
    let (code, err) = start_with_activation_env(
        r#"exec 3</dev/null; LISTEN_PID=1 LISTEN_FDS=1 exec "$1" serve --config "$2" --audit stderr"#,
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("LISTEN_PID=1 is not this process"), "{err}");
    // Two sockets where the broker serves exactly one.
    let (code, err) = start_with_activation_env(
        r#"exec 3</dev/null 4</dev/null; LISTEN_PID=$$ LISTEN_FDS=2 exec "$1" serve --config "$2" --audit stderr"#,
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("LISTEN_FDS=2: expected exactly one socket"),
        "{err}"
    );
    // fd 3 is not a listening SOCK_SEQPACKET socket.
    let (code, err) = start_with_activation_env(
        r#"exec 3</dev/null; LISTEN_PID=$$ LISTEN_FDS=1 exec "$1" serve --config "$2" --audit stderr"#,
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("socket activation"), "{err}");
}

#[test]
fn ready_only_once_serving_then_watchdog_status_and_stopping() {
    let mut service = Broker::spawn(BrokerSetup {
        config: CONFIG,
        args: &["--audit", "stderr"],
        notify: true,
        watchdog_usec: Some(200_000),
        ..BrokerSetup::default()
    });
    let before = service.notifications().until("READY=1", LONG);
    // Nothing but READY may come first: no watchdog ping before it.
    assert_eq!(before.len(), 1, "{before:?}");
    assert!(
        before[0].contains("STATUS=serving: 0 open sessions"),
        "{before:?}"
    );
    // READY=1 means the listener accepts now: the first try must succeed.
    let socket = service.socket.clone();
    agent_shim::client::Client::connect(&socket)
        .unwrap_or_else(|e| panic!("READY=1 sent before the socket served: {e}"));
    let ran = call(&socket, "echo");
    assert_eq!(ran.code, Some(0), "{ran:?}");

    // At half of a 200 ms interval: several pings come quickly; the
    // status follows the call that was made.
    let mut pings = 0;
    let mut statuses = Vec::new();
    while pings < 5 {
        let message = service
            .notifications()
            .next(LONG)
            .expect("the watchdog stopped");
        pings += message.lines().filter(|l| *l == "WATCHDOG=1").count();
        statuses.extend(
            message
                .lines()
                .filter_map(|l| l.strip_prefix("STATUS="))
                .map(str::to_owned),
        );
    }
    assert!(
        statuses
            .iter()
            .any(|s| s.contains("1 calls (1 allowed, 0 denied, 0 failed)")),
        "{statuses:?}"
    );

    service.signal(Signal::SIGTERM);
    service.notifications().until("STOPPING=1", LONG);
    assert!(service.wait_exit().success(), "{}", service.stderr());
}

#[test]
fn no_ready_when_startup_fails() {
    let mut service = Broker::spawn(BrokerSetup {
        config: &format!("{CONFIG}\n[credential.api]\nfile = \"missing.token\"\n"),
        args: &["--audit", "stderr"],
        notify: true,
        ..BrokerSetup::default()
    });
    let status = service.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", service.stderr());
    assert!(
        service.stderr().contains("missing.token"),
        "{}",
        service.stderr()
    );
    let mut got = Vec::new();
    while let Some(message) = service.notifications().next(Duration::from_millis(100)) {
        got.push(message);
    }
    assert!(
        !got.iter().any(|m| m.lines().any(|l| l == "READY=1")),
        "READY=1 from a broker that never served: {got:?}"
    );
}

#[test]
fn sighup_keeps_a_working_policy_over_a_broken_one_and_applies_a_good_one() {
    let service = Broker::spawn(BrokerSetup {
        config: CONFIG,
        args: &["--audit", "stderr"],
        notify: true,
        ..BrokerSetup::default()
    });
    service.notifications().until("READY=1", LONG);
    let socket = service.socket.clone();
    assert_eq!(call(&socket, "echo").code, Some(0));

    // A syntax error, then a policy naming an undefined tool: both are
    // reported with their line, and the old policy keeps serving.
    for broken in [
        "[broker\nsocket = 1\n".to_owned(),
        CONFIG.replace(r#"may_call = ["echo"]"#, r#"may_call = ["nope"]"#),
    ] {
        service.rewrite_config(&broken);
        service.signal(Signal::SIGHUP);
        let seen = service.notifications().until("READY=1", LONG);
        assert!(
            seen.iter()
                .any(|m| m.contains("RELOADING=1\nMONOTONIC_USEC=")),
            "{seen:?}"
        );
        let ran = call(&socket, "echo");
        assert_eq!(
            ran.code,
            Some(0),
            "old policy gone after a bad reload: {ran:?}"
        );
    }
    let failures: Vec<_> = service
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == "reload" && r["decision"] == "error")
        .collect();
    assert_eq!(failures.len(), 2, "{failures:?}");
    let reason = failures[1]["reason"].as_str().unwrap();
    assert!(reason.contains("nope"), "the reason says why: {reason}");
    assert!(
        reason.contains("broker.toml:10:"),
        "the reason has the line: {reason}"
    );
    assert!(
        service
            .stderr()
            .contains("reload failed, keeping the old policy"),
        "{}",
        service.stderr()
    );

    // A policy that needs a credential the broker did not load at start.
    service.rewrite_config(&format!(
        "{CONFIG}\n[credential.api]\nfile = \"api.token\"\n\n\
         [[tool]]\nname = \"web\"\nkind = \"http\"\ncredential = \"api\"\n\
         method = \"GET\"\nurl = \"http://127.0.0.1:9/\"\nauth = {{ bearer = true }}\n"
    ));
    service.signal(Signal::SIGHUP);
    service.notifications().until("READY=1", LONG);
    assert_eq!(call(&socket, "echo").code, Some(0));
    assert!(
        service.stderr().contains("was not loaded at start"),
        "{}",
        service.stderr()
    );

    // A good policy applies to the very next call.
    service.rewrite_config(RELOADED);
    service.signal(Signal::SIGHUP);
    service.notifications().until("READY=1", LONG);
    let ran = call(&socket, "echo");
    assert_eq!(ran.code, Some(3), "old rule still applies: {ran:?}");
    assert!(ran.stderr.contains("may not call tool \"echo\""), "{ran:?}");
    let ran = call(&socket, "shout");
    assert_eq!(ran.code, Some(0), "new rule not applied: {ran:?}");
    assert!(
        service
            .audit_records()
            .iter()
            .any(|r| r["event"] == "reload" && r["decision"] == "info"),
        "{}",
        service.stderr()
    );
}
