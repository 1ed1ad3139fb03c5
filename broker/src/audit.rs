// SPDX-License-Identifier: Apache-2.0
//! The audit trail: one record per decision.
//!
//! Records are written synchronously, before the decision takes effect: if
//! the record of an allowed call cannot be written, the call is not made.
//! For now records go to stderr as JSON lines (under systemd, stderr is the
//! journal); native journald fields come with their own sink.
//!
//! Records carry kernel-supplied peer identity, the tool, the decision and
//! its reason. They never carry a credential or a parameter value (denial
//! reasons name values only for parameters policy does not mark secret).

use std::io::{self, Write};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

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
}

/// Why a record could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write audit record: {0}")]
pub struct AuditError(#[from] io::Error);

/// Where records go.
#[derive(Debug)]
pub struct Audit {
    sink: Sink,
}

#[derive(Debug)]
enum Sink {
    /// JSON lines on stderr.
    Stderr(Mutex<()>),
    /// Collected in memory (tests).
    #[cfg(test)]
    Memory(Mutex<Vec<String>>),
}

#[derive(Serialize)]
struct Line<'a> {
    ts: f64,
    #[serde(flatten)]
    record: &'a Record<'a>,
}

impl Audit {
    /// JSON lines on stderr.
    pub fn stderr() -> Audit {
        Audit {
            sink: Sink::Stderr(Mutex::new(())),
        }
    }

    /// Write one record. The whole line goes out in one `write` so records
    /// from concurrent sessions never interleave.
    pub fn record(&self, record: &Record<'_>) -> Result<(), AuditError> {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let mut line = serde_json::to_vec(&Line { ts, record }).map_err(io::Error::other)?;
        line.push(b'\n');
        match &self.sink {
            Sink::Stderr(lock) => {
                let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
                io::stderr().lock().write_all(&line)?;
            }
            #[cfg(test)]
            Sink::Memory(lines) => lines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(String::from_utf8_lossy(&line).into_owned()),
        }
        Ok(())
    }

    /// Record, and if that fails report it on stderr (the last resort) and
    /// return the error so the caller can refuse to proceed.
    pub fn must_record(&self, record: &Record<'_>) -> Result<(), AuditError> {
        self.record(record).inspect_err(|e| {
            let _ = writeln!(io::stderr(), "keyward-broker: {e}");
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod test_util {
    use super::*;

    impl Audit {
        pub(crate) fn memory() -> Audit {
            Audit {
                sink: Sink::Memory(Mutex::new(Vec::new())),
            }
        }

        pub(crate) fn lines(&self) -> Vec<String> {
            match &self.sink {
                Sink::Memory(lines) => lines.lock().unwrap().clone(),
                Sink::Stderr(_) => Vec::new(),
            }
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
}
