// SPDX-License-Identifier: Apache-2.0
//! The audit trail in a real journal: a real `systemd-journald` runs in
//! private mount and pid namespaces (its own /run, /var/log/journal and
//! catalog database on tmpfs, so the host's journal is never touched), the
//! real broker writes to it with `--audit journald`, and `journalctl`
//! finds every decision the way docs/OPERATIONS.md tells admins to.
//!
//! What happened, not only what was allowed: an outcome record for each
//! performed call (an upstream 404 and 500, a response withheld for
//! leaking) joined to its decision by call id; who minted, attenuated
//! and revoked a token; every action of a token's descendants found by
//! the parent's id; the task hash `agent-shim task-hash` prints is the
//! one a real call is recorded under; the start record names version,
//! config and socket.
//!
//! Attacks: a process of another uid forges an entry with the broker's
//! identifier, `KEYWARD_*` fields and even `_UID=`; the documented
//! trusted-field query excludes it. journald dies: the broker refuses the
//! allowed call it cannot record and reports the record on stderr.
//!
//! [`journald_audit_end_to_end`] re-runs this test binary under `unshare`
//! to run [`in_private_journal`], which refuses to run anywhere else.
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use keyward_broker::journal;
use keyward_tests::upstream::{Hostile, Upstream};
use keyward_tests::{
    assert_no_secret, require_root, shim_command, Broker, BrokerSetup, Ran, PRINCIPAL_UID, SECRET,
    STRANGER_UID,
};

/// Set (to the host's mount namespace) only in the re-executed inner test.
const INNER: &str = "KEYWARD_TEST_PRIVATE_JOURNAL";
/// The broker's own uid, as `User=keyward` would give it.
const BROKER_UID: u32 = 61200;
const CALL_ID: &str = "2199d2a66c774d17a375b2811c3c4b75";
const START_ID: &str = "2f6f954213d045c7b7e2f07fb5a25a54";
const OUTCOME_ID: &str = "e19ef4951896423f89f6bafe41317827";
const MINT_ID: &str = "6d763ac31ec241fd8a83dbff57ce3acd";
const ATTENUATE_ID: &str = "767ff77ad6b84a3296efbdf565364149";
const REVOKE_ID: &str = "f72395a0f9f445e6b0c0e20b12483a96";

#[test]
fn journald_audit_end_to_end() {
    require_root();
    let host_ns = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child",
            "--",
        ])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "in_private_journal",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(INNER, host_ns)
        .stdin(Stdio::null())
        .stdout(out.as_file().try_clone().unwrap())
        .stderr(out.as_file().try_clone().unwrap())
        .spawn()
        .unwrap();
    // Bounded: the namespace (and every process in it) dies with unshare.
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut output = String::new();
    out.reopen().unwrap().read_to_string(&mut output).unwrap();
    assert!(
        status.is_some_and(|s| s.success()) && output.contains("1 passed"),
        "the private-journal test failed ({status:?}):\n{output}"
    );
}

#[test]
#[ignore = "run by journald_audit_end_to_end in private namespaces; it mounts over /run"]
fn in_private_journal() {
    // Never mount over the host's /run: only run where the outer test put
    // us, in a mount namespace of our own.
    let Some(host_ns) = std::env::var_os(INNER) else {
        return;
    };
    assert_ne!(
        std::fs::read_link("/proc/self/ns/mnt").unwrap().as_os_str(),
        host_ns,
        "not in a private mount namespace"
    );
    assert_eq!(std::process::id(), 1, "not in a private pid namespace");

    private_journal_dirs();
    audit_journald_needs_a_journal();
    let mut journald = Journald::start();

    let upstream = Upstream::start();
    let hostile = Hostile::start();
    let config = config(upstream.port, hostile.port);
    let mut broker = Broker::spawn(BrokerSetup {
        config: &config,
        credentials: &[("api.token", SECRET)],
        args: &["--audit", "journald"],
        run_as: Some(BROKER_UID),
        ..BrokerSetup::default()
    });
    let socket = broker.socket.clone();
    broker.wait_serving(&socket);

    // Decisions: one allowed call that uses the secret, two denials.
    let allowed = call(&socket, PRINCIPAL_UID, &["protected"]);
    assert_eq!(allowed.code, Some(0), "{allowed:?}");
    let stranger = call(&socket, STRANGER_UID, &["echo", "message=hi"]);
    assert_eq!(stranger.code, Some(3), "{stranger:?}");
    let bad_param = call(
        &socket,
        PRINCIPAL_UID,
        &["send_email", "to=x@evil.com", "subject=hi"],
    );
    assert_eq!(bad_param.code, Some(3), "{bad_param:?}");

    // A forgery from another uid: the broker's identifier, an "allow",
    // the call MESSAGE_ID, and a client-supplied _UID= (which journald
    // must drop).
    forge_entry(STRANGER_UID);

    let trusted = format!("_UID={BROKER_UID}");
    let denied = wait_for(&["KEYWARD_DECISION=deny", &trusted], 2);
    for entry in &denied {
        assert_eq!(entry["MESSAGE_ID"], CALL_ID, "{entry}");
        assert_eq!(entry["KEYWARD_EVENT"], "call", "{entry}");
        assert_eq!(entry["PRIORITY"], "5", "{entry}");
        assert_eq!(entry["SYSLOG_IDENTIFIER"], "keyward-broker", "{entry}");
        assert_eq!(entry["_COMM"], "keyward-broker", "{entry}");
        assert!(entry["KEYWARD_PEER_PID"].is_string(), "{entry}");
        assert!(
            field(entry, "KEYWARD_REASON").starts_with("call denied: "),
            "{entry}"
        );
        assert!(
            field(entry, "MESSAGE").starts_with("call denied: "),
            "{entry}"
        );
    }
    let by_uid = |uid: u32| {
        denied
            .iter()
            .find(|e| e["KEYWARD_PEER_UID"].as_str() == Some(uid.to_string().as_str()))
            .unwrap_or_else(|| panic!("no denial for uid {uid}: {denied:?}"))
    };
    assert!(field(by_uid(STRANGER_UID), "KEYWARD_REASON").contains("is not a principal"));
    let pattern = by_uid(PRINCIPAL_UID);
    assert_eq!(pattern["KEYWARD_TOOL"], "send_email");
    assert!(field(pattern, "KEYWARD_REASON").contains("x@evil.com"));

    // The allowed call, found by its MESSAGE_ID, from the broker alone.
    let allows = query(&[
        &format!("MESSAGE_ID={CALL_ID}"),
        "KEYWARD_DECISION=allow",
        &trusted,
    ]);
    assert_eq!(allows.len(), 1, "{allows:?}");
    let allow = &allows[0];
    assert_eq!(allow["KEYWARD_TOOL"], "protected");
    assert_eq!(allow["KEYWARD_PRINCIPAL"], "orchestrator");
    assert_eq!(allow["KEYWARD_PEER_UID"], PRINCIPAL_UID.to_string());
    assert_eq!(allow["PRIORITY"], "6");
    assert_eq!(allow["SYSLOG_FACILITY"], "10");
    let starts = query(&[&format!("MESSAGE_ID={START_ID}"), &trusted]);
    assert_eq!(starts.len(), 1);
    // The start record names the version, the config and the socket.
    assert_eq!(starts[0]["KEYWARD_VERSION"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        starts[0]["KEYWARD_CONFIG"],
        broker.config_path.to_str().unwrap()
    );
    assert_eq!(starts[0]["KEYWARD_SOCKET"], socket.to_str().unwrap());
    // "What was denied in the last hour", as OPERATIONS.md writes it.
    assert_eq!(
        query(&["--since=-1h", "KEYWARD_DECISION=deny", &trusted]).len(),
        2
    );

    // The forgery fools a query on self-reported fields only ...
    let naive = wait_for(
        &["SYSLOG_IDENTIFIER=keyward-broker", "KEYWARD_DECISION=allow"],
        2,
    );
    assert_eq!(naive.len(), 2, "the forged entry did not arrive: {naive:?}");
    let forged = naive
        .iter()
        .find(|e| e["MESSAGE"] == "forged: call allowed")
        .unwrap();
    // ... but journald recorded who really sent it, and dropped its _UID=.
    assert_eq!(forged["_UID"], STRANGER_UID.to_string(), "{forged}");

    // The catalog explains an entry (journalctl -x).
    if let Some(explained) = explain(&[&format!("MESSAGE_ID={CALL_ID}"), &trusted]) {
        assert!(
            explained.contains("Subject: keyward-broker call deny: tool send_email"),
            "{explained}"
        );
        assert!(explained.contains("A local process (uid"), "{explained}");
    }

    large_entry_goes_by_memfd();

    outcomes_are_joined_to_their_decisions(&socket, &trusted);
    token_lineage_and_principals(&broker, &socket, &trusted);

    // No form of the secret anywhere in the journal or the broker's output.
    assert_no_secret("the journal", &journal_text(&["-o", "export", "--all"]));
    assert_no_secret("broker stderr", &broker.stderr());

    audit_failure_refuses_the_call_and_keeps_the_record(&mut journald, &broker, &upstream, &socket);
    drop(broker);
    drop(journald);
}

fn config(port: u16, hostile: u16) -> String {
    format!(
        r#"
[broker]
socket = "{{socket}}"
socket_mode = "0666"
credentials_dir = "{{dir}}/creds"
state_dir = "{{dir}}/run/state"
call_timeout = "5s"

[[principal]]
name = "orchestrator"
uids = [{PRINCIPAL_UID}]
may_call = ["protected", "echo", "send_email", "missing", "broken", "leaky"]
may_delegate = ["echo"]

[[tool]]
name = "missing"
kind = "http"
credential = "api"
method = "GET"
url = "http://127.0.0.1:{port}/status/404"
auth = {{ bearer = true }}

[[tool]]
name = "broken"
kind = "http"
credential = "api"
method = "GET"
url = "http://127.0.0.1:{port}/status/500"
auth = {{ bearer = true }}

[[tool]]
name = "leaky"
kind = "http"
credential = "api"
method = "GET"
url = "http://127.0.0.1:{hostile}/base64-wrapped"
auth = {{ bearer = true }}

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
name = "send_email"
kind = "http"
credential = "api"
method = "POST"
url = "http://127.0.0.1:{port}/echo/send"
auth = {{ bearer = true }}
body_json = {{ to = "{{to}}", subject = "{{subject}}" }}
params.to = {{ type = "string", pattern = '^[a-z0-9._-]+@example\.com$' }}
params.subject = {{ type = "string", max_len = 200 }}

[[tool]]
name = "echo"
kind = "echo"
params.message = {{ type = "string", max_len = 100 }}
"#
    )
}

fn call(socket: &Path, uid: u32, args: &[&str]) -> Ran {
    let mut all = vec!["call"];
    all.extend_from_slice(args);
    Ran::from(shim_command(socket, uid, &all).output().unwrap())
}

/// An upstream 404, an upstream 500 and a response withheld for leaking
/// each leave one outcome record, found by the call id of its `allow`.
fn outcomes_are_joined_to_their_decisions(socket: &Path, trusted: &str) {
    for (tool, status, body) in [
        ("missing", "404", "status 404"),
        ("broken", "500", "status 500"),
    ] {
        let ran = call(socket, PRINCIPAL_UID, &[tool]);
        assert_eq!(ran.code, Some(1), "{ran:?}");
        let outcome = outcome_of(tool, trusted);
        assert_eq!(outcome["KEYWARD_STATUS"], status, "{outcome}");
        assert_eq!(
            outcome["KEYWARD_BYTES"],
            body.len().to_string(),
            "{outcome}"
        );
        assert_eq!(outcome["KEYWARD_WITHHELD"], "false", "{outcome}");
        assert_eq!(outcome["KEYWARD_DECISION"], "info", "{outcome}");
        assert_eq!(outcome["KEYWARD_PRINCIPAL"], "orchestrator", "{outcome}");
        assert!(
            field(&outcome, "KEYWARD_DURATION_MS")
                .parse::<u64>()
                .is_ok(),
            "{outcome}"
        );
        assert!(
            field(&outcome, "MESSAGE").contains(&format!("returned status {status}")),
            "{outcome}"
        );
    }
    let ran = call(socket, PRINCIPAL_UID, &["leaky"]);
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains("withheld"), "{ran:?}");
    let outcome = outcome_of("leaky", trusted);
    assert_eq!(outcome["KEYWARD_WITHHELD"], "true", "{outcome}");
    assert_eq!(outcome["KEYWARD_BYTES"], "0", "{outcome}");
    assert_eq!(outcome["KEYWARD_DECISION"], "error", "{outcome}");
    assert!(outcome.get("KEYWARD_STATUS").is_none(), "{outcome}");
}

/// The outcome record of the one allowed call of `tool`, found the way
/// OPERATIONS.md says: the allow's KEYWARD_CALL_ID, then the outcome's.
fn outcome_of(tool: &str, trusted: &str) -> Value {
    let tool_match = format!("KEYWARD_TOOL={tool}");
    let allows = wait_for(
        &[
            &format!("MESSAGE_ID={CALL_ID}"),
            "KEYWARD_DECISION=allow",
            &tool_match,
            trusted,
        ],
        1,
    );
    assert_eq!(allows.len(), 1, "{allows:?}");
    let call_id = field(&allows[0], "KEYWARD_CALL_ID");
    assert_eq!(call_id.len(), 32, "a 128-bit hex id: {call_id}");
    assert!(call_id.chars().all(|c| c.is_ascii_hexdigit()), "{call_id}");
    let outcomes = wait_for(
        &[
            &format!("MESSAGE_ID={OUTCOME_ID}"),
            &format!("KEYWARD_CALL_ID={call_id}"),
            trusted,
        ],
        1,
    );
    assert_eq!(outcomes.len(), 1, "one outcome per call: {outcomes:?}");
    assert_eq!(outcomes[0]["KEYWARD_TOOL"], tool);
    outcomes[0].clone()
}

/// Mint (orchestrator) -> child -> grandchild (the sub-agent attenuates);
/// the grandchild calls; the orchestrator revokes the child. Every record
/// says which principal, and a query on the first token's id finds
/// everything its descendants did.
fn token_lineage_and_principals(broker: &Broker, socket: &Path, trusted: &str) {
    let task = "send Alice the Q3 report";
    let shim = |uid: u32, args: &[&str]| {
        let ran = Ran::from(shim_command(socket, uid, args).output().unwrap());
        assert_eq!(ran.code, Some(0), "{args:?}: {ran:?}");
        ran
    };
    let sub = STRANGER_UID.to_string();
    let minted = shim(
        PRINCIPAL_UID,
        &["mint", "--tool", "echo", "--task", task, "--for-uid", &sub],
    );
    let token_id = |ran: &Ran| keyward_tests::minted_token_id(&ran.stderr);
    let (parent, parent_id) = (minted.stdout.trim().to_owned(), token_id(&minted));
    let child = shim(STRANGER_UID, &["attenuate", "--token", &parent]);
    let (child, child_id) = (child.stdout.trim().to_owned(), token_id(&child));
    let grandchild = shim(STRANGER_UID, &["attenuate", "--token", &child]);
    let (grandchild, grandchild_id) = (grandchild.stdout.trim().to_owned(), token_id(&grandchild));
    shim(
        STRANGER_UID,
        &["call", "--token", &grandchild, "echo", "message=hi"],
    );
    let revoked = Command::new(keyward_tests::binary("keyward-broker"))
        .args(["revoke", "--config"])
        .arg(&broker.config_path)
        .arg(&child_id)
        .uid(PRINCIPAL_UID)
        .gid(PRINCIPAL_UID)
        .output()
        .unwrap();
    assert!(revoked.status.success(), "{revoked:?}");

    // Who minted it, and under which task hash: the one task-hash prints.
    let mint = wait_for(
        &[
            &format!("MESSAGE_ID={MINT_ID}"),
            &format!("KEYWARD_TOKEN_ID={parent_id}"),
            trusted,
        ],
        1,
    );
    assert_eq!(mint[0]["KEYWARD_PRINCIPAL"], "orchestrator", "{}", mint[0]);
    let hash = shim(STRANGER_UID, &["task-hash", task]).stdout;
    let hash = hash.trim();
    assert_eq!(hash.len(), 64, "{hash}");
    assert_eq!(mint[0]["KEYWARD_TASK"], hash);

    // The grandchild's call: its own id, both ancestors, the task.
    let calls = wait_for(
        &[
            &format!("MESSAGE_ID={CALL_ID}"),
            &format!("KEYWARD_TOKEN_ID={grandchild_id}"),
            trusted,
        ],
        1,
    );
    assert_eq!(
        calls[0]["KEYWARD_TASK"], hash,
        "task-hash is the recorded one"
    );
    // (journald keeps a field's values, not their order.)
    let mut parents = values(&calls[0], "KEYWARD_PARENT_TOKEN_ID");
    parents.sort();
    let mut want = [child_id.clone(), parent_id.clone()];
    want.sort();
    assert_eq!(parents, want, "{}", calls[0]);
    // Everything a descendant did, by the first token's id: both
    // attenuations, the grandchild's bind, call and outcome, and the
    // revocation of the child.
    let descendants = wait_for(
        &[&format!("KEYWARD_PARENT_TOKEN_ID={parent_id}"), trusted],
        6,
    );
    let events: Vec<String> = descendants
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                field(e, "KEYWARD_EVENT"),
                field(e, "KEYWARD_TOKEN_ID")
            )
        })
        .collect();
    for want in [
        format!("attenuate {child_id}"),
        format!("attenuate {grandchild_id}"),
        format!("bind {grandchild_id}"),
        format!("call {grandchild_id}"),
        format!("outcome {grandchild_id}"),
        format!("revoke {child_id}"),
    ] {
        assert!(events.contains(&want), "{want} not in {events:?}");
    }
    assert!(
        !events.iter().any(|e| e.ends_with(&parent_id)),
        "the parent's own records are not its descendants': {events:?}"
    );
    let by_child = query(&[&format!("KEYWARD_PARENT_TOKEN_ID={child_id}"), trusted]);
    assert!(
        by_child
            .iter()
            .any(|e| e["KEYWARD_EVENT"] == "outcome"
                && e["KEYWARD_TOKEN_ID"] == grandchild_id.as_str()),
        "{by_child:?}"
    );
    // Who attenuated (the issuer's principal) and who revoked.
    for (message_id, id) in [(ATTENUATE_ID, &child_id), (REVOKE_ID, &child_id)] {
        let entry = &wait_for(
            &[
                &format!("MESSAGE_ID={message_id}"),
                &format!("KEYWARD_TOKEN_ID={id}"),
                "KEYWARD_DECISION=allow",
                trusted,
            ],
            1,
        )[0];
        assert_eq!(entry["KEYWARD_PRINCIPAL"], "orchestrator", "{entry}");
        assert_eq!(
            values(entry, "KEYWARD_PARENT_TOKEN_ID"),
            vec![parent_id.clone()]
        );
    }
}

/// Every value of a field that an entry may carry more than once
/// (journalctl prints several as an array).
fn values(entry: &Value, name: &str) -> Vec<String> {
    match &entry[name] {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect(),
        other => panic!("{name} is {other}"),
    }
}

/// Private tmpfs over everything journald writes or reads: /run (its
/// sockets and the volatile journal), /var/log/journal, the catalog
/// database; and a journald.conf that keeps it away from the kernel log.
/// They go away with the mount namespace.
fn private_journal_dirs() {
    mount_tmpfs(Path::new("/run"));
    for dir in ["/var/log/journal", "/var/lib/systemd/catalog"] {
        if Path::new(dir).is_dir() {
            mount_tmpfs(Path::new(dir));
        }
    }
    std::fs::create_dir_all("/run/systemd/journal").unwrap();
    std::fs::write(
        "/run/keyward-journald.conf",
        "[Journal]\nStorage=volatile\nReadKMsg=no\nForwardToSyslog=no\n\
         ForwardToKMsg=no\nForwardToConsole=no\nForwardToWall=no\n",
    )
    .unwrap();
    run(Command::new("mount").args([
        "--bind",
        "/run/keyward-journald.conf",
        "/etc/systemd/journald.conf",
    ]));
    install_catalog();
}

fn mount_tmpfs(dir: &Path) {
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "mode=0755", "tmpfs"])
        .arg(dir));
}

/// Build a catalog database holding our catalog, where `journalctl -x`
/// looks for it (the tmpfs over /var/lib/systemd/catalog).
fn install_catalog() {
    if !Path::new("/var/lib/systemd/catalog").is_dir() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let sources = root.path().join("usr/lib/systemd/catalog");
    std::fs::create_dir_all(&sources).unwrap();
    std::fs::copy(
        repo_file("systemd/keyward.catalog"),
        sources.join("keyward.catalog"),
    )
    .unwrap();
    run(Command::new("journalctl")
        .arg(format!("--root={}", root.path().display()))
        .arg("--update-catalog"));
    std::fs::copy(
        root.path().join("var/lib/systemd/catalog/database"),
        "/var/lib/systemd/catalog/database",
    )
    .unwrap();
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {out:?}");
}

/// With no journald, `--audit journald` refuses to start (and says why);
/// `--audit auto` falls back to stderr.
fn audit_journald_needs_a_journal() {
    assert!(!Path::new(journal::SOCKET).exists());
    let mut broker = Broker::spawn(BrokerSetup {
        config: &config(9, 9),
        credentials: &[("api.token", SECRET)],
        args: &["--audit", "journald"],
        ..BrokerSetup::default()
    });
    assert_eq!(broker.wait_exit().code(), Some(1));
    let err = broker.stderr();
    assert!(
        err.contains("cannot open the journal at /run/systemd/journal/socket"),
        "{err}"
    );
    assert!(!broker.socket.exists(), "served without an audit trail");

    let mut broker = Broker::spawn(BrokerSetup {
        config: &config(9, 9),
        credentials: &[("api.token", SECRET)],
        args: &["--audit", "auto"],
        ..BrokerSetup::default()
    });
    let socket = broker.socket.clone();
    broker.wait_serving(&socket);
    assert!(
        broker.audit_records().iter().any(|r| r["event"] == "start"),
        "{}",
        broker.stderr()
    );
}

/// A systemd-journald of our own; killed on drop.
struct Journald {
    child: Option<Child>,
}

impl Journald {
    fn start() -> Journald {
        let binary = [
            "/lib/systemd/systemd-journald",
            "/usr/lib/systemd/systemd-journald",
        ]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("systemd-journald is not installed");
        let _ = std::fs::remove_file(journal::SOCKET);
        let child = Command::new(binary)
            .env("SYSTEMD_LOG_TARGET", "console")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        // journald binds its native socket, then we probe it.
        while std::os::unix::net::UnixDatagram::unbound()
            .unwrap()
            .send_to(b"", journal::SOCKET)
            .is_err()
        {
            assert!(Instant::now() < deadline, "journald did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Journald { child: Some(child) }
    }

    /// SIGKILL: its socket file stays, but nothing reads it any more.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for Journald {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `journalctl --no-pager ARGS` as text.
fn journal_text(args: &[&str]) -> String {
    let out = Command::new("journalctl")
        .arg("--no-pager")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success() || out.status.code() == Some(1),
        "journalctl {args:?}: {out:?}"
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `journalctl -o json --all MATCHES`, parsed.
fn query(matches: &[&str]) -> Vec<Value> {
    let mut args = vec!["-o", "json", "--all"];
    args.extend_from_slice(matches);
    journal_text(&args)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// [`query`] until it has at least `n` entries (journald may not have
/// read the last datagrams yet); panics after 10 s.
fn wait_for(matches: &[&str], n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let entries = query(matches);
        if entries.len() >= n {
            return entries;
        }
        assert!(
            Instant::now() < deadline,
            "{matches:?}: {} entries, wanted {n}:\n{}",
            entries.len(),
            journal_text(&["-o", "verbose"])
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `journalctl -x` output for the last matching entry, if the catalog
/// could be installed.
fn explain(matches: &[&str]) -> Option<String> {
    if !Path::new("/var/lib/systemd/catalog/database").exists() {
        return None;
    }
    let mut args = vec!["-x", "-n", "1"];
    args.extend_from_slice(matches);
    Some(journal_text(&args))
}

/// A field's text: journalctl prints values with control characters (a
/// newline) as an array of bytes.
fn field(entry: &Value, name: &str) -> String {
    match &entry[name] {
        Value::String(s) => s.clone(),
        Value::Array(bytes) => {
            String::from_utf8(bytes.iter().map(|b| b.as_u64().unwrap() as u8).collect()).unwrap()
        }
        other => panic!("{name} is {other}"),
    }
}

/// `logger --journald` as `uid`: a native-protocol entry with whatever
/// fields the forger likes.
fn forge_entry(uid: u32) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("forged");
    std::fs::write(
        &path,
        format!(
            "MESSAGE=forged: call allowed\nMESSAGE_ID={CALL_ID}\n\
             SYSLOG_IDENTIFIER=keyward-broker\nKEYWARD_EVENT=call\n\
             KEYWARD_DECISION=allow\nKEYWARD_TOOL=protected\n\
             _UID={BROKER_UID}\n_COMM=keyward-broker\n"
        ),
    )
    .unwrap();
    std::os::unix::fs::chown(dir.path(), Some(uid), Some(uid)).unwrap();
    std::os::unix::fs::chown(&path, Some(uid), Some(uid)).unwrap();
    let out = Command::new("logger")
        .arg(format!("--journald={}", path.display()))
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    assert!(out.status.success(), "logger: {out:?}");
}

/// An entry too large for a datagram reaches journald through a sealed
/// memfd, whole; a value with a newline survives the binary encoding.
fn large_entry_goes_by_memfd() {
    let journal = journal::Journal::open(Path::new(journal::SOCKET)).unwrap();
    let big = "x".repeat(512 * 1024);
    journal
        .send(&[
            ("MESSAGE".to_owned(), b"large entry".to_vec()),
            (
                "SYSLOG_IDENTIFIER".to_owned(),
                b"keyward-memfd-test".to_vec(),
            ),
            ("KEYWARD_REASON".to_owned(), big.clone().into_bytes()),
            ("KEYWARD_TOOL".to_owned(), b"two\nlines".to_vec()),
        ])
        .unwrap();
    let entries = wait_for(&["SYSLOG_IDENTIFIER=keyward-memfd-test"], 1);
    assert_eq!(field(&entries[0], "KEYWARD_REASON").len(), big.len());
    assert_eq!(field(&entries[0], "KEYWARD_TOOL"), "two\nlines");
}

/// journald gone: the allowed call is refused, not made unrecorded; the
/// failure and the record itself are on stderr; once journald is back,
/// records flow again without restarting the broker.
fn audit_failure_refuses_the_call_and_keeps_the_record(
    journald: &mut Journald,
    broker: &Broker,
    upstream: &Upstream,
    socket: &Path,
) {
    journald.kill();
    let before = upstream.seen().len();
    let ran = call(socket, PRINCIPAL_UID, &["protected"]);
    assert_ne!(ran.code, Some(0), "an unrecorded call was made: {ran:?}");
    assert!(ran.stderr.contains("audit trail is unavailable"), "{ran:?}");
    assert_eq!(upstream.seen().len(), before, "the call reached upstream");
    let err = broker.stderr();
    assert!(
        err.contains("cannot write audit record to the journal"),
        "{err}"
    );
    let kept = err
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|r| r["decision"] == "allow" && r["tool"] == "protected")
        .unwrap_or_else(|| panic!("the record was not kept on stderr:\n{err}"));
    assert_eq!(kept["peer_uid"], PRINCIPAL_UID);

    *journald = Journald::start();
    let ran = call(socket, PRINCIPAL_UID, &["protected"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    wait_for(
        &[
            &format!("_UID={BROKER_UID}"),
            "KEYWARD_DECISION=allow",
            "KEYWARD_TOOL=protected",
        ],
        2,
    );
}
