// SPDX-License-Identifier: Apache-2.0
//! The broker under abuse by a hostile local peer: no uid can starve the
//! others or lock root out, requests are rate-limited per uid, a channel
//! dies with the connection it was passed over, and a client never hangs
//! on a broker that does not answer.
//!
//! The broker here runs with 1024 descriptors (systemd's default soft
//! limit, and where the original attack took it), set as the hard limit
//! of this test process so the broker inherits it.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyward_tests::{binary, Broker, BrokerSetup, Ran, PRINCIPAL_UID, STRANGER_UID};

/// A second principal, served alongside the attacker.
const OTHER_UID: u32 = 61002;

const CONFIG: &str = r#"
[broker]
socket = "{socket}"
socket_mode = "0666"
state_dir = "{dir}/state"
{extra}

[[principal]]
name = "orchestrator"
uids = [61000]
may_call = ["echo"]
may_delegate = ["echo"]

[[principal]]
name = "other"
uids = [61002]
may_call = ["echo"]

[[tool]]
name = "echo"
kind = "echo"
params.message = { type = "string", max_len = 100 }
"#;

/// The descriptor limit the brokers of these tests run with.
const FD_LIMIT: u64 = 1024;

fn limit_fds() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if hard > FD_LIMIT {
        setrlimit(Resource::RLIMIT_NOFILE, FD_LIMIT, FD_LIMIT).unwrap();
    }
}

fn start(extra: &str) -> Broker {
    limit_fds();
    let config = CONFIG.replace("{extra}", extra);
    Broker::start_with(BrokerSetup {
        config: &config,
        ..BrokerSetup::default()
    })
}

/// A token the orchestrator minted for the stranger (not a principal),
/// in a file the stranger can read; and its id.
fn token_for_stranger(broker: &Broker) -> (PathBuf, String) {
    let uid = STRANGER_UID.to_string();
    let ran = Ran::from(broker.shim(
        PRINCIPAL_UID,
        &["mint", "--tool", "echo", "--for-uid", &uid],
    ));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let id = keyward_tests::minted_token_id(&ran.stderr);
    let file = broker.dir.path().join("stranger.token");
    std::fs::write(&file, ran.stdout.trim()).unwrap();
    std::os::unix::fs::chown(&file, Some(STRANGER_UID), Some(STRANGER_UID)).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    (file, id)
}

/// A running `kw-test-peer`, its stdout read line by line; it ends when
/// dropped (its stdin closes).
struct Peer {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Peer {
    fn start(args: &[&str]) -> Peer {
        let mut child = Command::new(binary("kw-test-peer"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Peer { child, lines }
    }

    fn line(&mut self) -> String {
        self.lines.next().unwrap().unwrap()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Start the 32 × 16 flood; returns it and what the broker took.
fn flood(broker: &Broker, token: &Path) -> (Peer, usize, usize) {
    let mut peer = Peer::start(&[
        "flood",
        broker.socket.to_str().unwrap(),
        &STRANGER_UID.to_string(),
        token.to_str().unwrap(),
        "32",
        "16",
    ]);
    let line = peer.line();
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words.len(), 4, "{line}");
    (peer, words[1].parse().unwrap(), words[3].parse().unwrap())
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn echo_as(broker: &Broker, uid: u32) -> Ran {
    Ran::from(broker.shim(uid, &["call", "echo", "message=hi"]))
}

/// `keyward-broker revoke ID` as root, and how long it took. An empty
/// `$KEYWARD_SOCKET` counts as unset (the client's rule): the socket is the
/// configuration's.
fn revoke(broker: &Broker, id: &str) -> (Ran, Duration) {
    let started = Instant::now();
    let ran = Ran::from(
        Command::new(binary("keyward-broker"))
            .env("KEYWARD_SOCKET", "")
            .args(["revoke", "--config"])
            .arg(&broker.config_path)
            .arg(id)
            .output()
            .unwrap(),
    );
    (ran, started.elapsed())
}

#[test]
fn a_flood_of_channels_starves_no_other_principal_and_not_root() {
    let broker = start("");
    let (token, id) = token_for_stranger(&broker);
    let (flood, bound, channels) = flood(&broker, &token);
    // Channels count against the uid's cap like connections.
    assert!(
        bound + channels <= 32,
        "the stranger holds {bound} connections and {channels} channels"
    );
    assert!(open_fds(broker.pid()) < FD_LIMIT as usize - 100);
    // Other principals are served meanwhile.
    for uid in [PRINCIPAL_UID, OTHER_UID] {
        let ran = echo_as(&broker, uid);
        assert_eq!(ran.code, Some(0), "uid {uid} starved: {ran:?}");
    }
    // Root revokes the attacker's token; the flood's sessions hold on, but
    // it can make no further call.
    let (ran, took) = revoke(&broker, &id);
    assert_eq!(ran.code, Some(0), "{ran:?} after {took:?}");
    assert!(ran.stdout.contains("revoked"), "{ran:?}");
    let records = broker.audit_records();
    assert!(
        records.iter().any(|r| r["reason"].as_str().is_some_and(
            |s| s.contains("already holds its maximum of 32 connections and channels")
        )),
        "no refusal was audited"
    );
    drop(flood);
}

#[test]
fn root_keeps_a_reserve_when_everything_else_is_taken() {
    // No per-uid or per-token cap to speak of: only the global cap and
    // its reserve stand between the flood and the descriptor limit.
    let broker = start("max_connections_per_uid = 4000\nmax_sessions_per_token = 4000");
    let (token, id) = token_for_stranger(&broker);
    let (flood, bound, channels) = flood(&broker, &token);
    // (1024 - 128) / 2 = 448 sessions, 32 of them kept for root and admins.
    assert_eq!(bound + channels, 448 - 32, "{bound} + {channels}");
    assert!(open_fds(broker.pid()) < FD_LIMIT as usize - 100);
    // Another principal is refused, plainly and at once...
    let ran = echo_as(&broker, OTHER_UID);
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains("maximum of 448 sessions"), "{ran:?}");
    // ...but root still gets in, and revokes.
    let (ran, took) = revoke(&broker, &id);
    assert_eq!(ran.code, Some(0), "{ran:?} after {took:?}");
    drop(flood);
    // And with the flood gone, everybody is served again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ran = echo_as(&broker, OTHER_UID);
        if ran.code == Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "never served again: {ran:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_uid_over_its_request_rate_is_told_so() {
    let broker = start("requests_per_second = 1\nrequest_burst = 5");
    let mut burst = Peer::start(&[
        "burst",
        broker.socket.to_str().unwrap(),
        &PRINCIPAL_UID.to_string(),
        "8",
    ]);
    let outcomes: Vec<String> = (0..8).map(|_| burst.line()).collect();
    // The burst, then a refusal; the broker reads that connection's next
    // request only once the budget has room again (1 a second here), so
    // a peer that ignores refusals gets one answer a second, not a
    // stream of refusals.
    assert_eq!(
        outcomes,
        ["ok", "ok", "ok", "ok", "ok", "rate", "ok", "rate"],
        "{outcomes:?}"
    );
    drop(burst);
    // Its neighbour has a budget of its own.
    let ran = echo_as(&broker, OTHER_UID);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let ran = echo_as(&broker, PRINCIPAL_UID);
    if ran.code != Some(0) {
        assert!(ran.stderr.contains("rate limited: uid 61000"), "{ran:?}");
    }
    // One record for the run of refusals, not one each.
    let limited = broker
        .audit_records()
        .into_iter()
        .filter(|r| {
            r["reason"]
                .as_str()
                .is_some_and(|s| s.starts_with("rate limited"))
        })
        .count();
    assert!((1..=2).contains(&limited), "{limited} records");
}

#[test]
fn a_channel_dies_with_the_connection_it_was_passed_over() {
    let broker = start("");
    let (token, _) = token_for_stranger(&broker);
    let mut orphan = Peer::start(&[
        "orphan",
        broker.socket.to_str().unwrap(),
        &STRANGER_UID.to_string(),
        token.to_str().unwrap(),
    ]);
    assert_eq!(orphan.line(), "before ok");
    // The "shim" has exited; its child still holds the bound connection
    // and a channel over it.
    assert_eq!(orphan.line(), "channel closed");
    assert_eq!(orphan.line(), "new closed");
}

/// Run `cmd` for at most 30 s; `None` if it had to be killed.
fn run_bounded(mut cmd: Command) -> Option<(Ran, Duration)> {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            child.kill().unwrap();
            child.wait().unwrap();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Some((
        Ran::from(child.wait_with_output().unwrap()),
        started.elapsed(),
    ))
}

#[test]
fn clients_give_up_on_a_broker_that_never_answers() {
    // A socket nobody accepts on: the connection is queued, the Hello
    // never answered.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("silent.sock");
    let mut silent = Peer::start(&["silent", socket.to_str().unwrap()]);
    assert_eq!(silent.line(), "ready");
    let mut shim = Command::new(binary("agent-shim"));
    shim.args(["call", "echo", "message=hi"])
        .env("KEYWARD_SOCKET", &socket)
        .uid(PRINCIPAL_UID)
        .gid(PRINCIPAL_UID);
    // A stopped broker: same for `keyward-broker revoke`.
    let mut broker = start("");
    let (_, id) = token_for_stranger(&broker);
    broker.signal(nix::sys::signal::Signal::SIGSTOP);
    let mut revoke = Command::new(binary("keyward-broker"));
    revoke
        .args(["revoke", "--config"])
        .arg(&broker.config_path)
        .arg(&id);
    let shim = std::thread::spawn(move || run_bounded(shim));
    let revoked = run_bounded(revoke);
    let shim = shim.join().unwrap();
    broker.signal(nix::sys::signal::Signal::SIGCONT);
    for (what, outcome) in [
        ("agent-shim call", shim),
        ("keyward-broker revoke", revoked),
    ] {
        let (ran, _) = outcome.unwrap_or_else(|| panic!("{what} hung"));
        assert_eq!(ran.code, Some(1), "{what}: {ran:?}");
        assert!(
            ran.stderr
                .contains("did not answer the handshake within 10 s; it may be stopped"),
            "{what}: {ran:?}"
        );
    }
    let _ = broker.stop();
}

/// The load bench (`benches/abuse.rs`) in short, for correctness only:
/// while a principal floods connections, channels, mints and calls,
/// another principal's direct and counted-token calls all succeed.
#[test]
fn a_flooding_principal_causes_no_errors_for_another() {
    let broker = start("");
    let mint = |uid: u32, extra: &[&str]| {
        let mut args = vec!["mint", "--tool", "echo"];
        args.extend_from_slice(extra);
        let ran = Ran::from(broker.shim(uid, &args));
        assert_eq!(ran.code, Some(0), "{ran:?}");
        let file = broker.dir.path().join(format!("token-{uid}"));
        std::fs::write(&file, ran.stdout.trim()).unwrap();
        std::os::unix::fs::chown(&file, Some(uid), Some(uid)).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        file
    };
    // The orchestrator floods with a token of its own; "other" cannot
    // mint, so the orchestrator mints its counted token for it.
    let flood_token = mint(PRINCIPAL_UID, &[]);
    let other = OTHER_UID.to_string();
    let counted = mint(PRINCIPAL_UID, &["--uses", "100000", "--for-uid", &other]);
    let mut flood = Peer::start(&[
        "stress",
        broker.socket.to_str().unwrap(),
        &PRINCIPAL_UID.to_string(),
        flood_token.to_str().unwrap(),
        "4",
    ]);
    let mut measured = Peer::start(&[
        "measure",
        broker.socket.to_str().unwrap(),
        &OTHER_UID.to_string(),
        counted.to_str().unwrap(),
        "3",
    ]);
    for kind in ["direct", "token"] {
        let line = measured.line();
        let w: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(w[0], kind, "{line}");
        assert!(w[3].parse::<usize>().unwrap() > 0, "no call made: {line}");
        assert_eq!(w[4], "0", "errors for uid {OTHER_UID}: {line}");
    }
    let flooded = flood.line();
    assert!(flooded.starts_with("connections "), "{flooded}");
}

/// Refused channels (here `Channel` messages carrying no socket) in a
/// flood: each takes from the uid's request budget like any request, no
/// reply goes out on the shared connection, and the refusals are recorded
/// at most once a second, not once each.
#[test]
fn a_flood_of_refused_channels_is_rate_limited_and_not_recorded_each() {
    // A budget the flood runs through quickly.
    let broker = start("requests_per_second = 100000\nrequest_burst = 100");
    let (token, _) = token_for_stranger(&broker);
    let started = Instant::now();
    let mut flood = Peer::start(&[
        "channel-flood",
        broker.socket.to_str().unwrap(),
        &STRANGER_UID.to_string(),
        token.to_str().unwrap(),
        "2000",
    ]);
    let line = flood.line();
    let took = started.elapsed();
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words.len(), 6, "{line}");
    // Only replies to calls came back, and the call went through.
    assert!(["ok", "rate"].contains(&words[1]), "{line}");
    assert_eq!(words[5], "0", "replies on the shared connection: {line}");
    let records = broker.audit_records();
    let reason = |r: &serde_json::Value, what: &str| {
        r["reason"].as_str().is_some_and(|s| s.starts_with(what))
    };
    // The flood took from the stranger's budget...
    assert!(
        records.iter().any(|r| reason(r, "rate limited: uid 61001")),
        "Channel messages are not rate-limited"
    );
    // ...and its 2 000 refusals made a record a second at most.
    let refused = records
        .iter()
        .filter(|r| reason(r, "channel refused"))
        .count();
    let most = 2 + took.as_secs() as usize;
    assert!(
        (1..=most).contains(&refused),
        "{refused} channel refusals recorded in {took:?}"
    );
    // The stranger's channels still work.
    let mut burst = Peer::start(&[
        "channel-burst",
        broker.socket.to_str().unwrap(),
        &STRANGER_UID.to_string(),
        token.to_str().unwrap(),
        "2",
    ]);
    assert_eq!(burst.line(), "ok ok");
}

/// A channel takes from the uid's request budget: past it, the passed
/// socket is closed unanswered.
#[test]
fn channels_take_from_the_request_budget() {
    let broker = start("requests_per_second = 1\nrequest_burst = 5");
    let (token, _) = token_for_stranger(&broker);
    let mut burst = Peer::start(&[
        "channel-burst",
        broker.socket.to_str().unwrap(),
        &STRANGER_UID.to_string(),
        token.to_str().unwrap(),
        "8",
    ]);
    let line = burst.line();
    let outcomes: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(outcomes.len(), 8, "{line}");
    // The Bind took one of the 5; then 4 channels, then a refusal (after
    // which the broker reads the connection again once the budget has
    // room, a second later).
    assert_eq!(outcomes[..5], ["ok", "ok", "ok", "ok", "closed"], "{line}");
}

const ROOT_CONFIG: &str = r#"
[broker]
socket = "{socket}"
socket_mode = "0666"
state_dir = "{dir}/state"
{extra}

[[principal]]
name = "root"
uids = [0]
may_call = ["echo"]
may_delegate = ["echo"]

[[tool]]
name = "echo"
kind = "echo"
params.message = { type = "string", max_len = 100 }
"#;

/// A broker where root is the principal, a token root minted for itself
/// (as an admin would for a sandboxed agent it runs), and root's
/// connection that minted it, kept open.
fn root_broker(extra: &str) -> (Broker, String, agent_shim::client::Client) {
    use agent_shim::client::Client;
    limit_fds();
    let config = ROOT_CONFIG.replace("{extra}", extra);
    let broker = Broker::start_with(BrokerSetup {
        config: &config,
        ..BrokerSetup::default()
    });
    let mut client = Client::connect(&broker.socket).unwrap();
    let mint = keyward_proto::Request::Mint(keyward_proto::Mint {
        tools: vec!["echo".into()],
        params: vec![],
        ttl_secs: None,
        max_uses: None,
        task: "sandbox".into(),
        audience: None,
        exact_call: false,
    });
    let token = match client.request(&mint).unwrap() {
        keyward_proto::Response::Minted(m) => m.token,
        other => panic!("{other:?}"),
    };
    (broker, token, client)
}

fn bound_as_root(broker: &Broker, token: &str) -> agent_shim::client::Client {
    let mut client = agent_shim::client::Client::connect(&broker.socket).unwrap();
    let bound = client.bind(token).unwrap();
    assert!(bound.is_ok(), "{bound:?}");
    client
}

/// Root's token-bound sessions are no root sessions: the reserve is for
/// root's own connections, and a sandbox root (or an admin) runs cannot
/// take it with channels, nor bind a connection that sits in it.
#[test]
fn a_session_bound_to_roots_token_takes_no_reserved_slot() {
    use agent_shim::client::Client;
    let (broker, token, _minted_on) = root_broker("max_sessions = 6\nreserved_sessions = 3");
    // Root's connection and one bound session, then channels over it: all
    // but the reserve of 3 is 3 sessions, so one channel fits and no more.
    let shared = bound_as_root(&broker, &token).into_fd();
    let mut channels = Vec::new();
    for _ in 0..5 {
        if let Ok(channel) = Client::open_channel(&shared) {
            channels.push(channel);
        }
    }
    assert_eq!(channels.len(), 1, "channels took the reserve");
    // Root's own connection takes the reserve...
    let mut own = Client::connect(&broker.socket).unwrap();
    assert!(matches!(
        own.call("echo", &[("message".into(), "hi".into())]),
        Ok(keyward_proto::Response::Done(_))
    ));
    // ...but a connection in the reserve cannot be bound to a token.
    let mut in_reserve = Client::connect(&broker.socket).unwrap();
    match in_reserve.bind(&token).unwrap() {
        Err(keyward_proto::Response::Denied(d)) => {
            assert!(d.reason.contains("maximum of 6 sessions"), "{d:?}")
        }
        other => panic!("bound in the reserve: {other:?}"),
    }
    // The reserve is there for root still: the sixth session.
    let mut last = Client::connect(&broker.socket).unwrap();
    assert!(matches!(
        last.call("echo", &[("message".into(), "hi".into())]),
        Ok(keyward_proto::Response::Done(_))
    ));
}

/// Root's own requests are not rate-limited; its token-bound ones are.
#[test]
fn a_session_bound_to_roots_token_is_rate_limited() {
    let (broker, token, mut own) = root_broker("requests_per_second = 1\nrequest_burst = 3");
    let params = [("message".to_owned(), "hi".to_owned())];
    let mut bound = bound_as_root(&broker, &token);
    // (The Bind was root's own request.)
    for _ in 0..3 {
        let reply = bound.call("echo", &params).unwrap();
        assert!(
            matches!(reply, keyward_proto::Response::Done(_)),
            "{reply:?}"
        );
    }
    match bound.call("echo", &params).unwrap() {
        keyward_proto::Response::Error(e) => {
            assert!(e.message.starts_with("rate limited: uid 0"), "{e:?}")
        }
        other => panic!("not rate-limited: {other:?}"),
    }
    for _ in 0..20 {
        let reply = own.call("echo", &params).unwrap();
        assert!(
            matches!(reply, keyward_proto::Response::Done(_)),
            "{reply:?}"
        );
    }
}

/// A message passing more descriptors than the broker takes (8): the
/// kernel installs those that fit and truncates the rest; every one
/// installed is closed again, and the peer is told and disconnected. (The
/// broker used to drop the message without looking at the ones installed:
/// 8 descriptors leaked per connection, until it had none left.)
#[test]
fn descriptors_beyond_what_a_message_may_pass_are_all_closed() {
    use keyward_tests::RawConn;
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    let broker = start("");
    let idle = open_fds(broker.pid());
    let null = std::fs::File::open("/dev/null").unwrap();
    let fds = [null.as_raw_fd(); 12];
    let message = keyward_proto::encode(&keyward_proto::Request::Tools).unwrap();
    for _ in 0..20 {
        let conn = RawConn::connect(&broker.socket);
        conn.hello();
        sendmsg::<()>(
            conn.fd.as_raw_fd(),
            &[std::io::IoSlice::new(&message)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .unwrap();
        match conn.recv() {
            Some(keyward_proto::Response::Error(e)) => {
                assert!(e.message.contains("unexpected control data"), "{e:?}")
            }
            other => panic!("{other:?}"),
        }
        assert!(conn.recv().is_none(), "the connection stayed open");
    }
    // Every session has ended (each closed its end first): back to idle.
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_fds(broker.pid()) > idle {
        assert!(
            Instant::now() < deadline,
            "the broker holds {} descriptors, {idle} when idle",
            open_fds(broker.pid())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
