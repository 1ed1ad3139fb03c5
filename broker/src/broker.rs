// SPDX-License-Identifier: Apache-2.0
//! The state every session shares: the policy and admission limits in
//! force, the executor (which alone holds the credentials), the audit
//! sink, the token authority and the session counts.
//!
//! The accept loop ([`crate::server`]) and the sessions
//! ([`crate::session`]) both use it; reloading it lives in
//! [`crate::reload`].

use std::sync::{Arc, RwLock};

use keyward_proto::token::TokenId;

use crate::audit::Audit;
use crate::executor::Executor;
use crate::limits::{Admission, Limits, Refusal, SessionSlot, Who};
use crate::notify::Notifier;
use crate::policy::Policy;
use crate::token::Tokens;

/// The policy and the admission limits in force: one snapshot, published
/// whole (at start and by each reload), so that nobody ever sees one
/// reload's policy with another's limits.
#[derive(Debug)]
pub struct InForce {
    pub policy: Arc<Policy>,
    pub limits: Arc<Limits>,
}

/// Everything a session needs.
#[derive(Debug)]
pub struct Broker {
    in_force: RwLock<Arc<InForce>>,
    /// Every snapshot published, in order (for the tests of reload).
    #[cfg(test)]
    pub(crate) published: std::sync::Mutex<Vec<Arc<InForce>>>,
    /// The descriptor limit the session cap was derived from.
    fd_limit: u64,
    pub executor: Executor,
    pub audit: Audit,
    /// The service manager, when there is one.
    pub notifier: Notifier,
    /// The token authority; `None` without a state directory.
    pub tokens: Option<Tokens>,
    admission: Arc<Admission>,
    /// When it started (monotonic, and unix seconds), for `status`.
    started: (std::time::Instant, u64),
    /// The configuration file it serves (`None` for the built-in example).
    pub config_path: Option<std::path::PathBuf>,
    /// The socket it serves, once the listener is set up.
    pub socket_path: std::sync::OnceLock<std::path::PathBuf>,
}

impl Broker {
    /// A broker with the default limits for the descriptor limit in force.
    pub fn new(policy: Policy, executor: Executor, audit: Audit) -> Broker {
        let fd_limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        let in_force = Arc::new(InForce {
            policy: Arc::new(policy),
            limits: Arc::new(Limits::defaults(fd_limit)),
        });
        Broker {
            #[cfg(test)]
            published: std::sync::Mutex::new(vec![Arc::clone(&in_force)]),
            in_force: RwLock::new(in_force),
            fd_limit,
            executor,
            audit,
            notifier: Notifier::disabled(),
            tokens: None,
            admission: Admission::new(),
            started: (std::time::Instant::now(), crate::token::now()),
            config_path: None,
            socket_path: std::sync::OnceLock::new(),
        }
    }

    /// The configuration file it was started with (start record, status).
    pub fn with_config_path(mut self, path: Option<&std::path::Path>) -> Broker {
        self.config_path = path.map(std::path::Path::to_path_buf);
        self
    }

    /// Seconds since it started, and its start time in unix seconds.
    pub fn uptime(&self) -> (u64, u64) {
        (self.started.0.elapsed().as_secs(), self.started.1)
    }

    /// Open sessions by uid, by uid.
    pub fn sessions_by_uid(&self) -> Vec<(u32, usize)> {
        self.admission.by_uid()
    }

    /// Admit sessions within these limits, derived from `fd_limit`.
    pub fn with_limits(mut self, limits: Limits, fd_limit: u64) -> Broker {
        self.publish(self.policy(), limits);
        self.fd_limit = fd_limit;
        self
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
            self.admission.open(),
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

    /// The policy and limits in force now, together. A decision that
    /// needs both takes them from one snapshot.
    pub fn in_force(&self) -> Arc<InForce> {
        self.in_force
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The policy in force now. A session takes it once per request, so a
    /// reload applies from the next request on.
    pub fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.in_force().policy)
    }

    /// The admission limits in force now.
    pub fn limits(&self) -> Arc<Limits> {
        Arc::clone(&self.in_force().limits)
    }

    /// The descriptor limit the session cap is derived from.
    pub fn fd_limit(&self) -> u64 {
        self.fd_limit
    }

    /// Put a new policy and limits in force (a reload), in one swap.
    pub(crate) fn replace(&self, policy: Policy, limits: Limits) {
        self.publish(Arc::new(policy), limits);
    }

    fn publish(&self, policy: Arc<Policy>, limits: Limits) {
        let in_force = Arc::new(InForce {
            policy,
            limits: Arc::new(limits),
        });
        #[cfg(test)]
        self.published
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::clone(&in_force));
        // The old snapshot is dropped after the lock is released.
        let _old = std::mem::replace(
            &mut *self.in_force.write().unwrap_or_else(|p| p.into_inner()),
            in_force,
        );
    }

    /// Sessions open now.
    pub fn open_sessions(&self) -> usize {
        self.admission.open()
    }

    /// Who `uid` is to admission. Root and the admin uids are privileged
    /// in their own sessions only: a session acting with a token (bound,
    /// or a channel of a bound one) has only the token's authority, and
    /// takes no reserved slot and no exemption from the rate limit, whoever
    /// its uid (a sandbox an admin runs is no admin).
    fn who(&self, policy: &Policy, uid: u32, with_token: bool) -> Who {
        Who {
            uid,
            privileged: !with_token && (uid == 0 || policy.broker.admin_uids.contains(&uid)),
            per_uid: policy.broker.max_connections_per_uid,
        }
    }

    /// A slot for a new session (connection or channel) of `uid`, acting
    /// with `token` if given; refused beyond the limits.
    pub fn admit(&self, uid: u32, token: Option<TokenId>) -> Result<SessionSlot, Refusal> {
        let now = self.in_force();
        let who = self.who(&now.policy, uid, token.is_some());
        self.admission.admit(&now.limits, who, token)
    }

    /// Count a connection's slot against the token it is being bound to;
    /// refused if the token is at its cap, or if the slot is one of the
    /// reserve (a bound session takes none).
    pub fn attach_token(&self, slot: &mut SessionSlot, id: TokenId) -> Result<(), Refusal> {
        self.admission.attach_token(&self.limits(), slot, id)
    }

    /// Take one request of a session of `uid` (acting with a token if
    /// `with_token`) from `uid`'s rate budget; `Err((refusal, first))`
    /// when it is spent, `first` for the first refusal of a run.
    pub fn rate(&self, uid: u32, with_token: bool) -> Result<(), (Refusal, bool)> {
        let now = self.in_force();
        let who = self.who(&now.policy, uid, with_token);
        // A privileged session takes nothing (`Admission::request`).
        self.admission.request(&now.limits, who)
    }

    /// Whether to record a refusal of `uid` now (see
    /// [`Admission::record_refusal`]).
    pub fn record_refusal(&self, uid: u32) -> Option<u64> {
        self.admission.record_refusal(uid)
    }
}
