// SPDX-License-Identifier: Apache-2.0
//! A hostile peer for the end-to-end tests: connects to the broker, then
//! hands the authenticated connection to another process (a forked child,
//! optionally under another uid) which tries to use it.
//!
//! Usage:
//! - `kw-test-peer handoff SOCKET same|UID`: prints the parent's result,
//!   then the child's: `ok`, `denied`, `unauthenticated`, `busy`, `error`
//!   or `closed`, one per line.
//! - `kw-test-peer hold SOCKET UID N`: as UID, open N connections and say
//!   Hello on each, then print the outcome of an (N+1)th, and keep them
//!   all open until stdin closes.
//! - `kw-test-peer channels N` (inside `agent-shim run`): open N channels
//!   over `$KEYWARD_FD` at once, call `echo` on each, and print how many
//!   worked.
//! - `kw-test-peer pingpong SOCKET`: bind SOCKET (`SOCK_SEQPACKET`), accept
//!   one connection and send every message straight back until it closes:
//!   the raw baseline for the round-trip benchmark.
#![allow(clippy::unwrap_used)]
#![allow(unsafe_code)]

use keyward_proto::{ErrorCode, Response};
use keyward_tests::{echo_request, RawConn};

fn outcome(reply: Option<Response>) -> &'static str {
    match reply {
        Some(Response::Done(_)) => "ok",
        Some(Response::Denied(_)) => "denied",
        Some(Response::Error(e)) if e.code == ErrorCode::Unauthenticated => "unauthenticated",
        Some(Response::Error(e)) if e.code == ErrorCode::Busy => "busy",
        Some(_) => "error",
        None => "closed",
    }
}

fn drop_to(id: u32) {
    nix::unistd::setgroups(&[]).unwrap();
    nix::unistd::setgid(nix::unistd::Gid::from_raw(id)).unwrap();
    nix::unistd::setuid(nix::unistd::Uid::from_raw(id)).unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let socket = std::path::Path::new(&args[2]);
    match args[1].as_str() {
        "handoff" => handoff(socket, &args[3]),
        "hold" => hold(socket, args[3].parse().unwrap(), args[4].parse().unwrap()),
        "pingpong" => pingpong(socket),
        "channels" => channels(args[2].parse().unwrap()),
        other => panic!("unknown mode {other}"),
    }
}

fn hold(socket: &std::path::Path, uid: u32, n: usize) {
    drop_to(uid);
    let held: Vec<RawConn> = (0..n)
        .map(|_| {
            let c = RawConn::connect(socket);
            c.hello();
            c
        })
        .collect();
    let extra = RawConn::connect(socket);
    // A refused connection is answered at once, before the broker reads
    // anything (sending first could leave unread data at the broker's
    // close, which the kernel reports here as ECONNRESET). An admitted one
    // would wait for a Hello and close at its deadline: "closed".
    let reply = extra.recv();
    println!(
        "{}",
        match reply {
            Some(Response::Hello(_)) => "ok",
            other => outcome(other),
        }
    );
    use std::io::{Read, Write};
    std::io::stdout().flush().unwrap();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(held);
}

fn handoff(socket: &std::path::Path, who: &str) {
    let conn = RawConn::connect(socket);
    conn.hello();
    println!("{}", outcome(conn.request(&echo_request("parent"))));
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    // SAFETY: this program is single-threaded, so the child may run
    // arbitrary code after fork.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            if who != "same" {
                drop_to(who.parse().unwrap());
            }
            println!("{}", outcome(conn.request(&echo_request("child"))));
            std::process::exit(0);
        }
        nix::unistd::ForkResult::Parent { child } => {
            nix::sys::wait::waitpid(child, None).unwrap();
        }
    }
}

fn pingpong(socket: &std::path::Path) {
    use nix::sys::socket::{
        accept, bind, listen, recv, send, socket as mk, AddressFamily, Backlog, MsgFlags, SockFlag,
        SockType, UnixAddr,
    };
    use std::os::fd::AsRawFd;
    let listener = mk(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(listener.as_raw_fd(), &UnixAddr::new(socket).unwrap()).unwrap();
    listen(&listener, Backlog::new(1).unwrap()).unwrap();
    println!("ready");
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    let conn = accept(listener.as_raw_fd()).unwrap();
    let mut buf = vec![0u8; keyward_proto::MAX_MESSAGE + 1];
    loop {
        let n = recv(conn, &mut buf, MsgFlags::empty()).unwrap();
        if n == 0 {
            break;
        }
        send(conn, &buf[..n], MsgFlags::MSG_NOSIGNAL).unwrap();
    }
}

fn channels(n: usize) {
    let mut open = Vec::new();
    for _ in 0..n {
        match agent_shim::client::from_env_or_socket() {
            Ok(client) => open.push(client),
            Err(_) => break,
        }
    }
    let params = [("message".to_owned(), "x".to_owned())];
    let mut working = 0;
    for client in &mut open {
        if matches!(client.call("echo", &params), Ok(Response::Done(_))) {
            working += 1;
        }
    }
    println!("{working}");
}
