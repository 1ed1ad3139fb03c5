// SPDX-License-Identifier: Apache-2.0
//! keyward-client: a blocking client for the broker's `SOCK_SEQPACKET`
//! protocol — connect, exchange `Hello`, then one request and one response
//! at a time. Used by `agent-shim`, `keyward-broker revoke` and the tests.
//! It never sends anything about the caller's identity: the broker learns
//! that from the kernel.
//!
//! Inside `agent-shim run`'s sandbox no socket can be created: the only way
//! to the broker is the connection the shim bound and passed as
//! `$KEYWARD_FD` (fd 3). Every client there opens a channel of its own
//! ([`Client::open_channel`]): a `socketpair` whose one end it sends over
//! fd 3 with `SCM_RIGHTS`; the broker serves that end under the same bound
//! session. Nothing is ever read from the shared fd 3, so concurrent
//! clients in one sandbox never see each other's replies.
#![deny(unsafe_code)]

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    connect, recv, sendmsg, socket, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag,
    SockType, UnixAddr,
};

use keyward_proto::{
    decode, encode, Call, DecodeError, EncodeError, Hello, Param, Request, Response, Value,
    DEFAULT_SOCKET, MAX_MESSAGE, PROTOCOL_VERSION,
};

/// Why talking to the broker failed (not a policy denial: those are
/// responses).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the broker at {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("broker connection: {0}")]
    Io(#[from] io::Error),
    #[error("the broker closed the connection")]
    Closed,
    #[error("broker reply is larger than {MAX_MESSAGE} bytes")]
    TooLarge,
    #[error("broker reply: {0}")]
    Decode(#[from] DecodeError),
    #[error("request: {0}")]
    Encode(#[from] EncodeError),
    #[error("broker refused the handshake: {0}")]
    Handshake(String),
    #[error("$KEYWARD_FD = {value:?}: {message}")]
    InheritedFd { value: String, message: String },
}

/// The variable `agent-shim run` sets to the number of the broker channel
/// it passes to the sandboxed program.
pub const KEYWARD_FD_ENV: &str = "KEYWARD_FD";

/// The descriptor number `agent-shim run` passes the channel as.
pub const CHANNEL_FD: RawFd = 3;

/// The socket path: `$KEYWARD_SOCKET`, else the default.
pub fn socket_path() -> PathBuf {
    std::env::var_os("KEYWARD_SOCKET")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// A connection to the broker that has completed the `Hello` exchange.
#[derive(Debug)]
pub struct Client {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl Client {
    /// Connect to the broker socket at `path` and exchange `Hello`.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let err = |source: io::Error| ClientError::Connect {
            path: path.to_owned(),
            source,
        };
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| err(e.into()))?;
        let addr = UnixAddr::new(path).map_err(|e| err(e.into()))?;
        connect(fd.as_raw_fd(), &addr).map_err(|e| err(e.into()))?;
        Client::over(fd)
    }

    /// Open a private channel over a bound broker connection `shared`:
    /// create a `SOCK_SEQPACKET` socketpair, send one end over `shared`
    /// (a `Channel` request carrying it with `SCM_RIGHTS`; the broker sends
    /// no reply on `shared`), and exchange `Hello` on the other.
    pub fn open_channel(shared: &impl AsFd) -> Result<Client, ClientError> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        // Credentials are attached to a message when it is sent, and only
        // if the receiving socket has SO_PASSCRED by then: set it on the
        // broker's end now, or the Hello below could reach the broker
        // before it sets the option itself, without credentials.
        nix::sys::socket::setsockopt(&theirs, nix::sys::socket::sockopt::PassCred, &true)
            .map_err(io::Error::from)?;
        let message = encode(&Request::Channel)?;
        let fds = [theirs.as_raw_fd()];
        loop {
            match sendmsg::<()>(
                shared.as_fd().as_raw_fd(),
                &[IoSlice::new(&message)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => break,
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(io::Error::from(e).into()),
            }
        }
        // The broker holds its own reference now.
        drop(theirs);
        Client::over(ours)
    }

    /// The connection, e.g. to pass it on to a sandboxed program.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Use an already-connected socket (e.g. one inherited from the shim)
    /// and exchange `Hello` on it.
    pub fn over(fd: OwnedFd) -> Result<Client, ClientError> {
        let mut client = Client {
            fd,
            buf: vec![0; MAX_MESSAGE + 1],
        };
        match client.request(&Request::Hello(Hello {
            version: PROTOCOL_VERSION,
        }))? {
            Response::Hello(h) if h.version == PROTOCOL_VERSION => Ok(client),
            Response::Hello(h) => Err(ClientError::Handshake(format!(
                "broker speaks protocol version {}",
                h.version
            ))),
            Response::Error(e) => Err(ClientError::Handshake(e.message)),
            other => Err(ClientError::Handshake(format!(
                "unexpected reply {other:?}"
            ))),
        }
    }

    /// Ask the broker to perform a call. Parameter values are sent as
    /// strings; the broker converts them to the tool's declared types.
    pub fn call(
        &mut self,
        tool: &str,
        params: &[(String, String)],
    ) -> Result<Response, ClientError> {
        let call = Call {
            tool: tool.to_owned(),
            params: params
                .iter()
                .map(|(name, value)| Param {
                    name: name.clone(),
                    value: Value::Str(value.clone()),
                })
                .collect(),
        };
        self.request(&Request::Call(call))
    }

    /// Send one request and read its response.
    pub fn request(&mut self, request: &Request) -> Result<Response, ClientError> {
        let bytes = encode(request)?;
        self.send_raw(&bytes)?;
        self.recv_response()
    }

    /// Send raw bytes as one message.
    fn send_raw(&self, bytes: &[u8]) -> Result<(), ClientError> {
        loop {
            match sendmsg::<()>(
                self.fd.as_raw_fd(),
                &[IoSlice::new(bytes)],
                &[],
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(io::Error::from(e).into()),
            }
        }
    }

    /// Read one response.
    pub fn recv_response(&mut self) -> Result<Response, ClientError> {
        let n = loop {
            match recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::MSG_TRUNC) {
                Ok(n) => break n,
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(io::Error::from(e).into()),
            }
        };
        if n == 0 {
            return Err(ClientError::Closed);
        }
        // With MSG_TRUNC, recv returns the real length of the message.
        if n > MAX_MESSAGE {
            return Err(ClientError::TooLarge);
        }
        let bytes = self.buf.get(..n).ok_or(ClientError::TooLarge)?;
        Ok(decode(bytes)?)
    }
}
