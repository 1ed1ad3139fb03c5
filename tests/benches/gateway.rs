// SPDX-License-Identifier: Apache-2.0
//! Time to first byte of a streamed chat completion through `agent-shim
//! run --gateway` (the program's HTTP request over loopback in its own
//! network namespace, the shim's relay, a broker channel, the policy and
//! token check, the broker's request upstream, and each piece of the
//! answer judged and relayed back) against the same client talking to the
//! loopback upstream directly, in the same run.
//!
//! The client is `tests/gateway/ttfb.py` (the system's python3, one
//! keep-alive connection, the time from sending a request to the first
//! line of the first event); the upstream is `keyward_tests::llm`, which
//! sends its first event at once. Rounds alternate direct and gateway.
//!
//! Run: `cargo bench -p keyward-tests --bench gateway` (as root, after
//! `cargo build --release --workspace --bins`).
#![allow(clippy::unwrap_used)]

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use keyward_tests::bench::{micros, Stats};
use keyward_tests::llm::Llm;
use keyward_tests::{binary, require_root, Broker, Ran, PRINCIPAL_UID, SECRET};

const ROUNDS: usize = 4;
const RUNS: usize = 200;
const WARMUP: usize = 20;

fn config(port: u16) -> String {
    format!(
        r#"
[broker]
socket = "{{socket}}"
socket_mode = "0666"
credentials_dir = "{{dir}}/creds"
state_dir = "{{dir}}/state"

[[principal]]
name = "bench"
uids = [{PRINCIPAL_UID}]
may_delegate = ["openai"]

[credential.llm]
file = "llm.key"

[[gateway]]
name = "openai"
upstream = "http://127.0.0.1:{port}"
credential = "llm"
auth = {{ bearer = true }}
allow = [ {{ method = "POST", path = "/v1/chat/completions" }} ]
base_url_env = ["OPENAI_BASE_URL"]
base_path = "/v1"
api_key_env = ["OPENAI_API_KEY"]
"#
    )
}

fn samples(ran: &Ran) -> Vec<Duration> {
    assert_eq!(ran.code, Some(0), "{ran:?}");
    ran.stdout
        .split_whitespace()
        .map(|s| Duration::from_micros(s.parse().unwrap()))
        .collect()
}

fn main() {
    require_root();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway/ttfb.py");
    let script = script.display().to_string();
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway");
    let scripts = scripts.display().to_string();
    let llm = Llm::start(None, SECRET);
    let broker = Broker::start(&config(llm.port), &[("llm.key", SECRET)]);
    let minted = Ran::from(broker.shim(
        PRINCIPAL_UID,
        &[
            "mint", "--tool", "openai", "--task", "bench", "--ttl", "15m",
        ],
    ));
    assert_eq!(minted.code, Some(0), "{minted:?}");
    let token = minted.stdout.lines().next().unwrap().to_owned();
    let direct_url = format!("http://127.0.0.1:{}/v1/chat/completions", llm.port);
    let (runs, warmup) = (RUNS.to_string(), WARMUP.to_string());

    let mut direct = Vec::new();
    let mut gateway = Vec::new();
    for _ in 0..ROUNDS {
        direct.extend(samples(&Ran::from(
            Command::new("/usr/bin/python3")
                .args([script.as_str(), &direct_url, &runs, &warmup])
                .env_clear()
                .uid(PRINCIPAL_UID)
                .gid(PRINCIPAL_UID)
                .output()
                .unwrap(),
        )));
        gateway.extend(samples(&Ran::from(
            Command::new(binary("agent-shim"))
                .args([
                    "run",
                    "--gateway",
                    "openai",
                    "--allow-read",
                    &scripts,
                    "--",
                    "/usr/bin/python3",
                    &script,
                    "-",
                    &runs,
                    &warmup,
                ])
                .env_clear()
                .env("KEYWARD_SOCKET", &broker.socket)
                .env("KEYWARD_TOKEN", &token)
                .env("PATH", "/usr/bin:/bin")
                .uid(PRINCIPAL_UID)
                .gid(PRINCIPAL_UID)
                .output()
                .unwrap(),
        )));
    }
    assert_eq!(llm.seen().len(), 2 * ROUNDS * (RUNS + WARMUP));
    println!(
        "time to first byte of a streamed chat completion, {} samples each",
        ROUNDS * RUNS
    );
    println!("| | p50 µs | p90 µs | p99 µs | mean µs |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (name, samples) in [
        ("direct to the loopback upstream", direct),
        ("through `agent-shim run --gateway`", gateway),
    ] {
        let s = Stats::of(samples);
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} |",
            micros(s.p50),
            micros(s.p90),
            micros(s.p99),
            micros(s.mean)
        );
    }
}
