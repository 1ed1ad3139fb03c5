// SPDX-License-Identifier: Apache-2.0
//! The token state under load, side by side in one run:
//!
//! 1. counted-token call latency (each call writes its use to the log and
//!    waits for the `fdatasync`) on a broker with 0 live tokens and on one
//!    with 100 000, in interleaved blocks (target: flat — the state is in
//!    memory and a write appends a frame whatever the state's size);
//! 2. the same call while another uid (not a principal) attenuates in a
//!    loop from 8 processes at a time (group commit: the call shares an
//!    `fdatasync` with the attenuations instead of queueing behind them).
//!
//! Run: `cargo bench -p keyward-tests --bench state` (as root, after
//! `cargo build --release --workspace --bins`).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_shim::client::Client;
use keyward_proto::token::Audience;
use keyward_proto::{Bind, Mint, Request, Response};
use keyward_tests::bench::{micros, Stats};
use keyward_tests::{echo_request, Broker, STRANGER_UID};

const CONFIG: &str = r#"
[broker]
socket = "{socket}"
socket_mode = "0666"
state_dir = "{dir}/state"
max_token_ttl = "2h"
max_live_tokens_per_uid = 1000000
max_attenuations_per_uid = 1000000
requests_per_second = 1000000
request_burst = 1000000

[[principal]]
name = "bench"
uids = [0]
may_call = ["echo"]
may_delegate = ["echo"]

[[tool]]
name = "echo"
kind = "echo"
params.message = { type = "string", max_len = 100 }
"#;

const CALLS: usize = 3_000;
/// Live tokens on the second broker (`KW_BENCH_LIVE` overrides, e.g. 0
/// to check that the two brokers measure alike when equal).
fn live() -> usize {
    std::env::var("KW_BENCH_LIVE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn mint(client: &mut Client, uid: u32, max_uses: Option<u32>) -> String {
    match client
        .request(&Request::Mint(Mint {
            tools: vec!["echo".into()],
            params: Vec::new(),
            ttl_secs: Some(3600),
            max_uses,
            task: "bench".into(),
            audience: Some(Audience { uid, gid: None }),
            exact_call: false,
        }))
        .unwrap()
    {
        Response::Minted(m) => m.token,
        other => panic!("mint: {other:?}"),
    }
}

fn bound(socket: &Path, token: &str) -> Client {
    let mut client = Client::connect(socket).unwrap();
    let reply = client
        .request(&Request::Bind(Bind {
            token: token.to_owned(),
        }))
        .unwrap();
    assert!(matches!(reply, Response::Bound(_)), "{reply:?}");
    client
}

/// A connection bound to a fresh counted token.
fn counted_client(socket: &Path) -> Client {
    let token = mint(&mut Client::connect(socket).unwrap(), 0, Some(1_000_000));
    bound(socket, &token)
}

fn timed_call(client: &mut Client, samples: &mut Vec<Duration>) {
    let start = Instant::now();
    let reply = client.request(&echo_request("hi")).unwrap();
    samples.push(start.elapsed());
    assert!(matches!(reply, Response::Done(_)), "{reply:?}");
}

/// Latency of `CALLS` counted calls on a fresh counted token.
fn counted_calls(socket: &Path) -> Stats {
    let mut client = counted_client(socket);
    let mut samples = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        timed_call(&mut client, &mut samples);
    }
    Stats::of(samples)
}

/// The same on two brokers, in interleaved blocks of 100 calls, so both
/// see the same machine (the disk's `fsync` latency drifts with load).
fn counted_calls_side_by_side(a: &Path, b: &Path) -> (Stats, Stats) {
    let (mut ca, mut cb) = (counted_client(a), counted_client(b));
    let (mut sa, mut sb) = (Vec::new(), Vec::new());
    for round in 0..CALLS / 100 {
        // Each goes first in every other round.
        let mut pair = [(&mut ca, &mut sa), (&mut cb, &mut sb)];
        if round % 2 == 1 {
            pair.reverse();
        }
        for (client, samples) in pair {
            for _ in 0..100 {
                timed_call(client, samples);
            }
        }
    }
    (Stats::of(sa), Stats::of(sb))
}

/// Counted-call latency while uid [`STRANGER_UID`] runs `agent-shim
/// COMMAND --token T` from 8 threads in a loop; and how many it ran a
/// second meanwhile.
fn under_load(socket: &Path, token: &str, command: &'static str) -> (Stats, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let loaders: Vec<_> = (0..8)
        .map(|_| {
            let stop = Arc::clone(&stop);
            let done = Arc::clone(&done);
            let socket = socket.to_owned();
            let token = token.to_owned();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let out = keyward_tests::shim_command(
                        &socket,
                        STRANGER_UID,
                        &[command, "--token", &token],
                    )
                    .output()
                    .unwrap();
                    assert!(out.status.success(), "{out:?}");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let before = done.load(Ordering::Relaxed);
    let started = Instant::now();
    let stats = counted_calls(socket);
    let rate = (done.load(Ordering::Relaxed) - before) as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for loader in loaders {
        loader.join().unwrap();
    }
    (stats, rate)
}

fn line(what: &str, s: &Stats) {
    println!(
        "{what:<48} p50 {:>8.0} µs  p90 {:>8.0} µs  p99 {:>8.0} µs  mean {:>8.0} µs",
        micros(s.p50),
        micros(s.p90),
        micros(s.p99),
        micros(s.mean)
    );
}

fn main() {
    let live = live();
    let empty_broker = Broker::start(CONFIG, &[]);
    let broker = Broker::start(CONFIG, &[]);
    let socket = broker.socket.clone();

    // 100 000 live tokens, minted from 32 connections at once.
    let started = Instant::now();
    let minted = Arc::new(AtomicUsize::new(0));
    let minters: Vec<_> = (0..32)
        .map(|_| {
            let socket = socket.clone();
            let minted = Arc::clone(&minted);
            std::thread::spawn(move || {
                let mut client = Client::connect(&socket).unwrap();
                while minted.fetch_add(1, Ordering::Relaxed) < live {
                    mint(&mut client, 0, Some(5));
                }
            })
        })
        .collect();
    for minter in minters {
        minter.join().unwrap();
    }
    let mint_secs = started.elapsed().as_secs_f64();
    let (empty, full) = counted_calls_side_by_side(&empty_broker.socket, &socket);

    // Another uid attenuating in a loop, 8 processes at a time; and, as
    // a control for the CPU the processes take, the same uid listing its
    // tools (no write) at the same concurrency.
    let token = mint(&mut Client::connect(&socket).unwrap(), STRANGER_UID, None);
    let (control, control_rate) = under_load(&socket, &token, "tools");
    let (loaded, rate) = under_load(&socket, &token, "attenuate");
    // The same after a restart (which compacts the log into a fresh file).
    let broker = broker.kill9_and_restart();
    let (empty2, full2) = counted_calls_side_by_side(&empty_broker.socket, &broker.socket);
    let log = std::fs::metadata(broker.dir.path().join("state/tokens.log"))
        .map(|m| m.len())
        .unwrap_or(0);

    println!("counted-token call (echo), {CALLS} calls each; the first two interleaved:");
    line("  0 live tokens", &empty);
    line(&format!("  {live} live tokens"), &full);
    line("  0 live tokens (again)", &empty2);
    line(&format!("  {live} live tokens, after a restart"), &full2);
    line(
        &format!("  {live} live, uid {STRANGER_UID} listing tools ({control_rate:.0}/s)"),
        &control,
    );
    line(
        &format!("  {live} live, uid {STRANGER_UID} attenuating ({rate:.0}/s)"),
        &loaded,
    );
    println!(
        "minting {live} tokens from 32 connections: {mint_secs:.1} s ({:.0}/s); log now {:.1} MiB",
        live as f64 / mint_secs,
        log as f64 / (1 << 20) as f64
    );
}
