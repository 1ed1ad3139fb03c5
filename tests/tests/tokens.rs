// SPDX-License-Identifier: Apache-2.0
//! Capability tokens end to end, with the real binaries: minting within
//! policy, use only by the audience and only within the grant, expiry, use
//! counts, revocation (of a token and of its parent) that survives
//! `kill -9`, foreign keys, flipped bits, and attenuation.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use keyward_tests::{binary, Broker, Ran, PRINCIPAL_UID, STRANGER_UID};

/// The orchestrator (PRINCIPAL_UID) mints for the sub-agent (SUB_UID);
/// THIRD_UID is another local user.
const SUB_UID: u32 = STRANGER_UID;
const THIRD_UID: u32 = 61002;

const CONFIG: &str = r#"
[broker]
socket = "{socket}"
socket_mode = "0666"
state_dir = "{dir}/state"
max_token_ttl = "10m"

[[principal]]
name = "orchestrator"
uids = [61000]
may_call = ["echo"]
may_delegate = ["send_email", "echo"]

[[tool]]
name = "send_email"
kind = "echo"
params.to = { type = "string", pattern = '^[a-z0-9._-]+@example\.com$' }
params.subject = { type = "string", max_len = 200, default = "hi" }

[[tool]]
name = "echo"
kind = "echo"
params.message = { type = "string", max_len = 200 }
params.n = { type = "int", min = 0, max = 10, default = 0 }

[[tool]]
name = "internal"
kind = "echo"
"#;

fn shim(broker: &Broker, uid: u32, args: &[&str]) -> Ran {
    Ran::from(broker.shim(uid, args))
}

/// Mint as the orchestrator; returns the token (stdout) and its id.
fn mint(broker: &Broker, args: &[&str]) -> (String, String) {
    let mut full = vec!["mint"];
    full.extend_from_slice(args);
    let ran = shim(broker, PRINCIPAL_UID, &full);
    assert_eq!(ran.code, Some(0), "mint {args:?}: {ran:?}");
    let id = keyward_tests::minted_token_id(&ran.stderr);
    (ran.stdout.trim().to_owned(), id)
}

fn call_with(broker: &Broker, uid: u32, token: &str, args: &[&str]) -> Ran {
    let mut full = vec!["call", "--token", token];
    full.extend_from_slice(args);
    shim(broker, uid, &full)
}

fn assert_denied(ran: &Ran, reason: &str) {
    assert_eq!(ran.code, Some(3), "expected a denial: {ran:?}");
    assert!(ran.stderr.contains(reason), "expected {reason:?}: {ran:?}");
}

fn sub_token(broker: &Broker, extra: &[&str]) -> (String, String) {
    let uid = SUB_UID.to_string();
    let mut args = vec![
        "--tool",
        "send_email",
        "--param",
        "to=alice@example.com",
        "--for-uid",
        &uid,
    ];
    args.extend_from_slice(extra);
    mint(broker, &args)
}

fn revoke(broker: &Broker, id: &str) -> Ran {
    Ran::from(
        Command::new(binary("keyward-broker"))
            .args(["revoke", "--config"])
            .arg(broker.dir.path().join("broker.toml"))
            .arg(id)
            .output()
            .unwrap(),
    )
}

#[test]
fn pinned_token_allows_its_value_and_nothing_else() {
    let broker = Broker::start(CONFIG, &[]);
    let (token, id) = sub_token(&broker, &["--task", "email alice the report"]);
    let ok = call_with(
        &broker,
        SUB_UID,
        &token,
        &["send_email", "to=alice@example.com"],
    );
    assert_eq!(ok.code, Some(0), "{ok:?}");
    assert_eq!(ok.stdout, r#"{"subject":"hi","to":"alice@example.com"}"#);
    let evil = call_with(
        &broker,
        SUB_UID,
        &token,
        &["send_email", "to=mallory@evil.com"],
    );
    assert_denied(&evil, "\"to\"");
    let other_tool = call_with(&broker, SUB_UID, &token, &["echo", "message=x"]);
    assert_denied(&other_tool, "does not grant tool \"echo\"");
    // The sub-agent has no authority of its own.
    let direct = shim(
        &broker,
        SUB_UID,
        &["call", "send_email", "to=alice@example.com"],
    );
    assert_denied(&direct, "not a principal");

    // Every decision carries the token id and task hash; never the token.
    let audit = broker.audit();
    assert!(!audit.contains(&token), "token string in the audit trail");
    let records = broker.audit_records();
    let task = &records.iter().find(|r| r["event"] == "mint").unwrap()["task"];
    for event in ["bind", "call"] {
        assert!(
            records
                .iter()
                .any(|r| r["event"] == event && r["token_id"] == id.as_str() && r["task"] == *task),
            "no {event} record for {id}: {records:?}"
        );
    }
    assert!(records
        .iter()
        .any(|r| r["event"] == "call" && r["decision"] == "deny" && r["token_id"] == id.as_str()));
}

#[test]
fn token_for_one_uid_is_denied_to_another() {
    let broker = Broker::start(CONFIG, &[]);
    let (token, id) = sub_token(&broker, &[]);
    let ran = call_with(
        &broker,
        THIRD_UID,
        &token,
        &["send_email", "to=alice@example.com"],
    );
    assert_denied(
        &ran,
        &format!("issued for uid {SUB_UID}, not uid {THIRD_UID}"),
    );
    // The refusal is on record under the token's id: who tried to use it.
    let records = broker.audit_records();
    assert!(
        records.iter().any(|r| r["event"] == "bind"
            && r["decision"] == "deny"
            && r["token_id"] == id.as_str()
            && r["peer_uid"] == THIRD_UID),
        "{records:?}"
    );
}

#[test]
fn expired_token_is_denied() {
    let broker = Broker::start(CONFIG, &[]);
    let (token, _) = sub_token(&broker, &["--ttl", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let ran = call_with(
        &broker,
        SUB_UID,
        &token,
        &["send_email", "to=alice@example.com"],
    );
    assert_denied(&ran, "has expired");
}

#[test]
fn used_up_and_revoked_tokens_stay_so_across_kill_9() {
    let broker = Broker::start(CONFIG, &[]);
    let (once, _) = sub_token(&broker, &["--uses", "1"]);
    let (revoked, revoked_id) = sub_token(&broker, &[]);
    let (parent, parent_id) = sub_token(&broker, &[]);
    let child = shim(
        &broker,
        SUB_UID,
        &["attenuate", "--token", &parent, "--ttl", "60s"],
    );
    assert_eq!(child.code, Some(0), "{child:?}");
    let child = child.stdout.trim().to_owned();
    let call =
        |b: &Broker, t: &str| call_with(b, SUB_UID, t, &["send_email", "to=alice@example.com"]);

    assert_eq!(call(&broker, &once).code, Some(0));
    assert_denied(&call(&broker, &once), "used all of its 1 uses");
    assert_eq!(call(&broker, &child).code, Some(0));
    let ran = revoke(&broker, &revoked_id);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert_denied(&call(&broker, &revoked), "has been revoked");
    assert_eq!(revoke(&broker, &parent_id).code, Some(0));
    assert_denied(
        &call(&broker, &child),
        &format!("parent token {parent_id} has been revoked"),
    );

    let broker = broker.kill9_and_restart();
    assert_denied(&call(&broker, &once), "used all of its 1 uses");
    assert_denied(&call(&broker, &revoked), "has been revoked");
    assert_denied(&call(&broker, &parent), "has been revoked");
    assert_denied(&call(&broker, &child), "has been revoked");
}

#[test]
fn only_root_admins_and_the_issuer_may_revoke() {
    let broker = Broker::start(CONFIG, &[]);
    let (_, id) = sub_token(&broker, &[]);
    let config = broker.dir.path().join("broker.toml");
    let as_uid = |uid: u32| {
        use std::os::unix::process::CommandExt;
        Ran::from(
            Command::new(binary("keyward-broker"))
                .args(["revoke", "--config"])
                .arg(&config)
                .arg(&id)
                .uid(uid)
                .gid(uid)
                .output()
                .unwrap(),
        )
    };
    assert_denied(&as_uid(SUB_UID), "only root, an admin uid or its issuer");
    assert_eq!(as_uid(PRINCIPAL_UID).code, Some(0));
}

#[test]
fn token_from_another_broker_is_denied() {
    let ours = Broker::start(CONFIG, &[]);
    let theirs = Broker::start(CONFIG, &[]);
    let (foreign, _) = sub_token(&theirs, &[]);
    let ran = call_with(
        &ours,
        SUB_UID,
        &foreign,
        &["send_email", "to=alice@example.com"],
    );
    assert_denied(&ran, "signature is not valid for this broker's key");
}

#[test]
fn flipped_bit_is_denied() {
    let broker = Broker::start(CONFIG, &[]);
    let (token, _) = sub_token(&broker, &[]);
    let mut bytes = token.into_bytes();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    let flipped = String::from_utf8(bytes).unwrap();
    let ran = call_with(
        &broker,
        SUB_UID,
        &flipped,
        &["send_email", "to=alice@example.com"],
    );
    assert_eq!(ran.code, Some(3), "{ran:?}");
    assert!(ran.stderr.contains("token denied"), "{ran:?}");
}

#[test]
fn minting_stays_within_delegation_ttl_and_policy() {
    let broker = Broker::start(CONFIG, &[]);
    let mint_as = |uid: u32, args: &[&str]| {
        let mut full = vec!["mint"];
        full.extend_from_slice(args);
        shim(&broker, uid, &full)
    };
    assert_denied(
        &mint_as(PRINCIPAL_UID, &["--tool", "internal"]),
        "may not delegate tool \"internal\"",
    );
    assert_denied(
        &mint_as(PRINCIPAL_UID, &["--tool", "echo", "--ttl", "1h"]),
        "exceeds the policy's max_token_ttl",
    );
    assert_denied(
        &mint_as(PRINCIPAL_UID, &["--tool", "echo", "--range", "n=0..100"]),
        "wider than the policy",
    );
    assert_denied(
        &mint_as(
            PRINCIPAL_UID,
            &[
                "--tool",
                "send_email",
                "--one-of",
                "to=a@example.com,m@evil.com",
            ],
        ),
        "does not match the pattern",
    );
    assert_denied(&mint_as(SUB_UID, &["--tool", "echo"]), "not a principal");
}

#[test]
fn attenuation_narrows_and_never_widens() {
    let broker = Broker::start(CONFIG, &[]);
    let uid = SUB_UID.to_string();
    let (parent, _) = mint(
        &broker,
        &[
            "--tool",
            "echo",
            "--tool",
            "send_email",
            "--range",
            "n=0..5",
            "--uses",
            "5",
            "--ttl",
            "5m",
            "--for-uid",
            &uid,
        ],
    );
    let attenuate = |args: &[&str]| {
        let mut full = vec!["attenuate", "--token", &parent];
        full.extend_from_slice(args);
        shim(&broker, SUB_UID, &full)
    };
    assert_denied(&attenuate(&["--range", "n=0..9"]), "wider than the token's");
    assert_denied(&attenuate(&["--ttl", "1h"]), "outlive its parent");
    assert_denied(&attenuate(&["--uses", "6"]), "only 5 left");
    assert_denied(
        &attenuate(&["--tool", "internal"]),
        "does not grant tool \"internal\"",
    );

    let child = attenuate(&["--tool", "echo", "--range", "n=1..2", "--uses", "1"]);
    assert_eq!(child.code, Some(0), "{child:?}");
    let child = child.stdout.trim().to_owned();
    assert_denied(
        &call_with(&broker, SUB_UID, &child, &["echo", "message=x", "n=3"]),
        "range 1..=2",
    );
    assert_denied(
        &call_with(
            &broker,
            SUB_UID,
            &child,
            &["send_email", "to=a@example.com"],
        ),
        "does not grant tool \"send_email\"",
    );
    let ran = call_with(&broker, SUB_UID, &child, &["echo", "message=x", "n=2"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    // The child's use also counted against the parent's five.
    assert_denied(&attenuate(&["--uses", "5"]), "only 4 left");
    let tools = shim(&broker, SUB_UID, &["tools", "--json", "--token", &child]);
    assert_eq!(tools.code, Some(0), "{tools:?}");
    let list: serde_json::Value = serde_json::from_str(&tools.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["name"], "echo");
    assert!(list[0].to_string().contains("token: range 1..=2"), "{list}");
}

#[test]
fn exact_call_token_is_good_for_that_call_only() {
    let broker = Broker::start(CONFIG, &[]);
    let uid = SUB_UID.to_string();
    let (token, _) = mint(
        &broker,
        &[
            "--tool",
            "send_email",
            "--param",
            "to=bob@example.com",
            "--param",
            "subject=q3",
            "--exact-call",
            "--for-uid",
            &uid,
        ],
    );
    let ok = call_with(
        &broker,
        SUB_UID,
        &token,
        &["send_email", "to=bob@example.com", "subject=q3"],
    );
    assert_eq!(ok.code, Some(0), "{ok:?}");
    let other = call_with(
        &broker,
        SUB_UID,
        &token,
        &["send_email", "to=bob@example.com", "subject=q4"],
    );
    assert_eq!(other.code, Some(3), "{other:?}");
}

#[test]
fn principal_lists_its_tools() {
    let broker = Broker::start(CONFIG, &[]);
    let ran = shim(&broker, PRINCIPAL_UID, &["tools"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.contains("echo"), "{ran:?}");
    assert!(ran.stdout.contains("max_len 200"), "{ran:?}");
    assert!(!ran.stdout.contains("internal"), "{ran:?}");
}

#[test]
fn bound_connection_has_only_the_token_authority() {
    use keyward_proto::{Bind, Mint, Request, Response};
    use keyward_tests::RawConn;
    let broker = Broker::start(CONFIG, &[]);
    // A token for root (the test process), which is no principal.
    let (token, _) = mint(&broker, &["--tool", "echo", "--for-uid", "0"]);
    let conn = RawConn::connect(&broker.socket);
    conn.hello();
    let bound = conn.request(&Request::Bind(Bind {
        token: token.clone(),
    }));
    assert!(matches!(bound, Some(Response::Bound(_))), "{bound:?}");
    let again = conn.request(&Request::Bind(Bind { token }));
    assert!(
        matches!(&again, Some(Response::Denied(d)) if d.reason.contains("already bound")),
        "{again:?}"
    );
    let mint = conn.request(&Request::Mint(Mint {
        tools: vec!["echo".into()],
        params: vec![],
        ttl_secs: None,
        max_uses: None,
        task: String::new(),
        audience: None,
        exact_call: false,
    }));
    assert!(
        matches!(&mint, Some(Response::Denied(d)) if d.reason.contains("only with its token's authority")),
        "{mint:?}"
    );
    let call = conn.request(&keyward_tests::echo_request("hi"));
    assert!(matches!(call, Some(Response::Done(_))), "{call:?}");
}
