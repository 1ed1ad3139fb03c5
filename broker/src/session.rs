// SPDX-License-Identifier: Apache-2.0
//! One connection, from accept to close.
//!
//! The peer is pinned first; then every message is authenticated by its
//! kernel credentials, decoded, and answered with exactly one response. A
//! message that cannot be authenticated or decoded gets an error reply and
//! the connection is closed: a well-behaved client never sends one.
//!
//! Deadlines: the `Hello` must arrive within [`HELLO_DEADLINE`]. After it
//! there is no idle deadline: `SOCK_SEQPACKET` delivers whole messages, so
//! a slow peer cannot hold a half-read request, and idle connections are
//! bounded by the per-uid connection cap. Replies must be taken within
//! [`SEND_DEADLINE`].

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use keyward_proto::{
    decode, encode, Call, Denial, ErrorCode, ErrorReply, Hello, Request, Response, PROTOCOL_VERSION,
};

use crate::audit::{Decision, Event, Record};
use crate::executor::ExecError;
use crate::listener::{Connection, RECV_BUFFER};
use crate::peer::Peer;
use crate::server::Broker;

/// How long a new connection has to send its `Hello`.
pub const HELLO_DEADLINE: Duration = Duration::from_secs(10);
/// How long a peer has to make room for a reply.
pub const SEND_DEADLINE: Duration = Duration::from_secs(10);
/// Longest peer-supplied name echoed into a message or record.
const SHOWN_NAME_MAX: usize = 64;

/// What to do after answering a message.
enum Next {
    Continue,
    Close,
}

/// Serve one connection until the peer closes it, it misbehaves, or the
/// broker stops (an in-flight call always completes and is answered).
pub async fn run(conn: Connection, broker: Arc<Broker>, stopping: CancellationToken) {
    let peer = match Peer::pin(&conn.as_fd()) {
        Ok(peer) => peer,
        Err(e) => {
            let reason = e.to_string();
            let _ = broker
                .audit
                .must_record(&Record::new(Event::Refused, Decision::Deny).reason(&reason));
            let _ = reply_error(&conn, ErrorCode::Unauthenticated, reason).await;
            return;
        }
    };
    let Some(_slot) = broker.admit(peer.uid) else {
        let reason = format!(
            "uid {} already holds the maximum number of connections",
            peer.uid
        );
        refuse(&broker, &peer, &reason);
        let _ = reply_error(&conn, ErrorCode::Busy, reason).await;
        return;
    };

    let mut session = Session {
        conn,
        broker,
        peer,
        greeted: false,
    };
    let mut buf = vec![0u8; RECV_BUFFER];
    loop {
        let received = tokio::select! {
            biased;
            () = stopping.cancelled() => break,
            r = recv_within(&session, &mut buf) => r,
        };
        let Some(received) = received else { break };
        match session.handle(received, &buf).await {
            Next::Continue => {}
            Next::Close => break,
        }
    }
}

async fn recv_within(session: &Session, buf: &mut [u8]) -> Option<crate::listener::Received> {
    let recv = session.conn.recv(buf);
    let received = if session.greeted {
        recv.await.ok()?
    } else {
        tokio::time::timeout(HELLO_DEADLINE, recv)
            .await
            .ok()?
            .ok()?
    };
    // recv of 0 bytes without credentials: the peer closed.
    if received.len == 0 && received.creds.is_none() && !received.truncated {
        return None;
    }
    Some(received)
}

struct Session {
    conn: Connection,
    broker: Arc<Broker>,
    peer: Peer,
    greeted: bool,
}

impl Session {
    async fn handle(&mut self, received: crate::listener::Received, buf: &[u8]) -> Next {
        if received.truncated || received.len > keyward_proto::MAX_MESSAGE {
            return self
                .protocol_error(
                    ErrorCode::TooLarge,
                    keyward_proto::DecodeError::TooLarge.to_string(),
                )
                .await;
        }
        if received.control_truncated || !received.fds.is_empty() {
            // Passed fds are closed when `received` drops.
            return self
                .protocol_error(ErrorCode::Malformed, "unexpected control data".into())
                .await;
        }
        if let Err(e) = self.peer.authenticate(received.creds.as_ref()) {
            return self
                .protocol_error(
                    ErrorCode::Unauthenticated,
                    format!("unauthenticated message: {e}"),
                )
                .await;
        }
        let bytes = buf.get(..received.len).unwrap_or_default();
        let request = match decode::<Request>(bytes) {
            Ok(request) => request,
            Err(e) => return self.protocol_error(e.code(), e.to_string()).await,
        };
        match request {
            Request::Hello(hello) => self.hello(hello).await,
            Request::Call(call) if self.greeted => self.call(call).await,
            Request::Call(_) => {
                self.protocol_error(ErrorCode::HelloRequired, "send Hello first".into())
                    .await
            }
        }
    }

    async fn hello(&mut self, hello: Hello) -> Next {
        if self.greeted {
            return self
                .protocol_error(ErrorCode::Malformed, "Hello sent twice".into())
                .await;
        }
        if hello.version != PROTOCOL_VERSION {
            return self
                .protocol_error(
                    ErrorCode::VersionMismatch,
                    format!(
                        "protocol version {} is not supported (broker speaks {PROTOCOL_VERSION})",
                        hello.version
                    ),
                )
                .await;
        }
        self.greeted = true;
        self.send(&Response::Hello(Hello {
            version: PROTOCOL_VERSION,
        }))
        .await
    }

    async fn call(&mut self, call: Call) -> Next {
        let policy = self.broker.policy();
        let shown_tool = shown_name(&call.tool);
        let authorized = match policy.authorize(&self.peer.caller(), &call) {
            Ok(authorized) => authorized,
            Err(denial) => {
                self.audit(
                    Event::Call,
                    Decision::Deny,
                    &shown_tool,
                    None,
                    &denial.reason,
                    None,
                );
                return self
                    .send(&Response::Denied(Denial {
                        reason: denial.reason,
                    }))
                    .await;
            }
        };
        let tool = authorized.tool.name.as_str();
        let principal = authorized.principal.as_str();
        if self
            .broker
            .audit
            .must_record(
                &self
                    .record(Event::Call, Decision::Allow)
                    .tool(tool)
                    .principal(principal),
            )
            .is_err()
        {
            // No record, no call.
            return self
                .reply_error(ErrorCode::Internal, "the audit trail is unavailable".into())
                .await;
        }
        match self.broker.executor.execute(&authorized).await {
            Ok(result) => {
                let response = Response::Done(result);
                if encode(&response).is_err() {
                    let reason = "the result is too large to return";
                    self.audit(
                        Event::CallFailed,
                        Decision::Error,
                        tool,
                        Some(principal),
                        reason,
                        None,
                    );
                    return self.reply_error(ErrorCode::Upstream, reason.into()).await;
                }
                self.send(&response).await
            }
            Err(ExecError::Rejected(reason)) => {
                let reason = format!("call denied: {reason}");
                self.audit(
                    Event::Call,
                    Decision::Deny,
                    tool,
                    Some(principal),
                    &reason,
                    None,
                );
                self.send(&Response::Denied(Denial { reason })).await
            }
            Err(e) => {
                let reason = e.to_string();
                self.audit(
                    Event::CallFailed,
                    Decision::Error,
                    tool,
                    Some(principal),
                    &reason,
                    None,
                );
                self.reply_error(ErrorCode::Upstream, reason).await
            }
        }
    }

    fn record(&self, event: Event, decision: Decision) -> Record<'static> {
        Record::new(event, decision).peer(self.peer.pid, self.peer.uid, self.peer.gid)
    }

    fn audit(
        &self,
        event: Event,
        decision: Decision,
        tool: &str,
        principal: Option<&str>,
        reason: &str,
        status: Option<u16>,
    ) {
        let mut record = self.record(event, decision).tool(tool).reason(reason);
        record.principal = principal;
        record.status = status;
        let _ = self.broker.audit.must_record(&record);
    }

    /// Refuse a message before any policy decision, then close.
    async fn protocol_error(&mut self, code: ErrorCode, message: String) -> Next {
        refuse(&self.broker, &self.peer, &message);
        let _ = reply_error(&self.conn, code, message).await;
        Next::Close
    }

    async fn reply_error(&mut self, code: ErrorCode, message: String) -> Next {
        self.send(&Response::Error(ErrorReply { code, message }))
            .await
    }

    async fn send(&mut self, response: &Response) -> Next {
        match send_response(&self.conn, response).await {
            Ok(()) => Next::Continue,
            Err(_) => Next::Close,
        }
    }
}

fn refuse(broker: &Broker, peer: &Peer, reason: &str) {
    let _ = broker.audit.must_record(
        &Record::new(Event::Refused, Decision::Deny)
            .peer(peer.pid, peer.uid, peer.gid)
            .reason(reason),
    );
}

async fn reply_error(conn: &Connection, code: ErrorCode, message: String) -> std::io::Result<()> {
    send_response(conn, &Response::Error(ErrorReply { code, message })).await
}

async fn send_response(conn: &Connection, response: &Response) -> std::io::Result<()> {
    let bytes = encode(response).map_err(std::io::Error::other)?;
    match tokio::time::timeout(SEND_DEADLINE, conn.send(&bytes)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// A peer-supplied name made safe to show: escaped, and cut to
/// [`SHOWN_NAME_MAX`] characters.
fn shown_name(name: &str) -> String {
    let mut shown: String = name.chars().take(SHOWN_NAME_MAX).collect();
    if shown.len() < name.len() {
        shown.push('…');
    }
    shown.escape_default().to_string()
}
