// SPDX-License-Identifier: Apache-2.0
//! Capability tokens on the broker side: mint, verify, bind, use,
//! attenuate, revoke.
//!
//! Authority flows one way: a principal mints a token only for tools in
//! its `may_delegate`, within each tool's policy and the TTL cap; a holder
//! may attenuate it to a strict subset; a use must satisfy a grant *and*
//! the tool's policy *and* the issuer's current `may_delegate`, so a token
//! can narrow policy but never widen it, and a policy change takes effect
//! for tokens already out. Everything that decides is here; the session
//! only routes messages.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyward_proto::token::{self, Audience, Constraint, Grant, TokenBody, TokenId, Verified};
use keyward_proto::{Attenuate, Call, Mint, Minted, TokenInfo, ToolInfo, Value};

use crate::credential::Credentials;
use crate::keys::{KeyError, Keys};
use crate::policy::{
    compile_pattern, show_str, AuthorizedCall, Caller, Denial, Denied, ParamSpec, Policy,
    TypedValue,
};
use crate::state::{MintRecord, Origin, StateError, TokenState, UseError};

mod constraint;

pub use constraint::describe_constraint;
use constraint::{add_constraints, describe_tool, prefix_satisfied, wire_eq};

/// Lifetime of a minted token when the minter asks for none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(5 * 60);
/// Longest attenuation chain.
pub const MAX_LINEAGE: usize = 16;
/// Most grants in one token.
const MAX_GRANTS: usize = 64;
/// Most constraints in one grant.
const MAX_CONSTRAINTS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum TokenSetupError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("signing_key names credential {0:?}, which was not loaded")]
    MissingCredential(String),
    #[error("no state directory: set state_dir in [broker] (or StateDirectory= under systemd)")]
    NoStateDirectory,
}

/// Most children one bound session may attenuate.
pub const MAX_ATTENUATIONS_PER_SESSION: u32 = 64;
/// Most channels open at once over one bound session.
pub const MAX_CHANNELS_PER_SESSION: usize = 16;

/// A verified token bound to a session (shared by its channels), with the
/// id and task hash as audit records show them (computed once, at bind),
/// and the session's use of attenuation and channels.
#[derive(Debug)]
pub struct BoundToken {
    pub verified: Verified,
    pub id_hex: String,
    pub task_hex: String,
    /// The ids of its ancestors, nearest first, space-separated (empty
    /// for a minted token): the `parent_token_id` of its records.
    pub parents_hex: String,
    attenuations: AtomicU32,
    channels: AtomicUsize,
}

/// A channel slot of a bound session; released on drop.
#[derive(Debug)]
pub struct ChannelSlot(std::sync::Arc<BoundToken>);

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.0.channels.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A refused bind: the denial, and the token when its signature was good
/// (so the refusal can be audited under its id).
#[derive(Debug)]
pub struct BindRefused {
    pub denial: Denial,
    pub token: Option<Box<BoundToken>>,
}

impl BoundToken {
    fn new(verified: Verified) -> BoundToken {
        BoundToken {
            id_hex: verified.body.id.to_string(),
            task_hex: token::hex(&verified.body.task),
            parents_hex: ancestors_text(&verified.body.lineage),
            verified,
            attenuations: AtomicU32::new(0),
            channels: AtomicUsize::new(0),
        }
    }

    /// Reserve a channel slot, or `None` at [`MAX_CHANNELS_PER_SESSION`].
    pub fn open_channel(self: &std::sync::Arc<Self>) -> Option<ChannelSlot> {
        let taken = self.channels.fetch_add(1, Ordering::Relaxed);
        let slot = ChannelSlot(std::sync::Arc::clone(self));
        (taken < MAX_CHANNELS_PER_SESSION).then_some(slot)
    }

    pub fn id(&self) -> TokenId {
        self.verified.body.id
    }

    /// Whether a use may write the state file: when the token or an
    /// ancestor (whose limit lives in the state) counts uses.
    pub fn counts_uses(&self) -> bool {
        let body = &self.verified.body;
        body.max_uses.is_some() || !body.lineage.is_empty()
    }
}

/// Ancestor ids (`lineage`, root first) as audit records show them:
/// nearest first, separated by spaces.
pub fn ancestors_text(lineage: &[TokenId]) -> String {
    let mut text = String::with_capacity(lineage.len() * 33);
    for id in lineage.iter().rev() {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(&id.to_string());
    }
    text
}

/// Where a token this broker issued came from, as its state records it:
/// for `keyward-broker tokens` and the audit records of a revocation.
/// Persisted with the mint, so a restart keeps it (tokens recorded before
/// the state kept it have none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub audience: Audience,
    pub task: [u8; 32],
    /// Ancestors, root first.
    pub lineage: Vec<TokenId>,
    pub expires: u64,
}

/// The broker's token authority: its key and its persistent state.
#[derive(Debug)]
pub struct Tokens {
    keys: Keys,
    state: TokenState,
    /// Compiled token patterns, by source text.
    patterns: Mutex<HashMap<String, regex::Regex>>,
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The state directory: `$STATE_DIRECTORY` (systemd's `StateDirectory=`)
/// or the configured one.
pub fn state_directory(configured: Option<&Path>) -> Option<PathBuf> {
    crate::state::directory(configured)
}

impl Tokens {
    /// Open the state directory and load (or generate) the signing key.
    pub fn open(
        policy: &Policy,
        state_dir: &Path,
        credentials: &Credentials,
    ) -> Result<Tokens, TokenSetupError> {
        // Before anything in it is read or created.
        crate::state::check_directory(state_dir)?;
        let keys = match &policy.broker.signing_key {
            Some(name) => {
                let secret = credentials
                    .get(name)
                    .ok_or_else(|| TokenSetupError::MissingCredential(name.clone()))?;
                Keys::from_credential(name, secret)?
            }
            None => Keys::load_or_create(state_dir)?,
        };
        Ok(Tokens {
            keys,
            state: TokenState::open(state_dir)?,
            patterns: Mutex::new(HashMap::new()),
        })
    }

    // -- mint ---------------------------------------------------------------

    /// Mint a token for a principal caller.
    pub fn mint(
        &self,
        policy: &Policy,
        caller: &Caller,
        request: &Mint,
        now: u64,
    ) -> Result<Minted, Denial> {
        let refuse = |why: String| Denial::new(Denied::Mint, why);
        if request.tools.is_empty() {
            return Err(refuse("the token would grant no tool".into()));
        }
        if request.tools.len() > MAX_GRANTS {
            return Err(refuse(format!("more than {MAX_GRANTS} tools")));
        }
        let principals: Vec<_> = policy.principals_of(caller).collect();
        if principals.is_empty() {
            return Err(refuse(format!(
                "uid {} (gid {}) is not a principal in the broker policy",
                caller.uid, caller.gid
            )));
        }
        let issuer = principals
            .iter()
            .find(|p| {
                request
                    .tools
                    .iter()
                    .all(|tool| p.may_delegate.contains(tool))
            })
            .ok_or_else(|| {
                let tool = request
                    .tools
                    .iter()
                    .find(|tool| !principals.iter().any(|p| p.may_delegate.contains(tool)))
                    .map(String::as_str)
                    .unwrap_or_default();
                refuse(format!(
                    "principal {:?} may not delegate tool {}",
                    principals
                        .first()
                        .map(|p| p.name.as_str())
                        .unwrap_or_default(),
                    show_str(tool)
                ))
            })?;
        let mut grants = Vec::with_capacity(request.tools.len());
        for name in &request.tools {
            let tool = policy
                .tool(name)
                .ok_or_else(|| refuse(format!("unknown tool {}", show_str(name))))?;
            grants.push(Grant {
                tool: tool.name.clone(),
                params: Vec::new(),
            });
        }
        add_constraints(policy, &mut grants, &request.params, false).map_err(refuse)?;
        let ttl = match request.ttl_secs {
            Some(secs) => Duration::from_secs(secs),
            None => DEFAULT_TTL.min(policy.broker.max_token_ttl),
        };
        if ttl > policy.broker.max_token_ttl {
            return Err(refuse(format!(
                "a TTL of {} exceeds the policy's max_token_ttl of {}",
                humantime::format_duration(ttl),
                humantime::format_duration(policy.broker.max_token_ttl)
            )));
        }
        if ttl.is_zero() {
            return Err(refuse("a TTL of zero".into()));
        }
        if request.max_uses == Some(0) {
            return Err(refuse("max_uses of zero".into()));
        }
        let call_hash = if request.exact_call {
            Some(exact_call_hash(policy, &grants).map_err(refuse)?)
        } else {
            None
        };
        let body = TokenBody {
            id: random_id().map_err(refuse)?,
            issuer: issuer.name.clone(),
            task: token::task_hash(&request.task),
            audience: request.audience.unwrap_or(Audience {
                uid: caller.uid,
                gid: None,
            }),
            not_before: now,
            expires: now.saturating_add(ttl.as_secs()),
            max_uses: request.max_uses,
            grants,
            call_hash,
            parent: None,
            lineage: Vec::new(),
        };
        self.issue(body, policy, caller, now).map_err(refuse)
    }

    /// Sign, record (within the caller's caps), hand out.
    fn issue(
        &self,
        body: TokenBody,
        policy: &Policy,
        caller: &Caller,
        now: u64,
    ) -> Result<Minted, String> {
        let token = self.keys.sign_token(&body);
        // A token its own broker would refuse, or that does not fit in a
        // reply, is never recorded or handed out.
        if token.len() > token::MAX_TOKEN_LEN {
            return Err(format!(
                "the token would be {} bytes, more than the {}-byte limit",
                token.len(),
                token::MAX_TOKEN_LEN
            ));
        }
        self.state
            .record_mint(
                body.id,
                MintRecord {
                    issuer: body.issuer.clone(),
                    expires: body.expires,
                    max_uses: body.max_uses,
                    owner: caller.uid,
                    attenuated: body.parent.is_some(),
                    origin: Some(Origin {
                        audience: body.audience,
                        task: body.task,
                        lineage: body.lineage.clone(),
                    }),
                },
                policy.broker.token_limits,
                now,
            )
            .map_err(|e| match e {
                StateError::LiveCap { .. }
                | StateError::AttenuationCap { .. }
                | StateError::SpentCap { .. } => e.to_string(),
                e => format!("cannot record the token: {e}"),
            })?;
        Ok(Minted {
            token,
            id: body.id,
            expires: body.expires,
        })
    }

    /// Where `id` came from, if this broker issued it (and has not
    /// forgotten it since it expired) and recorded its origin.
    pub fn issued(&self, id: &TokenId) -> Option<Issued> {
        let record = self.state.minted(id)?;
        let origin = record.origin?;
        Some(Issued {
            audience: origin.audience,
            task: origin.task,
            lineage: origin.lineage,
            expires: record.expires,
        })
    }

    /// What the state records of a token this broker minted (and has not
    /// forgotten since it expired).
    pub fn minted(&self, id: &TokenId) -> Option<MintRecord> {
        self.state.minted(id)
    }

    /// Every token the state records, with its uses so far and whether it
    /// is revoked (itself or through an ancestor), by expiry.
    pub fn live_tokens(&self) -> Vec<(TokenId, MintRecord, u32, bool)> {
        let mut tokens: Vec<_> = self
            .state
            .minted_all()
            .into_iter()
            .map(|(id, record, uses)| {
                // Revoked itself, or through an ancestor.
                let lineage = record.origin.as_ref().map_or(&[][..], |o| &o.lineage[..]);
                let revoked = self.revoked(id, lineage).is_some();
                (id, record, uses, revoked)
            })
            .collect();
        tokens.sort_by_key(|(id, record, ..)| (record.expires, *id));
        tokens
    }

    /// Uses of `id` counted so far.
    pub fn uses(&self, id: &TokenId) -> u32 {
        self.state.uses(id)
    }

    /// Whether `id` or an ancestor in `lineage` is revoked.
    pub fn revoked(&self, id: TokenId, lineage: &[TokenId]) -> Option<TokenId> {
        self.state
            .revoked_among(lineage.iter().chain(std::iter::once(&id)))
    }

    /// Check a token's signature (and nothing else: for inspection).
    pub fn decode(&self, token: &str) -> Result<Verified, Denial> {
        token::verify(token, &self.keys.verifying())
            .map_err(|e| Denial::new(Denied::Token(None), e.to_string()))
    }

    /// The current (clock-checked) time of the state.
    pub fn clock(&self, now: u64) -> u64 {
        self.state.clock(now)
    }

    /// What a (signature-checked) token allows under the policy in force,
    /// how much of it is left, and why it cannot be used now if so.
    pub fn inspect(&self, policy: &Policy, verified: &Verified, now: u64) -> TokenInfo {
        let now = self.state.clock(now);
        let body = &verified.body;
        let unusable = if now < body.not_before {
            Some("it is not valid yet".to_owned())
        } else if now >= body.expires {
            Some("it has expired".to_owned())
        } else {
            self.revoked(body.id, &body.lineage).map(|revoked| {
                if revoked == body.id {
                    "it has been revoked".to_owned()
                } else {
                    format!("its parent token {revoked} has been revoked")
                }
            })
        };
        let issuer = policy.principal(&body.issuer);
        let tools = body
            .grants
            .iter()
            .filter_map(|grant| {
                let tool = policy.tool(&grant.tool)?;
                let may = issuer.is_some_and(|p| p.may_delegate.iter().any(|t| *t == tool.name));
                may.then(|| describe_tool(tool, &grant.params))
            })
            .collect();
        TokenInfo {
            id: body.id,
            issuer: body.issuer.clone(),
            task: body.task,
            audience: body.audience,
            not_before: body.not_before,
            expires: body.expires,
            now,
            max_uses: body.max_uses,
            uses: self.state.uses(&body.id),
            lineage: body.lineage.clone(),
            exact_call: body.call_hash.is_some(),
            unusable,
            tools,
        }
    }

    // -- verify and bind ----------------------------------------------------

    /// Check everything about a presented token that does not depend on a
    /// particular call: signature, time, audience against the caller's
    /// kernel identity, revocation.
    pub fn verify(
        &self,
        caller: &Caller,
        token: &str,
        now: u64,
    ) -> Result<BoundToken, BindRefused> {
        let verified = token::verify(token, &self.keys.verifying()).map_err(|e| BindRefused {
            denial: Denial::new(Denied::Token(None), e.to_string()),
            token: None,
        })?;
        let bound = BoundToken::new(verified);
        match self.check_live(caller, &bound, now) {
            Ok(()) => Ok(bound),
            Err(denial) => Err(BindRefused {
                denial,
                token: Some(Box::new(bound)),
            }),
        }
    }

    /// The checks a bound token must pass again at every use.
    pub fn check_live(&self, caller: &Caller, bound: &BoundToken, now: u64) -> Result<(), Denial> {
        let now = self.state.clock(now);
        let body = &bound.verified.body;
        let id = body.id;
        let deny = |why: String| Denial::new(Denied::Token(Some(id)), why);
        if now < body.not_before {
            return Err(deny("it is not valid yet".into()));
        }
        if now >= body.expires {
            return Err(deny("it has expired".into()));
        }
        if caller.uid != body.audience.uid || body.audience.gid.is_some_and(|g| g != caller.gid) {
            return Err(deny(format!(
                "it was issued for uid {}, not uid {}",
                body.audience.uid, caller.uid
            )));
        }
        if let Some(revoked) = self
            .state
            .revoked_among(body.lineage.iter().chain(std::iter::once(&id)))
        {
            return Err(deny(if revoked == id {
                "it has been revoked".into()
            } else {
                format!("its parent token {revoked} has been revoked")
            }));
        }
        Ok(())
    }

    // -- use -----------------------------------------------------------------

    /// Authorize a call made with a bound token: live checks, a grant for
    /// the tool, the tool's policy, the grant's constraints, the call hash,
    /// the issuer's current right to delegate, and finally one use.
    pub fn authorize(
        &self,
        policy: &Policy,
        caller: &Caller,
        bound: &BoundToken,
        call: &Call,
        now: u64,
    ) -> Result<AuthorizedCall, Denial> {
        self.check_live(caller, bound, now)?;
        let body = &bound.verified.body;
        let id = body.id;
        let denied = |why: String| Denial::new(Denied::Call, format!("token {id} {why}"));
        let grant = body
            .grants
            .iter()
            .find(|g| g.tool == call.tool)
            .ok_or_else(|| denied(format!("does not grant tool {}", show_str(&call.tool))))?;
        let tool = policy.tool(&grant.tool).ok_or_else(|| {
            denied(format!(
                "grants tool {:?}, which the policy no longer has",
                grant.tool
            ))
        })?;
        let issuer_may = policy
            .principal(&body.issuer)
            .is_some_and(|p| p.may_delegate.iter().any(|t| *t == tool.name));
        if !issuer_may {
            return Err(denied(format!(
                "was issued by {:?}, which may no longer delegate tool {}",
                body.issuer, tool.name
            )));
        }
        // The tool's own policy first: a token never widens it.
        let params = tool.check_params(&call.params)?;
        for pc in &grant.params {
            let value = params.get(&pc.name);
            let ok = match value {
                Some(value) => self.satisfies(value, &pc.constraint, tool.params.get(&pc.name)),
                None => false,
            };
            if !ok {
                let secret = tool.params.get(&pc.name).is_some_and(|p| p.secret);
                let shown = match (value, secret) {
                    (_, true) => "[secret]".to_owned(),
                    (Some(TypedValue::Str(s)), false) => show_str(s),
                    (Some(v), false) => v.to_text(),
                    (None, false) => "(absent)".to_owned(),
                };
                return Err(denied(format!(
                    "limits parameter {:?} of tool {} to {}; {} is outside it",
                    pc.name,
                    tool.name,
                    describe_constraint(&pc.constraint, secret),
                    shown
                )));
            }
        }
        if let Some(expected) = body.call_hash {
            if call_hash_of(&tool.name, &params) != expected {
                return Err(denied(
                    "is good for exactly one call, and this is not it".into(),
                ));
            }
        }
        self.consume(bound, now).map_err(denied)?;
        Ok(AuthorizedCall {
            tool: std::sync::Arc::clone(tool),
            principal: body.issuer.clone(),
            params,
        })
    }

    /// Count a use against the token and every limited ancestor.
    fn consume(&self, bound: &BoundToken, now: u64) -> Result<(), String> {
        let body = &bound.verified.body;
        let mut limits = Vec::new();
        if let Some(max) = body.max_uses {
            limits.push((body.id, max));
        }
        for ancestor in &body.lineage {
            if let Some(max) = self.state.minted(ancestor).and_then(|m| m.max_uses) {
                limits.push((*ancestor, max));
            }
        }
        match self.state.consume(&limits, now) {
            Ok(()) => Ok(()),
            Err(UseError::Exhausted(id)) if id == body.id => Err(format!(
                "has used all of its {} uses",
                body.max_uses.unwrap_or(0)
            )),
            Err(UseError::Exhausted(id)) => Err(format!("has a parent {id} with no uses left")),
            Err(UseError::State(e)) => Err(format!("could not be counted: {e}")),
        }
    }

    fn satisfies(
        &self,
        value: &TypedValue,
        constraint: &Constraint,
        spec: Option<&ParamSpec>,
    ) -> bool {
        match (constraint, value) {
            (Constraint::Any, _) => true,
            (Constraint::Exact(v), value) => wire_eq(v, value),
            (Constraint::OneOf(vs), value) => vs.iter().any(|v| wire_eq(v, value)),
            (Constraint::Prefix(p), TypedValue::Str(s)) => prefix_satisfied(spec, p, s),
            (Constraint::Range { min, max }, TypedValue::Int(i)) => min <= i && i <= max,
            (Constraint::Pattern(p), TypedValue::Str(s)) => self.pattern_matches(p, s),
            _ => false,
        }
    }

    fn pattern_matches(&self, pattern: &str, s: &str) -> bool {
        let mut cache = self.patterns.lock().unwrap_or_else(|p| p.into_inner());
        if !cache.contains_key(pattern) {
            let Ok(re) = compile_pattern(pattern) else {
                return false;
            };
            if cache.len() >= 1024 {
                cache.clear();
            }
            cache.insert(pattern.to_owned(), re);
        }
        cache.get(pattern).is_some_and(|re| re.is_match(s))
    }

    // -- attenuate ----------------------------------------------------------

    /// Mint a strict subset of a bound token for its holder.
    pub fn attenuate(
        &self,
        policy: &Policy,
        caller: &Caller,
        bound: &BoundToken,
        request: &Attenuate,
        now: u64,
    ) -> Result<Minted, Denial> {
        let parent = &bound.verified.body;
        let refuse = |why: String| Denial::new(Denied::Attenuation, why);
        self.check_live(caller, bound, now)
            .map_err(|d| refuse(d.to_string()))?;
        if bound.attenuations.fetch_add(1, Ordering::Relaxed) >= MAX_ATTENUATIONS_PER_SESSION {
            return Err(refuse(format!(
                "this session has already attenuated {MAX_ATTENUATIONS_PER_SESSION} tokens"
            )));
        }
        if parent.lineage.len() >= MAX_LINEAGE {
            return Err(refuse(format!(
                "the chain is already {MAX_LINEAGE} tokens deep"
            )));
        }
        for tool in &request.tools {
            if !parent.grants.iter().any(|g| g.tool == *tool) {
                return Err(refuse(format!(
                    "the token does not grant tool {}, so a child cannot",
                    show_str(tool)
                )));
            }
        }
        let mut grants: Vec<Grant> = parent
            .grants
            .iter()
            .filter(|g| request.tools.is_empty() || request.tools.contains(&g.tool))
            .cloned()
            .collect();
        add_constraints(policy, &mut grants, &request.params, true).map_err(refuse)?;
        let expires = match request.ttl_secs {
            Some(secs) => now.saturating_add(secs),
            None => parent.expires,
        };
        if expires > parent.expires {
            return Err(refuse(format!(
                "the child would outlive its parent (which expires in {}s)",
                parent.expires.saturating_sub(now)
            )));
        }
        let remaining = parent
            .max_uses
            .map(|max| max.saturating_sub(self.state.uses(&parent.id)));
        let max_uses = match (request.max_uses, remaining) {
            (Some(0), _) => return Err(refuse("max_uses of zero".into())),
            (Some(asked), Some(left)) if asked > left => {
                return Err(refuse(format!(
                    "{asked} uses asked, but the token has only {left} left"
                )))
            }
            (Some(asked), _) => Some(asked),
            (None, left) => left,
        };
        if max_uses == Some(0) {
            return Err(refuse("the token has no uses left".into()));
        }
        let mut lineage = parent.lineage.clone();
        lineage.push(parent.id);
        let body = TokenBody {
            id: random_id().map_err(refuse)?,
            issuer: parent.issuer.clone(),
            // The same task: every record of a descendant joins the
            // task's trail.
            task: parent.task,
            audience: parent.audience,
            not_before: now,
            expires,
            max_uses,
            grants,
            call_hash: parent.call_hash,
            parent: Some(bound.verified.hash),
            lineage,
        };
        self.issue(body, policy, caller, now).map_err(refuse)
    }

    // -- revoke ---------------------------------------------------------------

    /// Revoke a token: root, an admin uid, or the token's issuer.
    pub fn revoke(
        &self,
        policy: &Policy,
        caller: &Caller,
        id: TokenId,
        now: u64,
    ) -> Result<(), Denial> {
        let refuse = |why: String| Denial::new(Denied::Revocation(id), why);
        let admin = caller.uid == 0 || policy.broker.admin_uids.contains(&caller.uid);
        // With a key of its own (made in the state directory) no other
        // broker can issue a token this one accepts: an id it has no
        // record of was never issued, or has expired and is dead anyway.
        // With a shared signing_key, tokens minted elsewhere are valid
        // here, so an admin may revoke an id this broker never saw.
        if admin && policy.broker.signing_key.is_none() && self.state.minted(&id).is_none() {
            return Err(refuse(
                "this broker never issued it (or it has expired and been forgotten); \
                 nothing was revoked"
                    .into(),
            ));
        }
        if !admin {
            let record = self
                .state
                .minted(&id)
                .ok_or_else(|| refuse("this broker did not mint it (or it has expired)".into()))?;
            let is_issuer = policy
                .principals_of(caller)
                .any(|p| p.name == record.issuer);
            if !is_issuer {
                return Err(refuse(format!(
                    "only root, an admin uid or its issuer {:?} may revoke it",
                    record.issuer
                )));
            }
        }
        self.state
            .revoke(id, now)
            .map_err(|e| refuse(format!("cannot record it: {e}")))
    }

    // -- tools ---------------------------------------------------------------

    /// What a bound token allows, tool by tool.
    pub fn tools(
        &self,
        policy: &Policy,
        caller: &Caller,
        bound: &BoundToken,
        now: u64,
    ) -> Result<Vec<ToolInfo>, Denial> {
        self.check_live(caller, bound, now)?;
        let body = &bound.verified.body;
        Ok(body
            .grants
            .iter()
            .filter_map(|grant| {
                let tool = policy.tool(&grant.tool)?;
                let may = policy
                    .principal(&body.issuer)
                    .is_some_and(|p| p.may_delegate.iter().any(|t| *t == tool.name));
                may.then(|| describe_tool(tool, &grant.params))
            })
            .collect())
    }
}

/// What a principal caller may call directly.
pub fn principal_tools(policy: &Policy, caller: &Caller) -> Vec<ToolInfo> {
    let mut names: Vec<&str> = policy
        .principals_of(caller)
        .flat_map(|p| p.may_call.iter().map(String::as_str))
        .collect();
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .filter_map(|name| policy.tool(name))
        .map(|tool| describe_tool(tool, &[]))
        .collect()
}

/// The canonical hash of an authorized call: tool and every typed
/// parameter (defaults included), sorted by name.
pub fn call_hash_of(
    tool: &str,
    params: &std::collections::BTreeMap<String, TypedValue>,
) -> [u8; 32] {
    let wire: Vec<(String, Value)> = params
        .iter()
        .map(|(name, value)| (name.clone(), value.to_wire()))
        .collect();
    token::call_hash(tool, &wire)
}

/// For `exact_call`: the one call the grant's `Exact` constraints spell
/// out, through the tool's policy, hashed.
fn exact_call_hash(policy: &Policy, grants: &[Grant]) -> Result<[u8; 32], String> {
    let [grant] = grants else {
        return Err("an exact-call token must grant exactly one tool".into());
    };
    let tool = policy
        .tool(&grant.tool)
        .ok_or_else(|| format!("unknown tool {}", show_str(&grant.tool)))?;
    let mut params = Vec::new();
    for pc in &grant.params {
        match &pc.constraint {
            Constraint::Exact(v) => params.push(keyward_proto::Param {
                name: pc.name.clone(),
                value: v.clone(),
            }),
            _ => {
                return Err(format!(
                    "an exact-call token pins every parameter with exact values; {:?} is not",
                    pc.name
                ))
            }
        }
    }
    let typed = tool.check_params(&params).map_err(|d| d.why)?;
    Ok(call_hash_of(&tool.name, &typed))
}

fn random_id() -> Result<TokenId, String> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| format!("no randomness for a token id: {e}"))?;
    Ok(TokenId(id))
}

#[cfg(test)]
mod tests;
