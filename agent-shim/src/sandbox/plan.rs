// SPDX-License-Identifier: Apache-2.0
//! The parent's preparation: the token, the program, its environment, the
//! paths it may use, the limits, and the filters — everything that can
//! fail for an ordinary reason, checked before the broker is contacted.

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use keyward_proto::Response;

use super::tmpdir::PrivateTmp;
use super::{Mode, RunOptions, SandboxError, Token, TokenSource, TOKEN_ENV};
use crate::client::{socket_path, Client, CHANNEL_FD, KEYWARD_FD_ENV};
use crate::landlock::{FsRules, Support};
use crate::seccomp::{self, Profile};
use crate::sys;

/// Variables passed to the program besides `--keep-env` names and
/// `KEYWARD_FD`: locale, terminal, and where things are. `LC_*` too.
const ENV_ALLOWLIST: &[&str] = &[
    "COLORTERM",
    "HOME",
    "LANG",
    "LANGUAGE",
    "LOGNAME",
    "NO_COLOR",
    "PATH",
    "SHELL",
    "TERM",
    "TMPDIR",
    "TZ",
    "USER",
];

/// `PATH` for the program when the caller has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Resource limits of the sandbox. Each is an rlimit of every process in
/// it (`RLIMIT_DATA`, `RLIMIT_NPROC`, `RLIMIT_CPU`, `RLIMIT_FSIZE`); the
/// defaults are far above what an agent's tools use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of data (heap and private writable mappings) per process.
    pub memory: u64,
    /// Processes (and threads) in the sandbox.
    pub pids: u64,
    /// Seconds of CPU time per process.
    pub cpu_time: u64,
    /// Bytes of the largest file a process may write.
    pub max_file_size: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            memory: 16 << 30,
            pids: 4096,
            cpu_time: 24 * 3600,
            max_file_size: 64 << 30,
        }
    }
}

/// Everything the sandbox needs, prepared by the parent.
#[derive(Debug)]
pub(super) struct Plan {
    /// The program's canonical path (what is executed).
    pub program: PathBuf,
    pub argv: Vec<CString>,
    pub env: Vec<CString>,
    /// The Landlock rules; `None` when running without Landlock
    /// (`--allow-unsandboxed`).
    pub fs: Option<FsRules>,
    /// What the mount namespace shows (the same paths as the rules).
    pub mounts: FsRules,
    /// `None` when running without seccomp (`--allow-unsandboxed`).
    pub filter: Option<seccomp::Filter>,
    pub support: Support,
    pub mode: Mode,
    pub tty: bool,
    pub limits: Limits,
    /// `RLIMIT_NPROC`: the limit on processes; in fallback mode the
    /// count is the uid's, so what the uid already runs is added.
    pub nproc: u64,
    /// The working directory, kept inside the sandbox where it exists.
    pub cwd: PathBuf,
    pub verbose: bool,
    /// Files the namespace root shows in place of the host's: `passwd`
    /// and `group` with root, the caller and nobody ([`identity_files`]).
    pub generated: Vec<(PathBuf, Vec<u8>)>,
    /// Fallback mode's private temporary directory (the reaper removes it).
    pub private_tmp: Option<PathBuf>,
}

/// Landlock's first ABI with network rules (TCP bind and connect by port).
const NET_RULES_ABI: i32 = 4;

impl Plan {
    /// Switch to fallback mode: the filter gains the fallback rules,
    /// `RLIMIT_NPROC` counts the processes the uid already has, and the
    /// program gets a private temporary directory instead of a private
    /// `/tmp` (removed when the returned guard is dropped).
    pub fn fall_back(&mut self, reason: String) -> Result<PrivateTmp, SandboxError> {
        self.mode = Mode::Fallback(reason);
        // The same profile, with the fallback rules (--gateway is refused
        // in fallback mode; --allow-connect needs no namespace).
        if let Some(filter) = &self.filter {
            self.filter = Some(seccomp::compile(Profile {
                fallback: true,
                ..filter.profile()
            })?);
        }
        self.nproc = uid_processes().saturating_add(self.limits.pids);
        let tmp = PrivateTmp::create().map_err(SandboxError::TempDir)?;
        if let Some(fs) = &mut self.fs {
            fs.read_write.push(tmp.path().to_owned());
        }
        self.set_env("TMPDIR", tmp.path().as_os_str())?;
        self.private_tmp = Some(tmp.path().to_owned());
        Ok(tmp)
    }

    /// Set `name` in the program's environment, replacing what was there.
    fn set_env(&mut self, name: &str, value: &OsStr) -> Result<(), SandboxError> {
        let prefix = format!("{name}=");
        self.env
            .retain(|kv| !kv.as_bytes().starts_with(prefix.as_bytes()));
        let mut kv = OsString::from(prefix);
        kv.push(value);
        self.env.push(cstring(&kv)?);
        Ok(())
    }
}

/// `passwd` and `group` for the namespace root: root, the caller (named
/// as on the host, else after `$USER`), and nobody, never the host's whole
/// files. Inside the user namespace uid and gid 0 and 65534 are unmapped
/// and show as the overflow ids; the entries are there so that a lookup
/// of them by name succeeds, as programs expect.
pub(super) fn identity_files() -> Vec<(PathBuf, Vec<u8>)> {
    use nix::unistd::{getgid, getuid, Group, User};
    let (uid, gid) = (getuid(), getgid());
    // A field of these files must hold no ':' and no newline.
    let clean = |s: &str| -> Option<String> {
        (!s.is_empty() && !s.contains([':', '\n', '\0'])).then(|| s.to_owned())
    };
    let user = User::from_uid(uid).ok().flatten();
    let env_name = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok();
    let name = user
        .as_ref()
        .and_then(|u| clean(&u.name))
        .or_else(|| env_name.as_deref().and_then(clean))
        .unwrap_or_else(|| format!("user{uid}"));
    let home = user
        .as_ref()
        .and_then(|u| clean(&u.dir.to_string_lossy()))
        .or_else(|| std::env::var("HOME").ok().as_deref().and_then(clean))
        .unwrap_or_else(|| "/".to_owned());
    let shell = user
        .as_ref()
        .and_then(|u| clean(&u.shell.to_string_lossy()))
        .unwrap_or_else(|| "/bin/sh".to_owned());
    let group = Group::from_gid(gid)
        .ok()
        .flatten()
        .and_then(|g| clean(&g.name))
        .unwrap_or_else(|| name.clone());
    let mut passwd = String::from("root:x:0:0:root:/root:/usr/sbin/nologin\n");
    let mut groups = String::from("root:x:0:\n");
    if uid.as_raw() != 0 && uid.as_raw() != 65534 {
        passwd.push_str(&format!("{name}:x:{uid}:{gid}::{home}:{shell}\n"));
    }
    if gid.as_raw() != 0 && gid.as_raw() != 65534 {
        groups.push_str(&format!("{group}:x:{gid}:\n"));
    }
    passwd.push_str("nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n");
    groups.push_str("nogroup:x:65534:\n");
    vec![
        (PathBuf::from("/etc/passwd"), passwd.into_bytes()),
        (PathBuf::from("/etc/group"), groups.into_bytes()),
    ]
}

/// How many processes (threads count) the real uid runs now.
fn uid_processes() -> u64 {
    let uid = nix::unistd::getuid().as_raw();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let pids: Vec<OsString> = dir
        .filter_map(|e| Some(e.ok()?.file_name()))
        .filter(|n| n.as_bytes().iter().all(u8::is_ascii_digit))
        .collect();
    pids.iter()
        .filter_map(|pid| {
            let status =
                std::fs::read_to_string(Path::new("/proc").join(pid).join("status")).ok()?;
            let real: u32 = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            let threads: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix("Threads:"))?
                .trim()
                .parse()
                .ok()?;
            (real == uid).then_some(threads)
        })
        .sum()
}
/// A sandbox whose processes run as root can read and write whatever root
/// owns inside the paths Landlock allows, whatever capabilities it drops:
/// run the sub-agent as an unprivileged user.
pub(super) fn refuse_root() -> Result<(), SandboxError> {
    if nix::unistd::geteuid().is_root() {
        return Err(SandboxError::Root);
    }
    Ok(())
}

/// The shim holds the token (and, from `$KEYWARD_TOKEN`, has it in its
/// environment block): no process of its uid may read its memory or
/// `/proc/<pid>/environ`. The sandboxed program is exec'd afresh and is
/// not affected.
pub(super) fn keep_parent_private() -> Result<(), SandboxError> {
    nix::sys::prctl::set_dumpable(false).map_err(|e| SandboxError::Undumpable(e.into()))
}

/// Without Landlock ABI 6 the sandbox can signal the orchestrator and
/// reach abstract sockets: say so every time, not only with `--verbose`.
pub(super) fn warn_unscoped(plan: &Plan) {
    if plan.fs.is_some() && !plan.support.scopes() {
        eprintln!(
            "agent-shim: warning: this kernel's Landlock (ABI {}) cannot scope signals and \
             abstract sockets; the sandbox can signal processes of your uid",
            plan.support.abi
        );
    }
}

/// The token from `--token`, `--token-file` or `$KEYWARD_TOKEN`; `--token`
/// is overwritten in the command line, which every process can read.
pub fn read_token(source: &TokenSource) -> Result<Option<Token>, SandboxError> {
    let text = match source {
        TokenSource::Arg(t) => {
            sys::scrub_cmdline(t.as_bytes()).map_err(SandboxError::ScrubToken)?;
            Zeroizing::new(t.clone())
        }
        TokenSource::File(path) => {
            Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
                SandboxError::TokenFile {
                    path: path.clone(),
                    source,
                }
            })?)
        }
        TokenSource::Env => match std::env::var(TOKEN_ENV) {
            Ok(t) => {
                // The environment block of this process shows in
                // /proc/<pid>/environ: keep only stars there.
                if !t.is_empty() {
                    sys::scrub_environ(t.as_bytes()).map_err(SandboxError::ScrubEnv)?;
                }
                Zeroizing::new(t)
            }
            Err(std::env::VarError::NotPresent) => return Ok(None),
            // Set but unusable: running without the channel the caller
            // meant to give would be a silent surprise.
            Err(std::env::VarError::NotUnicode(_)) => return Err(SandboxError::BadTokenEnv),
        },
    };
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(SandboxError::EmptyToken);
    }
    Ok(Some(Token(Zeroizing::new(trimmed.to_owned()))))
}

/// Everything that can fail for an ordinary reason, checked before the
/// broker is contacted: the program, the environment, the paths, and
/// whether the kernel can enforce the sandbox. The plan is for namespace
/// mode; [`Plan::fall_back`] adapts it.
pub(super) fn prepare(options: &RunOptions, with_channel: bool) -> Result<Plan, SandboxError> {
    let env = build_environment(&options.keep_env, with_channel)?;
    let (name, args) = options
        .command
        .split_first()
        .ok_or_else(|| SandboxError::NotFound(String::new()))?;
    let path_var = env
        .iter()
        .find_map(|(k, v)| (k == "PATH").then_some(v.as_os_str()))
        .unwrap_or(OsStr::new(DEFAULT_PATH));
    let found = find_program(name, path_var)?;
    // Canonical: the mount namespace shows it at that path, and the
    // working directory may not exist there.
    let program = std::fs::canonicalize(&found)
        .map_err(|_| SandboxError::NotFound(name.to_string_lossy().into_owned()))?;
    let argv = std::iter::once(name)
        .chain(args)
        .map(|a| cstring(a.as_os_str()))
        .collect::<Result<_, _>>()?;
    let env = env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.clone();
            kv.push("=");
            kv.push(v);
            cstring(&kv)
        })
        .collect::<Result<_, _>>()?;

    let canonical = |paths: &[PathBuf]| -> Vec<PathBuf> {
        // A path that does not resolve is kept as given: FsRules reports it.
        paths
            .iter()
            .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
            .collect()
    };
    let mut mounts = FsRules::new(
        &canonical(&options.allow_read),
        &canonical(&options.allow_write),
        &canonical(&options.allow_exec),
    )?;
    mounts.allow_exec(&program);
    if options.tty {
        mounts.allow_terminal();
    }
    let support = Support::probe();
    if !options.allow_connect.is_empty() {
        if !options.gateways.is_empty() {
            return Err(SandboxError::AllowConnect(
                "not with --gateway, whose network namespace holds only loopback".to_owned(),
            ));
        }
        if support.abi < NET_RULES_ABI {
            return Err(SandboxError::AllowConnect(format!(
                "Landlock ABI {} cannot restrict connect(2) to a port (needs ABI \
                 {NET_RULES_ABI}, Linux 6.7)",
                support.abi
            )));
        }
        mounts.connect_tcp.extend(&options.allow_connect);
    }
    let fs = match support.require_files() {
        Ok(()) => Some(mounts.clone()),
        Err(e) if options.allow_unsandboxed => {
            eprintln!("agent-shim: warning: running without Landlock: {e}");
            None
        }
        Err(e) => return Err(e.into()),
    };
    let profile = Profile {
        fallback: false,
        tty: options.tty,
        gateway: !options.gateways.is_empty() || !options.allow_connect.is_empty(),
    };
    let filter = match seccomp::compile(profile) {
        Ok(filter) => Some(filter),
        Err(e) if options.allow_unsandboxed => {
            eprintln!("agent-shim: warning: running without seccomp: {e}");
            None
        }
        Err(e) => return Err(e.into()),
    };
    let mut plan = Plan {
        program,
        argv,
        env,
        fs,
        mounts,
        filter,
        support,
        mode: Mode::Namespaces,
        tty: options.tty,
        limits: options.limits,
        nproc: options.limits.pids,
        cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
        verbose: options.verbose,
        generated: identity_files(),
        private_tmp: None,
    };
    // The namespace root's own tmpfs; the caller's TMPDIR does not exist
    // there. (Fallback mode replaces it with its private directory.)
    plan.set_env("TMPDIR", OsStr::new("/tmp"))?;
    Ok(plan)
}

/// The program's environment: the allowlist, `LC_*`, the `--keep-env`
/// names, and `KEYWARD_FD` when it gets a channel. Never the token.
fn build_environment(
    keep: &[String],
    with_channel: bool,
) -> Result<Vec<(OsString, OsString)>, SandboxError> {
    for name in keep {
        if name == TOKEN_ENV {
            return Err(SandboxError::KeepEnv(
                name.clone(),
                "the token is never passed on: the program's channel is already bound to it",
            ));
        }
        if name == KEYWARD_FD_ENV {
            return Err(SandboxError::KeepEnv(name.clone(), "set by agent-shim run"));
        }
    }
    let kept = |name: &OsStr| {
        let name = name.to_string_lossy();
        ENV_ALLOWLIST.contains(&name.as_ref())
            || name.starts_with("LC_")
            || keep.iter().any(|k| *k == name)
    };
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os().filter(|(k, _)| kept(k)).collect();
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    if with_channel {
        env.push((KEYWARD_FD_ENV.into(), CHANNEL_FD.to_string().into()));
    }
    Ok(env)
}

/// `name` itself if it has a slash, else the first executable file of that
/// name in `path`.
fn find_program(name: &OsStr, path: &OsStr) -> Result<PathBuf, SandboxError> {
    let not_found = || SandboxError::NotFound(name.to_string_lossy().into_owned());
    if name.is_empty() {
        return Err(not_found());
    }
    if name.as_bytes().contains(&b'/') {
        let program = PathBuf::from(name);
        return if program.exists() {
            Ok(program)
        } else {
            Err(not_found())
        };
    }
    std::env::split_paths(path)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable_file(candidate))
        .ok_or_else(not_found)
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

pub(super) fn cstring(s: &OsStr) -> Result<CString, SandboxError> {
    CString::new(s.as_bytes()).map_err(|_| SandboxError::Nul(s.to_owned()))
}

/// Connect to the broker, exchange `Hello`, and bind the token: from now
/// on the connection carries the token's authority and nothing else.
/// With `derive`, also call that tool over the bound connection and
/// return the environment variables it yields.
pub(super) fn connect_and_bind(
    token: &Token,
    derive: Option<&super::Derive>,
) -> Result<(OwnedFd, Vec<CString>), SandboxError> {
    let mut client = Client::connect(&socket_path())?;
    bind_session(&mut client, token)?;
    let derived = match derive {
        Some(derive) => super::derive::fetch(&mut client, derive)?,
        None => Vec::new(),
    };
    Ok((client.into_fd(), derived))
}

/// `Bind` the token to the connection (the one `Bind` of every command:
/// `Client::bind`).
fn bind_session(client: &mut Client, token: &Token) -> Result<(), SandboxError> {
    match client.bind(token.expose())? {
        Ok(_) => Ok(()),
        Err(Response::Denied(denial)) => Err(SandboxError::BindDenied(denial.reason)),
        Err(Response::Error(e)) => Err(SandboxError::BindFailed(e.message)),
        Err(other) => Err(SandboxError::BindFailed(format!(
            "unexpected reply {other:?}"
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sandbox::EXIT_NOT_FOUND;

    #[test]
    fn environment_keeps_only_the_allowlist_and_never_the_token() {
        // Variables of this test process (cargo sets many).
        let env = build_environment(&["CARGO_PKG_NAME".to_owned()], true).unwrap();
        let names: Vec<String> = env
            .iter()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        assert!(names.contains(&"PATH".to_owned()), "{names:?}");
        assert!(names.contains(&"CARGO_PKG_NAME".to_owned()), "{names:?}");
        assert!(names.contains(&"KEYWARD_FD".to_owned()), "{names:?}");
        assert!(
            !names.contains(&"CARGO_MANIFEST_DIR".to_owned()),
            "{names:?}"
        );
        let err = build_environment(&[TOKEN_ENV.to_owned()], true).unwrap_err();
        assert!(err.to_string().contains("never passed on"), "{err}");
        let err = build_environment(&["KEYWARD_FD".to_owned()], false).unwrap_err();
        assert!(err.to_string().contains("set by agent-shim run"), "{err}");
        let without = build_environment(&[], false).unwrap();
        assert!(without.iter().all(|(k, _)| k != "KEYWARD_FD"));
    }

    #[test]
    fn finds_programs_like_a_shell() {
        let path = OsStr::new("/nonexistent::/usr/bin:/bin");
        let sh = find_program(OsStr::new("sh"), path).unwrap();
        assert!(sh.ends_with("sh"), "{sh:?}");
        assert!(matches!(
            find_program(OsStr::new("no-such-program-kw"), path),
            Err(SandboxError::NotFound(_))
        ));
        assert!(matches!(
            find_program(OsStr::new("./no/such"), path),
            Err(SandboxError::NotFound(_))
        ));
        assert_eq!(
            find_program(OsStr::new("/bin/sh"), path).unwrap(),
            Path::new("/bin/sh")
        );
        assert_eq!(
            SandboxError::NotFound("x".into()).exit_code(),
            EXIT_NOT_FOUND
        );
    }

    #[test]
    fn identity_files_are_well_formed_and_name_the_caller() {
        let files = identity_files();
        let uid = nix::unistd::getuid().as_raw().to_string();
        let (passwd, group) = (&files[0], &files[1]);
        assert_eq!(passwd.0, Path::new("/etc/passwd"));
        assert_eq!(group.0, Path::new("/etc/group"));
        let passwd = String::from_utf8(passwd.1.clone()).unwrap();
        let group = String::from_utf8(group.1.clone()).unwrap();
        for line in passwd.lines() {
            assert_eq!(line.split(':').count(), 7, "{passwd}");
        }
        for line in group.lines() {
            assert_eq!(line.split(':').count(), 4, "{group}");
        }
        assert!(passwd.starts_with("root:x:0:0:"), "{passwd}");
        assert!(passwd.contains("\nnobody:x:65534:65534:"), "{passwd}");
        assert!(
            passwd
                .lines()
                .any(|l| l.split(':').nth(2) == Some(uid.as_str())),
            "{passwd}"
        );
        assert!(passwd.lines().count() <= 3, "{passwd}");
    }

    #[test]
    fn token_debug_is_redacted() {
        let source = TokenSource::Arg("kw1.secret".into());
        assert!(!format!("{source:?}").contains("secret"));
        let token = Token(Zeroizing::new("kw1.secret".into()));
        assert_eq!(format!("{token:?}"), "[token]");
    }

    #[test]
    fn token_file_is_trimmed_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t");
        std::fs::write(&file, "kw1.abc\n").unwrap();
        let token = read_token(&TokenSource::File(file.clone()))
            .unwrap()
            .unwrap();
        assert_eq!(token.expose(), "kw1.abc");
        std::fs::write(&file, "\n").unwrap();
        assert!(matches!(
            read_token(&TokenSource::File(file)),
            Err(SandboxError::EmptyToken)
        ));
    }
}
