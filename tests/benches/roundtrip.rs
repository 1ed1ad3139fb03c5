// SPDX-License-Identifier: Apache-2.0
//! Round trip of a brokered call to the no-network `echo` tool, next to a
//! raw `SOCK_SEQPACKET` ping-pong between two processes measured in the same
//! run. Target: brokered p50 at most 1.5x the raw p50.
//!
//! Also the cost of tokens: the same call on a connection bound to a token
//! (the signature was checked once, at `Bind`; each call re-checks time,
//! audience, revocation and the grant), a fresh connect + `Bind` + call
//! each time (the signature checked every time), and the signature check
//! alone, in process.
//!
//! Run: `cargo bench -p keyward-tests --bench roundtrip` (as root, after
//! `cargo build --release --workspace --bins`: the broker is the real
//! binary, started like the end-to-end tests start it).
#![allow(clippy::unwrap_used)]

use std::io::BufRead;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent_shim::client::Client;
use keyward_proto::{Bind, Mint, Request, Response};
use keyward_tests::bench::{micros, Stats, ECHO_CONFIG};
use keyward_tests::Broker;

const WARMUP: usize = 2_000;
/// Rounds per kind, measured in interleaved blocks so that every kind sees
/// the same machine state (on a VM, wake-up latency drifts with load).
/// `KEYWARD_BENCH_ROUNDS` sets fewer, e.g. to run the broker under
/// `valgrind --tool=callgrind` and count instructions per call.
static ROUNDS: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| {
    std::env::var("KEYWARD_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse::<usize>().ok())
        .map_or(60_000, |r| r.max(BLOCK) / BLOCK * BLOCK)
});
const BLOCK: usize = 1_000;

/// Measure several kinds of round trip in interleaved blocks of [`BLOCK`]
/// rounds each, [`ROUNDS`] per kind in all, after a warm-up of each.
fn measure_interleaved(kinds: &mut [&mut dyn FnMut()]) -> Vec<Stats> {
    for round in kinds.iter_mut() {
        for _ in 0..WARMUP {
            round();
        }
    }
    let mut samples: Vec<Vec<Duration>> =
        kinds.iter().map(|_| Vec::with_capacity(*ROUNDS)).collect();
    for _ in 0..*ROUNDS / BLOCK {
        for (round, samples) in kinds.iter_mut().zip(&mut samples) {
            for _ in 0..BLOCK {
                let start = Instant::now();
                round();
                samples.push(start.elapsed());
            }
        }
    }
    samples.into_iter().map(Stats::of).collect()
}

/// Measure one kind on its own (for slow kinds).
fn measure(rounds: usize, mut round: impl FnMut()) -> Stats {
    for _ in 0..WARMUP.min(rounds) {
        round();
    }
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = Instant::now();
        round();
        samples.push(start.elapsed());
    }
    Stats::of(samples)
}

struct Figures {
    raw: Stats,
    direct: Stats,
    bound: Stats,
    bind_each_call: Stats,
    /// The signature check alone, per token.
    verify: Duration,
}

fn echo(client: &mut Client) {
    let params = [("message".to_owned(), "ping".to_owned())];
    match client.call("echo", &params).unwrap() {
        Response::Done(_) => {}
        other => panic!("{other:?}"),
    }
}

fn bind(client: &mut Client, token: &str) {
    let bind = Request::Bind(Bind {
        token: token.to_owned(),
    });
    match client.request(&bind).unwrap() {
        Response::Bound(_) => {}
        other => panic!("{other:?}"),
    }
}

/// A second process that sends every `SOCK_SEQPACKET` message straight
/// back: the raw baseline. Returns it and a connected socket.
fn pingpong_peer(dir: &std::path::Path) -> (std::process::Child, std::os::fd::OwnedFd) {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let path = dir.join("raw.sock");
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
    (server, fd)
}

fn figures() -> Figures {
    use nix::sys::socket::{recv, send, MsgFlags};
    // The bound kind is root's token-bound session, which is rate-limited
    // like anyone's: lift the limit, to measure the call and not it.
    let config = ECHO_CONFIG.replace(
        "[broker]\n",
        "[broker]\nrequests_per_second = 1000000000\nrequest_burst = 1000000000\n",
    );
    let broker = Broker::start(&config, &[]);
    let (mut server, raw_fd) = pingpong_peer(broker.dir.path());
    let mut client = Client::connect(&broker.socket).unwrap();
    let mint = Request::Mint(Mint {
        tools: vec!["echo".into()],
        params: vec![],
        ttl_secs: None,
        max_uses: None,
        task: "bench".into(),
        audience: None,
        exact_call: false,
    });
    let token = match client.request(&mint).unwrap() {
        Response::Minted(m) => m.token,
        other => panic!("{other:?}"),
    };
    let mut bound_client = Client::connect(&broker.socket).unwrap();
    bind(&mut bound_client, &token);

    // The same bytes a brokered echo call sends.
    let message = keyward_proto::encode(&keyward_tests::echo_request("ping")).unwrap();
    let mut buf = vec![0u8; 1024];
    let mut raw_round = || {
        send(raw_fd.as_raw_fd(), &message, MsgFlags::MSG_NOSIGNAL).unwrap();
        recv(raw_fd.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
    };
    let mut direct_round = || echo(&mut client);
    let mut bound_round = || echo(&mut bound_client);
    let mut stats =
        measure_interleaved(&mut [&mut raw_round, &mut direct_round, &mut bound_round]).into_iter();
    let (raw, direct, bound) = (
        stats.next().unwrap(),
        stats.next().unwrap(),
        stats.next().unwrap(),
    );
    drop(raw_fd);
    server.wait().unwrap();

    let bind_each_call = measure(*ROUNDS / 20, || {
        let mut c = Client::connect(&broker.socket).unwrap();
        bind(&mut c, &token);
        echo(&mut c);
    });

    let raw_key = std::fs::read(broker.dir.path().join("state/signing.key")).unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&raw_key.try_into().unwrap()).verifying_key();
    let n = 20_000u32;
    let start = Instant::now();
    for _ in 0..n {
        keyward_proto::token::verify(std::hint::black_box(&token), &key).unwrap();
    }
    Figures {
        raw,
        direct,
        bound,
        bind_each_call,
        verify: start.elapsed() / n,
    }
}

/// Run the bench, and every process it starts (broker, ping-pong peer),
/// on CPU 0. Where the two ends of a round trip land on different vCPUs, a
/// wake-up crosses CPUs, and on a VM that costs tens of microseconds and
/// swamps what is being measured; which placement the scheduler picks
/// varies from run to run. On one CPU every kind is measured the same way.
fn pin_to_one_cpu() {
    let mut set = nix::sched::CpuSet::new();
    set.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
}

fn main() {
    // `cargo test --benches` runs this binary without --bench; keep that
    // fast by only measuring when invoked by `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("roundtrip: skipped (run with `cargo bench`)");
        return;
    }
    pin_to_one_cpu();
    let b = figures();
    let raw = &b.raw;
    let rounds = *ROUNDS;
    println!(
        "round trip over SOCK_SEQPACKET: {rounds} rounds of each kind, interleaved in blocks \
         of {BLOCK}, after {WARMUP} warm-up"
    );
    println!(
        "{:<30} {:>9} {:>9} {:>9} {:>9}",
        "", "p50 µs", "p90 µs", "p99 µs", "mean µs"
    );
    for (name, s) in [
        ("raw ping-pong (2 processes)", raw),
        ("brokered echo call", &b.direct),
        ("  same, on a bound token", &b.bound),
        ("  connect+bind+call each time*", &b.bind_each_call),
    ] {
        println!(
            "{name:<30} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            micros(s.p50),
            micros(s.p90),
            micros(s.p99),
            micros(s.mean)
        );
    }
    println!("* measured on its own, {} rounds", *ROUNDS / 20);
    println!(
        "ratio brokered/raw at p50: {:.2}x (target <= 1.5x)",
        micros(b.direct.p50) / micros(raw.p50)
    );
    println!(
        "token: a bound call costs {:+.2} µs over a direct call at p50; \
         the signature check alone is {:.2} µs, paid once per Bind",
        micros(b.bound.p50) - micros(b.direct.p50),
        micros(b.verify)
    );
}
