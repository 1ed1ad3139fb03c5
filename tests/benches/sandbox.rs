// SPDX-License-Identifier: Apache-2.0
//! Start-up cost of the sandbox: `agent-shim run -- /bin/true` (connect,
//! `Bind`, namespaces and minimal root, Landlock, seccomp, exec) in
//! namespace mode and in fallback mode (`KEYWARD_TEST_NO_USERNS=1`), next
//! to a bare `/bin/true` and to `bwrap --ro-bind / / --dev /dev --proc
//! /proc --unshare-all /bin/true` (and the same with `--share-net`, whose
//! difference is what a network namespace costs), measured in the same
//! run. Target: namespace mode's overhead over bare below bwrap's.
//!
//! Every row runs as an unprivileged uid (`agent-shim run` refuses root).
//!
//! Run: `cargo bench -p keyward-tests --bench sandbox` (as root, after
//! `cargo build --release --workspace --bins`). The bwrap row needs Debian's
//! `bubblewrap` package and is skipped with a message without it.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keyward_tests::bench::{Stats, ECHO_CONFIG};
use keyward_tests::{binary, Broker};

const WARMUP: usize = 20;
const RUNS: usize = 300;

/// Every row runs as this unprivileged uid: `agent-shim run` refuses root,
/// and the comparison is fair only if all rows run alike.
const BENCH_UID: u32 = keyward_tests::PRINCIPAL_UID;

/// Spawn and wait for `argv` RUNS times (after WARMUP); every run must
/// exit 0.
fn measure(argv: &[&str], socket: &Path) -> Stats {
    measure_with(argv, socket, &[])
}

/// [`measure`] with extra environment variables.
fn measure_with(argv: &[&str], socket: &Path, env: &[(&str, &str)]) -> Stats {
    let run = || {
        let start = Instant::now();
        let status = Command::new(argv[0])
            .args(&argv[1..])
            .envs(env.iter().copied())
            .uid(BENCH_UID)
            .gid(BENCH_UID)
            .env("KEYWARD_SOCKET", socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .unwrap();
        let took = start.elapsed();
        assert!(status.success(), "{argv:?}: {status}");
        took
    };
    for _ in 0..WARMUP {
        run();
    }
    Stats::of((0..RUNS).map(|_| run()).collect())
}

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

fn main() {
    keyward_tests::require_root();
    let broker = Broker::start(ECHO_CONFIG, &[]);
    let shim = binary("agent-shim");
    let shim = shim.to_str().unwrap();
    let minted = Command::new(shim)
        .args([
            "mint",
            "--tool",
            "echo",
            "--for-uid",
            &BENCH_UID.to_string(),
        ])
        .env("KEYWARD_SOCKET", &broker.socket)
        .output()
        .unwrap();
    assert!(minted.status.success(), "mint: {minted:?}");
    let token_file = broker.dir.path().join("token");
    std::fs::write(&token_file, &minted.stdout).unwrap();
    std::os::unix::fs::chown(&token_file, Some(BENCH_UID), Some(BENCH_UID)).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let token_file = token_file.to_str().unwrap();

    let bwrap = ["/usr/bin/bwrap", "/bin/bwrap"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let mut rows: Vec<(&str, Stats)> = vec![
        ("bare /bin/true", measure(&["/bin/true"], &broker.socket)),
        (
            "agent-shim run -- /bin/true (namespaces, no token)",
            measure(&[shim, "run", "--", "/bin/true"], &broker.socket),
        ),
        (
            "agent-shim run --token-file F -- /bin/true (namespaces: bind + sandbox + exec)",
            measure(
                &[shim, "run", "--token-file", token_file, "--", "/bin/true"],
                &broker.socket,
            ),
        ),
        (
            "agent-shim run --token-file F -- /bin/true (fallback: bind + sandbox + exec)",
            measure_with(
                &[shim, "run", "--token-file", token_file, "--", "/bin/true"],
                &broker.socket,
                &[("KEYWARD_TEST_NO_USERNS", "1")],
            ),
        ),
    ];
    match bwrap {
        Some(bwrap) => rows.push((
            "bwrap --ro-bind / / --dev /dev --proc /proc --unshare-all /bin/true",
            measure(
                &[
                    bwrap,
                    "--ro-bind",
                    "/",
                    "/",
                    "--dev",
                    "/dev",
                    "--proc",
                    "/proc",
                    "--unshare-all",
                    "/bin/true",
                ],
                &broker.socket,
            ),
        )),
        None => println!("bwrap row skipped: install Debian's bubblewrap package"),
    }
    if let Some(bwrap) = bwrap {
        rows.push((
            "bwrap ... --unshare-all --share-net /bin/true (no network namespace)",
            measure(
                &[
                    bwrap,
                    "--ro-bind",
                    "/",
                    "/",
                    "--dev",
                    "/dev",
                    "--proc",
                    "/proc",
                    "--unshare-all",
                    "--share-net",
                    "/bin/true",
                ],
                &broker.socket,
            ),
        ));
    }

    let bare = rows[0].1.p50;
    println!("\n{RUNS} runs each after {WARMUP} warm-up; wall time of spawn + wait, in µs\n");
    println!("| | p50 µs | p90 µs | mean µs | p50 over bare µs |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (name, s) in &rows {
        println!(
            "| {name} | {} | {} | {} | {} |",
            us(s.p50),
            us(s.p90),
            us(s.mean),
            us(s.p50.saturating_sub(bare))
        );
    }
    if let (Some(shim), Some(bwrap)) = (rows.get(2), rows.get(4)) {
        let shim_over = shim.1.p50.saturating_sub(bare);
        let bwrap_over = bwrap.1.p50.saturating_sub(bare);
        println!(
            "\nsandbox overhead at p50: agent-shim run (namespaces) {} µs, bwrap {} µs ({:.2}x; target: below 1x)",
            us(shim_over),
            us(bwrap_over),
            shim_over.as_secs_f64() / bwrap_over.as_secs_f64().max(1e-9)
        );
    }
    if let (Some(all), Some(shared)) = (rows.get(4), rows.get(5)) {
        println!(
            "network namespace (bwrap --unshare-all minus --share-net) at p50: {} µs",
            us(all.1.p50.saturating_sub(shared.1.p50))
        );
    }
}
