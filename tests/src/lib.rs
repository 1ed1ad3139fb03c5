// SPDX-License-Identifier: Apache-2.0
//! Harness for keyward's end-to-end tests: start the real `keyward-broker`
//! on a socket in a temp dir, run the real `agent-shim` as an unprivileged
//! uid, and stand up loopback HTTP upstreams.
//!
//! The tests run as root (as CI does) so that they can create unprivileged
//! peers: the shim is started with `setgid`/`setuid` to a test uid.
#![allow(clippy::unwrap_used, missing_debug_implementations)]

pub mod bench;
pub mod llm;
pub mod postgres;
pub mod upstream;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use agent_shim::client::Client;

/// The unprivileged uid (and gid) the policy lists as a principal.
pub const PRINCIPAL_UID: u32 = 61000;
/// An unprivileged uid no principal lists.
pub const STRANGER_UID: u32 = 61001;

/// The secret the test credential holds. Long and distinctive, so a leak
/// in any output is unmistakable.
pub const SECRET: &str = "kw-test-secret-Zm9vYmFy-7c1d9e0f2a4b";

/// The id of the token `agent-shim mint` made, from what it says on
/// stderr (`... token ID ...`).
pub fn minted_token_id(stderr: &str) -> String {
    stderr
        .split_whitespace()
        .skip_while(|w| *w != "token")
        .nth(1)
        .unwrap_or_else(|| panic!("no token id in {stderr:?}"))
        .to_owned()
}

/// Path of a binary built by this workspace (`keyward-broker`,
/// `agent-shim`), next to the test executable's `deps` directory.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap()
    } else {
        dir
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built; run the tests with `cargo test --workspace`",
        path.display()
    );
    path
}

/// Fail loudly unless running as root: the tests need to create peers with
/// other uids, and silently skipping them would hide every attack test.
/// The venv `.ci/run` installs `.ci/requirements.txt` into (authlib, moto
/// and awscli, the LLM SDKs: the real programs the tests run against).
/// `None`, with a loud message, only outside CI; in CI (`CI=true`) a
/// missing venv fails the test instead of skipping it.
pub fn test_venv() -> Option<PathBuf> {
    match std::env::var_os("KEYWARD_TEST_VENV") {
        Some(dir) => Some(PathBuf::from(dir)),
        None => {
            assert!(
                std::env::var_os("CI").is_none_or(|v| v != "true"),
                "KEYWARD_TEST_VENV is not set in CI: .ci/run must install .ci/requirements.txt"
            );
            eprintln!(
                "\n*** SKIPPED: this test runs Python packages from .ci/requirements.txt; run \
                 `.ci/run` or set KEYWARD_TEST_VENV to a venv that has them ***\n"
            );
            None
        }
    }
}

/// A Python of the test venv that `uid` can run: the venv's own if `uid`
/// can run it and import what `import` imports, else the system's python3
/// on the venv's site-packages (a venv made from a Python under `/root`, as
/// pyenv makes them, is not reachable to another uid). A sandboxed run
/// needs `--allow-read venv` and, with `pythonpath`, `--keep-env
/// PYTHONPATH`.
#[derive(Debug)]
pub struct VenvPython {
    pub exe: PathBuf,
    pub venv: PathBuf,
    pub pythonpath: Option<String>,
}

/// See [`VenvPython`]; `None`: no venv (skipped loudly outside CI).
pub fn venv_python(import: &str, uid: u32) -> Option<VenvPython> {
    let venv = test_venv()?;
    let own = venv.join("bin/python");
    let usable = Command::new(&own)
        .args(["-c", import])
        .env_clear()
        .uid(uid)
        .gid(uid)
        .status()
        .is_ok_and(|s| s.success());
    if usable {
        return Some(VenvPython {
            exe: own,
            venv,
            pythonpath: None,
        });
    }
    let site = std::fs::read_dir(venv.join("lib"))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages"))
        .find(|p| p.exists())?;
    Some(VenvPython {
        exe: PathBuf::from("/usr/bin/python3"),
        venv,
        pythonpath: Some(site.display().to_string()),
    })
}

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the end-to-end tests must run as root (they create unprivileged peers)"
    );
}

/// A running broker on a private socket.
pub struct Broker {
    pub dir: tempfile::TempDir,
    /// The socket the configuration names (the broker binds it itself).
    pub socket: PathBuf,
    /// The socket `systemd-socket-activate` listens on, when activated.
    pub activated: PathBuf,
    pub config_path: PathBuf,
    pub child: Option<Child>,
    /// The fake service manager, when started with `notify`.
    pub notify: Option<Notifications>,
    audit_path: PathBuf,
    run_as: Option<u32>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    socket_activated: bool,
    watchdog_usec: Option<u64>,
}

/// What a test broker is started with.
pub struct BrokerSetup<'a> {
    /// Config text; `{socket}` is replaced by the socket path and `{dir}`
    /// by the broker's temp dir (credentials are in `{dir}/creds`).
    pub config: &'a str,
    /// Credential files to create: (file name, content).
    pub credentials: &'a [(&'a str, &'a str)],
    /// Mode of the credentials directory.
    pub credentials_mode: u32,
    /// Run the broker as this uid (root when `None`).
    pub run_as: Option<u32>,
    /// Arguments after `serve --config FILE` (`--audit stderr` unless they
    /// name an `--audit`).
    pub args: &'a [&'a str],
    /// The broker's environment, besides `PATH` (it starts from empty).
    pub env: Vec<(String, String)>,
    /// Start under `systemd-socket-activate --seqpacket`, listening at
    /// [`Broker::activated`], instead of letting the broker bind `{socket}`.
    pub socket_activated: bool,
    /// A fake service manager: `NOTIFY_SOCKET` points at it.
    pub notify: bool,
    /// `WATCHDOG_USEC` to pass (needs `notify`).
    pub watchdog_usec: Option<u64>,
}

impl Default for BrokerSetup<'_> {
    fn default() -> Self {
        BrokerSetup {
            config: "",
            credentials: &[],
            credentials_mode: 0o700,
            run_as: None,
            args: &[],
            env: Vec::new(),
            socket_activated: false,
            notify: false,
            watchdog_usec: None,
        }
    }
}

impl Broker {
    /// Start a broker and wait until it accepts connections.
    pub fn start(config: &str, credentials: &[(&str, &str)]) -> Broker {
        Broker::start_with(BrokerSetup {
            config,
            credentials,
            ..BrokerSetup::default()
        })
    }

    /// Start a broker; panics if it does not come up.
    pub fn start_with(setup: BrokerSetup<'_>) -> Broker {
        let broker = Broker::spawn(setup);
        broker.wait_ready()
    }

    /// Start a broker without waiting for it.
    pub fn spawn(setup: BrokerSetup<'_>) -> Broker {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("keyward-e2e")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // The socket lives in run/, owned by the broker's uid so that an
        // unprivileged broker can bind it.
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        if let Some(uid) = setup.run_as {
            chown_tree(&run, uid);
        }
        let socket = run.join("broker.sock");
        let creds = dir.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        for (name, content) in setup.credentials {
            let path = creds.join(name);
            std::fs::write(&path, content).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        if let Some(uid) = setup.run_as {
            chown_tree(&creds, uid);
        }
        std::fs::set_permissions(
            &creds,
            std::fs::Permissions::from_mode(setup.credentials_mode),
        )
        .unwrap();
        let config_path = dir.path().join("broker.toml");
        let audit_path = dir.path().join("audit.log");
        let notify = setup.notify.then(|| Notifications::bind(dir.path()));
        let mut broker = Broker {
            activated: run.join("activated.sock"),
            socket,
            dir,
            child: None,
            notify,
            audit_path,
            config_path,
            run_as: setup.run_as,
            args: setup.args.iter().map(|a| a.to_string()).collect(),
            env: setup.env,
            socket_activated: setup.socket_activated,
            watchdog_usec: setup.watchdog_usec,
        };
        broker.rewrite_config(setup.config);
        broker.launch();
        broker
    }

    /// Write the configuration file, `{socket}` and `{dir}` replaced (the
    /// next start or SIGHUP reads it).
    pub fn rewrite_config(&self, config: &str) {
        let text = config
            .replace("{socket}", self.socket.to_str().unwrap())
            .replace("{dir}", self.dir.path().to_str().unwrap());
        std::fs::write(&self.config_path, text).unwrap();
        std::fs::set_permissions(&self.config_path, std::fs::Permissions::from_mode(0o644))
            .unwrap();
    }

    /// Start the broker process (its audit output appended to audit.log).
    fn launch(&mut self) {
        let audit = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.audit_path)
            .unwrap();
        let mut cmd = if self.socket_activated {
            let mut cmd = Command::new("systemd-socket-activate");
            cmd.arg("--seqpacket").arg("--listen").arg(&self.activated);
            for (k, v) in &self.env {
                cmd.arg(format!("--setenv={k}={v}"));
            }
            cmd.arg(binary("keyward-broker"));
            cmd
        } else {
            Command::new(binary("keyward-broker"))
        };
        cmd.arg("serve").arg("--config").arg(&self.config_path);
        cmd.args(&self.args);
        if !self.args.iter().any(|a| a.starts_with("--audit")) {
            cmd.args(["--audit", "stderr"]);
        }
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(audit);
        if let Some(notify) = &self.notify {
            cmd.env("NOTIFY_SOCKET", &notify.path);
            if let Some(usec) = self.watchdog_usec {
                cmd.env("WATCHDOG_USEC", usec.to_string());
            }
        }
        if let Some(uid) = self.run_as {
            cmd.uid(uid).gid(uid);
        }
        self.child = Some(cmd.spawn().unwrap());
    }

    /// `kill -9` the broker, then start it again on the same config and
    /// state, and wait until it serves.
    pub fn kill9_and_restart(mut self) -> Broker {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        self.launch();
        self.wait_ready()
    }

    /// Wait until the socket accepts a `Hello`; panics with the broker's
    /// output if it exits or does not come up within 20 s.
    pub fn wait_ready(mut self) -> Broker {
        let socket = self.socket.clone();
        self.wait_serving(&socket);
        self
    }

    /// Wait until `path` answers a `Hello`; panics with the broker's
    /// output if it exits first or takes more than 20 s.
    pub fn wait_serving(&mut self, path: &Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if path.exists() && Client::connect(path).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("broker exited early ({status}):\n{}", self.audit());
            }
            assert!(
                Instant::now() < deadline,
                "broker did not start:\n{}",
                self.audit()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait for the broker to exit by itself (e.g. a refused start), at
    /// most 20 s.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "broker did not exit:\n{}",
                self.audit()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Send the broker a signal.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// Everything the broker wrote on stderr (with `--audit stderr`, its
    /// audit records).
    pub fn stderr(&self) -> String {
        self.audit()
    }

    /// The fake service manager.
    pub fn notifications(&self) -> &Notifications {
        self.notify.as_ref().unwrap()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Everything the broker wrote on stderr: its audit records and errors.
    pub fn audit(&self) -> String {
        let mut text = String::new();
        std::fs::File::open(&self.audit_path)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        text
    }

    /// The audit records, parsed. The outcome record of a call that went
    /// well may follow its reply by a moment (the broker defers it to its
    /// next write, or writes it before it next waits): this waits, up to
    /// 3 s, until every allowed call's outcome is there.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let records: Vec<serde_json::Value> = self
                .audit()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            let outcomes: std::collections::HashSet<&str> = records
                .iter()
                .filter(|r| r["event"] == "outcome")
                .filter_map(|r| r["call_id"].as_str())
                .collect();
            let waiting = records.iter().any(|r| {
                r["event"] == "call"
                    && r["decision"] == "allow"
                    && r["call_id"]
                        .as_str()
                        .is_some_and(|id| !outcomes.contains(id))
            });
            if !waiting || Instant::now() >= deadline {
                return records;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let child = self.child.as_mut().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        child.wait().unwrap()
    }

    /// Run `agent-shim ARGS` as `uid` against this broker.
    pub fn shim(&self, uid: u32, args: &[&str]) -> Output {
        shim_command(&self.socket, uid, args).output().unwrap()
    }

    /// Run `agent-shim call ARGS` as `uid` against this broker.
    pub fn call(&self, uid: u32, args: &[&str]) -> Ran {
        let mut full = vec!["call"];
        full.extend_from_slice(args);
        Ran::from(self.shim(uid, &full))
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn chown_tree(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            chown_tree(&entry.unwrap().path(), uid);
        }
    }
}

/// `agent-shim ARGS` as `uid` (gid = uid), talking to `socket`.
pub fn shim_command(socket: &Path, uid: u32, args: &[&str]) -> Command {
    let mut cmd = Command::new(binary("agent-shim"));
    cmd.args(args)
        .env("KEYWARD_SOCKET", socket)
        .stdin(Stdio::null())
        .uid(uid)
        .gid(uid);
    cmd
}

/// stdout, stderr and exit code of a finished command, for assertions.
pub struct Ran {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Ran {
    fn from(out: Output) -> Ran {
        Ran {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl std::fmt::Debug for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Every encoding of `secret` a leak could take: raw, base64 (both
/// alphabets, padded or not), URL-encoded.
pub fn leaked_forms(secret: &str) -> Vec<String> {
    use base64::Engine as _;
    let b = secret.as_bytes();
    vec![
        secret.to_owned(),
        base64::engine::general_purpose::STANDARD.encode(b),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b),
        // base64 of the value inside a Basic header
        base64::engine::general_purpose::STANDARD.encode(format!("user:{secret}")),
        percent_encode(secret),
    ]
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Assert that no form of the secret appears in `text`.
pub fn assert_no_secret(what: &str, text: &str) {
    for form in leaked_forms(SECRET) {
        assert!(
            !text.contains(&form),
            "{what} contains the secret (as {form:?}):\n{text}"
        );
    }
}

/// A raw `SOCK_SEQPACKET` connection, for sending the broker what no
/// well-behaved client would.
pub struct RawConn {
    pub fd: std::os::fd::OwnedFd,
}

impl RawConn {
    pub fn connect(path: &Path) -> RawConn {
        use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
        use std::os::fd::AsRawFd;
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        connect(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
        // Never hang a test on a broker that does not answer.
        let timeout = nix::sys::time::TimeVal::new(15, 0);
        nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
            .unwrap();
        RawConn { fd }
    }

    pub fn send(&self, bytes: &[u8]) -> nix::Result<usize> {
        use std::os::fd::AsRawFd;
        nix::sys::socket::send(
            self.fd.as_raw_fd(),
            bytes,
            nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
        )
    }

    /// The next reply, or `None` once the broker closed the connection.
    pub fn recv(&self) -> Option<keyward_proto::Response> {
        use std::os::fd::AsRawFd;
        let mut buf = vec![0u8; keyward_proto::MAX_MESSAGE + 1];
        let n = match nix::sys::socket::recv(
            self.fd.as_raw_fd(),
            &mut buf,
            nix::sys::socket::MsgFlags::empty(),
        ) {
            // The broker closed with our message unread.
            Err(nix::Error::ECONNRESET) => return None,
            other => other.unwrap(),
        };
        if n == 0 {
            return None;
        }
        Some(keyward_proto::decode(&buf[..n]).unwrap())
    }

    /// Send a request, encoded.
    pub fn request(&self, request: &keyward_proto::Request) -> Option<keyward_proto::Response> {
        self.send(&keyward_proto::encode(request).unwrap()).unwrap();
        self.recv()
    }

    pub fn hello(&self) {
        let reply = self.request(&keyward_proto::Request::Hello(keyward_proto::Hello {
            version: keyward_proto::PROTOCOL_VERSION,
        }));
        assert!(
            matches!(reply, Some(keyward_proto::Response::Hello(_))),
            "{reply:?}"
        );
    }
}

/// An `echo` call request.
pub fn echo_request(message: &str) -> keyward_proto::Request {
    keyward_proto::Request::Call(keyward_proto::Call {
        tool: "echo".into(),
        params: vec![keyward_proto::Param {
            name: "message".into(),
            value: keyward_proto::Value::Str(message.into()),
        }],
    })
}

/// A fake service manager's notification socket.
pub struct Notifications {
    pub path: PathBuf,
    socket: UnixDatagram,
}

impl Notifications {
    fn bind(dir: &Path) -> Notifications {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        // Any uid the broker runs as may send to it.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        Notifications { path, socket }
    }

    /// The next message, or `None` after `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = vec![0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("notify socket: {e}"),
        }
    }

    /// Messages until one has the line `line` (returned last); panics
    /// after `timeout` with what arrived.
    pub fn until(&self, line: &str, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {line:?} within {timeout:?}; got {seen:?}"
            );
            if let Some(message) = self.next(left) {
                let done = message.lines().any(|l| l == line);
                seen.push(message);
                if done {
                    return seen;
                }
            }
        }
    }
}
