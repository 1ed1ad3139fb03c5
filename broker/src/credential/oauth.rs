// SPDX-License-Identifier: Apache-2.0
//! `kind = "oauth2"`: a credential whose value is an OAuth 2.0 access
//! token, obtained from the authorization server's token endpoint with a
//! refresh token (`grant = "refresh_token"`, the default) or with the
//! client's own credentials (`grant = "client_credentials"`).
//!
//! - **When**: lazily, at the first call that needs a token; again when
//!   the token is within [`SKEW`] (or a quarter of its lifetime, if
//!   shorter) of its expiry; and once when an upstream answers 401 to it
//!   (the call is then retried once with the new token).
//! - **One at a time**: one refresh per credential is in flight, however
//!   many calls wait; the waiters share its result, success or failure
//!   (and a failure is not retried for [`RETRY_AFTER`]). The refresh runs
//!   in a task of its own, so a caller that gives up cannot cancel it
//!   between the server rotating the refresh token and the broker
//!   recording the new one.
//! - **Rotation**: a new refresh token is written to the state directory
//!   (`oauth2-NAME.json`, 0600; temp file, fsync, rename, directory fsync)
//!   *before* the new access token is used, and is read from there at the
//!   next start in preference to `refresh_token_file` — unless the admin
//!   has since put a different token in that file (re-authorized): the
//!   state file records a hash of the configured token it descends from.
//!   A response without a refresh token keeps the old one.
//! - **Broken**: `invalid_grant` (the refresh token is revoked or
//!   expired) or `invalid_client` marks the credential broken: every call
//!   gets one clear sentence and no request reaches the token endpoint
//!   again until the admin re-authorizes and reloads (SIGHUP; see
//!   [`OAuth2Credential::reauthorize`]) or restarts.
//! - **Secrecy**: the client secret, the refresh tokens and the current
//!   and recent access tokens are covered by redaction and the leak
//!   scanner ([`super::Coverage`]) from before their first use; they live
//!   in [`Secret`]s; nothing here prints a value.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use keyward_proto::token::hex;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::{Deserialize, Deserializer, Serialize};
use zeroize::Zeroizing;

use super::{read_secret, Coverage, CredentialError, CredentialState, Secret};
use crate::config::CredentialConfig;
use crate::error_chain::error_chain;

mod config;

use config::parse_config;
pub use config::{check_config, ClientAuth, Grant, OAuth2Config};

/// The `kind` of these credentials in the configuration.
pub const KIND: &str = crate::config::OAUTH2_KIND;

/// Refresh this long before the access token expires (or a quarter of
/// its lifetime before, if that is shorter).
pub const SKEW: Duration = Duration::from_secs(60);

/// After a failed refresh, calls get the same error for this long
/// instead of asking the token endpoint again.
pub const RETRY_AFTER: Duration = Duration::from_secs(2);

/// A 401 forces a refresh only for a token at least this old: an
/// upstream that refuses every token gets one refresh per this interval,
/// not one per call.
pub const MIN_AGE_FOR_401: Duration = Duration::from_secs(1);

/// The whole exchange with the token endpoint.
pub const TOKEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest token endpoint response read.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

/// Old values still covered by redaction after they were replaced (an
/// access token stays valid upstream until it expires).
const RETIRED_KEPT: usize = 8;

/// What `application/x-www-form-urlencoded` leaves as is.
const FORM: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'*')
    .remove(b'-')
    .remove(b'.')
    .remove(b'_');

#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    #[error("credential {name} is broken: {reason}")]
    Broken { name: String, reason: String },
    #[error("credential {name}: the token endpoint refused the request ({code})")]
    Refused { name: String, code: String },
    #[error("credential {name}: the token endpoint answered HTTP {status}")]
    Status { name: String, status: u16 },
    #[error("credential {name}: cannot reach the token endpoint: {message}")]
    Transport { name: String, message: String },
    #[error("credential {name}: the token endpoint did not answer within {TOKEN_TIMEOUT:?}")]
    Timeout { name: String },
    #[error("credential {name}: the token endpoint's response is unusable: {what}")]
    BadResponse { name: String, what: String },
    #[error("credential {name}: cannot record the rotated refresh token in {path} ({source}); the new access token is not used")]
    Persist {
        name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("credential {name}: {path}: {message}")]
    State {
        name: String,
        path: PathBuf,
        message: String,
    },
    #[error("credential {name}: a refresh token may be rotated, and must then be recorded: set broker.state_dir (or run under systemd with StateDirectory=)")]
    NoStateDirectory { name: String },
    #[error("credential {name}: {message}")]
    Config { name: String, message: String },
    /// A recent attempt failed (its message), shared with the calls that
    /// waited for it.
    #[error("credential {name}: {message}")]
    Failed { name: String, message: String },
}

/// An access token handed to a call, and its generation (which refresh
/// produced it).
#[derive(Debug, Clone)]
pub struct AccessToken {
    pub secret: Arc<Secret>,
    pub generation: u64,
}

/// A loaded `kind = "oauth2"` credential.
pub struct OAuth2Credential {
    name: String,
    token_url: reqwest::Url,
    client_id: String,
    client_secret: Option<Arc<Secret>>,
    client_auth: ClientAuth,
    grant: Grant,
    /// Space-separated, as the request carries it.
    scope: Option<String>,
    /// `refresh_token_file`, re-read by [`OAuth2Credential::reauthorize`].
    refresh_token_path: Option<PathBuf>,
    /// Where a rotated refresh token is recorded.
    state_file: Option<PathBuf>,
    coverage: Arc<Coverage>,
    inner: Mutex<Inner>,
    /// Held for the whole of one refresh.
    refreshing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for OAuth2Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuth2Credential")
            .field("name", &self.name)
            .field("client_id", &self.client_id)
            .field("grant", &self.grant)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Inner {
    refresh_token: Option<Arc<Secret>>,
    /// blake3 of the configured refresh token the current one descends
    /// from (recorded with a rotated token).
    configured: Option<[u8; 32]>,
    access: Option<Access>,
    /// Incremented by every successful refresh.
    generation: u64,
    /// Incremented by every request to the token endpoint.
    attempts: u64,
    in_flight: bool,
    failure: Option<Failure>,
    broken: Option<String>,
    /// Replaced values, still covered.
    retired: VecDeque<Arc<Secret>>,
}

struct Access {
    token: Arc<Secret>,
    generation: u64,
    issued: Instant,
    /// When to refresh; `None` when the server gave no lifetime (then only
    /// a 401 refreshes).
    refresh_at: Option<Instant>,
}

/// The last failed attempt, shared with the calls that waited for it.
struct Failure {
    attempt: u64,
    at: Instant,
    /// The error, already a sentence without secrets.
    message: String,
}

/// What the token endpoint answered.
enum Answer {
    Tokens {
        access: Zeroizing<String>,
        refresh: Option<Zeroizing<String>>,
        expires_in: Option<u64>,
    },
    /// The grant or client was rejected: the credential is broken.
    Rejected(String),
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(deserialize_with = "zeroizing")]
    access_token: Zeroizing<String>,
    token_type: Option<String>,
    #[serde(default, deserialize_with = "seconds")]
    expires_in: Option<u64>,
    #[serde(default, deserialize_with = "zeroizing_opt")]
    refresh_token: Option<Zeroizing<String>>,
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: String,
}

/// The state file's content.
#[derive(Serialize, Deserialize)]
struct Stored {
    /// Hex blake3 of the configured refresh token this one descends from.
    configured: String,
    #[serde(deserialize_with = "zeroizing", serialize_with = "expose_str")]
    refresh_token: Zeroizing<String>,
}

fn zeroizing<'de, D: Deserializer<'de>>(d: D) -> Result<Zeroizing<String>, D::Error> {
    String::deserialize(d).map(Zeroizing::new)
}

fn zeroizing_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Zeroizing<String>>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.map(Zeroizing::new))
}

fn expose_str<S: serde::Serializer>(value: &Zeroizing<String>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(value)
}

/// `expires_in` as a number, or a string of digits (some servers).
fn seconds<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Seconds {
        Number(u64),
        Float(f64),
        Text(String),
    }
    Ok(match Option::<Seconds>::deserialize(d)? {
        None => None,
        Some(Seconds::Number(n)) => Some(n),
        Some(Seconds::Float(f)) if f.is_finite() && f >= 0.0 => Some(f as u64),
        Some(Seconds::Float(_)) => None,
        Some(Seconds::Text(t)) => t.trim().parse().ok(),
    })
}

/// Run blocking file work where it does not stall the reactor.
fn blocking<T>(op: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(op),
        _ => op(),
    }
}

fn secret_of(text: &str) -> Arc<Secret> {
    Arc::new(Secret::new(Zeroizing::new(text.as_bytes().to_vec())))
}

fn fingerprint(secret: &Secret) -> [u8; 32] {
    *blake3::hash(secret.expose()).as_bytes()
}

impl OAuth2Credential {
    /// Load an entry already checked by [`check_config`]: read the client
    /// secret and refresh token from `dir` (and a rotated refresh token
    /// from the state directory), and cover them.
    pub fn load(
        name: &str,
        config: &CredentialConfig,
        dir: &Path,
        state_dir: Option<&Path>,
        coverage: Arc<Coverage>,
    ) -> Result<OAuth2Credential, CredentialError> {
        let invalid = |message: String| CredentialError::Invalid {
            name: name.to_owned(),
            message,
        };
        let mut errors = check_config(name, config);
        if !errors.is_empty() {
            return Err(invalid(errors.remove(0)));
        }
        let oauth = parse_config(config).map_err(invalid)?;
        let token_url = oauth
            .token_url
            .as_deref()
            .and_then(|u| reqwest::Url::parse(u).ok())
            .ok_or_else(|| invalid("token_url: is not a URL".to_owned()))?;
        let client_secret = match &oauth.client_secret_file {
            Some(file) => Some(Arc::new(read_secret(name, &dir.join(file))?)),
            None => None,
        };
        let refresh_token_path = oauth.refresh_token_file.as_ref().map(|f| dir.join(f));
        let state_file = state_dir.map(|d| d.join(format!("{KIND}-{name}.json")));
        let mut inner = Inner::default();
        let mut covered: Vec<Arc<Secret>> = client_secret.iter().cloned().collect();
        if let Some(path) = &refresh_token_path {
            let configured = Arc::new(read_secret(name, path)?);
            let print = fingerprint(&configured);
            let Some(state_file) = &state_file else {
                return Err(OAuthError::NoStateDirectory {
                    name: name.to_owned(),
                }
                .into());
            };
            let stored = read_stored(name, state_file)?
                .filter(|stored| stored.configured == hex(&print))
                .map(|stored| secret_of(&stored.refresh_token));
            covered.push(Arc::clone(&configured));
            if let Some(stored) = &stored {
                covered.push(Arc::clone(stored));
            }
            inner.refresh_token = Some(stored.unwrap_or(configured));
            inner.configured = Some(print);
        }
        coverage.set(name, covered)?;
        Ok(OAuth2Credential {
            name: name.to_owned(),
            token_url,
            client_id: oauth.client_id.unwrap_or_default(),
            client_secret,
            client_auth: oauth.client_auth,
            grant: oauth.grant,
            scope: (!oauth.scopes.is_empty()).then(|| oauth.scopes.join(" ")),
            refresh_token_path,
            state_file,
            coverage,
            inner: Mutex::new(inner),
            refreshing: tokio::sync::Mutex::new(()),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Loaded, refreshing, or broken (and why).
    pub fn state(&self) -> CredentialState {
        let inner = self.lock();
        match (&inner.broken, inner.in_flight) {
            (Some(reason), _) => CredentialState::Broken(reason.clone()),
            (None, true) => CredentialState::Refreshing,
            (None, false) => CredentialState::Loaded,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A current access token, refreshed first if there is none or it is
    /// due.
    pub async fn access_token(self: &Arc<Self>) -> Result<AccessToken, OAuthError> {
        let seen = {
            let inner = self.lock();
            if let Some(token) = self.usable(&inner, None)? {
                return Ok(token);
            }
            inner.attempts
        };
        self.refresh_in_task(seen, None).await
    }

    /// An upstream answered 401 to the token of `generation`: refresh,
    /// unless that token is already replaced (then the newer one) or too
    /// fresh to blame (then `None`: nothing to retry with).
    pub async fn rejected(
        self: &Arc<Self>,
        generation: u64,
    ) -> Result<Option<AccessToken>, OAuthError> {
        let seen = {
            let inner = self.lock();
            if let Some(access) = &inner.access {
                if access.generation == generation && access.issued.elapsed() < MIN_AGE_FOR_401 {
                    return Ok(None);
                }
            }
            if let Some(token) = self.usable(&inner, Some(generation))? {
                return Ok(Some(token));
            }
            inner.attempts
        };
        self.refresh_in_task(seen, Some(generation)).await.map(Some)
    }

    /// The current token if it can be used: not due, and not the one
    /// `rejected` names. A broken credential is an error.
    fn usable(
        &self,
        inner: &Inner,
        rejected: Option<u64>,
    ) -> Result<Option<AccessToken>, OAuthError> {
        if let Some(reason) = &inner.broken {
            return Err(OAuthError::Broken {
                name: self.name.clone(),
                reason: reason.clone(),
            });
        }
        Ok(inner
            .access
            .as_ref()
            .filter(|a| Some(a.generation) != rejected)
            .filter(|a| a.refresh_at.is_none_or(|at| Instant::now() < at))
            .map(|a| AccessToken {
                secret: Arc::clone(&a.token),
                generation: a.generation,
            }))
    }

    /// Refresh in a task of its own (see the module docs), one at a time.
    async fn refresh_in_task(
        self: &Arc<Self>,
        seen: u64,
        rejected: Option<u64>,
    ) -> Result<AccessToken, OAuthError> {
        let this = Arc::clone(self);
        let task = tokio::spawn(async move { this.refresh(seen, rejected).await });
        match task.await {
            Ok(result) => result,
            Err(_) => Err(OAuthError::Transport {
                name: self.name.clone(),
                message: "the refresh task failed".to_owned(),
            }),
        }
    }

    async fn refresh(&self, seen: u64, rejected: Option<u64>) -> Result<AccessToken, OAuthError> {
        let _one = self.refreshing.lock().await;
        let refresh_token = {
            let mut inner = self.lock();
            if let Some(token) = self.usable(&inner, rejected)? {
                return Ok(token);
            }
            if let Some(failure) = &inner.failure {
                // An attempt made while this call waited, or a recent one,
                // failed: share its result.
                let latest = failure.attempt == inner.attempts;
                if latest && (inner.attempts != seen || failure.at.elapsed() < RETRY_AFTER) {
                    return Err(OAuthError::Failed {
                        name: self.name.clone(),
                        message: failure.message.clone(),
                    });
                }
            }
            inner.attempts += 1;
            inner.in_flight = true;
            inner.refresh_token.clone()
        };
        let result = self.obtain(refresh_token.as_deref()).await;
        let result = match result {
            Ok(Answer::Tokens {
                access,
                refresh,
                expires_in,
            }) => self.install(access, refresh, expires_in),
            Ok(Answer::Rejected(reason)) => {
                eprintln!(
                    "keyward-broker: credential {} is broken: {reason}",
                    self.name
                );
                let mut inner = self.lock();
                inner.broken = Some(reason.clone());
                Err(OAuthError::Broken {
                    name: self.name.clone(),
                    reason,
                })
            }
            Err(e) => Err(e),
        };
        let mut inner = self.lock();
        inner.in_flight = false;
        if let Err(e) = &result {
            if !matches!(e, OAuthError::Broken { .. }) {
                inner.failure = Some(Failure {
                    attempt: inner.attempts,
                    at: Instant::now(),
                    message: sentence_after_name(&e.to_string(), &self.name),
                });
            }
        }
        result
    }

    /// Record a rotated refresh token, cover the new values, then make
    /// the access token current — in that order.
    fn install(
        &self,
        access: Zeroizing<String>,
        refresh: Option<Zeroizing<String>>,
        expires_in: Option<u64>,
    ) -> Result<AccessToken, OAuthError> {
        let bad = |what: &str| OAuthError::BadResponse {
            name: self.name.clone(),
            what: what.to_owned(),
        };
        if access.len() < super::MIN_SECRET_LEN {
            return Err(bad("the access token is too short to redact reliably"));
        }
        if access.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(bad("the access token has spaces or control characters"));
        }
        let access = secret_of(&access);
        let refresh = refresh
            .filter(|r| !r.is_empty())
            .map(|r| secret_of(&r))
            .filter(|new| {
                let inner = self.lock();
                inner
                    .refresh_token
                    .as_ref()
                    .is_none_or(|old| old.expose() != new.expose())
            });
        if let Some(new) = &refresh {
            if self.grant == Grant::RefreshToken {
                // Keep the new token even if it cannot be recorded: the
                // server may already have revoked the old one.
                self.replace_refresh_token(new);
                self.cover(None)
                    .and_then(|()| self.persist(new))
                    .map_err(|e| {
                        eprintln!("keyward-broker: {e}");
                        e
                    })?;
            }
        }
        self.cover(Some(&access))?;
        let mut inner = self.lock();
        inner.generation += 1;
        let lifetime = expires_in.map(Duration::from_secs);
        let now = Instant::now();
        if let Some(old) = inner.access.take() {
            retire(&mut inner.retired, old.token);
        }
        inner.access = Some(Access {
            token: Arc::clone(&access),
            generation: inner.generation,
            issued: now,
            refresh_at: lifetime.map(|l| now + l.saturating_sub(SKEW.min(l / 4))),
        });
        inner.failure = None;
        Ok(AccessToken {
            secret: access,
            generation: inner.generation,
        })
    }

    fn replace_refresh_token(&self, new: &Arc<Secret>) {
        let mut inner = self.lock();
        if let Some(old) = inner.refresh_token.replace(Arc::clone(new)) {
            retire(&mut inner.retired, old);
        }
    }

    /// Cover the client secret, the refresh token, the current access
    /// token, the `next` one (about to replace it: calls in flight still
    /// use the current one) and the retired values.
    fn cover(&self, next: Option<&Arc<Secret>>) -> Result<(), OAuthError> {
        let values: Vec<Arc<Secret>> = {
            let inner = self.lock();
            self.client_secret
                .iter()
                .chain(inner.refresh_token.iter())
                .chain(inner.access.as_ref().map(|a| &a.token))
                .chain(next)
                .chain(inner.retired.iter())
                .cloned()
                .collect()
        };
        self.coverage
            .set(&self.name, values)
            .map_err(|e| OAuthError::Config {
                name: self.name.clone(),
                message: e.to_string(),
            })
    }

    /// Write the rotated refresh token to the state file atomically.
    fn persist(&self, token: &Secret) -> Result<(), OAuthError> {
        let Some(path) = &self.state_file else {
            return Err(OAuthError::NoStateDirectory {
                name: self.name.clone(),
            });
        };
        let configured = self.lock().configured.unwrap_or_default();
        let stored = Stored {
            configured: hex(&configured),
            refresh_token: Zeroizing::new(String::from_utf8_lossy(token.expose()).into_owned()),
        };
        let bytes =
            Zeroizing::new(
                serde_json::to_vec(&stored).map_err(|e| OAuthError::Persist {
                    name: self.name.clone(),
                    path: path.clone(),
                    source: io::Error::other(e.to_string()),
                })?,
            );
        blocking(|| write_atomically(path, &bytes)).map_err(|source| OAuthError::Persist {
            name: self.name.clone(),
            path: path.clone(),
            source,
        })
    }

    /// One request to the token endpoint.
    async fn obtain(&self, refresh_token: Option<&Secret>) -> Result<Answer, OAuthError> {
        let name = || self.name.clone();
        // Sized once (every byte percent-encoded at worst): no
        // reallocation leaves an unwiped copy of a secret behind.
        let secrets_len = refresh_token.map_or(0, |t| t.expose().len())
            + self.client_secret.as_ref().map_or(0, |s| s.expose().len());
        let mut body = Zeroizing::new(String::with_capacity(
            3 * (secrets_len + self.client_id.len() + self.scope.as_ref().map_or(0, String::len))
                + 128,
        ));
        let mut field = |key: &str, value: &[u8]| {
            if !body.is_empty() {
                body.push('&');
            }
            body.push_str(key);
            body.push('=');
            let value = String::from_utf8_lossy(value);
            for piece in utf8_percent_encode(&value, FORM) {
                body.push_str(piece);
            }
        };
        match (self.grant, refresh_token) {
            (Grant::RefreshToken, Some(token)) => {
                field("grant_type", b"refresh_token");
                field("refresh_token", token.expose());
            }
            (Grant::RefreshToken, None) => {
                return Err(OAuthError::Config {
                    name: name(),
                    message: "has no refresh token".to_owned(),
                })
            }
            (Grant::ClientCredentials, _) => field("grant_type", b"client_credentials"),
        }
        if let Some(scope) = &self.scope {
            field("scope", scope.as_bytes());
        }
        let mut authorization = None;
        match (&self.client_secret, self.client_auth) {
            (Some(secret), ClientAuth::Basic) => {
                let mut pair = Zeroizing::new(String::with_capacity(
                    3 * (self.client_id.len() + secret.expose().len()) + 1,
                ));
                pair.extend(utf8_percent_encode(&self.client_id, FORM));
                pair.push(':');
                let secret_text =
                    Zeroizing::new(String::from_utf8_lossy(secret.expose()).into_owned());
                pair.extend(utf8_percent_encode(&secret_text, FORM));
                let mut value = Zeroizing::new(String::from("Basic "));
                base64::engine::general_purpose::STANDARD
                    .encode_string(pair.as_bytes(), &mut value);
                let mut header = reqwest::header::HeaderValue::from_str(&value).map_err(|_| {
                    OAuthError::Config {
                        name: name(),
                        message: "the client secret cannot be sent in a header".to_owned(),
                    }
                })?;
                header.set_sensitive(true);
                authorization = Some(header);
            }
            (Some(secret), ClientAuth::Post) => {
                field("client_id", self.client_id.as_bytes());
                field("client_secret", secret.expose());
            }
            (None, _) => field("client_id", self.client_id.as_bytes()),
        }
        let client = client().map_err(|message| OAuthError::Transport {
            name: name(),
            message,
        })?;
        let mut request = client
            .post(self.token_url.clone())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(reqwest::header::ACCEPT, "application/json")
            .header(reqwest::header::ACCEPT_ENCODING, "identity")
            // The HTTP stack owns (and does not wipe) this copy.
            .body(body.as_bytes().to_vec());
        if let Some(header) = authorization {
            request = request.header(reqwest::header::AUTHORIZATION, header);
        }
        let exchange = async {
            let transport = |e: reqwest::Error| OAuthError::Transport {
                name: name(),
                message: error_chain(&e.without_url()),
            };
            let mut response = request.send().await.map_err(transport)?;
            let status = response.status().as_u16();
            let mut bytes = Zeroizing::new(Vec::with_capacity(4096));
            while let Some(chunk) = response.chunk().await.map_err(transport)? {
                if bytes.len() + chunk.len() > MAX_TOKEN_RESPONSE {
                    return Err(OAuthError::BadResponse {
                        name: name(),
                        what: format!("it is larger than {MAX_TOKEN_RESPONSE} bytes"),
                    });
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(TOKEN_TIMEOUT, exchange)
            .await
            .map_err(|_| OAuthError::Timeout { name: name() })??;
        self.answer(status, &bytes)
    }

    /// Read the token endpoint's answer (RFC 6749 sections 5.1 and 5.2).
    fn answer(&self, status: u16, bytes: &[u8]) -> Result<Answer, OAuthError> {
        let name = || self.name.clone();
        if status == 200 {
            let response: TokenResponse =
                serde_json::from_slice(bytes).map_err(|_| OAuthError::BadResponse {
                    name: name(),
                    what: "it is not a JSON token response with an access_token".to_owned(),
                })?;
            if let Some(kind) = &response.token_type {
                if !kind.eq_ignore_ascii_case("bearer") {
                    return Err(OAuthError::BadResponse {
                        name: name(),
                        what: "the token type is not Bearer".to_owned(),
                    });
                }
            }
            return Ok(Answer::Tokens {
                access: response.access_token,
                refresh: response.refresh_token,
                expires_in: response.expires_in,
            });
        }
        let code = serde_json::from_slice::<ErrorResponse>(bytes)
            .ok()
            .map(|e| e.error)
            // RFC 6749 error codes are short and printable; anything else
            // is not quoted.
            .filter(|c| {
                c.len() <= 64
                    && c.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            });
        match code.as_deref() {
            Some("invalid_grant") => Ok(Answer::Rejected(match self.grant {
                Grant::RefreshToken => "the authorization server rejected the refresh token (invalid_grant); re-authorize and reload".to_owned(),
                Grant::ClientCredentials => "the authorization server rejected the grant (invalid_grant); check the client and reload".to_owned(),
            })),
            Some(code @ ("invalid_client" | "unauthorized_client")) => Ok(Answer::Rejected(format!(
                "the authorization server rejected the client credentials ({code}); fix the client id or secret and reload"
            ))),
            Some(code) => Err(OAuthError::Refused {
                name: name(),
                code: format!("HTTP {status}, {code}"),
            }),
            None => Err(OAuthError::Status {
                name: name(),
                status,
            }),
        }
    }

    /// If broken, and `refresh_token_file` now holds a different token
    /// (the admin re-authorized), take it and be usable again. A line for
    /// the reload's report when broken.
    pub fn reauthorize(&self) -> Option<String> {
        self.lock().broken.as_ref()?;
        let path = self.refresh_token_path.as_ref()?;
        let fresh = match read_secret(&self.name, path) {
            Ok(secret) => Arc::new(secret),
            Err(e) => return Some(format!("credential {} stays broken: {e}", self.name)),
        };
        let print = fingerprint(&fresh);
        {
            let mut inner = self.lock();
            if inner.configured == Some(print) {
                return Some(format!(
                    "credential {} stays broken: {} still holds the rejected refresh token",
                    self.name,
                    path.display()
                ));
            }
            if let Some(old) = inner.refresh_token.replace(Arc::clone(&fresh)) {
                retire(&mut inner.retired, old);
            }
            if let Some(old) = inner.access.take() {
                retire(&mut inner.retired, old.token);
            }
            inner.configured = Some(print);
        }
        if let Err(e) = self.cover(None) {
            return Some(format!("credential {} stays broken: {e}", self.name));
        }
        let mut inner = self.lock();
        inner.broken = None;
        inner.failure = None;
        Some(format!(
            "credential {} re-authorized from {}",
            self.name,
            path.display()
        ))
    }
}

fn retire(retired: &mut VecDeque<Arc<Secret>>, value: Arc<Secret>) {
    retired.push_back(value);
    while retired.len() > RETIRED_KEPT {
        retired.pop_front();
    }
}

/// `"credential NAME: rest"` to `"rest"`, to quote a failure again.
fn sentence_after_name(message: &str, name: &str) -> String {
    message
        .strip_prefix(&format!("credential {name}: "))
        .unwrap_or(message)
        .to_owned()
}

/// Read the state file if there is one, with the same checks as a
/// credential file (no symlink, the broker's alone).
fn read_stored(name: &str, path: &Path) -> Result<Option<Stored>, CredentialError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        _ => {}
    }
    let bytes = read_secret(name, path)?;
    serde_json::from_slice(bytes.expose())
        .map(Some)
        .map_err(|_| {
            OAuthError::State {
                name: name.to_owned(),
                path: path.to_owned(),
                message: "is not a state file of this broker; move it away to start from refresh_token_file"
                    .to_owned(),
            }
            .into()
        })
}

/// temp file (0600, new), write, fsync, rename over `path`, fsync the
/// directory (created 0700 if missing).
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let written = (|| {
        let mut file = crate::state::fresh_private(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    crate::state::sync_dir(path)
}

/// The client for token endpoints: no redirects (a redirect would carry
/// the client secret elsewhere), no proxy.
static CLIENT: OnceLock<Result<reqwest::Client, String>> = OnceLock::new();

fn client() -> Result<&'static reqwest::Client, String> {
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .connect_timeout(Duration::from_secs(10))
                .referer(false)
                .https_only(false)
                .user_agent(concat!("keyward/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| error_chain(&e))
        })
        .as_ref()
        .map_err(Clone::clone)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
