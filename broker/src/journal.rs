// SPDX-License-Identifier: Apache-2.0
//! The journald audit sink: each audit record becomes one journal entry,
//! sent with journald's native protocol.
//!
//! An entry is a datagram of `NAME=value\n` fields (a value holding a
//! newline is sent as `NAME\n`, its length as a little-endian u64, the
//! bytes, `\n`) to `/run/systemd/journal/socket`. An entry too large for a
//! datagram goes in a sealed memfd whose descriptor is sent instead, as
//! `sd_journal_send` does. journald itself adds the trusted fields
//! (`_PID`, `_UID`, `_COMM`, `_SYSTEMD_UNIT`, ...) from the kernel's view
//! of the sender; a field a client sends whose name starts with `_` is
//! dropped, so admins can filter on them (see `docs/OPERATIONS.md`).
//!
//! Every [`Record`] field becomes a `KEYWARD_<FIELD>` entry field by its
//! serde name, so a field added to `Record` is in the journal without a
//! change here. Each [`Event`] has a fixed `MESSAGE_ID`, documented in
//! `systemd/keyward.catalog`.

use std::io::{self, IoSlice, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{
    sendmsg, setsockopt, socket, sockopt, AddressFamily, ControlMessage, MsgFlags, SockFlag,
    SockType, UnixAddr,
};

use crate::audit::{Decision, Event, Record};

/// Where journald listens for native-protocol entries.
pub const SOCKET: &str = "/run/systemd/journal/socket";

/// `SYSLOG_IDENTIFIER` of every entry.
pub const IDENTIFIER: &str = "keyward-broker";

/// `SYSLOG_FACILITY` of every entry: LOG_AUTHPRIV, as for other
/// security and authorization messages.
const FACILITY: &str = "10";

/// How long one entry may wait for room in journald's socket buffer
/// before the write counts as failed.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// The fixed `MESSAGE_ID` of each kind of event. Generated once with
/// `systemd-id128 new`; never change one, admins' queries depend on them.
pub fn message_id(event: Event) -> &'static str {
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
    }
}

/// syslog priority of a record: denials are notices, failures errors.
pub fn priority(decision: Decision) -> u8 {
    match decision {
        Decision::Allow | Decision::Info => 6,
        Decision::Deny => 5,
        Decision::Error => 3,
    }
}

/// A connection to journald's native socket (an unbound datagram socket;
/// each entry is addressed to the socket path, so a restarted journald is
/// reached without reconnecting).
#[derive(Debug)]
pub struct Journal {
    fd: OwnedFd,
    addr: UnixAddr,
    path: PathBuf,
}

impl Journal {
    /// Open a socket for sending to journald at `path`. Fails if nothing
    /// is listening there.
    pub fn open(path: &Path) -> io::Result<Journal> {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let timeout = nix::sys::time::TimeVal::new(SEND_TIMEOUT.as_secs() as _, 0);
        setsockopt(&fd, sockopt::SendTimeout, &timeout)?;
        let journal = Journal {
            fd,
            addr: UnixAddr::new(path)?,
            path: path.to_owned(),
        };
        // An empty datagram is a valid (ignored) message: it proves the
        // socket exists and accepts us before the first record depends on it.
        journal.send_datagram(&[])?;
        Ok(journal)
    }

    /// The socket path entries go to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Send one audit record as one journal entry.
    pub fn send_record(&self, record: &Record<'_>) -> io::Result<()> {
        self.send(&entry(record)?)
    }

    /// Send one entry, through a sealed memfd if it is too large for a
    /// datagram.
    pub fn send(&self, fields: &[(String, Vec<u8>)]) -> io::Result<()> {
        let payload = encode(fields);
        match self.send_datagram(&payload) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMSGSIZE | libc::ENOBUFS)) => {
                self.send_memfd(&payload)
            }
            other => other,
        }
    }

    fn send_datagram(&self, payload: &[u8]) -> io::Result<()> {
        loop {
            return match sendmsg(
                self.fd.as_raw_fd(),
                &[IoSlice::new(payload)],
                &[],
                MsgFlags::MSG_NOSIGNAL,
                Some(&self.addr),
            ) {
                Ok(_) => Ok(()),
                Err(nix::Error::EINTR) => continue,
                Err(e) => Err(e.into()),
            };
        }
    }

    /// The large-entry path of the native protocol: write the payload to
    /// a memfd, seal it so journald can trust its size and content, and
    /// send only the descriptor.
    fn send_memfd(&self, payload: &[u8]) -> io::Result<()> {
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        use nix::sys::memfd::{memfd_create, MFdFlags};
        let memfd = memfd_create(
            c"keyward-journal",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )?;
        let mut file = std::fs::File::from(memfd);
        file.write_all(payload)?;
        fcntl(
            &file,
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_SHRINK
                    | SealFlag::F_SEAL_GROW
                    | SealFlag::F_SEAL_WRITE
                    | SealFlag::F_SEAL_SEAL,
            ),
        )?;
        let fds = [file.as_raw_fd()];
        loop {
            return match sendmsg(
                self.fd.as_raw_fd(),
                &[],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                Some(&self.addr),
            ) {
                Ok(_) => Ok(()),
                Err(nix::Error::EINTR) => continue,
                Err(e) => Err(e.into()),
            };
        }
    }
}

/// The fields of the journal entry for `record`: the standard ones, then
/// `KEYWARD_<NAME>` for every field the record has.
pub fn entry(record: &Record<'_>) -> io::Result<Vec<(String, Vec<u8>)>> {
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
    let serde_json::Value::Object(map) = serde_json::to_value(record).map_err(io::Error::other)?
    else {
        return Err(io::Error::other("an audit record must serialize as a map"));
    };
    for (name, value) in map {
        let value = match value {
            serde_json::Value::Null => continue,
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        fields.push((field_name(&name), value.into_bytes()));
    }
    Ok(fields)
}

/// `peer_uid` -> `KEYWARD_PEER_UID`. Journal field names are uppercase
/// ASCII letters, digits and `_`; anything else becomes `_`.
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
pub fn message(record: &Record<'_>) -> String {
    let peer = match (record.peer_uid, record.peer_pid) {
        (Some(uid), Some(pid)) => format!(" (uid {uid}, pid {pid})"),
        _ => String::new(),
    };
    let tool = record.tool.unwrap_or("?");
    let reason = record.reason.unwrap_or("");
    match (record.event, record.decision) {
        (Event::Start, _) => "broker started".to_owned(),
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

/// The event's name as in `KEYWARD_EVENT` (its serde name).
fn event_name(event: Event) -> String {
    match serde_json::to_value(event) {
        Ok(serde_json::Value::String(name)) => name,
        _ => format!("{event:?}"),
    }
}

/// Encode fields in the native protocol.
pub fn encode(fields: &[(String, Vec<u8>)]) -> Vec<u8> {
    let size = fields.iter().map(|(n, v)| n.len() + v.len() + 10).sum();
    let mut out = Vec::with_capacity(size);
    for (name, value) in fields {
        out.extend_from_slice(name.as_bytes());
        if value.contains(&b'\n') {
            out.push(b'\n');
            out.extend_from_slice(&(value.len() as u64).to_le_bytes());
        } else {
            out.push(b'=');
        }
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_multiline_values_are_encoded_as_journald_reads_them() {
        let fields = vec![
            ("MESSAGE".to_owned(), b"hi".to_vec()),
            ("KEYWARD_REASON".to_owned(), b"a\nb".to_vec()),
        ];
        let mut want = b"MESSAGE=hi\nKEYWARD_REASON\n".to_vec();
        want.extend_from_slice(&3u64.to_le_bytes());
        want.extend_from_slice(b"a\nb\n");
        assert_eq!(encode(&fields), want);
    }

    #[test]
    fn every_record_field_becomes_a_keyward_field() {
        let record = Record::new(Event::Call, Decision::Deny)
            .peer(7, 1000, 1001)
            .tool("send_email")
            .principal("orchestrator")
            .reason("call denied: no")
            .status(403);
        let fields = entry(&record).unwrap();
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
    fn absent_fields_are_left_out() {
        let fields = entry(&Record::new(Event::Start, Decision::Info)).unwrap();
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
    fn opening_a_missing_socket_fails() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Journal::open(&dir.path().join("socket")).is_err());
    }

    #[test]
    fn small_and_large_entries_reach_a_datagram_listener() {
        // A stand-in journald: records what arrives, datagram or memfd.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socket");
        let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let journal = Journal::open(&path).unwrap();
        let mut buf = vec![0u8; 16];
        assert_eq!(server.recv(&mut buf).unwrap(), 0, "the probe is empty");

        journal
            .send(&[("MESSAGE".to_owned(), b"small".to_vec())])
            .unwrap();
        assert_eq!(server.recv(&mut buf).unwrap(), 14);
        assert_eq!(&buf[..14], b"MESSAGE=small\n");

        // Larger than any datagram the socket takes: goes by memfd.
        let big = vec![b'x'; 4 << 20];
        journal
            .send(&[("MESSAGE".to_owned(), big.clone())])
            .unwrap();
        let content = recv_memfd(&server);
        assert_eq!(content.len(), big.len() + 9);
        assert!(content.starts_with(b"MESSAGE=xxx"));
    }

    /// Receive an empty datagram carrying one fd; read what it holds.
    fn recv_memfd(server: &std::os::unix::net::UnixDatagram) -> Vec<u8> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned};
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let mut buf = [0u8; 16];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            server.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )
        .unwrap();
        assert_eq!(msg.bytes, 0);
        let fds: Vec<_> = msg
            .cmsgs()
            .unwrap()
            .filter_map(|c| match c {
                ControlMessageOwned::ScmRights(fds) => Some(fds),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(fds.len(), 1);
        let content = std::fs::read(format!("/proc/self/fd/{}", fds[0])).unwrap();
        nix::unistd::close(fds[0]).unwrap();
        content
    }
}
