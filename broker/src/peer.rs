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
//! The peer's supplementary groups are the kernel's too (`SO_PEERGROUPS`,
//! recorded when it connected).
//!
//! The fallback needs `/proc/<pid>/status` of other users' processes, which
//! `hidepid=` (systemd's `ProtectProc=invisible`) hides: [`check_pinning`]
//! finds that at start, so a broker that would refuse every client does not
//! start at all. `KEYWARD_TEST_NO_PEERPIDFD=1` in the broker's environment
//! makes it act as if the kernel had no `SO_PEERPIDFD` (for tests of the
//! fallback on a new kernel).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::OnceLock;

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
    /// Supplementary groups when it connected (`SO_PEERGROUPS`).
    pub groups: Vec<u32>,
    pub method: PinMethod,
    pidfd: Liveness,
}

/// The variable that makes the broker pin peers as on a kernel without
/// `SO_PEERPIDFD` (for tests of the fallback).
pub const NO_PEERPIDFD_ENV: &str = "KEYWARD_TEST_NO_PEERPIDFD";

/// Whether `SO_PEERPIDFD` is to be treated as absent, read once.
fn peer_pidfd_disabled() -> bool {
    static DISABLED: OnceLock<bool> = OnceLock::new();
    *DISABLED.get_or_init(|| std::env::var_os(NO_PEERPIDFD_ENV).is_some_and(|v| v == "1"))
}

/// Why the broker cannot pin peers on this system at all.
#[derive(Debug, thiserror::Error)]
pub enum PinSetupError {
    #[error(
        "this kernel has no SO_PEERPIDFD (it came in Linux 6.5), so peers are pinned through \
         /proc/<pid>/status, but /proc hides other users' processes from the broker ({why}): \
         every client would be refused. Under systemd, install the drop-in \
         keyward-broker.service.d/pre-6.5-kernel.conf (ProtectProc=default) from the \
         systemd/ directory as /etc/systemd/system/keyward-broker.service.d/pre-6.5-kernel.conf, \
         then `systemctl daemon-reload && systemctl restart keyward-broker`; or boot Linux 6.5 \
         or later"
    )]
    ProcHidden { why: String },
    #[error("cannot check how to pin peers: {0}")]
    Probe(String),
}

/// At start: how peers will be pinned, or why they cannot be. With
/// `SO_PEERPIDFD`, by the kernel's pidfd; without it, by `pidfd_open` and
/// `/proc/<pid>/status`, which must show other users' processes.
pub fn check_pinning() -> Result<PinMethod, PinSetupError> {
    if !peer_pidfd_disabled() && kernel_has_peer_pidfd()? {
        return Ok(PinMethod::PeerPidfd);
    }
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| PinSetupError::ProcHidden {
            why: format!("/proc/self/mountinfo: {e}"),
        })?;
    let groups = nix::unistd::getgroups().unwrap_or_default();
    let mut ids: Vec<u32> = groups.iter().map(|g| g.as_raw()).collect();
    ids.push(nix::unistd::getegid().as_raw());
    match proc_hides_others(&mountinfo, &ids, may_trace_anyone()) {
        Some(why) => Err(PinSetupError::ProcHidden { why }),
        None => Ok(PinMethod::PidfdOpen),
    }
}

/// Whether `getsockopt(SO_PEERPIDFD)` works here, tried on a socketpair.
fn kernel_has_peer_pidfd() -> Result<bool, PinSetupError> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (a, _b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| PinSetupError::Probe(format!("socketpair: {e}")))?;
    match getsockopt(&a, sockopt::PeerPidfd) {
        Ok(_pidfd) => Ok(true),
        Err(nix::Error::ENOPROTOOPT) | Err(nix::Error::EINVAL) => Ok(false),
        Err(e) => Err(PinSetupError::Probe(format!("SO_PEERPIDFD: {e}"))),
    }
}

/// Root with `CAP_SYS_PTRACE` sees every process whatever `hidepid` says.
fn may_trace_anyone() -> bool {
    const CAP_SYS_PTRACE: u32 = 19;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_PTRACE) != 0)
}

/// Why the `/proc` mount (in `mountinfo`, as `/proc/self/mountinfo` has
/// it) hides other users' processes from a process in groups `groups`,
/// or `None` if it does not.
fn proc_hides_others(mountinfo: &str, groups: &[u32], may_trace: bool) -> Option<String> {
    // "36 35 0:5 / /proc rw,nosuid - proc proc rw,hidepid=invisible":
    // mount point 5th, then optional fields up to "-", fs type, source,
    // super options. The last mount on /proc is the one in force.
    let proc_mount = mountinfo.lines().rev().find_map(|line| {
        let (fields, rest) = line.split_once(" - ")?;
        let mount_point = fields.split(' ').nth(4)?;
        let mut rest = rest.split(' ');
        let fs_type = rest.next()?;
        let options = rest.nth(1).unwrap_or_default();
        (mount_point == "/proc" && fs_type == "proc").then_some(options)
    });
    let Some(options) = proc_mount else {
        return Some("no proc file system is mounted on /proc".to_owned());
    };
    let option = |name: &str| {
        options
            .split(',')
            .find_map(|o| o.strip_prefix(name)?.strip_prefix('='))
    };
    let hidepid = option("hidepid").filter(|v| !matches!(*v, "0" | "off"))?;
    if may_trace {
        return None;
    }
    if let Some(gid) = option("gid").and_then(|g| g.parse::<u32>().ok()) {
        if groups.contains(&gid) {
            return None;
        }
    }
    Some(format!(
        "it is mounted with hidepid={hidepid}, as systemd's ProtectProc=invisible does"
    ))
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
        // Groups only ever add authority: without them (an error here) the
        // peer is judged on its uid and primary gid alone.
        let groups = sys::peer_groups(conn.as_fd()).unwrap_or_default();
        let mut peer = if peer_pidfd_disabled() {
            Peer::pin_by_pid(cred)?
        } else {
            match getsockopt(conn, sockopt::PeerPidfd) {
                Ok(pidfd) => Peer::new(cred, pidfd, PinMethod::PeerPidfd)?,
                Err(nix::Error::ENOPROTOOPT) | Err(nix::Error::EINVAL) => Peer::pin_by_pid(cred)?,
                Err(e) => return Err(AuthError::Pin(format!("SO_PEERPIDFD: {e}"))),
            }
        };
        peer.groups = groups;
        Ok(peer)
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
            groups: Vec::new(),
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
            groups: self.groups.clone(),
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
    fn records_the_peers_supplementary_groups() {
        let (a, _b) = pair();
        let peer = Peer::pin(&a).unwrap();
        let mine: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .iter()
            .map(|g| g.as_raw())
            .collect();
        assert_eq!(peer.groups, mine);
        assert_eq!(peer.caller().groups, mine);
    }

    const MOUNTINFO: &str = "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n\
        36 22 0:5 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw\n";

    #[test]
    fn a_plain_proc_hides_nothing() {
        assert_eq!(proc_hides_others(MOUNTINFO, &[], false), None);
        let off = MOUNTINFO.replace("proc proc rw\n", "proc proc rw,hidepid=off\n");
        assert_eq!(proc_hides_others(&off, &[], false), None);
    }

    #[test]
    fn hidepid_hides_unless_exempt() {
        // As systemd mounts it for ProtectProc=invisible: the last /proc wins.
        let hidden = format!(
            "{MOUNTINFO}90 22 0:60 / /proc rw,nosuid - proc proc rw,hidepid=invisible,subset=pid\n"
        );
        let why = proc_hides_others(&hidden, &[], false).unwrap();
        assert!(why.contains("hidepid=invisible"), "{why}");
        assert!(why.contains("ProtectProc=invisible"), "{why}");
        assert_eq!(proc_hides_others(&hidden, &[], true), None);
        let exempt = hidden.replace("subset=pid", "gid=42");
        assert_eq!(proc_hides_others(&exempt, &[42], false), None);
        assert!(proc_hides_others(&exempt, &[43], false).is_some());
        assert!(proc_hides_others("", &[], false).is_some());
    }

    #[test]
    fn pinning_check_follows_the_kernel() {
        // CI runs on 6.5+ (the fallback is tested end to end by forcing it).
        if kernel_has_peer_pidfd().unwrap() {
            assert_eq!(check_pinning().unwrap(), PinMethod::PeerPidfd);
        }
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
