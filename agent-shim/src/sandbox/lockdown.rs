// SPDX-License-Identifier: Apache-2.0
//! The program's lock-down recipe, in the child, one irreversible step at
//! a time; [`enter`] reads top to bottom as that recipe, and ends in exec.
//! The same in both modes (in namespace mode it runs inside the
//! namespaces, as the child of their init).

use std::convert::Infallible;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::{execve, getppid, setsid, Pid};

use super::plan::Plan;
use super::{Mode, SandboxError, EXIT_CANNOT_EXEC, EXIT_SANDBOX};
use crate::client::{CHANNEL_FD, KEYWARD_FD_ENV};
use crate::landlock::{self, FsRules};
use crate::seccomp;
use crate::sys;

/// `--gateway`: the relay's port on the sandbox's loopback, and the
/// variables that point the program at it.
#[derive(Debug)]
pub(super) struct Network {
    pub port: u16,
    pub env: Vec<std::ffi::CString>,
}

/// The child's recipe, in order. Returns only on failure. `parent` is the
/// shim to die with (fallback mode); in namespace mode the init of the pid
/// namespace is, and takes the program along.
pub(super) fn enter(
    plan: &Plan,
    channel: Option<OwnedFd>,
    parent: Option<Pid>,
    old_mask: &SigSet,
    net: Option<&Network>,
) -> Result<Infallible, SandboxError> {
    start_session()?;
    if let Some(parent) = parent {
        die_with_parent(parent)?;
    }
    keep_only_channel(channel)?;
    // The environment is replaced at exec by `plan.env`.
    disable_core_dumps()?;
    limit_resources(plan)?;
    forbid_new_privileges()?;
    drop_capabilities()?;
    let landlock = plan
        .fs
        .as_ref()
        .map(|rules| restrict_filesystem(&with_gateway(with_private_dirs(rules, &plan.mode), net)))
        .transpose()?;
    if let Some(filter) = &plan.filter {
        restrict_syscalls(filter)?;
    }
    if plan.verbose {
        report(plan, landlock.is_some());
        if let Some(net) = net {
            eprintln!(
                "agent-shim: sandbox: network: own namespace, loopback only; TCP connect to \
                 127.0.0.1:{} (the gateway relay) only",
                net.port
            );
        }
    }
    restore_signals(old_mask)?;
    exec_program(plan, net)
}

/// End the child after a failed [`enter`]: the reason on stderr, and 126
/// if only the exec failed, else 125.
pub(super) fn fail(err: SandboxError) -> ! {
    eprintln!("agent-shim: sandbox: {err}");
    let code = match err {
        SandboxError::Exec { .. } => EXIT_CANNOT_EXEC,
        _ => EXIT_SANDBOX,
    };
    sys::exit_child(code)
}

/// A session (and process group) of its own: no controlling terminal to
/// inject input into (`TIOCSTI`), and terminal signals reach it only
/// through the parent.
pub(super) fn start_session() -> Result<(), SandboxError> {
    setsid().map_err(|e| SandboxError::Session(e.into()))?;
    Ok(())
}

/// Die with the shim, so no sandboxed process outlives its supervisor.
pub(super) fn die_with_parent(parent: Pid) -> Result<(), SandboxError> {
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

/// The resource limits, as rlimits (soft = hard: the program cannot raise
/// them). In namespace mode `RLIMIT_NPROC` counts the processes of the
/// sandbox's own user namespace only; in fallback mode those of the uid,
/// so the plan added what the uid already runs.
fn limit_resources(plan: &Plan) -> Result<(), SandboxError> {
    for (name, resource, value) in [
        ("RLIMIT_DATA", Resource::RLIMIT_DATA, plan.limits.memory),
        ("RLIMIT_NPROC", Resource::RLIMIT_NPROC, plan.nproc),
        ("RLIMIT_CPU", Resource::RLIMIT_CPU, plan.limits.cpu_time),
        (
            "RLIMIT_FSIZE",
            Resource::RLIMIT_FSIZE,
            plan.limits.max_file_size,
        ),
    ] {
        // Never raise a limit the caller already lowered.
        let (soft, hard) = getrlimit(resource).map_err(|e| SandboxError::Limit(name, e.into()))?;
        let value = value.min(soft).min(hard);
        setrlimit(resource, value, value).map_err(|e| SandboxError::Limit(name, e.into()))?;
    }
    Ok(())
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

/// In namespace mode `/tmp` and `/dev/shm` are the sandbox's own tmpfs:
/// writable. (In fallback mode they are the host's, and stay closed.)
fn with_private_dirs(rules: &FsRules, mode: &Mode) -> FsRules {
    let mut rules = rules.clone();
    if *mode == Mode::Namespaces {
        rules
            .read_write
            .extend(["/tmp", "/dev/shm"].map(PathBuf::from));
    }
    rules
}

/// `--gateway`: TCP connect to the relay's port, and nothing else.
fn with_gateway(mut rules: FsRules, net: Option<&Network>) -> FsRules {
    if let Some(net) = net {
        rules.connect_tcp.push(net.port);
    }
    rules
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
    lines.push(match &plan.mode {
        Mode::Namespaces => "mode: namespaces (user, mount, pid, IPC, UTS, cgroup); minimal root, \
                             private /tmp, fresh /proc, minimal /dev"
            .to_owned(),
        Mode::Fallback(why) => format!("mode: fallback, Landlock and seccomp only ({why})"),
    });
    lines.push(format!(
        "limits: RLIMIT_DATA {} bytes, RLIMIT_NPROC {}, RLIMIT_CPU {} s, RLIMIT_FSIZE {} bytes",
        plan.limits.memory, plan.nproc, plan.limits.cpu_time, plan.limits.max_file_size
    ));
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

/// Become the program, with the gateways' variables (`--gateway`) in
/// place of any of the same name.
fn exec_program(plan: &Plan, net: Option<&Network>) -> Result<Infallible, SandboxError> {
    let path = super::plan::cstring(plan.program.as_os_str())?;
    let env: Vec<std::ffi::CString> = match net {
        None => plan.env.clone(),
        Some(net) => {
            let name = |kv: &std::ffi::CString| {
                let bytes = kv.as_bytes();
                bytes[..bytes.iter().position(|&b| b == b'=').unwrap_or(bytes.len())].to_vec()
            };
            let set: Vec<Vec<u8>> = net.env.iter().map(name).collect();
            plan.env
                .iter()
                .filter(|kv| !set.contains(&name(kv)))
                .chain(&net.env)
                .cloned()
                .collect()
        }
    };
    let Err(err) = execve(&path, &plan.argv, &env);
    Err(SandboxError::Exec {
        path: plan.program.clone(),
        source: err.into(),
    })
}
