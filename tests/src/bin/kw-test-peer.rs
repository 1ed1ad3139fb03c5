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
//! - `kw-test-peer flood SOCKET UID TOKEN_FILE CONNS CHANNELS`: as UID,
//!   open CONNS connections, bind each to the token, open CHANNELS
//!   channels over each; print `bound B channels C` (how many the broker
//!   took), and hold them all until stdin closes.
//! - `kw-test-peer orphan SOCKET UID TOKEN_FILE`: as UID, play a shim:
//!   connect and bind, fork a child that keeps the bound connection and
//!   opens a channel over it, then exit. The child waits for its parent's
//!   death and prints how its channel (`channel ok|closed`) and a new one
//!   (`new ok|closed`) fare afterwards.
//! - `kw-test-peer burst SOCKET UID N`: as UID, send N `echo` calls on one
//!   connection as fast as it can, one outcome per line (`rate` for a
//!   `rate limited` error).
//! - `kw-test-peer measure SOCKET UID TOKEN_FILE SECONDS`: as UID, for
//!   SECONDS, alternate a direct `echo` call and one with the (counted)
//!   token, 50 of each a second (within the default request rate); print
//!   `direct P50 P99 N ERRORS` and `token P50 P99 N ERRORS` (µs).
//! - `kw-test-peer stress SOCKET UID TOKEN_FILE SECONDS`: as UID, for
//!   SECONDS, flood from several threads at once: connections, bound
//!   connections with 16 channels each, mints and calls; print what the
//!   broker took and refused.
//! - `kw-test-peer silent SOCKET`: listen on SOCKET and never accept:
//!   a broker that never answers. Prints `ready`; exits when stdin closes.
//! - `kw-test-peer channel-flood SOCKET UID TOKEN_FILE N`: as UID, bind a
//!   connection, send N `Channel` messages on it that carry no socket, as
//!   fast as it can, then call `echo` on it until one is answered `ok`
//!   (at most 5 s); print `first F calls C extra E`: the outcome of the
//!   first reply read, the calls made, and how many replies came beyond
//!   one per call.
//! - `kw-test-peer channel-burst SOCKET UID TOKEN_FILE N`: as UID, bind a
//!   connection and open N channels over it, one after the other; print
//!   each one's outcome (`ok` when its `Hello` was answered, else
//!   `closed`) on one line.
#![allow(clippy::unwrap_used)]
#![allow(unsafe_code)]

use keyward_proto::{ErrorCode, Response};
use keyward_tests::{echo_request, RawConn};

fn outcome(reply: Option<Response>) -> &'static str {
    match reply {
        Some(Response::Done(_)) => "ok",
        Some(Response::Denied(_)) => "denied",
        Some(Response::Error(e)) if e.code == ErrorCode::Unauthenticated => "unauthenticated",
        Some(Response::Error(e))
            if e.code == ErrorCode::Busy && e.message.starts_with("rate limited") =>
        {
            "rate"
        }
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
        "flood" => flood(
            socket,
            args[3].parse().unwrap(),
            std::path::Path::new(&args[4]),
            args[5].parse().unwrap(),
            args[6].parse().unwrap(),
        ),
        "orphan" => orphan(
            socket,
            args[3].parse().unwrap(),
            std::path::Path::new(&args[4]),
        ),
        "burst" => burst(socket, args[3].parse().unwrap(), args[4].parse().unwrap()),
        "silent" => silent(socket),
        "measure" => measure(
            socket,
            args[3].parse().unwrap(),
            std::path::Path::new(&args[4]),
            args[5].parse().unwrap(),
        ),
        "stress" => stress(
            socket,
            args[3].parse().unwrap(),
            std::path::Path::new(&args[4]),
            args[5].parse().unwrap(),
        ),
        "channel-flood" => channel_flood(
            socket,
            args[3].parse().unwrap(),
            std::path::Path::new(&args[4]),
            args[5].parse().unwrap(),
        ),
        "channel-burst" => channel_burst(
            socket,
            args[3].parse().unwrap(),
            std::path::Path::new(&args[4]),
            args[5].parse().unwrap(),
        ),
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

/// Connect as this process and bind `token`; `None` if the broker refused
/// either.
fn bind(socket: &std::path::Path, token: &str) -> Option<std::os::fd::OwnedFd> {
    use agent_shim::client::Client;
    let mut client = Client::connect(socket).ok()?;
    let reply = client.request(&keyward_proto::Request::Bind(keyward_proto::Bind {
        token: token.to_owned(),
    }));
    matches!(reply, Ok(Response::Bound(_))).then(|| client.into_fd())
}

fn wait_for_stdin_to_close() {
    use std::io::{Read, Write};
    std::io::stdout().flush().unwrap();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

fn flood(
    socket: &std::path::Path,
    uid: u32,
    token_file: &std::path::Path,
    conns: usize,
    channels: usize,
) {
    let token = std::fs::read_to_string(token_file).unwrap();
    drop_to(uid);
    let mut held = Vec::new();
    let mut connections = Vec::new();
    let mut bound = 0;
    let mut opened = 0;
    for _ in 0..conns {
        let Some(fd) = bind(socket, token.trim()) else {
            continue;
        };
        bound += 1;
        for _ in 0..channels {
            if let Ok(channel) = agent_shim::client::Client::open_channel(&fd) {
                opened += 1;
                held.push(channel);
            }
        }
        connections.push(fd);
    }
    println!("bound {bound} channels {opened}");
    wait_for_stdin_to_close();
    drop(held);
    drop(connections);
}

fn orphan(socket: &std::path::Path, uid: u32, token_file: &std::path::Path) {
    use agent_shim::client::Client;
    use std::io::Write;
    let token = std::fs::read_to_string(token_file).unwrap();
    drop_to(uid);
    let fd = bind(socket, token.trim()).expect("bind refused");
    let params = [("message".to_owned(), "x".to_owned())];
    let works = |client: &mut Client| {
        if matches!(client.call("echo", &params), Ok(Response::Done(_))) {
            "ok"
        } else {
            "closed"
        }
    };
    let (ready_r, ready_w) = nix::unistd::pipe().unwrap();
    // SAFETY: this program is single-threaded, so the child may run
    // arbitrary code after fork.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            drop(ready_r);
            let parent = nix::unistd::getppid();
            let mut channel = Client::open_channel(&fd).unwrap();
            println!("before {}", works(&mut channel));
            std::io::stdout().flush().unwrap();
            drop(ready_w);
            // The parent exits now; wait until it has.
            while nix::unistd::getppid() == parent {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            // The broker learns of the exit asynchronously: give it up to
            // 2 s, then report what the channel still does.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            let mut outcome = works(&mut channel);
            while outcome == "ok" && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(50));
                outcome = works(&mut channel);
            }
            println!("channel {outcome}");
            let new = match Client::open_channel(&fd) {
                Ok(mut c) => works(&mut c),
                Err(_) => "closed",
            };
            println!("new {new}");
            std::process::exit(0);
        }
        nix::unistd::ForkResult::Parent { .. } => {
            drop(ready_w);
            // Wait for the child's channel to work, then die like a
            // SIGKILLed shim: at once, without closing anything politely.
            let mut byte = [0u8; 1];
            let _ = nix::unistd::read(&ready_r, &mut byte);
            std::process::exit(0);
        }
    }
}

fn burst(socket: &std::path::Path, uid: u32, n: usize) {
    drop_to(uid);
    let conn = RawConn::connect(socket);
    conn.hello();
    for i in 0..n {
        println!("{}", outcome(conn.request(&echo_request(&format!("m{i}")))));
    }
}

fn silent(socket: &std::path::Path) {
    use nix::sys::socket::{
        bind, listen, socket as mk, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
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
    std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    listen(&listener, Backlog::new(8).unwrap()).unwrap();
    println!("ready");
    wait_for_stdin_to_close();
}

fn measure(socket: &std::path::Path, uid: u32, token_file: &std::path::Path, seconds: u64) {
    use agent_shim::client::Client;
    use keyward_tests::bench::{micros, Stats};
    use std::time::{Duration, Instant};
    let token = std::fs::read_to_string(token_file).unwrap();
    drop_to(uid);
    let mut direct = Client::connect(socket).unwrap();
    let mut counted = Client::connect(socket).unwrap();
    let reply = counted.request(&keyward_proto::Request::Bind(keyward_proto::Bind {
        token: token.trim().to_owned(),
    }));
    assert!(matches!(reply, Ok(Response::Bound(_))), "{reply:?}");
    let params = [("message".to_owned(), "m".to_owned())];
    let mut samples = [Vec::new(), Vec::new()];
    let mut errors = [0usize, 0];
    let period = Duration::from_millis(20);
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut next = Instant::now();
    while Instant::now() < end {
        for (i, client) in [&mut direct, &mut counted].into_iter().enumerate() {
            let start = Instant::now();
            match client.call("echo", &params) {
                Ok(Response::Done(_)) => samples[i].push(start.elapsed()),
                other => {
                    if errors[i] == 0 {
                        eprintln!("kw-test-peer measure: first error: {other:?}");
                    }
                    errors[i] += 1
                }
            }
        }
        // Never catch up in a burst: that would be the measurer's own
        // flood.
        next = (next + period).max(Instant::now());
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    for (i, name) in ["direct", "token"].into_iter().enumerate() {
        let n = samples[i].len();
        let stats = Stats::of(std::mem::take(&mut samples[i]));
        println!(
            "{name} {:.0} {:.0} {n} {}",
            micros(stats.p50),
            micros(stats.p99),
            errors[i]
        );
    }
}

fn stress(socket: &std::path::Path, uid: u32, token_file: &std::path::Path, seconds: u64) {
    use agent_shim::client::Client;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let token = std::fs::read_to_string(token_file).unwrap();
    drop_to(uid);
    let end = Instant::now() + Duration::from_secs(seconds);
    // ok / refused per kind: connections, channels, mints, calls.
    let counts: Arc<[AtomicUsize; 8]> = Arc::new(Default::default());
    let count = |counts: &[AtomicUsize; 8], kind: usize, ok: bool| {
        counts[kind * 2 + usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
    };
    let socket = socket.to_owned();
    let mut threads = Vec::new();
    for kind in [0, 1, 2, 3, 3, 3] {
        let counts = Arc::clone(&counts);
        let socket = socket.clone();
        let token = token.trim().to_owned();
        threads.push(std::thread::spawn(move || {
            let params = [("message".to_owned(), "flood".to_owned())];
            let mut client: Option<Client> = None;
            while Instant::now() < end {
                match kind {
                    0 => count(&counts, 0, Client::connect(&socket).is_ok()),
                    1 => {
                        let Some(fd) = bind(&socket, &token) else {
                            count(&counts, 1, false);
                            continue;
                        };
                        let channels: Vec<_> = (0..16)
                            .filter_map(|_| Client::open_channel(&fd).ok())
                            .collect();
                        count(&counts, 1, channels.len() == 16);
                    }
                    _ => {
                        let c = match client.as_mut() {
                            Some(c) => c,
                            None => match Client::connect(&socket) {
                                Ok(c) => client.insert(c),
                                Err(_) => {
                                    count(&counts, kind, false);
                                    continue;
                                }
                            },
                        };
                        let reply = if kind == 2 {
                            c.request(&keyward_proto::Request::Mint(keyward_proto::Mint {
                                tools: vec!["echo".into()],
                                params: vec![],
                                ttl_secs: Some(60),
                                max_uses: Some(1),
                                task: String::new(),
                                audience: None,
                                exact_call: false,
                            }))
                        } else {
                            c.call("echo", &params)
                        };
                        match reply {
                            Ok(Response::Done(_) | Response::Minted(_)) => {
                                count(&counts, kind, true)
                            }
                            Ok(_) => count(&counts, kind, false),
                            Err(_) => {
                                count(&counts, kind, false);
                                client = None;
                            }
                        }
                    }
                }
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let c: Vec<usize> = counts.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    println!(
        "connections {}/{} channel-sets {}/{} mints {}/{} calls {}/{} (taken/refused)",
        c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]
    );
}

fn channel_flood(socket: &std::path::Path, uid: u32, token_file: &std::path::Path, n: usize) {
    use std::os::fd::AsRawFd;
    let token = std::fs::read_to_string(token_file).unwrap();
    drop_to(uid);
    let fd = bind(socket, token.trim()).expect("bind refused");
    let conn = RawConn { fd };
    let channel = keyward_proto::encode(&keyward_proto::Request::Channel).unwrap();
    for _ in 0..n {
        conn.send(&channel).unwrap();
    }
    let call = keyward_proto::encode(&echo_request("after")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut first = None;
    let mut calls = 0;
    loop {
        conn.send(&call).unwrap();
        calls += 1;
        let reply = outcome(conn.recv());
        first.get_or_insert(reply);
        if reply == "ok" || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Anything more waiting now was a reply to no call.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut buf = vec![0u8; keyward_proto::MAX_MESSAGE + 1];
    let mut extra = 0;
    while nix::sys::socket::recv(
        conn.fd.as_raw_fd(),
        &mut buf,
        nix::sys::socket::MsgFlags::MSG_DONTWAIT,
    )
    .is_ok_and(|n| n > 0)
    {
        extra += 1;
    }
    println!("first {} calls {calls} extra {extra}", first.unwrap());
}

fn channel_burst(socket: &std::path::Path, uid: u32, token_file: &std::path::Path, n: usize) {
    let token = std::fs::read_to_string(token_file).unwrap();
    drop_to(uid);
    let fd = bind(socket, token.trim()).expect("bind refused");
    let mut held = Vec::new();
    let outcomes: Vec<&str> = (0..n)
        .map(|_| match agent_shim::client::Client::open_channel(&fd) {
            Ok(channel) => {
                held.push(channel);
                "ok"
            }
            Err(_) => "closed",
        })
        .collect();
    println!("{}", outcomes.join(" "));
}
