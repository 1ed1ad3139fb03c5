// SPDX-License-Identifier: Apache-2.0
//! The audit trail: one record per decision.
//!
//! Records are written synchronously, before the decision takes effect: if
//! the record of an allowed call cannot be written, the call is not made.
//! The one exception is not a decision: the outcome record of a call that
//! went well is deferred ([`Audit::defer`]) to go out in the same write as
//! the next record -- in a peer's back-to-back calls, the next call's
//! decision -- or before the session next waits for its peer.
//! They go to journald as native entries (sent by [`crate::journal`]), or
//! as JSON lines on stderr where no journald runs
//! (`--audit journald|stderr|auto`). A journal entry has a human-readable
//! `MESSAGE`, a fixed `MESSAGE_ID` per [`Event`] (documented in
//! `systemd/keyward.catalog`), and a `KEYWARD_<FIELD>` field for every
//! [`Record`] field by its serde name (the JSON line and the entry are
//! built from the destructured record, so a field added to `Record` does
//! not compile until both write it; tests compare both with serde's
//! encoding). A record the journal did not take is
//! reported and written to stderr instead, never silently dropped.
//!
//! Records carry kernel-supplied peer identity, the tool, the decision and
//! its reason. They never carry a credential or a parameter value (denial
//! reasons name values only for parameters policy does not mark secret).

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::journal::{self, Journal};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// The broker started serving.
    Start,
    /// The broker stopped.
    Stop,
    /// A tool call was decided (allow or deny).
    Call,
    /// An allowed call failed upstream or in the executor.
    CallFailed,
    /// A message or connection was refused before any policy decision:
    /// unauthenticated, malformed, wrong version, over a limit.
    Refused,
    /// The policy was reloaded (SIGHUP), or a reload was rejected and the
    /// old policy kept (decision `error`, the reason says why).
    Reload,
    /// A token was minted (or a mint refused).
    Mint,
    /// A token was bound to a connection (or refused).
    Bind,
    /// A child token was attenuated from a bound one (or refused).
    Attenuate,
    /// A token was revoked (or a revocation refused).
    Revoke,
    /// What a performed call (or gateway request) came to: upstream
    /// status, bytes returned, duration, withheld for a leak. Joined to its
    /// `call` decision by `call_id`.
    Outcome,
}

impl Event {
    /// Every kind of event (for the catalog and message-id checks).
    pub const ALL: [Event; 11] = [
        Event::Start,
        Event::Stop,
        Event::Call,
        Event::CallFailed,
        Event::Refused,
        Event::Reload,
        Event::Mint,
        Event::Bind,
        Event::Attenuate,
        Event::Revoke,
        Event::Outcome,
    ];
}

/// The decision recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    Deny,
    Error,
    Info,
}

/// One audit record. Build with [`Record::new`] and the setters.
#[derive(Debug, Clone, Serialize)]
pub struct Record<'a> {
    pub event: Event,
    pub decision: Decision,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principal: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_pid: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_gid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Id of the token the decision concerns (never the token string).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_id: Option<&'a str>,
    /// Task hash of that token: joins every record of one task.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<&'a str>,
    /// Canonical hash of the call made with a token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call_hash: Option<&'a str>,
    /// Id of one performed call: joins its decision and its outcome.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call_id: Option<&'a str>,
    /// Ids of the token's ancestors, nearest (its parent) first,
    /// separated by single spaces, on everything a child token does. The
    /// journal entry has one `KEYWARD_PARENT_TOKEN_ID` per ancestor, so a
    /// query on any ancestor finds it (journald keeps the values, not
    /// their order); the JSON line has the list, in order, as one string.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_token_id: Option<&'a str>,
    /// Bytes returned to the caller (outcome records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Wall time of the performed call in milliseconds (outcome records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Whether the response was withheld for carrying credential material.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub withheld: Option<bool>,
    /// The broker's version (start records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<&'a str>,
    /// The configuration file in force (start records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<&'a str>,
    /// The socket served (start records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<&'a str>,
}

impl<'a> Record<'a> {
    pub fn new(event: Event, decision: Decision) -> Record<'a> {
        Record {
            event,
            decision,
            tool: None,
            principal: None,
            peer_pid: None,
            peer_uid: None,
            peer_gid: None,
            reason: None,
            status: None,
            token_id: None,
            task: None,
            call_hash: None,
            call_id: None,
            parent_token_id: None,
            bytes: None,
            duration_ms: None,
            withheld: None,
            version: None,
            config: None,
            socket: None,
        }
    }

    pub fn peer(mut self, pid: i32, uid: u32, gid: u32) -> Self {
        self.peer_pid = Some(pid);
        self.peer_uid = Some(uid);
        self.peer_gid = Some(gid);
        self
    }

    pub fn tool(mut self, tool: &'a str) -> Self {
        self.tool = Some(tool);
        self
    }

    pub fn principal(mut self, principal: &'a str) -> Self {
        self.principal = Some(principal);
        self
    }

    pub fn reason(mut self, reason: &'a str) -> Self {
        self.reason = Some(reason);
        self
    }

    pub fn status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    pub fn token(mut self, id: &'a str) -> Self {
        self.token_id = Some(id);
        self
    }

    pub fn task(mut self, task: &'a str) -> Self {
        self.task = Some(task);
        self
    }

    pub fn call_hash(mut self, hash: &'a str) -> Self {
        self.call_hash = Some(hash);
        self
    }

    pub fn call_id(mut self, id: &'a str) -> Self {
        self.call_id = Some(id);
        self
    }

    pub fn parent_token(mut self, id: &'a str) -> Self {
        self.parent_token_id = Some(id);
        self
    }

    pub fn bytes(mut self, bytes: u64) -> Self {
        self.bytes = Some(bytes);
        self
    }

    pub fn duration_ms(mut self, ms: u64) -> Self {
        self.duration_ms = Some(ms);
        self
    }

    pub fn withheld(mut self, withheld: bool) -> Self {
        self.withheld = Some(withheld);
        self
    }

    pub fn version(mut self, version: &'a str) -> Self {
        self.version = Some(version);
        self
    }

    pub fn config(mut self, config: &'a str) -> Self {
        self.config = Some(config);
        self
    }

    pub fn socket(mut self, socket: &'a str) -> Self {
        self.socket = Some(socket);
        self
    }
}

/// The id of one performed call (`call_id`): 128 bits as 32 hex digits,
/// on the stack (no allocation per call). The first 64 bits are drawn
/// from the kernel once per broker process, the last 64 count the calls
/// it has made: ids are unique within a run and, with overwhelming
/// probability, across runs, without a `getrandom` system call per call.
/// Nothing depends on an id being unguessable: it only joins a call's
/// records, and no caller is ever told it.
#[derive(Clone, Copy)]
pub struct CallId([u8; 32]);

impl CallId {
    pub fn new() -> CallId {
        static RUN: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let run = *RUN.get_or_init(|| {
            let mut raw = [0u8; 8];
            if getrandom::fill(&mut raw).is_ok() {
                u64::from_ne_bytes(raw)
            } else {
                // No randomness from the kernel: the start time in
                // nanoseconds keeps runs apart.
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
            }
        });
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&run.to_be_bytes());
        raw[8..].copy_from_slice(&n.to_be_bytes());
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = [0u8; 32];
        for (i, byte) in raw.iter().enumerate() {
            text[2 * i] = HEX[usize::from(byte >> 4)];
            text[2 * i + 1] = HEX[usize::from(byte & 0xf)];
        }
        CallId(text)
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever written into it.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl Default for CallId {
    fn default() -> Self {
        CallId::new()
    }
}

impl std::fmt::Debug for CallId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// The journald entry of a record. journald is a transport here
// ([`crate::journal`]); what an entry says is the audit trail's to decide.

/// `SYSLOG_IDENTIFIER` of every entry.
const IDENTIFIER: &str = "keyward-broker";

/// `SYSLOG_FACILITY` of every entry: LOG_AUTHPRIV, as for other
/// security and authorization messages.
const FACILITY: &str = "10";

/// The fixed `MESSAGE_ID` of each kind of event. Generated once with
/// `systemd-id128 new`; never change one, admins' queries depend on them.
fn message_id(event: Event) -> &'static str {
    match event {
        Event::Start => "2f6f954213d045c7b7e2f07fb5a25a54",
        Event::Stop => "79cd98555a5542d6ab8fa32725de9145",
        Event::Call => "2199d2a66c774d17a375b2811c3c4b75",
        Event::CallFailed => "d11b115f3ba641a68843f326c621ab76",
        Event::Refused => "95d29be4eed1432eb41ef5872bf68756",
        Event::Reload => "1bc3a11bb0d94fb584a80cf0d9f0158d",
        Event::Mint => "6d763ac31ec241fd8a83dbff57ce3acd",
        Event::Bind => "08daf13a681c42a8a88d9fa9df2fae43",
        Event::Attenuate => "767ff77ad6b84a3296efbdf565364149",
        Event::Revoke => "f72395a0f9f445e6b0c0e20b12483a96",
        Event::Outcome => "e19ef4951896423f89f6bafe41317827",
    }
}

/// syslog priority of a record: denials are notices, failures errors.
fn priority(decision: Decision) -> u8 {
    match decision {
        Decision::Allow | Decision::Info => 6,
        Decision::Deny => 5,
        Decision::Error => 3,
    }
}

/// The fields of the journald entry for `record`: the standard ones, then
/// `KEYWARD_<NAME>` for every field the record has, `NAME` its serde name
/// in upper case, in the order of those names (as a JSON map orders them:
/// a test compares this with the entry made through `serde_json`). Built
/// from [`fields`] rather than through a `serde_json::Value` map: this
/// runs before every call.
fn journal_entry(record: &Record<'_>) -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut fields = fields(record);
    fields.sort_unstable_by_key(|&(name, ..)| name);
    let mut entry = Vec::with_capacity(5 + fields.len());
    entry.push(("MESSAGE".to_owned(), message(record).into_bytes()));
    entry.push((
        "MESSAGE_ID".to_owned(),
        message_id(record.event).as_bytes().to_vec(),
    ));
    entry.push((
        "PRIORITY".to_owned(),
        priority(record.decision).to_string().into_bytes(),
    ));
    entry.push((
        "SYSLOG_IDENTIFIER".to_owned(),
        IDENTIFIER.as_bytes().to_vec(),
    ));
    entry.push(("SYSLOG_FACILITY".to_owned(), FACILITY.as_bytes().to_vec()));
    for (_, journal_name, value) in fields {
        let value = match value {
            None => continue,
            // One field per ancestor: a match on any of them finds it.
            Some(Field::Text(ids)) if journal_name == PARENT_FIELD => {
                for id in ids.split(' ').filter(|id| !id.is_empty()) {
                    entry.push((journal_name.to_owned(), id.as_bytes().to_vec()));
                }
                continue;
            }
            Some(Field::Text(text)) => text.as_bytes().to_vec(),
            Some(Field::Number(n)) => n.to_string().into_bytes(),
            Some(Field::Unsigned(n)) => n.to_string().into_bytes(),
            Some(Field::Bool(b)) => b.to_string().into_bytes(),
        };
        entry.push((journal_name.to_owned(), value));
    }
    Ok(entry)
}

/// The journal field that is repeated, once per ancestor token.
const PARENT_FIELD: &str = "KEYWARD_PARENT_TOKEN_ID";

/// A field's value, as both encodings write it.
#[derive(Debug, Clone, Copy)]
enum Field<'a> {
    Text(&'a str),
    Number(i64),
    Unsigned(u64),
    Bool(bool),
}

/// Every field of `record`, in its declared (serde) order: serde name,
/// journal field name, value if present. The journal entry is written
/// from it; the JSON line, which the echo call's round trip pays twice,
/// is written by [`write_json_line`] field by field with constant keys
/// instead. Both destructure the record, so a field added to [`Record`]
/// does not compile until both write it, and tests compare each with
/// serde's encoding.
fn fields<'r>(record: &Record<'r>) -> [(&'static str, &'static str, Option<Field<'r>>); 20] {
    let &Record {
        event,
        decision,
        tool,
        principal,
        peer_pid,
        peer_uid,
        peer_gid,
        reason,
        status,
        token_id,
        task,
        call_hash,
        call_id,
        parent_token_id,
        bytes,
        duration_ms,
        withheld,
        version,
        config,
        socket,
    } = record;
    let number = |v: Option<u64>| v.map(Field::Unsigned);
    let text = |v: Option<&'r str>| v.map(Field::Text);
    [
        (
            "event",
            "KEYWARD_EVENT",
            Some(Field::Text(event_name(event))),
        ),
        (
            "decision",
            "KEYWARD_DECISION",
            Some(Field::Text(decision_name(decision))),
        ),
        ("tool", "KEYWARD_TOOL", text(tool)),
        ("principal", "KEYWARD_PRINCIPAL", text(principal)),
        (
            "peer_pid",
            "KEYWARD_PEER_PID",
            peer_pid.map(|v| Field::Number(v.into())),
        ),
        (
            "peer_uid",
            "KEYWARD_PEER_UID",
            peer_uid.map(|v| Field::Number(v.into())),
        ),
        (
            "peer_gid",
            "KEYWARD_PEER_GID",
            peer_gid.map(|v| Field::Number(v.into())),
        ),
        ("reason", "KEYWARD_REASON", text(reason)),
        (
            "status",
            "KEYWARD_STATUS",
            status.map(|v| Field::Number(v.into())),
        ),
        ("token_id", "KEYWARD_TOKEN_ID", text(token_id)),
        ("task", "KEYWARD_TASK", text(task)),
        ("call_hash", "KEYWARD_CALL_HASH", text(call_hash)),
        ("call_id", "KEYWARD_CALL_ID", text(call_id)),
        (
            "parent_token_id",
            "KEYWARD_PARENT_TOKEN_ID",
            text(parent_token_id),
        ),
        ("bytes", "KEYWARD_BYTES", number(bytes)),
        ("duration_ms", "KEYWARD_DURATION_MS", number(duration_ms)),
        ("withheld", "KEYWARD_WITHHELD", withheld.map(Field::Bool)),
        ("version", "KEYWARD_VERSION", text(version)),
        ("config", "KEYWARD_CONFIG", text(config)),
        ("socket", "KEYWARD_SOCKET", text(socket)),
    ]
}

/// The entry as it was made through `serde_json` (every serialized field
/// of the record, by its serde name): what [`journal_entry`] must match.
#[cfg(test)]
fn journal_entry_through_serde(record: &Record<'_>) -> Vec<(String, Vec<u8>)> {
    let mut fields = vec![
        ("MESSAGE".to_owned(), message(record).into_bytes()),
        (
            "MESSAGE_ID".to_owned(),
            message_id(record.event).as_bytes().to_vec(),
        ),
        (
            "PRIORITY".to_owned(),
            priority(record.decision).to_string().into_bytes(),
        ),
        (
            "SYSLOG_IDENTIFIER".to_owned(),
            IDENTIFIER.as_bytes().to_vec(),
        ),
        ("SYSLOG_FACILITY".to_owned(), FACILITY.as_bytes().to_vec()),
    ];
    let Ok(serde_json::Value::Object(map)) = serde_json::to_value(record) else {
        panic!("an audit record must serialize as a map");
    };
    for (name, value) in map {
        let value = match value {
            serde_json::Value::Null => continue,
            serde_json::Value::String(s) if name == "parent_token_id" => {
                for id in s.split(' ').filter(|id| !id.is_empty()) {
                    fields.push((field_name(&name), id.as_bytes().to_vec()));
                }
                continue;
            }
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        fields.push((field_name(&name), value.into_bytes()));
    }
    fields
}

/// `peer_uid` -> `KEYWARD_PEER_UID`. Journal field names are uppercase
/// ASCII letters, digits and `_`; anything else becomes `_`.
#[cfg(test)]
fn field_name(name: &str) -> String {
    let mut out = String::with_capacity(8 + name.len());
    out.push_str("KEYWARD_");
    out.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    out
}

/// The human-readable `MESSAGE`: one sentence an admin can read in
/// `journalctl` without `-o verbose`.
fn message(record: &Record<'_>) -> String {
    let peer = match (record.peer_uid, record.peer_pid) {
        (Some(uid), Some(pid)) => format!(" (uid {uid}, pid {pid})"),
        _ => String::new(),
    };
    let tool = record.tool.unwrap_or("?");
    let reason = record.reason.unwrap_or("");
    match (record.event, record.decision) {
        (Event::Start, _) => {
            let mut text = "broker started".to_owned();
            if let Some(version) = record.version {
                text.push_str(&format!(": keyward-broker {version}"));
            }
            if let Some(config) = record.config {
                text.push_str(&format!(", config {config}"));
            }
            if let Some(socket) = record.socket {
                text.push_str(&format!(", socket {socket}"));
            }
            text
        }
        (Event::Stop, _) => "broker stopped".to_owned(),
        (Event::Reload, Decision::Error) => {
            format!("policy reload failed, the old policy stays in force: {reason}")
        }
        (Event::Reload, _) => format!("policy reloaded: {reason}"),
        (Event::Call, Decision::Allow) => format!(
            "call allowed: tool \"{tool}\" for principal \"{}\"{peer}",
            record.principal.unwrap_or("?")
        ),
        (Event::CallFailed, _) => format!("call of tool \"{tool}\" failed: {reason}{peer}"),
        (Event::Refused, _) => format!("refused: {reason}{peer}"),
        (Event::Call, _) if !reason.is_empty() => format!("{reason}{peer}"),
        (Event::Outcome, _) => {
            let mut text = format!("call of tool \"{tool}\"");
            if let Some(status) = record.status {
                text.push_str(&format!(" returned status {status}"));
            } else {
                text.push_str(" finished");
            }
            if let Some(bytes) = record.bytes {
                text.push_str(&format!(", {bytes} bytes"));
            }
            if let Some(ms) = record.duration_ms {
                text.push_str(&format!(" in {ms} ms"));
            }
            if record.withheld == Some(true) {
                text.push_str(", withheld: the response contains credential material");
            }
            text + &peer
        }
        (event, decision) => {
            let outcome = match decision {
                Decision::Allow => "allowed",
                Decision::Deny => "denied",
                Decision::Error => "failed",
                Decision::Info => "done",
            };
            let mut text = format!("{} {outcome}", event_name(event));
            if let Some(tool) = record.tool {
                text.push_str(&format!(": tool \"{tool}\""));
            }
            if !reason.is_empty() {
                text.push_str(&format!(": {reason}"));
            }
            text + &peer
        }
    }
}

/// The event's name as in `KEYWARD_EVENT` (its serde name; a test checks
/// the two agree).
fn event_name(event: Event) -> &'static str {
    match event {
        Event::Start => "start",
        Event::Stop => "stop",
        Event::Call => "call",
        Event::CallFailed => "call_failed",
        Event::Refused => "refused",
        Event::Reload => "reload",
        Event::Mint => "mint",
        Event::Bind => "bind",
        Event::Attenuate => "attenuate",
        Event::Revoke => "revoke",
        Event::Outcome => "outcome",
    }
}

/// The decision's name as in `KEYWARD_DECISION` (its serde name).
fn decision_name(decision: Decision) -> &'static str {
    match decision {
        Decision::Allow => "allow",
        Decision::Deny => "deny",
        Decision::Error => "error",
        Decision::Info => "info",
    }
}

/// Where the audit trail goes, as chosen with `--audit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuditTarget {
    /// journald's native protocol; fail to start if there is no journal.
    Journald,
    /// JSON lines on stderr.
    Stderr,
    /// journald if its socket exists, else stderr.
    Auto,
}

/// Why the audit trail cannot be opened or a record not written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open the journal at {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write audit record to {sink}: {source}")]
    Write {
        sink: String,
        #[source]
        source: io::Error,
    },
}

/// How many records of each kind were written, for the service status.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub calls_allowed: u64,
    pub calls_denied: u64,
    pub calls_failed: u64,
    pub refused: u64,
    /// Records the primary sink did not take.
    pub write_failures: u64,
}

#[derive(Debug, Default)]
struct Counters {
    calls_allowed: AtomicU64,
    calls_denied: AtomicU64,
    calls_failed: AtomicU64,
    refused: AtomicU64,
    write_failures: AtomicU64,
}

/// Where records go.
#[derive(Debug)]
pub struct Audit {
    sink: Sink,
    counters: Counters,
}

/// Deferred records held back at most this many bytes: beyond, the queue
/// is written at once.
const DEFERRED_KEPT: usize = 16 * 1024;

#[derive(Debug)]
enum Sink {
    /// JSON lines on stderr, each encoded into the buffer held with the
    /// lock (reused: no allocation per record). Deferred lines wait at its
    /// start, and go out in the same `write` as the next line.
    Stderr(Mutex<Vec<u8>>),
    /// Native journald entries; deferred ones wait, encoded, and go out
    /// in the same `sendmmsg` as the next entry.
    Journal(Journal, Mutex<Vec<Vec<u8>>>),
    /// Collected in memory (tests).
    #[cfg(test)]
    Memory(Mutex<Vec<String>>),
}

/// A JSON line as serde would write it: what [`write_json_line`] must
/// match byte for byte.
#[cfg(test)]
#[derive(Serialize)]
struct Line<'a> {
    ts: f64,
    #[serde(flatten)]
    record: &'a Record<'a>,
}

impl Audit {
    /// JSON lines on stderr.
    pub fn stderr() -> Audit {
        Audit::with_sink(Sink::Stderr(Mutex::new(Vec::new())))
    }

    /// Native entries to the journald socket at `path`.
    pub fn journald(path: &Path) -> Result<Audit, AuditError> {
        let journal = Journal::open(path).map_err(|source| AuditError::Open {
            path: path.to_owned(),
            source,
        })?;
        Ok(Audit::with_sink(Sink::Journal(
            journal,
            Mutex::new(Vec::new()),
        )))
    }

    /// The sink `target` names. `Auto` falls back to stderr only when no
    /// journal socket exists; a socket that exists but refuses us is an
    /// error, not a reason to log somewhere admins will not look.
    pub fn open(target: AuditTarget) -> Result<Audit, AuditError> {
        let socket = Path::new(journal::SOCKET);
        match target {
            AuditTarget::Stderr => Ok(Audit::stderr()),
            AuditTarget::Journald => Audit::journald(socket),
            AuditTarget::Auto if socket.exists() => Audit::journald(socket),
            AuditTarget::Auto => Ok(Audit::stderr()),
        }
    }

    fn with_sink(sink: Sink) -> Audit {
        Audit {
            sink,
            counters: Counters::default(),
        }
    }

    /// Whether records go to journald.
    pub fn is_journal(&self) -> bool {
        matches!(self.sink, Sink::Journal(..))
    }

    /// Write one record, and every deferred one before it. A stderr line
    /// goes out in one `write` with the deferred lines, so records from
    /// concurrent sessions never interleave; a journal entry is one
    /// datagram (or one memfd), sent in one `sendmmsg` with the deferred
    /// ones.
    pub fn record(&self, record: &Record<'_>) -> Result<(), AuditError> {
        let result = match &self.sink {
            Sink::Stderr(lock) => write_line(lock, Some(record)).map_err(stderr_error),
            Sink::Journal(journal, deferred) => journal_entry(record)
                .and_then(|fields| {
                    send_deferred(journal, deferred, Some(&journal::encode(&fields)))
                })
                .map_err(|source| journal_error(journal, source)),
            #[cfg(test)]
            Sink::Memory(lines) => json_line(record)
                .map(|line| {
                    lines
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(String::from_utf8_lossy(&line).into_owned());
                })
                .map_err(|source| AuditError::Write {
                    sink: "memory".into(),
                    source,
                }),
        };
        match &result {
            Ok(()) => self.count(record),
            Err(_) => {
                self.counters.write_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    /// Queue a record that is not a decision (the outcome of a call that
    /// went well) to go out in the same write as the next record, instead
    /// of a write of its own. Whoever defers must [`Audit::flush`] before
    /// it waits for anything: a session flushes before it waits for its
    /// peer's next message, so a record waits only while the broker is
    /// busy with a message already there (a peer making calls back to
    /// back), and a queue past 16 KiB is written at once. A decision is
    /// never deferred: it is written before what it allows happens.
    pub fn defer(&self, record: &Record<'_>) {
        let queued = match &self.sink {
            Sink::Stderr(lock) => {
                let mut line = lock.lock().unwrap_or_else(|p| p.into_inner());
                write_json_line(&mut line, now(), record).is_ok() && line.len() <= DEFERRED_KEPT
            }
            Sink::Journal(_, deferred) => match journal_entry(record) {
                // Encoded before the lock every session takes.
                Ok(fields) => {
                    let entry = journal::encode(&fields);
                    let mut deferred = deferred.lock().unwrap_or_else(|p| p.into_inner());
                    deferred.push(entry);
                    deferred.iter().map(Vec::len).sum::<usize>() <= DEFERRED_KEPT
                        && deferred.len() < journal::BATCH
                }
                Err(_) => false,
            },
            #[cfg(test)]
            Sink::Memory(_) => {
                let _ = self.record(record);
                return;
            }
        };
        if !queued {
            // Too much waiting, or the record could not be encoded: write
            // now, and report a failure like any record's.
            self.flush();
        }
    }

    /// Write the deferred records now. A failure is reported on stderr,
    /// with the records, like [`Audit::must_record`]'s.
    pub fn flush(&self) {
        let result = match &self.sink {
            Sink::Stderr(lock) => write_line(lock, None).map_err(stderr_error),
            Sink::Journal(journal, deferred) => {
                send_deferred(journal, deferred, None).map_err(|e| journal_error(journal, e))
            }
            #[cfg(test)]
            Sink::Memory(_) => Ok(()),
        };
        if let Err(e) = result {
            self.counters.write_failures.fetch_add(1, Ordering::Relaxed);
            let _ = writeln!(
                io::stderr().lock(),
                "keyward-broker: {e} (writing deferred records)"
            );
        }
    }

    /// Record, and if that fails report it and write the record to stderr
    /// (the last resort, so no decision is lost), then return the error so
    /// the caller can refuse to proceed.
    pub fn must_record(&self, record: &Record<'_>) -> Result<(), AuditError> {
        self.record(record).inspect_err(|e| {
            let mut stderr = io::stderr().lock();
            let _ = writeln!(stderr, "keyward-broker: {e}; the record follows");
            if let Ok(line) = json_line(record) {
                let _ = stderr.write_all(&line);
            }
        })
    }

    /// Records written so far, by kind.
    pub fn counts(&self) -> Counts {
        let c = &self.counters;
        Counts {
            calls_allowed: c.calls_allowed.load(Ordering::Relaxed),
            calls_denied: c.calls_denied.load(Ordering::Relaxed),
            calls_failed: c.calls_failed.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            write_failures: c.write_failures.load(Ordering::Relaxed),
        }
    }

    fn count(&self, record: &Record<'_>) {
        let c = &self.counters;
        let counter = match (record.event, record.decision) {
            (Event::Call, Decision::Allow) => &c.calls_allowed,
            (Event::Call, Decision::Deny) => &c.calls_denied,
            (Event::CallFailed, _) => &c.calls_failed,
            (Event::Refused, _) => &c.refused,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

fn json_line(record: &Record<'_>) -> io::Result<Vec<u8>> {
    let mut line = Vec::with_capacity(256);
    write_json_line(&mut line, now(), record)?;
    Ok(line)
}

/// Seconds since the epoch, the `ts` of a JSON line.
fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The buffer a stderr line is encoded into is kept between records, but
/// not one that an unusually long record grew beyond this.
const LINE_BUFFER_KEPT: usize = 16 * 1024;

/// Write the deferred lines in `buffer` and then `record`'s, in one
/// `write`; the buffer is left empty either way.
fn write_line(buffer: &Mutex<Vec<u8>>, record: Option<&Record<'_>>) -> io::Result<()> {
    let mut line = buffer.lock().unwrap_or_else(|p| p.into_inner());
    let written = match record {
        Some(record) => write_json_line(&mut line, now(), record),
        None => Ok(()),
    }
    .and_then(|()| match line.is_empty() {
        true => Ok(()),
        false => io::stderr().lock().write_all(&line),
    });
    line.clear();
    if line.capacity() > LINE_BUFFER_KEPT {
        line.shrink_to(LINE_BUFFER_KEPT);
    }
    written
}

/// Send the deferred journal entries, then `entry`, in one `sendmmsg`,
/// with the queue's lock held throughout, so that a session's outcome
/// never lands after its next decision (every writer waits on the
/// journal anyway). If the send fails, the deferred entries go to stderr
/// too, one field a line (JSON lines cannot be rebuilt from them; some
/// may have reached the journal: twice rather than lost); the caller
/// reports the error, and `entry` itself, as for any record.
fn send_deferred(
    journal: &Journal,
    deferred: &Mutex<Vec<Vec<u8>>>,
    entry: Option<&[u8]>,
) -> io::Result<()> {
    let mut queue = deferred.lock().unwrap_or_else(|p| p.into_inner());
    let before = std::mem::take(&mut *queue);
    let sent = match (entry, before.split_last()) {
        (Some(entry), _) => journal.send_all(&before, entry),
        (None, Some((last, rest))) => journal.send_all(rest, last),
        (None, None) => return Ok(()),
    };
    if sent.is_err() {
        let mut stderr = io::stderr().lock();
        for entry in &before {
            let _ = stderr.write_all(entry);
            let _ = stderr.write_all(b"\n");
        }
    }
    sent
}

fn stderr_error(source: io::Error) -> AuditError {
    AuditError::Write {
        sink: "stderr".into(),
        source,
    }
}

fn journal_error(journal: &Journal, source: io::Error) -> AuditError {
    AuditError::Write {
        sink: format!("the journal ({})", journal.path().display()),
        source,
    }
}

/// Append the JSON line of `record` to `out`: `{"ts":...,` then the
/// record's [`fields`] in their declared order, absent ones left out, then
/// `}` and a newline -- exactly what serde writes for [`Record`] flattened
/// after `ts` (a test compares the two), but without serde's flatten, which
/// first collects the record into a map: this runs before every call.
/// Strings and numbers are written by serde_json (its escaping), into
/// `out` directly.
fn write_json_line(out: &mut Vec<u8>, ts: f64, record: &Record<'_>) -> io::Result<()> {
    // Every field by name, so a field added to `Record` does not compile
    // until it is written here too; the keys are constants, so copying
    // them compiles to a few moves (this runs twice per call).
    let &Record {
        event,
        decision,
        tool,
        principal,
        peer_pid,
        peer_uid,
        peer_gid,
        reason,
        status,
        token_id,
        task,
        call_hash,
        call_id,
        parent_token_id,
        bytes,
        duration_ms,
        withheld,
        version,
        config,
        socket,
    } = record;
    // Room for a typical record, so the pushes below do not grow it.
    out.reserve(512);
    out.extend_from_slice(b"{\"ts\":");
    serde_json::to_writer(&mut *out, &ts).map_err(io::Error::other)?;
    let mut line = JsonLine {
        out,
        digits: itoa::Buffer::new(),
    };
    line.text(b",\"event\":", Some(event_name(event)))?;
    line.text(b",\"decision\":", Some(decision_name(decision)))?;
    line.text(b",\"tool\":", tool)?;
    line.text(b",\"principal\":", principal)?;
    line.number(b",\"peer_pid\":", peer_pid);
    line.number(b",\"peer_uid\":", peer_uid);
    line.number(b",\"peer_gid\":", peer_gid);
    line.text(b",\"reason\":", reason)?;
    line.number(b",\"status\":", status);
    line.text(b",\"token_id\":", token_id)?;
    line.text(b",\"task\":", task)?;
    line.text(b",\"call_hash\":", call_hash)?;
    line.text(b",\"call_id\":", call_id)?;
    line.text(b",\"parent_token_id\":", parent_token_id)?;
    line.number(b",\"bytes\":", bytes);
    line.number(b",\"duration_ms\":", duration_ms);
    if let Some(withheld) = withheld {
        line.out.extend_from_slice(b",\"withheld\":");
        line.out
            .extend_from_slice(if withheld { b"true" } else { b"false" });
    }
    line.text(b",\"version\":", version)?;
    line.text(b",\"config\":", config)?;
    line.text(b",\"socket\":", socket)?;
    line.out.extend_from_slice(b"}\n");
    Ok(())
}

/// A JSON line being written: `,"key":value` per present field.
struct JsonLine<'o> {
    out: &'o mut Vec<u8>,
    digits: itoa::Buffer,
}

impl JsonLine<'_> {
    #[inline(always)]
    fn text(&mut self, key: &[u8], value: Option<&str>) -> io::Result<()> {
        let Some(text) = value else { return Ok(()) };
        self.out.extend_from_slice(key);
        if needs_escape(text.as_bytes()) {
            // serde_json's escaping, for the rare string that needs it.
            serde_json::to_writer(&mut *self.out, text).map_err(io::Error::other)
        } else {
            self.out.push(b'"');
            self.out.extend_from_slice(text.as_bytes());
            self.out.push(b'"');
            Ok(())
        }
    }

    #[inline(always)]
    fn number(&mut self, key: &[u8], value: Option<impl itoa::Integer>) {
        if let Some(n) = value {
            self.out.extend_from_slice(key);
            self.out.extend_from_slice(self.digits.format(n).as_bytes());
        }
    }
}

/// Whether JSON needs any byte of `text` escaped: a control character
/// (below 0x20), `"` or `\\`. Eight bytes at a time (the classic
/// "has a byte less than / equal to" word tricks, exact as a yes/no).
fn needs_escape(text: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    let has_zero = |w: u64| w.wrapping_sub(ONES) & !w & HIGH != 0;
    let mut words = text.chunks_exact(8);
    for chunk in &mut words {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_ne_bytes(word);
        if w.wrapping_sub(ONES * 0x20) & !w & HIGH != 0
            || has_zero(w ^ (ONES * u64::from(b'"')))
            || has_zero(w ^ (ONES * u64::from(b'\\')))
        {
            return true;
        }
    }
    words
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod test_util {
    use super::*;

    impl Audit {
        pub(crate) fn memory() -> Audit {
            Audit::with_sink(Sink::Memory(Mutex::new(Vec::new())))
        }

        pub(crate) fn lines(&self) -> Vec<String> {
            match &self.sink {
                Sink::Memory(lines) => lines.lock().unwrap().clone(),
                Sink::Stderr(_) | Sink::Journal(..) => Vec::new(),
            }
        }
    }

    #[test]
    fn every_record_field_becomes_a_keyward_field() {
        let record = Record::new(Event::Call, Decision::Deny)
            .peer(7, 1000, 1001)
            .tool("send_email")
            .principal("orchestrator")
            .reason("call denied: no")
            .status(403);
        let fields = journal_entry(&record).unwrap();
        let get = |name: &str| {
            fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
        };
        assert_eq!(get("KEYWARD_EVENT").as_deref(), Some("call"));
        assert_eq!(get("KEYWARD_DECISION").as_deref(), Some("deny"));
        assert_eq!(get("KEYWARD_TOOL").as_deref(), Some("send_email"));
        assert_eq!(get("KEYWARD_PRINCIPAL").as_deref(), Some("orchestrator"));
        assert_eq!(get("KEYWARD_PEER_PID").as_deref(), Some("7"));
        assert_eq!(get("KEYWARD_PEER_UID").as_deref(), Some("1000"));
        assert_eq!(get("KEYWARD_PEER_GID").as_deref(), Some("1001"));
        assert_eq!(get("KEYWARD_REASON").as_deref(), Some("call denied: no"));
        assert_eq!(get("KEYWARD_STATUS").as_deref(), Some("403"));
        assert_eq!(get("PRIORITY").as_deref(), Some("5"));
        assert_eq!(get("SYSLOG_IDENTIFIER").as_deref(), Some("keyward-broker"));
        assert_eq!(
            get("MESSAGE_ID").as_deref(),
            Some("2199d2a66c774d17a375b2811c3c4b75")
        );
        assert_eq!(
            get("MESSAGE").as_deref(),
            Some("call denied: no (uid 1000, pid 7)")
        );
        // Every field name is one journald accepts from a client.
        for (name, _) in &fields {
            assert!(!name.starts_with('_'), "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'),
                "{name}"
            );
        }
    }

    #[test]
    fn the_journal_entry_is_the_one_made_through_serde() {
        let every_field = Record::new(Event::Attenuate, Decision::Deny)
            .peer(-7, 4_294_967_295, 0)
            .tool("a\nb")
            .principal("p")
            .reason("r")
            .status(65_535)
            .token("ab12")
            .task("cd34")
            .call_hash("ef56")
            .call_id("c1")
            .parent_token("pa pb")
            .bytes(u64::MAX)
            .duration_ms(12)
            .withheld(true)
            .version("0.1.0")
            .config("/etc/keyward/broker.toml")
            .socket("/run/keyward/broker.sock");
        for record in [every_field, Record::new(Event::Start, Decision::Info)] {
            let ours = journal_entry(&record).unwrap();
            assert_eq!(ours, journal_entry_through_serde(&record));
            assert_eq!(
                crate::journal::encode(&ours),
                crate::journal::encode(&journal_entry_through_serde(&record))
            );
        }
    }

    #[test]
    fn call_ids_are_distinct_128_bit_hex() {
        let a = CallId::new();
        let b = CallId::new();
        assert_eq!(a.as_str().len(), 32);
        assert!(a.as_str().chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a.as_str(), b.as_str());
    }

    #[test]
    fn each_ancestor_is_its_own_parent_field() {
        let record = Record::new(Event::Call, Decision::Allow)
            .tool("t")
            .parent_token("aa11 bb22 cc33");
        let fields = journal_entry(&record).unwrap();
        let parents: Vec<_> = fields
            .iter()
            .filter(|(n, _)| n == "KEYWARD_PARENT_TOKEN_ID")
            .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
            .collect();
        assert_eq!(parents, ["aa11", "bb22", "cc33"]);
        // The JSON line keeps the list as one string.
        let mut line = Vec::new();
        write_json_line(&mut line, 0.0, &record).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["parent_token_id"], "aa11 bb22 cc33");
    }

    #[test]
    fn the_start_record_names_version_config_and_socket() {
        let record = Record::new(Event::Start, Decision::Info)
            .version("1.2.3")
            .config("/etc/keyward/broker.toml")
            .socket("/run/keyward/broker.sock");
        let fields = journal_entry(&record).unwrap();
        let get = |name: &str| {
            fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
        };
        assert_eq!(get("KEYWARD_VERSION").as_deref(), Some("1.2.3"));
        assert_eq!(
            get("KEYWARD_CONFIG").as_deref(),
            Some("/etc/keyward/broker.toml")
        );
        assert_eq!(
            get("KEYWARD_SOCKET").as_deref(),
            Some("/run/keyward/broker.sock")
        );
        assert_eq!(
            get("MESSAGE").as_deref(),
            Some(
                "broker started: keyward-broker 1.2.3, config /etc/keyward/broker.toml, \
                 socket /run/keyward/broker.sock"
            )
        );
    }

    #[test]
    fn absent_fields_are_left_out() {
        let fields = journal_entry(&Record::new(Event::Start, Decision::Info)).unwrap();
        let names: Vec<_> = fields.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"KEYWARD_EVENT"));
        assert!(!names.contains(&"KEYWARD_TOOL"), "{names:?}");
        assert!(!names.contains(&"KEYWARD_PEER_UID"), "{names:?}");
    }

    #[test]
    fn message_ids_are_distinct_128_bit_ids() {
        let ids: Vec<_> = Event::ALL.into_iter().map(message_id).collect();
        for id in &ids {
            assert_eq!(id.len(), 32);
            assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        }
        let unique: std::collections::BTreeSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
    }

    #[test]
    fn the_catalog_documents_every_message_id() {
        let catalog = include_str!("../../systemd/keyward.catalog");
        for event in Event::ALL {
            let id = message_id(event);
            assert!(
                catalog.contains(&format!("-- {id}\n")),
                "{event:?} ({id}) has no catalog entry"
            );
        }
    }

    #[test]
    fn records_are_json_lines() {
        let audit = Audit::memory();
        audit
            .record(
                &Record::new(Event::Call, Decision::Deny)
                    .peer(7, 1000, 1000)
                    .tool("x\n\"y")
                    .reason("because"),
            )
            .unwrap();
        let lines = audit.lines();
        assert_eq!(lines.len(), 1);
        assert!(lines[0].ends_with('\n'));
        assert_eq!(lines[0].matches('\n').count(), 1, "one line per record");
        let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(v["event"], "call");
        assert_eq!(v["decision"], "deny");
        assert_eq!(v["tool"], "x\n\"y");
        assert_eq!(v["peer_uid"], 1000);
    }

    #[test]
    fn names_are_the_serde_names() {
        for event in Event::ALL {
            assert_eq!(serde_json::json!(event), event_name(event), "{event:?}");
        }
        for decision in [
            Decision::Allow,
            Decision::Deny,
            Decision::Error,
            Decision::Info,
        ] {
            assert_eq!(
                serde_json::json!(decision),
                decision_name(decision),
                "{decision:?}"
            );
        }
    }

    #[test]
    fn the_json_line_is_what_serde_writes() {
        let every_field = Record::new(Event::CallFailed, Decision::Error)
            .peer(-1, 4_294_967_295, 0)
            .tool("t\u{7f}\u{1}\"\\/é\u{2028}")
            .principal("p")
            .reason("line\nbreak\ttab")
            .status(503)
            .token("ab12")
            .task("cd34")
            .call_hash("ef56")
            .call_id("c1")
            .parent_token("pa pb")
            .bytes(4096)
            .duration_ms(0)
            .withheld(false)
            .version("v")
            .config("c\"")
            .socket("s");
        let mut records = vec![every_field, Record::new(Event::Start, Decision::Info)];
        // Each kind of character on its own: the copied and escaped paths.
        for odd in ["plain", "\"", "\\", "\u{1f}", "\u{7f}", "é", "", " "] {
            records.push(Record::new(Event::Call, Decision::Deny).reason(odd));
        }
        for record in records {
            for ts in [0.0, 1_764_460_800.123_456_7, f64::NAN] {
                let mut ours = Vec::new();
                write_json_line(&mut ours, ts, &record).unwrap();
                let mut serde = serde_json::to_vec(&Line {
                    ts,
                    record: &record,
                })
                .unwrap();
                serde.push(b'\n');
                assert_eq!(
                    String::from_utf8(ours).unwrap(),
                    String::from_utf8(serde).unwrap()
                );
            }
        }
    }

    #[test]
    fn needs_escape_answers_as_a_byte_by_byte_check_does() {
        let naive = |t: &[u8]| t.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
        // Every byte value at every position of words and remainders,
        // next to bytes that could carry a borrow (0x00, 0x7f, 0xff).
        for len in 0..20 {
            for at in 0..len {
                for odd in 0..=255u8 {
                    for around in [b'a', 0x20, 0x7f, 0x80, 0xff] {
                        let mut text = vec![around; len];
                        text[at] = odd;
                        assert_eq!(needs_escape(&text), naive(&text), "{text:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_deferred_record_goes_out_before_the_next_one_and_on_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socket");
        let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        server.set_nonblocking(true).unwrap();
        let audit = Audit::journald(&path).unwrap();
        let mut buf = vec![0u8; 4096];
        server.recv(&mut buf).unwrap();
        let event_of = |entry: &[u8]| {
            let text = String::from_utf8_lossy(entry).into_owned();
            text.lines()
                .find_map(|l| l.strip_prefix("KEYWARD_EVENT=").map(str::to_owned))
                .unwrap()
        };

        audit.defer(&Record::new(Event::Outcome, Decision::Info).call_id("c1"));
        assert!(server.recv(&mut buf).is_err(), "deferred: not sent yet");
        audit
            .record(&Record::new(Event::Call, Decision::Allow).call_id("c2"))
            .unwrap();
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(event_of(&buf[..n]), "outcome", "the deferred one first");
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(event_of(&buf[..n]), "call");
        assert!(server.recv(&mut buf).is_err());

        audit.defer(&Record::new(Event::Outcome, Decision::Info).call_id("c3"));
        audit.flush();
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(event_of(&buf[..n]), "outcome");
        audit.flush();
        assert!(
            server.recv(&mut buf).is_err(),
            "a flush with nothing queued sends nothing"
        );

        // A queue past its bound is written at once.
        let reason = "r".repeat(DEFERRED_KEPT);
        audit.defer(&Record::new(Event::Outcome, Decision::Info).reason(&reason));
        let mut big = vec![0u8; 2 * DEFERRED_KEPT];
        let n = server.recv(&mut big).unwrap();
        assert_eq!(event_of(&big[..n]), "outcome");
    }

    #[test]
    fn decisions_are_counted() {
        let audit = Audit::memory();
        for (event, decision) in [
            (Event::Start, Decision::Info),
            (Event::Call, Decision::Allow),
            (Event::Call, Decision::Allow),
            (Event::Call, Decision::Deny),
            (Event::CallFailed, Decision::Error),
            (Event::Refused, Decision::Deny),
        ] {
            audit.record(&Record::new(event, decision)).unwrap();
        }
        assert_eq!(
            audit.counts(),
            Counts {
                calls_allowed: 2,
                calls_denied: 1,
                calls_failed: 1,
                refused: 1,
                write_failures: 0,
            }
        );
    }

    #[test]
    fn a_journal_that_went_away_is_a_reported_failure() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socket");
        let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let audit = Audit::journald(&path).unwrap();
        audit
            .must_record(&Record::new(Event::Start, Decision::Info))
            .unwrap();
        drop(server);
        let err = audit
            .must_record(&Record::new(Event::Call, Decision::Allow).tool("t"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot write audit record to the journal"),
            "{err}"
        );
        assert_eq!(audit.counts().write_failures, 1);
        assert_eq!(
            audit.counts().calls_allowed,
            0,
            "a failed write counts as nothing"
        );
    }

    #[test]
    fn a_journal_record_arrives_as_its_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socket");
        let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let audit = Audit::journald(&path).unwrap();
        let mut buf = vec![0u8; 4096];
        assert_eq!(server.recv(&mut buf).unwrap(), 0, "the probe is empty");
        let record = Record::new(Event::Revoke, Decision::Allow).token("ab12");
        audit.record(&record).unwrap();
        let n = server.recv(&mut buf).unwrap();
        let want = crate::journal::encode(&journal_entry(&record).unwrap());
        assert_eq!(&buf[..n], want.as_slice());
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(
            text.contains("MESSAGE_ID=f72395a0f9f445e6b0c0e20b12483a96\n"),
            "{text}"
        );
        assert!(text.contains("KEYWARD_TOKEN_ID=ab12\n"), "{text}");
    }

    #[test]
    fn auto_without_a_journal_socket_is_stderr() {
        if Path::new(journal::SOCKET).exists() {
            return; // a journald runs here: auto rightly picks it
        }
        assert!(!Audit::open(AuditTarget::Auto).unwrap().is_journal());
        assert!(Audit::open(AuditTarget::Journald).is_err());
    }
}
