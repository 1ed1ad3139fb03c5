// SPDX-License-Identifier: Apache-2.0
//! Persistent token state: revocations, use counters and the registry of
//! tokens this broker minted (issuer, expiry, use limit).
//!
//! Kept in `tokens.json` in the state directory and rewritten atomically
//! (temporary file, fsync, rename, fsync of the directory) on every change
//! and *before* the change takes effect: a crash at any point loses
//! nothing — a revocation or a use is either on disk or was never honoured.
//! Entries of expired tokens are pruned on write: an expired token is
//! refused on its expiry alone, and no descendant outlives its parent. So
//! that a clock stepped back cannot revive a pruned token, the state keeps
//! the latest time it has seen, persisted, and "now" never goes below it.
//!
//! Reads that every call makes (is this token revoked?) go to an in-memory
//! snapshot and never wait behind a write's fsync.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use serde::{Deserialize, Serialize};

use keyward_proto::token::TokenId;

/// File name in the state directory.
pub const STATE_FILE: &str = "tokens.json";
const FORMAT_VERSION: u32 = 1;
/// Expiry recorded for a revoked token this broker did not mint.
const UNKNOWN_EXPIRY: u64 = u64::MAX;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("token state {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token state {path} is corrupt ({message}); refusing to start rather than forget revocations")]
    Corrupt { path: PathBuf, message: String },
}

/// What the broker remembers of a token it minted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MintRecord {
    pub issuer: String,
    pub expires: u64,
    pub max_uses: Option<u32>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Persisted {
    version: u32,
    /// Revoked id -> its expiry (when known).
    revoked: BTreeMap<TokenIdHex, u64>,
    /// Id -> uses so far, for tokens with a use limit.
    uses: BTreeMap<TokenIdHex, u32>,
    /// Tokens minted (or attenuated) here.
    minted: BTreeMap<TokenIdHex, MintRecord>,
    /// The latest unix time this state has seen.
    #[serde(default)]
    high_water: u64,
}

type TokenIdHex = String;

/// The state, in memory and on disk.
#[derive(Debug)]
pub struct TokenState {
    path: PathBuf,
    /// The persisted state; held across a write and its fsync.
    inner: Mutex<Persisted>,
    /// Revoked ids, for the check every call makes.
    revoked: RwLock<HashSet<TokenId>>,
    /// The latest time seen (see the module docs).
    high_water: AtomicU64,
}

/// Why a use could not be counted.
#[derive(Debug)]
pub enum UseError {
    /// This token (or the ancestor with this id) has no uses left.
    Exhausted(TokenId),
    State(StateError),
}

impl TokenState {
    /// Load `tokens.json` from `dir` (an absent file is an empty state; a
    /// corrupt one is an error, never silently reset).
    pub fn open(dir: &Path) -> Result<TokenState, StateError> {
        let path = dir.join(STATE_FILE);
        let persisted = match std::fs::read(&path) {
            Ok(bytes) => {
                let p: Persisted =
                    serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                if p.version != FORMAT_VERSION {
                    return Err(StateError::Corrupt {
                        path,
                        message: format!("unknown format version {}", p.version),
                    });
                }
                p
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Persisted {
                version: FORMAT_VERSION,
                ..Persisted::default()
            },
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let revoked = persisted
            .revoked
            .keys()
            .filter_map(|id| id.parse().ok())
            .collect();
        Ok(TokenState {
            path,
            high_water: AtomicU64::new(persisted.high_water),
            inner: Mutex::new(persisted),
            revoked: RwLock::new(revoked),
        })
    }

    /// `now`, but never earlier than any time this state has seen.
    pub fn clock(&self, now: u64) -> u64 {
        self.high_water.fetch_max(now, Ordering::Relaxed).max(now)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Persisted> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The first of `ids` that is revoked.
    pub fn revoked_among<'a>(&self, ids: impl IntoIterator<Item = &'a TokenId>) -> Option<TokenId> {
        let revoked = self.revoked.read().unwrap_or_else(|p| p.into_inner());
        ids.into_iter().find(|id| revoked.contains(id)).copied()
    }

    /// What this broker recorded when it minted `id`.
    pub fn minted(&self, id: &TokenId) -> Option<MintRecord> {
        self.lock().minted.get(&id.to_string()).cloned()
    }

    /// Uses counted so far.
    pub fn uses(&self, id: &TokenId) -> u32 {
        self.lock().uses.get(&id.to_string()).copied().unwrap_or(0)
    }

    /// Record a newly minted token (before it is handed out).
    pub fn record_mint(&self, id: TokenId, record: MintRecord, now: u64) -> Result<(), StateError> {
        self.update(now, |s| {
            s.minted.insert(id.to_string(), record);
            Ok(())
        })
    }

    /// Revoke `id` (and so every descendant, whose lineage names it).
    pub fn revoke(&self, id: TokenId, now: u64) -> Result<(), StateError> {
        self.update(now, |s| {
            let expires = s
                .minted
                .get(&id.to_string())
                .map(|m| m.expires)
                .unwrap_or(UNKNOWN_EXPIRY);
            s.revoked.insert(id.to_string(), expires);
            Ok(())
        })?;
        // On disk first, then in force.
        self.revoked
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
        Ok(())
    }

    /// Count one use against every `(id, max_uses)` in `limits` — a token
    /// and its limited ancestors — all or nothing, persisted before it
    /// returns.
    pub fn consume(&self, limits: &[(TokenId, u32)], now: u64) -> Result<(), UseError> {
        if limits.is_empty() {
            return Ok(());
        }
        let mut exhausted = None;
        let result = self.update(now, |s| {
            for (id, max) in limits {
                if s.uses.get(&id.to_string()).copied().unwrap_or(0) >= *max {
                    exhausted = Some(*id);
                    return Err(());
                }
            }
            for (id, _) in limits {
                *s.uses.entry(id.to_string()).or_insert(0) += 1;
            }
            Ok(())
        });
        match (result, exhausted) {
            (_, Some(id)) => Err(UseError::Exhausted(id)),
            (Err(e), None) => Err(UseError::State(e)),
            (Ok(()), None) => Ok(()),
        }
    }

    /// Apply `change` to a copy, persist the copy, then install it. If
    /// `change` declines (returns `Err(())`) nothing is written.
    fn update(
        &self,
        now: u64,
        change: impl FnOnce(&mut Persisted) -> Result<(), ()>,
    ) -> Result<(), StateError> {
        let now = self.clock(now);
        let mut state = self.lock();
        let mut next = state.clone();
        if change(&mut next).is_err() {
            return Ok(());
        }
        next.high_water = next.high_water.max(now);
        prune(&mut next, now);
        let bytes = serde_json::to_vec_pretty(&next).map_err(|e| StateError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        write_atomic(&self.path, &bytes).map_err(|source| StateError::Io {
            path: self.path.clone(),
            source,
        })?;
        // Pruned revocations are of expired tokens: drop them from the
        // snapshot too, so it does not grow without bound.
        self.revoked
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id| next.revoked.contains_key(&id.to_string()));
        *state = next;
        Ok(())
    }
}

/// Forget tokens that expired a minute ago or more (the minute absorbs
/// clock steps between the check and the prune).
fn prune(state: &mut Persisted, now: u64) {
    let alive = |expires: u64| expires.saturating_add(60) > now;
    let expired: Vec<String> = state
        .minted
        .iter()
        .filter(|(_, m)| !alive(m.expires))
        .map(|(id, _)| id.clone())
        .collect();
    for id in &expired {
        state.minted.remove(id);
        state.uses.remove(id);
    }
    state.revoked.retain(|_, expires| alive(*expires));
}

/// Write `bytes` to `path` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    crate::keys::sync_dir(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> TokenId {
        TokenId([n; 16])
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let state = TokenState::open(dir.path()).unwrap();
        let record = MintRecord {
            issuer: "o".into(),
            expires: 2000,
            max_uses: Some(1),
        };
        state.record_mint(id(1), record.clone(), 1000).unwrap();
        state.revoke(id(2), 1000).unwrap();
        state.consume(&[(id(1), 1)], 1000).unwrap();
        drop(state);
        let state = TokenState::open(dir.path()).unwrap();
        assert_eq!(state.minted(&id(1)), Some(record));
        assert_eq!(state.revoked_among([&id(3), &id(2)]), Some(id(2)));
        assert!(matches!(
            state.consume(&[(id(1), 1)], 1000),
            Err(UseError::Exhausted(_))
        ));
        assert_eq!(state.uses(&id(1)), 1);
    }

    #[test]
    fn consume_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let state = TokenState::open(dir.path()).unwrap();
        state.consume(&[(id(1), 1)], 0).unwrap();
        assert!(state.consume(&[(id(2), 5), (id(1), 1)], 0).is_err());
        assert_eq!(state.uses(&id(2)), 0, "no partial charge");
    }

    #[test]
    fn corrupt_state_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"{ not json").unwrap();
        assert!(matches!(
            TokenState::open(dir.path()),
            Err(StateError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_clock_stepped_back_does_not_revive_pruned_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let state = TokenState::open(dir.path()).unwrap();
        state.revoke(id(1), 10_000).unwrap();
        drop(state);
        let state = TokenState::open(dir.path()).unwrap();
        assert_eq!(state.clock(5_000), 10_000);
        assert_eq!(state.clock(20_000), 20_000);
    }

    #[test]
    fn expired_entries_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let state = TokenState::open(dir.path()).unwrap();
        let record = MintRecord {
            issuer: "o".into(),
            expires: 100,
            max_uses: None,
        };
        state.record_mint(id(1), record, 50).unwrap();
        state.revoke(id(1), 50).unwrap();
        state.revoke(id(9), 50).unwrap();
        state
            .record_mint(
                id(2),
                MintRecord {
                    issuer: "o".into(),
                    expires: 10_000,
                    max_uses: None,
                },
                1000,
            )
            .unwrap();
        assert_eq!(state.minted(&id(1)), None);
        assert_eq!(state.revoked_among([&id(1)]), None);
        assert_eq!(
            state.revoked_among([&id(9)]),
            Some(id(9)),
            "unknown expiry kept"
        );
    }
}
