// SPDX-License-Identifier: Apache-2.0
//! Peer authentication: who is on the other end of a connection, as the
//! kernel says, and whether each message really comes from them.
//!
//! At accept the broker reads `SO_PEERCRED` and pins the peer process with
//! a pidfd (`SO_PEERPIDFD`; on older kernels `pidfd_open` followed by a
//! recheck that the pid still belongs to a process with the same
//! credentials). Every message must then carry `SCM_CREDENTIALS` equal to
//! the pinned pid/uid/gid, while the pinned process has not exited: a
//! message from a process that inherited or was passed the socket, from a
//! recycled pid, or without credentials (pid 0, uid 65534) is
//! unauthenticated. Nothing the client says about itself is ever used.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use nix::sys::socket::{getsockopt, sockopt, UnixCredentials};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::policy::Caller;
use crate::sys;

/// The uid the kernel reports when it cannot map the sender's uid (and the
/// value an unset credential shows up as).
pub const OVERFLOW_ID: u32 = 65534;

/// How the peer process was pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinMethod {
    /// `SO_PEERPIDFD`: the kernel's own pidfd for the connecting process.
    PeerPidfd,
    /// `pidfd_open` on the `SO_PEERCRED` pid, then a recheck.
    PidfdOpen,
}

/// The kernel identity of a connection's peer, pinned at accept.
#[derive(Debug)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    pub method: PinMethod,
    pidfd: Liveness,
}

/// The pinned process's pidfd. A pidfd polls readable once its process
/// has exited. Inside the runtime it is registered with the reactor, which
/// learns of the exit at its next turn — so checking it per message costs
/// no system call; outside (tests, tools) it is polled.
#[derive(Debug)]
enum Liveness {
    Watched(AsyncFd<OwnedFd>),
    Polled(OwnedFd),
}

impl Liveness {
    fn new(pidfd: OwnedFd) -> Result<Liveness, AuthError> {
        // An exit before registration would only reach the reactor at its
        // next turn: look once, now.
        if sys::pidfd_exited(&pidfd).map_err(|e| AuthError::Pin(e.to_string()))? {
            return Err(AuthError::PeerExited);
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Ok(Liveness::Polled(pidfd));
        }
        sys::register(pidfd, Interest::READABLE)
            .map(Liveness::Watched)
            .map_err(|e| AuthError::Pin(format!("registering the pidfd: {e}")))
    }

    fn exited(&self) -> Result<bool, AuthError> {
        match self {
            // The readiness the reactor recorded, read without registering
            // for a wake-up (this runs for every message): `try_io` runs
            // the closure only if the fd is known readable.
            Liveness::Watched(fd) => Ok(fd.try_io(Interest::READABLE, |_| Ok(())).is_ok()),
            Liveness::Polled(fd) => {
                sys::pidfd_exited(fd).map_err(|e| AuthError::Pin(e.to_string()))
            }
        }
    }

    /// Resolves when the process has exited; never outside the runtime.
    async fn wait_exit(&self) {
        match self {
            // An error means the reactor is gone: the session ends anyway.
            Liveness::Watched(fd) => {
                let _ = fd.readable().await;
            }
            Liveness::Polled(_) => std::future::pending().await,
        }
    }

    #[cfg(test)]
    fn fd(&self) -> &OwnedFd {
        match self {
            Liveness::Watched(fd) => fd.get_ref(),
            Liveness::Polled(fd) => fd,
        }
    }
}

/// Why a peer or one of its messages is not authenticated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("the message carried no SCM_CREDENTIALS")]
    NoCredentials,
    #[error("the message credentials are unset (pid 0 or uid/gid 65534)")]
    Unset,
    #[error(
        "the message credentials (pid {pid}, uid {uid}, gid {gid}) differ from the connected peer"
    )]
    Mismatch { pid: i32, uid: u32, gid: u32 },
    #[error("the connected peer process has exited")]
    PeerExited,
    #[error("cannot pin the peer: {0}")]
    Pin(String),
}

impl Peer {
    /// Pin the peer of an accepted connection.
    pub fn pin(conn: &impl AsFd) -> Result<Peer, AuthError> {
        let cred = getsockopt(conn, sockopt::PeerCredentials)
            .map_err(|e| AuthError::Pin(format!("SO_PEERCRED: {e}")))?;
        check_set(cred.pid(), cred.uid(), cred.gid())?;
        match getsockopt(conn, sockopt::PeerPidfd) {
            Ok(pidfd) => Peer::new(cred, pidfd, PinMethod::PeerPidfd),
            Err(nix::Error::ENOPROTOOPT) | Err(nix::Error::EINVAL) => Peer::pin_by_pid(cred),
            Err(e) => Err(AuthError::Pin(format!("SO_PEERPIDFD: {e}"))),
        }
    }

    /// The fallback for kernels without `SO_PEERPIDFD`: open a pidfd on the
    /// pid, then check that the process it names still has the credentials
    /// the socket recorded, and that it had not exited while we looked (so
    /// what we read belonged to the pidfd's process, not a successor).
    pub fn pin_by_pid(cred: UnixCredentials) -> Result<Peer, AuthError> {
        let pidfd = sys::pidfd_open(cred.pid())
            .map_err(|e| AuthError::Pin(format!("pidfd_open({}): {e}", cred.pid())))?;
        let (uid, gid) = proc_effective_ids(cred.pid())
            .map_err(|e| AuthError::Pin(format!("/proc/{}/status: {e}", cred.pid())))?;
        if sys::pidfd_exited(&pidfd).map_err(|e| AuthError::Pin(e.to_string()))? {
            return Err(AuthError::PeerExited);
        }
        if (uid, gid) != (cred.uid(), cred.gid()) {
            return Err(AuthError::Mismatch {
                pid: cred.pid(),
                uid,
                gid,
            });
        }
        Peer::new(cred, pidfd, PinMethod::PidfdOpen)
    }

    fn new(cred: UnixCredentials, pidfd: OwnedFd, method: PinMethod) -> Result<Peer, AuthError> {
        Ok(Peer {
            pid: cred.pid(),
            uid: cred.uid(),
            gid: cred.gid(),
            method,
            pidfd: Liveness::new(pidfd)?,
        })
    }

    /// Authenticate one message by the credentials the kernel attached.
    pub fn authenticate(&self, cred: Option<&UnixCredentials>) -> Result<(), AuthError> {
        let cred = cred.ok_or(AuthError::NoCredentials)?;
        check_set(cred.pid(), cred.uid(), cred.gid())?;
        if (cred.pid(), cred.uid(), cred.gid()) != (self.pid, self.uid, self.gid) {
            return Err(AuthError::Mismatch {
                pid: cred.pid(),
                uid: cred.uid(),
                gid: cred.gid(),
            });
        }
        match self.pidfd.exited()? {
            false => Ok(()),
            true => Err(AuthError::PeerExited),
        }
    }

    /// Authenticate one message on a *bound* connection: any process may
    /// send it (the sandbox's processes share the channel), but the kernel
    /// must vouch for it and it must carry the pinned uid and gid.
    pub fn authenticate_any_pid(&self, cred: Option<&UnixCredentials>) -> Result<(), AuthError> {
        let cred = cred.ok_or(AuthError::NoCredentials)?;
        check_set(cred.pid(), cred.uid(), cred.gid())?;
        if (cred.uid(), cred.gid()) != (self.uid, self.gid) {
            return Err(AuthError::Mismatch {
                pid: cred.pid(),
                uid: cred.uid(),
                gid: cred.gid(),
            });
        }
        Ok(())
    }

    /// Whether the pinned process is known to have exited (or its pidfd
    /// cannot tell).
    pub fn has_exited(&self) -> bool {
        self.pidfd.exited().unwrap_or(true)
    }

    /// Resolves when the pinned process has exited (inside the runtime;
    /// outside it, never).
    pub async fn exited(&self) {
        self.pidfd.wait_exit().await
    }

    /// The identity policy decides on.
    pub fn caller(&self) -> Caller {
        Caller {
            uid: self.uid,
            gid: self.gid,
        }
    }
}

fn check_set(pid: i32, uid: u32, gid: u32) -> Result<(), AuthError> {
    if pid <= 0 || uid == OVERFLOW_ID || gid == OVERFLOW_ID {
        return Err(AuthError::Unset);
    }
    Ok(())
}

/// Effective uid and gid of a process, from `/proc/<pid>/status`.
fn proc_effective_ids(pid: i32) -> io::Result<(u32, u32)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> io::Result<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| io::Error::other(format!("no {name} line")))
    };
    Ok((field("Uid:")?, field("Gid:")?))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    fn me() -> UnixCredentials {
        UnixCredentials::from(libc::ucred {
            pid: std::process::id() as i32,
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        })
    }

    #[test]
    fn pins_with_peer_pidfd() {
        let (a, _b) = pair();
        let peer = Peer::pin(&a).unwrap();
        assert_eq!(peer.pid, std::process::id() as i32);
        assert_eq!(peer.method, PinMethod::PeerPidfd);
        assert_eq!(sys::pidfd_pid(peer.pidfd.fd()).unwrap(), peer.pid);
        assert_eq!(peer.authenticate(Some(&me())), Ok(()));
    }

    #[test]
    fn fallback_pin_rechecks() {
        let peer = Peer::pin_by_pid(me()).unwrap();
        assert_eq!(peer.method, PinMethod::PidfdOpen);
        assert_eq!(peer.authenticate(Some(&me())), Ok(()));
        // A pid whose process has a different uid than claimed is refused.
        let lie = UnixCredentials::from(libc::ucred {
            pid: std::process::id() as i32,
            uid: 4242,
            gid: 4242,
        });
        assert!(matches!(
            Peer::pin_by_pid(lie),
            Err(AuthError::Mismatch { .. })
        ));
    }

    #[test]
    fn rejects_missing_unset_and_foreign_credentials() {
        let (a, _b) = pair();
        let peer = Peer::pin(&a).unwrap();
        assert_eq!(peer.authenticate(None), Err(AuthError::NoCredentials));
        let unset = UnixCredentials::from(libc::ucred {
            pid: 0,
            uid: OVERFLOW_ID,
            gid: OVERFLOW_ID,
        });
        assert_eq!(peer.authenticate(Some(&unset)), Err(AuthError::Unset));
        let other = UnixCredentials::from(libc::ucred {
            pid: 1,
            uid: 0,
            gid: 0,
        });
        assert!(matches!(
            peer.authenticate(Some(&other)),
            Err(AuthError::Mismatch { .. })
        ));
    }

    #[test]
    fn bound_connections_accept_other_pids_of_the_same_ids() {
        let (a, _b) = pair();
        let peer = Peer::pin(&a).unwrap();
        let sibling = UnixCredentials::from(libc::ucred {
            pid: 1,
            uid: peer.uid,
            gid: peer.gid,
        });
        assert_eq!(peer.authenticate_any_pid(Some(&sibling)), Ok(()));
        assert!(peer.authenticate(Some(&sibling)).is_err());
        let stranger = UnixCredentials::from(libc::ucred {
            pid: 1,
            uid: peer.uid + 1,
            gid: peer.gid,
        });
        assert!(peer.authenticate_any_pid(Some(&stranger)).is_err());
        assert_eq!(
            peer.authenticate_any_pid(None),
            Err(AuthError::NoCredentials)
        );
    }

    #[tokio::test]
    async fn exit_seen_by_the_reactor_is_not_trusted() {
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let cred = UnixCredentials::from(libc::ucred {
            pid: child.id() as i32,
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        });
        let peer = Peer::pin_by_pid(cred).unwrap();
        assert!(matches!(peer.pidfd, Liveness::Watched(_)));
        assert_eq!(peer.authenticate(Some(&cred)), Ok(()));
        child.kill().unwrap();
        child.wait().unwrap();
        // Let the reactor turn.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while peer.authenticate(Some(&cred)).is_ok() {
            assert!(std::time::Instant::now() < deadline, "exit never seen");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(peer.authenticate(Some(&cred)), Err(AuthError::PeerExited));
    }

    #[test]
    fn exited_peer_is_not_trusted() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let cred = UnixCredentials::from(libc::ucred {
            pid,
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        });
        let pinned = Peer::pin_by_pid(cred);
        child.wait().unwrap();
        match pinned {
            Ok(peer) => assert_eq!(peer.authenticate(Some(&cred)), Err(AuthError::PeerExited)),
            // It may already have exited before we pinned it: also correct.
            Err(e) => assert_eq!(e, AuthError::PeerExited),
        }
    }
}
