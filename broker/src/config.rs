// SPDX-License-Identifier: Apache-2.0
//! The broker's configuration file, as written by the admin.
//!
//! This module only parses: it turns TOML into these plain structs and
//! rejects unknown keys with the line they are on. Everything that needs
//! judgement (does this regex compile, does this template name a declared
//! parameter, does this principal name a real tool) happens when
//! [`crate::policy::Policy::compile`] turns a [`Config`] into a policy, and
//! reports through [`ConfigError`] with the location of the offending entry.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// The example configuration embedded in the binary, used by
/// `keyward-broker serve --example` (see README).
pub const EXAMPLE: &str = include_str!("../../examples/broker.toml");

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub broker: BrokerConfig,
    #[serde(default, rename = "principal")]
    pub principals: Vec<Spanned<PrincipalConfig>>,
    #[serde(default, rename = "credential")]
    pub credentials: BTreeMap<String, Spanned<CredentialConfig>>,
    #[serde(default, rename = "tool")]
    pub tools: Vec<Spanned<ToolConfig>>,
    #[serde(default, rename = "gateway")]
    pub gateways: Vec<Spanned<GatewayConfig>>,
}

/// `[[gateway]]`: an HTTP API that sandboxed programs reach through
/// `agent-shim run --gateway NAME` (see [`crate::gateway`]). Granted to
/// principals and tokens by name, like a tool.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    pub name: String,
    pub description: Option<String>,
    /// Base URL of the API: `https://api.openai.com` (a path here is a
    /// prefix of every request path).
    pub upstream: String,
    /// Name of a `[credential.NAME]` entry.
    pub credential: Option<String>,
    /// How the credential is sent, as for an http tool (`{ bearer = true }`,
    /// `{ header = "x-api-key" }`, `{ basic = "USER" }`); parsed by
    /// [`crate::gateway`].
    pub auth: Option<toml::Value>,
    /// The requests allowed: exact method and path.
    #[serde(default)]
    pub allow: Vec<GatewayAllowConfig>,
    /// Largest request body.
    pub max_request_bytes: Option<usize>,
    /// Largest response body (it streams; this bounds the whole).
    pub max_response_bytes: Option<u64>,
    /// Longest wait for the response head.
    #[serde(default, with = "duration_opt")]
    pub timeout: Option<Duration>,
    /// Longest wait for the next bytes of a streaming response.
    #[serde(default, with = "duration_opt")]
    pub idle_timeout: Option<Duration>,
    /// Variables the sandboxed program finds set to the local endpoint
    /// (`OPENAI_BASE_URL`), followed by `base_path`.
    #[serde(default)]
    pub base_url_env: Vec<String>,
    /// Appended to the local endpoint's URL in `base_url_env` (`/v1`).
    #[serde(default)]
    pub base_path: String,
    /// Variables the program finds set to a placeholder that is not a
    /// secret (`OPENAI_API_KEY`).
    #[serde(default)]
    pub api_key_env: Vec<String>,
}

/// One `allow` entry of a `[[gateway]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayAllowConfig {
    pub method: String,
    /// The exact path (`/v1/chat/completions`).
    pub path: String,
    /// Whether a query string may follow the path.
    #[serde(default)]
    pub query: bool,
}

/// `[broker]`: daemon-wide settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Path of the listening socket when the broker binds it itself.
    pub socket: PathBuf,
    /// Octal file mode of the socket, e.g. `"0660"`.
    #[serde(default = "default_socket_mode")]
    pub socket_mode: String,
    /// Group that owns the socket (name or number).
    pub socket_group: Option<String>,
    /// Directory of credential files when `$CREDENTIALS_DIRECTORY` is unset.
    pub credentials_dir: Option<PathBuf>,
    /// Directory for persistent state (signing key, revocations).
    pub state_dir: Option<PathBuf>,
    /// Longest lifetime a minted token may have.
    #[serde(default, with = "duration_opt")]
    pub max_token_ttl: Option<Duration>,
    /// Default upstream timeout of a tool call.
    #[serde(default, with = "duration_opt")]
    pub call_timeout: Option<Duration>,
    /// Default cap on an upstream response body, in bytes.
    pub max_response_bytes: Option<usize>,
    /// Sessions one uid may hold open at once: its connections and every
    /// channel passed over them.
    pub max_connections_per_uid: Option<usize>,
    /// Uids (besides root) allowed to revoke any token.
    #[serde(default)]
    pub admin_uids: Vec<u32>,
    /// Name of a `[credential.NAME]` holding the token-signing key (32 raw
    /// bytes or their base64); without it the key is generated into the
    /// state directory.
    pub signing_key: Option<String>,

    // -- admission and rate limits (see `crate::limits`) --
    /// Sessions (connections and channels) the broker serves at once, all
    /// uids together; by default as many as its descriptor limit allows.
    pub max_sessions: Option<usize>,
    /// Of `max_sessions`, how many only root's and `admin_uids`' own
    /// (unbound) connections may take.
    pub reserved_sessions: Option<usize>,
    /// Sessions (bound connections and channels) open at once with one
    /// token.
    pub max_sessions_per_token: Option<usize>,
    /// Requests per second one uid may make, sustained, channels opened
    /// included (root's and `admin_uids`' own connections are not limited,
    /// their token-bound ones are).
    pub requests_per_second: Option<u32>,
    /// Requests one uid may make in a burst above that rate.
    pub request_burst: Option<u32>,

    // -- token state (broker/src/state) --
    /// Live tokens one uid may have minted or attenuated at once.
    pub max_live_tokens_per_uid: Option<u32>,
    /// Live attenuated tokens one uid may have made at once.
    pub max_attenuations_per_uid: Option<u32>,
}

fn default_socket_mode() -> String {
    "0660".to_owned()
}

/// `[[principal]]`: who may do what, matched on kernel-supplied identity.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalConfig {
    pub name: String,
    /// Users, by number or name (names resolved at load and reload).
    #[serde(default)]
    pub uids: Vec<IdRef>,
    /// Groups, by number or name: a caller matches if the group is its
    /// primary one or one of its supplementary groups.
    #[serde(default)]
    pub gids: Vec<IdRef>,
    /// Tools this principal may call directly.
    #[serde(default)]
    pub may_call: Vec<String>,
    /// Tools this principal may delegate through tokens.
    #[serde(default)]
    pub may_delegate: Vec<String>,
}

/// A user or group as the admin wrote it: `1000` or `"alice"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum IdRef {
    Id(u32),
    Name(String),
}

impl From<u32> for IdRef {
    fn from(id: u32) -> IdRef {
        IdRef::Id(id)
    }
}

/// `kind` of an AWS key credential ([`crate::credential::aws`]).
pub const AWS_KIND: &str = "aws";
/// `kind` of an OAuth 2.0 credential ([`crate::credential::oauth`]).
pub const OAUTH2_KIND: &str = "oauth2";

/// `[credential.NAME]`: where a secret comes from. Without `kind`, a
/// static secret read from `file`; with one, the rest of the entry belongs
/// to that kind (`kind = "oauth2"`: [`crate::credential::oauth`]), checked
/// when the policy is compiled.
#[derive(Debug, Deserialize)]
pub struct CredentialConfig {
    /// What the credential is: a static secret read from `file` without
    /// one; `"aws"` an AWS access key ([`crate::credential::aws`]);
    /// `"oauth2"` ([`crate::credential::oauth`], its keys in `fields`).
    pub kind: Option<String>,
    /// File name relative to the credentials directory (static secrets).
    pub file: Option<PathBuf>,
    // -- kind = "aws" (crate::credential::aws) --
    /// The access key id (`AKIA...`): not secret, it names the key.
    pub access_key_id: Option<String>,
    /// File of the secret access key, relative to the credentials directory.
    pub secret_access_key_file: Option<PathBuf>,
    /// STS endpoint override (`http://127.0.0.1:5000`, a VPC endpoint);
    /// also passed to `--derive` programs as `AWS_ENDPOINT_URL`.
    pub endpoint: Option<String>,
    /// Region of STS and of derived credentials (default `us-east-1`).
    pub region: Option<String>,
    /// Every other field, for the credential's kind.
    #[serde(flatten)]
    pub fields: toml::Table,
}

impl CredentialConfig {
    /// The file holding a fixed secret (static and aws kinds); `None` for
    /// kinds whose files belong to the kind ([`Self::secret_files`]).
    pub fn secret_file(&self) -> Option<&Path> {
        match self.kind.as_deref() {
            Some(AWS_KIND) => self.secret_access_key_file.as_deref(),
            _ => self.file.as_deref(),
        }
    }

    /// Every file this credential is read from, in the credentials
    /// directory (what `LoadCredential=` must provide).
    pub fn secret_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self
            .secret_file()
            .map(Path::to_path_buf)
            .into_iter()
            .collect();
        if self.kind.as_deref() == Some(OAUTH2_KIND) {
            for key in ["client_secret_file", "refresh_token_file"] {
                if let Some(toml::Value::String(file)) = self.fields.get(key) {
                    files.push(PathBuf::from(file));
                }
            }
        }
        files
    }

    /// The aws-only keys that are set (refused on other kinds).
    pub fn aws_fields_set(&self) -> Vec<&'static str> {
        [
            (self.access_key_id.is_some(), "access_key_id"),
            (
                self.secret_access_key_file.is_some(),
                "secret_access_key_file",
            ),
            (self.endpoint.is_some(), "endpoint"),
            (self.region.is_some(), "region"),
        ]
        .into_iter()
        .filter_map(|(set, field)| set.then_some(field))
        .collect()
    }
}

/// `[[tool]]`: one action the broker performs. The fields every kind has
/// are here; the rest of the entry belongs to its kind (`kind = "http"`,
/// `"exec"`, ...), which parses and checks it when the policy is compiled
/// ([`crate::tool::KINDS`]): an unknown kind or a field the kind does not
/// have is an error located on its line.
#[derive(Debug, Deserialize)]
pub struct ToolConfig {
    pub name: String,
    pub kind: String,
    pub description: Option<String>,
    /// Name of a `[credential.NAME]` entry.
    pub credential: Option<String>,
    /// The tool's upstream is meant to be plain `http://` although it
    /// carries a credential: for loopback test upstreams only. Without it
    /// `check` and the broker's start warn about such a tool.
    #[serde(default)]
    pub insecure_http: bool,
    #[serde(default)]
    pub params: BTreeMap<String, ParamConfig>,
    /// Every other field, for the tool's kind.
    #[serde(flatten)]
    pub fields: toml::Table,
}

/// The type of a parameter.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    String,
    Int,
    Bool,
    /// A string that is a relative path of one or more segments joined by
    /// `/`; placed in a URL path, its `/`s stay separators. (A `string`
    /// placed in a URL path is exactly one segment.)
    Path,
}

/// `params.NAME = { type = ..., <validators> }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamConfig {
    #[serde(rename = "type")]
    pub ty: ParamType,
    /// Regex the whole string must match (anchored by the compiler).
    pub pattern: Option<String>,
    /// Longest string, in bytes.
    pub max_len: Option<usize>,
    /// The value must be one of these (strings or ints).
    pub one_of: Option<Vec<toml::Value>>,
    /// Smallest int.
    pub min: Option<i64>,
    /// Largest int.
    pub max: Option<i64>,
    /// The string must start with this.
    pub prefix: Option<String>,
    /// Value used when the caller omits the parameter; without it the
    /// parameter is required.
    pub default: Option<toml::Value>,
    /// Never show the value in denials or audit records.
    #[serde(default)]
    pub secret: bool,
}

/// A configuration error with where it is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A semantic error found by the policy compiler.
    #[error("{}", .0)]
    Invalid(Located),
}

/// One semantic error: file, line, the entry it belongs to, and what is
/// wrong, e.g. `broker.toml:14: tool "send_email": params.to.pattern: ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub file: String,
    pub line: Option<usize>,
    pub entry: String,
    pub message: String,
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(
                f,
                "{}:{}: {}: {}",
                self.file, line, self.entry, self.message
            ),
            None => write!(f, "{}: {}: {}", self.file, self.entry, self.message),
        }
    }
}

/// The parsed file together with its name and text, so that errors can
/// be located.
#[derive(Debug)]
pub struct Source {
    pub name: String,
    pub text: String,
    pub config: Config,
}

impl Source {
    /// Read and parse a configuration file.
    pub fn load(path: &Path) -> Result<Source, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Source::parse(&path.display().to_string(), text)
    }

    /// Parse configuration text; `name` is used in error messages.
    pub fn parse(name: &str, text: String) -> Result<Source, ConfigError> {
        let config = toml::from_str(&text).map_err(|e: toml::de::Error| ConfigError::Parse {
            path: PathBuf::from(name),
            message: e.to_string(),
        })?;
        Ok(Source {
            name: name.to_owned(),
            text,
            config,
        })
    }

    /// 1-based line of a byte offset into the text.
    pub fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    /// Build a located error for the entry spanning `span`.
    pub fn error_at(
        &self,
        span: std::ops::Range<usize>,
        entry: impl Into<String>,
        message: impl Into<String>,
    ) -> Located {
        Located {
            file: self.name.clone(),
            line: Some(self.line_of(span.start)),
            entry: entry.into(),
            message: message.into(),
        }
    }
}

/// `"15m"`, `"30s"`, `"1h 30m"` (humantime) as an optional duration.
/// `Option<Duration>` from text such as `"30s"` (for `#[serde(with)]`);
/// tool kinds use it for their own fields.
pub mod duration_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| humantime::parse_duration(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_parses() {
        let src = Source::parse("example.toml", EXAMPLE.to_owned()).unwrap();
        assert!(!src.config.tools.is_empty());
    }

    #[test]
    fn unknown_key_is_located() {
        let text = "[broker]\nsocket = \"/tmp/s\"\nsockett = 1\n".to_owned();
        let err = Source::parse("b.toml", text).unwrap_err().to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("sockett"), "{err}");
    }

    #[test]
    fn bad_duration_is_located() {
        let text = "[broker]\nsocket = \"/tmp/s\"\nmax_token_ttl = \"soon\"\n".to_owned();
        let err = Source::parse("b.toml", text).unwrap_err().to_string();
        assert!(err.contains("line 3"), "{err}");
    }
}
