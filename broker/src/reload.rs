// SPDX-License-Identifier: Apache-2.0
//! Reloading the configuration on SIGHUP: the new policy and limits apply
//! from the next request on, published together as one snapshot (a
//! session never sees one reload's policy with another's limits), or, if
//! they are not valid, the old ones stay.
//! Either way the outcome is an audit record saying why.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::audit::{Decision, Event, Record};
use crate::broker::Broker;
use crate::config::{ConfigError, Located, Source};
use crate::limits::{Limits, LimitsError};
use crate::policy::Policy;

/// Why a reloaded configuration was not put in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Policy(Vec<Located>),
    #[error(transparent)]
    Limits(#[from] LimitsError),
    #[error(
        "tool {tool:?} uses credential {credential:?}, which was not loaded at start; \
         restart the broker to load new credentials"
    )]
    CredentialNotLoaded { tool: String, credential: String },
    #[error(
        "tool {tool:?} {wants} credential {credential:?}, which was loaded at start as {loaded}; \
         restart the broker to load it anew"
    )]
    CredentialKindChanged {
        tool: String,
        credential: String,
        wants: &'static str,
        loaded: &'static str,
    },
    #[error(
        "tool {tool:?} sends credential {credential:?} as HTTP Basic user {user:?}, \
         which redaction was not set up for at start; restart the broker"
    )]
    BasicUserNotRegistered {
        tool: String,
        credential: String,
        user: String,
    },
}

impl Broker {
    /// Re-read the configuration at `path`; if it is valid and needs no
    /// credential that was not loaded at start, its policy and limits
    /// apply from the next request on. Otherwise those in force stay.
    /// Either way the outcome is an audit record saying why.
    pub fn reload(&self, path: &Path) -> Result<(), ReloadError> {
        self.notifier.reloading();
        let result = self.load_policy(path);
        let outcome = match result {
            Ok((policy, limits, summary)) => {
                self.replace(policy, limits);
                let mut reason = format!(
                    "{}: {summary} (socket and credential changes apply at the next restart)",
                    path.display()
                );
                // A broken OAuth credential whose refresh token the admin
                // replaced is usable again.
                for line in self.executor.credentials().reauthorize() {
                    eprintln!("keyward-broker: {line}");
                    reason.push_str("; ");
                    reason.push_str(&line);
                }
                let _ = self
                    .audit
                    .must_record(&Record::new(Event::Reload, Decision::Info).reason(&reason));
                Ok(())
            }
            Err(e) => {
                // Config errors name the file and line already.
                let mut reason = e.to_string();
                if !reason.contains(&*path.to_string_lossy()) {
                    reason = format!("{}: {reason}", path.display());
                }
                eprintln!("keyward-broker: reload failed, keeping the old policy: {reason}");
                let _ = self
                    .audit
                    .must_record(&Record::new(Event::Reload, Decision::Error).reason(&reason));
                Err(e)
            }
        };
        self.notifier.ready(&self.status());
        outcome
    }

    fn load_policy(&self, path: &Path) -> Result<(Policy, Limits, String), ReloadError> {
        let source = Source::load(path)?;
        let policy = Policy::compile(&source).map_err(ReloadError::Policy)?;
        let limits = Limits::from_config(&source.config.broker, self.fd_limit())?;
        let credentials = self.executor.credentials();
        for tool in policy.tools() {
            let Some(credential) = &tool.credential else {
                continue;
            };
            if !credentials.contains(credential) {
                return Err(ReloadError::CredentialNotLoaded {
                    tool: tool.name.clone(),
                    credential: credential.clone(),
                });
            }
            // An AWS key sent whole as a bearer would reach the upstream.
            let is_aws = credentials.aws(credential).is_some();
            if tool.action.uses_aws_key() != is_aws {
                return Err(ReloadError::CredentialKindChanged {
                    tool: tool.name.clone(),
                    credential: credential.clone(),
                    wants: if is_aws {
                        "sends, not signs with,"
                    } else {
                        "signs with"
                    },
                    loaded: if is_aws {
                        "an AWS key"
                    } else {
                        "a plain secret"
                    },
                });
            }
            if let Some((credential, user)) = tool.action.basic_user() {
                if !credentials.has_basic_user(credential, user) {
                    return Err(ReloadError::BasicUserNotRegistered {
                        tool: tool.name.clone(),
                        credential: credential.to_owned(),
                        user: user.to_owned(),
                    });
                }
            }
        }
        let summary = format!(
            "{} principals, {} tools",
            source.config.principals.len(),
            source.config.tools.len()
        );
        Ok((policy, limits, summary))
    }
}

/// Reload the configuration at `config` on every SIGHUP, for as long as
/// the returned future runs. The handler is installed before this returns,
/// so a SIGHUP after startup never kills the broker (its default action);
/// without a file (the built-in example) a SIGHUP is only reported.
pub fn reload_on_hangup(
    broker: Arc<Broker>,
    config: Option<PathBuf>,
) -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = signal(SignalKind::hangup())?;
    Ok(async move {
        while hangups.recv().await.is_some() {
            let Some(path) = config.clone() else {
                eprintln!(
                    "keyward-broker: SIGHUP ignored: the built-in example has no file to reload"
                );
                continue;
            };
            let broker = Arc::clone(&broker);
            // Reading and compiling the policy is blocking work.
            let _ = tokio::task::spawn_blocking(move || broker.reload(&path)).await;
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::audit::Audit;
    use crate::broker::InForce;
    use crate::credential::Credentials;
    use crate::executor::Executor;

    /// Configuration `n`: its policy allows `n` connections per uid, its
    /// limits `10 n` requests a second, so a snapshot shows whether its
    /// two halves come from the same file.
    fn config(n: usize) -> String {
        format!(
            r#"
[broker]
socket = "/nonexistent/broker.sock"
max_connections_per_uid = {n}
requests_per_second = {rate}
request_burst = {rate}

[[principal]]
name = "orch"
uids = [1000]
may_call = ["echo"]

[[tool]]
name = "echo"
kind = "echo"
params.message = {{ type = "string", max_len = 10 }}
"#,
            rate = n * 10
        )
    }

    fn whole(s: &InForce) -> bool {
        s.limits.requests_per_second as usize == s.policy.broker.max_connections_per_uid * 10
    }

    #[test]
    fn a_reload_publishes_policy_and_limits_as_one_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, config(1)).unwrap();
        let source = Source::load(&path).unwrap();
        let policy = Policy::compile(&source).unwrap();
        let limits = Limits::from_config(&source.config.broker, 1024).unwrap();
        let credentials = Credentials::from_values(Vec::<(String, String)>::new()).unwrap();
        let broker = Broker::new(policy, Executor::new(credentials).unwrap(), Audit::memory())
            .with_limits(limits, 1024);
        let start = broker.published.lock().unwrap().len() - 1;
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            // Sessions deciding while the reloads go on.
            let reader = scope.spawn(|| {
                let mut seen = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let now = broker.in_force();
                    assert!(
                        whole(&now),
                        "policy of {} with limits of {}",
                        now.policy.broker.max_connections_per_uid,
                        now.limits.requests_per_second / 10
                    );
                    seen += 1;
                }
                seen
            });
            for n in 2..=50 {
                std::fs::write(&path, config(n)).unwrap();
                broker.reload(&path).unwrap();
                let now = broker.in_force();
                assert_eq!(now.policy.broker.max_connections_per_uid, n);
                assert!(whole(&now));
            }
            stop.store(true, Ordering::Relaxed);
            assert!(reader.join().unwrap() > 0);
        });
        // Not one snapshot was ever published with one reload's policy
        // and another's limits.
        let published = broker.published.lock().unwrap();
        for s in &published[start..] {
            assert!(
                whole(s),
                "published: the policy of {} with the limits of {}",
                s.policy.broker.max_connections_per_uid,
                s.limits.requests_per_second / 10
            );
        }
        assert_eq!(published.len() - start, 50, "one publication per reload");
    }
}
