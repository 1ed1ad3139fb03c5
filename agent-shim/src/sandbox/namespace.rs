// SPDX-License-Identifier: Apache-2.0
//! Namespace mode: the shim clones an init process into new user, mount,
//! pid, IPC, UTS and cgroup namespaces. The init maps its uid and gid to
//! themselves, dies with the shim (`PR_SET_PDEATHSIG`), builds the minimal
//! root ([`super::mount`]), says so on a pipe, and starts the program as
//! its child (pid 2), which locks itself down as in fallback mode and
//! executes the program. The init forwards signals to the program, and
//! exits with its status; when it exits, for whatever reason, the kernel
//! kills every process left in the pid namespace.
//!
//! If any step before the program starts fails (no unprivileged user
//! namespaces, an AppArmor restriction, a kernel refusing a mount), the
//! init says why on the pipe and exits; nothing has run, and the shim falls
//! back (or, with `--require-namespaces`, refuses).

use std::io::{Read, Write};
use std::os::fd::OwnedFd;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::{getgid, getuid, pipe2, setsid, Gid, Pid, Uid};

use super::plan::Plan;
use super::{lockdown, supervise, SandboxError, EXIT_SANDBOX};
use crate::sys::{self, Forked};

/// The namespaces of the sandbox. No network namespace: see
/// docs/THREAT_MODEL.md, "Namespaces" (the seccomp filter already forbids
/// every new socket, and one costs more than the rest together).
const NAMESPACES: libc::c_int = libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP;

/// Why the namespaces could not be set up (sent to the shim on the pipe).
#[derive(Debug, thiserror::Error)]
pub(super) enum NamespaceError {
    #[error("prctl(PR_SET_PDEATHSIG): {0}")]
    DeathSignal(#[source] nix::Error),
    #[error("setsid: {0}")]
    Session(#[source] nix::Error),
    #[error("prctl(PR_SET_DUMPABLE): {0}")]
    Dumpable(#[source] nix::Error),
    #[error("cannot write {file}: {source}")]
    IdMap {
        file: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Mount(#[from] super::mount::MountError),
}

/// Start the init in new namespaces. `Ok(Ok(pid))`: it is ready and runs
/// the program; `Ok(Err(why))`: namespaces are unavailable and nothing
/// ran; `Err`: the shim itself failed.
pub(super) fn start(
    plan: &Plan,
    channel: &mut Option<OwnedFd>,
    old_mask: &SigSet,
) -> Result<Result<Pid, String>, SandboxError> {
    let (ids_uid, ids_gid) = (getuid(), getgid());
    let (ready_read, ready_write) =
        pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SandboxError::Namespace(e.to_string()))?;
    let init = match sys::clone_namespaces(NAMESPACES) {
        Ok(Forked::Child) => {
            drop(ready_read);
            init(
                plan,
                channel.take(),
                ready_write,
                old_mask,
                ids_uid,
                ids_gid,
            )
        }
        Ok(Forked::Parent(pid)) => pid,
        Err(e) => return Ok(Err(format!("cannot create a user namespace: {e}"))),
    };
    drop(ready_write);
    let mut said = Vec::new();
    std::fs::File::from(ready_read)
        .read_to_end(&mut said)
        .map_err(|e| SandboxError::Namespace(e.to_string()))?;
    if said.first() == Some(&b'R') {
        return Ok(Ok(init));
    }
    // Nothing ran: collect the init and say why.
    let _ = waitpid(init, None);
    let why = match said.split_first() {
        Some((b'N', why)) => String::from_utf8_lossy(why).into_owned(),
        _ => "the namespace set-up process died".to_owned(),
    };
    Ok(Err(why))
}

/// The init (pid 1 of the new pid namespace). Never returns.
fn init(
    plan: &Plan,
    channel: Option<OwnedFd>,
    ready: OwnedFd,
    old_mask: &SigSet,
    uid: Uid,
    gid: Gid,
) -> ! {
    let mut ready = std::fs::File::from(ready);
    if let Err(e) = set_up(plan, uid, gid) {
        let _ = ready.write_all(format!("N{e}").as_bytes());
        sys::exit_child(EXIT_SANDBOX);
    }
    // If the shim is gone, the pipe is broken: stop here.
    if ready.write_all(b"R").is_err() {
        sys::exit_child(EXIT_SANDBOX);
    }
    drop(ready);
    match sys::fork() {
        Ok(Forked::Child) => {
            let Err(err) = lockdown::enter(plan, channel, None, old_mask);
            lockdown::fail(err)
        }
        Ok(Forked::Parent(program)) => {
            drop(channel);
            match supervise::supervise(program, None) {
                Ok(status) => sys::exit_child(status),
                Err(e) => {
                    eprintln!("agent-shim: sandbox init: {e}");
                    sys::exit_child(EXIT_SANDBOX)
                }
            }
        }
        Err(e) => {
            eprintln!("agent-shim: sandbox init: fork: {e}");
            sys::exit_child(EXIT_SANDBOX)
        }
    }
}

/// The init's steps before the program starts.
fn set_up(plan: &Plan, uid: Uid, gid: Gid) -> Result<(), NamespaceError> {
    // Die with the shim; the kernel then kills the whole pid namespace.
    // (If the shim died before this, the "ready" write fails.)
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(NamespaceError::DeathSignal)?;
    // No terminal signals but those the shim forwards.
    setsid().map_err(NamespaceError::Session)?;
    map_ids(uid, gid)?;
    super::mount::build_root(plan)?;
    Ok(())
}

/// Map the uid and gid to themselves, and refuse `setgroups` (the kernel
/// requires it of an unprivileged gid map). The init is undumpable (a copy
/// of the shim); `/proc/self/*_map` belongs to root while it is, so it is
/// made dumpable for the three writes only. The shim has already
/// overwritten the token in its environment block, and zeroized its copy.
fn map_ids(uid: Uid, gid: Gid) -> Result<(), NamespaceError> {
    nix::sys::prctl::set_dumpable(true).map_err(NamespaceError::Dumpable)?;
    let write = |file: &'static str, text: String| {
        std::fs::write(format!("/proc/self/{file}"), text)
            .map_err(|source| NamespaceError::IdMap { file, source })
    };
    let mapped = write("setgroups", "deny".to_owned())
        .and_then(|()| write("uid_map", format!("{uid} {uid} 1\n")))
        .and_then(|()| write("gid_map", format!("{gid} {gid} 1\n")));
    nix::sys::prctl::set_dumpable(false).map_err(NamespaceError::Dumpable)?;
    mapped
}
