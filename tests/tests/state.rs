// SPDX-License-Identifier: Apache-2.0
//! The token state under attack and under faults, with the real broker and
//! real files: a state directory or file another uid could write is
//! refused at start; `kill -9` in the middle of counted calls loses no use
//! and no revocation; a full file system stops minting but not
//! revocations; a read-only one is refused at start; a non-principal
//! attenuating in a loop stops at its cap.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_shim::client::Client;
use keyward_proto::token::{Audience, TokenId};
use keyward_proto::{Attenuate, Bind, Mint, Request, Response, Revoke};
use keyward_tests::{binary, echo_request, Broker, BrokerSetup, Ran, STRANGER_UID};

/// Root is the principal (so the test mints in-process); `{state}` is a
/// state directory the test owns, outside the harness's temp dir, so it
/// outlives one broker.
const CONFIG: &str = r#"
[broker]
socket = "{socket}"
socket_mode = "0666"
state_dir = "{state}"
max_token_ttl = "10m"
max_attenuations_per_uid = 20
{extra}

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

fn config(state: &Path, extra: &str) -> String {
    CONFIG
        .replace("{state}", state.to_str().unwrap())
        .replace("{extra}", extra)
}

/// A 0700 directory for state, and its parent.
fn state_dir() -> (tempfile::TempDir, PathBuf) {
    let base = tempfile::tempdir().unwrap();
    let state = base.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    (base, state)
}

fn connect(socket: &Path) -> Client {
    Client::connect(socket).unwrap()
}

/// Mint an `echo` token as root for `uid`.
fn mint(socket: &Path, uid: u32, max_uses: Option<u32>) -> Result<(String, TokenId), String> {
    let reply = connect(socket)
        .request(&Request::Mint(Mint {
            tools: vec!["echo".into()],
            params: Vec::new(),
            ttl_secs: Some(300),
            max_uses,
            task: "state test".into(),
            audience: Some(Audience { uid, gid: None }),
            exact_call: false,
        }))
        .unwrap();
    match reply {
        Response::Minted(m) => Ok((m.token, m.id)),
        Response::Denied(d) => Err(d.reason),
        other => Err(format!("{other:?}")),
    }
}

fn revoke(socket: &Path, id: TokenId) -> Result<(), String> {
    match connect(socket)
        .request(&Request::Revoke(Revoke { id }))
        .unwrap()
    {
        Response::Revoked(_) => Ok(()),
        Response::Denied(d) => Err(d.reason),
        other => Err(format!("{other:?}")),
    }
}

/// Bind `token` on a new connection; the denial if refused.
fn bind(socket: &Path, token: &str) -> Result<Client, String> {
    let mut client = connect(socket);
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

/// Calls with a bound client until one is refused: how many went ahead,
/// and the refusal.
fn call_until_denied(client: &mut Client) -> (usize, String) {
    let mut done = 0;
    loop {
        match client.request(&echo_request("hi")) {
            Ok(Response::Done(_)) => done += 1,
            Ok(Response::Denied(d)) => return (done, d.reason),
            other => return (done, format!("{other:?}")),
        }
    }
}

fn assert_refused_start(mut broker: Broker, expect: &str) {
    let status = broker.wait_exit();
    assert!(!status.success(), "started:\n{}", broker.stderr());
    let stderr = broker.stderr();
    assert!(stderr.contains(expect), "expected {expect:?} in:\n{stderr}");
}

#[test]
fn a_state_directory_anyone_may_write_is_refused_at_start() {
    let (_base, state) = state_dir();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let broker = Broker::spawn(BrokerSetup {
        config: &config(&state, ""),
        ..BrokerSetup::default()
    });
    assert_refused_start(broker, "is accessible to anyone (mode 0777)");
    // The same directory, made private, serves tokens.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let broker = Broker::start(&config(&state, ""), &[]);
    mint(&broker.socket, 0, None).unwrap();
}

#[test]
fn a_state_file_owned_by_another_uid_is_refused_at_start() {
    let (_base, state) = state_dir();
    let mut broker = Broker::start(&config(&state, ""), &[]);
    let (token, id) = mint(&broker.socket, 0, None).unwrap();
    revoke(&broker.socket, id).unwrap();
    broker.stop();
    // Another uid could now put back a log without the revocation.
    let log = state.join("tokens.log");
    std::os::unix::fs::chown(&log, Some(STRANGER_UID), Some(STRANGER_UID)).unwrap();
    let broker = Broker::spawn(BrokerSetup {
        config: &config(&state, ""),
        ..BrokerSetup::default()
    });
    assert_refused_start(broker, &format!("is owned by uid {STRANGER_UID}"));
    // A planted old-format file is judged the same way.
    std::os::unix::fs::chown(&log, Some(0), Some(0)).unwrap();
    let planted = state.join("tokens.json");
    std::fs::write(
        &planted,
        r#"{"version":1,"revoked":{},"uses":{},"minted":{}}"#,
    )
    .unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&planted, Some(STRANGER_UID), None).unwrap();
    let broker = Broker::spawn(BrokerSetup {
        config: &config(&state, ""),
        ..BrokerSetup::default()
    });
    assert_refused_start(broker, "tokens.json is owned by uid");
    std::fs::remove_file(&planted).unwrap();
    let broker = Broker::start(&config(&state, ""), &[]);
    let refused = bind(&broker.socket, &token).map(drop).unwrap_err();
    assert!(refused.contains("has been revoked"), "{refused}");
}

#[test]
fn kill_9_during_counted_calls_loses_no_use_and_no_revocation() {
    // Far more uses than go through before the kill lands (about 50 on an
    // idle machine), so the kill is always mid-flight.
    const USES: u32 = 400;
    let (_base, state) = state_dir();
    let broker = Broker::start(&config(&state, ""), &[]);
    let socket = broker.socket.clone();
    let (counted, _) = mint(&socket, 0, Some(USES)).unwrap();
    let (once, _) = mint(&socket, 0, Some(1)).unwrap();
    let (revoked, revoked_id) = mint(&socket, 0, None).unwrap();
    assert_eq!(call_until_denied(&mut bind(&socket, &once).unwrap()).0, 1);

    // Four connections call with the counted token as fast as they can.
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let mut client = bind(&socket, &counted).unwrap();
            let acknowledged = Arc::clone(&acknowledged);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match client.request(&echo_request("hi")) {
                        Ok(Response::Done(_)) => acknowledged.fetch_add(1, Ordering::SeqCst),
                        _ => return,
                    };
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while acknowledged.load(Ordering::SeqCst) < 10 {
        assert!(Instant::now() < deadline, "no counted calls went through");
        std::thread::sleep(Duration::from_millis(1));
    }
    revoke(&socket, revoked_id).unwrap();
    // Killed with calls in flight.
    let broker = broker.kill9_and_restart();
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        caller.join().unwrap();
    }
    let before = acknowledged.load(Ordering::SeqCst);
    assert!(
        before < USES as usize,
        "{before} calls went ahead before the kill, all of the token's {USES} uses: the kill was not mid-flight"
    );

    let (after, why) = call_until_denied(&mut bind(&broker.socket, &counted).unwrap());
    assert!(
        why.contains(&format!("used all of its {USES} uses")),
        "{why}"
    );
    assert!(
        before + after <= USES as usize,
        "{before} calls acknowledged before the kill and {after} after: more than {USES} uses"
    );
    let (again, why) = call_until_denied(&mut bind(&broker.socket, &once).unwrap());
    assert_eq!(again, 0, "a used-up token worked again");
    assert!(why.contains("used all of its 1 uses"), "{why}");
    let refused = bind(&broker.socket, &revoked).map(drop).unwrap_err();
    assert!(refused.contains("has been revoked"), "{refused}");
}

#[test]
fn a_non_principal_attenuating_in_a_loop_stops_at_its_cap() {
    let (_base, state) = state_dir();
    let broker = Broker::start(&config(&state, ""), &[]);
    let (token, _) = mint(&broker.socket, STRANGER_UID, None).unwrap();
    // One session each, past the per-session cap's reach.
    let mut made = 0;
    let mut refusal = None;
    for _ in 0..30 {
        let ran = Ran::from(broker.shim(STRANGER_UID, &["attenuate", "--token", &token]));
        if ran.code == Some(0) {
            made += 1;
        } else {
            refusal = Some(ran);
            break;
        }
    }
    assert_eq!(made, 20, "attenuations before the cap; then {refusal:?}");
    let refusal = refusal.unwrap();
    assert!(
        refusal.stderr.contains(&format!(
            "attenuation denied: uid {STRANGER_UID} already holds 20 live attenuated tokens (max_attenuations_per_uid)"
        )),
        "{refusal:?}"
    );
    // Others are not held back by it.
    let (other, _) = mint(&broker.socket, 0, None).unwrap();
    let mut client = bind(&broker.socket, &other).unwrap();
    let reply = client
        .request(&Request::Attenuate(Attenuate {
            tools: Vec::new(),
            params: Vec::new(),
            ttl_secs: Some(60),
            max_uses: Some(2),
        }))
        .unwrap();
    assert!(matches!(reply, Response::Minted(_)), "{reply:?}");
}

#[test]
fn minting_in_a_loop_stops_at_the_live_token_cap() {
    let (_base, state) = state_dir();
    let broker = Broker::start(&config(&state, "max_live_tokens_per_uid = 25"), &[]);
    let mut made = 0;
    let refusal = loop {
        match mint(&broker.socket, STRANGER_UID, None) {
            Ok(_) => made += 1,
            Err(why) => break why,
        }
        assert!(made <= 25, "minted past the cap");
    };
    assert_eq!(made, 25);
    assert_eq!(
        refusal,
        "mint denied: uid 0 already holds 25 live tokens (max_live_tokens_per_uid)"
    );
}

/// A mount namespace with a small tmpfs at `state`, kept alive by a
/// `sleep`; brokers are started inside it with `nsenter`.
struct SmallFs {
    holder: Child,
    state: PathBuf,
}

impl SmallFs {
    fn mount(base: &Path, size: &str) -> SmallFs {
        let state = base.join("state");
        std::fs::create_dir_all(&state).unwrap();
        let mounted = base.join("mounted");
        let script = format!(
            "mount -t tmpfs -o size={size},mode=0700 kw-state {} && touch {} && exec sleep 600",
            state.display(),
            mounted.display()
        );
        let holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !mounted.exists() {
            assert!(Instant::now() < deadline, "tmpfs not mounted");
            std::thread::sleep(Duration::from_millis(10));
        }
        SmallFs { holder, state }
    }

    /// A path inside the namespace, seen from outside it.
    fn inside(&self, path: &Path) -> PathBuf {
        let relative = path.strip_prefix("/").unwrap();
        PathBuf::from(format!("/proc/{}/root", self.holder.id())).join(relative)
    }

    fn run(&self, args: &[&str]) -> std::process::ExitStatus {
        Command::new("nsenter")
            .arg(format!("--mount=/proc/{}/ns/mnt", self.holder.id()))
            .args(args)
            .status()
            .unwrap()
    }

    /// Start a broker inside the namespace; its stderr goes to `log`.
    fn broker(&self, config: &Path, log: &Path) -> Running {
        let stderr = std::fs::File::create(log).unwrap();
        Command::new("nsenter")
            .arg(format!("--mount=/proc/{}/ns/mnt", self.holder.id()))
            .arg(binary("keyward-broker"))
            .args(["serve", "--audit", "stderr", "--config"])
            .arg(config)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map(Running)
            .unwrap()
    }

    /// Fill the file system (a root-only file, so the state directory
    /// stays acceptable).
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.inside(&self.state.join("filler"));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        let chunk = vec![0x55u8; 4096];
        while file.write_all(&chunk).is_ok() {}
        // Byte by byte into the last page.
        while file.write_all(&[1]).is_ok() {}
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

fn wait_serving(Running(child): &mut Running, socket: &Path, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Client::connect(socket).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "broker exited ({status}):\n{}",
                std::fs::read_to_string(log).unwrap()
            );
        }
        assert!(Instant::now() < deadline, "broker did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A broker started by the test, killed when dropped (also when the test
/// fails half-way).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kill(running: Running) {
    drop(running);
}

#[test]
fn a_full_file_system_stops_minting_but_not_revocations() {
    keyward_tests::require_root();
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let fs = SmallFs::mount(base.path(), "512k");
    let socket = base.path().join("broker.sock");
    let config_path = base.path().join("broker.toml");
    let text = config(&fs.state, "").replace("{socket}", socket.to_str().unwrap());
    std::fs::write(&config_path, text).unwrap();
    let log = base.path().join("broker.log");

    let mut broker = fs.broker(&config_path, &log);
    wait_serving(&mut broker, &socket, &log);
    let (token, id) = mint(&socket, 0, None).unwrap();
    let (counted, _) = mint(&socket, 0, Some(5)).unwrap();
    let filler = fs.fill();

    // Mints go on only while the reserve past the log's end holds (its
    // last page may have room for a few).
    let refused = (0..200)
        .find_map(|_| mint(&socket, 0, None).err())
        .expect("minting went on with the file system full");
    assert!(
        refused.contains("the file system is full; minting and counted uses are refused"),
        "{refused}"
    );
    let (done, why) = call_until_denied(&mut bind(&socket, &counted).unwrap());
    assert!(done < 5, "every use went ahead on a full file system");
    assert!(why.contains("could not be counted"), "{why}");
    // Revocations still go to disk: many (more than the slack in the
    // log's last page), then the one that matters.
    // (Each is a record of its own, even of the same id; an id this
    // broker never issued is refused.)
    for _ in 0..200u8 {
        revoke(&socket, id).unwrap();
    }
    revoke(&socket, id).unwrap();
    kill(broker);

    // Still full after a crash: it starts, and the revocation held.
    let mut broker = fs.broker(&config_path, &log);
    wait_serving(&mut broker, &socket, &log);
    let refused = bind(&socket, &token).map(drop).unwrap_err();
    assert!(refused.contains("has been revoked"), "{refused}");
    std::fs::remove_file(&filler).unwrap();
    mint(&socket, 0, None).unwrap();
    kill(broker);

    // A read-only state directory: refused at start, clearly.
    let remount = ["mount", "-o", "remount,ro", fs.state.to_str().unwrap()];
    assert!(fs.run(&remount).success());
    let mut broker = fs.broker(&config_path, &log);
    let status = broker.0.wait().unwrap();
    assert!(!status.success());
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(
        stderr.contains("is on a read-only file system; refusing to start"),
        "{stderr}"
    );
}

/// An existing `tokens.json` of the first format is imported once: its
/// revocations and use counts hold, and the file is gone.
#[test]
fn an_old_tokens_json_is_imported_at_start() {
    let (_base, state) = state_dir();
    let mut broker = Broker::start(&config(&state, ""), &[]);
    let (revoked, revoked_id) = mint(&broker.socket, 0, None).unwrap();
    let (used, used_id) = mint(&broker.socket, 0, Some(2)).unwrap();
    let (fresh, _) = mint(&broker.socket, 0, Some(2)).unwrap();
    broker.stop();
    // What the old broker would have left: no log, one JSON document.
    std::fs::remove_file(state.join("tokens.log")).unwrap();
    let far = 4_000_000_000u64;
    let old = format!(
        r#"{{"version":1,"revoked":{{"{revoked_id}":{far}}},"uses":{{"{used_id}":2}},"minted":{{"{used_id}":{{"issuer":"ops","expires":{far},"max_uses":2}}}},"high_water":0}}"#
    );
    let json = state.join("tokens.json");
    std::fs::write(&json, old).unwrap();
    std::fs::set_permissions(&json, std::fs::Permissions::from_mode(0o600)).unwrap();

    let broker = Broker::start(&config(&state, ""), &[]);
    assert!(!json.exists(), "tokens.json left behind after the import");
    let refused = bind(&broker.socket, &revoked).map(drop).unwrap_err();
    assert!(refused.contains("has been revoked"), "{refused}");
    let (done, why) = call_until_denied(&mut bind(&broker.socket, &used).unwrap());
    assert_eq!(done, 0, "use counts were not imported");
    assert!(why.contains("used all of its 2 uses"), "{why}");
    assert_eq!(
        call_until_denied(&mut bind(&broker.socket, &fresh).unwrap()).0,
        2
    );
}
