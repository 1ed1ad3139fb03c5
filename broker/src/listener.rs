// SPDX-License-Identifier: Apache-2.0
//! The listening `SOCK_SEQPACKET` socket and its connections.
//!
//! The broker either binds the socket named in its configuration or takes
//! the one systemd hands it (`LISTEN_FDS`). Either way `SO_PASSCRED` is set
//! on the listener before the first accept, so every message a peer sends
//! arrives with kernel-checked `SCM_CREDENTIALS`, and again on each
//! accepted socket for kernels that do not inherit it.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    bind, getsockopt, listen, sendmsg, setsockopt, socket, sockopt, AddressFamily, Backlog,
    MsgFlags, SockFlag, SockType, UnixAddr,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use keyward_proto::MAX_MESSAGE;

use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("socket {path} is in use by a running broker")]
    InUse { path: PathBuf },
    #[error("socket {path}: {message}")]
    Setup { path: PathBuf, message: String },
    #[error("socket activation: {0}")]
    Activation(String),
}

/// The socket systemd passed, if this process was socket-activated:
/// `LISTEN_PID` must be this process and `LISTEN_FDS` exactly 1. The
/// variables are removed so no child inherits them. Call before any thread
/// is started (it edits the environment).
pub fn activation_fd() -> Result<Option<OwnedFd>, ListenerError> {
    let (Ok(pid), Ok(fds)) = (std::env::var("LISTEN_PID"), std::env::var("LISTEN_FDS")) else {
        return Ok(None);
    };
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Err(ListenerError::Activation(format!(
            "LISTEN_PID={pid} is not this process ({})",
            std::process::id()
        )));
    }
    if fds != "1" {
        return Err(ListenerError::Activation(format!(
            "LISTEN_FDS={fds}: expected exactly one socket"
        )));
    }
    sys::adopt_listen_fd()
        .map(Some)
        .map_err(|e| ListenerError::Activation(format!("fd 3: {e}")))
}

/// A listening socket registered with the tokio reactor.
#[derive(Debug)]
pub struct Listener {
    fd: AsyncFd<OwnedFd>,
    /// The path we bound, removed again on drop. `None` when inherited.
    bound: Option<PathBuf>,
}

impl Listener {
    /// Bind `path` with the given mode and group. A stale socket file left by
    /// a dead broker is replaced; a live one is an error. The mode and group
    /// are applied before `listen`, so no client can connect in between.
    pub fn bind(path: &Path, mode: u32, group: Option<&str>) -> Result<Listener, ListenerError> {
        let err = |source: io::Error| ListenerError::Bind {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        remove_stale(path)?;
        let fd = new_socket().map_err(err)?;
        let addr = UnixAddr::new(path).map_err(|e| err(e.into()))?;
        bind(fd.as_raw_fd(), &addr).map_err(|e| err(e.into()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
        if let Some(group) = group {
            let gid = resolve_group(group).map_err(|message| ListenerError::Setup {
                path: path.to_owned(),
                message,
            })?;
            std::os::unix::fs::chown(path, None, Some(gid.as_raw())).map_err(err)?;
        }
        setsockopt(&fd, sockopt::PassCred, &true).map_err(|e| err(e.into()))?;
        listen(&fd, Backlog::new(128).unwrap_or(Backlog::MAXCONN)).map_err(|e| err(e.into()))?;
        Ok(Listener {
            fd: sys::register(fd, Interest::READABLE).map_err(err)?,
            bound: Some(path.to_owned()),
        })
    }

    /// Adopt an already-listening socket, checking that it is one we can
    /// serve: AF_UNIX, `SOCK_SEQPACKET`, listening.
    pub fn from_fd(fd: OwnedFd) -> Result<Listener, ListenerError> {
        let bad = |m: String| ListenerError::Activation(m);
        let ty = getsockopt(&fd, sockopt::SockType).map_err(|e| bad(format!("SO_TYPE: {e}")))?;
        if ty != SockType::SeqPacket {
            return Err(bad(format!(
                "inherited socket is {ty:?}, not SOCK_SEQPACKET"
            )));
        }
        let listening =
            getsockopt(&fd, sockopt::AcceptConn).map_err(|e| bad(format!("SO_ACCEPTCONN: {e}")))?;
        if !listening {
            return Err(bad("inherited socket is not listening".into()));
        }
        nix::sys::socket::getsockname::<UnixAddr>(fd.as_raw_fd())
            .map_err(|_| bad("inherited socket is not AF_UNIX".into()))?;
        set_cloexec_nonblocking(&fd).map_err(|e| bad(e.to_string()))?;
        setsockopt(&fd, sockopt::PassCred, &true).map_err(|e| bad(format!("SO_PASSCRED: {e}")))?;
        Ok(Listener {
            fd: sys::register(fd, Interest::READABLE).map_err(|e| bad(e.to_string()))?,
            bound: None,
        })
    }

    /// The path the socket is bound to (as the kernel reports it), for
    /// the start record and `status`.
    pub fn path(&self) -> Option<PathBuf> {
        nix::sys::socket::getsockname::<UnixAddr>(self.fd.get_ref().as_raw_fd())
            .ok()
            .and_then(|addr| addr.path().map(Path::to_path_buf))
    }

    /// Accept one connection.
    pub async fn accept(&self) -> io::Result<Connection> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| sys::accept_nonblocking(fd.get_ref().as_fd())) {
                Ok(Ok(fd)) => {
                    setsockopt(&fd, sockopt::PassCred, &true)?;
                    return Connection::new(fd);
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(path) = &self.bound {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn new_socket() -> io::Result<OwnedFd> {
    Ok(socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?)
}

fn set_cloexec_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Remove a socket file that no broker answers on; refuse if one does, or
/// if the path is something other than a socket.
fn remove_stale(path: &Path) -> Result<(), ListenerError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ListenerError::Bind {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ListenerError::Setup {
            path: path.to_owned(),
            message: "exists and is not a socket; refusing to replace it".into(),
        });
    }
    let probe = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| ListenerError::Bind {
        path: path.to_owned(),
        source: e.into(),
    })?;
    let addr = UnixAddr::new(path).map_err(|e| ListenerError::Bind {
        path: path.to_owned(),
        source: e.into(),
    })?;
    if nix::sys::socket::connect(probe.as_raw_fd(), &addr).is_ok() {
        return Err(ListenerError::InUse {
            path: path.to_owned(),
        });
    }
    std::fs::remove_file(path).map_err(|source| ListenerError::Bind {
        path: path.to_owned(),
        source,
    })
}

fn resolve_group(group: &str) -> Result<nix::unistd::Gid, String> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(nix::unistd::Gid::from_raw(gid));
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => Err(format!("group {group:?} does not exist")),
        Err(e) => Err(format!("cannot look up group {group:?}: {e}")),
    }
}

pub use crate::sys::Received;

/// Adopt a socket a client passed over a bound connection as a channel: it
/// must be a connected AF_UNIX `SOCK_SEQPACKET` socket. `SO_PASSCRED` is set
/// on it so that every message carries kernel credentials (the client sets
/// it too, before passing it, so that nothing it sent earlier lacks them).
///
/// Its peer must be a process of the passing session's uid and gid — and
/// not the broker itself (a sandbox passing back its own broker connection
/// would have the broker serve itself).
pub fn adopt_channel(fd: OwnedFd, uid: u32, gid: u32) -> Result<Connection, String> {
    let ty = getsockopt(&fd, sockopt::SockType).map_err(|e| format!("SO_TYPE: {e}"))?;
    if ty != SockType::SeqPacket {
        return Err(format!("the passed socket is {ty:?}, not SOCK_SEQPACKET"));
    }
    nix::sys::socket::getpeername::<UnixAddr>(fd.as_raw_fd())
        .map_err(|_| "the passed socket is not a connected AF_UNIX socket".to_owned())?;
    let peer =
        getsockopt(&fd, sockopt::PeerCredentials).map_err(|e| format!("SO_PEERCRED: {e}"))?;
    if peer.pid() == std::process::id() as i32 {
        return Err("the passed socket leads back to the broker".into());
    }
    if (peer.uid(), peer.gid()) != (uid, gid) {
        return Err(format!(
            "the passed socket's peer is uid {} gid {}, not the session's uid {uid} gid {gid}",
            peer.uid(),
            peer.gid()
        ));
    }
    set_cloexec_nonblocking(&fd).map_err(|e| e.to_string())?;
    setsockopt(&fd, sockopt::PassCred, &true).map_err(|e| format!("SO_PASSCRED: {e}"))?;
    Connection::new(fd).map_err(|e| e.to_string())
}

/// Receive buffer size: one byte more than the cap, so an oversized
/// message is seen as such even where `MSG_TRUNC` is not reported.
pub const RECV_BUFFER: usize = MAX_MESSAGE + 1;

/// An accepted connection.
#[derive(Debug)]
pub struct Connection {
    fd: AsyncFd<OwnedFd>,
}

impl Connection {
    pub fn new(fd: OwnedFd) -> io::Result<Connection> {
        Ok(Connection {
            fd: sys::register(fd, Interest::READABLE | Interest::WRITABLE)?,
        })
    }

    /// Receive one message. `len == 0` with no credentials means the peer
    /// closed the connection.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| sys::recv_message(fd.get_ref().as_fd(), buf)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Receive one message if one is queued now (as far as the reactor
    /// knows), without waiting; `None` if there is none.
    pub fn try_recv(&self, buf: &mut [u8]) -> Option<io::Result<Received>> {
        match self
            .fd
            .try_io(Interest::READABLE, |fd| sys::recv_message(fd.as_fd(), buf))
        {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            other => Some(other),
        }
    }

    /// Send one message.
    pub async fn send(&self, bytes: &[u8]) -> io::Result<()> {
        loop {
            // Try first: the socket is almost always writable.
            match sendmsg::<()>(
                self.fd.get_ref().as_raw_fd(),
                &[IoSlice::new(bytes)],
                &[],
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(nix::Error::EAGAIN) => {
                    let mut guard = self.fd.writable().await?;
                    guard.clear_ready();
                }
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Send one message if the socket takes it now, without waiting.
    pub fn try_send(&self, bytes: &[u8]) -> io::Result<()> {
        sendmsg::<()>(
            self.fd.get_ref().as_raw_fd(),
            &[IoSlice::new(bytes)],
            &[],
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            None,
        )?;
        Ok(())
    }

    /// Discard what the peer has queued (a bounded number of messages),
    /// so that closing does not turn its unread messages into ECONNRESET
    /// on its side before it has read our last reply.
    pub fn drain(&self) {
        let mut buf = [0u8; 64];
        for _ in 0..16 {
            match sys::recv_message(self.fd.get_ref().as_fd(), &mut buf) {
                Ok(r) if r.len > 0 || r.creds.is_some() || r.truncated => continue,
                _ => break,
            }
        }
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}
