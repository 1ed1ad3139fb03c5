// SPDX-License-Identifier: Apache-2.0
//! `kind = "oauth2"` credentials against a real authorization server:
//! authlib's token endpoint (RefreshTokenGrant, ClientCredentialsGrant,
//! client_secret_basic/post) and a resource server that checks each
//! bearer with authlib's ResourceProtector, both in `tests/oauth/server.py`
//! on loopback, run from the venv of `.ci/requirements.txt`.
//!
//! | test | what it shows |
//! | --- | --- |
//! | `refresh_gives_a_working_token_and_hides_every_value` | a call gets a refreshed token; no token or secret in any output or audit record |
//! | `rotation_is_recorded_and_survives_a_restart` | the rotated refresh token is in `state/oauth2-gmail.json` (0600) and a restarted broker uses it |
//! | `a_token_expiring_mid_session_is_refreshed_before_use` | short lifetime: refreshed before expiry, no 401 |
//! | `fifty_concurrent_calls_cause_one_refresh` | single-flight |
//! | `invalid_grant_breaks_the_credential_without_a_retry_storm` | one attempt, a clear error for every call, an audit record; a new refresh token and SIGHUP repair it |
//! | `no_new_refresh_token_keeps_the_old_one` | rotation off: later refreshes use the configured token |
//! | `a_401_refreshes_once_and_retries_once` | a revoked access token: one refresh, one retry, success |
//! | `a_hostile_resource_server_gets_nothing_back` | echo of the token: redacted; a fragment or hex of it: withheld |
//! | `client_credentials_with_post_auth` | the other grant and client authentication |
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keyward_tests::{leaked_forms, shim_command, test_venv, Broker, Ran, PRINCIPAL_UID};
use serde_json::{json, Value};

/// The authorization and resource servers (`tests/oauth/server.py`).
struct AuthServer {
    child: Child,
    auth_port: u16,
    resource_port: u16,
    client_secret: String,
    refresh_token: String,
}

impl AuthServer {
    fn start() -> Option<AuthServer> {
        let venv = test_venv()?;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/oauth/server.py");
        let mut child = Command::new(venv.join("bin/python"))
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let hello: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("server.py did not start ({e}): {line:?}"));
        Some(AuthServer {
            child,
            auth_port: hello["auth_port"].as_u64().unwrap() as u16,
            resource_port: hello["resource_port"].as_u64().unwrap() as u16,
            client_secret: hello["client_secret"].as_str().unwrap().to_owned(),
            refresh_token: hello["refresh_token"].as_str().unwrap().to_owned(),
        })
    }

    /// One request to the control endpoints, its JSON answer.
    fn control(&self, method: &str, path: &str, body: &Value) -> Value {
        let body = body.to_string();
        let mut stream = TcpStream::connect(("127.0.0.1", self.auth_port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).unwrap();
        // Read up to the end of the body Content-Length announces.
        let mut response = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let text = String::from_utf8_lossy(&response).into_owned();
            if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(usize::MAX);
                if rest.len() >= length {
                    return serde_json::from_str(&rest[..length]).unwrap();
                }
            }
            let n = stream.read(&mut chunk).unwrap();
            assert!(n > 0, "control {path}: connection closed early: {text}");
            response.extend_from_slice(&chunk[..n]);
        }
    }

    fn stats(&self) -> Value {
        self.control("GET", "/control/stats", &json!({}))
    }

    fn settings(&self, settings: Value) {
        self.control("POST", "/control/settings", &settings);
    }

    fn count(&self, what: &str) -> u64 {
        self.stats()[what].as_u64().unwrap()
    }

    /// Every token the server ever issued, and the client secret.
    fn every_secret(&self) -> Vec<String> {
        let stats = self.stats();
        let mut all = vec![self.client_secret.clone(), self.refresh_token.clone()];
        for key in ["access_tokens", "refresh_tokens"] {
            for token in stats[key].as_array().unwrap() {
                all.push(token.as_str().unwrap().to_owned());
            }
        }
        all
    }

    fn latest_refresh_token(&self) -> String {
        let stats = self.stats();
        let tokens = stats["refresh_tokens"].as_array().unwrap();
        tokens.last().unwrap().as_str().unwrap().to_owned()
    }
}

impl Drop for AuthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const TOOLS: &[(&str, &str)] = &[
    ("me", "me"),
    ("echo_token", "echo"),
    ("fragment", "fragment"),
    ("hex", "hex"),
];

fn config(server: &AuthServer, extra: &str) -> String {
    let mut tools = String::new();
    for (name, route) in TOOLS {
        tools.push_str(&format!(
            "[[tool]]\nname = \"{name}\"\nkind = \"http\"\ncredential = \"gmail\"\n\
             method = \"GET\"\nurl = \"http://127.0.0.1:{}/api/{route}\"\n\
             auth = {{ bearer = true }}\n\n",
            server.resource_port
        ));
    }
    format!(
        r#"
[broker]
socket = "{{socket}}"
socket_mode = "0666"
credentials_dir = "{{dir}}/creds"
state_dir = "{{dir}}/state"
call_timeout = "10s"
requests_per_second = 1000
request_burst = 1000
max_connections_per_uid = 500

[[principal]]
name = "orchestrator"
uids = [{PRINCIPAL_UID}]
may_call = ["me", "echo_token", "fragment", "hex"]

[credential.gmail]
kind = "oauth2"
token_url = "http://127.0.0.1:{port}/oauth/token"
client_id = "keyward-test-client"
client_secret_file = "gmail.client_secret"
{extra}

{tools}"#,
        port = server.auth_port,
    )
}

const REFRESH_GRANT: &str =
    "refresh_token_file = \"gmail.refresh_token\"\nscopes = [\"mail.send\"]";

/// The servers and a broker whose `gmail` credential uses them.
struct Fixture {
    server: AuthServer,
    broker: Broker,
}

fn fixture(extra: &str) -> Option<Fixture> {
    let server = AuthServer::start()?;
    let secret = format!("{}\n", server.client_secret);
    let refresh = format!("{}\n", server.refresh_token);
    let broker = Broker::start(
        &config(&server, extra),
        &[
            ("gmail.client_secret", &secret),
            ("gmail.refresh_token", &refresh),
        ],
    );
    Some(Fixture { server, broker })
}

impl Fixture {
    fn call(&self, tool: &str) -> Ran {
        self.broker.call(PRINCIPAL_UID, &[tool])
    }

    fn call_ok(&self, tool: &str) -> Value {
        let ran = self.call(tool);
        assert_eq!(ran.code, Some(0), "{ran:?}\n{}", self.broker.audit());
        serde_json::from_str(&ran.stdout).unwrap_or_else(|_| json!(ran.stdout))
    }

    /// No form of any token or of the client secret in what the caller
    /// saw, in the broker's output (its audit records) or in `more`.
    fn assert_clean(&self, ran: &[&Ran], more: &[&str]) {
        let audit = self.broker.audit();
        let mut texts: Vec<(&str, &str)> = vec![("audit", &audit)];
        for ran in ran {
            texts.push(("stdout", &ran.stdout));
            texts.push(("stderr", &ran.stderr));
        }
        for text in more {
            texts.push(("other", text));
        }
        for secret in self.server.every_secret() {
            for form in leaked_forms(&secret) {
                for (what, text) in &texts {
                    assert!(!text.contains(&form), "{what} holds {form:?}:\n{text}");
                }
            }
        }
    }

    fn state_file(&self) -> std::path::PathBuf {
        self.broker.dir.path().join("state/oauth2-gmail.json")
    }
}

#[test]
fn refresh_gives_a_working_token_and_hides_every_value() {
    let Some(f) = fixture(REFRESH_GRANT) else {
        return;
    };
    let body = f.call_ok("me");
    assert_eq!(body["ok"], true, "{body}");
    assert_eq!(body["scope"], "mail.send", "{body}");
    let first = f.call("me");
    assert_eq!(first.code, Some(0), "{first:?}");
    assert_eq!(f.server.count("refreshed"), 1);
    assert_eq!(f.server.count("resource_401"), 0);
    let stats = f.server.stats();
    assert_eq!(
        stats["refresh_tokens_used"][0], f.server.refresh_token,
        "{stats}"
    );
    f.assert_clean(&[&first], &[]);
}

#[test]
fn rotation_is_recorded_and_survives_a_restart() {
    let Some(f) = fixture(REFRESH_GRANT) else {
        return;
    };
    f.call_ok("me");
    let rotated = f.server.latest_refresh_token();
    assert_ne!(rotated, f.server.refresh_token);
    let path = f.state_file();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let stored: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(stored["refresh_token"], rotated.as_str());
    // The original token is revoked by the rotation: a broker that read
    // refresh_token_file again would be refused.
    let Fixture { server, broker } = f;
    let broker = broker.kill9_and_restart();
    let f = Fixture { server, broker };
    f.call_ok("me");
    let stats = f.server.stats();
    let used = stats["refresh_tokens_used"].as_array().unwrap();
    assert_eq!(used.len(), 2, "{stats}");
    assert_eq!(used[1], rotated.as_str(), "{stats}");
    assert_eq!(f.server.count("rejected"), 0);
    let stored: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(stored["refresh_token"], f.server.latest_refresh_token());
    // The state file's own content never shows in any output.
    f.assert_clean(&[], &[]);
}

#[test]
fn a_token_expiring_mid_session_is_refreshed_before_use() {
    let Some(f) = fixture(REFRESH_GRANT) else {
        return;
    };
    f.server.settings(json!({"lifetime": 4}));
    f.call_ok("me");
    f.call_ok("me");
    assert_eq!(f.server.count("refreshed"), 1);
    // Refreshed a quarter of the lifetime (1 s) before the expiry.
    for round in 2..=3 {
        std::thread::sleep(Duration::from_millis(3200));
        f.call_ok("me");
        assert_eq!(f.server.count("refreshed"), round);
    }
    assert_eq!(
        f.server.count("resource_401"),
        0,
        "an expired token was used"
    );
}

#[test]
fn fifty_concurrent_calls_cause_one_refresh() {
    let Some(f) = fixture(REFRESH_GRANT) else {
        return;
    };
    // A slow token endpoint, so that every call arrives while the one
    // refresh is in flight.
    f.server.settings(json!({"delay": 1.0}));
    let socket = f.broker.socket.clone();
    let runs: Vec<Ran> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..50)
            .map(|_| {
                let socket = &socket;
                scope.spawn(move || {
                    Ran::from(
                        shim_command(socket, PRINCIPAL_UID, &["call", "me"])
                            .output()
                            .unwrap(),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ran in &runs {
        assert_eq!(ran.code, Some(0), "{ran:?}");
    }
    assert_eq!(f.server.count("token_requests"), 1);
    assert_eq!(f.server.count("resource_ok"), 50);
    f.assert_clean(&runs.iter().collect::<Vec<_>>(), &[]);
}

#[test]
fn invalid_grant_breaks_the_credential_without_a_retry_storm() {
    let Some(f) = fixture(REFRESH_GRANT) else {
        return;
    };
    f.server.settings(json!({"reject_next": true}));
    let expected = "credential gmail is broken: the authorization server rejected the refresh \
                    token (invalid_grant); re-authorize and reload";
    let mut runs = Vec::new();
    for _ in 0..5 {
        let ran = f.call("me");
        assert_ne!(ran.code, Some(0), "{ran:?}");
        assert!(ran.stderr.contains(expected), "{ran:?}");
        runs.push(ran);
    }
    // Past RETRY_AFTER: still no new attempt.
    std::thread::sleep(Duration::from_millis(2200));
    let ran = f.call("me");
    assert!(ran.stderr.contains(expected), "{ran:?}");
    runs.push(ran);
    assert_eq!(f.server.count("token_requests"), 1);
    assert_eq!(f.server.count("rejected"), 1);
    assert_eq!(
        f.server.count("resource_ok") + f.server.count("resource_401"),
        0
    );
    let records = f.broker.audit_records();
    let failed: Vec<&Value> = records
        .iter()
        .filter(|r| r["event"] == "call_failed" && r["tool"] == "me")
        .collect();
    assert_eq!(failed.len(), 6, "{records:?}");
    for record in failed {
        assert_eq!(record["reason"], expected, "{record}");
    }
    assert_eq!(
        f.broker
            .audit()
            .matches("keyward-broker: credential gmail is broken")
            .count(),
        1
    );
    f.assert_clean(&runs.iter().collect::<Vec<_>>(), &[]);
    // `keyward-broker status` (as root, an admin) names the state, never a
    // value.
    let status = Ran::from(
        Command::new(keyward_tests::binary("keyward-broker"))
            .args(["status", "--config"])
            .arg(&f.broker.config_path)
            .output()
            .unwrap(),
    );
    assert_eq!(status.code, Some(0), "{status:?}");
    assert!(
        status.stdout.contains("broken: ") && status.stdout.contains("invalid_grant"),
        "{status:?}"
    );
    f.assert_clean(&[&status], &[]);

    // Re-authorize: a new refresh token in the file, then SIGHUP.
    let issued = f.server.control("POST", "/control/issue", &json!({}));
    let fresh = issued["refresh_token"].as_str().unwrap();
    let file = f.broker.dir.path().join("creds/gmail.refresh_token");
    std::fs::write(&file, format!("{fresh}\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    f.broker.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !f
        .broker
        .audit()
        .contains("credential gmail re-authorized from")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no reload record:\n{}",
            f.broker.audit()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let body = f.call_ok("me");
    assert_eq!(body["ok"], true, "{body}");
    let stats = f.server.stats();
    let used = stats["refresh_tokens_used"].as_array().unwrap();
    assert_eq!(used.last().unwrap(), fresh, "{stats}");
    f.assert_clean(&[], &[]);
}

#[test]
fn no_new_refresh_token_keeps_the_old_one() {
    let Some(f) = fixture(REFRESH_GRANT) else {
        return;
    };
    f.server.settings(json!({"rotate": false, "lifetime": 1}));
    f.call_ok("me");
    std::thread::sleep(Duration::from_millis(1100));
    f.call_ok("me");
    std::thread::sleep(Duration::from_millis(1100));
    f.call_ok("me");
    let stats = f.server.stats();
    assert_eq!(stats["refreshed"], 3, "{stats}");
    for used in stats["refresh_tokens_used"].as_array().unwrap() {
        assert_eq!(used, f.server.refresh_token.as_str(), "{stats}");
    }
    assert!(
        !f.state_file().exists(),
        "nothing rotated, nothing recorded"
    );
}

#[test]
fn a_401_refreshes_once_and_retries_once() {
    let Some(f) = fixture(REFRESH_GRANT) else {
        return;
    };
    f.call_ok("me");
    assert_eq!(f.server.count("refreshed"), 1);
    f.server
        .control("POST", "/control/revoke-access", &json!({}));
    // A token is blamed for a 401 only once it is a second old.
    std::thread::sleep(Duration::from_millis(1100));
    let ran = f.call("me");
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert_eq!(f.server.count("refreshed"), 2);
    assert_eq!(f.server.count("resource_401"), 1);
    assert_eq!(f.server.count("resource_ok"), 2);
    // A resource server that refuses every token: one refresh, one retry,
    // then the upstream's 401 is the caller's answer.
    std::thread::sleep(Duration::from_millis(1100));
    f.server.settings(json!({"refuse_all": true}));
    let ran = f.call("me");
    assert_eq!(f.server.count("refreshed"), 3, "{ran:?}");
    assert_eq!(f.server.count("resource_401"), 3, "{ran:?}");
    // Again: at most one refresh per call (none while the token is under
    // a second old), never a loop.
    let again = f.call("me");
    let extra = f.server.count("refreshed") - 3;
    assert!(extra <= 1, "{again:?}");
    assert_eq!(f.server.count("resource_401"), 4 + extra, "{again:?}");
    f.assert_clean(&[&ran, &again], &[]);
}

#[test]
fn a_hostile_resource_server_gets_nothing_back() {
    let Some(f) = fixture(REFRESH_GRANT) else {
        return;
    };
    // The whole token echoed: redacted, the rest returned.
    let ran = f.call("echo_token");
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let body: Value = serde_json::from_str(&ran.stdout).unwrap();
    assert_eq!(body["authorization"], "Bearer [REDACTED]", "{ran:?}");
    let mut runs = vec![ran];
    // A fragment, or hex: the whole response withheld.
    for tool in ["fragment", "hex"] {
        let ran = f.call(tool);
        assert_ne!(ran.code, Some(0), "{tool}: {ran:?}");
        assert!(ran.stdout.is_empty(), "{tool}: {ran:?}");
        assert!(
            ran.stderr
                .contains("withheld: the response contains credential material"),
            "{tool}: {ran:?}"
        );
        runs.push(ran);
    }
    assert_eq!(f.server.count("resource_ok"), 3);
    f.assert_clean(&runs.iter().collect::<Vec<_>>(), &[]);
    // Fragments of what was withheld are in no output either.
    let access = f.server.stats()["access_tokens"][0]
        .as_str()
        .unwrap()
        .to_owned();
    for ran in &runs {
        for text in [&ran.stdout, &ran.stderr] {
            assert!(!text.contains(&access[..access.len() - 3]), "{ran:?}");
        }
    }
}

#[test]
fn client_credentials_with_post_auth() {
    let Some(f) = fixture("grant = \"client_credentials\"\nclient_auth = \"post\"") else {
        return;
    };
    let body = f.call_ok("me");
    assert_eq!(body["ok"], true, "{body}");
    assert_eq!(f.server.count("client_credentials"), 1);
    assert_eq!(f.server.count("refresh_attempts"), 0);
    f.call_ok("me");
    assert_eq!(f.server.count("token_requests"), 1);
}
