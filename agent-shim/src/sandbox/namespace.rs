// SPDX-License-Identifier: Apache-2.0
//! Namespace mode: the shim clones an init process into new user, mount,
//! pid, IPC, UTS and cgroup namespaces. The init maps its uid and gid to
//! themselves, dies with the shim (`PR_SET_PDEATHSIG`), builds the minimal
//! root ([`super::mount`]), says so on a pipe, and starts the program as
//! its child (pid 2), which locks itself down as in fallback mode and
//! executes the program. The init forwards signals to the program, and
//! exits with its status; when it exits, for whatever reason, the kernel
//! kills every process left in the pid namespace.
//!
//! If any step before the program starts fails (no unprivileged user
//! namespaces, an AppArmor restriction, a kernel refusing a mount), the
//! init says why on the pipe and exits; nothing has run, and the shim falls
//! back (or, with `--require-namespaces`, refuses).

use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};

use keyward_proto::GatewayInfo;
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::{getgid, getuid, pipe2, setsid, Gid, Pid, Uid};

use super::lockdown::Network;
use super::plan::Plan;
use super::{lockdown, supervise, SandboxError, EXIT_SANDBOX};
use crate::sys::{self, Forked};

/// The namespaces of the sandbox. No network namespace unless `--gateway`
/// asks for one: see docs/THREAT_MODEL.md, "Namespaces" (the seccomp
/// filter already forbids every new socket, and one costs more than the
/// rest together).
const NAMESPACES: libc::c_int = libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP;

/// Why the namespaces could not be set up (sent to the shim on the pipe).
#[derive(Debug, thiserror::Error)]
pub(super) enum NamespaceError {
    #[error("prctl(PR_SET_PDEATHSIG): {0}")]
    DeathSignal(#[source] nix::Error),
    #[error("setsid: {0}")]
    Session(#[source] nix::Error),
    #[error("prctl(PR_SET_DUMPABLE): {0}")]
    Dumpable(#[source] nix::Error),
    #[error("cannot write {file}: {source}")]
    IdMap {
        file: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Mount(#[from] super::mount::MountError),
    #[error("cannot bring up the loopback interface: {0}")]
    Loopback(#[source] std::io::Error),
    #[error("cannot open the gateway endpoint on 127.0.0.1: {0}")]
    Endpoint(#[source] std::io::Error),
}

/// Start the init in new namespaces. `Ok(Ok((pid, endpoint)))`: it is
/// ready and runs the program (`endpoint`: with `gateways`, the listening
/// socket of the gateway relay, in the sandbox's network namespace, for
/// the shim to accept on); `Ok(Err(why))`: namespaces are unavailable and
/// nothing ran; `Err`: the shim itself failed.
pub(super) fn start(
    plan: &Plan,
    channel: &mut Option<OwnedFd>,
    old_mask: &SigSet,
    gateways: &[GatewayInfo],
) -> Result<Result<(Pid, Option<OwnedFd>), String>, SandboxError> {
    let (ids_uid, ids_gid) = (getuid(), getgid());
    let (ready_read, ready_write) =
        pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SandboxError::Namespace(e.to_string()))?;
    let (relay, namespaces) = if gateways.is_empty() {
        (None, NAMESPACES)
    } else {
        let pair = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| SandboxError::Namespace(e.to_string()))?;
        (Some(pair), NAMESPACES | libc::CLONE_NEWNET)
    };
    let init = match sys::clone_namespaces(namespaces) {
        Ok(Forked::Child) => {
            drop(ready_read);
            init(
                plan,
                channel.take(),
                ready_write,
                old_mask,
                (ids_uid, ids_gid),
                gateways,
                relay.map(|(_, theirs)| theirs),
            )
        }
        Ok(Forked::Parent(pid)) => pid,
        Err(e) => return Ok(Err(format!("cannot create a user namespace: {e}"))),
    };
    drop(ready_write);
    let relay = relay.map(|(ours, _)| ours);
    let mut said = Vec::new();
    std::fs::File::from(ready_read)
        .read_to_end(&mut said)
        .map_err(|e| SandboxError::Namespace(e.to_string()))?;
    if said.first() == Some(&b'R') {
        let endpoint = match relay {
            Some(relay) => Some(receive_endpoint(&relay)?),
            None => None,
        };
        return Ok(Ok((init, endpoint)));
    }
    // Nothing ran: collect the init and say why.
    let _ = waitpid(init, None);
    let why = match said.split_first() {
        Some((b'N', why)) => String::from_utf8_lossy(why).into_owned(),
        _ => "the namespace set-up process died".to_owned(),
    };
    Ok(Err(why))
}

/// The init (pid 1 of the new pid namespace). Never returns.
fn init(
    plan: &Plan,
    channel: Option<OwnedFd>,
    ready: OwnedFd,
    old_mask: &SigSet,
    (uid, gid): (Uid, Gid),
    gateways: &[GatewayInfo],
    relay: Option<OwnedFd>,
) -> ! {
    let mut ready = std::fs::File::from(ready);
    let net = match set_up(plan, uid, gid, gateways, relay) {
        Ok(net) => net,
        Err(e) => {
            let _ = ready.write_all(format!("N{e}").as_bytes());
            sys::exit_child(EXIT_SANDBOX);
        }
    };
    // If the shim is gone, the pipe is broken: stop here.
    if ready.write_all(b"R").is_err() {
        sys::exit_child(EXIT_SANDBOX);
    }
    drop(ready);
    match sys::fork() {
        Ok(Forked::Child) => {
            let Err(err) = lockdown::enter(plan, channel, None, old_mask, net.as_ref());
            lockdown::fail(err)
        }
        Ok(Forked::Parent(program)) => {
            drop(channel);
            match supervise::supervise(program, None) {
                Ok(status) => sys::exit_child(status),
                Err(e) => {
                    eprintln!("agent-shim: sandbox init: {e}");
                    sys::exit_child(EXIT_SANDBOX)
                }
            }
        }
        Err(e) => {
            eprintln!("agent-shim: sandbox init: fork: {e}");
            sys::exit_child(EXIT_SANDBOX)
        }
    }
}

/// The init's steps before the program starts.
fn set_up(
    plan: &Plan,
    uid: Uid,
    gid: Gid,
    gateways: &[GatewayInfo],
    relay: Option<OwnedFd>,
) -> Result<Option<Network>, NamespaceError> {
    // Die with the shim; the kernel then kills the whole pid namespace.
    // (If the shim died before this, the "ready" write fails.)
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(NamespaceError::DeathSignal)?;
    // No terminal signals but those the shim forwards.
    setsid().map_err(NamespaceError::Session)?;
    map_ids(uid, gid)?;
    super::mount::build_root(plan)?;
    relay
        .map(|relay| open_gateway_endpoint(&relay, gateways))
        .transpose()
}

/// `--gateway`: bring up loopback in the new network namespace, listen on
/// 127.0.0.1 (a port the kernel picks), pass the listening socket to the
/// shim outside (which accepts and relays, [`crate::gateway`]), and keep
/// no copy of it: the program cannot accept on it (seccomp denies
/// `accept` too). The gateways' variables point at the endpoint, one
/// path prefix per gateway: `http://127.0.0.1:PORT/NAME` + its base path.
fn open_gateway_endpoint(
    relay: &OwnedFd,
    gateways: &[GatewayInfo],
) -> Result<Network, NamespaceError> {
    sys::loopback_up().map_err(NamespaceError::Loopback)?;
    let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .map_err(NamespaceError::Endpoint)?;
    let port = listener
        .local_addr()
        .map_err(NamespaceError::Endpoint)?
        .port();
    let endpoint = OwnedFd::from(listener);
    let fds = [endpoint.as_raw_fd()];
    sendmsg::<()>(
        relay.as_raw_fd(),
        &[IoSlice::new(b"E")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(|e| NamespaceError::Endpoint(e.into()))?;
    drop(endpoint);
    let mut env = Vec::new();
    for info in gateways {
        let url = format!("http://127.0.0.1:{port}/{}{}", info.gateway, info.base_path);
        let values = info
            .base_url_env
            .iter()
            .map(|name| (name, url.as_str()))
            .chain(
                info.api_key_env
                    .iter()
                    .map(|name| (name, info.placeholder.as_str())),
            );
        for (name, value) in values {
            // Names and values come from the broker's checked policy; one
            // with a NUL is left out rather than fail the sandbox.
            if let Ok(kv) = std::ffi::CString::new(format!("{name}={value}")) {
                env.push(kv);
            }
        }
    }
    Ok(Network { port, env })
}

/// The shim's side: the listening socket the init passed.
fn receive_endpoint(relay: &OwnedFd) -> Result<OwnedFd, SandboxError> {
    let fail = |why: String| SandboxError::Namespace(format!("gateway endpoint: {why}"));
    let mut byte = [0u8; 1];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let message = recvmsg::<()>(
        relay.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| fail(e.to_string()))?;
    for cmsg in message.cmsgs().map_err(|e| fail(e.to_string()))? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            let mut owned: Vec<OwnedFd> = fds
                .into_iter()
                .filter_map(|fd| sys::own_received_fd(fd).ok())
                .collect();
            if let Some(fd) = owned.pop() {
                return Ok(fd);
            }
        }
    }
    Err(fail("the sandbox init sent no socket".to_owned()))
}

/// Map the uid and gid to themselves, and refuse `setgroups` (the kernel
/// requires it of an unprivileged gid map). The init is undumpable (a copy
/// of the shim); `/proc/self/*_map` belongs to root while it is, so it is
/// made dumpable for the three writes only. The shim has already
/// overwritten the token in its environment block, and zeroized its copy.
fn map_ids(uid: Uid, gid: Gid) -> Result<(), NamespaceError> {
    nix::sys::prctl::set_dumpable(true).map_err(NamespaceError::Dumpable)?;
    let write = |file: &'static str, text: String| {
        std::fs::write(format!("/proc/self/{file}"), text)
            .map_err(|source| NamespaceError::IdMap { file, source })
    };
    let mapped = write("setgroups", "deny".to_owned())
        .and_then(|()| write("uid_map", format!("{uid} {uid} 1\n")))
        .and_then(|()| write("gid_map", format!("{gid} {gid} 1\n")));
    nix::sys::prctl::set_dumpable(false).map_err(NamespaceError::Dumpable)?;
    mapped
}
