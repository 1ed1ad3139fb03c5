// SPDX-License-Identifier: Apache-2.0
//! `agent-shim run`: bind a token to a broker connection, then run a
//! program in a sandbox whose only way out is that connection.
//!
//! Order matters: everything that needs the outside world (reading the
//! token, finding the program, connecting and binding) happens first, in
//! the parent; then the child restricts itself, one irreversible step at a
//! time, and executes the program. [`run`] and [`enter_sandbox`] read top
//! to bottom as that recipe; each step is its own function.
//!
//! The parent stays outside the sandbox: it forwards signals to the
//! sandbox, waits, and exits with the program's status (128 + N when it
//! was killed by signal N).

use std::convert::Infallible;
use std::ffi::{CString, OsStr, OsString};
use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{execve, getpid, getppid, setsid, Pid};
use zeroize::Zeroizing;

use keyward_proto::{Bind, Request, Response};

use crate::client::{socket_path, Client, ClientError, CHANNEL_FD, KEYWARD_FD_ENV};
use crate::landlock::{self, FsRules, LandlockError, Support};
use crate::seccomp::{self, SeccompError};
use crate::sys::{self, Forked};

/// Exit status when the sandbox could not be set up in the child.
pub const EXIT_SANDBOX: u8 = 125;
/// Exit status when the program was found but could not be executed.
pub const EXIT_CANNOT_EXEC: u8 = 126;
/// Exit status when the program was not found.
pub const EXIT_NOT_FOUND: u8 = 127;
/// Exit status when the broker refused the token.
pub const EXIT_DENIED: u8 = 3;
/// Exit status for any other failure before the program started.
pub const EXIT_ERROR: u8 = 1;

/// The variable a token may be passed in (never passed on to the program).
pub const TOKEN_ENV: &str = "KEYWARD_TOKEN";

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

/// Signals the parent passes on to the sandbox.
const FORWARDED: &[Signal] = &[
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// Where the token comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `--token T` (overwritten in the command line once read).
    Arg(String),
    /// `--token-file F`.
    File(PathBuf),
    /// `$KEYWARD_TOKEN`, else no token.
    Env,
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Arg(_) => f.write_str("Arg([token])"),
            TokenSource::File(p) => f.debug_tuple("File").field(p).finish(),
            TokenSource::Env => f.write_str("Env"),
        }
    }
}

/// What `agent-shim run` was asked to do.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub token: TokenSource,
    pub allow_read: Vec<PathBuf>,
    pub allow_write: Vec<PathBuf>,
    pub allow_exec: Vec<PathBuf>,
    pub keep_env: Vec<String>,
    pub allow_unsandboxed: bool,
    pub verbose: bool,
    /// The program and its arguments.
    pub command: Vec<OsString>,
}

/// A capability token; zeroized on drop, never printed.
pub struct Token(Zeroizing<String>);

impl Token {
    fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[token]")
    }
}

/// Why `agent-shim run` could not start the program. One variant per step.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot read the token file {path}: {source}")]
    TokenFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the token is empty")]
    EmptyToken,
    #[error("${TOKEN_ENV} is set but is not text, so it cannot be a token")]
    BadTokenEnv,
    #[error("cannot remove the token from the command line: {0}")]
    ScrubToken(#[source] io::Error),
    #[error("--keep-env {0}: {1}")]
    KeepEnv(String, &'static str),
    #[error("{0}: command not found")]
    NotFound(String),
    #[error("argument or variable {0:?} contains a NUL byte")]
    Nul(OsString),
    #[error(transparent)]
    Landlock(#[from] LandlockError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error(transparent)]
    Connect(#[from] ClientError),
    #[error("the broker refused the token: {0}")]
    BindDenied(String),
    #[error("the broker could not bind the token: {0}")]
    BindFailed(String),
    #[error("cannot block signals: {0}")]
    BlockSignals(#[source] io::Error),
    #[error("fork: {0}")]
    Fork(#[source] io::Error),
    #[error("setsid: {0}")]
    Session(#[source] io::Error),
    #[error("prctl(PR_SET_PDEATHSIG): {0}")]
    ParentDeathSignal(#[source] io::Error),
    #[error("the shim exited before the sandbox was set up")]
    ParentGone,
    #[error("cannot pass the broker channel as fd {CHANNEL_FD}: {0}")]
    Channel(#[source] io::Error),
    #[error("cannot close inherited descriptors: {0}")]
    CloseFds(#[source] io::Error),
    #[error("setrlimit(RLIMIT_CORE, 0): {0}")]
    CoreLimit(#[source] io::Error),
    #[error("prctl(PR_SET_NO_NEW_PRIVS): {0}")]
    NoNewPrivs(#[source] io::Error),
    #[error("cannot restore the signal mask: {0}")]
    Signals(#[source] io::Error),
    #[error("cannot execute {path}: {source}")]
    Exec {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("waiting for the sandbox: {0}")]
    Wait(#[source] io::Error),
    #[error(
        "refusing to run the sandbox as root: it could still read what root owns; \
         run agent-shim run as the unprivileged user the sub-agent should be"
    )]
    Root,
    #[error("prctl(PR_SET_DUMPABLE, 0): {0}")]
    Undumpable(#[source] io::Error),
    #[error("prctl(PR_SET_CHILD_SUBREAPER): {0}")]
    Subreaper(#[source] io::Error),
    #[error("cannot drop capabilities: {0}")]
    Capabilities(#[source] io::Error),
}

impl SandboxError {
    /// The exit status `agent-shim run` ends with for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            SandboxError::NotFound(_) => EXIT_NOT_FOUND,
            SandboxError::Exec { .. } => EXIT_CANNOT_EXEC,
            SandboxError::BindDenied(_) => EXIT_DENIED,
            _ => EXIT_ERROR,
        }
    }
}

/// Everything the child needs, prepared by the parent.
#[derive(Debug)]
struct Plan {
    program: PathBuf,
    argv: Vec<CString>,
    env: Vec<CString>,
    /// `None` when running without Landlock (`--allow-unsandboxed`).
    fs: Option<FsRules>,
    /// `None` when running without seccomp (`--allow-unsandboxed`).
    filter: Option<seccomp::Filter>,
    support: Support,
    verbose: bool,
}

/// Run `options.command` in the sandbox; returns the exit status to end
/// with. Errors are for failures before the program started.
pub fn run(options: &RunOptions) -> Result<u8, SandboxError> {
    refuse_root()?;
    keep_parent_private()?;
    let token = read_token(&options.token)?;
    let plan = prepare(options, token.is_some())?;
    warn_unscoped(&plan);
    let channel = match &token {
        Some(token) => Some(connect_and_bind(token)?),
        None => None,
    };
    drop(token);
    sys::default_sigchld().map_err(SandboxError::BlockSignals)?;
    become_subreaper()?;
    let old_mask = block_forwarded_signals()?;
    let parent = getpid();
    match sys::fork().map_err(SandboxError::Fork)? {
        Forked::Child => {
            let Err(err) = enter_sandbox(&plan, channel, parent, &old_mask);
            eprintln!("agent-shim: sandbox: {err}");
            let code = match err {
                SandboxError::Exec { .. } => EXIT_CANNOT_EXEC,
                _ => EXIT_SANDBOX,
            };
            sys::exit_child(code)
        }
        Forked::Parent(child) => {
            // The sandbox holds the only reference the program needs.
            drop(channel);
            supervise(child)
        }
    }
}

/// A sandbox whose processes run as root can read and write whatever root
/// owns inside the paths Landlock allows, whatever capabilities it drops:
/// run the sub-agent as an unprivileged user.
fn refuse_root() -> Result<(), SandboxError> {
    if nix::unistd::geteuid().is_root() {
        return Err(SandboxError::Root);
    }
    Ok(())
}

/// The shim holds the token (and, from `$KEYWARD_TOKEN`, has it in its
/// environment block): no process of its uid may read its memory or
/// `/proc/<pid>/environ`. The sandboxed program is exec'd afresh and is
/// not affected.
fn keep_parent_private() -> Result<(), SandboxError> {
    nix::sys::prctl::set_dumpable(false).map_err(|e| SandboxError::Undumpable(e.into()))
}

/// Without Landlock ABI 6 the sandbox can signal the orchestrator and
/// reach abstract sockets: say so every time, not only with `--verbose`.
fn warn_unscoped(plan: &Plan) {
    if plan.fs.is_some() && !plan.support.scopes() {
        eprintln!(
            "agent-shim: warning: this kernel's Landlock (ABI {}) cannot scope signals and \
             abstract sockets; the sandbox can signal processes of your uid",
            plan.support.abi
        );
    }
}

/// Orphaned descendants of the program are re-parented to the shim, so
/// that it can kill them when the program exits: nothing started in the
/// sandbox outlives it (`PR_SET_PDEATHSIG` covers only the direct child).
fn become_subreaper() -> Result<(), SandboxError> {
    nix::sys::prctl::set_child_subreaper(true).map_err(|e| SandboxError::Subreaper(e.into()))
}

/// The token from `--token`, `--token-file` or `$KEYWARD_TOKEN`; `--token`
/// is overwritten in the command line, which every process can read.
fn read_token(source: &TokenSource) -> Result<Option<Token>, SandboxError> {
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
            Ok(t) => Zeroizing::new(t),
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
/// whether the kernel can enforce the sandbox.
fn prepare(options: &RunOptions, with_channel: bool) -> Result<Plan, SandboxError> {
    let env = build_environment(&options.keep_env, with_channel)?;
    let (name, args) = options
        .command
        .split_first()
        .ok_or_else(|| SandboxError::NotFound(String::new()))?;
    let path_var = env
        .iter()
        .find_map(|(k, v)| (k == "PATH").then_some(v.as_os_str()))
        .unwrap_or(OsStr::new(DEFAULT_PATH));
    let program = find_program(name, path_var)?;
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

    let support = Support::probe();
    let fs = match support.require_files() {
        Ok(()) => {
            let mut rules = FsRules::new(
                &options.allow_read,
                &options.allow_write,
                &options.allow_exec,
            )?;
            rules.allow_exec(&program);
            Some(rules)
        }
        Err(e) if options.allow_unsandboxed => {
            eprintln!("agent-shim: warning: running without Landlock: {e}");
            None
        }
        Err(e) => return Err(e.into()),
    };
    let filter = match seccomp::compile() {
        Ok(filter) => Some(filter),
        Err(e) if options.allow_unsandboxed => {
            eprintln!("agent-shim: warning: running without seccomp: {e}");
            None
        }
        Err(e) => return Err(e.into()),
    };
    Ok(Plan {
        program,
        argv,
        env,
        fs,
        filter,
        support,
        verbose: options.verbose,
    })
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

fn cstring(s: &OsStr) -> Result<CString, SandboxError> {
    CString::new(s.as_bytes()).map_err(|_| SandboxError::Nul(s.to_owned()))
}

/// Connect to the broker, exchange `Hello`, and bind the token: from now
/// on the connection carries the token's authority and nothing else.
fn connect_and_bind(token: &Token) -> Result<OwnedFd, SandboxError> {
    let mut client = Client::connect(&socket_path())?;
    bind_session(&mut client, token)?;
    Ok(client.into_fd())
}

/// `Bind` the token to the connection.
fn bind_session(client: &mut Client, token: &Token) -> Result<(), SandboxError> {
    let request = Request::Bind(Bind {
        token: token.expose().to_owned(),
    });
    match client.request(&request)? {
        Response::Bound(_) => Ok(()),
        Response::Denied(denial) => Err(SandboxError::BindDenied(denial.reason)),
        Response::Error(e) => Err(SandboxError::BindFailed(e.message)),
        other => Err(SandboxError::BindFailed(format!(
            "unexpected reply {other:?}"
        ))),
    }
}

/// Block the signals the parent forwards (and `SIGCHLD`, which it waits
/// for) before forking, so none is lost in between. Returns the old mask,
/// which the child restores before exec.
fn block_forwarded_signals() -> Result<SigSet, SandboxError> {
    let mut set = SigSet::empty();
    for &signal in FORWARDED {
        set.add(signal);
    }
    set.add(Signal::SIGCHLD);
    set.thread_swap_mask(SigmaskHow::SIG_BLOCK)
        .map_err(|e| SandboxError::BlockSignals(e.into()))
}

/// The child's recipe, in order. Returns only on failure.
fn enter_sandbox(
    plan: &Plan,
    channel: Option<OwnedFd>,
    parent: Pid,
    old_mask: &SigSet,
) -> Result<Infallible, SandboxError> {
    start_session()?;
    die_with_parent(parent)?;
    keep_only_channel(channel)?;
    // The environment is replaced at exec by `plan.env`.
    disable_core_dumps()?;
    forbid_new_privileges()?;
    drop_capabilities()?;
    let landlock = plan.fs.as_ref().map(restrict_filesystem).transpose()?;
    if let Some(filter) = &plan.filter {
        restrict_syscalls(filter)?;
    }
    if plan.verbose {
        report(plan, landlock.is_some());
    }
    restore_signals(old_mask)?;
    exec_program(plan)
}

/// A session (and process group) of its own: no controlling terminal to
/// inject input into (`TIOCSTI`), and terminal signals reach it only
/// through the parent.
fn start_session() -> Result<(), SandboxError> {
    setsid().map_err(|e| SandboxError::Session(e.into()))?;
    Ok(())
}

/// Die with the shim, so no sandboxed process outlives its supervisor.
fn die_with_parent(parent: Pid) -> Result<(), SandboxError> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
        .map_err(|e| SandboxError::ParentDeathSignal(e.into()))?;
    // The parent may have died before the prctl.
    if getppid() != parent {
        return Err(SandboxError::ParentGone);
    }
    Ok(())
}

/// Descriptors 0, 1, 2 and the broker channel as 3; nothing else survives
/// exec.
fn keep_only_channel(channel: Option<OwnedFd>) -> Result<(), SandboxError> {
    let first_closed = match channel {
        Some(channel) => {
            sys::install_channel(channel, CHANNEL_FD).map_err(SandboxError::Channel)?;
            CHANNEL_FD + 1
        }
        None => CHANNEL_FD,
    };
    sys::close_on_exec_from(first_closed).map_err(SandboxError::CloseFds)
}

/// No core dump can carry anything out.
fn disable_core_dumps() -> Result<(), SandboxError> {
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|e| SandboxError::CoreLimit(e.into()))
}

/// Whatever capabilities the shim was given (file capabilities, ambient
/// ones) stay outside the sandbox.
fn drop_capabilities() -> Result<(), SandboxError> {
    sys::drop_capabilities().map_err(SandboxError::Capabilities)
}

/// No set-uid or file-capability program can regain privileges (and the
/// kernel requires it for Landlock and seccomp).
fn forbid_new_privileges() -> Result<(), SandboxError> {
    nix::sys::prctl::set_no_new_privs().map_err(|e| SandboxError::NoNewPrivs(e.into()))
}

/// Landlock: the file, network and scope rules.
fn restrict_filesystem(rules: &FsRules) -> Result<(), SandboxError> {
    landlock::restrict(rules)?;
    Ok(())
}

/// seccomp: the system call filter. Last, so that it need not allow what
/// the steps before it use.
fn restrict_syscalls(filter: &seccomp::Filter) -> Result<(), SandboxError> {
    seccomp::install(filter)?;
    Ok(())
}

/// `--verbose`: what was enforced, on stderr.
fn report(plan: &Plan, landlock: bool) {
    let mut lines = vec![format!("program {}", plan.program.display())];
    if landlock {
        lines.extend(plan.support.describe());
        if let Some(fs) = &plan.fs {
            let show = |paths: &[PathBuf]| {
                paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            lines.push(format!("read+exec: {}", show(&fs.read_exec)));
            lines.push(format!("read: {}", show(&fs.read)));
            lines.push(format!("read+write: {}", show(&fs.read_write)));
            lines.push(format!("devices: {}", show(&fs.devices)));
        }
    } else {
        lines.push("Landlock: NOT enforced (--allow-unsandboxed)".to_owned());
    }
    match &plan.filter {
        Some(filter) => lines.push(seccomp::describe(filter)),
        None => lines.push("seccomp: NOT enforced (--allow-unsandboxed)".to_owned()),
    }
    lines.push("no_new_privs, RLIMIT_CORE=0, own session, dies with the shim".to_owned());
    let names: Vec<String> = plan
        .env
        .iter()
        .filter_map(|kv| {
            let kv = kv.to_string_lossy();
            kv.split_once('=').map(|(k, _)| k.to_owned())
        })
        .collect();
    lines.push(format!("environment: {}", names.join(" ")));
    lines.push(format!(
        "descriptors: 0 1 2{}",
        if names.iter().any(|n| n == KEYWARD_FD_ENV) {
            " 3 (broker channel)"
        } else {
            ""
        }
    ));
    for line in lines {
        eprintln!("agent-shim: sandbox: {line}");
    }
}

/// Undo what the parent changed that exec would pass on: the blocked
/// signals, and the Rust runtime's ignored `SIGPIPE`.
fn restore_signals(old_mask: &SigSet) -> Result<(), SandboxError> {
    old_mask
        .thread_set_mask()
        .map_err(|e| SandboxError::Signals(e.into()))?;
    sys::reset_sigpipe().map_err(SandboxError::Signals)
}

/// Become the program.
fn exec_program(plan: &Plan) -> Result<Infallible, SandboxError> {
    let path = cstring(plan.program.as_os_str())?;
    let Err(err) = execve(&path, &plan.argv, &plan.env);
    Err(SandboxError::Exec {
        path: plan.program.clone(),
        source: err.into(),
    })
}

/// The parent: forward signals to the sandbox until the program exits;
/// its exit status, or 128 + N if signal N killed it.
fn supervise(child: Pid) -> Result<u8, SandboxError> {
    let mut waiting = SigSet::empty();
    for &signal in FORWARDED {
        waiting.add(signal);
    }
    waiting.add(Signal::SIGCHLD);
    loop {
        let signal = waiting.wait().map_err(|e| SandboxError::Wait(e.into()))?;
        if signal != Signal::SIGCHLD {
            forward(child, signal);
            continue;
        }
        // Reap everything that has exited: the program, or orphans its
        // descendants left (re-parented to the subreaper shim).
        if let Some(status) = reap(child)? {
            // The program is gone; so is everything it started.
            sys::kill_descendants();
            return Ok(status);
        }
    }
}

/// Reap every exited child; the program's exit status (or 128 + its
/// signal) if it was among them.
fn reap(program: Pid) -> Result<Option<u8>, SandboxError> {
    let mut program_status = None;
    loop {
        match waitpid(
            Pid::from_raw(-1),
            Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL),
        ) {
            Ok(WaitStatus::Exited(pid, code)) if pid == program => {
                program_status = Some(u8::try_from(code).unwrap_or(u8::MAX));
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == program => {
                program_status = Some(128u8.saturating_add(signal as u8));
            }
            Ok(WaitStatus::StillAlive) | Err(nix::Error::ECHILD) => return Ok(program_status),
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(e) => return Err(SandboxError::Wait(e.into())),
        }
    }
}

/// Pass `signal` to the sandbox's process group (the program and what it
/// started), or to the program alone before it has its own group.
fn forward(child: Pid, signal: Signal) {
    let group = Pid::from_raw(-child.as_raw());
    if kill(group, signal).is_err() {
        let _ = kill(child, signal);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
