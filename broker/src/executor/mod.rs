// SPDX-License-Identifier: Apache-2.0
//! The executor performs an [`AuthorizedCall`] through its tool's kind
//! ([`crate::tool`]), after refusing any parameter that carries credential
//! material. Kinds are the only code that touches a credential's value;
//! whatever they return has been redacted and judged for leaks.

use keyward_proto::CallResult;

use crate::credential::Credentials;
use crate::leak::Leak;
use crate::policy::{AuthorizedCall, TypedValue};
use crate::tool::{CallerScope, Context, Invocation};

pub use crate::tool::ExecError;

/// Performs calls. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Executor {
    credentials: Credentials,
}

impl Executor {
    pub fn new(credentials: Credentials) -> Result<Executor, ExecError> {
        // A client that cannot be built fails the start, not a call.
        crate::tool::http::client()?;
        Ok(Executor { credentials })
    }

    /// The credentials loaded at start: which names and Basic-auth pairs
    /// exist (a reloaded policy may only use those). Values stay inside.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// Perform an authorized call. A parameter that carries credential
    /// material is refused first: a caller who learned a secret must not
    /// get it sent upstream (to be reflected back, or smuggled out).
    pub async fn execute(&self, call: &AuthorizedCall) -> Result<CallResult, ExecError> {
        self.execute_for(call, None).await
    }

    /// [`Executor::execute`], for a call made through a bound token:
    /// `(id hex, expiry)`, which kinds whose result outlives the call use.
    pub async fn execute_for(
        &self,
        call: &AuthorizedCall,
        token: Option<(&str, u64)>,
    ) -> Result<CallResult, ExecError> {
        self.refuse_credential_material(call)?;
        let invocation = Invocation {
            tool: &call.tool.name,
            params: &call.params,
        };
        let context = Context {
            credentials: &self.credentials,
            caller: CallerScope {
                principal: &call.principal,
                token_id: token.map(|(id, _)| id),
                token_expires: token.map(|(_, expires)| expires),
            },
        };
        call.tool
            .action
            .run(invocation, context)
            .await
            .map_err(|e| self.judge_error(e))
    }

    /// Every error a kind returns reaches the caller and the audit as
    /// text, and much of it is shaped by the upstream or the program (a
    /// token endpoint's error code, an STS message, a database's
    /// diagnostic, a transport error). Redaction (done by the kinds) only
    /// knows whole values in a few encodings; the leak scanner judges the
    /// text like a body, and an error that carries credential material
    /// (or cannot be checked) becomes [`ExecError::Withheld`]. This is the
    /// one place every kind's error passes, so no kind can forget it.
    fn judge_error(&self, error: ExecError) -> ExecError {
        if matches!(error, ExecError::Withheld(_)) {
            return error;
        }
        let text = zeroize::Zeroizing::new(error.to_string());
        let judged = crate::tool::off_reactor(|| self.credentials.scanner().check_message(&text));
        match judged {
            Ok(()) => error,
            Err(leak) => ExecError::Withheld(leak),
        }
    }

    fn refuse_credential_material(&self, call: &AuthorizedCall) -> Result<(), ExecError> {
        let scanner = self.credentials.scanner();
        for (name, value) in &call.params {
            let int;
            let bytes = match value {
                TypedValue::Str(s) => s.as_bytes(),
                TypedValue::Int(i) => {
                    int = i.to_string();
                    int.as_bytes()
                }
                TypedValue::Bool(_) => continue,
            };
            if let Err(leak) = scanner.check(bytes) {
                let why = match leak {
                    Leak::Found { .. } => "carries credential material",
                    Leak::Bomb { .. } | Leak::TooDeep { .. } | Leak::TooMany { .. } => {
                        "is encoded too deeply to be checked for credential material"
                    }
                };
                return Err(ExecError::Rejected(format!(
                    "parameter \"{name}\" of tool {} {why}",
                    call.tool.name
                )));
            }
        }
        Ok(())
    }
}
