// SPDX-License-Identifier: Apache-2.0
//! `agent-shim run --gateway`: the official `openai` and `anthropic`
//! Python SDKs, unmodified, reach a loopback stand-in for their APIs
//! (`keyward_tests::llm`) through the broker's gateways, with a
//! placeholder for a key. The upstream receives the real key; the program
//! gets answers and streams (the first event before the upstream produced
//! the last); the key is nowhere the program can look (environment,
//! `/proc`, the memory of every process it can read) nor in its output or
//! the audit. A path outside `allow`, a dot segment, a third request on a
//! two-use token, a key leaked mid-stream, every other network
//! destination, and `--gateway` without namespaces are all refused.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use keyward_tests::llm::Llm;
use keyward_tests::{
    assert_no_secret, leaked_forms, shim_command, venv_python, Broker, Ran, VenvPython,
    PRINCIPAL_UID, SECRET,
};

const PLACEHOLDER: &str = "keyward-gateway-placeholder-not-a-secret";

fn config(port: u16) -> String {
    format!(
        r#"
[broker]
socket = "{{socket}}"
socket_mode = "0666"
credentials_dir = "{{dir}}/creds"
state_dir = "{{dir}}/state"

[[principal]]
name = "orchestrator"
uids = [{PRINCIPAL_UID}]
may_delegate = ["openai", "anthropic"]

[credential.llm]
file = "llm.key"

[[gateway]]
name = "openai"
upstream = "http://127.0.0.1:{port}"
credential = "llm"
auth = {{ bearer = true }}
allow = [ {{ method = "POST", path = "/v1/chat/completions" }},
          {{ method = "POST", path = "/v1/completions" }} ]
max_request_bytes = 1048576
base_url_env = ["OPENAI_BASE_URL"]
base_path = "/v1"
api_key_env = ["OPENAI_API_KEY"]

[[gateway]]
name = "anthropic"
upstream = "http://127.0.0.1:{port}"
credential = "llm"
auth = {{ header = "x-api-key" }}
allow = [ {{ method = "POST", path = "/v1/messages" }} ]
base_url_env = ["ANTHROPIC_BASE_URL"]
api_key_env = ["ANTHROPIC_API_KEY"]
"#
    )
}

/// A broker with the two gateways, the stand-in upstream, and a work
/// directory the program may write (its markers and memory dump).
struct Fixture {
    broker: Broker,
    llm: Llm,
    work: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let work = tempfile::Builder::new()
            .prefix("kw-gateway-")
            .tempdir()
            .unwrap();
        std::os::unix::fs::chown(work.path(), Some(PRINCIPAL_UID), Some(PRINCIPAL_UID)).unwrap();
        let llm = Llm::start(Some(work.path().to_owned()), SECRET);
        let broker = Broker::start(&config(llm.port), &[("llm.key", SECRET)]);
        Fixture { broker, llm, work }
    }

    fn mint(&self, args: &[&str]) -> String {
        let mut full = vec!["mint", "--task", "gateway test"];
        full.extend_from_slice(args);
        let ran = Ran::from(self.broker.shim(PRINCIPAL_UID, &full));
        assert_eq!(ran.code, Some(0), "{ran:?}");
        ran.stdout.lines().next().unwrap().to_owned()
    }

    /// `agent-shim run --gateway openai --gateway anthropic ARGS -- CMD`
    /// with `token`, as the test uid.
    fn run(&self, token: &str, extra: &[&str], cmd: &[&str], env: &[(&str, &str)]) -> Ran {
        let work = self.work.path().display().to_string();
        let scripts = scripts().display().to_string();
        let mut args = vec![
            "run",
            "--gateway",
            "openai",
            "--gateway",
            "anthropic",
            "--allow-write",
            &work,
            "--allow-read",
            &scripts,
        ];
        args.extend_from_slice(extra);
        args.push("--");
        args.extend_from_slice(cmd);
        let mut command = shim_command(&self.broker.socket, PRINCIPAL_UID, &args);
        command
            .env_clear()
            .env("KEYWARD_SOCKET", &self.broker.socket)
            .env("KEYWARD_TOKEN", token)
            .env("PATH", "/usr/bin:/bin");
        for (k, v) in env {
            command.env(k, v);
        }
        Ran::from(command.output().unwrap())
    }
}

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway")
}

/// How to run the SDKs as the test uid (`None`: no venv, skipped loudly
/// outside CI).
type Python = VenvPython;

fn python() -> Option<Python> {
    venv_python("import openai, anthropic", PRINCIPAL_UID)
}

trait RunPython {
    fn run(&self, fx: &Fixture, token: &str, script: &str, args: &[&str]) -> Ran;
    fn sdk(&self, fx: &Fixture, token: &str, mode: &str) -> (Ran, Value);
}

impl RunPython for Python {
    fn run(&self, fx: &Fixture, token: &str, script: &str, args: &[&str]) -> Ran {
        let venv = self.venv.display().to_string();
        let exe = self.exe.display().to_string();
        let script = scripts().join(script).display().to_string();
        let mut cmd = vec![exe.as_str(), script.as_str()];
        cmd.extend_from_slice(args);
        // The SDKs look for configuration under $HOME.
        let home = fx.work.path().display().to_string();
        let mut extra = vec!["--allow-read", venv.as_str(), "--keep-env", "HOME"];
        let mut env = vec![("HOME", home.as_str())];
        if let Some(path) = &self.pythonpath {
            extra.extend(["--keep-env", "PYTHONPATH"]);
            env.push(("PYTHONPATH", path.as_str()));
        }
        fx.run(token, &extra, &cmd, &env)
    }

    fn sdk(&self, fx: &Fixture, token: &str, mode: &str) -> (Ran, Value) {
        let work = fx.work.path().display().to_string();
        let ran = self.run(fx, token, "sdk.py", &[mode, &work]);
        assert_eq!(ran.code, Some(0), "{ran:?}");
        let report: Value = serde_json::from_str(ran.stdout.trim()).unwrap();
        (ran, report)
    }
}

/// The key in none of the program's output, environment, readable
/// `/proc` files, dumped memory, nor the audit.
fn assert_key_unreachable(fx: &Fixture, ran: &Ran, report: &Value) {
    assert_no_secret("the program's stdout", &ran.stdout);
    assert_no_secret("the program's stderr", &ran.stderr);
    assert_no_secret("the audit", &fx.broker.audit());
    let memory = std::fs::read(fx.work.path().join("memory")).unwrap();
    assert!(memory.len() > 1 << 20, "too little memory dumped");
    // (The standard library's substring search: fast in a debug build.)
    let memory = String::from_utf8_lossy(&memory);
    for form in leaked_forms(SECRET) {
        assert!(
            !memory.contains(&form),
            "the memory the program can read holds the key (as {form:?})"
        );
    }
    // The program saw its own memory (the check is not vacuous).
    assert!(
        report["reachable"]["/proc/self/mem"]
            .as_str()
            .unwrap()
            .starts_with("dumped"),
        "{report}"
    );
}

/// Each allowed request: one `call` decision and one `outcome` record with
/// the same call_id; returns the outcomes.
fn outcomes(fx: &Fixture, gateway: &str) -> Vec<Value> {
    let records = fx.broker.audit_records();
    let calls: Vec<&Value> = records
        .iter()
        .filter(|r| r["event"] == "call" && r["decision"] == "allow" && r["tool"] == gateway)
        .collect();
    let outcomes: Vec<Value> = records
        .iter()
        .filter(|r| r["event"] == "outcome" && r["tool"] == gateway)
        .cloned()
        .collect();
    assert_eq!(calls.len(), outcomes.len(), "{records:#?}");
    for call in calls {
        let id = call["call_id"].as_str().unwrap();
        assert_eq!(
            outcomes.iter().filter(|o| o["call_id"] == id).count(),
            1,
            "{records:#?}"
        );
    }
    outcomes
}

#[test]
fn the_openai_sdk_reaches_its_model_and_never_the_key() {
    let Some(python) = python() else { return };
    let fx = Fixture::new();
    let token = fx.mint(&["--tool", "openai", "--tool", "anthropic", "--uses", "20"]);
    let (ran, report) = python.sdk(&fx, &token, "openai");

    assert_eq!(report["chat"], "hello from the model", "{report}");
    assert_eq!(
        report["stream"],
        serde_json::json!(["one ", "two ", "three"]),
        "{report}"
    );
    // The first event reached the program before the upstream produced
    // the last: the upstream waited for the program's marker.
    assert_eq!(
        fx.llm.first_before_last(),
        vec![("openai".to_owned(), true)]
    );
    // A path outside `allow`, and one with a dot segment, are refused
    // and never reach the upstream: the dot segment by the exact match
    // against the allowed paths (none of which can hold one), before the
    // URL is ever built.
    let models = report["models"].as_str().unwrap();
    assert!(
        models.contains("denied") && models.contains("GET /v1/models is not in the allow list"),
        "{models}"
    );
    let dot = report["dot_segment"].as_str().unwrap();
    assert!(
        dot.starts_with("403") && dot.contains("is not in the allow list"),
        "{dot}"
    );
    let seen = fx.llm.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for request in &seen {
        assert_eq!(request.path, "/v1/chat/completions");
        assert_eq!(
            request.authorization.as_deref(),
            Some(format!("Bearer {SECRET}").as_str())
        );
    }
    // The program holds a placeholder, not the key.
    assert_eq!(report["env"]["OPENAI_API_KEY"], PLACEHOLDER);
    assert!(report["env"]["OPENAI_BASE_URL"]
        .as_str()
        .unwrap()
        .starts_with("http://127.0.0.1:"));
    assert_key_unreachable(&fx, &ran, &report);

    let outcomes = outcomes(&fx, "openai");
    assert_eq!(outcomes.len(), 2);
    for outcome in &outcomes {
        assert_eq!(outcome["status"], 200, "{outcome}");
        assert!(outcome["bytes"].as_u64().unwrap() > 0, "{outcome}");
        assert_eq!(outcome["withheld"], false, "{outcome}");
    }
    let denials = fx
        .broker
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == "call" && r["decision"] == "deny" && r["tool"] == "openai")
        .count();
    assert_eq!(denials, 2);
}

#[test]
fn the_anthropic_sdk_reaches_its_model_and_never_the_key() {
    let Some(python) = python() else { return };
    let fx = Fixture::new();
    let token = fx.mint(&["--tool", "openai", "--tool", "anthropic", "--uses", "20"]);
    let (ran, report) = python.sdk(&fx, &token, "anthropic");
    assert_eq!(report["chat"], "hello from claude", "{report}");
    assert_eq!(
        report["stream"],
        serde_json::json!(["one ", "two ", "three"]),
        "{report}"
    );
    assert_eq!(
        fx.llm.first_before_last(),
        vec![("anthropic".to_owned(), true)]
    );
    let seen = fx.llm.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for request in &seen {
        assert_eq!(request.path, "/v1/messages");
        assert_eq!(request.x_api_key.as_deref(), Some(SECRET));
        assert_eq!(request.authorization, None);
    }
    assert_eq!(report["env"]["ANTHROPIC_API_KEY"], PLACEHOLDER);
    assert_key_unreachable(&fx, &ran, &report);
    assert_eq!(outcomes(&fx, "anthropic").len(), 2);
}

#[test]
fn a_token_with_two_uses_allows_two_requests() {
    let Some(python) = python() else { return };
    let fx = Fixture::new();
    let token = fx.mint(&["--tool", "openai", "--tool", "anthropic", "--uses", "2"]);
    let (_, report) = python.sdk(&fx, &token, "uses");
    let uses = report["uses"].as_array().unwrap();
    assert_eq!(uses[0], "ok", "{report}");
    assert_eq!(uses[1], "ok", "{report}");
    let third = uses[2].as_str().unwrap();
    assert!(
        third.starts_with("denied") && third.contains("has used all of its 2 uses"),
        "{third}"
    );
    assert_eq!(fx.llm.seen().len(), 2);
}

#[test]
fn a_key_leaked_mid_stream_is_withheld() {
    let Some(python) = python() else { return };
    let fx = Fixture::new();
    let token = fx.mint(&["--tool", "openai", "--tool", "anthropic", "--uses", "20"]);
    let (ran, report) = python.sdk(&fx, &token, "leak");
    let lines: Vec<&str> = report["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    // What came before the leak streamed; then, in place of the rest, an
    // error event (which both SDKs raise on).
    assert!(lines.iter().any(|l| l.contains("still fine")), "{lines:?}");
    assert!(lines.contains(&"event: error\n"), "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("withheld: the response contains credential material")),
        "{lines:?}"
    );
    assert!(!lines.iter().any(|l| l.contains("after")), "{lines:?}");
    assert_no_secret("the program's output", &ran.stdout);
    let outcomes = outcomes(&fx, "openai");
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0]["withheld"], true, "{:?}", outcomes[0]);
}

#[test]
fn the_gateway_endpoint_is_the_only_way_out() {
    let Some(python) = python() else { return };
    let fx = Fixture::new();
    let token = fx.mint(&["--tool", "openai", "--tool", "anthropic", "--uses", "20"]);
    // Listeners waiting on the host: any address, a Unix socket inside
    // the program's own writable directory, an abstract socket.
    let host = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    host.set_nonblocking(true).unwrap();
    let host_port = host.local_addr().unwrap().port().to_string();
    let unix_path = fx.work.path().join("host.sock");
    let unix = std::os::unix::net::UnixListener::bind(&unix_path).unwrap();
    std::fs::set_permissions(&unix_path, std::fs::Permissions::from_mode(0o777)).unwrap();
    unix.set_nonblocking(true).unwrap();
    let abstract_name = format!("kw-gateway-test-{}", std::process::id());
    let abstract_addr =
        <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(
            abstract_name.as_bytes(),
        )
        .unwrap();
    let abstract_listener = std::os::unix::net::UnixListener::bind_addr(&abstract_addr).unwrap();
    abstract_listener.set_nonblocking(true).unwrap();
    let other = non_loopback_address().unwrap_or_else(|| "192.0.2.1".to_owned());

    let upstream_port = fx.llm.port.to_string();
    let unix_arg = unix_path.display().to_string();
    let ran = python.run(
        &fx,
        &token,
        "net.py",
        &[
            &host_port,
            &upstream_port,
            &other,
            &unix_arg,
            &abstract_name,
        ],
    );
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let results: Value = serde_json::from_str(ran.stdout.trim()).unwrap();
    eprintln!("{results:#}");
    assert_eq!(results["gateway"], "connected", "{results}");
    for attempt in [
        "host loopback listener",
        "upstream",
        "other address",
        "ipv6 loopback",
        "unix path",
        "abstract socket",
        "udp",
        "listen",
    ] {
        let result = results[attempt].as_str().unwrap();
        assert_ne!(result, "connected", "{attempt}: {results}");
    }
    // Nothing knocked on the host's listeners either.
    assert!(host.accept().is_err());
    assert!(unix.accept().is_err());
    assert!(abstract_listener.accept().is_err());
    assert!(fx.llm.seen().is_empty());
}

/// A non-loopback IPv4 address of this host, if it has one.
fn non_loopback_address() -> Option<String> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|ifa| {
        let addr = ifa.address?;
        let v4 = addr.as_sockaddr_in()?;
        let ip = v4.ip();
        (!ip.is_loopback()).then(|| ip.to_string())
    })
}

#[test]
fn without_namespaces_a_gateway_is_refused() {
    let fx = Fixture::new();
    let token = fx.mint(&["--tool", "openai", "--tool", "anthropic", "--uses", "20"]);
    let ran = fx.run(
        &token,
        &[],
        &["/bin/true"],
        &[("KEYWARD_TEST_NO_USERNS", "1")],
    );
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(
        ran.stderr.contains("--gateway needs user namespaces"),
        "{ran:?}"
    );
}

#[test]
fn a_gateway_the_token_does_not_grant_is_refused_before_the_program_runs() {
    let fx = Fixture::new();
    let token = fx.mint(&["--tool", "anthropic", "--uses", "20"]);
    let ran = fx.run(&token, &[], &["/bin/echo", "ran"], &[]);
    assert_eq!(ran.code, Some(3), "{ran:?}");
    assert!(
        ran.stderr
            .contains("--gateway openai: the broker refused it: gateway denied: the token does not grant gateway"),
        "{ran:?}"
    );
    assert!(!ran.stdout.contains("ran"), "{ran:?}");
}
