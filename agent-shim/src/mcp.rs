// SPDX-License-Identifier: Apache-2.0
//! `agent-shim mcp`: the broker's tools as a Model Context Protocol server
//! over stdio, on the `rmcp` SDK (current revision, negotiating down to
//! every revision the SDK knows).
//!
//! `tools/list` asks the broker what this connection may call, every time
//! (a revoked token or a reloaded policy shows at once), with input
//! schemas from [`crate::schema`]; gateways the connection may use are not
//! tools and are left out. `tools/call` sends the arguments as
//! typed values (numbers stay numbers, so the broker's type checks judge
//! what the model sent) and returns the body as text, a JSON object body
//! also as structured content; a denial or an upstream status of 400 or
//! more is an `isError` result whose text is the reason or the body.
//!
//! Threat model: the shim holds no credential; the broker decides every
//! call. The MCP peer is the host agent and may send anything: arguments
//! that are not strings, integers or booleans are refused here with the
//! reason, everything else is the broker's to judge.

use std::sync::{Arc, Mutex};

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler, ServiceExt as _};

use keyward_proto::{CallResult, Param, Request, Response, ToolInfo, Value};

use crate::client::{Client, ClientError};
use crate::schema::{callable, input_schema};

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum McpServeError {
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("the MCP session failed: {0}")]
    Session(String),
}

/// Serve MCP on stdin/stdout over `client` (already bound, or a channel of
/// a bound session, or a principal's connection) until stdin closes.
pub fn serve_stdio(client: Client) -> Result<(), McpServeError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(McpServeError::Runtime)?;
    let server = Server {
        client: Arc::new(Mutex::new(client)),
    };
    runtime.block_on(async move {
        let running = server
            .serve(rmcp::transport::stdio())
            .await
            .map_err(|e| McpServeError::Session(e.to_string()))?;
        running
            .waiting()
            .await
            .map_err(|e| McpServeError::Session(e.to_string()))?;
        Ok(())
    })
}

/// The MCP handler: one broker connection, used by one request at a time.
#[derive(Debug, Clone)]
struct Server {
    client: Arc<Mutex<Client>>,
}

impl Server {
    /// Send `request` to the broker off the async thread.
    async fn exchange(&self, request: Request) -> Result<Response, McpError> {
        let client = Arc::clone(&self.client);
        let reply = tokio::task::spawn_blocking(move || -> Result<Response, ClientError> {
            let mut client = client
                .lock()
                .map_err(|_| ClientError::Handshake("the broker connection is poisoned".into()))?;
            client.request(&request)
        })
        .await
        .map_err(|e| McpError::internal_error(format!("the broker call failed: {e}"), None))?;
        reply.map_err(|e| McpError::internal_error(format!("cannot reach the broker: {e}"), None))
    }

    async fn tools(&self) -> Result<Vec<ToolInfo>, McpError> {
        match self.exchange(Request::Tools).await? {
            Response::ToolList(list) => Ok(list.tools),
            other => Err(McpError::internal_error(failure_text(&other), None)),
        }
    }
}

impl ServerHandler for Server {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("agent-shim", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "keyward's brokered tools: the broker holds the credentials and \
                 performs each call within the policy and the token.",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let tools = self.tools().await?;
        Ok(ListToolsResult::with_all_items(
            callable(&tools).map(mcp_tool).collect(),
        ))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let tool = request.name.into_owned();
        let params = match typed_params(&tool, request.arguments.unwrap_or_default()) {
            Ok(params) => params,
            Err(reason) => return Ok(error_result(reason).into()),
        };
        let reply = self
            .exchange(Request::Call(keyward_proto::Call { tool, params }))
            .await?;
        Ok(match reply {
            Response::Done(result) => call_result(&result),
            other => error_result(failure_text(&other)),
        }
        .into())
    }
}

fn mcp_tool(tool: &ToolInfo) -> Tool {
    let description = (!tool.description.is_empty()).then(|| tool.description.clone().into());
    Tool::new_with_raw(tool.name.clone(), description, input_schema(tool))
}

/// The arguments as typed wire values; anything but a string, an integer
/// or a boolean is refused, naming the parameter.
pub fn typed_params(
    tool: &str,
    arguments: serde_json::Map<String, serde_json::Value>,
) -> Result<Vec<Param>, String> {
    arguments
        .into_iter()
        .map(|(name, value)| {
            let value = match value {
                serde_json::Value::String(s) => Value::Str(s),
                serde_json::Value::Bool(b) => Value::Bool(b),
                serde_json::Value::Number(n) => match n.as_i64() {
                    Some(i) => Value::Int(i),
                    None => {
                        return Err(format!(
                            "parameter {name:?} of tool {tool} is denied because {n} is not a 64-bit integer"
                        ))
                    }
                },
                other => {
                    return Err(format!(
                        "parameter {name:?} of tool {tool} is denied because a {} is not a string, integer or boolean",
                        json_kind(&other)
                    ))
                }
            };
            Ok(Param { name, value })
        })
        .collect()
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

fn error_result(text: String) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(text)])
}

/// The body as text (a JSON object body also as structured content); an
/// upstream status of 400 or more makes it an error result.
fn call_result(result: &CallResult) -> CallToolResult {
    let text = match std::str::from_utf8(&result.body) {
        Ok(text) => text.to_owned(),
        Err(_) => {
            use base64::Engine as _;
            format!(
                "(binary body of {} bytes, base64) {}",
                result.body.len(),
                base64::engine::general_purpose::STANDARD.encode(&result.body)
            )
        }
    };
    let structured = serde_json::from_slice::<serde_json::Value>(&result.body)
        .ok()
        .filter(serde_json::Value::is_object);
    let content = vec![ContentBlock::text(text)];
    let mut out = if result.status >= 400 {
        CallToolResult::error(content)
    } else {
        CallToolResult::success(content)
    };
    out.structured_content = structured;
    out
}

/// A reply that is not the hoped-for one, in one sentence.
fn failure_text(reply: &Response) -> String {
    match reply {
        Response::Denied(denial) => denial.reason.clone(),
        Response::Error(e) => format!(
            "the broker could not serve the call ({:?}): {}",
            e.code, e.message
        ),
        other => format!("unexpected reply from the broker: {other:?}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn arguments_keep_their_types() {
        let args = serde_json::json!({ "n": 2, "s": "2", "b": true });
        let params = typed_params("t", args.as_object().unwrap().clone()).unwrap();
        let value = |name: &str| &params.iter().find(|p| p.name == name).unwrap().value;
        assert_eq!(value("n"), &Value::Int(2));
        assert_eq!(value("s"), &Value::Str("2".into()));
        assert_eq!(value("b"), &Value::Bool(true));
    }

    #[test]
    fn other_json_is_refused_naming_the_parameter() {
        for bad in [
            serde_json::json!({ "x": 1.5 }),
            serde_json::json!({ "x": null }),
            serde_json::json!({ "x": [1] }),
            serde_json::json!({ "x": u64::MAX }),
        ] {
            let err = typed_params("t", bad.as_object().unwrap().clone()).unwrap_err();
            assert!(err.contains("\"x\"") && err.contains("tool t"), "{err}");
        }
    }
}
