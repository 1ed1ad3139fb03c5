// SPDX-License-Identifier: Apache-2.0
//! `agent-shim run --derive TOOL NAME=VALUE...`: before the program
//! starts, call an `aws_sts` tool over the bound connection and put the
//! short-lived credentials it returns in the program's environment only
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
//! `AWS_REGION` and `AWS_DEFAULT_REGION`, and `AWS_ENDPOINT_URL` when the
//! credential has an endpoint). Nothing of them is printed or put in argv;
//! they replace any `--keep-env` variable of the same name.

use std::ffi::CString;

use crate::client::Client;
use keyward_proto::Response;
use serde::Deserialize;
use zeroize::{Zeroize, Zeroizing};

use super::SandboxError;

/// What `--derive` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derive {
    pub tool: String,
    pub params: Vec<(String, String)>,
}

/// The variables a derivation sets (and removes from the rest).
pub const DERIVED_VARS: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    // Would point the program at another identity than the derived one.
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
];

/// The `aws_sts` result (`credential_process` format plus region and
/// endpoint). `Debug` is not derived: it holds the derived secret.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DerivedCredentials {
    access_key_id: String,
    secret_access_key: String,
    session_token: String,
    region: Option<String>,
    endpoint_url: Option<String>,
}

impl Drop for DerivedCredentials {
    fn drop(&mut self) {
        self.secret_access_key.zeroize();
        self.session_token.zeroize();
    }
}

/// Call the tool over `client` (bound) and return the variables to add.
pub(super) fn fetch(client: &mut Client, derive: &Derive) -> Result<Vec<CString>, SandboxError> {
    let failed = |why: String| SandboxError::DeriveFailed(derive.tool.clone(), why);
    let reply = client
        .call(&derive.tool, &derive.params)
        .map_err(|e| failed(e.to_string()))?;
    let body = match reply {
        Response::Done(result) if (200..300).contains(&result.status) => {
            Zeroizing::new(result.body)
        }
        Response::Done(result) => return Err(failed(format!("status {}", result.status))),
        Response::Denied(denial) => {
            return Err(SandboxError::DeriveDenied(
                derive.tool.clone(),
                denial.reason,
            ))
        }
        Response::Error(e) => return Err(failed(e.message)),
        _ => return Err(failed("unexpected reply".to_owned())),
    };
    let derived: DerivedCredentials = serde_json::from_slice(&body).map_err(|_| {
        failed("the result is not AWS credentials (is it a kind = \"aws_sts\" tool?)".to_owned())
    })?;
    let mut vars = vec![
        ("AWS_ACCESS_KEY_ID", derived.access_key_id.as_str()),
        ("AWS_SECRET_ACCESS_KEY", derived.secret_access_key.as_str()),
        ("AWS_SESSION_TOKEN", derived.session_token.as_str()),
    ];
    if let Some(region) = derived.region.as_deref() {
        vars.push(("AWS_REGION", region));
        vars.push(("AWS_DEFAULT_REGION", region));
    }
    if let Some(endpoint) = derived.endpoint_url.as_deref() {
        vars.push(("AWS_ENDPOINT_URL", endpoint));
    }
    vars.into_iter()
        .map(|(name, value)| {
            CString::new(format!("{name}={value}"))
                .map_err(|_| failed(format!("{name} contains a NUL byte")))
        })
        .collect()
}

/// Replace `env`'s derived variables by `derived`.
pub(super) fn apply(env: &mut Vec<CString>, derived: Vec<CString>) {
    env.retain(|kv| {
        let bytes = kv.as_bytes();
        !DERIVED_VARS
            .iter()
            .any(|name| bytes.starts_with(name.as_bytes()) && bytes.get(name.len()) == Some(&b'='))
    });
    env.extend(derived);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn derived_variables_replace_kept_ones() {
        let mut env = vec![
            CString::new("PATH=/bin").unwrap(),
            CString::new("AWS_PROFILE=admin").unwrap(),
            CString::new("AWS_ACCESS_KEY_ID=AKIAHOST").unwrap(),
            CString::new("AWS_ACCESS_KEY_ID_X=kept").unwrap(),
        ];
        apply(
            &mut env,
            vec![CString::new("AWS_ACCESS_KEY_ID=ASIA").unwrap()],
        );
        let env: Vec<&str> = env.iter().map(|c| c.to_str().unwrap()).collect();
        assert_eq!(
            env,
            [
                "PATH=/bin",
                "AWS_ACCESS_KEY_ID_X=kept",
                "AWS_ACCESS_KEY_ID=ASIA"
            ]
        );
    }
}
