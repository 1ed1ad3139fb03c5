// SPDX-License-Identifier: Apache-2.0
//! A `tools/call` round trip through `agent-shim mcp` (JSON-RPC over its
//! stdin/stdout, the broker's `echo` tool) against a direct `Client::call`
//! of the same tool, measured in the same run, interleaved in blocks.
//!
//! Run: `cargo bench -p keyward-tests --bench mcp` (as root, after
//! `cargo build --release --workspace --bins`).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Command, Stdio};
use std::time::Instant;

use agent_shim::client::Client;
use keyward_proto::Response;
use keyward_tests::bench::{micros, Stats, ECHO_CONFIG};
use keyward_tests::{binary, Broker};

const WARMUP: usize = 500;
const ROUNDS: usize = 10_000;
const BLOCK: usize = 500;

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("mcp: skipped (run with `cargo bench`)");
        return;
    }
    let broker = Broker::start(ECHO_CONFIG, &[]);
    let mut child = Command::new(binary("agent-shim"))
        .arg("mcp")
        .env("KEYWARD_SOCKET", &broker.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let mut exchange = |request: &str, line: &mut String| {
        stdin.write_all(request.as_bytes()).unwrap();
        stdin.flush().unwrap();
        line.clear();
        stdout.read_line(line).unwrap();
    };
    exchange(
        "{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"initialize\",\"params\":{\"protocolVersion\":\"2025-06-18\",\"capabilities\":{},\"clientInfo\":{\"name\":\"bench\",\"version\":\"0\"}}}\n",
        &mut line,
    );
    let call = "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"echo\",\"arguments\":{\"message\":\"ping\"}}}\n";
    // The `initialized` notification has no reply: it goes with the first call.
    let initialized = "{\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}\n";
    exchange(&format!("{initialized}{call}"), &mut line);
    assert!(
        line.contains("ping") && !line.contains("isError\":true"),
        "{line}"
    );

    let mut client = Client::connect(&broker.socket).unwrap();
    let params = [("message".to_owned(), "ping".to_owned())];
    let mut direct = || match client.call("echo", &params).unwrap() {
        Response::Done(_) => {}
        other => panic!("{other:?}"),
    };
    let mut through_mcp = || {
        exchange(call, &mut line);
    };
    for _ in 0..WARMUP {
        direct();
        through_mcp();
    }
    let (mut a, mut b) = (Vec::with_capacity(ROUNDS), Vec::with_capacity(ROUNDS));
    for _ in 0..ROUNDS / BLOCK {
        for (round, samples) in [
            (&mut direct as &mut dyn FnMut(), &mut a),
            (&mut through_mcp as &mut dyn FnMut(), &mut b),
        ] {
            for _ in 0..BLOCK {
                let start = Instant::now();
                round();
                samples.push(start.elapsed());
            }
        }
    }
    let (direct, mcp) = (Stats::of(a), Stats::of(b));
    println!("tools/call round trip: {ROUNDS} rounds of each, interleaved in blocks of {BLOCK}");
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>9}",
        "", "p50 µs", "p90 µs", "p99 µs", "mean µs"
    );
    for (name, s) in [
        ("direct Client::call (echo)", &direct),
        ("tools/call via agent-shim mcp", &mcp),
    ] {
        println!(
            "{name:<34} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            micros(s.p50),
            micros(s.p90),
            micros(s.p99),
            micros(s.mean)
        );
    }
    println!(
        "mcp adds {:.2} µs at p50",
        micros(mcp.p50) - micros(direct.p50)
    );
    let _ = child.kill();
    let _ = child.wait();
}
