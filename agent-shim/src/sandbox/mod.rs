// SPDX-License-Identifier: Apache-2.0
//! `agent-shim run`: bind a token to a broker connection, then run a
//! program in a sandbox whose only way out is that connection.
//!
//! Order matters: everything that needs the outside world (reading the
//! token, finding the program, connecting and binding) happens first, in
//! the parent ([`plan`]); then the sandbox is entered one irreversible
//! step at a time and the program executed ([`lockdown`]); the parent stays
//! outside, forwards signals, waits, and exits with the program's status,
//! 128 + N when it was killed by signal N ([`supervise`]).
//!
//! Two modes:
//!
//! - **namespaces** (the default wherever unprivileged user namespaces
//!   work): the shim clones an init process into new user (its uid and gid
//!   mapped to themselves), mount, pid, IPC, UTS and cgroup namespaces
//!   ([`namespace`]); it builds a minimal root ([`mount`]) and starts the
//!   program as its child, under Landlock and seccomp as in the other mode.
//!   The init dies with the shim (`PR_SET_PDEATHSIG`), and the kernel kills
//!   every process of the pid namespace with it.
//! - **fallback** (no user namespaces: sysctl, AppArmor, some containers):
//!   Landlock and seccomp with the fallback rules; the shim is the
//!   subreaper and kills every descendant when the program exits. Said once
//!   on stderr; `--require-namespaces` refuses instead.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::PathBuf;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use zeroize::Zeroizing;

use crate::client::{ClientError, CHANNEL_FD};
use crate::gateway::{self, GatewayError};
use crate::landlock::LandlockError;
use crate::seccomp::SeccompError;
use crate::sys;

mod derive;
mod lockdown;
mod mount;
mod namespace;
mod plan;
mod supervise;
mod tmpdir;

pub use derive::Derive;
pub use plan::{read_token, Limits};

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

/// Set to `1` (by tests only) to behave as if user namespaces were
/// unavailable, so that the fallback mode can be tested on any kernel.
pub const NO_USERNS_ENV: &str = "KEYWARD_TEST_NO_USERNS";

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
    /// Refuse to run without namespaces.
    pub require_namespaces: bool,
    /// Share the terminal: the program may change its settings.
    pub tty: bool,
    /// `--gateway NAME`s: HTTP gateways the program reaches on loopback.
    pub gateways: Vec<String>,
    /// `--allow-connect PORT`s: TCP ports the program may connect to, on
    /// the host's network (Landlock's port rule; no network namespace).
    pub allow_connect: Vec<u16>,
    pub limits: Limits,
    pub verbose: bool,
    /// The program and its arguments.
    pub command: Vec<OsString>,
    /// `--derive TOOL NAME=VALUE...`: credentials for the program's
    /// environment, from a call made over the bound connection first.
    pub derive: Option<Derive>,
}

/// A capability token; zeroized on drop, never printed.
pub struct Token(Zeroizing<String>);

impl Token {
    /// The token's text, to send to the broker.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[token]")
    }
}

/// How the program is confined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// New user, mount, pid, IPC, UTS and cgroup namespaces, plus Landlock
    /// and seccomp.
    Namespaces,
    /// Landlock and seccomp (with the fallback rules) only; why.
    Fallback(String),
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
    #[error("--derive {0}: the broker refused the call: {1}")]
    DeriveDenied(String, String),
    #[error("--derive {0}: {1}")]
    DeriveFailed(String, String),
    #[error(
        "--derive needs a token to call the tool with (--token, --token-file or ${TOKEN_ENV})"
    )]
    DeriveWithoutToken,
    #[error("the broker could not bind the token: {0}")]
    BindFailed(String),
    #[error("cannot block signals: {0}")]
    BlockSignals(#[source] io::Error),
    #[error("cannot restore the default action of SIGCHLD: {0}")]
    DefaultSigchld(#[source] io::Error),
    #[error("cannot remove the token from the environment block: {0}")]
    ScrubEnv(#[source] io::Error),
    #[error(
        "namespaces are unavailable ({0}) and --require-namespaces was given, \
         so the sandbox would be Landlock and seccomp only"
    )]
    NamespacesRequired(String),
    #[error("cannot set up the namespaces: {0}")]
    Namespace(String),
    #[error("setrlimit({0}): {1}")]
    Limit(&'static str, #[source] io::Error),
    #[error("cannot reserve a descriptor for the reaper: {0}")]
    Reserve(#[source] io::Error),
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
    #[error("--allow-connect: {0}")]
    AllowConnect(String),
    #[error("cannot create the sandbox's private temporary directory: {0}")]
    TempDir(#[source] io::Error),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
}

impl SandboxError {
    /// The exit status `agent-shim run` ends with for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            SandboxError::NotFound(_) => EXIT_NOT_FOUND,
            SandboxError::Exec { .. } => EXIT_CANNOT_EXEC,
            SandboxError::BindDenied(_)
            | SandboxError::DeriveDenied(..)
            | SandboxError::Gateway(GatewayError::Denied(..)) => EXIT_DENIED,
            _ => EXIT_ERROR,
        }
    }
}

/// Run `options.command` in the sandbox; returns the exit status to end
/// with. Errors are for failures before the program started.
pub fn run(options: &RunOptions) -> Result<u8, SandboxError> {
    plan::refuse_root()?;
    plan::keep_parent_private()?;
    let token = read_token(&options.token)?;
    let mut plan = plan::prepare(options, token.is_some())?;
    plan::warn_unscoped(&plan);
    if options.derive.is_some() && token.is_none() {
        return Err(SandboxError::DeriveWithoutToken);
    }
    let mut channel = match &token {
        Some(token) => {
            let (fd, derived) = plan::connect_and_bind(token, options.derive.as_ref())?;
            derive::apply(&mut plan.env, derived);
            Some(fd)
        }
        None => None,
    };
    drop(token);
    let gateways = match (&channel, options.gateways.is_empty()) {
        (_, true) => Vec::new(),
        (None, false) => return Err(GatewayError::NoToken.into()),
        (Some(shared), false) => gateway::describe(shared, &options.gateways)?,
    };
    sys::default_sigchld().map_err(SandboxError::DefaultSigchld)?;
    let old_mask = block_forwarded_signals()?;

    let unavailable = match std::env::var_os(NO_USERNS_ENV) {
        Some(v) if v == "1" => Some(format!("{NO_USERNS_ENV}=1")),
        _ => match namespace::start(&plan, &mut channel, &old_mask, &gateways)? {
            Ok((init, endpoint)) => {
                // After the fork: the relay is the shim's only thread
                // besides this one.
                match (endpoint, channel.take()) {
                    (Some(endpoint), Some(shared)) => {
                        gateway::spawn(endpoint, shared, options.gateways.clone())?
                    }
                    (_, shared) => drop(shared),
                }
                return supervise::supervise(init, None);
            }
            Err(reason) => Some(reason),
        },
    };
    let reason = unavailable.unwrap_or_default();
    if !gateways.is_empty() {
        return Err(GatewayError::NoNamespaces(reason).into());
    }
    if options.require_namespaces {
        return Err(SandboxError::NamespacesRequired(reason));
    }
    eprintln!(
        "agent-shim: warning: namespaces unavailable ({reason}); the sandbox is \
         Landlock and seccomp only (fallback mode)"
    );
    // Removed when this returns: by then no process of the sandbox is left.
    let _tmp = plan.fall_back(reason)?;
    let reaper = supervise::start_reaper(&plan, channel.take(), &old_mask)?;
    // The sandbox holds the only reference the program needs.
    drop(channel);
    supervise::supervise(reaper, None)
}

/// Block the signals the parent forwards (and `SIGCHLD`, which it waits
/// for) before forking, so none is lost in between. Returns the old mask,
/// which the program gets back before exec.
fn block_forwarded_signals() -> Result<SigSet, SandboxError> {
    let mut set = SigSet::empty();
    for &signal in FORWARDED {
        set.add(signal);
    }
    set.add(Signal::SIGCHLD);
    set.thread_swap_mask(SigmaskHow::SIG_BLOCK)
        .map_err(|e| SandboxError::BlockSignals(e.into()))
}
