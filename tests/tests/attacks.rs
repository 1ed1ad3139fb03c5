// SPDX-License-Identifier: Apache-2.0
//! The attack suite: a hostile sub-agent (`kw-attack`) runs inside
//! `agent-shim run` as the orchestrator's uid, against a broker running as
//! another uid and holding a known secret, and every attack must fail with
//! its specific errno or a seccomp kill, while the legitimate call from the
//! same sandbox succeeds.
//!
//! Each attack also runs unsandboxed (and under Landlock alone and seccomp
//! alone), to show that it works without the sandbox, so that a passing
//! row means the sandbox stopped it rather than the attack being broken;
//! then under `agent-shim run` in namespace mode and in fallback mode
//! (`KEYWARD_TEST_NO_USERNS=1`). After every run the orchestrator's files
//! (contents, modes, times, extended attributes) must be as they were, no
//! process of the attack may survive, and no SysV object may be left.
//! The suite prints the table of every attack and outcome on stderr.
//!
//! `KEYWARD_REQUIRE_LANDLOCK_ABI=N` (set by CI) makes a kernel with a
//! Landlock ABI below N a failure instead of a skip.
#![allow(clippy::unwrap_used, unsafe_code)]

use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use agent_shim::landlock::{Support, SCOPE_ABI};
use keyward_tests::{binary, Broker, BrokerSetup, Ran, PRINCIPAL_UID, SECRET, STRANGER_UID};

/// The broker's own uid: not the orchestrator's.
const BROKER_UID: u32 = 61100;
/// The orchestrator, and the sub-agent it runs (same uid, as by default).
const ORCHESTRATOR: u32 = PRINCIPAL_UID;
/// A secret of the orchestrator's own (its cloud key), in its home, its
/// environment and an inherited descriptor.
const MARKER: &str = "orchestrator-aws-key-AKIA7f3e9c1d";
/// The secret the orchestrator keeps in its SysV objects.
const IPC_MARKER: &str = "orchestrator-ipc-secret-5e2b";
/// The limits the sandbox is run with in the suite.
const LIMITS: &[&str] = &["--pids", "64", "--memory", "256M", "--max-file-size", "64M"];

const CONFIG: &str = r#"
[broker]
socket = "{socket}"
socket_mode = "0666"
credentials_dir = "{dir}/creds"
state_dir = "{dir}/state"

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
params.message = { type = "string", max_len = 100 }
"#;

/// The minimum Landlock ABI CI demands, if any.
fn required_abi() -> Option<i32> {
    std::env::var("KEYWARD_REQUIRE_LANDLOCK_ABI")
        .ok()
        .map(|v| v.parse().expect("KEYWARD_REQUIRE_LANDLOCK_ABI is a number"))
}

/// Whether the kernel has `abi`; panics if it does not but CI requires it.
fn kernel_has(abi: i32) -> bool {
    let kernel = Support::probe().abi;
    if kernel >= abi {
        return true;
    }
    if let Some(required) = required_abi() {
        assert!(
            kernel >= required.min(abi),
            "the kernel's Landlock ABI is {kernel}, but KEYWARD_REQUIRE_LANDLOCK_ABI={required}"
        );
    }
    false
}

/// How the attack program is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Directly, as the orchestrator's uid: what the attack achieves with
    /// no sandbox.
    Bare,
    /// Under Landlock alone.
    Landlock,
    /// Under the seccomp filter alone.
    Seccomp,
    /// Under `agent-shim run`, with a bound token: namespace mode.
    Shim,
    /// Under `agent-shim run` in fallback mode (no namespaces).
    Fallback,
}

const MODES: [Mode; 5] = [
    Mode::Bare,
    Mode::Landlock,
    Mode::Seccomp,
    Mode::Shim,
    Mode::Fallback,
];

impl Mode {
    fn sandboxed(self) -> bool {
        matches!(self, Mode::Shim | Mode::Fallback)
    }
}

/// What an attack run ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Succeeded(String),
    Blocked(String),
    Killed(i32),
    Broken(String),
}

impl Outcome {
    fn short(&self) -> String {
        match self {
            Outcome::Succeeded(_) => "SUCCEEDED".into(),
            Outcome::Blocked(errno) => errno.clone(),
            Outcome::Killed(31) => "SIGSYS kill".into(),
            Outcome::Killed(n) => format!("killed {n}"),
            Outcome::Broken(_) => "broken".into(),
        }
    }
}

/// What the sandbox must make of an attack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Errno(&'static str),
    SigsysKill,
    /// Only for the legitimate rows.
    Allowed,
    /// Nothing of the attack outlives the sandbox (checked by the suite).
    NoSurvivor,
}

impl Expect {
    /// In namespace mode a path or pid outside the sandbox does not exist
    /// at all: `ENOENT`/`ESRCH` hold as well as the layer's own errno.
    fn matches(&self, outcome: &Outcome, mode: Mode) -> bool {
        match (self, outcome) {
            (Expect::Errno(_), Outcome::Blocked(got))
                if mode == Mode::Shim && (got == "ENOENT" || got == "ESRCH") =>
            {
                true
            }
            (Expect::Errno(e), Outcome::Blocked(got)) => e == got,
            (Expect::NoSurvivor, _) => true,
            (Expect::SigsysKill, Outcome::Killed(n)) => *n == libc::SIGSYS,
            (Expect::Allowed, Outcome::Succeeded(_)) => true,
            _ => false,
        }
    }
}

/// One attack: its arguments, what the sandbox must do, and whether it
/// must work without the sandbox (`bare_works`).
struct Attack {
    group: u8,
    name: &'static str,
    args: Vec<String>,
    expect: Expect,
    bare_works: bool,
    /// The Landlock ABI the expectation needs.
    needs_abi: i32,
    /// A terminal attack: unsandboxed, the pty is the attack's
    /// controlling terminal; sandboxed, the shim runs with `--tty` on a
    /// pty no session holds (see the TIOCSTI row).
    tty: bool,
    /// Give the shim the token as `--token T` (in its command line).
    token_arg: bool,
}

fn attack(
    group: u8,
    name: &'static str,
    args: &[&str],
    expect: Expect,
    bare_works: bool,
) -> Attack {
    Attack {
        group,
        name,
        args: args.iter().map(|s| s.to_string()).collect(),
        expect,
        bare_works,
        needs_abi: agent_shim::landlock::FILE_RULES_ABI,
        tty: false,
        token_arg: false,
    }
}

/// Everything the attacks aim at: the broker (as its own uid, with the
/// secret), the orchestrator's home and a long-running orchestrator
/// process, a journald stand-in, an abstract socket, a terminal.
struct Lab {
    broker: Broker,
    home: PathBuf,
    work: PathBuf,
    token_file: PathBuf,
    orchestrator: Child,
    /// The orchestrator's SysV objects: shared memory, queue, semaphore.
    ipc: [i32; 3],
    journal: UnixDatagram,
    journal_path: PathBuf,
    abstract_name: String,
    _abstract: UnixListener,
    tty: Pty,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.orchestrator.kill();
        let _ = self.orchestrator.wait();
        let [shm, msg, sem] = self.ipc;
        // SAFETY: removing SysV objects by id takes integers.
        unsafe {
            libc::shmctl(shm, libc::IPC_RMID, std::ptr::null_mut());
            libc::msgctl(msg, libc::IPC_RMID, std::ptr::null_mut());
            libc::semctl(sem, 0, libc::IPC_RMID);
        }
    }
}

/// What the orchestrator's files look like: path, mode, mtime, content,
/// the `user.kw` extended attribute.
type Snapshot = Vec<(PathBuf, u32, std::time::SystemTime, Vec<u8>, Vec<u8>)>;

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
}

impl Lab {
    fn new() -> Lab {
        let broker = Broker::spawn(BrokerSetup {
            config: CONFIG,
            credentials: &[("api.token", SECRET)],
            run_as: Some(BROKER_UID),
            ..BrokerSetup::default()
        });
        let state = broker.dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        chown(&state, BROKER_UID);
        let broker = broker.wait_ready();

        // The orchestrator's home: its cloud key, its shell profile, a
        // script it runs later, and the directory the sub-agent may write.
        let home = broker.dir.path().join("home");
        for dir in ["", ".aws", "bin", "work"] {
            let d = home.join(dir);
            std::fs::create_dir_all(&d).unwrap();
            chown(&d, ORCHESTRATOR);
        }
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
        for (file, content) in [
            (
                ".aws/credentials",
                format!("aws_secret_access_key = {MARKER}\n"),
            ),
            (".bashrc", "# profile\n".to_owned()),
            ("bin/deploy.sh", "#!/bin/sh\necho deploying\n".to_owned()),
        ] {
            let path = home.join(file);
            std::fs::write(&path, content).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            chown(&path, ORCHESTRATOR);
        }

        // The token the orchestrator mints for the sub-agent.
        let minted = Ran::from(broker.shim(ORCHESTRATOR, &["mint", "--tool", "echo"]));
        assert_eq!(minted.code, Some(0), "mint: {minted:?}");
        let token = minted.stdout.trim().to_owned();
        assert!(token.starts_with("kw1."), "{minted:?}");
        let token_file = home.join("token");
        std::fs::write(&token_file, &token).unwrap();
        chown(&token_file, ORCHESTRATOR);
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();

        // An extended attribute on the credentials file.
        let creds =
            std::ffi::CString::new(home.join(".aws/credentials").to_str().unwrap()).unwrap();
        // SAFETY: setxattr reads a path, a name and a value, live locals.
        let set = unsafe {
            libc::setxattr(
                creds.as_ptr(),
                c"user.kw".as_ptr(),
                b"kms-key-id".as_ptr() as *const libc::c_void,
                10,
                0,
            )
        };
        assert_eq!(set, 0, "setxattr: {}", std::io::Error::last_os_error());

        // A long-running orchestrator process with the key in its
        // environment, its credentials file open as fd 0, and a secret in
        // a private SysV segment, message queue and semaphore.
        let mut orchestrator = Command::new(binary("kw-attack"))
            .args(["orchestrate", IPC_MARKER])
            .env_clear()
            .env("AWS_SECRET_ACCESS_KEY", MARKER)
            .stdin(std::fs::File::open(home.join(".aws/credentials")).unwrap())
            .stdout(Stdio::piped())
            .uid(ORCHESTRATOR)
            .gid(ORCHESTRATOR)
            .spawn()
            .unwrap();
        let mut ready = String::new();
        std::io::BufReader::new(orchestrator.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        let ids: Vec<i32> = ready
            .strip_prefix("READY ")
            .unwrap_or_else(|| panic!("orchestrator: {ready:?}"))
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect();
        let ipc = [ids[0], ids[1], ids[2]];

        // journald's stand-in: a datagram socket anyone may write to.
        let journal_path = broker.dir.path().join("journal.sock");
        let journal = UnixDatagram::bind(&journal_path).unwrap();
        journal.set_nonblocking(true).unwrap();
        std::fs::set_permissions(&journal_path, std::fs::Permissions::from_mode(0o666)).unwrap();

        // Unique per lab: tests run in parallel in one process.
        let abstract_name = format!(
            "keyward-attack-{}",
            broker.dir.path().file_name().unwrap().to_string_lossy()
        );
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&abstract_name).unwrap();
        let abstract_listener = UnixListener::bind_addr(&addr).unwrap();
        abstract_listener.set_nonblocking(true).unwrap();

        let work = home.join("work");
        Lab {
            broker,
            home,
            work,
            token_file,
            orchestrator,
            ipc,
            journal,
            journal_path,
            abstract_name,
            _abstract: abstract_listener,
            tty: Pty::open(),
        }
    }

    fn attacks(&self) -> Vec<Attack> {
        let dir = self.broker.dir.path();
        let s = |p: PathBuf| p.display().to_string();
        let broker = self.broker.pid().to_string();
        let orch = self.orchestrator.id().to_string();
        let socket = s(self.broker.socket.clone());
        let journal = s(self.journal_path.clone());
        let eacces = Expect::Errno("EACCES");
        let eperm = Expect::Errno("EPERM");
        let mut signal_orch = attack(
            6,
            "signal the orchestrator",
            &["signal", &orch],
            eperm,
            true,
        );
        signal_orch.needs_abi = SCOPE_ABI;
        let mut signal_shim = attack(6, "signal the shim", &["signal", "parent"], eperm, false);
        signal_shim.needs_abi = SCOPE_ABI;
        let mut loot_argv = attack(
            5,
            "loot, with --token in the shim's argv",
            &["loot"],
            Expect::Allowed,
            true,
        );
        loot_argv.token_arg = true;
        // The shim's setsid alone takes the caller's controlling terminal
        // away, and TIOCSCTTY cannot steal one another session holds: to
        // show the seccomp rule at work, the sandbox runs with --tty (the
        // terminal ioctls, TIOCSCTTY included, allowed) on a pty no
        // session holds, as an orchestrator driving its sub-agent through
        // a pty of its own does. The program makes it its controlling
        // terminal; without the TIOCSTI rule the injection then succeeds.
        // (Where dev.tty.legacy_tiocsti is 0 the kernel refuses TIOCSTI
        // to everyone without CAP_SYS_ADMIN, unsandboxed too.)
        let legacy_tiocsti = std::fs::read_to_string("/proc/sys/dev/tty/legacy_tiocsti")
            .map_or(true, |v| v.trim() != "0");
        let mut tiocsti = attack(
            8,
            "TIOCSTI into a terminal (--tty)",
            &["tiocsti"],
            eperm,
            legacy_tiocsti,
        );
        tiocsti.tty = true;
        vec![
            attack(
                1,
                "read the broker's credential file",
                &["read", &s(dir.join("creds/api.token"))],
                eacces,
                false,
            ),
            attack(
                1,
                "read the broker's config",
                &["read", &s(dir.join("broker.toml"))],
                eacces,
                true,
            ),
            attack(
                1,
                "read the orchestrator's ~/.aws/credentials",
                &["read", &s(self.home.join(".aws/credentials"))],
                eacces,
                true,
            ),
            attack(
                2,
                "read /proc/<broker>/mem",
                &["proc-read", &broker, "mem"],
                eacces,
                false,
            ),
            attack(
                2,
                "read /proc/<broker>/environ",
                &["proc-read", &broker, "environ"],
                eacces,
                false,
            ),
            attack(
                2,
                "read /proc/<orchestrator>/environ",
                &["proc-read", &orch, "environ"],
                eacces,
                true,
            ),
            attack(
                2,
                "process_vm_readv the broker",
                &["vm-read", &broker],
                eperm,
                false,
            ),
            attack(
                2,
                "process_vm_readv the orchestrator",
                &["vm-read", &orch],
                eperm,
                true,
            ),
            attack(
                3,
                "ptrace attach the shim",
                &["ptrace-attach", "parent"],
                eperm,
                false,
            ),
            attack(
                3,
                "ptrace attach the orchestrator",
                &["ptrace-attach", &orch],
                eperm,
                true,
            ),
            attack(
                3,
                "ptrace attach the broker",
                &["ptrace-attach", &broker],
                eperm,
                false,
            ),
            attack(
                3,
                "PTRACE_TRACEME, then exec",
                &["ptrace-traceme"],
                eperm,
                true,
            ),
            attack(
                3,
                "pidfd_getfd the orchestrator's fd 0",
                &["pidfd-getfd", &orch, "0"],
                eperm,
                true,
            ),
            attack(
                3,
                "pidfd_getfd the broker's fd 3",
                &["pidfd-getfd", &broker, "3"],
                eperm,
                false,
            ),
            attack(
                4,
                "socket+connect to the broker",
                &["connect", &socket],
                eperm,
                true,
            ),
            attack(
                4,
                "io_uring socket+connect to the broker",
                &["uring-connect", &socket],
                eperm,
                true,
            ),
            attack(
                4,
                "int 0x80 socketcall to the broker",
                &["int80-socketcall", &socket],
                Expect::SigsysKill,
                true,
            ),
            attack(
                4,
                "int 0x80 socket+connect to the broker",
                &["int80-socket", &socket],
                Expect::SigsysKill,
                true,
            ),
            attack(4, "x32 socket", &["x32-socket"], Expect::SigsysKill, false),
            attack(
                5,
                "loot env, fds, /proc/self, argv",
                &["loot"],
                Expect::Allowed,
                true,
            ),
            loot_argv,
            attack(
                6,
                "write the orchestrator's ~/.bashrc",
                &["write", &s(self.home.join(".bashrc"))],
                eacces,
                true,
            ),
            attack(
                6,
                "write a script the orchestrator runs",
                &["write", &s(self.home.join("bin/deploy.sh"))],
                eacces,
                true,
            ),
            attack(
                6,
                "write inside --allow-write (legitimate)",
                &["write", &s(self.work.join("out.txt"))],
                Expect::Allowed,
                true,
            ),
            signal_orch,
            signal_shim,
            attack(
                7,
                "datagram sendto journald",
                &["dgram-sendto", &journal],
                eperm,
                true,
            ),
            attack(
                7,
                "sendto with an address",
                &["sendto-address", &journal],
                eperm,
                false,
            ),
            attack(
                7,
                "connect to an abstract socket",
                &["abstract-connect", &self.abstract_name],
                eperm,
                true,
            ),
            tiocsti,
            attack(8, "unshare(CLONE_NEWUSER)", &["unshare-user"], eperm, true),
            attack(
                8,
                "unshare(CLONE_NEWUSER), then connect",
                &["unshare-then-connect", &socket],
                eperm,
                true,
            ),
            attack(8, "clone(CLONE_NEWUSER)", &["clone-newuser"], eperm, true),
            attack(
                8,
                "clone3(CLONE_NEWUSER)",
                &["clone3"],
                Expect::Errno("ENOSYS"),
                true,
            ),
            // Round 2: what sharing the uid, IPC, pids and mounts allowed.
            attack(
                9,
                "SHM_STAT all ids, shmat the orchestrator's",
                &["shm-steal", IPC_MARKER],
                eperm,
                true,
            ),
            attack(
                9,
                "msgrcv(MSG_COPY)+msgsnd on its queue",
                &["msg-steal", IPC_MARKER],
                eperm,
                true,
            ),
            attack(
                9,
                "semctl(SETVAL) on its semaphore",
                &["sem-steal"],
                eperm,
                true,
            ),
            attack(
                9,
                "leave a 64 MiB SysV segment behind",
                &["shm-leave"],
                eperm,
                true,
            ),
            attack(
                10,
                "setpriority(orchestrator)",
                &["renice", &orch, "setpriority"],
                eperm,
                true,
            ),
            attack(
                10,
                "sched_setscheduler(orchestrator, IDLE)",
                &["renice", &orch, "sched-idle"],
                eperm,
                true,
            ),
            attack(
                10,
                "ioprio_set(orchestrator, IDLE)",
                &["renice", &orch, "ioprio"],
                eperm,
                true,
            ),
            attack(
                10,
                "sched_setaffinity(orchestrator)",
                &["renice", &orch, "affinity"],
                eperm,
                true,
            ),
            attack(
                10,
                "prlimit(orchestrator, RLIMIT_CPU)",
                &["prlimit", &orch],
                eperm,
                true,
            ),
            attack(
                10,
                "prlimit(shim, NOFILE, 3) + setsid survivor",
                &["escape", "{escape_log}"],
                Expect::NoSurvivor,
                true,
            ),
            attack(
                11,
                "chmod ~/.aws/credentials 0644",
                &["chmod", &s(self.home.join(".aws/credentials")), "644"],
                eperm,
                true,
            ),
            attack(
                11,
                "chmod ~ 0777",
                &["chmod", &s(self.home.clone()), "777"],
                eperm,
                true,
            ),
            attack(
                11,
                "utimensat ~/.bashrc",
                &["utime", &s(self.home.join(".bashrc"))],
                eperm,
                true,
            ),
            attack(
                11,
                "setxattr/removexattr ~/.bashrc",
                &["setxattr", &s(self.home.join(".bashrc"))],
                eperm,
                true,
            ),
            attack(
                11,
                "getxattr ~/.aws/credentials",
                &["getxattr", &s(self.home.join(".aws/credentials"))],
                eperm,
                true,
            ),
            attack(
                11,
                "inotify on ~",
                &["inotify", &s(self.home.clone())],
                eperm,
                true,
            ),
            attack(
                11,
                "inotify on ~/.aws",
                &["inotify", &s(self.home.join(".aws"))],
                eperm,
                true,
            ),
            attack(
                12,
                "TCSETS, TIOCSWINSZ, TIOCEXCL on the tty",
                &["tty-change"],
                eperm,
                true,
            ),
            attack(
                12,
                "fork 400 processes (--pids 64)",
                &["fork-bomb", "400"],
                Expect::Errno("EAGAIN"),
                true,
            ),
            attack(
                12,
                "touch 1 GiB (--memory 256M)",
                &["touch-memory", "1024"],
                Expect::Errno("ENOMEM"),
                true,
            ),
            attack(
                12,
                "write 256 MiB (--max-file-size 64M)",
                &["write-big", &s(self.work.join("big")), "256"],
                Expect::Errno("EFBIG"),
                true,
            ),
        ]
    }

    /// The orchestrator's files as they are now.
    fn snapshot(&self) -> Snapshot {
        use std::os::unix::fs::MetadataExt;
        ["", ".aws", ".aws/credentials", ".bashrc", "bin/deploy.sh"]
            .iter()
            .map(|f| {
                let path = self.home.join(f);
                let meta = std::fs::metadata(&path).unwrap();
                let content = if meta.is_file() {
                    std::fs::read(&path).unwrap()
                } else {
                    Vec::new()
                };
                let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
                let mut value = vec![0u8; 64];
                // SAFETY: getxattr writes at most 64 bytes into `value`.
                let n = unsafe {
                    libc::getxattr(
                        c.as_ptr(),
                        c"user.kw".as_ptr(),
                        value.as_mut_ptr() as *mut libc::c_void,
                        value.len(),
                    )
                };
                value.truncate(usize::try_from(n).unwrap_or(0));
                (
                    path,
                    meta.mode() & 0o7777,
                    meta.modified().unwrap(),
                    content,
                    value,
                )
            })
            .collect()
    }

    /// Put the orchestrator's files back as in `snapshot`.
    fn restore(&self, snapshot: &Snapshot) {
        for (path, mode, mtime, content, _) in snapshot {
            if !content.is_empty() {
                std::fs::write(path, content).unwrap();
            }
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode)).unwrap();
            std::fs::File::open(path)
                .unwrap()
                .set_modified(*mtime)
                .unwrap();
        }
    }

    /// Run `kw-attack ARGS` in `mode`, as the orchestrator.
    fn run(&self, mode: Mode, attack: &Attack) -> (Outcome, Ran) {
        let kw_attack = binary("kw-attack");
        let mut cmd = match mode {
            Mode::Shim | Mode::Fallback => {
                let mut cmd = Command::new(binary("agent-shim"));
                cmd.arg("run").args(LIMITS);
                if mode == Mode::Shim {
                    cmd.arg("--require-namespaces");
                }
                if attack.tty {
                    cmd.arg("--tty");
                }
                if attack.token_arg {
                    let token = std::fs::read_to_string(&self.token_file).unwrap();
                    cmd.arg("--token").arg(token.trim());
                } else {
                    cmd.arg("--token-file").arg(&self.token_file);
                }
                cmd.arg("--allow-write")
                    .arg(&self.work)
                    .arg("--")
                    .arg(&kw_attack)
                    .arg("--legit");
                cmd
            }
            Mode::Bare => Command::new(&kw_attack),
            Mode::Landlock | Mode::Seccomp => {
                let mut cmd = Command::new(&kw_attack);
                cmd.arg("--layer").arg(if mode == Mode::Landlock {
                    "landlock"
                } else {
                    "seccomp"
                });
                cmd
            }
        };
        let escape_log = self.work.join(format!("escape-{mode:?}.log"));
        cmd.args(attack.args.iter().map(|a| {
            if a == "{escape_log}" {
                escape_log.display().to_string()
            } else {
                a.clone()
            }
        }))
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", &self.home)
        .env("KEYWARD_SOCKET", &self.broker.socket)
        .env("AWS_SECRET_ACCESS_KEY", MARKER)
        .env(
            "KEYWARD_TOKEN",
            std::fs::read_to_string(&self.token_file).unwrap(),
        )
        .uid(ORCHESTRATOR)
        .gid(ORCHESTRATOR)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        if mode == Mode::Fallback {
            cmd.env("KEYWARD_TEST_NO_USERNS", "1");
        }
        let leak = std::fs::File::open(self.home.join(".aws/credentials")).unwrap();
        let leak_fd = leak.as_raw_fd();
        let tty = self.tty.slave.try_clone().unwrap();
        // Sandboxed, the pty stays free: see the TIOCSTI row.
        let with_tty = attack.tty && !mode.sandboxed();
        cmd.stdin(Stdio::from(tty));
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe system calls on integers.
        unsafe {
            cmd.pre_exec(move || {
                // An inherited descriptor the orchestrator forgot to close.
                let leaked = if leak_fd == 5 {
                    libc::fcntl(5, libc::F_SETFD, 0)
                } else {
                    libc::dup2(leak_fd, 5)
                };
                if leaked < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if with_tty {
                    // The terminal as controlling terminal, as in a shell.
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        let status = out.status;
        let ran = Ran::from(out);
        let outcome = if let Some(sig) = status.signal() {
            Outcome::Killed(sig)
        } else if mode.sandboxed() && status.code().is_some_and(|c| c > 128 && c < 160) {
            Outcome::Killed(status.code().unwrap() - 128)
        } else {
            match ran
                .stdout
                .lines()
                .find_map(|l| l.strip_prefix("RESULT "))
                .and_then(|r| r.split_once(' ').or(Some((r, ""))))
            {
                Some(("succeeded", what)) => Outcome::Succeeded(what.to_owned()),
                Some(("blocked", errno)) => Outcome::Blocked(errno.to_owned()),
                _ => Outcome::Broken(format!("{ran:?}")),
            }
        };
        (outcome, ran)
    }
}

/// A pseudo-terminal; the attack's stdin is its slave.
struct Pty {
    _master: OwnedFd,
    slave: OwnedFd,
}

impl Pty {
    fn open() -> Pty {
        use std::os::fd::FromRawFd;
        // SAFETY: plain system calls on descriptors we own; each result is
        // checked before it is wrapped in an OwnedFd.
        unsafe {
            let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            assert!(
                master >= 0,
                "posix_openpt: {}",
                std::io::Error::last_os_error()
            );
            let master = OwnedFd::from_raw_fd(master);
            assert_eq!(libc::grantpt(master.as_raw_fd()), 0);
            assert_eq!(libc::unlockpt(master.as_raw_fd()), 0);
            let slave = libc::ioctl(
                master.as_raw_fd(),
                libc::TIOCGPTPEER,
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            );
            assert!(
                slave >= 0,
                "TIOCGPTPEER: {}",
                std::io::Error::last_os_error()
            );
            // The orchestrator's uid owns its terminal.
            libc::fchown(slave, ORCHESTRATOR, ORCHESTRATOR);
            Pty {
                _master: master,
                slave: OwnedFd::from_raw_fd(slave),
            }
        }
    }
}

/// What looting must not find from inside the sandbox.
fn check_loot(lab: &Lab, ran: &Ran) -> Result<(), String> {
    let token = std::fs::read_to_string(&lab.token_file).unwrap();
    let token = token.trim();
    for (what, needle) in [
        ("the broker's secret", SECRET),
        ("the orchestrator's key", MARKER),
        ("the token", token),
    ] {
        if ran.stdout.contains(needle) {
            return Err(format!("found {what}"));
        }
    }
    // 0-2 and the broker channel; nothing else but the directory listing
    // itself.
    let fds: Vec<&str> = ran
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("LOOT fd "))
        .filter(|l| !l.ends_with("/fd"))
        .filter_map(|l| l.split(' ').next())
        .collect();
    if fds != ["0", "1", "2", "3"] {
        return Err(format!("descriptors other than 0-3: {fds:?}"));
    }
    if !ran.stdout.contains("LOOT parent-environ blocked EACCES") {
        return Err("the shim's environment was readable".into());
    }
    if !ran.stdout.contains("LOOT env KEYWARD_FD=3") {
        return Err("no KEYWARD_FD=3".into());
    }
    Ok(())
}

/// Whether the unsandboxed run shows the attack working.
fn bare_worked(attack: &Attack, outcome: &Outcome, ran: &Ran, journal_got: usize) -> bool {
    match attack.args[0].as_str() {
        "loot" => ran.stdout.contains(MARKER),
        // Judged by the suite: a survivor, a segment left, a file changed.
        "escape" | "shm-leave" | "chmod" | "utime" => false,
        "dgram-sendto" => matches!(outcome, Outcome::Succeeded(_)) && journal_got > 0,
        "connect"
        | "uring-connect"
        | "int80-socketcall"
        | "int80-socket"
        | "unshare-then-connect" => {
            matches!(outcome, Outcome::Succeeded(s) if s.contains("broker answered Done"))
        }
        _ => matches!(outcome, Outcome::Succeeded(_)),
    }
}

/// How many datagrams the journal stand-in has received since last asked.
fn drain(journal: &UnixDatagram) -> usize {
    let mut buf = [0u8; 512];
    std::iter::from_fn(|| journal.recv(&mut buf).ok()).count()
}

#[test]
fn every_attack_fails_inside_agent_shim_run() {
    keyward_tests::require_root();
    if !kernel_has(agent_shim::landlock::FILE_RULES_ABI) {
        eprintln!("skipped: this kernel's Landlock cannot enforce the file rules");
        return;
    }
    let lab = Lab::new();
    let attacks = lab.attacks();
    let pristine = lab.snapshot();
    let row = |cells: [&str; 8]| {
        format!(
            "{:<3} {:<44} {:<11} {:<11} {:<11} {:<11} {:<11} {}",
            cells[0], cells[1], cells[2], cells[3], cells[4], cells[5], cells[6], cells[7]
        )
    };
    let mut table = vec![row([
        "#",
        "attack",
        "no sandbox",
        "Landlock",
        "seccomp",
        "namespaces",
        "fallback",
        "verdict",
    ])];
    let mut failures = Vec::new();
    for attack in &attacks {
        let mut outcomes = Vec::new();
        let mut verdict = Vec::new();
        for mode in MODES {
            let (outcome, ran) = lab.run(mode, attack);
            let journal_got = drain(&lab.journal);
            let survivors = reap_survivors(&lab.work.join(format!("escape-{mode:?}.log")));
            // In namespace mode an id is the sandbox's own IPC namespace's,
            // gone with it: never look it up (or remove it) on the host.
            let segment_left = mode != Mode::Shim && remove_left_segment(&ran);
            let host_changed = lab.snapshot() != pristine;
            lab.restore(&pristine);
            let name = format!("{} ({mode:?})", attack.name);
            if mode.sandboxed() {
                if journal_got > 0 {
                    failures.push(format!(
                        "{name}: a forged record reached the journal socket"
                    ));
                }
                if !survivors.is_empty() {
                    failures.push(format!(
                        "{name}: processes survived the sandbox: {survivors:?}"
                    ));
                }
                if segment_left {
                    failures.push(format!("{name}: a SysV segment outlived the sandbox"));
                }
                if host_changed {
                    failures.push(format!("{name}: the orchestrator's files changed"));
                }
            }
            if let Outcome::Broken(why) = &outcome {
                failures.push(format!("{name}: no result: {why}"));
            }
            let own_tmpfs = mode == Mode::Shim && on_own_tmpfs(attack, &outcome, host_changed);
            let held = attack.expect.matches(&outcome, mode) || own_tmpfs;
            match mode {
                Mode::Bare
                    if attack.bare_works
                        && !bare_worked(attack, &outcome, &ran, journal_got)
                        && survivors.is_empty()
                        && !segment_left
                        && !host_changed =>
                {
                    verdict.push("attack broken?".to_owned());
                    failures.push(format!(
                        "{}: does not work even without the sandbox, so the row proves nothing: {ran:?}",
                        attack.name
                    ));
                }
                Mode::Shim | Mode::Fallback => {
                    if !ran.stdout.contains("LEGIT ok {\"message\":\"legit\"}") {
                        verdict.push(format!("legit call FAILED ({mode:?})"));
                        failures.push(format!("{name}: the legitimate call failed: {ran:?}"));
                    }
                    keyward_tests::assert_no_secret(attack.name, &ran.stdout);
                    keyward_tests::assert_no_secret(attack.name, &ran.stderr);
                    if attack.needs_abi > Support::probe().abi && !kernel_has(attack.needs_abi) {
                        verdict.push(format!("skipped (needs Landlock ABI {})", attack.needs_abi));
                    } else if !held {
                        verdict.push(format!("FAILED ({mode:?}), expected {:?}", attack.expect));
                        failures.push(format!(
                            "{name}: expected {:?}, got {outcome:?}: {ran:?}",
                            attack.expect
                        ));
                    } else if attack.args[0] == "loot" {
                        if let Err(e) = check_loot(&lab, &ran) {
                            verdict.push(format!("FAILED ({mode:?}): {e}"));
                            failures.push(format!("{name}: {e}: {ran:?}"));
                        }
                    }
                }
                _ => {}
            }
            let shown = match (&outcome, attack.args[0].as_str()) {
                (Outcome::Succeeded(_), "loot") if ran.stdout.contains(MARKER) => {
                    "FOUND KEY".to_owned()
                }
                (Outcome::Succeeded(_), "loot") => "nothing".to_owned(),
                _ if !survivors.is_empty() => "SURVIVED".to_owned(),
                _ if segment_left => "LEFT SEGMENT".to_owned(),
                (Outcome::Succeeded(_), _) if matches!(attack.expect, Expect::NoSurvivor) => {
                    "none left".to_owned()
                }
                (Outcome::Succeeded(_), _) if matches!(attack.expect, Expect::Allowed) => {
                    "allowed".to_owned()
                }
                _ if own_tmpfs => "own tmpfs".to_owned(),
                _ => outcome.short(),
            };
            outcomes.push(shown);
        }
        if verdict.is_empty() {
            verdict.push("stopped".to_owned());
            if matches!(attack.expect, Expect::Allowed) {
                verdict = vec!["ok".to_owned()];
            }
        }
        let group = attack.group.to_string();
        let verdict = verdict.join("; ");
        table.push(row([
            &group,
            attack.name,
            &outcomes[0],
            &outcomes[1],
            &outcomes[2],
            &outcomes[3],
            &outcomes[4],
            &verdict,
        ]));
    }
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "\nattack suite (legitimate call from the same sandbox: checked on every row)"
    );
    for line in &table {
        let _ = writeln!(err, "{line}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// In namespace mode the directories above an allowed path exist only as
/// mount points in the sandbox's own tmpfs (`~` above `~/work`): a path
/// attack that "succeeds" there touched a copy, and what counts is that the
/// host's files did not change. (Watching the copy with inotify sees
/// nothing of the host's directory: another inode, on another filesystem.)
fn on_own_tmpfs(attack: &Attack, outcome: &Outcome, host_changed: bool) -> bool {
    matches!(
        attack.args[0].as_str(),
        "write" | "chmod" | "utime" | "setxattr" | "inotify"
    ) && !matches!(attack.expect, Expect::Allowed)
        && matches!(outcome, Outcome::Succeeded(_))
        && !host_changed
}

/// Kill and list every process still running with `log` (unique to the
/// run) in its command line: what an `escape` attack left behind.
fn reap_survivors(log: &Path) -> Vec<i32> {
    let needle = log.display().to_string();
    let find = || -> Vec<i32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
            })
            .collect()
    };
    // Give a dying sandbox a moment to be gone.
    let mut left = find();
    for _ in 0..20 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
        left = find();
    }
    for &pid in &left {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = std::fs::remove_file(log);
    left
}

/// Whether a `shm-leave` attack's segment (`left segment ID`) still
/// exists; removes it.
fn remove_left_segment(ran: &Ran) -> bool {
    let Some(id) = ran
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT succeeded left segment "))
        .and_then(|id| id.trim().parse::<i32>().ok())
    else {
        return false;
    };
    // SAFETY: IPC_RMID by id takes integers; the root test process may
    // remove any segment.
    unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) == 0 }
}

/// SIGKILL of the shim, while the program and a grandchild in a session
/// of its own are running and the grandchild keeps calling the broker over
/// the inherited channel: in both modes no process of the sandbox is left
/// running, and nothing calls the broker any more.
#[test]
fn sigkill_of_the_shim_leaves_nothing_running() {
    keyward_tests::require_root();
    if !kernel_has(agent_shim::landlock::FILE_RULES_ABI) {
        eprintln!("skipped: this kernel's Landlock cannot enforce the file rules");
        return;
    }
    let lab = Lab::new();
    for fallback in [false, true] {
        let log = lab.work.join(format!("sigkill-{fallback}.log"));
        let mut cmd = Command::new(binary("agent-shim"));
        cmd.arg("run")
            .arg("--token-file")
            .arg(&lab.token_file)
            .arg("--allow-write")
            .arg(&lab.work)
            .arg("--")
            .arg(binary("kw-attack"))
            .arg("escape-and-wait")
            .arg(&log)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("KEYWARD_SOCKET", &lab.broker.socket)
            .uid(ORCHESTRATOR)
            .gid(ORCHESTRATOR)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if fallback {
            cmd.env("KEYWARD_TEST_NO_USERNS", "1");
        }
        let mut shim = cmd.spawn().unwrap();
        let calls = || {
            std::fs::read_to_string(&log)
                .map(|l| l.lines().count())
                .unwrap_or(0)
        };
        // The grandchild is running and served.
        for _ in 0..200 {
            if calls() > 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        assert!(
            calls() > 0,
            "fallback={fallback}: the grandchild was never served"
        );
        shim.kill().unwrap();
        shim.wait().unwrap();
        let survivors = reap_survivors_keeping_log(&log);
        assert!(
            survivors.is_empty(),
            "fallback={fallback}: SIGKILL of the shim left {survivors:?} running"
        );
        // Nothing holds the channel, so nothing is served any more.
        let before = calls();
        std::thread::sleep(std::time::Duration::from_millis(400));
        assert_eq!(calls(), before, "fallback={fallback}: still served");
        let _ = std::fs::remove_file(&log);
    }
}

/// `--tty` shares the terminal: the settings may be changed (a program
/// like an editor needs it), without it they may not; typing into it is
/// refused either way (the TIOCSTI row runs with `--tty`, and the
/// filter's unit test covers both profiles).
#[test]
fn only_tty_lets_the_program_change_the_terminal() {
    keyward_tests::require_root();
    let lab = Lab::new();
    for (tty, expect) in [
        (false, "RESULT blocked EPERM"),
        (
            true,
            "RESULT succeeded changed the terminal: TCSETS TIOCSWINSZ TIOCEXCL",
        ),
    ] {
        let mut cmd = Command::new(binary("agent-shim"));
        cmd.arg("run");
        if tty {
            cmd.arg("--tty");
        }
        cmd.arg("--")
            .arg(binary("kw-attack"))
            .arg("tty-change")
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .uid(ORCHESTRATOR)
            .gid(ORCHESTRATOR)
            .stdin(Stdio::from(lab.tty.slave.try_clone().unwrap()));
        let ran = Ran::from(cmd.output().unwrap());
        assert!(ran.stdout.contains(expect), "--tty {tty}: {ran:?}");
    }
}

/// [`reap_survivors`], without removing the log.
fn reap_survivors_keeping_log(log: &Path) -> Vec<i32> {
    let copy = log.with_extension("kept");
    let _ = std::fs::copy(log, &copy);
    let left = reap_survivors(log);
    let _ = std::fs::rename(&copy, log);
    left
}

/// A token copied out of the sandbox is worthless to another uid: its
/// audience is the orchestrator's uid, checked against the kernel's
/// credentials.
#[test]
fn a_token_copied_out_is_refused_for_another_uid() {
    keyward_tests::require_root();
    let lab = Lab::new();
    let token = std::fs::read_to_string(&lab.token_file).unwrap();
    let token = token.trim();
    let ran = Ran::from(lab.broker.shim(
        STRANGER_UID,
        &["call", "--token", token, "echo", "message=stolen"],
    ));
    assert_eq!(ran.code, Some(3), "{ran:?}");
    assert!(!ran.stdout.contains("stolen"), "{ran:?}");
    assert!(ran.stderr.contains("uid"), "{ran:?}");
    // From the right uid, the same token works: the refusal was the uid.
    let ran = Ran::from(lab.broker.shim(
        ORCHESTRATOR,
        &["call", "--token", token, "echo", "message=mine"],
    ));
    assert_eq!(ran.code, Some(0), "{ran:?}");
}

/// The sandbox cannot mint as the orchestrator: not over a new connection
/// (no socket), and not over its bound channel (a bound session carries
/// the token's authority only).
#[test]
fn the_sandbox_cannot_mint_as_the_orchestrator() {
    keyward_tests::require_root();
    let lab = Lab::new();
    let mut cmd = Command::new(binary("agent-shim"));
    cmd.arg("run")
        .arg("--token-file")
        .arg(&lab.token_file)
        .arg("--")
        .arg(binary("agent-shim"))
        .args(["mint", "--tool", "echo"])
        .env_clear()
        .env("KEYWARD_SOCKET", &lab.broker.socket)
        .uid(ORCHESTRATOR)
        .gid(ORCHESTRATOR);
    let ran = Ran::from(cmd.output().unwrap());
    assert_eq!(ran.code, Some(3), "{ran:?}");
    assert!(!ran.stdout.contains("kw1."), "{ran:?}");
    // Outside the sandbox the orchestrator can (the control).
    let ran = Ran::from(lab.broker.shim(ORCHESTRATOR, &["mint", "--tool", "echo"]));
    assert_eq!(ran.code, Some(0), "{ran:?}");
}
