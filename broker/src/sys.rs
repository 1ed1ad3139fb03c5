// SPDX-License-Identifier: Apache-2.0
//! Process-wide hardening and the few raw system calls the broker needs,
//! each wrapped in a small typed function. The only `unsafe` in the crate
//! lives here.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{accept4, SockFlag, UnixCredentials};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::resource::{setrlimit, Resource};

#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("{what}: {source}")]
    Call {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn call(what: &'static str) -> impl FnOnce(nix::Error) -> SysError {
    move |e| SysError::Call {
        what,
        source: io::Error::from(e),
    }
}

/// Make the process non-dumpable (no core dumps, no `/proc/<pid>/mem` or
/// ptrace by same-uid processes) and set `RLIMIT_CORE` to zero. Run first
/// thing in `main`, before any secret is loaded.
pub fn harden_process() -> Result<(), SysError> {
    nix::sys::prctl::set_dumpable(false).map_err(call("prctl(PR_SET_DUMPABLE, 0)"))?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(call("setrlimit(RLIMIT_CORE, 0)"))?;
    Ok(())
}

/// `pidfd_open(pid, 0)`: a handle on the process that has `pid` now.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and returns a new fd or -1; it
    // touches no memory of ours.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(ret).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The most supplementary groups a process can have (`NGROUPS_MAX`).
const NGROUPS_MAX: usize = 65536;

/// `SO_PEERGROUPS`: the supplementary groups the peer of a connected
/// AF_UNIX socket had when it connected, as the kernel recorded them.
pub fn peer_groups(conn: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    // Most processes have a handful of groups: start small, and grow to
    // what the kernel says it needs (ERANGE sets the length it wants).
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * std::mem::size_of::<libc::gid_t>())
            .map_err(|_| io::Error::other("too many groups"))?;
        // SAFETY: the buffer is valid for `len` bytes of writes, and the
        // kernel writes at most `len` bytes and stores the length it used
        // (or, with ERANGE, the length it needs) in `len`.
        let ret = unsafe {
            libc::getsockopt(
                conn.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed =
            usize::try_from(len).unwrap_or(usize::MAX) / std::mem::size_of::<libc::gid_t>();
        if ret == 0 {
            groups.truncate(needed.min(groups.len()));
            return Ok(groups);
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ERANGE)
            || needed <= groups.len()
            || needed > NGROUPS_MAX
        {
            return Err(error);
        }
        groups.resize(needed, 0);
    }
}

/// Whether the process behind a pidfd has exited (a pidfd polls readable
/// once its process has exited).
pub fn pidfd_exited(pidfd: &impl AsFd) -> io::Result<bool> {
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    let n = poll(&mut fds, PollTimeout::ZERO).map_err(io::Error::from)?;
    Ok(n > 0)
}

/// The pid a pidfd refers to, from `/proc/self/fdinfo` (`-1` once exited).
/// Prepare a child of `command` (an `exec` tool's program): in the child,
/// between fork and exec, set `no_new_privs` (no setuid or file
/// capability can raise it) and mark every descriptor above 2
/// close-on-exec (`close_range(3, ~0, CLOSE_RANGE_CLOEXEC)`), so it
/// inherits nothing of the broker's but stdin, stdout and stderr — while
/// the standard library's exec-error pipe still reports a failed exec.
/// Either step failing fails the spawn.
pub fn harden_child(command: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe operations are sound: it makes two raw system calls
    // with integer arguments, allocates nothing, takes no lock, and builds
    // its error with `last_os_error` (an errno, no allocation).
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
pub fn pidfd_pid(pidfd: &impl AsRawFd) -> io::Result<i32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))?;
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no Pid: line in pidfd fdinfo"))
}

/// The first socket-activation fd (`SD_LISTEN_FDS_START`).
const LISTEN_FD: RawFd = 3;

/// Take ownership of fd 3, the socket systemd passed. Only call after
/// checking `LISTEN_PID`/`LISTEN_FDS`, and only once.
pub fn adopt_listen_fd() -> io::Result<OwnedFd> {
    // Make sure fd 3 is open before claiming it.
    nix::fcntl::fcntl(
        // SAFETY: borrowing fd 3 for one fcntl call; it is only a probe, and
        // if fd 3 is closed the call fails with EBADF instead of touching
        // anything.
        unsafe { BorrowedFd::borrow_raw(LISTEN_FD) },
        nix::fcntl::FcntlArg::F_GETFD,
    )?;
    // SAFETY: systemd's protocol hands fd 3 to this process (checked by the
    // caller through LISTEN_PID) and nothing else in the process owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(LISTEN_FD) })
}

/// `accept4` with `SOCK_CLOEXEC | SOCK_NONBLOCK`.
pub fn accept_nonblocking(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let raw = accept4(
        listener.as_raw_fd(),
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )?;
    // SAFETY: accept4 just returned this new fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// One message as received by [`recv_message`].
#[derive(Debug)]
pub struct Received {
    /// Bytes written into the caller's buffer.
    pub len: usize,
    /// The message was larger than the buffer (the rest was discarded).
    pub truncated: bool,
    /// Control data overflowed (too many fds) or was of an unexpected kind.
    pub control_truncated: bool,
    /// Kernel-attached credentials, if any.
    pub creds: Option<UnixCredentials>,
    /// File descriptors passed with `SCM_RIGHTS`, now owned (and closed on
    /// drop) by us.
    pub fds: Vec<OwnedFd>,
}

/// How many descriptors one message may pass (more is `MSG_CTRUNC`).
const MAX_PASSED_FDS: usize = 8;

/// Control space for one message: its credentials and up to
/// [`MAX_PASSED_FDS`] descriptors.
// SAFETY: CMSG_SPACE is arithmetic on its argument.
const CONTROL_LEN: usize = unsafe {
    libc::CMSG_SPACE(std::mem::size_of::<libc::ucred>() as u32) as usize
        + libc::CMSG_SPACE((MAX_PASSED_FDS * std::mem::size_of::<RawFd>()) as u32) as usize
};

/// The control buffer, aligned for `cmsghdr` (whose first field is a
/// `size_t`).
#[repr(C, align(8))]
struct Control([u8; CONTROL_LEN]);

/// Non-blocking `recvmsg` of one message with its credentials and any
/// passed fds (received close-on-exec). Every descriptor the kernel
/// installed is owned by the result, even when the control data was
/// truncated (then `control_truncated` is set): none is ever left open.
///
/// Called for every message, so it allocates nothing but the list of
/// passed fds (when there are any).
pub fn recv_message(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut control = Control([0; CONTROL_LEN]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid value (null pointers, zero
    // lengths); the fields that matter are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = CONTROL_LEN as _;
    // SAFETY: `msg` points at `iov`, which describes `buf` (buf.len()
    // writable bytes), and at `control` (CONTROL_LEN writable bytes); all
    // outlive the call, and the kernel writes within those lengths.
    let n = unsafe {
        libc::recvmsg(
            fd.as_raw_fd(),
            &mut msg,
            libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
        )
    };
    let len = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    let mut creds = None;
    let mut fds = Vec::new();
    let mut unexpected = false;
    // SAFETY: `msg` describes `control`, which the kernel filled in and
    // whose used length it set in msg_controllen; CMSG_FIRSTHDR and
    // CMSG_NXTHDR return only headers that lie whole within it, else null.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: a non-null header from CMSG_FIRSTHDR/NXTHDR is within
        // `control` and aligned (the buffer is, and headers are padded).
        let (level, kind, cmsg_len) =
            unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len) };
        // SAFETY: as above; CMSG_DATA is the address just past the header.
        let data = unsafe { libc::CMSG_DATA(cmsg) };
        // SAFETY: CMSG_LEN is arithmetic on its argument.
        let header = unsafe { libc::CMSG_LEN(0) } as usize;
        // The data the kernel wrote, within what is left of the buffer.
        // (The lengths are size_t with glibc, socklen_t with some libcs.)
        #[allow(clippy::unnecessary_cast)]
        let (used, cmsg_len) = (msg.msg_controllen as usize, cmsg_len as usize);
        let room =
            (control.0.as_ptr() as usize + used.min(CONTROL_LEN)).saturating_sub(data as usize);
        let data_len = cmsg_len.saturating_sub(header).min(room);
        match (level, kind) {
            (libc::SOL_SOCKET, libc::SCM_CREDENTIALS)
                if data_len >= std::mem::size_of::<libc::ucred>() =>
            {
                // SAFETY: data_len bytes at `data` are the kernel's ucred.
                let ucred: libc::ucred = unsafe { std::ptr::read_unaligned(data.cast()) };
                creds = Some(UnixCredentials::from(ucred));
            }
            (libc::SOL_SOCKET, libc::SCM_RIGHTS) => {
                for i in 0..data_len / std::mem::size_of::<RawFd>() {
                    // SAFETY: within the data_len bytes the kernel wrote,
                    // the i-th descriptor number.
                    let raw: RawFd =
                        unsafe { std::ptr::read_unaligned(data.cast::<RawFd>().add(i)) };
                    // SAFETY: SCM_RIGHTS installed these fds in our table
                    // for this message alone; owning them makes sure they
                    // are closed.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
            _ => unexpected = true,
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok(Received {
        len,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        control_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0 || unexpected,
        creds,
        fds,
    })
}

/// Memory for one secret: a private anonymous mapping of its own (so no
/// other data shares its pages), locked in RAM where `RLIMIT_MEMLOCK`
/// allows (never written to swap), excluded from core dumps
/// (`MADV_DONTDUMP`), and zeroed then unmapped on drop.
#[derive(Debug)]
pub struct SecretPages {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    map_len: usize,
    locked: bool,
}

// SAFETY: the mapping is owned by this value alone, written only in `new`
// and `drop`, and read through `&self`: sharing it between threads is like
// sharing a `Box<[u8]>`.
unsafe impl Send for SecretPages {}
// SAFETY: as above; there is no interior mutability.
unsafe impl Sync for SecretPages {}

impl SecretPages {
    /// Copy `bytes` into a new mapping. `mlock` failing (no privilege, or
    /// the limit reached) is not an error: see [`SecretPages::is_locked`].
    pub fn new(bytes: &[u8]) -> io::Result<SecretPages> {
        let page = page_size();
        let map_len = bytes
            .len()
            .max(1)
            .checked_next_multiple_of(page)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: an anonymous private mapping at an address of the
        // kernel's choosing touches no existing memory; the result is
        // checked against MAP_FAILED before use.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(addr.cast::<u8>())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: [addr, addr + map_len) is the mapping just created, which
        // nothing else references.
        unsafe {
            // Best effort, before the secret is written: a core dump or
            // swap never sees it.
            libc::madvise(addr, map_len, libc::MADV_DONTDUMP);
        }
        // SAFETY: as above.
        let locked = unsafe { libc::mlock(addr, map_len) } == 0;
        // SAFETY: the mapping is map_len >= bytes.len() bytes, writable, and
        // cannot overlap `bytes`, which existed before it.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr.as_ptr(), bytes.len()) };
        Ok(SecretPages {
            ptr,
            len: bytes.len(),
            map_len,
            locked,
        })
    }

    /// The secret.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to a live mapping of map_len >= len bytes,
        // initialised in `new` and unmapped only in `drop`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Whether the pages are locked in RAM.
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// The address range of the mapping (for tests that read
    /// `/proc/self/smaps`).
    pub fn range(&self) -> std::ops::Range<usize> {
        let start = self.ptr.as_ptr() as usize;
        start..start + self.map_len
    }
}

impl Drop for SecretPages {
    fn drop(&mut self) {
        // SAFETY: the mapping is live and exclusively ours (`&mut self`);
        // after munmap nothing uses `ptr` again.
        unsafe {
            let all = std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.map_len);
            zeroize::Zeroize::zeroize(all);
            libc::munmap(self.ptr.as_ptr().cast(), self.map_len);
        }
    }
}

fn page_size() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n > 0)
        .unwrap_or(4096)
}

/// Register an owned fd with the tokio reactor.
pub fn register(
    fd: OwnedFd,
    interest: tokio::io::Interest,
) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is a valid open descriptor that it alone owns
    // until dropped, and `as_raw_fd` always returns that same descriptor,
    // which is what `register_with_interest` requires.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into())
}

/// The name of the POSIX access ACL extended attribute.
const ACL_XATTR: &std::ffi::CStr = c"system.posix_acl_access";

/// The POSIX access ACL of an open file, or `None` when it has none (or
/// its file system has no ACLs).
pub fn posix_acl(fd: BorrowedFd<'_>) -> io::Result<Option<Vec<u8>>> {
    // An ACL of 128 entries; larger ones are refused as unreadable (ERANGE).
    let mut buf = vec![0u8; 4 + 8 * 128];
    // SAFETY: fgetxattr reads the NUL-terminated name and writes at most
    // `buf.len()` bytes into `buf`; both outlive the call.
    let n = unsafe {
        libc::fgetxattr(
            fd.as_raw_fd(),
            ACL_XATTR.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::EOPNOTSUPP) => Ok(None),
            _ => Err(e),
        };
    }
    buf.truncate(usize::try_from(n).unwrap_or(0));
    Ok(Some(buf))
}

/// Set a file's POSIX access ACL (tests build ACLs with it).
#[cfg(test)]
pub fn set_posix_acl(path: &std::path::Path, acl: &[u8]) -> io::Result<()> {
    let path =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: setxattr reads the NUL-terminated path and name and
    // `acl.len()` bytes of `acl`; all outlive the call.
    let ret = unsafe {
        libc::setxattr(
            path.as_ptr(),
            ACL_XATTR.as_ptr(),
            acl.as_ptr().cast(),
            acl.len(),
            0,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
