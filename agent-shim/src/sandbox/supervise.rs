// SPDX-License-Identifier: Apache-2.0
//! Supervision: the shim forwards signals to the sandbox until the program
//! (or, in namespace mode, the init that mirrors it) exits, and ends with
//! its status. The init of the pid namespace runs the same loop over the
//! program.

use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::{SandboxError, FORWARDED};
use crate::sys::{self, SpareFd};

/// The parent: forward signals to the sandbox until the program exits;
/// its exit status, or 128 + N if signal N killed it.
pub(super) fn supervise(child: Pid, spare: Option<SpareFd>) -> Result<u8, SandboxError> {
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
