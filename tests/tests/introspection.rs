// SPDX-License-Identifier: Apache-2.0
//! Introspection with the real binaries: `keyward-broker status` and
//! `tokens` for admins, `agent-shim token inspect` for a token's holder
//! (and inside `agent-shim run`, for the bound token), `agent-shim tools`
//! with descriptions and defaults, and told so (exit 3) when the caller
//! has no authority; `keyward-broker revoke` of an id never issued.
//!
//! Attacks: a uid that is neither root nor an admin asks for the status
//! and the token list: refused (exit 3), and its output holds nothing of
//! the broker's state (no token id, credential name or policy hash). A
//! uid that is neither a token's audience, its issuer nor an admin asks
//! the broker to inspect it: refused. No output holds the credential.
#![allow(clippy::unwrap_used)]

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use keyward_tests::{
    assert_no_secret, binary, Broker, BrokerSetup, Ran, PRINCIPAL_UID, SECRET, STRANGER_UID,
};

/// The sub-agent the orchestrator (PRINCIPAL_UID) mints for.
const SUB_UID: u32 = STRANGER_UID;
/// An admin (admin_uids), no principal.
const ADMIN_UID: u32 = 61002;
/// Another local user: no principal, no admin.
const OTHER_UID: u32 = 61003;

const CONFIG: &str = r#"
[broker]
socket = "{socket}"
socket_mode = "0666"
state_dir = "{dir}/state"
credentials_dir = "{dir}/creds"
max_token_ttl = "10m"
admin_uids = [61002]

[[principal]]
name = "orchestrator"
uids = [61000]
may_call = ["echo"]
may_delegate = ["echo"]

[credential.api]
file = "api.token"

[[tool]]
name = "echo"
kind = "echo"
description = "Say something back"
params.message = { type = "string", max_len = 200 }
params.n = { type = "int", min = 0, max = 10, default = 3 }

[[tool]]
name = "api"
kind = "http"
credential = "api"
method = "GET"
url = "http://127.0.0.1:9/x"
auth = { bearer = true }
"#;

fn start() -> Broker {
    Broker::start_with(BrokerSetup {
        config: CONFIG,
        credentials: &[("api.token", SECRET)],
        ..BrokerSetup::default()
    })
}

/// `keyward-broker ARGS --config CONFIG` as `uid`.
fn admin(broker: &Broker, uid: u32, args: &[&str]) -> Ran {
    Ran::from(
        Command::new(binary("keyward-broker"))
            .args(args)
            .arg("--config")
            .arg(&broker.config_path)
            .uid(uid)
            .gid(uid)
            .output()
            .unwrap(),
    )
}

fn shim(broker: &Broker, uid: u32, args: &[&str]) -> Ran {
    Ran::from(broker.shim(uid, args))
}

/// Mint for the sub-agent; the token and its id.
fn mint(broker: &Broker, extra: &[&str]) -> (String, String) {
    let sub = SUB_UID.to_string();
    let mut args = vec!["mint", "--tool", "echo", "--for-uid", &sub];
    args.extend_from_slice(extra);
    let ran = shim(broker, PRINCIPAL_UID, &args);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let id = keyward_tests::minted_token_id(&ran.stderr);
    (ran.stdout.trim().to_owned(), id)
}

fn json(ran: &Ran) -> Value {
    assert_eq!(ran.code, Some(0), "{ran:?}");
    serde_json::from_str(&ran.stdout).unwrap_or_else(|e| panic!("{e}: {ran:?}"))
}

#[test]
fn status_shows_the_broker_state_to_admins_and_never_a_value() {
    let broker = start();
    let (token, id) = mint(&broker, &["--task", "status check"]);
    // A session held open by the orchestrator (mcp waits on stdin).
    let mut held = keyward_tests::shim_command(&broker.socket, PRINCIPAL_UID, &["mcp"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let report = loop {
        let report = json(&admin(&broker, 0, &["status", "--json"]));
        let held_open = report["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["uid"] == PRINCIPAL_UID && s["sessions"].as_u64() >= Some(1));
        if held_open {
            break report;
        }
        assert!(
            Instant::now() < deadline,
            "no session of uid {PRINCIPAL_UID}: {report}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = held.kill();
    let _ = held.wait();

    assert_eq!(report["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(report["config"], broker.config_path.to_str().unwrap());
    assert_eq!(report["socket"], broker.socket.to_str().unwrap());
    assert_eq!(report["live_tokens"], 1, "{report}");
    assert!(report["uptime_secs"].as_u64().is_some(), "{report}");
    // The policy hash is the hash of the file in force.
    let text = std::fs::read(&broker.config_path).unwrap();
    let hash = keyward_proto::token::hex(blake3_of(&text).as_slice());
    assert_eq!(report["policy"]["blake3"], hash.as_str(), "{report}");
    assert!(
        report["policy"]["loaded_at"]
            .as_str()
            .unwrap()
            .ends_with('Z'),
        "{report}"
    );
    assert_eq!(
        report["credentials"],
        serde_json::json!([{"name": "api", "state": "loaded"}]),
        "{report}"
    );

    // The text form says the same; an admin uid may ask too.
    let text = admin(&broker, ADMIN_UID, &["status"]);
    assert_eq!(text.code, Some(0), "{text:?}");
    for want in [
        "version",
        "uptime",
        "policy",
        "blake3",
        "api: loaded",
        "1 live",
    ] {
        assert!(text.stdout.contains(want), "{want}: {text:?}");
    }
    assert!(text.stdout.ends_with('\n'));
    assert_no_secret("status", &text.stdout);
    assert_no_secret("status --json", &report.to_string());
    assert!(
        !report.to_string().contains(&token),
        "a token string in status"
    );
    let _ = id;
}

/// blake3 of the configuration text, as the broker computes it.
fn blake3_of(bytes: &[u8]) -> [u8; 32] {
    keyward_broker::policy::source_hash(bytes)
}

#[test]
fn a_non_admin_asking_for_status_or_tokens_is_refused_and_learns_nothing() {
    let broker = start();
    let (token, id) = mint(&broker, &[]);
    for uid in [PRINCIPAL_UID, SUB_UID, OTHER_UID] {
        for args in [
            &["status"][..],
            &["status", "--json"],
            &["tokens"],
            &["tokens", "--json"],
        ] {
            let ran = admin(&broker, uid, args);
            assert_eq!(ran.code, Some(3), "uid {uid} {args:?}: {ran:?}");
            assert!(
                ran.stderr.contains(&format!(
                    "uid {uid} is neither root nor in the policy's admin_uids"
                )),
                "{ran:?}"
            );
            assert!(ran.stdout.is_empty(), "{ran:?}");
            for leaked in [id.as_str(), token.as_str(), "api", "orchestrator", "blake3"] {
                assert!(!ran.stderr.contains(leaked), "{leaked} in {ran:?}");
            }
        }
    }
    // The refusals are audited.
    let refused = broker
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == "refused" && r["peer_uid"] == OTHER_UID)
        .count();
    assert_eq!(refused, 4);
}

#[test]
fn tokens_lists_live_tokens_for_admins() {
    let broker = start();
    let (token, id) = mint(&broker, &["--task", "list me", "--uses", "5"]);
    let ran = shim(
        &broker,
        SUB_UID,
        &["call", "--token", &token, "echo", "message=hi"],
    );
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let list = json(&admin(&broker, ADMIN_UID, &["tokens", "--json"]));
    let listed = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id.as_str())
        .unwrap_or_else(|| panic!("{id} not listed: {list}"));
    let task = shim(&broker, SUB_UID, &["task-hash", "list me"]);
    assert_eq!(listed["issuer"], "orchestrator");
    assert_eq!(listed["audience"]["uid"], SUB_UID);
    assert_eq!(listed["owner_uid"], PRINCIPAL_UID);
    assert_eq!(listed["task"], task.stdout.trim());
    assert_eq!(listed["uses"], 1);
    assert_eq!(listed["max_uses"], 5);
    assert_eq!(listed["revoked"], false);
    assert!(listed["expires"].as_str().unwrap().ends_with('Z'));
    let secs = listed["expires_in_secs"].as_u64().unwrap();
    assert!(secs > 0 && secs <= 300, "{listed}");

    let table = admin(&broker, 0, &["tokens"]);
    assert_eq!(table.code, Some(0), "{table:?}");
    let row = table.stdout.lines().find(|l| l.starts_with(&id)).unwrap();
    for want in [
        "orchestrator",
        &SUB_UID.to_string(),
        "1/5",
        "Z (in ",
        "live",
    ] {
        assert!(row.contains(want), "{want}: {row}");
    }
    assert!(!table.stdout.contains(&token), "a token string in the list");
}

#[test]
fn revoking_an_id_never_issued_says_so_and_exits_non_zero() {
    let broker = start();
    let ran = admin(&broker, 0, &["revoke", "0123456789abcdef0123456789abcdef"]);
    assert_eq!(ran.code, Some(3), "{ran:?}");
    assert!(ran.stderr.contains("never issued it"), "{ran:?}");
    assert!(!ran.stdout.contains("revoked"), "{ran:?}");
}

#[test]
fn token_inspect_shows_tools_uses_and_expiry() {
    let broker = start();
    let (token, id) = mint(&broker, &["--uses", "5", "--one-of", "message=hi,ho"]);
    let used = shim(
        &broker,
        SUB_UID,
        &["call", "--token", &token, "echo", "message=hi"],
    );
    assert_eq!(used.code, Some(0), "{used:?}");

    let ran = shim(&broker, SUB_UID, &["token", "inspect", "--token", &token]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    for want in [
        id.as_str(),
        "orchestrator",
        &format!("uid {SUB_UID}"),
        "4 left (1 of 5 used)",
        "Say something back",
        "message",
        "default 3",
        "usable",
    ] {
        assert!(ran.stdout.contains(want), "{want}: {ran:?}");
    }
    let expires = ran
        .stdout
        .lines()
        .find(|l| l.starts_with("expires"))
        .unwrap();
    // "2026-11-30T02:18:31Z (in 4m 59s)": an ISO time and the distance.
    assert!(
        expires.contains("Z (in 4m") || expires.contains("Z (in 5m)"),
        "{expires}"
    );

    // The issuer may inspect it too; JSON says the same.
    let info = json(&shim(
        &broker,
        PRINCIPAL_UID,
        &["token", "inspect", "--json", &token],
    ));
    assert_eq!(info["id"], id.as_str());
    assert_eq!(info["uses_left"], 4);
    assert!(
        info["expires_in"].as_str().unwrap().starts_with("in "),
        "{info}"
    );
    assert!(info["expires"].as_str().unwrap().ends_with('Z'), "{info}");
    assert_eq!(info["tools"][0]["name"], "echo");
    let message = info["tools"][0]["params"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "message")
        .unwrap();
    assert!(
        message["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap().contains("ho")),
        "the token's constraint is shown: {message}"
    );

    // Neither its audience, nor its issuer, nor an admin: refused.
    let other = shim(&broker, OTHER_UID, &["token", "inspect", &token]);
    assert_eq!(other.code, Some(3), "{other:?}");
    assert!(other.stderr.contains("inspection denied"), "{other:?}");
    assert!(!other.stdout.contains("orchestrator"), "{other:?}");
}

#[test]
fn token_inspect_inside_run_shows_the_bound_token() {
    let broker = start();
    let (token, id) = mint(&broker, &["--uses", "3"]);
    let shim_path = binary("agent-shim");
    let ran = Ran::from(
        Command::new(&shim_path)
            .arg("run")
            .arg("--allow-exec")
            .arg(&shim_path)
            .arg("--")
            .arg(&shim_path)
            .args(["token", "inspect"])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("KEYWARD_SOCKET", &broker.socket)
            .env("KEYWARD_TOKEN", &token)
            .stdin(Stdio::null())
            .uid(SUB_UID)
            .gid(SUB_UID)
            .output()
            .unwrap(),
    );
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.contains(&id), "{ran:?}");
    assert!(ran.stdout.contains("3 left (0 of 3 used)"), "{ran:?}");
}

#[test]
fn tools_shows_descriptions_and_defaults_and_no_authority_is_exit_3() {
    let broker = start();
    let ran = shim(&broker, PRINCIPAL_UID, &["tools"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.contains("echo: Say something back"), "{ran:?}");
    let n = ran
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("n "))
        .unwrap();
    assert!(n.contains("default 3"), "{n}");
    let message = ran
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("message"))
        .unwrap();
    assert!(message.contains("required"), "{message}");

    for uid in [SUB_UID, OTHER_UID] {
        let ran = shim(&broker, uid, &["tools"]);
        assert_eq!(ran.code, Some(3), "{ran:?}");
        assert!(ran.stdout.is_empty(), "not an empty table: {ran:?}");
        assert!(
            ran.stderr
                .contains(&format!("uid {uid} may call no tool directly")),
            "{ran:?}"
        );
    }
}
