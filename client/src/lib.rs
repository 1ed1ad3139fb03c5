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
//!
//! Every wait is bounded: connecting and the `Hello` exchange by
//! [`CONNECT_TIMEOUT`], each reply by [`REPLY_TIMEOUT`] (or what
//! [`Client::set_reply_timeout`] sets), so a stopped or swamped broker
//! gives a clear [`ClientError::Timeout`] instead of a hang.
#![deny(unsafe_code)]

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{
    connect, recv, sendmsg, socket, socketpair, sockopt, AddressFamily, ControlMessage, MsgFlags,
    SockFlag, SockType, UnixAddr,
};
use nix::sys::time::{TimeVal, TimeValLike};

use keyward_proto::{
    decode_response, encode, encode_into, Bind, Bound, Call, DecodeError, EncodeError, ErrorCode,
    Hello, Param, Request, Response, DEFAULT_SOCKET, MAX_MESSAGE, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};

/// Why talking to the broker failed (not a policy denial: those are
/// responses).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the broker at {path}: {source}{}", connect_hint(.source))]
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
    #[error(
        "the broker speaks protocol version {speaks}, and {request} needs version {needs} \
         (this client speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}): upgrade keyward-broker"
    )]
    Version {
        request: &'static str,
        needs: u16,
        speaks: u16,
    },
    #[error("$KEYWARD_FD = {value:?}: {message}")]
    InheritedFd { value: String, message: String },
    #[error(
        "the broker did not {what} within {} s; it may be stopped or overloaded",
        .after.as_secs_f32()
    )]
    Timeout { what: &'static str, after: Duration },
}

/// What to do about a failed connect, for the error message: a missing or
/// dead socket, a socket the caller may not open, a socket of another kind.
fn connect_hint(error: &io::Error) -> &'static str {
    use nix::errno::Errno;
    match error.raw_os_error().map(Errno::from_raw) {
        Some(Errno::ENOENT | Errno::ECONNREFUSED) => {
            "; is keyward-broker running? (systemctl status keyward-broker.socket)"
        }
        Some(Errno::EACCES | Errno::EPERM) => {
            "; are you in group keyward-clients? (log in again after usermod)"
        }
        Some(Errno::EPROTOTYPE) => {
            "; not a keyward socket (something else listens there: the broker's is SOCK_SEQPACKET)"
        }
        _ => "",
    }
}

impl ClientError {
    /// A short, stable name for the kind of failure, for machine-readable
    /// output (`agent-shim --json`): `connect`, `timeout`, `protocol`,
    /// `io`, `usage`.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::Connect { .. } => "connect",
            ClientError::Timeout { .. } => "timeout",
            ClientError::Io(_) | ClientError::Closed => "io",
            ClientError::TooLarge
            | ClientError::Decode(_)
            | ClientError::Encode(_)
            | ClientError::Handshake(_)
            | ClientError::Version { .. } => "protocol",
            ClientError::InheritedFd { .. } => "usage",
        }
    }
}

/// How long connecting and the `Hello` exchange may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a reply may take by default: longer than any upstream call
/// the broker makes on the caller's behalf should.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(300);

/// The variable `agent-shim run` sets to the number of the broker channel
/// it passes to the sandboxed program.
pub const KEYWARD_FD_ENV: &str = "KEYWARD_FD";

/// The descriptor number `agent-shim run` passes the channel as.
pub const CHANNEL_FD: RawFd = 3;

/// The socket path: `$KEYWARD_SOCKET`, else the default.
pub fn socket_path() -> PathBuf {
    socket_path_or(PathBuf::from(DEFAULT_SOCKET))
}

/// The socket path: `$KEYWARD_SOCKET` unless it is unset or empty, else
/// `default`.
pub fn socket_path_or(default: PathBuf) -> PathBuf {
    std::env::var_os("KEYWARD_SOCKET")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or(default)
}

/// A connection to the broker that has completed the `Hello` exchange.
#[derive(Debug)]
pub struct Client {
    fd: OwnedFd,
    buf: Vec<u8>,
    /// The request being sent, kept between requests.
    out: Vec<u8>,
    reply_timeout: Duration,
    /// The protocol version the `Hello` exchange settled.
    version: u16,
}

impl Client {
    /// Connect to the broker socket at `path` and exchange `Hello`, within
    /// [`CONNECT_TIMEOUT`].
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        Client::connect_within(path, CONNECT_TIMEOUT)
    }

    /// A connected socket to `path`, within `timeout`.
    fn connect_socket(path: &Path, timeout: Duration) -> Result<OwnedFd, ClientError> {
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
        // An AF_UNIX connect waits for room in the listener's backlog at
        // most SO_SNDTIMEO, then fails with EAGAIN.
        set_timeout(&fd, sockopt::SendTimeout, timeout)?;
        loop {
            match connect(fd.as_raw_fd(), &addr) {
                Ok(()) => break,
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::EAGAIN) => {
                    return Err(ClientError::Timeout {
                        what: "accept the connection",
                        after: timeout,
                    })
                }
                Err(e) => return Err(err(e.into())),
            }
        }
        Ok(fd)
    }

    /// Connect to the broker socket at `path` and exchange `Hello`, each
    /// within `timeout`. A broker of version 2 refuses any other version
    /// (and closes): it is asked again, on a new connection, for version 2.
    pub fn connect_within(path: &Path, timeout: Duration) -> Result<Client, ClientError> {
        let fd = Client::connect_socket(path, timeout)?;
        match Client::greet(fd, timeout, PROTOCOL_VERSION)? {
            Ok(client) => Ok(client),
            Err(refusal) if is_version_refusal(&refusal) => {
                let fd = Client::connect_socket(path, timeout)?;
                Client::greet(fd, timeout, MIN_PROTOCOL_VERSION)?
                    .map_err(|e| ClientError::Handshake(e.message))
            }
            Err(refusal) => Err(ClientError::Handshake(refusal.message)),
        }
    }

    /// Open a private channel over a bound broker connection `shared`:
    /// create a `SOCK_SEQPACKET` socketpair, send one end over `shared`
    /// (a `Channel` request carrying it with `SCM_RIGHTS`; the broker sends
    /// no reply on `shared`), and exchange `Hello` on the other.
    ///
    /// A broker of version 2 refuses any other version (and closes the
    /// channel): it is asked again, on a new channel, for version 2.
    pub fn open_channel(shared: &impl AsFd) -> Result<Client, ClientError> {
        let ours = Client::pass_channel(shared)?;
        match Client::greet(ours, CONNECT_TIMEOUT, PROTOCOL_VERSION)? {
            Ok(client) => Ok(client),
            Err(refusal) if is_version_refusal(&refusal) => {
                let ours = Client::pass_channel(shared)?;
                Client::greet(ours, CONNECT_TIMEOUT, MIN_PROTOCOL_VERSION)?
                    .map_err(|e| ClientError::Handshake(e.message))
            }
            Err(refusal) => Err(ClientError::Handshake(refusal.message)),
        }
    }

    /// Create a socketpair, pass one end over `shared` as a `Channel`, and
    /// return the other.
    fn pass_channel(shared: &impl AsFd) -> Result<OwnedFd, ClientError> {
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
        // Without waiting on the shared socket's options (other processes
        // use it): a non-blocking send, polled for room within the limit.
        let deadline = std::time::Instant::now() + CONNECT_TIMEOUT;
        loop {
            match sendmsg::<()>(
                shared.as_fd().as_raw_fd(),
                &[IoSlice::new(&message)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                None,
            ) {
                Ok(_) => break,
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::EAGAIN) => wait_writable(shared, deadline)?,
                Err(e) => return Err(io::Error::from(e).into()),
            }
        }
        // The broker holds its own reference now.
        drop(theirs);
        Ok(ours)
    }

    /// The connection, e.g. to pass it on to a sandboxed program.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Use an already-connected socket (e.g. one inherited from the shim)
    /// and exchange `Hello` on it, within [`CONNECT_TIMEOUT`].
    pub fn over(fd: OwnedFd) -> Result<Client, ClientError> {
        Client::over_within(fd, CONNECT_TIMEOUT)
    }

    fn over_within(fd: OwnedFd, timeout: Duration) -> Result<Client, ClientError> {
        Client::greet(fd, timeout, PROTOCOL_VERSION)?
            .map_err(|refusal| ClientError::Handshake(refusal.message))
    }

    /// Exchange `Hello` on `fd`, offering protocol `offered`: the client,
    /// at the version the broker answers (`offered` or older, at least
    /// [`MIN_PROTOCOL_VERSION`]), or the broker's `Error` reply.
    fn greet(
        fd: OwnedFd,
        timeout: Duration,
        offered: u16,
    ) -> Result<Result<Client, keyward_proto::ErrorReply>, ClientError> {
        let mut client = Client {
            fd,
            buf: vec![0; MAX_MESSAGE + 1],
            out: Vec::new(),
            reply_timeout: timeout,
            // The broker's Hello (and a refusal) read the same in every
            // version.
            version: MIN_PROTOCOL_VERSION,
        };
        set_timeout(&client.fd, sockopt::SendTimeout, timeout)?;
        set_timeout(&client.fd, sockopt::ReceiveTimeout, timeout)?;
        let hello = client.request(&Request::Hello(Hello { version: offered }));
        let hello = match hello {
            Err(ClientError::Timeout { after, .. }) => {
                return Err(ClientError::Timeout {
                    what: "answer the handshake",
                    after,
                })
            }
            other => other?,
        };
        client.set_reply_timeout(REPLY_TIMEOUT)?;
        match hello {
            Response::Hello(h) if (MIN_PROTOCOL_VERSION..=offered).contains(&h.version) => {
                client.version = h.version;
                Ok(Ok(client))
            }
            Response::Hello(h) => Err(ClientError::Handshake(format!(
                "the broker speaks protocol version {}, this client {MIN_PROTOCOL_VERSION} \
                 to {offered}",
                h.version
            ))),
            Response::Error(e) => Ok(Err(e)),
            other => Err(ClientError::Handshake(format!(
                "unexpected reply {other:?}"
            ))),
        }
    }

    /// The protocol version the `Hello` exchange settled: what this
    /// connection may send and how its replies are read.
    pub fn protocol_version(&self) -> u16 {
        self.version
    }

    /// Refuse a request the connection's protocol version does not have,
    /// naming both versions (an older broker would only say "malformed").
    fn check_version(&self, request: &Request) -> Result<(), ClientError> {
        let needs = request.since();
        if needs > self.version {
            return Err(ClientError::Version {
                request: request.name(),
                needs,
                speaks: self.version,
            });
        }
        Ok(())
    }

    /// Bind `token` to this connection: from now on it acts with that
    /// token's authority alone. `Ok(Err(reply))` is the broker's refusal
    /// (a `Denied` or `Error` response).
    pub fn bind(&mut self, token: &str) -> Result<Result<Bound, Response>, ClientError> {
        let request = Request::Bind(Bind {
            token: token.to_owned(),
        });
        Ok(match self.request(&request)? {
            Response::Bound(bound) => Ok(bound),
            other => Err(other),
        })
    }

    /// Ask the broker to perform a call with typed parameter values (the
    /// broker checks each against the tool's declared type).
    pub fn call_typed(&mut self, tool: &str, params: Vec<Param>) -> Result<Response, ClientError> {
        self.request(&Request::Call(Call {
            tool: tool.to_owned(),
            params,
        }))
    }

    /// Ask the broker to perform a call. Parameter values are sent as
    /// strings; the broker converts them to the tool's declared types.
    pub fn call(
        &mut self,
        tool: &str,
        params: &[(String, String)],
    ) -> Result<Response, ClientError> {
        self.request_with(&CallRequest { tool, params })
    }

    /// Wait at most `timeout` for each reply (and for room to send).
    pub fn set_reply_timeout(&mut self, timeout: Duration) -> Result<(), ClientError> {
        set_timeout(&self.fd, sockopt::SendTimeout, timeout)?;
        set_timeout(&self.fd, sockopt::ReceiveTimeout, timeout)?;
        self.reply_timeout = timeout;
        Ok(())
    }

    /// Send one request and read its response.
    pub fn request(&mut self, request: &Request) -> Result<Response, ClientError> {
        self.check_version(request)?;
        self.request_with(request)
    }

    /// Send one request, encoded as [`Request`] is, and read its response.
    fn request_with(&mut self, request: &impl serde::Serialize) -> Result<Response, ClientError> {
        let mut bytes = std::mem::take(&mut self.out);
        let sent = encode_into(request, &mut bytes)
            .map_err(ClientError::from)
            .and_then(|()| self.send_raw(&bytes));
        self.out = bytes;
        if let Err(e) = sent {
            if matches!(e, ClientError::Encode(_)) {
                return Err(e);
            }
            // A broker that refuses a connection (e.g. at its session cap)
            // answers at once and closes: its reason may be waiting.
            if let Ok(reply @ Response::Error(_)) = self.recv_with(MsgFlags::MSG_DONTWAIT) {
                return Ok(reply);
            }
            return Err(e);
        }
        self.recv_response()
    }

    /// Send one request without reading a reply: a message that is part
    /// of a request already sent (a `GatewayBody`).
    pub fn send(&mut self, request: &Request) -> Result<(), ClientError> {
        self.check_version(request)?;
        let bytes = encode(request)?;
        self.send_raw(&bytes)
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
                Err(nix::Error::EAGAIN) => {
                    return Err(ClientError::Timeout {
                        what: "take the request",
                        after: self.reply_timeout,
                    })
                }
                Err(e) => return Err(io::Error::from(e).into()),
            }
        }
    }

    /// Read one response.
    pub fn recv_response(&mut self) -> Result<Response, ClientError> {
        self.recv_with(MsgFlags::empty())
    }

    fn recv_with(&mut self, flags: MsgFlags) -> Result<Response, ClientError> {
        let n = loop {
            match recv(
                self.fd.as_raw_fd(),
                &mut self.buf,
                MsgFlags::MSG_TRUNC | flags,
            ) {
                Ok(n) => break n,
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::EAGAIN) if flags.contains(MsgFlags::MSG_DONTWAIT) => {
                    return Err(ClientError::Timeout {
                        what: "answer",
                        after: self.reply_timeout,
                    })
                }
                Err(nix::Error::EAGAIN) => {
                    // The late answer would be read as the reply to the
                    // next request: end the connection, so that every
                    // later request fails instead of getting the wrong
                    // reply.
                    let _ = nix::sys::socket::shutdown(
                        self.fd.as_raw_fd(),
                        nix::sys::socket::Shutdown::Both,
                    );
                    return Err(ClientError::Timeout {
                        what: "answer",
                        after: self.reply_timeout,
                    });
                }
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
        Ok(decode_response(bytes, self.version)?)
    }
}

/// Whether a broker refused a `Hello` for its version.
fn is_version_refusal(reply: &keyward_proto::ErrorReply) -> bool {
    reply.code == ErrorCode::VersionMismatch
}

/// A `Request::Call` of string parameters, serialized from borrowed
/// strings: the same bytes as the owned [`Request::Call`] (a test compares
/// them), without copying every name and value into one first.
struct CallRequest<'a> {
    tool: &'a str,
    params: &'a [(String, String)],
}

/// `Request::Call`'s variant index, `Value::Str`'s: the wire format's
/// (pinned by the golden tests of `keyward_proto` and by this crate's).
const REQUEST_CALL: u32 = 1;
const VALUE_STR: u32 = 0;

impl serde::Serialize for CallRequest<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_newtype_variant("Request", REQUEST_CALL, "Call", &CallBody(self))
    }
}

struct CallBody<'r, 'a>(&'r CallRequest<'a>);

impl serde::Serialize for CallBody<'_, '_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut call = s.serialize_struct("Call", 2)?;
        call.serialize_field("tool", self.0.tool)?;
        call.serialize_field("params", &Params(self.0.params))?;
        call.end()
    }
}

struct Params<'a>(&'a [(String, String)]);

impl serde::Serialize for Params<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for (name, value) in self.0 {
            seq.serialize_element(&StrParam { name, value })?;
        }
        seq.end()
    }
}

struct StrParam<'a> {
    name: &'a str,
    value: &'a str,
}

impl serde::Serialize for StrParam<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut param = s.serialize_struct("Param", 2)?;
        param.serialize_field("name", self.name)?;
        param.serialize_field("value", &StrValue(self.value))?;
        param.end()
    }
}

struct StrValue<'a>(&'a str);

impl serde::Serialize for StrValue<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_newtype_variant("Value", VALUE_STR, "Str", self.0)
    }
}

/// Set `SO_SNDTIMEO` or `SO_RCVTIMEO` (zero would mean "forever": at
/// least a microsecond).
fn set_timeout<O>(fd: &OwnedFd, option: O, timeout: Duration) -> Result<(), ClientError>
where
    O: nix::sys::socket::SetSockOpt<Val = TimeVal>,
{
    let micros = i64::try_from(timeout.as_micros())
        .unwrap_or(i64::MAX)
        .max(1);
    nix::sys::socket::setsockopt(fd, option, &TimeVal::microseconds(micros))
        .map_err(|e| ClientError::Io(e.into()))
}

/// Wait until `fd` has room to send, or fail at `deadline`.
fn wait_writable(fd: &impl AsFd, deadline: std::time::Instant) -> Result<(), ClientError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    let millis = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
    match poll(&mut fds, PollTimeout::from(millis)) {
        Ok(0) => Err(ClientError::Timeout {
            what: "take the channel",
            after: CONNECT_TIMEOUT,
        }),
        Ok(_) | Err(nix::Error::EINTR) => Ok(()),
        Err(e) => Err(ClientError::Io(e.into())),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use keyward_proto::Hello as HelloMsg;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    /// A call's request is the bytes of the owned `Request::Call`.
    #[test]
    fn a_call_is_encoded_as_request_call() {
        let cases: [&[(&str, &str)]; 3] = [
            &[],
            &[("message", "ping")],
            &[("a", ""), ("é😀", "x\u{0}y"), ("long", &"z".repeat(300))],
        ];
        for (i, case) in cases.iter().enumerate() {
            let params: Vec<(String, String)> = case
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect();
            let tool = "t".repeat(i * 70);
            let owned = Request::Call(Call {
                tool: tool.clone(),
                params: params
                    .iter()
                    .map(|(name, value)| Param {
                        name: name.clone(),
                        value: keyward_proto::Value::Str(value.clone()),
                    })
                    .collect(),
            });
            let borrowed = CallRequest {
                tool: &tool,
                params: &params,
            };
            let mut out = Vec::new();
            encode_into(&borrowed, &mut out).unwrap();
            assert_eq!(out, encode(&owned).unwrap());
        }
    }

    /// A stand-in for a broker of protocol version 2 (as 81c7152 built
    /// it): it refuses every other version at `Hello` and closes, answers
    /// `Tools` with version 2's tool list (no `kind`), and cannot decode
    /// any request appended since.
    fn v2_broker(conn: OwnedFd) {
        let mut buf = vec![0; MAX_MESSAGE + 1];
        let send = |bytes: &[u8]| {
            nix::unistd::write(&conn, bytes).unwrap();
        };
        loop {
            let n = nix::unistd::read(&conn, &mut buf).unwrap();
            if n == 0 {
                return;
            }
            match buf[..n] {
                // Hello { version: 2 }
                [0x00, 0x02] => send(&encode(&Response::Hello(HelloMsg { version: 2 })).unwrap()),
                [0x00, ..] => {
                    let refusal = Response::Error(keyward_proto::ErrorReply {
                        code: ErrorCode::VersionMismatch,
                        message: "protocol version 3 is not supported (broker speaks 2)".into(),
                    });
                    send(&encode(&refusal).unwrap());
                    return;
                }
                // Tools: one tool "e", no description, no parameters.
                [0x06] => send(&[0x06, 0x01, 0x01, b'e', 0x00, 0x00]),
                _ => {
                    let malformed = Response::Error(keyward_proto::ErrorReply {
                        code: ErrorCode::Malformed,
                        message: "message has an unknown variant".into(),
                    });
                    send(&encode(&malformed).unwrap());
                    return;
                }
            }
        }
    }

    /// A client of this version against a version-2 broker: it falls back
    /// to version 2 at `Hello`, reads version 2's tool list, and a request
    /// version 2 does not have fails with both versions named, before
    /// anything is sent (the broker would only say "malformed").
    #[test]
    #[allow(unsafe_code)]
    fn an_older_broker_is_spoken_to_in_its_version() {
        use nix::sys::socket::{accept, bind, listen, Backlog, UnixAddr};
        let path = std::env::temp_dir().join(format!("kw-client-v2-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(listener.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        listen(&listener, Backlog::new(4).unwrap()).unwrap();
        let broker = std::thread::spawn(move || {
            use std::os::fd::FromRawFd;
            for _ in 0..2 {
                let fd = accept(listener.as_raw_fd()).unwrap();
                // SAFETY: accept returned a new descriptor that nothing
                // else owns.
                v2_broker(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        });
        let mut client = Client::connect(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(client.protocol_version(), 2);
        match client.request(&Request::Tools).unwrap() {
            Response::ToolList(list) => {
                assert_eq!(list.tools.len(), 1);
                assert_eq!(list.tools[0].name, "e");
                assert_eq!(list.tools[0].kind, keyward_proto::ToolKind::Tool);
            }
            other => panic!("{other:?}"),
        }
        let err = client.request(&Request::Status).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(
                err,
                ClientError::Version {
                    needs: 3,
                    speaks: 2,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            text.contains("protocol version 2") && text.contains("Status needs version 3"),
            "{text}"
        );
        assert_eq!(err.kind(), "protocol");
        // The connection is still good for what version 2 has.
        assert!(matches!(
            client.request(&Request::Tools).unwrap(),
            Response::ToolList(_)
        ));
        drop(client);
        broker.join().unwrap();
    }

    /// A broker answering with a version this client does not speak, or
    /// a newer one than it offered, is refused at the handshake.
    #[test]
    fn a_hello_outside_the_offered_range_is_refused() {
        for version in [1, PROTOCOL_VERSION + 1] {
            let (ours, broker) = socketpair(
                AddressFamily::Unix,
                SockType::SeqPacket,
                None,
                SockFlag::SOCK_CLOEXEC,
            )
            .unwrap();
            let hello = Response::Hello(HelloMsg { version });
            nix::unistd::write(&broker, &encode(&hello).unwrap()).unwrap();
            let err = Client::over(ours).unwrap_err();
            assert!(
                err.to_string()
                    .contains(&format!("broker speaks protocol version {version}")),
                "{err}"
            );
        }
    }

    /// A broker that answers late must not have its late answer taken for
    /// the reply to the next request.
    #[test]
    fn a_reply_after_the_timeout_is_never_taken_for_the_next_one() {
        let (ours, broker) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let mut buf = vec![0; MAX_MESSAGE + 1];
        let answer = |fd: &OwnedFd, response: &Response| {
            let bytes = encode(response).unwrap();
            nix::unistd::write(fd, &bytes).unwrap();
        };
        let hello = Response::Hello(HelloMsg {
            version: PROTOCOL_VERSION,
        });
        // The broker's side answers the Hello at once.
        answer(&broker, &hello);
        let mut client = Client::over(ours).unwrap();
        nix::unistd::read(&broker, &mut buf).unwrap();
        client.set_reply_timeout(Duration::from_millis(50)).unwrap();

        // First request: no answer in time.
        let first = client.request(&Request::Hello(HelloMsg {
            version: PROTOCOL_VERSION,
        }));
        assert!(
            matches!(first, Err(ClientError::Timeout { .. })),
            "{first:?}"
        );
        // The late answer arrives, and a second request is made.
        let _ = nix::unistd::write(&broker, &encode(&hello).unwrap());
        let second = client.request(&Request::Hello(HelloMsg {
            version: PROTOCOL_VERSION,
        }));
        assert!(second.is_err(), "the late answer was taken: {second:?}");
    }
}
