// SPDX-License-Identifier: Apache-2.0
//! seccomp: the system calls the sandboxed program may not make.
//!
//! Landlock cannot stop a program from creating a socket and connecting to
//! the broker as its uid, from doing the same through io_uring or the
//! i386 system call table, from sending datagrams to journald, or from
//! entering a user namespace (see DESIGN.md, "What each layer stops").
//! This filter closes exactly those gaps, and a few more of the kernel's
//! widest attack surfaces:
//!
//! - a guard, written by hand (nine instructions): kill the process on any
//!   architecture but the native one (a 64-bit program calling through
//!   `int 0x80` must not reach the i386 table, where `socketcall` hides the
//!   socket calls from any filter) and on x32 system call numbers; answer
//!   `clone3` with `ENOSYS`, so that libc falls back to `clone`, whose
//!   flags a filter can see;
//! - the denials, compiled by `seccompiler`: [`DENIED`] fail with `EPERM`,
//!   some only with the arguments that make them dangerous; in fallback
//!   mode (no namespaces) also [`FALLBACK_DENIED`], the path-based calls
//!   that change or watch files Landlock does not cover; and the ioctls that
//!   change a terminal unless the caller shares it (`--tty`).
//!
//! The calls that reach other processes of the same uid by pid (priority,
//! scheduling, resource limits, page migration) are refused unless they
//! name the caller itself (pid 0): with a pid namespace those pids are not
//! visible anyway, without one this filter is all that stops them.
//!
//! Allowed calls that the kernel can prove always allowed are cached per
//! system call (`SECCOMP_CACHE`), so the filter costs them nothing.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule,
};

/// Why the filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("the seccomp filter is only defined for x86_64, not {0}")]
    UnsupportedArch(&'static str),
    #[error("cannot compile the seccomp filter: {0}")]
    Compile(String),
    #[error("cannot install the seccomp filter: {0}")]
    Install(String),
}

/// How a denied system call is matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    /// Every call.
    Always,
    /// `sendto` with a destination address.
    WithAddress,
    /// `socketpair` other than `AF_UNIX` stream or seqpacket.
    NotUnixStream,
    /// `clone`/`unshare` with a namespace flag.
    NamespaceFlags,
    /// `ioctl` injecting terminal input (`TIOCSTI`, `TIOCLINUX`), and,
    /// unless the terminal is shared (`--tty`), changing it.
    Terminal,
    /// A pid (or other target) argument at this index other than 0, the
    /// caller itself.
    NotSelf(u8),
    /// `setpriority`/`ioprio_set`: a `which` (argument 0) other than the
    /// given per-process value, or a `who` (argument 1) other than 0.
    NotOwnProcess(u64),
    /// A path argument at this index that is not NULL (`utimensat` with a
    /// path; with NULL it is `futimens`, the fd-based form).
    WithPath(u8),
    /// `MSG_FASTOPEN` in the flags argument at this index.
    FastOpen(u8),
}

/// Which filter to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Profile {
    /// No namespaces: also deny [`FALLBACK_DENIED`].
    pub fallback: bool,
    /// The terminal is shared (`--tty`): its settings may be changed.
    pub tty: bool,
    /// `--gateway`: `socket(AF_INET or AF_INET6, SOCK_STREAM)` and
    /// `connect` are allowed (Landlock then allows TCP connect to the
    /// gateway's port only, and the network namespace holds nothing but
    /// loopback). Every other socket, `bind`, `listen` and `accept` stay
    /// denied.
    pub gateway: bool,
}

/// Every system call the filter refuses with `EPERM`, and when.
#[cfg(target_arch = "x86_64")]
pub const DENIED: &[(&str, i64, Match)] = &[
    // Other processes' memory and descriptors.
    ("ptrace", libc::SYS_ptrace, Match::Always),
    (
        "process_vm_readv",
        libc::SYS_process_vm_readv,
        Match::Always,
    ),
    (
        "process_vm_writev",
        libc::SYS_process_vm_writev,
        Match::Always,
    ),
    ("pidfd_open", libc::SYS_pidfd_open, Match::Always),
    ("pidfd_getfd", libc::SYS_pidfd_getfd, Match::Always),
    // kcmp compares two processes' resources; even with pid 0 it is of no
    // use to a sub-agent, so it is refused whatever the pids.
    ("kcmp", libc::SYS_kcmp, Match::Always),
    ("process_madvise", libc::SYS_process_madvise, Match::Always),
    // Acting on other processes of the uid by pid: only pid 0 (the caller).
    (
        "setpriority",
        libc::SYS_setpriority,
        Match::NotOwnProcess(0),
    ),
    // IOPRIO_WHO_PROCESS is 1.
    ("ioprio_set", libc::SYS_ioprio_set, Match::NotOwnProcess(1)),
    (
        "sched_setscheduler",
        libc::SYS_sched_setscheduler,
        Match::NotSelf(0),
    ),
    (
        "sched_setparam",
        libc::SYS_sched_setparam,
        Match::NotSelf(0),
    ),
    ("sched_setattr", libc::SYS_sched_setattr, Match::NotSelf(0)),
    (
        "sched_setaffinity",
        libc::SYS_sched_setaffinity,
        Match::NotSelf(0),
    ),
    ("prlimit64", libc::SYS_prlimit64, Match::NotSelf(0)),
    ("migrate_pages", libc::SYS_migrate_pages, Match::NotSelf(0)),
    ("move_pages", libc::SYS_move_pages, Match::NotSelf(0)),
    // SysV IPC and POSIX message queues: objects shared by everyone of the
    // uid (an IPC namespace hides them too, where there is one).
    ("shmget", libc::SYS_shmget, Match::Always),
    ("shmat", libc::SYS_shmat, Match::Always),
    ("shmdt", libc::SYS_shmdt, Match::Always),
    ("shmctl", libc::SYS_shmctl, Match::Always),
    ("msgget", libc::SYS_msgget, Match::Always),
    ("msgsnd", libc::SYS_msgsnd, Match::Always),
    ("msgrcv", libc::SYS_msgrcv, Match::Always),
    ("msgctl", libc::SYS_msgctl, Match::Always),
    ("semget", libc::SYS_semget, Match::Always),
    ("semop", libc::SYS_semop, Match::Always),
    ("semtimedop", libc::SYS_semtimedop, Match::Always),
    ("semctl", libc::SYS_semctl, Match::Always),
    ("mq_open", libc::SYS_mq_open, Match::Always),
    ("mq_unlink", libc::SYS_mq_unlink, Match::Always),
    ("mq_timedsend", libc::SYS_mq_timedsend, Match::Always),
    ("mq_timedreceive", libc::SYS_mq_timedreceive, Match::Always),
    ("mq_notify", libc::SYS_mq_notify, Match::Always),
    ("mq_getsetattr", libc::SYS_mq_getsetattr, Match::Always),
    // New sockets: the only way out is the broker channel on fd 3.
    ("socket", libc::SYS_socket, Match::Always),
    ("connect", libc::SYS_connect, Match::Always),
    ("bind", libc::SYS_bind, Match::Always),
    ("listen", libc::SYS_listen, Match::Always),
    ("accept", libc::SYS_accept, Match::Always),
    ("accept4", libc::SYS_accept4, Match::Always),
    ("sendto", libc::SYS_sendto, Match::WithAddress),
    // TCP Fast Open connects inside sendmsg, where Landlock's connect rule
    // does not look (sendto would need an address, denied above).
    ("sendmsg", libc::SYS_sendmsg, Match::FastOpen(2)),
    ("sendmmsg", libc::SYS_sendmmsg, Match::FastOpen(3)),
    ("socketpair", libc::SYS_socketpair, Match::NotUnixStream),
    // io_uring performs socket, connect and open where no filter sees them.
    ("io_uring_setup", libc::SYS_io_uring_setup, Match::Always),
    ("io_uring_enter", libc::SYS_io_uring_enter, Match::Always),
    (
        "io_uring_register",
        libc::SYS_io_uring_register,
        Match::Always,
    ),
    // Wide kernel attack surface.
    ("bpf", libc::SYS_bpf, Match::Always),
    ("perf_event_open", libc::SYS_perf_event_open, Match::Always),
    ("userfaultfd", libc::SYS_userfaultfd, Match::Always),
    ("keyctl", libc::SYS_keyctl, Match::Always),
    ("add_key", libc::SYS_add_key, Match::Always),
    ("request_key", libc::SYS_request_key, Match::Always),
    // Namespaces and mounts: a user namespace would make the program root
    // over a fresh set of them.
    ("unshare", libc::SYS_unshare, Match::NamespaceFlags),
    ("clone", libc::SYS_clone, Match::NamespaceFlags),
    ("setns", libc::SYS_setns, Match::Always),
    ("mount", libc::SYS_mount, Match::Always),
    ("umount2", libc::SYS_umount2, Match::Always),
    ("pivot_root", libc::SYS_pivot_root, Match::Always),
    ("chroot", libc::SYS_chroot, Match::Always),
    ("fsopen", libc::SYS_fsopen, Match::Always),
    ("fsconfig", libc::SYS_fsconfig, Match::Always),
    ("fsmount", libc::SYS_fsmount, Match::Always),
    ("fspick", libc::SYS_fspick, Match::Always),
    ("move_mount", libc::SYS_move_mount, Match::Always),
    ("open_tree", libc::SYS_open_tree, Match::Always),
    ("mount_setattr", libc::SYS_mount_setattr, Match::Always),
    // The kernel itself.
    ("init_module", libc::SYS_init_module, Match::Always),
    ("finit_module", libc::SYS_finit_module, Match::Always),
    ("delete_module", libc::SYS_delete_module, Match::Always),
    ("kexec_load", libc::SYS_kexec_load, Match::Always),
    ("kexec_file_load", libc::SYS_kexec_file_load, Match::Always),
    (
        "open_by_handle_at",
        libc::SYS_open_by_handle_at,
        Match::Always,
    ),
    ("reboot", libc::SYS_reboot, Match::Always),
    ("swapon", libc::SYS_swapon, Match::Always),
    ("swapoff", libc::SYS_swapoff, Match::Always),
    ("acct", libc::SYS_acct, Match::Always),
    ("iopl", libc::SYS_iopl, Match::Always),
    ("ioperm", libc::SYS_ioperm, Match::Always),
    // Typing into, or changing, the terminal the orchestrator reads.
    ("ioctl", libc::SYS_ioctl, Match::Terminal),
];

/// What fallback mode (no mount namespace) denies besides [`DENIED`]: the
/// path-based calls that change a file's mode, owner, extended attributes
/// or times, or watch it — Landlock has no right for any of them, so
/// without a mount namespace they would reach every file of the uid. The
/// fd-based forms (`fchmod`, `fchown`, `fsetxattr`, `futimens`) stay
/// allowed: they need a descriptor Landlock let the program open.
#[cfg(target_arch = "x86_64")]
pub const FALLBACK_DENIED: &[(&str, i64, Match)] = &[
    ("chmod", libc::SYS_chmod, Match::Always),
    ("fchmodat", libc::SYS_fchmodat, Match::Always),
    ("fchmodat2", SYS_FCHMODAT2, Match::Always),
    ("chown", libc::SYS_chown, Match::Always),
    ("lchown", libc::SYS_lchown, Match::Always),
    ("fchownat", libc::SYS_fchownat, Match::Always),
    ("setxattr", libc::SYS_setxattr, Match::Always),
    ("lsetxattr", libc::SYS_lsetxattr, Match::Always),
    ("getxattr", libc::SYS_getxattr, Match::Always),
    ("lgetxattr", libc::SYS_lgetxattr, Match::Always),
    ("listxattr", libc::SYS_listxattr, Match::Always),
    ("llistxattr", libc::SYS_llistxattr, Match::Always),
    ("removexattr", libc::SYS_removexattr, Match::Always),
    ("lremovexattr", libc::SYS_lremovexattr, Match::Always),
    ("setxattrat", SYS_SETXATTRAT, Match::Always),
    ("getxattrat", SYS_GETXATTRAT, Match::Always),
    ("listxattrat", SYS_LISTXATTRAT, Match::Always),
    ("removexattrat", SYS_REMOVEXATTRAT, Match::Always),
    ("utime", libc::SYS_utime, Match::Always),
    ("utimes", libc::SYS_utimes, Match::Always),
    ("futimesat", libc::SYS_futimesat, Match::Always),
    ("utimensat", libc::SYS_utimensat, Match::WithPath(1)),
    (
        "inotify_add_watch",
        libc::SYS_inotify_add_watch,
        Match::Always,
    ),
    ("fanotify_mark", libc::SYS_fanotify_mark, Match::Always),
];

/// System calls newer than the `libc` crate's tables (x86_64 numbers).
const SYS_FCHMODAT2: i64 = 452;
const SYS_SETXATTRAT: i64 = 463;
const SYS_GETXATTRAT: i64 = 464;
const SYS_LISTXATTRAT: i64 = 465;
const SYS_REMOVEXATTRAT: i64 = 466;

/// `ioctl` requests that inject terminal input: always denied.
const TERMINAL_INJECTION: &[u64] = &[libc::TIOCSTI, libc::TIOCLINUX];

/// `ioctl` requests that change a terminal (its modes, size, exclusivity,
/// line discipline, foreground group, modem lines, flow, queues): denied
/// unless `--tty` shares the terminal. The requests that only read stay
/// allowed (`isatty`, `TIOCGWINSZ`, ...).
const TERMINAL_CHANGE: &[u64] = &[
    libc::TCSETS,
    libc::TCSETSW,
    libc::TCSETSF,
    libc::TCSETA,
    libc::TCSETAW,
    libc::TCSETAF,
    libc::TCSETS2,
    libc::TCSETSW2,
    libc::TCSETSF2,
    libc::TCSBRK,
    libc::TCSBRKP,
    libc::TCXONC,
    libc::TCFLSH,
    libc::TIOCEXCL,
    libc::TIOCNXCL,
    libc::TIOCSCTTY,
    libc::TIOCSPGRP,
    libc::TIOCSWINSZ,
    libc::TIOCMBIS,
    libc::TIOCMBIC,
    libc::TIOCMSET,
    libc::TIOCSSOFTCAR,
    libc::TIOCCONS,
    libc::TIOCPKT,
    libc::TIOCSETD,
    libc::TIOCSBRK,
    libc::TIOCCBRK,
    libc::TIOCVHANGUP,
    libc::TIOCSLCKTRMIOS,
    libc::TIOCSSERIAL,
];

/// The namespace flags of `clone` and `unshare`.
const NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
];
/// `CLONE_NEWTIME` is only a namespace flag for `unshare`: for `clone` the
/// low byte is the exit signal.
const CLONE_NEWTIME: u64 = 0x80;

/// The compiled filter: install with [`install`].
#[derive(Debug, Clone)]
pub struct Filter {
    guard: BpfProgram,
    denials: BpfProgram,
    profile: Profile,
}

impl Filter {
    /// Instructions in the two programs, for `--verbose`.
    pub fn instructions(&self) -> usize {
        self.guard.len() + self.denials.len()
    }
}

/// Compile the filter for this architecture.
#[cfg(target_arch = "x86_64")]
pub fn compile(profile: Profile) -> Result<Filter, SeccompError> {
    let cond = |arg: u8, len: Len, op: Op, value: u64| {
        SeccompCondition::new(arg, len, op, value).map_err(|e| SeccompError::Compile(e.to_string()))
    };
    let rule = |conditions: Vec<SeccompCondition>| {
        SeccompRule::new(conditions).map_err(|e| SeccompError::Compile(e.to_string()))
    };
    let flag_rules = |len: Len, flags: &[u64]| -> Result<Vec<SeccompRule>, SeccompError> {
        flags
            .iter()
            .map(|&f| rule(vec![cond(0, len.clone(), Op::MaskedEq(f), f)?]))
            .collect()
    };
    let ioctl_rules = |requests: &[u64]| -> Result<Vec<SeccompRule>, SeccompError> {
        requests
            .iter()
            .map(|&r| rule(vec![cond(1, Len::Dword, Op::Eq, r)?]))
            .collect()
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let extra: &[(&str, i64, Match)] = if profile.fallback {
        FALLBACK_DENIED
    } else {
        &[]
    };
    for &(_, nr, how) in DENIED.iter().chain(extra) {
        if profile.gateway && nr == libc::SYS_connect {
            continue;
        }
        if profile.gateway && nr == libc::SYS_socket {
            // socket(domain, type, protocol): refuse a domain other than
            // the two Internet ones, every type but stream, and every
            // protocol but TCP: Landlock's port rules judge TCP only, and
            // an MPTCP (or SCTP) stream socket would connect anywhere.
            let mut chain = vec![
                rule(vec![
                    cond(0, Len::Dword, Op::Ne, libc::AF_INET as u64)?,
                    cond(0, Len::Dword, Op::Ne, libc::AF_INET6 as u64)?,
                ])?,
                rule(vec![
                    cond(2, Len::Dword, Op::Ne, 0)?,
                    cond(2, Len::Dword, Op::Ne, libc::IPPROTO_TCP as u64)?,
                ])?,
            ];
            for ty in 0..16u64 {
                if ty != libc::SOCK_STREAM as u64 {
                    chain.push(rule(vec![cond(1, Len::Dword, Op::MaskedEq(0xf), ty)?])?);
                }
            }
            rules.insert(nr, chain);
            continue;
        }
        let chain = match how {
            Match::Always => vec![],
            // sendto(fd, buf, len, flags, dest_addr, addrlen)
            Match::WithAddress => vec![rule(vec![cond(4, Len::Qword, Op::Ne, 0)?])?],
            Match::FastOpen(arg) => {
                let flag = libc::MSG_FASTOPEN as u64;
                vec![rule(vec![cond(
                    arg,
                    Len::Dword,
                    Op::MaskedEq(flag),
                    flag,
                )?])?]
            }
            // socketpair(domain, type, protocol, sv): refuse another domain,
            // and every type but stream and seqpacket (the low four bits;
            // the rest are SOCK_CLOEXEC and SOCK_NONBLOCK).
            Match::NotUnixStream => {
                let mut chain = vec![rule(vec![cond(
                    0,
                    Len::Dword,
                    Op::Ne,
                    libc::AF_UNIX as u64,
                )?])?];
                for ty in 0..16u64 {
                    if ty != libc::SOCK_STREAM as u64 && ty != libc::SOCK_SEQPACKET as u64 {
                        chain.push(rule(vec![cond(1, Len::Dword, Op::MaskedEq(0xf), ty)?])?);
                    }
                }
                chain
            }
            Match::NamespaceFlags if nr == libc::SYS_unshare => {
                let mut flags = NAMESPACE_FLAGS.to_vec();
                flags.push(CLONE_NEWTIME);
                flag_rules(Len::Dword, &flags)?
            }
            Match::NamespaceFlags => flag_rules(Len::Qword, NAMESPACE_FLAGS)?,
            Match::Terminal if profile.tty => ioctl_rules(TERMINAL_INJECTION)?,
            Match::Terminal => {
                let mut chain = ioctl_rules(TERMINAL_INJECTION)?;
                chain.extend(ioctl_rules(TERMINAL_CHANGE)?);
                chain
            }
            Match::NotSelf(arg) => vec![rule(vec![cond(arg, Len::Qword, Op::Ne, 0)?])?],
            Match::NotOwnProcess(which) => vec![
                rule(vec![cond(0, Len::Dword, Op::Ne, which)?])?,
                rule(vec![cond(1, Len::Dword, Op::Ne, 0)?])?,
            ],
            Match::WithPath(arg) => vec![rule(vec![cond(arg, Len::Qword, Op::Ne, 0)?])?],
        };
        rules.insert(nr, chain);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        seccompiler::TargetArch::x86_64,
    )
    .map_err(|e| SeccompError::Compile(e.to_string()))?;
    let denials: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Compile(e.to_string()))?;
    Ok(Filter {
        guard: guard(),
        denials,
        profile,
    })
}

/// Compile the filter for this architecture.
#[cfg(not(target_arch = "x86_64"))]
pub fn compile(_: Profile) -> Result<Filter, SeccompError> {
    Err(SeccompError::UnsupportedArch(std::env::consts::ARCH))
}

/// The hand-written guard (see the module documentation).
#[cfg(target_arch = "x86_64")]
fn guard() -> BpfProgram {
    use seccompiler::sock_filter;
    const LD_W_ABS: u16 = 0x20; // BPF_LD (0) | BPF_W (0) | BPF_ABS
    const JEQ_K: u16 = 0x05 | 0x10; // BPF_JMP | BPF_JEQ | BPF_K
    const JGE_K: u16 = 0x05 | 0x30; // BPF_JMP | BPF_JGE | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const NR: u32 = 0; // offsetof(struct seccomp_data, nr)
    const ARCH: u32 = 4; // offsetof(struct seccomp_data, arch)
    const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    let op = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        op(LD_W_ABS, 0, 0, ARCH),
        op(JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        op(RET_K, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
        op(LD_W_ABS, 0, 0, NR),
        op(JGE_K, 0, 1, X32_SYSCALL_BIT),
        op(RET_K, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
        op(JEQ_K, 0, 1, libc::SYS_clone3 as u32),
        op(
            RET_K,
            0,
            0,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32 & libc::SECCOMP_RET_DATA,
        ),
        op(RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]
}

/// Install the filter on the calling thread (and every process it later
/// executes). Irreversible. Sets `no_new_privs` (the kernel requires it).
pub fn install(filter: &Filter) -> Result<(), SeccompError> {
    for program in [&filter.guard, &filter.denials] {
        seccompiler::apply_filter(program).map_err(|e| SeccompError::Install(e.to_string()))?;
    }
    Ok(())
}

impl Filter {
    /// The profile it was compiled for.
    pub fn profile(&self) -> Profile {
        self.profile
    }
}

/// One line for `--verbose`.
pub fn describe(filter: &Filter) -> String {
    let extra = if filter.profile.fallback {
        FALLBACK_DENIED.len()
    } else {
        0
    };
    format!(
        "seccomp: {} system calls denied with EPERM (some by argument{}), terminal {}, \
         clone3 answers ENOSYS, foreign architectures and x32 numbers kill the process \
         ({} BPF instructions){}",
        DENIED.len() + extra,
        if filter.profile.fallback {
            "; fallback rules for path-based chmod/chown/xattr/utimes/inotify"
        } else {
            ""
        },
        if filter.profile.tty {
            "shared (--tty): it may be changed, not typed into"
        } else {
            "ioctls that change or type into it denied"
        },
        filter.instructions(),
        if filter.profile.gateway {
            "; --gateway or --allow-connect: TCP sockets and connect allowed (Landlock: those ports only)"
        } else {
            ""
        }
    )
}

#[cfg(all(test, target_arch = "x86_64"))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn errno(ret: i64) -> Option<i32> {
        (ret < 0).then(|| std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    /// seccomp filters the calling thread only: each check runs in a thread
    /// of its own, which the filter dies with.
    fn in_filtered_thread<T: Send + 'static>(
        profile: Profile,
        check: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        std::thread::spawn(move || {
            install(&compile(profile).unwrap()).unwrap();
            check()
        })
        .join()
        .unwrap()
    }

    #[allow(unsafe_code)]
    fn raw(nr: i64, a: [u64; 5]) -> Option<i32> {
        // SAFETY: every call below passes integers or pointers to live
        // locals of the right size; the filter answers most before the
        // kernel reads anything.
        let ret = unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4]) };
        errno(ret)
    }

    #[test]
    fn the_guard_is_what_the_comment_says() {
        let g = guard();
        assert_eq!(g.len(), 9);
        assert_eq!(g[2].k, libc::SECCOMP_RET_KILL_PROCESS);
        assert_eq!(g[8].k, libc::SECCOMP_RET_ALLOW);
        assert!(compile(Profile::default()).unwrap().instructions() > 100);
    }

    #[test]
    fn denies_with_eperm_and_lets_the_rest_through() {
        let results = in_filtered_thread(Profile::default(), || {
            let mut pair = [0i32; 2];
            let p = pair.as_mut_ptr() as u64;
            let unix = libc::AF_UNIX as u64;
            let addr = [0u8; 16];
            vec![
                ("socket", raw(libc::SYS_socket, [unix, 1, 0, 0, 0])),
                (
                    "ptrace",
                    raw(libc::SYS_ptrace, [libc::PTRACE_TRACEME as u64, 0, 0, 0, 0]),
                ),
                (
                    "io_uring_setup",
                    raw(libc::SYS_io_uring_setup, [1, 0, 0, 0, 0]),
                ),
                (
                    "unshare user",
                    raw(libc::SYS_unshare, [libc::CLONE_NEWUSER as u64, 0, 0, 0, 0]),
                ),
                ("clone3", raw(libc::SYS_clone3, [0, 0, 0, 0, 0])),
                (
                    "dgram pair",
                    raw(
                        libc::SYS_socketpair,
                        [unix, libc::SOCK_DGRAM as u64, 0, p, 0],
                    ),
                ),
                (
                    "inet pair",
                    raw(libc::SYS_socketpair, [libc::AF_INET as u64, 1, 0, p, 0]),
                ),
                (
                    "tiocsti",
                    raw(
                        libc::SYS_ioctl,
                        [0, libc::TIOCSTI, addr.as_ptr() as u64, 0, 0],
                    ),
                ),
                (
                    "stream pair",
                    raw(
                        libc::SYS_socketpair,
                        [
                            unix,
                            (libc::SOCK_STREAM | libc::SOCK_CLOEXEC) as u64,
                            0,
                            p,
                            0,
                        ],
                    ),
                ),
                ("sendto with address", {
                    let fd = pair[0] as u64;
                    raw(
                        libc::SYS_sendto,
                        [fd, addr.as_ptr() as u64, 1, 0, addr.as_ptr() as u64],
                    )
                }),
                ("sendto without address", {
                    let fd = pair[0] as u64;
                    raw(libc::SYS_sendto, [fd, addr.as_ptr() as u64, 1, 0, 0])
                }),
                (
                    "unshare files",
                    raw(libc::SYS_unshare, [libc::CLONE_FILES as u64, 0, 0, 0, 0]),
                ),
                ("getpid", raw(libc::SYS_getpid, [0; 5])),
            ]
        });
        let eperm = Some(libc::EPERM);
        let expected = [
            ("socket", eperm),
            ("ptrace", eperm),
            ("io_uring_setup", eperm),
            ("unshare user", eperm),
            ("clone3", Some(libc::ENOSYS)),
            ("dgram pair", eperm),
            ("inet pair", eperm),
            ("tiocsti", eperm),
            ("stream pair", None),
            ("sendto with address", eperm),
            ("sendto without address", None),
            ("unshare files", None),
            ("getpid", None),
        ];
        assert_eq!(results, expected);
    }

    #[test]
    fn a_gateway_allows_tcp_stream_sockets_and_nothing_else() {
        let socket_with = |domain: i32, ty: i32, protocol: i32| {
            raw(
                libc::SYS_socket,
                [domain as u64, ty as u64, protocol as u64, 0, 0],
            )
        };
        let socket = move |domain: i32, ty: i32| socket_with(domain, ty, 0);
        let profile = Profile {
            gateway: true,
            ..Profile::default()
        };
        let results = in_filtered_thread(profile, move || {
            vec![
                socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC),
                socket(libc::AF_INET6, libc::SOCK_STREAM),
                socket(libc::AF_UNIX, libc::SOCK_STREAM),
                socket(libc::AF_INET, libc::SOCK_DGRAM),
                socket(libc::AF_INET, libc::SOCK_RAW),
                socket(libc::AF_NETLINK, libc::SOCK_RAW),
                socket(libc::AF_PACKET, libc::SOCK_STREAM),
                raw(libc::SYS_bind, [0, 0, 0, 0, 0]),
                raw(libc::SYS_listen, [0, 0, 0, 0, 0]),
                // Stream protocols Landlock's TCP rules do not judge.
                socket_with(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_MPTCP),
                socket_with(libc::AF_INET6, libc::SOCK_STREAM, libc::IPPROTO_SCTP),
                socket_with(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_TCP),
                // TCP Fast Open: a connect inside sendmsg.
                raw(libc::SYS_sendmsg, [0, 0, libc::MSG_FASTOPEN as u64, 0, 0]),
                raw(libc::SYS_sendmmsg, [0, 0, 0, libc::MSG_FASTOPEN as u64, 0]),
            ]
        });
        let eperm = Some(libc::EPERM);
        assert_eq!(results[0], None);
        assert!(results[1].is_none() || results[1] == Some(libc::EAFNOSUPPORT));
        assert_eq!(&results[2..11], &[eperm; 9]);
        assert_eq!(results[11], None);
        assert_eq!(&results[12..], &[eperm; 2]);
        // Without --gateway every socket is denied.
        let plain = in_filtered_thread(Profile::default(), move || {
            socket(libc::AF_INET, libc::SOCK_STREAM)
        });
        assert_eq!(plain, eperm);
    }

    #[test]
    fn reaching_other_processes_and_ipc_is_denied_by_pid_and_profile() {
        let ppid = nix::unistd::getppid().as_raw() as u64;
        let checks = move || {
            let tmp = std::env::temp_dir().join(format!("kw-seccomp-{}", std::process::id()));
            let _ = std::fs::write(&tmp, b"x");
            let path = std::ffi::CString::new(tmp.to_str().unwrap()).unwrap();
            let p = path.as_ptr() as u64;
            let mut limit = [0u64; 2];
            let l = limit.as_mut_ptr() as u64;
            let results = vec![
                raw(libc::SYS_setpriority, [0, ppid, 0, 0, 0]),
                raw(libc::SYS_setpriority, [0, 0, 0, 0, 0]),
                raw(libc::SYS_setpriority, [2, 0, 0, 0, 0]),
                raw(libc::SYS_prlimit64, [ppid, 7, 0, l, 0]),
                raw(libc::SYS_prlimit64, [0, 7, 0, l, 0]),
                raw(libc::SYS_sched_setaffinity, [ppid, 0, 0, 0, 0]),
                raw(libc::SYS_shmget, [0, 4096, 0o600, 0, 0]),
                raw(libc::SYS_msgget, [0, 0o600, 0, 0, 0]),
                raw(libc::SYS_ioctl, [0, libc::TCSETS, 0, 0, 0]),
                raw(libc::SYS_ioctl, [0, libc::TIOCSWINSZ, 0, 0, 0]),
                raw(libc::SYS_chmod, [p, 0o600, 0, 0, 0]),
                raw(libc::SYS_utimensat, [libc::AT_FDCWD as u64, p, 0, 0, 0]),
            ];
            let _ = std::fs::remove_file(&tmp);
            results
        };
        let eperm = Some(libc::EPERM);
        let denied = |r: Option<i32>| r == eperm;
        let namespaces = in_filtered_thread(Profile::default(), checks);
        let fallback = in_filtered_thread(
            Profile {
                fallback: true,
                ..Profile::default()
            },
            checks,
        );
        let tty = in_filtered_thread(
            Profile {
                tty: true,
                ..Profile::default()
            },
            checks,
        );
        // Both modes: other pids, PRIO_USER, SysV IPC, terminal changes.
        for results in [&namespaces, &fallback] {
            let got: Vec<bool> = results.iter().map(|&r| denied(r)).collect();
            assert_eq!(
                &got[..10],
                &[true, false, true, true, false, true, true, true, true, true],
                "{results:?}"
            );
        }
        // Path-based chmod and utimensat only in fallback mode.
        assert_eq!(namespaces[10], None, "{namespaces:?}");
        assert_eq!(namespaces[11], None, "{namespaces:?}");
        assert_eq!(fallback[10], eperm, "{fallback:?}");
        assert_eq!(fallback[11], eperm, "{fallback:?}");
        // --tty: the terminal may be changed (stdin is no terminal here,
        // so the kernel answers, not the filter).
        assert!(!denied(tty[8]) && !denied(tty[9]), "{tty:?}");
    }
}
