// SPDX-License-Identifier: Apache-2.0
//! `agent-shim run` as a supervisor: it refuses root, leaves no
//! capability to the program, lets nothing the program started outlive
//! it, and does not hang when started with `SIGCHLD` ignored.
#![allow(clippy::unwrap_used, unsafe_code)]

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keyward_tests::{binary, require_root, Ran, PRINCIPAL_UID};

/// `agent-shim run ARGS` as the unprivileged test uid, without a token
/// (no broker is needed to test the sandbox's own supervision).
fn shim_run(args: &[&str]) -> Command {
    let mut cmd = Command::new(binary("agent-shim"));
    cmd.arg("run")
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null())
        .uid(PRINCIPAL_UID)
        .gid(PRINCIPAL_UID);
    cmd
}

/// Wait for `child` (started with no pipes: a survivor holding one would
/// keep a reader waiting), killing it and failing after `limit`.
fn wait_within(mut child: std::process::Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn root_is_refused() {
    require_root();
    let ran = Ran::from(
        Command::new(binary("agent-shim"))
            .args(["run", "--", "/bin/true"])
            .env_clear()
            .output()
            .unwrap(),
    );
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains("as root"), "{ran:?}");
}

/// A shim started with capabilities (here an ambient CAP_NET_RAW, as a
/// file capability or a service manager could give it) passes none on.
#[test]
fn the_program_gets_no_capability() {
    require_root();
    let ran = Ran::from(
        Command::new("setpriv")
            .args([
                &format!("--reuid={PRINCIPAL_UID}"),
                &format!("--regid={PRINCIPAL_UID}"),
                "--clear-groups",
                "--inh-caps=+net_raw",
                "--ambient-caps=+net_raw",
            ])
            .arg(binary("agent-shim"))
            .args(["run", "--", "/bin/grep", "^Cap", "/proc/self/status"])
            .env_clear()
            .output()
            .unwrap(),
    );
    assert_eq!(ran.code, Some(0), "{ran:?}");
    for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert!(
            ran.stdout.contains(&format!("{set}:\t0000000000000000")),
            "{set} not empty: {ran:?}"
        );
    }
}

#[test]
fn nothing_the_program_started_outlives_it() {
    require_root();
    // A double fork: the sleeper is orphaned when its parent subshell
    // exits, then the program exits at once.
    let marker = "31.4159";
    let script = format!("(sleep {marker} &); exit 7");
    let child = shim_run(&["--", "/bin/sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert_eq!(wait_within(child, Duration::from_secs(20)), Some(7));
    let survivors: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(marker))
        .collect();
    assert!(survivors.is_empty(), "still running: {survivors:?}");
}

#[test]
fn an_ignored_sigchld_does_not_hang_the_shim() {
    require_root();
    let mut cmd = shim_run(&["--", "/bin/true"]);
    // SAFETY: between fork and exec this only calls `signal`, which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGCHLD, libc::SIG_IGN);
            Ok(())
        });
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert_eq!(wait_within(child, Duration::from_secs(20)), Some(0));
}

#[test]
fn a_token_variable_that_is_not_text_is_an_error_not_no_token() {
    use std::os::unix::ffi::OsStrExt;
    require_root();
    let ran = Ran::from(
        shim_run(&["--", "/bin/true"])
            .env(
                "KEYWARD_TOKEN",
                std::ffi::OsStr::from_bytes(b"kw1.\xff\xfe"),
            )
            .output()
            .unwrap(),
    );
    assert_ne!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stderr.contains("KEYWARD_TOKEN"), "{ran:?}");
}
