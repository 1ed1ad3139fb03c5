// SPDX-License-Identifier: Apache-2.0
//! The built-in `echo` tool: returns its parameters as a JSON object. No
//! network and no credential; it exists to check wiring and to benchmark the
//! broker's own overhead.

use keyward_proto::CallResult;

use crate::policy::AuthorizedCall;

pub fn execute(call: &AuthorizedCall) -> CallResult {
    let body: serde_json::Map<String, serde_json::Value> = call
        .params
        .iter()
        .map(|(name, value)| (name.clone(), value.to_json()))
        .collect();
    CallResult {
        status: 200,
        headers: Vec::new(),
        body: serde_json::Value::Object(body).to_string().into_bytes(),
    }
}
