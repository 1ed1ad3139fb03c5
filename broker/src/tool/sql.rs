// SPDX-License-Identifier: Apache-2.0
//! The `sql` kind: one statement the admin wrote, run on PostgreSQL with
//! the caller's parameters only ever as bind values.
//!
//! - The password is the tool's credential, set on the connection
//!   configuration after parsing; a `database` URL that carries one (in
//!   the user part or as `password=`) is refused at config check.
//! - `sslmode=verify-full` connects over TLS verified against the system
//!   roots (rustls, the stack reqwest already uses); `disable` (or no
//!   `sslmode`) connects in the clear — meant for loopback and Unix
//!   sockets. Modes that would not verify the server (`prefer`, `require`,
//!   `verify-ca`, `allow`) are refused.
//! - The statement is prepared; the server says what type each `$n` takes
//!   and the tool's parameter named by `binds[n-1]` must fit it exactly
//!   (an `int` for `integer` within range, a `string` for `text`...).
//!   A value is never SQL text, so `1 OR 1=1` is at worst a string.
//! - Every call runs in its own transaction, `READ ONLY` unless the tool
//!   says `read_only = false`, with `SET LOCAL statement_timeout`; the
//!   client also gives up at the timeout (plus a grace second), sends the
//!   server a cancel request and discards the connection.
//! - At most `max_rows` rows are fetched (a portal asked for
//!   `max_rows + 1`); when there were more, the reply says
//!   `"truncated": true`. Rows are JSON objects, column name → value.
//! - Error messages reach the caller redacted and never name the
//!   connection string; the reply is judged by the leak scanner exactly
//!   like an HTTP response.

use std::collections::BTreeMap;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use keyward_proto::{CallResult, Header};
use serde::Deserialize;
use tokio_postgres::types::{FromSql, ToSql, Type};

use super::{off_reactor, Action, Context, Definition, ExecError, Invocation, Kind, Running};
use crate::credential::{Credentials, Secret};
use crate::error_chain::error_chain;
use crate::param::TypedValue;

pub const KIND: Kind = Kind {
    name: "sql",
    compile: compile_action,
};

fn compile_action(def: &Definition<'_>) -> Result<Box<dyn Action>, Vec<String>> {
    let fields = def.fields::<SqlConfig>()?;
    SqlTool::compile(
        &fields,
        def.params.keys().map(String::as_str),
        def.credential,
        def.defaults.timeout,
        def.defaults.max_response_bytes,
    )
    .map(|tool| Box::new(tool) as Box<dyn Action>)
    .map_err(|errors| errors.iter().map(ToString::to_string).collect())
}

impl Action for SqlTool {
    fn kind(&self) -> &'static str {
        KIND.name
    }

    fn run<'a>(&'a self, call: Invocation<'a>, context: Context<'a>) -> Running<'a> {
        Box::pin(async move {
            let password = context.credentials.get(&self.credential).ok_or_else(|| {
                ExecError::Internal(format!("credential {} is not loaded", self.credential))
            })?;
            self.execute(call.tool, call.params, password, context.credentials)
                .await
                .map_err(|e| match e {
                    SqlError::Rejected(why) => ExecError::Rejected(why),
                    SqlError::Timeout(t) => ExecError::Timeout(t),
                    SqlError::TooLarge(n) => ExecError::TooLarge(n),
                    SqlError::Withheld(leak) => ExecError::Withheld(leak),
                    SqlError::Internal(why) => ExecError::Internal(why),
                    e @ (SqlError::Database(_) | SqlError::Unsupported(_)) => {
                        ExecError::Upstream(e.to_string())
                    }
                })
        })
    }
}

/// The most rows a tool may return (its JSON must fit one reply frame).
pub const MAX_ROWS_CAP: usize = 10_000;
/// `max_rows` when the tool does not say.
pub const DEFAULT_MAX_ROWS: usize = 100;
/// How long connecting may take (the call's timeout bounds it as well).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `timeout` a tool may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(300);
/// Connections kept per tool.
const POOL_SIZE: usize = 4;
/// How long after the server's own statement_timeout the client gives up.
const CLIENT_GRACE: Duration = Duration::from_secs(1);
/// How long a cancel request may take before the connection is just dropped.
const CANCEL_WAIT: Duration = Duration::from_secs(2);

/// The `sql` fields of a `[[tool]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlConfig {
    /// `postgresql://user@host:port/db[?sslmode=verify-full]`, no password.
    pub database: String,
    pub statement: String,
    /// The parameter bound to `$1`, `$2`, ... in order.
    #[serde(default)]
    pub binds: Vec<String>,
    #[serde(default)]
    pub read_only: Option<bool>,
    #[serde(default)]
    pub max_rows: Option<usize>,
    /// humantime, e.g. `"5s"`; `broker.call_timeout` when absent.
    #[serde(default)]
    pub timeout: Option<String>,
}

/// Why an `sql` tool's configuration is refused (config check).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SqlConfigError {
    #[error("database: must be a postgresql:// or postgres:// URL")]
    NotUrl,
    #[error(
        "database: carries a password; the password is the tool's credential, never in the URL"
    )]
    PasswordInUrl,
    #[error("database: sslmode={0} does not verify the server; use verify-full (TLS) or disable (loopback, Unix socket)")]
    WeakSslMode(String),
    #[error("database: {0}")]
    Invalid(String),
    #[error("database: names no user")]
    NoUser,
    #[error("database: names no database")]
    NoDatabase,
    #[error("statement: is empty")]
    EmptyStatement,
    #[error("binds[{index}]: {name:?} is not a parameter of this tool")]
    UnknownBind { index: usize, name: String },
    #[error("params.{0}: is not in binds, so it could never reach the statement")]
    Unbound(String),
    #[error("max_rows: {0} is not between 1 and {MAX_ROWS_CAP}")]
    MaxRows(usize),
    #[error("timeout: {0}")]
    Timeout(String),
    #[error("credential: an sql tool needs one (the database password)")]
    NoCredential,
}

/// Why an allowed call still failed. Every message is safe for the caller
/// once redacted (it never holds the URL or the password).
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// A parameter does not fit the type the statement takes there: a
    /// denial.
    #[error("{0}")]
    Rejected(String),
    /// The server refused or failed the statement, or could not be reached.
    #[error("database: {0}")]
    Database(String),
    #[error("the statement did not finish within {0:?} and was cancelled")]
    Timeout(Duration),
    #[error("the rows exceed the {0}-byte reply limit; lower max_rows or select fewer columns")]
    TooLarge(usize),
    /// What the statement returns cannot be shown as JSON by this kind.
    #[error("{0}")]
    Unsupported(String),
    #[error("withheld: {0}")]
    Withheld(crate::leak::Leak),
    #[error("internal broker error: {0}")]
    Internal(String),
}

/// Whether the connection uses TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// `sslmode=disable` or none: plaintext. SCRAM never sends the
    /// password, but a server impersonator may ask for it in clear, so
    /// `check` and every start warn for a host that is not loopback
    /// ([`plaintext_remote_hosts`]).
    Disable,
    /// `sslmode=verify-full`: TLS, certificate and host name verified
    /// against the system roots.
    VerifyFull,
}

/// A compiled `sql` tool. The pool is made on first use, with the password.
pub struct SqlTool {
    credential: String,
    max_reply_bytes: usize,
    config: tokio_postgres::Config,
    pub tls: TlsMode,
    pub statement: String,
    pub binds: Vec<String>,
    pub read_only: bool,
    pub max_rows: usize,
    pub timeout: Duration,
    pool: tokio::sync::OnceCell<Pool>,
}

impl std::fmt::Debug for SqlTool {
    // No URL (it names hosts and users), and the pool holds the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlTool")
            .field("credential", &self.credential)
            .field("tls", &self.tls)
            .field("binds", &self.binds)
            .field("read_only", &self.read_only)
            .field("max_rows", &self.max_rows)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl SqlTool {
    /// Check and compile. `params` are the tool's parameter names;
    /// `credential` the credential it names; `default_timeout` and
    /// `max_reply_bytes` the broker's `call_timeout` and
    /// `max_response_bytes`.
    pub fn compile<'a>(
        cfg: &SqlConfig,
        params: impl IntoIterator<Item = &'a str>,
        credential: Option<&str>,
        default_timeout: Duration,
        max_reply_bytes: usize,
    ) -> Result<SqlTool, Vec<SqlConfigError>> {
        let mut errors = Vec::new();
        let (config, tls) = match parse_database(&cfg.database) {
            Ok(parsed) => parsed,
            Err(e) => {
                errors.push(e);
                (tokio_postgres::Config::new(), TlsMode::Disable)
            }
        };
        if credential.is_none() {
            errors.push(SqlConfigError::NoCredential);
        }
        if cfg.statement.trim().is_empty() {
            errors.push(SqlConfigError::EmptyStatement);
        }
        let params: Vec<&str> = params.into_iter().collect();
        for (index, name) in cfg.binds.iter().enumerate() {
            if !params.contains(&name.as_str()) {
                errors.push(SqlConfigError::UnknownBind {
                    index,
                    name: name.clone(),
                });
            }
        }
        for name in &params {
            if !cfg.binds.iter().any(|b| b == name) {
                errors.push(SqlConfigError::Unbound((*name).to_owned()));
            }
        }
        let max_rows = cfg.max_rows.unwrap_or(DEFAULT_MAX_ROWS);
        if max_rows == 0 || max_rows > MAX_ROWS_CAP {
            errors.push(SqlConfigError::MaxRows(max_rows));
        }
        let timeout = match &cfg.timeout {
            None => default_timeout.min(MAX_TIMEOUT),
            Some(text) => match humantime::parse_duration(text) {
                Ok(t) if t >= Duration::from_millis(1) && t <= MAX_TIMEOUT => t,
                Ok(_) => {
                    errors.push(SqlConfigError::Timeout(format!(
                        "{text:?} is not between 1ms and {}s",
                        MAX_TIMEOUT.as_secs()
                    )));
                    default_timeout
                }
                Err(e) => {
                    errors.push(SqlConfigError::Timeout(format!("{text:?}: {e}")));
                    default_timeout
                }
            },
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(SqlTool {
            credential: credential.unwrap_or_default().to_owned(),
            max_reply_bytes,
            config,
            tls,
            statement: cfg.statement.clone(),
            binds: cfg.binds.clone(),
            read_only: cfg.read_only.unwrap_or(true),
            max_rows,
            timeout,
            pool: tokio::sync::OnceCell::new(),
        })
    }

    /// Run the statement with `params` bound, as `tool` (its name, for
    /// messages). `password` is the tool's credential; the reply is
    /// redacted with and judged by `credentials`.
    pub async fn execute(
        &self,
        tool: &str,
        params: &BTreeMap<String, TypedValue>,
        password: &Secret,
        credentials: &Credentials,
    ) -> Result<CallResult, SqlError> {
        let max_reply_bytes = self.max_reply_bytes;
        let redact = |text: String| credentials.redactor().redact_str(&text);
        let deadline = self.timeout + CLIENT_GRACE;
        let pool = self.pool(password)?;
        let client = tokio::time::timeout(deadline, pool.get())
            .await
            .map_err(|_| SqlError::Timeout(self.timeout))?
            .map_err(|e| SqlError::Database(redact(pool_error(&e))))?;
        let cancel = client.cancel_token();
        let mut client = client;
        let outcome = tokio::time::timeout(deadline, self.run(tool, params, &mut client)).await;
        let rows = match outcome {
            Ok(result) => result.map_err(|e| match e {
                SqlError::Database(m) => SqlError::Database(redact(m)),
                other => other,
            })?,
            Err(_) => {
                // The server did not stop it (or never answered): ask it to
                // cancel, and never reuse this connection.
                let _ = tokio::time::timeout(CANCEL_WAIT, self.cancel(&cancel)).await;
                drop(deadpool_postgres::Object::take(client));
                return Err(SqlError::Timeout(self.timeout));
            }
        };
        let body = rows;
        if body.len() > max_reply_bytes {
            return Err(SqlError::TooLarge(max_reply_bytes));
        }
        // Judged as read, not redacted first: rows that carry credential
        // material in any form are withheld whole.
        off_reactor(|| credentials.scanner().check(&body)).map_err(SqlError::Withheld)?;
        Ok(CallResult {
            status: 200,
            headers: vec![Header {
                name: "content-type".to_owned(),
                value: "application/json".to_owned(),
            }],
            body,
        })
    }

    fn pool(&self, password: &Secret) -> Result<&Pool, SqlError> {
        if let Some(pool) = self.pool.get() {
            return Ok(pool);
        }
        let mut config = self.config.clone();
        config.password(password.expose());
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match self.tls {
            TlsMode::Disable => Manager::from_config(config, tokio_postgres::NoTls, manager_config),
            TlsMode::VerifyFull => Manager::from_config(config, rustls_connect()?, manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| SqlError::Internal(format!("cannot build the connection pool: {e}")))?;
        // A concurrent first call may have set it: keep theirs.
        let _ = self.pool.set(pool);
        self.pool
            .get()
            .ok_or_else(|| SqlError::Internal("the connection pool vanished".to_owned()))
    }

    async fn cancel(&self, token: &tokio_postgres::CancelToken) {
        let _ = match self.tls {
            TlsMode::Disable => token.cancel_query(tokio_postgres::NoTls).await,
            TlsMode::VerifyFull => match rustls_connect() {
                Ok(tls) => token.cancel_query(tls).await,
                Err(_) => return,
            },
        };
    }

    /// Transaction, timeout, prepare, type-checked binds, at most
    /// `max_rows + 1` rows; the JSON reply (not yet redacted).
    async fn run(
        &self,
        tool: &str,
        params: &BTreeMap<String, TypedValue>,
        client: &mut deadpool_postgres::Object,
    ) -> Result<Vec<u8>, SqlError> {
        let db = |e: tokio_postgres::Error| self.database_error(&e);
        let tx = client
            .build_transaction()
            .read_only(self.read_only)
            .start()
            .await
            .map_err(db)?;
        tx.batch_execute(&format!(
            "SET LOCAL statement_timeout = {}",
            self.timeout.as_millis().max(1)
        ))
        .await
        .map_err(db)?;
        let statement = tx.prepare(&self.statement).await.map_err(db)?;
        if statement.params().len() != self.binds.len() {
            return Err(SqlError::Internal(format!(
                "tool {tool}'s statement takes {} parameters but binds lists {}",
                statement.params().len(),
                self.binds.len()
            )));
        }
        let mut values: Vec<Bind> = Vec::with_capacity(self.binds.len());
        for (index, (name, ty)) in self.binds.iter().zip(statement.params()).enumerate() {
            let value = params.get(name).ok_or_else(|| {
                SqlError::Internal(format!("parameter {name} of tool {tool} has no value"))
            })?;
            values.push(Bind::new(tool, name, index + 1, ty, value)?);
        }
        let refs: Vec<&(dyn ToSql + Sync)> =
            values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        let portal = tx.bind(&statement, &refs).await.map_err(db)?;
        let mut rows = tx
            .query_portal(&portal, (self.max_rows + 1) as i32)
            .await
            .map_err(db)?;
        let truncated = rows.len() > self.max_rows;
        rows.truncate(self.max_rows);
        let json = rows_to_json(statement.columns(), &rows, truncated)?;
        drop(portal);
        tx.commit().await.map_err(db)?;
        Ok(json)
    }

    fn database_error(&self, error: &tokio_postgres::Error) -> SqlError {
        if let Some(db) = error.as_db_error() {
            if db.code() == &tokio_postgres::error::SqlState::QUERY_CANCELED {
                return SqlError::Timeout(self.timeout);
            }
            let mut message = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
            if let Some(detail) = db.detail() {
                message.push_str(&format!(" ({detail})"));
            }
            if let Some(hint) = db.hint() {
                message.push_str(&format!(" hint: {hint}"));
            }
            return SqlError::Database(message);
        }
        SqlError::Database(error_chain(error))
    }
}

/// The hosts of a `database` URL reached over plain TCP that are not
/// loopback: there the rows cross the network unencrypted, and an active
/// attacker posing as the server can ask for the password in clear (the
/// protocol lets a server choose cleartext password authentication). Empty
/// for TLS, Unix sockets, loopback, or a URL that does not parse (the
/// policy reports that).
pub fn plaintext_remote_hosts(url: &str) -> Vec<String> {
    let Ok((config, TlsMode::Disable)) = parse_database(url) else {
        return Vec::new();
    };
    config
        .get_hosts()
        .iter()
        .filter_map(|host| match host {
            tokio_postgres::config::Host::Tcp(name) => Some(name),
            _ => None,
        })
        .filter(|name| {
            let bare = name.trim_start_matches('[').trim_end_matches(']');
            !(bare.eq_ignore_ascii_case("localhost")
                || bare
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback()))
        })
        .cloned()
        .collect()
}

/// Parse the admin's URL into a configuration without a password, and the
/// TLS mode it asks for.
fn parse_database(url: &str) -> Result<(tokio_postgres::Config, TlsMode), SqlConfigError> {
    let rest = url
        .strip_prefix("postgresql://")
        .or_else(|| url.strip_prefix("postgres://"))
        .ok_or(SqlConfigError::NotUrl)?;
    let (authority_path, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    // user[:password]@hosts/db: a ':' before the last '@' is a password.
    let authority = authority_path.split('/').next().unwrap_or("");
    if let Some((userinfo, _)) = authority.rsplit_once('@') {
        if userinfo.contains(':') {
            return Err(SqlConfigError::PasswordInUrl);
        }
    }
    let mut tls = TlsMode::Disable;
    let mut kept = Vec::new();
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "password" | "passfile" => return Err(SqlConfigError::PasswordInUrl),
            "sslmode" => match value {
                "verify-full" => tls = TlsMode::VerifyFull,
                "disable" => tls = TlsMode::Disable,
                other => return Err(SqlConfigError::WeakSslMode(other.to_owned())),
            },
            _ => kept.push(pair),
        }
    }
    let mut rebuilt = format!("postgresql://{authority_path}");
    if !kept.is_empty() {
        rebuilt.push('?');
        rebuilt.push_str(&kept.join("&"));
    }
    let mut config = tokio_postgres::Config::from_str(&rebuilt)
        .map_err(|e| SqlConfigError::Invalid(error_chain(&e)))?;
    if config.get_password().is_some() {
        return Err(SqlConfigError::PasswordInUrl);
    }
    if config.get_user().is_none() {
        return Err(SqlConfigError::NoUser);
    }
    if config.get_dbname().is_none() {
        return Err(SqlConfigError::NoDatabase);
    }
    config.ssl_mode(match tls {
        TlsMode::Disable => tokio_postgres::config::SslMode::Disable,
        TlsMode::VerifyFull => tokio_postgres::config::SslMode::Require,
    });
    config.application_name("keyward-broker");
    config.connect_timeout(CONNECT_TIMEOUT);
    Ok((config, tls))
}

/// rustls with the system roots; verifies the certificate chain and that
/// it names the host (rustls always does: this is verify-full).
fn rustls_connect() -> Result<tokio_postgres_rustls::MakeRustlsConnect, SqlError> {
    let mut roots = rustls::RootCertStore::empty();
    let loaded = rustls_native_certs::load_native_certs();
    for cert in loaded.certs {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(SqlError::Database(
            "sslmode=verify-full but the system has no root certificates".to_owned(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SqlError::Internal(format!("TLS configuration: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// One bind value, converted to exactly the type the statement takes.
#[derive(Debug)]
enum Bind {
    I16(i16),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
    Text(String),
    Bool(bool),
}

impl Bind {
    fn new(
        tool: &str,
        name: &str,
        position: usize,
        ty: &Type,
        value: &TypedValue,
    ) -> Result<Bind, SqlError> {
        let mismatch = |what: &str| {
            SqlError::Rejected(format!(
                "parameter \"{name}\" of tool {tool} is refused: {what}, but ${position} of the statement takes {ty}"
            ))
        };
        let out_of_range = || mismatch("its value is out of range");
        Ok(match (value, ty) {
            (TypedValue::Int(i), t) if *t == Type::INT2 => {
                Bind::I16(i16::try_from(*i).map_err(|_| out_of_range())?)
            }
            (TypedValue::Int(i), t) if *t == Type::INT4 => {
                Bind::I32(i32::try_from(*i).map_err(|_| out_of_range())?)
            }
            (TypedValue::Int(i), t) if *t == Type::INT8 => Bind::I64(*i),
            // Only integers a float holds exactly.
            (TypedValue::Int(i), t) if *t == Type::FLOAT8 => {
                if i.unsigned_abs() > 1 << 53 {
                    return Err(out_of_range());
                }
                Bind::F64(*i as f64)
            }
            (TypedValue::Int(i), t) if *t == Type::FLOAT4 => {
                if i.unsigned_abs() > 1 << 24 {
                    return Err(out_of_range());
                }
                Bind::F32(*i as f32)
            }
            (TypedValue::Str(s), t)
                if [Type::TEXT, Type::VARCHAR, Type::BPCHAR, Type::NAME].contains(t) =>
            {
                Bind::Text(s.clone())
            }
            (TypedValue::Bool(b), t) if *t == Type::BOOL => Bind::Bool(*b),
            (TypedValue::Int(_), _) => return Err(mismatch("it is an int")),
            (TypedValue::Str(_), _) => return Err(mismatch("it is a string")),
            (TypedValue::Bool(_), _) => return Err(mismatch("it is a bool")),
        })
    }
}

impl ToSql for Bind {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut tokio_postgres::types::private::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Bind::I16(v) => v.to_sql(ty, out),
            Bind::I32(v) => v.to_sql(ty, out),
            Bind::I64(v) => v.to_sql(ty, out),
            Bind::F32(v) => v.to_sql(ty, out),
            Bind::F64(v) => v.to_sql(ty, out),
            Bind::Text(v) => v.to_sql(ty, out),
            Bind::Bool(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        // Bind::new chose the variant from the statement's own type.
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

/// `{"columns": [...], "rows": [{column: value}], "truncated": bool}`.
fn rows_to_json(
    columns: &[tokio_postgres::Column],
    rows: &[tokio_postgres::Row],
    truncated: bool,
) -> Result<Vec<u8>, SqlError> {
    let names: Vec<&str> = columns.iter().map(|c| c.name()).collect();
    for (i, name) in names.iter().enumerate() {
        if names[..i].contains(name) {
            return Err(SqlError::Unsupported(format!(
                "the statement returns two columns named {name:?}; name them apart (AS) so each row is an object"
            )));
        }
    }
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let mut object = serde_json::Map::new();
        for (i, column) in columns.iter().enumerate() {
            object.insert(column.name().to_owned(), cell(row, i, column)?);
        }
        out.push(serde_json::Value::Object(object));
    }
    let reply = serde_json::json!({
        "columns": names,
        "rows": out,
        "truncated": truncated,
    });
    serde_json::to_vec(&reply).map_err(|e| SqlError::Internal(e.to_string()))
}

/// One value as JSON: NULL → null; bool, integers, floats, text, json and
/// one-dimensional arrays of those as themselves. Other types are a clear
/// error naming the column, with the fix (a cast to text in the statement).
fn cell(
    row: &tokio_postgres::Row,
    index: usize,
    column: &tokio_postgres::Column,
) -> Result<serde_json::Value, SqlError> {
    use serde_json::Value;
    let ty = column.type_();
    let bad = |e: Box<dyn std::error::Error + Sync + Send>| {
        SqlError::Database(format!("column {:?}: cannot decode: {e}", column.name()))
    };
    fn get<'a, T: FromSql<'a>>(
        row: &'a tokio_postgres::Row,
        index: usize,
    ) -> Result<Option<T>, Box<dyn std::error::Error + Sync + Send>> {
        row.try_get::<_, Option<T>>(index).map_err(Into::into)
    }
    let float = |f: f64| {
        serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(f.to_string()))
    };
    let value = match ty {
        t if *t == Type::BOOL => get::<bool>(row, index).map_err(bad)?.map(Value::Bool),
        t if *t == Type::INT2 => get::<i16>(row, index).map_err(bad)?.map(Value::from),
        t if *t == Type::INT4 => get::<i32>(row, index).map_err(bad)?.map(Value::from),
        t if *t == Type::INT8 => get::<i64>(row, index).map_err(bad)?.map(Value::from),
        t if *t == Type::OID => get::<u32>(row, index).map_err(bad)?.map(Value::from),
        t if *t == Type::FLOAT4 => get::<f32>(row, index)
            .map_err(bad)?
            .map(|f| float(f as f64)),
        t if *t == Type::FLOAT8 => get::<f64>(row, index).map_err(bad)?.map(float),
        t if [Type::TEXT, Type::VARCHAR, Type::BPCHAR, Type::NAME].contains(t) => {
            get::<String>(row, index).map_err(bad)?.map(Value::String)
        }
        t if *t == Type::JSON || *t == Type::JSONB => {
            get::<Value>(row, index).map_err(bad)?
        }
        t if *t == Type::BOOL_ARRAY => array::<bool>(row, index, Value::Bool).map_err(bad)?,
        t if *t == Type::INT2_ARRAY => array::<i16>(row, index, Value::from).map_err(bad)?,
        t if *t == Type::INT4_ARRAY => array::<i32>(row, index, Value::from).map_err(bad)?,
        t if *t == Type::INT8_ARRAY => array::<i64>(row, index, Value::from).map_err(bad)?,
        t if *t == Type::FLOAT8_ARRAY => array::<f64>(row, index, float).map_err(bad)?,
        t if [Type::TEXT_ARRAY, Type::VARCHAR_ARRAY, Type::BPCHAR_ARRAY].contains(t) => {
            array::<String>(row, index, Value::String).map_err(bad)?
        }
        other => {
            return Err(SqlError::Unsupported(format!(
                "column {:?} has type {other}, which the sql kind does not return as JSON; cast it in the statement (e.g. {}::text)",
                column.name(),
                column.name()
            )))
        }
    };
    Ok(value.unwrap_or(Value::Null))
}

fn array<'a, T: FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    index: usize,
    to_json: impl Fn(T) -> serde_json::Value,
) -> Result<Option<serde_json::Value>, Box<dyn std::error::Error + Sync + Send>> {
    let values = row.try_get::<_, Option<Vec<Option<T>>>>(index)?;
    Ok(values.map(|values| {
        serde_json::Value::Array(
            values
                .into_iter()
                .map(|v| v.map(&to_json).unwrap_or(serde_json::Value::Null))
                .collect(),
        )
    }))
}

fn pool_error(error: &deadpool_postgres::PoolError) -> String {
    match error {
        deadpool_postgres::PoolError::Backend(e) => error_chain(e),
        other => error_chain(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(database: &str) -> SqlConfig {
        SqlConfig {
            database: database.to_owned(),
            statement: "SELECT id FROM customers WHERE id = $1".to_owned(),
            binds: vec!["id".to_owned()],
            read_only: None,
            max_rows: None,
            timeout: None,
        }
    }

    fn compile(c: &SqlConfig) -> Result<SqlTool, Vec<SqlConfigError>> {
        SqlTool::compile(c, ["id"], Some("db"), Duration::from_secs(5), 60 * 1024)
    }

    #[test]
    fn a_password_in_the_url_is_refused() {
        for url in [
            "postgresql://app:hunter2@127.0.0.1:5432/shop",
            "postgres://app:@127.0.0.1/shop",
            "postgresql://app@127.0.0.1/shop?password=hunter2",
            "postgresql://app@127.0.0.1/shop?sslmode=disable&password=hunter2",
            "postgresql://app@127.0.0.1/shop?passfile=/root/.pgpass",
        ] {
            let errors = compile(&cfg(url)).unwrap_err();
            assert_eq!(errors, vec![SqlConfigError::PasswordInUrl], "{url}");
            for e in &errors {
                assert!(!e.to_string().contains("hunter2"));
            }
        }
    }

    #[test]
    fn only_verifying_tls_or_none() {
        let tool = compile(&cfg(
            "postgresql://app@db.example.com/shop?sslmode=verify-full",
        ))
        .unwrap();
        assert_eq!(tool.tls, TlsMode::VerifyFull);
        let tool = compile(&cfg("postgresql://app@127.0.0.1:5432/shop")).unwrap();
        assert_eq!(tool.tls, TlsMode::Disable);
        for mode in ["require", "prefer", "verify-ca", "allow"] {
            let errors = compile(&cfg(&format!(
                "postgresql://app@db.example.com/shop?sslmode={mode}"
            )))
            .unwrap_err();
            assert_eq!(errors, vec![SqlConfigError::WeakSslMode(mode.to_owned())]);
        }
    }

    #[test]
    fn binds_params_and_limits_are_checked() {
        let mut c = cfg("postgresql://app@127.0.0.1/shop");
        c.binds = vec!["nope".to_owned()];
        c.max_rows = Some(0);
        c.timeout = Some("10m".to_owned());
        let errors =
            SqlTool::compile(&c, ["id"], None, Duration::from_secs(5), 60 * 1024).unwrap_err();
        assert!(errors.contains(&SqlConfigError::UnknownBind {
            index: 0,
            name: "nope".to_owned()
        }));
        assert!(errors.contains(&SqlConfigError::Unbound("id".to_owned())));
        assert!(errors.contains(&SqlConfigError::MaxRows(0)));
        assert!(errors.contains(&SqlConfigError::NoCredential));
        assert!(errors
            .iter()
            .any(|e| matches!(e, SqlConfigError::Timeout(_))));
        for url in ["mysql://app@h/db", "host=127.0.0.1 user=app dbname=shop"] {
            assert_eq!(
                compile(&cfg(url)).unwrap_err(),
                vec![SqlConfigError::NotUrl]
            );
        }
        assert_eq!(
            compile(&cfg("postgresql://127.0.0.1/shop")).unwrap_err(),
            vec![SqlConfigError::NoUser]
        );
    }

    #[test]
    fn read_only_is_the_default() {
        assert!(
            compile(&cfg("postgresql://app@127.0.0.1/shop"))
                .unwrap()
                .read_only
        );
    }

    #[test]
    fn binds_are_typed_from_the_statement() {
        let int = TypedValue::Int(1);
        assert!(matches!(
            Bind::new("t", "id", 1, &Type::INT4, &int),
            Ok(Bind::I32(1))
        ));
        assert!(matches!(
            Bind::new("t", "id", 1, &Type::INT4, &TypedValue::Int(1 << 40)),
            Err(SqlError::Rejected(_))
        ));
        let s = TypedValue::Str("1 OR 1=1".to_owned());
        let e = Bind::new("t", "id", 1, &Type::INT4, &s).unwrap_err();
        assert_eq!(
            e.to_string(),
            "parameter \"id\" of tool t is refused: it is a string, but $1 of the statement takes int4"
        );
        assert!(matches!(
            Bind::new("t", "n", 2, &Type::TEXT, &s),
            Ok(Bind::Text(_))
        ));
        assert!(Bind::new("t", "b", 1, &Type::TEXT, &TypedValue::Bool(true)).is_err());
        assert!(Bind::new("t", "b", 1, &Type::FLOAT8, &TypedValue::Int(i64::MAX)).is_err());
    }

    #[test]
    fn debug_names_no_url() {
        let tool = compile(&cfg("postgresql://app@secret-host.example/shop")).unwrap();
        assert!(!format!("{tool:?}").contains("secret-host"));
    }
}
