// SPDX-License-Identifier: Apache-2.0
//! The token state across restarts and at its caps, with the real broker:
//! a `tokens.log` the broker cannot read (another format version, or not
//! a log at all) is refused at start and left untouched; a revoked or
//! used-up token frees its owner's slot at once, while the cap still
//! holds for live tokens, and the records of spent tokens kept until they
//! expire are bounded too; a token's audience, task and ancestors survive
//! a restart (listing, revocation records, revocation of descendants).
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use agent_shim::client::Client;
use keyward_broker::state::log::{frame, Record, FORMAT_VERSION};
use keyward_proto::token::{Audience, TokenId};
use keyward_proto::{Attenuate, Bind, Mint, Request, Response, Revoke};
use keyward_tests::{binary, echo_request, Broker, BrokerSetup, Ran, STRANGER_UID};

/// Root is the principal (it mints in-process); `{state}` outlives one
/// broker.
const CONFIG: &str = r#"
[broker]
socket = "{socket}"
socket_mode = "0666"
state_dir = "{state}"
max_token_ttl = "10m"
max_live_tokens_per_uid = 5
max_attenuations_per_uid = 3

[[principal]]
name = "ops"
uids = [0]
may_call = ["echo"]
may_delegate = ["echo"]

[[tool]]
name = "echo"
kind = "echo"
params.message = { type = "string", max_len = 100 }
"#;

const TASK: &str = "state restart test";

fn config(state: &Path) -> String {
    CONFIG.replace("{state}", state.to_str().unwrap())
}

/// A 0700 directory for state, and its parent.
fn state_dir() -> (tempfile::TempDir, PathBuf) {
    let base = tempfile::tempdir().unwrap();
    let state = base.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    (base, state)
}

fn request(socket: &Path, request: &Request) -> Response {
    Client::connect(socket).unwrap().request(request).unwrap()
}

/// Mint an `echo` token as root for `uid`.
fn mint(socket: &Path, uid: u32, max_uses: Option<u32>) -> Result<(String, TokenId), String> {
    match request(
        socket,
        &Request::Mint(Mint {
            tools: vec!["echo".into()],
            params: Vec::new(),
            ttl_secs: Some(300),
            max_uses,
            task: TASK.into(),
            audience: Some(Audience { uid, gid: None }),
            exact_call: false,
        }),
    ) {
        Response::Minted(m) => Ok((m.token, m.id)),
        Response::Denied(d) => Err(d.reason),
        other => Err(format!("{other:?}")),
    }
}

fn revoke(socket: &Path, id: TokenId) {
    let reply = request(socket, &Request::Revoke(Revoke { id }));
    assert!(matches!(reply, Response::Revoked(_)), "{reply:?}");
}

/// Bind `token` (root's) on a new connection.
fn bind(socket: &Path, token: &str) -> Result<Client, String> {
    let mut client = Client::connect(socket).unwrap();
    match client
        .request(&Request::Bind(Bind {
            token: token.to_owned(),
        }))
        .unwrap()
    {
        Response::Bound(_) => Ok(client),
        Response::Denied(d) => Err(d.reason),
        other => Err(format!("{other:?}")),
    }
}

/// Attenuate over a bound client (the child expires with its parent).
fn attenuate(client: &mut Client) -> Result<(String, TokenId), String> {
    match client
        .request(&Request::Attenuate(Attenuate {
            tools: Vec::new(),
            params: Vec::new(),
            // The parent's expiry (a child may not outlive it).
            ttl_secs: None,
            max_uses: None,
        }))
        .unwrap()
    {
        Response::Minted(m) => Ok((m.token, m.id)),
        Response::Denied(d) => Err(d.reason),
        other => Err(format!("{other:?}")),
    }
}

fn start(state: &Path) -> Broker {
    Broker::start(&config(state), &[])
}

/// `keyward-broker tokens --json` as root: the entry for `id`.
fn listed(broker: &Broker, id: TokenId) -> serde_json::Value {
    let ran = Ran::from(
        Command::new(binary("keyward-broker"))
            .args(["tokens", "--json", "--config"])
            .arg(&broker.config_path)
            .uid(0)
            .output()
            .unwrap(),
    );
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let list: serde_json::Value = serde_json::from_str(&ran.stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id.to_string().as_str())
        .cloned()
        .unwrap_or_else(|| panic!("{id} not listed: {list}"))
}

/// Start on `state` and expect a refusal naming the log and saying
/// `expect`; the log must be exactly as it was.
fn assert_refused_and_untouched(state: &Path, bytes: &[u8], expect: &str) {
    let log = state.join("tokens.log");
    std::fs::write(&log, bytes).unwrap();
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut broker = Broker::spawn(BrokerSetup {
        config: &config(state),
        ..BrokerSetup::default()
    });
    let status = broker.wait_exit();
    let stderr = broker.stderr();
    assert_eq!(
        std::fs::read(&log).unwrap(),
        bytes,
        "the log was changed:\n{stderr}"
    );
    assert!(!status.success(), "started:\n{stderr}");
    assert!(stderr.contains(&log.display().to_string()), "{stderr}");
    assert!(stderr.contains(expect), "expected {expect:?} in:\n{stderr}");
    assert!(stderr.contains("it was left as it is"), "{stderr}");
}

#[test]
fn a_log_the_broker_cannot_read_is_refused_at_start_and_left_untouched() {
    let (_base, state) = state_dir();
    // A real log with a revocation, as this broker writes it.
    let mut broker = start(&state);
    let (token, id) = mint(&broker.socket, 0, None).unwrap();
    revoke(&broker.socket, id);
    broker.stop();
    let log = state.join("tokens.log");
    let ours = std::fs::read(&log).unwrap();
    // The same log under a later format version's header, its last frame
    // torn (a newer broker killed mid-write): a valid log's torn tail is
    // cut off, but this one is not this broker's to judge.
    let header = frame(&[Record::Format(FORMAT_VERSION)]);
    assert!(ours.starts_with(&header));
    let mut newer = frame(&[Record::Format(99)]);
    newer.extend_from_slice(&ours[header.len()..]);
    let torn = frame(&[Record::Revoke(id, u64::MAX)]);
    newer.extend_from_slice(&torn[..torn.len() - 3]);
    assert_refused_and_untouched(&state, &newer, "format version 99");
    // Not a log at all (a file of zeros; before, cut to nothing and
    // replaced by an empty log, forgetting the revocation).
    assert_refused_and_untouched(&state, &vec![0u8; 8192], "is not a keyward token log");
    assert_refused_and_untouched(&state, b"[tokens]\nnot = 'ours'\n", "move it out");
    // The broker's own log back: the revocation holds.
    std::fs::write(&log, &ours).unwrap();
    let broker = start(&state);
    let refused = bind(&broker.socket, &token).map(drop).unwrap_err();
    assert!(refused.contains("has been revoked"), "{refused}");
}

#[test]
fn a_revoked_or_used_up_token_frees_its_slot_at_once() {
    let (_base, state) = state_dir();
    let broker = start(&state);
    let socket = &broker.socket;
    // Live tokens (all root's, the minter's): 5 of 5.
    let (_, first) = mint(socket, STRANGER_UID, None).unwrap();
    let (once, _) = mint(socket, 0, Some(1)).unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(mint(socket, STRANGER_UID, None).unwrap().1);
    }
    let full = mint(socket, STRANGER_UID, None).unwrap_err();
    assert!(full.contains("uid 0 already holds 5 live tokens"), "{full}");
    // Revoked: its slot is free at once.
    revoke(socket, first);
    held.push(mint(socket, STRANGER_UID, None).unwrap().1);
    let full = mint(socket, STRANGER_UID, None).unwrap_err();
    assert!(full.contains("uid 0 already holds 5 live tokens"), "{full}");
    // Used up: the same.
    let mut client = bind(socket, &once).unwrap();
    let reply = client.request(&echo_request("hi")).unwrap();
    assert!(matches!(reply, Response::Done(_)), "{reply:?}");
    held.push(mint(socket, STRANGER_UID, None).unwrap().1);
    let full = mint(socket, STRANGER_UID, None).unwrap_err();
    assert!(full.contains("uid 0 already holds 5 live tokens"), "{full}");
    // Attenuations: a revoked child frees its slot.
    for id in held {
        revoke(socket, id);
    }
    let (root, _) = mint(socket, 0, None).unwrap();
    let mut parent = bind(socket, &root).unwrap();
    let mut children = Vec::new();
    // 1 token + 3 children: 4 of 5 live, 3 of 3 attenuations.
    for _ in 0..3 {
        children.push(attenuate(&mut parent).unwrap().1);
    }
    let full = attenuate(&mut parent).unwrap_err();
    assert!(
        full.contains("already holds 3 live attenuated tokens"),
        "{full}"
    );
    revoke(socket, children[0]);
    attenuate(&mut parent).unwrap();
    let full = attenuate(&mut parent).unwrap_err();
    assert!(
        full.contains("already holds 3 live attenuated tokens"),
        "{full}"
    );
}

#[test]
fn origin_and_descendants_survive_a_restart() {
    let (_base, state) = state_dir();
    let broker = start(&state);
    let (root, root_id) = mint(&broker.socket, 0, None).unwrap();
    let (child, child_id) = attenuate(&mut bind(&broker.socket, &root).unwrap()).unwrap();
    let (grandchild, grandchild_id) =
        attenuate(&mut bind(&broker.socket, &child).unwrap()).unwrap();
    let before = listed(&broker, grandchild_id);
    assert_eq!(before["parent"], child_id.to_string().as_str(), "{before}");

    let broker = broker.kill9_and_restart();
    // The listing still knows who each token is for, its task and its
    // parent.
    let after = listed(&broker, grandchild_id);
    for key in ["audience", "task", "parent"] {
        assert!(!after[key].is_null(), "{key} lost in {after}");
        assert_eq!(after[key], before[key], "{key}: {after}");
    }
    assert_eq!(after["audience"]["uid"], 0);
    // A revocation record names the revoked token's ancestors and task.
    revoke(&broker.socket, child_id);
    let records = broker.audit_records();
    let record = records
        .iter()
        .rev()
        .find(|r| r["event"] == "revoke" && r["token_id"] == child_id.to_string().as_str())
        .unwrap();
    assert_eq!(
        record["parent_token_id"],
        root_id.to_string().as_str(),
        "{record}"
    );
    assert_eq!(record["task"], before["task"], "{record}");
    // Revoking the child took its descendant with it: listed as revoked,
    // refused at bind, and its slot is free (3 attenuations, 2 dead).
    assert_eq!(listed(&broker, grandchild_id)["revoked"], true);
    assert_eq!(listed(&broker, root_id)["revoked"], false);
    let refused = bind(&broker.socket, &grandchild).map(drop).unwrap_err();
    assert!(
        refused.contains(&format!("its parent token {child_id} has been revoked")),
        "{refused}"
    );
    // A bound descendant's records after the restart still carry the task
    // and its ancestors.
    let mut parent = bind(&broker.socket, &root).unwrap();
    let (fresh, fresh_id) = attenuate(&mut parent).unwrap();
    let mut bound = bind(&broker.socket, &fresh).unwrap();
    let reply = bound.request(&echo_request("hi")).unwrap();
    assert!(matches!(reply, Response::Done(_)), "{reply:?}");
    let task = listed(&broker, root_id)["task"].clone();
    let records = broker.audit_records();
    let call = records
        .iter()
        .rev()
        .find(|r| r["event"] == "call" && r["token_id"] == fresh_id.to_string().as_str())
        .unwrap();
    assert_eq!(call["task"], task, "{call}");
    assert_eq!(
        call["parent_token_id"],
        root_id.to_string().as_str(),
        "{call}"
    );
}

#[test]
fn attenuating_and_spending_in_a_loop_stops_at_the_bound_on_kept_records() {
    // Spent tokens free their slots, but their records are kept until
    // they expire: a sub-agent attenuating a one-use child and using it,
    // over and over, stops at 4 x max_attenuations_per_uid.
    let (_base, state) = state_dir();
    let broker = start(&state);
    let (token, _) = mint(&broker.socket, STRANGER_UID, None).unwrap();
    let mut made = 0;
    let refusal = loop {
        let child = Ran::from(broker.shim(
            STRANGER_UID,
            &["attenuate", "--token", &token, "--uses", "1"],
        ));
        if child.code != Some(0) {
            break child;
        }
        made += 1;
        let call = broker.call(
            STRANGER_UID,
            &["--token", child.stdout.trim(), "echo", "message=hi"],
        );
        assert_eq!(call.code, Some(0), "{call:?}");
        assert!(made <= 12, "attenuated and spent {made} times: no bound");
    };
    assert_eq!(made, 12, "{refusal:?}");
    assert!(
        refusal.stderr.contains(&format!(
            "uid {STRANGER_UID} has 12 revoked or used-up attenuated tokens that have not expired yet (4 times max_attenuations_per_uid)"
        )),
        "{refusal:?}"
    );
    // Others are not held back by it.
    mint(&broker.socket, 0, None).unwrap();
}
