// SPDX-License-Identifier: Apache-2.0
//! The accept loop and the state every session shares.
//!
//! [`serve`] takes an already-bound [`Listener`] and a shutdown future, so
//! a self-bound socket, a socket-activated one and every test share one
//! path. On shutdown it stops accepting, lets every in-flight call finish
//! and reply, and only then returns.
//!
//! Under systemd, `serve` reports `READY=1` once it is about to accept,
//! keeps the watchdog fed from a task that only pings after the accept
//! loop itself has answered (a stalled loop stops the pings, and systemd
//! restarts the broker), keeps `STATUS=` current, and reports
//! `STOPPING=1` on shutdown. [`reload_on_hangup`] re-reads the policy on
//! SIGHUP and keeps the old one if the new one is not valid.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::{Audit, AuditError, Decision, Event, Record};
use crate::config::{ConfigError, Located, Source};
use crate::executor::Executor;
use crate::listener::Listener;
use crate::notify::Notifier;
use crate::policy::{Action, Policy};
use crate::session;
use crate::token::Tokens;

/// How often `STATUS=` is refreshed when no watchdog sets the pace.
const STATUS_PERIOD: Duration = Duration::from_secs(5);

/// Everything a session needs: the policy, the executor (which alone holds
/// the credentials), the audit sink and the per-uid connection counts.
#[derive(Debug)]
pub struct Broker {
    policy: RwLock<Arc<Policy>>,
    pub executor: Executor,
    pub audit: Audit,
    /// The service manager, when there is one.
    pub notifier: Notifier,
    /// The token authority; `None` without a state directory.
    pub tokens: Option<Tokens>,
    connections: Mutex<HashMap<u32, usize>>,
    /// Sessions being served now.
    open_sessions: AtomicUsize,
}

/// Why a reloaded configuration was not put in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Policy(Vec<Located>),
    #[error(
        "tool {tool:?} uses credential {credential:?}, which was not loaded at start; \
         restart the broker to load new credentials"
    )]
    CredentialNotLoaded { tool: String, credential: String },
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
    pub fn new(policy: Policy, executor: Executor, audit: Audit) -> Broker {
        Broker {
            policy: RwLock::new(Arc::new(policy)),
            executor,
            audit,
            notifier: Notifier::disabled(),
            tokens: None,
            connections: Mutex::new(HashMap::new()),
            open_sessions: AtomicUsize::new(0),
        }
    }

    /// Mint, verify and revoke tokens with this authority.
    pub fn with_tokens(mut self, tokens: Tokens) -> Broker {
        self.tokens = Some(tokens);
        self
    }

    /// Report readiness, status and liveness to this service manager.
    pub fn with_notifier(mut self, notifier: Notifier) -> Broker {
        self.notifier = notifier;
        self
    }

    /// A one-line summary for `systemctl status`.
    pub fn status(&self) -> String {
        let c = self.audit.counts();
        let mut status = format!(
            "serving: {} open sessions; {} calls ({} allowed, {} denied, {} failed); {} refused",
            self.open_sessions.load(Ordering::Relaxed),
            c.calls_allowed + c.calls_denied + c.calls_failed,
            c.calls_allowed,
            c.calls_denied,
            c.calls_failed,
            c.refused,
        );
        if c.write_failures > 0 {
            status.push_str(&format!("; {} audit write failures", c.write_failures));
        }
        status
    }

    /// Re-read the configuration at `path`; if it is valid and needs no
    /// credential that was not loaded at start, its policy applies from
    /// the next request on. Otherwise the policy in force stays. Either
    /// way the outcome is an audit record saying why.
    pub fn reload(&self, path: &Path) -> Result<(), ReloadError> {
        self.notifier.reloading();
        let result = self.load_policy(path);
        let outcome = match result {
            Ok((policy, summary)) => {
                *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
                let reason = format!(
                    "{}: {summary} (socket and credential changes apply at the next restart)",
                    path.display()
                );
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

    fn load_policy(&self, path: &Path) -> Result<(Policy, String), ReloadError> {
        let source = Source::load(path)?;
        let policy = Policy::compile(&source).map_err(ReloadError::Policy)?;
        let credentials = self.executor.credentials();
        for tool in policy.tools() {
            let Some(credential) = &tool.credential else {
                continue;
            };
            if credentials.get(credential).is_none() {
                return Err(ReloadError::CredentialNotLoaded {
                    tool: tool.name.clone(),
                    credential: credential.clone(),
                });
            }
            if let Action::Http(http) = &tool.action {
                if let Some((credential, user)) = http.basic_user() {
                    if !credentials.has_basic_user(credential, user) {
                        return Err(ReloadError::BasicUserNotRegistered {
                            tool: tool.name.clone(),
                            credential: credential.to_owned(),
                            user: user.to_owned(),
                        });
                    }
                }
            }
        }
        let summary = format!(
            "{} principals, {} tools",
            source.config.principals.len(),
            source.config.tools.len()
        );
        Ok((policy, summary))
    }

    /// The policy in force now. A session takes it once per request, so a
    /// reload applies from the next request on.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reserve a connection slot for `uid`, or `None` when it already holds
    /// `max_connections_per_uid` connections.
    pub fn admit(self: &Arc<Self>, uid: u32) -> Option<ConnectionSlot> {
        let max = self.policy().broker.max_connections_per_uid;
        let mut counts = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(uid).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(ConnectionSlot {
            broker: Arc::clone(self),
            uid,
        })
    }
}

/// A held connection slot; released on drop.
#[derive(Debug)]
pub struct ConnectionSlot {
    broker: Arc<Broker>,
    uid: u32,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut counts = self
            .broker
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.uid) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.uid);
            }
        }
    }
}

/// Serve `listener` until `shutdown` resolves, then drain.
pub async fn serve(
    listener: Listener,
    broker: Arc<Broker>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AuditError> {
    broker
        .audit
        .must_record(&Record::new(Event::Start, Decision::Info))?;
    let sessions = TaskTracker::new();
    let stopping = CancellationToken::new();
    // The keep-alive task asks the accept loop to answer before it tells
    // systemd the broker is alive. `heartbeat` stays open while we loop.
    let (heartbeat, mut heartbeats) = mpsc::channel::<oneshot::Sender<()>>(1);
    broker.notifier.ready(&broker.status());
    let keep_alive = broker
        .notifier
        .enabled()
        .then(|| tokio::spawn(keep_alive(Arc::clone(&broker), heartbeat.clone())));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(ack) = heartbeats.recv() => {
                let _ = ack.send(());
            }
            accepted = listener.accept() => match accepted {
                Ok(conn) => {
                    let broker = Arc::clone(&broker);
                    let shared = session::Sessions {
                        tracker: sessions.clone(),
                        stopping: stopping.clone(),
                    };
                    sessions.spawn(async move {
                        let _open = OpenSession::enter(&broker);
                        session::run(conn, Arc::clone(&broker), shared).await;
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the
                    // pending connection stays queued.
                    eprintln!("keyward-broker: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    broker.notifier.stopping();
    if let Some(task) = keep_alive {
        task.abort();
    }
    drop(heartbeat);
    // Stop accepting (and unlink a self-bound socket) before draining.
    drop(listener);
    stopping.cancel();
    sessions.close();
    sessions.wait().await;
    broker
        .audit
        .must_record(&Record::new(Event::Stop, Decision::Info))?;
    Ok(())
}

/// Counts a session as open for as long as it lives.
struct OpenSession<'a>(&'a Broker);

impl<'a> OpenSession<'a> {
    fn enter(broker: &'a Broker) -> OpenSession<'a> {
        broker.open_sessions.fetch_add(1, Ordering::Relaxed);
        OpenSession(broker)
    }
}

impl Drop for OpenSession<'_> {
    fn drop(&mut self) {
        self.0.open_sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Feed the watchdog at half its interval, but only after the accept loop
/// has answered a heartbeat: if the loop (or the runtime under it) stalls,
/// the pings stop and systemd restarts the broker. Refresh `STATUS=` when
/// it changed.
async fn keep_alive(broker: Arc<Broker>, heartbeat: mpsc::Sender<oneshot::Sender<()>>) {
    let watchdog = broker.notifier.watchdog();
    let period = watchdog.map_or(STATUS_PERIOD, |w| (w / 2).max(Duration::from_millis(1)));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shown = broker.status();
    loop {
        ticker.tick().await;
        let status = broker.status();
        let changed = (status != shown).then_some(status.as_str());
        if watchdog.is_some() {
            let (ack, answered) = oneshot::channel();
            if heartbeat.send(ack).await.is_err() {
                return;
            }
            match tokio::time::timeout(period, answered).await {
                Ok(Ok(())) => broker.notifier.watchdog_ping(changed),
                // No answer: no ping. systemd acts once the interval passes.
                _ => continue,
            }
        } else if let Some(status) = changed {
            broker.notifier.status(status);
        }
        shown = status;
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
