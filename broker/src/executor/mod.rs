// SPDX-License-Identifier: Apache-2.0
//! Executors perform an [`AuthorizedCall`]: the only code that touches a
//! credential's value. Whatever they return has been redacted.

pub mod echo;
pub mod http;

use keyward_proto::CallResult;

use crate::credential::Credentials;
use crate::policy::{Action, AuthorizedCall};

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

    /// Perform an authorized call.
    pub async fn execute(&self, call: &AuthorizedCall) -> Result<CallResult, ExecError> {
        match &call.tool.action {
            Action::Echo => Ok(echo::execute(call)),
            Action::Http(tool) => self.http.execute(tool, call, &self.credentials).await,
        }
    }
}
