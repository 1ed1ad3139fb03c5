// SPDX-License-Identifier: Apache-2.0
//! journald's native protocol: a generic transport for entries of
//! `NAME=value` fields. What an entry holds is its caller's business
//! (the audit trail builds its entries in [`crate::audit`]).
//!
//! An entry is a datagram of `NAME=value\n` fields (a value holding a
//! newline is sent as `NAME\n`, its length as a little-endian u64, the
//! bytes, `\n`) to `/run/systemd/journal/socket`. An entry too large for a
//! datagram goes in a sealed memfd whose descriptor is sent instead, as
//! `sd_journal_send` does. journald itself adds the trusted fields
//! (`_PID`, `_UID`, `_COMM`, `_SYSTEMD_UNIT`, ...) from the kernel's view
//! of the sender; a field a client sends whose name starts with `_` is
//! dropped, so admins can filter on them (see `docs/OPERATIONS.md`).

use std::io::{self, IoSlice, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{
    sendmsg, setsockopt, socket, sockopt, AddressFamily, ControlMessage, MsgFlags, SockFlag,
    SockType, UnixAddr,
};

/// Where journald listens for native-protocol entries.
pub const SOCKET: &str = "/run/systemd/journal/socket";

/// Entries sent in one `sendmmsg` at most.
pub const BATCH: usize = 32;

/// How long one entry may wait for room in journald's socket buffer
/// before the write counts as failed.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

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

    /// Send one entry, through a sealed memfd if it is too large for a
    /// datagram.
    pub fn send(&self, fields: &[(String, Vec<u8>)]) -> io::Result<()> {
        self.send_entry(&encode(fields))
    }

    /// Send one [`encode`]d entry: a datagram, or a memfd when it is too
    /// large for one.
    fn send_entry(&self, payload: &[u8]) -> io::Result<()> {
        match self.send_datagram(payload) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMSGSIZE | libc::ENOBUFS)) => {
                self.send_memfd(payload)
            }
            other => other,
        }
    }

    /// Send the [`encode`]d entries `before` and then `entry`, in order,
    /// in one `sendmmsg` (at most [`BATCH`] at a time); any the kernel did
    /// not take that way (one too large for a datagram) go one by one.
    pub fn send_all(&self, before: &[Vec<u8>], entry: &[u8]) -> io::Result<()> {
        use nix::sys::socket::{sendmmsg, MultiHeaders};
        if before.is_empty() {
            return self.send_entry(entry);
        }
        let entries: Vec<&[u8]> = before
            .iter()
            .map(Vec::as_slice)
            .chain(std::iter::once(entry))
            .collect();
        let mut done = 0;
        for batch in entries.chunks(BATCH) {
            let slices: Vec<[IoSlice<'_>; 1]> = batch.iter().map(|e| [IoSlice::new(e)]).collect();
            let addrs: Vec<Option<UnixAddr>> = vec![Some(self.addr); batch.len()];
            let mut headers = MultiHeaders::<UnixAddr>::preallocate(batch.len(), None);
            let sent = loop {
                match sendmmsg(
                    self.fd.as_raw_fd(),
                    &mut headers,
                    &slices,
                    &addrs,
                    [],
                    MsgFlags::MSG_NOSIGNAL,
                ) {
                    Ok(results) => break results.count(),
                    Err(nix::Error::EINTR) => continue,
                    // The first entry did not go: it goes on its own below.
                    Err(_) => break 0,
                }
            };
            for rest in batch.get(sent..).unwrap_or_default() {
                self.send_entry(rest)?;
            }
            done += batch.len();
        }
        debug_assert_eq!(done, entries.len());
        Ok(())
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

    #[test]
    fn entries_sent_together_arrive_in_order_and_a_large_one_by_memfd() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socket");
        let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let journal = Journal::open(&path).unwrap();
        let mut buf = vec![0u8; 64];
        server.recv(&mut buf).unwrap();

        let entry = |m: &str| encode(&[("MESSAGE".to_owned(), m.as_bytes().to_vec())]);
        let big = encode(&[("MESSAGE".to_owned(), vec![b'x'; 4 << 20])]);
        // More than one sendmmsg batch, with a too-large entry in the middle.
        let mut before: Vec<Vec<u8>> = (0..BATCH + 3).map(|i| entry(&format!("m{i}"))).collect();
        before.insert(5, big.clone());
        let want: Vec<Vec<u8>> = before.iter().cloned().chain([entry("last")]).collect();
        // A reader, as journald is: a datagram socket's queue is short.
        let reader = {
            let server = server.try_clone().unwrap();
            let count = want.len();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                let mut buf = vec![0u8; 64];
                while got.len() < count {
                    match got.len() {
                        5 => got.push(recv_memfd(&server)),
                        _ => {
                            let n = server.recv(&mut buf).unwrap();
                            got.push(buf[..n].to_vec());
                        }
                    }
                }
                got
            })
        };
        journal.send_all(&before, &entry("last")).unwrap();
        let got = reader.join().unwrap();
        assert_eq!(got.len(), want.len());
        for (i, (got, want)) in got.iter().zip(&want).enumerate() {
            assert!(got == want, "entry {i}");
        }
        server.set_nonblocking(true).unwrap();
        assert!(server.recv(&mut buf).is_err(), "nothing more");
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
