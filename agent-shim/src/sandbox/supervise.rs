// SPDX-License-Identifier: Apache-2.0
//! Supervision: the shim forwards signals to the sandbox until the program
//! (or, in namespace mode, the init that mirrors it) exits, and ends with
//! its status. The init of the pid namespace runs the same loop over the
//! program.

use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use std::os::fd::OwnedFd;

use super::plan::Plan;
use super::{lockdown, SandboxError, EXIT_SANDBOX, FORWARDED};
use crate::sys::{self, Forked, SpareFd};

/// The signal the fallback reaper receives when the shim dies.
pub(super) const SHIM_DIED: Signal = Signal::SIGALRM;

/// Forward signals to the sandbox until the program exits; its exit
/// status, or 128 + N if signal N killed it. With `spare` this process is
/// the subreaper: it kills every descendant left once the program exits,
/// and also when [`SHIM_DIED`] arrives (then the status is 128 + 9).
pub(super) fn supervise(child: Pid, spare: Option<SpareFd>) -> Result<u8, SandboxError> {
    let mut waiting = SigSet::empty();
    for &signal in FORWARDED {
        waiting.add(signal);
    }
    waiting.add(Signal::SIGCHLD);
    if spare.is_some() {
        waiting.add(SHIM_DIED);
    }
    loop {
        let signal = waiting.wait().map_err(|e| SandboxError::Wait(e.into()))?;
        if signal == SHIM_DIED {
            if let Some(spare) = spare {
                let _ = kill(Pid::from_raw(-child.as_raw()), Signal::SIGKILL);
                let _ = kill(child, Signal::SIGKILL);
                sys::kill_descendants(spare);
            }
            return Ok(128 + Signal::SIGKILL as u8);
        }
        if signal != Signal::SIGCHLD {
            forward(child, signal);
            continue;
        }
        // Reap everything that has exited: the program, or orphans its
        // descendants left (re-parented to the subreaper shim).
        if let Some(status) = reap(child)? {
            // The program is gone; so is everything it started (in
            // namespace mode the kernel saw to it when the init exited).
            if let Some(spare) = spare {
                sys::kill_descendants(spare);
            }
            return Ok(status);
        }
    }
}

/// Reap every exited child; the program's exit status (or 128 + its
/// signal) if it was among them.
pub(super) fn reap(program: Pid) -> Result<Option<u8>, SandboxError> {
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
pub(super) fn forward(child: Pid, signal: Signal) {
    let group = Pid::from_raw(-child.as_raw());
    if kill(group, signal).is_err() {
        let _ = kill(child, signal);
    }
}

/// Fallback mode: the shim forks a reaper, which forks the program. The
/// reaper is the subreaper of everything the program starts; it dies with
/// nothing but receives [`SHIM_DIED`] when the shim dies (even by
/// `SIGKILL`), and then kills every descendant before it exits. It needs
/// no new descriptor to do so ([`SpareFd`]). Returns the reaper's pid.
pub(super) fn start_reaper(
    plan: &Plan,
    channel: Option<OwnedFd>,
    old_mask: &SigSet,
) -> Result<Pid, SandboxError> {
    let shim = nix::unistd::getpid();
    match sys::fork().map_err(SandboxError::Fork)? {
        Forked::Parent(reaper) => Ok(reaper),
        Forked::Child => {
            let code = match reaper(plan, channel, old_mask, shim) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("agent-shim: sandbox reaper: {e}");
                    EXIT_SANDBOX
                }
            };
            sys::exit_child(code)
        }
    }
}

fn reaper(
    plan: &Plan,
    channel: Option<OwnedFd>,
    old_mask: &SigSet,
    shim: Pid,
) -> Result<u8, SandboxError> {
    let mut died = SigSet::empty();
    died.add(SHIM_DIED);
    died.thread_block()
        .map_err(|e| SandboxError::BlockSignals(e.into()))?;
    nix::sys::prctl::set_pdeathsig(SHIM_DIED)
        .map_err(|e| SandboxError::ParentDeathSignal(e.into()))?;
    if nix::unistd::getppid() != shim {
        return Err(SandboxError::ParentGone);
    }
    // Terminal signals reach the sandbox only through the shim.
    nix::unistd::setsid().map_err(|e| SandboxError::Session(e.into()))?;
    nix::sys::prctl::set_child_subreaper(true).map_err(|e| SandboxError::Subreaper(e.into()))?;
    let spare = SpareFd::reserve().map_err(SandboxError::Reserve)?;
    let me = nix::unistd::getpid();
    match sys::fork().map_err(SandboxError::Fork)? {
        Forked::Child => {
            drop(spare);
            let Err(err) = lockdown::enter(plan, channel, Some(me), old_mask, None);
            lockdown::fail(err)
        }
        Forked::Parent(program) => {
            drop(channel);
            let status = supervise(program, Some(spare));
            // No process of the sandbox is left: its temporary directory
            // goes now, also when the shim was killed and cannot.
            if let Some(tmp) = &plan.private_tmp {
                super::tmpdir::remove(tmp);
            }
            status
        }
    }
}
