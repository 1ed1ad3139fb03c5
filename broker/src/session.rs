// SPDX-License-Identifier: Apache-2.0
//! One connection, from accept to close.
//!
//! The peer is pinned first; then every message is authenticated by its
//! kernel credentials, decoded, and answered with exactly one response. A
//! message that cannot be authenticated or decoded gets an error reply and
//! the connection is closed: a well-behaved client never sends one.
//!
//! Authority: an unbound connection acts with the principal authority of
//! its peer's kernel uid/gid. After `Bind` it acts only with the bound
//! token's authority, and so does every channel passed over it
//! (`Request::Channel`); a bound connection accepts messages from any
//! process of the bound uid/gid (the sandbox's children share it), still
//! by kernel credentials.
//!
//! Deadlines: the `Hello` must arrive within [`HELLO_DEADLINE`]. After it
//! there is no idle deadline: `SOCK_SEQPACKET` delivers whole messages, so
//! a slow peer cannot hold a half-read request, and idle connections are
//! bounded by the per-uid connection cap. Replies must be taken within
//! [`SEND_DEADLINE`]; a gateway's streamed pieces within its
//! `idle_timeout`.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use keyward_proto::token::hex;
use keyward_proto::{
    decode, encode, Attenuate, Bind, Bound, Call, Denial, ErrorCode, ErrorReply, Hello, Mint,
    Request, Response, Revoke, Revoked, ToolList, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

use crate::audit::{CallId, Decision, Event, Record};
use crate::broker::Broker;
use crate::executor::ExecError;
use crate::limits::{Refusal, SessionSlot};
use crate::listener::{Connection, Received, RECV_BUFFER};
use crate::peer::{Peer, OVERFLOW_ID};
use crate::policy::{self, AuthorizedCall, Denied};
use crate::token::{self, BindRefused, BoundToken, ChannelSlot, Tokens};

mod gateway;

/// What every session of the broker shares for spawning channel sessions
/// and stopping.
#[derive(Debug, Clone)]
pub struct Sessions {
    pub tracker: TaskTracker,
    pub stopping: CancellationToken,
}

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
pub async fn run(conn: Connection, broker: Arc<Broker>, sessions: Sessions) {
    serve_connection(conn, broker, sessions, None).await;
}

/// A channel passed over a bound connection: its session, its slot there
/// (a session's channels are capped), and its own admission slot: a
/// channel counts against the uid's, the token's and the broker's caps
/// like any connection, since it holds descriptors like one.
struct ChannelOf {
    bound: Arc<BoundToken>,
    slot: ChannelSlot,
    admitted: SessionSlot,
}

/// Serve a connection: a new one, or a channel of a bound session.
///
/// A session ends when its peer closes it, misbehaves, or exits (its
/// pinned process, watched by pidfd: for a bound connection that is the
/// shim), when the broker stops, or when the session it is a channel of
/// ends: every channel passed over a connection closes with it, so a
/// process that outlives the shim cannot keep calling.
async fn serve_connection(
    conn: Connection,
    broker: Arc<Broker>,
    sessions: Sessions,
    channel: Option<ChannelOf>,
) {
    // Admission comes before pinning, so a refused connection holds one
    // descriptor for a moment and no pidfd.
    let (bound, slot, channel_slot) = match channel {
        Some(channel) => (Some(channel.bound), channel.admitted, Some(channel.slot)),
        None => match admit_connection(&conn, &broker) {
            Some(slot) => (None, slot, None),
            None => return,
        },
    };
    let peer = match Peer::pin(&conn.as_fd()) {
        Ok(peer) => Arc::new(peer),
        Err(e) => {
            let reason = e.to_string();
            let _ = broker
                .audit
                .must_record(&Record::new(Event::Refused, Decision::Deny).reason(&reason));
            let _ = reply_error(&conn, ErrorCode::Unauthenticated, reason).await;
            conn.drain();
            return;
        }
    };

    // Cancelled when this session ends (or the broker stops): ends every
    // channel passed over it, and theirs in turn.
    let closing = sessions.stopping.child_token();
    let _close_channels = closing.clone().drop_guard();
    let mut session = Session {
        conn,
        broker,
        peer: Arc::clone(&peer),
        greeted: false,
        version: PROTOCOL_VERSION,
        bound,
        sessions: Sessions {
            tracker: sessions.tracker.clone(),
            stopping: closing.clone(),
        },
        sender_pid: 0,
        deferred: false,
        slot,
        _channel_slot: channel_slot,
    };
    let mut buf = vec![0u8; RECV_BUFFER];
    // One registration for the connection's life, not one per message.
    let stopped = closing.cancelled();
    tokio::pin!(stopped);
    let exited = peer.exited();
    tokio::pin!(exited);
    loop {
        // A message already queued is read at once, after the same checks
        // the select below makes first, without waiting on (and so
        // registering wake-ups for) all three: a client making calls back
        // to back has its next request waiting by the time a reply is out.
        let queued = if session.greeted && !closing.is_cancelled() && !peer.has_exited() {
            session.conn.try_recv(&mut buf)
        } else {
            None
        };
        let received = match queued {
            Some(r) => r.ok().filter(|r| !closed(r)),
            None => {
                // Nothing of ours waits in the audit queue while we do.
                session.flush_deferred();
                tokio::select! {
                    biased;
                    () = &mut stopped => break,
                    () = &mut exited => break,
                    r = recv_within(&session, &mut buf) => r,
                }
            }
        };
        let Some(received) = received else { break };
        match session.handle(received, &buf).await {
            Next::Continue => {}
            Next::Close => break,
        }
    }
    session.flush_deferred();
}

/// Admit a new connection by its peer's uid (`SO_PEERCRED`), or refuse
/// it: `Busy` with the reason, audited, and closed.
fn admit_connection(conn: &Connection, broker: &Broker) -> Option<SessionSlot> {
    use nix::sys::socket::{getsockopt, sockopt};
    let (pid, uid, gid, admitted) = match getsockopt(&conn.as_fd(), sockopt::PeerCredentials) {
        Ok(cred) => (
            cred.pid(),
            cred.uid(),
            cred.gid(),
            broker.admit(cred.uid(), None).map_err(|r| r.to_string()),
        ),
        Err(e) => (
            0,
            OVERFLOW_ID,
            OVERFLOW_ID,
            Err(format!("SO_PEERCRED: {e}")),
        ),
    };
    match admitted {
        Ok(slot) => Some(slot),
        Err(reason) => {
            refuse(broker, (pid, uid, gid), &reason);
            // The reply fits in an empty socket buffer: no waiting, and
            // no task is kept alive for a refused peer.
            if let Ok(bytes) = encode(&Response::Error(ErrorReply {
                code: ErrorCode::Busy,
                message: reason,
            })) {
                let _ = conn.try_send(&bytes);
            }
            conn.drain();
            None
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
    (!closed(&received)).then_some(received)
}

/// Whether a receive saw the peer close: 0 bytes without credentials.
fn closed(received: &Received) -> bool {
    received.len == 0 && received.creds.is_none() && !received.truncated
}

struct Session {
    conn: Connection,
    broker: Arc<Broker>,
    peer: Arc<Peer>,
    greeted: bool,
    /// The protocol version the `Hello` settled (this build's until then).
    version: u16,
    /// The token this connection acts with, once bound.
    bound: Option<Arc<BoundToken>>,
    sessions: Sessions,
    /// Pid of the current message's sender (on a bound connection, any
    /// process of the sandbox), for the audit records.
    sender_pid: i32,
    /// Whether this session has deferred an audit record
    /// ([`crate::audit::Audit::defer`]) that may not have been written.
    deferred: bool,
    /// This session's admission slot (counted against its token once bound).
    slot: SessionSlot,
    /// A channel's slot in the session it was passed over.
    _channel_slot: Option<ChannelSlot>,
}

impl Session {
    async fn handle(&mut self, mut received: Received, buf: &[u8]) -> Next {
        if received.truncated || received.len > keyward_proto::MAX_MESSAGE {
            return self
                .protocol_error(
                    ErrorCode::TooLarge,
                    keyward_proto::DecodeError::TooLarge.to_string(),
                )
                .await;
        }
        if received.control_truncated {
            return self
                .protocol_error(ErrorCode::Malformed, "unexpected control data".into())
                .await;
        }
        let authenticated = if self.bound.is_some() {
            self.peer.authenticate_any_pid(received.creds.as_ref())
        } else {
            self.peer.authenticate(received.creds.as_ref())
        };
        if let Err(e) = authenticated {
            return self
                .protocol_error(
                    ErrorCode::Unauthenticated,
                    format!("unauthenticated message: {e}"),
                )
                .await;
        }
        self.sender_pid = received.creds.map_or(self.peer.pid, |c| c.pid());
        let bytes = buf.get(..received.len).unwrap_or_default();
        let request = match decode::<Request>(bytes) {
            Ok(request) => request,
            Err(e) => return self.protocol_error(e.code(), e.to_string()).await,
        };
        let fds = std::mem::take(&mut received.fds);
        if !fds.is_empty() && !matches!(request, Request::Channel) {
            // Passed fds are closed when dropped.
            return self
                .protocol_error(ErrorCode::Malformed, "unexpected file descriptors".into())
                .await;
        }
        // Every request but the Hello takes from the uid's budget, a
        // Channel too (opening one is work, and refusing one a record).
        if !matches!(request, Request::Hello(_)) {
            if let Err((refusal, first)) = self.broker.rate(self.peer.uid, self.bound.is_some()) {
                // A run of refusals is audited once, at its start.
                if first {
                    self.audit_token(
                        self.record(Event::Refused, Decision::Deny)
                            .reason(&refusal.to_string()),
                    );
                }
                let next = if matches!(request, Request::Channel) {
                    // No reply on the shared connection; the passed socket
                    // is closed, and its creator sees that on its end.
                    drop(fds);
                    Next::Continue
                } else {
                    self.reply_error(ErrorCode::Busy, refusal.to_string()).await
                };
                // Read nothing more from this connection until the budget
                // has room again: a peer that ignores the refusal cannot
                // keep the broker busy refusing it.
                if let Refusal::RateLimited { rate, .. } = refusal {
                    // Nothing of ours waits in the audit queue meanwhile.
                    self.flush_deferred();
                    tokio::time::sleep(Duration::from_secs(1) / rate.max(1)).await;
                }
                return next;
            }
        }
        match request {
            Request::Hello(hello) => self.hello(hello).await,
            _ if !self.greeted => {
                self.protocol_error(ErrorCode::HelloRequired, "send Hello first".into())
                    .await
            }
            _ if request.since() > self.version => {
                let message = format!(
                    "{} needs protocol version {}; this connection speaks version {} \
                     (the version its Hello offered)",
                    request.name(),
                    request.since(),
                    self.version
                );
                self.reply_error(ErrorCode::VersionMismatch, message).await
            }
            Request::Call(call) => self.call(call).await,
            Request::Bind(bind) => self.bind(bind).await,
            Request::Channel => self.channel(fds),
            Request::Mint(mint) => self.mint(mint).await,
            Request::Attenuate(attenuate) => self.attenuate(attenuate).await,
            Request::Tools => self.tools().await,
            Request::Revoke(revoke) => self.revoke(revoke).await,
            Request::Status => self.status().await,
            Request::Tokens => self.token_list().await,
            Request::Inspect(inspect) => self.inspect(inspect).await,

            Request::Gateway(request) => self.gateway(request).await,
            Request::GatewayBody(_) => {
                self.protocol_error(
                    ErrorCode::Malformed,
                    "a gateway body came without a gateway request".into(),
                )
                .await
            }
            Request::GatewayInfo(request) => self.gateway_info(request).await,
        }
    }

    async fn hello(&mut self, hello: Hello) -> Next {
        if self.greeted {
            return self
                .protocol_error(ErrorCode::Malformed, "Hello sent twice".into())
                .await;
        }
        // The older of the two versions, if this broker still speaks it.
        let Some(version) = keyward_proto::negotiate(hello.version) else {
            return self
                .protocol_error(
                    ErrorCode::VersionMismatch,
                    format!(
                        "protocol version {} is not supported (broker speaks \
                         {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION})",
                        hello.version
                    ),
                )
                .await;
        };
        self.greeted = true;
        self.version = version;
        self.send(&Response::Hello(Hello { version })).await
    }

    /// Decide one call: by the bound token (consuming a use), or by the
    /// peer's principal on an unbound connection.
    fn decide(
        &self,
        policy: &policy::Policy,
        call: &Call,
    ) -> Result<AuthorizedCall, policy::Denial> {
        match (&self.bound, self.tokens()) {
            (Some(bound), Ok(tokens)) => {
                let authorize =
                    || tokens.authorize(policy, &self.peer.caller(), bound, call, token::now());
                if bound.counts_uses() {
                    off_reactor(authorize)
                } else {
                    authorize()
                }
            }
            (Some(_), Err(denial)) => Err(denial),
            (None, _) => policy.authorize(&self.peer.caller(), call),
        }
    }

    async fn call(&mut self, call: Call) -> Next {
        let policy = self.broker.policy();
        let decided = self.decide(&policy, &call);
        let authorized: AuthorizedCall = match decided {
            Ok(authorized) => authorized,
            Err(denial) => {
                self.audit_token(
                    self.record(Event::Call, Decision::Deny)
                        .tool(&shown_name(&call.tool))
                        .reason(&denial.to_string()),
                );
                return self.send(&Response::Denied(denial.into())).await;
            }
        };
        let tool = authorized.tool.name.as_str();
        let principal = authorized.principal.as_str();
        let call_hash = self
            .bound
            .as_ref()
            .map(|_| hex(&token::call_hash_of(tool, &authorized.params)));
        // Joins this decision to what the call came to (one outcome
        // record per allowed call).
        let call_id = CallId::new();
        let call_id = call_id.as_str();
        let mut allowed = self
            .record(Event::Call, Decision::Allow)
            .tool(tool)
            .principal(principal)
            .call_id(call_id);
        if let Some(hash) = &call_hash {
            allowed = allowed.call_hash(hash);
        }
        if self.must_audit_token(allowed).is_err() {
            // No record, no call.
            return self
                .reply_error(ErrorCode::Internal, "the audit trail is unavailable".into())
                .await;
        }
        let started = std::time::Instant::now();
        let token = self
            .bound
            .as_ref()
            .map(|b| (b.id_hex.as_str(), b.verified.body.expires));
        let executed = self.broker.executor.execute_for(&authorized, token).await;
        let base = self
            .record(Event::Outcome, Decision::Info)
            .tool(tool)
            .principal(principal)
            .call_id(call_id);
        let outcome = |decision: Decision| {
            Record {
                decision,
                ..base.clone()
            }
            .duration_ms(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX))
        };
        match executed {
            Ok(result) => {
                let (status, body_len) = (result.status, result.body.len() as u64);
                match encode(&Response::Done(result)) {
                    Ok(bytes) => {
                        // Not a decision: it goes out with the next record
                        // written (see `Audit::defer`), not in a write of
                        // its own before the reply.
                        self.deferred = true;
                        self.with_token(
                            outcome(Decision::Info)
                                .status(status)
                                .bytes(body_len)
                                .withheld(false),
                            crate::audit::Audit::defer,
                        );
                        self.send_encoded(&bytes).await
                    }
                    Err(_) => {
                        let outcome = outcome(Decision::Error);
                        self.too_large(tool, principal, call_id, outcome).await
                    }
                }
            }
            Err(ExecError::Rejected(why)) => {
                let denial = policy::Denial::new(Denied::Call, why);
                let reason = denial.to_string();
                self.audit_token(
                    self.record(Event::Call, Decision::Deny)
                        .tool(tool)
                        .principal(principal)
                        .call_id(call_id)
                        .reason(&reason),
                );
                self.audit_token(
                    outcome(Decision::Deny)
                        .bytes(0)
                        .withheld(false)
                        .reason(&reason),
                );
                self.send(&Response::Denied(denial.into())).await
            }
            Err(e) => {
                let code = match e {
                    ExecError::Internal(_) => ErrorCode::Internal,
                    _ => ErrorCode::Upstream,
                };
                let withheld = matches!(e, ExecError::Withheld(_));
                let reason = e.to_string();
                self.audit_token(
                    self.record(Event::CallFailed, Decision::Error)
                        .tool(tool)
                        .principal(principal)
                        .call_id(call_id)
                        .reason(&reason),
                );
                self.audit_token(
                    outcome(Decision::Error)
                        .bytes(0)
                        .withheld(withheld)
                        .reason(&reason),
                );
                self.reply_error(code, reason).await
            }
        }
    }

    /// A performed call whose result does not fit in a reply.
    async fn too_large(
        &mut self,
        tool: &str,
        principal: &str,
        call_id: &str,
        outcome: Record<'_>,
    ) -> Next {
        let reason = "the result is too large to return";
        self.audit_token(
            self.record(Event::CallFailed, Decision::Error)
                .tool(tool)
                .principal(principal)
                .call_id(call_id)
                .reason(reason),
        );
        self.audit_token(outcome.bytes(0).withheld(false).reason(reason));
        self.reply_error(ErrorCode::Upstream, reason.into()).await
    }

    fn record(&self, event: Event, decision: Decision) -> Record<'static> {
        let pid = if self.sender_pid > 0 {
            self.sender_pid
        } else {
            self.peer.pid
        };
        Record::new(event, decision).peer(pid, self.peer.uid, self.peer.gid)
    }

    /// Write a record, with the bound token's id and task when there is
    /// one. A failure is reported by the audit sink itself.
    fn audit_token(&self, record: Record<'_>) {
        let _ = self.must_audit_token(record);
    }

    fn must_audit_token(&self, record: Record<'_>) -> Result<(), crate::audit::AuditError> {
        self.with_token(record, crate::audit::Audit::must_record)
    }

    /// `write` the record, with the bound token's id, task and ancestors
    /// when there is one.
    fn with_token<T>(
        &self,
        record: Record<'_>,
        write: impl FnOnce(&crate::audit::Audit, &Record<'_>) -> T,
    ) -> T {
        match &self.bound {
            Some(bound) => {
                let mut record = record.token(&bound.id_hex).task(&bound.task_hex);
                if !bound.parents_hex.is_empty() {
                    record = record.parent_token(&bound.parents_hex);
                }
                write(&self.broker.audit, &record)
            }
            None => write(&self.broker.audit, &record),
        }
    }

    /// Write what this session deferred, if anything.
    fn flush_deferred(&mut self) {
        if std::mem::take(&mut self.deferred) {
            self.broker.audit.flush();
        }
    }

    /// The token authority, or the denial that tokens are disabled.
    fn tokens(&self) -> Result<&Tokens, policy::Denial> {
        self.broker.tokens.as_ref().ok_or_else(|| {
            policy::Denial::new(
                Denied::Tokens,
                "the broker has no state directory \
                 (set state_dir or run it with StateDirectory=)",
            )
        })
    }

    async fn bind(&mut self, bind: Bind) -> Next {
        if self.bound.is_some() {
            return self
                .deny(
                    Event::Bind,
                    "bind denied: this connection is already bound".into(),
                )
                .await;
        }
        let verified = match self.tokens() {
            Ok(tokens) => tokens.verify(&self.peer.caller(), &bind.token, token::now()),
            Err(denial) => Err(BindRefused {
                denial,
                token: None,
            }),
        };
        let bound = match verified {
            Ok(bound) => Arc::new(bound),
            Err(BindRefused {
                denial,
                token: Some(token),
            }) => {
                // The signature checked out, so its id and task are the
                // token's own: record the refusal under them.
                let reason = denial.to_string();
                let mut record = self
                    .record(Event::Bind, Decision::Deny)
                    .reason(&reason)
                    .principal(&token.verified.body.issuer)
                    .token(&token.id_hex)
                    .task(&token.task_hex);
                if !token.parents_hex.is_empty() {
                    record = record.parent_token(&token.parents_hex);
                }
                self.audit_token(record);
                return self.send(&Response::Denied(denial.into())).await;
            }
            Err(BindRefused {
                denial,
                token: None,
            }) => {
                return self.deny(Event::Bind, denial.to_string()).await;
            }
        };
        if let Err(refusal) = self.broker.attach_token(&mut self.slot, bound.id()) {
            return self
                .deny(Event::Bind, format!("bind denied: {refusal}"))
                .await;
        }
        let body = &bound.verified.body;
        let reply = Response::Bound(Bound {
            id: body.id,
            task: body.task,
            expires: body.expires,
        });
        self.bound = Some(Arc::clone(&bound));
        if self
            .must_audit_token(
                self.record(Event::Bind, Decision::Allow)
                    .principal(&body.issuer),
            )
            .is_err()
        {
            self.bound = None;
            return self
                .reply_error(ErrorCode::Internal, "the audit trail is unavailable".into())
                .await;
        }
        self.send(&reply).await
    }

    /// Serve a passed socket as a new channel of this bound session. No
    /// reply goes out on this connection, which other processes share: a
    /// bad channel is closed, and its creator sees that on its own end.
    fn channel(&mut self, mut fds: Vec<std::os::fd::OwnedFd>) -> Next {
        let reason = match (&self.bound, fds.len()) {
            (None, _) => Some("channel refused: only a bound connection can pass channels"),
            (Some(_), 1) => None,
            (Some(_), _) => Some("channel refused: a Channel message carries exactly one socket"),
        };
        if let Some(reason) = reason {
            self.audit_channel_refusal(reason);
            return Next::Continue;
        }
        let (Some(fd), Some(bound)) = (fds.pop(), self.bound.clone()) else {
            return Next::Continue;
        };
        let live = self
            .tokens()
            .and_then(|t| t.check_live(&self.peer.caller(), &bound, token::now()));
        let refused = match (live, bound.open_channel()) {
            (Err(denial), _) => Some(format!("channel refused: {denial}")),
            (Ok(()), None) => Some(format!(
                "channel refused: the session already has {} channels open",
                token::MAX_CHANNELS_PER_SESSION
            )),
            (Ok(()), Some(slot)) => match self.broker.admit(self.peer.uid, Some(bound.id())) {
                Err(refusal) => Some(format!("channel refused: {refusal}")),
                Ok(admitted) => {
                    match crate::listener::adopt_channel(fd, self.peer.uid, self.peer.gid) {
                        Ok(conn) => {
                            let broker = Arc::clone(&self.broker);
                            let sessions = self.sessions.clone();
                            let channel = ChannelOf {
                                bound,
                                slot,
                                admitted,
                            };
                            self.sessions.tracker.spawn(serve_connection(
                                conn,
                                broker,
                                sessions,
                                Some(channel),
                            ));
                            None
                        }
                        Err(e) => Some(format!("channel refused: {e}")),
                    }
                }
            },
        };
        if let Some(reason) = refused {
            self.audit_channel_refusal(&reason);
        }
        Next::Continue
    }

    /// Record a refused channel, at most once a second per uid: a sandbox
    /// that keeps passing bad channels must not flood the journal. The
    /// next record says how many went unrecorded in between.
    fn audit_channel_refusal(&self, reason: &str) {
        match self.broker.record_refusal(self.peer.uid) {
            Some(0) => {
                self.audit_token(self.record(Event::Refused, Decision::Deny).reason(reason));
            }
            Some(unrecorded) => {
                let reason = format!(
                    "{reason} ({unrecorded} earlier channel refusals of this uid went unrecorded)"
                );
                self.audit_token(self.record(Event::Refused, Decision::Deny).reason(&reason));
            }
            None => {}
        }
    }

    async fn mint(&mut self, mint: Mint) -> Next {
        if self.bound.is_some() {
            return self
                .deny(
                    Event::Mint,
                    "mint denied: a bound connection acts only with its token's authority".into(),
                )
                .await;
        }
        let policy = self.broker.policy();
        let minted = self.tokens().and_then(|t| {
            off_reactor(|| t.mint(&policy, &self.peer.caller(), &mint, token::now()))
        });
        match minted {
            Ok(minted) => {
                let id = minted.id.to_string();
                let task = hex(&keyward_proto::token::task_hash(&mint.task));
                let tools = mint.tools.join(",");
                let issuer = self
                    .tokens()
                    .ok()
                    .and_then(|t| t.minted(&minted.id))
                    .map(|m| m.issuer);
                let mut record = self
                    .record(Event::Mint, Decision::Allow)
                    .tool(&tools)
                    .token(&id)
                    .task(&task);
                if let Some(issuer) = &issuer {
                    record = record.principal(issuer);
                }
                if self.broker.audit.must_record(&record).is_err() {
                    return self
                        .reply_error(ErrorCode::Internal, "the audit trail is unavailable".into())
                        .await;
                }
                self.send(&Response::Minted(minted)).await
            }
            Err(denial) => self.deny(Event::Mint, denial.to_string()).await,
        }
    }

    async fn attenuate(&mut self, attenuate: Attenuate) -> Next {
        let Some(bound) = self.bound.clone() else {
            return self
                .deny(
                    Event::Attenuate,
                    "attenuation denied: bind the token to attenuate first".into(),
                )
                .await;
        };
        let policy = self.broker.policy();
        let caller = self.peer.caller();
        let minted = self.tokens().and_then(|t| {
            off_reactor(|| t.attenuate(&policy, &caller, &bound, &attenuate, token::now()))
        });
        match minted {
            Ok(minted) => {
                // The record is the child's: its id, the task it
                // inherits, the parent and its ancestors (nearest first).
                let child = minted.id.to_string();
                let reason = format!("child token {child} of token {}", bound.id_hex);
                let parents = if bound.parents_hex.is_empty() {
                    bound.id_hex.clone()
                } else {
                    format!("{} {}", bound.id_hex, bound.parents_hex)
                };
                let tools = attenuate.tools.join(",");
                let mut record = self
                    .record(Event::Attenuate, Decision::Allow)
                    .principal(&bound.verified.body.issuer)
                    .token(&child)
                    .task(&bound.task_hex)
                    .parent_token(&parents)
                    .reason(&reason);
                if !tools.is_empty() {
                    record = record.tool(&tools);
                }
                if self.broker.audit.must_record(&record).is_err() {
                    return self
                        .reply_error(ErrorCode::Internal, "the audit trail is unavailable".into())
                        .await;
                }
                self.send(&Response::Minted(minted)).await
            }
            Err(denial) => self.deny(Event::Attenuate, denial.to_string()).await,
        }
    }

    async fn tools(&mut self) -> Next {
        let policy = self.broker.policy();
        let caller = self.peer.caller();
        let tools = match (&self.bound, self.tokens()) {
            (Some(bound), Ok(tokens)) => tokens.tools(&policy, &caller, bound, token::now()),
            (Some(_), Err(denial)) => Err(denial),
            (None, _) => Ok(token::principal_tools(&policy, &caller)),
        };
        match tools {
            Ok(tools) => {
                // In the connection's version: before 3, without `kind`
                // and without gateways.
                let mut bytes = Vec::new();
                let list = Response::ToolList(ToolList { tools });
                match keyward_proto::encode_response(&list, self.version, &mut bytes) {
                    Ok(()) => self.send_encoded(&bytes).await,
                    Err(_) => Next::Close,
                }
            }
            Err(denial) => self.send(&Response::Denied(denial.into())).await,
        }
    }

    async fn revoke(&mut self, revoke: Revoke) -> Next {
        if self.bound.is_some() {
            return self
                .deny(
                    Event::Revoke,
                    "revocation denied: a bound connection acts only with its token's authority"
                        .into(),
                )
                .await;
        }
        let policy = self.broker.policy();
        let revoked = self.tokens().and_then(|t| {
            off_reactor(|| t.revoke(&policy, &self.peer.caller(), revoke.id, token::now()))
        });
        let id = revoke.id.to_string();
        // Who revoked (the principal the caller acts as, the token's
        // issuer first), and the token's task and ancestors when this
        // broker issued it (recorded in its state, so across restarts).
        let caller = self.peer.caller();
        let record = self.tokens().ok().and_then(|t| t.minted(&revoke.id));
        let principal = policy.principals_of(&caller).map(|p| p.name.as_str()).fold(
            None,
            |found: Option<&str>, name| match (found, &record) {
                (None, _) => Some(name),
                (Some(_), Some(r)) if r.issuer == name => Some(name),
                (found, _) => found,
            },
        );
        let issued = self.tokens().ok().and_then(|t| t.issued(&revoke.id));
        let task = issued.as_ref().map(|issued| hex(&issued.task));
        let parents = issued
            .map(|issued| token::ancestors_text(&issued.lineage))
            .filter(|text| !text.is_empty());
        let decision = if revoked.is_ok() {
            Decision::Allow
        } else {
            Decision::Deny
        };
        let reason = revoked.as_ref().err().map(ToString::to_string);
        let mut record = self.record(Event::Revoke, decision).token(&id);
        if let Some(principal) = principal {
            record = record.principal(principal);
        }
        if let Some(task) = &task {
            record = record.task(task);
        }
        if let Some(parents) = &parents {
            record = record.parent_token(parents);
        }
        if let Some(reason) = &reason {
            record = record.reason(reason);
        }
        match revoked {
            Ok(()) => {
                // Like every other success, a revocation is confirmed only
                // once recorded. It is not undone without a record (that
                // would keep alive a token someone wants dead), but the
                // caller learns that the record is missing.
                if self.must_audit_token(record).is_err() {
                    return self
                        .reply_error(
                            ErrorCode::Internal,
                            format!(
                                "token {id} is revoked, but the audit trail is unavailable \
                                 to record it"
                            ),
                        )
                        .await;
                }
                self.send(&Response::Revoked(Revoked { id: revoke.id }))
                    .await
            }
            Err(denial) => {
                self.audit_token(record);
                self.send(&Response::Denied(denial.into())).await
            }
        }
    }

    /// `keyward-broker status`: admins only, on an unbound connection.
    async fn status(&mut self) -> Next {
        if let Err(reason) = self.admin_only("status") {
            return self.refuse_request(reason).await;
        }
        let report = crate::status::report(&self.broker);
        self.send(&Response::Status(report)).await
    }

    /// `keyward-broker tokens`: admins only, on an unbound connection.
    async fn token_list(&mut self) -> Next {
        if let Err(reason) = self.admin_only("token listing") {
            return self.refuse_request(reason).await;
        }
        match self.tokens() {
            Ok(tokens) => {
                let list = off_reactor(|| crate::status::token_list(tokens));
                self.send(&Response::TokenList(list)).await
            }
            Err(denial) => self.send(&Response::Denied(denial.into())).await,
        }
    }

    /// Whether this connection may ask for the broker's state.
    fn admin_only(&self, what: &str) -> Result<(), String> {
        if self.bound.is_some() {
            return Err(format!(
                "{what} denied: a bound connection acts only with its token's authority"
            ));
        }
        if !crate::status::is_admin(&self.broker.policy(), self.peer.uid) {
            return Err(crate::status::not_admin(what, self.peer.uid));
        }
        Ok(())
    }

    /// Refuse a request that is not a policy decision on a call or token:
    /// recorded, then denied.
    async fn refuse_request(&mut self, reason: String) -> Next {
        self.audit_token(self.record(Event::Refused, Decision::Deny).reason(&reason));
        self.send(&Response::Denied(Denial { reason })).await
    }

    /// `agent-shim token inspect`: the bound token, or a given one to its
    /// audience, its issuer or an admin.
    async fn inspect(&mut self, inspect: keyward_proto::Inspect) -> Next {
        let tokens = match self.tokens() {
            Ok(tokens) => tokens,
            Err(denial) => return self.send(&Response::Denied(denial.into())).await,
        };
        let policy = self.broker.policy();
        let info = match (&self.bound, inspect.token) {
            (Some(bound), None) => Ok(tokens.inspect(&policy, &bound.verified, token::now())),
            (Some(_), Some(_)) => Err(
                "inspection denied: a bound connection acts only with its token's authority"
                    .to_owned(),
            ),
            (None, None) => Err("inspection denied: no token given to inspect".to_owned()),
            (None, Some(text)) => match tokens.decode(&text) {
                Err(denial) => Err(format!("inspection denied: {denial}")),
                Ok(verified)
                    if crate::status::may_inspect(&policy, &self.peer.caller(), &verified) =>
                {
                    Ok(tokens.inspect(&policy, &verified, token::now()))
                }
                Ok(verified) => Err(format!(
                    "inspection denied: token {} was issued for uid {}, and uid {} is neither \
                     that, nor its issuer {:?}, nor an admin",
                    verified.body.id,
                    verified.body.audience.uid,
                    self.peer.uid,
                    verified.body.issuer
                )),
            },
        };
        match info {
            Ok(info) => self.send(&Response::TokenInfo(info)).await,
            Err(reason) => self.refuse_request(reason).await,
        }
    }

    /// Record a denial of `event` and send it.
    async fn deny(&mut self, event: Event, reason: String) -> Next {
        self.audit_token(self.record(event, Decision::Deny).reason(&reason));
        self.send(&Response::Denied(Denial { reason })).await
    }

    /// Refuse a message before any policy decision, then close.
    async fn protocol_error(&mut self, code: ErrorCode, message: String) -> Next {
        refuse(
            &self.broker,
            (self.peer.pid, self.peer.uid, self.peer.gid),
            &message,
        );
        let _ = reply_error(&self.conn, code, message).await;
        self.conn.drain();
        Next::Close
    }

    async fn reply_error(&mut self, code: ErrorCode, message: String) -> Next {
        self.send(&Response::Error(ErrorReply { code, message }))
            .await
    }

    async fn send(&mut self, response: &Response) -> Next {
        match encode(response) {
            Ok(bytes) => self.send_encoded(&bytes).await,
            Err(_) => Next::Close,
        }
    }

    async fn send_encoded(&mut self, bytes: &[u8]) -> Next {
        self.send_encoded_within(bytes, SEND_DEADLINE).await
    }

    /// Send a reply the peer must take within `deadline` (a streamed
    /// piece: the gateway's `idle_timeout`, which also bounds the
    /// upstream's pauses), or close.
    async fn send_within(&mut self, response: &Response, deadline: Duration) -> Next {
        match encode(response) {
            Ok(bytes) => self.send_encoded_within(&bytes, deadline).await,
            Err(_) => Next::Close,
        }
    }

    async fn send_encoded_within(&mut self, bytes: &[u8], deadline: Duration) -> Next {
        // The socket almost always takes a reply at once. When it does
        // not, the peer decides how long we wait: nothing of ours waits in
        // the audit queue meanwhile.
        let sent = match try_send(&self.conn, bytes) {
            Ok(true) => Ok(()),
            Ok(false) => {
                self.flush_deferred();
                send_waiting(&self.conn, bytes, deadline).await
            }
            Err(e) => Err(e),
        };
        match sent {
            Ok(()) => Next::Continue,
            Err(_) => Next::Close,
        }
    }
}

/// Run a token operation that may write and fsync the state file without
/// stalling the other tasks of the reactor thread it runs on.
fn off_reactor<T>(op: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(op),
        _ => op(),
    }
}

fn refuse(broker: &Broker, (pid, uid, gid): (i32, u32, u32), reason: &str) {
    let _ = broker.audit.must_record(
        &Record::new(Event::Refused, Decision::Deny)
            .peer(pid, uid, gid)
            .reason(reason),
    );
}

async fn reply_error(conn: &Connection, code: ErrorCode, message: String) -> std::io::Result<()> {
    send_response(conn, &Response::Error(ErrorReply { code, message })).await
}

async fn send_response(conn: &Connection, response: &Response) -> std::io::Result<()> {
    let bytes = encode(response).map_err(std::io::Error::other)?;
    send_bytes(conn, &bytes, SEND_DEADLINE).await
}

async fn send_bytes(conn: &Connection, bytes: &[u8], deadline: Duration) -> std::io::Result<()> {
    if try_send(conn, bytes)? {
        return Ok(());
    }
    send_waiting(conn, bytes, deadline).await
}

/// Send without waiting: whether the socket took it (no timer then).
fn try_send(conn: &Connection, bytes: &[u8]) -> std::io::Result<bool> {
    match conn.try_send(bytes) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(false),
        Err(e) => Err(e),
    }
}

/// Send once the peer has made room, within `deadline`.
async fn send_waiting(conn: &Connection, bytes: &[u8], deadline: Duration) -> std::io::Result<()> {
    match tokio::time::timeout(deadline, conn.send(bytes)).await {
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

#[cfg(test)]
mod tests {
    //! Dispatch, end to end within the process: a session served over a
    //! socketpair, driven by the real client. The tests run as root.
    use super::*;

    use std::os::fd::OwnedFd;

    use keyward_client::{Client, ClientError};
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    use crate::audit::Audit;
    use crate::config::Source;
    use crate::credential::Credentials;
    use crate::executor::Executor;
    use crate::limits::Limits;
    use crate::policy::Policy;

    const CONFIG: &str = r#"
[broker]
socket = "/nonexistent/broker.sock"

[[principal]]
name = "root"
uids = [0]
may_call = ["echo", "api"]

[credential.api]
file = "api.token"

[[tool]]
name = "echo"
kind = "echo"
params.message = { type = "string", max_len = 10 }

[[tool]]
name = "api"
kind = "http"
credential = "api"
method = "GET"
url = "http://127.0.0.1:9/x"
auth = { bearer = true }
"#;

    struct Harness {
        runtime: tokio::runtime::Runtime,
        broker: Arc<Broker>,
        sessions: Sessions,
    }

    impl Harness {
        fn new(limits: Option<Limits>) -> Harness {
            Harness::with_audit(limits, Audit::stderr())
        }

        fn with_audit(limits: Option<Limits>, audit: Audit) -> Harness {
            let source = Source::parse("t.toml", CONFIG.to_owned()).unwrap();
            let policy = Policy::compile(&source).unwrap();
            // No credential is loaded: the "api" tool names one anyway.
            let executor = Executor::new(Credentials::default()).unwrap();
            let mut broker = Broker::new(policy, executor, audit);
            if let Some(limits) = limits {
                broker = broker.with_limits(limits, 1024);
            }
            Harness {
                runtime: tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap(),
                broker: Arc::new(broker),
                sessions: Sessions {
                    tracker: TaskTracker::new(),
                    stopping: CancellationToken::new(),
                },
            }
        }

        /// A new session; the client's end, not yet greeted.
        fn socket(&self) -> OwnedFd {
            let (ours, theirs) = socketpair(
                AddressFamily::Unix,
                SockType::SeqPacket,
                None,
                SockFlag::SOCK_CLOEXEC,
            )
            .unwrap();
            nix::sys::socket::setsockopt(&theirs, nix::sys::socket::sockopt::PassCred, &true)
                .unwrap();
            let flags = nix::fcntl::fcntl(&theirs, nix::fcntl::FcntlArg::F_GETFL).unwrap();
            nix::fcntl::fcntl(
                &theirs,
                nix::fcntl::FcntlArg::F_SETFL(
                    nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK,
                ),
            )
            .unwrap();
            let _entered = self.runtime.enter();
            let conn = Connection::new(theirs).unwrap();
            self.runtime
                .spawn(run(conn, Arc::clone(&self.broker), self.sessions.clone()));
            ours
        }

        fn client(&self) -> Client {
            Client::over(self.socket()).unwrap()
        }
    }

    fn echo(client: &mut Client, message: &str) -> Response {
        client
            .call("echo", &[("message".to_owned(), message.to_owned())])
            .unwrap()
    }

    #[test]
    fn calls_go_through_policy_to_the_executor() {
        let h = Harness::new(None);
        let mut client = h.client();
        assert!(matches!(echo(&mut client, "hi"), Response::Done(_)));
        // Over the tool's max_len: a denial, and the session goes on.
        let denied = echo(&mut client, "far too long for it");
        assert!(matches!(denied, Response::Denied(_)), "{denied:?}");
        let unknown = client.call("nope", &[]).unwrap();
        assert!(matches!(unknown, Response::Denied(_)), "{unknown:?}");
        assert!(matches!(echo(&mut client, "again"), Response::Done(_)));
    }

    #[test]
    fn every_allowed_call_has_one_outcome_joined_by_its_call_id() {
        let h = Harness::with_audit(None, Audit::memory());
        let mut client = h.client();
        assert!(matches!(echo(&mut client, "hi"), Response::Done(_)));
        assert!(matches!(client.call("api", &[]), Ok(Response::Error(_))));
        assert!(matches!(
            echo(&mut client, "far too long for it"),
            Response::Denied(_)
        ));
        let records: Vec<serde_json::Value> = h
            .broker
            .audit
            .lines()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let allows: Vec<_> = records
            .iter()
            .filter(|r| r["event"] == "call" && r["decision"] == "allow")
            .collect();
        let outcomes: Vec<_> = records.iter().filter(|r| r["event"] == "outcome").collect();
        // The denied call was never allowed: two allows, two outcomes.
        assert_eq!(allows.len(), 2, "{records:?}");
        assert_eq!(outcomes.len(), 2, "{records:?}");
        for (allow, outcome) in allows.iter().zip(&outcomes) {
            let id = allow["call_id"].as_str().unwrap();
            assert_eq!(id.len(), 32);
            assert_eq!(outcome["call_id"], id);
            assert_eq!(outcome["tool"], allow["tool"]);
            assert!(outcome["duration_ms"].is_u64(), "{outcome}");
        }
        assert_ne!(allows[0]["call_id"], allows[1]["call_id"]);
        let echoed = outcomes[0];
        assert_eq!(echoed["decision"], "info");
        assert_eq!(echoed["status"], 200);
        assert_eq!(echoed["bytes"], r#"{"message":"hi"}"#.len());
        assert_eq!(echoed["withheld"], false);
        let failed = outcomes[1];
        assert_eq!(failed["decision"], "error");
        assert!(failed.get("status").is_none(), "{failed}");
        assert_eq!(failed["withheld"], false);
        // The call_failed record of the same call names the same id.
        let call_failed = records
            .iter()
            .find(|r| r["event"] == "call_failed")
            .unwrap();
        assert_eq!(call_failed["call_id"], allows[1]["call_id"]);
    }

    #[test]
    fn a_credential_that_is_not_loaded_is_an_internal_fault() {
        let h = Harness::new(None);
        let mut client = h.client();
        match client.call("api", &[]).unwrap() {
            Response::Error(e) => {
                assert_eq!(e.code, ErrorCode::Internal, "{e:?}");
                assert!(e.message.contains("credential api is not loaded"), "{e:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_second_hello_is_a_protocol_error_and_closes() {
        let h = Harness::new(None);
        let mut client = h.client();
        let reply = client
            .request(&Request::Hello(Hello {
                version: PROTOCOL_VERSION,
            }))
            .unwrap();
        assert!(
            matches!(&reply, Response::Error(e) if e.code == ErrorCode::Malformed),
            "{reply:?}"
        );
        assert!(matches!(
            client.request(&Request::Tools),
            Err(ClientError::Closed | ClientError::Io(_))
        ));
    }

    #[test]
    fn without_a_state_directory_token_requests_are_denied() {
        let h = Harness::new(None);
        let mut client = h.client();
        let requests = [
            Request::Bind(Bind { token: "x".into() }),
            Request::Revoke(Revoke {
                id: keyward_proto::token::TokenId([0; 16]),
            }),
        ];
        for request in requests {
            match client.request(&request).unwrap() {
                Response::Denied(d) => assert!(d.reason.contains("tokens are disabled"), "{d:?}"),
                other => panic!("{other:?}"),
            }
        }
        // Denials leave the session usable.
        assert!(matches!(
            client.request(&Request::Tools),
            Ok(Response::ToolList(_))
        ));
    }

    #[test]
    fn sessions_beyond_the_cap_are_refused_with_the_reason() {
        let h = Harness::new(Some(Limits {
            max_sessions: 2,
            reserved_sessions: 1,
            max_sessions_per_token: 4,
            requests_per_second: 10,
            request_burst: 10,
        }));
        let _one = h.client();
        let _two = h.client();
        match Client::over(h.socket()) {
            Err(ClientError::Handshake(message)) => {
                assert!(message.contains("maximum of 2 sessions"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        drop(_two);
        // The slot comes back once the session has ended.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while h.broker.open_sessions() > 1 {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut three = h.client();
        assert!(matches!(echo(&mut three, "hi"), Response::Done(_)));
    }
}
