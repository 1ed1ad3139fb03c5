// SPDX-License-Identifier: Apache-2.0
//! Shared by the systemd and journald tests: start the real broker the way
//! systemd would (extra arguments, a notification socket, an activated
//! socket), and listen as a fake service manager.
#![allow(dead_code, clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyward_tests::{binary, require_root};

/// How a broker is started.
#[derive(Default)]
pub struct Launch<'a> {
    /// Config text; `{socket}` and `{dir}` are replaced as in the harness.
    pub config: &'a str,
    /// Credential files: (name, content), in `{dir}/creds` (mode 0700).
    pub credentials: &'a [(&'a str, &'a str)],
    /// Arguments after `serve --config FILE`.
    pub args: &'a [&'a str],
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Run as this uid (and gid); root when `None`.
    pub run_as: Option<u32>,
    /// Start under `systemd-socket-activate --seqpacket` listening at the
    /// returned service's `activated` path instead of letting the broker
    /// bind `{socket}`.
    pub socket_activated: bool,
    /// A fake service manager: `NOTIFY_SOCKET` points at it.
    pub notify: bool,
    /// `WATCHDOG_USEC` to pass (needs `notify`).
    pub watchdog_usec: Option<u64>,
}

/// A broker process and its files; killed on drop.
pub struct Service {
    pub dir: tempfile::TempDir,
    /// The socket the configuration names (the broker binds it itself).
    pub socket: PathBuf,
    /// The socket systemd-socket-activate listens on.
    pub activated: PathBuf,
    pub config_path: PathBuf,
    pub child: Option<Child>,
    pub notify: Option<Notifications>,
    stderr_path: PathBuf,
}

impl Service {
    pub fn spawn(launch: Launch<'_>) -> Service {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("keyward-sd")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        let creds = dir.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        for (name, content) in launch.credentials {
            let path = creds.join(name);
            std::fs::write(&path, content).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o700)).unwrap();
        if let Some(uid) = launch.run_as {
            for path in [&run, &creds] {
                chown_tree(path, uid);
            }
        }
        let socket = run.join("broker.sock");
        let activated = run.join("activated.sock");
        let config_path = dir.path().join("broker.toml");
        write_config(&config_path, launch.config, &socket, dir.path());
        let notify = launch.notify.then(|| Notifications::bind(dir.path()));
        let stderr_path = dir.path().join("stderr.log");

        let mut cmd = if launch.socket_activated {
            let mut cmd = Command::new("systemd-socket-activate");
            cmd.arg("--seqpacket").arg("--listen").arg(&activated);
            for (k, v) in &launch.env {
                cmd.arg(format!("--setenv={k}={v}"));
            }
            cmd.arg(binary("keyward-broker"));
            cmd
        } else {
            Command::new(binary("keyward-broker"))
        };
        cmd.arg("serve")
            .arg("--config")
            .arg(&config_path)
            .args(launch.args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap());
        if let Some(notify) = &notify {
            cmd.env("NOTIFY_SOCKET", &notify.path);
            if let Some(usec) = launch.watchdog_usec {
                cmd.env("WATCHDOG_USEC", usec.to_string());
            }
        }
        if let Some(uid) = launch.run_as {
            cmd.uid(uid).gid(uid);
        }
        Service {
            child: Some(cmd.spawn().unwrap()),
            dir,
            socket,
            activated,
            config_path,
            notify,
            stderr_path,
        }
    }

    /// Wait until `path` answers a `Hello`; panics with the broker's
    /// stderr if it exits first or takes more than 20 s.
    pub fn wait_serving(&mut self, path: &Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if path.exists() && agent_shim::client::Client::connect(path).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("broker exited early ({status}):\n{}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "broker did not start:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait for the broker to exit by itself, at most 20 s.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "broker did not exit:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// Everything the broker wrote on stderr.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The JSON audit records on stderr (with `--audit stderr`).
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        self.stderr()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Replace the configuration file (the next SIGHUP reads it).
    pub fn rewrite_config(&self, config: &str) {
        write_config(&self.config_path, config, &self.socket, self.dir.path());
    }

    pub fn notifications(&self) -> &Notifications {
        self.notify.as_ref().unwrap()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn write_config(path: &Path, config: &str, socket: &Path, dir: &Path) {
    let text = config
        .replace("{socket}", socket.to_str().unwrap())
        .replace("{dir}", dir.to_str().unwrap());
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

fn chown_tree(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            chown_tree(&entry.unwrap().path(), uid);
        }
    }
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
