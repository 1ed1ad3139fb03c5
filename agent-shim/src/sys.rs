// SPDX-License-Identifier: Apache-2.0
//! The few raw system calls the shim needs that `nix`, `landlock` and
//! `seccompiler` do not wrap safely, each in a small typed function that
//! returns `io::Result`. The only `unsafe` in the crate lives here.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{BorrowedFd, IntoRawFd, OwnedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::unistd::Pid;

/// The two sides of a [`fork`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// We are the parent; this is the child.
    Parent(Pid),
    /// We are the child.
    Child,
}

/// How many threads this process has, from `/proc/self/status`.
pub fn thread_count() -> io::Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no Threads: line in /proc/self/status"))
}

/// `fork()`, refused unless the process is single-threaded.
///
/// The child of a multi-threaded process may only call async-signal-safe
/// functions (another thread could hold the allocator's lock); the shim's
/// child allocates, so it must be the only thread. `agent-shim` never
/// starts a thread, and this checks it rather than trusting it.
pub fn fork() -> io::Result<Forked> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(io::Error::other(format!(
            "cannot fork safely: the process has {threads} threads"
        )));
    }
    // SAFETY: the process has exactly one thread (checked just above, and
    // nothing between the check and the call starts one), so the child is
    // an exact copy with no lock held by a thread that no longer exists:
    // it may allocate and run ordinary Rust code.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Ok(Forked::Parent(child)),
        nix::unistd::ForkResult::Child => Ok(Forked::Child),
    }
}

/// `clone(flags)` without a new stack: a [`fork`] whose child starts in
/// the new namespaces `flags` names (`CLONE_NEW*`). Refused unless the
/// process is single-threaded, for the reason [`fork`] gives.
pub fn clone_namespaces(flags: libc::c_int) -> io::Result<Forked> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(io::Error::other(format!(
            "cannot fork safely: the process has {threads} threads"
        )));
    }
    let flags = libc::c_ulong::try_from(flags | libc::SIGCHLD)
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: with a null stack pointer, clone behaves as fork: the child
    // continues on a copy of this stack. The process has one thread
    // (checked above), so, as for `fork`, no lock is held by a thread that
    // does not exist in the child. glibc caches no pid since 2.25, and
    // nothing in the shim reads the thread id it caches.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags,
            std::ptr::null::<libc::c_void>(),
            std::ptr::null::<libc::c_void>(),
            std::ptr::null::<libc::c_void>(),
            0usize,
        )
    };
    match ret {
        r if r < 0 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(Pid::from_raw(
            i32::try_from(pid).map_err(|_| io::Error::other("clone returned no pid"))?,
        ))),
    }
}

/// `mount_setattr(path, AT_RECURSIVE?, {attr_set})`: add mount attributes
/// (`MOUNT_ATTR_RDONLY`, `_NOSUID`, `_NODEV`) to the mount at `path`, and
/// with `recursive` to every mount below it.
pub fn mount_setattr(path: &std::path::Path, set: u64, recursive: bool) -> io::Result<()> {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const AT_RECURSIVE: libc::c_uint = 0x8000;
    let path = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let flags = if recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: mount_setattr reads a NUL-terminated path and one
    // `struct mount_attr` of the size given; both outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `_exit(code)`: end the forked child at once, without running exit
/// handlers or flushing buffers that belong to the parent's copy.
pub fn exit_child(code: u8) -> ! {
    // SAFETY: _exit takes an integer and does not return; it runs no code
    // of ours.
    unsafe { libc::_exit(i32::from(code)) }
}

/// Give the broker channel the descriptor number `target` (3), without
/// close-on-exec, so that the program the shim executes inherits it.
///
/// The descriptor is deliberately leaked: it must outlive this process
/// image. Whatever was at `target` is replaced; call it only in the forked
/// child, where nothing else owns that number.
pub fn install_channel(channel: OwnedFd, target: RawFd) -> io::Result<()> {
    let raw = channel.into_raw_fd();
    if raw == target {
        // SAFETY: `raw` is the descriptor we just took out of its OwnedFd;
        // it stays open (we leaked it) for the duration of the borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))?;
        return Ok(());
    }
    // SAFETY: dup2 takes two integers; `raw` is open (leaked above) and
    // `target` is a plain descriptor number. The new descriptor has no
    // close-on-exec flag, which is the point.
    if unsafe { libc::dup2(raw, target) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` was leaked from its OwnedFd above, so nothing else
    // owns or will close it; after dup2 it is a redundant copy.
    if unsafe { libc::close(raw) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bring the loopback interface of the calling process's network
/// namespace up (`SIOCSIFFLAGS` on `lo`), so that 127.0.0.1 exists in a
/// new one. Needs `CAP_NET_ADMIN` over the namespace (the init of a new
/// user namespace has it).
pub fn loopback_up() -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: `ifreq` is a plain C struct of integers and byte arrays, for
    // which all-zero bytes are a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, from) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *to = *from as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the NUL-terminated name and writes the
    // flags into the `ifreq` we own, which lives across the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: after SIOCGIFFLAGS the union holds the flags (a c_short).
    unsafe {
        request.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads the `ifreq` we own for the call's length.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Take ownership of a descriptor the kernel just installed in this
/// process from an `SCM_RIGHTS` message.
pub fn own_received_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: the kernel installed `fd` for this receive, and nothing else
    // in the process knows its number yet: it is ours alone to own.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Mark every descriptor from `first` up close-on-exec, so that the
/// program the shim executes inherits none of them.
///
/// `close_range(first, ~0, CLOSE_RANGE_CLOEXEC)` rather than closing: the
/// effect at exec is the same (the kernel closes them before the new
/// program runs), and no descriptor that a live Rust object owns is
/// invalidated in the meantime. Falls back to `/proc/self/fd` on kernels
/// before 5.11.
pub fn close_on_exec_from(first: RawFd) -> io::Result<()> {
    let first_u = u32::try_from(first).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on
    // descriptors of this process; it reads and writes no memory of ours.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first_u,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if ret == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if !matches!(err.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EINVAL)) {
        return Err(err);
    }
    let dir = std::fs::read_dir("/proc/self/fd")?;
    let fds: Vec<RawFd> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd >= first)
        .collect();
    for fd in fds {
        // SAFETY: a probe on a descriptor number listed a moment ago; if it
        // was the directory's own (now closed) descriptor, F_SETFD fails
        // with EBADF, which is ignored.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        match fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)) {
            Ok(_) | Err(nix::Error::EBADF) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Restore the default disposition of `SIGPIPE`, which the Rust runtime
/// set to "ignore" at start-up and which exec would otherwise pass on to
/// the program (as `std::process::Command` also does).
pub fn reset_sigpipe() -> io::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: installing SIG_DFL runs no code of ours in signal context, so
    // none of sigaction's handler-safety requirements apply.
    unsafe { sigaction(Signal::SIGPIPE, &default) }?;
    Ok(())
}

/// The Landlock ABI version the running kernel offers: 0 when Landlock is
/// not built in (`ENOSYS`) or not enabled (`EOPNOTSUPP`); any other
/// failure is an error.
pub fn landlock_abi() -> io::Result<i32> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a null attribute pointer, size 0 and the VERSION flag,
    // landlock_create_ruleset only returns an integer; it reads no memory.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => Ok(0),
            _ => Err(err),
        };
    }
    i32::try_from(ret).map_err(|_| io::Error::other("Landlock ABI out of range"))
}

/// A duplicate (close-on-exec) of a descriptor this process inherited by
/// number, e.g. `KEYWARD_FD`. Fails with `EBADF` if it is not open.
pub fn dup_inherited(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: the borrow lasts for one fcntl call; if `fd` is not open the
    // call fails with EBADF instead of touching anything. Nothing here
    // takes ownership of the inherited descriptor itself.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let dup = fcntl(borrowed, FcntlArg::F_DUPFD_CLOEXEC(0))?;
    // SAFETY: F_DUPFD_CLOEXEC just returned this new descriptor; nothing
    // else owns it.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup) })
}

/// Overwrite every occurrence of `secret` in this process's command line
/// (the kernel's argument area, which `/proc/<pid>/cmdline` shows to every
/// process) with `*`. Returns how many occurrences were overwritten.
///
/// Call it once the arguments have been parsed; later reads of
/// `std::env::args` see the stars.
pub fn scrub_cmdline(secret: &[u8]) -> io::Result<usize> {
    scrub_area(secret, 48)
}

/// Overwrite every occurrence of `secret` in this process's initial
/// environment block (what `/proc/<pid>/environ` shows) with `*`.
pub fn scrub_environ(secret: &[u8]) -> io::Result<usize> {
    scrub_area(secret, 50)
}

/// Overwrite `secret` in the area whose start and end are fields `field`
/// and `field + 1` of `/proc/self/stat`.
fn scrub_area(secret: &[u8], field: usize) -> io::Result<usize> {
    if secret.is_empty() {
        return Ok(0);
    }
    let (start, end) = stat_area(field)?;
    if end <= start {
        return Ok(0);
    }
    // SAFETY: [start, end) is this process's argument or environment area, laid out by
    // the kernel at exec on the initial stack: mapped, writable and alive
    // for the whole life of the process. No Rust reference points into it
    // (std keeps only the raw `argv` pointers and copies on every read),
    // and the process has one thread, so nothing reads it concurrently.
    let area = unsafe { std::slice::from_raw_parts_mut(start as *mut u8, end - start) };
    let mut count = 0;
    let mut i = 0;
    while i + secret.len() <= area.len() {
        if area.get(i..i + secret.len()) == Some(secret) {
            for b in area.iter_mut().skip(i).take(secret.len()) {
                *b = b'*';
            }
            count += 1;
            i += secret.len();
        } else {
            i += 1;
        }
    }
    Ok(count)
}

/// `arg_start` and `arg_end` from `/proc/self/stat` (fields 48 and 49).
#[cfg(test)]
fn argument_area() -> io::Result<(usize, usize)> {
    stat_area(48)
}

/// Fields `field` and `field + 1` of `/proc/self/stat` (48: the argument
/// area, 50: the environment block).
fn stat_area(field: usize) -> io::Result<(usize, usize)> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let bad = || io::Error::other("unexpected /proc/self/stat format");
    // The command name (field 2) is in parentheses and may contain spaces;
    // the fields after it are plain numbers. Field 3 is the first one.
    let rest = stat
        .get(stat.rfind(')').ok_or_else(bad)? + 1..)
        .ok_or_else(bad)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let first = field;
    let field = |n: usize| -> io::Result<usize> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(bad)
    };
    Ok((field(first)?, field(first + 1)?))
}

/// Restore the default action of `SIGCHLD`. An ignored `SIGCHLD` survives
/// exec, and with it the kernel reaps children itself and sends no signal:
/// the shim would wait for a `SIGCHLD` that never comes.
pub fn default_sigchld() -> io::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: installing SIG_DFL runs no handler code, so none of the
    // signal-safety rules that make `sigaction` unsafe can be broken.
    unsafe { sigaction(Signal::SIGCHLD, &default) }?;
    Ok(())
}

/// Drop every capability this process holds: the ambient set, then the
/// effective, permitted and inheritable sets. The caller sets
/// no_new_privs first (after which the bounding set no longer matters:
/// nothing exec'd can gain capabilities). A process may always drop its
/// own capabilities.
pub fn drop_capabilities() -> io::Result<()> {
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no pointers.
    let ret = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads one header and (for version 3) two data structs,
    // laid out as the kernel's `__user_cap_header_struct` and
    // `__user_cap_data_struct`; both outlive the call.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A descriptor slot held in reserve for [`kill_descendants`]: even if the
/// shim's `RLIMIT_NOFILE` were lowered below the descriptors it has open,
/// the scan of `/proc` needs only the one slot this frees.
#[derive(Debug)]
pub struct SpareFd {
    _slot: OwnedFd,
}

impl SpareFd {
    /// Reserve a slot (a descriptor of `/dev/null`).
    pub fn reserve() -> io::Result<SpareFd> {
        Ok(SpareFd {
            _slot: std::fs::File::open("/dev/null")?.into(),
        })
    }
}

/// Kill and reap every process left below this one (with
/// `PR_SET_CHILD_SUBREAPER` set, orphaned descendants are re-parented
/// here). Loops until no child is left, so a process that forks while
/// being killed is caught on the next pass. The `spare` slot is given up
/// first, so that the scan of `/proc` (one descriptor at a time) works
/// whatever the descriptor limit.
pub fn kill_descendants(spare: SpareFd) {
    drop(spare);
    use nix::sys::wait::WaitStatus;
    use nix::sys::wait::{waitpid, WaitPidFlag};
    let me = std::process::id();
    loop {
        match waitpid(
            Pid::from_raw(-1),
            Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL),
        ) {
            // Someone is still running: find them (the scan of /proc is
            // paid only then), kill them, and wait for one to go.
            Ok(WaitStatus::StillAlive) => {
                for child in children_of(me) {
                    let _ = nix::sys::signal::kill(
                        Pid::from_raw(child),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::__WALL));
            }
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(_) => return, // ECHILD: none left
        }
    }
}

/// The pids whose parent is `parent`, from `/proc/*/stat`. The directory
/// is read to the end and closed before any `stat` is opened: at most one
/// descriptor is open at any time.
fn children_of(parent: u32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let pids: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .collect();
    pids.into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // Fields after the parenthesised command: state, ppid.
                    let rest = &stat[stat.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn reads_the_argument_area() {
        let (start, end) = argument_area().unwrap();
        assert!(start > 0 && end > start, "{start:#x}..{end:#x}");
    }

    #[test]
    fn landlock_abi_is_probed() {
        // The probe answers, and agrees with what the landlock crate finds
        // when it tries to enforce a ruleset of the probed ABI.
        let abi = landlock_abi().unwrap();
        let enforced = std::thread::spawn(move || {
            use landlock::{Access, AccessFs, Ruleset, RulesetAttr};
            Ruleset::default()
                .handle_access(AccessFs::from_all(landlock::ABI::V1))
                .and_then(|r| r.create())
                .and_then(|r| r.restrict_self())
                .map(|s| s.ruleset != landlock::RulesetStatus::NotEnforced)
                .unwrap_or(false)
        })
        .join()
        .unwrap();
        assert_eq!(abi > 0, enforced, "ABI {abi}");
    }

    #[test]
    fn dup_of_a_closed_descriptor_is_ebadf() {
        let err = dup_inherited(-1).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        let err = dup_inherited(987_654).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        let dup = dup_inherited(2).unwrap();
        assert!(dup.as_raw_fd() > 2);
    }
}
