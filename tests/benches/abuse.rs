// SPDX-License-Identifier: Apache-2.0
//! The broker under load, on loopback, with its shipped default limits:
//!
//! 1. Fairness: one uid floods connections, bound connections with 16
//!    channels each, mints and calls for 20 s, while a second uid's direct
//!    and counted-token calls are measured (100 a second, paced). Their
//!    p99 against the same measurement unloaded; target within 3×, with
//!    zero errors for the second uid. The broker's RSS and descriptor
//!    count before and after.
//! 2. Throughput of direct `echo` calls with 1, 8 and 64 clients, each on
//!    its own connection, calling back to back for 3 s.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench -p
//! keyward-tests --bench abuse` (as root: the flooding and measured peers
//! are unprivileged uids). `ABUSE_SECONDS` shortens the flood.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_shim::client::Client;
use keyward_tests::{binary, Broker, Ran};

const VICTIM_UID: u32 = 61000;
const FLOODER_UID: u32 = 61003;

const CONFIG: &str = r#"
[broker]
socket = "{socket}"
socket_mode = "0666"
state_dir = "{dir}/state"
max_connections_per_uid = 100

[[principal]]
name = "bench"
uids = [0]
may_call = ["echo"]

[[principal]]
name = "victim"
uids = [61000]
may_call = ["echo"]
may_delegate = ["echo"]

[[principal]]
name = "flooder"
uids = [61003]
may_call = ["echo"]
may_delegate = ["echo"]

[[tool]]
name = "echo"
kind = "echo"
params.message = { type = "string", max_len = 100 }
"#;

/// RSS in KiB and open descriptors of a process.
fn footprint(pid: i32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (rss, fds)
}

/// A token minted by `uid` for itself, in a file only it can read.
fn token_file(broker: &Broker, uid: u32, extra: &[&str]) -> std::path::PathBuf {
    let mut args = vec!["mint", "--tool", "echo", "--ttl", "10m"];
    args.extend_from_slice(extra);
    let ran = Ran::from(broker.shim(uid, &args));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let file = broker.dir.path().join(format!("token-{uid}"));
    std::fs::write(&file, ran.stdout.trim()).unwrap();
    std::os::unix::fs::chown(&file, Some(uid), Some(uid)).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    file
}

fn peer(args: &[&str]) -> std::process::Child {
    Command::new(binary("kw-test-peer"))
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn measure(broker: &Broker, token: &std::path::Path, seconds: u64) -> String {
    let child = peer(&[
        "measure",
        broker.socket.to_str().unwrap(),
        &VICTIM_UID.to_string(),
        token.to_str().unwrap(),
        &seconds.to_string(),
    ]);
    String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
}

/// `name p50 p99 n errors` lines into (name, p99 µs, errors).
fn p99s(text: &str) -> Vec<(String, f64, usize)> {
    text.lines()
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (
                w[0].to_owned(),
                w[2].parse().unwrap(),
                w[4].parse().unwrap(),
            )
        })
        .collect()
}

fn fairness(seconds: u64) {
    let broker = Broker::start(CONFIG, &[]);
    let victim_token = token_file(&broker, VICTIM_UID, &["--uses", "1000000"]);
    let flood_token = token_file(&broker, FLOODER_UID, &[]);
    let before = footprint(broker.pid());
    let unloaded = measure(&broker, &victim_token, 10);
    let flood = peer(&[
        "stress",
        broker.socket.to_str().unwrap(),
        &FLOODER_UID.to_string(),
        flood_token.to_str().unwrap(),
        &seconds.to_string(),
    ]);
    // The broker's peak footprint while the flood lasts.
    let pid = broker.pid();
    let flooding = Arc::new(AtomicBool::new(true));
    let sampler = {
        let flooding = Arc::clone(&flooding);
        std::thread::spawn(move || {
            let mut peak = (0, 0);
            while flooding.load(Ordering::Relaxed) {
                let (rss, fds) = footprint(pid);
                peak = (peak.0.max(rss), peak.1.max(fds));
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let loaded = measure(&broker, &victim_token, seconds.saturating_sub(1).max(1));
    let flooded = String::from_utf8(flood.wait_with_output().unwrap().stdout).unwrap();
    flooding.store(false, Ordering::Relaxed);
    let during = sampler.join().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let after = footprint(broker.pid());

    println!("fairness: uid {FLOODER_UID} floods for {seconds} s; uid {VICTIM_UID} measured (µs)");
    println!("  flood: {}", flooded.trim());
    println!(
        "  {:<8} {:>10} {:>10} {:>8} {:>8}",
        "calls", "p50", "p99", "n", "errors"
    );
    for (label, text) in [("unloaded", &unloaded), ("flooded", &loaded)] {
        for line in text.lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            println!(
                "  {:<8} {:>10} {:>10} {:>8} {:>8}  ({label})",
                w[0], w[1], w[2], w[3], w[4]
            );
        }
    }
    for ((name, base, _), (_, under, errors)) in p99s(&unloaded).into_iter().zip(p99s(&loaded)) {
        println!(
            "  {name}: p99 {:.2}× unloaded (target ≤ 3×), {errors} errors (target 0)",
            under / base
        );
    }
    println!(
        "  broker RSS {} KiB, {} fds before; peak {} KiB, {} fds during the flood; \
         {} KiB, {} fds 1 s after",
        before.0, before.1, during.0, during.1, after.0, after.1
    );
}

fn throughput() {
    let broker = Broker::start(CONFIG, &[]);
    println!("throughput: direct echo calls, back to back, 3 s per row (root, not rate-limited)");
    for clients in [1usize, 8, 64] {
        let done = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                let socket = broker.socket.clone();
                let (done, stop) = (Arc::clone(&done), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let mut client = Client::connect(&socket).unwrap();
                    let params = [("message".to_owned(), "ping".to_owned())];
                    while !stop.load(Ordering::Relaxed) {
                        client.call("echo", &params).unwrap();
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let start_count = done.load(Ordering::Relaxed);
        let started = Instant::now();
        std::thread::sleep(Duration::from_secs(3));
        let calls = done.load(Ordering::Relaxed) - start_count;
        let rate = calls as f64 / started.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        println!("  {clients:>3} clients: {rate:>9.0} calls/s");
    }
}

fn main() {
    keyward_tests::require_root();
    let seconds = std::env::var("ABUSE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    fairness(seconds);
    throughput();
}
