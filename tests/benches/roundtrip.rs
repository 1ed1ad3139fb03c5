// SPDX-License-Identifier: Apache-2.0
//! Round trip of a brokered call to the no-network `echo` tool, next to a
//! raw `SOCK_SEQPACKET` ping-pong between two processes measured in the same
//! run. Target: brokered p50 at most 1.5x the raw p50.
//!
//! Run: `cargo bench -p keyward-tests --bench roundtrip` (as root: the
//! broker is the real binary, started like the end-to-end tests start it).
#![allow(clippy::unwrap_used)]

use std::io::BufRead;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent_shim::client::Client;
use keyward_proto::Response;
use keyward_tests::Broker;

const WARMUP: usize = 2_000;
const ROUNDS: usize = 50_000;

const CONFIG: &str = r#"
[broker]
socket = "{socket}"
socket_mode = "0666"

[[principal]]
name = "bench"
uids = [0]
may_call = ["echo"]

[[tool]]
name = "echo"
kind = "echo"
params.message = { type = "string", max_len = 100 }
"#;

struct Stats {
    p50: Duration,
    p90: Duration,
    p99: Duration,
    mean: Duration,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    let total: Duration = samples.iter().sum();
    Stats {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        mean: total / samples.len() as u32,
    }
}

fn measure(mut round: impl FnMut()) -> Stats {
    for _ in 0..WARMUP {
        round();
    }
    let mut samples = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let start = Instant::now();
        round();
        samples.push(start.elapsed());
    }
    stats(samples)
}

fn brokered() -> Stats {
    let broker = Broker::start(CONFIG, &[]);
    let mut client = Client::connect(&broker.socket).unwrap();
    let params = [("message".to_owned(), "ping".to_owned())];
    measure(|| match client.call("echo", &params).unwrap() {
        Response::Done(_) => {}
        other => panic!("{other:?}"),
    })
}

fn raw() -> Stats {
    use nix::sys::socket::{
        connect, recv, send, socket, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raw.sock");
    let mut server = Command::new(env!("CARGO_BIN_EXE_kw-test-peer"))
        .arg("pingpong")
        .arg(&path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    connect(fd.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
    // The same bytes a brokered echo call sends.
    let message = keyward_proto::encode(&keyward_tests::echo_request("ping")).unwrap();
    let mut buf = vec![0u8; 1024];
    let stats = measure(|| {
        send(fd.as_raw_fd(), &message, MsgFlags::MSG_NOSIGNAL).unwrap();
        recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
    });
    drop(fd);
    server.wait().unwrap();
    stats
}

fn main() {
    // `cargo test --benches` runs this binary with --bench absent; keep
    // that fast by only measuring when invoked by `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("roundtrip: skipped (run with `cargo bench`)");
        return;
    }
    let raw = raw();
    let brokered = brokered();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("round trip over SOCK_SEQPACKET, {ROUNDS} rounds after {WARMUP} warm-up");
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>9}",
        "", "p50 µs", "p90 µs", "p99 µs", "mean µs"
    );
    for (name, s) in [
        ("raw ping-pong (2 processes)", &raw),
        ("brokered echo call", &brokered),
    ] {
        println!(
            "{name:<28} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            us(s.p50),
            us(s.p90),
            us(s.p99),
            us(s.mean)
        );
    }
    println!(
        "ratio brokered/raw at p50: {:.2}x (target <= 1.5x)",
        us(brokered.p50) / us(raw.p50)
    );
}
