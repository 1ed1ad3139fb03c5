// SPDX-License-Identifier: Apache-2.0
//! The `http` executor.

use keyward_proto::CallResult;

use super::ExecError;
use crate::config::ToolConfig;
use crate::credential::Credentials;
use crate::policy::{AuthorizedCall, BrokerSettings, ParamSpec};
use std::collections::BTreeMap;

/// A compiled `kind = "http"` tool.
#[derive(Debug)]
pub struct HttpTool {}

impl HttpTool {
    /// Compile the http fields of a tool. Errors are messages relative to
    /// the tool (e.g. `url: placeholder {x} names no parameter`).
    pub fn compile(
        _tool: &ToolConfig,
        _params: &BTreeMap<String, ParamSpec>,
        _settings: &BrokerSettings,
    ) -> Result<HttpTool, Vec<String>> {
        todo!()
    }
}

/// Shared HTTP client.
#[derive(Debug)]
pub struct HttpExecutor {}

impl HttpExecutor {
    pub fn new() -> Result<HttpExecutor, ExecError> {
        todo!()
    }

    pub async fn execute(
        &self,
        _tool: &HttpTool,
        _call: &AuthorizedCall,
        _credentials: &Credentials,
    ) -> Result<CallResult, ExecError> {
        todo!()
    }
}
