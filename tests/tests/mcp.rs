// SPDX-License-Identifier: Apache-2.0
//! `agent-shim mcp` driven by MCP clients nobody on this project wrote: the
//! official Python SDK (`mcp`, with `jsonschema`) and the official
//! TypeScript SDK (`@modelcontextprotocol/sdk`), installed by `.ci/run`
//! under `$KEYWARD_MCP_CLIENTS`. Against the real broker and a loopback
//! upstream: an allowed call returns the upstream body without the
//! credential; a pinned parameter with another value is an error result
//! with the reason; a tool outside the token is neither listed nor
//! callable; every listed schema is valid JSON Schema and refuses what the
//! broker refuses (a table of values); a malformed request gets a JSON-RPC
//! error and the server keeps serving. A `[[gateway]]` the caller (or the
//! token) may use is not an MCP tool: it is not listed, and `agent-shim
//! tools` shows it as a gateway.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use keyward_tests::upstream::Upstream;
use keyward_tests::{assert_no_secret, binary, Broker, Ran, PRINCIPAL_UID, SECRET, STRANGER_UID};

fn config(port: u16) -> String {
    format!(
        r#"
[broker]
socket = "{{socket}}"
socket_mode = "0666"
credentials_dir = "{{dir}}/creds"
state_dir = "{{dir}}/state"
call_timeout = "5s"

[[principal]]
name = "orchestrator"
uids = [{PRINCIPAL_UID}]
may_call = ["protected", "lookup", "models"]
may_delegate = ["protected", "lookup", "models"]

[credential.api]
file = "api.token"

[[tool]]
name = "protected"
kind = "http"
credential = "api"
method = "GET"
url = "http://127.0.0.1:{port}/protected"
auth = {{ bearer = true }}

[[tool]]
name = "lookup"
description = "Look a user up."
kind = "http"
credential = "api"
method = "POST"
url = "http://127.0.0.1:{port}/echo/lookup"
auth = {{ bearer = true }}
body_json = {{ user = "{{user}}", n = "{{n}}", color = "{{color}}" }}
params.user = {{ type = "string", pattern = '[a-z]+', max_len = 8 }}
params.n = {{ type = "int", min = 1, max = 5, default = 1 }}
params.color = {{ type = "string", one_of = ["red", "green", "blue"] }}

[[gateway]]
name = "models"
upstream = "http://127.0.0.1:{port}"
credential = "api"
auth = {{ bearer = true }}
allow = [ {{ method = "GET", path = "/v1/models" }} ]
"#
    )
}

/// Where `.ci/run` installed the clients; `None` (with a loud message) only
/// outside CI.
fn clients() -> Option<PathBuf> {
    match std::env::var_os("KEYWARD_MCP_CLIENTS") {
        Some(dir) => Some(PathBuf::from(dir)),
        None => {
            assert!(
                std::env::var_os("CI").is_none_or(|v| v != "true"),
                "KEYWARD_MCP_CLIENTS is not set in CI: .ci/run must install the MCP clients"
            );
            eprintln!(
                "\n*** SKIPPED: the MCP client tests need the official SDKs; run `.ci/run` \
                 or set KEYWARD_MCP_CLIENTS to the directory it installs them in ***\n"
            );
            None
        }
    }
}

fn script(name: &str) -> String {
    format!("{}/mcp/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// `agent-shim ARGS` as `uid`, for a client to spawn as its server.
fn server_command(uid: u32, args: &[&str]) -> Vec<String> {
    let mut cmd: Vec<String> = [
        "setpriv",
        &format!("--reuid={uid}"),
        &format!("--regid={uid}"),
        "--clear-groups",
        "--",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    cmd.push(binary("agent-shim").display().to_string());
    cmd.extend(args.iter().map(|s| (*s).to_owned()));
    cmd
}

/// Run one client script; its JSON report.
fn drive(client: &str, clients: &std::path::Path, broker: &Broker, command: Vec<String>) -> Value {
    let spec = json!({
        "command": command,
        "env": {
            "KEYWARD_SOCKET": broker.socket.display().to_string(),
            "PATH": "/usr/local/bin:/usr/bin:/bin",
        },
        "calls": calls(),
    });
    let mut cmd = match client {
        "python" => {
            let mut c = Command::new(clients.join("python/bin/python"));
            c.arg(script("client.py"));
            c
        }
        _ => {
            let mut c = Command::new("node");
            c.arg(script("client.cjs"))
                .env("NODE_PATH", clients.join("node/node_modules"));
            c
        }
    };
    let out = Ran::from(cmd.arg(spec.to_string()).output().unwrap());
    assert_eq!(out.code, Some(0), "{client} client: {out:?}");
    assert_no_secret(client, &out.stdout);
    serde_json::from_str(out.stdout.trim()).unwrap()
}

/// The calls every client makes, in order; see [`check_calls`].
fn calls() -> Value {
    json!([
        ["lookup", { "user": "abc", "n": 2, "color": "red" }],
        ["lookup", { "user": "abc", "n": 2, "color": "blue" }],
        ["protected", {}],
        // The refusal table: each refused by the broker and by the schema.
        ["lookup", { "user": "abc", "n": true, "color": "red" }],
        ["lookup", { "user": 7, "color": "red" }],
        ["lookup", { "user": "ABC", "color": "red" }],
        ["lookup", { "user": "abcdefghi", "color": "red" }],
        ["lookup", { "user": "abc", "color": "mauve" }],
        ["lookup", { "user": "abc", "n": 9, "color": "red" }],
        ["lookup", { "user": "abc", "n": 0, "color": "red" }],
        ["lookup", { "user": "xyz", "color": "red" }],
        ["lookup", { "user": "abc", "n": 3, "color": "red" }],
        ["lookup", { "color": "red" }],
    ])
}

/// A sub-agent's token: `lookup` only, color pinned to red, user prefixed
/// `ab`, n within 1..=2; and the gateway `models`.
fn token(broker: &Broker) -> String {
    let ran = Ran::from(broker.shim(
        PRINCIPAL_UID,
        &[
            "mint",
            "--tool",
            "lookup",
            "--tool",
            "models",
            "--param",
            "color=red",
            "--prefix",
            "user=ab",
            "--range",
            "n=1..2",
            "--for-uid",
            &STRANGER_UID.to_string(),
        ],
    ));
    assert_eq!(ran.code, Some(0), "mint: {ran:?}");
    ran.stdout.trim().to_owned()
}

fn check_report(client: &str, report: &Value, with_token: bool) {
    let tools = report["tools"].as_object().unwrap();
    let names: Vec<&str> = tools.keys().map(String::as_str).collect();
    if with_token {
        assert_eq!(
            names,
            ["lookup"],
            "{client}: only the token's tools are listed"
        );
    } else {
        assert_eq!(names, ["lookup", "protected"], "{client}");
    }
    let user = &tools["lookup"]["properties"]["user"];
    assert_eq!(user["type"], "string", "{client}: {user}");
    assert_eq!(user["maxLength"], 8);
    assert_eq!(user["pattern"], "^(?:[a-z]+)$");
    let n = &tools["lookup"]["properties"]["n"];
    assert_eq!(n["type"], "integer");
    assert_eq!(n["default"], 1);
    let color = &tools["lookup"]["properties"]["color"];
    assert_eq!(color["enum"], json!(["red", "green", "blue"]));
    assert_eq!(tools["lookup"]["required"], json!(["color", "user"]));
    if with_token {
        assert_eq!(color["const"], "red", "{client}: the pinned value");
        assert_eq!(user["allOf"], json!([{ "pattern": "^ab" }]));
        assert_eq!(n["minimum"], 1);
        assert_eq!(n["maximum"], 2);
    } else {
        assert_eq!(n["maximum"], 5);
    }
    if let Some(valid) = report.get("schemas_valid") {
        for (name, ok) in valid.as_object().unwrap() {
            assert_eq!(ok, &json!(true), "{client}: schema of {name}");
        }
    }

    let calls = report["calls"].as_array().unwrap();
    let allowed = &calls[0];
    assert_eq!(allowed["is_error"], false, "{client}: {allowed}");
    let text = allowed["text"].as_str().unwrap();
    assert!(
        text.contains("/echo/lookup"),
        "{client}: the upstream body: {text}"
    );
    assert_eq!(
        allowed["structured"]["body"], r#"{"color":"red","n":2,"user":"abc"}"#,
        "{client}: the JSON body as structured content, n still a number"
    );
    assert!(!text.contains(SECRET));

    let pinned = &calls[1];
    if with_token {
        assert_eq!(pinned["is_error"], true, "{client}: {pinned}");
        let reason = pinned["text"].as_str().unwrap();
        assert!(
            reason.contains("color"),
            "{client}: the reason names it: {reason}"
        );
    } else {
        assert_eq!(
            pinned["is_error"], false,
            "{client}: a principal may: {pinned}"
        );
    }

    let outside = &calls[2];
    if with_token {
        assert_eq!(outside["is_error"], true, "{client}: {outside}");
        assert!(outside["text"].as_str().unwrap().contains("protected"));
    } else {
        assert_eq!(outside["is_error"], false, "{client}: {outside}");
        assert_eq!(outside["text"], "hello from upstream");
    }

    // The refusal table: the broker refuses each (the last two only under
    // the token), and where the client checks, so does the schema.
    for (i, case) in calls.iter().enumerate().skip(3) {
        let by_token_only = matches!(i, 10 | 11);
        if by_token_only && !with_token {
            assert_eq!(case["is_error"], false, "{client}: case {i}: {case}");
            continue;
        }
        assert_eq!(case["is_error"], true, "{client}: broker, case {i}: {case}");
        if let Some(ok) = case.get("schema_ok") {
            assert_eq!(ok, &json!(false), "{client}: schema, case {i}: {case}");
        }
    }
}

#[test]
fn official_clients_as_principal_and_with_a_token() {
    let Some(clients) = clients() else { return };
    let upstream = Upstream::start();
    let broker = Broker::start(&config(upstream.port), &[("api.token", SECRET)]);
    let token = token(&broker);
    for client in ["python", "node"] {
        let report = drive(
            client,
            &clients,
            &broker,
            server_command(PRINCIPAL_UID, &["mcp"]),
        );
        check_report(client, &report, false);
        // `tools --json-schema` prints the schemas the client was given.
        let ran = Ran::from(broker.shim(PRINCIPAL_UID, &["tools", "--json-schema"]));
        assert_eq!(ran.code, Some(0), "{ran:?}");
        let printed: Value = serde_json::from_str(&ran.stdout).unwrap();
        for tool in printed.as_array().unwrap() {
            let name = tool["name"].as_str().unwrap();
            assert_eq!(
                tool["inputSchema"], report["tools"][name],
                "{client}: {name}"
            );
        }
        assert!(
            printed
                .as_array()
                .unwrap()
                .iter()
                .all(|t| t["name"] != "models"),
            "a gateway in --json-schema: {printed}"
        );
        if client == "python" {
            let version = report["protocol"].as_str().unwrap();
            assert!(version.starts_with("20"), "{client}: negotiated {version}");
        } else {
            assert_eq!(report["server"]["name"], "agent-shim", "{client}");
        }
        let report = drive(
            client,
            &clients,
            &broker,
            server_command(STRANGER_UID, &["mcp", "--token", &token]),
        );
        check_report(client, &report, true);
    }
}

/// `agent-shim tools` shows the gateway as a gateway (after the tools),
/// and `--json` says which is which; the token's listing too.
#[test]
fn tools_shows_gateways_as_gateways() {
    let upstream = Upstream::start();
    let broker = Broker::start(&config(upstream.port), &[("api.token", SECRET)]);
    let ran = Ran::from(broker.shim(PRINCIPAL_UID, &["tools"]));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let heads: Vec<&str> = ran.stdout.lines().filter(|l| !l.starts_with(' ')).collect();
    assert_eq!(heads.len(), 3, "{ran:?}");
    assert!(heads[0].starts_with("lookup: ") && heads[1].starts_with("protected: "));
    assert!(heads[2].starts_with("gateway models: "), "{ran:?}");
    assert!(
        ran.stdout.contains(
            "not a tool: a program reaches it over HTTP with agent-shim run --gateway models"
        ),
        "{ran:?}"
    );
    let ran = Ran::from(broker.shim(PRINCIPAL_UID, &["tools", "--json"]));
    let listed: Value = serde_json::from_str(&ran.stdout).unwrap();
    let kinds: Vec<(&str, &str)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap(), t["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("lookup", "tool"),
            ("models", "gateway"),
            ("protected", "tool")
        ]
    );
    let token = token(&broker);
    let ran = Ran::from(broker.shim(STRANGER_UID, &["tools", "--token", &token]));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.starts_with("lookup: "), "{ran:?}");
    assert!(ran.stdout.contains("\ngateway models: "), "{ran:?}");
}

#[test]
fn inside_run_through_keyward_fd() {
    let Some(clients) = clients() else { return };
    let upstream = Upstream::start();
    let broker = Broker::start(&config(upstream.port), &[("api.token", SECRET)]);
    let token = token(&broker);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, &token).unwrap();
    std::os::unix::fs::chown(dir.path(), Some(STRANGER_UID), Some(STRANGER_UID)).unwrap();
    std::os::unix::fs::chown(&file, Some(STRANGER_UID), Some(STRANGER_UID)).unwrap();
    let shim = binary("agent-shim").display().to_string();
    let file = file.display().to_string();
    let report = drive(
        "python",
        &clients,
        &broker,
        server_command(
            STRANGER_UID,
            &["run", "--token-file", &file, "--", &shim, "mcp"],
        ),
    );
    check_report("python in run", &report, true);
}

/// Raw JSON-RPC lines: a malformed request gets an error reply and the
/// server goes on serving.
#[test]
fn malformed_requests_get_errors_and_serving_goes_on() {
    let upstream = Upstream::start();
    let broker = Broker::start(&config(upstream.port), &[("api.token", SECRET)]);
    let mut child = keyward_tests::shim_command(&broker.socket, PRINCIPAL_UID, &["mcp"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut send = |v: &str| {
        stdin.write_all(v.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    };
    send(
        &json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2024-11-05", "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"}}})
        .to_string(),
    );
    let init: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(init["result"]["protocolVersion"], "2024-11-05", "{init}");
    send(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
    // A call whose params are not an object, and one naming no tool.
    send(r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":"bogus"}"#);
    let reply: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(
        reply["error"]["code"], -32600,
        "an invalid request: {reply}"
    );
    // A line that is not JSON at all: a parse error, or silence; never the
    // end of the session.
    send("this is not json {");
    send(r#"{"jsonrpc":"2.0","id":3,"method":"tools/list"}"#);
    let mut reply: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    if reply["id"].is_null() {
        assert_eq!(reply["error"]["code"], -32700, "a parse error: {reply}");
        reply = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    }
    assert_eq!(reply["id"], 3, "{reply}");
    assert_eq!(
        reply["result"]["tools"].as_array().unwrap().len(),
        2,
        "{reply}"
    );
    drop(stdin);
    assert!(child.wait().unwrap().success());
}
