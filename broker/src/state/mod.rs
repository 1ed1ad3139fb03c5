// SPDX-License-Identifier: Apache-2.0
//! Persistent token state: revocations, use counters and the registry of
//! tokens this broker minted (issuer, expiry, use limit, who caused it).
//!
//! # Store
//!
//! An append-only log in the state directory (`tokens.log`, see [`log`])
//! with compaction, written by one thread that commits in groups: every
//! change waiting when a write starts goes into the same frame and the
//! same `fdatasync`. A change is durable before it takes effect — a use is
//! on disk before its call goes ahead, a mint before its token is handed
//! out, a revocation before it is acknowledged (it is in force in memory
//! at once: refusing early is never unsafe). A crash at any point loses
//! nothing that was acknowledged; a torn last frame was never.
//!
//! Why a log and not an embedded database such as `redb`: the state is a
//! few small maps that fit in memory and are read on every call; what
//! must scale is the write path, and there the cost is the `fsync`. One
//! writer batching every waiting change into one `fdatasync` makes the
//! cost per change fall as load rises, so another principal's counted
//! call waits for at most the batch in flight and its own, however fast
//! one uid mints or attenuates. A transactional store serialises one
//! `fsync` per transaction behind a single write lock instead. The log is
//! also small enough to check by reading it (this file and [`log`]).
//!
//! # Growth and the full disk
//!
//! Expired tokens are pruned: from memory as they expire (checked at most
//! once a minute, and whenever a cap is reached), from disk at
//! compaction. Their revocations go too: a descendant never outlives its
//! ancestors (attenuation refuses a longer expiry), so once a revoked
//! token has expired so has every token whose lineage names it. A
//! revocation of an id this broker did not mint has no known expiry and
//! is kept. A clock stepped back cannot revive a pruned token: the state
//! keeps the latest time it has seen, persisted, and "now" never goes
//! below it.
//!
//! Each uid may hold a bounded number of live tokens it minted or
//! attenuated, and of live attenuations ([`Limits`]). A token stops
//! counting the moment it can no longer be used: when it is revoked or
//! has used all its uses, and so has every descendant of it (whose use
//! needs the ancestor). Its record stays until it expires (a descendant's
//! use is checked against it), but its owner may mint again at once.
//! Those kept records are bounded too, at [`SPENT_FACTOR`] times the caps:
//! otherwise attenuating a one-use child and using it, in a loop, would
//! grow the state at the rate limit for as long as a token lives.
//!
//! Each mint records the token's origin (audience, task, ancestors), so
//! that listings and audit records show it after a restart, and a
//! revocation frees its descendants' slots too. Tokens recorded before
//! the log kept origins (format 2) have none: they are listed without it
//! and are freed at their own revocation only.
//!
//! The log keeps [`RESERVE`] bytes allocated past its end. A mint, an
//! attenuation or a use is refused when that reserve cannot be kept, so a
//! full file system stops minting before it could stop a revocation from
//! being recorded; revocations may use the reserve.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, RwLock};

use serde::{Deserialize, Serialize};

use keyward_proto::token::{Audience, TokenId};

mod dir;
mod legacy;
pub mod log;

pub use dir::check as check_directory;
pub use legacy::LEGACY_FILE;
pub use log::LOG_FILE;
use log::{AppendError, Log, Opened, Record};
use log::{FORMAT_V2, FORMAT_VERSION};

/// Expiry recorded for a revoked token this broker did not mint.
const UNKNOWN_EXPIRY: u64 = u64::MAX;
/// Owner of a token imported from the old format, which did not say.
pub const UNKNOWN_OWNER: u32 = u32::MAX;
/// Bytes kept allocated past the end of the log for revocations.
pub const RESERVE: u64 = 64 << 10;
/// Compact no sooner than at this size (small in unit tests, so they
/// need few writes to reach it).
#[cfg(not(test))]
const MIN_COMPACT: u64 = 1 << 20;
#[cfg(test)]
const MIN_COMPACT: u64 = 16 << 10;
/// Most changes in one group commit.
const MAX_BATCH: usize = 4096;
/// How long after its expiry a token is forgotten (absorbs clock steps
/// between a check and a prune).
const GRACE: u64 = 60;
/// A spent (revoked or used-up) token no longer counts against its
/// owner's caps, but its record is kept until it expires; a uid may keep
/// this many times its caps of them, so that minting or attenuating and
/// then spending in a loop cannot grow the state without bound.
pub const SPENT_FACTOR: u32 = 4;

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
    #[error("token state {path} is not a keyward token log ({what}); it was left as it is. If it is not the broker's, move it out of the state directory; if it is, restore the broker's copy. Refusing to start rather than forget revocations")]
    NotALog { path: PathBuf, what: String },
    #[error("token state {path} is in format version {version}, which this broker does not read (it reads {FORMAT_V2} and {FORMAT_VERSION}); it was left as it is. Run the keyward-broker version that wrote it, or move it out of the state directory")]
    Version { path: PathBuf, version: u32 },
    #[error("state directory entry {path} {who}; the state directory and its files must be the broker's alone (chown them to its user, chmod 0700 the directory and 0600 the files)")]
    Access { path: PathBuf, who: String },
    #[error("token state {path} is on a read-only file system; refusing to start, since no use or revocation could be recorded")]
    ReadOnly { path: PathBuf },
    #[error("token state {path}: the file system is full; minting and counted uses are refused so that revocations can still be recorded")]
    Full { path: PathBuf },
    #[error("token state {path} could not be repaired after a failed write ({message}); restart the broker")]
    Broken { path: PathBuf, message: String },
    #[error("uid {uid} already holds {limit} live tokens (max_live_tokens_per_uid)")]
    LiveCap { uid: u32, limit: u32 },
    #[error("uid {uid} already holds {limit} live attenuated tokens (max_attenuations_per_uid)")]
    AttenuationCap { uid: u32, limit: u32 },
    #[error("uid {uid} has {count} revoked or used-up {what} that have not expired yet ({SPENT_FACTOR} times {key}); they are forgotten as they expire")]
    SpentCap {
        uid: u32,
        count: u32,
        what: &'static str,
        key: &'static str,
    },
}

/// What the broker remembers of a token it minted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MintRecord {
    pub issuer: String,
    pub expires: u64,
    pub max_uses: Option<u32>,
    /// The uid whose request created it (the minter, or the holder who
    /// attenuated).
    pub owner: u32,
    /// Made by attenuation.
    pub attenuated: bool,
    /// Who it is for, its task and its ancestors; `None` for a token
    /// recorded before the log kept them.
    pub origin: Option<Origin>,
}

impl MintRecord {
    /// Its ancestors, root first (none if unknown).
    fn lineage(&self) -> &[TokenId] {
        self.origin.as_ref().map_or(&[], |o| o.lineage.as_slice())
    }
}

/// Where a token came from, as its body says.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Origin {
    pub audience: Audience,
    /// blake3 of the task description.
    pub task: [u8; 32],
    /// Ancestors, root first (empty for a minted token).
    pub lineage: Vec<TokenId>,
}

/// Per-uid caps on what the state holds for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Live tokens a uid minted or attenuated.
    pub live_per_uid: u32,
    /// Live tokens a uid attenuated.
    pub attenuations_per_uid: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            live_per_uid: 10_000,
            attenuations_per_uid: 1_000,
        }
    }
}

/// Why a use could not be counted.
#[derive(Debug)]
pub enum UseError {
    /// This token (or the ancestor with this id) has no uses left.
    Exhausted(TokenId),
    State(StateError),
}

/// Tokens of one uid: live ones, and spent ones (revoked or used up)
/// whose records are kept until they expire.
#[derive(Debug, Default, Clone, Copy)]
struct Held {
    live: u32,
    attenuated: u32,
    spent: u32,
    spent_attenuated: u32,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.live == 0 && self.spent == 0
    }
}

#[derive(Debug, Default)]
struct Memory {
    minted: HashMap<TokenId, MintRecord>,
    uses: HashMap<TokenId, u32>,
    /// What each uid's live tokens count, against [`Limits`].
    held: HashMap<u32, Held>,
    /// Recorded tokens that count no more (revoked, used up, or under one
    /// that is). Every descendant of one is in it too.
    released: HashSet<TokenId>,
    /// Recorded tokens by parent (those with a known origin).
    children: HashMap<TokenId, Vec<TokenId>>,
    pruned_at: u64,
}

impl Memory {
    /// Record a token; it counts against its owner unless it is already
    /// unusable (`revoked` or an ancestor spent).
    fn insert(&mut self, id: TokenId, record: MintRecord, revoked: &HashMap<TokenId, u64>) {
        self.remove(&id);
        if let Some(parent) = record.lineage().last() {
            self.children.entry(*parent).or_default().push(id);
        }
        let dead =
            self.spent(&id, revoked) || record.lineage().iter().any(|a| self.spent(a, revoked));
        if dead {
            self.released.insert(id);
        }
        self.count(&record, dead);
        self.minted.insert(id, record);
    }

    /// Forget a token (expired, or never handed out).
    fn remove(&mut self, id: &TokenId) {
        if let Some(old) = self.minted.remove(id) {
            let spent = self.released.remove(id);
            self.uncount(&old, spent);
            if let Some(parent) = old.lineage().last() {
                if let Some(siblings) = self.children.get_mut(parent) {
                    siblings.retain(|c| c != id);
                    if siblings.is_empty() {
                        self.children.remove(parent);
                    }
                }
            }
        }
        self.children.remove(id);
        self.uses.remove(id);
    }

    /// Count a token against its owner, live or spent.
    fn count(&mut self, record: &MintRecord, spent: bool) {
        let held = self.held.entry(record.owner).or_default();
        let a = u32::from(record.attenuated);
        if spent {
            held.spent += 1;
            held.spent_attenuated += a;
        } else {
            held.live += 1;
            held.attenuated += a;
        }
    }

    fn uncount(&mut self, record: &MintRecord, spent: bool) {
        if let Some(held) = self.held.get_mut(&record.owner) {
            let a = u32::from(record.attenuated);
            if spent {
                held.spent = held.spent.saturating_sub(1);
                held.spent_attenuated = held.spent_attenuated.saturating_sub(a);
            } else {
                held.live = held.live.saturating_sub(1);
                held.attenuated = held.attenuated.saturating_sub(a);
            }
            if held.is_empty() {
                self.held.remove(&record.owner);
            }
        }
    }

    /// Whether `id` itself can no longer be used: revoked, or every use
    /// counted.
    fn spent(&self, id: &TokenId, revoked: &HashMap<TokenId, u64>) -> bool {
        revoked.contains_key(id)
            || self
                .minted
                .get(id)
                .and_then(|m| m.max_uses)
                .is_some_and(|max| self.uses.get(id).copied().unwrap_or(0) >= max)
    }

    /// `id` and its descendants count no more.
    fn release(&mut self, id: TokenId) {
        let mut stack = vec![id];
        while let Some(id) = stack.pop() {
            // (An id not recorded here, from a shared signing key, may
            // still have children recorded here.)
            if let Some(record) = self.minted.get(&id) {
                // Released before: so were its descendants.
                if !self.released.insert(id) {
                    continue;
                }
                let record = record.clone();
                self.uncount(&record, false);
                self.count(&record, true);
            }
            if let Some(children) = self.children.get(&id) {
                stack.extend(children.iter().copied());
            }
        }
    }

    /// Count every recorded token from scratch (after loading the log).
    fn recount(&mut self, revoked: &HashMap<TokenId, u64>) {
        self.held.clear();
        self.released.clear();
        let mut counted = Vec::new();
        for (id, record) in &self.minted {
            let dead =
                self.spent(id, revoked) || record.lineage().iter().any(|a| self.spent(a, revoked));
            if dead {
                self.released.insert(*id);
            }
            counted.push((record.clone(), dead));
        }
        for (record, dead) in &counted {
            self.count(record, *dead);
        }
    }
}

#[derive(Debug, Default)]
struct Shared {
    memory: Mutex<Memory>,
    /// Revoked id -> its expiry, for the check every call makes.
    revoked: RwLock<HashMap<TokenId, u64>>,
    /// The latest time seen (see the module docs).
    high_water: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replay one record while loading (counts are made afterwards, by
    /// [`Memory::recount`]). Merging is safe in any order: a later mint
    /// record of an id replaces an earlier one, a use count only rises,
    /// revocations only add.
    fn apply(&self, memory: &mut Memory, record: Record) {
        match record {
            Record::Format(_) => {}
            Record::MintV2(id, old) => self.apply(memory, Record::Mint(id, old.into())),
            Record::Mint(id, record) => {
                if let Some(parent) = record.lineage().last() {
                    memory.children.entry(*parent).or_default().push(id);
                }
                memory.minted.insert(id, record);
            }
            Record::Uses(counts) => {
                for (id, n) in counts {
                    let count = memory.uses.entry(id).or_insert(0);
                    *count = (*count).max(n);
                }
            }
            Record::Revoke(id, expires) => {
                self.revoked
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id, expires);
            }
            Record::Clock(t) => {
                self.high_water.fetch_max(t, Ordering::Relaxed);
            }
        }
    }

    /// Forget tokens (and revocations) that expired [`GRACE`] ago.
    fn prune(&self, memory: &mut Memory, now: u64) {
        memory.pruned_at = now;
        let dead = |expires: u64| expires.saturating_add(GRACE) <= now;
        let expired: Vec<TokenId> = memory
            .minted
            .iter()
            .filter(|(_, m)| dead(m.expires))
            .map(|(id, _)| *id)
            .collect();
        for id in &expired {
            memory.remove(id);
        }
        self.revoked
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, expires| !dead(*expires));
    }

    /// The live state as records, after a prune.
    fn snapshot(&self, now: u64) -> Vec<Record> {
        let mut memory = self.lock();
        self.prune(&mut memory, now);
        let mut records = vec![Record::Clock(self.high_water.load(Ordering::Relaxed))];
        records.extend(
            memory
                .minted
                .iter()
                .map(|(id, m)| Record::Mint(*id, m.clone())),
        );
        let uses: Vec<_> = memory.uses.iter().map(|(id, n)| (*id, *n)).collect();
        for chunk in uses.chunks(1024) {
            records.push(Record::Uses(chunk.to_vec()));
        }
        let revoked = self.revoked.read().unwrap_or_else(|p| p.into_inner());
        records.extend(revoked.iter().map(|(id, e)| Record::Revoke(*id, *e)));
        records
    }
}

/// Whether a change may use the reserve kept for revocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Mints, attenuations, uses: refused when the reserve cannot be kept.
    Growth,
    /// Revocations.
    Essential,
}

type Reply = Result<(), StateError>;

#[derive(Debug)]
struct Job {
    records: Vec<Record>,
    class: Class,
    reply: mpsc::SyncSender<Reply>,
}

/// The state, in memory and on disk.
#[derive(Debug)]
pub struct TokenState {
    path: PathBuf,
    shared: Arc<Shared>,
    /// To the writer thread; `None` only while dropping.
    jobs: Option<mpsc::Sender<Job>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl TokenState {
    /// Check the state directory, load the log (importing an old
    /// `tokens.json` once), and start the writer. A corrupt log, or a
    /// directory or file others may write, is an error, never a silent
    /// reset.
    pub fn open(dir: &Path) -> Result<TokenState, StateError> {
        dir::check(dir)?;
        // Both files are read and judged before either is changed.
        let imported = legacy::read(dir)?;
        let Opened {
            mut log,
            records,
            version,
        } = Log::open(dir)?;
        let shared = Arc::new(Shared::default());
        {
            let mut memory = shared.lock();
            // An old tokens.json merges under the log: from a first start
            // with this format, or from one that stopped short of
            // removing it (then it adds nothing the log lacks).
            for record in imported.iter().flatten().cloned() {
                shared.apply(&mut memory, record);
            }
            for record in records {
                shared.apply(&mut memory, record);
            }
            let revoked = shared.revoked.read().unwrap_or_else(|p| p.into_inner());
            memory.recount(&revoked);
        }
        let now = shared.high_water.load(Ordering::Relaxed).max(now());
        if imported.is_some() {
            log.rewrite(&shared.snapshot(now))?;
            legacy::remove(dir)?;
        } else if version != FORMAT_VERSION {
            // Rewritten in this format (the old file stays until the new
            // one is in place). If that cannot be done now, the records
            // appended to the old file are read all the same, and the
            // next compaction writes the new header.
            if let Err(e) = log.rewrite(&shared.snapshot(now)) {
                eprintln!(
                    "keyward-broker: rewriting the token state in format {FORMAT_VERSION} failed (will retry at compaction): {e}"
                );
            }
        } else if log.len >= MIN_COMPACT {
            // Leave expired entries behind now if the log is worth
            // rewriting.
            let snapshot = shared.snapshot(now);
            if let Err(e) = log.rewrite(&snapshot) {
                eprintln!("keyward-broker: compacting the token state at start failed: {e}");
            }
        }
        let _ = log.reserve(RESERVE);
        let (jobs, queue) = mpsc::channel();
        let writer = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("kw-state".into())
                .spawn(move || write_loop(log, &queue, &shared))
                .map_err(|source| StateError::Io {
                    path: dir.join(LOG_FILE),
                    source,
                })?
        };
        Ok(TokenState {
            path: dir.join(LOG_FILE),
            shared,
            jobs: Some(jobs),
            writer: Some(writer),
        })
    }

    /// `now`, but never earlier than any time this state has seen.
    pub fn clock(&self, now: u64) -> u64 {
        self.shared
            .high_water
            .fetch_max(now, Ordering::Relaxed)
            .max(now)
    }

    /// The first of `ids` that is revoked.
    pub fn revoked_among<'a>(&self, ids: impl IntoIterator<Item = &'a TokenId>) -> Option<TokenId> {
        let revoked = self
            .shared
            .revoked
            .read()
            .unwrap_or_else(|p| p.into_inner());
        ids.into_iter().find(|id| revoked.contains_key(id)).copied()
    }

    /// What this broker recorded when it minted `id`.
    pub fn minted(&self, id: &TokenId) -> Option<MintRecord> {
        self.shared.lock().minted.get(id).cloned()
    }

    /// Every token recorded (minted here and not yet pruned), with its
    /// uses so far.
    pub fn minted_all(&self) -> Vec<(TokenId, MintRecord, u32)> {
        let memory = self.shared.lock();
        memory
            .minted
            .iter()
            .map(|(id, record)| {
                let uses = memory.uses.get(id).copied().unwrap_or(0);
                (*id, record.clone(), uses)
            })
            .collect()
    }

    /// Uses counted so far.
    pub fn uses(&self, id: &TokenId) -> u32 {
        self.shared.lock().uses.get(id).copied().unwrap_or(0)
    }

    /// Live tokens recorded (minted here and not yet pruned).
    pub fn live(&self) -> usize {
        self.shared.lock().minted.len()
    }

    /// Record a newly minted token (before it is handed out), within the
    /// owner's caps.
    pub fn record_mint(
        &self,
        id: TokenId,
        record: MintRecord,
        limits: Limits,
        now: u64,
    ) -> Result<(), StateError> {
        let now = self.clock(now);
        let owner = record.owner;
        let attenuated = record.attenuated;
        let pending = {
            let mut memory = self.shared.lock();
            let over = |m: &Memory| {
                let held = m.held.get(&owner).copied().unwrap_or_default();
                if held.live >= limits.live_per_uid {
                    Some(StateError::LiveCap {
                        uid: owner,
                        limit: limits.live_per_uid,
                    })
                } else if attenuated && held.attenuated >= limits.attenuations_per_uid {
                    Some(StateError::AttenuationCap {
                        uid: owner,
                        limit: limits.attenuations_per_uid,
                    })
                } else if held.spent >= limits.live_per_uid.saturating_mul(SPENT_FACTOR) {
                    Some(StateError::SpentCap {
                        uid: owner,
                        count: held.spent,
                        what: "tokens",
                        key: "max_live_tokens_per_uid",
                    })
                } else if attenuated
                    && held.spent_attenuated
                        >= limits.attenuations_per_uid.saturating_mul(SPENT_FACTOR)
                {
                    Some(StateError::SpentCap {
                        uid: owner,
                        count: held.spent_attenuated,
                        what: "attenuated tokens",
                        key: "max_attenuations_per_uid",
                    })
                } else {
                    None
                }
            };
            let stale = memory.pruned_at.saturating_add(GRACE) <= now;
            if stale || (over(&memory).is_some() && memory.pruned_at < now) {
                self.shared.prune(&mut memory, now);
            }
            if let Some(e) = over(&memory) {
                return Err(e);
            }
            {
                let revoked = self
                    .shared
                    .revoked
                    .read()
                    .unwrap_or_else(|p| p.into_inner());
                memory.insert(id, record.clone(), &revoked);
            }
            self.enqueue(vec![Record::Mint(id, record)], Class::Growth)
        };
        let result = wait(pending);
        if result.is_err() {
            // Never handed out: it does not count against the owner.
            self.shared.lock().remove(&id);
        }
        result
    }

    /// Revoke `id` (and so every descendant, whose lineage names it). In
    /// force at once; `Ok` once it is on disk.
    pub fn revoke(&self, id: TokenId, now: u64) -> Result<(), StateError> {
        self.clock(now);
        let pending = {
            let mut memory = self.shared.lock();
            let expires = memory
                .minted
                .get(&id)
                .map(|m| m.expires)
                .unwrap_or(UNKNOWN_EXPIRY);
            self.shared
                .revoked
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, expires);
            // Its slot, and its descendants', are free at once.
            memory.release(id);
            self.enqueue(vec![Record::Revoke(id, expires)], Class::Essential)
        };
        wait(pending)
    }

    /// Count one use against every `(id, max_uses)` in `limits` — a token
    /// and its limited ancestors — all or nothing, on disk before it
    /// returns `Ok`. A use that could not be written stays counted in
    /// memory: the call is refused, never repeated for free.
    pub fn consume(&self, limits: &[(TokenId, u32)], now: u64) -> Result<(), UseError> {
        if limits.is_empty() {
            return Ok(());
        }
        self.clock(now);
        let pending = {
            let mut memory = self.shared.lock();
            for (id, max) in limits {
                if memory.uses.get(id).copied().unwrap_or(0) >= *max {
                    return Err(UseError::Exhausted(*id));
                }
            }
            let mut counts = Vec::with_capacity(limits.len());
            for (id, max) in limits {
                let n = memory.uses.entry(*id).or_insert(0);
                *n += 1;
                let n = *n;
                counts.push((*id, n));
                if n >= *max {
                    // Used up: it (and every descendant) counts no more.
                    memory.release(*id);
                }
            }
            self.enqueue(vec![Record::Uses(counts)], Class::Growth)
        };
        wait(pending).map_err(UseError::State)
    }

    /// Hand records to the writer. Called with the memory lock held, so
    /// that the log's order is the order the changes were made in.
    fn enqueue(
        &self,
        records: Vec<Record>,
        class: Class,
    ) -> Result<mpsc::Receiver<Reply>, StateError> {
        let (reply, done) = mpsc::sync_channel(1);
        let job = Job {
            records,
            class,
            reply,
        };
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(job).is_ok());
        if sent == Some(true) {
            Ok(done)
        } else {
            Err(self.stopped())
        }
    }

    fn stopped(&self) -> StateError {
        StateError::Broken {
            path: self.path.clone(),
            message: "the writer has stopped".into(),
        }
    }
}

impl Drop for TokenState {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn wait(pending: Result<mpsc::Receiver<Reply>, StateError>) -> Reply {
    let done = pending?;
    done.recv().unwrap_or_else(|_| {
        Err(StateError::Broken {
            path: PathBuf::from(LOG_FILE),
            message: "the writer stopped before answering".into(),
        })
    })
}

/// The state directory: `$STATE_DIRECTORY` (systemd's `StateDirectory=`)
/// when set, else the configured one.
pub fn directory(configured: Option<&Path>) -> Option<PathBuf> {
    std::env::var_os("STATE_DIRECTORY")
        .filter(|v| !v.is_empty())
        // systemd may pass several, colon-separated: the first is ours.
        .map(|v| PathBuf::from(v.to_string_lossy().split(':').next().unwrap_or_default()))
        .or_else(|| configured.map(Path::to_path_buf))
}

/// fsync the directory holding `path`, so a rename or link into it is
/// durable.
pub fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// A new, empty file at `tmp` only the broker may read or write (a
/// leftover of the broker's own at that name, from a write cut short, is
/// removed first; a link there is not followed).
pub fn fresh_private(tmp: &Path) -> std::io::Result<std::fs::File> {
    let _ = std::fs::remove_file(tmp);
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(tmp)
}

/// Seconds since the epoch.
fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The writer thread: take every waiting job, write them as one frame,
/// `fdatasync`, answer each; compact when the log has doubled.
fn write_loop(mut log: Log, queue: &mpsc::Receiver<Job>, shared: &Shared) {
    let mut compact_at = log.len.saturating_mul(2).max(MIN_COMPACT);
    let mut broken: Option<String> = None;
    while let Ok(first) = queue.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let path = log.path.clone();
        if let Some(message) = &broken {
            for job in jobs {
                let _ = job.reply.send(Err(StateError::Broken {
                    path: path.clone(),
                    message: message.clone(),
                }));
            }
            continue;
        }
        let mut records: Vec<Record> = Vec::new();
        for job in &jobs {
            records.extend(job.records.iter().cloned());
        }
        records.push(Record::Clock(shared.high_water.load(Ordering::Relaxed)));
        let bytes = log::frame(&records);
        // Growth only while the reserve for revocations can be kept past
        // what this frame uses.
        let room = log
            .reserve(RESERVE.saturating_add(bytes.len() as u64))
            .unwrap_or(false);
        let (admitted, refused): (Vec<Job>, Vec<Job>) = jobs
            .into_iter()
            .partition(|job| room || job.class == Class::Essential);
        for job in refused {
            let _ = job.reply.send(Err(StateError::Full { path: path.clone() }));
        }
        if admitted.is_empty() {
            continue;
        }
        let bytes = if room {
            bytes
        } else {
            let mut records: Vec<Record> = Vec::new();
            for job in &admitted {
                records.extend(job.records.iter().cloned());
            }
            records.push(Record::Clock(shared.high_water.load(Ordering::Relaxed)));
            log::frame(&records)
        };
        let outcome = match log.append(&bytes) {
            Ok(()) => Ok(()),
            Err(AppendError::Failed(e)) => Err((e, false)),
            Err(AppendError::Broken(e)) => Err((e, true)),
        };
        for job in admitted {
            let reply = match &outcome {
                Ok(()) => Ok(()),
                Err((e, _)) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    Err(StateError::Full { path: path.clone() })
                }
                Err((e, _)) => Err(StateError::Io {
                    path: path.clone(),
                    source: std::io::Error::new(e.kind(), e.to_string()),
                }),
            };
            let _ = job.reply.send(reply);
        }
        match outcome {
            Err((e, true)) => broken = Some(e.to_string()),
            Err((_, false)) => {}
            Ok(()) if log.len >= compact_at => {
                let now = shared.high_water.load(Ordering::Relaxed).max(now());
                let snapshot = shared.snapshot(now);
                if let Err(e) = log.rewrite(&snapshot) {
                    eprintln!(
                        "keyward-broker: compacting the token state failed (will retry): {e}"
                    );
                }
                compact_at = log.len.saturating_mul(2).max(MIN_COMPACT);
                let _ = log.reserve(RESERVE);
            }
            Ok(()) => {}
        }
    }
}

#[cfg(test)]
mod tests;
