// SPDX-License-Identifier: Apache-2.0
//! What an admin or a new user runs into first, done for real:
//!
//! - a kernel without `SO_PEERPIDFD` (forced with
//!   `KEYWARD_TEST_NO_PEERPIDFD=1`) under a `/proc` that hides other users'
//!   processes (`hidepid=invisible`, as `ProtectProc=invisible` mounts it,
//!   here in a private mount namespace): the broker refuses to start and
//!   names the fix, instead of refusing every client;
//! - `keyward-broker check` as `ExecStartPre=`/`ExecReload=` run it: its
//!   exit status on a bad policy, on a credential the unit does not load,
//!   on a socket unit that listens elsewhere; with `--credentials`, on a
//!   credential that is not in the credentials directory;
//! - principals by user and group name, and supplementary groups;
//! - the warning about a credential sent over plain `http://`;
//! - connection errors that say what to do, and `--json` errors;
//! - `serve --example`: its commands work as printed, and its directory
//!   goes away on Ctrl-C.
#![allow(clippy::unwrap_used)]

use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keyward_tests::upstream::Upstream;
use keyward_tests::{
    binary, require_root, shim_command, Broker, BrokerSetup, Ran, PRINCIPAL_UID, STRANGER_UID,
};

/// The broker runs as this uid where the test needs it unprivileged.
const BROKER_UID: u32 = 61100;

const ECHO: &str = r#"
[broker]
socket = "{socket}"
socket_mode = "0666"

[[principal]]
name = "tester"
uids = [61000]
may_call = ["echo", "missing"]

[[tool]]
name = "echo"
kind = "echo"
params.message = { type = "string", max_len = 100 }

[[tool]]
name = "missing"
kind = "http"
method = "GET"
url = "http://127.0.0.1:{port}/protected"
"#;

fn run(cmd: &mut Command) -> Ran {
    Ran::from(cmd.stdin(Stdio::null()).output().unwrap())
}

fn broker_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(binary("keyward-broker"));
    cmd.args(args);
    cmd
}

// ---------------------------------------------------------------------------
// Kernels before 6.5

/// A private directory the broker's uid can use: config and socket.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new(config: &str) -> Scratch {
        let dir = tempfile::Builder::new().prefix("kw-ops").tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::os::unix::fs::chown(&run, Some(BROKER_UID), Some(BROKER_UID)).unwrap();
        let scratch = Scratch { dir };
        let text = config
            .replace("{socket}", scratch.socket().to_str().unwrap())
            .replace("{port}", "9");
        std::fs::write(scratch.config(), text).unwrap();
        std::fs::set_permissions(scratch.config(), std::fs::Permissions::from_mode(0o644)).unwrap();
        scratch
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("run/broker.sock")
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("broker.toml")
    }
}

/// The broker as `BROKER_UID`, in a private mount namespace whose `/proc`
/// is mounted with `proc_options` (as systemd's `ProtectProc=` does), with
/// `SO_PEERPIDFD` treated as absent when `no_peer_pidfd`.
fn spawn_broker(
    scratch: &Scratch,
    proc_options: Option<&str>,
    no_peer_pidfd: bool,
) -> std::process::Child {
    require_root();
    let mount = match proc_options {
        Some(options) => format!("mount -t proc -o {options} proc /proc && "),
        None => String::new(),
    };
    let script = format!(
        "{mount}exec setpriv --reuid={BROKER_UID} --regid={BROKER_UID} --clear-groups -- \
         \"$0\" serve --config \"$1\" --audit stderr"
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .arg(binary("keyward-broker"))
        .arg(scratch.config())
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if no_peer_pidfd {
        cmd.env("KEYWARD_TEST_NO_PEERPIDFD", "1");
    }
    cmd.spawn().unwrap()
}

/// Wait until the socket answers a `Hello`, or the broker exits (its
/// stderr, as an `Err`).
fn wait_serving(child: &mut std::process::Child, socket: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if socket.exists() && agent_shim::client::Client::connect(socket).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return Err(format!("exited ({status}): {err}"));
        }
        assert!(Instant::now() < deadline, "broker did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop(child: std::process::Child) -> String {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn without_peer_pidfd_a_visible_proc_pins_peers() {
    let scratch = Scratch::new(ECHO);
    let mut broker = spawn_broker(&scratch, Some("hidepid=off"), true);
    wait_serving(&mut broker, &scratch.socket()).unwrap();
    // A client of another uid than the broker's: pinned through /proc.
    let ran = run(&mut shim_command(
        &scratch.socket(),
        PRINCIPAL_UID,
        &["call", "echo", "message=hi"],
    ));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert_eq!(ran.stdout.trim(), r#"{"message":"hi"}"#);
    let stderr = stop(broker);
    assert!(
        stderr.contains("peers are pinned with pidfd_open and /proc/<pid>/status"),
        "the fallback was not in use: {stderr}"
    );
}

#[test]
fn without_peer_pidfd_a_hidden_proc_stops_the_start_and_names_the_fix() {
    let scratch = Scratch::new(ECHO);
    let mut broker = spawn_broker(&scratch, Some("hidepid=invisible"), true);
    let err = wait_serving(&mut broker, &scratch.socket()).unwrap_err();
    assert!(err.contains("exit status: 1"), "{err}");
    assert!(err.contains("no SO_PEERPIDFD"), "{err}");
    assert!(err.contains("hidepid=invisible"), "{err}");
    assert!(err.contains("pre-6.5-kernel.conf"), "{err}");
    assert!(err.contains("ProtectProc=default"), "{err}");
    assert!(!scratch.socket().exists(), "bound a socket it cannot serve");

    // `check`, as ExecStartPre= runs it in the same sandbox, says the same.
    let script = format!(
        "mount -t proc -o hidepid=invisible proc /proc && exec setpriv --reuid={BROKER_UID} \
         --regid={BROKER_UID} --clear-groups -- \"$0\" check --no-unit --config \"$1\""
    );
    let ran = run(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .arg(binary("keyward-broker"))
        .arg(scratch.config())
        .env("KEYWARD_TEST_NO_PEERPIDFD", "1"));
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains("pre-6.5-kernel.conf"), "{ran:?}");
}

#[test]
fn with_peer_pidfd_a_hidden_proc_is_fine() {
    let scratch = Scratch::new(ECHO);
    let mut broker = spawn_broker(&scratch, Some("hidepid=invisible"), false);
    wait_serving(&mut broker, &scratch.socket()).unwrap();
    let ran = run(&mut shim_command(
        &scratch.socket(),
        PRINCIPAL_UID,
        &["call", "echo", "message=hi"],
    ));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let stderr = stop(broker);
    assert!(!stderr.contains("pidfd_open and /proc"), "{stderr}");
}

// ---------------------------------------------------------------------------
// check, as ExecStartPre= and ExecReload= run it

#[test]
fn check_exit_status_follows_policy_units_and_loaded_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(creds.join("api.token"), "token-value").unwrap();
    std::fs::set_permissions(
        creds.join("api.token"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let good = String::from(
        "[broker]\nsocket = \"/run/keyward/broker.sock\"\nsocket_group = \"keyward-clients\"\n\n\
         [credential.api]\nfile = \"api.token\"\n\n[[principal]]\nname = \"p\"\nuids = [0]\n\
         may_call = [\"web\"]\n\n[[tool]]\nname = \"web\"\nkind = \"http\"\ncredential = \"api\"\n\
         method = \"GET\"\nurl = \"https://127.0.0.1:9/\"\nauth = { bearer = true }\n",
    );
    let check = |extra: &[&str]| {
        let mut cmd = broker_cmd(&["check", "--config", config.to_str().unwrap()]);
        cmd.args(extra).env_remove("CREDENTIALS_DIRECTORY");
        run(&mut cmd)
    };

    std::fs::write(&config, &good).unwrap();
    let ran = check(&["--no-unit"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(
        ran.stdout
            .ends_with(": ok (1 principals, 1 tools, 1 credentials)\n"),
        "{ran:?}"
    );

    // A bad policy: exit 1, with the line.
    std::fs::write(
        &config,
        good.replace("may_call = [\"web\"]", "may_call = [\"nope\"]"),
    )
    .unwrap();
    let ran = check(&["--no-unit"]);
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(
        ran.stderr.contains("broker.toml:11: principal \"p\""),
        "{ran:?}"
    );
    std::fs::write(&config, &good).unwrap();

    // The installed units: the credential has no LoadCredential= line, and
    // the socket unit listens elsewhere.
    let units = dir.path().join("units");
    std::fs::create_dir(&units).unwrap();
    let service = units.join("keyward-broker.service");
    std::fs::write(&service, "[Service]\nExecStart=/bin/true\n").unwrap();
    std::fs::write(
        units.join("keyward-broker.socket"),
        "[Socket]\nListenSequentialPacket=/run/elsewhere.sock\n",
    )
    .unwrap();
    let ran = check(&["--unit", service.to_str().unwrap()]);
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(
        ran.stderr
            .contains("credential \"api\" (file \"api.token\") has no LoadCredential=api.token:"),
        "{ran:?}"
    );
    assert!(ran.stderr.contains("/run/elsewhere.sock"), "{ran:?}");
    // Fixed in a drop-in, as `systemctl edit` writes it.
    std::fs::create_dir(units.join("keyward-broker.service.d")).unwrap();
    std::fs::write(
        units.join("keyward-broker.service.d/override.conf"),
        "[Service]\nLoadCredential=api.token:/etc/keyward/credentials/api.token\n",
    )
    .unwrap();
    std::fs::write(
        units.join("keyward-broker.socket"),
        "[Socket]\nListenSequentialPacket=/run/keyward/broker.sock\n",
    )
    .unwrap();
    let ran = check(&["--unit", service.to_str().unwrap()]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.contains("agrees with"), "{ran:?}");

    // `check --credentials` against a broker's credentials directory: a
    // policy that needs a credential that is not there fails.
    let reload = |text: &str| {
        std::fs::write(&config, text).unwrap();
        run(
            broker_cmd(&["check", "--no-unit", "--credentials", "--config"])
                .arg(&config)
                .env("CREDENTIALS_DIRECTORY", &creds),
        )
    };
    assert_eq!(reload(&good).code, Some(0));
    let needs_more = good.replace("file = \"api.token\"", "file = \"new.token\"");
    let ran = reload(&needs_more);
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains("new.token"), "{ran:?}");
}

#[test]
fn plain_http_with_a_credential_is_a_warning_unless_marked_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    let text =
        "[broker]\nsocket = \"/tmp/kw-x.sock\"\n\n[credential.api]\nfile = \"api.token\"\n\n\
                [[tool]]\nname = \"web\"\nkind = \"http\"\ncredential = \"api\"\nmethod = \"GET\"\n\
                url = \"http://127.0.0.1:9/\"\nauth = { bearer = true }\n";
    std::fs::write(&config, text).unwrap();
    let ran = run(broker_cmd(&["check", "--no-unit", "--config"]).arg(&config));
    assert_eq!(ran.code, Some(0), "a warning is not an error: {ran:?}");
    assert!(ran.stderr.contains("warning: "), "{ran:?}");
    assert!(
        ran.stderr
            .contains("broker.toml:7: tool \"web\": url: \"http://127.0.0.1:9/\" is plain http"),
        "{ran:?}"
    );
    assert!(ran.stderr.contains("insecure_http = true"), "{ran:?}");

    std::fs::write(
        &config,
        text.replace("method =", "insecure_http = true\nmethod ="),
    )
    .unwrap();
    let ran = run(broker_cmd(&["check", "--no-unit", "--config"]).arg(&config));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(!ran.stderr.contains("warning"), "{ran:?}");

    // At start: the same warning, and the broker serves.
    let broker = Broker::start_with(BrokerSetup {
        config: &format!("{}\n[credential.api]\nfile = \"api.token\"\n\n[[tool]]\nname = \"web\"\nkind = \"http\"\ncredential = \"api\"\nmethod = \"GET\"\nurl = \"http://127.0.0.1:9/\"\nauth = {{ bearer = true }}\n", ECHO.replace("{port}", "9").replace("socket_mode = \"0666\"", "socket_mode = \"0666\"\ncredentials_dir = \"{dir}/creds\"")),
        credentials: &[("api.token", "token-value")],
        ..BrokerSetup::default()
    });
    assert!(broker.stderr().contains("warning: "), "{}", broker.stderr());
    assert!(
        broker.stderr().contains("is plain http"),
        "{}",
        broker.stderr()
    );
    assert_eq!(
        broker.call(PRINCIPAL_UID, &["echo", "message=hi"]).code,
        Some(0)
    );
}

// ---------------------------------------------------------------------------
// Principals by name, supplementary groups

/// A group and a user created for one test with groupadd/useradd, removed
/// on drop.
struct Account {
    user: String,
    group: String,
    uid: u32,
    gid: u32,
}

impl Account {
    fn create(tag: &str, uid: u32, gid: u32) -> Account {
        require_root();
        let group = format!("kw{tag}g{}", std::process::id() % 100_000);
        let user = format!("kw{tag}u{}", std::process::id() % 100_000);
        let ok = |cmd: &mut Command| assert!(cmd.status().unwrap().success(), "{cmd:?}");
        ok(Command::new("groupadd").args(["--gid", &gid.to_string(), &group]));
        ok(Command::new("useradd").args([
            "--no-create-home",
            "--uid",
            &uid.to_string(),
            "--gid",
            &gid.to_string(),
            "--shell",
            "/usr/sbin/nologin",
            &user,
        ]));
        Account {
            user,
            group,
            uid,
            gid,
        }
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.user).status();
        let _ = Command::new("groupdel").arg(&self.group).status();
    }
}

/// `agent-shim ARGS` as uid/gid with exactly the supplementary groups
/// `groups` (setpriv: std's Command clears them).
fn shim_with_groups(socket: &Path, uid: u32, gid: u32, groups: &[u32], args: &[&str]) -> Ran {
    let groups: Vec<String> = groups.iter().map(u32::to_string).collect();
    let groups = if groups.is_empty() {
        "--clear-groups".to_owned()
    } else {
        format!("--groups={}", groups.join(","))
    };
    run(Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            &groups,
            "--",
        ])
        .arg(binary("agent-shim"))
        .args(args)
        .env("KEYWARD_SOCKET", socket))
}

#[test]
fn principals_by_user_and_group_name_and_by_supplementary_group() {
    let account = Account::create("n", 61210, 61211);
    let config = format!(
        "[broker]\nsocket = \"{{socket}}\"\nsocket_mode = \"0666\"\n\n\
         [[principal]]\nname = \"by-user\"\nuids = [\"{}\"]\nmay_call = [\"echo\"]\n\n\
         [[principal]]\nname = \"by-group\"\ngids = [\"{}\"]\nmay_call = [\"shout\"]\n\n\
         [[tool]]\nname = \"echo\"\nkind = \"echo\"\nparams.message = {{ type = \"string\" }}\n\n\
         [[tool]]\nname = \"shout\"\nkind = \"echo\"\nparams.message = {{ type = \"string\" }}\n",
        account.user, account.group
    );
    let broker = Broker::start(&config, &[]);
    let socket = broker.socket.clone();
    // The user, by name.
    let ran = shim_with_groups(
        &socket,
        account.uid,
        61299,
        &[],
        &["call", "echo", "message=a"],
    );
    assert_eq!(ran.code, Some(0), "{ran:?}");
    // Another uid whose primary group is the named group.
    let ran = shim_with_groups(
        &socket,
        61220,
        account.gid,
        &[],
        &["call", "shout", "message=b"],
    );
    assert_eq!(ran.code, Some(0), "{ran:?}");
    // Another uid with the group only as a supplementary group.
    let ran = shim_with_groups(
        &socket,
        61221,
        61221,
        &[61230, account.gid],
        &["call", "shout", "message=c"],
    );
    assert_eq!(
        ran.code,
        Some(0),
        "supplementary group not counted: {ran:?}"
    );
    // Without it: not a principal.
    let ran = shim_with_groups(
        &socket,
        61221,
        61221,
        &[61230],
        &["call", "shout", "message=d"],
    );
    assert_eq!(ran.code, Some(3), "{ran:?}");
    assert!(ran.stderr.contains("not a principal"), "{ran:?}");
}

#[test]
fn an_unknown_user_name_is_a_located_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        "[broker]\nsocket = \"/tmp/kw.sock\"\n\n[[principal]]\nname = \"p\"\nuids = [\"kw-nobody-here\"]\n",
    )
    .unwrap();
    let ran = run(broker_cmd(&["check", "--no-unit", "--config"]).arg(&config));
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(
        ran.stderr.contains(
            "broker.toml:6: principal \"p\": uids: \"kw-nobody-here\" is not a known name"
        ),
        "{ran:?}"
    );
}

// ---------------------------------------------------------------------------
// Connection errors and --json

/// `agent-shim call echo` (and with `--json`) against `socket` as `uid`.
fn call_both(socket: &Path, uid: u32) -> (Ran, Ran) {
    let plain = run(&mut shim_command(
        socket,
        uid,
        &["call", "echo", "message=x"],
    ));
    let json = run(&mut shim_command(
        socket,
        uid,
        &["call", "--json", "echo", "message=x"],
    ));
    (plain, json)
}

fn json_error(ran: &Ran) -> (String, String) {
    assert!(ran.stdout.ends_with('\n'), "no final newline: {ran:?}");
    let value: serde_json::Value = serde_json::from_str(&ran.stdout).unwrap();
    (
        value["error"]["kind"].as_str().unwrap().to_owned(),
        value["error"]["message"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn connection_errors_say_what_to_do() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    // No socket at all.
    let missing = dir.path().join("missing.sock");
    let (plain, json) = call_both(&missing, PRINCIPAL_UID);
    assert_eq!(plain.code, Some(1), "{plain:?}");
    assert!(
        plain
            .stderr
            .contains("is keyward-broker running? (systemctl status keyward-broker.socket)"),
        "{plain:?}"
    );
    assert_eq!(json.code, Some(1));
    let (kind, message) = json_error(&json);
    assert_eq!(kind, "connect");
    assert!(message.contains("is keyward-broker running?"), "{message}");

    // A socket the caller may not open (not in its group).
    let listener = nix_seqpacket_listener(&dir.path().join("closed.sock"));
    std::fs::set_permissions(
        dir.path().join("closed.sock"),
        std::fs::Permissions::from_mode(0o660),
    )
    .unwrap();
    let (plain, json) = call_both(&dir.path().join("closed.sock"), PRINCIPAL_UID);
    assert_eq!(plain.code, Some(1), "{plain:?}");
    assert!(
        plain
            .stderr
            .contains("are you in group keyward-clients? (log in again after usermod)"),
        "{plain:?}"
    );
    assert_eq!(json_error(&json).0, "connect");
    drop(listener);

    // A stream socket where the broker's should be.
    let stream = std::os::unix::net::UnixListener::bind(dir.path().join("stream.sock")).unwrap();
    std::fs::set_permissions(
        dir.path().join("stream.sock"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let (plain, json) = call_both(&dir.path().join("stream.sock"), PRINCIPAL_UID);
    assert_eq!(plain.code, Some(1), "{plain:?}");
    assert!(plain.stderr.contains("not a keyward socket"), "{plain:?}");
    assert_eq!(json_error(&json).0, "connect");
    drop(stream);

    // `tools --json` too.
    let ran = run(&mut shim_command(
        &missing,
        PRINCIPAL_UID,
        &["tools", "--json"],
    ));
    assert_eq!(ran.code, Some(1));
    assert_eq!(json_error(&ran).0, "connect");
}

fn nix_seqpacket_listener(path: &Path) -> std::os::fd::OwnedFd {
    use nix::sys::socket::{
        bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
    listen(&fd, Backlog::new(8).unwrap()).unwrap();
    fd
}

#[test]
fn json_prints_an_error_object_for_every_failure() {
    let upstream = Upstream::start();
    let broker = Broker::start(&ECHO.replace("{port}", &upstream.port.to_string()), &[]);
    // A denial.
    let ran = broker.call(STRANGER_UID, &["--json", "echo", "message=x"]);
    assert_eq!(ran.code, Some(3), "{ran:?}");
    let (kind, message) = json_error(&ran);
    assert_eq!(kind, "denied");
    assert!(message.contains("not a principal"), "{message}");
    // A bad argument.
    let ran = broker.call(PRINCIPAL_UID, &["--json", "echo", "no-equals-sign"]);
    assert_eq!(ran.code, Some(1), "{ran:?}");
    let (kind, message) = json_error(&ran);
    assert_eq!(kind, "usage");
    assert!(message.contains("not of the form NAME=VALUE"), "{message}");
    // An upstream status of 400 or more: the envelope says so too.
    let ran = broker.call(PRINCIPAL_UID, &["--json", "missing"]);
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stdout.ends_with('\n'), "{ran:?}");
    let envelope: serde_json::Value = serde_json::from_str(&ran.stdout).unwrap();
    assert_eq!(envelope["status"], 401, "{ran:?}");
    assert_eq!(envelope["error"]["kind"], "upstream_status", "{ran:?}");
    // Success still ends with a newline.
    let ran = broker.call(PRINCIPAL_UID, &["--json", "echo", "message=x"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.ends_with('\n'), "{ran:?}");
    assert!(serde_json::from_str::<serde_json::Value>(&ran.stdout).unwrap()["error"].is_null());
}

/// On a terminal, a body without a final newline gets one (in a pipe the
/// bytes stay exact; the rest of the suite checks that).
#[test]
fn a_body_on_a_terminal_ends_with_a_newline() {
    let broker = Broker::start(&ECHO.replace("{port}", "9"), &[]);
    let shim = binary("agent-shim");
    let ran = run(Command::new("script")
        .args(["-qec"])
        .arg(format!(
            "setpriv --reuid={PRINCIPAL_UID} --regid={PRINCIPAL_UID} --clear-groups -- {} call echo message=tty; echo END",
            shim.display()
        ))
        .arg("/dev/null")
        .env("KEYWARD_SOCKET", &broker.socket));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(
        ran.stdout.contains("{\"message\":\"tty\"}\r\nEND"),
        "{ran:?}"
    );
}

// ---------------------------------------------------------------------------
// serve --example

#[test]
fn serve_example_prints_commands_that_work_and_cleans_up_on_ctrl_c() {
    require_root();
    let runtime = tempfile::tempdir().unwrap();
    let mut child = Command::new(binary("keyward-broker"))
        .args(["serve", "--example", "--audit", "stderr"])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("XDG_RUNTIME_DIR", runtime.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut printed = Vec::new();
    loop {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "exited: {printed:#?}"
        );
        let done = line.contains("stop with Ctrl-C");
        printed.push(line.trim_end().to_owned());
        if done {
            break;
        }
    }
    let text = printed.join("\n");
    assert!(
        text.contains("from another terminal, as the same user"),
        "{text}"
    );
    let socket = printed
        .iter()
        .find_map(|l| l.trim().strip_prefix("export KEYWARD_SOCKET="))
        .map(PathBuf::from)
        .unwrap();
    let dir = socket.parent().unwrap().to_owned();
    assert!(dir.starts_with(runtime.path()), "{text}");
    let config = dir.join("broker.toml");
    assert!(config.is_file(), "{text}");
    assert!(
        text.contains(&format!("--config {}", config.display())),
        "{text}"
    );
    // The commands name the binaries just built, by absolute path.
    let shim = binary("agent-shim");
    let call_line = format!("    {} call echo message=hello", shim.display());
    assert!(printed.contains(&call_line), "{text}");

    // They work as printed.
    let ran = run(Command::new(&shim)
        .args(["call", "echo", "message=hello"])
        .env("KEYWARD_SOCKET", &socket));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert_eq!(ran.stdout.trim(), r#"{"message":"hello"}"#);
    let ran = run(Command::new(&shim)
        .args(["mint", "--tool", "echo", "--ttl", "5m", "--task", "try"])
        .env("KEYWARD_SOCKET", &socket));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let id = keyward_tests::minted_token_id(&ran.stderr);
    let ran = run(broker_cmd(&["pubkey", "--config"]).arg(&config));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let ran = run(broker_cmd(&["revoke", "--config"])
        .arg(&config)
        .arg(&id)
        .env_remove("KEYWARD_SOCKET"));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.contains(&format!("revoked {id}")), "{ran:?}");

    // Ctrl-C (SIGINT to the process group, as a terminal sends it).
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!dir.exists(), "{} is still there", dir.display());
}

// ---------------------------------------------------------------------------
// Man pages and completions

/// The subcommands `BINARY --help` lists (without `help`).
fn listed_subcommands(binary_name: &str) -> Vec<String> {
    let ran = run(Command::new(binary(binary_name)).arg("--help"));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    ran.stdout
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

#[test]
fn man_pages_and_completions_generate_and_name_every_subcommand() {
    let out = tempfile::tempdir().unwrap();
    for (name, section) in [("keyward-broker", "8"), ("agent-shim", "1")] {
        let ran = run(Command::new(binary(name))
            .arg("generate-docs")
            .arg(out.path()));
        assert_eq!(ran.code, Some(0), "{ran:?}");
        let subcommands = listed_subcommands(name);
        assert!(subcommands.len() >= 4, "{subcommands:?}");
        let dir = out.path().join(format!("man/man{section}"));
        let main = std::fs::read_to_string(dir.join(format!("{name}.{section}"))).unwrap();
        assert!(main.starts_with(".ie") || main.contains(".TH"), "{main}");
        for sub in &subcommands {
            // roff escapes the hyphen.
            let page = format!("{name}-{sub}");
            assert!(
                main.contains(&page.replace('-', "\\-")),
                "{name}({section}) does not name {sub}"
            );
            let sub_page = dir.join(format!("{page}.{section}"));
            assert!(sub_page.is_file(), "{} missing", sub_page.display());
        }
        // The hidden generator is not a documented command.
        assert!(!main.contains("generate\\-docs"), "{main}");
        for (shell, file) in [
            ("bash", name.to_owned()),
            ("zsh", format!("_{name}")),
            ("fish", format!("{name}.fish")),
        ] {
            let path = out.path().join("completions").join(shell).join(file);
            let text = std::fs::read_to_string(&path).unwrap();
            for sub in &subcommands {
                assert!(text.contains(sub.as_str()), "{}: no {sub}", path.display());
            }
        }
        let bash = out.path().join("completions/bash").join(name);
        let syntax = run(Command::new("bash").arg("-n").arg(&bash));
        assert_eq!(syntax.code, Some(0), "{syntax:?}");
    }
    let config = std::fs::read_to_string(out.path().join("man/man5/broker.toml.5")).unwrap();
    for key in [
        "socket\\_mode",
        "insecure\\_http",
        "may\\_delegate",
        "LoadCredential=",
    ] {
        assert!(
            config.contains(key) || config.contains(&key.replace("\\_", "_")),
            "broker.toml(5) lacks {key}"
        );
    }
}

/// The README's install lines, run for real into a scratch root (every
/// absolute destination moved under it, the debug build standing in for
/// the release one): they install stripped binaries, the man pages and
/// the completions.
#[test]
fn the_readme_install_lines_install_man_pages_completions_and_stripped_binaries() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    let install = readme.split("## Install").nth(1).unwrap();
    let block = install
        .split("```sh\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path().join("root");
    // What every host has already.
    for dir in ["usr/local/bin", "etc/systemd/system"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    let bin_dir = binary("keyward-broker").parent().unwrap().to_owned();
    let mut script = String::from("set -euo pipefail\n");
    for line in block.lines() {
        if line.starts_with("systemd-sysusers") {
            break; // what follows changes the host: users, systemd, /etc
        }
        if line.starts_with("cargo build") {
            continue;
        }
        let line = line
            .replace(
                "target/docs",
                &scratch.path().join("docs").display().to_string(),
            )
            .replace("target/release/", &format!("{}/", bin_dir.display()))
            .replace(" /usr/", &format!(" {}/usr/", root.display()))
            .replace(" /etc/", &format!(" {}/etc/", root.display()));
        script.push_str(&line);
        script.push('\n');
    }
    assert!(script.contains("generate-docs"), "{script}");
    let ran = run(Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(repo));
    assert_eq!(ran.code, Some(0), "{ran:?}\n{script}");
    let local = root.join("usr/local");
    for file in [
        "share/man/man8/keyward-broker.8",
        "share/man/man8/keyward-broker-check.8",
        "share/man/man5/broker.toml.5",
        "share/man/man1/agent-shim.1",
        "share/man/man1/agent-shim-run.1",
        "share/bash-completion/completions/keyward-broker",
        "share/bash-completion/completions/agent-shim",
        "share/zsh/site-functions/_agent-shim",
        "share/fish/vendor_completions.d/keyward-broker.fish",
        "share/doc/keyward/OPERATIONS.md",
    ] {
        assert!(local.join(file).is_file(), "{file} not installed\n{script}");
    }
    for name in ["keyward-broker", "agent-shim"] {
        let installed = std::fs::read(local.join("bin").join(name)).unwrap();
        let built = std::fs::metadata(binary(name)).unwrap().len();
        assert!(
            (installed.len() as u64) < built,
            "{name} is not stripped ({} of {built} bytes)",
            installed.len()
        );
        let has_symtab = installed.windows(8).any(|w| w == b".symtab\0");
        assert!(!has_symtab, "{name} still has a symbol table");
    }
    assert!(root
        .join("usr/lib/systemd/catalog/keyward.catalog")
        .is_file());
}

/// Names are looked up again at every reload: a group renumbered with
/// groupmod applies from the next SIGHUP on.
#[test]
fn names_are_resolved_again_on_reload() {
    let account = Account::create("r", 61240, 61241);
    let config = format!(
        "[broker]\nsocket = \"{{socket}}\"\nsocket_mode = \"0666\"\n\n\
         [[principal]]\nname = \"by-group\"\ngids = [\"{}\"]\nmay_call = [\"echo\"]\n\n\
         [[tool]]\nname = \"echo\"\nkind = \"echo\"\nparams.message = {{ type = \"string\" }}\n",
        account.group
    );
    let broker = Broker::start(&config, &[]);
    let call = |gid: u32| {
        shim_with_groups(
            &broker.socket,
            61242,
            gid,
            &[],
            &["call", "echo", "message=m"],
        )
        .code
    };
    assert_eq!(call(61241), Some(0));
    assert_eq!(call(61243), Some(3));
    let moved = Command::new("groupmod")
        .args(["--gid", "61243", &account.group])
        .status()
        .unwrap();
    assert!(moved.success());
    // Until the reload, the old number stays in force.
    assert_eq!(call(61241), Some(0));
    broker.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(20);
    while call(61243) != Some(0) {
        assert!(Instant::now() < deadline, "{}", broker.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(call(61241), Some(3));
}

/// The unit's `ExecReload=` lines, run in order as systemd runs them
/// (stopping at the first that fails, as `as_uid` when given: the unit's
/// `User=`) against `broker`; the first failure, or success.
fn unit_reload(broker: &Broker, as_uid: Option<u32>) -> Ran {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let unit = std::fs::read_to_string(repo.join("systemd/keyward-broker.service")).unwrap();
    for command in unit.lines().filter_map(|l| l.strip_prefix("ExecReload=")) {
        let line = command
            .replace(
                "/usr/local/bin/keyward-broker",
                binary("keyward-broker").to_str().unwrap(),
            )
            .replace(
                "/etc/keyward/broker.toml",
                broker.config_path.to_str().unwrap(),
            )
            .replace("$MAINPID", &broker.pid().to_string());
        let mut cmd = match as_uid {
            Some(uid) => {
                let mut cmd = Command::new("setpriv");
                cmd.args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={uid}"),
                    "--clear-groups",
                    "--",
                ]);
                cmd.arg("sh");
                cmd
            }
            None => Command::new("sh"),
        };
        let ran = run(cmd.arg("-c").arg(&line).env_remove("CREDENTIALS_DIRECTORY"));
        if ran.code != Some(0) {
            return ran;
        }
    }
    run(&mut Command::new("true"))
}

/// A policy whose tool `web` uses the credential `api`.
const WEB: &str = r#"
[broker]
socket = "{socket}"
socket_mode = "0666"
credentials_dir = "{dir}/creds"

[credential.api]
file = "api.token"

[[principal]]
name = "tester"
uids = [61000]
may_call = ["echo", "web"]

[[tool]]
name = "echo"
kind = "echo"
params.message = { type = "string", max_len = 100 }

[[tool]]
name = "web"
kind = "http"
credential = "api"
method = "GET"
url = "http://127.0.0.1:9/"
auth = { bearer = true }
"#;

/// A reload that needs a credential the running broker cannot use fails
/// `systemctl reload` (the unit's `ExecReload=` lines, as the unit's user,
/// as the broker is) before the broker is signalled, naming the
/// credential and its file: one added since the start (even with its file
/// in place: a reload never loads one), and one whose file is gone. Until
/// `check --reload` asked the broker, both passed the check, the broker
/// kept its old policy, and `systemctl reload` exited 0.
#[test]
fn the_units_reload_commands_refuse_a_credential_the_broker_cannot_use() {
    let broker = Broker::start_with(BrokerSetup {
        config: WEB,
        credentials: &[("api.token", keyward_tests::SECRET)],
        run_as: Some(BROKER_UID),
        ..BrokerSetup::default()
    });
    let reloads = || {
        broker
            .audit_records()
            .iter()
            .filter(|r| r["event"] == "reload")
            .count()
    };
    // Its file is there, but the running broker did not load it.
    let new_file = broker.dir.path().join("creds/new.token");
    std::fs::write(&new_file, keyward_tests::SECRET).unwrap();
    std::os::unix::fs::chown(&new_file, Some(BROKER_UID), Some(BROKER_UID)).unwrap();
    let added = format!(
        "{WEB}\n[credential.new]\nfile = \"new.token\"\n\n[[tool]]\nname = \"web2\"\n\
         kind = \"http\"\ncredential = \"new\"\nmethod = \"GET\"\n\
         url = \"http://127.0.0.1:9/\"\nauth = {{ bearer = true }}\n"
    );
    broker.rewrite_config(&added);
    let ran = unit_reload(&broker, Some(BROKER_UID));
    assert_eq!(ran.code, Some(1), "the reload did not fail: {ran:?}");
    assert!(
        ran.stderr.contains(
            "credential \"new\" (file \"new.token\"), used by tool \"web2\", was not loaded \
             when the running broker started"
        ),
        "{ran:?}"
    );
    // The credential it loaded, its file gone from where the next start
    // reads it.
    broker.rewrite_config(&WEB.replace("file = \"api.token\"", "file = \"gone.token\""));
    let ran = unit_reload(&broker, Some(BROKER_UID));
    assert_eq!(ran.code, Some(1), "the reload did not fail: {ran:?}");
    assert!(
        ran.stderr
            .contains("credential \"api\": its file \"gone.token\" is not in"),
        "{ran:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        reloads(),
        0,
        "the broker was signalled: {}",
        broker.stderr()
    );

    // A reload it can apply goes through.
    broker.rewrite_config(&WEB.replace("[\"echo\", \"web\"]", "[\"web\"]"));
    let ran = unit_reload(&broker, Some(BROKER_UID));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while reloads() == 0 {
        assert!(Instant::now() < deadline, "{}", broker.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        broker.call(PRINCIPAL_UID, &["echo", "message=x"]).code,
        Some(3)
    );
}

/// The unit's `ExecReload=` lines, run in order as systemd runs them
/// (stopping at the first that fails) against a test broker: a broken
/// policy fails the reload before the broker is signalled; a good one
/// is signalled and applied.
#[test]
fn the_units_reload_commands_refuse_a_broken_policy_before_signalling() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let unit = std::fs::read_to_string(repo.join("systemd/keyward-broker.service")).unwrap();
    let commands: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("ExecReload="))
        .collect();
    assert_eq!(commands.len(), 2, "{commands:?}");
    assert!(commands[0].contains(" check "), "{commands:?}");

    let broker = Broker::start(&ECHO.replace("{port}", "9"), &[]);
    let reload = || unit_reload(&broker, None);
    let reloads = || {
        broker
            .audit_records()
            .iter()
            .filter(|r| r["event"] == "reload")
            .count()
    };

    broker.rewrite_config(
        &ECHO
            .replace("{port}", "9")
            .replace("[\"echo\", \"missing\"]", "[\"nope\"]"),
    );
    let ran = reload();
    assert_eq!(ran.code, Some(1), "the reload did not fail: {ran:?}");
    assert!(
        ran.stderr.contains("\"nope\" is not a defined tool"),
        "{ran:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        reloads(),
        0,
        "the broker was signalled: {}",
        broker.stderr()
    );
    assert_eq!(
        broker.call(PRINCIPAL_UID, &["echo", "message=x"]).code,
        Some(0)
    );

    broker.rewrite_config(
        &ECHO
            .replace("{port}", "9")
            .replace("[\"echo\", \"missing\"]", "[\"missing\"]"),
    );
    let ran = reload();
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while reloads() == 0 {
        assert!(Instant::now() < deadline, "{}", broker.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        broker.call(PRINCIPAL_UID, &["echo", "message=x"]).code,
        Some(3)
    );
}
