// SPDX-License-Identifier: Apache-2.0
//! Introspection for admins and token holders: `keyward-broker status`
//! and `tokens` (root, the broker's own uid or `admin_uids` only), `agent-shim token inspect`.
//!
//! What these answer never carries a credential value or a token string:
//! credential names and states, token ids, hashes and counts. Who may ask
//! is decided here; the session only routes the request.

use keyward_proto::token::Verified;
use keyward_proto::{CredentialStatus, StatusReport, TokenList, TokenSummary, UidSessions};

use crate::broker::Broker;
use crate::credential::CredentialState;
use crate::policy::{Caller, Policy};
use crate::token::Tokens;

/// Whether `uid` may see the broker's status and every token: root, an
/// admin uid of the policy in force, or the broker's own uid (the unit's
/// `ExecReload=` runs `check --reload` as it; a process of that uid can
/// read the broker's state directory anyway).
pub fn is_admin(policy: &Policy, uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw() || policy.broker.admin_uids.contains(&uid)
}

/// Whether a credential state from [`credential_states`] says the broker
/// does not hold it.
pub fn is_not_loaded(state: &str) -> bool {
    state.starts_with(NOT_LOADED)
}

const NOT_LOADED: &str = "not loaded";

/// The denial for a caller who is not an admin: it names the rule and
/// nothing of the broker's state.
pub fn not_admin(what: &str, uid: u32) -> String {
    format!("{what} denied: uid {uid} is neither root nor in the policy's admin_uids")
}

/// Whether `caller` may inspect `token`: its audience, its issuer, or an
/// admin. (Anyone holding the string can decode its grants; what the
/// broker adds is its use count and whether it was revoked.)
pub fn may_inspect(policy: &Policy, caller: &Caller, token: &Verified) -> bool {
    let body = &token.body;
    is_admin(policy, caller.uid)
        || (caller.uid == body.audience.uid && body.audience.gid.is_none_or(|g| g == caller.gid))
        || policy.principals_of(caller).any(|p| p.name == body.issuer)
}

/// The broker's state for `keyward-broker status`.
pub fn report(broker: &Broker) -> StatusReport {
    let policy = broker.policy();
    let (uptime_secs, started_at) = broker.uptime();
    let counts = broker.audit.counts();
    StatusReport {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at,
        uptime_secs,
        config: broker.config_path.as_deref().map_or_else(
            || "(built-in example)".to_owned(),
            |p| p.display().to_string(),
        ),
        socket: broker
            .socket_path
            .get()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        policy_loaded_at: policy.loaded_at,
        policy_hash: policy.source_hash,
        sessions: broker
            .sessions_by_uid()
            .into_iter()
            .map(|(uid, n)| UidSessions {
                uid,
                sessions: n as u64,
            })
            .collect(),
        live_tokens: broker.tokens.as_ref().map(|t| t.live_tokens().len() as u64),
        credentials: credential_states(broker, &policy),
        calls_allowed: counts.calls_allowed,
        calls_denied: counts.calls_denied,
        calls_failed: counts.calls_failed,
        refused: counts.refused,
    }
}

/// Every credential the broker holds or the policy in force names, with
/// its state, by name. The one place a credential's state is read:
/// a new kind of credential (OAuth refresh, ...) adds its states here.
pub fn credential_states(broker: &Broker, policy: &Policy) -> Vec<CredentialStatus> {
    let credentials = broker.executor.credentials();
    let mut names: Vec<&str> = credentials.names().collect();
    names.extend(policy.tools().filter_map(|t| t.credential.as_deref()));
    names.extend(policy.broker.signing_key.as_deref());
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .map(|name| CredentialStatus {
            name: name.to_owned(),
            state: match (credentials.get(name), credentials.state(name)) {
                (Some(secret), _) if secret.is_locked() => "loaded".to_owned(),
                (Some(_), _) => "loaded (not locked in memory: it may be swapped out)".to_owned(),
                // A token credential (oauth2): what its refreshes came to.
                (None, Some(CredentialState::Loaded)) => "loaded".to_owned(),
                (None, Some(CredentialState::Refreshing)) => "refreshing".to_owned(),
                (None, Some(CredentialState::Broken(reason))) => format!("broken: {reason}"),
                (None, None) => {
                    format!("{NOT_LOADED} (the policy names it; restart the broker to load it)")
                }
            },
        })
        .collect()
}

/// Every token the broker's state records, for `keyward-broker tokens`.
pub fn token_list(tokens: &Tokens) -> TokenList {
    TokenList {
        tokens: tokens
            .live_tokens()
            .into_iter()
            .map(|(id, record, uses, revoked)| {
                let issued = tokens.issued(&id);
                TokenSummary {
                    id,
                    issuer: record.issuer,
                    owner: record.owner,
                    audience: issued.as_ref().map(|i| i.audience),
                    task: issued.as_ref().map(|i| i.task),
                    parent: issued.as_ref().and_then(|i| i.lineage.last().copied()),
                    uses,
                    max_uses: record.max_uses,
                    expires: record.expires,
                    revoked,
                }
            })
            .collect(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    use crate::audit::Audit;
    use crate::config::Source;
    use crate::credential::Credentials;
    use crate::executor::Executor;

    const VALUE: &str = "status-test-secret-0123456789";

    fn broker() -> Broker {
        let source = Source::parse(
            "t.toml",
            r#"
[broker]
socket = "/nonexistent/broker.sock"
admin_uids = [900]

[[principal]]
name = "orch"
uids = [1000]
may_call = ["a", "b"]

[credential.api]
file = "api.token"

[credential.spare]
file = "spare.token"

[[tool]]
name = "a"
kind = "http"
credential = "api"
method = "GET"
url = "http://127.0.0.1:9/a"
auth = { bearer = true }

[[tool]]
name = "b"
kind = "http"
credential = "spare"
method = "GET"
url = "http://127.0.0.1:9/b"
auth = { bearer = true }
"#
            .to_owned(),
        )
        .unwrap();
        let policy = Policy::compile(&source).unwrap();
        // "spare" is named by a tool but not loaded (as after a reload).
        let credentials = Credentials::from_values([("api", VALUE)]).unwrap();
        Broker::new(policy, Executor::new(credentials).unwrap(), Audit::memory())
    }

    #[test]
    fn credentials_are_names_and_states_never_values() {
        let broker = broker();
        let states = credential_states(&broker, &broker.policy());
        let names: Vec<_> = states.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["api", "spare"]);
        assert!(states[0].state.starts_with("loaded"), "{states:?}");
        assert!(states[1].state.starts_with("not loaded"), "{states:?}");
        assert!(!is_not_loaded(&states[0].state) && is_not_loaded(&states[1].state));
        let report = report(&broker);
        assert_eq!(report.credentials, states);
        assert_eq!(report.live_tokens, None, "no state directory");
        assert!(!format!("{report:?}").contains(VALUE));
        assert!(!format!("{report:?}").contains("status-test"));
    }

    #[test]
    fn only_root_and_admin_uids_are_admins() {
        let broker = broker();
        let policy = broker.policy();
        assert!(is_admin(&policy, 0));
        assert!(is_admin(&policy, 900));
        assert!(is_admin(&policy, nix::unistd::geteuid().as_raw()));
        // A stranger: not root, not 900, not the uid the test runs as.
        let own = nix::unistd::geteuid().as_raw();
        let stranger = (1000..).find(|&u| u != own).unwrap();
        assert!(!is_admin(&policy, stranger));
        assert!(!is_admin(&policy, 901));
    }
}
