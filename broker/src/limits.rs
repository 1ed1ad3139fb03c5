// SPDX-License-Identifier: Apache-2.0
//! Admission control: no peer can starve the others or lock out root.
//!
//! Every session — a connection, or a channel passed over a bound one —
//! holds a [`SessionSlot`] for as long as it lives. A slot is granted only
//! while:
//! - the broker serves fewer than [`Limits::max_sessions`] sessions, a cap
//!   derived from the descriptor limit (each session holds its socket and
//!   a pidfd) with [`FD_HEADROOM`] descriptors kept for the broker's own
//!   files and upstream connections, so the broker never runs out;
//! - of those, the last [`Limits::reserved_sessions`] go to root's and the
//!   `admin_uids`' own sessions only, so they can always connect and
//!   revoke (a session acting with a token, whoever its uid, takes none);
//! - the uid holds fewer than `max_connections_per_uid` sessions, channels
//!   included;
//! - a session acting with a token: the token has fewer than
//!   [`Limits::max_sessions_per_token`] sessions open.
//!
//! Requests are also rate-limited per uid (a token bucket of
//! [`Limits::request_burst`] refilled at [`Limits::requests_per_second`]),
//! a `Channel` too; root's and the admin uids' own sessions are not, their
//! token-bound ones are. Refused channels are recorded at most once per
//! [`REFUSAL_RECORD_PERIOD`] per uid.
//!
//! Tests: the unit tests below; `tests/tests/abuse.rs` floods the real
//! broker as a hostile uid.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyward_proto::token::TokenId;

use crate::config::BrokerConfig;

/// Descriptors each session holds: its socket and its peer's pidfd.
pub const FDS_PER_SESSION: u64 = 2;
/// Descriptors kept outside the session cap: the listener, the state and
/// audit files, upstream HTTP connections, and connections being refused.
pub const FD_HEADROOM: u64 = 128;
/// Default of `reserved_sessions`.
pub const DEFAULT_RESERVED_SESSIONS: usize = 32;
/// Default of `max_sessions_per_token`.
pub const DEFAULT_MAX_SESSIONS_PER_TOKEN: usize = 64;
/// Default of `requests_per_second`.
pub const DEFAULT_REQUESTS_PER_SECOND: u32 = 200;
/// Default of `request_burst`.
pub const DEFAULT_REQUEST_BURST: u32 = 400;

/// Why the limits in a configuration cannot be put in force.
#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("[broker] {key}: must be greater than zero")]
    Zero { key: &'static str },
    #[error(
        "[broker] reserved_sessions = {reserved}: must be less than max_sessions ({max}), \
         or nobody but root and the admin uids could connect"
    )]
    ReserveTooLarge { reserved: usize, max: usize },
    #[error("cannot raise the descriptor limit: {0}")]
    Rlimit(nix::Error),
}

/// The admission limits in force.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_sessions: usize,
    pub reserved_sessions: usize,
    pub max_sessions_per_token: usize,
    pub requests_per_second: u32,
    pub request_burst: u32,
}

impl Limits {
    /// The limits `cfg` asks for, with `max_sessions` kept within what
    /// `fd_limit` descriptors can serve.
    pub fn from_config(cfg: &BrokerConfig, fd_limit: u64) -> Result<Limits, LimitsError> {
        Limits::resolve(
            &Keys {
                max_sessions: cfg.max_sessions,
                reserved_sessions: cfg.reserved_sessions,
                max_sessions_per_token: cfg.max_sessions_per_token,
                requests_per_second: cfg.requests_per_second,
                request_burst: cfg.request_burst,
            },
            fd_limit,
        )
    }

    /// The default limits for `fd_limit` descriptors.
    pub fn defaults(fd_limit: u64) -> Limits {
        Limits::resolve(&Keys::default(), fd_limit).unwrap_or(Limits {
            max_sessions: 2,
            reserved_sessions: 1,
            max_sessions_per_token: DEFAULT_MAX_SESSIONS_PER_TOKEN,
            requests_per_second: DEFAULT_REQUESTS_PER_SECOND,
            request_burst: DEFAULT_REQUEST_BURST,
        })
    }

    fn resolve(cfg: &Keys, fd_limit: u64) -> Result<Limits, LimitsError> {
        let capacity = usize::try_from(fd_limit.saturating_sub(FD_HEADROOM) / FDS_PER_SESSION)
            .unwrap_or(usize::MAX)
            .max(2);
        let nonzero = |value: Option<usize>, default: usize, key| match value {
            Some(0) => Err(LimitsError::Zero { key }),
            Some(v) => Ok(v),
            None => Ok(default),
        };
        let wanted = nonzero(cfg.max_sessions, capacity, "max_sessions")?;
        if wanted > capacity {
            eprintln!(
                "keyward-broker: max_sessions = {wanted} exceeds what {fd_limit} descriptors \
                 can serve; using {capacity}"
            );
        }
        let max_sessions = wanted.min(capacity);
        let reserved_sessions = match cfg.reserved_sessions {
            Some(r) if r >= max_sessions => {
                return Err(LimitsError::ReserveTooLarge {
                    reserved: r,
                    max: max_sessions,
                })
            }
            Some(r) => r,
            None => DEFAULT_RESERVED_SESSIONS.min(max_sessions / 2),
        };
        let u32_nonzero = |value: Option<u32>, default: u32, key| match value {
            Some(0) => Err(LimitsError::Zero { key }),
            Some(v) => Ok(v),
            None => Ok(default),
        };
        Ok(Limits {
            max_sessions,
            reserved_sessions,
            max_sessions_per_token: nonzero(
                cfg.max_sessions_per_token,
                DEFAULT_MAX_SESSIONS_PER_TOKEN,
                "max_sessions_per_token",
            )?,
            requests_per_second: u32_nonzero(
                cfg.requests_per_second,
                DEFAULT_REQUESTS_PER_SECOND,
                "requests_per_second",
            )?,
            request_burst: u32_nonzero(cfg.request_burst, DEFAULT_REQUEST_BURST, "request_burst")?,
        })
    }
}

impl Limits {
    /// How many sessions may be open for a new one to be admitted: all of
    /// them for root's and the admin uids' own sessions, all but the
    /// reserve for everyone else.
    fn ceiling(&self, privileged: bool) -> usize {
        if privileged {
            self.max_sessions
        } else {
            self.max_sessions - self.reserved_sessions.min(self.max_sessions)
        }
    }
}

/// The configuration keys the limits are made of.
#[derive(Debug, Default)]
struct Keys {
    max_sessions: Option<usize>,
    reserved_sessions: Option<usize>,
    max_sessions_per_token: Option<usize>,
    requests_per_second: Option<u32>,
    request_burst: Option<u32>,
}

/// Raise the soft descriptor limit to the hard one; returns the limit now
/// in force.
pub fn raise_fd_limit() -> Result<u64, LimitsError> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(LimitsError::Rlimit)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(LimitsError::Rlimit)?;
    }
    Ok(hard.max(soft))
}

/// Why a session or a request was not admitted. Each message is one
/// sentence naming what was refused and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "session refused: the broker is serving its maximum of {max} sessions \
         (the last {reserved} are kept for root and admin uids)"
    )]
    Full { max: usize, reserved: usize },
    #[error(
        "session refused: uid {uid} already holds its maximum of {max} connections and channels"
    )]
    Uid { uid: u32, max: usize },
    #[error("session refused: token {id} already has its maximum of {max} sessions open")]
    Token { id: TokenId, max: usize },
    #[error("rate limited: uid {uid} exceeded {rate} requests per second; retry later")]
    RateLimited { uid: u32, rate: u32 },
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_uid: HashMap<u32, usize>,
    by_token: HashMap<TokenId, usize>,
}

impl Counts {
    fn release(&mut self, uid: u32, token: Option<TokenId>) {
        self.total = self.total.saturating_sub(1);
        decrement(&mut self.by_uid, uid);
        if let Some(id) = token {
            decrement(&mut self.by_token, id);
        }
    }
}

fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: K) {
    if let Some(count) = map.get_mut(&key) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            map.remove(&key);
        }
    }
}

/// A uid's token bucket.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// Requests refused since the last one admitted: only the first of a
    /// run is audited.
    refused: u64,
}

/// At most one refusal record per uid per this period (see
/// [`Admission::record_refusal`]).
pub const REFUSAL_RECORD_PERIOD: Duration = Duration::from_secs(1);

/// When a uid's last refusal was recorded, and how many went unrecorded
/// since.
#[derive(Debug)]
struct Quiet {
    at: Instant,
    unrecorded: u64,
}

/// Who may take what: the counts of open sessions and the request buckets.
#[derive(Debug, Default)]
pub struct Admission {
    counts: Mutex<Counts>,
    buckets: Mutex<HashMap<u32, Bucket>>,
    quiet: Mutex<HashMap<u32, Quiet>>,
}

/// What the caller of [`Admission::admit`] knows about the uid.
#[derive(Debug, Clone, Copy)]
pub struct Who {
    pub uid: u32,
    /// Root or an admin uid: may take the reserve, is not rate-limited.
    pub privileged: bool,
    /// `max_connections_per_uid` in force.
    pub per_uid: usize,
}

impl Admission {
    pub fn new() -> Arc<Admission> {
        Arc::new(Admission::default())
    }

    /// Sessions open now.
    pub fn open(&self) -> usize {
        self.lock().total
    }

    /// Sessions open now, per uid, by uid.
    pub fn by_uid(&self) -> Vec<(u32, usize)> {
        let mut all: Vec<_> = self.lock().by_uid.iter().map(|(u, n)| (*u, *n)).collect();
        all.sort_unstable();
        all
    }

    /// Sessions `uid` holds now.
    pub fn held_by(&self, uid: u32) -> usize {
        self.lock().by_uid.get(&uid).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a new session of `who`, acting with `token` if given.
    pub fn admit(
        self: &Arc<Self>,
        limits: &Limits,
        who: Who,
        token: Option<TokenId>,
    ) -> Result<SessionSlot, Refusal> {
        let mut counts = self.lock();
        if counts.total >= limits.ceiling(who.privileged) {
            return Err(Refusal::Full {
                max: limits.max_sessions,
                reserved: limits.reserved_sessions,
            });
        }
        if counts.by_uid.get(&who.uid).copied().unwrap_or(0) >= who.per_uid {
            return Err(Refusal::Uid {
                uid: who.uid,
                max: who.per_uid,
            });
        }
        if let Some(id) = token {
            if counts.by_token.get(&id).copied().unwrap_or(0) >= limits.max_sessions_per_token {
                return Err(Refusal::Token {
                    id,
                    max: limits.max_sessions_per_token,
                });
            }
            *counts.by_token.entry(id).or_insert(0) += 1;
        }
        counts.total += 1;
        *counts.by_uid.entry(who.uid).or_insert(0) += 1;
        Ok(SessionSlot {
            admission: Arc::clone(self),
            uid: who.uid,
            token,
        })
    }

    /// Count `slot` against `id` from now on (a connection being bound).
    /// A bound session is admitted like any session acting with a token:
    /// not while the broker is into the reserve (this slot, counted
    /// already, may be one of it: root's or an admin's connection).
    pub fn attach_token(
        &self,
        limits: &Limits,
        slot: &mut SessionSlot,
        id: TokenId,
    ) -> Result<(), Refusal> {
        let mut counts = self.lock();
        if counts.total > limits.ceiling(false) {
            return Err(Refusal::Full {
                max: limits.max_sessions,
                reserved: limits.reserved_sessions,
            });
        }
        if let Some(old) = slot.token.take() {
            decrement(&mut counts.by_token, old);
        }
        let count = counts.by_token.entry(id).or_insert(0);
        if *count >= limits.max_sessions_per_token {
            if *count == 0 {
                counts.by_token.remove(&id);
            }
            return Err(Refusal::Token {
                id,
                max: limits.max_sessions_per_token,
            });
        }
        *count += 1;
        slot.token = Some(id);
        Ok(())
    }

    /// Take one request from `who`'s bucket. `Err((refusal, first))`
    /// when it is empty; `first` is true for the first refusal of a run.
    pub fn request(&self, limits: &Limits, who: Who) -> Result<(), (Refusal, bool)> {
        self.request_at(limits, who, Instant::now())
    }

    fn request_at(&self, limits: &Limits, who: Who, now: Instant) -> Result<(), (Refusal, bool)> {
        if who.privileged {
            return Ok(());
        }
        let burst = f64::from(limits.request_burst);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        // Forget full buckets now and then, so the map stays small.
        if buckets.len() > 4096 {
            let rate = f64::from(limits.requests_per_second);
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
        }
        let bucket = buckets.entry(who.uid).or_insert(Bucket {
            tokens: burst,
            at: now,
            refused: 0,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens =
            (bucket.tokens + elapsed * f64::from(limits.requests_per_second)).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            bucket.refused = 0;
            Ok(())
        } else {
            bucket.refused += 1;
            Err((
                Refusal::RateLimited {
                    uid: who.uid,
                    rate: limits.requests_per_second,
                },
                bucket.refused == 1,
            ))
        }
    }
}

impl Admission {
    /// Whether to record a refusal of `uid` now: `Some(n)` at most once
    /// per [`REFUSAL_RECORD_PERIOD`], `n` being how many refusals went
    /// unrecorded since the last record; `None` otherwise (counted for the
    /// next record).
    pub fn record_refusal(&self, uid: u32) -> Option<u64> {
        self.record_refusal_at(uid, Instant::now())
    }

    fn record_refusal_at(&self, uid: u32, now: Instant) -> Option<u64> {
        let mut quiet = self.quiet.lock().unwrap_or_else(|p| p.into_inner());
        // Forget uids quiet for a period now and then, so the map stays
        // small (a forgotten uid had nothing unrecorded worth keeping
        // beyond a period: its next refusal is recorded anyway).
        if quiet.len() > 4096 {
            quiet.retain(|_, q| now.saturating_duration_since(q.at) < REFUSAL_RECORD_PERIOD);
        }
        match quiet.get_mut(&uid) {
            Some(q) if now.saturating_duration_since(q.at) < REFUSAL_RECORD_PERIOD => {
                q.unrecorded += 1;
                None
            }
            Some(q) => {
                q.at = now;
                Some(std::mem::take(&mut q.unrecorded))
            }
            None => {
                quiet.insert(
                    uid,
                    Quiet {
                        at: now,
                        unrecorded: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

/// A held session slot; released on drop.
#[derive(Debug)]
pub struct SessionSlot {
    admission: Arc<Admission>,
    uid: u32,
    token: Option<TokenId>,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.admission.lock().release(self.uid, self.token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_sessions: 10,
            reserved_sessions: 2,
            max_sessions_per_token: 3,
            requests_per_second: 10,
            request_burst: 5,
        }
    }

    fn who(uid: u32, per_uid: usize) -> Who {
        Who {
            uid,
            privileged: uid == 0,
            per_uid,
        }
    }

    #[test]
    fn the_reserve_is_kept_for_privileged_uids() {
        let a = Admission::new();
        let l = limits();
        let held: Vec<_> = (0..8)
            .map(|i| a.admit(&l, who(1000 + i, 100), None).unwrap())
            .collect();
        assert_eq!(
            a.admit(&l, who(2000, 100), None).unwrap_err(),
            Refusal::Full {
                max: 10,
                reserved: 2
            }
        );
        let root: Vec<_> = (0..2)
            .map(|_| a.admit(&l, who(0, 100), None).unwrap())
            .collect();
        assert!(a.admit(&l, who(0, 100), None).is_err());
        drop(held);
        assert_eq!(a.open(), 2);
        drop(root);
        assert_eq!(a.open(), 0);
    }

    #[test]
    fn per_uid_and_per_token_caps() {
        let a = Admission::new();
        let l = limits();
        let id = TokenId([7; 16]);
        let _one = a.admit(&l, who(5, 2), Some(id)).unwrap();
        let mut two = a.admit(&l, who(5, 2), None).unwrap();
        assert_eq!(
            a.admit(&l, who(5, 2), None).unwrap_err(),
            Refusal::Uid { uid: 5, max: 2 }
        );
        a.attach_token(&l, &mut two, id).unwrap();
        let _three = a.admit(&l, who(6, 2), Some(id)).unwrap();
        assert_eq!(
            a.admit(&l, who(7, 2), Some(id)).unwrap_err(),
            Refusal::Token { id, max: 3 }
        );
        drop(two);
        assert_eq!(a.held_by(5), 1);
        assert!(a.admit(&l, who(7, 2), Some(id)).is_ok());
    }

    #[test]
    fn a_refused_attach_leaves_no_count() {
        let a = Admission::new();
        let mut l = limits();
        l.max_sessions_per_token = 1;
        let id = TokenId([1; 16]);
        let _held = a.admit(&l, who(5, 9), Some(id)).unwrap();
        let mut other = a.admit(&l, who(5, 9), None).unwrap();
        assert!(a.attach_token(&l, &mut other, id).is_err());
        drop(other);
        assert_eq!(a.lock().by_token.get(&id), Some(&1));
    }

    #[test]
    fn the_bucket_refills_at_the_rate() {
        let a = Admission::new();
        let l = limits();
        let t0 = Instant::now();
        for _ in 0..5 {
            a.request_at(&l, who(5, 1), t0).unwrap();
        }
        let (refusal, first) = a.request_at(&l, who(5, 1), t0).unwrap_err();
        assert!(first);
        assert!(refusal.to_string().starts_with("rate limited"), "{refusal}");
        assert!(!a.request_at(&l, who(5, 1), t0).unwrap_err().1);
        // Another uid has its own bucket; root has none.
        a.request_at(&l, who(6, 1), t0).unwrap();
        for _ in 0..100 {
            a.request_at(&l, who(0, 1), t0).unwrap();
        }
        // 10 per second: one more after 100 ms.
        let t1 = t0 + Duration::from_millis(110);
        a.request_at(&l, who(5, 1), t1).unwrap();
        assert!(a.request_at(&l, who(5, 1), t1).is_err());
    }

    #[test]
    fn a_session_in_the_reserve_cannot_be_bound() {
        let a = Admission::new();
        let l = limits();
        let id = TokenId([3; 16]);
        let mut held: Vec<_> = (0..8)
            .map(|_| a.admit(&l, who(0, 100), None).unwrap())
            .collect();
        // Root's own ninth connection takes the reserve...
        let mut ninth = a.admit(&l, who(0, 100), None).unwrap();
        // ...but cannot then act with a token from it.
        assert_eq!(
            a.attach_token(&l, &mut ninth, id).unwrap_err(),
            Refusal::Full {
                max: 10,
                reserved: 2
            }
        );
        drop(ninth);
        a.attach_token(&l, &mut held[0], id).unwrap();
    }

    #[test]
    fn refusals_are_recorded_once_a_period() {
        let a = Admission::new();
        let t0 = Instant::now();
        assert_eq!(a.record_refusal_at(5, t0), Some(0));
        for _ in 0..1000 {
            assert_eq!(a.record_refusal_at(5, t0), None);
        }
        // Another uid is counted apart.
        assert_eq!(a.record_refusal_at(6, t0), Some(0));
        let t1 = t0 + REFUSAL_RECORD_PERIOD;
        assert_eq!(a.record_refusal_at(5, t1), Some(1000));
        assert_eq!(a.record_refusal_at(5, t1), None);
    }

    #[test]
    fn limits_follow_the_descriptor_limit() {
        let text = "[broker]\nsocket = \"/tmp/s\"\n".to_owned();
        let src = crate::config::Source::parse("b.toml", text).unwrap();
        let l = Limits::from_config(&src.config.broker, 1024).unwrap();
        assert_eq!(l.max_sessions, (1024 - 128) / 2);
        assert_eq!(l.reserved_sessions, DEFAULT_RESERVED_SESSIONS);
        let text = "[broker]\nsocket = \"/tmp/s\"\nmax_sessions = 100000\nreserved_sessions = 10\n"
            .to_owned();
        let src = crate::config::Source::parse("b.toml", text).unwrap();
        let l = Limits::from_config(&src.config.broker, 1024).unwrap();
        assert_eq!(l.max_sessions, 448);
        assert_eq!(l.reserved_sessions, 10);
        let text =
            "[broker]\nsocket = \"/tmp/s\"\nmax_sessions = 8\nreserved_sessions = 8\n".to_owned();
        let src = crate::config::Source::parse("b.toml", text).unwrap();
        assert!(Limits::from_config(&src.config.broker, 1024).is_err());
    }
}
