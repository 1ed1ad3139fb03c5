// SPDX-License-Identifier: Apache-2.0
//! The service manager protocol (`sd_notify`): tell systemd when the
//! broker is ready, what it is doing, that it is alive, and when it
//! reloads or stops.
//!
//! `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` are read once, at
//! start, and removed from the environment (as `sd_notify(3)`'s
//! `unset_environment` does), so nothing that later reads the broker's
//! environment (a library, or the program of an `exec` tool, whose
//! environment is cleared anyway) finds a channel to the service
//! manager or a watchdog it would be expected to feed. That is why this is
//! not the `sd-notify` crate, which reads the environment on every call.
//! A message is one datagram; a socket path starting with `@` is in the
//! abstract namespace. Sending is best effort: a lost status line must not
//! stop the broker (systemd notices a missing `READY=1` or `WATCHDOG=1`
//! on its own).

use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use nix::sys::socket::{sendmsg, socket, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr};

/// A handle on the service manager's notification socket; does nothing
/// when the broker was not started by one.
#[derive(Debug, Default)]
pub struct Notifier {
    addr: Option<UnixAddr>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Read (and remove) `NOTIFY_SOCKET` and the watchdog variables. Call
    /// before any thread is started: it edits the environment.
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            std::env::remove_var(var);
        }
        let addr = socket.and_then(|s| parse_addr(s.as_bytes()));
        Notifier {
            watchdog: addr
                .as_ref()
                .and(watchdog_interval(usec.as_deref(), pid.as_deref())),
            addr,
        }
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier::default()
    }

    /// Whether there is a service manager to notify.
    pub fn enabled(&self) -> bool {
        self.addr.is_some()
    }

    /// The watchdog interval systemd expects a `WATCHDOG=1` within, if
    /// the watchdog is enabled for this process.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Startup finished: the listener accepts, keys and credentials are
    /// loaded, the first audit record is written.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}\n", one_line(status)));
    }

    /// A one-line summary for `systemctl status`.
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}\n", one_line(status)));
    }

    /// Alive, optionally with a fresh status line.
    pub fn watchdog_ping(&self, status: Option<&str>) {
        match status {
            Some(status) => self.send(&format!("WATCHDOG=1\nSTATUS={}\n", one_line(status))),
            None => self.send("WATCHDOG=1\n"),
        }
    }

    /// Reloading the configuration; follow with [`Notifier::ready`].
    /// `MONOTONIC_USEC` lets systemd (v253+) match the reload it asked for.
    pub fn reloading(&self) {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as i128 * 1_000_000 + t.tv_nsec() as i128 / 1_000)
            .unwrap_or(0);
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={now}\nSTATUS=reloading the configuration\n"
        ));
    }

    /// Shutting down: in-flight calls are being finished.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping: finishing in-flight calls\n");
    }

    fn send(&self, message: &str) {
        if let Some(addr) = &self.addr {
            if let Err(e) = send_to(addr, message.as_bytes()) {
                eprintln!("keyward-broker: cannot notify the service manager: {e}");
            }
        }
    }
}

fn send_to(addr: &UnixAddr, message: &[u8]) -> io::Result<()> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    sendmsg(
        fd.as_raw_fd(),
        &[IoSlice::new(message)],
        &[],
        MsgFlags::MSG_NOSIGNAL,
        Some(addr),
    )?;
    Ok(())
}

/// `NOTIFY_SOCKET`: an absolute path, or `@name` for the abstract
/// namespace. Anything else is ignored, as libsystemd does.
fn parse_addr(value: &[u8]) -> Option<UnixAddr> {
    match value.first()? {
        b'/' => UnixAddr::new(std::ffi::OsStr::from_bytes(value)).ok(),
        b'@' => UnixAddr::new_abstract(&value[1..]).ok(),
        _ => None,
    }
}

/// The watchdog interval, if `WATCHDOG_USEC` is a positive number and
/// `WATCHDOG_PID` (when set) names this process.
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>) -> Option<Duration> {
    let usec: u64 = usec?.parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// Status lines are one line: a newline would start a new assignment.
fn one_line(status: &str) -> String {
    status.replace(['\n', '\r'], " ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_needs_a_positive_interval_for_this_process() {
        let me = std::process::id().to_string();
        assert_eq!(
            watchdog_interval(Some("2000000"), None),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            watchdog_interval(Some("2000000"), Some(&me)),
            Some(Duration::from_secs(2))
        );
        assert_eq!(watchdog_interval(Some("2000000"), Some("1")), None);
        assert_eq!(watchdog_interval(Some("0"), None), None);
        assert_eq!(watchdog_interval(Some("x"), None), None);
        assert_eq!(watchdog_interval(None, Some(&me)), None);
    }

    #[test]
    fn socket_addresses() {
        assert!(parse_addr(b"/run/systemd/notify").is_some());
        let abstract_addr = parse_addr(b"@kw/notify").unwrap();
        assert_eq!(abstract_addr.as_abstract(), Some(&b"kw/notify"[..]));
        assert!(parse_addr(b"relative").is_none());
        assert!(parse_addr(b"").is_none());
    }

    #[test]
    fn messages_arrive_as_datagrams_and_status_stays_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier {
            addr: Some(UnixAddr::new(&path).unwrap()),
            watchdog: None,
        };
        let mut buf = [0u8; 256];
        notifier.ready("serving\nFAKE=1");
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving FAKE=1\n");
        notifier.watchdog_ping(None);
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1\n");
        notifier.reloading();
        let n = server.recv(&mut buf).unwrap();
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(text.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{text}");
    }

    #[test]
    fn disabled_sends_nothing() {
        let notifier = Notifier::disabled();
        assert!(!notifier.enabled());
        notifier.ready("x");
        notifier.stopping();
    }
}
