// SPDX-License-Identifier: Apache-2.0
//! A session's gateway requests ([`crate::gateway`]): decided like a call
//! of the tool of the gateway's name with `method` and `path` (one use of
//! the token each), audited as one `call` decision and one `outcome`
//! record joined by `call_id`, and answered with a stream: the head, the
//! body piece by piece as the upstream sends it, and the end (or an error
//! in place of the rest).

use std::time::{Duration, Instant};

use keyward_proto::token::hex;
use keyward_proto::{
    decode, Call, ErrorCode, GatewayChunk, GatewayEnd, GatewayHead, GatewayInfoRequest,
    GatewayRequest, Param, Request, Response, Value,
};

use super::{shown_name, Next, Session, RECV_BUFFER};
use crate::audit::{Decision, Event};
use crate::gateway::forward::{self, ForwardError};
use crate::gateway::{METHOD_PARAM, PATH_PARAM};
use crate::token;

/// Longest wait for each further message of a request body.
const BODY_DEADLINE: Duration = Duration::from_secs(30);

/// Most body bytes in one `GatewayChunk` (a frame is 64 KiB).
pub const MAX_CHUNK: usize = 60 * 1024;

impl Session {
    pub(super) async fn gateway_info(&mut self, request: GatewayInfoRequest) -> Next {
        let policy = self.broker.policy();
        let name = shown_name(&request.gateway);
        let Some(gateway) = policy.gateway(&request.gateway).cloned() else {
            return self
                .deny(
                    Event::Call,
                    format!("gateway denied: no gateway is named {name}"),
                )
                .await;
        };
        let caller = self.peer.caller();
        let tools = match (&self.bound, self.tokens()) {
            (Some(bound), Ok(tokens)) => tokens.tools(&policy, &caller, bound, token::now()),
            (Some(_), Err(denial)) => Err(denial),
            (None, _) => Ok(token::principal_tools(&policy, &caller)),
        };
        match tools {
            Ok(tools) if tools.iter().any(|t| t.name == gateway.name) => {
                self.send(&Response::GatewayInfo(gateway.info())).await
            }
            Ok(_) => {
                let reason = match &self.bound {
                    Some(_) => format!("gateway denied: the token does not grant gateway {name}"),
                    None => {
                        format!("gateway denied: no principal of this uid may use gateway {name}")
                    }
                };
                self.deny(Event::Call, reason).await
            }
            Err(denial) => self.send(&Response::Denied(denial.into())).await,
        }
    }

    pub(super) async fn gateway(&mut self, request: GatewayRequest) -> Next {
        let started = Instant::now();
        let policy = self.broker.policy();
        let name = shown_name(&request.gateway);
        let Some(gateway) = policy.gateway(&request.gateway).cloned() else {
            return self
                .deny_gateway(
                    &name,
                    format!("gateway request denied: no gateway is named {name}"),
                )
                .await;
        };
        let checked = match gateway.check(&request.method, &request.path, request.body_len) {
            Ok(checked) => checked,
            Err(why) => {
                return self
                    .deny_gateway(&gateway.name, format!("gateway request denied: {why}"))
                    .await
            }
        };
        let call = Call {
            tool: gateway.name.clone(),
            params: vec![
                Param {
                    name: METHOD_PARAM.to_owned(),
                    value: Value::Str(checked.method.as_str().to_owned()),
                },
                Param {
                    name: PATH_PARAM.to_owned(),
                    value: Value::Str(checked.path.clone()),
                },
            ],
        };
        let authorized = match self.decide(&policy, &call) {
            Ok(authorized) => authorized,
            Err(denial) => {
                let reason = format!("gateway request denied: {}", denial.why);
                return self.deny_gateway(&gateway.name, reason).await;
            }
        };
        let call_id = crate::audit::CallId::new();
        let call_id = call_id.as_str();
        let mut allowed = self
            .record(Event::Call, Decision::Allow)
            .tool(&gateway.name)
            .principal(&authorized.principal)
            .call_id(call_id);
        let call_hash = self
            .bound
            .as_ref()
            .map(|_| hex(&token::call_hash_of(&gateway.name, &authorized.params)));
        if let Some(hash) = &call_hash {
            allowed = allowed.call_hash(hash);
        }
        if self.must_audit_token(allowed).is_err() {
            return self
                .reply_error(ErrorCode::Internal, "the audit trail is unavailable".into())
                .await;
        }
        let outcome = |session: &Session, decision: Decision| {
            session
                .record(Event::Outcome, decision)
                .tool(&gateway.name)
                .principal(&authorized.principal)
        };

        let body = match self.gateway_body(request.body, request.body_len).await {
            Ok(body) => body,
            Err((code, reason)) => {
                let ms = elapsed_ms(started);
                self.audit_token(
                    outcome(self, Decision::Error)
                        .call_id(call_id)
                        .duration_ms(ms)
                        .reason(&reason),
                );
                return self.protocol_error(code, reason).await;
            }
        };

        let broker = std::sync::Arc::clone(&self.broker);
        let credentials = broker.executor.credentials();
        let opened = forward::open(&gateway, credentials, &checked, &request.headers, body).await;
        let mut opened = match opened {
            Ok(opened) => opened,
            Err(e) => {
                let reason = e.to_string();
                let withheld = matches!(e, ForwardError::Withheld(_));
                self.audit_token(
                    outcome(self, Decision::Error)
                        .call_id(call_id)
                        .duration_ms(elapsed_ms(started))
                        .withheld(withheld)
                        .reason(&reason),
                );
                let code = match e {
                    ForwardError::Internal(_) => ErrorCode::Internal,
                    _ => ErrorCode::Upstream,
                };
                return self.reply_error(code, reason).await;
            }
        };
        let status = opened.status;
        let head = Response::GatewayHead(GatewayHead {
            status,
            headers: std::mem::take(&mut opened.headers),
        });
        let mut next = self.send(&head).await;
        let mut failure = None;
        while matches!(next, Next::Continue) {
            match opened.next(credentials).await {
                Ok(Some(piece)) => {
                    for part in piece.chunks(MAX_CHUNK) {
                        // A program may pause reading as long as the
                        // upstream may pause sending.
                        next = self
                            .send_within(
                                &Response::GatewayChunk(GatewayChunk {
                                    data: part.to_vec(),
                                }),
                                gateway.idle_timeout,
                            )
                            .await;
                        if !matches!(next, Next::Continue) {
                            failure = Some((
                                false,
                                format!(
                                    "the client closed the stream or did not read it for {:?}",
                                    gateway.idle_timeout
                                ),
                            ));
                            break;
                        }
                    }
                }
                Ok(None) => {
                    next = self
                        .send_within(
                            &Response::GatewayEnd(GatewayEnd {
                                bytes: opened.bytes,
                            }),
                            gateway.idle_timeout,
                        )
                        .await;
                    break;
                }
                Err(e) => {
                    let withheld = matches!(e, ForwardError::Withheld(_));
                    let reason = e.to_string();
                    next = self.reply_error(ErrorCode::Upstream, reason.clone()).await;
                    failure = Some((withheld, reason));
                    break;
                }
            }
        }
        let mut record = outcome(
            self,
            if failure.is_some() {
                Decision::Error
            } else {
                Decision::Info
            },
        )
        .call_id(call_id)
        .status(status)
        .bytes(opened.bytes)
        .duration_ms(elapsed_ms(started));
        let reason;
        match &failure {
            Some((withheld, why)) => {
                reason = why.clone();
                record = record.withheld(*withheld).reason(&reason);
            }
            None => record = record.withheld(false),
        }
        self.audit_token(record);
        next
    }

    /// The rest of a request body, from `GatewayBody` messages.
    async fn gateway_body(
        &mut self,
        first: Vec<u8>,
        len: u64,
    ) -> Result<Vec<u8>, (ErrorCode, String)> {
        let malformed = |why: &str| (ErrorCode::Malformed, why.to_owned());
        let len = usize::try_from(len).map_err(|_| malformed("the body length is too large"))?;
        if first.len() > len {
            return Err(malformed("the gateway body is longer than announced"));
        }
        // `len` is at most the gateway's max_request_bytes (checked).
        let mut body = Vec::with_capacity(len);
        body.extend_from_slice(&first);
        let mut buf = vec![0u8; RECV_BUFFER];
        while body.len() < len {
            let received = tokio::time::timeout(BODY_DEADLINE, self.conn.recv(&mut buf))
                .await
                .map_err(|_| malformed("the rest of the gateway body did not come in time"))?
                .map_err(|e| (ErrorCode::Malformed, format!("receiving the body: {e}")))?;
            if received.len == 0 && received.creds.is_none() {
                return Err(malformed("the connection closed inside a gateway body"));
            }
            if received.truncated || received.len > keyward_proto::MAX_MESSAGE {
                return Err((
                    ErrorCode::TooLarge,
                    keyward_proto::DecodeError::TooLarge.to_string(),
                ));
            }
            if received.control_truncated || !received.fds.is_empty() {
                return Err(malformed("unexpected control data"));
            }
            let authenticated = if self.bound.is_some() {
                self.peer.authenticate_any_pid(received.creds.as_ref())
            } else {
                self.peer.authenticate(received.creds.as_ref())
            };
            authenticated.map_err(|e| {
                (
                    ErrorCode::Unauthenticated,
                    format!("unauthenticated message: {e}"),
                )
            })?;
            let bytes = buf.get(..received.len).unwrap_or_default();
            match decode::<Request>(bytes) {
                Ok(Request::GatewayBody(part)) if part.data.len() <= len - body.len() => {
                    body.extend_from_slice(&part.data);
                }
                Ok(Request::GatewayBody(_)) => {
                    return Err(malformed("the gateway body is longer than announced"))
                }
                Ok(_) => return Err(malformed("a gateway body was expected")),
                Err(e) => return Err((e.code(), e.to_string())),
            }
        }
        Ok(body)
    }

    /// Record a denied gateway request and send the denial.
    async fn deny_gateway(&mut self, gateway: &str, reason: String) -> Next {
        self.audit_token(
            self.record(Event::Call, Decision::Deny)
                .tool(gateway)
                .reason(&reason),
        );
        self.send(&Response::Denied(keyward_proto::Denial { reason }))
            .await
    }
}

fn elapsed_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}
