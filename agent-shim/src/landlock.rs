// SPDX-License-Identifier: Apache-2.0
//! Landlock: what the sandboxed program may touch on the filesystem, and
//! which processes and sockets outside the sandbox it may reach.
//!
//! The ruleset handles every filesystem right up to [`TARGET_ABI`], TCP
//! bind and connect (ABI 4), and the abstract-unix-socket and signal
//! scopes (ABI 6); it grants read+exec on the system directories a
//! dynamically linked program needs, a handful of `/etc` files and
//! devices, read on `--allow-read`, read+write on `--allow-write`, read+exec
//! on `--allow-exec`, and nothing else. A Landlock domain also stops the
//! program from ptracing, or reading the memory or `/proc/<pid>/environ`
//! of, any process outside it.
//!
//! The kernel's ABI decides what can be enforced: [`Support`] says which
//! parts are, and the shim refuses to run when the file rules cannot be.

use std::io;
use std::path::{Path, PathBuf};

use std::os::fd::OwnedFd;

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, PathBeneath,
    RestrictionStatus, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetError, RulesetStatus,
    Scope, ABI,
};
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

use crate::sys;

/// The newest Landlock ABI whose rights the ruleset asks for. Rights of a
/// newer ABI than the kernel's are dropped (best effort) and reported by
/// [`Support`]; rights of an ABI newer than this are never asked for, so an
/// upgrade is a deliberate, tested change.
pub const TARGET_ABI: ABI = ABI::V9;

/// The first ABI that can enforce the file rules completely: ABI 3 adds
/// `truncate(2)`, without which a sandboxed program could empty any file
/// the user may write.
pub const FILE_RULES_ABI: i32 = 3;
/// The first ABI with TCP bind/connect rules.
pub const NETWORK_ABI: i32 = 4;
/// The first ABI with abstract-unix-socket and signal scoping.
pub const SCOPE_ABI: i32 = 6;
/// The first ABI that controls connecting to pathname unix sockets.
pub const UNIX_SOCKET_ABI: i32 = 9;

/// Directories a dynamically linked program needs: read and execute.
const SYSTEM_EXEC: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32",
];

/// Files and directories under `/etc` that ordinary programs read (the
/// loader cache, name service, time zone, TLS roots, Debian alternatives,
/// the distribution's name, which `pip` and `platform` read). Never all of
/// `/etc`: the broker's configuration lives there. In namespace mode
/// `passwd` and `group` are generated (root, the caller, nobody), not the
/// host's.
const SYSTEM_READ: &[&str] = &[
    "/etc/alternatives",
    "/etc/ca-certificates",
    "/etc/ca-certificates.conf",
    "/etc/debian_version",
    "/etc/gai.conf",
    "/etc/group",
    "/etc/host.conf",
    "/etc/hosts",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/locale.alias",
    "/etc/mime.types",
    "/etc/nsswitch.conf",
    "/etc/os-release",
    "/etc/passwd",
    "/etc/pki",
    "/etc/protocols",
    "/etc/resolv.conf",
    "/etc/services",
    "/etc/ssl",
    "/etc/terminfo",
    "/etc/timezone",
    "/dev/random",
    "/dev/urandom",
    // Landlock cannot tell one pid directory from another; what keeps the
    // program out of other processes' files is the domain's ptrace
    // scoping (environ, mem, fd, maps of processes outside the sandbox
    // are refused).
    "/proc",
];

/// Devices the program may read and write (and truncate: `> /dev/null`).
const SYSTEM_DEVICES: &[&str] = &["/dev/null", "/dev/zero", "/dev/full"];

/// The controlling terminal, granted (and, in namespace mode, mounted)
/// only with `--tty`.
pub const TERMINAL: &str = "/dev/tty";

/// Whether `path` is one of the system paths the rules always name: owned
/// by root on any sane host, so where it is a symbolic link (`/lib` ->
/// `usr/lib`, `/etc/resolv.conf` -> `/run/...`) the link is the
/// administrator's and may be followed. A caller's path never is.
pub fn is_system_path(path: &Path) -> bool {
    SYSTEM_EXEC
        .iter()
        .chain(SYSTEM_READ)
        .chain(SYSTEM_DEVICES)
        .chain(std::iter::once(&TERMINAL))
        .any(|p| Path::new(p) == path)
}

/// Why Landlock could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    #[error(
        "the kernel cannot enforce the sandbox's file rules: {missing}; \
         pass --allow-unsandboxed to run without them"
    )]
    Unenforceable { missing: String },
    #[error("{path}: {source}")]
    Path {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Landlock rule for {path}: {source}")]
    Rule {
        path: PathBuf,
        #[source]
        source: RulesetError,
    },
    #[error("Landlock ruleset: {0}")]
    Ruleset(#[from] RulesetError),
    #[error("the kernel accepted the Landlock ruleset but does not enforce it")]
    NotEnforced,
}

/// What the running kernel's Landlock can enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Support {
    /// The kernel's Landlock ABI version; 0 without Landlock.
    pub abi: i32,
}

impl Support {
    /// Ask the kernel.
    pub fn probe() -> Support {
        Support {
            // An unexpected probe failure counts as no Landlock: the shim
            // then refuses to run rather than run unconfined.
            abi: sys::landlock_abi().unwrap_or(0),
        }
    }

    /// The file rules are enforced completely.
    pub fn files(&self) -> bool {
        self.abi >= FILE_RULES_ABI
    }

    /// TCP bind and connect are denied.
    pub fn tcp(&self) -> bool {
        self.abi >= NETWORK_ABI
    }

    /// Abstract unix sockets and signals are scoped to the sandbox.
    pub fn scopes(&self) -> bool {
        self.abi >= SCOPE_ABI
    }

    /// Connecting to pathname unix sockets follows the file rules.
    pub fn unix_sockets(&self) -> bool {
        self.abi >= UNIX_SOCKET_ABI
    }

    /// `Err` naming what is missing when the file rules cannot be enforced.
    pub fn require_files(&self) -> Result<(), LandlockError> {
        let missing = match self.abi {
            0 => "Landlock is not available (not built into this kernel, or not \
                  enabled with lsm= at boot)"
                .to_owned(),
            abi if abi < FILE_RULES_ABI => format!(
                "Landlock ABI {abi} cannot restrict truncate(2) \
                 (needs ABI {FILE_RULES_ABI}, Linux 6.2)"
            ),
            _ => return Ok(()),
        };
        Err(LandlockError::Unenforceable { missing })
    }

    /// One line per layer: what is enforced and what is not.
    pub fn describe(&self) -> Vec<String> {
        let yes_no = |on: bool, what: &str, abi: i32| {
            if on {
                format!("{what}: enforced")
            } else {
                format!("{what}: NOT enforced (needs Landlock ABI {abi})")
            }
        };
        vec![
            format!("Landlock ABI {}", self.abi),
            yes_no(self.files(), "file rules", FILE_RULES_ABI),
            yes_no(self.tcp(), "TCP bind/connect denied", NETWORK_ABI),
            yes_no(
                self.scopes(),
                "abstract unix sockets and signals scoped",
                SCOPE_ABI,
            ),
            yes_no(
                self.unix_sockets(),
                "pathname unix sockets follow the file rules",
                UNIX_SOCKET_ABI,
            ),
        ]
    }
}

/// The filesystem rules of one sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FsRules {
    /// Read and execute.
    pub read_exec: Vec<PathBuf>,
    /// Read only.
    pub read: Vec<PathBuf>,
    /// Read and write (create, remove, rename, truncate), no execute.
    pub read_write: Vec<PathBuf>,
    /// Read, write and truncate an existing file (devices).
    pub devices: Vec<PathBuf>,
    /// TCP ports the sandbox may connect to (`--gateway`: the relay's port
    /// on loopback); every other TCP connect, and every bind, is denied
    /// where the kernel has network rules (ABI 4).
    pub connect_tcp: Vec<u16>,
}

impl FsRules {
    /// The system rules plus the caller's paths. Every caller path must
    /// exist; system paths that do not are left out.
    pub fn new(
        allow_read: &[PathBuf],
        allow_write: &[PathBuf],
        allow_exec: &[PathBuf],
    ) -> Result<FsRules, LandlockError> {
        let existing = |list: &[&str]| -> Vec<PathBuf> {
            list.iter()
                .map(PathBuf::from)
                .filter(|p| p.exists())
                .collect()
        };
        let checked = |paths: &[PathBuf]| -> Result<Vec<PathBuf>, LandlockError> {
            paths
                .iter()
                .map(|p| match std::fs::metadata(p) {
                    Ok(_) => Ok(p.clone()),
                    Err(source) => Err(LandlockError::Path {
                        path: p.clone(),
                        source,
                    }),
                })
                .collect()
        };
        let mut read_exec = existing(SYSTEM_EXEC);
        read_exec.extend(checked(allow_exec)?);
        let mut read = existing(SYSTEM_READ);
        read.extend(checked(allow_read)?);
        Ok(FsRules {
            read_exec,
            read,
            read_write: checked(allow_write)?,
            devices: existing(SYSTEM_DEVICES),
            connect_tcp: Vec::new(),
        })
    }

    /// Also allow reading and writing the controlling terminal
    /// (`--tty`), where the host has `/dev/tty`.
    pub fn allow_terminal(&mut self) {
        let tty = PathBuf::from(TERMINAL);
        if tty.exists() && !self.devices.contains(&tty) {
            self.devices.push(tty);
        }
    }

    /// Also allow reading and executing `path` (the program itself).
    pub fn allow_exec(&mut self, path: &Path) {
        if !self.read_exec.iter().any(|p| path.starts_with(p)) {
            self.read_exec.push(path.to_owned());
        }
    }

    fn groups(&self) -> [(&[PathBuf], BitFlags<AccessFs>); 4] {
        let read = AccessFs::ReadFile | AccessFs::ReadDir;
        let all = AccessFs::from_all(TARGET_ABI);
        [
            (&self.read_exec, read | AccessFs::Execute),
            (&self.read, read),
            (&self.read_write, all & !AccessFs::Execute),
            (
                &self.devices,
                AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate,
            ),
        ]
    }
}

/// Restrict the calling thread (and every process it later executes) to
/// `rules`. Irreversible. Sets `no_new_privs` (the kernel requires it).
pub fn restrict(rules: &FsRules) -> Result<RestrictionStatus, LandlockError> {
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(TARGET_ABI))?
        .handle_access(AccessNet::from_all(TARGET_ABI))?
        .scope(Scope::from_all(TARGET_ABI))?
        .create()?;
    for (paths, access) in rules.groups() {
        for path in paths {
            // A path that does not exist (in a mount namespace, one that
            // was not mounted) cannot be reached: leaving its rule out
            // grants nothing.
            if std::fs::metadata(path).is_err_and(|e| e.kind() == io::ErrorKind::NotFound) {
                continue;
            }
            let fd = open_rule_path(path)?;
            let access = if is_directory(&fd) {
                access
            } else {
                // Directory-only rights on a file are an error; keep the
                // ones that mean something for a file.
                access & AccessFs::from_file(TARGET_ABI)
            };
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd, access))
                .map_err(|source| LandlockError::Rule {
                    path: path.clone(),
                    source,
                })?;
        }
    }
    for &port in &rules.connect_tcp {
        ruleset = ruleset.add_rule(NetPort::new(port, AccessNet::ConnectTcp))?;
    }
    let status = ruleset.restrict_self()?;
    if status.ruleset == RulesetStatus::NotEnforced {
        return Err(LandlockError::NotEnforced);
    }
    Ok(status)
}

/// The descriptor a rule is attached to. A system path may be a link the
/// administrator made (`/lib`), and is followed; a caller's path was made
/// canonical by the shim, so a symbolic link in it now (a directory of the
/// uid swapped for a link since it was checked) is refused, never
/// followed to wherever it points.
fn open_rule_path(path: &Path) -> Result<OwnedFd, LandlockError> {
    let flags = OFlag::O_PATH | OFlag::O_CLOEXEC;
    let opened = if is_system_path(path) {
        nix::fcntl::open(path, flags, Mode::empty())
    } else {
        let how = OpenHow::new()
            .flags(flags)
            .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
        nix::fcntl::openat2(nix::fcntl::AT_FDCWD, path, how)
    };
    opened.map_err(|e| LandlockError::Path {
        path: path.to_owned(),
        source: match e {
            nix::Error::ELOOP => io::Error::other(
                "a component is a symbolic link now; it was not when the path was checked",
            ),
            e => e.into(),
        },
    })
}

fn is_directory(fd: &OwnedFd) -> bool {
    nix::sys::stat::fstat(fd)
        .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
        .unwrap_or(true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn describes_what_each_abi_enforces() {
        let old = Support { abi: 2 };
        assert!(!old.files());
        let err = old.require_files().unwrap_err().to_string();
        assert!(err.contains("truncate"), "{err}");
        assert!(err.contains("--allow-unsandboxed"), "{err}");
        let none = Support { abi: 0 }.require_files().unwrap_err().to_string();
        assert!(none.contains("not available"), "{none}");
        let v6 = Support { abi: 6 };
        v6.require_files().unwrap();
        assert!(v6.tcp() && v6.scopes() && !v6.unix_sockets());
        let text = v6.describe().join("\n");
        assert!(
            text.contains(
                "pathname unix sockets follow the file rules: NOT enforced (needs Landlock ABI 9)"
            ),
            "{text}"
        );
    }

    #[test]
    fn caller_paths_must_exist_and_system_paths_are_filtered() {
        let err = FsRules::new(&[PathBuf::from("/nonexistent/keyward")], &[], &[]).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/keyward"), "{err}");
        let rules = FsRules::new(&[], &[PathBuf::from("/tmp")], &[]).unwrap();
        assert!(rules.read_exec.contains(&PathBuf::from("/usr")));
        assert!(rules.read.iter().all(|p| p.exists()));
        assert!(!rules.read.contains(&PathBuf::from("/etc")));
        assert_eq!(rules.read_write, [PathBuf::from("/tmp")]);
    }

    #[test]
    fn the_program_is_added_once() {
        let mut rules = FsRules::default();
        rules.read_exec.push(PathBuf::from("/usr"));
        rules.allow_exec(Path::new("/usr/bin/true"));
        rules.allow_exec(Path::new("/opt/tool"));
        assert_eq!(
            rules.read_exec,
            [PathBuf::from("/usr"), PathBuf::from("/opt/tool")]
        );
    }

    /// Landlock restricts the calling thread only: each check runs in a
    /// thread of its own, which the restriction dies with.
    fn in_restricted_thread<T: Send + 'static>(
        rules: FsRules,
        check: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        std::thread::spawn(move || {
            let abi = Support::probe().abi;
            if abi < FILE_RULES_ABI {
                // CI sets the ABI its kernel must have: there, a skip is a
                // failure.
                let required = std::env::var("KEYWARD_REQUIRE_LANDLOCK_ABI")
                    .ok()
                    .and_then(|v| v.parse::<i32>().ok())
                    .unwrap_or(0);
                assert!(
                    required < FILE_RULES_ABI,
                    "Landlock ABI {abi}, KEYWARD_REQUIRE_LANDLOCK_ABI={required}"
                );
                return None;
            }
            restrict(&rules).unwrap();
            Some(check())
        })
        .join()
        .unwrap()
    }

    #[test]
    fn denies_reads_and_writes_outside_the_rules() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("allowed");
        let secret = dir.path().join("secret");
        std::fs::create_dir(&allowed).unwrap();
        std::fs::write(&secret, "s3cret").unwrap();
        let rules = FsRules::new(&[], std::slice::from_ref(&allowed), &[]).unwrap();
        let result = in_restricted_thread(rules, move || {
            (
                std::fs::read(&secret).map_err(|e| e.raw_os_error()),
                std::fs::write(allowed.join("ok"), "x").map_err(|e| e.raw_os_error()),
                std::fs::write(secret.with_extension("new"), "x").map_err(|e| e.raw_os_error()),
                std::fs::read("/etc/passwd")
                    .map(|_| ())
                    .map_err(|e| e.raw_os_error()),
            )
        });
        let Some((read_secret, write_allowed, write_outside, read_passwd)) = result else {
            eprintln!("skipped: this kernel cannot enforce Landlock file rules");
            return;
        };
        assert_eq!(read_secret.unwrap_err(), Some(libc::EACCES));
        write_allowed.unwrap();
        assert_eq!(write_outside.unwrap_err(), Some(libc::EACCES));
        read_passwd.unwrap();
    }
}
