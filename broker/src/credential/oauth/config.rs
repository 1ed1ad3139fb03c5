// SPDX-License-Identifier: Apache-2.0
//! The configuration of a `kind = "oauth2"` credential, and its checks
//! (run by the policy compiler, so `keyward-broker check` reports them
//! with their line).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::KIND;
use crate::config::CredentialConfig;

/// The fields `kind = "oauth2"` adds to a `[credential.NAME]` entry.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Config {
    pub token_url: Option<String>,
    pub client_id: Option<String>,
    /// File (in the credentials directory) holding the client secret.
    pub client_secret_file: Option<PathBuf>,
    /// File (in the credentials directory) holding the refresh token the
    /// admin obtained by authorizing the client.
    pub refresh_token_file: Option<PathBuf>,
    #[serde(default)]
    pub grant: Grant,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// How the client authenticates to the token endpoint.
    #[serde(default)]
    pub client_auth: ClientAuth,
}

/// How the broker obtains access tokens.
#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    #[default]
    RefreshToken,
    ClientCredentials,
}

/// Client authentication at the token endpoint (RFC 6749 section 2.3.1).
#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// `client_secret_basic`: HTTP Basic with the form-encoded id and secret.
    #[default]
    Basic,
    /// `client_secret_post`: `client_id` and `client_secret` in the body.
    Post,
}

/// Parse the kind's fields of an entry.
pub(super) fn parse_config(config: &CredentialConfig) -> Result<OAuth2Config, String> {
    toml::Value::Table(config.fields.clone())
        .try_into()
        .map_err(|e: toml::de::Error| {
            let message = e.message().trim().to_owned();
            match message
                .strip_prefix("unknown field `")
                .and_then(|rest| rest.split_once('`'))
            {
                Some((field, _)) => format!("{field}: not allowed for kind {KIND:?}"),
                None => message,
            }
        })
}

fn is_plain_file(file: &Path) -> bool {
    match file.to_str() {
        Some(f) => !f.is_empty() && !f.contains(['/', '\0']) && f != "." && f != "..",
        None => false,
    }
}

/// Check a `kind = "oauth2"` entry; each message starts with the field it
/// is about.
pub fn check_config(name: &str, config: &CredentialConfig) -> Vec<String> {
    let mut errors = Vec::new();
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        errors.push(format!(
            "the name of an {KIND} credential may only use letters, digits, `_` and `-` (it names its state file)"
        ));
    }
    if config.file.is_some() {
        errors.push(format!(
            "file: not used by kind {KIND:?}; name the files with refresh_token_file and client_secret_file"
        ));
    }
    let oauth = match parse_config(config) {
        Ok(oauth) => oauth,
        Err(message) => {
            errors.push(message);
            return errors;
        }
    };
    match oauth.token_url.as_deref() {
        None => errors.push("token_url: is required".to_owned()),
        Some(url) => match reqwest::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "https" | "http") && u.host().is_some() => {}
            _ => errors.push(format!("token_url: {url:?} is not an http(s) URL")),
        },
    }
    match oauth.client_id.as_deref() {
        None => errors.push("client_id: is required".to_owned()),
        Some(id) if id.is_empty() || id.chars().any(char::is_control) => {
            errors.push("client_id: must be non-empty, without control characters".to_owned())
        }
        Some(_) => {}
    }
    for (field, file) in [
        ("client_secret_file", &oauth.client_secret_file),
        ("refresh_token_file", &oauth.refresh_token_file),
    ] {
        if let Some(file) = file {
            if !is_plain_file(file) {
                errors.push(format!(
                    "{field}: {file:?} must be a plain file name (no \"/\", not \".\" or \"..\") \
                     relative to the credentials directory"
                ));
            }
        }
    }
    match oauth.grant {
        Grant::RefreshToken if oauth.refresh_token_file.is_none() => {
            errors.push("refresh_token_file: is required for grant = \"refresh_token\"".to_owned())
        }
        Grant::ClientCredentials if oauth.refresh_token_file.is_some() => errors
            .push("refresh_token_file: not used with grant = \"client_credentials\"".to_owned()),
        Grant::ClientCredentials if oauth.client_secret_file.is_none() => errors
            .push("client_secret_file: is required for grant = \"client_credentials\"".to_owned()),
        _ => {}
    }
    for scope in &oauth.scopes {
        if scope.is_empty() || scope.chars().any(|c| c == ' ' || c.is_control()) {
            errors.push(format!("scopes: {scope:?} is not a scope (no spaces)"));
        }
    }
    errors
}
