// SPDX-License-Identifier: Apache-2.0
//! Executors perform an [`AuthorizedCall`]: the only code that touches a
//! credential's value. Whatever they return has been redacted.

pub mod echo;
pub mod http;
pub mod sql;

use keyward_proto::CallResult;

use crate::credential::Credentials;
use crate::leak::Leak;
use crate::policy::{Action, AuthorizedCall, TypedValue};

/// Why a call that policy allowed still failed. Messages are already
/// redacted and safe to return to the caller.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// A parameter value is not acceptable where the template places it
    /// (e.g. a header value with a newline, a `..` path segment). This is a
    /// denial, reported to the caller as such.
    #[error("{0}")]
    Rejected(String),
    #[error("upstream request failed: {0}")]
    Upstream(String),
    /// The response carries credential material (or cannot be checked
    /// for it): nothing of it is returned.
    #[error("withheld: {0}")]
    Withheld(crate::leak::Leak),
    #[error("upstream did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("upstream response exceeds the {0}-byte limit")]
    TooLarge(usize),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    /// The broker itself is at fault (e.g. a credential the policy names
    /// was not loaded), not the upstream or the caller.
    #[error("internal broker error: {0}")]
    Internal(String),
}

/// Performs calls. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Executor {
    http: http::HttpExecutor,
    credentials: Credentials,
}

impl Executor {
    pub fn new(credentials: Credentials) -> Result<Executor, ExecError> {
        Ok(Executor {
            http: http::HttpExecutor::new()?,
            credentials,
        })
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
        self.refuse_credential_material(call)?;
        match &call.tool.action {
            Action::Echo => Ok(echo::execute(call)),
            Action::Http(tool) => self.http.execute(tool, call, &self.credentials).await,
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
                    Leak::Bomb { .. } | Leak::TooDeep { .. } => {
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
